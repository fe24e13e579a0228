"""Pretraining comparison runs: pretrain each arm, fine-tune and linear-probe each
arm on each task, one results table (`config.task = "experiment"`).

The experiment config (e.g. configs/experiments/miram_vs_mae.py) holds complete
run configs, so every run is an ordinary `train.train_and_evaluate` call:
- `pretrain.{arm}`: a pretraining config per pretrained arm (same data, steps and
  batch for every arm: the same budget);
- `finetune.{task}`: a fine-tuning config per task; each arm fine-tunes it with
  `init` set to its pretraining workdir (`scratch` = random initialisation);
- `arms`: the arms in table order (an arm without a pretraining config is scratch);
- `probe`: the linear probe (mimjax.evaluators.linear_probe) on frozen encoder
  features of each arm: fit on `probe.train_split`, scored on `probe.eval_split`.
Runs go to WORKDIR/pretrain/{arm}, WORKDIR/finetune/{task}/{arm}; each resumes, and
a finished run is not repeated, so re-running the command completes a killed
experiment. The table goes to WORKDIR/results.csv and results.md and the log.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import jax
import numpy as np

from mimjax.evaluators import linear_probe, probe_hooks

log = logging.getLogger(__name__)

METRICS = ("ap_macro", "auc_macro", "accuracy")


def _pretrain_workdir(workdir: str, arm: str) -> str:
    return os.path.join(workdir, "pretrain", arm)


def run_pretraining(config, workdir: str) -> dict[str, str]:
    """Pretrains every arm that has a config; returns {arm: its workdir}."""
    from mimjax import train

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
    from mimjax import train

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
    from mimjax import pretrained as pretrained_lib

    fresh = spec.init_params(task_cfg.model, jax.random.PRNGKey(seed))
    if init_dir is None:
        return fresh
    loaded, _ = pretrained_lib.init_from_checkpoint(fresh, init_dir)
    return jax.tree.map(np.asarray, loaded)


def run_probes(config, pretrained: dict[str, str]) -> dict:
    """Linear probe per (task, arm); returns {(task, arm): metrics}."""
    from mimjax import train

    probe_cfg = config.probe
    results = {}
    for task, task_cfg in config.finetune.items():
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
        spec = train.ModelSpec.from_config(task_cfg.model)
        encode = linear_probe.encoder_features_fn(spec, probe_cfg.pool)
        evaluator = linear_probe.LinearProbeEvaluator(
            encode,
            train_batches=lambda fit=batches[probe_cfg.train_split]: iter(fit),
            eval_batches=lambda held=batches[probe_cfg.eval_split]: iter(held),
            label_key=label_key,
            multilabel=bool(objective.multilabel),
            class_names=tuple(task_cfg.finetune.class_names),
            task=task,
        )
        for arm in config.arms:
            params = _encoder_params(task_cfg, spec, pretrained.get(arm), int(config.seed))
            metrics = evaluator.run(params)
            results[(task, arm)] = {
                k.removeprefix(f"probe/{task}/"): v for k, v in metrics.items()
            }
            log.info("Experiment: probe %s / %s: AUC %.4f AP %.4f", task, arm,
                     results[(task, arm)]["auc_macro"], results[(task, arm)]["ap_macro"])
    return results


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


def to_markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], workdir: str) -> str:
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    markdown = to_markdown(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    return markdown


def run_experiment(config, workdir: str) -> list[dict]:
    """Pretrain, fine-tune, probe; writes and returns the results table."""
    unknown = [arm for arm in config.pretrain if arm not in config.arms]
    if unknown:
        raise ValueError(f"config.pretrain has arms {unknown} that config.arms {list(config.arms)} "
                         "does not list; add them to arms or remove them.")
    os.makedirs(workdir, exist_ok=True)
    pretrained = run_pretraining(config, workdir)
    finetuned = run_finetuning(config, workdir, pretrained)
    probed = run_probes(config, pretrained)
    rows = results_table(config, finetuned, probed)
    markdown = write_table(rows, workdir)
    log.info("Experiment results (test split; also in %s/results.{csv,md}):\n%s", workdir,
             markdown)
    return rows
