"""Landmark records -> training batches and evaluation sets (the "landmarks" task).

A landmark record is an image (H, W) or (H, W, C) with meta:
  "landmarks"  L [x, y] points in pixels of the STORED image (x = column, y = row,
               the centre of the top-left pixel at (0, 0)): what the ingestion engine
               writes from a builder's rows (input_pipeline/builders/landmarks.py), and
               what the hand and chest X-ray phantoms render;
  "geometry"   optional, the ingestion's resize-and-pad of the original image
               (ingest/preprocess.Geometry.to_json); absent = the stored image is
               the original;
  "spacing"    optional, [row_mm, col_mm] of a stored pixel.
Points in the metrics are in ORIGINAL-image pixels (landmark_metrics), so every
evaluation row carries the affine original -> model input (`InputGeometry`).

Training rows (`make_landmark_train_dataset`): one random affine
(input_pipeline.geometry: zoom, rotation, translation) moves the image and its points
together, then gamma, contrast, brightness and noise change the intensities only:
  {"image": float32 (S, S, C), "landmarks": float32 (L, 2) model-input pixels,
   "landmark_valid": bool (L,) (False for points the affine moved out of the image:
   their target would be cut off), "index": int32}.
Mirroring swaps left and right structures, so `data.hflip` needs `data.flip_pairs`:
the (i, j) landmark pairs a mirror exchanges (() for anatomy where it exchanges none,
e.g. a left hand mirrored reads as a right hand with the same landmark order).
Few-label training: `data.label_fraction` (or `data.num_labelled`) keeps a subset of
the train records, drawn by `data.label_seed` alone, so every arm of an experiment
gets the same images, and a smaller subset is part of a larger one.

Evaluation (`LandmarkEvalSet`): every record of a split placed whole at S x S (aspect
kept, centred, `geometry.fit_matrix`), held in memory with its original-pixel truth,
its geometry, its original shape and its spacing (`data.spacing`):
  "record"      meta "spacing" (per stored pixel) scaled back to the original pixels;
  "hand_wrist"  the hand protocol: landmarks `data.wrist_landmarks` ((0, 4)) 50 mm
                apart in every image (landmark_metrics.hand_spacing_from_wrist);
  "chest"       the chest protocol: pixels of a 512 x 512 resize (chest_spacing);
  "pixels"      original pixels, with a warning that nothing is in mm.

Bad records (no landmarks, another landmark count than data.num_landmarks, NaN
coordinates, points outside the image, missing spacing) raise LandmarkDataError naming
the record (its index in the split and its id) and the fix, before any training step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from input_pipeline import geometry, pipeline, sources, transforms
from input_pipeline.record_source import DataSourceError, RecordSource
from input_pipeline.segmentation import intensity_ranges

SPACINGS = ("record", "hand_wrist", "chest", "pixels")
# Points further than this outside the stored image are annotation errors (a pixel's
# half-width tolerance for points on the border).
_OUTSIDE_TOLERANCE_PX = 0.5


class LandmarkDataError(DataSourceError):
    """Landmark records or settings that cannot be used; names the record and the fix."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


def record_id(meta: dict, split: str, index: int) -> str:
    """A stable id for the record's rows and figures: its source id where it has one."""
    for key in ("source_id", "phantom_index"):
        if key in meta:
            return f"{split}/{meta[key]}"
    return f"{split}/{index}"


# ------------------------------------------------------------------- one record
@dataclasses.dataclass(frozen=True)
class LandmarkRecord:
    image: np.ndarray  # (H, W, C) float32 in [0, 1]
    points: np.ndarray  # (L, 2) float64, stored-image pixels
    to_stored: np.ndarray  # 2 x 3 affine, original -> stored pixels
    original_shape: tuple[int, int]
    spacing: np.ndarray | None  # (row_mm, col_mm) of an ORIGINAL pixel, if known
    name: str


def stored_geometry(meta: dict, stored_shape) -> tuple[np.ndarray, tuple[int, int]]:
    """(2 x 3 affine original -> stored pixels, original (H, W)) from meta "geometry"
    (the ingestion's resize and pad), or the identity."""
    g = meta.get("geometry")
    if not g:
        return np.array([[1.0, 0, 0], [0, 1.0, 0]]), (int(stored_shape[0]), int(stored_shape[1]))
    return geometry.resize_pad_matrix(g)


