"""Masked image reconstruction at one or more scales (MAE / MIRAM).

The batch carries the image at every scale (`image_{S}`, each cropped from the same
window of the full-resolution image). The encoder sees the base scale; the loss at
scale S is the MSE over the masked patches of the S-pixel target, where one masked
base patch covers (S / base)^2 target patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimjax.models import example_rng, mae, vit


def patch_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    """Per-patch pixel targets in f32, optionally normalised per patch (MAE's norm_pix_loss)."""
    target = vit.patchify(images.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)  # torch.var is unbiased, as HF/MAE use
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_fn(model: mae.MaskedAutoencoder, batch, rng, *, mask_ratio: float = 0.75,
            norm_pix_loss: bool = True, scale_weights=None):
    """Returns (weighted sum over scales, {"loss_{S}": loss at scale S})."""
    scales = model.scales
    weights = tuple(scale_weights) if scale_weights is not None else (1.0,) * len(scales)
    if len(weights) != len(scales):
        raise ValueError(
            f"scale_weights {weights} must have one weight per model scale {scales}.")
    missing = [f"image_{s}" for s in scales if f"image_{s}" not in batch]
    if missing:
        raise ValueError(f"Batch lacks {missing}; the input pipeline must produce every scale "
                         f"in model.scales ({list(scales)}); it has {sorted(batch)}.")
    base = batch[f"image_{scales[0]}"]
    # Each example's mask from its own key (its global example id when the pipeline
    # gives one), so it is the same whatever the process count or batch row.
    keys = example_rng.example_keys(rng, batch, base.shape[0])
    noise = example_rng.uniform(keys, (model.num_patches,))
    preds, info = model(base, noise, mask_ratio)
    base_grid = model.encoder.cfg.grid_size
    total, metrics = 0.0, {}
    for scale, weight in zip(scales, weights):
        factor = scale // scales[0]
        mask = mae.upsample_grid(info.mask, factor)
        assert mask.shape[1] == (base_grid * factor) ** 2
        target = patch_targets(batch[f"image_{scale}"], model.patch_size, norm_pix_loss)
        loss = masked_mse(preds[scale], target, mask)
        metrics[f"loss_{scale}"] = loss
        total = total + weight * loss
    return total, metrics
