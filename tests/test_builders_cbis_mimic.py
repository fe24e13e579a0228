"""CBIS-DDSM and MIMIC-CXR-JPG builders on tiny fake trees with the real layouts
and file formats (DICOM written with pydicom, JPG with OpenCV, gzipped CSVs)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from input_pipeline.builders import LayoutError, cbis_ddsm, mimic_cxr
from input_pipeline.builders import build_rows as build_by_name
from input_pipeline.builders._layout import carve_val, read_csv, require

import dicom_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UID = "1.3.6.1.4.1.9590.100.1.2."

# ----------------------------------------------------------------------------- CBIS-DDSM

MASS_HEADER = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]  # fmt: skip
CALC_HEADER = [
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]  # fmt: skip
FULL_SHAPE = (64, 48)
CROP_SHAPE = (20, 16)


def write_dicom(path: str, pixels: np.ndarray, patient: str) -> None:
    """A minimal but valid Part-10 MG DICOM file, MONOCHROME2, 8-bit for uint8 pixels."""
    ds = dicom_fixtures.image_dataset(
        pixels, modality="MG", patient_id=patient, sop_class=dicom_fixtures.SECONDARY_CAPTURE
    )
    ds.PatientName = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    dicom_fixtures.save(ds, path)


def _texture(shape, seed):
    return np.random.default_rng(seed).integers(100, 4000, size=shape, dtype=np.uint16)


def _mask(shape=FULL_SHAPE):
    mask = np.zeros(shape, np.uint8)
    mask[20:30, 10:22] = 255
    return mask


# One CSV row per abnormality: (csv, patient, side, view, id, type, shape/calc type,
# margins/calc distribution, assessment, pathology, subtlety, density, ROI arrangement).
CBIS_CASES = [
    ("mass_case_description_train_set.csv", "P_00001", "LEFT", "CC", 1, "mass", "IRREGULAR",
     "ILL_DEFINED-SPICULATED", 4, "BENIGN", 4, 3, "crop_first"),
    ("mass_case_description_train_set.csv", "P_00001", "LEFT", "CC", 2, "mass", "OVAL",
     "CIRCUMSCRIBED", 5, "MALIGNANT", 3, 3, "mask_first"),
    ("mass_case_description_train_set.csv", "P_00004", "RIGHT", "MLO", 1, "mass", "ROUND",
     "N/A", 3, "BENIGN_WITHOUT_CALLBACK", 5, 2, "two_series"),
    ("mass_case_description_train_set.csv", "P_00029", "LEFT", "MLO", 1, "mass", "LOBULATED",
     "OBSCURED-ILL_DEFINED", 4, "MALIGNANT", 2, 4, "crop_first"),
    ("mass_case_description_test_set.csv", "P_00016", "LEFT", "MLO", 1, "mass", "IRREGULAR",
     "MICROLOBULATED", 4, "MALIGNANT", 4, 2, "same_size"),
    ("calc_case_description_train_set.csv", "P_00005", "RIGHT", "CC", 1, "calcification",
     "AMORPHOUS", "CLUSTERED", 3, "BENIGN_WITHOUT_CALLBACK", 3, 3, "mask_first"),
    ("calc_case_description_test_set.csv", "P_00038", "LEFT", "CC", 1, "calcification",
     "PLEOMORPHIC", "SEGMENTAL", 4, "MALIGNANT", 2, 1, "crop_first"),
]  # fmt: skip


def _case_prefix(csv_name, patient, side, view):
    kind = "Mass" if csv_name.startswith("mass") else "Calc"
    split = "Training" if "train" in csv_name else "Test"
    return f"{kind}-{split}_{patient}_{side}_{view}"


def make_cbis(root: str) -> None:
    """CSVs in ROOT, DICOMs in ROOT/CBIS-DDSM as the NBIA Data Retriever lays them out."""
    data = os.path.join(root, "CBIS-DDSM")
    rows_by_csv = {}
    for seed, case in enumerate(CBIS_CASES):
        csv_name, patient, side, view, abn, kind, a, b, assess, path, subtle, dens, rois = case
        full = _case_prefix(csv_name, patient, side, view)
        roi = f"{full}_{abn}"
        full_file = os.path.join(data, full, "07-20-2016-DDSM-74994",
                                 "1.000000-full mammogram images-24515", "1-1.dcm")  # fmt: skip
        if not os.path.exists(full_file):
            write_dicom(full_file, _texture(FULL_SHAPE, seed), full)
        study = os.path.join(data, roi, "07-21-2016-DDSM-17686")
        crop = _texture(FULL_SHAPE if rois == "same_size" else CROP_SHAPE, 100 + seed)
        series = os.path.join(study, "1.000000-ROI mask images-94682")
        if rois == "crop_first":
            write_dicom(os.path.join(series, "1-1.dcm"), crop, roi)
            write_dicom(os.path.join(series, "1-2.dcm"), _mask(), roi)
        elif rois in ("mask_first", "same_size"):
            write_dicom(os.path.join(series, "1-1.dcm"), _mask(), roi)
            write_dicom(os.path.join(series, "1-2.dcm"), crop, roi)
        else:  # crop and mask in two series folders, both named 1-1.dcm
            write_dicom(os.path.join(series, "1-1.dcm"), _mask(), roi)
            write_dicom(os.path.join(study, "1.000000-cropped images-10393", "1-1.dcm"), crop, roi)
        uids = f"{UID}{seed}11/{UID}{seed}12"
        rows_by_csv.setdefault(csv_name, []).append([
            patient, dens, side, view, abn, kind, a, b, assess, path, subtle,
            f"{full}/{uids}/000000.dcm", f"{roi}/{UID}{seed}21/{UID}{seed}22/000000.dcm",
            f"{roi}/{UID}{seed}21/{UID}{seed}22/000001.dcm\n",  # CBIS CSVs do end some with \n
        ])  # fmt: skip
    for csv_name in cbis_ddsm.CSV_FILES:
        header = MASS_HEADER if csv_name.startswith("mass") else CALC_HEADER
        with open(os.path.join(root, csv_name), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows_by_csv.get(csv_name, []))


@pytest.fixture(scope="module")
def cbis_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cbis"))
    make_cbis(root)
    return root


def _roi_name(row):
    return row.path.split(os.sep + "CBIS-DDSM" + os.sep)[1].split(os.sep)[0]


def test_cbis_roi_rows_labels_splits_and_crops(cbis_root):
    rows = cbis_ddsm.build_rows(cbis_root)
    assert len(rows) == len(CBIS_CASES)
    by_roi = {_roi_name(r): r for r in rows}
    assert set(by_roi) == {f"{_case_prefix(c[0], c[1], c[2], c[3])}_{c[4]}" for c in CBIS_CASES}

    r = by_roi["Mass-Training_P_00001_LEFT_CC_1"]
    assert r.labels == {
        "pathology": 0, "margins": [0, 0, 1, 0, 1], "abnormality": "mass",
        "assessment": 4, "subtlety": 4, "breast_density": 3,
    }  # fmt: skip
    assert r.patient_id == "P_00001" and r.split == "train" and r.mask_paths == {}
    assert r.options == {"view": "CC", "laterality": "L"}
    assert r.source == "mass_case_description_train_set.csv:2"
    assert by_roi["Mass-Training_P_00001_LEFT_CC_2"].labels["pathology"] == 1
    assert by_roi["Mass-Training_P_00001_LEFT_CC_2"].labels["margins"] == [1, 0, 0, 0, 0]
    bwc = by_roi["Mass-Training_P_00004_RIGHT_MLO_1"]
    assert bwc.labels["pathology"] == 0 and bwc.labels["margins"] == [0] * 5
    assert bwc.options == {"view": "MLO", "laterality": "R"}
    assert by_roi["Mass-Training_P_00029_LEFT_MLO_1"].split == "val"  # carved by patient hash
    assert by_roi["Mass-Training_P_00029_LEFT_MLO_1"].labels["margins"] == [0, 1, 1, 0, 0]
    test_mass = by_roi["Mass-Test_P_00016_LEFT_MLO_1"]
    assert test_mass.split == "test" and test_mass.labels["margins"] == [0, 0, 0, 1, 0]
    calc = by_roi["Calc-Training_P_00005_RIGHT_CC_1"]
    assert calc.labels == {
        "pathology": 2, "margins": [0] * 5, "abnormality": "calcification",
        "assessment": 3, "subtlety": 3, "breast_density": 3,
    }  # fmt: skip
    assert by_roi["Calc-Test_P_00038_LEFT_CC_1"].labels["pathology"] == 3
    assert by_roi["Calc-Test_P_00038_LEFT_CC_1"].labels["breast_density"] == 1

    # Every row's image is the crop, whatever TCIA's numbering or series folders say.
    for case in CBIS_CASES:
        row = by_roi[f"{_case_prefix(*case[:4])}_{case[4]}"]
        pixels = pydicom.dcmread(row.path).pixel_array
        assert len(np.unique(pixels)) > 2, row.path  # not the binary mask
        if case[-1] != "same_size":
            assert pixels.shape == CROP_SHAPE


def test_cbis_full_rows_aggregate_abnormalities(cbis_root):
    rows = cbis_ddsm.ROWS_BY_NAME["cbis_ddsm_full"](cbis_root)
    assert len(rows) == 6  # P_00001 LEFT CC holds two masses
    by_case = {_roi_name(r): r for r in rows}
    two = by_case["Mass-Training_P_00001_LEFT_CC"]
    assert two.labels == {
        "pathology": 1, "margins": [1, 0, 1, 0, 1], "abnormality": "mass", "assessment": 5,
        "subtlety": 4, "breast_density": 3, "num_abnormalities": 2,
    }  # fmt: skip
    assert two.mask_paths == {}  # several abnormalities: no single mask
    assert pydicom.dcmread(two.path).pixel_array.shape == FULL_SHAPE
    one = by_case["Mass-Training_P_00004_RIGHT_MLO"]
    mask = pydicom.dcmread(one.mask_paths["roi"]).pixel_array
    assert mask.shape == FULL_SHAPE and set(np.unique(mask)) == {0, 255}
    assert by_case["Calc-Test_P_00038_LEFT_CC"].split == "test"


def test_cbis_registry_name_gives_roi_rows(cbis_root):
    rows = build_by_name("cbis_ddsm", cbis_root)
    assert len(rows) == len(CBIS_CASES)
    with pytest.raises(ValueError, match="kind"):
        cbis_ddsm.build_rows(cbis_root, kind="patch")


def test_cbis_missing_csv_and_folders_are_named(cbis_root, tmp_path):
    root = str(tmp_path / "cbis")
    shutil.copytree(cbis_root, root)
    os.remove(os.path.join(root, "calc_case_description_test_set.csv"))
    os.remove(os.path.join(root, "mass_case_description_test_set.csv"))
    with pytest.raises(LayoutError) as err:
        cbis_ddsm.build_rows(root)
    assert "calc_case_description_test_set.csv" in str(err.value)
    assert "mass_case_description_test_set.csv" in str(err.value)
    assert "cancerimagingarchive" in str(err.value)

    root = str(tmp_path / "partial")
    shutil.copytree(cbis_root, root)
    shutil.rmtree(os.path.join(root, "CBIS-DDSM", "Mass-Training_P_00001_LEFT_CC_2"))
    shutil.rmtree(os.path.join(root, "CBIS-DDSM", "Calc-Test_P_00038_LEFT_CC_1"))
    with pytest.raises(LayoutError) as err:
        cbis_ddsm.build_rows(root)
    message = str(err.value)
    assert "Mass-Training_P_00001_LEFT_CC_2" in message and "Calc-Test_P_00038_LEFT_CC_1" in message
    assert "2 expected" in message
    shutil.rmtree(os.path.join(root, "CBIS-DDSM", "Mass-Test_P_00016_LEFT_MLO"))
    with pytest.raises(LayoutError, match="Mass-Test_P_00016_LEFT_MLO"):
        cbis_ddsm.build_rows(root, kind="full")


def test_cbis_roi_folder_without_crop_is_named(cbis_root, tmp_path):
    root = str(tmp_path / "cbis")
    shutil.copytree(cbis_root, root)
    series = os.path.join(root, "CBIS-DDSM", "Mass-Training_P_00004_RIGHT_MLO_1")
    shutil.rmtree(os.path.join(series, "07-21-2016-DDSM-17686", "1.000000-cropped images-10393"))
    with pytest.raises(LayoutError, match="Mass-Training_P_00004_RIGHT_MLO_1: no cropped"):
        cbis_ddsm.build_rows(root)


def test_cbis_margin_parsing():
    assert cbis_ddsm.parse_margins("CIRCUMSCRIBED-OBSCURED-ILL_DEFINED") == [1, 1, 1, 0, 0]
    assert cbis_ddsm.parse_margins("") == [0] * 5
    with pytest.raises(ValueError, match="SMOOTH"):
        cbis_ddsm.parse_margins("SMOOTH", "x.csv:3")


def test_layout_helpers(tmp_path):
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(b"x, y \n1,2\n"))
    assert read_csv(str(tmp_path / "a.csv.gz")) == [{"x": "1", "y": "2"}]
    assert require(str(tmp_path), [("a.csv", "a.csv.gz")], "D", "hint") == [
        str(tmp_path / "a.csv.gz")
    ]
    with pytest.raises(LayoutError, match=r"(?s)b\.txt.*c/d.*get it here"):
        require(str(tmp_path), ["a.csv.gz", "b.txt", "c/d"], "D", "get it here")
    ids = [f"P_{i:05d}" for i in range(2000)]
    assert 0.07 < sum(carve_val(i, 0.1, "s") for i in ids) / len(ids) < 0.13


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
REPORT_IMPRESSION_ONLY = """ WET READ: ___ ___ ___ 10:45 AM
  No pneumothorax.
 ______________________________________________________________________________
                                 FINAL REPORT
 HISTORY:  Line placement.

 IMPRESSION:  Right internal jugular line ends in the
 low SVC.  No pneumothorax.
