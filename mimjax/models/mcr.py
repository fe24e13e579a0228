"""Image-report model for masked contrastive reconstruction (MCR; Wei, Jin, Zhou,
arXiv 2312.15840) and its CLIP-style baseline.

Parts (parameter subtrees):
- `encoder`: the ViT image encoder (same layout as the MAE's, so downstream
  fine-tuning initialises from it by path, see `mimjax.pretrained`);
- `decoders`: one MAE `ScaleDecoder` at the base scale (masked image modelling);
  absent when `model.decoder` is None (CLIP baseline);
- `text_encoder` + `mlm_head`: the BERT-style text tower and its MLM head
  (`mimjax.models.text`); the head is absent when `model.text.mlm_head` is False;
- `image_projection`, `text_projection`: heads into the shared embedding space
  (Linear, or Linear-GELU-Linear when `projection_hidden_dim` > 0);
- `logit_scale` (log of the contrastive temperature's inverse) and `logit_bias`
  (SigLIP's bias; unused by InfoNCE), scalars.

How local features become one embedding per image / report (`pooling`):
- "map_then_mean" (MCR's mapping before aggregation, the default): every local
  token (image: encoder outputs of the visible patches; text: the real tokens
  after [CLS]) is mapped into the shared space by the projection head first, then
  the mapped tokens are averaged. With a non-linear head (projection_hidden_dim
  > 0) this differs from "mean_then_map"; with a linear head the two are equal;
- "mean_then_map": average the local tokens, then project;
- "cls": project the class token (image) / [CLS] token (text), as CLIP does.
Embeddings are L2-normalised and f32.

`__call__(images, noise, mask_ratio)` is the MAE interface ({base scale: patch
predictions}, MaskInfo), so MAE tooling (e.g. reconstruction figures) works as is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import mae, text, vit

POOLINGS = ("map_then_mean", "mean_then_map", "cls")


class ProjectionHead(nnx.Module):
    """Linear (hidden_dim 0) or Linear-GELU-Linear into the shared space."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dtype, *, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.hidden = (
            nnx.Linear(in_dim, hidden_dim, dtype=dtype, kernel_init=init, rngs=rngs)
            if hidden_dim
            else None
        )
        self.out = nnx.Linear(
            hidden_dim or in_dim, out_dim, dtype=dtype, kernel_init=init, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.hidden is not None:
            x = jax.nn.gelu(self.hidden(x))
        return self.out(x)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps**2))


