"""Linear-probe eval hook for pretraining: probe quality over the pretraining curve.

Configured by `config.evals.linear_probe` (see `default_probe_config`): a labelled
data section (the fine-tuning data config: splits, lesion crops), the splits the
probe is fit on and scored on, the pooling, and one entry per task
(label_key, multilabel, class_names). Every `every` steps and at the last step the
current encoder parameters embed both splits (deterministic whole-image views, the
encoder's base image size), `linear_probe.LinearProbeEvaluator` fits the ridge
probe per task and the metrics go to metrics.jsonl as "probe/{task}/{metric}".
The labelled splits are decoded and resized once, when the hook is built.
"""

from __future__ import annotations

import logging

import ml_collections

from mimjax.evaluators import linear_probe
from mimjax.evaluators.hooks import EvalHook
from mimjax.run_config import ConfigError

log = logging.getLogger(__name__)


def default_probe_config(data_cfg, tasks: dict[str, dict]) -> ml_collections.ConfigDict:
    """`config.evals.linear_probe` with the given labelled data and tasks
    ({name: {"label_key", "multilabel", "class_names"}})."""
    c = ml_collections.ConfigDict()
    c.every = 100  # steps between probes (and at the last step); 0 = last step only
    c.pool = "gap"  # "cls" | "gap" | "cls+gap" (linear_probe.POOL_KINDS)
    c.train_split = "train"
    c.eval_split = "val"
    c.batch_size = 64
    c.data = data_cfg
    c.tasks = ml_collections.ConfigDict(tasks)
    return c


def probe_batches(data_cfg, split: str, *, image_size: int, batch_size: int, label_keys):
    """The split's padded, cached eval batches (input_pipeline.finetune)."""
    from input_pipeline import finetune  # grain import kept off the model/test paths

    return finetune.make_eval_batches(
        data_cfg, split, image_size=image_size, batch_size=batch_size, label_keys=label_keys
    )


def task_evaluators(probe_cfg, encode, train_batches, eval_batches):
    """One LinearProbeEvaluator per task of `probe_cfg.tasks`, on the given batches."""
    return [
        linear_probe.LinearProbeEvaluator.from_config(
            dict(task_cfg, task=name),
            encode=encode,
            train_batches=lambda: iter(train_batches),
            eval_batches=lambda: iter(eval_batches),
        )
        for name, task_cfg in probe_cfg.tasks.items()
    ]


class LinearProbeHooks(EvalHook):
    """Fits and scores the probe every `evals.linear_probe.every` steps and at the
    last step, on the current (not EMA) encoder parameters."""

    def __init__(self, config, spec, writer):
        probe_cfg = config.evals.linear_probe
        if not probe_cfg.get("tasks"):
            raise ConfigError(
                "config.evals.linear_probe.tasks is empty: name at least one task "
                "({name: {label_key, multilabel, class_names}})."
            )
        super().__init__(probe_cfg.get("every", 0))
        self.writer = writer
        label_keys = sorted(
            {t["label_key"].removeprefix("label_") for t in probe_cfg.tasks.values()}
        )
        size, batch = int(config.model.image_size), int(probe_cfg.get("batch_size", 64))
        train = probe_batches(
            probe_cfg.data, probe_cfg.get("train_split", "train"), image_size=size,
            batch_size=batch, label_keys=label_keys,
        )
        held_out = probe_batches(
            probe_cfg.data, probe_cfg.get("eval_split", "val"), image_size=size,
            batch_size=batch, label_keys=label_keys,
        )
        encode = linear_probe.encoder_features_fn(spec, probe_cfg.get("pool", "gap"))
        self.evaluators = task_evaluators(probe_cfg, encode, train, held_out)
        log.info("Linear probe: %s on %d train / %d %s images", list(probe_cfg.tasks),
                 train.num_records, held_out.num_records, probe_cfg.get("eval_split", "val"))

    def after_step(self, step: int, state) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            try:
                metrics.update(evaluator.run(state.params, step))
            except linear_probe.NonFiniteFeaturesError as error:
                # A diverging run: the trainer's non-finite guard decides; skip the probe.
                log.warning("step %d | linear probe %s skipped: %s", step, evaluator.task, error)
                return {}
        self.writer.write(step, metrics)
        summary = " | ".join(
            f"{e.task} AUC {metrics[f'probe/{e.task}/auc_macro']:.4f} "
            f"AP {metrics[f'probe/{e.task}/ap_macro']:.4f}"
            for e in self.evaluators
        )
        log.info("step %d | linear probe: %s", step, summary)
        return metrics
