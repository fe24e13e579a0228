"""Sub-pixel heatmap decoding and the map back to the original image."""

import numpy as np
import pytest

from input_pipeline import geometry as geo
from input_pipeline.ingest import preprocess
from mimjax.evaluators import landmark_decoding as ld


def _render(points, size, sigma):
    """(B, L, 2) [x, y] -> (B, H, W, L) Gaussians, rendered here in float64 (independent
    of the objective's renderer)."""
    height, width = size
    x = points[..., 0][:, None, None, :]
    y = points[..., 1][:, None, None, :]
    cols = np.arange(width)[None, None, :, None]
    rows = np.arange(height)[None, :, None, None]
    return np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2)).astype(np.float32)


@pytest.mark.parametrize("method", ["quadratic", "soft_window"])
@pytest.mark.parametrize("sigma", [1.5, 3.0])
def test_decoding_recovers_random_subpixel_points(method, sigma):
    rng = np.random.default_rng(int(sigma * 10))
    size = (48, 64)
    points = np.stack([rng.uniform(10, 54, (6, 5)), rng.uniform(10, 38, (6, 5))], axis=-1)
    found = ld.decode(_render(points, size, sigma), method)
    assert found.shape == (6, 5, 2) and found.dtype == np.float64
    assert np.abs(found - points).max() < 0.05
    # The integer argmax is what the refinement improves on.
    coarse = ld.decode(_render(points, size, sigma), "argmax")
    assert np.all(coarse == np.round(coarse)) and np.abs(coarse - points).max() <= 0.5 + 1e-9


def test_quadratic_handles_elongated_rotated_peaks():
    # A peak elongated along a diagonal needs the Hessian's cross term.
    x0, y0 = 20.37, 17.81
    rows, cols = np.mgrid[0:40, 0:40]
    u, v = (cols - x0 + rows - y0) / np.sqrt(2), (cols - x0 - rows + y0) / np.sqrt(2)
    peak = np.exp(-(u**2) / (2 * 4.0**2) - v**2 / (2 * 1.5**2))
    found = ld.decode(peak[None, :, :, None], "quadratic")
    np.testing.assert_allclose(found[0, 0], [x0, y0], atol=1e-6)


def test_from_logits_and_scaled_heatmaps():
    points = np.array([[[12.3, 20.6], [30.8, 9.1]]])
    heat = _render(points, (40, 40), 2.0).astype(np.float64)
    logits = np.log(np.maximum(heat, 1e-12)) - np.log1p(-np.minimum(heat, 1 - 1e-9))
    for method in ("quadratic", "soft_window"):
        found = ld.decode(logits, method, from_logits=True)
        assert np.abs(found - points).max() < 0.05
        # Decoding does not care about the heatmap's overall scale.
        assert np.abs(ld.decode(0.3 * heat, method) - points).max() < 0.05


def test_peaks_on_the_border_and_flat_maps_do_not_fail():
    heat = np.zeros((1, 16, 16, 3), np.float32)
    heat[0, 0, 0, 0] = 1.0  # a corner
    heat[0, 15, 7, 1], heat[0, 15, 8, 1] = 1.0, 0.5  # bottom edge, refined along x only
    for method in ld.METHODS:
        found = ld.decode(heat, method)
        assert np.all(np.isfinite(found))
        np.testing.assert_allclose(found[0, 0], [0.0, 0.0], atol=1e-9)
        assert found[0, 1, 1] == 15.0 and 7.0 <= found[0, 1, 0] <= 8.0
        assert np.all(found[0, 2] == [0.0, 0.0])  # all zero: the first pixel, unrefined


def test_bad_heatmaps_name_the_image_and_landmark():
    heat = np.zeros((2, 8, 8, 3), np.float32)
    heat[1, 4, 4, 2] = np.nan
    with pytest.raises(ValueError, match="image 1, landmark 2"):
        ld.decode(heat)
    with pytest.raises(ValueError, match="channels last"):
        ld.decode(heat[0])
    with pytest.raises(ValueError, match="odd"):
        ld.decode(np.zeros((1, 8, 8, 1)), "soft_window", window=4)
    with pytest.raises(ValueError, match="method"):
        ld.decode(np.zeros((1, 8, 8, 1)), "centroid")


