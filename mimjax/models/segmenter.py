"""Segmentation models for subclass segmentation from hierarchical labels:
`model(images, rng=None)` -> {"coarse_logits": (B, S, S, num_coarse),
"fine_logits": (B, S, S, num_fine)}, float32.

Two backbones produce a full-resolution feature map (`model.features(images, rng)`,
(B, S, S, D0)); a `SubclassHead` (mimjax.models.segmentation_heads) turns it into the
logits. Decoder and head are separate modules so a heatmap task can reuse a backbone
with another head.
- `ViTSegmenter` (backbone "vit"): the mimjax ViT encoder over all patches (class
  token ignored by the dense path) + a dense decoder (mimjax.models.dense_decoder).
  Parameters `{"encoder", "seg_decoder", "seg_head"}`: the encoder subtree is the
  pretraining model's, so `--config.init=PRETRAIN_WORKDIR` and the HF / timm imports
  load into it (mimjax.pretrained), layer-wise lr decay scales its blocks while the
  decoder and the head learn at the full lr, and param_tree.kind_of calls the
  checkpoint an "encoder" one (exports write the encoder).
- `UNetSegmenter` (backbone "unet"): the paper's 2-D U-Net (mimjax.models.unet).
  Parameters `{"unet", "seg_head"}`. Under Separate Normalization its last block
  ends with a bare conv, as the reference's; the ViT decoders always end with a
  norm and an activation, and each head branch normalises again.
`rng` given (training): drop path (ViT), dropout (U-Net) and batch norm with batch
statistics, whose running averages the forward pass updates (nnx.BatchStat model
state); without it the pass is deterministic and uses the running averages.

Model config fields (`config.model`, name "segmenter"):
- `backbone`: "vit" (default) | "unet";
- `image_size` (square inputs), `channels` (any count: 4 for BraTS' sequences),
  `dtype` ("float32" | "bfloat16"; parameters stay float32, logits are float32);
- ViT: the encoder's fields as for the classifier (`variant` such as "S/16", with a
  power-of-two patch size; width, depth, num_heads, mlp_dim, posemb, class_token,
  layer_norm_eps, gelu_approximate, scan, remat, attention, drop_path_rate);
  `decoder`: "progressive" (default) | "unetr"; `taps` (unetr only): log2(patch)
  1-based block numbers, non-decreasing, the last the last block; None = evenly
  spaced ((3, 6, 9, 12) for 12 blocks and patch 16; MONAI's UNETR code reads blocks
  (4, 7, 10, 12)); `decoder_widths`: log2(patch) widths, coarse to fine, None =
  (128, 64, 32, 16) for patch 16 (16 at full resolution, doubling per stage);
- U-Net: `unet_base_channels` (16: 16..256 over 5 levels), `unet_dropout` (0.3);
- `norm`: "batch" (default, the paper's) | "instance" | "layer", for the decoder /
  U-Net and the head;
- head: `separate_norm` (False; needs one superclass), `prior_concat` (False);
- classes, background included: `num_fine` (F) and `num_coarse` (K + 1), or
  `fine_to_coarse` (each fine class's coarse class, e.g. (0, 1, 1, 1)), from which
  both follow (given together, they must agree).
"""

from __future__ import annotations

import jax
from flax import nnx

from mimjax.models import dense_decoder, segmentation_heads, unet, vit
from mimjax.models.conv_blocks import check_norm

BACKBONES = ("vit", "unet")


class _Segmenter(nnx.Module):
    """Logits = head(features); a subclass builds `seg_head` and `features`."""

    def features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.seg_head(self.features(images, rng), training=rng is not None)


class ViTSegmenter(_Segmenter):
    def __init__(self, encoder: vit.ViTConfig, *, decoder: str, taps, widths, norm: str,
                 head_options: dict, rngs: nnx.Rngs):
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.seg_decoder = dense_decoder.make_decoder(encoder, decoder=decoder, taps=taps,
                                                      widths=widths, norm=norm, rngs=rngs)
        self.seg_head = segmentation_heads.SubclassHead(
            self.seg_decoder.out_channels, norm=norm, dtype=encoder.transformer.dtype,
            rngs=rngs, **head_options)

    def features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(B, S, S, C) -> (B, S, S, D0): the decoder's feature map."""
        return dense_decoder.vit_features(self.encoder, self.seg_decoder, images, rng)


