"""What to ingest: one `ManifestRow` per input image, from a CSV/JSONL manifest,
a directory scan, or a dataset builder."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import warnings
from typing import Any


@dataclasses.dataclass
class ManifestRow:
    """One input image and everything that travels with it.

    Coordinates follow one convention everywhere: landmarks are (x, y) =
    (column, row) in pixels of the source image, the centre of the top-left
    pixel at (0, 0). Masks are label images with the source image's height and
    width (for a volume: its full 3-D shape), 0 = background.
    """

    path: str  # image file; relative paths are relative to the manifest's folder
    patient_id: str | None = None  # hashed (salted) before it is stored
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. pathology, margins
    report: str | None = None  # free text (radiology report sections)
    landmarks: list[list[float]] | None = None  # [[x, y], ...], source pixels
    mask_paths: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> file
    # Co-registered images stacked after `path` as extra channels (BraTS: the
    # other MRI sequences); names in `channel_names`, `path`'s name first.
    channel_paths: list[str] = dataclasses.field(default_factory=list)
    channel_names: list[str] = dataclasses.field(default_factory=list)
    split: str | None = None  # "train" | "val" | "test"; None = assigned by patient
    # Per-row reader options, e.g. {"frames": [0, 11]} (ACDC ED/ES time points)
    # or {"view": "frontal"} to record a view the file itself does not carry.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""  # where the row came from, for errors: "labels.csv:12"


# ----------------------------------------------------------------------------- manifests
# Columns (CSV) / keys (JSONL) with a fixed meaning; every other one is a label.
RESERVED_COLUMNS = (
    "path",
    "patient_id",
    "split",
    "report",
    "landmarks",
    "mask",
    "masks",
    "channels",
    "channel_names",
    "options",
    "view",
    "laterality",
    "labels",
)
MASK_PREFIX = "mask:"  # "mask:NAME" columns: one extra array per name
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

# Files a directory scan takes by name; anything else is taken only if its
# first bytes say it is an image (DICOM without extension, mostly).
IMAGE_EXTENSIONS = (
    ".dcm",
    ".dicom",
    ".dic",
    ".ima",
    ".nii",
    ".nii.gz",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
)
_MAGIC = (
    (128, b"DICM"),  # DICOM Part 10 preamble
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"BM"),  # BMP
    (0, b"II*\x00"),  # TIFF, little-endian
    (0, b"MM\x00*"),  # TIFF, big-endian
    (344, b"n+1\x00"),  # NIfTI-1 single file
    (4, b"n+2\x00"),  # NIfTI-2 single file
)


class ManifestError(ValueError):
    """A manifest that cannot be read at all (not a single row of it)."""


def parse_label(text: str) -> Any:
    """A label cell: int, finite float, JSON list/object ("[0,1,0,0,1]"), else
    the string itself. Raises ValueError for a cell that starts like JSON but
    is not."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    if text and text[0] in "[{":
        return json.loads(text)
    return text


def _resolve(base_dir: str, path: str) -> str:
    path = os.path.expanduser(path.strip())
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))


