"""Landmark detection metrics: radial errors, MRE, SDR, per landmark and per image (numpy).

Inputs are predicted and true points in pixels of the ORIGINAL image (map decoded
model-input points back with `landmark_decoding.to_original` first), as [x, y] =
[column, row] with the centre of the top-left pixel at (0, 0), shape (N, L, 2) for N
images of L landmarks, and a pixel spacing per image as (row_mm, col_mm), the order
the ingestion engine stores (input_pipeline.ingest.convert: "spacing"). Since x runs
along columns, the error of landmark l is

    sqrt(((x_pred - x_true) * col_mm)^2 + ((y_pred - y_true) * row_mm)^2)

(anisotropic pixels allowed). Swapping the two factors is a known mistake in this
literature (Malga-Vision/DiffusionXray-FewShot-LandmarkDetection scales [x, y] ceph
errors by 0.1 * [2400 / size[0], 1935 / size[1]], the factor of the image's height,
2400 px, on the column offsets); the tests pin the order down.

- MRE: the mean radial error over every image and landmark; its std is numpy's
  population std (ddof 0) over the same errors, as the reference's `np.std`.
- SDR at t: the fraction of all (image, landmark) errors <= t (the reference counts
  `d <= t`); default thresholds 2, 2.5, 3, 4 mm (the ISBI 2015 challenge's) and
  6, 9, 10 (the reference's extras).
- per-landmark MRE (over images) and per-image rows (`rows`): the image id, that
  image's MRE and SDR, and each landmark's error, so two arms scored on the same test
  images compare with a paired bootstrap over images (`paired_difference`). With the
  same L per image, the mean of the per-image MREs (or SDRs) is the overall MRE (SDR).
- every result says its unit ("mm", "px", or the chest protocol's pixels).

Millimetres per dataset, and what the reference protocol (GU2Net, Zhu et al. MICCAI
2021, MIRACLE-Center/YOLO_Universal_Anatomical_Landmark_Detection, evaluation.py) does:
- ISBI 2015 ceph: 0.1 mm per pixel of the original 1935 x 2400 image (`ceph_spacing`).
  The reference measures at its model resolution (416 x 512) with one factor 0.46875
  mm/px = 0.1 * 2400 / 512 on both axes, although its x axis was scaled by 416 / 1935
  (0.465 mm/px): its x errors read 0.8% long. Here errors are measured in original
  pixels, so no resize enters.
- Hand (Digital Hand Atlas, no physical spacing): the per-image isotropic spacing that
  makes true landmarks 0 and 4 50 mm apart (`hand_spacing_from_wrist`). The reference
  takes that distance at its model resolution (368 x 512, an aspect-changing resize)
  between argmax-rounded true points; here it is taken between the original
  annotations in original pixels, which are square. (input_pipeline/builders/
  landmarks.py records Payer et al.'s evaluation, whose annotations these are, as
  putting the 50 mm between landmarks 1 and 5, and stores that as the record's
  "mm_per_pixel": pass `landmarks=(1, 5)` for it; compare numbers under one
  convention only.)
- Chest (Shenzhen set, no spacing in the files): the reference reports pixels of its
  512 x 512 model input (factor 1), i.e. errors after an aspect-changing resize of
  each image to 512 x 512. `chest_spacing` gives the per-image factors that express
  original-pixel errors in those units (unit "px@512x512"); they are not mm.
- No spacing: the errors stay in original pixels, the unit is "px", and a warning says
  so and how to pass spacing. Never silent millimetres.
The reference also takes the true points from the argmax of its rendered target
heatmaps, i.e. rounded to model-input pixels; here the truth is the annotation itself.

Bad input raises ValueError naming the image and landmark: NaN coordinates, a
prediction with another landmark count than the truth, true points outside the image
(when `image_shapes` is given). Predicted points outside the image are legitimate
(a model may put a point in the padding) and are scored and counted
(`predictions_outside`), not refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from mimjax.evaluators import bootstrap

DEFAULT_THRESHOLDS = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)
CEPH_SPACING_MM = 0.1
CEPH_ORIGINAL_SHAPE = (2400, 1935)  # (H, W)
HAND_WRIST_WIDTH_MM = 50.0
HAND_WRIST_LANDMARKS = (0, 4)
CHEST_REFERENCE_SIZE = (512, 512)  # (H, W) the reference's chest model input


@dataclasses.dataclass(frozen=True)
class Spacing:
    """Physical size of an original pixel per image, `values` (N, 2) or (2,) as
    (row, col), in `unit` per pixel ("mm", or another named unit)."""

    values: np.ndarray
    unit: str = "mm"


def _threshold_key(t: float) -> str:
    return f"sdr/{float(t):g}"


# ----------------------------------------------------------------------------- spacings
def ceph_spacing(num_images: int | None = None) -> Spacing:
    """ISBI 2015: 0.1 mm per pixel of the original image, both axes ((2,) or (N, 2))."""
    values = np.full(2 if num_images is None else (int(num_images), 2), CEPH_SPACING_MM)
    return Spacing(values, "mm")


def hand_spacing_from_wrist(points_true, *, landmarks: tuple[int, int] = HAND_WRIST_LANDMARKS,
                            width_mm: float = HAND_WRIST_WIDTH_MM) -> Spacing:
    """Per-image isotropic spacing (N, 2) that puts true landmarks `landmarks` (0 and 4,
    GU2Net's evaluation) `width_mm` apart; `points_true` (N, L, 2) original pixels."""
    points = np.asarray(points_true, np.float64)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"points_true must be (N, L, 2) as [x, y], got {points.shape}")
    a, b = (int(i) for i in landmarks)
    if max(a, b) >= points.shape[1] or a == b:
        raise ValueError(f"landmarks {landmarks} must be two different indices below the "
                         f"landmark count {points.shape[1]}")
    distance = np.linalg.norm(points[:, a] - points[:, b], axis=-1)
    bad = ~(np.isfinite(distance) & (distance > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"image {i}: true landmarks {a} and {b} are {distance[i]} px apart, so the "
            f"{width_mm} mm wrist convention gives no spacing; fix the annotation of that "
            "image or leave it out")
    mm = width_mm / distance
    return Spacing(np.stack([mm, mm], axis=1), "mm")


def chest_spacing(original_shapes, size: Sequence[int] = CHEST_REFERENCE_SIZE) -> Spacing:
    """Per-image factors (N, 2) that express original-pixel errors in pixels of the
    reference's (H, W) = `size` resized chest input: (size_h / H, size_w / W)."""
    shapes = np.asarray(original_shapes, np.float64).reshape(-1, 2)
    if np.any(shapes < 1):
        raise ValueError(f"original_shapes must be (N, 2) (H, W) > 0, got {shapes.tolist()}")
    height, width = (int(v) for v in size)
    values = np.stack([height / shapes[:, 0], width / shapes[:, 1]], axis=1)
    return Spacing(values, f"px@{height}x{width}")


# ----------------------------------------------------------------------------- checks
def _points(name: str, points) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"{name} must be (N images, L landmarks, 2) as [x, y] pixels of the "
                         f"original image, got shape {points.shape}")
    return points


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    i, k = np.argwhere(mask)[0]
    return int(i), int(k)


