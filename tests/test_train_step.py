"""The train step: non-finite guard, gradient accumulation, EMA, optimizer recipe;
checkpoint restore onto fewer devices."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from input_pipeline.dequantize import dequantize_images
from mimjax import checkpoint, optim, sharding, train
from mimjax.objectives import build_loss_fn

from helpers import REPO, training_setup
from helpers import random_batch as _batch
from helpers import trainer_config as _config


def _setup(mesh_cfg=None, devices=None, **overrides):
    t = training_setup(mesh_cfg, devices, **overrides)
    return t.config, t.mesh, t.spec, t.tx, t.schedule, t.state, t.abstract, t.shardings


def _step_fn(config, spec, tx, schedule, shardings, **kwargs):
    step = train.make_train_step(spec, tx, build_loss_fn(config.objectives), schedule, **kwargs)
    return jax.jit(step, out_shardings=(shardings, None))


def test_nonfinite_step_skips_update_and_counts():
    config, mesh, spec, tx, schedule, state, _, shardings = _setup()
    step = _step_fn(config, spec, tx, schedule, shardings)
    bad = _batch()
    bad["image_64"][0, 0, 0, 0] = np.nan
    with jax.set_mesh(mesh):
        before = jax.device_get(state.params)
        state, metrics = step(state, sharding.global_batch(bad, mesh))
        assert not np.isfinite(metrics["loss"])
        assert int(metrics["nonfinite_steps"]) == 1 and int(metrics["nonfinite_streak"]) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
        state, metrics = step(state, sharding.global_batch(bad, mesh))
        assert int(metrics["nonfinite_streak"]) == 2
        for _ in range(2):  # the first applied update has lr 0 (warmup starts at 0)
            state, metrics = step(state, sharding.global_batch(_batch(), mesh))
    assert np.isfinite(metrics["loss"]) and metrics["lr"] > 0
    assert int(metrics["nonfinite_steps"]) == 2 and int(metrics["nonfinite_streak"]) == 0
    assert int(state.step) == 4
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                           before)
    assert any(jax.tree.leaves(changed))


def test_gradient_accumulation_matches_full_batch():
    """Accumulating 4 microbatches (rows i::4, mask noise from fold_in(rng, i)) gives
    the mean of the four microbatch gradients, applied in one update."""
    config, mesh, spec, tx, schedule, state, _, shardings = _setup()
    loss_fn = build_loss_fn(config.objectives)
    grad_fn = jax.grad(lambda p, b, r: loss_fn(spec.bind(p), b, r)[0])
    batch = _batch()
    rng = jax.random.fold_in(state.rng, 0)
    expected = None
    for i in range(4):
        micro = {k: v[i::4] for k, v in batch.items()}
        g = grad_fn(jax.device_get(state.params), micro, jax.random.fold_in(rng, i))
        expected = g if expected is None else jax.tree.map(jnp.add, expected, g)
    expected = jax.tree.map(lambda x: x / 4, expected)

    # Recover the accumulated gradient from the SGD update of a plain optimizer.
    sgd = optax.sgd(1.0)
    step = jax.jit(train.make_train_step(spec, sgd, loss_fn, schedule, grad_accum_steps=4))
    plain = state.replace(opt_state=sgd.init(state.params))
    with jax.set_mesh(mesh):
        new, metrics = step(plain, sharding.global_batch(batch, mesh))
    got = jax.tree.map(lambda a, b: a - b, jax.device_get(plain.params), jax.device_get(new.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, expected)


def test_prepare_batch_dequantizes_inside_the_step():
    """The trainer's prepare_batch turns the pipeline's uint16 unit-quantised images into
    the normalised float32 the model reads, inside the step (per microbatch when
    accumulating): the same loss and update as the host-normalised float batch."""
    config, mesh, spec, tx, schedule, state, _, _ = _setup()
    loss_fn = build_loss_fn(config.objectives)
    data_cfg = ml_collections.ConfigDict({"norm_mean": 0.2, "norm_std": 0.25, "channels": 1})
    rng = np.random.default_rng(1)
    quantized = {k: rng.integers(0, 65536, v.shape, dtype=np.uint16) for k, v in _batch().items()}
    normalised = {k: ((v / 65535 - 0.2) / 0.25).astype(np.float32) for k, v in quantized.items()}
    # Accumulating: prepare_batch sees microbatches (rows i::2), not the whole batch.
    plain = jax.jit(train.make_train_step(spec, tx, loss_fn, schedule, grad_accum_steps=2))
    prepared = jax.jit(train.make_train_step(
        spec, tx, loss_fn, schedule, grad_accum_steps=2,
        prepare_batch=lambda b: dequantize_images(b, data_cfg)))
    with jax.set_mesh(mesh):
        expected_state, expected = plain(state, sharding.global_batch(normalised, mesh))
        got_state, got = prepared(state, sharding.global_batch(quantized, mesh))
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(got_state.params), jax.device_get(expected_state.params))


def test_ema_tracks_params():
    config, mesh, spec, tx, schedule, state, _, shardings = _setup(ema_decay=0.5)
    step = _step_fn(config, spec, tx, schedule, shardings, ema_decay=0.5)
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh):
        state, _ = step(state, sharding.global_batch(_batch(), mesh))
    after = jax.device_get(state.params)
    expected = jax.tree.map(lambda b, a: 0.5 * b + 0.5 * a, before, after)
    jax.tree.map(lambda e, g: np.testing.assert_allclose(g, e, rtol=1e-6), expected,
                 jax.device_get(state.ema_params))


def test_weight_decay_mask_and_lr_scaling():
    params = {"encoder": {"cls_token": jnp.zeros((1, 1, 8)),
                          "norm": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                          "patch_embed": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
                          "pos_embedding": jnp.ones((1, 4, 8))},
              "decoders": {0: {"mask_token": jnp.zeros((1, 1, 8))}}}
    mask = optim.decay_mask(params)
    assert mask["encoder"]["patch_embed"]["kernel"]
    assert not any([mask["encoder"]["cls_token"], mask["encoder"]["norm"]["scale"],
                    mask["encoder"]["norm"]["bias"], mask["encoder"]["patch_embed"]["bias"],
                    mask["encoder"]["pos_embedding"], mask["decoders"][0]["mask_token"]])
    cfg = _config({"data": 1})
    assert optim.peak_learning_rate(cfg.optimizer, 4096) == pytest.approx(1e-3 * 16)
    schedule = optim.make_schedule(cfg.optimizer, global_batch_size=256, total_steps=100,
                                   warmup_steps=10)
    assert schedule(0) == 0 and schedule(10) == pytest.approx(1e-3)
    assert schedule(100) == pytest.approx(0)
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule(cfg.optimizer, global_batch_size=256, total_steps=10, warmup_steps=10)


def test_restore_onto_fewer_devices(tmp_path):
    """Saved from an 8-device FSDP x tensor mesh, restored onto 4 devices and onto 1."""
    config, mesh, spec, tx, schedule, state, abstract, shardings = _setup(
        {"data": 2, "fsdp": 2, "tensor": 2})
    step = _step_fn(config, spec, tx, schedule, shardings)
    with jax.set_mesh(mesh):
        state, _ = step(state, sharding.global_batch(_batch(), mesh))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(1, state)
    ckpt.close()
    expected = jax.device_get(state)
    for mesh_cfg, devices in [({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4]),
                              ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])]:
        _, new_mesh, _, _, _, _, new_abstract, new_shardings = _setup(mesh_cfg, devices)
        reader = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
        assert reader.latest_step() == 1
        target = checkpoint.abstract_with_shardings(new_abstract, new_shardings)
        restored = reader.restore(1, target)
        reader.close()
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
        leaf = restored.params["encoder"]["patch_embed"]["kernel"]
        assert leaf.sharding.mesh.devices.size == len(devices)


class _Position:
    """A data iterator's state, as the checkpointer saves and restores it."""

    def __init__(self, position=0):
        self.state = {"global_position": position}

    def get_state(self):
        return dict(self.state)

    def set_state(self, state):
        self.state = dict(state)


