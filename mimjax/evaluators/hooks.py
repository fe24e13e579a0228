"""What the trainer calls around training: eval hooks, and what they are given.

A hook is asked after every step whether it is `due`; when it is, `after_step`
evaluates (or draws) and returns scalars for the step's log. When the run reaches
its last step, `finish` does the end-of-run work (a test evaluation of the best
checkpoint, a final metrics file); `close` releases what the hook holds. Tasks
(mimjax.tasks) decide which hooks a run gets; the trainer names none of them.

`EvalHook` holds what every hook repeats: the cadence (`every` steps and the last
step), and which parameters to evaluate (the EMA's when `config.eval_use_ema`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimjax.run_config import ConfigError


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a task needs to build its hooks for one run."""
    config: Any
    spec: Any               # mimjax.models.spec.ModelSpec of config.model
    mesh: Any               # the run's jax.sharding.Mesh
    workdir: str
    writer: Any             # mimjax.metric_logging.MetricWriter
    params_target: Any      # abstract params with the run's shardings (restore target)


def eval_batch_size(config, mesh) -> int:
    """`config.eval_batch_size` (default: the global batch), checked against the mesh's
    batch shards: every eval batch is split over them."""
    batch_size = int(config.get("eval_batch_size", None) or config.global_batch_size)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"eval_batch_size {batch_size} must split evenly over the {shards} "
                         "batch shards (mesh data x fsdp); change it.")
    return batch_size


def uses_ema(config) -> bool:
    """`config.eval_use_ema`, refused without an EMA to evaluate."""
    use_ema = bool(config.get("eval_use_ema", False))
    if use_ema and not config.get("ema_decay", 0.0):
        raise ConfigError("config.eval_use_ema needs an EMA: set config.ema_decay > 0 "
                          "(e.g. 0.9999) or eval_use_ema=False.")
    return use_ema


class EvalHook:
    """Base of the trainer's hooks: runs every `every` steps (0: the last step only)
    and at the last step; evaluates the EMA parameters when `use_ema`."""

    def __init__(self, every: int = 0, *, use_ema: bool = False):
        self.every = int(every or 0)
        self.use_ema = bool(use_ema)

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    def eval_params(self, state):
        return state.ema_params if self.use_ema else state.params

    def after_step(self, step: int, state) -> dict[str, float]:
        """Evaluates at `step`; returns the scalars to log (may be empty)."""
        raise NotImplementedError

    def finish(self, state, *, trained: bool) -> dict | None:
        """End-of-run work at the last step; `trained` is False when a finished run
        is entered again without training (its outputs may already exist)."""
        del state, trained
        return None

    def close(self) -> None:
        """Releases what the hook holds (checkpoint managers, files)."""
