"""Record format, ArrayRecord shard writer, shard listing, and the image source."""

import os
import pickle

import numpy as np
import pytest
from array_record.python import array_record_module

from input_pipeline import records
from input_pipeline.sources import ArrayRecordImageSource


def _image(dtype, shape=(5, 7), seed=0):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, info.max, shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip(dtype):
    image = _image(dtype)
    image[0, 0] = np.iinfo(dtype).max  # extremes survive
    meta = {"label": 2, "spacing": [0.1, 0.07], "name": "case ü", "nested": {"a": None}}
    out, out_meta = records.decode_record(records.encode_record(image, meta))
    assert out.dtype == dtype and out.shape == image.shape
    np.testing.assert_array_equal(out, image)
    assert out_meta == meta
    out[0, 0] = 0  # the decoded image is an ordinary writable array


def test_round_trip_non_contiguous_and_numpy_meta():
    image = _image(np.uint16, (8, 6))[::2, ::-1]
    meta = {"bits_stored": np.int64(12), "mean": np.float32(0.5), "box": np.arange(3)}
    out, out_meta = records.decode_record(records.encode_record(image, meta))
    np.testing.assert_array_equal(out, image)
    assert out_meta == {"bits_stored": 12, "mean": 0.5, "box": [0, 1, 2]}
    assert records.decode_record(records.encode_record(image))[1] == {}


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((4, 4, 4, 1), np.uint8), "2-D"),
        (np.zeros((4,), np.uint8), "2-D"),
        (np.zeros((4, 4), np.float32), "dtype"),
        (np.zeros((4, 4), np.int16), "dtype"),
        (np.zeros((0, 4), np.uint8), "empty"),
    ],
)
def test_encode_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        records.encode_record(image, {})


