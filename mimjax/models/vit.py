"""Vision Transformer encoder (Flax NNX) and the transformer stack the decoders reuse.

Conventions (chosen so checkpoints map 1:1 onto HF transformers / timm ViTs):
- patches are flattened in (row, col, channel) order, as HF ViTMAE's `patchify`;
  the patch embedding is a Linear on those vectors (== a stride-p convolution);
- fixed position embeddings are MAE's 2-D sin-cos table; the class token has a zero
  position embedding (a learned one would be redundant with the learned token);
- pre-norm blocks, LayerNorm eps 1e-6, tanh-approximate GELU unless configured;
- optional drop path (stochastic depth), rate rising linearly over depth from 0 to
  `drop_path_rate` (DeiT / MAE fine-tuning); active only when a forward pass is
  given an `rng` (training), so evaluation and the default rate 0 are deterministic;
- parameters f32, compute in `dtype` (bf16 on accelerators), softmax in f32.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimjax import sharding
from mimjax.models import example_rng

# width, depth, mlp_dim, heads (Dosovitskiy et al. 2021, Table 1; Ti/S from DeiT).
VARIANTS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_variant(variant: str) -> dict[str, int]:
    """'B/16' -> width/depth/mlp_dim/num_heads of ViT-B plus patch_size 16."""
    match = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
    if not match:
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected NAME/PATCH with NAME in "
            f"{sorted(VARIANTS)} and an integer patch size, e.g. 'B/16'.")
    return dict(VARIANTS[match.group(1)], patch_size=int(match.group(2)))


def dtype_from_name(name: str):
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One stack of pre-norm transformer blocks (used by the encoder and the decoders)."""
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    scan: bool = False
    remat: bool = False
    # "xla": explicit einsums, f32 softmax; "fused": jax.nn.dot_product_attention
    attention: str = "xla"
    drop_path_rate: float = 0.0  # last block's stochastic depth; block i gets i/(depth-1) of it

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"Transformer width {self.width} is not divisible by num_heads "
                f"{self.num_heads}; choose a head count that divides the width.")
        if self.attention not in ("xla", "fused"):
            raise ValueError(f"attention must be 'xla' or 'fused', got {self.attention!r}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")

    def drop_path_rates(self) -> np.ndarray:
        """Per-block drop path rates, linearly increasing from 0 (MAE / DeiT schedule)."""
        return np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), patch vectors in (row, col, channel) order."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Inverse of `patchify` for a square grid."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"unpatchify expects a square grid, got {n} patches.")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, g * p, g * p, channels)


