"""Classification heads on top of a ViT encoder's output tokens (B, [1 +] N, D).

Each head pools the tokens into one feature vector per image (`pool`) and maps it
to `num_classes` logits with a Linear computed in float32 (`__call__`):
- `ClsTokenHead` ("cls"): the class token (the encoder's final norm already applied);
- `GapHead` ("gap"): mean over the patch tokens (class token excluded), then a
  LayerNorm (`fc_norm`), as MAE fine-tuning's `global_pool`. Unlike MAE, the
  encoder's own final norm is kept (it was pretrained; dropping it would waste it);
- `MapHead` ("map"): multi-head attention pooling (big_vision's MAPHead): a learned
  probe query attends over all output tokens (class token included), followed by a
  residual LayerNorm + MLP.

The final Linear's kernel is drawn from a truncated normal with std `init_std`
(default 2e-5, MAE fine-tuning's head init: logits start near zero, so the loss
starts at log(num_classes) and the first updates do not wreck the pretrained
features); `init_std=0` gives the all-zero kernel big_vision uses. Biases start at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import vit

DEFAULT_HEAD_INIT_STD = 2e-5


def logits_layer(width: int, num_classes: int, init_std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """The head's final Linear, float32 compute (logits stay f32 under bf16 encoders)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
    if init_std < 0:
        raise ValueError(f"head init_std must be >= 0 (0 = zero init), got {init_std}.")
    kernel_init = (
        nnx.initializers.truncated_normal(init_std)
        if init_std > 0
        else nnx.initializers.zeros_init()
    )
    return nnx.Linear(
        width,
        num_classes,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class _Head(nnx.Module):
    """Pools the tokens into (B, D) features (`pool`), then float32 logits (`fc`).

    A subclass checks the encoder and creates its pooling layers in `_pooling`; `fc` is
    created last, after them, which fixes the order the parameters draw from `rngs`."""

    def __init__(
        self,
        encoder: vit.ViTConfig,
        num_classes: int,
        *,
        init_std: float = DEFAULT_HEAD_INIT_STD,
        rngs: nnx.Rngs,
    ):
        self._pooling(encoder, rngs)
        self.fc = logits_layer(encoder.transformer.width, num_classes, init_std, rngs)

    def _pooling(self, encoder: vit.ViTConfig, rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    def pool(self, tokens: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.fc(self.pool(tokens).astype(jnp.float32))


class ClsTokenHead(_Head):
    """Logits from the class token."""

    def _pooling(self, encoder: vit.ViTConfig, rngs: nnx.Rngs) -> None:
        if not encoder.class_token:
            raise ValueError(
                "head 'cls' needs an encoder with a class token; set "
                "model.class_token=True or use head 'gap' or 'map'."
            )

    def pool(self, tokens: jax.Array) -> jax.Array:
        return tokens[:, 0]


class GapHead(_Head):
    """Logits from the mean patch token (class token excluded), LayerNorm-ed."""

    def _pooling(self, encoder: vit.ViTConfig, rngs: nnx.Rngs) -> None:
        self.num_prefix_tokens = int(encoder.class_token)
        self.fc_norm = nnx.LayerNorm(
            encoder.transformer.width,
            epsilon=encoder.transformer.layer_norm_eps,
            dtype=jnp.float32,
            rngs=rngs,
        )

    def pool(self, tokens: jax.Array) -> jax.Array:
        patches = tokens[:, self.num_prefix_tokens :].astype(jnp.float32)
        return self.fc_norm(patches.mean(axis=1))


class MapHead(_Head):
    """Multi-head attention pooling: a learned probe attends over all tokens."""

    def _pooling(self, encoder: vit.ViTConfig, rngs: nnx.Rngs) -> None:
        cfg = encoder.transformer
        self.cfg = cfg
        width = cfg.width
        xavier = nnx.initializers.xavier_uniform()
        self.probe = nnx.Param(xavier(rngs.params(), (1, 1, width)))
        dense = lambda: nnx.Linear(width, width, dtype=cfg.dtype, kernel_init=xavier, rngs=rngs)
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
        self.norm = vit.layer_norm(width, cfg, rngs)
        self.mlp = vit.Mlp(cfg, rngs=rngs)

    def attend(self, tokens: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, D): one probe query, softmax in f32, permutation-invariant in T."""
        cfg = self.cfg
        b, t, width = tokens.shape
        head_dim = width // cfg.num_heads
        tokens = tokens.astype(cfg.dtype)
        probe = jnp.broadcast_to(self.probe[...].astype(cfg.dtype), (b, 1, width))
        q = self.query(probe).reshape(b, cfg.num_heads, head_dim) * head_dim**-0.5
        k = self.key(tokens).reshape(b, t, cfg.num_heads, head_dim)
        v = self.value(tokens).reshape(b, t, cfg.num_heads, head_dim)
        logits = jnp.einsum("bhd,bthd->bht", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        pooled = jnp.einsum("bht,bthd->bhd", weights, v).reshape(b, width)
        return self.out(pooled)

    def pool(self, tokens: jax.Array) -> jax.Array:
        x = self.attend(tokens)
        return (x + self.mlp(self.norm(x))).astype(jnp.float32)


HEADS = {"cls": ClsTokenHead, "gap": GapHead, "map": MapHead}


def make_head(
    kind: str,
    encoder: vit.ViTConfig,
    num_classes: int,
    *,
    init_std: float = DEFAULT_HEAD_INIT_STD,
    rngs: nnx.Rngs,
) -> nnx.Module:
    if kind not in HEADS:
        raise ValueError(
            f"Unknown head {kind!r}; use one of {sorted(HEADS)} (class token, "
            "global average pooling, attention pooling)."
        )
    return HEADS[kind](encoder, num_classes, init_std=init_std, rngs=rngs)
