"""ACDC, BraTS 2021 and X-ray landmark builders on tiny fake trees with the real layouts."""

import json
import math
import os

import cv2
import nibabel as nib
import numpy as np
import pytest

from input_pipeline import builders
from input_pipeline.builders import LayoutError, acdc, brats, landmarks

# --- helpers -----------------------------------------------------------------


def _write_nifti(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])).to_filename(path)


def _stripes(shape=(16, 12, 4), seed=0):
    """(labels, image): stripes 0..3, 4 voxels wide along the first axis, shifted
    by `seed`, and an image that is brighter where the label is higher, so a test
    can tell that image and mask stay aligned."""
    labels = ((np.arange(shape[0]) // 4 + seed) % 4)[:, None, None] * np.ones(shape, np.uint8)
    noise = np.random.default_rng(seed).integers(0, 40, size=shape)
    return labels.astype(np.uint8), (200 * labels + noise).astype(np.int16)


def _write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _write_image(path, width, height, value=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, np.full((height, width), value, np.uint8))


# --- ACDC ----------------------------------------------------------------------

ACDC_PATIENTS = {  # patient number -> (folder, ED, ES, group)
    1: ("training", 1, 12, "DCM"),
    2: ("training", 1, 9, "NOR"),
    10: ("training", 1, 14, "RV"),
    101: ("testing", 1, 7, "HCM"),
}


def _acdc_tree(root, with_test_gt=True, test_group=True):
    for number, (folder, ed, es, group) in ACDC_PATIENTS.items():
        pid = f"patient{number:03d}"
        pdir = os.path.join(root, "database", folder, pid)
        cfg = f"ED: {ed}\nES: {es}\n"
        if folder == "training" or test_group:
            cfg += f"Group: {group}\n"
        _write_text(
            os.path.join(pdir, "Info.cfg"),
            cfg + "Height: 184.0\nNbFrame: 30\nWeight: 95.0\n",
        )
        for frame in (ed, es):
            labels, image = _stripes(seed=frame)
            _write_nifti(os.path.join(pdir, f"{pid}_frame{frame:02d}.nii.gz"), image)
            if folder == "training" or with_test_gt:
                _write_nifti(os.path.join(pdir, f"{pid}_frame{frame:02d}_gt.nii.gz"), labels)
    return str(root)


def test_acdc_rows(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC")
    rows = builders.build_rows("acdc", root)
    assert len(rows) == 2 * len(ACDC_PATIENTS)
    by_key = {(r.patient_id, r.labels["phase"]): r for r in rows}
    row = by_key[("patient001", "ES")]
    pdir = os.path.join(root, "database", "training", "patient001")
    assert row.path == os.path.join(pdir, "patient001_frame12.nii.gz")
    assert row.mask_paths == {"mask": os.path.join(pdir, "patient001_frame12_gt.nii.gz")}
    assert row.options == {"nifti_mode": "slices", "slice_axis": 2}
    assert row.labels == {
        "group": "DCM",
        "group_id": 2,
        "phase": "ES",
        "frame": 12,
        "classes": ["background", "rv", "myocardium", "lv"],
        "superclass": "heart",
        "height_cm": 184.0,
        "weight_kg": 95.0,
        "num_frames": 30,
    }
    assert by_key[("patient002", "ED")].labels["group_id"] == 0  # NOR
    assert by_key[("patient101", "ED")].labels["group_id"] == 3  # HCM
    splits = {pid: r.split for (pid, _), r in by_key.items()}
    assert splits == {
        "patient001": "train",
        "patient002": "train",
        "patient010": "val",
        "patient101": "test",
    }
    for r in rows:
        assert os.path.isfile(r.path) and os.path.isfile(r.mask_paths["mask"])


def test_acdc_database_folder_as_root(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC")
    assert len(acdc.build_rows(os.path.join(root, "database"))) == 2 * len(ACDC_PATIENTS)


def test_acdc_test_set_without_ground_truth_or_group(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC", with_test_gt=False, test_group=False)
    rows = acdc.build_rows(root)
    test_rows = [r for r in rows if r.split == "test"]
    assert len(test_rows) == 2
    for r in test_rows:
        assert r.mask_paths == {}
        assert "group" not in r.labels and "group_id" not in r.labels
    assert all(r.mask_paths for r in rows if r.split != "test")


@pytest.mark.parametrize(
    "relpath",
    [
        "database/training/patient002/patient002_frame09_gt.nii.gz",
        "database/training/patient010/patient010_frame01.nii.gz",
        "database/testing/patient101/Info.cfg",
    ],
)
def test_acdc_missing_file_is_named(tmp_path, relpath):
    root = _acdc_tree(tmp_path / "ACDC")
    os.remove(os.path.join(root, relpath))
    with pytest.raises(LayoutError, match=relpath.replace("/", r"[/\\]")):
        acdc.build_rows(root)


def test_acdc_partial_test_ground_truth_is_a_broken_download(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC")
    missing = "database/testing/patient101/patient101_frame07_gt.nii.gz"
    os.remove(os.path.join(root, missing))
    with pytest.raises(LayoutError, match="patient101_frame07_gt"):
        acdc.build_rows(root)


def test_acdc_bad_info_cfg(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC")
    cfg = os.path.join(root, "database", "training", "patient001", "Info.cfg")
    _write_text(cfg, "ED: 1\nES: 12\nGroup: XYZ\n")
    with pytest.raises(LayoutError, match="unknown Group 'XYZ'"):
        acdc.build_rows(root)
    _write_text(cfg, "ED: 1\nGroup: DCM\n")
    with pytest.raises(LayoutError, match="'ES: N'"):
        acdc.build_rows(root)


def test_acdc_missing_root_folders(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        acdc.build_rows(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(LayoutError, match="database/training"):
        acdc.build_rows(str(tmp_path / "empty"))


# --- BraTS 2021 ------------------------------------------------------------------


def _brats_case(parent, case, seg=True):
    labels = _stripes((16, 8, 3))[0]
    for i, name in enumerate(brats.MODALITIES):  # channel i brightest where label == 3 - i
        _write_nifti(
            os.path.join(parent, case, f"{case}_{name}.nii.gz"), _stripes((16, 8, 3), i)[1]
        )
    if seg:
        _write_nifti(os.path.join(parent, case, f"{case}_seg.nii.gz"), labels)


def test_brats_rows(tmp_path):
    root = str(tmp_path / "brats")
    labelled = [f"BraTS2021_{i:05d}" for i in (0, 2, 3, 5)]
    for case in labelled:
        _brats_case(root, case)
    rows = builders.build_rows("brats2021", root)
    assert [r.patient_id for r in rows] == labelled
    row = rows[0]
    case_dir = os.path.join(root, "BraTS2021_00000")
    assert row.path == os.path.join(case_dir, "BraTS2021_00000_flair.nii.gz")
    assert row.channel_paths == [
        os.path.join(case_dir, f"BraTS2021_00000_{m}.nii.gz") for m in ("t1", "t1ce", "t2")
    ]
    assert row.channel_names == ["flair", "t1", "t1ce", "t2"]
    assert row.mask_paths == {"mask": os.path.join(case_dir, "BraTS2021_00000_seg.nii.gz")}
    assert row.options == {"nifti_mode": "slices", "slice_axis": 2}
    assert row.labels["classes"] == {"0": "background", "1": "ncr", "2": "edema", "4": "enhancing"}
    assert row.labels["superclass"] == "whole_tumour"
    assert row.labels["regions"]["tumour_core"] == [1, 4]
    assert [r.split for r in rows] == [brats.split_for_case(c) for c in labelled]


def test_brats_training_and_validation_side_by_side(tmp_path):
    root = str(tmp_path / "brats")
    _brats_case(os.path.join(root, "TrainingData"), "BraTS2021_00000")
    _brats_case(os.path.join(root, "TrainingData"), "BraTS2021_00002")
    _brats_case(os.path.join(root, "ValidationData"), "BraTS2021_00001", seg=False)
    rows = {r.patient_id: r for r in brats.build_rows(root)}
    assert sorted(rows) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    unlabelled = rows["BraTS2021_00001"]
    assert unlabelled.mask_paths == {} and unlabelled.split == "test"
    assert rows["BraTS2021_00002"].mask_paths


def test_brats_split_is_stable_and_roughly_80_10_10():
    cases = [f"BraTS2021_{i:05d}" for i in range(2000)]
    splits = [brats.split_for_case(c) for c in cases]
    assert splits == [brats.split_for_case(c) for c in cases]
    fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.8) < 0.03
    assert abs(fractions["val"] - 0.1) < 0.02 and abs(fractions["test"] - 0.1) < 0.02


@pytest.mark.parametrize(
    "case, missing",
    [
        ("BraTS2021_00002", "t1ce"),  # a modality
        ("BraTS2021_00000", "seg"),  # a segmentation beside labelled cases
    ],
)
def test_brats_missing_file_is_named(tmp_path, case, missing):
    root = str(tmp_path / "brats")
    for name in ("BraTS2021_00000", "BraTS2021_00002"):
        _brats_case(root, name)
    os.remove(os.path.join(root, case, f"{case}_{missing}.nii.gz"))
    with pytest.raises(LayoutError, match=f"{case}_{missing}.nii.gz"):
        brats.build_rows(root)


def test_brats_no_cases(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(LayoutError, match="case folders"):
        brats.build_rows(str(tmp_path / "empty"))


# --- ISBI 2015 cephalometric -----------------------------------------------------

CEPH_IMAGES = {"TrainingData": ["001", "131"], "Test1Data": ["151"], "Test2Data": ["301"]}
CEPH_SIZE = (60, 80)  # width, height


def _ceph_points(image_id, doctor):
    # Integer pixel positions, distinct per image, landmark and doctor, inside the image.
    base = int(image_id) % 7
    offset = 0 if doctor == "senior" else 2
    return [[3 + 3 * k + base, 4 + 3 * k + offset] for k in range(19)]


def _ceph_tree(root, flat=False):
    for folder, ids in CEPH_IMAGES.items():
        for image_id in ids:
            image_dir = (
                os.path.join(root, "raw") if flat else os.path.join(root, "RawImage", folder)
            )
            _write_image(os.path.join(image_dir, f"{image_id}.bmp"), *CEPH_SIZE)
            for doctor in ("senior", "junior"):
                lines = [f"{x},{y}" for x, y in _ceph_points(image_id, doctor)]
                text = "\n".join(lines + ["1", "3", "2", "1", "1", "2", "1", "3"]) + "\n"
                ann_dir = root if flat else os.path.join(root, "AnnotationsByMD")
                _write_text(os.path.join(ann_dir, f"400_{doctor}", f"{image_id}.txt"), text)
    return str(root)


@pytest.mark.parametrize("flat", [False, True])
def test_ceph_rows(tmp_path, flat):
    root = _ceph_tree(tmp_path / "ceph", flat=flat)
    rows = builders.build_rows("isbi2015_ceph", root)
    # The reference protocol: 1-130 train, 131-150 val, Test1 + Test2 pooled as test.
    assert {r.patient_id: r.split for r in rows} == {
        "001": "train",
        "131": "val",
        "151": "test",
        "301": "test",
    }
    assert {r.patient_id: r.labels["challenge_set"] for r in rows} == {
        "001": "train", "131": "train", "151": "test1", "301": "test2"}
    for r in rows:
        senior, junior = _ceph_points(r.patient_id, "senior"), _ceph_points(r.patient_id, "junior")
        assert os.path.isfile(r.path) and r.path.endswith(f"{r.patient_id}.bmp")
        assert r.labels == {"landmarks_senior": senior, "landmarks_junior": junior,
                            "challenge_set": r.labels["challenge_set"]}
        assert len(r.landmarks) == 19
        assert r.landmarks == [[s[0], s[1] + 1] for s in senior]  # junior is 2 rows lower
        assert r.options == {"spacing": [0.1, 0.1]}


def test_ceph_missing_annotation_is_named(tmp_path):
    root = _ceph_tree(tmp_path / "ceph")
    os.remove(os.path.join(root, "AnnotationsByMD", "400_junior", "151.txt"))
    with pytest.raises(LayoutError, match=r"400_junior[/\\]151\.txt"):
        landmarks.ceph_rows(root)


def test_ceph_bad_annotation(tmp_path):
    root = _ceph_tree(tmp_path / "ceph")
    path = os.path.join(root, "AnnotationsByMD", "400_senior", "131.txt")
    _write_text(path, "10,20\n" * 18)
    with pytest.raises(LayoutError, match="18 landmark lines, expected 19"):
        landmarks.ceph_rows(root)
    _write_text(path, "10;20\n" * 19)
    with pytest.raises(LayoutError, match=r"131\.txt:1: expected 'x,y'"):
        landmarks.ceph_rows(root)


def test_ceph_missing_split_folder(tmp_path):
    root = _ceph_tree(tmp_path / "ceph")
    os.rename(os.path.join(root, "RawImage", "Test2Data"), os.path.join(root, "RawImage", "t2"))
    with pytest.raises(LayoutError, match="RawImage/Test2Data"):
        landmarks.ceph_rows(root)


# --- Hand X-rays -------------------------------------------------------------------


def _hand_points(image_id):
    return [[10.0 + k + int(image_id) % 5, 20.5 + 2 * k] for k in range(37)]


def _hand_tree(root, ids=("3128", "3129", "3130"), csv_dir=""):
    for image_id in ids:
        _write_image(os.path.join(root, "jpg", f"{image_id}.jpg"), 64, 96)
    _write_image(os.path.join(root, "jpg", "9999.jpg"), 64, 96)  # not annotated
    lines = [",".join([i] + [f"{v:g}" for p in _hand_points(i) for v in p]) for i in ids]
    _write_text(os.path.join(root, csv_dir, "all.csv"), "\n".join(lines) + "\n")
    return str(root)


@pytest.mark.parametrize("csv_dir", ["", "labels"])
def test_hand_rows(tmp_path, monkeypatch, csv_dir):
    monkeypatch.setattr(landmarks, "HAND_SPLIT", (1, 1))
    root = _hand_tree(tmp_path / "hand", csv_dir=csv_dir)
    rows = builders.build_rows("hand_landmarks", root)
    assert [r.patient_id for r in rows] == ["3128", "3129", "3130"]  # 9999 has no annotation
    assert [r.split for r in rows] == ["train", "val", "test"]
    for r in rows:
        assert r.path == os.path.join(root, "jpg", f"{r.patient_id}.jpg")
        assert r.landmarks == _hand_points(r.patient_id)
        p1, p5 = r.landmarks[1], r.landmarks[5]
        assert r.labels["mm_per_pixel"] == pytest.approx(50.0 / math.dist(p1, p5))


def test_hand_missing_image_is_named(tmp_path):
    root = _hand_tree(tmp_path / "hand")
    os.remove(os.path.join(root, "jpg", "3129.jpg"))
    with pytest.raises(LayoutError, match=r"jpg/3129\.jpg"):
        landmarks.hand_rows(root)


def test_hand_wrong_coordinate_count(tmp_path):
    root = _hand_tree(tmp_path / "hand")
    _write_text(os.path.join(root, "all.csv"), "3128," + ",".join(["1"] * 72) + "\n")
    with pytest.raises(LayoutError, match="72 coordinates, expected 74"):
        landmarks.hand_rows(root)


def test_ordered_split():
    names = [f"{i:04d}" for i in range(10, 0, -1)]
    splits = landmarks.ordered_split(names, 6, 2)
    assert [splits[n] for n in sorted(names)] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2


# --- Chest X-rays -------------------------------------------------------------------

CHEST_SIZE = (50, 40)  # width, height
CHEST_NORMALISED = [[0.1, 0.2], [0.5, 0.25], [0.9, 0.5], [0.3, 0.75], [0.62, 0.6], [0.0, 1.0]]


def _chest_tree(root, names=("CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0059_0")):
    for i, name in enumerate(names):
        _write_image(os.path.join(root, "pngs", f"{name}.png"), *CHEST_SIZE)
        lines = [f"{x:.4f} {y:.4f}" for x, y in CHEST_NORMALISED]
        if i % 2 == 0:
            lines = ["6"] + lines  # Zhu et al.'s files start with the count
        _write_text(os.path.join(root, "labels", f"{name}.txt"), "\n".join(lines) + "\n")
    _write_image(os.path.join(root, "pngs", "CHNCXR_0003_1.png"), *CHEST_SIZE)  # unlabelled
    return str(root)


def test_chest_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(landmarks, "CHEST_SPLIT", (1, 0))
    root = _chest_tree(tmp_path / "chest")
    rows = builders.build_rows("chest_landmarks", root)
    assert {r.patient_id: r.split for r in rows} == {
        "CHNCXR_0001_0": "train",
        "CHNCXR_0002_0": "test",
        "CHNCXR_0059_0": "excluded",  # excluded by Zhu et al.'s configuration
    }
    width, height = CHEST_SIZE
    for r in rows:
        assert r.path == os.path.join(root, "pngs", f"{r.patient_id}.png")
        expected = np.array(CHEST_NORMALISED) * [width, height]
        np.testing.assert_allclose(r.landmarks, expected, atol=1e-9)
    np.testing.assert_allclose(rows[0].landmarks[1], [25.0, 10.0])


def test_chest_missing_png_is_named(tmp_path):
    root = _chest_tree(tmp_path / "chest")
    os.remove(os.path.join(root, "pngs", "CHNCXR_0002_0.png"))
    with pytest.raises(LayoutError, match=r"pngs/CHNCXR_0002_0\.png"):
        landmarks.chest_rows(root)


def test_chest_label_not_normalised(tmp_path):
    root = _chest_tree(tmp_path / "chest")
    _write_text(os.path.join(root, "labels", "CHNCXR_0001_0.txt"), "6\n" + "12 30\n" * 6)
    with pytest.raises(LayoutError, match="normalised"):
        landmarks.chest_rows(root)


def test_image_size_png_header_and_decoded_fallback(tmp_path):
    png, jpg = str(tmp_path / "a.png"), str(tmp_path / "a.jpg")
    _write_image(png, 37, 23)
    _write_image(jpg, 37, 23)
    assert landmarks.image_size(png) == (37, 23)
    assert landmarks.image_size(jpg) == (37, 23)


def test_landmarks_module_needs_a_dataset_name():
    with pytest.raises(ValueError, match="isbi2015_ceph"):
        landmarks.build_rows("/data")


# --- through tools/prepare_data.py ----------------------------------------------------


def _prepare(builder, root, out, size):
    """Ingests `root` with the builder in-process; returns {split: [(image, meta, extras)]}."""
    from array_record.python.array_record_module import ArrayRecordReader

    from input_pipeline import records
    from tools import prepare_data

    argv = ["--builder", builder, "--input", root, "--output", out, "--size", str(size)]
    argv += ["--workers", "1", "--no-progress", "--salt", "test-salt"]
    assert prepare_data.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rejected"] == 0
    decoded = {}
    for split in sorted(os.listdir(out)):
        if split.startswith(".") or not os.path.isdir(os.path.join(out, split)):
            continue
        for shard in records.list_shards(os.path.join(out, split)):
            reader = ArrayRecordReader(shard)
            decoded.setdefault(split, []).extend(
                records.decode_record_with_extras(data) for data in reader.read_all()
            )
            reader.close()
    return decoded


def _mean_by_label(image, mask, geometry):
    """Mean image value per label 0..3 over the resized content (padding left out)."""
    (top, left), (height, width) = geometry["pad"], geometry["resized_shape"]
    image, mask = (
        image[top : top + height, left : left + width],
        mask[top : top + height, left : left + width],
    )
    return [float(image[mask == k].mean()) for k in range(4)]


def test_acdc_prepare_data_end_to_end(tmp_path):
    root = _acdc_tree(tmp_path / "ACDC")
    decoded = _prepare("acdc", root, str(tmp_path / "out"), size=32)
    assert {split: len(recs) for split, recs in decoded.items()} == {
        "train": 16,  # patients 1 and 2, ED + ES, 4 slices each
        "val": 8,
        "test": 8,
    }
    for split, recs in decoded.items():
        for image, meta, extras in recs:
            assert image.shape == (32, 32) and sorted(extras) == ["mask"]
            mask = extras["mask"]
            assert mask.shape == image.shape
            assert meta["split"] == split and meta["superclass"] == "heart"
            assert meta["classes"] == ["background", "rv", "myocardium", "lv"]
            assert meta["phase"] in ("ED", "ES") and meta["spacing"] == [0.75, 0.75]
            assert meta["slice_spacing"] == 8.0  # the NIfTI's slice axis, for 3-D metrics
            # Labels survive resizing unblended, and the mask stays on its image:
            # the fake image is brighter where the label is higher.
            assert set(np.unique(mask)) == {0, 1, 2, 3}
            means = _mean_by_label(image, mask, meta["geometry"])
            assert means == sorted(means), means


def test_brats_prepare_data_end_to_end(tmp_path):
    root = str(tmp_path / "brats")
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        _brats_case(root, case)
    decoded = _prepare("brats2021", root, str(tmp_path / "out"), size=16)
    recs = [r for split in decoded.values() for r in split]
    assert len(recs) == 2 * 3  # two cases, three axial slices
    for image, meta, extras in recs:
        assert image.shape == (4, 16, 16) and extras["mask"].shape == (16, 16)
        assert meta["channels"] == ["flair", "t1", "t1ce", "t2"]
        assert meta["classes"] == {"0": "background", "1": "ncr", "2": "edema", "4": "enhancing"}
        for channel in range(4):  # channel i is brightest on label 3 - i: order and alignment
            means = _mean_by_label(image[channel], extras["mask"], meta["geometry"])
            assert int(np.argmax(means)) == 3 - channel, (channel, means)


CEPH_E2E_SIZE = (200, 248)  # width, height: scale 64 / 248 to --size 64


def _ceph_tree_with_blobs(root):
    """A cephalometric tree whose images are dark with a bright 9 x 9 blob centred at
    every (mean) landmark; junior = senior + 2 columns, so the mean is + 1."""
    width, height = CEPH_E2E_SIZE
    grid = [[25 + 45 * (k % 4), 22 + 50 * (k // 4)] for k in range(19)]
    rng = np.random.default_rng(0)
    for folder, ids in CEPH_IMAGES.items():
        for image_id in ids:
            image = rng.integers(10, 30, size=(height, width)).astype(np.uint8)
            for x, y in grid:
                image[y - 4 : y + 5, x + 1 - 4 : x + 1 + 5] = 255
            path = os.path.join(root, "RawImage", folder, f"{image_id}.bmp")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            assert cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
            for doctor, dx in (("senior", 0), ("junior", 2)):
                lines = [f"{x + dx},{y}" for x, y in grid] + ["2", "1", "3"]
                _write_text(
                    os.path.join(root, "AnnotationsByMD", f"400_{doctor}", f"{image_id}.txt"),
                    "\n".join(lines) + "\n",
                )
    return str(root)


def test_ceph_prepare_data_landmarks_follow_the_image(tmp_path):
    root = _ceph_tree_with_blobs(tmp_path / "ceph")
    decoded = _prepare("isbi2015_ceph", root, str(tmp_path / "out"), size=64)
    assert sorted(decoded) == ["test", "train", "val"]
    for image, meta, _ in [r for recs in decoded.values() for r in recs]:
        assert image.shape == (64, 64) and len(meta["landmarks"]) == 19
        bright = image > image.max() / 2
        for x, y in meta["landmarks"]:
            # The bright blob's centroid within a 7 x 7 window around the stored point.
            r0, c0 = round(y) - 3, round(x) - 3
            window = bright[max(r0, 0) : r0 + 7, max(c0, 0) : c0 + 7]
            rows, cols = np.nonzero(window)
            assert rows.size, (x, y)
            cy, cx = rows.mean() + max(r0, 0), cols.mean() + max(c0, 0)
            assert abs(cx - x) <= 1.0 and abs(cy - y) <= 1.0, ((x, y), (cx, cy))


def test_ceph_prepare_data_spacing_from_options(tmp_path):
    # BMP carries no spacing: the builder's 0.1 mm option is the source spacing,
    # scaled per axis by the exact resize (rounding makes the axes differ slightly).
    root = _ceph_tree_with_blobs(tmp_path / "ceph")
    decoded = _prepare("isbi2015_ceph", root, str(tmp_path / "out"), size=64)
    for _, meta, _ in [r for recs in decoded.values() for r in recs]:
        geometry = meta["geometry"]
        source, resized = geometry["source_shape"], geometry["resized_shape"]
        assert max(resized) == 64
        expected = [0.1 * source[0] / resized[0], 0.1 * source[1] / resized[1]]
        assert meta["spacing"] == pytest.approx(expected)
        assert expected[0] == pytest.approx(0.1 * max(source) / 64)
