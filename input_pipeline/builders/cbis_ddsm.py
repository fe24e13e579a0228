"""CBIS-DDSM (Curated Breast Imaging Subset of DDSM) -> `ManifestRow`s.

Where to get it: The Cancer Imaging Archive,
https://www.cancerimagingarchive.net/collection/cbis-ddsm/ (DOI
10.7937/K9/TCIA.2016.7O02S9CY). Open the collection's ``.tcia`` manifest with the
NBIA Data Retriever (either directory naming works) and download the four
case-description CSVs from the same page. Licence CC BY 3.0: cite Lee et al.,
"A curated mammography data set for use in computer-aided detection and
diagnosis research", Scientific Data 4, 170177 (2017), and the TCIA DOI.

Expected layout (``ROOT`` is what ``--input`` names)::

    ROOT/
      mass_case_description_train_set.csv     (the CSVs may also sit in the
      mass_case_description_test_set.csv       CBIS-DDSM/ folder)
      calc_case_description_train_set.csv
      calc_case_description_test_set.csv
      CBIS-DDSM/                              (or manifest-<id>/CBIS-DDSM/, or the
        Mass-Training_P_00001_LEFT_CC/         case folders directly in ROOT)
          07-20-2016-DDSM-74994/
            1.000000-full mammogram images-24515/
              1-1.dcm                         full mammogram
        Mass-Training_P_00001_LEFT_CC_1/      ROI folder of abnormality 1
          07-21-2016-DDSM-17686/
            1.000000-ROI mask images-94682/
              1-1.dcm                         cropped lesion or ROI mask ...
              1-2.dcm                         ... the other one (see below)
        Calc-Test_P_00038_LEFT_CC/ ...

The study/series folder names and the CSVs' DICOM UID paths never need to
match: a CSV path is resolved by its first component (the case or ROI folder
name) and the DICOM files are found anywhere below that folder. Within an ROI
folder TCIA's ``1-1``/``1-2`` numbering (and whether crop and mask share one
series folder) is inconsistent, so the files are told apart by what they are:
the ROI mask has the full mammogram's size, so the larger image is the mask
and the smaller the cropped lesion; equal sizes fall back to content (the
mask holds at most two values, 0 and its maximum).

Rows (``build_rows(root, kind=...)``):

* ``kind="roi"`` (default; lesion classification as in MIRAM): one row per
  abnormality, the cropped lesion image. No mask (the ROI mask is full-size,
  it does not fit the crop).
* ``kind="full"``: one row per full mammogram (case folder). An image with
  several abnormalities aggregates them: ``pathology`` = the most severe
  (malignant beats benign), ``margins`` = union over its masses,
  ``assessment`` = the highest BI-RADS, ``subtlety`` = the highest (the most
  conspicuous finding), ``breast_density`` from the first abnormality,
  ``num_abnormalities`` = their count. ``mask_paths={"roi": <ROI mask DICOM>}``
  (0 background, 255 lesion) only when the image has exactly one abnormality;
  with several there is no mask rather than an arbitrary one.

Labels (both kinds):

* ``pathology``: int, 0 benign_mass, 1 malignant_mass, 2 benign_calcification,
  3 malignant_calcification (BENIGN_WITHOUT_CALLBACK counts as benign).
* ``margins``: 5-multi-hot [circumscribed, obscured, ill_defined,
  microlobulated, spiculated]; combined values ("ILL_DEFINED-SPICULATED") set
  several; calcifications and "N/A"/empty margins are all zeros.
* ``abnormality``: "mass" or "calcification"; ``assessment`` (BI-RADS 0-5),
  ``subtlety`` (1-5), ``breast_density`` (1-4): ints.

Options: ``{"view": "CC" | "MLO", "laterality": "L" | "R"}``.

Splits: the official train/test split from the CSV name. A validation split
is carved from the training patients: about 10 % of them (a stable hash of
``patient_id``, the same for mass and calcification cases) get ``"val"``.
CBIS-DDSM's mass and calcification splits were drawn separately, so a
patient can be in training for one and test for the other; the official
split is kept as is. ``patient_id`` is the CBIS id, e.g. ``"P_00001"``.

Builder names (``ROWS_BY_NAME``): ``"cbis_ddsm"`` gives the lesion crops,
``"cbis_ddsm_full"`` the full mammograms.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from input_pipeline.builders import LayoutError
from input_pipeline.builders._layout import carve_val, layout_error, read_csv, require_columns
from input_pipeline.ingest.manifest import ManifestRow

DATASET = "CBIS-DDSM"
HINT = (
    "Download CBIS-DDSM from https://www.cancerimagingarchive.net/collection/cbis-ddsm/ "
    "(the .tcia manifest with the NBIA Data Retriever, plus the four case-description CSVs) "
    "and pass the folder holding the CSVs and CBIS-DDSM/ as --input."
)
CSV_FILES = {  # file name -> official split
    "mass_case_description_train_set.csv": "train",
    "mass_case_description_test_set.csv": "test",
    "calc_case_description_train_set.csv": "train",
    "calc_case_description_test_set.csv": "test",
}
# The label layout (the mammography phantom draws the same labels: phantom.py).
MARGIN_TYPES = ("circumscribed", "obscured", "ill_defined", "microlobulated", "spiculated")
PATHOLOGY_CLASSES = (
    "benign_mass",
    "malignant_mass",
    "benign_calcification",
    "malignant_calcification",
)
_MALIGNANT = {"MALIGNANT": True, "BENIGN": False, "BENIGN_WITHOUT_CALLBACK": False}
_ABNORMALITY = {"mass": "mass", "calcification": "calcification"}
_LATERALITY = {"LEFT": "L", "RIGHT": "R"}
VAL_FRACTION = 0.1
_VAL_SALT = "cbis_ddsm-val"
# Column names differ between the mass and calc CSVs ("breast_density" vs
# "breast density"); they are compared with spaces turned into underscores.
_COLUMNS = (
    "patient_id",
    "breast_density",
    "left_or_right_breast",
    "image_view",
    "abnormality_id",
    "abnormality_type",
    "assessment",
    "pathology",
    "subtlety",
    "image_file_path",
    "cropped_image_file_path",
    "roi_mask_file_path",
)
KINDS = ("roi", "full")


def _normalise_keys(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k.lower().replace(" ", "_"): v for k, v in row.items()} for row in rows]


def _folder_of(csv_path_value: str) -> str:
    """Case/ROI folder name: the first component of a CSV DICOM path."""
    parts = [p for p in csv_path_value.strip().replace("\\", "/").split("/") if p]
    return parts[0] if parts else ""


def parse_margins(value: str, where: str = "") -> list[int]:
    """5-multi-hot of a CBIS "mass margins" value, e.g. "ILL_DEFINED-SPICULATED"."""
    value = value.strip().upper()
    hot = [0] * len(MARGIN_TYPES)
    if value in ("", "N/A", "NA", "NAN", "NONE"):
        return hot
    for token in value.split("-"):
        name = token.strip().lower()
        if name not in MARGIN_TYPES:
            raise ValueError(
                f"{where}: unknown mass margin {token!r} in {value!r}; expected a '-'-joined "
                f"combination of {[m.upper() for m in MARGIN_TYPES]} or N/A"
            )
        hot[MARGIN_TYPES.index(name)] = 1
    return hot


def _int(row: dict[str, str], key: str, where: str) -> int:
    try:
        return int(float(row[key]))
    except ValueError:
        raise ValueError(f"{where}: column {key!r} must be an integer, got {row[key]!r}") from None


def _abnormality_labels(row: dict[str, str], where: str) -> dict:
    kind = _ABNORMALITY.get(row["abnormality_type"].strip().lower())
    if kind is None:
        raise ValueError(
            f"{where}: abnormality type {row['abnormality_type']!r} is neither mass nor "
            "calcification"
        )
    pathology = row["pathology"].strip().upper()
    if pathology not in _MALIGNANT:
        raise ValueError(
            f"{where}: unknown pathology {row['pathology']!r}; expected {list(_MALIGNANT)}"
        )
    index = (0 if kind == "mass" else 2) + int(_MALIGNANT[pathology])
    margins = parse_margins(row.get("mass_margins", ""), where) if kind == "mass" else [0] * 5
    return {
        "pathology": index,
        "margins": margins,
        "abnormality": kind,
        "assessment": _int(row, "assessment", where),
        "subtlety": _int(row, "subtlety", where),
        "breast_density": _int(row, "breast_density", where),
    }


def _data_dir(root: str) -> str:
    """Folder holding the case folders (see the layout in the module docstring)."""
    candidates = [os.path.join(root, "CBIS-DDSM")]
    candidates += sorted(glob.glob(os.path.join(root, "manifest-*", "CBIS-DDSM")))
    for path in candidates:
        if os.path.isdir(path):
            return path
    return root


def _dicoms_under(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.dcm"), recursive=True))


def _area(path: str) -> int:
    # Imported here, not at the top: the phantom imports this module for its label
    # names in every render worker, and pydicom takes a quarter of a second.
    import pydicom  # pylint: disable=g-import-not-at-top

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return int(ds.Rows) * int(ds.Columns)


def _is_binary(path: str) -> bool:
    import pydicom  # pylint: disable=g-import-not-at-top  (see _area)

    pixels = pydicom.dcmread(path).pixel_array
    values = np.unique(pixels)
    return len(values) <= 2 and values[0] == 0


def split_roi_folder(folder: str) -> tuple[str | None, str | None]:
    """(cropped image, ROI mask) DICOM paths in an ROI folder; None where absent.

    The larger image is the mask (it has the full mammogram's size); equal sizes
    (or a single file) are decided by content: the mask is binary.
    """
    files = _dicoms_under(folder)
    if not files:
        return None, None
    if len(files) == 1:
        return (None, files[0]) if _is_binary(files[0]) else (files[0], None)
    areas = {f: _area(f) for f in files}
    smallest, largest = min(files, key=areas.get), max(files, key=areas.get)
    if areas[smallest] != areas[largest]:
        return smallest, largest
    binary = [f for f in files if _is_binary(f)]
    other = [f for f in files if f not in binary]
    return (other[0] if other else None), (binary[0] if binary else None)


def _read_cases(root: str) -> list[dict]:
    """All abnormalities of the four CSVs, with parsed labels and split."""
    csv_dirs = [root, _data_dir(root)]
    found, missing = {}, []
    for name in CSV_FILES:
        path = next(
            (os.path.join(d, name) for d in csv_dirs if os.path.isfile(os.path.join(d, name))), None
        )
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise layout_error(root, missing, DATASET, HINT, "case-description CSV(s)")
    cases = []
    for name, path in found.items():
        rows = _normalise_keys(read_csv(path))
        require_columns(rows, _COLUMNS, path)
        for line, row in enumerate(rows, start=2):
            where = f"{name}:{line}"
            official = CSV_FILES[name]
            patient = row["patient_id"].strip()
            split = official
            if official == "train" and carve_val(patient, VAL_FRACTION, _VAL_SALT):
                split = "val"
            laterality = _LATERALITY.get(row["left_or_right_breast"].strip().upper())
            if laterality is None:
                raise ValueError(
                    f"{where}: breast side {row['left_or_right_breast']!r} is not LEFT/RIGHT"
                )
            cases.append(
                {
                    "where": where,
                    "patient_id": patient,
                    "split": split,
                    "labels": _abnormality_labels(row, where),
                    "options": {
                        "view": row["image_view"].strip().upper(),
                        "laterality": laterality,
                    },
                    "image_folder": _folder_of(row["image_file_path"]),
                    "roi_folder": _folder_of(row["cropped_image_file_path"])
                    or _folder_of(row["roi_mask_file_path"]),
                }
            )
    return cases


def _check_folders(root: str, data_dir: str, folders: list[str]) -> None:
    missing = sorted({f for f in folders if not os.path.isdir(os.path.join(data_dir, f))})
    if missing:
        raise layout_error(
            root,
            missing,
            DATASET,
            HINT + " (a partial download: fetch the missing series)",
            f"case folder(s) referenced by the CSVs (looked in {data_dir!r})",
        )


def _resolve_rois(root: str, data_dir: str, folders: list[str], need_crop: bool) -> dict:
    """ROI folder -> (crop, mask); LayoutError listing every folder lacking a needed file."""
    resolved, problems = {}, []
    for folder in sorted(set(folders)):
        crop, mask = split_roi_folder(os.path.join(data_dir, folder))
        if crop is None and need_crop:
            problems.append(f"{folder}: no cropped lesion image among its DICOM files")
        elif mask is None and not need_crop:
            problems.append(f"{folder}: no ROI mask among its DICOM files")
        resolved[folder] = (crop, mask)
    if problems:
        raise layout_error(root, problems, DATASET, HINT, "ROI file(s)")
    return resolved


def _roi_rows(root: str, data_dir: str, cases: list[dict]) -> list[ManifestRow]:
    _check_folders(root, data_dir, [c["roi_folder"] for c in cases])
    rois = _resolve_rois(root, data_dir, [c["roi_folder"] for c in cases], need_crop=True)
    return [
        ManifestRow(
            path=rois[c["roi_folder"]][0],
            patient_id=c["patient_id"],
            labels=dict(c["labels"]),
            split=c["split"],
            options=dict(c["options"]),
            source=c["where"],
        )
        for c in cases
    ]


def _aggregate(labels: list[dict]) -> dict:
    """One full mammogram's labels from its abnormalities (module docstring)."""
    kind = labels[0]["abnormality"]
    malignant = any(lab["pathology"] % 2 == 1 for lab in labels)
    return {
        "pathology": (0 if kind == "mass" else 2) + int(malignant),
        "margins": [max(m) for m in zip(*(lab["margins"] for lab in labels))],
        "abnormality": kind,
        "assessment": max(lab["assessment"] for lab in labels),
        "subtlety": max(lab["subtlety"] for lab in labels),
        "breast_density": labels[0]["breast_density"],
        "num_abnormalities": len(labels),
    }


def _full_rows(root: str, data_dir: str, cases: list[dict]) -> list[ManifestRow]:
    by_image: dict[str, list[dict]] = {}
    for c in cases:
        by_image.setdefault(c["image_folder"], []).append(c)
    single = [group[0]["roi_folder"] for group in by_image.values() if len(group) == 1]
    _check_folders(root, data_dir, list(by_image) + single)
    rois = _resolve_rois(root, data_dir, single, need_crop=False)
    rows, empty = [], []
    for folder, group in by_image.items():
        files = _dicoms_under(os.path.join(data_dir, folder))
        if not files:
            empty.append(folder)
            continue
        masks = {"roi": rois[group[0]["roi_folder"]][1]} if len(group) == 1 else {}
        rows.append(
            ManifestRow(
                path=files[0],
                patient_id=group[0]["patient_id"],
                labels=_aggregate([c["labels"] for c in group]),
                split=group[0]["split"],
                options=dict(group[0]["options"]),
                mask_paths=masks,
                source=group[0]["where"],
            )
        )
    if empty:
        raise layout_error(root, sorted(empty), DATASET, HINT, "full-mammogram DICOM(s)")
    return rows


def build_rows(root: str, kind: str = "roi") -> list[ManifestRow]:
    """CBIS-DDSM rows under `root`: lesion crops (``kind="roi"``) or full
    mammograms (``kind="full"``); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise LayoutError(f"{DATASET}: input folder {root!r} does not exist.\n{HINT}")
    cases = _read_cases(root)
    data_dir = _data_dir(root)
    if kind == "roi":
        return _roi_rows(root, data_dir, cases)
    return _full_rows(root, data_dir, cases)


def build_full_rows(root: str) -> list[ManifestRow]:
    """Full-mammogram rows (``build_rows(root, kind="full")``)."""
    return build_rows(root, kind="full")


ROWS_BY_NAME = {"cbis_ddsm": build_rows, "cbis_ddsm_full": build_full_rows}
