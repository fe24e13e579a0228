"""Landmark metrics: radial errors in mm, MRE / SDR, dataset conventions, bad input."""

import warnings

import numpy as np
import pytest

from input_pipeline import geometry as geo
from mimjax.evaluators import landmark_decoding as ld
from mimjax.evaluators import landmark_metrics as lm


def _triangles():
    """Two images, three landmarks: predictions off by 3-4-5 triangles (and one exact)."""
    true = np.array([[[100.0, 200.0], [50.0, 60.0], [10.0, 10.0]],
                     [[300.0, 400.0], [20.0, 30.0], [70.0, 80.0]]])
    offsets = np.array([[[3.0, 4.0], [-6.0, 8.0], [0.0, 0.0]],
                        [[4.0, -3.0], [0.0, 5.0], [-9.0, -12.0]]])
    return true + offsets, true


def test_known_distances_mre_std_sdr_and_rows():
    pred, true = _triangles()
    m = lm.landmark_metrics(pred, true, lm.ceph_spacing(), image_ids=["a", "b"],
                            thresholds=(1.0, 2.0))
    # 0.1 mm/px: errors 0.5, 1.0, 0, 0.5, 0.5, 1.5 mm.
    np.testing.assert_allclose(m.errors, [[0.5, 1.0, 0.0], [0.5, 0.5, 1.5]], atol=1e-12)
    assert m.unit == "mm"
    assert m.mre == pytest.approx(4.0 / 6)
    assert m.mre_std == pytest.approx(np.std([0.5, 1.0, 0.0, 0.5, 0.5, 1.5]))
    np.testing.assert_allclose(m.per_landmark_mre, [0.5, 0.75, 0.75])
    summary = m.summary()
    assert summary["unit"] == "mm" and summary["num_images"] == 2
    assert summary["mre/landmark_1"] == pytest.approx(0.75)
    rows = m.rows()
    assert [r["image"] for r in rows] == ["a", "b"]
    assert rows[0]["mre"] == pytest.approx(0.5) and rows[1]["error/2"] == pytest.approx(1.5)
    # The mean of the per-image rows is the overall figure (same L per image).
    assert np.mean([r["mre"] for r in rows]) == pytest.approx(m.mre)
    assert m.sdr == {1.0: pytest.approx(5 / 6), 2.0: 1.0}
    assert np.mean([r["sdr/1"] for r in rows]) == pytest.approx(5 / 6)


def test_sdr_counts_on_hand_made_errors():
    errors_mm = np.array([[0.0, 1.99, 2.0, 2.01, 2.5, 2.9, 3.0, 3.5, 4.0, 5.0, 9.5, 12.0]])
    true = np.zeros((1, 12, 2)) + 500.0
    pred = true.copy()
    pred[0, :, 0] += errors_mm[0] / 0.1  # along x only: error = dx * col_mm
    m = lm.landmark_metrics(pred, true, lm.ceph_spacing())
    np.testing.assert_allclose(m.errors, errors_mm, atol=1e-9)
    # <= t counts as a success (the reference's `d <= t`).
    expected = {2.0: 3, 2.5: 5, 3.0: 7, 4.0: 9, 6.0: 10, 9.0: 10, 10.0: 11}
    assert m.sdr == pytest.approx({t: n / 12 for t, n in expected.items()})
    assert m.summary()["sdr/2.5"] == pytest.approx(5 / 12)


def test_anisotropic_spacing_pairs_rows_with_y_and_columns_with_x():
    true = np.array([[[10.0, 10.0], [10.0, 10.0]]])
    pred = np.array([[[13.0, 10.0], [10.0, 14.0]]])  # 3 px along x, 4 px along y
    m = lm.landmark_metrics(pred, true, (0.5, 0.2))  # (row_mm, col_mm)
    np.testing.assert_allclose(m.errors, [[3 * 0.2, 4 * 0.5]])
    diagonal = lm.landmark_metrics(np.array([[[13.0, 14.0]]]), np.array([[[10.0, 10.0]]]),
                                   (0.5, 0.2))
    assert diagonal.errors[0, 0] == pytest.approx(np.hypot(3 * 0.2, 4 * 0.5))
    # Per-image spacings.
    per_image = lm.landmark_metrics(np.repeat(pred, 2, 0), np.repeat(true, 2, 0),
                                    np.array([[0.5, 0.2], [1.0, 1.0]]))
    np.testing.assert_allclose(per_image.errors, [[0.6, 2.0], [3.0, 4.0]])


def test_resized_inputs_back_to_a_ceph_original():
    # Predict at 256 px, map back to the 1935 x 2400 original, score at 0.1 mm/px.
    original = lm.CEPH_ORIGINAL_SHAPE
    g = ld.InputGeometry(geo.fit_matrix(original, 256), original)
    true = np.array([[[800.0, 1200.0], [1500.0, 600.0], [300.0, 2000.0]]])
    on_input = ld.to_model_input(true, [g])
    scale = 256 / 2400  # fit_matrix keeps the aspect ratio: one scale for both axes
    # Move each point on the 256-px input by a 3-4-5 triangle of input pixels.
    moved = on_input + np.array([[[3.0, 4.0], [-3.0, 4.0], [0.0, -5.0]]])
    pred = ld.to_original(moved, [g])
    m = lm.landmark_metrics(pred, true, lm.ceph_spacing(1), image_shapes=original)
    # 5 input pixels = 5 / scale original pixels = 0.5 / scale mm.
    np.testing.assert_allclose(m.errors, np.full((1, 3), 0.5 / scale), rtol=1e-9)
    assert m.predictions_outside == 0
    # An aspect-changing resize to 256 x 256 (as the reference's 416 x 512 stretch): the
    # same input-pixel error is a different distance along x and y of the original.
    sx, sy = 256 / 1935, 256 / 2400
    stretch = ld.InputGeometry([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]], original)
    pred = ld.to_original(ld.to_model_input(true, [stretch]) + [3.0, 4.0], [stretch])
    m = lm.landmark_metrics(pred, true, lm.ceph_spacing(1), image_shapes=original)
    np.testing.assert_allclose(m.errors, np.hypot(0.1 * 3 / sx, 0.1 * 4 / sy), rtol=1e-9)


