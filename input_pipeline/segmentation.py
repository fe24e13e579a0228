"""Segmentation input pipeline with hierarchical labels: few patients keep their
subclass (fine) masks, the others only the superclass (coarse) mask.

make_segmentation_train_dataset graph (per process), shaped like the other
training pipelines so the trainer checkpoints it the same way:

  stream position n -> record index       TwoStreamDraws: row n % B of global
                                          batch n // B is labelled when it is
                                          < labeled_per_batch, each stream its
                                          own reshuffled epochs
  .map(SliceReader)                       decode + check (segmentation_records)
  .random_map(SegmentationAugment)        rng seeded by GLOBAL stream position:
                                          HierarchicalMix, joint affine,
                                          intensity augmentation, normalisation
  -- pipeline.ResumableBatches: per-process slice, batch, threads, mp_prefetch --

so a batch's rows, their augmentation and their donors depend only on the
seed and the global position: the same batches after restoring the iterator
state ({"global_position": n}) and whatever the worker or process count.

Training batch (B rows per process, S = image_size, C = data.channels):
  image        float32 [B, S, S, C]  normalised (data.intensity_norm)
  label_fine   int32 [B, S, S]       fine classes; 0 on rows without has_fine
  label_coarse int32 [B, S, S]       coarse classes (from the fine mask via
                                     fine_to_coarse, or the coarse mask)
  has_fine     bool [B]              the row carries its fine mask
  mixed_image  float32 [B, S, S, C]  HierarchicalMix of a coarse-only row with
  mixed_label  int32 [B, S, S]       a labelled donor (hierarchical_mix.py);
  mix_alpha    float32 [B]           rows not mixed (labelled rows, no donor or
                                     target box, mix off): mixed_image = image,
                                     mixed_label = 0, mix_alpha = 0
  index        int32 [B]             record index within the split

Per row, in this order (all draws from the row's rng, in a fixed order):
  1. HierarchicalMix, for a coarse-only row when data.hierarchical_mix: a donor
     drawn uniformly among the labelled records that have a subclass pixel (the
     official generator draws among all labelled slices and leaves the row
     unmixed when the donor is empty), alpha from {0.5, ..., 1.0}; mixed at the
     stored resolution on [0, 1] intensities, before any augmentation, as the
     official generator mixes before its random crop.
  2. One random affine (geometry.sample_affine: the aspect-preserving fit to
     S x S, zoom in data.zoom (> 1 = random crop), rotation, shift, flips where
     data.hflip / data.vflip allow; none by default, the RV of a short-axis
     slice is on one side) applied to the image and the mixed image
     (bilinear) and to the fine, coarse and mixed labels (nearest).
  3. Intensity augmentation, the image's alone (the same draws for its mixed
     image): gamma on [0, 1] intensities, then the normalisation, then
     contrast, brightness and Gaussian noise in normalised units.
Normalisation (data.intensity_norm): "zscore" (default: per image and channel,
the mean and standard deviation of the S x S image the model sees; the mixed
image uses its target's statistics, so outside the paste it equals the image
exactly), "zscore_nonzero" (statistics over pixels > 0, zeros stay 0: for
skull-stripped brain MRI) or "fixed" (data.norm_mean / data.norm_std on [0, 1]
intensities, as the other pipelines).

Evaluation (make_segmentation_eval, segmentation_eval.py): every slice of a
split once, volume by volume, deterministic, with each slice's volume and
position and each volume's spacing at the model's resolution.

Splits: sources.resolve (phantoms split by patient); data.patient_split
re-splits a prepared root's patients (the 70 / 10 / 20 ACDC protocol; see
default_segmentation_data_config).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import sys
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np

from input_pipeline import (
    brain_phantom,
    cardiac_phantom,
    geometry,
    hierarchical_mix,
    pipeline,
    sources,
)
from input_pipeline import segmentation_records as seg_records
from input_pipeline.epoch_cache import EpochCache
from input_pipeline.record_source import RecordSource
from input_pipeline.segmentation_records import SegmentationDataError

INTENSITY_NORMS = ("zscore", "zscore_nonzero", "fixed")
# Records per patient of the segmentation phantoms, so a phantom is whole patients.
_PHANTOM_RECORDS_PER_PATIENT = {
    "cardiac_phantom": cardiac_phantom.RECORDS_PER_PATIENT,
    "brain_phantom": brain_phantom.RECORDS_PER_PATIENT,
}


def default_segmentation_data_config() -> ml_collections.ConfigDict:
    """pipeline.default_data_config() plus the segmentation settings read here
    (defaults: the cardiac phantom, ACDC's labels)."""
    c = pipeline.default_data_config()
    # "cardiac_phantom" | "brain_phantom" (rendered once under dir, split by
    # patient), "prepared" (tools/prepare_data.py --builder acdc / brats2021),
    # "shards", "tfds" (data.tfds.masks names the mask features).
    c.source = "cardiac_phantom"
    c.phantom_num_images = 640  # records: 16 per cardiac patient (40), 8 per brain patient
    c.phantom_size = 192  # stored side; 320 mm (cardiac) / 240 mm (brain) field of view
    c.phantom_split = (0.7, 0.1, 0.2)  # by patient, as ACDC's common protocol
    c.image_size = 128  # S: the model's input side (a task may pass model.image_size)
    c.channels = 1  # C: stored channels (4 for BraTS: FLAIR, T1, T1ce, T2); 3 from 1 replicates
    # Labels: fine class c's superclass (fine 0 -> coarse 0). ACDC (0 bg, 1 RV,
    # 2 myocardium, 3 LV) and BraTS (0 bg, 1 necrotic core, 2 oedema, 3 enhancing)
    # both have one superclass (heart, whole tumour): (0, 1, 1, 1).
    c.fine_to_coarse = (0, 1, 1, 1)
    # The stored mask value of each fine class; None = from the records' meta
    # "classes" (BraTS's file label 4 -> fine class 3; segmentation_records.py).
    c.mask_values = ml_collections.FieldReference(None, field_type=tuple)
    c.mask_key = "mask"  # extra array holding the fine mask
    # Extra array holding a coarse mask, for records without a fine one; None = none.
    c.coarse_mask_key = ml_collections.FieldReference(None, field_type=str)
    # Which train patients keep their fine masks (the rest keep only the
    # superclass mask): None = every patient (full supervision), a count (e.g.
    # 3), or a fraction in (0, 1) (e.g. 0.1, rounded, at least 1). Chosen per
    # patient, by fine_label_seed alone (not the training seed), so arms of an
    # experiment share it; a smaller count picks a subset of a larger one.
    c.fine_label_patients = ml_collections.FieldReference(None, field_type=object)
    c.fine_label_seed = 0
    # Labelled rows in every global batch (the official TwoStreamBatchSampler's
    # labeled_bs); None = half the batch. Ignored when every patient is labelled.
    c.labeled_per_batch = ml_collections.FieldReference(None, field_type=int)
    # False: train only on the patients that keep fine masks, the superclass-only
    # patients left out altogether (the "few fine labels and nothing else" baseline).
    c.use_coarse_only = True
    c.hierarchical_mix = True  # HierarchicalMix on coarse-only rows
    # Geometric augmentation (one affine moves image and masks together).
    c.zoom = (0.9, 1.25)  # log-uniform, > 1 zooms in (a random crop)
    c.rotate_degrees = 15.0
    c.translate = 0.08  # fraction of the image side
    c.hflip = False  # short-axis cardiac: the RV is on one side; True for brain MRI
    c.vflip = False
    # Intensity augmentation (image only; the masks are untouched).
    c.gamma = (0.8, 1.25)  # log-uniform exponent on [0, 1] intensities; (1, 1) = off
    c.contrast = (0.9, 1.1)  # factor in normalised units; (1, 1) = off
    c.brightness = 0.1  # shift uniform in [-b, b] normalised units; 0 = off
    c.noise_std = 0.05  # Gaussian noise sigma uniform in [0, noise_std]; 0 = off
    # "zscore" (per image and channel; MRI), "zscore_nonzero" (over pixels > 0:
    # skull-stripped brain MRI) or "fixed" (norm_mean / norm_std).
    c.intensity_norm = "zscore"
    # Meta keys: the patient (labelled subsets and splits are per patient), the
    # keys that together name a volume (absent ones are skipped: BraTS has no
    # phase), and the slice number (dotted path into meta).
    c.patient_key = "patient"
    c.volume_keys = ("patient", "phase")
    c.slice_key = "source_index.slice"
    # Spacing (mm) for records whose meta lacks it: "spacing" [row, col] and
    # "slice_spacing" (records ingested by tools/prepare_data.py carry no slice
    # spacing yet: set it for 3-D HD95 in mm). None = required from the records.
    c.pixel_spacing_mm = ml_collections.FieldReference(None, field_type=tuple)
    c.slice_spacing_mm = ml_collections.FieldReference(None, field_type=float)
    # Re-split patients of a prepared root: None = its own splits; (train, val,
    # test) fractions = pool the patients of `patient_split_pool` splits and cut
    # them by a salted hash of the patient, e.g. ACDC's common 70 / 10 / 20 of the
    # 100 training patients: patient_split=(0.7, 0.1, 0.2),
    # patient_split_pool=("train", "val") (the builder's train + val).
    c.patient_split = ml_collections.FieldReference(None, field_type=tuple)
    c.patient_split_pool = ("train", "val")
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ splits


def split_source(data_cfg: Any, split: str) -> RecordSource:
    """The records of one split: sources.resolve, or with data.patient_split the
    patients of data.patient_split_pool re-split (see the config)."""
    kind = sources.layout_name(data_cfg)
    per_patient = _PHANTOM_RECORDS_PER_PATIENT.get(kind)
    if per_patient and int(data_cfg.phantom_num_images) % per_patient:
        raise SegmentationDataError(
            f"data.phantom_num_images={data_cfg.phantom_num_images}: the {kind} renders "
            f"{per_patient} records per patient; use a multiple of {per_patient} (e.g. "
            f"{per_patient * 40} for 40 patients) so every patient is whole"
        )
    fractions = _get(data_cfg, "patient_split", None)
    if fractions is None:
        return sources.resolve(data_cfg, split)
    return _patient_resplit(data_cfg, tuple(float(f) for f in fractions), split)


def _patient_resplit(data_cfg: Any, fractions: tuple[float, ...], split: str) -> RecordSource:
    pool = tuple(_get(data_cfg, "patient_split_pool", ("train", "val")))
    parts = [sources.resolve(data_cfg, s) for s in pool]
    if any(p.paths is None or not p.is_whole for p in parts):
        raise SegmentationDataError(
            f"data.patient_split needs shard folders to pool (data.source='prepared'), not "
            f"{sources.layout_name(data_cfg)!r}; leave data.patient_split=None to use its splits"
        )
    paths = [path for p in parts for path in p.paths]
    root = parts[0].root
    pooled = RecordSource(
        grain.sources.ArrayRecordDataSource(paths),
        parts[0].decoder,
        where=f"the {'+'.join(pool)} splits of {root}",
        root=root,
        paths=paths,
    )
    key = str(_get(data_cfg, "patient_key", "patient"))
    patients = []
    for i in range(len(pooled)):
        meta = pooled.meta(i)
        if key not in meta:
            raise SegmentationDataError(
                f"record {i} of {pooled.where} has no {key!r} in its meta; data.patient_split "
                "splits by patient: set data.patient_key"
            )
        patients.append(str(meta[key]))
    names, of_record = np.unique(np.asarray(patients), return_inverse=True)
    # Sorted salted-hash patient ids: the split depends on the patients alone.
    chosen = sources.phantom_split_indices(len(names), fractions, split)
    indices = np.flatnonzero(np.isin(of_record, chosen))
    return pooled.subset(
        indices,
        where=f"{pooled.where}, patients re-split {fractions} ({split}: {len(chosen)} patients)",
    )


# ---------------------------------------------------------- the two streams


class TwoStreamDraws:
    """Stream position -> record index: row r of global batch g (n = g * B + r)
    is labelled when r < L. The labelled rows read the labelled records'
    stream at position g * L + r, the others the unlabelled stream at
    g * (B - L) + r - L; each stream is epochs of its records, epoch e
    permuted by default_rng([seed, stream, e]) alone (any worker or thread
    computes the same)."""

    _CACHED_EPOCHS = 4

    def __init__(self, labelled, unlabelled, *, global_batch_size: int, labelled_rows: int, seed):
        self.streams = (np.asarray(labelled, np.int64), np.asarray(unlabelled, np.int64))
        self.batch = int(global_batch_size)
        self.labelled_rows = int(labelled_rows)
        self.seed = int(seed)
        # keyed (stream, epoch); the oldest epoch goes first
        self._orders = EpochCache(2 * self._CACHED_EPOCHS, age=operator.itemgetter(1))

    def _epoch(self, stream: int, epoch: int) -> np.ndarray:
        def draw():
            rng = np.random.default_rng([self.seed, stream, int(epoch)])
            return self.streams[stream][rng.permutation(len(self.streams[stream]))]

        return self._orders.get((stream, epoch), draw)

    def __call__(self, position: int) -> int:
        batch, row = divmod(int(position), self.batch)
        if row < self.labelled_rows:
            stream, at = 0, batch * self.labelled_rows + row
        else:
            width = self.batch - self.labelled_rows
            stream, at = 1, batch * width + row - self.labelled_rows
        epoch, offset = divmod(at, len(self.streams[stream]))
        return int(self._epoch(stream, epoch)[offset])


# ---------------------------------------------------------------- per row


class IntensityNorm:
    """The normalisation of data.intensity_norm, fitted on one image and applied
    to it and to its mixed image alike."""

    def __init__(self, mode: str, mean: float = 0.0, std: float = 1.0):
        if mode not in INTENSITY_NORMS:
            raise SegmentationDataError(
                f"data.intensity_norm={mode!r} must be one of {INTENSITY_NORMS}"
            )
        if mode == "fixed" and not std > 0:
            raise SegmentationDataError(f"data.norm_std must be > 0, got {std}")
        self.mode, self.mean, self.std = mode, float(mean), float(std)

    def fit(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (shift, scale) of an (S, S, C) [0, 1] image."""
        channels = x.shape[-1]
        if self.mode == "fixed":
            shift = np.full(channels, self.mean, np.float32)
            return shift, np.full(channels, 1.0 / self.std, np.float32)
        # OpenCV's one-pass statistics: ~100x faster than numpy's mean + std.
        stats = []
        for c in range(channels):
            plane = np.ascontiguousarray(x[..., c])
            mask = (plane > 0).astype(np.uint8) if self.mode == "zscore_nonzero" else None
            mean, std = cv2.meanStdDev(plane, mask=mask)
            stats.append((mean[0, 0], std[0, 0]))
        mean, std = np.asarray(stats, np.float64).T
        return mean.astype(np.float32), (1.0 / np.maximum(std, 1e-6)).astype(np.float32)

    def apply(self, x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
        out = (x - shift) * scale
        if self.mode == "zscore_nonzero":
            out[x <= 0] = 0.0
        return out


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2 size, 2 size) unit Gaussian field; a row's noise is windows of
    it at drawn offsets (fresh Gaussian draws cost ~0.6 ms at 224 px, an eighth
    of a row's work)."""
    bank = np.random.default_rng(0x7015E).standard_normal((2 * size, 2 * size), np.float32)
    bank.flags.writeable = False
    return bank


def _noise(offsets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(S, S, C) unit noise: channel c is the bank's window at offsets[c]."""
    size, channels = shape[0], shape[-1]
    bank = _noise_bank(size)
    return np.stack(
        [bank[top : top + size, left : left + size] for top, left in offsets[:channels]], axis=-1
    )


def intensity_ranges(data_cfg: Any) -> dict:
    """data.gamma, contrast, brightness and noise_std, checked (0 / (1, 1) = off)."""
    def pair(key, default):
        lo, hi = (float(v) for v in _get(data_cfg, key, default))
        if not 0 < lo <= hi:
            raise SegmentationDataError(f"data.{key}=({lo}, {hi}) must satisfy 0 < lo <= hi")
        return lo, hi

    brightness, noise = (
        float(_get(data_cfg, "brightness", 0.0)),
        float(_get(data_cfg, "noise_std", 0.0)),
    )
    if brightness < 0 or noise < 0:
        raise SegmentationDataError(
            f"data.brightness={brightness} and data.noise_std={noise} must be >= 0 (0 = off)"
        )
    return dict(
        gamma=pair("gamma", (1.0, 1.0)),
        contrast=pair("contrast", (1.0, 1.0)),
        brightness=brightness,
        noise_std=noise,
    )


class SegmentationRows:
    """What training and evaluation share: the reader, the label spec, the
    placement at S x S, the normalisation and the channel count."""

    def __init__(self, reader: seg_records.SliceReader, data_cfg: Any, image_size: int):
        self.reader = reader
        self.spec = reader.spec
        self.image_size = int(image_size)
        if self.image_size < 8:
            raise SegmentationDataError(f"image_size must be >= 8, got {image_size}")
        self.channels = int(_get(data_cfg, "channels", 1))
        self.norm = IntensityNorm(
            str(_get(data_cfg, "intensity_norm", "zscore")),
            float(_get(data_cfg, "norm_mean", 0.0)),
            float(_get(data_cfg, "norm_std", 1.0)),
        )

    def check_channels(self, stored: int, name: str) -> None:
        if stored != self.channels and not (stored == 1 and self.channels == 3):
            raise SegmentationDataError(
                f"{name} has {stored} channel(s) but data.channels={self.channels}: set "
                f"data.channels={stored} (1 -> 3 replication is the only conversion)"
            )

    def finish(self, x: np.ndarray) -> np.ndarray:
        """(S, S, C_stored) normalised -> (S, S, data.channels) float32."""
        if x.shape[-1] != self.channels:  # 1 -> 3, checked
            x = np.repeat(x, self.channels, axis=-1)
        return np.ascontiguousarray(x, np.float32)


class SegmentationAugment(grain.transforms.RandomMap):
    """Record index within the train split -> one training row (module docstring)."""

    def __init__(
        self,
        rows: SegmentationRows,
        data_cfg: Any,
        *,
        labelled: np.ndarray,
        donors: np.ndarray,
    ):
        self.rows = rows
        self.labelled = frozenset(int(i) for i in labelled)
        self.donors = np.asarray(donors, np.int64)
        self.mix = bool(_get(data_cfg, "hierarchical_mix", True))
        self.affine = geometry.AffineAugment(
            zoom=tuple(_get(data_cfg, "zoom", (1.0, 1.0))),
            rotate_degrees=float(_get(data_cfg, "rotate_degrees", 0.0)),
            translate=float(_get(data_cfg, "translate", 0.0)),
            hflip=bool(_get(data_cfg, "hflip", False)),
            vflip=bool(_get(data_cfg, "vflip", False)),
        )
        self.ranges = intensity_ranges(data_cfg)

    def random_map(self, index: int, rng: np.random.Generator) -> dict:
        rows, size = self.rows, self.rows.image_size
        index = int(index)
        record = rows.reader(index)
        rows.check_channels(record.image.shape[-1], f"record {index}")
        has_fine = index in self.labelled
        # Every draw is made, in this order, whatever is switched off.
        donor_pick = int(rng.integers(max(len(self.donors), 1)))
        alpha = hierarchical_mix.sample_alpha(rng)
        matrix = geometry.sample_affine(record.coarse.shape, size, rng, self.affine)
        r = self.ranges
        gamma = float(np.exp(rng.uniform(*np.log(r["gamma"]))))
        contrast = float(rng.uniform(*r["contrast"]))
        brightness = float(rng.uniform(-1.0, 1.0) * r["brightness"])
        noise_std = float(rng.uniform(0.0, 1.0) * r["noise_std"])
        noise_at = rng.integers(0, size + 1, size=(record.image.shape[-1], 2))

        mixed = None
        if self.mix and not has_fine and len(self.donors):
            donor = rows.reader(int(self.donors[donor_pick]))
            mixed = hierarchical_mix.hierarchical_mix(
                record.image,
                record.coarse,
                donor.image,
                donor.fine,
                alpha=alpha,
                fine_to_coarse=rows.spec.fine_to_coarse,
            )
            if not mixed.alpha:
                mixed = None

        def intensity(x: np.ndarray, fitted=None):
            """Warp, gamma, normalise, contrast and brightness, noise; pixels the
            normalisation keeps at 0 (zscore_nonzero's background) stay 0."""
            x = geometry.warp_image(x, matrix, size)
            if gamma != 1.0:
                np.power(np.clip(x, 0.0, None, out=x), np.float32(gamma), out=x)
            shift, scale = fitted or rows.norm.fit(x)
            y = rows.norm.apply(x, shift, scale)
            y *= np.float32(contrast)
            y += np.float32(brightness)
            if noise is not None:
                y += noise
            if rows.norm.mode == "zscore_nonzero":
                y[x <= 0] = 0.0
            return y, (shift, scale)

        noise = None
        if noise_std:
            noise = _noise(noise_at, (size, size, record.image.shape[-1])) * np.float32(noise_std)
        image, fitted = intensity(record.image)
        out = {
            "image": rows.finish(image),
            "label_coarse": geometry.warp_mask(record.coarse, matrix, size).astype(np.int32),
            "has_fine": np.bool_(has_fine),
            "index": np.int32(index),
        }
        if has_fine:
            out["label_fine"] = geometry.warp_mask(record.fine, matrix, size).astype(np.int32)
        else:
            out["label_fine"] = np.zeros((size, size), np.int32)
        if mixed is None:
            out["mixed_image"] = out["image"].copy()
            out["mixed_label"] = np.zeros((size, size), np.int32)
            out["mix_alpha"] = np.float32(0.0)
        else:
            mixed_image, _ = intensity(mixed.image, fitted)
            out["mixed_image"] = rows.finish(mixed_image)
            out["mixed_label"] = geometry.warp_mask(mixed.label, matrix, size)
            out["mix_alpha"] = np.float32(mixed.alpha)
        return out


# --------------------------------------------------------------- datasets


def image_size_of(data_cfg: Any, image_size: int | None) -> int:
    size = image_size if image_size is not None else _get(data_cfg, "image_size", None)
    if size is None:
        raise SegmentationDataError("set data.image_size (or pass image_size)")
    return int(size)


def labelled_rows(data_cfg: Any, global_batch_size: int, subset: seg_records.FineSubset) -> int:
    """Labelled rows per global batch: data.labeled_per_batch (None = half),
    every row when no patient is coarse-only; checked against the batch."""
    requested = _get(data_cfg, "labeled_per_batch", None)
    value = global_batch_size // 2 if requested is None else int(requested)
    if not 0 <= value <= global_batch_size:
        raise SegmentationDataError(
            f"data.labeled_per_batch={value} must be in [0, global batch {global_batch_size}]"
        )
    if len(subset.unlabelled) == 0:
        return global_batch_size
    if value > 0 and len(subset.labelled) == 0:
        raise SegmentationDataError(
            f"data.labeled_per_batch={value} labelled rows per batch, but no patient keeps fine "
            f"masks (data.fine_label_patients={_get(data_cfg, 'fine_label_patients')!r}): set "
            "data.labeled_per_batch=0 for superclass-only training, or label some patients"
        )
    if value == global_batch_size and len(subset.unlabelled):
        raise SegmentationDataError(
            f"data.labeled_per_batch={value} fills the whole batch, so the "
            f"{len(subset.unlabelled)} coarse-only records would never be read; lower it"
        )
    return value


def make_segmentation_train_dataset(
    data_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    plan: TrainingPlan | None = None,
) -> pipeline.ResumableBatches:
    """Infinite training batches of `split` in the format of the module
    docstring (B = global_batch_size // process_count rows per process). The
    iterator's state is {"global_position": n}. Reads and checks every record
    of the split first (errors name the record or patient and the fix), unless
    given the `plan_training` of the same settings."""
    pipeline.check_batching(data_cfg, global_batch_size, seed, process_index, process_count)
    if plan is None:
        plan = plan_training(data_cfg, global_batch_size=global_batch_size, split=split)
    rows = SegmentationRows(plan.reader, data_cfg, image_size_of(data_cfg, image_size))
    order_seed, augment_seed = pipeline.stream_seeds(seed)
    draws = TwoStreamDraws(
        plan.subset.labelled,
        plan.subset.unlabelled,
        global_batch_size=global_batch_size,
        labelled_rows=plan.labelled_rows,
        seed=order_seed,
    )
    augment = SegmentationAugment(
        rows, data_cfg, labelled=plan.subset.labelled, donors=plan.subset.donors
    )
    stream = grain.MapDataset.range(sys.maxsize).map(draws).random_map(augment, seed=augment_seed)
    return pipeline.batched(
        stream,
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


class TrainingPlan:
    """The checked train split: its reader, index, fine subset and labelled rows."""

    def __init__(self, reader, index, subset, labelled_rows_per_batch):
        self.reader: seg_records.SliceReader = reader
        self.index: seg_records.SplitIndex = index
        self.subset: seg_records.FineSubset = subset
        self.labelled_rows: int = labelled_rows_per_batch

    def summary(self) -> str:
        return seg_records.describe(self.subset, self.index)


def plan_training(data_cfg: Any, *, global_batch_size: int, split: str = "train") -> TrainingPlan:
    """Resolves, reads and checks the training split and chooses its fine
    subset, without building a pipeline (tasks log it; tests inspect it)."""
    src = split_source(data_cfg, split)
    pipeline.check_split_fills_batch(len(src), global_batch_size, split, "slices")
    spec = seg_records.label_spec(data_cfg, src)
    reader = seg_records.SliceReader(
        src, spec, patient_key=str(_get(data_cfg, "patient_key", "patient"))
    )
    index = seg_records.scan_split(reader, data_cfg)
    subset = seg_records.choose_fine_subset(
        index,
        _get(data_cfg, "fine_label_patients", None),
        int(_get(data_cfg, "fine_label_seed", 0)),
    )
    if not _get(data_cfg, "use_coarse_only", True):
        subset = dataclasses.replace(subset, unlabelled=subset.unlabelled[:0])
    if _get(data_cfg, "hierarchical_mix", True) and len(subset.unlabelled) and len(subset.labelled):
        if len(subset.donors) == 0:
            raise SegmentationDataError(
                f"data.hierarchical_mix is on but none of the {len(subset.labelled)} labelled "
                f"records (patients {subset.patients[:5]}) has a subclass pixel to paste; label "
                "other patients (data.fine_label_seed) or set data.hierarchical_mix=False"
            )
    return TrainingPlan(reader, index, subset, labelled_rows(data_cfg, global_batch_size, subset))
