"""End to end through main.py (slow): the embedded federation on Flower's
Simulation Engine resumes after its server is killed mid-federation, and the
leave-one-site-out experiment writes its tables and resumes without retraining."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_main, start_main

pytestmark = pytest.mark.slow

TINY = "configs/federated_demo.py:tiny"


def _rounds(workdir):
    path = os.path.join(workdir, "server", "rounds.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["round"] for line in f if line.strip()]


def _stop_ray():
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, check=False)


def test_a_killed_federation_resumes_after_its_last_complete_round(tmp_path):
    workdir = tmp_path / "fed"
    proc = start_main(TINY, workdir, "--config.federated.strategy=fedavg",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _rounds(workdir) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert _rounds(workdir) == [1], "round 1 never completed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _stop_ray()
    proc = run_main(TINY, workdir, "--config.federated.strategy=fedavg", timeout=900)
    assert _rounds(workdir) == [1, 2]  # round 1 is not repeated
    assert "resuming after round 1" in proc.stderr
    for site in ("chest_ap", "mammo_film"):  # each site trained 2 x 2 steps in all
        with open(workdir / "sites" / site / "metrics.jsonl") as f:
            assert max(json.loads(line)["step"] for line in f) == 4


def test_the_leave_one_site_out_experiment_writes_its_tables_and_resumes(tmp_path):
    workdir = tmp_path / "loso"
    config = "configs/experiments/federated_loso.py:tiny"
    run_main(config, workdir, timeout=1500)
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    arms = {r["arm"] for r in rows}
    assert arms == {"random", "mim_pooled", "alone:mammo_digital", "alone:mammo_film", "soup",
                    "fedavg", "universal"}
    assert {r["held_out"] for r in rows} == {"chest_ap"}
    with open(workdir / "differences.csv") as f:
        diffs = list(csv.DictReader(f))
    assert ("universal", "fedavg") in {(d["arm"], d["minus"]) for d in diffs}
    markdown = (workdir / "results.md").read_text()
    assert "paired bootstrap 95% interval" in markdown and "| mean |" in markdown
    # Re-running finds every run finished: nothing trains again, the table is the same.
    start = time.monotonic()
    run_main(config, workdir, timeout=900)
    with open(workdir / "results.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["auc_macro"] for r in again] == [r["auc_macro"] for r in rows]
    assert time.monotonic() - start < 600
