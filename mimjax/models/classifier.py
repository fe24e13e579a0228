"""ViT classifier for fine-tuning: encoder over all patches (no masking) + a head.

Parameters are `{"encoder": ..., "head": ...}`; the encoder subtree has exactly the
layout of the pretraining model's encoder (`MaskedAutoencoder.encoder`), so a
pretrained checkpoint maps onto it by path (see `mimjax.pretrained`).

Model config fields (`config.model`, name "vit_classifier"): the encoder's fields as
for pretraining (variant, width, depth, num_heads, mlp_dim, image_size, channels,
posemb, class_token, dtype, layer_norm_eps, gelu_approximate, scan, remat,
attention) plus
- `head`: "cls" | "gap" | "map" (see `mimjax.models.heads`);
- `num_classes`: logits per image (classes, or labels of a multi-label task);
- `drop_path_rate`: stochastic depth of the last block (MAE fine-tuning: 0.1 for B);
- `head_init_std`: std of the head's kernel init (default 2e-5; 0 = zeros).
"""

from __future__ import annotations

import jax
from flax import nnx

from mimjax.models import heads, vit


class ViTClassifier(nnx.Module):
    def __init__(
        self,
        encoder: vit.ViTConfig,
        head: str,
        num_classes: int,
        *,
        head_init_std: float = heads.DEFAULT_HEAD_INIT_STD,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.head = heads.make_head(head, encoder, num_classes, init_std=head_init_std, rngs=rngs)

    def features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) -> (B, D) pooled features (what the head's Linear sees)."""
        return self.head.pool(self.encoder(images, rng))

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) -> (B, num_classes) float32 logits. `rng` only in training
        (enables drop path); without it the forward pass is deterministic."""
        return self.head(self.encoder(images, rng))


def build_classifier(model_cfg, *, rngs: nnx.Rngs) -> ViTClassifier:
    """From the `model` config section (fields in the module docstring)."""
    num_classes = model_cfg.get("num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"model.num_classes must be a positive integer for a classifier, got {num_classes!r}."
        )
    head_init_std = model_cfg.get("head_init_std", None)
    if head_init_std is None:
        head_init_std = heads.DEFAULT_HEAD_INIT_STD
    return ViTClassifier(
        vit.vit_config_from(model_cfg),
        model_cfg.get("head", "cls"),
        num_classes,
        head_init_std=float(head_init_std),
        rngs=rngs,
    )
