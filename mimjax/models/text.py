"""Text transformer encoder (BERT-style, bidirectional) and masked-language-model head.

The encoder embeds token ids (learned token and position tables, LayerNorm), runs
the same pre-norm `vit.Transformer` stack as the image encoder with a key padding
mask (padding is never attended to), and ends with a LayerNorm. Pre-norm blocks
differ from BERT's post-norm ones; they train more stably from scratch, which is how
the text tower is trained here.

The MLM head is BERT's: dense -> GELU -> LayerNorm -> logits over the vocabulary
with the token embedding table as output weights (tied) plus a bias. Logits are f32.

Token ids follow the project's tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
[MASK]=4, regular tokens from 5; every sequence starts with [CLS].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import vit

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL_TOKENS = 5  # ids below this are special tokens


@dataclasses.dataclass(frozen=True)
class TextConfig:
    transformer: vit.TransformerConfig
    vocab_size: int
    max_length: int  # longest token sequence (size of the position table)

    def __post_init__(self):
        if self.vocab_size <= NUM_SPECIAL_TOKENS:
            raise ValueError(
                f"text vocab_size {self.vocab_size} must exceed the {NUM_SPECIAL_TOKENS} "
                "special tokens; set model.text.vocab_size to the tokenizer's vocabulary size."
            )
        if self.max_length < 2:
            raise ValueError(f"text max_length must be at least 2, got {self.max_length}.")


def text_config_from(text_cfg, image: vit.TransformerConfig) -> TextConfig:
    """`model.text` section (vocab_size, max_length, width, depth, num_heads, mlp_dim)
    -> TextConfig; dtype, norm eps, GELU form, scan, remat and attention follow the
    image encoder's."""
    get = text_cfg.get
    for key in ("vocab_size", "max_length", "width", "depth", "num_heads"):
        if get(key, None) is None:
            raise ValueError(f"model.text.{key} is not set; the text encoder needs it.")
    transformer = vit.TransformerConfig(
        width=text_cfg.width,
        depth=text_cfg.depth,
        num_heads=text_cfg.num_heads,
        mlp_dim=get("mlp_dim", None) or 4 * text_cfg.width,
        dtype=image.dtype,
        layer_norm_eps=image.layer_norm_eps,
        gelu_approximate=image.gelu_approximate,
        scan=image.scan,
        remat=image.remat,
        attention=image.attention,
        drop_path_rate=get("drop_path_rate", 0.0) or 0.0,
    )
    return TextConfig(
        transformer=transformer,
        vocab_size=int(text_cfg.vocab_size),
        max_length=int(text_cfg.max_length),
    )


class TextEncoder(nnx.Module):
    """(B, L) token ids + (B, L) mask (1 = real token) -> (B, L, width) token features."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tcfg = cfg.transformer
        self.token_embed = nnx.Embed(
            cfg.vocab_size,
            tcfg.width,
            dtype=tcfg.dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, cfg.max_length, tcfg.width))
        )
        self.embed_norm = vit.layer_norm(tcfg.width, tcfg, rngs)
        self.transformer = vit.Transformer(tcfg, rngs=rngs)
        self.norm = vit.layer_norm(tcfg.width, tcfg, rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"text ids and mask must both be (B, L); got {tuple(ids.shape)} "
                f"and {tuple(mask.shape)}."
            )
        length = ids.shape[1]
        if length > cfg.max_length:
            raise ValueError(
                f"text has {length} tokens but model.text.max_length is "
                f"{cfg.max_length}; raise max_length or truncate the reports."
            )
        tokens = self.token_embed(ids)
        tokens = tokens + self.pos_embedding[:, :length].astype(tokens.dtype)
        tokens = self.embed_norm(tokens)
        return self.norm(self.transformer(tokens, rng, mask=mask))

    @property
    def embedding_table(self) -> jax.Array:
        return self.token_embed.embedding[...]


class MLMHead(nnx.Module):
    """Token features -> f32 vocabulary logits, output weights tied to the embedding."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        tcfg = cfg.transformer
        self.gelu_approximate = tcfg.gelu_approximate
        self.dense = nnx.Linear(
            tcfg.width,
            tcfg.width,
            dtype=tcfg.dtype,
            kernel_init=nnx.initializers.xavier_uniform(),
            rngs=rngs,
        )
        self.norm = vit.layer_norm(tcfg.width, tcfg, rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

    def __call__(self, hidden: jax.Array, embedding_table: jax.Array) -> jax.Array:
        """hidden (..., width), embedding_table (vocab, width) -> (..., vocab) f32."""
        h = self.norm(jax.nn.gelu(self.dense(hidden), approximate=self.gelu_approximate))
        logits = jnp.einsum(
            "...d,vd->...v", h, embedding_table.astype(h.dtype), preferred_element_type=jnp.float32
        )
        return logits + self.bias[...]
