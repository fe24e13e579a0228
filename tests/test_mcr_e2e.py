"""Image-report pretraining through the one trainer (main.py, task "image_text"): MCR
and the CLIP-style baseline train, log every loss term and the retrieval metrics,
draw retrieval figures, keep the tokenizer and the run config with the checkpoints,
and resume."""

import json
import math

import pytest

from input_pipeline.cxr_phantom import LABEL_NAMES

from helpers import metric_records as _records
from helpers import run_main, run_tool


def _run(config, workdir, data_dir):
    return run_main(config, workdir, f"--config.data.dir={data_dir}").stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """arm -> (workdir, metrics.jsonl records) of one finished tiny run per arm."""
    runs = {}

    def get(arm):
        if arm not in runs:
            workdir = tmp_path_factory.mktemp(arm) / "run"
            _run(f"configs/mcr_demo.py:{arm}", workdir, data_dir)
            runs[arm] = (workdir, _records(workdir))
        return runs[arm]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arm,terms", [("tiny", {"loss_itc", "loss_mim", "loss_mlm"}),
                                       ("tiny_clip", {"loss_itc"})])
def test_image_text_pretraining_logs_terms_and_retrieval(trained, data_dir, arm, terms):
    workdir, records = trained(arm)
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


def _evaluate(*args):
    return run_tool("evaluate_retrieval", *args)  # one CPU device, as trained


@pytest.mark.slow
def test_standalone_retrieval_reproduces_the_training_evals(trained, tmp_path):
    workdir, records = trained("tiny")
    proc = _evaluate("--workdir", workdir)  # latest step, val split, written to the workdir
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = json.loads((workdir / "retrieval_val_step6.json").read_text())
    final = json.loads((workdir / "retrieval_metrics.json").read_text())
    for key, value in final.items():
        assert standalone[key] == pytest.approx(value, abs=1e-12), key
    assert standalone["split"] == "val" and standalone["step"] == 6
    assert (workdir / "figures" / "retrieval_val_step6.png").stat().st_size > 0
    assert "i2t: R@1" in proc.stdout

    # An earlier checkpoint, on the test split, elsewhere.
    out = tmp_path / "out"
    proc = _evaluate("--workdir", workdir, "--step", 3, "--split", "test", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step3 = json.loads((out / "retrieval_test_step3.json").read_text())
    assert step3["step"] == 3 and step3["split"] == "test" and step3["num_pairs"] == 8
    assert (out / "figures" / "retrieval_test_step3.png").stat().st_size > 0
    # An earlier step on val equals what the trainer logged at that step.
    logged = next(r for r in records if r.get("step") == 3 and "retrieval/i2t_R@1" in r)
    proc = _evaluate("--workdir", workdir, "--step", 3, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val3 = json.loads((out / "retrieval_val_step3.json").read_text())
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@10", "i2t_median_rank", "i2t_findings_P@1"):
        assert val3[key] == pytest.approx(logged[f"retrieval/{key}"], abs=1e-12), key

    # The split is honoured: the tiny phantom's train split has 64 of its 80 pairs.
    proc = _evaluate("--workdir", workdir, "--split", "train", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "retrieval_train_step6.json").read_text())["num_pairs"] == 64

    # The finding probe adds per-finding AUCs and leaves the retrieval figures alone.
    proc = _evaluate("--workdir", workdir, "--finding-probe", "--out", tmp_path / "probe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    probed = json.loads((tmp_path / "probe" / "retrieval_val_step6.json").read_text())
    for key, value in standalone.items():
        assert probed[key] == value, key
    for side in ("image", "text"):
        assert {f"{side}_auc/{name}" for name in LABEL_NAMES + ("macro",)} <= set(probed)
        defined = [v for k, v in probed.items()
                   if k.startswith(f"{side}_auc/") and not math.isnan(v)]
        assert defined and all(0.0 <= v <= 1.0 for v in defined)
    assert probed["probe_train_pairs"] == 64  # fit on the train split, not on val
    assert "finding probe AUC (fit on 64 train pairs" in proc.stdout
    assert "pneumothorax_left" in proc.stdout

    proc = _evaluate("--workdir", workdir, "--step", 5)
    assert proc.returncode == 2 and "No checkpoint for step 5" in proc.stderr


def test_standalone_retrieval_refuses_what_it_cannot_score(tmp_path):
    from mimjax.evaluators import retrieval_checkpoint

    with pytest.raises(ValueError, match="image-report checkpoint"):
        retrieval_checkpoint.evaluate_checkpoint(str(tmp_path), config="configs/demo.py:tiny")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        retrieval_checkpoint.evaluate_checkpoint(str(tmp_path), config="configs/mcr_demo.py:tiny")
    with pytest.raises(ValueError, match="split must be one of"):
        retrieval_checkpoint.evaluate_checkpoint(str(tmp_path), split="holdout",
                                                 config="configs/mcr_demo.py:tiny")