def _describe(i: int, image_ids) -> str:
    return f"image {i}" + ("" if image_ids is None else f" (id {image_ids[i]!r})")


def _check_points(pred, true, image_ids, image_shapes) -> int:
    """Validates both point sets; returns the number of predictions outside the image."""
    if pred.shape[1] != true.shape[1]:
        raise ValueError(
            f"the prediction has {pred.shape[1]} landmarks per image, the truth "
            f"{true.shape[1]}: decode one point per heatmap channel and give the model the "
            "dataset's landmark count")
    if pred.shape[0] != true.shape[0]:
        raise ValueError(f"{pred.shape[0]} predicted images for {true.shape[0]} true ones: "
                         "score the same images in the same order")
    for name, points, fix in (
            ("predicted", pred, "the heatmaps were not finite or the geometry was singular"),
            ("true", true, "drop or fix the missing annotation before scoring")):
        bad = ~np.isfinite(points).all(axis=-1)
        if bad.any():
            i, k = _first_bad(bad)
            raise ValueError(f"{_describe(i, image_ids)}, landmark {k}: the {name} point is "
                             f"{points[i, k].tolist()} (not finite); {fix}")
    if image_shapes is None:
        return 0
    shapes = np.asarray(image_shapes, np.float64).reshape(-1, 2)
    if len(shapes) == 1:
        shapes = np.repeat(shapes, len(true), axis=0)
    if len(shapes) != len(true):
        raise ValueError(f"image_shapes has {len(shapes)} (H, W) rows for {len(true)} images")
    height, width = shapes[:, None, 0], shapes[:, None, 1]

    def outside(points):
        x, y = points[..., 0], points[..., 1]
        return (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)

    off = outside(true)
    if off.any():
        i, k = _first_bad(off)
        raise ValueError(
            f"{_describe(i, image_ids)}, landmark {k}: the true point {true[i, k].tolist()} "
            f"lies outside the {int(shapes[i, 1])} x {int(shapes[i, 0])} (W x H) image; pass "
            "points in original-image pixels [x = column, y = row] (map model-input points "
            "back with landmark_decoding.to_original) and image_shapes as (H, W)")
    return int(outside(pred).sum())


