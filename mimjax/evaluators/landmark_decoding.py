"""Heatmaps -> sub-pixel landmark coordinates, and back to the original image (host, numpy).

Conventions, the same as input_pipeline/geometry.py and mimjax.objectives.landmark_heatmap:
- points are [x, y] = [column, row] float pixels, the centre of the top-left pixel
  at (0, 0); heatmaps are channels last, (B, H, W, L), one channel per landmark;
- a geometry is the affine that took the ORIGINAL image to the model input,
  p_input = M[:, :2] @ p_original + M[:, 2] (the 2 x 3 matrix cv2.warpAffine takes;
  a 3 x 3 homogeneous matrix with last row [0, 0, 1] is accepted too), plus the
  original image's (H, W). `to_original` applies its inverse.

Decoding starts at each channel's highest pixel (the reference protocol, GU2Net's
`getPointsFromHeatmap`, stops there: integer pixels of the model input, up to 0.7 px
off, 0.33 mm at its ceph resolution) and refines it:
- "quadratic": a second-order Taylor expansion of the LOG heatmap at that pixel,
  gradient and Hessian (with the cross term) from central differences, and one Newton
  step (Zhang et al., "Distribution-Aware Coordinate Representation for Human Pose
  Estimation", CVPR 2020, DARK). The log of a Gaussian is exactly quadratic, so a
  Gaussian-shaped peak is recovered exactly whatever its sigma. An axis whose
  neighbours fall off the image, or whose curvature is not negative (a flat or
  noisy top), is not refined; steps are clipped to 1 px.
- "soft_window": the heatmap-weighted mean of the pixel centres in a window of
  `window` x `window` pixels, re-centred on the estimate `iterations` times (a
  mean shift with a box kernel). Pixels that the window cuts count with the
  fraction of them inside it, so the window is always symmetric about the estimate
  and a symmetric peak is its fixed point, unbiased; a window fixed on the argmax
  pixel instead pulls the estimate towards that pixel's centre (0.2 px for sigma 3,
  window 11). Each pass moves the estimate a constant fraction of the remaining
  distance, a fraction that shrinks as the window widens: with the default 20
  passes a window of 2 sigma + 1 px or wider recovers a Gaussian of sigma 2-5 px
  within 0.01 px (window 7, the default, suits sigma up to 3).
- "argmax": no refinement (the reference's read-out, for comparisons).
Heatmaps are read on the target's scale (peak ~1, background ~0): the sigmoid of
BCE logits (`from_logits=True` applies it), or MSE outputs. Negative values count
as 0. Non-finite heatmaps are an error naming the image and landmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

METHODS = ("quadratic", "soft_window", "argmax")
# Heatmap values below this are clipped before the log of the quadratic fit: a
# pixel at 0 (a saturated sigmoid) would give -inf.
_LOG_FLOOR = 1e-30


# ----------------------------------------------------------------------------- decoding
def _as_maps(heatmaps, from_logits: bool) -> np.ndarray:
    """(B, H, W, L) -> (B * L, H, W) float64, landmark-major within each image."""
    heatmaps = np.asarray(heatmaps, np.float64)
    if heatmaps.ndim != 4:
        raise ValueError(
            f"heatmaps must be (B, H, W, L) (channels last, one per landmark), got shape "
            f"{heatmaps.shape}")
    bad = ~np.isfinite(heatmaps)
    if bad.any():
        b, _, _, k = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"image {b}, landmark {k}: the heatmap holds NaN or inf; the model diverged or "
            "was fed non-finite input (check the loss curve and the input batch)")
    if from_logits:
        heatmaps = 0.5 * (1.0 + np.tanh(0.5 * heatmaps))  # the sigmoid, without overflow
    batch, height, width, num = heatmaps.shape
    return heatmaps.transpose(0, 3, 1, 2).reshape(batch * num, height, width)


def _quadratic(maps: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """(N, 2) [dx, dy] Newton steps on log(maps) at the integer peaks (iy, ix)."""
    n, height, width = maps.shape
    logs = np.log(np.maximum(np.pad(maps, ((0, 0), (1, 1), (1, 1)), mode="edge"), _LOG_FLOOR))
    rows = np.arange(n)

    def at(dy, dx):  # log heatmap at (iy + dy, ix + dx); +1 for the padding
        return logs[rows, iy + 1 + dy, ix + 1 + dx]

    centre = at(0, 0)
    gx, gy = (at(0, 1) - at(0, -1)) / 2, (at(1, 0) - at(-1, 0)) / 2
    hxx = at(0, 1) - 2 * centre + at(0, -1)
    hyy = at(1, 0) - 2 * centre + at(-1, 0)
    hxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
    in_x = (ix > 0) & (ix < width - 1)
    in_y = (iy > 0) & (iy < height - 1)
    # One axis at a time: the 1-D parabola through three samples.
    use_x, use_y = in_x & (hxx < 0), in_y & (hyy < 0)
    dx = np.where(use_x, -gx / np.where(use_x, hxx, -1.0), 0.0)
    dy = np.where(use_y, -gy / np.where(use_y, hyy, -1.0), 0.0)
    # Both axes inside and a concave top: the full 2-D step, cross term included
    # (a peak elongated along a diagonal).
    det = hxx * hyy - hxy**2
    full = use_x & use_y & (det > 0)
    safe = np.where(full, det, 1.0)
    dx = np.where(full, -(hyy * gx - hxy * gy) / safe, dx)
    dy = np.where(full, -(hxx * gy - hxy * gx) / safe, dy)
    return np.clip(np.stack([dx, dy], axis=1), -1.0, 1.0)


def _soft_window(maps: np.ndarray, iy: np.ndarray, ix: np.ndarray, window: int,
                 iterations: int) -> np.ndarray:
    """(N, 2) [dx, dy] offsets from the integer peaks by the re-centred window mean."""
    n = maps.shape[0]
    half = window // 2
    # The estimate stays within 1 px of the peak pixel, so the window (half + 0.5 px
    # either side of it) stays inside a patch of half + 2 pixels around the peak.
    reach = half + 2
    padded = np.pad(np.maximum(maps, 0.0), ((0, 0), (reach, reach), (reach, reach)))
    offsets = np.arange(-reach, reach + 1, dtype=np.float64)
    rows = iy[:, None] + reach + offsets.astype(int)[None, :]
    cols = ix[:, None] + reach + offsets.astype(int)[None, :]
    patch = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    shift = np.zeros((n, 2))
    for _ in range(iterations):
        # Coverage of each pixel [o - 0.5, o + 0.5] by the window [c - half - 0.5,
        # c + half + 0.5]: 1 inside, a fraction at the edges, 0 beyond.
        wx = np.clip(half + 1.0 - np.abs(offsets[None, :] - shift[:, :1]), 0.0, 1.0)
        wy = np.clip(half + 1.0 - np.abs(offsets[None, :] - shift[:, 1:]), 0.0, 1.0)
        weights = patch * wy[:, :, None] * wx[:, None, :]
        total = weights.sum(axis=(1, 2))
        mean_x = (weights.sum(axis=1) * offsets).sum(axis=1) / np.where(total > 0, total, 1.0)
        mean_y = (weights.sum(axis=2) * offsets).sum(axis=1) / np.where(total > 0, total, 1.0)
        moved = np.stack([mean_x, mean_y], axis=1)
        shift = np.where(total[:, None] > 0, np.clip(moved, -1.0, 1.0), shift)
    return shift


def decode(heatmaps, method: str = "quadratic", *, window: int = 7, iterations: int = 20,
           from_logits: bool = False) -> np.ndarray:
    """(B, H, W, L) heatmaps -> (B, L, 2) float64 [x, y] sub-pixel points in pixels of
    the heatmap (the model input); see the module docstring for the methods.
    `window` (odd, >= 3) and `iterations` are soft_window's."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "soft_window" and (window < 3 or window % 2 == 0):
        raise ValueError(f"window must be an odd number of pixels >= 3, got {window}")
    if method == "soft_window" and iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    maps = _as_maps(heatmaps, from_logits)
    batch, num = np.shape(heatmaps)[0], np.shape(heatmaps)[3]
    width = maps.shape[2]
    flat = maps.reshape(maps.shape[0], -1).argmax(axis=1)
    iy, ix = flat // width, flat % width
    points = np.stack([ix, iy], axis=1).astype(np.float64)
    if method == "quadratic":
        points += _quadratic(maps, iy, ix)
    elif method == "soft_window":
        points += _soft_window(maps, iy, ix, window, iterations)
    return points.reshape(batch, num, 2)


