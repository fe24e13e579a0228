"""Transforms, the phantom dataset cache, and the grain pretraining pipeline.

A tiny stand-in replaces input_pipeline.phantom.render_phantom (32x32 noise),
so these tests do not depend on the real phantom; one test uses the real one
when it exists.
"""

import gc
import json
import os
import sys
import types

import cv2
import numpy as np
import pytest

from input_pipeline import dequantize, pipeline, records, sources, transforms

from helpers import assert_batches_equal, take

SCALES = (8, 16)
RENDER_CALLS = []  # indices rendered in this process by the stand-in


def fake_render(index, seed, size=448):
    """Deterministic 12-bit noise; module level so a spawned pool can pickle it."""
    RENDER_CALLS.append(index)
    rng = np.random.default_rng([seed, index])
    image = rng.integers(0, 4096, (size, size)).astype(np.uint16)
    return image, {"label": index % 3, "bits_stored": 12}


@pytest.fixture
def fake_phantom(monkeypatch):
    module = types.ModuleType("input_pipeline.phantom")
    module.render_phantom = fake_render
    monkeypatch.setitem(sys.modules, "input_pipeline.phantom", module)
    RENDER_CALLS.clear()
    return module


@pytest.fixture
def cfg(tmp_path, fake_phantom):
    c = pipeline.default_data_config()
    c.dir = str(tmp_path / "data")
    c.phantom_num_images = 16
    c.phantom_size = 32
    c.num_workers = 0
    c.num_threads = 1
    c.label_keys = ("label",)
    return c


def _dataset(c, workers=0, **kw):
    c = c.copy_and_resolve_references()
    c.num_workers = workers
    kw = {"scales": SCALES, "global_batch_size": 4, "seed": 0, **kw}
    return pipeline.make_pretrain_dataset(c, **kw)


def _close(*its):
    for it in its:
        it.close()
    gc.collect()


# ---------------------------------------------------------------- transforms


def test_crop_window_follows_scale_and_ratio():
    areas, ratios = [], []
    for s in range(300):
        top, left, h, w = transforms.sample_crop_window(
            120, 200, np.random.default_rng(s), (0.2, 1.0), (3 / 4, 4 / 3)
        )
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
        areas.append(h * w / (120 * 200))
        ratios.append(w / h)
    assert 0.19 <= min(areas) and max(areas) <= 1.0 and np.ptp(areas) > 0.5
    assert 0.73 <= min(ratios) and max(ratios) <= 1.36
    # Impossible request (a strip with a square-ish ratio at 90% of the area):
    # center-crop fallback with the ratio clipped into range.
    top, left, h, w = transforms.sample_crop_window(
        10, 1000, np.random.default_rng(0), (0.9, 1.0), (3 / 4, 4 / 3)
    )
    assert (h, w) == (10, 13) and top == 0 and left == (1000 - 13) // 2


def _noise_element(size=256, seed=0):
    image = np.random.default_rng(seed).integers(0, 65536, (size, size)).astype(np.uint16)
    return {"image": image, "meta": {}, "index": 0}