def _json_cell(value: Any, column: str) -> Any:
    """JSONL gives parsed values; CSV gives text holding JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"column {column!r} is not valid JSON ({e.msg} at char {e.pos})") from e


def _check_landmarks(value: Any) -> list[list[float]]:
    ok = isinstance(value, list) and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)
        and all(math.isfinite(c) for c in p)
        for p in value
    )
    if not ok:
        raise ValueError("'landmarks' must be a JSON list of [x, y] number pairs")
    return [[float(x), float(y)] for x, y in value]


def _string_list(value: Any, column: str) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"{column!r} must be a JSON list of non-empty strings")
    return value


def row_from_fields(fields: dict[str, Any], base_dir: str, source: str) -> ManifestRow:
    """One manifest record (CSV cells as text, or a JSONL object) -> ManifestRow.

    Empty cells and None values mean "absent". Raises ValueError with the reason
    (the caller adds the source)."""
    fields = {k.strip(): v for k, v in fields.items() if k is not None}
    fields = {k: v for k, v in fields.items() if v is not None and v != "" and v != []}
    path = fields.pop("path", None)
    if not isinstance(path, str) or not path.strip():
        raise ValueError("no 'path' (the image file) given")
    row = ManifestRow(path=_resolve(base_dir, path), source=source)
    if "patient_id" in fields:
        row.patient_id = str(fields.pop("patient_id")).strip()
    if "split" in fields:
        split = str(fields.pop("split")).strip()
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split {split!r} is not a plain name like train, val, test")
        row.split = split
    if "report" in fields:
        row.report = str(fields.pop("report"))
    if "landmarks" in fields:
        row.landmarks = _check_landmarks(_json_cell(fields.pop("landmarks"), "landmarks"))
    if "options" in fields:
        options = _json_cell(fields.pop("options"), "options")
        if not isinstance(options, dict):
            raise ValueError("'options' must be a JSON object, e.g. {\"frames\": [0, 3]}")
        row.options = options
    for key in ("view", "laterality"):  # shorthands for the reader options of that name
        if key in fields:
            row.options[key] = str(fields.pop(key)).strip()
    if "channels" in fields:
        channels = _string_list(_json_cell(fields.pop("channels"), "channels"), "channels")
        row.channel_paths = [_resolve(base_dir, p) for p in channels]
        names = fields.pop("channel_names", None)
        if names is None:
            names = ["image"] + [f"channel_{i}" for i in range(1, len(channels) + 1)]
        names = _string_list(_json_cell(names, "channel_names"), "channel_names")
        if len(names) != len(channels) + 1:
            raise ValueError(
                f"'channel_names' needs {len(channels) + 1} names (the image first, then "
                f"one per entry of 'channels'), got {len(names)}"
            )
        row.channel_names = names
    elif "channel_names" in fields:
        raise ValueError("'channel_names' given without 'channels'")
    masks = fields.pop("masks", {})  # JSONL may group them: {"masks": {NAME: path}}
    if not isinstance(masks, dict):
        raise TypeError("'masks' must be an object {name: path}")
    for key in [k for k in fields if k == "mask" or k.startswith(MASK_PREFIX)]:
        masks["mask" if key == "mask" else key[len(MASK_PREFIX) :]] = fields.pop(key)
    for name, mask_path in masks.items():
        if not name or name == "image" or not isinstance(mask_path, str):
            raise ValueError(f"mask {name!r}: need a non-empty name other than 'image' and a path")
        row.mask_paths[name] = _resolve(base_dir, mask_path)
    labels = fields.pop("labels", {})
    if isinstance(labels, str):
        labels = _json_cell(labels, "labels")
    if not isinstance(labels, dict):
        raise TypeError("'labels' must be an object {name: value}")
    for key, value in fields.items():  # what is left is a label
        try:
            labels[key] = parse_label(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise ValueError(f"label {key!r} is not valid JSON ({e.msg} at char {e.pos})") from e
    row.labels = {k: v for k, v in labels.items() if v is not None and v != ""}
    return row


def read_manifest(path: str) -> tuple[list[ManifestRow], list[dict]]:
    """Rows of a CSV or JSONL manifest, and the rows that could not be read.

    CSV: a header with a `path` column (required) and optionally `patient_id`,
    `split`, `report`, `landmarks` (JSON [[x, y], ...] in source pixels),
    `mask` and/or `mask:NAME` (label-image paths), `channels` (JSON list of
    extra channel image paths) with `channel_names`, `options` (JSON object of
    reader options, e.g. {"frames": [0, 11]}, {"spacing": [0.1, 0.1]}), `view`
    / `laterality` (the reader options of that name, overriding the file's).
    Every other column is a label: int, float, JSON list such as "[0,1,0,0,1]",
    else string (so "007" becomes 7: quote-free ids belong in `patient_id`); an
    empty cell = no label.
    JSONL: one object per line with the same keys; labels top-level or under
    "labels", masks also as {"masks": {NAME: path}}.
    Relative paths are relative to the manifest's folder.

    A row that cannot be read is returned as {"source": "FILE:LINE",
    "reason": ...} in the second list instead of stopping the run.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path!r} does not exist or is not a file")
    base_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        records = _jsonl_records(path)
    elif lower.endswith((".csv", ".tsv")):
        records = _csv_records(path, "\t" if lower.endswith(".tsv") else ",")
    else:
        raise ManifestError(f"manifest {path!r}: unknown kind; name it *.csv, *.tsv or *.jsonl")
    rows, rejected = [], []
    for line, fields in records:
        source = f"{name}:{line}"
        try:
            if isinstance(fields, Exception):
                raise fields
            rows.append(row_from_fields(fields, base_dir, source))
        except (ValueError, TypeError) as e:
            rejected.append({"source": source, "reason": f"unreadable manifest row: {e}"})
    return rows, rejected


