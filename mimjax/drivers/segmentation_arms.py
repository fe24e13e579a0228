"""Driver "segmentation_arms": several segmentation runs on the same data and budget,
one table (`config.driver = "segmentation_arms"`; e.g. configs/experiments/subclass_seg.py).

`pretrain`, `arms`, `arm_order`, `arm_init` and `compare` as for every arm driver
(mimjax.drivers.arms); the differences are paired over the test volumes; and
- `metrics`: the per-volume metric keys tabulated (e.g. "dice/mean", "dice/LV",
  "hd95/mean"), fine labels; `coarse_metrics` likewise for the superclass.
Writes WORKDIR/results.csv (one row per arm), differences.csv and results.md (both tables).
"""

from __future__ import annotations

import math

from mimjax.drivers import arms
from mimjax.evaluators import segmentation_metrics


def results_rows(config, results: dict[str, dict]) -> list[dict]:
    rows = []
    for arm, result in results.items():
        metrics = result["metrics"]
        row = {"arm": arm, "init": config.arm_init.get(arm, None) or "scratch",
               "test_volumes": int(metrics.get("fine/num_volumes", 0))}
        row.update({f"fine {k}": arms.number(metrics.get(f"fine/{k}", math.nan))
                    for k in config.metrics})
        row.update({f"coarse {k}": arms.number(metrics.get(f"coarse/{k}", math.nan))
                    for k in config.coarse_metrics})
        row["best_val_step"] = result["checkpoint_step"]
        rows.append(row)
    return rows


def difference_rows(config, results: dict[str, dict]) -> list[dict]:
    """Paired bootstrap differences (arm minus other) over the shared test volumes."""
    volumes = {arm: [{k: arms.number(v) if k != "volume" else v for k, v in r.items()}
                     for r in result["fine_volumes"]] for arm, result in results.items()}
    return arms.difference_rows(config, volumes, segmentation_metrics.paired_difference,
                                label="fine {key}")


def run_experiment(config, workdir: str) -> list[dict]:
    """Pretrain, train every arm, tabulate; writes and returns the results rows."""
    return arms.run_experiment(config, workdir, results_rows=results_rows,
                               difference_rows=difference_rows,
                               heading="Test split, per-volume means:", over="test volumes")
