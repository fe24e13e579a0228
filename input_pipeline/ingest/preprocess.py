"""Frames -> stored pixels: windowing to [0, 1], MONOCHROME1 inversion, and the
aspect-preserving resize + pad to uint16, with the `Geometry` that moves masks and
landmarks along with their image.

Windowing ("auto", the default of `to_unit_interval`), first rule that applies:
  1. the file's VOI LUT Sequence (first LUT), through pydicom's `apply_voi`;
  2. the file's Window Center / Width (first values) with its VOI LUT Function
     (LINEAR, LINEAR_EXACT or SIGMOID), through pydicom's `apply_windowing`;
  3. the frame's known display range (`Frame.default_range`): value / (2**bits - 1)
     for 8/16-bit PNG/JPEG/BMP and colour DICOM, value / 255 for 8-bit grayscale
     DICOM without rescale, the whole volume's 0.5 / 99.5 percentiles for NIfTI;
  4. CT without any of these: the fixed HU window CT_DEFAULT_WINDOW (-1000..1000 HU,
     air to dense bone: wide on purpose, the uint16 output keeps soft-tissue detail
     for later re-windowing);
  5. anything else (MR, X-ray, US ... without VOI): the frame's 0.5 / 99.5 percentiles.
A percentile window that collapses (more than 99 % of pixels equal) falls back to min/max.
Explicit windows: "minmax", "percentile" (0.5, 99.5), or (center, width) in modality
units (HU for CT), mapped linearly: center - width/2 -> 0, center + width/2 -> 1.
MONOCHROME1 images (and MONOCHROME2 with Presentation LUT Shape INVERSE) are
inverted after windowing, so 1 is always bright as displayed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from input_pipeline.ingest.readers import Frame, RejectedInput

CT_DEFAULT_WINDOW = (0.0, 2000.0)  # (center, width) in HU: -1000 .. 1000
PERCENTILES = (0.5, 99.5)
WINDOW_NAMES = ("auto", "minmax", "percentile")
_U16_MAX = 65535


def to_unit_interval(frame: Frame, window: str | tuple[float, float] | None = "auto") -> np.ndarray:
    """float32 in [0, 1], same shape as frame.pixels, 1 = bright as displayed.

    window: "auto" (or None) -- the rules in the module docstring; "minmax";
    "percentile" (0.5, 99.5); or (center, width) in modality units.
    Raises RejectedInput for non-finite pixels or an image that is constant after
    windowing (it carries no information).
    """
    pixels = np.asarray(frame.pixels)
    finite = np.isfinite(pixels)
    if not finite.all():
        raise RejectedInput(f"non-finite values: {int(pixels.size - finite.sum())} NaN/Inf pixels")
    pixels = pixels.astype(np.float64)
    if window is None or (isinstance(window, str) and window == "auto"):
        out = _auto(frame, pixels)
    elif isinstance(window, str):
        if window not in WINDOW_NAMES:
            raise ValueError(
                f"window must be one of {WINDOW_NAMES} or (center, width), got {window!r}"
            )
        out = _stretch(pixels, *(_minmax(pixels) if window == "minmax" else _percentiles(pixels)))
    else:
        center, width = _explicit_window(window)
        out = _apply_window(pixels, center, width, "LINEAR_EXACT")
    out = np.clip(out, 0.0, 1.0)
    if str(frame.attrs.get("photometric", "")).upper() == "MONOCHROME1" or getattr(
        frame, "presentation_inverse", False
    ):
        out = 1.0 - out
    if out.size == 0 or out.max() == out.min():
        raise RejectedInput("constant image: every pixel has the same value after windowing")
    return out.astype(np.float32)


def _explicit_window(window) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"window must be 'auto', 'minmax', 'percentile' or (center, width), got {window!r}"
        ) from e
    if not (width > 0 and math.isfinite(width) and math.isfinite(center)):
        raise ValueError(f"window width must be a positive number, got {window!r}")
    return center, width


def _auto(frame: Frame, pixels: np.ndarray) -> np.ndarray:
    if frame.voi_lut is not None:
        return _apply_voi_lut(pixels, frame.voi_lut)
    if frame.window is not None:
        return _apply_window(pixels, *frame.window, frame.voi_function)
    if frame.default_range is not None and frame.default_range[1] > frame.default_range[0]:
        return _stretch(pixels, *frame.default_range)
    if str(frame.attrs.get("modality", "")).upper() == "CT":
        return _apply_window(pixels, *CT_DEFAULT_WINDOW, "LINEAR_EXACT")
    return _stretch(pixels, *_percentiles(pixels))


def _stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(pixels)  # constant: rejected by the caller
    return (pixels - low) / (high - low)


def _minmax(pixels: np.ndarray) -> tuple[float, float]:
    return float(pixels.min()), float(pixels.max())


def _percentiles(pixels: np.ndarray) -> tuple[float, float]:
    low, high = (float(v) for v in np.percentile(pixels, PERCENTILES))
    return (low, high) if high > low else _minmax(pixels)


def _apply_window(pixels: np.ndarray, center: float, width: float, function: str):
    """DICOM windowing by pydicom, on a 16-bit unsigned output scale, then / 65535."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"  # inversion is ours, after windowing
    voi.BitsStored = 16
    voi.PixelRepresentation = 0  # -> output range 0 .. 65535
    voi.WindowCenter = center
    voi.WindowWidth = width
    voi.VOILUTFunction = function
    return apply_windowing(pixels, voi) / _U16_MAX


