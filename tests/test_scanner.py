"""The per-site scanner (input_pipeline/scanner.py): each effect does what it says,
the identity changes nothing, noise is deterministic per record, dtype and bit depth
survive, and sources.resolve decodes every pipeline's images through it."""

import pickle
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest

from input_pipeline import finetune, pipeline, records, sources
from input_pipeline.record_source import DataSourceError, MimjaxRecordDecoder
from input_pipeline.scanner import ScannedDecoder, Scanner
from mimjax import run_config

META16 = {"bits_stored": 16}


def _ramp(size=64, dtype=np.uint16, bits=16):
    top = 2**bits - 1
    ramp = np.linspace(0, top, size * size).reshape(size, size)
    return np.rint(ramp).astype(dtype)


def _random(size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, (size, size)).astype(np.uint16)


def _unit(image, bits=16):
    return image.astype(np.float64) / (2**bits - 1)


def _high_freq(image):
    x = _unit(image)
    return float(np.mean(np.diff(x, axis=0) ** 2) + np.mean(np.diff(x, axis=1) ** 2))


# ----------------------------------------------------------------- the model


def test_identity_is_none_and_bitwise_unchanged():
    assert Scanner.from_config(None) is None
    assert Scanner.from_config({}) is None
    assert Scanner.from_config(pipeline.default_data_config().scanner) is None
    image = _random()
    assert Scanner().apply(image, META16, 0) is image
    data = records.encode_record(image, META16)
    scanned, meta = ScannedDecoder(MimjaxRecordDecoder(), Scanner()).decode(data)
    np.testing.assert_array_equal(scanned, image)
    assert scanned.dtype == image.dtype and meta == META16


@pytest.mark.parametrize("curve", [dict(gamma=0.5), dict(offset=0.1), dict(contrast=1.3)])
def test_curve_brightens(curve):
    image = _ramp()
    out = Scanner(**curve).apply(image, META16, 0)
    assert out.shape == image.shape and out.dtype == np.uint16
    assert _unit(out).mean() > _unit(image).mean() + 0.04


def test_curve_follows_the_formula():
    image = _ramp()
    out = Scanner(gamma=2.0, contrast=0.5, offset=0.25).apply(image, META16, 0)
    want = np.clip(0.25 + 0.5 * _unit(image) ** 2, 0, 1)
    np.testing.assert_allclose(_unit(out), want, atol=2e-5)


@pytest.mark.parametrize("noise", [0.02, 0.05])
def test_noise_adds_its_std_to_a_flat_image(noise):
    flat = np.full((128, 128), 32768, np.uint16)
    out = Scanner(noise=noise).apply(flat, META16, 7)
    assert _unit(flat).std() == 0
    assert abs(_unit(out).std() - noise) < 0.1 * noise
    assert abs(_unit(out).mean() - 0.5) < 0.01


def test_noise_of_a_large_image_is_seeded_and_unit():
    flat = np.full((1200, 1000), 32768, np.uint16)  # more than one window of the bank
    a, b = (Scanner(noise=0.05).apply(flat, META16, s) for s in (1, 2))
    np.testing.assert_array_equal(a, Scanner(noise=0.05).apply(flat, META16, 1))
    assert abs(_unit(a).std() - 0.05) < 0.005 and not np.array_equal(a, b)


def test_blur_lowers_high_frequency_energy():
    image = _random()
    out = Scanner(blur_sigma=1.5).apply(image, META16, 0)
    assert out.shape == image.shape
    assert _high_freq(out) < 0.2 * _high_freq(image)
    assert abs(_unit(out).mean() - _unit(image).mean()) < 0.02


def test_resolution_keeps_the_shape_and_removes_detail():
    checker = (np.indices((64, 64)).sum(0) % 2 * 65535).astype(np.uint16)  # 1-px detail
    out = Scanner(resolution=0.5).apply(checker, META16, 0)
    assert out.shape == checker.shape and out.dtype == checker.dtype
    assert _unit(out).std() < 0.05 * _unit(checker).std()  # averaged to grey
    assert abs(_unit(out).mean() - 0.5) < 0.01
    # Coarse structure (what masks and landmarks follow) stays where it was.
    half = np.zeros((64, 64), np.uint16)
    half[:, 32:] = 65535
    out = Scanner(resolution=0.5).apply(half, META16, 0)
    assert _unit(out)[:, :30].max() < 0.05 and _unit(out)[:, 34:].min() > 0.95


