"""Masked autoencoder with one decoder per target scale (MIRAM; MAE = one scale).

MIRAM (Vo et al., arXiv 2503.07157): the encoder sees the visible patches of the
image at the base resolution; each scale has its own decoder (embedding, mask token,
position embeddings, blocks, prediction head). A decoder whose scale is k times the
base upsamples the full token grid (visible tokens and mask tokens) k-fold, so each
base patch becomes k x k patches of the same pixel size at the higher resolution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import vit


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    keep_ids: jax.Array     # (B, K) indices of visible patches, in shuffle order
    restore_ids: jax.Array  # (B, N) inverse permutation of the shuffle
    mask: jax.Array         # (B, N) 1 = masked (to reconstruct), 0 = visible


def random_masking(noise: jax.Array, mask_ratio: float) -> MaskInfo:
    """Per-sample masking from uniform noise, HF ViTMAE's convention: sort the
    noise, keep the lowest (1 - mask_ratio) fraction. The same noise gives the
    same mask here and in `ViTMAEForPreTraining(noise=...)`."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    batch, num_patches = noise.shape
    num_keep = int(num_patches * (1 - mask_ratio))
    shuffle_ids = jnp.argsort(noise, axis=1)
    restore_ids = jnp.argsort(shuffle_ids, axis=1)
    mask = jnp.ones((batch, num_patches), jnp.float32).at[:, :num_keep].set(0.0)
    mask = jnp.take_along_axis(mask, restore_ids, axis=1)
    return MaskInfo(keep_ids=shuffle_ids[:, :num_keep], restore_ids=restore_ids, mask=mask)


def upsample_grid(x: jax.Array, factor: int) -> jax.Array:
    """(B, g*g, ...) token grid -> (B, (g*factor)**2, ...), nearest neighbour."""
    if factor == 1:
        return x
    b, n = x.shape[:2]
    g = int(round(n ** 0.5))
    grid = x.reshape(b, g, g, *x.shape[2:])
    grid = jnp.repeat(jnp.repeat(grid, factor, axis=1), factor, axis=2)
    return grid.reshape(b, n * factor * factor, *x.shape[2:])


class ScaleDecoder(nnx.Module):
    """Decoder for one target scale (`factor` x the encoder's grid)."""

    def __init__(self, cfg: vit.TransformerConfig, *, encoder: vit.ViTConfig, factor: int,
                 posemb: str, rngs: nnx.Rngs):
        self.cfg, self.encoder_cfg, self.factor, self.posemb = cfg, encoder, factor, posemb
        self.grid_size = encoder.grid_size * factor
        init = nnx.initializers.xavier_uniform()
        self.embed = nnx.Linear(encoder.transformer.width, cfg.width, dtype=cfg.dtype,
                                kernel_init=init, rngs=rngs)
        self.mask_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.width)))
        if posemb == "learn":
            self.pos_embedding = nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(), (1, self.grid_size**2, cfg.width)))
        self.transformer = vit.Transformer(cfg, rngs=rngs)
        self.norm = vit.layer_norm(cfg.width, cfg, rngs)
        self.pred = nnx.Linear(cfg.width, encoder.patch_size**2 * encoder.channels,
                               dtype=cfg.dtype, kernel_init=init, rngs=rngs)

    def position_embeddings(self) -> jax.Array:
        if self.posemb == "learn":
            return self.pos_embedding[...]
        return jnp.asarray(vit.sincos_posemb_2d(self.cfg.width, self.grid_size))[None]

    def __call__(self, latent: jax.Array, restore_ids: jax.Array) -> jax.Array:
        """latent: encoder output (B, [1 +] K, D_enc). Returns (B, N * factor**2, p*p*C)."""
        x = self.embed(latent)
        has_cls = self.encoder_cfg.class_token
        cls, visible = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
        b, k, width = visible.shape
        num_patches = restore_ids.shape[1]
        masked = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, num_patches - k, width))
        tokens = jnp.concatenate([visible, masked], axis=1)
        tokens = jnp.take_along_axis(tokens, restore_ids[..., None], axis=1)  # unshuffle
        tokens = upsample_grid(tokens, self.factor)
        tokens = tokens + self.position_embeddings().astype(tokens.dtype)
        if has_cls:
            tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = self.norm(self.transformer(tokens))
        pred = self.pred(tokens)
        return pred[:, 1:] if has_cls else pred


