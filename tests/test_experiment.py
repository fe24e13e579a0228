"""The MIRAM vs MAE vs scratch experiment end to end at tiny scale (main.py, driver
"experiment"): every arm pretrained, fine-tuned and probed, one table; a re-run
reuses the finished runs."""

import csv
import json
import math

import pytest

from helpers import run_main


def _run(workdir, data_dir):
    overrides = [f"--config.{section}.data.dir={data_dir}" for section in (
        "pretrain.miram", "pretrain.mae", "finetune.pathology", "finetune.margins")]
    return run_main("configs/experiments/miram_vs_mae.py:tiny", workdir, *overrides,
                    timeout=900).stderr


@pytest.mark.slow
def test_experiment_pretrains_finetunes_probes_and_tabulates(tmp_path):
    workdir, data_dir = tmp_path / "exp", tmp_path / "data"
    log = _run(workdir, data_dir)
    for arm in ("miram", "mae"):
        assert (workdir / "pretrain" / arm / "checkpoints").is_dir()
    # Each pretrained arm's encoder initialises its fine-tuning and its probe.
    assert log.count("Pretrained encoder:") == 2 * 2 * 2
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["arm"]) for r in rows] == [
        (task, arm) for task in ("margins", "pathology") for arm in ("miram", "mae", "scratch")]
    for row in rows:
        for key in ("finetune_ap_macro", "finetune_auc_macro", "probe_auc_macro",
                    "probe_accuracy"):
            assert 0.0 <= float(row[key]) <= 1.0 or math.isnan(float(row[key])), (row, key)
        run = workdir / "finetune" / row["task"] / row["arm"]
        tested = json.loads((run / "test_metrics.json").read_text())
        for key in ("ap_macro", "auc_macro", "accuracy"):  # the table reports that run
            assert float(row[f"finetune_{key}"]) == pytest.approx(tested[key])
    with open(workdir / "probe_differences.csv") as f:
        differences = list(csv.DictReader(f))
    assert [(d["task"], d["arm"], d["minus"]) for d in differences] == [
        (task, a, b) for task in ("margins", "pathology")
        for a, b in (("miram", "mae"), ("miram", "scratch"), ("mae", "scratch"))]
    probe_auc = {(r["task"], r["arm"]): float(r["probe_auc_macro"]) for r in rows}
    for d in differences:  # the estimate is the tabulated gap, inside its interval
        estimate = float(d["probe_auc_macro_difference"])
        gap = probe_auc[(d["task"], d["arm"])] - probe_auc[(d["task"], d["minus"])]
        if not math.isnan(gap):
            assert estimate == pytest.approx(gap, abs=1e-9)
            assert float(d["ci95_low"]) <= estimate <= float(d["ci95_high"])
    markdown = (workdir / "results.md").read_text()
    assert markdown.startswith("| task | arm | finetune_ap_macro") and markdown.count("\n") == 19
    assert "paired bootstrap 95% interval" in markdown

    again = _run(workdir, data_dir)  # finished runs are not repeated
    assert "step 1/" not in again and "nothing to do" in again
    assert (workdir / "results.md").read_text() == markdown
