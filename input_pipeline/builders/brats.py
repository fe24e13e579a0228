"""BraTS 2021 (RSNA-ASNR-MICCAI Brain Tumor Segmentation 2021) -> `ManifestRow`s.

Pre-operative multi-parametric brain MRI of gliomas: FLAIR, T1, T1 with
gadolinium (T1ce) and T2, co-registered to one anatomical template,
resampled to 1 mm isotropic (240 x 240 x 155) and skull-stripped, with expert
tumour labels for the training cases.

Where to get it: the BraTS 2021 Synapse project (https://www.synapse.org,
"RSNA-ASNR-MICCAI BraTS 2021", syn25829067) after registering and accepting
its data use terms; cite Baid et al., arXiv:2107.02314 (2021), Menze et al.,
IEEE TMI 2015, and Bakas et al., Sci. Data 2017. Check the terms of your copy.

Expected layout, as the training and validation archives unpack (``ROOT`` may
also hold several such folders one level down, e.g. the training and the
validation folder side by side). Check it against your download:

    ROOT/BraTS2021_00000/BraTS2021_00000_flair.nii.gz
                         BraTS2021_00000_t1.nii.gz
                         BraTS2021_00000_t1ce.nii.gz
                         BraTS2021_00000_t2.nii.gz
                         BraTS2021_00000_seg.nii.gz   (training cases only)
    ROOT/BraTS2021_00002/...

(Later BraTS releases, e.g. 2023's ``BraTS-GLI-00000-000-t2f.nii.gz``, use
other names and are not read by this builder.)

Rows: one per case, ``path`` = FLAIR and ``channel_paths`` = [T1, T1ce, T2]
(``channel_names`` flair, t1, t1ce, t2), read as axial slices
(``options = {"nifti_mode": "slices", "slice_axis": 2}``), with
``mask_paths = {"mask": seg}``. Mask values (``labels["classes"]``, keys are
strings because labels are stored as JSON): 0 background, 1 necrotic /
non-enhancing tumour core (NCR), 2 peritumoral edema (ED), 4 GD-enhancing
tumour (ET); 3 is unused. Hierarchical labels: the superclass
``"whole_tumour"`` is ``mask > 0``; ``labels["regions"]`` lists the usual
evaluation regions (whole tumour 1+2+4, tumour core 1+4, enhancing 4).
``patient_id`` is the case id ("BraTS2021_00000"); spacing comes from the
NIfTI headers (1 mm).

Splits: cases with a segmentation are split by a stable hash of the case id,
about 80% "train", 10% "val", 10% "test" (`split_for_case`). Cases without
one (the challenge's validation set, whose labels are not public) all go to
"test": they cannot be scored locally, and keeping them out of "train" keeps
any later challenge submission free of leakage. A folder in which some cases
have a segmentation and others not is reported as a broken download.
A case that lacks one of the four sequences is a `LayoutError` naming the file.
"""

from __future__ import annotations

import os
import re

from input_pipeline.builders import LayoutError
from input_pipeline.builders._layout import layout_error, require, stable_unit
from input_pipeline.ingest.manifest import ManifestRow

DATASET = "BraTS 2021"
HINT = (
    "Download BraTS 2021 from Synapse (syn25829067, registration and data use terms) and pass "
    "the folder holding the BraTS2021_NNNNN case folders."
)
MODALITIES = ("flair", "t1", "t1ce", "t2")  # `path` first, then the extra channels
CLASSES = {"0": "background", "1": "ncr", "2": "edema", "4": "enhancing"}
SUPERCLASS = "whole_tumour"
REGIONS = {"whole_tumour": [1, 2, 4], "tumour_core": [1, 4], "enhancing_tumour": [4]}
NIFTI_OPTIONS = {"nifti_mode": "slices", "slice_axis": 2}
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
_SPLIT_SALT = "brats2021"
_CASE_RE = re.compile(r"^BraTS2021_\d{5}$")


def split_for_case(case_id: str) -> str:
    """The split ("train", "val" or "test") of a labelled case, stable across runs and machines."""
    u, edge = stable_unit(case_id, _SPLIT_SALT), 0.0
    for split, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return split
    return SPLIT_FRACTIONS[-1][0]


def _case_folders(root: str) -> dict[str, list[str]]:
    """Case folders under `root` or one level down, grouped by parent folder."""
    groups: dict[str, list[str]] = {}
    parents = [root] + sorted(
        os.path.join(root, d)
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not _CASE_RE.match(d)
    )
    for parent in parents:
        cases = sorted(
            d
            for d in os.listdir(parent)
            if _CASE_RE.match(d) and os.path.isdir(os.path.join(parent, d))
        )
        if cases:
            groups[parent] = cases
    return groups


def build_rows(root: str) -> list[ManifestRow]:
    """One row per BraTS 2021 case found under `root`; see the module docstring."""
    root = os.path.abspath(root)
    require(root, [], DATASET, HINT)  # the folder itself must exist
    groups = _case_folders(root)
    if not groups:
        raise layout_error(root, ["BraTS2021_NNNNN/ (case folders)"], DATASET, HINT)
    rows, missing, seen = [], [], {}
    for parent, cases in groups.items():
        seg_missing, labelled = [], 0
        group_rows = []
        for case in cases:
            if case in seen:
                raise LayoutError(
                    f"{DATASET}: case {case} is in both {seen[case]} and {parent}; keep one copy."
                )
            seen[case] = parent
            case_dir = os.path.join(parent, case)
            paths = [os.path.join(case_dir, f"{case}_{m}.nii.gz") for m in MODALITIES]
            missing += [os.path.relpath(p, root) for p in paths if not os.path.isfile(p)]
            seg = os.path.join(case_dir, f"{case}_seg.nii.gz")
            if os.path.isfile(seg):
                labelled += 1
            else:
                seg_missing.append(os.path.relpath(seg, root))
            group_rows.append(
                ManifestRow(
                    path=paths[0],
                    patient_id=case,
                    labels={
                        "classes": dict(CLASSES),
                        "superclass": SUPERCLASS,
                        "regions": {k: list(v) for k, v in REGIONS.items()},
                    },
                    mask_paths={"mask": seg} if os.path.isfile(seg) else {},
                    channel_paths=paths[1:],
                    channel_names=list(MODALITIES),
                    split=split_for_case(case) if os.path.isfile(seg) else "test",
                    options=dict(NIFTI_OPTIONS),
                    source=os.path.relpath(case_dir, root),
                )
            )
        if labelled and seg_missing:
            missing += seg_missing
        rows += group_rows
    if missing:
        raise layout_error(root, missing, DATASET, HINT)
    return rows