def test_large_scale_comes_from_full_resolution_pixels():
    element = _noise_element()
    aug = transforms.MultiScaleRandomCrop(
        (32, 64), crop_scale=(0.2, 1.0), hflip=True, mean=0.5, std=0.25
    )
    for seed in range(8):
        out = aug.random_map(element, np.random.default_rng(seed))
        small, large = out["image_32"][..., 0], out["image_64"][..., 0]
        scale = large.std()
        # Area-downsampling the large target gives the small one ...
        down = cv2.resize(large, (32, 32), interpolation=cv2.INTER_AREA)
        assert np.abs(down - small).mean() < 0.02 * scale
        # ... but the large target has detail the small one cannot supply.
        up = np.repeat(np.repeat(small, 2, 0), 2, 1)
        assert np.abs(up - large).mean() > 0.5 * scale

        # And it is exactly the area resize of the sampled full-resolution window.
        rng = np.random.default_rng(seed)
        top, left, h, w = transforms.sample_crop_window(256, 256, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        flip = rng.random() < 0.5
        window = element["image"][top : top + h, left : left + w]
        expected = cv2.resize(window, (64, 64), interpolation=cv2.INTER_AREA)
        expected = expected[:, ::-1] if flip else expected
        np.testing.assert_allclose(large, (expected / 65535 - 0.5) / 0.25, atol=1e-5)


def test_flip_is_consistent_across_scales():
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 1000, (64, 1))  # increases to the right
    element = {"image": ramp, "meta": {}, "index": 0}

    def orientations(hflip):
        aug = transforms.MultiScaleRandomCrop((8, 16, 32), hflip=hflip, mean=0, std=1)
        result = []
        for seed in range(40):
            out = aug.random_map(element, np.random.default_rng(seed))
            signs = {
                np.sign(np.diff(out[f"image_{s}"][..., 0], axis=1).mean()) for s in (8, 16, 32)
            }
            assert len(signs) == 1, f"scales disagree on the flip for seed {seed}"
            result.append(signs.pop())
        return result

    with_flip = orientations(True)
    assert with_flip.count(-1) >= 8 and with_flip.count(1) >= 8
    assert set(orientations(False)) == {1}


