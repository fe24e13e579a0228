"""Landmark heatmap targets and losses: torch parity, sub-pixel peaks, masking, soft-argmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimjax.objectives import landmark_heatmap as lh


def _t(array):
    """A torch tensor of its own copy (JAX's arrays are read-only to torch)."""
    return torch.tensor(np.array(array))


def _loss(logits, batch, **settings):
    """landmark_loss compiled once per call (eager dispatch of its many small ops is slow)."""
    return jax.jit(functools.partial(lh.landmark_loss, **settings))(logits, batch)


def _points(seed, batch=2, num=3, low=4.0, high=20.0):
    r = np.random.default_rng(seed)
    return r.uniform(low, high, size=(batch, num, 2)).astype(np.float32)


def _logits(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def test_peak_one_at_subpixel_point_and_centroid_within_1e3():
    points = _points(0, batch=3, num=4, low=14.0, high=34.0)  # >= 5.6 sigma from the edges
    heat, valid = lh.gaussian_heatmaps(points, 48, sigma=2.5)
    assert heat.shape == (3, 48, 48, 4) and heat.dtype == jnp.float32
    heat = np.asarray(heat, np.float64)
    assert bool(np.all(valid))
    rows, cols = np.mgrid[0:48, 0:48]
    for b in range(3):
        for k in range(4):
            x, y = points[b, k]
            m = heat[b, :, :, k]
            centroid = np.array([(m * cols).sum(), (m * rows).sum()]) / m.sum()
            assert np.abs(centroid - [x, y]).max() < 1e-3
            # The value at a pixel centre is the Gaussian of its distance to the point.
            r, c = int(round(y)), int(round(x))
            expected = np.exp(-((c - x) ** 2 + (r - y) ** 2) / (2 * 2.5**2))
            assert m[r, c] == pytest.approx(expected, rel=1e-5)
            assert m.max() <= 1.0


def test_peak_is_exactly_one_on_the_grid_and_rectangular_images():
    points = np.array([[[5.0, 3.0], [0.0, 0.0]]], np.float32)  # [x, y]
    heat, _ = lh.gaussian_heatmaps(points, (8, 12), sigma=1.0)
    heat = np.asarray(heat)
    assert heat.shape == (1, 8, 12, 2)
    assert heat[0, 3, 5, 0] == 1.0 and np.unravel_index(heat[0, :, :, 0].argmax(), (8, 12)) == (
        3, 5)
    assert heat[0, 0, 0, 1] == 1.0


def test_invalid_landmarks_masked_and_zero():
    points = np.array([[[np.nan, 4.0], [3.0, 3.0], [-0.6, 2.0], [7.5, 7.5], [7.6, 1.0]]],
                      np.float32)
    heat, valid = lh.gaussian_heatmaps(points, 8, sigma=1.0)
    assert np.asarray(valid).tolist() == [[False, True, False, True, False]]
    heat = np.asarray(heat)
    assert np.all(np.isfinite(heat))
    assert np.all(heat[..., [0, 2, 4]] == 0) and heat[..., 1].max() == 1.0


def _torch_bce_map(logits, targets):
    per = F.binary_cross_entropy_with_logits(
        _t(logits), _t(targets), reduction="none")
    return per.numpy().astype(np.float64)


def test_bce_matches_torch_all_valid():
    points = _points(1)
    logits = _logits(2, (2, 40, 40, 3))
    targets = np.asarray(lh.gaussian_heatmaps(points, 40, 3.0)[0])
    loss, metrics = _loss(logits, {"landmarks": points}, loss="bce", sigma=3.0)
    expected = F.binary_cross_entropy_with_logits(
        _t(logits), _t(targets)).item()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss_heatmap"]) == pytest.approx(expected, rel=1e-5)
    # The reference's per-map scale: the sum over pixels, averaged over landmarks.
    summed, _ = _loss(logits, {"landmarks": points}, sigma=3.0, pixel_reduction="sum")
    torch_sum = F.binary_cross_entropy_with_logits(
        _t(logits), _t(targets), reduction="sum").item()
    assert float(summed) == pytest.approx(torch_sum / 6, rel=1e-5)


def test_bce_masked_landmarks_left_out():
    points = _points(3)
    points[0, 1] = np.nan  # missing annotation
    points[1, 2] = [-5.0, 10.0]  # off the image
    logits = _logits(4, (2, 32, 32, 3))
    batch = {"landmarks": points, "landmark_valid": np.array([[1, 1, 1], [0, 1, 1]], bool)}
    loss, metrics = _loss(logits, batch, sigma=2.0)
    targets = np.asarray(lh.gaussian_heatmaps(points, 32, 2.0)[0])
    per_map = _torch_bce_map(logits, targets).mean(axis=(1, 2))  # (B, L)
    kept = [(0, 0), (0, 2), (1, 1)]
    expected = np.mean([per_map[b, k] for b, k in kept])
    assert np.isfinite(float(loss))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["valid_landmarks"]) == pytest.approx(3 / 6)
    # Padding rows of an eval batch drop out as a whole.
    loss_pad, _ = _loss(logits, {**batch, "valid": np.array([True, False])}, sigma=2.0)
    assert float(loss_pad) == pytest.approx(np.mean([per_map[0, 0], per_map[0, 2]]), rel=1e-5)


def test_no_valid_landmark_gives_zero_not_nan():
    points = np.full((1, 2, 2), np.nan, np.float32)
    loss, metrics = jax.jit(lambda z: lh.landmark_loss(z, {"landmarks": points}, sigma=2.0,
                                                       coordinate_weight=1.0))(
        _logits(5, (1, 16, 16, 2)))
    assert float(loss) == 0.0 and float(metrics["argmax_error_px"]) == 0.0
    grads = jax.jit(jax.grad(lambda z: lh.landmark_loss(z, {"landmarks": points}, sigma=2.0,
                                                        coordinate_weight=1.0)[0]))(
        jnp.asarray(_logits(5, (1, 16, 16, 2))))
    assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.parametrize("mse_on", ["sigmoid", "raw"])
def test_mse_matches_torch(mse_on):
    points = _points(6)
    points[1, 0] = np.nan
    logits = _logits(7, (2, 36, 36, 3))
    loss, _ = _loss(logits, {"landmarks": points}, loss="mse", mse_on=mse_on, sigma=3.0)
    targets = _t(np.asarray(lh.gaussian_heatmaps(points, 36, 3.0)[0]))
    outputs = _t(logits)
    if mse_on == "sigmoid":
        outputs = torch.sigmoid(outputs)
    per_map = F.mse_loss(outputs, targets, reduction="none").mean(dim=(1, 2)).numpy()
    keep = np.ones((2, 3), bool)
    keep[1, 0] = False
    assert float(loss) == pytest.approx(per_map[keep].mean(), rel=1e-5)


def test_soft_argmax_recovers_a_known_point():
    points = np.array([[[20.3, 17.8], [9.6, 30.25]]], np.float32)
    heat, _ = lh.gaussian_heatmaps(points, 48, sigma=2.0)
    # log of a Gaussian: the spatial softmax is the normalised Gaussian itself.
    log_heat = np.log(np.maximum(np.asarray(heat, np.float64), 1e-30)).astype(np.float32)
    found = np.asarray(lh.soft_argmax(log_heat))
    np.testing.assert_allclose(found, points, atol=1e-3)
    # Flat logits: the mean of every pixel centre, ((W - 1) / 2, (H - 1) / 2).
    found = np.asarray(lh.soft_argmax(np.zeros((1, 10, 16, 1), np.float32)))
    np.testing.assert_allclose(found, [[[7.5, 4.5]]], atol=1e-5)


def test_coordinate_term_and_its_gradient():
    points = np.array([[[10.0, 12.0]]], np.float32)
    heat, _ = lh.gaussian_heatmaps(np.array([[[13.0, 8.0]]], np.float32), 32, 2.0)
    logits = np.log(np.maximum(np.asarray(heat), 1e-30)).astype(np.float32)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda z: lh.landmark_loss(z, {"landmarks": points}, sigma=2.0, coordinate_weight=1.0),
        has_aux=True))
    (loss, metrics), grads = loss_and_grad(jnp.asarray(logits))
    # soft-argmax sits at (13, 8): 5 px from the point, normalised by 2 / 32.
    assert float(metrics["softargmax_error_px"]) == pytest.approx(5.0, abs=1e-3)
    assert float(metrics["loss_coord"]) == pytest.approx(5.0 * 2 / 32, abs=1e-4)
    assert float(loss) == pytest.approx(
        float(metrics["loss_heatmap"]) + float(metrics["loss_coord"]), rel=1e-6)
    assert float(metrics["argmax_error_px"]) == pytest.approx(5.0)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_loss_fn_calls_the_model_and_checks_counts():
    points = _points(8)
    logits = jnp.asarray(_logits(9, (2, 24, 24, 3)))
    model = lambda images, rng=None: {"heatmap_logits": logits}
    batch = {"image": np.zeros((2, 24, 24, 1), np.float32), "landmarks": points}
    direct, _ = lh.landmark_loss(logits, batch, sigma=2.0)
    via_model, _ = lh.loss_fn(model, batch, None, sigma=2.0)
    assert float(direct) == float(via_model)
    with pytest.raises(ValueError, match="landmark count"):
        lh.landmark_loss(logits[..., :2], batch, sigma=2.0)
    with pytest.raises(ValueError, match="sigma"):
        lh.landmark_loss(logits, batch, sigma=0.0)
    with pytest.raises(ValueError, match="one of"):
        lh.landmark_loss(logits, batch, loss="softmax")


def test_registry_builds_the_objective_when_listed():
    from mimjax import objectives

    if "landmark_heatmap" not in objectives.OBJECTIVES:
        pytest.skip("landmark_heatmap is not in the objective registry yet")
    fn = objectives.build_loss_fn({"landmark_heatmap": {"weight": 1.0, "sigma": 2.0}})
    logits = jnp.asarray(_logits(10, (2, 24, 24, 3)))
    batch = {"image": np.zeros((2, 24, 24, 1), np.float32), "landmarks": _points(11)}
    loss, _ = fn(lambda images, rng=None: logits, batch, jax.random.key(0))
    assert float(loss) == pytest.approx(float(lh.landmark_loss(logits, batch, sigma=2.0)[0]))
