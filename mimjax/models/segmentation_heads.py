"""Coarse-to-fine segmentation heads: a dense feature map (B, S, S, D) ->
{"coarse_logits": (B, S, S, num_coarse), "fine_logits": (B, S, S, num_fine)}, float32.

Class counts include the background (class 0 of both label maps). The wiring is the
reference's `UnetC2FOutput` (networks/singlybranchedunet.py of the subclass
segmentation paper, with its default repeat=1); a "branch" below is norm -> ReLU ->
3x3 conv -> ReLU, and every classifier a 1x1 conv computed in float32:
- plain: one branch, then a coarse and a fine classifier on its features;
- Prior Concatenation (`prior_concat`): the fine classifier sees the branch's
  features concatenated with the coarse logits (all num_coarse of them, as the
  reference), so the superclass prediction guides the subclass one;
- Separate Normalization (`separate_norm`, one superclass only): two branches with
  their own norms, one for the superclass foreground and one for the background.
  The background branch gives one logit, shared by both outputs; the foreground
  branch gives the foreground logit and the num_fine - 1 subclass logits:
  coarse = [bg, fg], fine = [bg, subclasses]. With Prior Concatenation as well,
  the subclass classifier sees the foreground features plus the foreground logit.
The batch norms use batch statistics only in training (see `conv_blocks.normalize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import conv_blocks


class Branch(nnx.Module):
    """norm -> ReLU -> 3x3 conv -> ReLU (the reference's BatchNorm, ReLU, ConvBlock)."""

    def __init__(self, channels: int, *, norm: str, dtype, rngs: nnx.Rngs):
        self.norm = conv_blocks.make_norm(norm, channels, dtype=dtype, rngs=rngs)
        self.conv = conv_blocks.conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        x = jax.nn.relu(conv_blocks.normalize(self.norm, x, training))
        return jax.nn.relu(self.conv(x))


def classifier(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
    """1x1 conv in float32: logits stay f32 under bf16 features."""
    return conv_blocks.conv(in_channels, out_channels, 1, dtype=jnp.float32, rngs=rngs)


class SubclassHead(nnx.Module):
    """`__call__(features, training)` -> {"coarse_logits", "fine_logits"} (f32)."""

    def __init__(self, in_channels: int, *, num_coarse: int, num_fine: int,
                 separate_norm: bool = False, prior_concat: bool = False, norm: str = "batch",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if num_coarse < 2 or num_fine < 2:
            raise ValueError(
                f"model.num_coarse and model.num_fine count the background too and must be "
                f">= 2, got num_coarse={num_coarse}, num_fine={num_fine}.")
        if separate_norm and num_coarse != 2:
            raise ValueError(
                f"model.separate_norm=True splits the features into one foreground and one "
                f"background branch, so it needs exactly one superclass (num_coarse=2: "
                f"background + 1), got num_coarse={num_coarse}; set "
                "model.separate_norm=False for several superclasses.")
        self.separate_norm = separate_norm
        self.prior_concat = prior_concat
        branch = lambda: Branch(in_channels, norm=norm, dtype=dtype, rngs=rngs)
        if separate_norm:
            self.foreground = branch()
            self.foreground_logit = classifier(in_channels, 1, rngs)
            self.fine = classifier(in_channels + int(prior_concat), num_fine - 1, rngs)
            self.background = branch()
            self.background_logit = classifier(in_channels, 1, rngs)
        else:
            self.branch = branch()
            self.coarse = classifier(in_channels, num_coarse, rngs)
            self.fine = classifier(in_channels + num_coarse * int(prior_concat), num_fine, rngs)

    def __call__(self, features: jax.Array, training: bool) -> dict[str, jax.Array]:
        if self.separate_norm:
            foreground = self.foreground(features, training).astype(jnp.float32)
            fg_logit = self.foreground_logit(foreground)
            bg_logit = self.background_logit(
                self.background(features, training).astype(jnp.float32))
            fine_input = (jnp.concatenate([foreground, fg_logit], axis=-1)
                          if self.prior_concat else foreground)
            subclasses = self.fine(fine_input)
            return {"coarse_logits": jnp.concatenate([bg_logit, fg_logit], axis=-1),
                    "fine_logits": jnp.concatenate([bg_logit, subclasses], axis=-1)}
        x = self.branch(features, training).astype(jnp.float32)
        coarse = self.coarse(x)
        fine_input = jnp.concatenate([x, coarse], axis=-1) if self.prior_concat else x
        return {"coarse_logits": coarse, "fine_logits": self.fine(fine_input)}
