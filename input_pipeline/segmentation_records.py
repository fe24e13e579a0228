"""Segmentation records: what a slice's masks mean, reading them checked, the
scan of a split (patients, volumes, slices, spacing), and the per-patient
choice of which patients keep their subclass masks.

Labels (the conventions the model and the loss share):
  fine    0 background, 1..F-1 the subclasses; F = len(data.fine_to_coarse).
  coarse  0 background, 1..K the superclasses; fine class c belongs to
          superclass data.fine_to_coarse[c] (fine 0 -> coarse 0).
Stored masks are mapped to fine classes by their stored values: data.mask_values
(the stored value of each fine class, in class order) or, when None, the
records' meta "classes": a list (ACDC: background, rv, myocardium, lv) means
the values 0..F-1, a dict keyed by stored value (BraTS: "0", "1", "2", "4")
means its keys in ascending order, so BraTS's file label 4 becomes fine class
3. A record with neither a fine mask (data.mask_key) nor, when
data.coarse_mask_key is set, a coarse mask is an error; a coarse mask's values
are coarse classes already.

Every error names the record (its index within the split and its patient),
the problem and the fix, and is raised when the pipeline is built, before any
training step (the masks of every scanned record are checked for values and
size then; see SplitIndex), and again per record as it is read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from input_pipeline import transforms
from input_pipeline.record_source import DataSourceError, RecordSource


class SegmentationDataError(DataSourceError):
    """Segmentation records or settings that cannot be used as configured; the
    message names the record or patient, the problem and the fix."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ labels


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How stored masks become fine and coarse class maps."""

    fine_to_coarse: tuple[int, ...]
    mask_values: tuple[int, ...]  # stored value of fine class 0, 1, ..., F-1
    mask_key: str = "mask"
    coarse_mask_key: str | None = None

    @property
    def num_fine(self) -> int:
        return len(self.fine_to_coarse)

    @property
    def num_coarse(self) -> int:
        """K + 1: background and the K superclasses."""
        return max(self.fine_to_coarse) + 1

    def value_lut(self, max_value: int) -> np.ndarray:
        """Stored value -> fine class, -1 for values no class declares."""
        lut = np.full(max(max_value, max(self.mask_values)) + 1, -1, np.int16)
        lut[list(self.mask_values)] = np.arange(self.num_fine, dtype=np.int16)
        return lut


def check_fine_to_coarse(fine_to_coarse: Sequence[int]) -> tuple[int, ...]:
    f2c = tuple(int(v) for v in fine_to_coarse)
    if len(f2c) < 2 or f2c[0] != 0 or min(f2c[1:]) < 1:
        raise SegmentationDataError(
            f"data.fine_to_coarse={f2c} must give background (fine 0) coarse class 0 and "
            "every subclass a superclass >= 1, e.g. (0, 1, 1, 1) for ACDC or BraTS"
        )
    if sorted(set(f2c)) != list(range(max(f2c) + 1)):
        raise SegmentationDataError(
            f"data.fine_to_coarse={f2c}: the superclasses must be numbered 1..K without "
            f"gaps (found {sorted(set(f2c))})"
        )
    return f2c


def values_from_classes(classes: Any, num_fine: int, where: str) -> tuple[int, ...]:
    """The stored mask value of each fine class, from a record's meta "classes"."""
    if isinstance(classes, dict):
        try:
            values = tuple(sorted(int(k) for k in classes))
        except ValueError:
            raise SegmentationDataError(
                f"{where}: meta 'classes' keys {sorted(classes)} are not mask values; set "
                "data.mask_values to the stored value of each fine class"
            ) from None
    elif isinstance(classes, (list, tuple)):
        values = tuple(range(len(classes)))
    else:
        values = tuple(range(num_fine))
    if len(values) != num_fine:
        raise SegmentationDataError(
            f"{where}: its meta 'classes' ({classes}) declares {len(values)} classes but "
            f"data.fine_to_coarse has {num_fine}; give every stored class a superclass in "
            "data.fine_to_coarse, or set data.mask_values"
        )
    return values