class UNetSegmenter(_Segmenter):
    def __init__(self, channels: int, *, base_channels: int, dropout_rate: float, norm: str,
                 dtype, head_options: dict, rngs: nnx.Rngs):
        # The reference ends the U-Net with a bare conv under Separate Normalization,
        # leaving the norm to each head branch (see mimjax.models.unet).
        self.unet = unet.UNet(channels, base_channels=base_channels, dropout_rate=dropout_rate,
                              norm=norm, dtype=dtype,
                              last_norm=not head_options["separate_norm"], rngs=rngs)
        self.seg_head = segmentation_heads.SubclassHead(
            self.unet.out_channels, norm=norm, dtype=dtype, rngs=rngs, **head_options)

    def features(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        return self.unet(images, rng)


def class_counts(model_cfg) -> tuple[int, int]:
    """(num_fine, num_coarse), background included, from num_fine / num_coarse or
    fine_to_coarse."""
    num_fine = model_cfg.get("num_fine", None)
    num_coarse = model_cfg.get("num_coarse", None)
    mapping = model_cfg.get("fine_to_coarse", None)
    if mapping is not None:
        mapping = tuple(mapping)
        ok = (len(mapping) >= 2 and all(isinstance(c, int) for c in mapping)
              and mapping[0] == 0 and all(c >= 1 for c in mapping[1:]))
        if ok:
            superclasses = max(mapping)
            ok = set(mapping[1:]) == set(range(1, superclasses + 1))
        if not ok:
            raise ValueError(
                "model.fine_to_coarse must give each fine class its coarse class: background "
                "0 -> 0, every subclass a superclass >= 1, each superclass 1..K used, e.g. "
                f"(0, 1, 1, 1); got {list(mapping)}.")
        derived = (len(mapping), max(mapping) + 1)
        for field, given, value in zip(("num_fine", "num_coarse"), (num_fine, num_coarse),
                                       derived):
            if given is not None and given != value:
                raise ValueError(f"model.{field}={given} disagrees with model.fine_to_coarse "
                                 f"{list(mapping)} (which implies {value}); drop one of them.")
        return derived
    for field, value in (("num_fine", num_fine), ("num_coarse", num_coarse)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(
                f"model.{field} must be an integer >= 2 (classes including the background), "
                f"got {value!r}; or give model.fine_to_coarse, e.g. (0, 1, 1, 1).")
    return num_fine, num_coarse


def check_backbone(model_cfg) -> str:
    backbone = model_cfg.get("backbone", "vit")
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone must be one of {list(BACKBONES)}, got {backbone!r}.")
    return backbone


def unet_settings(model_cfg) -> dict:
    """The U-Net backbone's fields of `config.model` (image_size, channels,
    unet_base_channels, unet_dropout, norm, dtype), checked, as keyword arguments of a
    model built on `unet.UNet` (the segmenter's, the landmark heatmap model's)."""
    unet.UNet.check_image_size(model_cfg.image_size)
    norm = check_norm(model_cfg.get("norm", "batch"))
    channels = model_cfg.get("channels", 1)
    base_channels = model_cfg.get("unet_base_channels", 16)
    dropout_rate = model_cfg.get("unet_dropout", unet.DROPOUT_RATE)
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"model.channels must be a positive integer, got {channels!r}.")
    if not isinstance(base_channels, int) or base_channels < 1:
        raise ValueError(
            f"model.unet_base_channels must be a positive integer, got {base_channels!r}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"model.unet_dropout must be in [0, 1), got {dropout_rate}.")
    return dict(channels=channels, base_channels=base_channels,
                dropout_rate=float(dropout_rate), norm=norm,
                dtype=vit.dtype_from_name(model_cfg.get("dtype", "float32")))


def build_segmenter(model_cfg, *, rngs: nnx.Rngs) -> _Segmenter:
    """From the `model` config section (fields in the module docstring)."""
    num_fine, num_coarse = class_counts(model_cfg)
    head_options = dict(num_fine=num_fine, num_coarse=num_coarse,
                        separate_norm=bool(model_cfg.get("separate_norm", False)),
                        prior_concat=bool(model_cfg.get("prior_concat", False)))
    if check_backbone(model_cfg) == "unet":
        return UNetSegmenter(**unet_settings(model_cfg), head_options=head_options, rngs=rngs)

    encoder = vit.vit_config_from(model_cfg)
    return ViTSegmenter(encoder, **dense_decoder.decoder_settings(model_cfg, encoder),
                        head_options=head_options, rngs=rngs)
