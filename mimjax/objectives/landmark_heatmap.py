"""Heatmap regression of anatomical landmarks: Gaussian targets, per-landmark BCE or
MSE, and an optional DSNT-style soft-argmax coordinate term.

Conventions (the same as input_pipeline/geometry.py and the ingestion engine):
- A point is [x, y] = [column, row] in pixels of the model input, float; the centre
  of the top-left pixel is (0, 0), so pixel (row i, column j) has its centre at
  (x, y) = (j, i) and covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5].
- Heatmaps and logits are channels last, (B, H, W, L): one channel per landmark.
- A landmark is valid when both coordinates are finite and lie on the image,
  -0.5 <= x <= W - 0.5 and -0.5 <= y <= H - 0.5. Invalid landmarks (missing
  annotations as NaN, or points that an augmentation moved off the image) get an
  all-zero target and are left out of every loss term and metric.

Targets: landmark l of image b is exp(-((c - x)^2 + (r - y)^2) / (2 sigma^2)) at the
pixel centre (c, r), sigma in pixels of the model input. The continuous peak is 1 at
the sub-pixel point itself (the sampled maximum is below 1 when the point is off the
pixel grid), and the target is not truncated.

What the GU2Net reference protocol does (Zhu et al., MICCAI 2021, "You only learn
once", MIRACLE-Center/YOLO_Universal_Anatomical_Landmark_Detection; `gaussianHeatmap`
in model/utils/kit.py, config.yaml) and where this differs:
- its points are rounded to integer pixels of the resized image before the target is
  drawn; here the target is centred on the exact sub-pixel point, so the rounding
  error (up to 0.7 px, about 0.3 mm at its ceph resolution) is not trained in;
- its Gaussian is cut at round(3 sigma) and min-max rescaled inside that box (values
  past the box are 0, the box's corner maps to 0); here it is the plain Gaussian;
- its loss is torch.nn.BCELoss(reduction="sum") on the sigmoid of the logits (or
  MSE on the same sigmoid output): a sum over every pixel, channel and image. Here
  BCE takes the logits directly (numerically safe, torch's
  binary_cross_entropy_with_logits), is reduced per landmark over pixels (mean, or
  sum with `pixel_reduction="sum"`, the reference's per-map scale), then averaged
  over the valid landmarks, so the loss does not grow with batch size or landmark
  count; sigma = 3 at ~512 px is its setting for ceph, hand and chest.
- Each landmark channel is an independent sigmoid. There is never a softmax across
  landmark channels: landmarks can lie within a few pixels of each other, and a
  cross-channel softmax (cross-entropy across landmarks, as in
  Malga-Vision/DiffusionXray-FewShot-LandmarkDetection) makes them compete for the
  same pixels. Binarised disks as targets (also there) are not offered either: they
  carry no sub-pixel information and make the peak flat.

MSE: on the sigmoid of the outputs by default (`mse_on="sigmoid"`, the reference's
`l2` option, so the outputs are decoded the same way as after BCE), or on the raw
outputs (`mse_on="raw"`, plain L2 heatmap regression).

Soft-argmax (Nibali et al., "Numerical Coordinate Regression with Convolutional
Neural Networks", 2018, DSNT): a spatial softmax of each landmark's logits (times
`softargmax_beta`) is read as a distribution over pixel centres, and its mean is the
predicted point, differentiable and sub-pixel. The coordinate term is DSNT's
Euclidean loss in normalised coordinates u = (2x + 1) / W - 1, v = (2y + 1) / H - 1
(the image spans [-1, 1]), so its scale does not depend on the resolution.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from mimjax.models import example_rng

LOSSES = ("bce", "mse")
MSE_ON = ("sigmoid", "raw")
PIXEL_REDUCTIONS = ("mean", "sum")
# Added under the square root of the coordinate loss: the norm's gradient is
# undefined at 0, which a perfect prediction of a landmark would hit.
_COORD_EPS = 1e-12


def _hw(size) -> tuple[int, int]:
    if isinstance(size, numbers.Integral):
        return int(size), int(size)
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be S or (H, W) in pixels, got {size!r}")


def _check_points(points) -> jax.Array:
    points = jnp.asarray(points, jnp.float32)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(
            f"landmarks must be (B, L, 2) as [x, y] (column, row) pixels, got shape "
            f"{tuple(points.shape)}")
    return points


def landmark_valid(points, size) -> jax.Array:
    """(B, L) bool: the point is finite and lies on the (H, W) image (see module docstring)."""
    points = _check_points(points)
    height, width = _hw(size)
    x, y = points[..., 0], points[..., 1]
    finite = jnp.isfinite(x) & jnp.isfinite(y)
    # NaN compares False, so the bounds alone would already exclude it; `finite` keeps
    # +-inf out as well and says what is meant.
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    return finite & inside


def gaussian_heatmaps(points, size, sigma: float) -> tuple[jax.Array, jax.Array]:
    """Gaussian targets of (B, L, 2) [x, y] points on an image of `size` (S or (H, W)).

    Returns (heatmaps (B, H, W, L) float32 with continuous peak 1 at each point,
    valid (B, L) bool); invalid landmarks have all-zero heatmaps."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    points = _check_points(points)
    height, width = _hw(size)
    valid = landmark_valid(points, (height, width))
    # Invalid points are moved to 0 before the exponentials so that NaN never enters
    # the arithmetic (a NaN * 0 would survive the masking below).
    x = jnp.where(valid, points[..., 0], 0.0)
    y = jnp.where(valid, points[..., 1], 0.0)
    inv = 1.0 / (2.0 * float(sigma) ** 2)
    cols = jnp.arange(width, dtype=jnp.float32)
    rows = jnp.arange(height, dtype=jnp.float32)
    # Separable: exp(-(dx^2 + dy^2) k) = exp(-dx^2 k) exp(-dy^2 k); an outer product by
    # broadcasting (not einsum, which accelerators may run at reduced precision).
    gx = jnp.exp(-((cols[None, :, None] - x[:, None, :]) ** 2) * inv)  # (B, W, L)
    gy = jnp.exp(-((rows[None, :, None] - y[:, None, :]) ** 2) * inv)  # (B, H, L)
    gx = gx * valid[:, None, :].astype(jnp.float32)
    return gy[:, :, None, :] * gx[:, None, :, :], valid


