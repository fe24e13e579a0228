"""The multi-process path for real: 2 local processes with 2 CPU devices each, gloo
collectives, JAX's distributed runtime started by main.py's flags on free localhost
ports, against 1 process on 4 devices.

- the processes' batches, stacked in process order, are the 1-process batch, step by
  step (records, augmentations, example ids);
- losses and final parameters equal the 1-process run's, the 2-process mesh built
  with an outer data-parallel factor across processes (tolerance below: the
  cross-process all-reduce sums in another order, so not bitwise);
- the 2-process checkpoint restores in 1 process on 4 and on 1 device, with the same
  parameters and the data position after the last step;
- SIGTERM to one process stops both at the same step, saved, exit 0;
- SIGKILL of one process makes the other exit non-zero within a bounded time;
- fine-tuning and landmark runs (best-checkpoint val evals, test metrics) finish.

Every process is ended by its pid whatever happens. About 2-3 minutes on 2 cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mimjax import checkpoint, optim, run_config, sharding, train
from mimjax.models.spec import ModelSpec

from helpers import REPO, metric_records

CONFIG = "configs/demo.py:tiny"
NUM_BATCHES = 3
# Losses: 1 process vs 2 agree to ~2e-7 relative (measured); parameters after 8
# AdamW steps to ~1e-6. The bounds leave an order of magnitude.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
START_TIMEOUT = 240  # seconds for a whole run of the tiny demo
KILL_EXIT_WITHIN = 90  # seconds: heartbeat timeout (10 s) + gloo's error path
HEARTBEAT = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # not the test process's 8 simulated devices
    return env


def _overrides(data_dir, *extra) -> list[str]:
    return [f"--config.data.dir={data_dir}", *extra]


def _start(args: list[str], log: Path, devices: int) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(devices),
                                stdout=out, stderr=subprocess.STDOUT)


def _distributed_flags(port: int, process: int) -> list[str]:
    return ["--coordinator", f"localhost:{port}", "--num-processes", "2",
            "--process-id", str(process), "--heartbeat-timeout", str(HEARTBEAT)]


def _end(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _wait_all(procs, logs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            _end(procs)
            raise AssertionError(f"process did not finish in {timeout} s; log:\n"
                                 f"{Path(log).read_text()[-3000:]}") from None
    return [p.returncode for p in procs]


def _tail(log) -> str:
    return "\n".join(line for line in Path(log).read_text().splitlines()
                     if not line.startswith("[Gloo]"))[-3000:]


def _worker(dump: Path, workdir: Path, data_dir, *extra) -> list[str]:
    return ["tests/multiprocess_worker.py", str(dump), str(NUM_BATCHES), "--",
            "--config", CONFIG, "--workdir", str(workdir), *extra, *_overrides(data_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny demo trained by 1 process on 4 devices and by 2 processes on 2 each."""
    root = tmp_path_factory.mktemp("multiprocess")
    data_dir = root / "data"
    one = _start(_worker(root / "dump1", root / "one", data_dir), root / "one.log", 4)
    try:  # the phantom is rendered by this run; the 2 processes then find it
        assert _wait_all([one], [root / "one.log"], START_TIMEOUT) == [0], _tail(root / "one.log")
        port = _free_port()
        logs = [root / f"two_p{p}.log" for p in range(2)]
        # The data axis as 2 groups of processes x 2 devices (mesh.dcn_data): the
        # multi-node / multi-slice layout, here one group per process.
        procs = [_start(_worker(root / "dump2", root / "two", data_dir,
                                *_distributed_flags(port, p), "--config.mesh.dcn_data=2"),
                        logs[p], 2) for p in range(2)]
        try:
            codes = _wait_all(procs, logs, START_TIMEOUT)
        finally:
            _end(procs)
        assert codes == [0, 0], "\n\n".join(_tail(log) for log in logs)
    finally:
        _end([one])
    return root


def test_each_process_logs_its_place(runs):
    for p in range(2):
        text = (runs / f"two_p{p}.log").read_text()
        assert f"Process {p} of 2 (explicit coordinator" in text
        assert "2 local device(s)" in text and "4 global device(s) on cpu" in text


def test_process_batches_together_are_the_one_process_batch(runs):
    single = np.load(runs / "dump1" / "batches_p0.npz")
    parts = [np.load(runs / "dump2" / f"batches_p{p}.npz") for p in range(2)]
    assert {f"example_id_{i}" for i in range(NUM_BATCHES)} <= set(single.files)
    for key in single.files:
        assert parts[0][key].shape[0] == single[key].shape[0] // 2
        np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]),
                                      single[key], err_msg=key)