class LandmarkReader:
    """Split index -> a checked `LandmarkRecord` (module docstring)."""

    def __init__(self, src: RecordSource, data_cfg: Any, split: str):
        self.records, self.decoder = src.records, src.decoder
        self.where, self.split = src.where, split
        self.num_landmarks = int(data_cfg.num_landmarks)
        self.key = str(_get(data_cfg, "landmarks_key", "landmarks"))
        self.need_spacing = spacing_mode(data_cfg) == "record"

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, index: int, meta: dict) -> str:
        return f"record {index} ({record_id(meta, self.split, index)}) of {self.where}"

    def check_meta(self, index: int, meta: dict, stored_shape) -> np.ndarray:
        """The record's stored-pixel points (L, 2), checked."""
        if self.key not in meta:
            raise LandmarkDataError(
                f"{self._where(index, meta)} has no meta[{self.key!r}] (it has "
                f"{sorted(meta)[:12]}); landmark training needs L [x, y] points per record: "
                "prepare the data with a landmark builder (isbi2015_ceph, hand_landmarks, "
                "chest_landmarks) or set data.landmarks_key")
        try:
            points = np.asarray(meta[self.key], np.float64)
        except (TypeError, ValueError):
            points = np.zeros((0,))
        if points.ndim != 2 or points.shape[1] != 2:
            raise LandmarkDataError(
                f"{self._where(index, meta)}: meta[{self.key!r}] must be a list of [x, y] "
                f"points, got shape {points.shape}")
        if len(points) != self.num_landmarks:
            raise LandmarkDataError(
                f"{self._where(index, meta)} has {len(points)} landmarks, the config "
                f"{self.num_landmarks}: set data.num_landmarks and model.num_landmarks to the "
                f"dataset's count ({len(points)}), or fix the record")
        bad = ~np.isfinite(points).all(axis=1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise LandmarkDataError(
                f"{self._where(index, meta)}, landmark {k}: coordinates {points[k].tolist()} "
                "are not finite; annotate it or leave the record out of the split")
        h, w = int(stored_shape[0]), int(stored_shape[1])
        t = _OUTSIDE_TOLERANCE_PX
        outside = ((points[:, 0] < -t) | (points[:, 0] > w - 1 + t) | (points[:, 1] < -t)
                   | (points[:, 1] > h - 1 + t))
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            raise LandmarkDataError(
                f"{self._where(index, meta)}, landmark {k}: [x, y] = {points[k].tolist()} lies "
                f"outside the {w} x {h} (W x H) image; landmarks are [x = column, y = row] in "
                "pixels of the stored image: check the annotation's axis order and units")
        if self.need_spacing and not meta.get("spacing"):
            raise LandmarkDataError(
                f"{self._where(index, meta)} has no meta['spacing'], and data.spacing='record' "
                "reads millimetres from it: set data.spacing='hand_wrist' (hand X-rays), "
                "'chest' (the chest protocol's pixels) or 'pixels' (errors in pixels)")
        return points

    def __call__(self, index: int) -> LandmarkRecord:
        image, meta = self.decoder.decode(self.records[int(index)])
        if image.ndim not in (2, 3):
            raise LandmarkDataError(f"{self._where(index, meta)}: expected a 2-D image, got "
                                    f"shape {image.shape}")
        points = self.check_meta(int(index), meta, image.shape)
        x = np.multiply(image, np.float32(1.0 / transforms.intensity_max(image, meta)),
                        dtype=np.float32)
        to_stored, original_shape = stored_geometry(meta, image.shape)
        spacing = None
        if meta.get("spacing"):
            # A stored pixel is 1/scale original pixels per axis: (row, col) = (sy, sx).
            stored = np.asarray(meta["spacing"], np.float64)[-2:]
            spacing = stored * np.array([to_stored[1, 1], to_stored[0, 0]])
        return LandmarkRecord(x if x.ndim == 3 else x[..., None], points, to_stored,
                              original_shape, spacing, record_id(meta, self.split, int(index)))

    def check_all(self) -> None:
        """Checks every record (landmark datasets are hundreds of images: decoding them
        once costs seconds, and an error now beats one at step 10,000)."""
        for i in range(len(self.records)):
            image, meta = self.decoder.decode(self.records[i])
            self.check_meta(i, meta, image.shape)


# ------------------------------------------------------------------- settings
def image_size_of(data_cfg: Any, image_size: int | None) -> int:
    size = int(image_size if image_size is not None else data_cfg.image_size)
    if size < 8:
        raise LandmarkDataError(f"image_size must be >= 8, got {size}")
    return size


def spacing_mode(data_cfg: Any) -> str:
    mode = str(_get(data_cfg, "spacing", "record"))
    if mode not in SPACINGS:
        raise LandmarkDataError(f"data.spacing must be one of {SPACINGS}, got {mode!r}")
    return mode


def flip_permutation(data_cfg: Any) -> np.ndarray | None:
    """The landmark order after a mirror (None when data.hflip / vflip are off)."""
    if not (_get(data_cfg, "hflip", False) or _get(data_cfg, "vflip", False)):
        return None
    pairs = _get(data_cfg, "flip_pairs", None)
    if pairs is None:
        raise LandmarkDataError(
            "data.hflip / data.vflip mirror the image, which turns left structures into right "
            "ones: declare data.flip_pairs, the (i, j) landmark pairs a mirror exchanges (() "
            "when it exchanges none), or set data.hflip=False and data.vflip=False")
    order = np.arange(int(data_cfg.num_landmarks))
    for pair in pairs:
        i, j = (int(v) for v in pair)
        if not (0 <= i < len(order) and 0 <= j < len(order)) or i == j:
            raise LandmarkDataError(f"data.flip_pairs has ({i}, {j}); give pairs of two "
                                    f"different landmark indices below {len(order)}")
        order[i], order[j] = j, i
    return order


def labelled_records(count: int, data_cfg: Any) -> np.ndarray:
    """The train records kept for few-label training (module docstring), sorted."""
    fraction = _get(data_cfg, "label_fraction", None)
    number = _get(data_cfg, "num_labelled", None)
    if fraction is not None and number is not None:
        raise LandmarkDataError("set one of data.label_fraction and data.num_labelled")
    if number is None:
        fraction = 1.0 if fraction is None else float(fraction)
        if not 0 < fraction <= 1:
            raise LandmarkDataError(f"data.label_fraction must be in (0, 1], got {fraction}")
        number = max(1, round(fraction * count))
    number = int(number)
    if not 1 <= number <= count:
        raise LandmarkDataError(f"data.num_labelled must be in [1, {count}] (the train split's "
                                f"records), got {number}")
    order = np.random.default_rng([int(_get(data_cfg, "label_seed", 0)), 0x1A4D]).permutation(
        count)
    return np.sort(order[:number])


# ------------------------------------------------------------------- training
class _Pick:
    """Stream element -> train record index (picklable for grain workers)."""

    def __init__(self, indices: np.ndarray):
        self.indices = np.asarray(indices, np.int64)

    def __call__(self, i: int) -> int:
        return int(self.indices[int(i)])


class LandmarkAugment(grain.transforms.RandomMap):
    """Record index -> one training row (module docstring)."""

    def __init__(self, reader: LandmarkReader, data_cfg: Any, image_size: int):
        self.reader, self.size = reader, int(image_size)
        self.channels = int(_get(data_cfg, "channels", 1))
        self.mean, self.std = float(data_cfg.norm_mean), float(data_cfg.norm_std)
        if not self.std > 0:
            raise LandmarkDataError(f"data.norm_std must be > 0, got {self.std}")
        self.affine = geometry.AffineAugment(
            zoom=tuple(_get(data_cfg, "zoom", (1.0, 1.0))),
            rotate_degrees=float(_get(data_cfg, "rotate_degrees", 0.0)),
            translate=float(_get(data_cfg, "translate", 0.0)),
            hflip=bool(_get(data_cfg, "hflip", False)),
            vflip=bool(_get(data_cfg, "vflip", False)))
        self.flip_order = flip_permutation(data_cfg)
        self.ranges = intensity_ranges(data_cfg)

    def random_map(self, index: int, rng: np.random.Generator) -> dict:
        record, size, r = self.reader(int(index)), self.size, self.ranges
        # Every draw is made, in this order, whatever is switched off.
        matrix = geometry.sample_affine(record.image.shape[:2], size, rng, self.affine)
        gamma = float(np.exp(rng.uniform(*np.log(r["gamma"]))))
        contrast = float(rng.uniform(*r["contrast"]))
        brightness = float(rng.uniform(-1.0, 1.0) * r["brightness"])
        noise_std = float(rng.uniform(0.0, 1.0) * r["noise_std"])
        noise_seed = int(rng.integers(2**31))

        x = geometry.warp_image(record.image, matrix, size)
        if x.ndim == 2:
            x = x[..., None]
        if gamma != 1.0:
            np.power(np.clip(x, 0.0, None, out=x), np.float32(gamma), out=x)
        x = (x - np.float32(self.mean)) * np.float32(contrast / self.std) + np.float32(brightness)
        if noise_std:
            x += np.random.default_rng(noise_seed).standard_normal(x.shape, np.float32) * (
                np.float32(noise_std))
        if x.shape[-1] != self.channels:
            x = np.repeat(x, self.channels, axis=-1)
        points = geometry.transform_points(record.points, matrix)
        if self.flip_order is not None and np.linalg.det(matrix[:, :2]) < 0:
            points = points[self.flip_order]
        valid = ((points >= -0.5) & (points <= size - 0.5)).all(axis=1)
        return {"image": np.ascontiguousarray(x, np.float32),
                "landmarks": points.astype(np.float32), "landmark_valid": valid,
                "index": np.int32(index)}


def split_source(data_cfg: Any, split: str) -> RecordSource:
    return sources.resolve(data_cfg, split)


@dataclasses.dataclass
class TrainingPlan:
    reader: LandmarkReader
    labelled: np.ndarray  # train record indices used

    def summary(self) -> str:
        total = len(self.reader)
        return (f"{len(self.labelled)} of {total} train records labelled "
                f"({100 * len(self.labelled) / total:.0f}%) from {self.reader.where}")


def plan_training(data_cfg: Any, *, global_batch_size: int, split: str = "train") -> TrainingPlan:
    """Resolves and checks the train split and picks its labelled records."""
    src = split_source(data_cfg, split)
    reader = LandmarkReader(src, data_cfg, split)
    reader.check_all()
    labelled = labelled_records(len(src), data_cfg)
    pipeline.check_split_fills_batch(len(labelled), global_batch_size, split,
                                     "labelled records")
    return TrainingPlan(reader, labelled)


def make_landmark_train_dataset(data_cfg: Any, *, global_batch_size: int, seed: int,
                                image_size: int | None = None, process_index: int = 0,
                                process_count: int = 1, split: str = "train",
                                plan: TrainingPlan | None = None) -> pipeline.ResumableBatches:
    """Infinite shuffled training batches (module docstring); the iterator's state is
    {"global_position": n}, the same batches after a restore whatever the worker count."""
    pipeline.check_batching(data_cfg, global_batch_size, seed, process_index, process_count)
    plan = plan or plan_training(data_cfg, global_batch_size=global_batch_size, split=split)
    augment = LandmarkAugment(plan.reader, data_cfg, image_size_of(data_cfg, image_size))
    order_seed, augment_seed = pipeline.stream_seeds(seed)
    stream = (grain.MapDataset.range(len(plan.labelled)).shuffle(seed=order_seed).repeat()
              .map(_Pick(plan.labelled)).random_map(augment, seed=augment_seed))
    return pipeline.batched(stream, data_cfg, global_batch_size=global_batch_size,
                            process_index=process_index, process_count=process_count)


# ------------------------------------------------------------------- evaluation
class LandmarkEvalSet:
    """Every record of a split, placed at S x S, with what scoring needs (module
    docstring). Images are kept as float16 (normalised), the rest as float64."""

    def __init__(self, data_cfg: Any, split: str, *, image_size: int, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        src = split_source(data_cfg, split)
        reader = LandmarkReader(src, data_cfg, split)
        size = self.image_size = image_size_of(data_cfg, image_size)
        self.split, self.batch_size, self.where = split, int(batch_size), src.where
        channels = int(_get(data_cfg, "channels", 1))
        mean, std = float(data_cfg.norm_mean), float(data_cfg.norm_std)
        images, truth, matrices, shapes, spacings, names = [], [], [], [], [], []
        for i in range(len(reader)):
            record = reader(i)
            fit = geometry.fit_matrix(record.image.shape[:2], size)
            x = geometry.warp_image(record.image, fit, size).reshape(size, size, -1)
            x = (x - np.float32(mean)) / np.float32(std)
            images.append(np.repeat(x, channels // x.shape[-1], axis=-1).astype(np.float16))
            back = geometry.invert(record.to_stored)
            truth.append(geometry.transform_points(record.points, back))
            matrices.append(geometry.compose(fit, record.to_stored))
            shapes.append(record.original_shape)
            spacings.append(record.spacing)
            names.append(record.name)
        self.images = np.stack(images)
        self.truth = np.stack(truth)  # (N, L, 2) original pixels
        self.matrices = np.stack(matrices)  # (N, 2, 3) original -> model input
        self.original_shapes = np.asarray(shapes, np.int64)
        self.names = tuple(names)
        # (N, 2) (row_mm, col_mm) of an original pixel from the records' meta, or None
        # when a record has none; what the metrics use is data.spacing's choice
        # (mimjax.evaluators.landmark_eval.spacing_of).
        self.spacing_mode = spacing_mode(data_cfg)
        self.record_spacing = (None if any(s is None for s in spacings)
                               else np.stack(spacings))

    def __len__(self) -> int:
        return len(self.images)

    def geometries(self) -> list[dict]:
        return [{"matrix": m, "original_shape": tuple(s)}
                for m, s in zip(self.matrices, self.original_shapes)]

    def __iter__(self) -> Iterator[dict]:
        """Batches {"image": float32 (B, S, S, C), "valid": bool (B,)}, the last padded."""
        n, b = len(self), self.batch_size
        for start in range(0, n, b):
            chunk = self.images[start:start + b].astype(np.float32)
            valid = np.ones(b, bool)
            if len(chunk) < b:
                valid[len(chunk):] = False
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:],
                                                        np.float32)])
            yield {"image": chunk, "valid": valid}


