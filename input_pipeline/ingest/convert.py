"""One manifest row -> encoded, de-identified records (runs in a worker process).

Per row: `readers.read_frames` -> per frame `preprocess.to_unit_interval` ->
`preprocess.resize_and_pad` -> one record: uint16 image, meta = whitelisted
technical attributes + bits_stored 16, spacing and geometry after resizing, the
salted patient hash, split, source_index (frame / slice / time within the file),
source_id (salted hash of the relative path) + the row's labels at top level +
report + landmarks mapped to output pixels (+ "channels": the names, for
multi-channel rows stacked as C x H x W); extras = masks mapped with the same
geometry. Nothing else from a header or the file path reaches a shard. A row
option "spacing" = [row_mm, col_mm] sets the source spacing (for files without
one, e.g. BMP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from input_pipeline import records
from input_pipeline.ingest.manifest import ManifestRow

# Technical attributes a reader may hand over (readers.Frame.attrs); anything
# else is dropped here as a second line of defence.
FRAME_ATTRS = frozenset(
    {
        "modality",
        "view",
        "laterality",
        "photometric",
        "bits_stored_source",
        "manufacturer_model",
        "burned_in_annotation",
    }
)
# Meta keys the engine sets itself; a label with one of these names is an error.
TECHNICAL_KEYS = FRAME_ATTRS | {
    "bits_stored",
    "spacing",
    "slice_spacing",
    "geometry",
    "patient",
    "split",
    "source_index",
    "source_id",
    "report",
    "landmarks",
    "channels",
}
_MAX_REASON = 300  # characters of an unexpected exception's message kept


@dataclasses.dataclass
class RowTask:
    """One row's work, picklable for a spawned worker."""

    row: ManifestRow
    split: str
    patient: str  # salted hash
    source_id: str
    size: int | None
    window: Any


class _RowError(Exception):
    """A problem that rejects the whole row, raised where a frame-level
    `RejectedInput` would only skip one frame."""


def convert_row(task: RowTask) -> tuple[list[bytes], list[dict]]:
    """(encoded records, rejections) of one row. Never raises for bad input:
    every problem, unexpected exceptions included, becomes a rejection
    {"reason"[, "frame"]}. A frame that cannot be windowed (constant, NaN/Inf)
    rejects that frame only (blank slices of a volume); anything else rejects
    the whole row."""
    from input_pipeline.ingest import readers  # pylint: disable=g-import-not-at-top

    try:
        with warnings.catch_warnings():
            # pydicom's validation warnings quote header values: keep them off the logs.
            warnings.simplefilter("ignore")
            return _convert_row(task)
    except (readers.RejectedInput, _RowError) as e:
        return [], [{"reason": str(e)}]
    except Exception as e:  # noqa: BLE001  (one bad file must not stop the run)
        message = " ".join(str(e).split())[:_MAX_REASON]
        return [], [{"reason": f"unexpected error ({type(e).__name__}): {message}"}]