def soft_argmax(heatmap_logits, *, beta: float = 1.0) -> jax.Array:
    """(B, H, W, L) logits -> (B, L, 2) float32 [x, y]: the mean pixel centre under a
    spatial softmax of beta * logits per landmark (DSNT)."""
    logits = jnp.asarray(heatmap_logits).astype(jnp.float32)
    if logits.ndim != 4:
        raise ValueError(f"heatmap logits must be (B, H, W, L), got {tuple(logits.shape)}")
    batch, height, width, num = logits.shape
    flat = logits.reshape(batch, height * width, num) * beta
    probs = jax.nn.softmax(flat, axis=1).reshape(batch, height, width, num)
    cols = jnp.arange(width, dtype=jnp.float32)
    rows = jnp.arange(height, dtype=jnp.float32)
    x = jnp.sum(jnp.sum(probs, axis=1) * cols[None, :, None], axis=1)  # (B, L)
    y = jnp.sum(jnp.sum(probs, axis=2) * rows[None, :, None], axis=1)
    return jnp.stack([x, y], axis=-1)


def _valid_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of (B, L) `values` over the valid entries; 0 when none is valid."""
    weights = valid.astype(jnp.float32)
    values = jnp.where(valid, values, 0.0)  # keeps NaN of invalid entries out of the sum
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def coordinate_loss(pred_points, true_points, valid, size) -> jax.Array:
    """DSNT's Euclidean loss in normalised coordinates (the image spans [-1, 1] on each
    axis), averaged over the valid landmarks; (B, L, 2) [x, y] pixel points."""
    height, width = _hw(size)
    scale = jnp.array([2.0 / width, 2.0 / height], jnp.float32)
    true_points = jnp.where(valid[..., None], jnp.asarray(true_points, jnp.float32), 0.0)
    delta = (jnp.asarray(pred_points, jnp.float32) - true_points) * scale
    distance = jnp.sqrt(jnp.sum(delta**2, axis=-1) + _COORD_EPS)
    return _valid_mean(distance, valid)


def argmax_points(heatmap_logits) -> jax.Array:
    """(B, H, W, L) -> (B, L, 2) float32 [x, y] of each channel's highest pixel (a
    training-time read-out; evaluation decodes sub-pixel points on the host)."""
    logits = jnp.asarray(heatmap_logits)
    batch, height, width, num = logits.shape
    index = jnp.argmax(logits.reshape(batch, height * width, num), axis=1)
    return jnp.stack([index % width, index // width], axis=-1).astype(jnp.float32)


def _mean_distance_px(pred_points, true_points, valid) -> jax.Array:
    true_points = jnp.where(valid[..., None], true_points, 0.0)
    return _valid_mean(jnp.linalg.norm(pred_points - true_points, axis=-1), valid)


def _check_settings(loss, mse_on, pixel_reduction, sigma, coordinate_weight, softargmax_beta):
    if loss not in LOSSES:
        raise ValueError(f"landmark loss must be one of {LOSSES}, got {loss!r}")
    if mse_on not in MSE_ON:
        raise ValueError(f"mse_on must be one of {MSE_ON}, got {mse_on!r}")
    if pixel_reduction not in PIXEL_REDUCTIONS:
        raise ValueError(
            f"pixel_reduction must be one of {PIXEL_REDUCTIONS}, got {pixel_reduction!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels of the model input, got {sigma}")
    if coordinate_weight < 0:
        raise ValueError(f"coordinate_weight must be >= 0, got {coordinate_weight}")
    if not softargmax_beta > 0:
        raise ValueError(f"softargmax_beta must be > 0, got {softargmax_beta}")


def landmark_loss(logits, batch, *, loss: str = "bce", sigma: float = 3.0,
                  mse_on: str = "sigmoid", pixel_reduction: str = "mean",
                  coordinate_weight: float = 0.0, softargmax_beta: float = 1.0,
                  points_key: str = "landmarks", valid_key: str = "landmark_valid"):
    """Returns (loss, metrics) for (B, H, W, L) heatmap `logits`; see the module docstring.

    The batch holds `points_key` (B, L, 2) [x, y] in model-input pixels, optionally
    `valid_key` (B, L) bool (landmarks to leave out, on top of the NaN / off-image
    rule) and "valid" (B,) bool (padding rows of an eval batch). Metrics:
    loss_heatmap, loss_coord (with coordinate_weight > 0), argmax_error_px (integer
    argmax against the true point), softargmax_error_px (with coordinate_weight > 0)
    and valid_landmarks (the fraction of landmarks that entered the loss)."""
    _check_settings(loss, mse_on, pixel_reduction, sigma, coordinate_weight, softargmax_beta)
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim != 4:
        raise ValueError(f"heatmap logits must be (B, H, W, L), got {tuple(logits.shape)}")
    if points_key not in batch:
        raise ValueError(f"the batch has no {points_key!r} (it has {sorted(batch)}); the "
                         "landmark pipeline adds (B, L, 2) [x, y] points")
    points = _check_points(batch[points_key])
    batch_size, height, width, num = logits.shape
    if points.shape[:2] != (batch_size, num):
        raise ValueError(
            f"{points_key!r} has shape {tuple(points.shape)} but the model gives {num} "
            f"heatmap channels for {batch_size} images; set the model's landmark count to "
            f"the dataset's ({points.shape[1]})")
    targets, valid = gaussian_heatmaps(points, (height, width), sigma)
    if valid_key in batch:
        valid = valid & jnp.asarray(batch[valid_key], bool)
    if "valid" in batch:
        valid = valid & jnp.asarray(batch["valid"], bool)[:, None]

    if loss == "bce":
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, targets)
    else:
        outputs = jax.nn.sigmoid(logits) if mse_on == "sigmoid" else logits
        per_pixel = (outputs - targets) ** 2
    reduce = jnp.mean if pixel_reduction == "mean" else jnp.sum
    per_landmark = reduce(per_pixel, axis=(1, 2))  # (B, L)
    loss_heatmap = _valid_mean(per_landmark, valid)
    metrics = {
        "loss_heatmap": loss_heatmap,
        "argmax_error_px": _mean_distance_px(argmax_points(logits), points, valid),
        "valid_landmarks": jnp.mean(valid.astype(jnp.float32)),
    }
    total = loss_heatmap
    if coordinate_weight > 0:
        predicted = soft_argmax(logits, beta=softargmax_beta)
        loss_coord = coordinate_loss(predicted, points, valid, (height, width))
        metrics["loss_coord"] = loss_coord
        metrics["softargmax_error_px"] = _mean_distance_px(predicted, points, valid)
        total = total + coordinate_weight * loss_coord
    return total, metrics


def loss_fn(model, batch, rng, *, image_key: str = "image", **kwargs):
    """The registry entry: `model(images, rng)` gives (B, H, W, L) heatmap logits, or a
    dict holding them under "heatmap_logits"; then `landmark_loss`."""
    images = batch[image_key]
    # Drop path / dropout per example, keyed by its global id (models.example_rng).
    keys = None if rng is None else example_rng.example_keys(rng, batch, images.shape[0])
    out = model(images, rng=keys)
    if isinstance(out, dict):
        if "heatmap_logits" not in out:
            raise ValueError(f"the model returned {sorted(out)}; a landmark model returns "
                             "(B, H, W, L) heatmap logits or a dict with 'heatmap_logits'")
        out = out["heatmap_logits"]
    return landmark_loss(out, batch, **kwargs)
