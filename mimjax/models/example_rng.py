"""Per-example random keys, so an example's masks and drop path do not depend on
which process, device or batch row it lands on.

The input pipelines tag every example with `example_id`, its position in the
global training stream (input_pipeline.pipeline.ResumableBatches). Keying the
step's randomness by that id (fold_in(step_key, id)) gives an example the same
mask whatever the process count, the batch's row order or its split over devices;
a per-batch draw (`uniform(key, (B, N))`) would give row r the same numbers
whichever example sits there, so a 2-process run would mask differently from a
1-process one.

Keys are raw uint32[2] keys (`jax.random.PRNGKey`, the trainer's) or typed keys
(`jax.random.key`); a batch of keys has one more leading axis, B. Without ids (a
batch built by hand, a benchmark's synthetic batch) each row gets a key split from
the step key: deterministic, but tied to the row.
"""

from __future__ import annotations

import jax


def example_keys(rng: jax.Array, batch: dict, batch_size: int) -> jax.Array:
    """One key per example (B leading), from `batch["example_id"]` when present."""
    ids = batch.get("example_id", None)
    if ids is None:
        return jax.random.split(rng, batch_size)
    if ids.shape != (batch_size,):
        raise ValueError(f"batch['example_id'] has shape {ids.shape}; expected ({batch_size},), "
                         "one id per example.")
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ids)


def is_per_example(rng: jax.Array) -> bool:
    """True for a batch of keys (raw uint32 (B, 2) or typed (B,)), False for one key."""
    one_key_ndim = 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1
    return rng.ndim == one_key_ndim + 1


def split(rng: jax.Array, num: int) -> jax.Array:
    """`num` keys from one key (num leading), or from each of B keys (num, B leading)."""
    if is_per_example(rng):
        return jax.vmap(lambda key: jax.random.split(key, num), out_axes=1)(rng)
    return jax.random.split(rng, num)


def uniform(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """f32 [B, *shape]: each example's draws from its own key."""
    return jax.vmap(lambda key: jax.random.uniform(key, shape))(keys)


def bernoulli(keys: jax.Array, p, shape: tuple[int, ...] = ()) -> jax.Array:
    """bool [B, *shape]: each example's draws from its own key."""
    return jax.vmap(lambda key: jax.random.bernoulli(key, p, shape))(keys)


def randint(keys: jax.Array, shape: tuple[int, ...], minval, maxval, dtype) -> jax.Array:
    """[B, *shape] integers in [minval, maxval), each example from its own key."""
    return jax.vmap(lambda key: jax.random.randint(key, shape, minval, maxval, dtype))(keys)
