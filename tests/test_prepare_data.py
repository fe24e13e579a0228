"""tools/prepare_data.py and the ingestion engine: real DICOM to shards the
pretraining reads, de-identification against the Annex E profile, resume after a
kill, patient-level splits, manifests (labels, reports, landmarks, masks).

Tiny images throughout; the command line runs as a subprocess where exit codes,
process kills or spawned workers matter, the engine in-process elsewhere.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import data_store
import numpy as np
import pydicom
import pytest

from input_pipeline import pipeline, records, sources
from input_pipeline.ingest import convert, deid, engine, manifest
from input_pipeline.ingest.manifest import ManifestRow

import dicom_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "prepare_data.py")
DICOM_DATA = os.path.join(os.path.dirname(data_store.__file__), "data")
GOOD_DICOM = ["RG1_UNCR.dcm", "RG3_J2KR.dcm", "693_J2KR.dcm", "emri_small_RLE.dcm"]
SALT = "test-salt-not-secret"


def cli_args(**options) -> list[str]:
    """prepare_data.py arguments: input="x", rows_per_shard=3, strict=True ->
    ["--input", "x", "--rows-per-shard", "3", "--strict"]."""
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def run_cli(*args, timeout=120, **options):
    return subprocess.run(
        [sys.executable, TOOL, *map(str, args), *cli_args(**options), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def read_split(split_dir) -> list[tuple[np.ndarray, dict, dict]]:
    """(image, meta, extras) of every record of a split folder, shards in order."""
    from array_record.python import array_record_module

    out = []
    for path in records.list_shards(str(split_dir)):
        reader = array_record_module.ArrayRecordReader(path)
        out += [records.decode_record_with_extras(r) for r in reader.read_all()]
        reader.close()
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def shard_files(split_dir) -> list[str]:
    return sorted(p for p in os.listdir(split_dir) if p.endswith(records.SHARD_SUFFIX))


def write_png(path, image) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return str(path)


def noise_png(path, seed, size=16) -> str:
    rng = np.random.default_rng(seed)
    return write_png(path, rng.integers(0, 256, (size, size), dtype=np.uint8))


# ------------------------------------------------------------------ real DICOM folder
@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    """pydicom-data files plus one broken file of each kind; {name: reason regex}."""
    root = tmp_path_factory.mktemp("dicom_in")
    for name in GOOD_DICOM:
        shutil.copy(os.path.join(DICOM_DATA, name), root / name)
    (root / "nested").mkdir()
    bad = {
        "empty.dcm": "empty",
        "nested/truncated": "truncated|corrupt",  # no extension: found by content
        "random.dcm": "unknown file type",
        "nested/report.dcm": "non-image",
        "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated|corrupt|decode",
    }
    (root / "empty.dcm").write_bytes(b"")
    with open(os.path.join(DICOM_DATA, "693_J2KR.dcm"), "rb") as f:
        whole = f.read()
    (root / "nested" / "truncated").write_bytes(whole[: len(whole) // 2])
    (root / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.copy(pydicom.data.get_testdata_file("test-SR.dcm"), root / "nested" / "report.dcm")
    shutil.copy(
        os.path.join(DICOM_DATA, "emri_small_jpeg_2k_lossless_too_short.dcm"),
        root / "emri_small_jpeg_2k_lossless_too_short.dcm",
    )
    (root / "README.txt").write_text("not an image, ignored by extension")
    (root / ".hidden.dcm").write_bytes(b"hidden files are skipped")
    return root, bad


@pytest.fixture(scope="module")
def dicom_run(dicom_folder, tmp_path_factory):
    root, _ = dicom_folder
    out = tmp_path_factory.mktemp("dicom_out") / "out"
    result = run_cli(
        input=root, output=out, size=64, split="1", workers=2, rows_per_shard=3, salt=SALT
    )
    return out, result


def expected_frames() -> int:
    headers = [
        pydicom.dcmread(os.path.join(DICOM_DATA, n), stop_before_pixels=True) for n in GOOD_DICOM
    ]
    return sum(int(h.get("NumberOfFrames", 1)) for h in headers)


def test_real_dicom_folder_becomes_shards(dicom_folder, dicom_run):
    root, bad = dicom_folder
    out, result = dicom_run
    assert result.returncode == 0, result.stderr
    src = sources.ArrayRecordImageSource(str(out / "train"))
    assert len(src) == expected_frames() == 13
    modalities = sorted({src[i]["meta"]["modality"] for i in range(len(src))})
    assert modalities == ["CR", "CT", "MR"]
    for i in range(len(src)):
        e = src[i]
        assert e["image"].shape == (64, 64) and e["image"].dtype == np.uint16
        assert e["image"].max() > e["image"].min()
        assert e["meta"]["bits_stored"] == 16 and e["meta"]["split"] == "train"
    frames = [src[i]["meta"]["source_index"] for i in range(len(src))]
    assert sorted(f["frame"] for f in frames if f) == list(range(10))  # multi-frame RLE

    rejected = read_jsonl(out / "rejected.jsonl")
    by_path = {os.path.relpath(r["path"], root): r["reason"] for r in rejected}
    assert set(by_path) == set(bad), by_path
    for name, pattern in bad.items():
        assert any(p in by_path[name].lower() for p in pattern.split("|")), (name, by_path[name])
    summary = read_json(out / "summary.json")
    assert summary["records"] == 13 and summary["rejected"] == len(bad)
    assert sum(summary["rejected_by_reason"].values()) == len(bad)
    assert summary["ignored_files"] == {".txt": 1}
    assert "13 records" in result.stdout and "rejected 5" in result.stdout
    # 9 rows at 3 per shard; every shard has its completion marker.
    assert shard_files(out / "train") == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert len(os.listdir(out / ".done")) == 3


def test_strict_stops_at_first_rejection(dicom_folder, tmp_path):
    root, bad = dicom_folder
    result = run_cli(
        input=root, output=tmp_path / "out", size=32, strict=True, workers=1, salt=SALT
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("prepare_data: rejected (--strict): ")
    assert any(str(root / name) in message for name in bad), message


def test_pretraining_pipeline_reads_the_output(dicom_run):
    out, result = dicom_run
    assert result.returncode == 0, result.stderr
    cfg = pipeline.default_data_config()
    cfg.update(source="shards", dir=str(out / "train"), num_workers=0, num_threads=1)
    ds = pipeline.make_pretrain_dataset(cfg, scales=(16, 32), global_batch_size=4, seed=0)
    it = iter(ds)
    batch = next(it)
    it.close()
    assert batch["image_16"].shape == (4, 16, 16, 1)
    assert batch["image_32"].shape == (4, 32, 32, 1)
    assert np.isfinite(batch["image_32"]).all() and batch["image_32"].std() > 0


def test_help_documents_the_options():
    result = run_cli("--help")
    assert result.returncode == 0
    options = "--input --output --size --builder --window --split --salt --workers"
    for option in (options + " --rows-per-shard --strict --overwrite examples:").split():
        assert option in result.stdout, option


# ------------------------------------------------------------------ de-identification
def test_no_annex_e_attribute_reaches_the_output(tmp_path):
    """Every Table E.1-1 attribute, private tag and nested patient name carries a
    unique marker; none of them may appear in any byte the run writes."""
    src = tmp_path / "in"
    markers = {}  # "file:where" -> marker
    for i in range(3):
        written = dicom_fixtures.write_marked_dicom(src / f"image_{i}.dcm", file_index=i)
        markers.update({f"{i}:{where}": m for where, m in written.items()})
    # A marked file that is rejected (no Pixel Data): its reason must not leak either.
    written = dicom_fixtures.write_marked_dicom(src / "nested" / "no_pixels", 3, False)
    markers.update({f"3:{where}": m for where, m in written.items()})
    assert len(dicom_fixtures.annex_e_keywords()) > 350
    assert len(set(markers.values())) == len(markers) > 4 * 400
    # The test can fail: the inputs do hold every marker.
    input_bytes = b"".join(p.read_bytes() for p in src.rglob("*") if p.is_file())
    assert [w for w, m in markers.items() if m.encode() not in input_bytes] == []

    out = tmp_path / "out"
    result = run_cli(input=src, output=out, size=32, workers=1, split="0.5,0.5")
    assert result.returncode == 0, result.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"plan.json", "summary.json", "rejected.jsonl", ".deid_salt"} <= names
    assert any(n.endswith(records.SHARD_SUFFIX) for n in names)
    blobs = {str(p): p.read_bytes() for p in written}
    blobs["stdout"] = result.stdout.encode()
    blobs["stderr"] = result.stderr.encode()
    leaks = [
        (w, where)
        for where, data in blobs.items()
        for w, m in markers.items()
        if m.encode() in data
    ]
    assert leaks == []

    recs = [
        r for split in ("train", "val") if (out / split).exists() for r in read_split(out / split)
    ]
    assert len(recs) == 3
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [os.path.basename(r["path"]) for r in rejected] == ["no_pixels"]
    # Split key and pseudonym come from the header's PatientID, hashed with the salt.
    salt = (out / ".deid_salt").read_text().strip()
    assert oct(os.stat(out / ".deid_salt").st_mode & 0o777) == "0o600"
    hashes = {r[1]["patient"] for r in recs}
    expected = {deid.hash_patient_id(markers[f"{i}:PatientID"], salt) for i in range(3)}
    assert hashes == expected
    allowed = convert.TECHNICAL_KEYS
    for _, meta, _ in recs:
        assert set(meta) <= allowed, set(meta) - allowed


# ------------------------------------------------------------------ resume
def _png_folder(root, n, size=16):
    for i in range(n):
        noise_png(root / f"img_{i:04d}.png", seed=i, size=size)
    return root


def _ingest_rows(rows, out, **kw):
    """engine.ingest of manifest rows in this process: 16 px, every row in "train"
    unless the row names its split or `kw` says otherwise."""
    kw = {"size": 16, "workers": 1, "salt": SALT, "fractions": {"train": 1.0},
          "progress": False, **kw}
    return engine.ingest(rows, str(out), **kw)


def _ingest(src, out, **kw):
    """_ingest_rows of a scanned image folder, 3 rows per shard."""
    rows = manifest.scan_directory(str(src))
    return _ingest_rows(rows, out, **{"rows_per_shard": 3, "base_dir": str(src), **kw})


def test_rerun_rewrites_only_the_missing_shard(tmp_path):
    src = _png_folder(tmp_path / "in", 12)
    out = tmp_path / "out"
    first = _ingest(src, out)
    assert first.shards_written == 4 and first.records == 12
    before = read_split(out / "train")
    names = shard_files(out / "train")
    mtimes = {n: os.stat(out / "train" / n).st_mtime_ns for n in names}
    os.remove(out / "train" / names[2])
    os.remove(out / ".done" / "train-00002.json")
    time.sleep(0.01)

    again = _ingest(src, out)
    assert again.shards_written == 1 and again.shards_reused == 3
    assert shard_files(out / "train") == names
    for n in names:
        changed = os.stat(out / "train" / n).st_mtime_ns != mtimes[n]
        assert changed == (n == names[2]), n
    after = read_split(out / "train")
    assert len(after) == len(before) == 12
    for (a, ma, _), (b, mb, _) in zip(before, after):
        np.testing.assert_array_equal(a, b)
        assert ma == mb

    # Other options on the same folder: a clear error, unless overwrite.
    with pytest.raises(engine.PlanMismatchError, match="option size: 16 then, 24 now"):
        _ingest(src, out, size=24)
    noise_png(src / "img_9999.png", seed=99)
    with pytest.raises(engine.PlanMismatchError, match="12 then, 13 now"):
        _ingest(src, out)
    redone = _ingest(src, out, size=24, overwrite=True)
    assert redone.records == 13 and read_split(out / "train")[0][0].shape == (24, 24)


def test_killed_run_leaves_no_partial_shard_and_resumes(tmp_path):
    src = _png_folder(tmp_path / "in", 400, size=48)
    args = cli_args(input=src, size=32, workers=1, rows_per_shard=8, split="1", salt=SALT)
    reference = run_cli(*args, output=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, TOOL, *args, "--output", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "train").is_dir() and shard_files(out / "train"):
            break
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    visible = shard_files(out / "train")
    assert 1 <= len(visible) < 50
    from array_record.python import array_record_module

    # The kill may fall between a shard's rename and its marker (even the first):
    # such a shard is complete, and the rerun rewrites it.
    done = out / ".done"
    markers = {f for f in os.listdir(done) if f.endswith(".json")} if done.is_dir() else set()
    for name in visible:  # every visible shard is complete: all 8 records readable
        reader = array_record_module.ArrayRecordReader(str(out / "train" / name))
        assert len(reader.read_all()) == 8, name
        reader.close()
        marker = f"train-{name[5:10]}.json"
        if marker in markers:
            assert read_json(out / ".done" / marker)["records"] == 8
    with pytest.raises(ValueError, match="incomplete shard set"):
        records.list_shards(str(out / "train"))  # a partial output cannot be read

    resumed = run_cli(*args, output=out)
    assert resumed.returncode == 0, resumed.stderr
    assert shard_files(out / "train") == shard_files(tmp_path / "reference" / "train")
    got, want = read_split(out / "train"), read_split(tmp_path / "reference" / "train")
    assert len(got) == len(want) == 400
    for (a, ma, _), (b, mb, _) in zip(got, want):
        np.testing.assert_array_equal(a, b)
        assert ma == mb
    assert not [p for p in (out / "train").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ splits
def test_splits_are_by_patient_deterministic_and_stable():
    rows = [
        ManifestRow(path=f"/x/{i}.png", patient_id=f"P{i % 300}", source=f"m.csv:{i + 2}")
        for i in range(1500)
    ]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    out = manifest.assign_splits(rows, fractions, seed=0)
    by_patient = {}
    for r in out:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    counts = {k: sum(s == {k} for s in by_patient.values()) / 300 for k in fractions}
    for k, f in fractions.items():
        assert abs(counts[k] - f) < 0.06, counts
    assert [r.split for r in manifest.assign_splits(rows, fractions, seed=0)] == [
        r.split for r in out
    ]
    assert [r.split for r in manifest.assign_splits(rows, fractions, seed=1)] != [
        r.split for r in out
    ]
    # Adding or removing patients never moves the others.
    half = manifest.assign_splits(rows[:600], fractions, seed=0)
    assert [r.split for r in half] == [r.split for r in out[:600]]

    # An explicit split on one row of a patient moves all of that patient's rows.
    rows[7].split = "test"
    moved = manifest.assign_splits(rows, fractions, seed=0)
    assert {r.split for r in moved if r.patient_id == "P7"} == {"test"}
    rows[307].split = "train"  # P7 again: conflicting explicit splits
    with pytest.raises(ValueError, match="different explicit splits") as error:
        manifest.assign_splits(rows, fractions, seed=0)
    assert "m.csv:9" in str(error.value) and "m.csv:309" in str(error.value)


def test_no_patient_in_two_splits_after_ingestion(tmp_path):
    lines = ["path,patient_id,split,grade"]
    for i in range(40):
        noise_png(tmp_path / "img" / f"{i}.png", seed=i)
        explicit = "test" if i == 5 else ""
        lines.append(f"img/{i}.png,patient-{i % 8},{explicit},{i % 3}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    rows, rejected = manifest.read_manifest(str(tmp_path / "m.csv"))
    assert not rejected
    summary = _ingest_rows(rows, tmp_path / "out", fractions={"train": 0.5, "val": 0.5})
    assert summary.records == 40
    splits_of = {}
    for split in summary.splits:
        for _, meta, _ in read_split(tmp_path / "out" / split):
            splits_of.setdefault(meta["patient"], set()).add(split)
            assert meta["split"] == split and isinstance(meta["grade"], int)
    assert len(splits_of) == 8 and all(len(s) == 1 for s in splits_of.values())
    assert splits_of[deid.hash_patient_id("patient-5", SALT)] == {"test"}
    assert "patient-" not in (tmp_path / "out" / "plan.json").read_text()


# ------------------------------------------------------------------ manifests
def test_csv_sources_name_the_first_line_of_a_record(tmp_path):
    (tmp_path / "m.csv").write_text(
        'path,report,grade\na.png,"line one\nline two",1\n\nb.png,,"[1"\nc.png,x,2,extra\nd.png\n'
    )
    rows, rejected = manifest.read_manifest(str(tmp_path / "m.csv"))
    assert [(r.source, r.report) for r in rows] == [
        ("m.csv:2", "line one\nline two"),
        ("m.csv:7", None),
    ]
    assert [r["source"] for r in rejected] == ["m.csv:5", "m.csv:6"]
    assert "label 'grade' is not valid JSON" in rejected[0]["reason"]
    assert "4 cells for 3 columns" in rejected[1]["reason"]
    assert rows[0].path == str(tmp_path / "a.png")


def test_parse_label_cells():
    assert manifest.parse_label("3") == 3
    assert manifest.parse_label("0.25") == 0.25
    assert manifest.parse_label("[0,1,0,0,1]") == [0, 1, 0, 0, 1]
    assert manifest.parse_label("benign") == "benign"
    assert manifest.parse_label("nan") == "nan"  # not a finite number: kept as text
    with pytest.raises(ValueError):
        manifest.parse_label("[0,1,")


def _landmark_image(height=40, width=60, x=45, y=12):
    image = np.full((height, width), 20, np.uint8)
    image[y, x] = 255
    return image


def test_manifest_labels_reports_landmarks_masks(tmp_path):
    write_png(tmp_path / "a.png", _landmark_image())
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 40:50] = 3
    write_png(tmp_path / "a_mask.png", mask)
    write_png(tmp_path / "small_mask.png", np.zeros((20, 30), np.uint8))
    noise_png(tmp_path / "b.png", seed=1, size=24)
    (tmp_path / "labels.csv").write_text(
        "path,patient_id,pathology,margins,density,report,landmarks,mask\n"
        'a.png,p1,2,"[0,1,0,0,1]",0.5,"no acute findings","[[45, 12]]",a_mask.png\n'
        "b.png,p2,1,,,,,small_mask.png\n"
        'b.png,p3,1,,,,"[[1, 2]",\n'
        "missing.png,p4,0,,,,,\n"
        "b.png,p5,0,,,,,\n"
    )
    rows, rejected = manifest.read_manifest(str(tmp_path / "labels.csv"))
    assert [r["source"] for r in rejected] == ["labels.csv:4"]
    assert "landmarks" in rejected[0]["reason"] and "JSON" in rejected[0]["reason"]
    assert rows[0].labels == {"pathology": 2, "margins": [0, 1, 0, 0, 1], "density": 0.5}
    assert rows[1].labels == {"pathology": 1}
    assert rows[0].mask_paths == {"mask": str(tmp_path / "a_mask.png")}

    out = tmp_path / "out"
    summary = _ingest_rows(rows, out, size=32, rejected_rows=rejected)
    recs = read_split(out / "train")
    assert summary.records == len(recs) == 2
    image, meta, extras = recs[0]
    assert meta["pathology"] == 2 and meta["margins"] == [0, 1, 0, 0, 1]
    assert meta["report"] == "no acute findings"
    ((x, y),) = meta["landmarks"]
    bright_y, bright_x = np.unravel_index(np.argmax(image), image.shape)
    assert abs(x - bright_x) <= 1 and abs(y - bright_y) <= 1, (x, y, bright_x, bright_y)
    assert extras["mask"].shape == (32, 32) and set(np.unique(extras["mask"])) == {0, 3}
    assert extras["mask"][round(y) + 3, round(x)] == 3  # the lesion sits below
    assert recs[1][1]["pathology"] == 0 and "report" not in recs[1][1]

    reasons = {r["source"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert reasons["labels.csv:3"] == "mask size mismatch: image 24x24, mask 20x30 (mask 'mask')"
    assert "labels.csv:4" in reasons and "not found" in reasons["labels.csv:5"]
    assert read_json(out / "summary.json")["rejected"] == 3


def test_jsonl_manifest_and_bad_lines(tmp_path):
    noise_png(tmp_path / "imgs" / "c.png", seed=3)
    lines = [
        {"path": "imgs/c.png", "patient_id": "q1", "labels": {"pathology": 3}, "view": "CC"},
        {"path": "imgs/c.png", "patient_id": "q2", "spacing": 1},
        "{not json",
        {"patient_id": "q3"},
        {
            "path": "imgs/c.png",
            "patient_id": "q4",
            "split": "val",
            "options": {"view": "MLO", "spacing": [0.5, 0.25]},
        },
    ]
    (tmp_path / "m.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    rows, rejected = manifest.read_manifest(str(tmp_path / "m.jsonl"))
    assert [r["source"] for r in rejected] == ["m.jsonl:3", "m.jsonl:4"]
    assert "bad JSON" in rejected[0]["reason"] and "path" in rejected[1]["reason"]
    assert rows[0].labels == {"pathology": 3} and rows[0].options == {"view": "CC"}
    assert rows[2].split == "val" and rows[2].options["view"] == "MLO"

    out = tmp_path / "out"
    summary = _ingest_rows(rows, out, rejected_rows=rejected)
    # A label named like a technical key ("spacing") is a rejection naming it; a
    # "view" column is the reader option (PNGs carry no view of their own).
    reasons = [r["reason"] for r in read_jsonl(out / "rejected.jsonl")]
    assert any("collision" in r and "spacing" in r for r in reasons), reasons
    assert summary.rejected == 3 and summary.records == 2
    val_meta = read_split(out / "val")[0][1]
    assert val_meta["view"] == "MLO" and val_meta["spacing"] == [0.5, 0.25]
    assert read_split(out / "train")[0][1]["view"] == "CC"
    with pytest.raises(engine.StrictModeError, match="m.jsonl:3"):
        _ingest_rows(
            rows, tmp_path / "strict", strict=True, rejected_rows=rejected, fractions=None
        )


def test_manifest_without_path_column_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(manifest.ManifestError, match="no 'path' column"):
        manifest.read_manifest(str(tmp_path / "m.csv"))
    result = run_cli(input=tmp_path / "m.csv", output=tmp_path / "out")
    assert result.returncode == 2 and "no 'path' column" in result.stderr


def test_unexpected_errors_and_bad_frames_are_rejections(tmp_path, monkeypatch):
    """A reader crash rejects that row only (type and message in the reason); a
    NaN frame of a multi-frame file rejects that frame only."""
    from input_pipeline.ingest import readers

    for name in ("crash.png", "frames.png", "fine.png"):
        noise_png(tmp_path / "in" / name, seed=len(name))
    real_read_frames = readers.read_frames

    def fake_read_frames(path, options=None):
        if path.endswith("crash.png"):
            raise RuntimeError("decoder blew up")
        frames = real_read_frames(path, options)
        if path.endswith("frames.png"):
            bad = np.full_like(frames[0].pixels, np.nan)
            frames = [
                readers.Frame(bad, None, {}, {"frame": 0}),
                readers.Frame(frames[0].pixels, None, {}, {"frame": 1}),
            ]
        return frames

    monkeypatch.setattr(readers, "read_frames", fake_read_frames)
    summary = _ingest(tmp_path / "in", tmp_path / "out")
    assert summary.records == 2 and summary.rejected == 2
    rejected = {
        os.path.basename(r["path"]): r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")
    }
    assert rejected["crash.png"]["reason"] == "unexpected error (RuntimeError): decoder blew up"
    assert rejected["frames.png"]["frame"] == {"frame": 0}
    assert "NaN" in rejected["frames.png"]["reason"]
    kept = [meta["source_index"] for _, meta, _ in read_split(tmp_path / "out" / "train")]
    assert kept == [{}, {"frame": 1}]  # fine.png, then frames.png (sorted scan)
