"""Models that keep state besides their parameters (batch-norm running statistics):
the train step carries it in TrainState.model_state, updates it in the forward pass
(microbatch after microbatch with accumulation), keeps it on a non-finite step, and
the loss sees the step number in batch["step"]."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mimjax import train
from mimjax.models.spec import ModelSpec

MOMENTUM = 0.9


class TinyBatchNormModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=MOMENTUM, rngs=rngs)

    def __call__(self, x, rng=None):
        # Batch statistics (and a running-average update) only when training.
        return self.norm(self.dense(x), use_running_average=rng is None)


def _spec_and_state(tx):
    model = TinyBatchNormModel(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    spec = ModelSpec(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                            params),
                     jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stats))
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0), ema_params={},
                             model_state=stats, nonfinite_total=jnp.zeros((), jnp.int32),
                             nonfinite_streak=jnp.zeros((), jnp.int32))
    return spec, state


def _loss(model, batch, rng):
    y = model(batch["x"], rng=rng)
    return jnp.mean(y ** 2) * batch["scale"][0], {"step_seen": batch["step"].astype(jnp.float32)}


def _batch(seed=0, scale=1.0):
    x = np.random.default_rng(seed).normal(size=(8, 3)).astype(np.float32) * 3 + 1
    return {"x": x, "scale": np.full((8,), scale, np.float32)}


def _expected_stats(spec, params, stats, x):
    """One running-average update by hand: momentum * old + (1 - momentum) * batch."""
    hidden = np.asarray(spec.bind(params, stats).dense(jnp.asarray(x)))
    mean = MOMENTUM * stats["norm"]["mean"] + (1 - MOMENTUM) * hidden.mean(0)
    var = MOMENTUM * stats["norm"]["var"] + (1 - MOMENTUM) * hidden.var(0)
    return mean, var


def test_the_step_updates_batch_statistics_and_passes_the_step():
    tx = optax.sgd(0.0)  # parameters stay put: the statistics' update is exact to check
    spec, state = _spec_and_state(tx)
    assert spec.has_model_state
    step = jax.jit(train.make_train_step(spec, tx, _loss, lambda n: 0.0))
    batch = _batch()
    before = jax.device_get(state)
    state, metrics = step(state, batch)
    mean, var = _expected_stats(spec, before.params, before.model_state, batch["x"])
    np.testing.assert_allclose(state.model_state["norm"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.model_state["norm"]["var"], var, rtol=1e-5, atol=1e-6)
    assert float(metrics["step_seen"]) == 0.0
    state, metrics = step(state, _batch(1))
    assert float(metrics["step_seen"]) == 1.0
    # Evaluation (no rng) uses the running averages and changes nothing.
    model = spec.bind(state.params, state.model_state)
    out = model(jnp.asarray(batch["x"]))
    running = state.model_state["norm"]
    hidden = model.dense(jnp.asarray(batch["x"]))
    manual = (hidden - running["mean"]) / jnp.sqrt(running["var"] + model.norm.epsilon)
    manual = manual * state.params["norm"]["scale"] + state.params["norm"]["bias"]
    np.testing.assert_allclose(out, manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model_state"):
        spec.bind(state.params)


def test_accumulation_updates_the_statistics_microbatch_after_microbatch():
    tx = optax.sgd(0.0)
    spec, state = _spec_and_state(tx)
    step = jax.jit(train.make_train_step(spec, tx, _loss, lambda n: 0.0, grad_accum_steps=2))
    batch = _batch()
    before = jax.device_get(state)
    state, _ = step(state, batch)
    # Microbatch i takes rows i, i+2, ...: rows 0,2,4,6 first, then 1,3,5,7.
    stats = before.model_state
    for rows in (slice(0, None, 2), slice(1, None, 2)):
        mean, var = _expected_stats(spec, before.params, stats, batch["x"][rows])
        stats = {"norm": {"mean": mean, "var": var}}
    np.testing.assert_allclose(state.model_state["norm"]["mean"], stats["norm"]["mean"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.model_state["norm"]["var"], stats["norm"]["var"],
                               rtol=1e-5, atol=1e-6)


def test_a_nonfinite_step_keeps_the_statistics():
    tx = optax.sgd(0.1)
    spec, state = _spec_and_state(tx)
    step = jax.jit(train.make_train_step(spec, tx, _loss, lambda n: 0.0))
    before = jax.device_get(state.model_state)
    state, metrics = step(state, _batch(scale=np.nan))
    assert int(metrics["nonfinite_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state), before)


def test_checkpoints_written_before_model_state_existed_still_restore(tmp_path):
    """A train state saved without a model_state field restores into today's
    TrainState (the field holds no arrays for such models); a missing field that
    would hold arrays is a clear error, not a silent default."""
    from mimjax import checkpoint

    tx = optax.sgd(0.1)
    spec, state = _spec_and_state(tx)
    old_fields = {k: v for k, v in vars(state).items() if k != "model_state"}
    writer = checkpoint.Checkpointer(str(tmp_path / "old"), async_save=False)
    writer.save(1, old_fields, force=True)
    writer.close()
    abstract = jax.eval_shape(lambda: state.replace(model_state={}))
    reader = checkpoint.Checkpointer(str(tmp_path / "old"))
    restored = reader.restore(1, abstract)
    assert isinstance(restored, train.TrainState) and restored.model_state == {}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(state.params))
    with pytest.raises(ValueError, match="has no \\['model_state'\\]"):
        reader.restore(1, jax.eval_shape(lambda: state))
    reader.close()
