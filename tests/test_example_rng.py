"""Per-example randomness keyed by the global example id: an example's mask and drop
path do not depend on its batch row (hence on the process count), and the pieces
that take one key or a key per example agree with jax.random's own draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimjax.models import build_model, example_rng, vit
from mimjax.objectives import masked_reconstruction

from helpers import tiny_model_config

RNG = jax.random.PRNGKey(3)


def _permuted(batch, order):
    return {k: jnp.asarray(np.asarray(v)[order]) for k, v in batch.items()}


def test_keys_follow_the_example_not_the_row():
    ids = jnp.asarray([7, 3, 11, 0], jnp.uint32)
    keys = example_rng.example_keys(RNG, {"example_id": ids}, 4)
    order = np.array([2, 0, 3, 1])
    again = example_rng.example_keys(RNG, {"example_id": ids[order]}, 4)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(keys)[order])
    np.testing.assert_array_equal(keys[0], jax.random.fold_in(RNG, 7))
    # Without ids: a key per row, split from the step key.
    np.testing.assert_array_equal(example_rng.example_keys(RNG, {}, 4), jax.random.split(RNG, 4))
    with pytest.raises(ValueError, match="one id per example"):
        example_rng.example_keys(RNG, {"example_id": ids[:3]}, 4)


def test_mask_of_an_example_is_the_same_in_any_row():
    model = build_model(tiny_model_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    high = rng.normal(size=(4, 64, 64, 1)).astype(np.float32)
    base = high.reshape(4, 32, 2, 32, 2, 1).mean(axis=(2, 4))
    batch = {"image_32": base, "image_64": high,
             "example_id": np.array([5, 9, 2, 14], np.uint32)}

    def masks(b):
        keys = example_rng.example_keys(RNG, b, 4)
        noise = example_rng.uniform(keys, (model.num_patches,))
        return np.asarray(model(jnp.asarray(b["image_32"]), noise, 0.75)[1].mask)

    order = np.array([3, 1, 0, 2])
    np.testing.assert_array_equal(masks(_permuted(batch, order)), masks(batch)[order])
    # The loss is a mean over examples: the same batch in another row order gives it
    # up to the summation order.
    loss, _ = masked_reconstruction.loss_fn(model, _permuted(batch, np.arange(4)), RNG)
    shuffled, _ = masked_reconstruction.loss_fn(model, _permuted(batch, order), RNG)
    np.testing.assert_allclose(shuffled, loss, rtol=1e-6)


def test_drop_path_per_example_follows_the_example():
    cfg = vit.TransformerConfig(width=16, depth=3, num_heads=2, mlp_dim=32, drop_path_rate=0.5)
    transformer = vit.Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 16))
    keys = jax.random.split(RNG, 6)
    out = transformer(x, keys)
    order = np.array([5, 0, 3, 1, 4, 2])
    np.testing.assert_allclose(transformer(x[order], keys[order]), out[order], rtol=1e-6,
                               atol=1e-6)
    # Drop path is active: some branches dropped, so the output differs from eval mode.
    assert not np.allclose(out, transformer(x))


def test_per_example_draws_equal_jax_random_per_key():
    keys = jax.random.split(RNG, 3)
    np.testing.assert_array_equal(example_rng.uniform(keys, (4,))[1],
                                  jax.random.uniform(keys[1], (4,)))
    np.testing.assert_array_equal(example_rng.bernoulli(keys, 0.3, (5,))[2],
                                  jax.random.bernoulli(keys[2], 0.3, (5,)))
    split = example_rng.split(keys, 2)
    assert split.shape == (2, 3, 2)
    np.testing.assert_array_equal(split[:, 1], jax.random.split(keys[1], 2))
    # One key: jax.random.split itself; typed keys work alike.
    np.testing.assert_array_equal(example_rng.split(RNG, 4), jax.random.split(RNG, 4))
    typed = jax.random.split(jax.random.key(0), 3)
    assert example_rng.is_per_example(typed) and not example_rng.is_per_example(typed[0])
    assert example_rng.split(typed, 2).shape == (2, 3)
