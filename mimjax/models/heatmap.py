"""Landmark heatmap models: `model(images, rng=None)` -> (B, S, S, L) float32 logits,
one channel per landmark (the objective mimjax.objectives.landmark_heatmap turns them
into a Gaussian-target loss; mimjax.evaluators.landmark_decoding into points).

The backbones are the segmentation ones (mimjax.models.segmenter), so a landmark model
is a dense feature map and a 1x1 conv:
- backbone "vit" (default): the mimjax ViT encoder + a dense decoder
  (mimjax.models.dense_decoder: "progressive" or "unetr"). Parameters
  `{"encoder", "dense_decoder", "heatmap_head"}`: the encoder subtree is the
  pretraining model's, so `--config.init=PRETRAIN_WORKDIR` and checkpoints imported
  from HF / timm (tools/import_pytorch.py) load into it, layer-wise lr decay scales its
  blocks, and exports write the encoder alone.
- backbone "unet": the 2-D U-Net (mimjax.models.unet). Parameters `{"unet",
  "heatmap_head"}`.
`model.heatmap_stride` (ViT only, the U-Net ignores it; default 1): the decoder stops at
S / stride and the head's logits are upsampled bilinearly to S. Many landmarks need
many channels where the heatmaps are read (a 1x1 conv makes each of 37 maps a mix of the
last features), and at full resolution wide features cost the most; at stride 2 the last
stage is 4x cheaper per channel, so it can be wide (the hand config: 48 channels at
S / 2 for 37 maps).
Points, targets and decoding stay in input pixels.
The head is one 1x1 convolution in float32. Its bias starts at `model.head_bias`
(default -4: sigmoid 0.018): a Gaussian target of sigma 3 px covers about 2 pi sigma^2
= 57 pixels of a 128 x 128 map (0.3 %), and starting near that prior, instead of at
0.5 everywhere, spares the first hundreds of steps that BCE would spend pushing the
whole background down (the prior initialisation of focal-loss detectors).

Model config fields (`config.model`, name "heatmap"): `num_landmarks` (L >= 1),
`backbone`, `image_size`, `channels`, `dtype`, and the backbone's fields exactly as
for the segmenter (see mimjax.models.segmenter; `decoder_widths` has one entry per
stage the stride keeps), `heatmap_stride`, `head_bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import conv_blocks, dense_decoder, segmenter, unet, vit

DEFAULT_HEAD_BIAS = -4.0


class HeatmapHead(nnx.Module):
    """(B, S, S, D) features -> (B, S, S, L) float32 logits (a 1x1 conv)."""

    def __init__(self, in_channels: int, num_landmarks: int, *, bias: float, rngs: nnx.Rngs):
        self.conv = conv_blocks.conv(in_channels, num_landmarks, 1, dtype=jnp.float32,
                                     rngs=rngs)
        self.conv.bias[...] = jnp.full((num_landmarks,), bias, jnp.float32)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.conv(features.astype(jnp.float32))


class ViTHeatmapModel(nnx.Module):
    def __init__(self, encoder: vit.ViTConfig, num_landmarks: int, *, decoder: str, taps,
                 widths, norm: str, head_bias: float, rngs: nnx.Rngs, out_stride: int = 1):
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.dense_decoder = dense_decoder.make_decoder(
            encoder, decoder=decoder, taps=taps, widths=widths, norm=norm, rngs=rngs,
            out_stride=out_stride)
        self.heatmap_head = HeatmapHead(self.dense_decoder.out_channels, num_landmarks,
                                        bias=head_bias, rngs=rngs)
        self.out_stride = out_stride

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        logits = self.heatmap_head(
            dense_decoder.vit_features(self.encoder, self.dense_decoder, images, rng))
        if self.out_stride > 1:  # logits at S / stride -> S (points stay input pixels)
            logits = conv_blocks.upsample_bilinear(logits, self.out_stride)
        return logits


class UNetHeatmapModel(nnx.Module):
    def __init__(self, channels: int, num_landmarks: int, *, base_channels: int,
                 dropout_rate: float, norm: str, dtype, head_bias: float, rngs: nnx.Rngs):
        self.unet = unet.UNet(channels, base_channels=base_channels, dropout_rate=dropout_rate,
                              norm=norm, dtype=dtype, rngs=rngs)
        self.heatmap_head = HeatmapHead(self.unet.out_channels, num_landmarks, bias=head_bias,
                                        rngs=rngs)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        return self.heatmap_head(self.unet(images, rng))


def num_landmarks(model_cfg) -> int:
    value = model_cfg.get("num_landmarks", None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.num_landmarks must be a positive integer (the heatmap "
                         f"channels, one per landmark), got {value!r}.")
    return value


def build_heatmap_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """From the `model` config section (fields in the module docstring)."""
    count = num_landmarks(model_cfg)
    head_bias = float(model_cfg.get("head_bias", DEFAULT_HEAD_BIAS))
    stride = model_cfg.get("heatmap_stride", 1)
    if segmenter.check_backbone(model_cfg) == "unet":
        # The U-Net's last level is full resolution and as wide as its first: it reads
        # its heatmaps there, and ignores the ViT decoder's fields (stride, widths).
        return UNetHeatmapModel(**segmenter.unet_settings(model_cfg), num_landmarks=count,
                                head_bias=head_bias, rngs=rngs)
    encoder = vit.vit_config_from(model_cfg)
    return ViTHeatmapModel(encoder, count,
                           **dense_decoder.decoder_settings(model_cfg, encoder, stride),
                           head_bias=head_bias, rngs=rngs)