"""
REPORT_NO_SECTIONS = """                                 FINAL REPORT
 PORTABLE CHEST OF ___

 COMPARISON:  ___ radiograph.

 Lines and tubes are unchanged in position.  Mild
 pulmonary edema has improved.
"""
# subject, study, dicom, split, ViewPosition, ViewCodeSequence_CodeMeaning, report
MIMIC_IMAGES = [
    ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "train", "PA",
     "postero-anterior", REPORT_FULL),
    ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "train", "LATERAL",
     "lateral", REPORT_FULL),
    ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "validate", "AP",
     "antero-posterior", REPORT_IMPRESSION_ONLY),
    ("11000011", "53211219", "3a7d3c38-7d2b1bbb-8e8d2a06-36a66ba8-b2ca6bd1", "test", "",
     "antero-posterior", REPORT_NO_SECTIONS),
    ("11000011", "53211219", "ab1e6a41-1b1f9f79-1cbb1a6c-e6a2bf6b-54b4e26f", "test", "LAO",
     "left anterior oblique", REPORT_NO_SECTIONS),
]  # fmt: skip
CHEXPERT = {  # study -> {label: cell}; every other cell blank
    "50414267": {"No Finding": "1.0"},
    "57375967": {"Pneumothorax": "0.0", "Support Devices": "1.0", "Atelectasis": "-1.0"},
    # 53211219 has no CheXpert row
}


def _write_csv_gz(path: str, header: list[str], rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    with gzip.open(path, "wt", newline="") as f:
        f.write(text.getvalue())


def make_mimic(root: str) -> None:
    meta, split = [], []
    for i, (subject, study, dicom, sp, view, meaning, report) in enumerate(MIMIC_IMAGES):
        folder = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        os.makedirs(folder, exist_ok=True)
        image = np.random.default_rng(i).integers(0, 255, size=(40, 32), dtype=np.uint8)
        assert cv2.imwrite(os.path.join(folder, f"{dicom}.jpg"), image)
        reports = os.path.join(root, "reports", "files", f"p{subject[:2]}", f"p{subject}")
        os.makedirs(reports, exist_ok=True)
        with open(os.path.join(reports, f"s{study}.txt"), "w") as f:
            f.write(report)
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "40", "32", "21800506",
                     "213014.531", "CHEST (PA AND LAT)", meaning, "Erect"])  # fmt: skip
        split.append([dicom, study, subject, sp])
    _write_csv_gz(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
                  ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                   "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                   "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                   "PatientOrientationCodeSequence_CodeMeaning"], meta)  # fmt: skip
    _write_csv_gz(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"),
                  ["dicom_id", "study_id", "subject_id", "split"], split)  # fmt: skip
    studies = {(s[0], s[1]) for s in MIMIC_IMAGES if s[1] in CHEXPERT}
    _write_csv_gz(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"),
                  ["subject_id", "study_id", *mimic_cxr.CHEXPERT_LABELS],
                  [[subj, study, *(CHEXPERT[study].get(n, "") for n in mimic_cxr.CHEXPERT_LABELS)]
                   for subj, study in sorted(studies)])  # fmt: skip


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mimic"))
    make_mimic(root)
    return root


def _chexpert(**cells):
    return [cells.get(n.replace(" ", "_"), 0) for n in mimic_cxr.CHEXPERT_LABELS]


def test_mimic_rows(mimic_root):
    rows = mimic_cxr.build_rows(mimic_root)
    assert len(rows) == len(MIMIC_IMAGES)
    by_dicom = {os.path.basename(r.path)[: -len(".jpg")]: r for r in rows}
    for subject, study, dicom, *_ in MIMIC_IMAGES:
        row = by_dicom[dicom]
        assert os.path.isfile(row.path) and row.patient_id == subject
        assert f"p{subject}{os.sep}s{study}" in row.path

    pa, lat, ap, blank, lao = (by_dicom[d[2]] for d in MIMIC_IMAGES)
    assert [r.split for r in (pa, lat, ap, blank, lao)] == ["train", "train", "val", "test", "test"]
    assert pa.report == (
        "FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
        "nodular opacities that most likely represent nipple shadows. "
        "IMPRESSION: No acute cardiopulmonary process."
    )
    assert pa.labels["impression"] == "No acute cardiopulmonary process."
    assert pa.labels["findings"].startswith("There is no focal consolidation")
    assert pa.labels["chexpert"] == _chexpert(No_Finding=1) and lat.report == pa.report
    assert ap.report == (
        "IMPRESSION: Right internal jugular line ends in the low SVC. No pneumothorax."
    )
    assert ap.labels["findings"] == ""
    assert ap.labels["chexpert"] == _chexpert(Atelectasis=-1, Support_Devices=1)
    assert blank.report == (
        "PORTABLE CHEST OF ___ Lines and tubes are unchanged in position. Mild pulmonary edema "
        "has improved."
    )
    assert blank.labels["findings"] == blank.labels["impression"] == ""
    assert "chexpert" not in blank.labels
    assert [r.labels["view_group"] for r in (pa, lat, ap, blank, lao)] == [
        "frontal", "lateral", "frontal", "frontal", "other",
    ]  # fmt: skip
    assert pa.options == {"view": "PA"} and blank.options == {}


def test_mimic_report_sections():
    report, findings, impression = mimic_cxr.parse_report(
        "FINAL REPORT\n FINDINGS AND IMPRESSION:  Normal chest.\n\n CONCLUSION: None acute.\n"
    )
    assert (findings, impression) == ("Normal chest.", "None acute.")
    assert report == "FINDINGS: Normal chest. IMPRESSION: None acute."
    assert mimic_cxr.view_group("AP AXIAL") == "frontal"
    assert mimic_cxr.view_group("LL") == "lateral"
    assert mimic_cxr.view_group("", "lateral") == "lateral"


def test_mimic_missing_files_are_named(mimic_root, tmp_path):
    root = str(tmp_path / "mimic")
    shutil.copytree(mimic_root, root)
    os.remove(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"))
    with pytest.raises(LayoutError, match="mimic-cxr-2.0.0-split.csv") as err:
        mimic_cxr.build_rows(root)
    assert "physionet.org" in str(err.value)

    root = str(tmp_path / "partial")
    shutil.copytree(mimic_root, root)
    lost = MIMIC_IMAGES[2]
    os.remove(os.path.join(root, mimic_cxr.jpg_relpath(*lost[:3])))
    os.remove(os.path.join(root, "reports", "files", "p10", "p10000032", "s50414267.txt"))
    with pytest.raises(LayoutError) as err:
        mimic_cxr.build_rows(root)
    assert f"{lost[2]}.jpg" in str(err.value) and "s50414267.txt" in str(err.value)

    rows = mimic_cxr.build_rows(root, allow_partial=True)
    assert len(rows) == len(MIMIC_IMAGES) - 1
    assert all(r.report is None for r in rows if r.patient_id == "10000032")
    assert all(r.report for r in rows if r.patient_id != "10000032")

    moved = str(tmp_path / "elsewhere")
    shutil.move(os.path.join(root, "reports"), moved)
    with pytest.raises(LayoutError, match="reports_dir"):
        mimic_cxr.build_rows(root, allow_partial=True)
    rows = mimic_cxr.build_rows(root, reports_dir=moved, allow_partial=True)
    assert sum(r.report is not None for r in rows) == 2
    assert all(r.report is None for r in mimic_cxr.build_rows(root, allow_partial=True,
                                                               with_reports=False))  # fmt: skip


# ----------------------------------------------------------------------------- end to end


def _ingestion_ready() -> bool:
    try:
        from input_pipeline.ingest import engine, preprocess, readers  # noqa: F401
    except ImportError:
        return False
    return True


needs_ingestion = pytest.mark.skipif(
    not _ingestion_ready(), reason="ingestion engine (input_pipeline/ingest) not complete yet"
)


def _read_records(out: str) -> list[tuple]:
    """(image, meta, extras) of every record in OUT's split folders."""
    from array_record.python.array_record_module import ArrayRecordReader

    from input_pipeline import records

    decoded = []
    for split in ("train", "val", "test"):
        for shard in records.list_shards(os.path.join(out, split)):
            reader = ArrayRecordReader(shard)
            decoded += [records.decode_record_with_extras(data) for data in reader.read_all()]
            reader.close()
    return decoded


