"""Image-report pair pipeline: splits, the training batch contract (pairing,
normalisation, no flip), resume, the tokenizer cache, evaluation pairs with
padding and finding labels, and MIMIC-CXR-like ArrayRecord input."""

import json
import os

import numpy as np
import pytest

from input_pipeline import cxr_phantom, pairs, records, text, transforms
from input_pipeline.builders import mimic_cxr

from helpers import assert_batches_equal, take

NUM_IMAGES = 48
PHANTOM_SIZE = 64
IMAGE = 32
LENGTH = 64


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pairs"))


@pytest.fixture
def cfg(phantom_dir):
    c = pairs.default_pairs_data_config()
    c.update(
        dir=phantom_dir,
        phantom_num_images=NUM_IMAGES,
        phantom_size=PHANTOM_SIZE,
        vocab_size=300,
        max_text_length=LENGTH,
        num_workers=0,
        num_threads=1,
    )
    return c


def _train(c, **kw):
    kw = {"image_size": IMAGE, "global_batch_size": 8, "seed": 0, **kw}
    return pairs.make_pairs_train_dataset(c, **kw)


def _expected_image(data: bytes, c) -> np.ndarray:
    """The whole record resized and normalised: (x / max - mean) / std."""
    image, meta = records.decode_record(data)
    x = transforms.resize_square(image, IMAGE).astype(np.float64)
    x = (x / transforms.intensity_max(image, meta) - c.norm_mean) / c.norm_std
    return x[..., None]


# ------------------------------------------------------------------ splits


def test_phantom_splits_are_disjoint_and_cover_every_pair(cfg):
    split_indices = [set(pairs.pair_split(cfg, s).record_indices.tolist()) for s in pairs.SPLITS]
    assert sum(len(s) for s in split_indices) == NUM_IMAGES
    assert set().union(*split_indices) == set(range(NUM_IMAGES))
    assert len(split_indices[0]) == round(0.8 * NUM_IMAGES)
    with pytest.raises(ValueError, match="split must be one of"):
        pairs.pair_split(cfg, "validation")
    bad = cfg.copy_and_resolve_references()
    bad.source = "phantom"
    with pytest.raises(ValueError, match="cxr_phantom"):
        pairs.pair_split(bad, "train")


# ------------------------------------------------------------------ training


def test_batch_contract_and_pairing(cfg):
    cfg.crop_scale, cfg.crop_ratio = (1.0, 1.0), (1.0, 1.0)  # the crop is the whole image
    batch = take(iter(_train(cfg)), 1)[0]
    assert set(batch) == {"image", "text_ids", "text_mask", "pair_index", "example_id"}
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, IMAGE, IMAGE, 1)
    assert batch["text_ids"].dtype == np.int32 and batch["text_ids"].shape == (8, LENGTH)
    assert batch["text_mask"].dtype == np.int32 and batch["text_mask"].shape == (8, LENGTH)
    assert batch["pair_index"].dtype == np.int32 and batch["pair_index"].shape == (8,)
    train = pairs.pair_split(cfg, "train")
    tokenizer = pairs.ensure_tokenizer(cfg)
    for row in range(8):
        data = train[int(batch["pair_index"][row])]
        report = records.decode_meta(data)["report"]
        ids, mask = text.encode_report(tokenizer, text.preprocess_report(report), LENGTH)
        np.testing.assert_array_equal(batch["text_ids"][row], ids)
        np.testing.assert_array_equal(batch["text_mask"][row], mask)
        # Same normalisation as pretraining, and never mirrored.
        np.testing.assert_allclose(batch["image"][row], _expected_image(data, cfg), atol=1e-4)