def _spacing(spacing, num_images: int) -> tuple[np.ndarray, str]:
    if spacing is None:
        warnings.warn(
            "no pixel spacing given: landmark errors, MRE and SDR are in PIXELS of the "
            "original image, not mm (SDR thresholds are then pixels too). Pass "
            "spacing=(row_mm, col_mm) per image: ceph_spacing() for ISBI 2015, "
            "hand_spacing_from_wrist(points_true) for the hand set, or the spacing the "
            "ingestion stored with each record.", UserWarning, stacklevel=3)
        return np.ones((num_images, 2)), "px"
    unit = "mm"
    if isinstance(spacing, Spacing):
        spacing, unit = spacing.values, spacing.unit
    values = np.asarray(spacing, np.float64)
    if values.shape == (2,):
        values = np.broadcast_to(values, (num_images, 2))
    if values.shape != (num_images, 2):
        raise ValueError(f"spacing must be (row_mm, col_mm) or one such pair per image "
                         f"({num_images}, 2), got shape {values.shape}")
    bad = ~(np.isfinite(values) & (values > 0)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"image {i}: spacing {values[i].tolist()} must be positive and "
                         "finite (row_mm, col_mm)")
    return values, unit


# ----------------------------------------------------------------------------- metrics
def radial_errors(pred, true, spacing) -> np.ndarray:
    """(N, L) Euclidean errors with per-image (N, 2) (row, col) spacing; no checks."""
    delta = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    spacing = np.asarray(spacing, np.float64)
    # [x, y] points: x is a column offset (col spacing), y a row offset (row spacing).
    scaled = delta * spacing[:, None, ::-1]
    return np.sqrt(np.sum(scaled**2, axis=-1))


@dataclasses.dataclass(frozen=True)
class LandmarkMetrics:
    """Radial errors (N, L) in `unit`, and their summaries (see the module docstring)."""

    errors: np.ndarray
    unit: str
    image_ids: tuple
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    predictions_outside: int = 0

    @property
    def mre(self) -> float:
        return float(self.errors.mean())

    @property
    def mre_std(self) -> float:
        return float(self.errors.std())

    @property
    def sdr(self) -> dict[float, float]:
        return {t: float(np.mean(self.errors <= t)) for t in self.thresholds}

    @property
    def per_landmark_mre(self) -> np.ndarray:
        return self.errors.mean(axis=0)

    def summary(self) -> dict:
        """Flat record: unit, mre, mre_std, sdr/T, mre/landmark_K, counts."""
        out = {"unit": self.unit, "mre": self.mre, "mre_std": self.mre_std}
        out.update({_threshold_key(t): v for t, v in self.sdr.items()})
        out.update({f"mre/landmark_{k}": float(v) for k, v in enumerate(self.per_landmark_mre)})
        out.update(num_images=int(self.errors.shape[0]), num_landmarks=int(self.errors.shape[1]),
                   predictions_outside=self.predictions_outside)
        return out

    def rows(self) -> list[dict]:
        """One row per image: image id, unit, mre, sdr/T, error/K (for paired bootstraps)."""
        rows = []
        for image_id, errors in zip(self.image_ids, self.errors):
            row = {"image": image_id, "unit": self.unit, "mre": float(errors.mean())}
            row.update({_threshold_key(t): float(np.mean(errors <= t)) for t in self.thresholds})
            row.update({f"error/{k}": float(e) for k, e in enumerate(errors)})
            rows.append(row)
        return rows