def _convert_row(task: RowTask) -> tuple[list[bytes], list[dict]]:
    from input_pipeline.ingest import preprocess, readers  # pylint: disable=g-import-not-at-top

    row = task.row
    for path in (row.path, *row.mask_paths.values(), *row.channel_paths):
        if not os.path.isfile(path):
            raise _RowError(f"file not found: {path}")
    clashes = sorted(set(row.labels) & TECHNICAL_KEYS)
    if clashes:
        raise _RowError(
            f"label name collision: {clashes} are keys the engine sets itself; rename "
            "those manifest columns"
        )
    spacing_override = _spacing_option(row.options)
    frames = readers.read_frames(row.path, row.options)
    if not frames:
        raise _RowError("no image frames in file")
    single = len(frames) == 1
    masks = {
        name: _read_related(p, row.options, f"mask {name!r}") for name, p in row.mask_paths.items()
    }
    channels = [
        _read_related(p, row.options, f"channel {i}")
        for i, p in enumerate(row.channel_paths, start=1)
    ]
    encoded, rejections = [], []
    for frame in frames:
        try:
            image01 = preprocess.to_unit_interval(frame, window=task.window)
            if channels:
                image01 = np.stack(
                    [image01]
                    + [
                        preprocess.to_unit_interval(other, window=task.window)
                        for other in _channel_frames(frame, channels, single)
                    ]
                )
        except readers.RejectedInput as e:
            entry = {"reason": str(e)}
            if not single:
                entry["frame"] = frame.index
            rejections.append(entry)
            continue
        image, geometry = preprocess.resize_and_pad(image01, task.size)
        meta = {k: v for k, v in frame.attrs.items() if k in FRAME_ATTRS}
        meta.update(
            bits_stored=16,
            spacing=geometry.output_spacing(spacing_override or frame.spacing),
            geometry=geometry.to_json(),
            patient=task.patient,
            split=task.split,
            source_id=task.source_id,
            source_index=frame.index,
        )
        if frame.slice_spacing is not None:  # mm between slices: 3-D metrics of volumes
            meta["slice_spacing"] = float(frame.slice_spacing)
        if row.channel_paths:
            meta["channels"] = list(row.channel_names)
        if row.report is not None:
            meta["report"] = row.report
        if row.landmarks is not None:
            points = geometry.map_points(np.asarray(row.landmarks, np.float64).reshape(-1, 2))
            meta["landmarks"] = [[round(float(x), 4), round(float(y), 4)] for x, y in points]
        meta.update(row.labels)
        extras = {}
        for name, by_index in masks.items():
            mask = _matching(by_index, frame, single, f"mask {name!r}")
            if mask.pixels.shape != frame.pixels.shape:
                raise _RowError(
                    f"mask size mismatch: image {_shape_text(frame.pixels.shape)}, "
                    f"mask {_shape_text(mask.pixels.shape)} (mask {name!r})"
                )
            extras[name] = geometry.map_mask(_label_image(mask.pixels, name))
        encoded.append(records.encode_record(image, meta, extras))
    return encoded, rejections


def _spacing_option(options: dict) -> tuple[float, float] | None:
    """options["spacing"] = [row_mm, col_mm]: the source pixel spacing for files
    that do not carry one (BMP, PNG), overriding the file's if they do."""
    value = options.get("spacing")
    if value is None:
        return None
    try:
        spacing = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise _RowError(f"option 'spacing' must be [row_mm, col_mm] > 0, got {value!r}")
    return spacing


def _read_related(path: str, options: dict, what: str) -> dict[str, Any]:
    """Frames of a mask or channel file by index; its problems name it."""
    from input_pipeline.ingest import readers  # pylint: disable=g-import-not-at-top

    try:
        return _by_index(readers.read_frames(path, options))
    except readers.RejectedInput as e:
        raise _RowError(f"{what} unreadable: {e} ({path})") from e


def _index_key(index: dict) -> str:
    return json.dumps(index, sort_keys=True)


def _by_index(frames: list) -> dict[str, Any]:
    return {_index_key(f.index): f for f in frames}


def _matching(by_index: dict[str, Any], frame: Any, single: bool, what: str) -> Any:
    """The frame of a mask / channel file that goes with image `frame`."""
    found = by_index.get(_index_key(frame.index))
    if found is None and single and len(by_index) == 1:
        found = next(iter(by_index.values()))  # one frame each: they belong together
    if found is None:
        raise _RowError(f"{what} has no frame matching image frame {frame.index}")
    return found


def _channel_frames(frame: Any, channels: list[dict], single: bool) -> list:
    out = []
    for i, by_index in enumerate(channels, start=1):
        other = _matching(by_index, frame, single, f"channel {i}")
        if other.pixels.shape != frame.pixels.shape or frame.pixels.ndim != 2:
            raise _RowError(
                f"channel size mismatch: image {_shape_text(frame.pixels.shape)}, channel "
                f"{i} {_shape_text(other.pixels.shape)} (channels must be 2-D and of one size)"
            )
        out.append(other)
    return out


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _label_image(pixels: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(pixels)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.round(values)):
        raise _RowError(f"mask {name!r} is not a label image (needs non-negative integer values)")
    top = int(values.max()) if values.size else 0
    if top > 65535:
        raise _RowError(f"mask {name!r} has label {top}, more than uint16 holds")
    return values.astype(np.uint8 if top < 256 else np.uint16)
