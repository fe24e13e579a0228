"""The model spec: a model's structure (graphdef), abstract parameters and abstract
model state, built from `config.model` without allocating anything, and the binding
of a parameter dict (and model state) to a Module inside jitted code. The trainer,
the tasks, the evaluators and the tools all bind parameters through it.

Model state is what a model keeps besides its parameters and updates in the forward
pass rather than by gradient: batch-norm running statistics (`nnx.BatchStat`). Most
mimjax models have none; the trainer carries it in TrainState.model_state and passes
it back into every step (see mimjax.train.make_train_step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mimjax.models import build_model
from mimjax.run_config import ConfigError

# Variable kinds a model may hold besides nnx.Param.
STATE_KINDS = (nnx.BatchStat,)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's structure (graphdef), abstract parameters and abstract model
    state; binds them to a Module."""
    graphdef: Any
    abstract_params: Any        # nnx.State of ShapeDtypeStructs
    abstract_model_state: Any   # nnx.State of ShapeDtypeStructs (empty for most models)

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
        graphdef, params, model_state, rest = nnx.split(
            abstract_model, nnx.Param, STATE_KINDS, ...)
        if jax.tree.leaves(rest):
            raise ValueError("mimjax models hold only nnx.Param and nnx.BatchStat variables; "
                             f"found others: {jax.tree.map(lambda x: x.shape, rest)}")
        return cls(graphdef, params, model_state)

    @property
    def has_model_state(self) -> bool:
        return bool(jax.tree.leaves(self.abstract_model_state))

    def init_variables(self, model_cfg, rng) -> tuple[dict, dict]:
        """(parameters, model state) of a freshly initialised model, as pure dicts."""
        model = build_model(model_cfg, rngs=nnx.Rngs(params=rng))
        return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                nnx.to_pure_dict(nnx.state(model, STATE_KINDS)))

    def init_params(self, model_cfg, rng) -> dict:
        return self.init_variables(model_cfg, rng)[0]

    def bind(self, params: dict, model_state: dict | None = None) -> nnx.Module:
        """The Module with `params` (and `model_state`, required when the model has
        state: evaluating batch-norm layers without their running statistics would
        silently use nothing meaningful)."""
        state = jax.tree.map(lambda x: x, self.abstract_params)  # fresh State to fill
        nnx.replace_by_pure_dict(state, params)
        if not self.has_model_state:
            return nnx.merge(self.graphdef, state, self.abstract_model_state)
        if model_state is None:
            raise ValueError("this model keeps batch statistics (model state); bind it with "
                             "the run's model_state as well as its parameters.")
        stats = jax.tree.map(lambda x: x, self.abstract_model_state)
        # jnp copies: an eager training forward updates the statistics in place, which
        # must never write into the caller's (e.g. numpy) arrays.
        nnx.replace_by_pure_dict(stats, jax.tree.map(jnp.asarray, model_state))
        return nnx.merge(self.graphdef, state, stats)

    @staticmethod
    def model_state(model: nnx.Module) -> dict:
        """The model state of a bound (and possibly updated) Module, as a pure dict."""
        return nnx.to_pure_dict(nnx.state(model, STATE_KINDS))
