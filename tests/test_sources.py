"""The data-source resolver (input_pipeline/sources.py): one name per layout, the
same split semantics in every pipeline, and errors that name the setting, what
exists and the fix. (TFDS has its own test file, test_tfds.py.)"""

import pickle

import numpy as np
import pytest

from input_pipeline import finetune, pairs, pipeline, records, rendered, sources
from input_pipeline.record_source import DataNotFoundError, DataSourceError, RecordSource

PHANTOM_IMAGES = 12


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory):
    """tools/prepare_data.py's layout with train/ and val/ (no test/)."""
    root = tmp_path_factory.mktemp("prepared")
    train = [(np.full((20, 20), i, np.uint8), {"i": i, "split": "train"}) for i in range(10)]
    records.write_shards(train, str(root / "train"), "data", 2)
    val = [(np.full((20, 20), 100 + i, np.uint8), {"i": i, "split": "val"}) for i in range(4)]
    records.write_shards(val, str(root / "val"), "data", 1)
    return str(root)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("phantoms"))


def _cfg(**kw):
    c = finetune.default_finetune_data_config()
    c.update(num_workers=0, num_threads=1, **kw)
    return c


def _phantom_cfg(phantom_dir, source="phantom"):
    return _cfg(source=source, dir=phantom_dir, phantom_num_images=PHANTOM_IMAGES,
                phantom_size=64)


def _values(src, key="i"):
    return [src[i]["meta"][key] for i in range(len(src))]


# ------------------------------------------------------------------ layouts


def test_prepared_reads_split_folders_and_pretrains_on_train(prepared_root):
    c = _cfg(source="prepared", dir=prepared_root)
    train, val = sources.resolve(c, "train"), sources.resolve(c, "val")
    assert isinstance(train, RecordSource) and (len(train), len(val)) == (10, 4)
    assert {m["split"] for m in map(train.meta, range(len(train)))} == {"train"}
    assert sorted(_values(val)) == [0, 1, 2, 3]
    assert sources.pretrain_split(c) == "train"
    assert pipeline.num_records(c) == 10  # pretraining reads the train split
    c.split = "val"
    assert pipeline.num_records(c) == 4
    assert sources.data_root(c) == prepared_root
    # The one resolver behind every pipeline's split function.
    assert finetune.split_source(c, "val").paths == val.paths


def test_shards_are_every_record_and_have_no_splits(prepared_root):
    c = _cfg(source="shards", dir=f"{prepared_root}/train")
    src = sources.resolve(c, None)
    assert len(src) == 10 and sources.pretrain_split(c) is None
    assert sources.resolve(c, "train").paths == src.paths  # "train" = all of it
    glob_cfg = _cfg(source="shards", dir=f"{prepared_root}/*/data-*.array_record")
    assert len(sources.resolve(glob_cfg, None)) == 14  # a glob may span folders
    assert sources.data_root(glob_cfg) == prepared_root
    for split in ("val", "test"):
        with pytest.raises(DataSourceError, match=rf"no '{split}' split.*source=prepared"):
            sources.resolve(c, split)
    with pytest.raises(DataSourceError, match="no 'val' split"):
        finetune.make_eval_batches(c, "val", image_size=8, batch_size=2, label_keys=())


def test_shards_pointed_at_a_prepared_root_says_so(prepared_root, tmp_path):
    with pytest.raises(DataNotFoundError, match="holds a train/ folder.*source=prepared"):
        sources.resolve(_cfg(source="shards", dir=prepared_root), None)
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):  # also FileNotFound
        sources.resolve(_cfg(source="shards", dir=str(tmp_path / "nothing")), None)


def test_phantom_pretrains_on_every_record_and_splits_by_hash(phantom_dir):
    c = _phantom_cfg(phantom_dir)
    full = sources.resolve(c, None)
    assert len(full) == PHANTOM_IMAGES and sources.pretrain_split(c) is None
    assert pipeline.make_source(c).paths == full.paths  # pretraining: every record
    parts = {s: sources.resolve(c, s) for s in sources.SPLITS}
    members = [parts[s].record_indices.tolist() for s in sources.SPLITS]
    assert sorted(sum(members, [])) == list(range(PHANTOM_IMAGES))  # disjoint, complete
    for s in sources.SPLITS:
        expected = sources.phantom_split_indices(PHANTOM_IMAGES, c.phantom_split, s)
        np.testing.assert_array_equal(parts[s].record_indices, expected)
    # A split element is the phantom record, re-indexed within the split.
    val = parts["val"]
    e = val[0]
    assert e["index"] == 0 and e["meta"] == full[int(val.record_indices[0])]["meta"]
    c.split = "train"  # pretraining on a phantom split, when asked for
    assert pipeline.num_records(c) == len(parts["train"])
    assert sources.data_root(c) == rendered.phantom_shards_dir(
        phantom_dir, num_images=PHANTOM_IMAGES, seed=0, size=64)


def test_cxr_phantom_is_its_own_layout(phantom_dir):
    c = _phantom_cfg(phantom_dir, "cxr_phantom")
    src = sources.resolve(c, "val")
    assert all(src.meta(i)["report"] for i in range(len(src)))
    p = pairs.default_pairs_data_config()
    p.update(dir=phantom_dir, phantom_num_images=PHANTOM_IMAGES, phantom_size=64)
    np.testing.assert_array_equal(pairs.pair_split(p, "val").record_indices, src.record_indices)


