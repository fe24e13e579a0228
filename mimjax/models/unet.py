"""The 2-D U-Net of the subclass-segmentation paper (Dai, Lei, Zhang, MICCAI 2023), as a
dense feature extractor: images (B, S, S, C) -> features (B, S, S, base_channels).

Wiring (the reference code's networks/singlybranchedunet.py, `UNetSingleBranchNetwork`):
- 5 levels, `base_channels` (16) doubling per level: 16, 32, 64, 128, 256;
- each level a `DoubleConv`: 3x3 conv -> batch norm -> ReLU, twice (convs with biases);
- down: 2x2 max pooling; up: bilinear x2 (align_corners=False), then the skip
  concatenated *before* the upsampled features, then a `DoubleConv`;
- dropout 0.3 on the center block's output and on the last decoder block's output
  (the head's input), only when the forward pass gets an `rng`.

`last_norm=False` ends the last decoder block with its second convolution (no norm,
no ReLU). The reference does this when Separate Normalization is on, so that each of
the head's two branches normalises the raw features with its own batch norm; the
segmenter follows it (`last_norm = not separate_norm`). Its April 2023 version
dropped that norm and ReLU in every block (a global flag); its December 2023
version only in the last decoder block, which is what this module does.

Initialisation: He-normal convolutions and zero biases, as the reference's
`init_weights(model, "kaiming")` intends (its class-name match misses the layers,
which then keep PyTorch's default init); batch-norm scales start at 1 (it intends
N(1, 0.02)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax import sharding
from mimjax.models import conv_blocks, example_rng

LEVELS = 5
DROPOUT_RATE = 0.3


class DoubleConv(nnx.Module):
    """conv 3x3 -> norm -> ReLU -> conv 3x3 [-> norm -> ReLU]."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, dtype,
                 last_norm: bool = True, rngs: nnx.Rngs):
        self.conv1 = conv_blocks.conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm1 = conv_blocks.make_norm(norm, out_channels, dtype=dtype, rngs=rngs)
        self.conv2 = conv_blocks.conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = (conv_blocks.make_norm(norm, out_channels, dtype=dtype, rngs=rngs)
                      if last_norm else None)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        x = jax.nn.relu(conv_blocks.normalize(self.norm1, self.conv1(x), training))
        x = self.conv2(x)
        if self.norm2 is None:
            return x
        return jax.nn.relu(conv_blocks.normalize(self.norm2, x, training))


class UNet(nnx.Module):
    """`__call__(images, rng=None)` -> (B, S, S, base_channels) features.

    `rng` given (training): dropout, and batch norm with batch statistics (updating
    its running averages); without it the pass is deterministic and uses the running
    averages."""

    def __init__(self, in_channels: int, *, base_channels: int = 16,
                 dropout_rate: float = DROPOUT_RATE, norm: str = "batch", dtype=jnp.float32,
                 last_norm: bool = True, rngs: nnx.Rngs):
        widths = [base_channels * 2**level for level in range(LEVELS)]
        self.dtype = dtype
        self.dropout_rate = dropout_rate
        self.out_channels = widths[0]
        block = lambda cin, cout, **kw: DoubleConv(cin, cout, norm=norm, dtype=dtype,
                                                   rngs=rngs, **kw)
        # Encoder: levels 0..3 keep their output as a skip, then pool.
        self.down_blocks = nnx.List(
            [block(cin, cout) for cin, cout in zip([in_channels] + widths[:-2], widths[:-1])])
        self.center = block(widths[-2], widths[-1])
        # Decoder, deepest first: upsampled level i+1 features + level i skip -> level i.
        self.up_blocks = nnx.List([
            block(widths[level + 1] + widths[level], widths[level],
                  last_norm=last_norm or level > 0)
            for level in reversed(range(LEVELS - 1))])

    @staticmethod
    def check_image_size(image_size: int) -> None:
        factor = 2 ** (LEVELS - 1)
        if image_size % factor:
            raise ValueError(f"model.image_size {image_size} must be divisible by {factor} for "
                             f"the {LEVELS}-level U-Net (it pools {LEVELS - 1} times).")

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"U-Net expects images (B, H, W, C), got shape {images.shape}.")
        self.check_image_size(images.shape[1])
        training = rng is not None
        x = sharding.constrain_batch(images.astype(self.dtype))
        skips = []
        for block in self.down_blocks:
            x = block(x, training)
            skips.append(x)
            x = conv_blocks.max_pool(x)
        x = self.center(x, training)
        if training:
            center_rng, out_rng = example_rng.split(rng, 2)
            x = conv_blocks.dropout(x, self.dropout_rate, center_rng)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            x = block(jnp.concatenate([skip, conv_blocks.upsample_bilinear(x)], axis=-1),
                      training)
        if training:
            x = conv_blocks.dropout(x, self.dropout_rate, out_rng)
        return x