def test_random_crop_and_three_channels(cfg):
    cfg.channels = 3
    batch = take(iter(_train(cfg)), 1)[0]
    assert batch["image"].shape == (8, IMAGE, IMAGE, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    train = pairs.pair_split(cfg, "train")
    full = [_expected_image(train[int(i)], cfg)[..., 0] for i in batch["pair_index"]]
    cropped = [not np.allclose(b, f, atol=1e-3) for b, f in zip(batch["image"][..., 0], full)]
    assert any(cropped)  # crop_scale (0.6, 1) zooms in


def test_same_seed_same_batches_and_resume(cfg):
    first = take(iter(_train(cfg)), 4)
    assert_batches_equal(first, take(iter(_train(cfg)), 4))
    other = take(iter(_train(cfg, seed=1)), 1)[0]
    assert not np.array_equal(other["pair_index"], first[0]["pair_index"])

    it = iter(_train(cfg))
    take(it, 1)
    state = it.get_state()
    assert state == {"global_position": 8}
    resumed = iter(_train(cfg))
    resumed.set_state(state)
    assert_batches_equal(first[1:], take(resumed, 3))
    # One epoch covers every training pair once.
    train_pairs = len(pairs.pair_split(cfg, "train"))
    batches = take(iter(_train(cfg)), -(-train_pairs // 8))
    seen = np.concatenate([b["pair_index"] for b in batches])[:train_pairs]
    assert sorted(seen.tolist()) == list(range(train_pairs))


def test_prefetch_workers_give_the_same_batches(cfg):
    expected = take(iter(_train(cfg)), 3)
    cfg.num_workers = 1
    it = iter(_train(cfg))
    try:
        assert_batches_equal(expected, take(it, 3))
    finally:
        it.close()


def test_batch_larger_than_split_is_an_error(cfg):
    with pytest.raises(ValueError, match="too few"):
        _train(cfg, global_batch_size=64)


# ----------------------------------------------------------------- tokenizer


def test_tokenizer_trained_once_saved_with_the_data(cfg, tmp_path):
    path = pairs.tokenizer_path(cfg)
    assert path == os.path.join(pairs.pairs_root(cfg), "tokenizer.json")
    tokenizer = pairs.ensure_tokenizer(cfg)
    assert os.path.isfile(path) and tokenizer.get_vocab_size() == 300
    stamp = os.path.getmtime(path)
    assert pairs.ensure_tokenizer(cfg).to_str() == tokenizer.to_str()
    assert os.path.getmtime(path) == stamp
    cfg.vocab_size = 512
    with pytest.raises(ValueError, match="delete it"):
        pairs.ensure_tokenizer(cfg)
    cfg.tokenizer_path = str(tmp_path / "elsewhere.json")
    assert pairs.ensure_tokenizer(cfg).get_vocab_size() == 512
    assert os.path.isfile(tmp_path / "elsewhere.json")


# ---------------------------------------------------------------- evaluation


def test_eval_pairs_padding_labels_and_images(cfg):
    val = pairs.pair_split(cfg, "val")
    n = len(val)
    batch_size = 4
    assert n % batch_size  # the last batch is padded
    ev = pairs.make_eval_pairs(cfg, "val", image_size=IMAGE, batch_size=batch_size)
    assert ev.num_pairs == n and len(ev) == -(-n // batch_size)
    assert ev.label_names == cxr_phantom.LABEL_NAMES
    batches = list(ev)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == n and not valid[n:].any()
    index = np.concatenate([b["pair_index"] for b in batches])
    np.testing.assert_array_equal(index[:n], np.arange(n))
    assert (index[n:] == -1).all()
    last = batches[-1]
    assert last["image"].shape == (batch_size, IMAGE, IMAGE, 1)
    assert (last["text_ids"][~last["valid"]] == text.PAD_ID).all()
    assert (last["text_mask"][~last["valid"]] == 0).all()
    reports = np.concatenate([b["report"] for b in batches])
    assert list(reports[:n]) == list(ev.reports) and set(reports[n:]) <= {""}
    np.testing.assert_array_equal(np.concatenate([b["text_ids"] for b in batches])[:n], ev.text_ids)
    images = ev.images()
    assert images.shape == (n, IMAGE, IMAGE, 1)
    tokenizer = pairs.ensure_tokenizer(cfg)
    for i in range(n):
        meta = records.decode_meta(val[i])
        assert ev.reports[i] == meta["report"] and ev.reports[i].startswith("FINDINGS:")
        np.testing.assert_array_equal(ev.finding_labels[i], meta["finding_labels"])
        np.testing.assert_allclose(images[i], _expected_image(val[i], cfg), atol=1e-4)
        ids, _ = text.encode_report(tokenizer, text.preprocess_report(meta["report"]), LENGTH)
        np.testing.assert_array_equal(ev.text_ids[i], ids)
    # Equal label vectors <=> same group; the strict R@1 ceiling follows.
    same_labels = (ev.finding_labels[:, None] == ev.finding_labels[None]).all(-1)
    same_group = ev.finding_groups[:, None] == ev.finding_groups[None]
    np.testing.assert_array_equal(same_labels, same_group)
    assert 1 / n <= ev.recall_at_1_ceiling() <= 1.0


# ------------------------------------------------------- MIMIC-like records


def _mimic_like_tree(root):
    """prepare_data's layout, records as the MIMIC-CXR builder makes them."""
    rng = np.random.default_rng(0)
    phrases = ["left pleural effusion", "no pneumothorax", "heart size is normal", "clear lungs"]

    def record(i, view="frontal", report=True):
        meta = {"bits_stored": 16, "view_group": view, "chexpert": [0] * 14}
        meta["chexpert"][mimic_cxr.CHEXPERT_LABELS.index("Pleural Effusion")] = [1, 0, -1][i % 3]
        if report:
            words = " ".join(rng.choice(phrases, 2))
            meta["report"], _, _ = mimic_cxr.parse_report(
                f"FINAL REPORT\n INDICATION: cough\n\n FINDINGS: {words}.\n\n IMPRESSION: {i}."
            )
        return rng.integers(0, 65535, (40, 40), dtype=np.uint16), meta

    train = [record(i) for i in range(12)]
    train += [record(20, view="lateral"), record(21, report=False)]
    records.write_shards(train, str(root / "train"), "data", 2)
    val = [record(i) for i in range(5)] + [record(30, view="lateral")]
    records.write_shards(val, str(root / "val"), "data", 1)


def test_prepared_pairs_filter_views_and_missing_reports(tmp_path):
    _mimic_like_tree(tmp_path)
    c = pairs.default_pairs_data_config()
    c.update(source="prepared", dir=str(tmp_path), vocab_size=200, max_text_length=16)
    c.update(num_workers=0, num_threads=1)
    train = pairs.pair_split(c, "train")
    assert len(train) == 12
    cache = tmp_path / "pairs_index_train.json"
    with open(cache) as f:
        assert json.load(f)["dropped"] == {"view lateral": 1, "no report": 1}
    for i in range(len(train)):
        meta = records.decode_meta(train[i])
        assert meta["view_group"] == "frontal" and meta["report"]
    assert pairs.pair_split(c, "train").record_indices.tolist() == train.record_indices.tolist()

    batch = take(iter(_train(c, image_size=16, global_batch_size=4)), 1)[0]
    assert batch["image"].shape == (4, 16, 16, 1) and batch["text_ids"].shape == (4, 16)
    assert os.path.isfile(tmp_path / "tokenizer.json")

    ev = pairs.make_eval_pairs(c, "val", image_size=16, batch_size=4)
    assert ev.num_pairs == 5 and ev.label_names == mimic_cxr.CHEXPERT_LABELS
    effusion = ev.finding_labels[:, mimic_cxr.CHEXPERT_LABELS.index("Pleural Effusion")]
    assert effusion.tolist() == [1, 0, 0, 1, 0]  # uncertain (-1) counts as absent
    assert ev.texts[0].startswith("findings: ") and "indication" not in ev.texts[0]

    c.view_groups = ("lateral",)
    with pytest.raises(ValueError, match="too few"):
        _train(c, image_size=16, global_batch_size=4)
    c.view_groups = ("ap_only",)
    with pytest.raises(ValueError, match="no image-report pairs"):
        pairs.pair_split(c, "val")