def decoder_config(dec, encoder: vit.ViTConfig) -> vit.TransformerConfig:
    """A decoder's transformer from a `model.decoder` section ({width, depth, num_heads,
    mlp_dim}); dtype, norm, GELU, scan / remat and attention follow the encoder's."""
    et = encoder.transformer
    return vit.TransformerConfig(
        width=dec.width, depth=dec.depth, num_heads=dec.num_heads,
        mlp_dim=dec.get("mlp_dim", None) or 4 * dec.width,
        dtype=et.dtype, layer_norm_eps=et.layer_norm_eps, gelu_approximate=et.gelu_approximate,
        scan=et.scan, remat=et.remat, attention=et.attention)


class MaskedImageModel(nnx.Module):
    """The interface the masked-reconstruction objective and figures use: `patch_size`,
    `num_patches` and `__call__(images, noise, mask_ratio)`. A subclass has a ViT `encoder`
    and `scales`, and implements `decode(latent, restore_ids)` -> {scale: (B, N_scale,
    p*p*C) predictions}."""

    @property
    def patch_size(self) -> int:
        return self.encoder.cfg.patch_size

    @property
    def num_patches(self) -> int:
        return self.encoder.cfg.num_patches

    def decode(self, latent: jax.Array, restore_ids: jax.Array) -> dict[int, jax.Array]:
        raise NotImplementedError

    def __call__(self, images: jax.Array, noise: jax.Array, mask_ratio: float):
        """images: (B, S0, S0, C) at the base scale; noise: (B, N) uniform.
        Returns ({scale: (B, N_scale, p*p*C) predictions}, MaskInfo)."""
        info = random_masking(noise, mask_ratio)
        latent = self.encoder.encode_visible(images, info.keep_ids)
        return self.decode(latent, info.restore_ids), info


class MaskedAutoencoder(MaskedImageModel):
    """ViT encoder + one `ScaleDecoder` per entry of `scales` (pixels, ascending;
    scales[0] must be the encoder's image size, every scale a multiple of it)."""

    def __init__(self, encoder: vit.ViTConfig, decoder: vit.TransformerConfig,
                 scales: tuple[int, ...], decoder_posemb: str = "sincos2d", *, rngs: nnx.Rngs):
        scales = tuple(int(s) for s in scales)
        if not scales or scales[0] != encoder.image_size:
            raise ValueError(
                f"scales must start with the encoder image size {encoder.image_size} "
                f"(the base scale), got {scales}.")
        if any(s % encoder.image_size for s in scales) or list(scales) != sorted(set(scales)):
            raise ValueError(
                f"scales {scales} must be distinct, ascending integer multiples of the base "
                f"image size {encoder.image_size} (e.g. [112, 224]).")
        self.scales = scales
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.decoders = nnx.List([
            ScaleDecoder(decoder, encoder=encoder, factor=s // encoder.image_size,
                         posemb=decoder_posemb, rngs=rngs) for s in scales])

    def decode(self, latent: jax.Array, restore_ids: jax.Array) -> dict[int, jax.Array]:
        return {s: dec(latent, restore_ids) for s, dec in zip(self.scales, self.decoders)}


def build_mae(model_cfg, *, rngs: nnx.Rngs) -> MaskedAutoencoder:
    """From the `model` config section (see configs/demo.py for the fields)."""
    encoder = vit.vit_config_from(model_cfg)
    dec = model_cfg.decoder
    decoder = decoder_config(dec, encoder)
    return MaskedAutoencoder(encoder, decoder, tuple(model_cfg.scales),
                             decoder_posemb=dec.get("posemb", "sincos2d"), rngs=rngs)
