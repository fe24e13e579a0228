"""Joint geometric transforms: one affine moves an image, its label masks and its
landmark points together.

Coordinates follow OpenCV and the ingestion engine (ingest/preprocess.Geometry):
a point is [x = column, y = row] in pixels, the centre of the top-left pixel is
(0, 0). A transform is a 2 x 3 float64 matrix M mapping input coordinates to
output coordinates, p_out = M[:, :2] @ p_in + M[:, 2], the matrix
cv2.warpAffine takes. Images are resampled bilinearly (area-averaged first when
the transform shrinks them, so thin structures do not alias), masks by nearest
neighbour (labels are never blended), points exactly.

`fit_matrix` is the deterministic placement (evaluation): the whole image,
aspect ratio kept, scaled to fit an S x S output and centred, padding 0.
`sample_affine` composes it with a random zoom (zoom > 1 is a random crop),
rotation about the centre, translation and optional flips (training).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

# Below this overall scale an image is area-resized before the bilinear warp:
# bilinear sampling at a stride of 1/scale source pixels skips detail (a 4 px
# myocardium at half scale would flicker between present and absent).
_AREA_BELOW = 0.8


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2 x 3 affine applying `inner` first, then `outer`."""
    return (_homogeneous(outer) @ _homogeneous(inner))[:2]


def invert(matrix: np.ndarray) -> np.ndarray:
    """The inverse 2 x 3 affine (output -> input coordinates)."""
    return cv2.invertAffineTransform(np.asarray(matrix, np.float64))


def scale_of(matrix: np.ndarray) -> float:
    """The transform's isotropic scale factor (output pixels per input pixel)."""
    return math.sqrt(abs(float(np.linalg.det(np.asarray(matrix, np.float64)[:, :2]))))


def resize_pad_matrix(stored: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """(2 x 3 affine original -> stored pixels, the original (H, W)) of the ingestion's
    resize and pad (ingest/preprocess.Geometry.to_json(): source_shape, resized_shape,
    pad). OpenCV's pixel-centre resize: x' = (x + 0.5) sx - 0.5 + left, likewise y."""
    source = [int(v) for v in stored["source_shape"]][-2:]
    resized = [int(v) for v in (stored.get("resized_shape") or source)][-2:]
    top, left = (int(v) for v in stored["pad"])
    sy, sx = resized[0] / source[0], resized[1] / source[1]
    matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5 + left], [0.0, sy, 0.5 * sy - 0.5 + top]])
    return matrix, (source[0], source[1])


def fit_matrix(in_shape: Sequence[int], out_size: int) -> np.ndarray:
    """The affine that scales an (H, W) image to fit (out_size, out_size), aspect
    ratio kept, centred (the short side padded equally on both sides)."""
    h, w = int(in_shape[0]), int(in_shape[1])
    scale = out_size / max(h, w)
    return _about_centres((h, w), out_size, np.diag([scale, scale]))


def _about_centres(in_shape: tuple[int, int], out_size: int, linear: np.ndarray) -> np.ndarray:
    """[linear | t] mapping the input image's centre onto the output's centre."""
    h, w = in_shape
    c_in = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    c_out = np.full(2, (out_size - 1) / 2.0)
    return np.hstack([linear, (c_out - linear @ c_in)[:, None]])


@dataclasses.dataclass(frozen=True)
class AffineAugment:
    """Ranges of the random geometric augmentation (sample_affine).

    zoom: (lo, hi) factor on top of the fit, sampled log-uniformly; > 1 zooms in
      (a random crop of 1/zoom of the field of view), < 1 zooms out (padding).
    rotate_degrees: rotation uniform in [-d, d] about the image centre.
    translate: shift uniform in [-t, t] x out_size per axis, after zoom and rotation.
    hflip / vflip: mirror left-right / top-bottom with probability 1/2 each.
    """

    zoom: tuple[float, float] = (1.0, 1.0)
    rotate_degrees: float = 0.0
    translate: float = 0.0
    hflip: bool = False
    vflip: bool = False

    def __post_init__(self):
        lo, hi = (float(v) for v in self.zoom)
        if not 0 < lo <= hi:
            raise ValueError(f"zoom range must satisfy 0 < lo <= hi, got {self.zoom}")
        if not 0 <= float(self.rotate_degrees) <= 180:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {self.rotate_degrees}")
        if not 0 <= float(self.translate) <= 1:
            raise ValueError(
                f"translate must be in [0, 1] (of the image size), got {self.translate}"
            )
        object.__setattr__(self, "zoom", (lo, hi))

    @property
    def is_identity(self) -> bool:
        return (
            self.zoom == (1.0, 1.0)
            and not self.rotate_degrees
            and not self.translate
            and not self.hflip
            and not self.vflip
        )