FLAT_RENDERS = []  # (index, seed, size) of every render_flat call in this process


def render_flat(index, seed, size):
    """A phantom whose image `index` is filled with `index` (module level: a
    declaration names it, and spawned render workers would import it)."""
    FLAT_RENDERS.append((index, seed, size))
    return np.full((size, size), index, np.uint8), {"i": index}


def test_a_registered_phantom_needs_nothing_else(phantom_dir, monkeypatch):
    FLAT_RENDERS.clear()
    flat = sources.Phantom("flat_phantom", f"{__name__}:render_flat", "flat test phantom")
    monkeypatch.setitem(sources.PHANTOMS, "flat_phantom", flat)
    c = _phantom_cfg(phantom_dir, "flat_phantom")
    assert "flat_phantom" in sources.source_names()
    assert sorted(_values(sources.resolve(c, None))) == list(range(PHANTOM_IMAGES))
    assert len(sources.resolve(c, "test")) == 1  # 12 records, phantom_split (0.8, 0.1, 0.1)
    # Rendered once, with the config's seed and size, into the declared folder.
    assert sorted(FLAT_RENDERS) == [(i, 0, 64) for i in range(PHANTOM_IMAGES)]
    assert sources.data_root(c) == f"{phantom_dir}/flat_phantom_64_0_{PHANTOM_IMAGES}"
    assert all(p.startswith(f"{sources.data_root(c)}/flat_phantom-")
               for p in sources.resolve(c, None).paths)
    batch = finetune.make_eval_batches(c, "val", image_size=16, batch_size=4, label_keys=("i",))
    assert batch.num_records == len(sources.resolve(c, "val"))


# ------------------------------------------------------------------ errors


def test_retired_arrayrecord_name_says_which_new_name(prepared_root):
    with pytest.raises(DataSourceError, match=r"split into two names.*source=prepared"):
        sources.resolve(_cfg(source="arrayrecord", dir=prepared_root), "train")
    with pytest.raises(DataSourceError, match=r"split into two names.*source=shards"):
        pipeline.num_records(_cfg(source="arrayrecord", dir=f"{prepared_root}/train"))
    p = pairs.default_pairs_data_config()
    p.update(source="arrayrecord", dir=prepared_root)
    with pytest.raises(DataSourceError, match="'prepared'"):
        pairs.pair_split(p, "train")


def test_missing_split_folder_lists_what_exists(prepared_root):
    c = _cfg(source="prepared", dir=prepared_root)
    with pytest.raises(FileNotFoundError, match=r"'test' split folder.*it has \['train', 'val'\]"):
        sources.resolve(c, "test")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        sources.resolve(_cfg(source="prepared", dir=f"{prepared_root}/nowhere"), "train")


def test_unknown_names_and_splits(phantom_dir):
    with pytest.raises(DataSourceError, match=r"unknown data.source 'mri_phantom'.*cxr_phantom"):
        sources.resolve(_phantom_cfg(phantom_dir, "mri_phantom"), "train")
    c = _phantom_cfg(phantom_dir)
    with pytest.raises(DataSourceError, match="split must be one of"):
        sources.resolve(c, "validation")
    c.split = "everything"
    with pytest.raises(DataSourceError, match="data.split must be one of"):
        pipeline.num_records(c)
    assert issubclass(DataSourceError, ValueError)


def test_tfds_is_a_layout_that_names_its_settings():
    c = _cfg(source="tfds")  # data.tfds.name unset (test_tfds.py reads real datasets)
    assert "tfds" in sources.source_names() and sources.pretrain_split(c) == "train"
    with pytest.raises(DataSourceError, match=r"needs the dataset.*data.tfds.name"):
        sources.resolve(c, "train")
    with pytest.raises(DataSourceError, match="read one split at a time"):
        sources.resolve(c, None)


def test_empty_split_is_an_error(phantom_dir):
    c = _phantom_cfg(phantom_dir)
    c.phantom_split = (1.0, 0.0, 0.0)
    with pytest.raises(DataSourceError,
                       match="'val' split of the mammography phantom .* no records"):
        sources.resolve(c, "val")


# ---------------------------------------------------------- record sources


def test_record_source_raw_decoded_subset_and_pickle(prepared_root):
    src = sources.resolve(_cfg(source="prepared", dir=prepared_root), "train")
    assert isinstance(src.raw(0), bytes) and src.records[0] == src.raw(0)
    image, meta = src.decoder.decode(src.raw(3))
    np.testing.assert_array_equal(image, src[3]["image"])
    assert meta == src.meta(3) == src[3]["meta"]
    part = src.subset([7, 2, 5]).subset([2, 0])  # indices compose
    assert part.record_indices.tolist() == [5, 7] and not part.is_whole
    assert [part[i]["meta"] for i in range(2)] == [src[5]["meta"], src[7]["meta"]]
    again = pickle.loads(pickle.dumps(part))  # what grain workers receive
    assert again.raw(1) == src.raw(7) and again[0]["index"] == 0