def _prepare(builder: str, root: str, out: str) -> list[tuple]:
    """Runs tools/prepare_data.py; returns the (image, meta, extras) of every record."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), "--builder", builder,
           "--input", root, "--output", out, "--size", "32", "--workers", "1", "--no-progress",
           "--salt", "test-salt"]  # fmt: skip
    done = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rejected"] == 0, done.stdout
    return _read_records(out)


@needs_ingestion
def test_cbis_prepare_data_end_to_end(cbis_root, tmp_path):
    decoded = _prepare("cbis_ddsm", cbis_root, str(tmp_path / "out"))
    rows = cbis_ddsm.build_rows(cbis_root)
    assert len(decoded) == len(rows)
    want = sorted((r.split, r.labels["pathology"], tuple(r.labels["margins"])) for r in rows)
    got = sorted((m["split"], m["pathology"], tuple(m["margins"])) for _, m, _ in decoded)
    assert got == want
    for image, meta, _ in decoded:
        assert image.shape == (32, 32) and image.dtype == np.uint16
        assert meta["abnormality"] in ("mass", "calcification") and "P_0" not in str(meta)


@needs_ingestion
def test_mimic_prepare_data_end_to_end(mimic_root, tmp_path):
    decoded = _prepare("mimic_cxr", mimic_root, str(tmp_path / "out"))
    rows = mimic_cxr.build_rows(mimic_root)
    assert len(decoded) == len(rows) == len(MIMIC_IMAGES)
    got = sorted(
        (m["split"], m["view_group"], m["report"], str(m.get("chexpert"))) for _, m, _ in decoded
    )
    want = [
        (r.split, r.labels["view_group"], r.report, str(r.labels.get("chexpert"))) for r in rows
    ]
    assert got == sorted(want)


@needs_ingestion
def test_cbis_full_rows_carry_their_mask_through_ingestion(cbis_root, tmp_path):
    from input_pipeline.ingest import engine

    out = str(tmp_path / "full")
    rows = cbis_ddsm.build_rows(cbis_root, kind="full")
    engine.ingest(rows, out, size=32, workers=1, salt="test-salt", progress=False,
                  log=lambda _: None)  # fmt: skip
    decoded = _read_records(out)
    assert len(decoded) == len(rows)
    for image, meta, extras in decoded:
        assert ("roi" in extras) == (meta["num_abnormalities"] == 1)
        if "roi" in extras:
            assert extras["roi"].shape == image.shape and extras["roi"].max() > 0
    assert sum("roi" in extras for _, _, extras in decoded) == 5
