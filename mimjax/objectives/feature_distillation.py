"""Multi-teacher feature distillation without labels (the universal model's server
step): the student encoder's tokens, through adaptor k, match teacher k's tokens.

Per teacher k and image, over every output token (class token included):
    loss_k = mean_tokens[ (1 - cos(a_k(s), t_k)) + smooth_l1(a_k(s), t_k) ]
with t_k teacher k's tokens standardised per channel over the batch's tokens (the
sites' encoders differ in scale; AM-RADIO, Ranzinger et al. 2024, matches features
with a cosine and a smooth-L1 term, and standardising keeps one loud teacher from
drowning the others). The total is the mean over teachers; `loss_teacher_k` is
reported for each. Everything in f32. Teachers are frozen (stop_gradient in the
model, `optimizer.frozen` in the config).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mimjax.models import example_rng

STANDARDISE_EPS = 1e-6


def standardise(tokens: jax.Array) -> jax.Array:
    """(B, T, D) -> per-channel zero mean, unit variance over the batch's tokens."""
    mean = tokens.mean(axis=(0, 1), keepdims=True)
    var = tokens.var(axis=(0, 1), keepdims=True)
    return (tokens - mean) / jnp.sqrt(var + STANDARDISE_EPS)


def match_loss(prediction: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
    """Mean over tokens and batch of (1 - cosine) + smooth L1 (Huber with delta `beta`,
    per channel, averaged over channels)."""
    prediction, target = prediction.astype(jnp.float32), target.astype(jnp.float32)
    cosine = optax.cosine_similarity(prediction, target, epsilon=1e-8)
    huber = optax.huber_loss(prediction, target, delta=beta).mean(axis=-1) / beta
    return jnp.mean(1.0 - cosine + huber)


def loss_fn(model, batch, rng, *, image_key: str = "image", beta: float = 1.0):
    """Returns (mean over teachers, {"loss_teacher_{k}": ...})."""
    if beta <= 0:
        raise ValueError(f"feature_distillation beta must be > 0, got {beta}.")
    images = batch[image_key]
    keys = None if rng is None else example_rng.example_keys(rng, batch, images.shape[0])
    student, teachers = model(images, rng=keys)
    metrics, total = {}, 0.0
    for k, (adaptor, teacher) in enumerate(zip(model.adaptors, teachers)):
        loss = match_loss(adaptor(student), standardise(teacher.astype(jnp.float32)), beta)
        metrics[f"loss_teacher_{k}"] = loss
        total = total + loss
    return total / len(teachers), metrics
