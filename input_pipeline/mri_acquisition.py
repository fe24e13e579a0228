"""What an MR scanner adds to a procedural phantom's tissue map, shared by the
cardiac and brain phantoms: the pixel grid in millimetres, partial volume, a
smooth coil-sensitivity (bias) field and Rician noise."""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int, field_of_view_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(x (1, size), y (size, 1)) mm of the pixel centres, origin at the image
    centre, y pointing down (rows)."""
    spacing = field_of_view_mm / size
    axis = ((np.arange(size) + 0.5) * spacing - field_of_view_mm / 2).astype(np.float32)
    axis.flags.writeable = False
    return axis[None, :], axis[:, None]


def inside_ellipse(x, y, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Pixels inside the axis-aligned ellipse centred (cx, cy) with semi-axes (ax, ay)."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1.0


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2 size, 2 size) unit Gaussian field. Each noise image is a random
    window of it: drawing fresh Gaussian noise costs more than the rest of a
    slice's rendering (4 sequences x 2 components x 192^2 draws ~ 4 ms)."""
    bank = np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size), np.float32)
    bank.flags.writeable = False
    return bank


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    bank = _noise_bank(size)
    top, left = (int(v) for v in rng.integers(0, size + 1, size=2))
    return bank[top : top + size, left : left + size]


def acquire(
    tissue: np.ndarray,
    *,
    blur_px: float,
    bias: tuple[float, float, float],
    noise: float,
    grid: tuple[np.ndarray, np.ndarray],
    field_of_view_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A (size, size) float32 tissue-intensity map as a magnitude image: blurred
    by `blur_px` (partial volume), times a linear coil-sensitivity field
    1 + strength * (gx x + gy y) / field of view (bias = (gx, gy, strength)),
    with Rician noise of `noise` sigma (the magnitude of the image plus complex
    Gaussian noise), clipped to [0, 1]."""
    size = tissue.shape[0]
    image = cv2.GaussianBlur(tissue, (0, 0), blur_px)
    gx, gy, strength = bias
    x, y = grid
    image *= 1.0 + (strength / field_of_view_mm) * (gx * x + gy * y)
    sigma = np.float32(noise)
    image = cv2.magnitude(image + sigma * _noise(rng, size), sigma * _noise(rng, size))
    return np.clip(image, 0.0, 1.0, out=image)


def window(centre_xy_mm, reach_mm: float, size: int, field_of_view_mm: float):
    """(rows, cols) slices of the square of half-side `reach_mm` around a centre given in
    mm from the image centre, on a `size`-pixel grid over `field_of_view_mm`, clipped
    to the image: where a phantom renders its organ at full detail."""
    spacing = field_of_view_mm / size
    bounds = []
    for centre in (centre_xy_mm[1], centre_xy_mm[0]):  # rows (y), then columns (x)
        lo = (centre - reach_mm + field_of_view_mm / 2) / spacing
        hi = (centre + reach_mm + field_of_view_mm / 2) / spacing
        bounds.append(slice(max(0, int(lo)), min(size, int(math.ceil(hi)) + 1)))
    return bounds[0], bounds[1]