def _apply_voi_lut(pixels: np.ndarray, lut) -> np.ndarray:
    """The file's VOI LUT by pydicom; its output is scaled by 2**bits - 1 of the LUT."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi

    n, first, bits = lut.descriptor
    item = Dataset()
    item.LUTDescriptor = [n if n < 2**16 else 0, first, bits]
    item.add_new("LUTData", "US", [int(v) for v in lut.values])
    voi = Dataset()
    voi.VOILUTSequence = [item]
    # LUT inputs are integers; clipping first keeps the cast inside the table.
    indices = np.clip(np.rint(pixels), first, first + n - 1).astype(np.int64)
    return apply_voi(indices, voi).astype(np.float64) / (2**bits - 1)


@dataclasses.dataclass
class Geometry:
    """How source pixel coordinates map to output ones (resize, then pad).

    Pixel centres are the coordinates: the centre of the top-left pixel is (0, 0).
    A point at source (x, y) lands at
        x' = (x + 0.5) * sx - 0.5 + pad_left,   y' = (y + 0.5) * sy - 0.5 + pad_top
    where (sy, sx) = resized_shape / source_shape (both ~= scale; exact per axis, as
    OpenCV's resize uses them).
    """

    source_shape: tuple[int, int]
    output_shape: tuple[int, int]
    scale: float
    pad: tuple[int, int]  # (top, left)
    resized_shape: tuple[int, int] | None = None  # before padding; from scale if None

    def __post_init__(self):
        self.source_shape = tuple(int(v) for v in self.source_shape)
        self.output_shape = tuple(int(v) for v in self.output_shape)
        self.pad = tuple(int(v) for v in self.pad)
        self.scale = float(self.scale)
        if self.resized_shape is None:
            self.resized_shape = tuple(_scaled(n, self.scale) for n in self.source_shape)
        self.resized_shape = tuple(int(v) for v in self.resized_shape)

    @property
    def axis_scales(self) -> tuple[float, float]:
        """(sy, sx): output pixels per source pixel along rows and columns."""
        return (
            self.resized_shape[0] / self.source_shape[0],
            self.resized_shape[1] / self.source_shape[1],
        )

    def map_points(self, xy) -> np.ndarray:
        """(N, 2) [x = column, y = row] source pixels -> the same points in output pixels."""
        points = np.asarray(xy, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"points must have shape (N, 2) as [x, y], got {points.shape}")
        sy, sx = self.axis_scales
        return np.stack(
            [
                (points[:, 0] + 0.5) * sx - 0.5 + self.pad[1],
                (points[:, 1] + 0.5) * sy - 0.5 + self.pad[0],
            ],
            axis=1,
        )

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """Integer label image (H, W) or (D, H, W) -> output geometry by nearest neighbour.

        Every output pixel takes the label of the source pixel under its centre (the
        same mapping as map_points), so labels are never blended; padding is 0.
        dtype uint8, or uint16 when labels exceed 255.
        """
        mask = np.asarray(mask)
        if mask.ndim not in (2, 3) or mask.shape[-2:] != self.source_shape:
            raise ValueError(
                f"mask shape {mask.shape} does not match the image's "
                f"{self.source_shape} (H, W), or (D, H, W) for a volume"
            )
        labels = _as_labels(mask)
        sy, sx = self.axis_scales
        rows = np.minimum(
            ((np.arange(self.resized_shape[0]) + 0.5) / sy).astype(np.int64),
            self.source_shape[0] - 1,
        )
        cols = np.minimum(
            ((np.arange(self.resized_shape[1]) + 0.5) / sx).astype(np.int64),
            self.source_shape[1] - 1,
        )
        resized = labels[..., rows[:, None], cols[None, :]]
        out = np.zeros(mask.shape[:-2] + self.output_shape, dtype=labels.dtype)
        top, left = self.pad
        out[..., top : top + self.resized_shape[0], left : left + self.resized_shape[1]] = resized
        return out

    def output_spacing(self, spacing) -> list[float] | None:
        """(row_mm, col_mm) of an output pixel, given the source's; None stays None."""
        if spacing is None:
            return None
        sy, sx = self.axis_scales
        return [float(spacing[0]) / sy, float(spacing[1]) / sx]

    def to_json(self) -> dict:
        return {
            "source_shape": list(self.source_shape),
            "output_shape": list(self.output_shape),
            "scale": self.scale,
            "pad": list(self.pad),
            "resized_shape": list(self.resized_shape),
        }

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        return cls(
            **{k: data[k] for k in ("source_shape", "output_shape", "scale", "pad")},
            resized_shape=data.get("resized_shape"),
        )


def _scaled(n: int, scale: float) -> int:
    return max(1, math.floor(n * scale + 0.5))


def _as_labels(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer) and (
        not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask))
    ):
        raise ValueError("a mask must hold integer labels; found non-integer values")
    low, high = (mask.min(), mask.max()) if mask.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"mask labels must be within 0..65535, found {low}..{high}")
    return mask.astype(np.uint8 if high <= 255 else np.uint16)


