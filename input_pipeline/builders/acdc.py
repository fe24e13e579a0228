"""ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017) -> `ManifestRow`s.

Cine cardiac MRI of 150 patients (Creatis, Lyon), short-axis stacks with the
end-diastolic (ED) and end-systolic (ES) frames segmented by experts.

Where to get it: the "Human Heart Project" site of Creatis
(https://humanheart-project.creatis.insa-lyon.fr/database/#collection/637218c173e9f0047faa00fb),
free after accepting the terms of use on the download page (cite Bernard et
al., IEEE TMI 37(11), 2018). Since 2020 the release includes the test
patients' ground truth; the 2017 challenge release had none for them.

Expected layout (``ROOT`` is the folder that holds ``database``; passing the
``database`` folder itself also works). Check it against your download:

    ROOT/database/training/patient001/Info.cfg
                                     patient001_frame01.nii.gz     (ED frame)
                                     patient001_frame01_gt.nii.gz  (its labels)
                                     patient001_frame12.nii.gz     (ES frame)
                                     patient001_frame12_gt.nii.gz
                                     patient001_4d.nii.gz          (not used)
    ... patient100
    ROOT/database/testing/patient101 ... patient150   (same files)

``Info.cfg`` holds ``ED: 1``, ``ES: 12``, ``Group: DCM``, ``Height: 184.0``
(cm), ``NbFrame: 30``, ``Weight: 95.0`` (kg); the frame numbers name the files.

Rows: one per (patient, ED or ES frame), the 3-D frame read as 2-D short-axis
slices (``options = {"nifti_mode": "slices", "slice_axis": 2}``) with
``mask_paths = {"mask": <frame>_gt.nii.gz}``: 0 background, 1 right-ventricle
cavity, 2 myocardium, 3 left-ventricle cavity (``labels["classes"]`` in that
order). Hierarchical labels: the superclass ``"heart"`` is the union of
1..3, i.e. ``mask > 0``; the stored mask is the fine one.

Other labels: ``group`` (NOR, MINF, DCM, HCM, RV) and ``group_id`` (its index
in `GROUPS`), ``phase`` ("ED"/"ES"), ``frame`` (1-based, as in the file
name), ``height_cm``, ``weight_kg``, ``num_frames``. ``patient_id`` is the
folder name ("patient001").

Splits: ``testing`` -> "test". ``training`` -> "train", except patients whose
number is a multiple of 10 -> "val" (10 of 100; the release orders training
patients by group in blocks of 20, so this takes two of each group).
Test patients without ``Group`` (2017 release) get no group labels; if no
test patient has ground truth, their rows have no mask. A test set where some
patients have ground truth and others not is reported as a broken download.

Spacing comes from the NIfTI headers (about 1.4-1.7 mm in plane, 5-10 mm
between slices).
"""

from __future__ import annotations

import os
import re

from input_pipeline.builders import LayoutError
from input_pipeline.builders._layout import layout_error, require
from input_pipeline.ingest.manifest import ManifestRow

DATASET = "ACDC"
HINT = (
    "Download ACDC from https://humanheart-project.creatis.insa-lyon.fr (Creatis, Lyon) and "
    "pass the folder that contains database/training and database/testing."
)
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
CLASSES = ["background", "rv", "myocardium", "lv"]
SUPERCLASS = "heart"
SPLIT_DIRS = {"training": "train", "testing": "test"}
VAL_EVERY = 10  # training patients whose number is a multiple of this -> "val"
NIFTI_OPTIONS = {"nifti_mode": "slices", "slice_axis": 2}
_PATIENT_RE = re.compile(r"^patient(\d{3})$")


def _database_dir(root: str) -> str:
    for candidate in (os.path.join(root, "database"), root):
        if any(os.path.isdir(os.path.join(candidate, d)) for d in SPLIT_DIRS):
            return candidate
    require(root, ["database/training"], DATASET, HINT)  # raises, naming the folder
    raise AssertionError("unreachable")


