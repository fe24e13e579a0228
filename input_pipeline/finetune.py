"""Fine-tuning and evaluation input pipelines: labelled splits, augmented
training batches, and padded one-pass evaluation batches.

Splits (`split_source`, i.e. sources.resolve; docs/data_sources.md)
  prepared: `data_cfg.dir` is the output root of tools/prepare_data.py; split
    "val" is the shards in `dir/val/`.
  phantom: the generated phantom has no split folders. Records are ranked by a
    salted hash of their index and cut at `data_cfg.phantom_split` (train, val,
    test fractions): deterministic, exact sizes, no record in two splits.
  tfds: the TFDS split `data_cfg.tfds.splits[split]`.
  With data_cfg.roi_context > 0 each record's image is first cut to a square
  around its lesion (meta "lesion_center", "lesion_radius_px"; see roi_crop), so
  the phantom's whole mammograms become lesion crops like CBIS-DDSM's.
  In every case batch["index"] is the record's index *within the split*, i.e.
  `split_source(data_cfg, split)[index]` is the record a batch row came from.

make_finetune_train_dataset graph (per process), shaped like the pretraining
pipeline (see pipeline.py) so the trainer checkpoints it the same way:

  record indices                        one entry per stream position
    plain:    range(n).shuffle(s0).repeat()          epoch e reshuffled
    balanced: position -> draw of epoch e            weighted, with replacement
  .map(read + decode)                   {"image", "meta", "index"} (source.decoder)
  .random_map(FinetuneAugment, seed=s1) rng seeded by GLOBAL stream position
  -- pipeline.ResumableBatches: per-process slice, batch, threads, mp_prefetch --

Augmentation (FinetuneAugment): random resized crop, horizontal flip, and a
small rotation about the crop centre, applied on the full-resolution image
(so the rotated window takes real pixels from outside the crop where there are
any, black only beyond the image), then one area resize to the output size and
the pretraining normalization. With rotate_degrees=0 it is exactly
transforms.MultiScaleRandomCrop at one scale: same rng draws, same pixels.
Measured (448 px phantom -> 224, one core): 0.37 ms per record without
rotation, 0.63 ms with it (the warp runs at the crop's full resolution).

Evaluation (make_eval_batches): every record of the split once, in record
order, the whole (square) image resized to image_size, no randomness; the last
batch is padded with rows whose batch["valid"] is False. The split is decoded
and resized once, when the EvalBatches is built, and kept in memory
(eval_batches.py). Build it once and iterate it at every eval. Measured (448 px
phantom -> 224, one core): building 0.4 ms per record, a pass over the built
batches 0.25 ms per record.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np

from input_pipeline import eval_batches, pipeline, sources, transforms
from input_pipeline.epoch_cache import EpochCache
from input_pipeline.eval_batches import EvalBatches
from input_pipeline.record_source import RecordSource

SPLITS = sources.SPLITS
# The phantoms' split (moved to the resolver, which every pipeline shares).
phantom_split_indices = sources.phantom_split_indices


def default_finetune_data_config() -> ml_collections.ConfigDict:
    """pipeline.default_data_config() plus the fine-tuning settings read here."""
    c = pipeline.default_data_config()
    c.crop_scale = (0.5, 1.0)  # milder than pretraining: the lesion must stay in view
    c.rotate_degrees = 10.0  # rotation angle uniform in [-d, d]; 0 = off
    # Meta key of a single-class label to balance training batches on (each
    # class equally likely per draw); None = plain shuffled epochs.
    c.balanced_label = ml_collections.FieldReference(None, field_type=str)
    # roi_context / roi_min_px (pipeline.default_data_config): lesion-centred crops,
    # CBIS-DDSM's "cropped image" for records holding a whole mammogram; 0 = off
    # (records already are lesion crops, e.g. the cbis_ddsm builder's).
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    # ConfigDict, FrozenConfigDict, dataclasses, SimpleNamespace alike.
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ splits


def split_source(data_cfg: Any, split: str) -> RecordSource:
    """Random-access source of one split's records ({"image", "meta", "index"}):
    sources.resolve(data_cfg, split) for split "train", "val" or "test" (see the
    module docstring). An empty split is an error."""
    if split not in SPLITS:
        raise sources.DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    return sources.resolve(data_cfg, split)


# --------------------------------------------------------------- per record


def record_labels(meta: dict, index: int, label_keys: Sequence[str]) -> dict[str, np.ndarray]:
    """{"label_{k}": meta[k]} as 32-bit arrays (JAX without x64)."""
    out = {}
    for k in label_keys:
        if k not in meta:
            raise KeyError(
                f"record {index} has no label {k!r} in its meta (keys: {sorted(meta)}); "
                f"drop {k!r} from label_keys or ingest the records with it"
            )
        value = np.asarray(meta[k])
        if value.dtype == np.int64:
            value = value.astype(np.int32)
        elif value.dtype == np.float64:
            value = value.astype(np.float32)
        out[f"label_{k}"] = value
    return out


def _check_2d(image: np.ndarray, index: int) -> None:
    if image.ndim != 2:
        raise ValueError(
            f"record {index} has a {image.ndim}-D image {image.shape}; fine-tuning takes 2-D "
            "images (ingest volumes as slices)"
        )


def rotate_crop(image: np.ndarray, window: tuple[int, int, int, int], degrees: float) -> np.ndarray:
    """The (h, w) crop `window` = (top, left, h, w) of `image` rotated by `degrees`
    (counter-clockwise) about the window's centre: pixels rotated in from outside
    the window are real image pixels, 0 only beyond the image. Bilinear, at the
    image's resolution and dtype."""
    top, left, h, w = window
    centre = (left + (w - 1) / 2.0, top + (h - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, float(degrees), 1.0)
    matrix[:, 2] -= (left, top)  # output origin at the window's top-left corner
    return cv2.warpAffine(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


class FinetuneAugment(grain.transforms.RandomMap):
    """{"image", "meta", "index"} -> {"image": float32 (S, S, C), "index": int32,
    "label_{k}"}: random resized crop, flip, rotation, normalization."""

    def __init__(
        self,
        image_size: int,
        *,
        crop_scale=(0.5, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        hflip: bool = True,
        rotate_degrees: float = 0.0,
        mean: float,
        std: float,
        channels: int = 1,
        label_keys: Sequence[str] = (),
    ):
        # Validates the shared arguments exactly as pretraining does.
        self._crop = transforms.MultiScaleRandomCrop(
            (int(image_size),),
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            hflip=hflip,
            mean=mean,
            std=std,
            channels=channels,
        )
        if not 0 <= float(rotate_degrees) <= 180:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
        self.image_size = int(image_size)
        self.rotate_degrees = float(rotate_degrees)
        self.label_keys = tuple(label_keys)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        c, image, meta = self._crop, element["image"], element.get("meta") or {}
        index = int(element["index"])
        _check_2d(image, index)
        # Same draws in the same order as MultiScaleRandomCrop, rotation last.
        window = transforms.sample_crop_window(*image.shape, rng, c.crop_scale, c.crop_ratio)
        flip = c.hflip and rng.random() < 0.5
        degrees = (
            rng.uniform(-self.rotate_degrees, self.rotate_degrees) if self.rotate_degrees else 0
        )
        if degrees:
            crop = rotate_crop(image, window, degrees)
        else:
            top, left, h, w = window
            crop = image[top : top + h, left : left + w]
        x = transforms.resize_square(crop, self.image_size)
        if flip:
            x = cv2.flip(x, 1)
        out = {
            "image": transforms.normalize(
                x,
                max_value=transforms.intensity_max(image, meta),
                mean=c.mean,
                std=c.std,
                channels=c.channels,
            ),
            "index": np.int32(index),
        }
        out.update(record_labels(meta, index, self.label_keys))
        return out


class _ReadRecord:
    """Record index (within the split) -> {"image", "meta", "index"}, the image
    cut to its lesion when roi_context > 0. Holds the split's raw records and
    decoder, not the source, so that grain workers receive only what they read
    (see pipeline._decoded_records)."""

    def __init__(self, src: RecordSource, roi_context: float = 0.0, roi_min_px: int = 32):
        self.raw, self.decoder = src.records, src.decoder
        self.roi_context, self.roi_min_px = roi_context, roi_min_px

    def __call__(self, index: int) -> dict:
        image, meta = self.decoder.decode(self.raw[int(index)])
        if self.roi_context:
            _check_2d(image, int(index))
            image = transforms.roi_crop(image, meta, int(index), self.roi_context, self.roi_min_px)
        return {"image": image, "meta": meta, "index": int(index)}


# -------------------------------------------------------- class balancing


class BalancedDraws:
    """Stream position -> record index, for class-balanced epochs.

    Epoch e (positions [e*n, (e+1)*n)) is n draws with replacement, record i
    drawn with probability proportional to 1 / (records of i's class), so every
    class is equally likely per draw. The draws of epoch e come from
    default_rng([seed, e]) alone: the same whatever worker or thread asks.
    """

    _CACHED_EPOCHS = 4  # epochs in flight at once across a worker's threads

    def __init__(self, classes: np.ndarray, seed: int):
        classes = np.asarray(classes)
        _, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        self.probabilities = weights / weights.sum()
        self.seed = int(seed)
        self._draws = EpochCache(self._CACHED_EPOCHS)

    def __len__(self) -> int:
        return len(self.probabilities)

    def epoch(self, epoch: int) -> np.ndarray:
        """The record indices of one epoch, in stream order."""
        def draw():
            rng = np.random.default_rng([self.seed, int(epoch)])
            n = len(self)
            return rng.choice(n, size=n, replace=True, p=self.probabilities)

        return self._draws.get(epoch, draw)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(int(position), len(self))
        return int(self.epoch(epoch)[offset])


def _single_class_labels(src: RecordSource, key: str) -> np.ndarray:
    """meta[key] of every record, which must be one class (int, bool or str) each."""
    values = []
    for i in range(len(src)):
        meta = src.meta(i)
        if key not in meta:
            raise KeyError(
                f"record {i} has no label {key!r} to balance on (keys: {sorted(meta)}); "
                "set data.balanced_label to a key every record has, or None"
            )
        value = meta[key]
        if not isinstance(value, (int, str)):  # bool is an int
            raise TypeError(
                f"balanced_label {key!r} must be one class per record (int or str), record "
                f"{i} has {value!r}; multi-hot labels cannot be balanced by class, set "
                "data.balanced_label=None"
            )
        values.append(value)
    return np.asarray(values)


# --------------------------------------------------------------- datasets


def make_finetune_train_dataset(
    data_cfg: Any,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    label_keys: Sequence[str],
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
) -> grain.IterDataset:
    """Infinite, shuffled (or class-balanced), augmented batches of one split.

    Each element: {"image": float32 [B, S, S, C], "index": int32 [B] (record
    index within the split), "label_{k}": [B, ...] per key (int32 for integer
    labels, e.g. pathology [B], margins [B, 5])}, B = global_batch_size //
    process_count. The iterator's state is {"global_position": n} (see
    pipeline.ResumableBatches): the same batches after a restore whatever the
    worker or process count. Config keys read: see default_finetune_data_config.
    """
    pipeline.check_batching(data_cfg, global_batch_size, seed, process_index, process_count)

    src = split_source(data_cfg, split)
    pipeline.check_split_fills_batch(len(src), global_batch_size, split, "records")
    order_seed, augment_seed = pipeline.stream_seeds(seed)
    balanced_label = _get(data_cfg, "balanced_label", None)
    if balanced_label:
        draws = BalancedDraws(_single_class_labels(src, balanced_label), order_seed)
        indices = grain.MapDataset.range(sys.maxsize).map(draws)
    else:
        indices = grain.MapDataset.range(len(src)).shuffle(seed=order_seed).repeat()
    augment = FinetuneAugment(
        image_size,
        crop_scale=tuple(_get(data_cfg, "crop_scale", (0.5, 1.0))),
        crop_ratio=tuple(_get(data_cfg, "crop_ratio", (3 / 4, 4 / 3))),
        hflip=bool(_get(data_cfg, "hflip", True)),
        rotate_degrees=float(_get(data_cfg, "rotate_degrees", 0.0)),
        mean=float(data_cfg.norm_mean),
        std=float(data_cfg.norm_std),
        channels=int(_get(data_cfg, "channels", 1)),
        label_keys=label_keys,
    )
    stream = indices.map(_ReadRecord(src, *transforms.roi_settings(data_cfg))).random_map(
        augment, seed=augment_seed
    )

    return pipeline.batched(
        stream,
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def make_eval_batches(
    data_cfg: Any, split: str, *, image_size: int, batch_size: int, label_keys: Sequence[str]
) -> EvalBatches:
    """Every record of `split` once, in record order: the whole image resized to
    image_size (area averaging when shrinking, as MultiScaleResize), normalized
    as in training; the last batch padded to batch_size with valid=False rows.
    Decodes and resizes the split now (see the module docstring on memory)."""
    resize = eval_batches.eval_resize(data_cfg, image_size=image_size, batch_size=batch_size)
    read = _ReadRecord(split_source(data_cfg, split), *transforms.roi_settings(data_cfg))
    pixels, max_values, metas = eval_batches.resize_split(
        (_image_and_meta(read(i)) for i in range(len(read.raw))), resize
    )
    labels = [record_labels(meta, i, label_keys) for i, meta in enumerate(metas)]
    stacked = {}
    for k in (f"label_{k}" for k in label_keys):
        shapes = {v[k].shape for v in labels}
        if len(shapes) > 1:
            raise ValueError(
                f"{k} has different shapes across the {split!r} split ({sorted(shapes)}); "
                "every record needs the same label layout"
            )
        stacked[k] = np.stack([v[k] for v in labels])
    return EvalBatches(pixels, max_values, stacked, batch_size=batch_size, resize=resize)


def _image_and_meta(record: dict) -> tuple[np.ndarray, dict]:
    _check_2d(record["image"], record["index"])
    return record["image"], record["meta"]
