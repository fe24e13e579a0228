"""main.py end to end on the tiny demo: outputs, resume after SIGKILL and SIGTERM
(bitwise-identical losses to an uninterrupted run on CPU), the NaN guard."""

import json
import signal
import time
from pathlib import Path

import pytest

from helpers import metric_records, run_main, start_main

DEMO = "configs/demo.py:tiny"
LONG = ["--config.total_steps=120", "--config.checkpoint_every=5", "--config.log_every=1",
        "--config.figure_every=1000"]


def _run(workdir, data_dir, *overrides, check=True):
    return run_main(DEMO, workdir, f"--config.data.dir={data_dir}", *overrides, check=check)


def _losses(workdir) -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    # Eval records (e.g. the linear probe) carry no loss.
    return {r["step"]: r["loss"] for r in metric_records(workdir) if "loss" in r}


def _finished_steps(workdir) -> list[int]:
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _start_and_interrupt(workdir, data_dir, sig, after_step):
    proc = start_main(DEMO, workdir, f"--config.data.dir={data_dir}", *LONG)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(s >= after_step for s in _finished_steps(workdir)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, ("run ended before it could be interrupted:\n"
                                 + proc.stderr.read()[-3000:])
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, data_dir, *LONG)
    return _losses(workdir)


def test_demo_writes_metrics_events_figures_checkpoints(tmp_path, data_dir):
    proc = _run(tmp_path, data_dir)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]  # training steps
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"loss", "loss_32", "loss_64", "lr", "img_per_s", "mfu", "grad_norm"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss_32"] + r["loss_64"], rel=1e-5)
    # The demo's linear-probe eval hook, at each figure step.
    probes = [r for r in map(json.loads, lines) if "probe/pathology/auc_macro" in r]
    assert [r["step"] for r in probes] == [4, 8]
    assert all(0 <= r["probe/pathology/accuracy"] <= 1 for r in probes)
    # Fit on the phantom's train split of lesion crops (48 images: 38 / 5 / 5).
    assert all(r["probe/pathology/num_train"] == 38 for r in probes)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["recon_4.png", "recon_8.png"]
    assert _finished_steps(tmp_path)[-1] == 8
    assert "MFU" in proc.stderr and "img/s" in proc.stderr and "ETA" in proc.stderr
    # Re-running a finished workdir resumes at the end and does nothing.
    again = _run(tmp_path, data_dir)
    assert "nothing to do" in again.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data_dir, uninterrupted):
    code, _ = _start_and_interrupt(tmp_path, data_dir, signal.SIGKILL, after_step=20)
    assert code == -signal.SIGKILL
    killed_at = max(_losses(tmp_path))
    assert killed_at < 120
    _run(tmp_path, data_dir, *LONG)
    resumed = _losses(tmp_path)
    assert sorted(resumed) == list(range(1, 121))
    assert resumed == uninterrupted  # bitwise: same floats at every step


@pytest.mark.slow
def test_sigterm_saves_waits_and_exits_zero(tmp_path, data_dir, uninterrupted):
    code, stderr = _start_and_interrupt(tmp_path, data_dir, signal.SIGTERM, after_step=10)
    assert code == 0, stderr[-3000:]
    assert "SIGTERM" in stderr
    stopped_at = max(_losses(tmp_path))
    assert stopped_at < 120
    assert _finished_steps(tmp_path)[-1] == stopped_at  # saved exactly where it stopped
    _run(tmp_path, data_dir, *LONG)
    assert _losses(tmp_path) == uninterrupted


def test_nonfinite_guard_stops_with_a_clear_message(tmp_path, data_dir):
    proc = _run(tmp_path, data_dir, "--config.optimizer.base_lr=1e30",
                "--config.max_consecutive_nonfinite=3", "--config.total_steps=20", check=False)
    assert proc.returncode != 0
    assert "non-finite for 3 consecutive steps" in proc.stderr
    assert "last good checkpoint" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["nonfinite_streak"] >= 3
    # Checkpoints written before divergence are intact and loadable.
    assert _finished_steps(tmp_path)