@pytest.mark.parametrize(
    "dtype, meta, divisor",
    [
        (np.uint16, {"bits_stored": 12}, 4095),
        (np.uint16, {}, 65535),
        (np.uint8, {"label": 1}, 255),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_normalization(dtype, meta, divisor, channels):
    image = np.full((20, 24), 200, dtype)
    image[0, 0] = 0
    element = {"image": image, "meta": meta, "index": 7}
    t = transforms.MultiScaleResize((10, 20), mean=0.1, std=0.2, channels=channels)
    out = t.map(element)
    assert out["index"] == 7 and out["index"].dtype == np.int32
    for s in (10, 20):
        x = out[f"image_{s}"]
        assert x.shape == (s, s, channels) and x.dtype == np.float32
        np.testing.assert_allclose(x[s // 2, s // 2], (200 / divisor - 0.1) / 0.2, rtol=1e-6)
        for c in range(1, channels):
            np.testing.assert_array_equal(x[..., c], x[..., 0])
    # 20x24 -> 20x20 squashes the full image: corner pixel dark, nothing cropped.
    assert out["image_20"][0, 0, 0] < out["image_20"][10, 10, 0]


def test_transform_validation():
    with pytest.raises(ValueError, match="ascending"):
        transforms.MultiScaleResize((16, 8), mean=0, std=1)
    with pytest.raises(ValueError, match="channels"):
        transforms.MultiScaleResize((8,), mean=0, std=1, channels=2)
    with pytest.raises(ValueError, match="std"):
        transforms.MultiScaleResize((8,), mean=0, std=0)
    with pytest.raises(ValueError, match="crop_scale"):
        transforms.MultiScaleRandomCrop((8,), crop_scale=(0.5, 1.5), mean=0, std=1)
    element = {"image": np.zeros((8, 8), np.uint16), "meta": {"bits_stored": 17}}
    with pytest.raises(ValueError, match="bits_stored"):
        transforms.MultiScaleResize((8,), mean=0, std=1).map(element)
    with pytest.raises(KeyError, match="label"):
        transforms.MultiScaleResize((8,), mean=0, std=1, label_keys=("label",)).map(
            {"image": np.zeros((8, 8), np.uint16), "meta": {}}
        )


# ------------------------------------------------------ uint16 transport


def test_quantize_unit():
    image = np.array([[0, 1, 1000, 4095, 4096, 65535]], np.uint16)
    q = transforms.quantize_unit(image, max_value=4095)
    assert q.dtype == np.uint16 and q.shape == image.shape
    # round(x / 4095 * 65535); above max_value (a lying bits_stored) saturates.
    np.testing.assert_array_equal(q, [[0, 16, 16004, 65535, 65535, 65535]])
    np.testing.assert_array_equal(transforms.quantize_unit(image, max_value=65535), image)
    eight = np.array([[0, 1, 128, 255]], np.uint8)
    np.testing.assert_array_equal(
        transforms.quantize_unit(eight, max_value=255), [[0, 257, 128 * 257, 65535]]
    )
    ramp = np.arange(4096, dtype=np.uint16)[None]
    error = transforms.quantize_unit(ramp, max_value=4095) / 65535 - ramp / 4095
    assert np.abs(error).max() <= 0.51 / 65535  # rounded to the nearest step


def _data_cfg(mean, std, channels):
    return types.SimpleNamespace(norm_mean=mean, norm_std=std, channels=channels)


@pytest.mark.parametrize(
    "dtype, meta, top",
    [(np.uint16, {"bits_stored": 12}, 4095), (np.uint16, {}, 65535), (np.uint8, {}, 255)],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_quantized_transform_then_dequantize_matches_float_path(dtype, meta, top, channels):
    """uint16 transport + on-device normalisation = the float32 host path, to within
    1e-5 of the normalised range (1 / std); same crop, same flip, same pixels."""
    image = np.random.default_rng(0).integers(0, top + 1, (48, 40)).astype(dtype)
    element = {"image": image, "meta": meta, "index": 3}
    kw = {"mean": 0.19, "std": 0.22, "channels": channels}
    as_float = transforms.MultiScaleRandomCrop((8, 16), **kw)
    as_uint16 = transforms.MultiScaleRandomCrop((8, 16), quantize=True, **kw)
    for seed in range(12):
        ref = as_float.random_map(element, np.random.default_rng(seed))
        out = as_uint16.random_map(element, np.random.default_rng(seed))
        assert out["index"] == ref["index"]
        for s in (8, 16):
            assert out[f"image_{s}"].dtype == np.uint16 and out[f"image_{s}"].shape == (s, s, 1)
        got = dequantize.dequantize_images(out, _data_cfg(**kw))
        for s in (8, 16):
            x = np.asarray(got[f"image_{s}"])
            assert x.dtype == np.float32 and x.shape == ref[f"image_{s}"].shape
            np.testing.assert_allclose(x, ref[f"image_{s}"], rtol=0, atol=1e-5 / kw["std"])


@pytest.mark.parametrize("channels", [1, 3])
def test_pipeline_dequantized_matches_float_pipeline(cfg, monkeypatch, channels):
    """make_pretrain_dataset's uint16 batches, dequantised as the train step does, equal
    the float32 batches the same pipeline built on the host, within 1e-4 of the range."""
    cfg.channels = channels
    shipped = take(iter(_dataset(cfg)), 3)
    quantized_crop = transforms.MultiScaleRandomCrop

    def float_crop(*args, quantize, **kw):
        assert quantize
        return quantized_crop(*args, quantize=False, **kw)

    monkeypatch.setattr(transforms, "MultiScaleRandomCrop", float_crop)
    reference = take(iter(_dataset(cfg)), 3)
    for batch, ref in zip(shipped, reference):
        assert batch["image_16"].shape == (4, 16, 16, 1)
        assert ref["image_16"].shape == (4, 16, 16, channels)
        got = dequantize.dequantize_images(batch, cfg)
        assert got.keys() == ref.keys()
        for k in ref:
            if k.startswith("image_"):
                tolerance = 1e-4 * (1 / cfg.norm_std)  # of the normalised [0, 1] range
                np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=0, atol=tolerance)
            else:
                np.testing.assert_array_equal(got[k], ref[k])


def test_dequantize_images_touches_only_unsigned_images():
    data_cfg = _data_cfg(0.5, 0.25, 3)
    floats = np.ones((2, 4, 4, 3), np.float32)
    batch = {
        "image_8": np.array([0, 65535], np.uint16).reshape(2, 1, 1, 1),
        "image": floats,
        "index": np.arange(2, dtype=np.int32),
        "label_y": np.array([1, 2], np.uint8),
    }
    out = dequantize.dequantize_images(batch, data_cfg)
    np.testing.assert_allclose(np.asarray(out["image_8"])[:, 0, 0], [[-2] * 3, [2] * 3])
    assert out["image"] is floats and out["index"] is batch["index"]
    assert out["label_y"] is batch["label_y"]  # labels are not images
    assert dequantize.dequantize_images({"image_8": floats}, object())["image_8"] is floats
    with pytest.raises(ValueError, match="norm_mean"):
        dequantize.dequantize_images(batch, object())
    with pytest.raises(ValueError, match="one channel"):
        dequantize.dequantize_images({"image_8": np.zeros((1, 2, 2, 3), np.uint16)}, data_cfg)


# ------------------------------------------------------------ phantom cache


def _phantom(tmp_path, **kw):
    kw = {"num_images": 6, "seed": 3, "size": 16, "num_shards": 2, "num_procs": 1, **kw}
    return sources.ensure_phantom_dataset(str(tmp_path), **kw)


def test_phantom_generated_once(tmp_path, fake_phantom):
    paths = _phantom(tmp_path)
    assert sorted(RENDER_CALLS) == list(range(6))
    assert os.path.dirname(paths[0]) == str(tmp_path / "phantom_16_3_6")
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    assert _phantom(tmp_path) == paths
    assert len(RENDER_CALLS) == 6  # nothing rendered or rewritten the second time
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps
    src = sources.ArrayRecordImageSource(paths)
    image, labels = fake_render(4, 3, 16)
    found = [src[i] for i in range(len(src)) if src[i]["meta"]["label"] == labels["label"]]
    assert any(np.array_equal(e["image"], image) for e in found)


def test_phantom_regenerated_after_killed_generation(tmp_path, fake_phantom):
    def dies_at_3(index, seed, size):
        if index == 3:
            raise KeyboardInterrupt  # stands in for a kill mid-generation
        return fake_render(index, seed, size)

    fake_phantom.render_phantom = dies_at_3
    with pytest.raises(KeyboardInterrupt):
        _phantom(tmp_path)
    out_dir = tmp_path / "phantom_16_3_6"
    assert not any(n.endswith(".array_record") for n in os.listdir(out_dir))

    # A kill after the shards were renamed but before the marker: shards exist,
    # marker missing -> regenerate, not trust them.
    fake_phantom.render_phantom = fake_render
    paths = _phantom(tmp_path)
    os.remove(out_dir / "_COMPLETE.json")
    with open(paths[0], "wb") as f:
        f.write(b"garbage")
    RENDER_CALLS.clear()
    assert _phantom(tmp_path) == paths
    assert sorted(RENDER_CALLS) == list(range(6))
    assert len(sources.ArrayRecordImageSource(paths)) == 6

    # Marker present but a shard deleted afterwards: regenerate too.
    os.remove(paths[1])
    RENDER_CALLS.clear()
    assert _phantom(tmp_path) == paths
    assert len(RENDER_CALLS) == 6 and os.path.exists(paths[1])


@pytest.mark.slow
def test_phantom_process_pool_matches_serial(tmp_path, fake_phantom):
    serial = _phantom(tmp_path / "a", num_procs=1)
    pooled = _phantom(tmp_path / "b", num_procs=2)
    a, b = sources.ArrayRecordImageSource(serial), sources.ArrayRecordImageSource(pooled)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["meta"] == b[i]["meta"]


def test_real_phantom(tmp_path):
    phantom = pytest.importorskip("input_pipeline.phantom")
    if phantom.render_phantom is fake_render:
        pytest.skip("stand-in active")
    paths = sources.ensure_phantom_dataset(
        str(tmp_path), num_images=4, seed=0, size=64, num_shards=2, num_procs=1
    )
    src = sources.ArrayRecordImageSource(paths)
    assert len(src) == 4
    for i in range(4):
        e = src[i]
        assert e["image"].dtype == np.uint16 and e["image"].shape == (64, 64)
        json.dumps(e["meta"])
    c = pipeline.default_data_config()
    c.update(dir=str(tmp_path), phantom_num_images=4, phantom_size=64, num_workers=0)
    batch = next(
        iter(pipeline.make_pretrain_dataset(c, scales=(16, 32), global_batch_size=4, seed=0))
    )
    assert batch["image_32"].shape == (4, 32, 32, 1)
    assert np.isfinite(batch["image_32"]).all() and batch["image_32"].std() > 0


# ----------------------------------------------------------------- pipeline


def test_batches_shapes_labels_and_determinism(cfg):
    it = iter(_dataset(cfg))
    batches = take(it, 3)
    b = batches[0]
    assert set(b) == {"image_8", "image_16", "index", "label_label", "example_id"}
    # Stream positions: batch g holds examples g*B .. g*B+B-1, in order.
    np.testing.assert_array_equal(b["example_id"], np.arange(4, dtype=np.uint32))
    np.testing.assert_array_equal(batches[2]["example_id"], np.arange(8, 12, dtype=np.uint32))
    assert b["image_8"].shape == (4, 8, 8, 1) and b["image_16"].shape == (4, 16, 16, 1)
    assert b["image_16"].dtype == np.uint16 and b["index"].dtype == np.int32
    src = pipeline.make_source(cfg)
    for batch in batches:
        for idx, label in zip(batch["index"], batch["label_label"]):
            assert src[int(idx)]["meta"]["label"] == label
    assert_batches_equal(batches, take(iter(_dataset(cfg)), 3))
    other_seed = take(iter(_dataset(cfg, seed=1)), 3)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(batches, other_seed))


def test_epochs_are_reshuffled_and_reaugmented(cfg):
    it = iter(_dataset(cfg, global_batch_size=8))
    batches = take(it, 6)  # 16 records, 8 per batch: 2 batches per epoch
    epochs = [np.concatenate([b["index"] for b in batches[e * 2 : e * 2 + 2]]) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(16))  # each epoch sees every record once
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # The same record is augmented differently in different epochs.
    first = {int(i): x for b in batches[:2] for i, x in zip(b["index"], b["image_16"])}
    second = {int(i): x for b in batches[2:4] for i, x in zip(b["index"], b["image_16"])}
    assert sum(not np.allclose(first[i], second[i]) for i in range(16)) >= 14


def test_process_slices_are_disjoint_and_cover_the_data(cfg):
    single = take(iter(_dataset(cfg, global_batch_size=8)), 4)
    per_process = [
        take(iter(_dataset(cfg, global_batch_size=8, process_index=p, process_count=2)), 4)
        for p in range(2)
    ]
    for step in range(4):
        p0, p1 = (per_process[p][step] for p in range(2))
        assert p0["image_16"].shape[0] == 4
        assert not set(p0["index"]) & set(p1["index"])
        # Stacked in process order (as the batch-sharded global array stacks them),
        # the processes' batches are the single-process global batch, row for row:
        # the same records, augmentations and example ids.
        for key, value in single[step].items():
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), value, key)
    for epoch in range(2):  # 2 global steps per epoch
        seen = np.concatenate(
            [per_process[p][s]["index"] for p in range(2) for s in (2 * epoch, 2 * epoch + 1)]
        )
        assert sorted(seen) == list(range(16))


def test_state_restore_continues_identically(cfg):
    it = iter(_dataset(cfg))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 4)
    fresh = iter(_dataset(cfg))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)
    # Restoring into a different global batch size continues at the same record.
    it8 = iter(_dataset(cfg, global_batch_size=8))
    it8.set_state(state)
    np.testing.assert_array_equal(
        next(it8)["index"], np.concatenate([b["index"] for b in expected[:2]])
    )
    _close(it, fresh, it8)