def parse_info_cfg(path: str) -> dict[str, str]:
    """``Key: value`` lines of an ACDC ``Info.cfg`` as a dict of strings."""
    info = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
    return info


def _frame_number(info: dict[str, str], key: str, path: str) -> int:
    try:
        return int(float(info[key]))
    except (KeyError, ValueError):
        raise LayoutError(
            f"{path}: needs an integer '{key}: N' line (found {info.get(key)!r}); "
            "is this the Info.cfg that came with ACDC, unmodified?"
        ) from None


def _patient_labels(info: dict[str, str], path: str) -> dict:
    labels = {}
    group = info.get("Group")
    if group is not None:
        if group not in GROUPS:
            raise LayoutError(f"{path}: unknown Group {group!r}; expected one of {GROUPS}")
        labels.update(group=group, group_id=GROUPS.index(group))
    for key, name, cast in (
        ("Height", "height_cm", float),
        ("Weight", "weight_kg", float),
        ("NbFrame", "num_frames", int),
    ):
        if key in info:
            try:
                labels[name] = cast(float(info[key]))
            except ValueError:
                pass  # a malformed optional field costs the label, not the patient
    return labels


def build_rows(root: str) -> list[ManifestRow]:
    """Two rows (ED, ES) per ACDC patient found under `root`; see the module docstring."""
    root = os.path.abspath(root)
    database = _database_dir(root)
    rows, missing = [], []
    for split_dir, split in SPLIT_DIRS.items():
        folder = os.path.join(database, split_dir)
        if not os.path.isdir(folder):
            missing.append(os.path.relpath(folder, root))
            continue
        patients = sorted(p for p in os.listdir(folder) if _PATIENT_RE.match(p))
        if not patients:
            missing.append(os.path.join(os.path.relpath(folder, root), "patientNNN/"))
            continue
        split_rows, split_missing = _split_rows(root, folder, patients, split)
        rows += split_rows
        missing += split_missing
    if missing:
        raise layout_error(root, missing, DATASET, HINT)
    return rows


def _split_rows(root: str, folder: str, patients: list[str], split: str):
    """Rows of one of training/testing, and the relative paths it lacks."""
    rows, missing, gt_missing = [], [], []
    has_gt = 0
    for patient in patients:
        patient_dir = os.path.join(folder, patient)
        cfg = os.path.join(patient_dir, "Info.cfg")
        if not os.path.isfile(cfg):
            missing.append(os.path.relpath(cfg, root))
            continue
        info = parse_info_cfg(cfg)
        labels = _patient_labels(info, cfg)
        if split == "train" and "group" not in labels:
            raise LayoutError(f"{cfg}: training patients need a 'Group: ...' line")
        row_split = split
        if split == "train" and int(_PATIENT_RE.match(patient).group(1)) % VAL_EVERY == 0:
            row_split = "val"
        for phase in ("ED", "ES"):
            frame = _frame_number(info, phase, cfg)
            image = os.path.join(patient_dir, f"{patient}_frame{frame:02d}.nii.gz")
            gt = os.path.join(patient_dir, f"{patient}_frame{frame:02d}_gt.nii.gz")
            if not os.path.isfile(image):
                missing.append(os.path.relpath(image, root))
            mask_paths = {}
            if os.path.isfile(gt):
                has_gt += 1
                mask_paths = {"mask": gt}
            else:
                gt_missing.append(os.path.relpath(gt, root))
            rows.append(
                ManifestRow(
                    path=image,
                    patient_id=patient,
                    labels=dict(
                        labels,
                        phase=phase,
                        frame=frame,
                        classes=list(CLASSES),
                        superclass=SUPERCLASS,
                    ),
                    mask_paths=mask_paths,
                    split=row_split,
                    options=dict(NIFTI_OPTIONS),
                    source=os.path.relpath(cfg, root),
                )
            )
    # Ground truth is optional only for a test set that has none at all (2017 release).
    if gt_missing and (split != "test" or has_gt):
        missing += gt_missing
    return rows, missing
