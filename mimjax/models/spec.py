"""The model spec: a model's structure (graphdef) and abstract parameters, built
from `config.model` without allocating anything, and the binding of a parameter
dict to a Module inside jitted code. The trainer, the tasks, the evaluators and
the tools all bind parameters through it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from mimjax.models import build_model
from mimjax.run_config import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's structure (graphdef) and abstract parameters; binds params to a Module."""
    graphdef: Any
    abstract_params: Any  # nnx.State of ShapeDtypeStructs

    @classmethod
    def from_config(cls, model_cfg) -> ModelSpec:
        """The spec of `config.model`. A setting the model cannot be built with (an
        unknown variant, scales that are not multiples of the image size, ...) is a
        ConfigError naming config.model."""
        try:
            abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
        except (ValueError, KeyError) as error:
            message = error.args[0] if error.args else repr(error)
            raise ConfigError(f"config.model cannot be built: {message}") from error
        graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("mimjax models hold only nnx.Param state; found other "
                             f"variables: {jax.tree.map(lambda x: x.shape, rest)}")
        return cls(graphdef, abstract_params)

    def init_params(self, model_cfg, rng) -> dict:
        model = build_model(model_cfg, rngs=nnx.Rngs(params=rng))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def bind(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.abstract_params)  # fresh State to fill
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)