def sincos_posemb_2d(width: int, grid_size: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table, (grid_size**2, width), float32.

    Half the channels encode one grid coordinate, half the other, each as
    [sin, cos] of the coordinate times 1 / 10000^(k / (width/4)); identical to
    the table facebookresearch/mae and HF ViTMAE build, so exported models match.
    """
    if width % 4:
        raise ValueError(f"sin-cos position embeddings need width divisible by 4, got {width}.")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # grid_w varies along columns

    def embed_1d(positions):
        omega = np.arange(width // 4, dtype=np.float64) / (width / 4.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE concatenates the column-coordinate half first.
    table = np.concatenate([embed_1d(grid_w), embed_1d(grid_h)], axis=1)
    return table.astype(np.float32)


def recompute_in_backward(fn, *args):
    """`fn(*args)` (a pure function of float array pytrees) whose backward keeps only
    `args` and recomputes fn's intermediates from them. `jax.checkpoint` does not do
    this on XLA:CPU: it drops optimization barriers early, so common-subexpression
    elimination merges the recomputation with the forward and its results are held
    from forward to backward again. Here the recomputation reads `args` plus a zero
    taken from the incoming cotangent (one element times 0, exact for finite values),
    so it can neither be merged with the forward nor run before the backward reaches it."""

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(saved, cotangent):
        zero = jax.tree.leaves(cotangent)[0].reshape(-1)[0] * 0
        saved = jax.tree.map(lambda a: a + zero.astype(a.dtype), saved)
        return jax.vjp(fn, *saved)[1](cotangent)

    call.defvjp(forward, backward)
    return call(*args)


@jax.custom_jvp
def softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis (f32 in, f32 out) whose backward keeps only its
    output: differentiating the three lines below directly kept the logits, the
    broadcast 1/sum and the weights, three (B, H, N, N) arrays per attention layer
    (ViT-B MAE's decoder: 0.6 GB of the step's temporaries)."""
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights * (1.0 / weights.sum(axis=-1, keepdims=True))


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    y = softmax(*primals)
    t = tangents[0]
    return y, y * (t - (y * t).sum(axis=-1, keepdims=True))


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dense = lambda: nnx.Linear(cfg.width, cfg.width, dtype=cfg.dtype,
                                   kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B, N), optional: 1/True for tokens that may be attended to (keys);
        0 for padding. None (the default) attends to every token."""
        cfg = self.cfg
        b, n, _ = x.shape
        head_dim = cfg.width // cfg.num_heads
        split = lambda t: t.reshape(b, n, cfg.num_heads, head_dim)
        if mask is not None:
            mask = mask.astype(bool)[:, None, None, :]  # (B, 1, 1, N): per key, all heads
        if cfg.attention == "fused":
            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            y = jax.nn.dot_product_attention(q, k, v, mask=mask)
            return self.out(y.reshape(b, n, cfg.width))
        # Heads-major layout and q scaled before QK^T: on XLA:CPU the (b, n, h, d)
        # einsums picked a batched-matmul layout ~4x slower (profiled on ViT-B MAE).
        heads_first = lambda t: jnp.transpose(split(t), (0, 2, 1, 3))
        q = heads_first(self.query(x) * head_dim**-0.5)
        k, v = heads_first(self.key(x)), heads_first(self.value(x))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = softmax(logits).astype(v.dtype)
        y = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        return self.out(jnp.transpose(y, (0, 2, 1, 3)).reshape(b, n, cfg.width))


class Mlp(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.xavier_uniform()
        bias_init = nnx.initializers.normal(1e-6)
        self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, dtype=cfg.dtype, kernel_init=init,
                              bias_init=bias_init, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, dtype=cfg.dtype, kernel_init=init,
                              bias_init=bias_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # GELU's output and its tanh (two (B, N, mlp_dim) arrays per block) are
        # recomputed in the backward from fc1's output instead of kept from the forward.
        graphdef, fc2 = nnx.split(self.fc2)
        approximate = self.cfg.gelu_approximate

        def activate(h, fc2):
            return nnx.merge(graphdef, fc2)(jax.nn.gelu(h, approximate=approximate))

        return recompute_in_backward(activate, self.fc1(x), fc2)


def drop_path(branch: jax.Array, rng: jax.Array, rate: jax.Array) -> jax.Array:
    """Stochastic depth: drops a residual branch per example with probability `rate`
    and scales the kept ones by 1 / (1 - rate) so the expected output is unchanged.
    `rng` is one key, or one key per example (B, 2; see models.example_rng)."""
    keep_prob = 1.0 - rate
    if example_rng.is_per_example(rng):
        keep = example_rng.bernoulli(rng, keep_prob)
    else:
        keep = jax.random.bernoulli(rng, keep_prob, (branch.shape[0],))
    keep = keep.reshape((branch.shape[0],) + (1,) * (branch.ndim - 1))
    scaled = branch * jnp.asarray(1.0 / keep_prob, branch.dtype)
    return jnp.where(keep, scaled, jnp.zeros_like(branch))


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (same parameters, same forward) whose backward recomputes the
    normalisation from its input. Differentiated directly it kept the centred input,
    the broadcast 1/std and the broadcast scale, three (B, N, D) arrays per norm,
    where its input alone suffices."""

    def __call__(self, x, *, mask=None):
        if mask is not None:
            return super().__call__(x, mask=mask)
        graphdef, state = nnx.split(self)
        return recompute_in_backward(
            lambda x, state: nnx.LayerNorm.__call__(nnx.merge(graphdef, state), x), x, state)


def layer_norm(width: int, cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg.width, cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg.width, cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 drop_rate: jax.Array | float = 0.0, mask: jax.Array | None = None) -> jax.Array:
        """`rng` given: each residual branch is dropped per example with `drop_rate`.
        `mask` (B, N): keys attention may use (see `Attention`)."""
        x = sharding.constrain_batch(x)
        if rng is None:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        attn_rng, mlp_rng = example_rng.split(rng, 2)
        x = x + drop_path(self.attn(self.norm1(x), mask), attn_rng, drop_rate)
        return x + drop_path(self.mlp(self.norm2(x)), mlp_rng, drop_rate)


class Transformer(nnx.Module):
    """`depth` blocks, either unrolled (`blocks` is a list) or stacked on a leading
    layer axis and run with `nnx.scan` (compiles once per stack, not once per layer)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.scan:
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stack(rngs):
                return Block(cfg, rngs=rngs)
            self.blocks = make_stack(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """`rng` (training only) enables drop path when `cfg.drop_path_rate` > 0.
        `mask` (B, N), optional: 1 for real tokens, 0 for padding that no token may
        attend to (text); None attends to every token."""
        return self._apply(x, rng, mask)

    def with_hidden_states(self, x: jax.Array, taps, rng: jax.Array | None = None,
                           mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """`__call__`'s output and the outputs of the blocks numbered in `taps` (1-based:
        tap t is the residual stream after t blocks, as UNETR's z_t), in `taps`' order.
        Scanned stacks return every layer's output from the scan and pick the taps."""
        taps, depth = tuple(taps), self.cfg.depth
        if not all(isinstance(t, int | np.integer) and 1 <= t <= depth for t in taps):
            raise ValueError(f"transformer taps must be block numbers in 1..{depth} "
                             f"(1-based), got {list(taps)}.")
        out, hidden = self._apply(x, rng, mask, collect=True)
        return out, [hidden[t - 1] for t in taps]

    def _apply(self, x, rng, mask, collect=False):
        cfg = self.cfg
        if rng is None or cfg.drop_path_rate == 0.0:
            return self._run(x, lambda block, h: block(h, mask=mask), collect=collect)
        # One key and one rate per block, scanned alongside the stacked layers.
        per_block = (example_rng.split(rng, cfg.depth), jnp.asarray(cfg.drop_path_rates()))
        return self._run(x, lambda block, h, key, rate: block(h, key, rate, mask=mask),
                         per_block, collect=collect)

    def _run(self, x, apply, per_block=(), collect=False):
        """The stack's output; with `collect`, also every block's output (a list, or
        an array with a leading layer axis when scanned)."""
        if self.cfg.remat:
            apply = nnx.remat(apply)
        if self.cfg.scan:
            in_axes = (nnx.Carry, 0) + (0,) * len(per_block)
            if collect:
                @nnx.scan(in_axes=in_axes, out_axes=(nnx.Carry, 0))
                def run_collecting(h, block, *block_args):
                    h = apply(block, h, *block_args)
                    return h, h
                return run_collecting(x, self.blocks, *per_block)

            @nnx.scan(in_axes=in_axes, out_axes=nnx.Carry)
            def run(h, block, *block_args):
                return apply(block, h, *block_args)
            return run(x, self.blocks, *per_block)
        hidden = []
        for i, block in enumerate(self.blocks):
            x = apply(block, x, *(arg[i] for arg in per_block))
            hidden.append(x)
        return (x, hidden) if collect else x


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    transformer: TransformerConfig
    patch_size: int
    image_size: int
    channels: int = 1  # 1 gray, 3 RGB, or any other count (4 for BraTS' MRI sequences)
    posemb: str = "sincos2d"  # or "learn"
    class_token: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}.")
        if self.posemb not in ("sincos2d", "learn"):
            raise ValueError(f"posemb must be 'sincos2d' or 'learn', got {self.posemb!r}.")
        if not isinstance(self.channels, int | np.integer) or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}.")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def vit_config_from(model_cfg) -> ViTConfig:
    """Builds a ViTConfig from a config section with `variant` ('B/16') and overrides."""
    spec = parse_variant(model_cfg.variant)
    def get(key, default):
        if hasattr(model_cfg, "get"):
            return model_cfg.get(key, default)
        return getattr(model_cfg, key, default)
    transformer = TransformerConfig(
        width=get("width", None) or spec["width"],
        depth=get("depth", None) or spec["depth"],
        num_heads=get("num_heads", None) or spec["num_heads"],
        mlp_dim=get("mlp_dim", None) or spec["mlp_dim"],
        dtype=dtype_from_name(get("dtype", "float32")),
        layer_norm_eps=get("layer_norm_eps", 1e-6),
        gelu_approximate=get("gelu_approximate", True),
        scan=get("scan", False),
        remat=get("remat", False),
        attention=get("attention", "xla"),
        drop_path_rate=get("drop_path_rate", 0.0) or 0.0,
    )
    return ViTConfig(transformer=transformer, patch_size=spec["patch_size"],
                     image_size=model_cfg.image_size, channels=get("channels", 1),
                     posemb=get("posemb", "sincos2d"), class_token=get("class_token", True))


