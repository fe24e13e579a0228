"""The task plug-in: what one kind of run (pretraining, classification,
image-report pretraining, ...) adds around the one generic trainer.

A task declares which models and objectives fit it, checks its part of the config,
builds its training data, does its workdir side effects and builds its eval hooks.
The trainer (mimjax.train) asks the registry (mimjax.tasks) for `config.task` and
calls these methods; it never names a task itself.

A new task is one module here (a `Task` subclass), one line in the registry, its
model(s) in mimjax.models, its objective(s) in mimjax.objectives, its pipeline in
input_pipeline, its evaluator(s) and hooks in mimjax.evaluators, and its configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.run_config import ConfigError


@dataclasses.dataclass
class TrainData:
    """A task's training stream: per-process batches (a grain IterDataset whose
    iterator checkpoints its position) and the records per epoch (for *_epochs)."""
    dataset: Any
    num_records: int | None


class Task:
    """Base class of the task plug-ins; see the module docstring."""

    name: ClassVar[str]
    # model.name values this task trains, and the objectives its config must name.
    model_names: ClassVar[tuple[str, ...]]
    required_objectives: ClassVar[tuple[str, ...]] = ()
    example_config: ClassVar[str] = ""  # a config file to point users at

    def check_config(self, config) -> None:
        """Refuses a config this task cannot run (ConfigError naming the fix)."""
        model = config.model.name
        if model not in self.model_names:
            raise ConfigError(
                f"config.task {self.name!r} does not fit model.name {model!r}: task "
                f"{self.name!r} trains model.name {' or '.join(map(repr, self.model_names))}"
                f"; set both consistently (see {self.example_config}).")
        for objective in self.required_objectives:
            if objective not in config.get("objectives", {}):
                raise ConfigError(
                    f"config.task {self.name!r} needs config.objectives.{objective}; see "
                    f"{self.example_config}.")

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        raise NotImplementedError

    def prepare_workdir(self, config, workdir: str, *, is_chief: bool) -> None:
        """Side effects in the workdir before training (e.g. files the checkpoints
        are useless without). Default: none."""
        del config, workdir, is_chief

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        """The run's hooks, in the order they run after a step. Every task gets the
        linear probe of its encoder when `config.evals.linear_probe` is set."""
        evals = ctx.config.get("evals", None)
        if evals and evals.get("linear_probe", None):
            from mimjax.evaluators import probe_hooks

            return [probe_hooks.LinearProbeHooks(ctx.config, ctx.spec, ctx.writer)]
        return []
