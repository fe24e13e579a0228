"""The label-free universal model's distiller: one student encoder learns to
reproduce several frozen teacher encoders (the sites' encoders), each through a
small adaptor head of its own (multi-teacher feature distillation, in the manner of
AM-RADIO, Ranzinger et al., CVPR 2024).

Parameters:
- `encoder`: the student, the global encoder (the same layout as every other
  mimjax encoder: it is what the server sends back to the sites, and what exports
  and `config.init` read). The server starts it from the sites' average (FedDF's
  averaged initialisation, Lin et al., NeurIPS 2020).
- `teachers/<k>/...`: site k's encoder, set by the server each round and never
  trained (the optimizer's `frozen` parts, see mimjax.optim). The server orders the
  sites by name, so teacher k is the same site whatever the order of their replies.
- `adaptors/<k>/...`: LayerNorm -> Linear -> GELU -> Linear from the student's
  tokens to teacher k's token space; they stay at the server between rounds.

`model(images)` -> (student tokens (B, [1 +] N, D), [teacher k's tokens]), each
teacher's tokens under stop_gradient: no gradient reaches a teacher.

Model config fields (`config.model`, name "universal_distiller"): the encoder's
fields (variant, width, depth, ..., as for pretraining), `num_teachers` (>= 1) and
`adaptor_hidden` (the adaptors' hidden width; default 2 x the encoder width).
"""

from __future__ import annotations

import jax
from flax import nnx

from mimjax.models import vit


class Adaptor(nnx.Module):
    """Student tokens -> one teacher's token space (per token)."""

    def __init__(self, width: int, hidden: int, cfg: vit.TransformerConfig, *, rngs: nnx.Rngs):
        self.norm = vit.layer_norm(width, cfg, rngs)
        init = nnx.initializers.xavier_uniform()
        self.fc1 = nnx.Linear(width, hidden, dtype=cfg.dtype, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=cfg.dtype, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(self.norm(tokens))))


class UniversalDistiller(nnx.Module):
    def __init__(self, encoder: vit.ViTConfig, num_teachers: int, adaptor_hidden: int, *,
                 rngs: nnx.Rngs):
        if num_teachers < 1:
            raise ValueError(f"model.num_teachers must be >= 1, got {num_teachers}.")
        width = encoder.transformer.width
        self.encoder = vit.ViTEncoder(encoder, rngs=rngs)
        self.teachers = nnx.List([vit.ViTEncoder(encoder, rngs=rngs)
                                  for _ in range(num_teachers)])
        self.adaptors = nnx.List([Adaptor(width, adaptor_hidden, encoder.transformer, rngs=rngs)
                                  for _ in range(num_teachers)])

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, list[jax.Array]]:
        student = self.encoder(images, rng)
        teachers = [jax.lax.stop_gradient(teacher(images)) for teacher in self.teachers]
        return student, teachers


def build_distiller(model_cfg, *, rngs: nnx.Rngs) -> UniversalDistiller:
    """From the `model` config section (fields in the module docstring)."""
    encoder = vit.vit_config_from(model_cfg)
    num_teachers = model_cfg.get("num_teachers", None)
    if not isinstance(num_teachers, int) or num_teachers < 1:
        raise ValueError(f"model.num_teachers must be a positive integer (one per site), got "
                         f"{num_teachers!r}.")
    hidden = model_cfg.get("adaptor_hidden", None) or 2 * encoder.transformer.width
    return UniversalDistiller(encoder, num_teachers, int(hidden), rngs=rngs)