def test_same_record_decodes_identically_and_records_get_different_noise():
    decoder = ScannedDecoder(MimjaxRecordDecoder(), Scanner(noise=0.05, gamma=0.8))
    flat = np.full((32, 32), 2000, np.uint16)
    a = records.encode_record(flat, {"bits_stored": 12, "id": "a"})
    b = records.encode_record(flat, {"bits_stored": 12, "id": "b"})
    first, second = decoder.decode(a)[0], decoder.decode(a)[0]
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, decoder.decode(b)[0])
    # decode and decode_with_extras agree.
    np.testing.assert_array_equal(first, decoder.decode_with_extras(a)[0])


@pytest.mark.parametrize(
    "dtype,bits", [(np.uint16, 16), (np.uint16, 12), (np.uint8, 8), (np.uint8, None)]
)
def test_dtype_and_bit_depth_are_kept(dtype, bits):
    top = 2 ** (bits or 8) - 1
    image = _ramp(dtype=dtype, bits=bits or 8)
    meta = {} if bits is None else {"bits_stored": bits}
    out = Scanner(gamma=0.5, contrast=1.5, noise=0.1, blur_sigma=1.0).apply(image, meta, 3)
    assert out.dtype == dtype and out.shape == image.shape
    assert out.max() <= top and out.max() == top  # saturated, not past the bit depth


def test_float_images_stay_float():
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = Scanner(gamma=0.5).apply(image, {}, 0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.sqrt(image), atol=1e-6)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_multichannel_images_are_scanned_per_channel(layout):
    image = np.zeros((2, 48, 48), np.uint16)
    image[1] = 65535
    image[0, 20:28, 20:28] = 65535
    meta = {"bits_stored": 16, "channels": ["a", "b"]}
    if layout == "channels_last":
        image, meta = np.moveaxis(image, 0, -1).copy(), META16
    out = Scanner(blur_sigma=1.0, resolution=0.5).apply(image, meta, 0)
    assert out.shape == image.shape
    planes = out if layout == "channels_first" else np.moveaxis(out, -1, 0)
    assert planes[1].min() == 65535  # a flat channel stays flat: no mixing with channel 0
    assert planes[0, :10].max() == 0 and 0 < planes[0, 18, 24] < 65535  # blurred edge


# ------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "field,value",
    [("gamma", 0.0), ("gamma", -1.0), ("noise", -0.1), ("blur_sigma", -1.0),
     ("resolution", 0.0), ("resolution", 1.5), ("contrast", 0.0), ("offset", 2.0),
     ("gamma", float("nan")), ("noise", "lots")],
)
def test_bad_values_raise_one_line_naming_the_field(field, value):
    with pytest.raises(DataSourceError) as e:
        Scanner.from_config({field: value})
    message = str(e.value)
    assert f"data.scanner.{field}" in message and "\n" not in message
    assert "must be" in message


def test_unknown_fields_raise_naming_the_allowed_ones():
    with pytest.raises(DataSourceError, match=r"no field\(s\) \['gama'\].*'gamma'"):
        Scanner.from_config({"gama": 0.8})


@pytest.mark.parametrize(
    "cfg",
    [
        {"gamma": 0.8, "noise": 0.01},
        SimpleNamespace(gamma=0.8, noise=0.01),
        Scanner(gamma=0.8, noise=0.01),
    ],
)
def test_from_config_reads_any_config_kind(cfg):
    assert Scanner.from_config(cfg) == Scanner(gamma=0.8, noise=0.01)