def test_losses_equal_the_one_process_run(runs):
    one = [r for r in metric_records(runs / "one") if "loss" in r]
    two = [r for r in metric_records(runs / "two") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for key in ("loss", "loss_32", "loss_64", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=LOSS_RTOL, err_msg=key)


def _restore(workdir: Path, devices) -> tuple[dict, int]:
    """The latest checkpoint of `workdir` restored as `Run` restores it, onto a mesh
    of `devices` in this (single) process; returns (params, data position)."""
    config = run_config.load(CONFIG, [])
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    spec = ModelSpec.from_config(config.model)
    tx = optim.make_optimizer(config.optimizer, optim.make_schedule(
        config.optimizer, global_batch_size=config.global_batch_size,
        total_steps=config.total_steps, warmup_steps=config.warmup_steps))
    _, abstract, shardings = train.create_train_state(config, mesh, spec, tx)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    try:
        step = ckpt.latest_step()
        position = _Position()
        state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings),
                             position)
    finally:
        ckpt.close()
    assert int(jax.device_get(state.step)) == step == 8
    return jax.tree.map(np.asarray, jax.device_get(state.params)), position.state


class _Position:
    """Stands in for the data iterator: receives the restored state."""
    state = None

    def set_state(self, state):
        self.state = state


@pytest.mark.parametrize("num_devices", [4, 1])
def test_checkpoint_restores_in_one_process(runs, num_devices):
    reference, _ = _restore(runs / "one", jax.devices()[:4])
    params, position = _restore(runs / "two", jax.devices()[:num_devices])
    assert position == {"global_position": 8 * 8}  # 8 steps of global batch 8
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                            jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, atol=PARAM_ATOL, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    # The iterator state was written once, topology-free (not one file per process).
    data_dir = runs / "two" / "checkpoints" / "8" / "data_iter"
    assert not list(data_dir.glob("process_*"))


def _start_pair(root: Path, data_dir, *extra) -> tuple[list[subprocess.Popen], list[Path]]:
    port = _free_port()
    logs = [root / f"p{p}.log" for p in range(2)]
    procs = [_start(["main.py", "--config", CONFIG, "--workdir", str(root / "work"),
                     *_distributed_flags(port, p), *_overrides(data_dir, *extra)], logs[p], 2)
             for p in range(2)]
    return procs, logs


def _wait_for_step(workdir: Path, step: int, procs, logs, timeout: float = START_TIMEOUT):
    deadline = time.monotonic() + timeout
    metrics = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a process ended early:\n" + "\n\n".join(map(_tail, logs)))
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout} s:\n" + "\n\n".join(map(_tail, logs)))


LONG_RUN = ("--config.total_steps=100000", "--config.checkpoint_every=100000",
            "--config.figure_every=100000")


def test_sigterm_on_one_process_stops_every_process_at_one_step(runs, tmp_path):
    procs, logs = _start_pair(tmp_path, runs / "data", *LONG_RUN)
    try:
        _wait_for_step(tmp_path / "work", 3, procs, logs)
        procs[1].send_signal(signal.SIGTERM)
        codes = _wait_all(procs, logs, 120)
    finally:
        _end(procs)
    assert codes == [0, 0], "\n\n".join(map(_tail, logs))
    stopped = []
    for log in logs:
        lines = [line for line in Path(log).read_text().splitlines()
                 if "Stopped by SIGTERM at step" in line]
        assert len(lines) == 1, _tail(log)
        stopped.append(int(lines[0].split("at step ")[1].split(";")[0]))
    assert stopped[0] == stopped[1] >= 3
    ckpt = checkpoint.Checkpointer(str(tmp_path / "work" / "checkpoints"))
    try:
        assert ckpt.latest_step() == stopped[0]
    finally:
        ckpt.close()


@pytest.mark.parametrize("config", ["configs/finetune_cbis_pathology.py:tiny",
                                    "configs/landmarks_hand.py:tiny"])
def test_tasks_with_best_checkpoints_finish_in_two_processes(config, runs, tmp_path):
    """Fine-tuning and landmark runs (val evals keeping the best in WORKDIR/best, whose
    checkpoint manager is created by every process together, then test metrics)."""
    port = _free_port()
    logs = [tmp_path / f"p{p}.log" for p in range(2)]
    procs = [_start(["main.py", "--config", config, "--workdir", str(tmp_path / "work"),
                     *_distributed_flags(port, p), f"--config.data.dir={runs / 'data'}"],
                    logs[p], 2) for p in range(2)]
    try:
        codes = _wait_all(procs, logs, START_TIMEOUT)
    finally:
        _end(procs)
    assert codes == [0, 0], "\n\n".join(map(_tail, logs))
    test_metrics = json.loads((tmp_path / "work" / "test_metrics.json").read_text())
    assert test_metrics
    assert (tmp_path / "work" / "best").is_dir()


def test_killing_one_process_ends_the_other_with_an_error(runs, tmp_path):
    procs, logs = _start_pair(tmp_path, runs / "data", *LONG_RUN)
    try:
        _wait_for_step(tmp_path / "work", 3, procs, logs)
        procs[1].kill()
        killed_at = time.monotonic()
        try:
            procs[0].wait(timeout=KILL_EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process 0 still runs {KILL_EXIT_WITHIN} s after process 1 "
                                 f"was killed:\n{_tail(logs[0])}") from None
        waited = time.monotonic() - killed_at
    finally:
        _end(procs)
    assert procs[0].returncode != 0, _tail(logs[0])
    print(f"process 0 exited {procs[0].returncode} {waited:.1f} s after process 1 was killed")
