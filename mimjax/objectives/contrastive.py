"""Image-text contrastive losses over the global batch: InfoNCE (CLIP) and SigLIP's
pairwise sigmoid loss, each dense or chunked.

Inputs are L2-normalised embeddings (B, D) of B image-report pairs (row i of both is
a pair) and a learnable scale. The functions run on global arrays inside the
trainer's jit (GSPMD; batch split over the mesh axes data x fsdp), so negatives come
from the whole global batch and gradients are the global-batch gradients by
construction: there is no shard_map and no hand-written gradient reduction (the
N-fold over-count of a `pmean` of gradients inside shard_map cannot happen).

Memory: the similarity matrix is constrained to be split by rows over the batch
axes, so a device holds (B / devices) x B logits (its images against every
report), never B x B; the text embeddings are all-gathered (B x D, small). The
report-to-image direction needs per-column reductions, which become all-reduces of
(B,) vectors. The chunked variant (`chunk_size`) walks the reports in chunks of
`chunk_size` columns with a rematerialised loop body, so a device holds
(B / devices) x chunk_size logits at a time, in the forward and the backward pass.
Outside a mesh (eager, single device) the constraints are no-ops.

Everything (embeddings, logits, log-sum-exps, losses) is f32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimjax import sharding

LOSSES = ("infonce", "siglip")


def logit_scale_from(log_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """exp of the learnable log-scale, clamped at `max_scale` (CLIP: 100). Beyond the
    clamp the gradient to the parameter is zero, which holds it there."""
    if max_scale <= 0:
        raise ValueError(f"max_logit_scale must be positive, got {max_scale}.")
    return jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), math.log(max_scale)))


def _replicated(x: jax.Array) -> jax.Array:
    """All of `x` on every device inside a jit run under a mesh; no-op outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P())


def _check(image_emb, text_emb, chunk_size):
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be (B, D); got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}."
        )
    batch = image_emb.shape[0]
    if chunk_size is not None and (chunk_size < 1 or batch % chunk_size):
        raise ValueError(
            f"contrastive chunk_size {chunk_size} must be a positive divisor of "
            f"the (micro)batch size {batch}; choose a divisor or None (dense)."
        )
    return image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)


def _similarities(img, txt, scale, bias):
    """(B, D) x (C, D) -> (B, C) f32 logits, split by rows over the batch axes."""
    logits = jnp.einsum("bd,cd->bc", img, txt, preferred_element_type=jnp.float32)
    return sharding.constrain_batch(logits * scale + bias)


def _chunk_stats(img, txt, scale, bias, chunk_size, chunk_fn):
    """Runs `chunk_fn(logits (B, C), offset)` over column chunks of the text embeddings,
    rematerialising each chunk's logits in the backward pass; returns the stacked
    outputs (one leading entry per chunk)."""
    batch, dim = txt.shape
    chunks = _replicated(txt).reshape(batch // chunk_size, chunk_size, dim)
    offsets = jnp.arange(batch // chunk_size, dtype=jnp.int32) * chunk_size

    @jax.checkpoint
    def body(inputs):
        txt_chunk, offset = inputs
        return chunk_fn(_similarities(img, txt_chunk, scale, bias), offset)

    return jax.lax.map(body, (chunks, offsets))


def _row_argmax(logits, offset):
    return jnp.max(logits, axis=1), jnp.argmax(logits, axis=1).astype(jnp.int32) + offset


def _combine_argmax(chunk_max, chunk_arg):
    """Per-chunk row maxima/argmaxes (n, B) -> global argmax (B,), first index on ties
    (as a dense argmax)."""
    best_chunk = jnp.argmax(chunk_max, axis=0)
    return jnp.take_along_axis(chunk_arg, best_chunk[None], axis=0)[0]


def _accuracy(predicted):
    return jnp.mean((predicted == jnp.arange(predicted.shape[0])).astype(jnp.float32))


def info_nce_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE (CLIP): mean of the image->report and report->image softmax
    cross-entropies over the global batch. `logit_scale` is the (clamped) scale, not
    its log. Returns (loss, {"accuracy_i2t": fraction of images whose own report
    scores highest in the batch})."""
    img, txt = _check(image_emb, text_emb, chunk_size)
    scale = jnp.asarray(logit_scale, jnp.float32)
    positive = scale * jnp.sum(img * txt, axis=-1)  # (B,) logits of the true pairs
    if chunk_size is None:
        logits = _similarities(img, _replicated(txt), scale, 0.0)
        row_lse = jax.nn.logsumexp(logits, axis=1)
        col_lse = jax.nn.logsumexp(logits, axis=0)
        predicted = jnp.argmax(logits, axis=1)
    else:

        def chunk_fn(logits, offset):
            return (
                jax.nn.logsumexp(logits, axis=1),
                jax.nn.logsumexp(logits, axis=0),
                *_row_argmax(logits, offset),
            )

        row_parts, col_lse, chunk_max, chunk_arg = _chunk_stats(
            img, txt, scale, 0.0, chunk_size, chunk_fn
        )
        row_lse = jax.nn.logsumexp(row_parts, axis=0)
        col_lse = col_lse.reshape(-1)
        predicted = _combine_argmax(chunk_max, chunk_arg)
    loss = 0.5 * (jnp.mean(row_lse - positive) + jnp.mean(col_lse - positive))
    return loss, {"accuracy_i2t": _accuracy(predicted)}


def sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict]:
    """SigLIP (Zhai et al. 2023): every image-report pair is a binary problem, positive
    on the diagonal; -sum_ij log sigmoid(z_ij (scale <x_i, y_j> + bias)) / B.
    Written as the all-negative sum plus a diagonal correction, so no B x B label
    matrix is built. Returns (loss, {"accuracy_i2t"})."""
    img, txt = _check(image_emb, text_emb, chunk_size)
    scale = jnp.asarray(logit_scale, jnp.float32)
    bias = jnp.asarray(logit_bias, jnp.float32)
    positive = scale * jnp.sum(img * txt, axis=-1) + bias
    if chunk_size is None:
        logits = _similarities(img, _replicated(txt), scale, bias)
        negatives = jnp.sum(jax.nn.log_sigmoid(-logits))
        predicted = jnp.argmax(logits, axis=1)
    else:

        def chunk_fn(logits, offset):
            return (jnp.sum(jax.nn.log_sigmoid(-logits)), *_row_argmax(logits, offset))

        chunk_sums, chunk_max, chunk_arg = _chunk_stats(img, txt, scale, bias, chunk_size, chunk_fn)
        negatives = jnp.sum(chunk_sums)
        predicted = _combine_argmax(chunk_max, chunk_arg)
    diagonal = jnp.sum(jax.nn.log_sigmoid(positive) - jax.nn.log_sigmoid(-positive))
    loss = -(negatives + diagonal) / img.shape[0]
    return loss, {"accuracy_i2t": _accuracy(predicted)}


def contrastive_loss(
    kind: str, image_emb, text_emb, logit_scale, logit_bias=None, *, chunk_size: int | None = None
):
    """Dispatch by name: "infonce" or "siglip" (which needs `logit_bias`)."""
    if kind == "infonce":
        return info_nce_loss(image_emb, text_emb, logit_scale, chunk_size=chunk_size)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("the siglip loss needs a logit_bias.")
        return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, chunk_size=chunk_size)
    raise ValueError(f"Unknown contrastive loss {kind!r}; use one of {LOSSES}.")