def sample_affine(
    in_shape: Sequence[int], out_size: int, rng: np.random.Generator, augment: AffineAugment
) -> np.ndarray:
    """A random affine from an (H, W) image to (out_size, out_size): the fit of
    `fit_matrix`, then zoom, rotation and flips about the centre, then a shift.

    The draws are always made in the same order and number (zoom, angle, two
    shifts, two flips), whatever is switched off, so turning one augmentation
    off leaves the others' values unchanged for the same rng.
    """
    h, w = int(in_shape[0]), int(in_shape[1])
    lo, hi = augment.zoom
    zoom = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    angle = math.radians(rng.uniform(-1.0, 1.0) * float(augment.rotate_degrees))
    shift = rng.uniform(-1.0, 1.0, size=2) * float(augment.translate) * out_size
    flips = rng.random(2) < 0.5
    fx = -1.0 if augment.hflip and flips[0] else 1.0
    fy = -1.0 if augment.vflip and flips[1] else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    # Counter-clockwise on screen (y points down), as cv2.getRotationMatrix2D.
    rotation = np.array([[cos, sin], [-sin, cos]])
    linear = (out_size / max(h, w)) * zoom * rotation @ np.diag([fx, fy])
    matrix = _about_centres((h, w), out_size, linear)
    matrix[:, 2] += shift
    return matrix


def warp_image(
    image: np.ndarray, matrix: np.ndarray, out_size: int, *, border_value: float = 0.0
) -> np.ndarray:
    """A float image (H, W) or (H, W, C) through `matrix` to (out_size, out_size[, C]):
    bilinear, area-averaged first where the transform shrinks it; `border_value`
    beyond the input."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    matrix = np.asarray(matrix, np.float64)
    scale = scale_of(matrix)
    if scale < _AREA_BELOW:
        h, w = image.shape[:2]
        small = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2's (width, height)
        shrunk = per_channel(image, lambda x: cv2.resize(x, small, interpolation=cv2.INTER_AREA))
        # Input coordinates of the shrunk image -> of the original (pixel centres).
        sx, sy = small[0] / w, small[1] / h
        to_original = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5]])
        image, matrix = shrunk, compose(matrix, to_original)
    return per_channel(
        image,
        lambda x: cv2.warpAffine(
            x,
            matrix,
            (out_size, out_size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=border_value,
        ),
    )


def per_channel(image: np.ndarray, fn) -> np.ndarray:
    """fn on a 2-D image, or on a (H, W, C) one in groups of at most 4 channels
    (OpenCV's limit for these calls)."""
    if image.ndim == 2 or image.shape[2] == 1:
        out = fn(np.ascontiguousarray(image if image.ndim == 2 else image[..., 0]))
        return out if image.ndim == 2 else out[..., None]
    if image.shape[2] <= 4:
        out = fn(np.ascontiguousarray(image))
        return out if out.ndim == 3 else out[..., None]
    parts = [per_channel(image[..., c : c + 4], fn) for c in range(0, image.shape[2], 4)]
    return np.concatenate(parts, axis=-1)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, out_size: int) -> np.ndarray:
    """An integer label map (H, W) through `matrix` to (out_size, out_size) by
    nearest neighbour (each output pixel takes the label under its centre); 0
    beyond the input. The dtype is kept (uint8, uint16, int16 or int32)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    source = mask
    if mask.dtype == np.int32:  # OpenCV warps int32 only through float32 nearest
        source = mask.astype(np.float32)
    out = cv2.warpAffine(
        source,
        np.asarray(matrix, np.float64),
        (out_size, out_size),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.astype(mask.dtype, copy=False)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 2) [x, y] points through `matrix` (float64). Points that leave the
    output image keep their coordinates (the caller decides what that means)."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as [x, y], got {points.shape}")
    matrix = np.asarray(matrix, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_sample(
    matrix: np.ndarray,
    out_size: int,
    *,
    image: np.ndarray | None = None,
    masks: dict[str, np.ndarray] | None = None,
    points: np.ndarray | None = None,
) -> dict:
    """One affine applied to a whole sample: {"image": warp_image(...), "masks":
    {name: warp_mask(...)}, "points": transform_points(...)} for what is given."""
    out: dict = {}
    if image is not None:
        out["image"] = warp_image(image, matrix, out_size)
    if masks is not None:
        out["masks"] = {name: warp_mask(m, matrix, out_size) for name, m in masks.items()}
    if points is not None:
        out["points"] = transform_points(points, matrix)
    return out
