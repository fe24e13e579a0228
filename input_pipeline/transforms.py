"""Per-record transforms: multi-scale random resized crop, flip, normalization.

Elements in: {"image": HxW uint8/uint16, "meta": dict, "index": int} (see
sources.py). Elements out: {"image_{s}": float32 (s, s, C) for each scale s,
"index": int32, "label_{k}": meta[k] for each requested label key}; with
`quantize=True` (the pretraining pipeline) "image_{s}" is instead uint16 (s, s, 1)
unit-quantised (see quantize_unit), normalised on the device by
input_pipeline.dequantize.

All randomness comes from the numpy Generator that grain's `random_map` seeds
per record, so an element depends only on (seed, position in the stream), not
on worker count or thread timing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


_UNIT_MAX = float(np.iinfo(np.uint16).max)


def quantize_unit(image: np.ndarray, *, max_value: float) -> np.ndarray:
    """uint image -> uint16 round(clip(image / max_value, 0, 1) * 65535), same shape.

    The compact form batches cross processes in (see input_pipeline.dequantize):
    half the bytes of float32. Its step, 1/65535 of full scale, is no coarser than
    the record's own (a 12-bit image's step is 16 of them; 16-bit full-range images
    pass unchanged), so the rounding adds at most half a step, 7.6e-6 of the range,
    far below any image's noise: normalised, it agrees with `normalize` to 1e-5 of
    the range. Values above max_value (a record whose bits_stored understates its
    pixels) saturate at 65535.
    """
    if max_value == _UNIT_MAX and image.dtype == np.uint16:
        return image
    # One saturating, rounding pass (~10 us at 224 px; numpy needs three).
    return cv2.addWeighted(image, _UNIT_MAX / max_value, image, 0.0, 0.0, dtype=cv2.CV_16U)


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
        quantize: bool = False,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not std > 0:
            raise ValueError(f"norm std must be > 0, got {std}")
        self.scales = check_scales(scales)
        self.mean, self.std = float(mean), float(std)
        self.channels = int(channels)
        self.label_keys = tuple(label_keys)
        # True: ship uint16 (s, s, 1) unit-quantised images; mean, std and channels
        # are then applied on the device (input_pipeline.dequantize).
        self.quantize = bool(quantize)

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
            if self.quantize:
                image_s = quantize_unit(resized[s], max_value=max_value)
                out[f"image_{s}"] = (cv2.flip(image_s, 1) if flip else image_s)[..., None]
                continue
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
        quantize: bool = False,
    ):
        super().__init__(
            scales,
            mean=mean,
            std=std,
            channels=channels,
            label_keys=label_keys,
            quantize=quantize,
        )
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


def roi_crop(image: np.ndarray, meta: dict, index: int, context: float, min_px: int) -> np.ndarray:
    """The square of side max(2 * context * radius, min_px) centred on the lesion
    (meta "lesion_center" [row, col], "lesion_radius_px"); zeros beyond the image."""
    if "lesion_center" not in meta or "lesion_radius_px" not in meta:
        raise KeyError(
            f"record {index} has no lesion_center / lesion_radius_px in its meta (keys: "
            f"{sorted(meta)}); set data.roi_context=0 for records that are already lesion crops"
        )
    row, col = (float(v) for v in meta["lesion_center"])
    side = max(round(2 * context * float(meta["lesion_radius_px"])), int(min_px))
    top, left = round(row - side / 2), round(col - side / 2)
    out = np.zeros((side, side), image.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom = min(top + side, image.shape[0])
    src_right = min(left + side, image.shape[1])
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
            src_top:src_bottom, src_left:src_right
        ]
    return out


def roi_settings(data_cfg: Any) -> tuple[float, int]:
    """(roi_context, roi_min_px) of a data config; context 0 = no lesion crop."""
    context = float(getattr(data_cfg, "roi_context", 0.0) or 0.0)
    if context < 0:
        raise ValueError(f"data.roi_context must be >= 0 (0 = off), got {context}")
    return context, int(getattr(data_cfg, "roi_min_px", 32))