def test_command_line_override_reaches_the_scanner():
    config = run_config.load("configs/demo.py:tiny", [("data.scanner.gamma", "0.8"),
                                                      ("data.scanner.resolution", "1")])
    assert Scanner.from_config(config.data.scanner) == Scanner(gamma=0.8)
    assert Scanner.from_config(config.data.scanner.to_dict()) == Scanner(gamma=0.8)
    frozen = ml_collections.FrozenConfigDict(config.data)
    assert Scanner.from_config(frozen.scanner).describe() == "scanner(gamma=0.8)"


def test_scanned_decoder_pickles():
    decoder = ScannedDecoder(MimjaxRecordDecoder(), Scanner(gamma=0.7, noise=0.02))
    data = records.encode_record(_random(32), META16)
    clone = pickle.loads(pickle.dumps(decoder))
    assert clone.scanner == decoder.scanner
    np.testing.assert_array_equal(clone.decode(data)[0], decoder.decode(data)[0])


# --------------------------------------------------------- through the resolver


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("phantoms"))


def _phantom_cfg(phantom_dir, **scanner):
    c = finetune.default_finetune_data_config()
    c.update(dir=phantom_dir, phantom_num_images=8, phantom_size=64, num_workers=0)
    c.scanner.update(scanner)
    return c


def test_resolved_source_decodes_through_the_scanner(phantom_dir):
    plain = sources.resolve(_phantom_cfg(phantom_dir), "train")
    scanned = sources.resolve(_phantom_cfg(phantom_dir, gamma=0.5), "train")
    assert isinstance(scanned.decoder, ScannedDecoder) and "scanner(gamma=0.5)" in scanned.where
    assert not isinstance(plain.decoder, ScannedDecoder)
    assert len(scanned) == len(plain) and scanned.paths == plain.paths
    np.testing.assert_array_equal(scanned.record_indices, plain.record_indices)
    for i in range(len(plain)):
        a, b = plain[i], scanned[i]
        assert a["meta"] == b["meta"] and a["image"].dtype == b["image"].dtype
        assert a["image"].shape == b["image"].shape
        assert _unit(b["image"]).mean() > _unit(a["image"]).mean()
    # What grain's map step decodes (records + decoder) is what src[i] gives.
    np.testing.assert_array_equal(
        scanned.decoder.decode(scanned.records[0])[0], scanned[0]["image"])
    pickle.loads(pickle.dumps(scanned.decoder))


def test_eval_batches_see_the_scanned_images(phantom_dir):
    """The eval batches of fine-tuning and linear probes decode through it too."""
    kw = dict(image_size=32, batch_size=4, label_keys=())
    plain = finetune.make_eval_batches(_phantom_cfg(phantom_dir), "train", **kw)
    scanned = finetune.make_eval_batches(_phantom_cfg(phantom_dir, gamma=0.5), "train", **kw)
    assert plain.num_records == scanned.num_records
    assert scanned[0]["image"].mean() > plain[0]["image"].mean()


def test_bad_scanner_is_refused_before_rendering(tmp_path):
    with pytest.raises(DataSourceError, match="data.scanner.resolution"):
        sources.resolve(_phantom_cfg(str(tmp_path), resolution=2.0), None)
    assert not list(tmp_path.iterdir())  # nothing rendered


def test_segmentation_masks_pass_unchanged(data_dir):
    cfg = SimpleNamespace(source="cardiac_phantom", dir=str(data_dir), phantom_num_images=16,
                          phantom_size=64, phantom_seed=0)
    plain = sources.resolve(cfg, None)
    cfg.scanner = {"gamma": 0.5, "noise": 0.02, "blur_sigma": 1.0, "resolution": 0.5}
    scanned = sources.resolve(cfg, None)
    for i in (0, 5):
        image, meta, extras = plain.decoder.decode_with_extras(plain.raw(i))
        s_image, s_meta, s_extras = scanned.decoder.decode_with_extras(scanned.raw(i))
        assert s_meta == meta and s_image.shape == image.shape and s_image.dtype == image.dtype
        assert not np.array_equal(s_image, image)
        assert extras.keys() == s_extras.keys() and "mask" in extras
        for k in extras:
            np.testing.assert_array_equal(s_extras[k], extras[k])
