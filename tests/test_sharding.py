"""Sharded runs equal the 1-device run; FSDP divides parameter + optimizer memory."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mimjax import sharding, train
from mimjax.objectives import build_loss_fn

from helpers import random_batch as _batch
from helpers import tiny_model_config, training_setup

# f32 on CPU; sharded reductions sum in a different order than one device does.
RTOL, ATOL = 2e-5, 1e-6


def _run(mesh_cfg, devices, model=None):
    """One train step; returns (loss, grads, updated params) as numpy."""
    t = training_setup(mesh_cfg, devices, model)
    config, mesh, spec, tx, schedule, state, shardings = (
        t.config, t.mesh, t.spec, t.tx, t.schedule, t.state, t.shardings)
    loss_fn = build_loss_fn(config.objectives)
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(spec.bind(p), b, r), has_aux=True)
    step = train.make_train_step(spec, tx, loss_fn, schedule)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(_batch(), mesh)
        (loss, _), grads = jax.jit(grad_fn)(state.params, batch, jax.random.PRNGKey(3))
        new_state, metrics = jax.jit(step, out_shardings=(shardings, None))(state, batch)
    return jax.device_get((loss, grads, new_state.params, metrics["loss"], state, shardings))


@pytest.fixture(scope="module")
def reference():
    return _run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_cfg", [
    {"data": 8, "fsdp": 1, "tensor": 1},   # data parallel
    {"data": 1, "fsdp": 8, "tensor": 1},   # fully sharded data parallel
    {"data": 4, "fsdp": 1, "tensor": 2},   # data x tensor parallel
    {"data": 2, "fsdp": 2, "tensor": 2},   # all three
], ids=["dp8", "fsdp8", "dp4xtp2", "dp2xfsdp2xtp2"])
def test_sharded_loss_and_grads_equal_single_device(reference, mesh_cfg):
    loss, grads, params, step_loss, _, _ = _run(mesh_cfg, jax.devices())
    ref_loss, ref_grads, ref_params, ref_step_loss, _, _ = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    np.testing.assert_allclose(step_loss, ref_step_loss, rtol=RTOL)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = ref_grads
        for key in path:
            ref = ref[key.key]
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=ATOL, err_msg=sharding.path_to_str(path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=ATOL),
                 params, ref_params)


def test_rules_shard_what_they_say():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = lambda path, shape: sharding.spec_for(path, shape, mesh)
    assert spec("encoder/transformer/blocks/0/attn/query/kernel", (64, 64)) == P("fsdp", "tensor")
    assert spec("encoder/transformer/blocks/attn/out/kernel", (2, 64, 64)) == P(
        None, "tensor", "fsdp")
    assert spec("opt_state/1/0/mu/encoder/transformer/blocks/0/mlp/fc2/kernel",
                (128, 64)) == P("tensor", "fsdp")
    # Biases and norms are too small for FSDP; indivisible dims fall back to replication.
    assert sharding.spec_for("encoder/norm/scale", (64,), mesh) == P(None)
    assert sharding.spec_for("decoders/0/pred/kernel", (128, 63), mesh) == P("fsdp", None)
    assert sharding.spec_for("x/kernel", (7, 9), mesh) == P(None, None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 8, "fsdp": 2, "tensor": 1})


def test_fsdp_divides_state_memory():
    """Compiled per-device argument memory of the train step (parameters + optimizer
    state; the batch, split the same way in both, is subtracted): FSDP over 8 <=
    replicated / 8 + C, where C is the bytes of the arrays FSDP leaves replicated by
    design (smaller than sharding.FSDP_MIN_SIZE: biases, norms, tokens, scalars)
    plus 4 KiB of slack."""
    model = tiny_model_config(width=128, mlp_dim=512, depth=2)

    def state_bytes_per_device(mesh_cfg):
        t = training_setup(mesh_cfg, model=model)
        mesh, state = t.mesh, t.state
        step = train.make_train_step(t.spec, t.tx, build_loss_fn(t.config.objectives), t.schedule)
        with jax.set_mesh(mesh):
            batch = sharding.global_batch(_batch(), mesh)
            compiled = jax.jit(step, donate_argnums=0, out_shardings=(t.shardings, None)).lower(
                state, batch).compile()
        batch_bytes = sum(v.nbytes for v in _batch().values()) / 8
        small = sum(x.nbytes for x in jax.tree.leaves(state) if x.size < sharding.FSDP_MIN_SIZE)
        return compiled.memory_analysis().argument_size_in_bytes - batch_bytes, small

    replicated, _ = state_bytes_per_device({"data": 8, "fsdp": 1, "tensor": 1})
    fsdp, small = state_bytes_per_device({"data": 1, "fsdp": 8, "tensor": 1})
    assert replicated > 3 * 4 * 400_000  # params + Adam mu, nu in f32, ~0.4M params
    assert small < replicated / 20
    assert fsdp <= replicated / 8 + small + 4096, (fsdp, replicated, small)
