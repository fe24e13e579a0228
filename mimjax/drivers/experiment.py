"""Driver "experiment": pretrain each arm, fine-tune and linear-probe each arm on
each task, one results table (`config.driver = "experiment"`).

The experiment config (e.g. configs/experiments/miram_vs_mae.py) holds complete
run configs, so every run is an ordinary `train.train_and_evaluate` call (checked
together before the first one starts, so a mistake in the last run's config does
not surface after the first has trained):
- `pretrain.{arm}`: a pretraining config per pretrained arm (same data, steps and
  batch for every arm: the same budget);
- `finetune.{task}`: a fine-tuning config per task; each arm fine-tunes it with
  `init` set to its pretraining workdir (`scratch` = random initialisation);
- `arms`: the arms in table order (an arm without a pretraining config is scratch);
- `probe`: the linear probe (mimjax.evaluators.linear_probe) on frozen encoder
  features of each arm: fit on `probe.train_split`, scored on `probe.eval_split`;
  the probe macro-AUC difference of every two arms comes with a paired bootstrap
  95% interval over the eval images (`probe.bootstrap_resamples`,
  mimjax.evaluators.bootstrap).
Runs go to WORKDIR/pretrain/{arm}, WORKDIR/finetune/{task}/{arm}; each resumes, and
a finished run is not repeated, so re-running the command completes a killed
experiment. The tables go to WORKDIR/results.csv, probe_differences.csv and
results.md and the log.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

from mimjax import pretrained as pretrained_lib
from mimjax import run_config, train
from mimjax.drivers import common
from mimjax.evaluators import bootstrap, linear_probe, probe_hooks
from mimjax.models.spec import ModelSpec

log = logging.getLogger(__name__)

METRICS = ("ap_macro", "auc_macro", "accuracy")


def _pretrain_workdir(workdir: str, arm: str) -> str:
    return os.path.join(workdir, "pretrain", arm)


def run_pretraining(config, workdir: str) -> dict[str, str]:
    """Pretrains every arm that has a config; returns {arm: its workdir}."""
    out = {}
    for arm in config.arms:
        if arm not in config.pretrain:
            continue
        out[arm] = _pretrain_workdir(workdir, arm)
        log.info("Experiment: pretraining %r in %s", arm, out[arm])
        train.train_and_evaluate(config.pretrain[arm], out[arm])
    return out


def run_finetuning(config, workdir: str, pretrained: dict[str, str]) -> dict:
    """Fine-tunes every (task, arm); returns {(task, arm): test metrics}."""
    results = {}
    for task, task_cfg in config.finetune.items():
        for arm in config.arms:
            run_cfg = task_cfg.copy_and_resolve_references()
            run_cfg.unlock()
            run_cfg.init = pretrained.get(arm)  # None: scratch
            run_dir = os.path.join(workdir, "finetune", task, arm)
            log.info("Experiment: fine-tuning %s from %r in %s", task, arm, run_dir)
            train.train_and_evaluate(run_cfg, run_dir)
            with open(os.path.join(run_dir, "test_metrics.json")) as f:
                results[(task, arm)] = json.load(f)
    return results


def _encoder_params(task_cfg, spec, init_dir: str | None, seed: int) -> dict:
    """The task model's parameters: the arm's pretrained encoder (head random) or
    all random (scratch), as the fine-tuning run starts."""
    fresh = spec.init_params(task_cfg.model, jax.random.PRNGKey(seed))
    if init_dir is None:
        return fresh
    loaded, _ = pretrained_lib.init_from_checkpoint(
        fresh, init_dir, target_channels=task_cfg.model.get("channels", None))
    return jax.tree.map(np.asarray, loaded)


def probe_evaluator(task: str, task_cfg, probe_cfg):
    """(the linear probe of `task_cfg`'s classification task on frozen encoder
    features: fit on `probe_cfg.train_split`, scored on `probe_cfg.eval_split`; the
    task model's spec, whose `encoder` the probed parameters must hold)."""
    objective = task_cfg.objectives.classification
    label_key = objective.label_key
    size = int(task_cfg.model.image_size)
    batches = {
        split: probe_hooks.probe_batches(
            task_cfg.data, split, image_size=size, batch_size=int(probe_cfg.batch_size),
            label_keys=(label_key.removeprefix("label_"),),
        )
        for split in (probe_cfg.train_split, probe_cfg.eval_split)
    }
    spec = ModelSpec.from_config(task_cfg.model)
    evaluator = linear_probe.LinearProbeEvaluator(
        linear_probe.encoder_features_fn(spec, probe_cfg.pool),
        train_batches=lambda fit=batches[probe_cfg.train_split]: iter(fit),
        eval_batches=lambda held=batches[probe_cfg.eval_split]: iter(held),
        label_key=label_key,
        multilabel=bool(objective.multilabel),
        class_names=tuple(task_cfg.finetune.class_names),
        task=task,
    )
    return evaluator, spec


def run_probes(config, pretrained: dict[str, str]) -> tuple[dict, list[dict]]:
    """Linear probe per (task, arm). Returns ({(task, arm): metrics}, the paired
    differences of probe macro-AUC between every two arms of each task)."""
    probe_cfg = config.probe
    results, differences = {}, []
    for task, task_cfg in config.finetune.items():
        objective = task_cfg.objectives.classification
        evaluator, spec = probe_evaluator(task, task_cfg, probe_cfg)
        scored = {}
        for arm in config.arms:
            params = _encoder_params(task_cfg, spec, pretrained.get(arm), int(config.seed))
            scored[arm] = evaluator.fit_and_score(params)
            metrics = evaluator.metrics(scored[arm])
            results[(task, arm)] = {
                k.removeprefix(f"probe/{task}/"): v for k, v in metrics.items()
            }
            log.info("Experiment: probe %s / %s: AUC %.4f AP %.4f", task, arm,
                     results[(task, arm)]["auc_macro"], results[(task, arm)]["ap_macro"])
        differences += _probe_differences(config, task, scored, bool(objective.multilabel))
    return results, differences


def _probe_differences(config, task: str, scored: dict, multilabel: bool) -> list[dict]:
    """Every pair of arms, in table order (see `paired_auc_differences`)."""
    arms = list(config.arms)
    pairs = [(arm, other) for i, arm in enumerate(arms) for other in arms[i + 1:]]
    return paired_auc_differences(
        task, scored, pairs, multilabel=multilabel,
        num_resamples=int(config.probe.get("bootstrap_resamples", 1000)), seed=int(config.seed))


def paired_auc_differences(task: str, scored: dict, pairs, *, multilabel: bool,
                           num_resamples: int, seed: int) -> list[dict]:
    """Probe test macro-AUC of arm A minus arm B for each (A, B) in `pairs`, with a
    paired bootstrap 95% interval: both arms scored on the same test images, so the
    interval says whether the gap outlives the choice of images."""
    rows = []
    for arm, other in pairs:
        try:
            diff = bootstrap.paired_difference(
                scored[arm].labels, scored[arm].scores, scored[other].scores,
                multilabel=multilabel, num_resamples=num_resamples, seed=seed)
        except bootstrap.UndefinedMetricError as err:  # a tiny test split
            log.warning("Experiment: probe %s, %s minus %s: %s", task, arm, other, err)
            diff = bootstrap.Difference(math.nan, math.nan, math.nan, 0.95, 0)
        log.info("Experiment: probe %s, %s AUC minus %s AUC: %s", task, arm, other, diff)
        rows.append({"task": task, "arm": arm, "minus": other,
                     "probe_auc_macro_difference": diff.estimate,
                     "ci95_low": diff.low, "ci95_high": diff.high})
    return rows


def results_table(config, finetuned: dict, probed: dict) -> list[dict]:
    rows = []
    for task in config.finetune:
        for arm in config.arms:
            row = {"task": task, "arm": arm}
            for m in METRICS:
                row[f"finetune_{m}"] = finetuned[(task, arm)][m]
            for m in METRICS:
                row[f"probe_{m}"] = probed[(task, arm)][m]
            rows.append(row)
    return rows


def write_table(rows: list[dict], workdir: str, differences: list[dict] = ()) -> str:
    """results.csv, probe_differences.csv and results.md (both tables); returns the
    Markdown."""
    common.write_csv(rows, os.path.join(workdir, "results.csv"))
    markdown = common.to_markdown(rows)
    if differences:
        common.write_csv(list(differences), os.path.join(workdir, "probe_differences.csv"))
        markdown += ("\nProbe macro-AUC differences (test split, paired bootstrap 95% "
                     "interval):\n\n" + common.to_markdown(list(differences)))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    return markdown


def check_experiment(config) -> None:
    """Every run config of the experiment, checked before anything trains."""
    unknown = [arm for arm in config.pretrain if arm not in config.arms]
    if unknown:
        raise run_config.ConfigError(
            f"config.pretrain has arms {unknown} that config.arms {list(config.arms)} does "
            "not list; add them to arms or remove them.")
    sections = [(f"pretrain.{arm}", c) for arm, c in config.pretrain.items()]
    sections += [(f"finetune.{task}", c) for task, c in config.finetune.items()]
    common.check_sections(sections)


def run_experiment(config, workdir: str) -> list[dict]:
    """Pretrain, fine-tune, probe; writes and returns the results table."""
    check_experiment(config)
    os.makedirs(workdir, exist_ok=True)
    pretrained = run_pretraining(config, workdir)
    finetuned = run_finetuning(config, workdir, pretrained)
    probed, differences = run_probes(config, pretrained)
    rows = results_table(config, finetuned, probed)
    markdown = write_table(rows, workdir, differences)
    log.info("Experiment results (test split; also in %s/results.{csv,md}):\n%s", workdir,
             markdown)
    return rows
