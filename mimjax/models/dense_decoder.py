"""Dense decoders on a ViT encoder: patch-token grids -> a full-resolution feature map
(B, S, S, widths[-1]) that a head turns into per-pixel outputs (segmentation logits,
landmark heatmaps). Both decoders take `(images, grids, training)`: the raw images
and the encoder's patch tokens reshaped to (B, S/p, S/p, D), one grid per entry of
the decoder's `taps` (intermediate blocks, shallow to deep) and the final (normed)
output last. The patch size p must be a power of two; with n = log2(p) stages,
`widths[j]` is the width at resolution S / 2**(n - 1 - j) (coarse to fine, e.g.
S/8, S/4, S/2, S for p = 16).

- `ProgressiveDecoder` ("progressive"): the last layer's tokens upsampled stage by
  stage (2x2 stride-2 transposed conv, norm, GELU, then a 3x3 conv, norm, GELU),
  channels halving. A small conv stem on the raw image gives features at full and
  half resolution, concatenated before those stages' 3x3 convs: structures thinner
  than a patch (the myocardium is a few pixels wide) need pixel-level evidence that
  16x16 patch tokens have averaged away.
- `UnetrDecoder` ("unetr"): UNETR (Hatamizadeh et al. 2022; MONAI's
  networks/nets/unetr.py) in 2-D, generalised from patch 16 to any power of two:
  the outputs of n - 1 intermediate blocks are each projected by a chain of
  transposed convs (and residual conv blocks) to their resolution, the final tokens
  are upsampled block by block, concatenating one skip per resolution (the full
  resolution's is a residual conv block on the image). MONAI's blocks: transposed
  convs and 3x3 convs without biases, residual blocks conv-norm-LeakyReLU(0.01)-conv-
  norm + (1x1 conv-norm if the width changes), then LeakyReLU; "upsampled, skip"
  concatenation order. Tested against MONAI's blocks with the same weights.

Both end with a norm and an activation. A model that pairs a ViT with a dense
decoder reads its decoder fields with `decoder_settings(model_cfg, encoder)`, builds
the decoder with `make_decoder` and runs both with `vit_features` (the segmenter
does; a heatmap model can do the same with another head).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax import sharding
from mimjax.models import conv_blocks, vit

DECODERS = ("progressive", "unetr")
# Default width at full resolution, doubled per coarser stage: 16 as the paper's U-Net
# and MONAI's UNETR (feature_size); at full resolution the convs dominate the cost.
FINEST_WIDTH = 16


def num_stages(patch_size: int) -> int:
    """log2(patch size): the x2 upsampling stages from the patch grid to the pixels."""
    n = int(math.log2(patch_size)) if patch_size > 0 else 0
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(
            f"dense decoders need a power-of-two patch size (8, 16, 32), got {patch_size}; "
            "pick a model.variant with one, e.g. 'B/16'.")
    return n


def stride_stages(patch_size: int, out_stride: int) -> int:
    """log2(out_stride): the finest x2 stages a decoder with that output stride leaves
    out (1: none, full resolution)."""
    drop = int(math.log2(out_stride)) if out_stride > 0 else -1
    if drop < 0 or 2**drop != out_stride or out_stride >= patch_size:
        raise ValueError(
            f"model.heatmap_stride must be a power of two below the patch size {patch_size} "
            f"(1 = full resolution, 2, 4, ...), got {out_stride}.")
    return drop


def default_widths(patch_size: int, out_stride: int = 1) -> tuple[int, ...]:
    n = num_stages(patch_size)
    widths = tuple(FINEST_WIDTH * 2 ** (n - 1 - j) for j in range(n))
    return widths[:n - stride_stages(patch_size, out_stride)]


def check_widths(widths, patch_size: int, out_stride: int = 1) -> tuple[int, ...]:
    n = num_stages(patch_size) - stride_stages(patch_size, out_stride)
    widths = tuple(widths)
    if len(widths) != n or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(
            f"model.decoder_widths must be {n} positive integers for patch size {patch_size}"
            f"{f' and output stride {out_stride}' if out_stride > 1 else ''} (one per x2 "
            f"stage, coarse to fine, e.g. {default_widths(patch_size, out_stride)}), "
            f"got {list(widths)}.")
    return widths


def default_taps(depth: int, patch_size: int) -> tuple[int, ...]:
    """n evenly spaced blocks ending with the last: (3, 6, 9, 12) for 12 blocks, p = 16."""
    n = num_stages(patch_size)
    return tuple(max(1, round(depth * (k + 1) / n)) for k in range(n))


def check_taps(taps, depth: int, patch_size: int) -> tuple[int, ...]:
    """UNETR's taps: n = log2(p) block numbers (1-based), non-decreasing, the last one
    the last block (its normed output is the bottleneck; blocks after it would be
    computed for nothing)."""
    n = num_stages(patch_size)
    taps = tuple(taps)
    ok = (len(taps) == n and all(isinstance(t, int) and 1 <= t <= depth for t in taps)
          and list(taps) == sorted(taps) and taps[-1] == depth)
    if not ok:
        raise ValueError(
            f"model.taps must be {n} block numbers (1-based, non-decreasing, in 1..{depth}, "
            f"the last = depth {depth}) for patch size {patch_size}, e.g. "
            f"{default_taps(depth, patch_size)}; got {list(taps)}.")
    return taps


class ConvNormAct(nnx.Module):
    """conv -> norm -> activation."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str,
                 dtype, rngs: nnx.Rngs):
        self.conv = conv_blocks.conv(in_channels, out_channels, 3, stride=stride, dtype=dtype,
                                     rngs=rngs)
        self.norm = conv_blocks.make_norm(norm, out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        return jax.nn.gelu(conv_blocks.normalize(self.norm, self.conv(x), training))


class UpStage(nnx.Module):
    """x2 transposed conv -> norm -> GELU, [concat skip], 3x3 conv -> norm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, *, norm: str,
                 dtype, rngs: nnx.Rngs):
        self.up = conv_blocks.up_conv(in_channels, out_channels, dtype=dtype, rngs=rngs)
        self.up_norm = conv_blocks.make_norm(norm, out_channels, dtype=dtype, rngs=rngs)
        self.fuse = ConvNormAct(out_channels + skip_channels, out_channels, norm=norm,
                                dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array | None, training: bool) -> jax.Array:
        x = jax.nn.gelu(conv_blocks.normalize(self.up_norm, self.up(x), training))
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return self.fuse(x, training)


class ProgressiveDecoder(nnx.Module):
    """See the module docstring. `out_stride` > 1 stops the upsampling at S / out_stride
    (log2(out_stride) fewer stages): a landmark model then reads its heatmaps from a
    coarser, wider map (mimjax.models.heatmap)."""

    taps: tuple[int, ...] = ()  # the final tokens only

    def __init__(self, *, token_width: int, image_channels: int, patch_size: int,
                 widths, norm: str, dtype, rngs: nnx.Rngs, out_stride: int = 1):
        drop = stride_stages(patch_size, out_stride)
        widths = check_widths(widths, patch_size, out_stride)
        n = len(widths)
        self.dtype = dtype
        self.out_channels = widths[-1]
        # Stem: a conv at full resolution, then one at half (stride 2). Each feeds the
        # stage at its resolution as a skip, when the decoder reaches it.
        full_width = widths[-1] if drop == 0 else FINEST_WIDTH
        half_width = widths[-2] if drop == 0 and n >= 2 else widths[-1]
        self.stem_full = (ConvNormAct(image_channels, full_width, norm=norm, dtype=dtype,
                                      rngs=rngs) if drop <= 1 else None)
        self.stem_half = (ConvNormAct(full_width, half_width, stride=2, norm=norm, dtype=dtype,
                                      rngs=rngs) if drop <= 1 and n >= 2 - drop else None)
        skip_channels = [0] * n
        if drop == 0:
            skip_channels[-1] = full_width
        if self.stem_half is not None:
            skip_channels[-2 + drop] = half_width
        self.stages = nnx.List([
            UpStage(cin, cout, skip, norm=norm, dtype=dtype, rngs=rngs)
            for cin, cout, skip in zip((token_width,) + widths[:-1], widths, skip_channels)])
        self._drop = drop

    def __call__(self, images: jax.Array, grids: list[jax.Array], training: bool) -> jax.Array:
        skips = [None] * len(self.stages)
        if self.stem_full is not None:
            full = self.stem_full(sharding.constrain_batch(images.astype(self.dtype)), training)
            if self._drop == 0:
                skips[-1] = full
            if self.stem_half is not None:
                skips[-2 + self._drop] = self.stem_half(full, training)
        x = sharding.constrain_batch(grids[-1].astype(self.dtype))
        for stage, skip in zip(self.stages, skips):
            x = stage(x, skip, training)
        return x


def leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, negative_slope=0.01)  # MONAI's default activation


class ResBlock(nnx.Module):
    """MONAI's UnetResBlock (stride 1): conv-norm-lrelu-conv-norm, plus the input
    (through a 1x1 conv and norm when the width changes), then lrelu."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, dtype,
                 rngs: nnx.Rngs):
        conv = lambda cin, k: conv_blocks.conv(cin, out_channels, k, use_bias=False, dtype=dtype,
                                               rngs=rngs)
        make_norm = lambda: conv_blocks.make_norm(norm, out_channels, dtype=dtype, rngs=rngs)
        self.conv1, self.norm1 = conv(in_channels, 3), make_norm()
        self.conv2, self.norm2 = conv(out_channels, 3), make_norm()
        if in_channels != out_channels:
            self.proj, self.proj_norm = conv(in_channels, 1), make_norm()
        else:
            self.proj, self.proj_norm = None, None

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        residual = x
        x = leaky_relu(conv_blocks.normalize(self.norm1, self.conv1(x), training))
        x = conv_blocks.normalize(self.norm2, self.conv2(x), training)
        if self.proj is not None:
            residual = conv_blocks.normalize(self.proj_norm, self.proj(residual), training)
        return leaky_relu(x + residual)