def resize_and_pad(image01: np.ndarray, size: int | None) -> tuple[np.ndarray, Geometry]:
    """[0, 1] image (H, W) or (D, H, W) -> uint16 (value * 65535, rounded) and its Geometry.

    The longest side becomes `size` (aspect ratio kept), the short side is padded
    symmetrically with 0 (an odd remainder puts the extra pixel at the bottom/right)
    to size x size. OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging;
    a volume is resized plane by plane along its leading axis. size None: no resize.
    """
    import cv2

    image = np.asarray(image01)
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError(f"image must be (H, W) or (D, H, W) and non-empty, got {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image has NaN/Inf values; window it with to_unit_interval first")
    height, width = image.shape[-2:]
    if size is None:
        geometry = Geometry((height, width), (height, width), 1.0, (0, 0))
    else:
        if int(size) < 1:
            raise ValueError(f"size must be a positive number of pixels or None, got {size!r}")
        size = int(size)
        scale = size / max(height, width)
        resized_shape = (_scaled(height, scale), _scaled(width, scale))
        pad = ((size - resized_shape[0]) // 2, (size - resized_shape[1]) // 2)
        geometry = Geometry((height, width), (size, size), scale, pad, resized_shape)

    planes = image.reshape((-1, height, width)).astype(np.float32)
    rh, rw = geometry.resized_shape
    if (rh, rw) != (height, width):
        interpolation = cv2.INTER_AREA if geometry.scale < 1 else cv2.INTER_LINEAR
        planes = np.stack([cv2.resize(p, (rw, rh), interpolation=interpolation) for p in planes])
    out = np.zeros((planes.shape[0],) + geometry.output_shape, dtype=np.uint16)
    top, left = geometry.pad
    out[:, top : top + rh, left : left + rw] = np.rint(np.clip(planes, 0.0, 1.0) * _U16_MAX)
    return out.reshape(image.shape[:-2] + geometry.output_shape), geometry