class ViTEncoder(nnx.Module):
    """Patch embedding + position embedding (+ class token) + transformer + final norm.

    `__call__(images)` encodes every patch; `encode_visible(images, keep_ids)` encodes
    only the patches listed in `keep_ids` (B, K) — the MAE encoder path;
    `encode_with_taps(images, taps)` also returns intermediate blocks' outputs (the
    dense decoders' skips). Each takes an optional `rng`: given (training), drop path
    is active (if configured).
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tcfg = cfg.transformer
        patch_dim = cfg.patch_size**2 * cfg.channels
        # Xavier on the flattened patch kernel, as MAE initialises its conv projection.
        self.patch_embed = nnx.Linear(patch_dim, tcfg.width, dtype=tcfg.dtype,
                                      kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        if cfg.posemb == "learn":
            self.pos_embedding = nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(), (1, cfg.num_patches, tcfg.width)))
        if cfg.class_token:
            self.cls_token = nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(), (1, 1, tcfg.width)))
        self.transformer = Transformer(tcfg, rngs=rngs)
        self.norm = layer_norm(tcfg.width, tcfg, rngs)

    def position_embeddings(self) -> jax.Array:
        if self.cfg.posemb == "learn":
            return self.pos_embedding[...]
        return jnp.asarray(sincos_posemb_2d(self.cfg.transformer.width, self.cfg.grid_size))[None]

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, N, D) patch tokens with position embeddings added."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(
                f"ViT expects images of shape (B, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.channels}), got {tuple(images.shape)}.")
        tokens = self.patch_embed(patchify(images.astype(cfg.transformer.dtype), cfg.patch_size))
        return tokens + self.position_embeddings().astype(tokens.dtype)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the output (the class token, if any)."""
        return int(self.cfg.class_token)

    def _with_class_token(self, tokens: jax.Array) -> jax.Array:
        if not self.cfg.class_token:
            return tokens
        cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype),
                               (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def encode_tokens(self, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Prepends the class token (if any), runs the transformer and the final norm."""
        return self.norm(self.transformer(self._with_class_token(tokens), rng))

    def encode_with_taps(self, images: jax.Array, taps,
                         rng: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """(B, H, W, C) -> (`__call__`'s tokens, [output of block t for t in `taps`]).

        Taps are 1-based block numbers; each is the residual stream after that block,
        (B, [1 +] N, D), before the final norm (UNETR reads its skips this way)."""
        tokens = self._with_class_token(self.embed_patches(images))
        out, hidden = self.transformer.with_hidden_states(tokens, taps, rng)
        return self.norm(out), hidden

    def encode_visible(self, images: jax.Array, keep_ids: jax.Array,
                       rng: jax.Array | None = None) -> jax.Array:
        tokens = self.embed_patches(images)
        visible = jnp.take_along_axis(tokens, keep_ids[..., None], axis=1)
        return self.encode_tokens(visible, rng)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) -> (B, [1 +] N, D): every patch, no masking."""
        return self.encode_tokens(self.embed_patches(images), rng)