@pytest.mark.slow
def test_workers_give_same_batches_and_portable_state(cfg):
    reference_it = iter(_dataset(cfg, workers=0))
    reference = take(reference_it, 8)
    mp_it = iter(_dataset(cfg, workers=2))
    assert_batches_equal(take(mp_it, 3), reference[:3])
    state = mp_it.get_state()
    assert_batches_equal(take(mp_it, 2), reference[3:5])
    # mp_prefetch state -> fresh in-process iterator, and back.
    plain = iter(_dataset(cfg, workers=0))
    plain.set_state(state)
    assert_batches_equal(take(plain, 2), reference[3:5])
    state = plain.get_state()
    mp_it2 = iter(_dataset(cfg, workers=2))
    mp_it2.set_state(state)
    assert_batches_equal(take(mp_it2, 3), reference[5:8])
    _close(reference_it, mp_it, plain, mp_it2)


@pytest.mark.slow
def test_orbax_checkpoint_of_mp_iterator(cfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = iter(_dataset(cfg, workers=2))
    take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 3)
    restored = iter(_dataset(cfg, workers=2))
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.restore(
            2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    assert_batches_equal(take(restored, 3), expected)
    _close(it, restored)


def test_fixed_batch(cfg):
    fixed = pipeline.make_fixed_batch(cfg, scales=SCALES, num_images=5, seed=0)
    np.testing.assert_array_equal(fixed["index"], np.arange(5))
    assert fixed["image_16"].shape == (5, 16, 16, 1)
    src = pipeline.make_source(cfg)
    t = transforms.MultiScaleResize(SCALES, mean=cfg.norm_mean, std=cfg.norm_std, quantize=True)
    np.testing.assert_array_equal(fixed["image_8"][3], t.map(src[3])["image_8"])
    again = pipeline.make_fixed_batch(cfg, scales=SCALES, num_images=5, seed=1)
    assert_batches_equal([fixed], [again])
    with pytest.raises(ValueError, match="num_images"):
        pipeline.make_fixed_batch(cfg, scales=SCALES, num_images=17, seed=0)


def test_shards_source(tmp_path):
    recs = [(np.full((24, 24), i, np.uint8), {"label": i}) for i in range(8)]
    records.write_shards(recs, str(tmp_path / "shards"), "mine", 2)
    c = pipeline.default_data_config()
    c.update(
        source="shards",
        dir=str(tmp_path / "shards" / "mine-*"),
        num_workers=0,
        label_keys=("label",),
    )
    batch = next(
        iter(pipeline.make_pretrain_dataset(c, scales=(8, 16), global_batch_size=8, seed=0))
    )
    assert sorted(batch["label_label"]) == list(range(8))
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.make_pretrain_dataset(c, scales=(16, 32), global_batch_size=8, seed=0)


def test_pipeline_validation(cfg):
    with pytest.raises(ValueError, match="multiple of process_count"):
        _dataset(cfg, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        _dataset(cfg, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="ascending"):
        _dataset(cfg, scales=(16, 8))
    with pytest.raises(ValueError, match="exceeds phantom_size"):
        _dataset(cfg, scales=(16, 64))
    with pytest.raises(ValueError, match="cannot fill"):
        _dataset(cfg, global_batch_size=32)
    bad = cfg.copy_and_resolve_references()
    bad.source = "nonsense"
    with pytest.raises(ValueError, match="unknown data.source 'nonsense'"):
        _dataset(bad)
    bad.source = "arrayrecord"  # the retired name says what to use instead
    with pytest.raises(ValueError, match="'prepared'.*'shards'"):
        _dataset(bad)


def test_roi_context_pretrains_on_lesion_crops(tmp_path):
    """With data.roi_context the pretraining crops come from the lesion window only."""
    image = np.full((64, 64), 100, np.uint16)
    image[20:36, 30:46] = 4000  # the "lesion": exactly the 16-px window below
    meta = {"lesion_center": [28, 38], "lesion_radius_px": 16 / 6, "bits_stored": 12}
    records.write_shards([(image, meta)] * 8, str(tmp_path), "data", 1)
    c = pipeline.default_data_config()
    c.update(source="shards", dir=str(tmp_path), num_workers=0, num_threads=1)
    c.update(roi_context=3.0, roi_min_px=16, crop_scale=(0.3, 1.0))
    batch = take(iter(pipeline.make_pretrain_dataset(c, scales=SCALES, global_batch_size=4,
                                                      seed=0)), 1)[0]
    lesion = transforms.quantize_unit(np.array([[4000.0]]), max_value=4095.0)[0, 0]
    for key in ("image_8", "image_16"):
        assert (batch[key] == lesion).all(), key  # no background pixel in any crop
    fixed = pipeline.make_fixed_batch(c, scales=SCALES, num_images=2, seed=0)
    assert (fixed["image_16"] == lesion).all()
    c.roi_min_px = 8  # crops as small as 8 px cannot give 16-px targets from real pixels
    with pytest.raises(ValueError, match="roi_min_px"):
        pipeline.make_pretrain_dataset(c, scales=SCALES, global_batch_size=4, seed=0)
