"""What the arm drivers share ("segmentation_arms", "landmark_arms"): several runs of
one task on the same data and budget, pretrainings first, one table at the end.

The experiment config holds complete run configs, so every run is an ordinary
`train.train_and_evaluate` call, checked together before the first one starts:
- `pretrain.{name}`: pretraining run configs (e.g. an MAE on unlabelled images);
- `arms.{name}`: the task's run configs; `arm_order`: their names in table order;
- `arm_init.{name}`: what initialises that arm's encoder (its `config.init`): the name
  of a pretraining of `pretrain`, a path (a pretraining workdir elsewhere, or a
  checkpoint imported with tools/import_pytorch.py), or None for scratch;
- `compare`: (arm, other arm) pairs; the driver reports each difference with a paired
  bootstrap 95% interval over the test items both arms scored (`bootstrap_resamples`,
  `seed`).
Runs go to WORKDIR/pretrain/{name} and WORKDIR/arms/{name}; each resumes, and a finished
run is not repeated, so re-running the command completes a killed experiment. Each
driver turns the arms' test_metrics.json into WORKDIR/results.csv, differences.csv and
results.md (`write_tables`).
"""

from __future__ import annotations

import json
import logging
import os

from mimjax import run_config, train
from mimjax.drivers import common

log = logging.getLogger(__name__)


def _is_path(init: str) -> bool:
    return os.sep in init or init.startswith(".")


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
        if init is not None and init not in config.pretrain and not _is_path(init):
            raise run_config.ConfigError(
                f"config.arm_init.{arm} = {init!r} is not a pretraining of config.pretrain "
                f"{list(config.pretrain)}; name one of them, a checkpoint folder (a path), or "
                "None for scratch.")
        if init is not None and _is_path(init) and not os.path.exists(init):
            raise run_config.ConfigError(
                f"config.arm_init.{arm} = {init!r} does not exist; give a pretraining workdir "
                "or a folder written by tools/import_pytorch.py.")
    for arm, other in config.compare:
        for name in (arm, other):
            if name not in config.arms:
                raise run_config.ConfigError(f"config.compare names arm {name!r}, which "
                                             f"config.arms {list(config.arms)} does not have.")
    sections = [(f"pretrain.{name}", c) for name, c in config.pretrain.items()]
    sections += [(f"arms.{name}", c) for name, c in config.arms.items()]
    common.check_sections(sections)


def run_arms(config, workdir: str) -> dict[str, dict]:
    """Pretrains, then trains every arm; returns {arm: its test_metrics.json}."""
    pretrained = {}
    for name, section in config.pretrain.items():
        pretrained[name] = os.path.join(workdir, "pretrain", name)
        log.info("Experiment: pretraining %r in %s", name, pretrained[name])
        train.train_and_evaluate(section, pretrained[name])
    results = {}
    for arm in config.arm_order:
        run_cfg = config.arms[arm].copy_and_resolve_references()
        init = config.arm_init.get(arm, None)
        with run_cfg.unlocked():
            run_cfg.init = pretrained.get(init, init) if init is not None else None
        arm_dir = os.path.join(workdir, "arms", arm)
        log.info("Experiment: arm %r (%s) in %s", arm, f"init {init}" if init else "scratch",
                 arm_dir)
        train.train_and_evaluate(run_cfg, arm_dir)
        with open(os.path.join(arm_dir, "test_metrics.json")) as f:
            results[arm] = json.load(f)
    return results


def run_experiment(config, workdir: str, *, results_rows, difference_rows, heading: str,
                   over: str) -> list[dict]:
    """Checks, pretrains, trains every arm and writes the tables: the driver's
    `results_rows(config, results)` and `difference_rows(config, results)` read the
    arms' test_metrics.json; returns the results rows."""
    check_arms(config)
    os.makedirs(workdir, exist_ok=True)
    results = run_arms(config, workdir)
    rows = results_rows(config, results)
    write_tables(workdir, rows, difference_rows(config, results), heading=heading, over=over)
    return rows


def difference_rows(config, per_item: dict[str, list[dict]], paired_difference, *,
                    label: str = "{key}") -> list[dict]:
    """For each (arm, other) of `config.compare` and each key of `config.metrics`: the
    difference arm minus other over the items both scored, from
    `paired_difference(rows_a, rows_b, key, num_resamples=, seed=)` (the task's paired
    bootstrap); `per_item` holds each arm's per-item rows (test volumes, images)."""
    rows = []
    for arm, other in config.compare:
        for key in config.metrics:
            diff = paired_difference(per_item[arm], per_item[other], key,
                                     num_resamples=int(config.bootstrap_resamples),
                                     seed=int(config.seed))
            rows.append({"arm": arm, "minus": other, "metric": label.format(key=key),
                         "difference": diff.estimate, "ci95_low": diff.low,
                         "ci95_high": diff.high})
            log.info("Experiment: %s minus %s, %s: %s", arm, other, key, diff)
    return rows


def write_tables(workdir: str, rows: list[dict], differences: list[dict], *,
                 heading: str, over: str) -> str:
    """results.csv, differences.csv and results.md; returns the Markdown."""
    common.write_csv(rows, os.path.join(workdir, "results.csv"))
    markdown = f"{heading}\n\n" + common.to_markdown(rows)
    if differences:
        common.write_csv(differences, os.path.join(workdir, "differences.csv"))
        markdown += (f"\nDifferences (paired bootstrap 95% interval over the {over}):\n\n"
                     + common.to_markdown(differences))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    log.info("Experiment results (also in %s/results.{csv,md}):\n%s", workdir, markdown)
    return markdown


def number(value) -> float:
    """A metric from test_metrics.json (NaN is stored as a string) as a float."""
    return float(value) if not isinstance(value, str) else float("nan")
