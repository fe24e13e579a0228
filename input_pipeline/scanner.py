"""A per-site "scanner": the acquisition differences of federated sites (intensity
curve, resolution, blur, noise), applied to every image as its record is decoded.

`sources.resolve` wraps a source's decoder in `ScannedDecoder` when `data.scanner`
is set, so every pipeline that reads the source (pretraining, fine-tuning,
segmentation, landmarks, image-report pairs, eval batches, linear probes) sees
the same scanned pixels; extras (segmentation masks) and meta pass unchanged.

The model, per image, in this order:

  1. scale to [0, 1]: integer pixels are divided by transforms.intensity_max
     (2**bits_stored - 1 when the meta says so, else the dtype's maximum; values
     above it saturate). Float pixels are taken to be in [0, 1] already.
  2. intensity curve: x -> clip(offset + contrast * x**gamma, 0, 1).
  3. resolution < 1: each plane is shrunk by that factor (cv2.INTER_AREA: the
     detector's larger pixels) and grown back to its own size (cv2.INTER_LINEAR),
     so the shape, and with it masks and landmark coordinates, stay aligned.
  4. blur_sigma > 0: a Gaussian blur of that sigma, in pixels (cv2.GaussianBlur).
  5. noise > 0: additive Gaussian noise of std `noise` in [0, 1] units, seeded
     by the record: zlib.crc32 of its raw bytes (of its decoded pixels when the
     raw record is not bytes). Decoding a record twice gives the same pixels;
     different records get different noise. (The noise is a window, at an
     offset the seed draws, of a fixed 2M-sample Gaussian bank, as segmentation.py
     does for its noise: fresh draws would cost ten times the rest.)
  6. clip to [0, 1] and back to the image's dtype and bit depth: round(x * max),
     so a 12-bit uint16 image stays uint16 within 0..4095; float stays float.

Images are 2-D (H, W) or 3-D with a channel axis, first (C, H, W: modality stacks
whose meta names "channels", e.g. the brain phantom) or last (H, W, C: RGB);
the spatial steps run per channel. The identity scanner (every field at its
default) is never built: `Scanner.from_config` gives None for it, and `apply`
returns the image object itself, so pixels are bitwise unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from input_pipeline.record_source import DataSourceError, RecordDecoder
from input_pipeline.transforms import intensity_max

# Field -> (check, allowed range in words). Every field is a finite number.
_RANGES: dict[str, tuple[Any, str]] = {
    "gamma": (lambda v: v > 0, "> 0 (1 = linear; < 1 brightens mid-tones)"),
    "noise": (lambda v: v >= 0, ">= 0 (Gaussian std in [0, 1] intensity units)"),
    "blur_sigma": (lambda v: v >= 0, ">= 0 (Gaussian sigma in pixels)"),
    "resolution": (lambda v: 0 < v <= 1, "in (0, 1] (1 = native resolution)"),
    "contrast": (lambda v: v > 0, "> 0 (1 = unchanged)"),
    "offset": (lambda v: -1 <= v <= 1, "in [-1, 1] (0 = unchanged)"),
}
_NOISE_SALT = 0x5CA7E5


@dataclasses.dataclass(frozen=True)
class Scanner:
    """One site's acquisition (see the module docstring); defaults = identity."""

    gamma: float = 1.0
    noise: float = 0.0
    blur_sigma: float = 0.0
    resolution: float = 1.0
    contrast: float = 1.0
    offset: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check, allowed = _RANGES[field.name]
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, bool
            )
            if ok:
                value = float(value)
                ok = math.isfinite(value) and check(value)
            if not ok:
                raise DataSourceError(
                    f"data.scanner.{field.name}={value!r} is out of range: it must be {allowed}"
                )
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_config(cls, cfg: Any) -> Scanner | None:
        """The scanner of a `data.scanner` section (a ConfigDict, FrozenConfigDict,
        dict, dataclass, SimpleNamespace or Scanner), or None for no section, an
        empty one or one whose every field is at its identity default."""
        if cfg is None:
            return None
        if isinstance(cfg, Scanner):
            fields = dataclasses.asdict(cfg)
        elif isinstance(cfg, Mapping):
            fields = dict(cfg)
        elif hasattr(cfg, "items"):  # ConfigDict, FrozenConfigDict
            fields = dict(cfg.items())
        elif dataclasses.is_dataclass(cfg):
            fields = dataclasses.asdict(cfg)
        elif hasattr(cfg, "__dict__"):  # SimpleNamespace
            fields = dict(vars(cfg))
        else:
            raise DataSourceError(
                f"data.scanner must be a section of {sorted(_RANGES)} (or None), got "
                f"{type(cfg).__name__} {cfg!r}"
            )
        unknown = sorted(set(fields) - set(_RANGES))
        if unknown:
            raise DataSourceError(
                f"data.scanner has no field(s) {unknown}: its fields are {list(_RANGES)}"
            )
        scanner = cls(**fields)
        return None if scanner.is_identity else scanner

    @property
    def is_identity(self) -> bool:
        return self == Scanner()

    def describe(self) -> str:
        """"scanner(gamma=0.8, noise=0.01)": the fields that differ from identity."""
        default = Scanner()
        changed = [
            f"{f.name}={getattr(self, f.name):g}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"scanner({', '.join(changed)})"

    def apply(self, image: np.ndarray, meta: dict | None, seed: int) -> np.ndarray:
        """`image` as this scanner acquires it (same shape, dtype and bit depth);
        `seed` (e.g. `record_seed`) seeds the noise. Identity: `image` itself."""
        if self.is_identity:
            return image
        meta = meta or {}
        dtype = image.dtype
        integer = np.issubdtype(dtype, np.integer)
        max_value = intensity_max(image, meta) if integer else 1.0
        curve = (self.gamma, self.contrast, self.offset)
        if integer and dtype.itemsize <= 2 and curve != (1.0, 1.0, 0.0):
            # Scale, clip and curve in one table look-up (~2x faster than np.power).
            x = _curve_table(curve, max_value, dtype.str)[image]
        else:
            x = np.multiply(image, np.float32(1.0 / max_value), dtype=np.float32)
            np.clip(x, 0.0, 1.0, out=x)
            if curve != (1.0, 1.0, 0.0):
                x = _curve(x, curve)
        if self.resolution < 1.0 or self.blur_sigma > 0.0:
            x = _per_plane(x, meta, self._spatial)
        if self.noise > 0.0:
            x += _unit_noise(x.shape, seed) * np.float32(self.noise)
        np.clip(x, 0.0, 1.0, out=x)
        if integer:
            return np.rint(x * np.float32(max_value)).astype(dtype)
        return x.astype(dtype, copy=False)

    def _spatial(self, plane: np.ndarray) -> np.ndarray:
        h, w = plane.shape
        if self.resolution < 1.0:
            small = (max(1, round(w * self.resolution)), max(1, round(h * self.resolution)))
            plane = cv2.resize(plane, small, interpolation=cv2.INTER_AREA)
            plane = cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.blur_sigma > 0.0:
            plane = cv2.GaussianBlur(plane, (0, 0), sigmaX=self.blur_sigma, sigmaY=self.blur_sigma)
        return plane


def _curve(x: np.ndarray, curve: tuple[float, float, float]) -> np.ndarray:
    """clip(offset + contrast * x**gamma, 0, 1) of x in [0, 1], float32."""
    gamma, contrast, offset = curve
    if gamma != 1.0:
        x = np.power(x, np.float32(gamma), dtype=np.float32)
    x = x * np.float32(contrast) + np.float32(offset)
    return np.clip(x, 0.0, 1.0, out=x)


@functools.lru_cache(maxsize=16)
def _curve_table(curve: tuple[float, float, float], max_value: float, dtype: str) -> np.ndarray:
    """float32 [dtype's max + 1]: the curve of every stored value (above max_value
    saturates at 1 before the curve), for one table look-up per image."""
    values = np.arange(np.iinfo(np.dtype(dtype)).max + 1, dtype=np.float32)
    table = _curve(np.minimum(values / np.float32(max_value), np.float32(1.0)), curve)
    table.flags.writeable = False
    return table


# A fixed unit Gaussian bank, flat (8 MB, drawn once per process when noise is
# used): a record's noise is a window of it at an offset its seed draws. Fresh
# draws cost ~30 ns a pixel, 7 ms at 448 px, ten times the rest of the scanner.
_BANK_SIZE = 1 << 21


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    bank = np.random.default_rng(_NOISE_SALT).standard_normal(_BANK_SIZE, np.float32)
    bank.flags.writeable = False
    return bank


def _unit_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Unit Gaussian noise of `shape`, float32, a function of `seed` alone: windows
    of the bank (up to half of it each) at offsets drawn from the seed."""
    bank, half = _noise_bank(), _BANK_SIZE // 2
    rng = np.random.default_rng((int(seed) & 0xFFFFFFFF, _NOISE_SALT))
    count = math.prod(shape)
    if count <= half:
        start = int(rng.integers(0, half + 1))
        return bank[start : start + count].reshape(shape)
    out = np.empty(count, np.float32)
    for begin in range(0, count, half):
        n = min(half, count - begin)
        start = int(rng.integers(0, half + 1))
        out[begin : begin + n] = bank[start : start + n]
    return out.reshape(shape)


def _channel_axis(image: np.ndarray, meta: dict) -> int:
    """0 for (C, H, W), -1 for (H, W, C): the axis meta "channels" names by its
    length, else the shorter end axis (the last on a tie)."""
    names = meta.get("channels")
    if isinstance(names, (list, tuple)):
        if len(names) == image.shape[0] != image.shape[-1]:
            return 0
        if len(names) == image.shape[-1] != image.shape[0]:
            return -1
    return 0 if image.shape[0] < image.shape[-1] else -1


def _per_plane(x: np.ndarray, meta: dict, fn) -> np.ndarray:
    if x.ndim == 2:
        return fn(x)
    if x.ndim != 3:
        raise ValueError(f"the scanner reads 2-D or 3-D images, got shape {x.shape}")
    axis = _channel_axis(x, meta)
    planes = [fn(np.ascontiguousarray(p)) for p in np.moveaxis(x, axis, 0)]
    return np.stack(planes, axis=axis)


def record_seed(data: Any, image: np.ndarray) -> int:
    """A record's noise seed: crc32 of its raw bytes, or of its decoded pixels
    when the raw record is not bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return zlib.crc32(data)
    return zlib.crc32(np.ascontiguousarray(image).tobytes())


class ScannedDecoder:
    """`inner` (a record_source.RecordDecoder) with `scanner` applied to each
    decoded image; meta and extras (masks) unchanged. Picklable when `inner` is
    (grain's spawned workers receive it)."""

    def __init__(self, inner: RecordDecoder, scanner: Scanner):
        self.inner = inner
        self.scanner = scanner

    def decode(self, data: Any) -> tuple[np.ndarray, dict]:
        image, meta = self.inner.decode(data)
        return self._scan(data, image, meta), meta

    def decode_meta(self, data: Any) -> dict:
        return self.inner.decode_meta(data)

    def decode_with_extras(self, data: Any) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
        image, meta, extras = self.inner.decode_with_extras(data)
        return self._scan(data, image, meta), meta, extras

    def _scan(self, data: Any, image: np.ndarray, meta: dict) -> np.ndarray:
        seed = record_seed(data, image) if self.scanner.noise > 0 else 0
        return self.scanner.apply(image, meta, seed)

    def __repr__(self) -> str:
        return f"ScannedDecoder({self.inner!r}, {self.scanner.describe()})"