def landmark_metrics(pred, true, spacing=None, *, image_ids: Sequence | None = None,
                     image_shapes=None,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> LandmarkMetrics:
    """Scores (N, L, 2) predicted against true [x, y] points in original-image pixels.

    `spacing`: a `Spacing` (from ceph_spacing, hand_spacing_from_wrist, chest_spacing),
    a (row_mm, col_mm) pair for every image, an (N, 2) array of them, or None (pixels,
    with a warning). `image_ids` name the rows (default 0..N-1; unique);
    `image_shapes` ((H, W), or (N, 2)) turns on the outside-the-image checks."""
    pred, true = _points("pred", pred), _points("true", true)
    if image_ids is not None:
        image_ids = tuple(image_ids)
        if len(image_ids) != len(true) or len(set(image_ids)) != len(image_ids):
            raise ValueError(f"image_ids must be {len(true)} unique ids, one per image; got "
                             f"{len(image_ids)} ({len(set(image_ids))} unique)")
    if len(true) == 0 or true.shape[1] == 0:
        raise ValueError(f"nothing to score: {true.shape[0]} images of {true.shape[1]} "
                         "landmarks")
    outside = _check_points(pred, true, image_ids, image_shapes)
    values, unit = _spacing(spacing, len(true))
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not t > 0 for t in thresholds):
        raise ValueError(f"thresholds must be positive distances in {unit}, got {thresholds}")
    return LandmarkMetrics(radial_errors(pred, true, values), unit,
                           image_ids if image_ids is not None else tuple(range(len(true))),
                           thresholds, outside)


# ----------------------------------------------------------------------------- two arms
def paired_difference(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], key: str = "mre",
                      *, num_resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> bootstrap.Difference:
    """mean_images(A[key]) - mean_images(B[key]) over the images both arms scored
    (matched by "image" id), with a paired bootstrap percentile interval over images
    (mimjax.evaluators.bootstrap). For "mre" and "error/K" a negative difference
    favours A; for "sdr/T" a positive one."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tables = []
    for name, rows in (("A", rows_a), ("B", rows_b)):
        table = {row["image"]: row for row in rows}
        if not rows or len(table) != len(rows):
            raise ValueError(f"arm {name} needs one row per image, each image once; got "
                             f"{len(rows)} rows for {len(table)} image ids")
        if key not in rows[0]:
            raise ValueError(f"arm {name} has no metric {key!r}; it has {sorted(rows[0])}")
        tables.append(table)
    if tables[0].keys() != tables[1].keys():
        only_a = sorted(map(str, tables[0].keys() - tables[1].keys()))[:5]
        only_b = sorted(map(str, tables[1].keys() - tables[0].keys()))[:5]
        raise ValueError(f"the two arms scored different images (only A: {only_a}, only B: "
                         f"{only_b}); a paired comparison needs the same test images")
    units = {row.get("unit") for table in tables for row in table.values()}
    if len(units) > 1:
        raise ValueError(f"the arms' errors are in different units {sorted(map(str, units))}; "
                         "score both with the same spacing")
    ids = list(tables[0])
    differences = np.array([tables[0][i][key] - tables[1][i][key] for i in ids], np.float64)
    rng = np.random.default_rng(seed)
    n = len(differences)
    resampled = differences[rng.integers(0, n, (int(num_resamples), n))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return bootstrap.Difference(float(differences.mean()), float(low), float(high), confidence,
                                int(num_resamples))