def label_spec(data_cfg: Any, src: RecordSource) -> LabelSpec:
    """The LabelSpec of `data_cfg`, its mask values from data.mask_values or the
    first record's meta "classes"."""
    f2c = check_fine_to_coarse(data_cfg.fine_to_coarse)
    values = _get(data_cfg, "mask_values", None)
    if values is None:
        values = values_from_classes(
            src.meta(0).get("classes"), len(f2c), f"record 0 of {src.where}"
        )
    values = tuple(int(v) for v in values)
    if len(values) != len(f2c) or len(set(values)) != len(values) or min(values) < 0:
        raise SegmentationDataError(
            f"data.mask_values={values} must be {len(f2c)} distinct non-negative stored "
            f"values, one per fine class of data.fine_to_coarse={f2c}"
        )
    if values[0] != 0:
        raise SegmentationDataError(
            f"data.mask_values={values}: background (fine class 0) must be stored as 0"
        )
    coarse_key = _get(data_cfg, "coarse_mask_key", None)
    return LabelSpec(f2c, values, str(_get(data_cfg, "mask_key", "mask")), coarse_key)


# ------------------------------------------------------------------ records


@dataclasses.dataclass
class SliceRecord:
    """One decoded, checked segmentation record.

    image: float32 (H, W, C) intensities in [0, 1]; fine: uint8 (H, W) fine
    classes or None (no fine mask); coarse: uint8 (H, W) coarse classes.
    """

    image: np.ndarray
    fine: np.ndarray | None
    coarse: np.ndarray
    meta: dict


def record_name(index: int, meta: dict, patient_key: str = "patient") -> str:
    patient = meta.get(patient_key)
    return f"record {index}" + (f" (patient {patient})" if patient is not None else "")


class SliceReader:
    """Index within the split -> SliceRecord, decoded and checked. Holds the
    split's raw records and decoder (picklable for grain's workers)."""

    def __init__(self, src: RecordSource, spec: LabelSpec, *, patient_key: str = "patient"):
        self.raw, self.decoder = src.records, src.decoder
        self.where = src.where
        self.spec = spec
        self.patient_key = patient_key
        self._luts: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.raw)

    def __call__(self, index: int) -> SliceRecord:
        image, meta, extras = self.decoder.decode_with_extras(self.raw[int(index)])
        return self.check(int(index), image, meta, extras)

    def _lut(self, dtype: np.dtype) -> np.ndarray:
        top = int(np.iinfo(dtype).max)
        if top not in self._luts:
            self._luts[top] = self.spec.value_lut(top)
        return self._luts[top]

    def check(self, index: int, image: np.ndarray, meta: dict, extras: dict) -> SliceRecord:
        name = f"{record_name(index, meta, self.patient_key)} of {self.where}"
        if image.ndim == 3 and "channels" not in meta:
            raise SegmentationDataError(
                f"{name} is a {image.shape} volume; segmentation reads 2-D slices (a "
                "modality stack names its 'channels' in meta): ingest volumes as slices "
                "(tools/prepare_data.py, NIfTI option nifti_mode=slices)"
            )
        height, width = image.shape[-2:]
        fine = coarse = None
        spec = self.spec
        if spec.mask_key in extras:
            stored = extras[spec.mask_key]
            self._check_shape(name, spec.mask_key, stored, (height, width))
            mapped = self._lut(stored.dtype)[stored]
            if mapped.min() < 0:
                bad = sorted(set(np.unique(stored[mapped < 0]).tolist()))
                raise SegmentationDataError(
                    f"{name}: mask {spec.mask_key!r} holds values {bad[:10]} that no fine class "
                    f"declares (stored values {list(spec.mask_values)} -> fine classes "
                    f"0..{spec.num_fine - 1}); fix the masks, or set data.mask_values / "
                    "data.fine_to_coarse to cover them"
                )
            fine = mapped.astype(np.uint8)
            coarse = np.asarray(spec.fine_to_coarse, np.uint8)[fine]
        elif spec.coarse_mask_key is not None and spec.coarse_mask_key in extras:
            coarse = extras[spec.coarse_mask_key]
            self._check_shape(name, spec.coarse_mask_key, coarse, (height, width))
            if int(coarse.max()) >= spec.num_coarse:
                raise SegmentationDataError(
                    f"{name}: coarse mask {spec.coarse_mask_key!r} holds value "
                    f"{int(coarse.max())}, beyond the {spec.num_coarse - 1} superclasses of "
                    f"data.fine_to_coarse={spec.fine_to_coarse}; fix the masks or the setting"
                )
            coarse = coarse.astype(np.uint8)
        else:
            keys = [spec.mask_key] + ([spec.coarse_mask_key] if spec.coarse_mask_key else [])
            raise SegmentationDataError(
                f"{name} has no mask {' or '.join(repr(k) for k in keys)} (it has "
                f"{sorted(extras) or 'none'}): ingest the split with its masks (a manifest's "
                "mask column, or the builder's ground truth), or set data.mask_key / "
                "data.coarse_mask_key to the mask names it has"
            )
        if image.ndim == 3:  # (C, H, W) modalities -> (H, W, C); cv2.merge is ~3x numpy
            image = cv2.merge(list(image)) if len(image) > 1 else image[0]
        x = image.astype(np.float32)
        x *= np.float32(1.0 / transforms.intensity_max(image, meta))
        return SliceRecord(x if x.ndim == 3 else x[..., None], fine, coarse, meta)

    @staticmethod
    def _check_shape(name: str, key: str, mask: np.ndarray, shape: tuple[int, int]) -> None:
        if mask.shape != shape:
            raise SegmentationDataError(
                f"{name}: mask {key!r} is {mask.shape}, its image is {shape}; masks must have "
                "the image's size (re-ingest the record: tools/prepare_data.py maps masks "
                "with their image)"
            )


