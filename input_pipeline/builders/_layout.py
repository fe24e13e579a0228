"""Small helpers the dataset builders share: layout checks with errors that
name every missing file, CSV reading, and deterministic patient-level carving.

A builder checks its layout before it builds anything, so a partial download
fails once with the complete list of what is missing (and where to get it)
instead of one file at a time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
from collections.abc import Iterable, Sequence

from input_pipeline.builders import LayoutError

# Errors list at most this many missing paths, then a count of the rest.
MAX_LISTED = 20


def format_missing(missing: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Indented list of `missing`, cut after `limit` entries with a count."""
    lines = [f"  - {p}" for p in missing[:limit]]
    if len(missing) > limit:
        lines.append(f"  ... and {len(missing) - limit} more ({len(missing)} missing in all)")
    return "\n".join(lines)


def layout_error(
    root: str, missing: Sequence[str], dataset: str, hint: str, what: str = ""
) -> LayoutError:
    """A `LayoutError` for `dataset` under `root` listing `missing` and `hint`."""
    what = what or "file(s)/folder(s)"
    return LayoutError(
        f"{dataset}: {len(missing)} expected {what} missing under {root!r}:\n"
        f"{format_missing(list(missing))}\n{hint}"
    )


def first_existing(root: str, alternatives: str | Sequence[str]) -> str | None:
    """Path of the first of `alternatives` (relative to `root`) that exists."""
    if isinstance(alternatives, str):
        alternatives = [alternatives]
    for rel in alternatives:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            return path
    return None


def require(
    root: str, relpaths: Iterable[str | Sequence[str]], dataset: str, hint: str
) -> list[str]:
    """Check that every entry of `relpaths` exists under `root`.

    An entry is a relative path, or a sequence of alternatives of which any one
    will do (e.g. ``("meta.csv", "meta.csv.gz")``). Returns the absolute paths
    found, in order; raises `LayoutError` naming every missing entry and `hint`
    (where to download the dataset) when any is absent.
    """
    if not os.path.isdir(root):
        raise LayoutError(f"{dataset}: input folder {root!r} does not exist.\n{hint}")
    found, missing = [], []
    for entry in relpaths:
        path = first_existing(root, entry)
        if path is None:
            missing.append(entry if isinstance(entry, str) else " or ".join(entry))
        else:
            found.append(path)
    if missing:
        raise layout_error(root, missing, dataset, hint)
    return found


def csv_variants(name: str) -> tuple[str, str]:
    """``("x.csv", "x.csv.gz")`` for ``"x.csv"``: both forms a download may have."""
    return (name, name + ".gz")


def read_csv(path: str) -> list[dict[str, str]]:
    """Rows of a CSV file (plain or ``.gz``) as dicts keyed by the header.

    Header names are stripped of surrounding whitespace (some distributed CSVs
    have trailing spaces); values are kept as strings, stripped.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    rows = []
    for raw in reader:
        rows.append({(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None})
    return rows


def require_columns(rows: list[dict[str, str]], columns: Iterable[str], path: str) -> None:
    """Raise `LayoutError` when the CSV at `path` lacks any of `columns`."""
    if not rows:
        return
    absent = [c for c in columns if c not in rows[0]]
    if absent:
        raise LayoutError(
            f"{path}: missing column(s) {absent}; found {sorted(rows[0])}. "
            "Is this the file the dataset distributes, unmodified?"
        )


def stable_unit(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends only on `key` and `salt` (not on the
    Python hash seed), for deterministic per-patient choices."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def carve_val(patient_id: str, fraction: float, salt: str) -> bool:
    """Whether `patient_id` goes to a validation split carved from training
    patients: a stable choice of about `fraction` of them."""
    return stable_unit(patient_id, salt) < fraction
