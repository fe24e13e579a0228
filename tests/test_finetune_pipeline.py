"""Fine-tuning / evaluation input pipeline: splits, augmented labelled training
batches (determinism, resume, rotation, class balancing) and padded eval batches.

The real phantom (48 images, 128 px) supplies pathology / margins labels; a
tiny ingestion-like ArrayRecord tree supplies a strongly imbalanced label.
"""

import gc
import json
import pickle
from collections import Counter

import numpy as np
import pytest

from input_pipeline import finetune, records, transforms

from helpers import assert_batches_equal, take

NUM_IMAGES = 48
SIZE = 32
KEYS = ("pathology", "margins")


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def cfg(phantom_dir):
    c = finetune.default_finetune_data_config()
    c.update(dir=phantom_dir, phantom_num_images=NUM_IMAGES, phantom_size=128, num_workers=0)
    c.num_threads = 1
    return c


CLASS_COUNTS = (40, 6, 2)  # label "grade" of the imbalanced tree's train split


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """tools/prepare_data.py's layout: root/train, root/val (no test)."""
    root = tmp_path_factory.mktemp("ingested")
    rng = np.random.default_rng(0)
    grades = [g for g, n in enumerate(CLASS_COUNTS) for _ in range(n)]
    rng.shuffle(grades)
    train = [
        (rng.integers(0, 256, (24, 24), dtype=np.uint8), {"grade": int(g), "tags": [1, 0]})
        for g in grades
    ]
    records.write_shards(train, str(root / "train"), "data", 2)
    val = [(np.full((24, 24), 10 * i, np.uint8), {"grade": i % 3}) for i in range(5)]
    records.write_shards(val, str(root / "val"), "data", 1)
    return str(root)


@pytest.fixture
def tree_cfg(tree):
    c = finetune.default_finetune_data_config()
    c.update(source="prepared", dir=tree, num_workers=0, num_threads=1)
    return c


def _train(c, workers=0, **kw):
    c = c.copy_and_resolve_references()
    c.num_workers = workers
    kw = {"image_size": SIZE, "global_batch_size": 8, "seed": 0, "label_keys": KEYS, **kw}
    return finetune.make_finetune_train_dataset(c, **kw)


# ------------------------------------------------------------------ splits


def test_phantom_splits_are_disjoint_exact_and_deterministic(cfg):
    views = {s: finetune.split_source(cfg, s) for s in finetune.SPLITS}
    assert [len(views[s]) for s in finetune.SPLITS] == [38, 5, 5]  # round(48 * 0.8), ...
    members = [set(views[s].record_indices.tolist()) for s in finetune.SPLITS]
    assert set.union(*members) == set(range(NUM_IMAGES))
    assert sum(map(len, members)) == NUM_IMAGES  # disjoint
    again = finetune.split_source(cfg, "val")
    np.testing.assert_array_equal(again.record_indices, views["val"].record_indices)
    # The split is a salted hash ranking, not a prefix of the records.
    assert views["val"].record_indices.tolist() != list(range(38, 43))

    # A view element is the underlying record, re-indexed within the split.
    full = finetune.pipeline.make_source(cfg)
    view = pickle.loads(pickle.dumps(views["test"]))  # what grain workers receive
    for i in range(len(view)):
        e, ref = view[i], full[int(view.record_indices[i])]
        assert e["index"] == i and e["meta"] == ref["meta"]
        np.testing.assert_array_equal(e["image"], ref["image"])

    c = cfg.copy_and_resolve_references()
    c.phantom_split = (0.5, 0.25, 0.25)
    assert [len(finetune.split_source(c, s)) for s in finetune.SPLITS] == [24, 12, 12]
    c.phantom_split = (0.9, 0.1, 0.0)
    with pytest.raises(ValueError, match="'test' split .* has no records"):
        finetune.split_source(c, "test")
    c.phantom_split = (0.8, 0.1)
    with pytest.raises(ValueError, match="summing to 1"):
        finetune.split_source(c, "train")
    with pytest.raises(ValueError, match="one of"):
        finetune.split_source(cfg, "validation")