def masked_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over axis 1 of (B, T, D) with (B, T) weights (f32 accumulation)."""
    w = weights.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * w, axis=1)
    return total / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class MCRModel(mae.MaskedImageModel):
    def __init__(
        self,
        encoder: vit.ViTConfig,
        decoder: vit.TransformerConfig | None,
        text_cfg: text.TextConfig,
        *,
        projection_dim: int,
        projection_hidden_dim: int = 0,
        pooling: str = "map_then_mean",
        mlm_head: bool = True,
        decoder_posemb: str = "sincos2d",
        logit_scale_init: float = 1 / 0.07,
        logit_bias_init: float = -10.0,
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}.")
        if pooling == "cls" and not encoder.class_token:
            raise ValueError(
                "model.pooling 'cls' needs the image class token; set "
                "model.class_token=True or pooling='map_then_mean'."
            )
        if logit_scale_init <= 0:
            raise ValueError(f"model.logit_scale_init must be positive, got {logit_scale_init}.")
        self.pooling = pooling
        self.scales = (encoder.image_size,)
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.decoders = nnx.List([])
        if decoder is not None:
            self.decoders.append(
                mae.ScaleDecoder(
                    decoder, encoder=encoder, factor=1, posemb=decoder_posemb, rngs=rngs
                )
            )
        self.text_encoder = text.TextEncoder(text_cfg, rngs=rngs)
        self.mlm_head = text.MLMHead(text_cfg, rngs=rngs) if mlm_head else None
        dtype = encoder.transformer.dtype
        self.image_projection = ProjectionHead(
            encoder.transformer.width, projection_dim, projection_hidden_dim, dtype, rngs=rngs
        )
        self.text_projection = ProjectionHead(
            text_cfg.transformer.width, projection_dim, projection_hidden_dim, dtype, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(math.log(logit_scale_init), jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(logit_bias_init, jnp.float32))

    @property
    def vocab_size(self) -> int:
        return self.text_encoder.cfg.vocab_size

    # ------------------------------------------------------------------ MAE interface
    def decode(self, latent: jax.Array, restore_ids: jax.Array) -> dict[int, jax.Array]:
        return {self.scales[0]: self.reconstruct(latent, restore_ids)}

    def reconstruct(self, latent: jax.Array, restore_ids: jax.Array) -> jax.Array:
        if not len(self.decoders):
            raise ValueError(
                "This model has no image decoder (model.decoder is None); "
                "set model.decoder or the objective's mim_weight to 0."
            )
        return self.decoders[0](latent, restore_ids)

    # ------------------------------------------------------------------ embeddings
    def _pool(self, tokens: jax.Array, local_weights: jax.Array, head: ProjectionHead):
        """tokens (B, 1 + T, D) with the class / [CLS] token first; local_weights (B, T)."""
        if self.pooling == "cls":
            pooled = head(tokens[:, 0])
        elif self.pooling == "mean_then_map":
            pooled = head(masked_mean(tokens[:, 1:], local_weights).astype(tokens.dtype))
        else:  # mapping before aggregation
            pooled = masked_mean(head(tokens[:, 1:]), local_weights)
        return l2_normalize(pooled)

    def image_embedding(self, tokens: jax.Array) -> jax.Array:
        """Encoder outputs (B, [1 +] K, D) of the (visible) patches -> (B, P) f32, unit norm."""
        if not self.encoder.cfg.class_token:
            # A zero placeholder keeps one code path; "cls" pooling is refused without it.
            tokens = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens], axis=1)
        local = jnp.ones(tokens.shape[:1] + (tokens.shape[1] - 1,), jnp.float32)
        return self._pool(tokens, local, self.image_projection)

    def text_embedding(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Text encoder outputs (B, L, D) and mask (B, L) -> (B, P) f32, unit norm.
        Local tokens are the real tokens after [CLS] (the report's words and [SEP])."""
        return self._pool(tokens, mask[:, 1:], self.text_projection)

    def embed_image(self, images: jax.Array) -> jax.Array:
        """Unmasked images (B, S, S, C) -> (B, P) embeddings (evaluation, CLIP baseline)."""
        return self.image_embedding(self.encoder(images))

    def embed_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Unmasked token ids and mask (B, L) -> (B, P) embeddings."""
        return self.text_embedding(self.text_encoder(ids, mask), mask)

    def mlm_logits(self, text_tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Vocabulary logits (B, K, V) f32 at `positions` (B, K) of the text features."""
        if self.mlm_head is None:
            raise ValueError(
                "This model has no MLM head (model.text.mlm_head is False); "
                "enable it or set the objective's mlm_weight to 0."
            )
        hidden = jnp.take_along_axis(text_tokens, positions[..., None], axis=1)
        return self.mlm_head(hidden, self.text_encoder.embedding_table)


def build_mcr(model_cfg, *, rngs: nnx.Rngs) -> MCRModel:
    """From the `model` config section: the image encoder's fields as for MAE
    (variant, width, depth, ..., image_size, channels, dtype), plus
    - decoder: {width, depth, num_heads, mlp_dim, posemb} or None (no MIM);
    - text: {vocab_size, max_length, width, depth, num_heads, mlp_dim, mlm_head};
    - projection_dim, projection_hidden_dim (0: linear projection), pooling;
    - logit_scale_init (default 1/0.07, CLIP), logit_bias_init (default -10, SigLIP)."""
    encoder = vit.vit_config_from(model_cfg)
    scales = list(model_cfg.get("scales", None) or [encoder.image_size])
    if scales != [encoder.image_size]:
        raise ValueError(
            f"model 'mcr' reconstructs at the base scale only; model.scales must "
            f"be [{encoder.image_size}] (or unset), got {scales}."
        )
    dec = model_cfg.get("decoder", None)
    decoder = mae.decoder_config(dec, encoder) if dec is not None else None
    text_section = model_cfg.get("text", None)
    if text_section is None:
        raise ValueError(
            "model 'mcr' needs a model.text section (vocab_size, max_length, "
            "width, depth, num_heads)."
        )
    projection_dim = model_cfg.get("projection_dim", None)
    if not projection_dim:
        raise ValueError("model.projection_dim (shared embedding size) is not set.")
    return MCRModel(
        encoder,
        decoder,
        text.text_config_from(text_section, encoder.transformer),
        projection_dim=int(projection_dim),
        projection_hidden_dim=int(model_cfg.get("projection_hidden_dim", 0) or 0),
        pooling=model_cfg.get("pooling", "map_then_mean"),
        mlm_head=bool(text_section.get("mlm_head", True)),
        decoder_posemb=dec.get("posemb", "sincos2d") if dec is not None else "sincos2d",
        logit_scale_init=float(model_cfg.get("logit_scale_init", 1 / 0.07)),
        logit_bias_init=float(model_cfg.get("logit_bias_init", -10.0)),
        rngs=rngs,
    )