def default_landmark_data_config():
    """pipeline.default_data_config() plus the landmark settings read here (defaults:
    the hand radiograph phantom, 37 landmarks, spacing from the records)."""
    import ml_collections  # config-only dependency, kept off grain workers' imports

    c = pipeline.default_data_config()
    # "hand_phantom" | "cxr_phantom" (6 chest landmarks) rendered once under dir, or
    # "prepared" (tools/prepare_data.py --builder isbi2015_ceph / hand_landmarks /
    # chest_landmarks), "shards", "tfds".
    c.source = "hand_phantom"
    c.phantom_num_images = 400
    c.phantom_size = 256  # stored side; the hand phantom's field of view is 240 mm
    c.phantom_split = (0.6, 0.1, 0.3)
    c.image_size = 128  # S: the model's input side
    c.num_landmarks = 37
    c.landmarks_key = "landmarks"
    # Millimetres (see the module docstring): "record" | "hand_wrist" | "chest" | "pixels".
    c.spacing = "record"
    c.wrist_landmarks = (0, 4)  # "hand_wrist": the pair put 50 mm apart
    # Few-label training: a fraction of the train records, or a count (not both).
    c.label_fraction = ml_collections.FieldReference(None, field_type=float)
    c.num_labelled = ml_collections.FieldReference(None, field_type=int)
    c.label_seed = 0
    # Geometric augmentation (one affine moves the image and its points together).
    c.zoom = (0.9, 1.15)
    c.rotate_degrees = 10.0
    c.translate = 0.05
    c.hflip = False
    c.vflip = False
    # The (i, j) pairs a mirror exchanges; None = undeclared (mirroring refused).
    c.flip_pairs = ml_collections.FieldReference(None, field_type=tuple)
    # Intensity augmentation (the image only).
    c.gamma = (0.8, 1.25)
    c.contrast = (0.9, 1.1)
    c.brightness = 0.1
    c.noise_std = 0.05
    return c