def test_encode_rejects_bad_meta():
    image = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="JSON"):
        records.encode_record(image, {"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        records.encode_record(image, {"x": float("nan")})
    with pytest.raises(ValueError, match="keys must be strings"):
        records.encode_record(image, {1: "a"})
    with pytest.raises(TypeError, match="dict"):
        records.encode_record(image, [1, 2])
    with pytest.raises(TypeError, match="numpy array"):
        records.encode_record([[1, 2]], {})


def test_decode_rejects_truncated_and_foreign_bytes():
    data = records.encode_record(_image(np.uint16), {"a": 1})
    with pytest.raises(ValueError, match="truncated.*pixel"):
        records.decode_record(data[:-1])
    with pytest.raises(ValueError, match="corrupt.*pixel"):
        records.decode_record(data + b"\0")
    with pytest.raises(ValueError, match="truncated.*header"):
        records.decode_record(data[:12])
    with pytest.raises(ValueError, match="truncated.*prefix"):
        records.decode_record(data[:3])
    with pytest.raises(ValueError, match="not a mimjax record"):
        records.decode_record(b"\x89PNG" + data[4:])
    corrupt = data[:8] + b"[" + data[9:]
    with pytest.raises(ValueError, match="corrupt record header"):
        records.decode_record(corrupt)


def _records(n, shape=(4, 3)):
    return [(np.full(shape, i, np.uint16), {"i": i}) for i in range(n)]


def _read_shard(path):
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return [records.decode_record(b)[1]["i"] for b in reader.read_all()]
    finally:
        reader.close()


def test_write_shards_round_robin_and_group_size_1(tmp_path, monkeypatch):
    seen_options = []
    real_writer = array_record_module.ArrayRecordWriter

    def spy_writer(path, options):
        seen_options.append(options)
        return real_writer(path, options)

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", spy_writer)
    paths = records.write_shards(iter(_records(10)), str(tmp_path), "ds", 4)
    assert [os.path.basename(p) for p in paths] == [
        f"ds-{i:05d}-of-00004.array_record" for i in range(4)
    ]
    # Round robin: record i in shard i % 4.
    assert [_read_shard(p) for p in paths] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    # group_size:1 is asked for explicitly (not left to the library default) ...
    assert seen_options and all("group_size:1" in o.split(",") for o in seen_options)
    # ... and is what the files record.
    for p in paths:
        reader = array_record_module.ArrayRecordReader(p)
        assert "group_size:1," in reader.writer_options_string() + ","
        reader.close()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


@pytest.mark.parametrize("compression", records.COMPRESSIONS)
def test_write_shards_compression(tmp_path, compression):
    paths = records.write_shards(_records(3), str(tmp_path), "ds", 1, compression=compression)
    reader = array_record_module.ArrayRecordReader(paths[0])
    options = reader.writer_options_string().split(",")
    reader.close()
    assert "group_size:1" in options
    assert any(o.split(":")[0] == compression for o in options)
    assert _read_shard(paths[0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="compression"):
        records.write_shards(_records(3), str(tmp_path), "x", 1, compression="lz4")


def test_write_shards_is_atomic_on_failure(tmp_path):
    def failing():
        yield from _records(5)
        raise RuntimeError("writer killed")

    with pytest.raises(RuntimeError, match="writer killed"):
        records.write_shards(failing(), str(tmp_path), "ds", 2)
    assert os.listdir(tmp_path) == []  # no shard, no temporary left behind

    # Replacing an existing set: a failure leaves the old shards intact.
    old = records.write_shards(_records(4), str(tmp_path), "ds", 2)
    with pytest.raises(RuntimeError):
        records.write_shards(failing(), str(tmp_path), "ds", 2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in old]
    assert [_read_shard(p) for p in old] == [[0, 2], [1, 3]]

    # A bad record is an error too, and also leaves nothing new behind.
    with pytest.raises(ValueError, match="dtype"):
        records.write_shards([(np.zeros((2, 2), np.float32), {})], str(tmp_path), "bad", 1)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in old]


def test_write_shards_existing_and_overwrite(tmp_path):
    records.write_shards(_records(6), str(tmp_path), "ds", 3)
    with pytest.raises(FileExistsError, match="overwrite"):
        records.write_shards(_records(6), str(tmp_path), "ds", 3)
    new = records.write_shards(_records(6), str(tmp_path), "ds", 2, overwrite=True)
    # The stale 3-shard set is gone; only the new set is listed.
    assert records.list_shards(str(tmp_path)) == new
    with pytest.raises(ValueError, match="no records"):
        records.write_shards([], str(tmp_path / "empty"), "ds", 2)
    with pytest.raises(ValueError, match="num_shards"):
        records.write_shards(_records(2), str(tmp_path), "x", 0)


def test_list_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        records.list_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        records.list_shards(str(tmp_path / "missing-*.array_record"))
    paths = records.write_shards(_records(5), str(tmp_path), "ds", 3)
    records.write_shards(_records(2), str(tmp_path), "other", 1)
    assert records.list_shards(str(tmp_path / "ds-*")) == paths
    assert records.list_shards(str(tmp_path / "ds-*")) == sorted(paths)
    assert len(records.list_shards(str(tmp_path))) == 4
    assert records.list_shards(paths[1]) == [paths[1]]
    os.remove(paths[1])  # e.g. an interrupted copy
    with pytest.raises(ValueError, match="incomplete shard set 'ds'.*missing indices \\[1\\]"):
        records.list_shards(str(tmp_path))


def test_image_source_decodes_and_pickles(tmp_path):
    recs = _records(5, shape=(3, 2))
    paths = records.write_shards(recs, str(tmp_path), "ds", 2)
    src = ArrayRecordImageSource(str(tmp_path))
    assert len(src) == 5 and src.paths == paths
    # Source order: shards concatenated, i.e. [0, 2, 4] then [1, 3].
    assert [src[i]["meta"]["i"] for i in range(5)] == [0, 2, 4, 1, 3]
    e = src[3]
    assert e["index"] == 3 and e["image"].shape == (3, 2) and e["image"].dtype == np.uint16
    np.testing.assert_array_equal(e["image"], recs[1][0])
    src2 = pickle.loads(pickle.dumps(src))  # what spawned workers receive
    assert src2[4]["meta"] == src[4]["meta"]


def test_extras_and_volumes_round_trip():
    volume = _image(np.uint16)[None].repeat(3, axis=0)
    mask = (volume % 3).astype(np.uint8)
    data = records.encode_record(volume, {"a": 1}, {"mask": mask})
    out, meta, extras = records.decode_record_with_extras(data)
    np.testing.assert_array_equal(out, volume)
    np.testing.assert_array_equal(extras["mask"], mask)
    assert meta == {"a": 1}
    # The image-only decoder reads the same bytes and still checks their length.
    np.testing.assert_array_equal(records.decode_record(data)[0], volume)
    assert records.decode_meta(data) == {"a": 1}
    with pytest.raises(ValueError, match="not a mimjax record"):
        records.decode_meta(b"\x89PNG" + data[4:])
    with pytest.raises(ValueError, match="truncated record"):
        records.decode_record(data[:-1])
    with pytest.raises(ValueError, match="names"):
        records.encode_record(volume, {}, {"image": mask})


def test_write_shard_is_atomic_and_allows_empty(tmp_path):
    path = str(tmp_path / "s-00000-of-00001.array_record")
    assert records.write_shard(path, []) == 0
    assert len(ArrayRecordImageSource(path)) == 0

    def failing():
        yield records.encode_record(_image(np.uint8))
        raise RuntimeError("boom")

    other = str(tmp_path / "t-00000-of-00001.array_record")
    with pytest.raises(RuntimeError):
        records.write_shard(other, failing())
    assert sorted(os.listdir(tmp_path)) == ["s-00000-of-00001.array_record"]