# ------------------------------------------------------------------ scan


@dataclasses.dataclass
class SplitIndex:
    """Per record of a split (arrays indexed by record index within the split):
    its patient, volume, slice number, whether it has a fine mask and whether
    that mask has any subclass pixel, its (H, W), pixel spacing (row, col mm)
    and slice spacing (mm, NaN when unknown)."""

    patients: np.ndarray  # str
    volumes: np.ndarray  # str, e.g. "cardiac-0003/ED"
    slices: np.ndarray  # int
    has_fine: np.ndarray  # bool
    has_foreground: np.ndarray  # bool: fine mask with a pixel > 0
    shapes: np.ndarray  # int (N, 2)
    spacing: np.ndarray  # float (N, 2)
    slice_spacing: np.ndarray  # float (N,)

    def __len__(self) -> int:
        return len(self.patients)


def _nested(meta: dict, dotted: str):
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _scan_one(reader: SliceReader, data_cfg: Any, index: int) -> tuple:
    record = reader(index)
    meta = record.meta
    patient_key = reader.patient_key
    if patient_key not in meta:
        raise SegmentationDataError(
            f"record {index} of {reader.where} has no {patient_key!r} in its meta (keys: "
            f"{sorted(meta)}): labelled subsets and evaluation volumes are per patient; set "
            "data.patient_key to the meta key naming the patient (for TFDS, map a feature to it "
            "in data.tfds.labels)"
        )
    keys = tuple(_get(data_cfg, "volume_keys", ("patient", "phase")))
    volume = "/".join(str(meta[k]) for k in keys if k in meta)
    slice_value = _nested(meta, str(_get(data_cfg, "slice_key", "source_index.slice")))
    spacing = meta.get("spacing") or _get(data_cfg, "pixel_spacing_mm", None)
    slice_spacing = meta.get("slice_spacing", meta.get("slice_thickness"))
    if slice_spacing is None:
        slice_spacing = _get(data_cfg, "slice_spacing_mm", None)
    h, w = record.coarse.shape
    return (
        str(meta[patient_key]),
        volume,
        -1 if slice_value is None else int(slice_value),
        record.fine is not None,
        record.fine is not None and bool(record.fine.any()),
        (h, w),
        (math.nan, math.nan) if spacing is None else tuple(float(v) for v in spacing),
        math.nan if slice_spacing is None else float(slice_spacing),
    )