def _csv_records(path: str, delimiter: str):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        columns = [c.strip() for c in next(reader, [])]
        if "path" not in columns:
            raise ManifestError(
                f"manifest {path!r} has no 'path' column (columns: {columns}); the "
                "first line must be a header naming a 'path' column of image files"
            )
        if len(set(columns)) != len(columns):
            raise ManifestError(f"manifest {path!r} repeats a column name: {columns}")
        end = reader.line_num
        for cells in reader:
            # A quoted cell may span lines (reports): name the record's first line.
            line, end = end + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue  # blank line
            if len(cells) > len(columns):
                yield line, ValueError(f"{len(cells)} cells for {len(columns)} columns")
            else:
                yield line, dict(zip(columns, cells))


def _jsonl_records(path: str):
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, ValueError(f"bad JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(fields, dict):
                yield line, ValueError(f"expected a JSON object, got {type(fields).__name__}")
                continue
            yield line, fields


# ----------------------------------------------------------------------------- directories
def looks_like_image(path: str) -> bool:
    """True if the name has an image extension or the first bytes are an image
    signature (DICOM preamble, PNG, JPEG, BMP, TIFF, NIfTI)."""
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError:
        return False
    return any(head[offset : offset + len(magic)] == magic for offset, magic in _MAGIC)


def scan_directory_with_ignored(root: str) -> tuple[list[ManifestRow], dict[str, int]]:
    """`scan_directory`, plus the count of files left out per extension."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ManifestError(f"input folder {root!r} does not exist")
    rows, ignored = [], {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            # No extension at all: maybe DICOM without preamble, or broken; the
            # reader decides (and says why it rejects).
            if "." not in name or looks_like_image(path):
                rows.append(ManifestRow(path=path, source=os.path.relpath(path, root)))
            else:
                ext = os.path.splitext(name)[1].lower()
                ignored[ext] = ignored.get(ext, 0) + 1
    return rows, ignored


def scan_directory(root: str) -> list[ManifestRow]:
    """One row per image file under `root`, recursively, in sorted path order.

    Taken: files with an image extension (IMAGE_EXTENSIONS), files whose first
    bytes are a DICOM/PNG/JPEG/BMP/TIFF/NIfTI signature, and files without any
    extension (DICOM often has none; a broken one is then rejected with its
    reason rather than skipped unseen). Hidden files and folders are skipped,
    and so are files with other extensions (.txt, .csv, ...).
    """
    return scan_directory_with_ignored(root)[0]


# ----------------------------------------------------------------------------- patients, splits
def dicom_patient_id(path: str) -> str | None:
    """PatientID from a DICOM header (pixels not read), or None if the file is
    not DICOM, has no PatientID, or cannot be read."""
    try:
        import pydicom  # pylint: disable=g-import-not-at-top

        with warnings.catch_warnings():
            # pydicom's validation warnings quote header values: keep them off the logs.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            value = str(ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001
        return None  # not DICOM (or broken): the reader rejects it later with a reason
    return value or None


def patient_key(row: ManifestRow, base_dir: str | None = None) -> str:
    """The identity that keeps a patient's images in one split, in order of
    preference: the row's `patient_id`; else the DICOM PatientID in the file's
    header; else the file path itself, relative to `base_dir` if given (each
    such file is then its own patient, so images of one person can land in
    different splits: give `patient_id` in a manifest to prevent that). Never
    stored: only its salted hash is."""
    if row.patient_id:
        return f"id:{row.patient_id}"
    dicom_id = dicom_patient_id(row.path)
    if dicom_id:
        return f"id:{dicom_id}"
    path = os.path.abspath(row.path)
    return f"file:{os.path.relpath(path, base_dir) if base_dir else path}"


SPLIT_NAMES = ("train", "val", "test")


def parse_fractions(text: str) -> dict[str, float]:
    """Parses "0.8,0.1,0.1" into {"train": 0.8, "val": 0.1, "test": 0.1}: 1 to 3
    values in that order, summing to 1."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"split fractions {text!r}: {e}") from e
    return check_fractions(dict(zip(SPLIT_NAMES, values)) if len(values) <= 3 else values)


def check_fractions(fractions) -> dict[str, float]:
    """Validates {split: fraction}: 1+ names, values >= 0, summing to 1."""
    if not isinstance(fractions, dict) or not fractions:
        raise ValueError(
            f"split fractions must be 1 to 3 numbers for train,val,test (e.g. 0.8,0.1,0.1), "
            f"got {fractions!r}"
        )
    bad = [n for n, f in fractions.items() if not (math.isfinite(f) and f >= 0)]
    if bad or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions {fractions} must be >= 0 and sum to 1 (e.g. 0.8,0.1,0.1)"
        )
    return {n: float(f) for n, f in fractions.items()}


