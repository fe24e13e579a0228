"""MedMNIST builder and the .npz item reader, on tiny fake files with the real layout
(key names, uint8 images (N, S, S) or (N, S, S, 3), integer labels (N, 1) or (N, 14)),
prepared through tools/prepare_data.py and read back as a pipeline reads them."""

import json
import os
import zipfile

import ml_collections
import numpy as np
import pytest

from input_pipeline import builders, sources
from input_pipeline.builders import LayoutError, medmnist
from input_pipeline.ingest import engine, readers
from tools import prepare_data

COUNTS = {"train": 5, "val": 2, "test": 3}
LUMA = np.asarray(readers.LUMA_WEIGHTS, np.float64)


def _arrays(dataset, size=28, counts=None, seed=0):
    """The six arrays of a fake MedMNIST file of `dataset` at `size` px."""
    info = medmnist.DATASETS[dataset]
    rng = np.random.default_rng(seed)
    shape = (size, size) if info.channels == 1 else (size, size, 3)
    arrays = {}
    for split, n in (counts or COUNTS).items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        if info.task == medmnist.MULTI_LABEL:
            labels = rng.integers(0, 2, (n, len(info.classes)), dtype=np.uint8)
        else:
            labels = (np.arange(n) % len(info.classes)).astype(np.uint8)[:, None]
        arrays[f"{split}_labels"] = labels
    return arrays


def _write(folder, name, arrays, compressed=True):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a "?..." name
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def _prepare(argv, out):
    """prepare_data in this process; {split: [(image, meta)]} in record order."""
    argv = [*argv, "--output", out, "--workers", "1", "--no-progress", "--salt", "test-salt"]
    assert prepare_data.main(argv) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rejected"] == 0
    cfg = ml_collections.ConfigDict({"source": "prepared", "dir": out})
    decoded = {}
    for split in COUNTS:
        src = sources.resolve(cfg, split)  # how every pipeline reads a prepared root
        decoded[split] = [(src[i]["image"], src[i]["meta"]) for i in range(len(src))]
    return decoded


def _expected_rgb(rgb):
    """The uint16 record of an RGB uint8 image: BT.601 luma, full scale 255 -> 65535,
    the same float steps as readers -> preprocess.to_unit_interval -> resize_and_pad."""
    luma = (rgb.astype(np.float64) @ LUMA).astype(np.float32)
    unit = np.clip(luma.astype(np.float64) / 255.0, 0.0, 1.0).astype(np.float32)
    return np.rint(np.clip(unit, 0.0, 1.0) * 65535).astype(np.uint16)


# --- prepared end to end ----------------------------------------------------------------


