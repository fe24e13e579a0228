"""The proximal term towards anchor parameters (mimjax.optim.proximal): FedProx's
client loss (Li et al., MLSys 2020) and L2-SP, added in the optimizer as the exact
gradient of (mu / 2) * ||w - w_anchor||^2; its anchor lives in the optimizer state
and restarts whenever parameters are set from outside (train.Run.set_params)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from mimjax import optim, run_config, sharding, train
from mimjax.run_config import ConfigError

from helpers import tiny_model_config, training_setup

MU = 0.1


def _tree(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {"encoder": {"dense": {"kernel": normal(4, 3), "bias": normal(3)},
                        "norm": {"scale": normal(3)}},
            "head": {"kernel": normal(3, 2)}}


def _loss(params, x):
    h = jnp.tanh(x @ params["encoder"]["dense"]["kernel"] + params["encoder"]["dense"]["bias"])
    return jnp.mean((h * params["encoder"]["norm"]["scale"]) @ params["head"]["kernel"]) ** 2


def _opt_config(**overrides):
    cfg = dict(base_lr=1e-3, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
               grad_clip_norm=None, frozen=())
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _proximal_states(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(
        n, optim.ProximalState)) if isinstance(s, optim.ProximalState)]


def _distance(params, anchor) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
                             zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))))


def _assert_trees_close(a, b, **kwargs):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


# --------------------------------------------------------------------------- exactness
def test_update_is_the_gradient_of_the_loss_plus_the_proximal_term():
    anchor, params = _tree(0), _tree(1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32))
    lr = 0.3
    tx = optax.chain(optim.proximal(MU, ("encoder",)), optax.sgd(lr))
    state = tx.init(anchor)
    updates, new_state = tx.update(jax.grad(_loss)(params, x), state, params)

    def with_term(p):
        sq = sum(jnp.sum((w - a) ** 2) for w, a in
                 zip(jax.tree.leaves(p["encoder"]), jax.tree.leaves(anchor["encoder"])))
        return _loss(p, x) + MU / 2 * sq

    sgd = optax.sgd(lr)
    expected, _ = sgd.update(jax.grad(with_term)(params), sgd.init(params), params)
    _assert_trees_close(updates, expected, rtol=1e-6, atol=1e-7)
    plain, _ = sgd.update(jax.grad(_loss)(params, x), sgd.init(params), params)
    _assert_trees_close(updates["head"], plain["head"], rtol=0, atol=0)  # not listed
    # The anchor is a copy of the parameters at init, and update leaves it alone.
    assert _proximal_states(new_state)[0].anchor.keys() == {"encoder"}
    _assert_trees_close(optim.get_anchor(new_state)["encoder"], anchor["encoder"], rtol=0, atol=0)


def test_one_sgd_step_matches_pytorch_autograd():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    w, b = w0 + 0.5 * rng.normal(size=w0.shape).astype(np.float32), b0 - 0.3
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    mu, lr = 0.7, 0.05

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        model.bias.copy_(torch.from_numpy(b))
    anchor = [torch.from_numpy(w0), torch.from_numpy(b0)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mse = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
    prox = sum(torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor))
    (mse + mu / 2 * prox).backward()
    opt.step()

    def loss(p):  # torch's Linear: y = x W^T + b
        return jnp.mean((jnp.asarray(x) @ p["encoder"]["weight"].T + p["encoder"]["bias"]
                         - jnp.asarray(y)) ** 2)

    params = {"encoder": {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}}
    tx = optax.chain(optim.proximal(mu, ("encoder",)), optax.sgd(lr))
    state = tx.init({"encoder": {"weight": jnp.asarray(w0), "bias": jnp.asarray(b0)}})
    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["encoder"]["weight"], model.weight.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(new["encoder"]["bias"], model.bias.detach().numpy(), rtol=1e-5)


@pytest.mark.parametrize("frozen", [(), ("teachers",)])
def test_make_optimizer_adds_the_term_before_clipping_and_adamw(frozen):
    """make_optimizer(mu) on g equals make_optimizer(0) on g + mu (w - anchor) for the
    encoder: the term is part of the gradient that clipping and AdamW see."""
    anchor, params = _tree(0), _tree(1)
    anchor["teachers"] = params["teachers"] = {"kernel": jnp.ones((3, 3))}
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
    common = dict(grad_clip_norm=0.5, frozen=frozen)
    with_term = optim.make_optimizer(_opt_config(proximal_mu=MU, **common), 1e-2)
    without = optim.make_optimizer(_opt_config(**common), 1e-2)
    s1, s0 = with_term.init(anchor), without.init(anchor)
    assert len(_proximal_states(s1)) == 1
    assert _proximal_states(s1)[0].anchor.keys() == {"encoder"}
    expected_grads = dict(grads, encoder=jax.tree.map(lambda g, w, a: g + MU * (w - a),
                                                      grads["encoder"], params["encoder"],
                                                      anchor["encoder"]))
    for _ in range(2):  # twice: the Adam moments agree too
        u1, s1 = with_term.update(grads, s1, params)
        u0, s0 = without.update(expected_grads, s0, params)
        _assert_trees_close(u1, u0, rtol=1e-6, atol=1e-9)
    if frozen:
        assert not np.any(np.asarray(u1["teachers"]["kernel"]))
    # The moments of the optimizer without the term, the anchor besides.
    _assert_trees_close(optim.set_anchor(s1, anchor), s1, rtol=0, atol=0)


def test_off_by_default_leaves_the_optimizer_state_as_it_was():
    params = _tree(0)
    params["teachers"] = {"kernel": jnp.ones((3, 3))}
    for extra in (dict(grad_clip_norm=1.0), dict(frozen=("teachers",)), dict(layer_decay=None,
                                                                           head_lr_mult=2.0)):
        before = optim.make_optimizer(_opt_config(**extra), 1e-3).init(params)
        default = _opt_config(proximal_mu=0.0, proximal_parts=("encoder",), **extra)
        state = optim.make_optimizer(default, 1e-3).init(params)
        assert jax.tree.structure(state) == jax.tree.structure(before)
        assert not _proximal_states(state)
        assert optim.get_anchor(state) is None
        assert optim.set_anchor(state, params) is state  # nothing to reset


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="proximal_parts names \\['backbone'\\]"):
        optim.make_optimizer(_opt_config(proximal_mu=1.0, proximal_parts=("backbone",)),
                             1e-3).init(_tree(0))
    for parts in ("encoder", ()):
        with pytest.raises(ValueError, match="proximal_parts must be a non-empty tuple"):
            optim.make_optimizer(_opt_config(proximal_mu=1.0, proximal_parts=parts), 1e-3)
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        optim.make_optimizer(_opt_config(proximal_mu=-1.0), 1e-3)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx = optim.proximal(1.0)
        tx.update(_tree(0), tx.init(_tree(0)))
    config = run_config.load("configs/demo.py:tiny", [("optimizer.proximal_mu", "-0.5")])
    with pytest.raises(ConfigError, match=r"config.optimizer.proximal_mu = -0.5 is out of "
                                          r"range: must be >= 0"):
        run_config.check(config)
    config = run_config.load("configs/demo.py:tiny", [
        ("optimizer.proximal_mu", "0.01"), ("optimizer.proximal_parts", "('encoder', 'head')")])
    run_config.check(config)
    assert config.optimizer.proximal_parts == ("encoder", "head")


# --------------------------------------------------------------------------- trainer
def _train(mu, steps=5):
    """A few steps of a distiller (teachers frozen: the term lives inside
    `optim.freeze`) with the encoder and optimizer state sharded over fsdp."""
    from mimjax.objectives import build_loss_fn

    model = tiny_model_config(name="universal_distiller", depth=1, num_teachers=2,
                              adaptor_hidden=32)
    setup = training_setup(
        {"data": 2, "fsdp": 4, "tensor": 1}, model=model,
        objectives={"feature_distillation": {"weight": 1.0}},
        optimizer=dict(base_lr=1e-3, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                       grad_clip_norm=1.0, frozen=("teachers",), proximal_mu=mu))
    schedule = optax.constant_schedule(1e-2)
    tx = optim.make_optimizer(setup.config.optimizer, schedule)
    loss_fn = build_loss_fn({"feature_distillation": {"weight": 1.0}})
    step = jax.jit(train.make_train_step(setup.spec, tx, loss_fn, schedule), donate_argnums=0)
    start = jax.device_get(setup.state.params)
    state = setup.state
    with jax.set_mesh(setup.mesh):
        for i in range(steps):
            state, metrics = step(state, sharding.global_batch(_images(i), setup.mesh))
    assert np.isfinite(float(metrics["loss"]))
    return setup, step, state, start


def _images(seed):
    return {"image": np.random.default_rng(seed).normal(size=(16, 32, 32, 1))
            .astype(np.float32)}


def test_the_term_keeps_the_encoder_near_its_anchor_and_set_anchor_resets_it():
    _, _, free_state, start = _train(0.0)
    assert optim.get_anchor(free_state.opt_state) is None
    free = _distance(jax.device_get(free_state.params["encoder"]), start["encoder"])
    setup, step, state, start = _train(10.0)
    anchor = optim.get_anchor(state.opt_state)
    assert anchor.keys() == {"encoder"}
    _assert_trees_close(anchor["encoder"], start["encoder"], rtol=0, atol=0)  # never moved
    after = jax.device_get(state.params)
    pulled = _distance(after["encoder"], start["encoder"])
    assert 0 < pulled < 0.7 * free, (pulled, free)
    _assert_trees_close(after["teachers"], start["teachers"], rtol=0, atol=0)  # frozen
    assert _distance(after["adaptors"], start["adaptors"]) > 0

    # A new anchor (host arrays) takes the old anchor's shardings, in buffers of its own.
    new = jax.tree.map(lambda x: np.asarray(x) + 1.0, after)
    old_leaves = jax.tree.leaves(anchor)
    opt_state = optim.set_anchor(state.opt_state, new)
    new_anchor = optim.get_anchor(opt_state)
    assert new_anchor.keys() == {"encoder"}
    _assert_trees_close(new_anchor["encoder"], new["encoder"], rtol=0, atol=0)
    for old, leaf in zip(old_leaves, jax.tree.leaves(new_anchor)):
        assert leaf.sharding == old.sharding and leaf.dtype == old.dtype
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(new_anchor))
    # From the state's own parameters, which the step donates: copies, so it still runs.
    opt_state = optim.set_anchor(opt_state, state.params)
    shards = {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(state.params)
              for s in x.addressable_shards}
    assert not shards & {s.data.unsafe_buffer_pointer()
                         for x in jax.tree.leaves(optim.get_anchor(opt_state))
                         for s in x.addressable_shards}
    with jax.set_mesh(setup.mesh):
        state, _ = step(state.replace(opt_state=opt_state),
                        sharding.global_batch(_images(0), setup.mesh))
    _assert_trees_close(jax.device_get(optim.get_anchor(state.opt_state)["encoder"]),
                        after["encoder"], rtol=0, atol=0)


def test_run_set_params_resets_the_anchor_and_a_checkpoint_keeps_it(tmp_path):
    config = run_config.load("configs/demo.py:tiny", [
        ("data.dir", str(tmp_path / "data")), ("total_steps", "4"), ("warmup_steps", "1"),
        ("checkpoint_every", "100"), ("log_every", "2"), ("figure_every", "100"),
        ("optimizer.proximal_mu", "1.0")])
    with config.unlocked():
        del config["evals"]
    workdir = str(tmp_path / "run")
    with train.Run(config, workdir) as run:
        encoder = jax.tree.map(lambda x: np.full_like(x, 0.25), run.params()["encoder"])
        run.set_params({"encoder": encoder})
        anchor = sharding.to_host(optim.get_anchor(run.state.opt_state))
        _assert_trees_close(anchor["encoder"], encoder, rtol=0, atol=0)
        run.fit(2)
        assert run.step == 2
        assert _distance(run.params()["encoder"], encoder) > 0
    with train.Run(config, workdir) as run:  # restored from the checkpoint fit left
        assert run.step == 2
        restored = sharding.to_host(optim.get_anchor(run.state.opt_state))
        _assert_trees_close(restored["encoder"], encoder, rtol=0, atol=0)