def test_prepared_split_folders(tree_cfg, tree, tmp_path):
    train, val = (finetune.split_source(tree_cfg, s) for s in ("train", "val"))
    assert (len(train), len(val)) == (sum(CLASS_COUNTS), 5)
    assert Counter(train[i]["meta"]["grade"] for i in range(len(train))) == {
        g: n for g, n in enumerate(CLASS_COUNTS)
    }
    assert sorted(int(val[i]["image"][0, 0]) for i in range(5)) == [0, 10, 20, 30, 40]
    with pytest.raises(FileNotFoundError, match=r"'test' split folder.*prepare_data"):
        finetune.split_source(tree_cfg, "test")
    # Ingestion can reject every file of a split: an empty shard, an empty split.
    records.write_shard(str(tmp_path / "test" / "data-00000-of-00001.array_record"), [])
    c = tree_cfg.copy_and_resolve_references()
    c.dir = str(tmp_path)
    with pytest.raises(ValueError, match="'test' split .* no records"):
        finetune.split_source(c, "test")


# --------------------------------------------------------------- training


def test_train_batches_shapes_labels_and_epochs(cfg):
    batches = take(iter(_train(cfg)), 10)
    b = batches[0]
    assert set(b) == {"image", "index", "label_pathology", "label_margins", "example_id"}
    assert b["image"].shape == (8, SIZE, SIZE, 1) and b["image"].dtype == np.float32
    assert b["index"].dtype == np.int32
    assert b["label_pathology"].shape == (8,) and b["label_pathology"].dtype == np.int32
    assert b["label_margins"].shape == (8, 5) and b["label_margins"].dtype == np.int32
    assert np.isfinite(b["image"]).all() and b["image"].std() > 0.1
    train = finetune.split_source(cfg, "train")
    for batch in batches:
        for row, i in enumerate(batch["index"]):
            meta = train[int(i)]["meta"]
            assert batch["label_pathology"][row] == meta["pathology"]
            assert batch["label_margins"][row].tolist() == meta["margins"]
    order = np.concatenate([x["index"] for x in batches])
    epochs = order[:38], order[38:76]
    for epoch in epochs:
        assert sorted(epoch) == list(range(38))  # every train record once per epoch
    assert not np.array_equal(*epochs)  # reshuffled

    assert_batches_equal(batches, take(iter(_train(cfg)), 10))
    other = take(iter(_train(cfg, seed=1)), 1)[0]
    assert not np.array_equal(other["index"], b["index"])


def test_resume_from_saved_state(cfg, tree_cfg):
    tree_cfg = tree_cfg.copy_and_resolve_references()
    tree_cfg.balanced_label = "grade"
    for c, keys in ((cfg, KEYS), (tree_cfg, ("grade",))):
        it = iter(_train(c, label_keys=keys))
        take(it, 5)  # past the first epoch of either split
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        expected = take(it, 3)
        fresh = iter(_train(c, label_keys=keys))
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 3), expected)
        it.close()
        fresh.close()


def test_workers_give_the_same_batches(cfg):
    reference = take(iter(_train(cfg, workers=0)), 3)
    it = iter(_train(cfg, workers=2))
    assert_batches_equal(take(it, 3), reference)
    it.close()
    gc.collect()


