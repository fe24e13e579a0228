"""Driver "landmark_arms": several landmark runs on the same data and budget, one table
(`config.driver = "landmark_arms"`; e.g. configs/experiments/landmark_transfer.py).

`pretrain`, `arms`, `arm_order`, `arm_init` and `compare` as for every arm driver
(mimjax.drivers.arms); the differences are paired over the test images; and
- `metrics`: the per-image metric keys tabulated and compared ("mre", "sdr/2", ...;
  landmark_metrics.LandmarkMetrics.rows).
Writes WORKDIR/results.csv (one row per arm: its encoder, labelled train images, test
MRE +- std and SDRs in the unit the arms were scored in), differences.csv and
results.md (both tables).
"""

from __future__ import annotations

from mimjax.drivers import arms
from mimjax.evaluators import landmark_metrics


def _labels(run_cfg) -> str:
    data = run_cfg.data
    if data.get("num_labelled", None) is not None:
        return str(data.num_labelled)
    fraction = data.get("label_fraction", None)
    return "100%" if fraction is None else f"{100 * float(fraction):g}%"


def results_rows(config, results: dict[str, dict]) -> list[dict]:
    rows = []
    for arm, result in results.items():
        metrics = result["metrics"]
        unit = metrics.get("unit", "")
        row = {"arm": arm, "init": config.arm_init.get(arm, None) or "scratch",
               "labels": _labels(config.arms[arm]), "test_images": int(metrics["num_images"])}
        for key in config.metrics:
            label = f"{key} ({unit})" if key == "mre" else key
            row[label] = arms.number(metrics.get(key, float("nan")))
            if key == "mre":
                row["mre_std"] = arms.number(metrics.get("mre_std", float("nan")))
        row["best_val_step"] = result["checkpoint_step"]
        rows.append(row)
    return rows


def difference_rows(config, results: dict[str, dict]) -> list[dict]:
    """Paired bootstrap differences (arm minus other) over the shared test images."""
    images = {arm: result["images"] for arm, result in results.items()}
    return arms.difference_rows(config, images, landmark_metrics.paired_difference)


def run_experiment(config, workdir: str) -> list[dict]:
    """Pretrain, train every arm, tabulate; writes and returns the results rows."""
    return arms.run_experiment(config, workdir, results_rows=results_rows,
                               difference_rows=difference_rows,
                               heading="Test split, means over images and landmarks:",
                               over="test images")
