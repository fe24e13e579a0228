"""Per-record transforms: multi-scale random resized crop, flip, normalization.

Elements in: {"image": HxW uint8/uint16, "meta": dict, "index": int} (see
sources.py). Elements out: {"image_{s}": float32 (s, s, C) for each scale s,
"index": int32, "label_{k}": meta[k] for each requested label key}.

All randomness comes from the numpy Generator that grain's `random_map` seeds
per record, so an element depends only on (seed, position in the stream), not
on worker count or thread timing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import grain
import numpy as np


def sample_crop_window(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> tuple[int, int, int, int]:
    """Returns (top, left, crop_h, crop_w) as in MAE / torchvision RandomResizedCrop.

    Area fraction uniform in `scale`, aspect ratio (w/h) log-uniform in `ratio`;
    after `tries` rejected samples, falls back to the largest centered crop whose
    aspect ratio is clipped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes a 2-D image to (size, size): area averaging when shrinking (no
    aliasing of fine texture), bilinear when any side has to grow."""
    h, w = image.shape
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def _resize_to_scales(crop: np.ndarray, scales: Sequence[int]) -> dict[int, np.ndarray]:
    """`crop` resized to every scale, as if each were `resize_square(crop, s)`.

    Area averaging composes exactly: averaging k x k blocks of an area-resized
    (k*s)-image gives the area resize of the crop to s. So a scale that divides a
    larger area-resized scale is derived from it by cv2's fast integer path
    (~7 us) instead of a second non-integer area resize of the crop (~200 us).
    Differences are within one integer rounding step of the pixel dtype.
    """
    out: dict[int, np.ndarray] = {}
    by_area: list[int] = []  # scales produced by area averaging, descending
    for s in sorted(scales, reverse=True):
        parent = next((b for b in reversed(by_area) if b % s == 0), None)
        if parent is not None:
            out[s] = cv2.resize(out[parent], (s, s), interpolation=cv2.INTER_AREA)
        else:
            out[s] = resize_square(crop, s)
            if min(crop.shape) < s:
                continue  # upsampled: blocks of it are not area averages of the crop
        by_area.append(s)
    return out


_DTYPE_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def intensity_max(image: np.ndarray, meta: dict) -> float:
    """The value that maps to 1.0: 2**bits_stored - 1 (e.g. 12-bit DICOM in
    uint16) if the record says so, else the dtype's maximum."""
    # A dict lookup: np.iinfo costs microseconds, once per record.
    dtype_max = _DTYPE_MAX.get(image.dtype)
    if dtype_max is None:
        dtype_max = float(np.iinfo(image.dtype).max)
    bits = meta.get("bits_stored") if meta else None
    if bits is None:
        return dtype_max
    bits = int(bits)
    if not 1 <= bits <= image.dtype.itemsize * 8:
        raise ValueError(f"bits_stored={bits} does not fit dtype {image.dtype}")
    return float(2**bits - 1)


def normalize(
    image: np.ndarray, *, max_value: float, mean: float, std: float, channels: int
) -> np.ndarray:
    """uint image -> float32 (H, W, channels): (image / max_value - mean) / std."""
    # One fused scale and one shift instead of three passes over the pixels.
    x = np.multiply(image, np.float32(1.0 / (max_value * std)), dtype=np.float32)
    x -= np.float32(mean / std)
    if channels == 1:
        return x[..., None]
    if channels == 3:
        return cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)  # 5x faster than np.repeat
    return np.repeat(x[..., None], channels, axis=-1)


def _device_friendly(x: np.ndarray) -> np.ndarray:
    # JSON gives Python ints/floats (int64/float64); JAX without x64 wants 32-bit.
    if x.dtype == np.int64:
        return x.astype(np.int32)
    if x.dtype == np.float64:
        return x.astype(np.float32)
    return x


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    scales = tuple(int(s) for s in scales)
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales must be non-empty positive ints, got {scales}")
    if any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly ascending, got {scales}")
    return scales


class _ToMultiScale:
    """Shared configuration and output assembly of the two transforms below."""

    def __init__(
        self,
        scales: Sequence[int],
        *,
        mean: float,
        std: float,
        channels: int = 1,
        label_keys: Sequence[str] = (),
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not std > 0:
            raise ValueError(f"norm std must be > 0, got {std}")
        self.scales = check_scales(scales)
        self.mean, self.std = float(mean), float(std)
        self.channels = int(channels)
        self.label_keys = tuple(label_keys)

    def _finish(self, element: dict, window: tuple[int, int, int, int], flip: bool) -> dict:
        image, meta = element["image"], element.get("meta") or {}
        top, left, h, w = window
        crop = image[top : top + h, left : left + w]
        max_value = intensity_max(image, meta)
        # Every scale comes from the same full-resolution window: the large
        # targets carry real detail, not an upsampled copy of a small one.
        resized = _resize_to_scales(crop, self.scales)
        out = {}
        for s in self.scales:
            # Flipped after resizing (fewer pixels), by cv2 into a contiguous copy:
            # normalizing a negative-stride view is slower (224 px: 41 us vs 4 + 18 us).
            image_s = cv2.flip(resized[s], 1) if flip else resized[s]
            out[f"image_{s}"] = normalize(
                image_s, max_value=max_value, mean=self.mean, std=self.std, channels=self.channels
            )
        if "index" in element:
            out["index"] = np.int32(element["index"])
        for k in self.label_keys:
            if k not in meta:
                raise KeyError(
                    f"record {element.get('index')} has no meta key {k!r} (has {sorted(meta)})"
                )
            out[f"label_{k}"] = _device_friendly(np.asarray(meta[k]))
        return out


class MultiScaleRandomCrop(_ToMultiScale, grain.transforms.RandomMap):
    """Random resized crop (one window per record) + optional flip, to every scale."""

    def __init__(
        self,
        scales: Sequence[int],
        *,
        crop_scale=(0.2, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        hflip: bool = True,
        mean: float,
        std: float,
        channels: int = 1,
        label_keys: Sequence[str] = (),
    ):
        super().__init__(scales, mean=mean, std=std, channels=channels, label_keys=label_keys)
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        rlo, rhi = (float(v) for v in crop_ratio)
        if not 0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {crop_ratio}")
        self.crop_scale, self.crop_ratio = (lo, hi), (rlo, rhi)
        self.hflip = bool(hflip)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        h, w = element["image"].shape
        window = sample_crop_window(h, w, rng, self.crop_scale, self.crop_ratio)
        flip = self.hflip and rng.random() < 0.5
        return self._finish(element, window, flip)


class MultiScaleResize(_ToMultiScale, grain.transforms.Map):
    """Deterministic evaluation variant: the full image resized to every scale."""

    def map(self, element: dict) -> dict:
        h, w = element["image"].shape
        return self._finish(element, (0, 0, h, w), flip=False)
