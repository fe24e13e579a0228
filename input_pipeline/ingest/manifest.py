"""What to ingest: one `ManifestRow` per input image, from a CSV/JSONL manifest,
a directory scan, or a dataset builder."""

from __future__ import annotations

import dataclasses
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