def test_round_trip_through_a_resize_and_shift_geometry():
    rng = np.random.default_rng(0)
    original = (2400, 1935)  # (H, W) of an ISBI 2015 cephalogram
    matrix = geo.fit_matrix(original, 256)
    matrix[:, 2] += [7.25, -3.5]  # a shift after the resize (e.g. a translation)
    g = ld.InputGeometry(matrix, original)
    points = np.stack([rng.uniform(0, 1934, 19), rng.uniform(0, 2399, 19)], axis=1)
    on_input = ld.to_model_input(points, g)
    np.testing.assert_allclose(on_input, geo.transform_points(points, matrix), atol=1e-9)
    np.testing.assert_allclose(ld.to_original(on_input, g), points, atol=1e-9)
    # 3 x 3 homogeneous matrices and plain mappings are the same geometry.
    g3 = {"matrix": np.vstack([matrix, [0, 0, 1]]), "original_shape": original}
    np.testing.assert_allclose(ld.to_original(on_input, g3), points, atol=1e-9)


def test_batches_with_one_geometry_per_image_and_augmentation():
    rng = np.random.default_rng(1)
    shapes = [(512, 368), (300, 420)]
    augment = geo.AffineAugment(zoom=(0.9, 1.1), rotate_degrees=10, translate=0.05)
    geometries = [ld.InputGeometry(geo.sample_affine(s, 128, rng, augment), s) for s in shapes]
    points = np.stack([np.stack([rng.uniform(0, s[1] - 1, 4), rng.uniform(0, s[0] - 1, 4)], 1)
                       for s in shapes])
    on_input = ld.to_model_input(points, geometries)
    back = ld.to_original(on_input, geometries)
    np.testing.assert_allclose(back, points, atol=1e-9)
    with pytest.raises(ValueError, match="one geometry per image"):
        ld.to_original(on_input, geometries[:1])
    nan_points = on_input.copy()
    nan_points[0, 1] = np.nan
    assert np.isnan(ld.to_original(nan_points, geometries)[0, 1]).all()


def test_from_resize_pad_matches_the_ingestion_geometry():
    stored = preprocess.Geometry((2400, 1935), (448, 448), 448 / 2400, (0, 43), (448, 361))
    points = np.array([[0.0, 0.0], [1934.0, 2399.0], [1000.5, 1200.25]])
    g = ld.InputGeometry.from_resize_pad(stored.to_json())
    assert g.original_shape == (2400, 1935)
    np.testing.assert_allclose(ld.to_model_input(points, g), stored.map_points(points),
                               atol=1e-9)
    # The pipeline's own warp of the stored 448-px image to a 256-px model input.
    then = geo.fit_matrix((448, 448), 256)
    g2 = ld.InputGeometry.from_resize_pad(stored.to_json(), then=then)
    expected = geo.transform_points(stored.map_points(points), then)
    np.testing.assert_allclose(ld.to_model_input(points, g2), expected, atol=1e-9)
    np.testing.assert_allclose(ld.to_original(expected, g2), points, atol=1e-9)


def test_decoded_points_map_back_to_the_original():
    original = (2400, 1935)
    g = ld.InputGeometry(geo.fit_matrix(original, 128), original)
    truth = np.array([[[812.4, 1333.7], [1500.2, 640.9]]])
    heat = _render(ld.to_model_input(truth, [g]), (128, 128), 2.0)
    back = ld.to_original(ld.decode(heat, "quadratic"), [g])
    # 0.05 px at 128 px is under 1 px of the 2400-px original.
    assert np.abs(back - truth).max() < 0.05 * 2400 / 128


def test_bad_geometries():
    with pytest.raises(ValueError, match="singular"):
        ld.InputGeometry(np.zeros((2, 3)), (10, 10))
    with pytest.raises(ValueError, match="affine"):
        ld.InputGeometry(np.ones((3, 3)), (10, 10))
    with pytest.raises(ValueError, match="2 x 3"):
        ld.InputGeometry(np.eye(2), (10, 10))
