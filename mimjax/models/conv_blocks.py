"""Convolutional building blocks of the dense models (segmentation, heatmaps), NHWC.

- `make_norm(kind, channels, ...)` and `normalize(layer, x, training)`:
  "batch" is `nnx.BatchNorm` with PyTorch's defaults (momentum 0.1, i.e. flax's 0.9,
  eps 1e-5); its running statistics are `nnx.BatchStat` model state, and it uses
  batch statistics (and updates the running averages) only when `training`;
  otherwise the running averages. Unlike PyTorch, the running variance averages the
  biased batch variance (flax's choice; the difference is a factor n / (n - 1) with
  n = batch x height x width values per channel). "instance" is a per-channel
  GroupNorm (one group per channel, MONAI's UNETR default); "layer" a LayerNorm over
  the channels. Neither keeps state.
- `conv(...)`: He-normal (fan-in) kernels and zero biases, the initialisation the
  subclass-segmentation reference code asks for (`init_weights(..., "kaiming")`).
- `dropout(x, rate, rng)`: inverted dropout; the caller applies it only in training.
- `upsample_bilinear(x)`: x2, PyTorch's `nn.Upsample(mode="bilinear")` with
  align_corners=False (half-pixel centres, edges clamped), tested against torch.
- `max_pool(x)`: 2x2, stride 2.

Parameters are float32; convolutions compute in the `dtype` they are given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import example_rng

NORMS = ("batch", "instance", "layer")
BATCH_NORM_MOMENTUM = 0.9  # flax's convention: PyTorch's momentum=0.1
BATCH_NORM_EPS = 1e-5      # PyTorch's BatchNorm2d / InstanceNorm2d default

# PyTorch's kaiming_normal_(mode="fan_in", nonlinearity="relu"): normal, std sqrt(2 / fan_in).
HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def check_norm(kind: str, field: str = "model.norm") -> str:
    if kind not in NORMS:
        raise ValueError(f"{field} must be one of {list(NORMS)}, got {kind!r}.")
    return kind


def make_norm(kind: str, channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    check_norm(kind)
    if kind == "batch":
        return nnx.BatchNorm(channels, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS,
                             dtype=dtype, rngs=rngs)
    if kind == "instance":
        return nnx.GroupNorm(channels, num_groups=channels, epsilon=BATCH_NORM_EPS,
                             dtype=dtype, rngs=rngs)
    return nnx.LayerNorm(channels, epsilon=1e-6, dtype=dtype, rngs=rngs)


def normalize(layer: nnx.Module, x: jax.Array, training: bool) -> jax.Array:
    """Applies a `make_norm` layer; batch norm takes batch statistics only in training."""
    if isinstance(layer, nnx.BatchNorm):
        return layer(x, use_running_average=not training)
    return layer(x)


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
         use_bias: bool = True, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution padded like PyTorch's (kernel_size // 2 on every side)."""
    pad = kernel_size // 2
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                    kernel_init=HE_NORMAL, rngs=rngs)


class UpConv(nnx.ConvTranspose):
    """nnx.ConvTranspose with kernel 2, stride 2 and VALID padding (same parameters, same
    outputs up to float32 rounding), computed as one matmul and a depth-to-space
    reshape: its 2x2 blocks do not overlap, so output pixel (2i + a, 2j + b) is input
    pixel (i, j) times kernel tap (1 - a, 1 - b) (flax's convention flips the kernel).
    XLA:CPU computes the kernel gradient of the convolution form as a convolution whose
    window is the whole image, at ~1 GFLOP/s: a quarter of a ViT-S/16 + UNETR train
    step at 128 px on 2 CPU cores (tools/benchmark.py segmentation: 1.39 -> 1.13
    s/step); a matmul's gradients are matmuls."""

    def __init__(self, in_channels: int, out_channels: int, *, use_bias: bool, dtype,
                 rngs: nnx.Rngs):
        super().__init__(in_channels, out_channels, (2, 2), strides=(2, 2), padding="VALID",
                         use_bias=use_bias, dtype=dtype, kernel_init=HE_NORMAL, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        b, h, w, _ = x.shape
        # (B, H, W, C) x (2, 2, C, O) -> (B, H, 2, W, 2, O) -> (B, 2H, 2W, O)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel[::-1, ::-1], precision=self.precision)
        y = y.reshape(b, 2 * h, 2 * w, y.shape[-1])
        return y + bias if bias is not None else y


def up_conv(in_channels: int, out_channels: int, *, use_bias: bool = True, dtype,
            rngs: nnx.Rngs) -> UpConv:
    """Transposed convolution, kernel 2, stride 2: each input pixel writes one 2x2 block
    (PyTorch's ConvTranspose2d(k=2, s=2) with its kernel flipped spatially)."""
    return UpConv(in_channels, out_channels, use_bias=use_bias, dtype=dtype, rngs=rngs)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Zeroes each value with probability `rate` and scales the rest by 1 / (1 - rate).
    `rng`: one key, or one key per example (B, 2; models.example_rng)."""
    if rate == 0.0:
        return x
    if example_rng.is_per_example(rng):
        keep = example_rng.bernoulli(rng, 1.0 - rate, x.shape[1:])
    else:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


def upsample_bilinear(x: jax.Array, factor: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, factor H, factor W, C), bilinear, half-pixel centres."""
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * factor, w * factor, c), method="bilinear")


def max_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
