"""The label-free universal model's server step: multi-teacher feature distillation
(mimjax.models.distiller, mimjax.objectives.feature_distillation) through the one
trainer, with the teachers frozen by the optimizer (mimjax.optim.freeze)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mimjax import optim, sharding, train
from mimjax.models import param_tree
from mimjax.objectives import feature_distillation

from helpers import tiny_model_config, training_setup

NUM_TEACHERS = 3


def _setup(frozen=("teachers",)):
    model = tiny_model_config(name="universal_distiller", num_teachers=NUM_TEACHERS,
                              adaptor_hidden=96)
    return training_setup(
        model=model, objectives={"feature_distillation": {"weight": 1.0}},
        optimizer=dict(base_lr=2e-2, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                       grad_clip_norm=None, frozen=frozen))


def _images(seed=0, batch=16):
    return {"image": np.random.default_rng(seed).normal(size=(batch, 32, 32, 1))
            .astype(np.float32)}


def test_match_loss_equals_pytorch_cosine_and_smooth_l1():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 4, 5, 8)).astype(np.float32) * [[[[1.0]]], [[[3.0]]]]
    for beta in (1.0, 0.5):
        ours = feature_distillation.match_loss(jnp.asarray(pred), jnp.asarray(target), beta)
        p, t = torch.from_numpy(pred), torch.from_numpy(target)
        cosine = torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-8)
        smooth = torch.nn.functional.smooth_l1_loss(p, t, reduction="none", beta=beta).mean(-1)
        reference = torch.mean(1 - cosine + smooth).item()
        np.testing.assert_allclose(float(ours), reference, rtol=1e-5)
    standard = feature_distillation.standardise(jnp.asarray(target))
    np.testing.assert_allclose(standard.mean(axis=(0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(standard.std(axis=(0, 1)), 1, atol=1e-3)


def test_distillation_lowers_the_loss_and_never_moves_a_teacher():
    setup = _setup()
    params = jax.device_get(setup.state.params)
    assert {k for k in params} == {"encoder", "teachers", "adaptors"}
    assert len(params["teachers"]) == len(params["adaptors"]) == NUM_TEACHERS
    # No optimizer state for the teachers: Adam's moments cover the rest only.
    moments = sum(x.size for x in jax.tree.leaves(setup.state.opt_state))
    trainable = sum(x.size for k, v in params.items() if k != "teachers"
                    for x in jax.tree.leaves(v))
    assert moments < 2 * trainable + 100
    # A constant lr over 40 steps (the helper's schedule ends at step 10); the optimizer
    # state has the same structure.
    schedule = optax.constant_schedule(3e-3)
    tx = optim.make_optimizer(setup.config.optimizer, schedule)
    step = jax.jit(train.make_train_step(setup.spec, tx, feature_distillation_loss(), schedule),
                   donate_argnums=0)
    state, losses = setup.state, []
    with jax.set_mesh(setup.mesh):
        for i in range(40):
            state, metrics = step(state, sharding.global_batch(_images(i % 4), setup.mesh))
            losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:2]), losses
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, after["teachers"], params["teachers"])
    changed = param_tree.flatten(after["encoder"])
    assert any(not np.array_equal(v, param_tree.flatten(params["encoder"])[k])
               for k, v in changed.items())


def feature_distillation_loss():
    from mimjax.objectives import build_loss_fn

    return build_loss_fn({"feature_distillation": {"weight": 1.0}})


def test_frozen_names_must_exist():
    with pytest.raises(ValueError, match="optimizer.frozen names \\['teacher'\\]"):
        _setup(frozen=("teacher",))


def test_model_needs_a_teacher_count():
    from flax import nnx

    from mimjax.models import build_model

    with pytest.raises(ValueError, match="num_teachers must be a positive integer"):
        build_model(tiny_model_config(name="universal_distiller"), rngs=nnx.Rngs(0))