def test_data_position_is_written_once_and_old_per_process_files_still_restore(tmp_path):
    config, mesh, spec, tx, schedule, state, abstract, shardings = _setup(
        {"data": 8, "fsdp": 1, "tensor": 1})
    target = checkpoint.abstract_with_shardings(abstract, shardings)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(1, state, _Position(48))
    ckpt.close()
    item = tmp_path / "ckpt" / "1" / "data_iter"
    assert not list(item.glob("process_*"))  # one topology-free file, not one per process
    reader = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    restored = _Position()
    reader.restore(1, target, restored)
    assert restored.state == {"global_position": 48}
    # A checkpoint written by grain's handler (one JSON per process) still restores.
    for old in item.iterdir():
        old.unlink()
    (item / "process_0-of-2.json").write_text('{"global_position": 96}')
    (item / "process_1-of-2.json").write_text('{"global_position": 96}')
    reader.restore(1, target, restored)
    reader.close()
    assert restored.state == {"global_position": 96}


def test_trainer_import_pulls_no_tensorflow():
    code = ("import sys, main, mimjax.train, input_pipeline.pipeline; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))


def test_gradient_accumulation_warns_that_contrastive_negatives_shrink(caplog):
    """Accumulation runs the loss per microbatch: an image-report run is told its
    contrastive negatives come from B/k pairs, and other runs are not warned."""
    from configs import demo, mcr_demo
    from mimjax import tasks

    config = mcr_demo.get_config("tiny")
    config.grad_accum_steps = 2
    with caplog.at_level("WARNING", logger="mimjax.tasks.image_text"):
        tasks.for_config(config)
    assert "microbatch of 4 pairs, not from the global batch of 8" in caplog.text
    caplog.clear()
    config.objectives.mcr.itc_weight = 0.0
    with caplog.at_level("WARNING", logger="mimjax.tasks.image_text"):
        tasks.for_config(config)
    assert "microbatch" not in caplog.text
    pretraining = demo.get_config("tiny")
    pretraining.grad_accum_steps = 2
    with caplog.at_level("WARNING"):
        tasks.for_config(pretraining)
    assert "microbatch" not in caplog.text
