"""Driver "segmentation_arms": several segmentation runs on the same data and budget,
one table (`config.driver = "segmentation_arms"`; e.g. configs/experiments/subclass_seg.py).

The experiment config holds complete run configs, so every run is an ordinary
`train.train_and_evaluate` call, checked together before the first one starts:
- `pretrain.{name}`: pretraining run configs (e.g. an MAE on unlabelled images);
- `arms.{name}`: segmentation run configs; `arm_order`: their names in table order;
- `arm_init.{name}`: the pretraining whose encoder initialises that arm (its
  `config.init`), or None for scratch;
- `compare`: (arm, other arm) pairs; each gets the difference of the test metrics
  with a paired bootstrap 95% interval over the test volumes both arms scored
  (`bootstrap_resamples`, `seed`);
- `metrics`: the per-volume metric keys tabulated (e.g. "dice/mean", "dice/LV",
  "hd95/mean"), fine labels; `coarse_metrics` likewise for the superclass.
Runs go to WORKDIR/pretrain/{name} and WORKDIR/arms/{name}; each resumes, and a finished
run is not repeated, so re-running the command completes a killed experiment. Writes
WORKDIR/results.csv (one row per arm), differences.csv and results.md (both tables).
"""

from __future__ import annotations

import json
import logging
import math
import os

from mimjax import run_config, train
from mimjax.drivers import common
from mimjax.evaluators import segmentation_metrics

log = logging.getLogger(__name__)


def check_arms(config) -> None:
    """Every run config and cross-reference of the experiment, before anything trains."""
    if sorted(config.arm_order) != sorted(config.arms):
        raise run_config.ConfigError(
            f"config.arm_order {list(config.arm_order)} must list every arm of config.arms "
            f"{sorted(config.arms)} once.")
    for arm, init in config.arm_init.items():
        if arm not in config.arms:
            raise run_config.ConfigError(f"config.arm_init names arm {arm!r}, which "
                                         f"config.arms {list(config.arms)} does not have.")
        if init is not None and init not in config.pretrain:
            raise run_config.ConfigError(
                f"config.arm_init.{arm} = {init!r} is not a pretraining of config.pretrain "
                f"{list(config.pretrain)}; name one of them, or None for scratch.")
    for arm, other in config.compare:
        for name in (arm, other):
            if name not in config.arms:
                raise run_config.ConfigError(f"config.compare names arm {name!r}, which "
                                             f"config.arms {list(config.arms)} does not have.")
    sections = [(f"pretrain.{name}", c) for name, c in config.pretrain.items()]
    sections += [(f"arms.{name}", c) for name, c in config.arms.items()]
    common.check_sections(sections)


def _run(config, workdir: str) -> None:
    train.train_and_evaluate(config, workdir)


def run_arms(config, workdir: str) -> dict[str, dict]:
    """Pretrains, then trains every arm; returns {arm: its test_metrics.json}."""
    pretrained = {}
    for name, section in config.pretrain.items():
        pretrained[name] = os.path.join(workdir, "pretrain", name)
        log.info("Experiment: pretraining %r in %s", name, pretrained[name])
        _run(section, pretrained[name])
    results = {}
    for arm in config.arm_order:
        run_cfg = config.arms[arm].copy_and_resolve_references()
        init = config.arm_init.get(arm, None)
        with run_cfg.unlocked():
            run_cfg.init = pretrained[init] if init is not None else None
        arm_dir = os.path.join(workdir, "arms", arm)
        log.info("Experiment: arm %r (%s) in %s", arm, f"init {init}" if init else "scratch",
                 arm_dir)
        _run(run_cfg, arm_dir)
        with open(os.path.join(arm_dir, "test_metrics.json")) as f:
            results[arm] = json.load(f)
    return results


def _number(value) -> float:
    return float(value) if not isinstance(value, str) else float("nan")


def results_rows(config, results: dict[str, dict]) -> list[dict]:
    rows = []
    for arm, result in results.items():
        metrics = result["metrics"]
        row = {"arm": arm, "init": config.arm_init.get(arm, None) or "scratch",
               "test_volumes": int(metrics.get("fine/num_volumes", 0))}
        row.update({f"fine {k}": _number(metrics.get(f"fine/{k}", math.nan))
                    for k in config.metrics})
        row.update({f"coarse {k}": _number(metrics.get(f"coarse/{k}", math.nan))
                    for k in config.coarse_metrics})
        row["best_val_step"] = result["checkpoint_step"]
        rows.append(row)
    return rows


def difference_rows(config, results: dict[str, dict]) -> list[dict]:
    """Paired bootstrap differences (arm minus other) over the shared test volumes."""
    rows = []
    for arm, other in config.compare:
        for key in config.metrics:
            a = [{k: _number(v) if k != "volume" else v for k, v in r.items()}
                 for r in results[arm]["fine_volumes"]]
            b = [{k: _number(v) if k != "volume" else v for k, v in r.items()}
                 for r in results[other]["fine_volumes"]]
            diff = segmentation_metrics.paired_difference(
                a, b, key, num_resamples=int(config.bootstrap_resamples),
                seed=int(config.seed))
            rows.append({"arm": arm, "minus": other, "metric": f"fine {key}",
                         "difference": diff.estimate, "ci95_low": diff.low,
                         "ci95_high": diff.high})
            log.info("Experiment: %s minus %s, %s: %s", arm, other, key, diff)
    return rows


def run_experiment(config, workdir: str) -> list[dict]:
    """Pretrain, train every arm, tabulate; writes and returns the results rows."""
    check_arms(config)
    os.makedirs(workdir, exist_ok=True)
    results = run_arms(config, workdir)
    rows, differences = results_rows(config, results), difference_rows(config, results)
    common.write_csv(rows, os.path.join(workdir, "results.csv"))
    markdown = "Test split, per-volume means:\n\n" + common.to_markdown(rows)
    if differences:
        common.write_csv(differences, os.path.join(workdir, "differences.csv"))
        markdown += ("\nDifferences (paired bootstrap 95% interval over the test volumes):\n\n"
                     + common.to_markdown(differences))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    log.info("Experiment results (also in %s/results.{csv,md}):\n%s", workdir, markdown)
    return rows
