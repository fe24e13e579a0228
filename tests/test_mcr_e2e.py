"""Image-report pretraining through the one trainer (main.py, task "image_text"): MCR
and the CLIP-style baseline train, log every loss term and the retrieval metrics,
draw retrieval figures, keep the tokenizer and the run config with the checkpoints,
and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(config, workdir, data_dir):
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")  # one CPU device
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", config, "--workdir", str(workdir),
         f"--config.data.dir={data_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stderr


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pairs")


@pytest.mark.slow
@pytest.mark.parametrize("arm,terms", [("tiny", {"loss_itc", "loss_mim", "loss_mlm"}),
                                       ("tiny_clip", {"loss_itc"})])
def test_image_text_pretraining_logs_terms_and_retrieval(tmp_path, data_dir, arm, terms):
    workdir = tmp_path / arm
    _run(f"configs/mcr_demo.py:{arm}", workdir, data_dir)
    records = _records(workdir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    logged_terms = {k for k in train[-1] if k.startswith("loss_")}
    assert logged_terms == terms  # only the enabled terms, every one of them
    evals = [r for r in records if "retrieval/i2t_R@1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    # The phantom's finding labels reach the evaluator ("same findings" precision).
    assert 0 <= evals[-1]["retrieval/i2t_findings_P@1"] <= 1
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@10", "i2t_median_rank"):
        value = evals[-1][f"retrieval/{key}"]
        assert (0 <= value <= 1) if "R@" in key else value >= 1
    assert (workdir / "figures" / "retrieval_6.png").stat().st_size > 0
    final = json.loads((workdir / "retrieval_metrics.json").read_text())
    assert final["step"] == 6 and final["num_pairs"] == 8
    # The checkpoint's text side and architecture travel with it.
    tokenizer = json.loads((workdir / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 256
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "mcr"

    log = _run(f"configs/mcr_demo.py:{arm}", workdir, data_dir)  # finished: resumes, no steps
    assert "nothing to do" in log and len(_records(workdir)) == len(records)