class ProjectUp(nnx.Module):
    """MONAI's UnetrPrUpBlock (conv_block, res_block): a transposed conv from the token
    width, then `extra` x (transposed conv, ResBlock), `extra` + 1 doublings in all."""

    def __init__(self, in_channels: int, out_channels: int, extra: int, *, norm: str, dtype,
                 rngs: nnx.Rngs):
        up = lambda cin: conv_blocks.up_conv(cin, out_channels, use_bias=False, dtype=dtype,
                                             rngs=rngs)
        self.first = up(in_channels)
        self.ups = nnx.List([up(out_channels) for _ in range(extra)])
        self.blocks = nnx.List([ResBlock(out_channels, out_channels, norm=norm, dtype=dtype,
                                         rngs=rngs) for _ in range(extra)])

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        x = self.first(x)
        for up, block in zip(self.ups, self.blocks):
            x = block(up(x), training)
        return x


class UpBlock(nnx.Module):
    """MONAI's UnetrUpBlock (res_block): transposed conv, concat [upsampled, skip], ResBlock."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, dtype,
                 rngs: nnx.Rngs):
        self.up = conv_blocks.up_conv(in_channels, out_channels, use_bias=False, dtype=dtype,
                                      rngs=rngs)
        self.block = ResBlock(2 * out_channels, out_channels, norm=norm, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array, training: bool) -> jax.Array:
        return self.block(jnp.concatenate([self.up(x), skip], axis=-1), training)


class UnetrDecoder(nnx.Module):
    def __init__(self, *, token_width: int, image_channels: int, patch_size: int, widths,
                 taps, norm: str, dtype, rngs: nnx.Rngs):
        """`taps`: all n block numbers (see `check_taps`); the decoder reads the first
        n - 1 as intermediate grids (its `taps`) and the final output as the last."""
        n = num_stages(patch_size)
        widths = check_widths(widths, patch_size)
        self.taps = tuple(taps)[:-1]
        self.dtype = dtype
        self.out_channels = widths[-1]
        self.image_block = ResBlock(image_channels, widths[-1], norm=norm, dtype=dtype,
                                    rngs=rngs)
        # Tap k (0-based, shallow to deep) is the skip at widths[n - 2 - k]: the
        # shallowest tap reaches half resolution, the deepest 2x the patch grid.
        self.skip_blocks = nnx.List([
            ProjectUp(token_width, widths[n - 2 - k], n - 2 - k, norm=norm, dtype=dtype,
                      rngs=rngs) for k in range(n - 1)])
        self.up_blocks = nnx.List([
            UpBlock(cin, cout, norm=norm, dtype=dtype, rngs=rngs)
            for cin, cout in zip((token_width,) + widths[:-1], widths)])

    def __call__(self, images: jax.Array, grids: list[jax.Array], training: bool) -> jax.Array:
        n = len(self.up_blocks)
        grids = [sharding.constrain_batch(g.astype(self.dtype)) for g in grids]
        # skips[j]: the skip at widths[j], coarse to fine; the image's is the finest.
        skips = [self.skip_blocks[n - 2 - j](grids[n - 2 - j], training) for j in range(n - 1)]
        skips.append(self.image_block(images.astype(self.dtype), training))
        x = grids[-1]
        for block, skip in zip(self.up_blocks, skips):
            x = block(x, skip, training)
        return x


# --------------------------------------------------------------------------- with a ViT
def decoder_settings(model_cfg, encoder: vit.ViTConfig, out_stride: int = 1) -> dict:
    """The decoder fields of `config.model` (`decoder`, `taps`, `decoder_widths`,
    `norm`), checked and with their defaults, as `make_decoder`'s keyword arguments;
    `out_stride` > 1 (the progressive decoder only) stops at S / out_stride."""
    decoder = model_cfg.get("decoder", "progressive")
    if decoder not in DECODERS:
        raise ValueError(f"model.decoder must be one of {list(DECODERS)}, got {decoder!r}.")
    patch, depth = encoder.patch_size, encoder.transformer.depth
    if out_stride != 1 and decoder != "progressive":
        raise ValueError(f"an output stride of {out_stride} needs model.decoder='progressive', "
                         f"got {decoder!r}; or set the stride to 1.")
    widths = model_cfg.get("decoder_widths", None)
    widths = (default_widths(patch, out_stride) if widths is None
              else check_widths(widths, patch, out_stride))
    taps = model_cfg.get("taps", None)
    if decoder == "unetr":
        taps = default_taps(depth, patch) if taps is None else check_taps(taps, depth, patch)
    elif taps is not None:
        raise ValueError("model.taps is read only by model.decoder='unetr'; set it to None for "
                         f"the {decoder!r} decoder.")
    norm = conv_blocks.check_norm(model_cfg.get("norm", "batch"))
    settings = dict(decoder=decoder, taps=taps, widths=widths, norm=norm)
    if out_stride != 1:
        settings["out_stride"] = out_stride
    return settings


def make_decoder(encoder: vit.ViTConfig, *, decoder: str, taps, widths, norm: str,
                 rngs: nnx.Rngs, out_stride: int = 1) -> nnx.Module:
    common = dict(token_width=encoder.transformer.width, image_channels=encoder.channels,
                  patch_size=encoder.patch_size, widths=widths, norm=norm,
                  dtype=encoder.transformer.dtype, rngs=rngs)
    if decoder == "progressive":
        return ProgressiveDecoder(**common, out_stride=out_stride)
    return UnetrDecoder(**common, taps=taps)


def vit_features(encoder: vit.ViTEncoder, decoder: nnx.Module, images: jax.Array,
                 rng: jax.Array | None = None) -> jax.Array:
    """(B, S, S, C) -> (B, S, S, widths[-1]): the encoder over all patches (with the
    decoder's taps), its patch tokens as grids (class token dropped), the decoder."""
    if decoder.taps:
        tokens, hidden = encoder.encode_with_taps(images, decoder.taps, rng)
    else:
        tokens, hidden = encoder(images, rng), []
    grid, prefix = encoder.cfg.grid_size, encoder.num_prefix_tokens
    # Patch tokens are in row-major grid order (vit.patchify): reshape to the grid.
    to_grid = lambda t: t[:, prefix:].reshape(t.shape[0], grid, grid, t.shape[-1])
    grids = [to_grid(t) for t in hidden] + [to_grid(tokens)]
    return decoder(images, grids, training=rng is not None)
