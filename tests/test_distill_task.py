"""The federated server's label-free universal model as a task ("distill"): its pool
holds images only (input_pipeline.unlabelled strips labels, bitwise-keeping the
images; the task refuses a labelled pool), and a `train.Run` on
configs/federated_server_demo.py:tiny trains the student with the teachers the
server sets left untouched, then resumes."""

import os

import jax
import numpy as np
import pytest

from input_pipeline import pipeline, records, sources, unlabelled
from input_pipeline.record_source import DataSourceError
from mimjax import run_config, train
from mimjax.models import param_tree
from mimjax.run_config import ConfigError

CONFIG = "configs/federated_server_demo.py:tiny"


def _phantom_data(data_dir, source, num_images):
    data = pipeline.default_data_config()
    data.source, data.dir = source, str(data_dir)
    data.phantom_num_images, data.phantom_size, data.phantom_seed = num_images, 64, 3
    return data


def test_write_unlabelled_pool_keeps_images_bitwise_and_only_label_free_keys(data_dir, tmp_path):
    # The mammography phantom (pathology, lesion labels) and the cardiac phantom
    # (phase, diagnosis group, class names, segmentation masks).
    inputs = {"mammo": _phantom_data(data_dir, "phantom", 12),
              "cardiac": _phantom_data(data_dir, "cardiac_phantom", 8)}
    originals = {name: sources.resolve(cfg, None) for name, cfg in inputs.items()}
    with pytest.raises(DataSourceError, match=r"record 0 of 12 has label keys .*'pathology'"):
        unlabelled.check_unlabelled(originals["mammo"])
    with pytest.raises(DataSourceError, match=r"'mask \(an extra array\)'"):
        unlabelled.check_unlabelled(originals["cardiac"])

    out = tmp_path / "pool"
    paths = unlabelled.write_unlabelled_pool(inputs, out, num_shards=3)
    pool = sources.ArrayRecordImageSource(str(out))
    assert len(pool) == 20 and pool.paths == paths
    seen = set()
    for i in range(len(pool)):
        image, meta, extras = records.decode_record_with_extras(pool.raw(i))
        assert extras == {}  # masks are labels too
        assert set(meta) <= unlabelled.LABEL_FREE_META_KEYS and not unlabelled.label_keys_in(meta)
        name, index = meta["pool_input"], meta["pool_input_index"]
        seen.add((name, index))
        original = originals[name][index]
        assert image.dtype == original["image"].dtype
        np.testing.assert_array_equal(image, original["image"])
        kept = {k: v for k, v in original["meta"].items() if k in unlabelled.LABEL_FREE_META_KEYS}
        assert {k: v for k, v in meta.items() if not k.startswith("pool_input")} == kept
    assert seen == {("mammo", i) for i in range(12)} | {("cardiac", i) for i in range(8)}
    unlabelled.check_unlabelled(pool)  # passes

    # Idempotent: the same inputs reuse the shards untouched; other inputs are refused.
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    assert unlabelled.write_unlabelled_pool(inputs, out, num_shards=3) == paths
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
    with pytest.raises(FileExistsError, match="pool of other inputs"):
        unlabelled.write_unlabelled_pool({"mammo": inputs["mammo"]}, out, num_shards=3)


def test_phantom_pool_is_the_phantoms_images_without_labels(data_dir, tmp_path):
    spec = {"hand_phantom": {"num_images": 4, "seed": 3, "size": 64},
            "cxr_phantom": (5, 3, 64)}
    folder = unlabelled.ensure_phantom_pool(tmp_path, spec)
    assert folder == unlabelled.phantom_pool_dir(tmp_path, spec)
    assert os.path.basename(folder).startswith("unlabelled_pool_")
    assert unlabelled.ensure_phantom_pool(tmp_path, dict(reversed(spec.items()))) == folder
    pool = sources.ArrayRecordImageSource(folder)
    assert len(pool) == 9
    unlabelled.check_unlabelled(pool)
    # The phantoms' own caches, by render index (their shards are not in render order).
    cached = {}
    for name, n in (("hand_phantom", 4), ("cxr_phantom", 5)):
        src = sources.resolve(_phantom_data(data_dir, name, n), None)
        for i in range(len(src)):
            cached[name, src[i]["meta"]["phantom_index"]] = src[i]["image"]
    for i in range(len(pool)):
        element = pool[i]
        meta = element["meta"]
        assert meta["phantom_index"] == meta["pool_input_index"]
        reference = cached[meta["pool_input"], meta["pool_input_index"]]
        np.testing.assert_array_equal(element["image"], reference)
    with pytest.raises(ValueError, match="unknown phantom 'no_such_phantom'"):
        unlabelled.ensure_phantom_pool(tmp_path, {"no_such_phantom": (4, 0, 64)})


def _config(data_dir, *overrides):
    return run_config.load(CONFIG, [("data.dir", str(data_dir)), *overrides])


def test_distill_refuses_a_labelled_pool_and_configs_that_would_train_teachers(tmp_path):
    labelled = _config(tmp_path / "data", ("data.source", "phantom"),
                       ("data.phantom_num_images", "16"), ("data.phantom_size", "64"))
    with labelled.unlocked():
        labelled.data.pool = None  # read data.source as it is: the mammography phantom
    with pytest.raises(ConfigError) as error:
        train.Run(labelled, str(tmp_path / "run"))
    message = str(error.value)
    assert "\n" not in message
    assert "record 0 of 16" in message and "'pathology'" in message
    assert "write_unlabelled_pool" in message and "data.source='shards'" in message
    with pytest.raises(ConfigError, match="optimizer.frozen must name 'teachers'"):
        train.Run(_config(tmp_path / "data", ("optimizer.frozen", "()")), str(tmp_path / "r2"))
    with pytest.raises(ConfigError, match="set --config.data.source=shards"):
        train.Run(_config(tmp_path / "data", ("data.source", "phantom")), str(tmp_path / "r3"))


def _bitwise_equal(a, b):
    flat_a, flat_b = param_tree.flatten(a), param_tree.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for name, value in flat_a.items():
        np.testing.assert_array_equal(value, flat_b[name], err_msg=name)


def test_a_server_round_trains_the_student_and_never_moves_a_teacher(tmp_path):
    config = _config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    with train.Run(config, workdir) as run:
        params = run.params()
        assert set(params) == {"encoder", "teachers", "adaptors"}
        assert sorted(params["teachers"]) == [0, 1, 2]
        # The server's round: teacher k = site k's encoder, the student = their average.
        rng = np.random.default_rng(0)
        teachers = {k: jax.tree.map(
            lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(x.dtype), params["encoder"])
            for k in range(3)}
        encoder = jax.tree.map(lambda *xs: np.mean(xs, axis=0).astype(xs[0].dtype),
                               *teachers.values())
        run.set_params({"encoder": encoder, "teachers": teachers})
        metrics = run.fit(3)
        assert run.step == 3
        assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
        assert {f"loss_teacher_{k}" for k in range(3)} <= set(metrics)
        after = run.params()
        _bitwise_equal(after["teachers"], teachers)
        flat_before, flat_after = param_tree.flatten(encoder), param_tree.flatten(after["encoder"])
        assert any(not np.array_equal(flat_after[k], v) for k, v in flat_before.items())
    with train.Run(config, workdir) as run:  # resumes from the checkpoint fit saved
        assert run.step == 3
        _bitwise_equal(run.params(), after)
