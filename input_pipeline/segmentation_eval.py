"""Segmentation evaluation data: every slice of a split once, volume by volume,
with what an evaluator needs to re-stack slices into 3-D volumes and score
them in millimetres.

Order: volumes sorted by name (data.volume_keys joined by "/": ACDC
"patient/phase", BraTS "patient"), slices by their slice number
(data.slice_key). Batch i holds eval rows [i * B, (i + 1) * B); the last batch
is padded with valid=False rows.

Batch (B = batch_size, S = image_size):
  image         float32 [B, S, S, C]  the whole slice fitted into S x S (aspect
                                      kept, centred, 0-padded; geometry.fit_matrix),
                                      normalised as in training, no augmentation
  label_fine    int32 [B, S, S]       fine classes at the model resolution (0
                                      where has_fine is False and on padding)
  label_coarse  int32 [B, S, S]       coarse classes at the model resolution
  has_fine      bool [B]              the slice has a fine mask
  valid         bool [B]              False on padding rows
  index         int32 [B]             record index within the split (-1: padding)
  volume        int32 [B]             index into `volumes` (-1: padding)
  slice         int32 [B]             position within its volume, 0..D-1 (-1: padding)

Ground truth is at the MODEL resolution (S x S, masks placed by nearest
neighbour with the image's own transform), so predictions (argmax of the
model's S x S logits) compare with it directly, and `Volume.spacing` is the
spacing of those S x S pixels: (dz, dy, dx) mm, dy and dx the stored pixel
spacing divided by the fit's scale S / max(H, W), dz the slice spacing. An
evaluator that wants the stored resolution instead maps predictions back with
geometry.invert(geometry.fit_matrix((H, W), S)) (nearest), the inverse of the
placement, and uses the records' own masks and spacing.

Slices whose number is missing from a volume (blank slices rejected at
ingestion) are closed up: slice d + 1 follows d at dz.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from input_pipeline import geometry
from input_pipeline import segmentation_records as seg_records
from input_pipeline.segmentation import SegmentationRows, image_size_of, split_source
from input_pipeline.segmentation_records import SegmentationDataError


@dataclasses.dataclass(frozen=True)
class Volume:
    """One 3-D volume of the eval set: eval rows [start, start + num_slices)."""

    name: str  # e.g. "cardiac-0003/ED"
    patient: str
    start: int
    num_slices: int
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm of the model-resolution voxels
    record_indices: np.ndarray  # record index within the split, per slice in order
    slice_numbers: np.ndarray  # the records' own slice numbers, per slice in order


class SegmentationEvalSet(Sequence):
    """One deterministic pass over a split's slices in padded batches (module
    docstring); records are read and transformed on access, so a large split
    costs no memory and every pass gives the same arrays."""

    def __init__(self, rows: SegmentationRows, index: seg_records.SplitIndex, *, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = int(batch_size)
        self.volumes, self.order = _volumes(index, rows.image_size)
        self.has_fine = index.has_fine[self.order]
        volume_of_row = np.repeat(
            np.arange(len(self.volumes)), [v.num_slices for v in self.volumes]
        )
        self._volume = volume_of_row.astype(np.int32)
        self._slice = np.concatenate([np.arange(v.num_slices) for v in self.volumes]).astype(
            np.int32
        )

    @property
    def num_slices(self) -> int:
        return len(self.order)

    def __len__(self) -> int:
        return math.ceil(self.num_slices / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} out of range for {len(self)} batches")
        start = (i % len(self)) * self.batch_size
        stop = min(start + self.batch_size, self.num_slices)
        size, channels, b = self.rows.image_size, self.rows.channels, self.batch_size
        batch = {
            "image": np.zeros((b, size, size, channels), np.float32),
            "label_fine": np.zeros((b, size, size), np.int32),
            "label_coarse": np.zeros((b, size, size), np.int32),
            "has_fine": np.zeros(b, bool),
            "valid": np.arange(b) < stop - start,
            "index": np.full(b, -1, np.int32),
            "volume": np.full(b, -1, np.int32),
            "slice": np.full(b, -1, np.int32),
        }
        for row, position in enumerate(range(start, stop)):
            image, fine, coarse = self.slice_arrays(position)
            batch["image"][row] = image
            batch["label_coarse"][row] = coarse
            if fine is not None:
                batch["label_fine"][row] = fine
                batch["has_fine"][row] = True
            batch["index"][row] = self.order[position]
            batch["volume"][row] = self._volume[position]
            batch["slice"][row] = self._slice[position]
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def slice_arrays(self, position: int):
        """(image (S, S, C) float32, fine (S, S) int32 or None, coarse (S, S)
        int32) of eval row `position`."""
        rows = self.rows
        index = int(self.order[position])
        record = rows.reader(index)
        rows.check_channels(record.image.shape[-1], f"record {index}")
        matrix = geometry.fit_matrix(record.coarse.shape, rows.image_size)
        x = geometry.warp_image(record.image, matrix, rows.image_size)
        image = rows.finish(rows.norm.apply(x, *rows.norm.fit(x)))
        coarse = geometry.warp_mask(record.coarse, matrix, rows.image_size).astype(np.int32)
        fine = None
        if record.fine is not None:
            fine = geometry.warp_mask(record.fine, matrix, rows.image_size).astype(np.int32)
        return image, fine, coarse

    def stack(self, per_slice: np.ndarray) -> list[np.ndarray]:
        """Per-slice arrays in eval order ([num_slices, ...], e.g. the valid rows
        of every batch's predictions concatenated) -> one [D, ...] array per volume."""
        per_slice = np.asarray(per_slice)
        if len(per_slice) != self.num_slices:
            raise ValueError(
                f"got {len(per_slice)} slices, the eval set has {self.num_slices} (drop the "
                "padding rows: batch['valid'])"
            )
        return [per_slice[v.start : v.start + v.num_slices] for v in self.volumes]

    def volume_labels(self, v: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Ground truth of volume `v` at the model resolution: (fine [D, S, S] int32,
        or None when a slice lacks its fine mask; coarse [D, S, S] int32)."""
        volume = self.volumes[v]
        slices = [
            self.slice_arrays(p) for p in range(volume.start, volume.start + volume.num_slices)
        ]
        coarse = np.stack([s[2] for s in slices])
        fines = [s[1] for s in slices]
        fine = None if any(f is None for f in fines) else np.stack(fines)
        return fine, coarse

    def __repr__(self) -> str:
        return (
            f"SegmentationEvalSet({self.num_slices} slices, {len(self.volumes)} volumes, "
            f"{len(self)} x {self.batch_size})"
        )


def _volumes(index: seg_records.SplitIndex, image_size: int) -> tuple[list[Volume], np.ndarray]:
    volumes, order = [], []
    for name in sorted(set(index.volumes.tolist())):
        members = np.flatnonzero(index.volumes == name)
        numbers = index.slices[members]
        if (numbers >= 0).all():
            if len(set(numbers.tolist())) != len(numbers):
                raise SegmentationDataError(
                    f"volume {name!r} has slice numbers {sorted(numbers.tolist())} with repeats: "
                    "two volumes share its name; add the meta key that tells them apart to "
                    "data.volume_keys"
                )
            members = members[np.argsort(numbers, kind="stable")]
        shapes = {tuple(s) for s in index.shapes[members].tolist()}
        spacings = {tuple(s) for s in index.spacing[members].tolist()}
        if len(shapes) > 1 or len(spacings) > 1:
            raise SegmentationDataError(
                f"volume {name!r} mixes slice sizes {sorted(shapes)} or spacings "
                f"{sorted(spacings)}; its slices cannot be stacked: check data.volume_keys"
            )
        (h, w), (row_mm, col_mm) = shapes.pop(), spacings.pop()
        dz = float(index.slice_spacing[members[0]])
        if math.isnan(row_mm):
            raise SegmentationDataError(
                f"volume {name!r} has no pixel spacing in its records' meta ('spacing'); HD95 "
                "in mm needs it: set data.pixel_spacing_mm=(ROW_MM, COL_MM)"
            )
        if math.isnan(dz):
            raise SegmentationDataError(
                f"volume {name!r} has no slice spacing in its records' meta ('slice_spacing'; "
                "records ingested by tools/prepare_data.py do not store it yet); 3-D HD95 in mm "
                "needs it: set data.slice_spacing_mm (e.g. 10 for ACDC's usual spacing)"
            )
        scale = image_size / max(h, w)
        volumes.append(
            Volume(
                name=name,
                patient=str(index.patients[members[0]]),
                start=len(order),
                num_slices=len(members),
                spacing=(dz, row_mm / scale, col_mm / scale),
                record_indices=members,
                slice_numbers=index.slices[members],
            )
        )
        order.extend(members.tolist())
    return volumes, np.asarray(order, np.int64)


def make_segmentation_eval(
    data_cfg: Any, split: str, *, batch_size: int, image_size: int | None = None
) -> SegmentationEvalSet:
    """Every slice of `split` ("val" / "test") once, volume by volume (module
    docstring). Reads and checks every record of the split now."""
    src = split_source(data_cfg, split)
    spec = seg_records.label_spec(data_cfg, src)
    reader = seg_records.SliceReader(
        src, spec, patient_key=str(getattr(data_cfg, "patient_key", "patient"))
    )
    rows = SegmentationRows(reader, data_cfg, image_size_of(data_cfg, image_size))
    index = seg_records.scan_split(reader, data_cfg)
    return SegmentationEvalSet(rows, index, batch_size=batch_size)