def scan_split(reader: SliceReader, data_cfg: Any, *, threads: int = 8) -> SplitIndex:
    """Reads and checks every record of a split (masks' values and sizes
    included) and indexes it; reading dominates, so threads overlap it."""
    n = len(reader)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, n))) as pool:
        rows = list(pool.map(lambda i: _scan_one(reader, data_cfg, i), range(n)))
    columns = list(zip(*rows))
    return SplitIndex(
        patients=np.asarray(columns[0], dtype=str),
        volumes=np.asarray(columns[1], dtype=str),
        slices=np.asarray(columns[2], np.int64),
        has_fine=np.asarray(columns[3], bool),
        has_foreground=np.asarray(columns[4], bool),
        shapes=np.asarray(columns[5], np.int64).reshape(n, 2),
        spacing=np.asarray(columns[6], np.float64).reshape(n, 2),
        slice_spacing=np.asarray(columns[7], np.float64),
    )


# ------------------------------------------------------------ fine subset


def fine_patient_count(request: Any, available: int) -> int:
    """How many patients data.fine_label_patients asks for, out of `available`:
    None = all; an integer (or a whole float >= 1) = that many; a fraction in
    (0, 1) = that share, rounded, at least 1."""
    if request is None:
        return available
    if isinstance(request, bool) or not isinstance(request, (int, float)):
        raise SegmentationDataError(
            f"data.fine_label_patients={request!r} must be None (every patient), a count "
            "(e.g. 7) or a fraction in (0, 1) (e.g. 0.1)"
        )
    if isinstance(request, float) and 0 < request < 1:
        return max(1, round(request * available))
    if request < 0 or (isinstance(request, float) and not request.is_integer()):
        raise SegmentationDataError(
            f"data.fine_label_patients={request!r} must be a count >= 0 or a fraction in (0, 1)"
        )
    return int(request)


def select_fine_patients(patients: Sequence[str], request: Any, seed: int) -> list[str]:
    """The patients that keep their fine masks: the first k of a seeded
    permutation of the sorted patient names, so the choice depends only on the
    patients, k and the seed, and a smaller k picks a subset of a larger one."""
    names = sorted(set(patients))
    k = fine_patient_count(request, len(names))
    if k > len(names):
        raise SegmentationDataError(
            f"data.fine_label_patients={request!r} asks for {k} patients with fine masks, but "
            f"the train split has {len(names)} patients with fine masks on every slice; ask for "
            f"at most {len(names)}, or a fraction"
        )
    order = np.random.default_rng([int(seed), 0xF17E]).permutation(len(names))
    return sorted(names[i] for i in order[:k])


@dataclasses.dataclass
class FineSubset:
    """Which records of the train split keep their fine masks."""

    patients: list[str]  # the chosen patients
    labelled: np.ndarray  # record indices (within the split) with fine masks kept
    unlabelled: np.ndarray  # the others: superclass masks only
    donors: np.ndarray  # labelled records with a subclass pixel (HierarchicalMix donors)


def choose_fine_subset(index: SplitIndex, request: Any, seed: int) -> FineSubset:
    """Per-patient choice of the records that keep their fine masks (see
    select_fine_patients); patients missing a fine mask on any slice cannot be
    chosen. Asking for more than there are is an error naming the patients."""
    names, of_record = np.unique(index.patients, return_inverse=True)
    complete_mask = np.ones(len(names), bool)
    np.logical_and.at(complete_mask, of_record, index.has_fine)
    complete = [str(p) for p in names[complete_mask]]
    partial = sorted(str(p) for p in names[~complete_mask])
    try:
        chosen = select_fine_patients(complete, request, seed)
    except SegmentationDataError as e:
        if partial:
            raise SegmentationDataError(
                f"{e} ({len(partial)} patients lack a fine mask on some slice, e.g. {partial[:5]})"
            ) from None
        raise
    in_subset = np.isin(index.patients, chosen)
    labelled = np.flatnonzero(in_subset)
    return FineSubset(
        patients=chosen,
        labelled=labelled,
        unlabelled=np.flatnonzero(~in_subset),
        donors=labelled[index.has_foreground[labelled]],
    )


def describe(subset: FineSubset, index: SplitIndex) -> str:
    """One line for the log: how many patients and records keep fine masks."""
    return json.dumps(
        {
            "patients": len(np.unique(index.patients)),
            "fine_patients": len(subset.patients),
            "fine_records": len(subset.labelled),
            "coarse_only_records": len(subset.unlabelled),
        }
    )