def test_gray_multiclass_prepared_pixel_exact(tmp_path):
    arrays = _arrays("organamnist")
    _write(tmp_path / "medmnist", "organamnist.npz", arrays)
    decoded = _prepare(
        [
            "--builder",
            "medmnist_organamnist",
            "--input",
            str(tmp_path / "medmnist"),
            "--size",
            "native",
            "--rows-per-shard",
            "2",
        ],
        str(tmp_path / "out"),
    )
    assert {split: len(recs) for split, recs in decoded.items()} == COUNTS
    for split, recs in decoded.items():
        for i, (image, meta) in enumerate(recs):
            source = arrays[f"{split}_images"][i]
            assert image.dtype == np.uint16 and image.shape == (28, 28)
            # 0..255 stored as value * 257 (0..65535): exact both ways.
            np.testing.assert_array_equal(image, source.astype(np.uint16) * 257)
            np.testing.assert_array_equal((image // 257).astype(np.uint8), source)
            assert meta["label"] == int(arrays[f"{split}_labels"][i, 0])
            assert isinstance(meta["label"], int)
            assert meta["source_index"] == {"npz_index": i}  # file order, across shards
            assert meta["split"] == split and meta["dataset"] == "organamnist"
            assert meta["task"] == "multi-class" and len(meta["classes"]) == 11
            assert meta["classes"][6] == "liver" and meta["bits_stored_source"] == 8
            assert "photometric" not in meta


def test_rgb_file_of_another_size_prepared_as_luma(tmp_path):
    arrays = _arrays("pathmnist", size=64, seed=1)
    folder = tmp_path / "medmnist"
    _write(folder, "pathmnist.npz", _arrays("pathmnist", size=28))  # another size beside it
    path = _write(folder, "pathmnist_64.npz", arrays, compressed=False)  # stored members
    decoded = _prepare(
        ["--builder", "medmnist_pathmnist", "--input", path, "--size", "native"],
        str(tmp_path / "out"),
    )
    assert {split: len(recs) for split, recs in decoded.items()} == COUNTS
    for split, recs in decoded.items():
        for i, (image, meta) in enumerate(recs):
            assert image.shape == (64, 64)
            np.testing.assert_array_equal(image, _expected_rgb(arrays[f"{split}_images"][i]))
            assert meta["photometric"] == "RGB" and meta["label"] == i % 9
            assert meta["classes"][8] == "colorectal adenocarcinoma epithelium"
            assert meta["geometry"]["source_shape"] == [64, 64]


def test_chestmnist_multilabel_through_the_engine(tmp_path):
    arrays = _arrays("chestmnist", seed=2)
    _write(tmp_path, "chestmnist.npz", arrays)
    rows = builders.build_rows("medmnist_chestmnist", str(tmp_path))
    engine.ingest(
        rows, tmp_path / "out", size=None, workers=1, salt="s", progress=False, log=lambda _: None
    )
    cfg = ml_collections.ConfigDict({"source": "prepared", "dir": str(tmp_path / "out")})
    for split, n in COUNTS.items():
        src = sources.resolve(cfg, split)
        assert len(src) == n
        for i in range(n):
            record = src[i]
            meta = record["meta"]
            np.testing.assert_array_equal(
                record["image"], arrays[f"{split}_images"][i].astype(np.uint16) * 257
            )
            assert meta["label"] == arrays[f"{split}_labels"][i].tolist()  # 14 x 0/1
            assert meta["task"] == "multi-label, binary-class"
            assert meta["classes"][0] == "atelectasis" and meta["classes"][13] == "hernia"


def test_rows_labels_and_registry(tmp_path):
    _write(tmp_path, "breastmnist.npz", _arrays("breastmnist"))
    rows = builders.build_rows("medmnist_breastmnist", str(tmp_path))
    assert [r.split for r in rows] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    row = rows[6]
    assert row.path == str(tmp_path / "breastmnist.npz")
    assert row.options == {"npz_key": "val_images", "npz_index": 1}
    assert row.patient_id == "breastmnist-val-1" and row.source == "breastmnist.npz:val_images[1]"
    assert row.labels == {
        "dataset": "breastmnist",
        "task": "binary-class",
        "classes": ["malignant", "normal, benign"],
        "label": 1,
    }
    counts = {name: len(d.classes) for name, d in medmnist.DATASETS.items()}
    assert counts == {
        "pathmnist": 9,
        "chestmnist": 14,
        "dermamnist": 7,
        "octmnist": 4,
        "pneumoniamnist": 2,
        "retinamnist": 5,
        "breastmnist": 2,
        "bloodmnist": 8,
        "tissuemnist": 8,
        "organamnist": 11,
        "organcmnist": 11,
        "organsmnist": 11,
    }
    names = {f"medmnist_{d}" for d in counts}
    assert names <= set(builders.BUILDERS) and names == set(medmnist.ROWS_BY_NAME)


def test_size_choice_and_download_suffix(tmp_path):
    for size in (28, 128):
        _write(
            tmp_path, medmnist.DATASETS["dermamnist"].file_name(size), _arrays("dermamnist", size)
        )
    _write(
        tmp_path,
        "octmnist_224.npz?download=1",
        _arrays("octmnist", 224, {"train": 1, "val": 1, "test": 1}),
    )
    assert medmnist.locate(str(tmp_path), "dermamnist") == (
        str(tmp_path / "dermamnist.npz"),
        "dermamnist",
        28,
    )
    assert medmnist.locate(str(tmp_path), "dermamnist", 128)[0] == str(
        tmp_path / "dermamnist_128.npz"
    )
    rows = medmnist.build_rows(str(tmp_path / "dermamnist_128.npz"))  # dataset from the name
    assert len(rows) == 10 and rows[0].labels["dataset"] == "dermamnist"
    rows = medmnist.build_rows(str(tmp_path), "octmnist", size=224)
    assert rows[0].path == str(tmp_path / "octmnist_224.npz?download=1") and len(rows) == 3
    assert medmnist.parse_file_name("pathmnist_28.npz") is None  # 28 px has no suffix
    assert medmnist.parse_file_name("nodulemnist3d.npz") is None  # 3-D: not this builder


# --- bad input ------------------------------------------------------------------------


def test_missing_size_lists_the_files_found(tmp_path, capsys):
    _write(tmp_path, "pathmnist.npz", _arrays("pathmnist"))
    _write(tmp_path, "bloodmnist_64.npz", _arrays("bloodmnist", 64))
    with pytest.raises(LayoutError) as e:
        medmnist.build_rows(str(tmp_path), "pathmnist", size=224)
    message = str(e.value)
    assert "pathmnist_224.npz (pathmnist, 224 px) not found" in message
    assert "bloodmnist_64.npz (bloodmnist, 64 px), pathmnist.npz (pathmnist, 28 px)" in message
    assert "zenodo" in message
    # The same through the command line: exit status 2 and one line naming the file.
    missing = str(tmp_path / "pathmnist_224.npz")
    argv = [
        "--builder",
        "medmnist_pathmnist",
        "--input",
        missing,
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MedMNIST:") and "pathmnist_224.npz" in err
    assert "bloodmnist_64.npz (bloodmnist, 64 px)" in err
    # A folder without the 28 px file names it too.
    with pytest.raises(LayoutError, match=r"bloodmnist.npz \(bloodmnist, 28 px\) not found"):
        builders.build_rows("medmnist_bloodmnist", str(tmp_path))


def test_wrong_input_names(tmp_path):
    _write(tmp_path, "dermamnist.npz", _arrays("dermamnist"))
    _write(tmp_path, "my_data.npz", _arrays("dermamnist"))
    with pytest.raises(
        LayoutError, match="is a dermamnist file, not pathmnist.*medmnist_dermamnist"
    ):
        builders.build_rows("medmnist_pathmnist", str(tmp_path / "dermamnist.npz"))
    with pytest.raises(LayoutError, match="not named like a MedMNIST 2-D file"):
        builders.build_rows("medmnist_dermamnist", str(tmp_path / "my_data.npz"))
    with pytest.raises(LayoutError, match="does not exist"):
        builders.build_rows("medmnist_dermamnist", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="name the dataset"):
        medmnist.build_rows(str(tmp_path))
    with pytest.raises(ValueError, match="size must be one of"):
        medmnist.build_rows(str(tmp_path), "dermamnist", size=32)


def _bad(tmp_path, dataset, change, name=None):
    arrays = _arrays(dataset)
    change(arrays)
    path = _write(tmp_path, name or f"{dataset}.npz", arrays)
    return lambda: medmnist.build_rows(path, dataset)


@pytest.mark.parametrize(
    "dataset, change, match",
    [
        ("octmnist", lambda a: a.pop("val_labels"), r"missing array\(s\) \['val_labels'\]"),
        (
            "octmnist",
            lambda a: a.update(test_labels=a["test_labels"][:2]),
            "test_labels has 2 labels for 3 images",
        ),
        (
            "octmnist",
            lambda a: a.update(train_images=a["train_images"].astype(np.float32)),
            "train_images has dtype float32, expected uint8",
        ),
        (
            "octmnist",
            lambda a: a.update(val_images=np.stack([a["val_images"]] * 3, -1)),
            r"val_images has shape \(2, 28, 28, 3\), expected \(N, 28, 28\): octmnist is gray",
        ),
        (
            "pathmnist",
            lambda a: a.update(train_images=a["train_images"][..., 0]),
            r"expected \(N, 28, 28, 3\): pathmnist is RGB",
        ),
        (
            "pathmnist",
            lambda a: a["train_labels"].__setitem__((3, 0), 9),
            r"train_labels has 1 label\(s\) outside 0..8 .*first at index 3: \[9\]",
        ),
        (
            "chestmnist",
            lambda a: a["val_labels"].__setitem__((1, 4), 2),
            r"val_labels has 1 label\(s\) outside 0..1 \(0/1 per finding",
        ),
        (
            "chestmnist",
            lambda a: a.update(test_labels=a["test_labels"][:, :1]),
            r"test_labels has shape \(3, 1\), expected \(N, 14\)",
        ),
        (
            "bloodmnist",
            lambda a: a.update(train_labels=a["train_labels"].astype(np.float64)),
            "train_labels has dtype float64, expected integers",
        ),
    ],
    ids=[
        "missing-array",
        "length-mismatch",
        "image-dtype",
        "rgb-in-gray-dataset",
        "gray-in-rgb-dataset",
        "label-out-of-range",
        "multilabel-out-of-range",
        "multilabel-shape",
        "label-dtype",
    ],
)
def test_bad_arrays_are_named(tmp_path, dataset, change, match):
    build = _bad(tmp_path, dataset, change)
    with pytest.raises(LayoutError, match=match) as e:
        build()
    assert str(tmp_path / f"{dataset}.npz") in str(e.value)


def test_images_of_another_size_than_the_name(tmp_path):
    build = _bad(tmp_path, "octmnist", lambda a: None, name="octmnist_64.npz")
    with pytest.raises(LayoutError, match=r"shape \(5, 28, 28\), expected \(N, 64, 64\)"):
        build()


def test_truncated_file(tmp_path):
    path = _write(tmp_path, "pneumoniamnist.npz", _arrays("pneumoniamnist"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(LayoutError, match="unreadable .npz archive.*download it again"):
        builders.build_rows("medmnist_pneumoniamnist", path)


# --- the .npz item reader ---------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_npz_item_reads_any_order_without_loading(tmp_path, compressed):
    images = np.random.default_rng(3).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    path = _write(tmp_path, "a.npz", {"images": images, "other": np.arange(3)}, compressed)
    expected_type = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("images.npy").compress_type == expected_type
    for i in (0, 3, 6, 2, 2, 5):  # forwards, then back (the stream restarts)
        np.testing.assert_array_equal(readers.npz_item(path, "images", i), images[i])
    headers = readers.npz_headers(path)
    assert headers["images"].shape == (7, 4, 5, 3) and headers["images"].dtype == np.uint8
    with pytest.raises(readers.RejectedInput, match="item 7 requested but array 'images' has 7"):
        readers.npz_item(path, "images", 7)
    with pytest.raises(readers.RejectedInput, match=r"no array 'labels'.*\['images', 'other'\]"):
        readers.npz_item(path, "labels", 0)
    # A file replaced in place is read anew, not from the open stream.
    _write(tmp_path, "a.npz", {"images": images[::-1].copy()}, compressed)
    np.testing.assert_array_equal(readers.npz_item(path, "images", 0), images[6])


def test_read_frames_on_npz_items(tmp_path):
    gray = np.arange(12, dtype=np.uint16).reshape(1, 3, 4) * 5000
    path = _write(tmp_path, "g.npz", {"x": gray, "f": gray.astype(np.float32)})
    (frame,) = readers.read_frames(path, {"npz_key": "x", "npz_index": 0})
    np.testing.assert_array_equal(frame.pixels, gray[0].astype(np.float32))
    assert frame.default_range == (0.0, 65535.0) and frame.index == {"npz_index": 0}
    assert frame.attrs == {"bits_stored_source": 16}
    with pytest.raises(readers.RejectedInput, match="unsupported image dtype float32"):
        readers.read_frames(path, {"npz_key": "f", "npz_index": 0})
    with pytest.raises(readers.RejectedInput, match="name the array and the item"):
        readers.read_frames(path)  # an .npz without options: say which option is missing
    with pytest.raises(ValueError, match="npz_index"):
        readers.read_frames(path, {"npz_key": "x"})
    with pytest.raises(ValueError, match="npz_key"):
        readers.read_frames(path, {"npz_key": "", "npz_index": 0})
