"""Masked contrastive reconstruction (MCR; Wei, Jin, Zhou, arXiv 2312.15840) and its
baselines, one loss function for image-report pairs with model "mcr".

One stream: the image is masked once (MAE random masking, `image_mask_ratio`) and
the report once (`text_mask_ratio`); the encoders run once on these masked inputs,
and the same features feed all three terms:
    loss = itc_weight * contrastive(masked image emb, masked report emb)
         + mim_weight * masked image reconstruction (MAE decoder, masked patches)
         + mlm_weight * masked language modelling (masked tokens only).
Embeddings come from the model's pooling (MCR: mapping before aggregation).

Baselines by configuration:
- CLIP: image_mask_ratio=0, text_mask_ratio=0, mim_weight=0, mlm_weight=0 (then
  the inputs are unmasked and the loss is exactly the plain contrastive loss of the
  unmasked embeddings; `model.pooling="cls"` for CLIP's pooling);
- two streams (the usual masked-reconstruction VLP MCR compares against):
  itc_inputs="unmasked" adds an unmasked pass for the contrastive term.

Report masking (model side, from the step rng): per report, round(ratio x n) of its n
maskable tokens (real tokens other than [PAD]/[CLS]/[SEP]; at least one when n > 0)
are chosen uniformly. text_mask_mode "mask" (default) replaces all of them by
[MASK]: the masked report is also the contrastive input, and random replacement
tokens would put wrong findings into it. "bert" uses BERT's 80% [MASK] / 10% random
regular token / 10% unchanged. The MLM head only sees the chosen positions (at most
max(1, round(ratio x L)) per report), so its logits are (B, K, vocab), not (B, L,
vocab). Losses are f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimjax.models import example_rng, mae, text
from mimjax.objectives import contrastive, masked_reconstruction

TEXT_MASK_MODES = ("mask", "bert")
ITC_INPUTS = ("masked", "unmasked")


def _round_half_up(x):
    return jnp.floor(x + 0.5).astype(jnp.int32)


def max_masked_tokens(length: int, ratio: float) -> int:
    """Prediction slots per report: an upper bound on the masked tokens of any report."""
    return max(1, int(ratio * length + 0.5))


def mask_text(
    rng: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    ratio: float,
    *,
    vocab_size: int,
    mode: str = "mask",
):
    """Chooses and replaces report tokens for MLM (see the module docstring).

    Returns (masked_ids (B, L), positions (B, K) int32, weights (B, K) f32 (1 = a
    masked token to predict, 0 = an unused slot), targets (B, K) int32 original ids).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"text_mask_ratio must be in (0, 1) to mask, got {ratio}.")
    if mode not in TEXT_MASK_MODES:
        raise ValueError(f"text_mask_mode must be one of {TEXT_MASK_MODES}, got {mode!r}.")
    batch, length = ids.shape
    num_slots = max_masked_tokens(length, ratio)
    maskable = (mask > 0) & (ids != text.PAD_ID) & (ids != text.CLS_ID) & (ids != text.SEP_ID)
    num_maskable = jnp.sum(maskable, axis=1)
    num_masked = jnp.where(
        num_maskable > 0, jnp.maximum(_round_half_up(ratio * num_maskable), 1), 0
    )
    num_masked = jnp.minimum(num_masked, num_slots)
    # `rng`: one key, or one per report (B, 2; models.example_rng) so that a report's
    # masking does not depend on its batch row.
    select_rng, mode_rng, token_rng = example_rng.split(rng, 3)
    per_example = example_rng.is_per_example(rng)

    def uniform(key):
        if per_example:
            return example_rng.uniform(key, (length,))
        return jax.random.uniform(key, (batch, length))

    # Non-maskable tokens sort after every maskable one.
    noise = jnp.where(maskable, uniform(select_rng), 2.0)
    order = jnp.argsort(noise, axis=1)
    rank = jnp.argsort(order, axis=1)
    chosen = rank < num_masked[:, None]
    if mode == "mask":
        replacement = jnp.full_like(ids, text.MASK_ID)
    else:
        u = uniform(mode_rng)
        if per_example:
            random_ids = example_rng.randint(
                token_rng, (length,), text.NUM_SPECIAL_TOKENS, vocab_size, ids.dtype
            )
        else:
            random_ids = jax.random.randint(
                token_rng, (batch, length), text.NUM_SPECIAL_TOKENS, vocab_size, dtype=ids.dtype
            )
        replacement = jnp.where(u < 0.8, text.MASK_ID, jnp.where(u < 0.9, random_ids, ids))
    masked_ids = jnp.where(chosen, replacement.astype(ids.dtype), ids)
    positions = order[:, :num_slots].astype(jnp.int32)
    weights = (jnp.arange(num_slots)[None] < num_masked[:, None]).astype(jnp.float32)
    targets = jnp.take_along_axis(ids, positions, axis=1).astype(jnp.int32)
    return masked_ids, positions, weights, targets