# ----------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class InputGeometry:
    """How an original image became the model input: `matrix` (2 x 3, original ->
    input pixel coordinates, [x, y] pixel centres) and the original (H, W)."""

    matrix: np.ndarray
    original_shape: tuple[int, int]

    def __post_init__(self):
        matrix = np.asarray(self.matrix, np.float64)
        if matrix.shape == (3, 3):
            if not np.allclose(matrix[2], [0.0, 0.0, 1.0]):
                raise ValueError(f"a 3 x 3 geometry must be affine (last row [0, 0, 1]), got "
                                 f"{matrix[2].tolist()}")
            matrix = matrix[:2]
        if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"the geometry matrix must be a finite 2 x 3 (or 3 x 3) affine "
                             f"from original to model-input pixels, got {matrix.tolist()}")
        if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
            raise ValueError(f"the geometry matrix {matrix.tolist()} is singular: it cannot "
                             "be inverted to map points back to the original image")
        shape = tuple(int(v) for v in self.original_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"original_shape must be (H, W) > 0, got {self.original_shape}")
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "original_shape", shape)

    @classmethod
    def from_resize_pad(cls, geometry: Mapping, then=None) -> InputGeometry:
        """From the ingestion engine's stored geometry (input_pipeline.ingest.preprocess
        .Geometry.to_json(): source_shape, resized_shape, pad) and, when the pipeline
        warps the stored image again, its 2 x 3 affine `then` (stored -> model input)."""
        from input_pipeline.geometry import resize_pad_matrix  # numpy + OpenCV only

        matrix, source = resize_pad_matrix(geometry)
        if then is not None:
            outer = np.vstack([np.asarray(then, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
            matrix = (outer @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
        return cls(matrix, tuple(source))


def _geometries(geometry, batch: int | None) -> list[InputGeometry]:
    def one(g):
        if isinstance(g, InputGeometry):
            return g
        if isinstance(g, Mapping):
            return InputGeometry(g["matrix"], g["original_shape"])
        raise TypeError(f"a geometry is an InputGeometry or a mapping with 'matrix' and "
                        f"'original_shape', got {type(g).__name__}")

    if batch is None or isinstance(geometry, InputGeometry | Mapping):
        return [one(geometry)] * (batch or 1)
    if not isinstance(geometry, Sequence) or len(geometry) != batch:
        raise ValueError(f"give one geometry per image: {batch} images, "
                         f"{len(geometry) if isinstance(geometry, Sequence) else 1} geometries")
    return [one(g) for g in geometry]


def _apply(points, geometry, inverse: bool) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim not in (2, 3) or points.shape[-1] != 2:
        raise ValueError(f"points must be (L, 2) or (B, L, 2) as [x, y], got {points.shape}")
    batched = points.ndim == 3
    geometries = _geometries(geometry, points.shape[0] if batched else None)
    out = []
    for image_points, g in zip(points if batched else points[None], geometries):
        linear, shift = g.matrix[:, :2], g.matrix[:, 2]
        if inverse:
            out.append(np.linalg.solve(linear, (image_points - shift).T).T)
        else:
            out.append(image_points @ linear.T + shift)
    out = np.stack(out)
    return out if batched else out[0]


def to_original(points, geometry) -> np.ndarray:
    """Model-input [x, y] points -> original-image pixels through the inverse of each
    image's geometry. `points` (L, 2) with one geometry, or (B, L, 2) with one geometry
    per image (a sequence of B) or one shared by all. NaN stays NaN."""
    return _apply(points, geometry, inverse=True)


def to_model_input(points, geometry) -> np.ndarray:
    """The forward map of `to_original`: original-image [x, y] points -> model input."""
    return _apply(points, geometry, inverse=False)