def test_hand_wrist_convention_puts_landmarks_0_and_4_50_mm_apart():
    rng = np.random.default_rng(0)
    true = rng.uniform(50, 400, (3, 37, 2))
    spacing = lm.hand_spacing_from_wrist(true)
    assert spacing.unit == "mm" and spacing.values.shape == (3, 2)
    # The wrist itself, measured as an "error" of landmark 0 against landmark 4: 50 mm.
    pred = true.copy()
    pred[:, 0] = true[:, 4]
    m = lm.landmark_metrics(pred, true, spacing)
    np.testing.assert_allclose(m.errors[:, 0], 50.0, rtol=1e-12)
    np.testing.assert_allclose(m.errors[:, 1:], 0.0)
    # Payer et al.'s variant: landmarks 1 and 5.
    payer = lm.hand_spacing_from_wrist(true, landmarks=(1, 5))
    np.testing.assert_allclose(payer.values[:, 0],
                               50.0 / np.linalg.norm(true[:, 1] - true[:, 5], axis=-1))
    broken = true.copy()
    broken[2, 4] = broken[2, 0]
    with pytest.raises(ValueError, match="image 2: true landmarks 0 and 4"):
        lm.hand_spacing_from_wrist(broken)


def test_chest_reports_pixels_of_the_reference_resolution():
    shapes = np.array([[2048.0, 1024.0], [1000.0, 1000.0]])  # (H, W)
    spacing = lm.chest_spacing(shapes)
    assert spacing.unit == "px@512x512"
    true = np.full((2, 1, 2), 100.0)
    pred = true + np.array([[[4.0, 0.0]], [[0.0, 10.0]]])
    m = lm.landmark_metrics(pred, true, spacing)
    # 4 px along x of a 1024-wide image = 2 px at 512; 10 px along y of 1000 = 5.12 px.
    np.testing.assert_allclose(m.errors, [[2.0], [5.12]])
    assert m.summary()["unit"] == "px@512x512"


def test_missing_spacing_warns_and_reports_pixels():
    pred, true = _triangles()
    with pytest.warns(UserWarning, match="PIXELS.*spacing=\\(row_mm, col_mm\\)"):
        m = lm.landmark_metrics(pred, true)
    assert m.unit == "px" and m.rows()[0]["unit"] == "px"
    np.testing.assert_allclose(m.errors, [[5.0, 10.0, 0.0], [5.0, 5.0, 15.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with spacing, nothing to warn about
        lm.landmark_metrics(pred, true, lm.ceph_spacing())


def test_bad_input_names_the_image_and_landmark():
    pred, true = _triangles()
    nan_pred = pred.copy()
    nan_pred[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"image 1 \(id 'b'\), landmark 2: the predicted"):
        lm.landmark_metrics(nan_pred, true, (0.1, 0.1), image_ids=["a", "b"])
    nan_true = true.copy()
    nan_true[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="image 0, landmark 1: the true point"):
        lm.landmark_metrics(pred, nan_true, (0.1, 0.1))
    with pytest.raises(ValueError, match="the prediction has 2 landmarks per image, the truth 3"):
        lm.landmark_metrics(pred[:, :2], true, (0.1, 0.1))
    with pytest.raises(ValueError, match="image 1, landmark 0: the true point .* outside"):
        lm.landmark_metrics(pred, true, (0.1, 0.1), image_shapes=(350, 120))
    with pytest.raises(ValueError, match="image 1: spacing"):
        lm.landmark_metrics(pred, true, np.array([[0.1, 0.1], [0.0, 0.1]]))
    with pytest.raises(ValueError, match="unique"):
        lm.landmark_metrics(pred, true, (0.1, 0.1), image_ids=["a", "a"])


def test_predictions_outside_the_image_are_scored_and_counted():
    pred, true = _triangles()
    pred[0, 2] = [-40.0, 10.0]  # in the padding, left of the image
    m = lm.landmark_metrics(pred, true, (0.1, 0.1), image_shapes=(500, 400))
    assert m.predictions_outside == 1
    assert m.errors[0, 2] == pytest.approx(5.0)


def test_paired_bootstrap_over_images():
    rng = np.random.default_rng(3)
    true = rng.uniform(100, 900, (40, 5, 2))
    good = true + rng.normal(0, 10, true.shape)
    bad = true + rng.normal(0, 30, true.shape)
    rows_good = lm.landmark_metrics(good, true, lm.ceph_spacing()).rows()
    rows_bad = lm.landmark_metrics(bad, true, lm.ceph_spacing()).rows()
    diff = lm.paired_difference(rows_good, rows_bad, "mre", num_resamples=500)
    assert diff.estimate < 0 and diff.high < 0  # the better arm has the lower MRE
    same = lm.paired_difference(rows_good, rows_good, "sdr/2")
    assert same.estimate == 0 and same.low == 0 and same.high == 0
    with pytest.raises(ValueError, match="different images"):
        lm.paired_difference(rows_good[:-1], rows_bad, "mre")
    with pytest.warns(UserWarning):
        rows_px = lm.landmark_metrics(bad, true).rows()
    with pytest.raises(ValueError, match="different units"):
        lm.paired_difference(rows_good, rows_px, "mre")