def mlm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Cross-entropy (f32) averaged over the masked tokens of the batch; and accuracy."""
    logits = logits.astype(jnp.float32)
    true_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_token = jax.nn.logsumexp(logits, axis=-1) - true_logit
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(per_token * weights) / total, jnp.sum(correct * weights) / total


def _check_settings(
    model, batch, image_mask_ratio, text_mask_ratio, weights, loss, text_mask_mode, itc_inputs
):
    missing = [k for k in ("image", "text_ids", "text_mask") if k not in batch]
    if missing:
        raise ValueError(
            f"the mcr objective needs batch keys {missing} (image-report pairs); "
            f"the batch has {sorted(batch)}."
        )
    itc_weight, mim_weight, mlm_weight = weights
    if min(weights) < 0 or max(weights) <= 0:
        raise ValueError(
            f"mcr weights (itc {itc_weight}, mim {mim_weight}, mlm {mlm_weight}) "
            "must be non-negative with at least one positive."
        )
    if not 0.0 <= image_mask_ratio < 1.0 or not 0.0 <= text_mask_ratio < 1.0:
        raise ValueError(
            f"mask ratios must be in [0, 1); got image {image_mask_ratio}, text {text_mask_ratio}."
        )
    if mim_weight > 0 and image_mask_ratio == 0:
        raise ValueError(
            "mim_weight > 0 needs image_mask_ratio > 0 (nothing to reconstruct); "
            "set a ratio or mim_weight=0."
        )
    if mlm_weight > 0 and text_mask_ratio == 0:
        raise ValueError(
            "mlm_weight > 0 needs text_mask_ratio > 0 (nothing to predict); "
            "set a ratio or mlm_weight=0."
        )
    if loss not in contrastive.LOSSES:
        raise ValueError(f"mcr loss must be one of {contrastive.LOSSES}, got {loss!r}.")
    if text_mask_mode not in TEXT_MASK_MODES:
        raise ValueError(
            f"text_mask_mode must be one of {TEXT_MASK_MODES}, got {text_mask_mode!r}."
        )
    if itc_inputs not in ITC_INPUTS:
        raise ValueError(f"itc_inputs must be one of {ITC_INPUTS}, got {itc_inputs!r}.")
    if not hasattr(model, "text_encoder"):
        raise ValueError(f"the mcr objective needs model.name 'mcr', got {type(model).__name__}.")
    if mim_weight > 0 and not len(model.decoders):
        raise ValueError(
            "mim_weight > 0 needs an image decoder but model.decoder is None; "
            "set model.decoder or mim_weight=0."
        )
    if mlm_weight > 0 and model.mlm_head is None:
        raise ValueError(
            "mlm_weight > 0 needs the MLM head but model.text.mlm_head is False; "
            "enable it or set mlm_weight=0."
        )


def loss_fn(
    model,
    batch,
    rng,
    *,
    image_mask_ratio: float = 0.5,
    text_mask_ratio: float = 0.25,
    itc_weight: float = 1.0,
    mim_weight: float = 1.0,
    mlm_weight: float = 1.0,
    loss: str = "infonce",
    max_logit_scale: float = 100.0,
    norm_pix_loss: bool = True,
    text_mask_mode: str = "mask",
    itc_inputs: str = "masked",
    chunk_size: int | None = None,
):
    """Returns (weighted total, metrics): loss_itc / loss_mim / loss_mlm for the terms
    with a positive weight, logit_scale (clamped, as used), logit_bias (siglip),
    accuracy_i2t (in-batch, global batch) and accuracy_mlm."""
    _check_settings(
        model,
        batch,
        image_mask_ratio,
        text_mask_ratio,
        (itc_weight, mim_weight, mlm_weight),
        loss,
        text_mask_mode,
        itc_inputs,
    )
    images, ids, text_mask = batch["image"], batch["text_ids"], batch["text_mask"]
    # One key per example (keyed by batch["example_id"] when the pipeline gives it).
    keys = example_rng.example_keys(rng, batch, images.shape[0])
    image_rng, text_rng = example_rng.split(keys, 2)

    info = None
    if image_mask_ratio > 0:
        noise = example_rng.uniform(image_rng, (model.num_patches,))
        info = mae.random_masking(noise, image_mask_ratio)
        image_tokens = model.encoder.encode_visible(images, info.keep_ids)
    else:
        image_tokens = model.encoder(images)
    text_in = ids
    if text_mask_ratio > 0:
        text_in, positions, slot_weights, targets = mask_text(
            text_rng,
            ids,
            text_mask,
            text_mask_ratio,
            vocab_size=model.vocab_size,
            mode=text_mask_mode,
        )
    text_tokens = model.text_encoder(text_in, text_mask)

    total, metrics = 0.0, {}
    if itc_weight > 0:
        if itc_inputs == "masked":
            image_emb = model.image_embedding(image_tokens)
            text_emb = model.text_embedding(text_tokens, text_mask)
        else:
            image_emb = model.embed_image(images)
            text_emb = model.embed_text(ids, text_mask)
        scale = contrastive.logit_scale_from(model.logit_scale[...], max_logit_scale)
        bias = model.logit_bias[...] if loss == "siglip" else None
        loss_itc, itc_metrics = contrastive.contrastive_loss(
            loss, image_emb, text_emb, scale, bias, chunk_size=chunk_size
        )
        total = total + itc_weight * loss_itc
        metrics.update(itc_metrics, loss_itc=loss_itc, logit_scale=scale)
        if bias is not None:
            metrics["logit_bias"] = bias
    if mim_weight > 0:
        pred = model.reconstruct(image_tokens, info.restore_ids)
        target = masked_reconstruction.patch_targets(images, model.patch_size, norm_pix_loss)
        loss_mim = masked_reconstruction.masked_mse(pred, target, info.mask)
        total = total + mim_weight * loss_mim
        metrics["loss_mim"] = loss_mim
    if mlm_weight > 0:
        logits = model.mlm_logits(text_tokens, positions)
        loss_mlm, accuracy_mlm = mlm_loss(logits, targets, slot_weights)
        total = total + mlm_weight * loss_mlm
        metrics.update(loss_mlm=loss_mlm, accuracy_mlm=accuracy_mlm)
    return total, metrics