def _unit_hash(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    rows: list[ManifestRow],
    fractions: dict[str, float],
    seed: int = 0,
    salt: str = "",
    keys: list[str] | None = None,
) -> list[ManifestRow]:
    """Copies of `rows` with every `split` filled in, patient by patient.

    All rows of a patient (see `patient_key`; pass precomputed `keys` to skip
    the header reads) share one split. A patient with an explicit split on any
    row gets it on all rows; conflicting explicit splits raise ValueError
    naming the rows' sources. Other patients draw their split from a hash of
    (salt, seed, patient key) against the cumulative `fractions`: deterministic,
    and a patient's split never changes when patients are added or removed (so
    growing a dataset never moves a test patient into train). The realised
    fractions are therefore those of a random draw: close for many patients,
    loose for a handful.
    """
    fractions = check_fractions(fractions)
    if keys is None:
        keys = [patient_key(r) for r in rows]
    if len(keys) != len(rows):
        raise ValueError(f"{len(keys)} patient keys for {len(rows)} rows")
    explicit: dict[str, dict[str, list[str]]] = {}
    for row, key in zip(rows, keys):
        if row.split is not None:
            explicit.setdefault(key, {}).setdefault(row.split, []).append(row.source or row.path)
    conflicts = [by_split for by_split in explicit.values() if len(by_split) > 1]
    if conflicts:
        lines = [
            "; ".join(f"{split}: {', '.join(src[:3])}" for split, src in sorted(c.items()))
            for c in conflicts[:5]
        ]
        raise ValueError(
            f"{len(conflicts)} patient(s) have rows with different explicit splits (a "
            "patient's images must stay in one split); fix the 'split' column of these rows:\n"
            + "\n".join(f"  - {line}" for line in lines)
        )
    names = list(fractions)
    bounds = list(itertools.accumulate(fractions.values()))
    out = []
    for row, key in zip(rows, keys):
        split = next(iter(explicit[key])) if key in explicit else None
        if split is None:
            u = _unit_hash("split", salt, str(seed), key)
            split = next(
                (n for n, b in zip(names, bounds) if u < b and fractions[n] > 0),
                max(names, key=fractions.get),
            )
        out.append(dataclasses.replace(row, split=split))
    return out