def test_rotation_is_applied_and_zero_is_the_pretraining_crop(cfg):
    src = finetune.split_source(cfg, "train")
    kw = {"crop_scale": (0.5, 1.0), "hflip": True, "mean": cfg.norm_mean, "std": cfg.norm_std}
    pretrain_crop = transforms.MultiScaleRandomCrop((SIZE,), **kw)
    still = finetune.FinetuneAugment(SIZE, rotate_degrees=0, **kw)
    rotating = finetune.FinetuneAugment(SIZE, rotate_degrees=10, **kw)
    for seed in range(6):
        e = src[seed]
        ref = pretrain_crop.random_map(e, np.random.default_rng(seed))[f"image_{SIZE}"]
        still_out = still.random_map(e, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(still_out, ref)
        rotated_out = rotating.random_map(e, np.random.default_rng(seed))["image"]
        assert np.abs(rotated_out - ref).mean() > 0.01

    c0 = cfg.copy_and_resolve_references()
    c0.rotate_degrees = 0
    plain, rotated = take(iter(_train(c0)), 2), take(iter(_train(cfg)), 2)
    for p, r in zip(plain, rotated):
        np.testing.assert_array_equal(p["index"], r["index"])  # same records, same crops
        diff = np.abs(p["image"] - r["image"]).mean(axis=(1, 2, 3))
        assert (diff > 0.01).sum() >= 7


def test_rotate_crop_geometry():
    image = np.random.default_rng(0).integers(1, 4096, (9, 9)).astype(np.uint16)
    np.testing.assert_array_equal(finetune.rotate_crop(image, (0, 0, 9, 9), 90), np.rot90(image))
    flat = np.full((40, 40), 1000, np.uint16)
    # Inside the image, rotated-in pixels are real ones: no black corners ...
    inner = finetune.rotate_crop(flat, (10, 10, 20, 20), 30)
    assert inner.shape == (20, 20) and (inner == 1000).all()
    # ... beyond it they are 0.
    whole = finetune.rotate_crop(flat, (0, 0, 40, 40), 30)
    assert whole[0, 0] == 0 and whole[20, 20] == 1000


def test_balanced_sampling_evens_out_classes(tree_cfg):
    n = sum(CLASS_COUNTS)
    train = finetune.split_source(tree_cfg, "train")
    grade = {i: train[i]["meta"]["grade"] for i in range(n)}

    def grade_counts(c, steps=12):  # 12 x 16 = 4 epochs of 48
        batches = take(iter(_train(c, global_batch_size=16, label_keys=("grade",))), steps)
        for b in batches:
            assert [grade[int(i)] for i in b["index"]] == b["label_grade"].tolist()
        return np.concatenate([b["label_grade"] for b in batches])

    plain = grade_counts(tree_cfg)
    assert np.bincount(plain).tolist() == [4 * k for k in CLASS_COUNTS]

    c = tree_cfg.copy_and_resolve_references()
    c.balanced_label = "grade"
    balanced = grade_counts(c)
    freq = np.bincount(balanced, minlength=3) / len(balanced)
    assert np.all(np.abs(freq - 1 / 3) < 0.1), freq
    np.testing.assert_array_equal(grade_counts(c), balanced)  # deterministic per seed
    draws = finetune.BalancedDraws(np.array([grade[i] for i in range(n)]), seed=3)
    assert not np.array_equal(draws.epoch(0), draws.epoch(1))  # redrawn per epoch

    c.balanced_label = "tags"
    with pytest.raises(TypeError, match="multi-hot"):
        _train(c, label_keys=("grade",))


def test_missing_label_is_named(cfg):
    it = iter(_train(cfg, label_keys=("birads",)))
    with pytest.raises(KeyError, match=r"record \d+ has no label 'birads'"):
        next(it)
    with pytest.raises(KeyError, match=r"record 0 has no label 'birads'"):
        finetune.make_eval_batches(
            cfg, "val", image_size=SIZE, batch_size=4, label_keys=("birads",)
        )


# ------------------------------------------------------------- evaluation


def test_eval_batches_cover_the_split_once_with_padding(cfg):
    val = finetune.split_source(cfg, "val")
    batches = finetune.make_eval_batches(cfg, "val", image_size=SIZE, batch_size=4, label_keys=KEYS)
    assert len(batches) == 2 and batches.num_records == 5
    listed = list(batches)
    assert [b["valid"].tolist() for b in listed] == [[True] * 4, [True, False, False, False]]
    for b in listed:
        assert b["image"].shape == (4, SIZE, SIZE, 1) and b["image"].dtype == np.float32
        assert b["label_margins"].shape == (4, 5)
    pad = listed[1]
    assert (pad["index"][1:] == -1).all() and (pad["image"][1:] == 0).all()
    valid_index = np.concatenate([b["index"][b["valid"]] for b in listed])
    assert valid_index.tolist() == list(range(5))  # each record once, in record order

    resize = transforms.MultiScaleResize((SIZE,), mean=cfg.norm_mean, std=cfg.norm_std)
    for b in listed:
        for row in np.flatnonzero(b["valid"]):
            e = val[int(b["index"][row])]
            np.testing.assert_array_equal(b["image"][row], resize.map(e)[f"image_{SIZE}"])
            assert b["label_pathology"][row] == e["meta"]["pathology"]
            assert b["label_margins"][row].tolist() == e["meta"]["margins"]
    assert batches.labels["label_pathology"].tolist() == [
        val[i]["meta"]["pathology"] for i in range(5)
    ]
    again = finetune.make_eval_batches(cfg, "val", image_size=SIZE, batch_size=4, label_keys=KEYS)
    assert_batches_equal(listed, list(again))

    c3 = cfg.copy_and_resolve_references()
    c3.channels = 3
    rgb = finetune.make_eval_batches(c3, "val", image_size=SIZE, batch_size=8, label_keys=())
    assert len(rgb) == 1 and rgb[0]["image"].shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(rgb[0]["image"][:4, ..., 2], listed[0]["image"][..., 0])


def test_roi_crop_is_centred_on_the_lesion_and_zero_beyond_the_image():
    image = np.arange(100 * 120, dtype=np.uint16).reshape(100, 120) + 1
    meta = {"lesion_center": [50, 60], "lesion_radius_px": 5.0}
    crop = transforms.roi_crop(image, meta, 0, context=3.0, min_px=8)  # side 2 * 3 * 5 = 30
    np.testing.assert_array_equal(crop, image[35:65, 45:75])
    small = transforms.roi_crop(image, meta, 0, context=3.0, min_px=40)  # the minimum wins
    assert small.shape == (40, 40)
    corner = transforms.roi_crop(image, {"lesion_center": [2, 118], "lesion_radius_px": 5.0}, 0,
                               context=3.0, min_px=8)
    np.testing.assert_array_equal(corner[13:, :17], image[:17, 103:])  # inside the image
    assert (corner[:13] == 0).all() and (corner[:, 17:] == 0).all()  # beyond it
    with pytest.raises(KeyError, match="roi_context=0"):
        transforms.roi_crop(image, {"pathology": 1}, 7, context=3.0, min_px=8)


def test_roi_context_crops_train_and_eval_images_to_the_lesion(cfg):
    c = cfg.copy_and_resolve_references()
    c.roi_context, c.roi_min_px = 3.0, 16
    c.crop_scale, c.hflip, c.rotate_degrees = (1.0, 1.0), False, 0.0
    c.crop_ratio = (1.0, 1.0)  # the whole lesion crop, resized
    val = finetune.split_source(c, "val")
    batches = finetune.make_eval_batches(c, "val", image_size=SIZE, batch_size=8, label_keys=())
    resize = transforms.MultiScaleResize((SIZE,), mean=c.norm_mean, std=c.norm_std)
    for row in range(batches.num_records):
        e = val[row]
        lesion = transforms.roi_crop(e["image"], e["meta"], row, 3.0, 16)
        expected = resize.map({**e, "image": lesion})[f"image_{SIZE}"]
        np.testing.assert_allclose(batches[0]["image"][row], expected, atol=1e-6)
    train = finetune.split_source(c, "train")
    batch = take(iter(_train(c)), 1)[0]
    for row, index in enumerate(batch["index"]):
        e = train[int(index)]
        lesion = transforms.roi_crop(e["image"], e["meta"], int(index), 3.0, 16)
        expected = resize.map({**e, "image": lesion})[f"image_{SIZE}"]
        np.testing.assert_allclose(batch["image"][row], expected, atol=1e-5)
