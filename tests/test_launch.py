"""tools/launch: the TPU pod and SLURM launchers map their environment to the right
commands. gcloud, srun, curl, sudo and the worker's Python are stubs first on PATH that
record their arguments, so nothing here reaches a network or a cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tools" / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
BASH = shutil.which("bash")
# The worker runs the --command string in its login shell; checking it under a strict
# POSIX shell (dash where there is one) keeps it free of bash-only syntax.
POSIX_SH = shutil.which("dash") or shutil.which("sh") or BASH

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

# Values that a second shell parse would mangle if quoting were wrong.
TRICKY_ARGS = ["--config", "configs/mae_vit_b16.py:base", "--workdir", "/mnt/shared/my run",
               "--config.note=it's $HOME `x` \\n", "--config.model.scales=[112, 224]",
               "two\nlines"]

STUB = """#!{python} -S
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": dict(os.environ)}}) + "\\n")
args = sys.argv[1:]
if name == "gcloud" and "describe" in args:
    print(os.environ.get("FAKE_TPU_WORKERS", "2"))
elif name == "curl":
    key = "FAKE_MD_" + args[-1].rsplit("/", 1)[1].replace("-", "_")
    if key not in os.environ:
        sys.exit(22)
    print(os.environ[key], end="")
elif name == "sudo" and args[:1] == ["lsof"]:
    print("4242\\n4343")
elif name == "pgrep":
    sys.exit(1)
"""


@pytest.fixture
def stubs(tmp_path):
    """A PATH with recording stubs first; returns (env, read_records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    names = ["gcloud", "srun", "curl", "sudo", "pgrep", "pkill"]
    for name in names:
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    for name in ("setsid", "nohup"):  # pass-throughs where the system has none
        if shutil.which(name) is None:
            path = bin_dir / name
            path.write_text('#!/bin/sh\nexec "$@"\n')
            path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    home = tmp_path / "home"
    home.mkdir()
    # A minimal environment: nothing of the test process (its XLA_FLAGS above all) leaks in.
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": str(home), "STUB_LOG": str(log), "LANG": "C.UTF-8", "TMPDIR": str(tmp_path)}

    def records(prog=None):
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]

    return env, records


def run(script, args, env, **extra_env):
    return subprocess.run([BASH, str(script), *args], env={**env, **extra_env},
                          capture_output=True, text=True, timeout=30, check=False)


def flag_value(argv, name):
    """The value of `--name=VALUE` in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def pod_env(env):
    return {**env, "TPU_NAME": "pod", "TPU_ZONE": "us-central2-b"}


def wait_for(records, prog, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if got := records(prog):
            return got
        time.sleep(0.05)
    raise AssertionError(f"{prog} was never called")


# ------------------------------------------------------------------------------ both
@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- TPU pods
def test_tpu_help_lists_subcommands(stubs):
    env, records = stubs
    proc = run(TPU, ["--help"], env)
    assert proc.returncode == 0
    for word in ("setup", "run", "logs", "stop", "TPU_NAME", "TPU_ZONE", "--dry-run"):
        assert word in proc.stdout
    assert records() == []


@pytest.mark.parametrize("missing,word", [("TPU_NAME", "TPU_NAME"), ("TPU_ZONE", "TPU_ZONE")])
def test_tpu_missing_name_or_zone_is_a_clear_error(stubs, missing, word):
    env, records = stubs
    env = pod_env(env)
    del env[missing]
    proc = run(TPU, ["run", "--", "--config", "configs/demo.py", "--workdir", "w"], env)
    assert proc.returncode == 2
    assert word in proc.stderr and "Traceback" not in proc.stderr
    assert records("gcloud") == []


@pytest.mark.parametrize("args,message", [
    (["run"], "needs main.py arguments"),
    (["run", "--config", "x"], "main.py arguments go after --"),
    (["launch"], "unknown subcommand"),
    ([], "no subcommand"),
    (["stop", "--", "--config", "x"], "only run takes main.py arguments"),
])
def test_tpu_usage_errors(stubs, args, message):
    env, records = stubs
    proc = run(TPU, args, pod_env(env))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert records("gcloud") == []


def tpu_run_command(stubs, *extra_args, **extra_env):
    """The gcloud call `run` makes, and the --command string it sends to the workers."""
    env, records = stubs
    proc = run(TPU, [*extra_args, "run", "--", *TRICKY_ARGS], pod_env(env), **extra_env)
    assert proc.returncode == 0, proc.stderr
    (call,) = records("gcloud")
    return call["argv"], flag_value(call["argv"], "--command")


def test_tpu_run_targets_every_worker(stubs):
    argv, _ = tpu_run_command(stubs, "--project", "my-proj")
    assert argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
    assert "pod" in argv and "--worker=all" in argv
    assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv


@pytest.mark.parametrize("endpoints,coordinator", [
    ("t1v-n-0-w-0,t1v-n-0-w-1,t1v-n-0-w-2,t1v-n-0-w-3", "t1v-n-0-w-0"),  # hostnames
    ("ab12:0:10.130.0.2,ab13:1:10.130.0.3,ab14:2:10.130.0.4,ab15:3:10.130.0.5",
     "10.130.0.2"),  # name:id:ip triples of older images
])
def test_tpu_run_on_a_worker(stubs, endpoints, coordinator):
    """The worker's script, run here under a POSIX shell with a fake metadata server:
    main.py gets the pinned port, this worker's id, the worker count, then the
    arguments exactly as given, in the background, logging to logs/worker-<id>.log."""
    env, records = stubs
    _, script = tpu_run_command(stubs, "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2")
    home = Path(env["HOME"])
    (home / "mimjax").mkdir()
    venv_python = home / "mimjax-venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    shutil.copy(shutil.which("gcloud", path=env["PATH"]), venv_python)
    proc = subprocess.run([POSIX_SH, "-c", script], cwd=home, capture_output=True, text=True,
                          timeout=30, check=False,
                          env={**env, "FAKE_MD_agent_worker_number": "3",
                               "FAKE_MD_worker_network_endpoints": endpoints})
    assert proc.returncode == 0, proc.stderr
    assert "worker 3: started" in proc.stdout
    (call,) = wait_for(records, "python")
    assert call["argv"] == ["main.py", "--distributed=on", f"--coordinator={coordinator}:8476",
                            "--num-processes=4", "--process-id=3", *TRICKY_ARGS]
    assert call["cwd"] == str(home / "mimjax")
    assert call["env"]["PYTHONUNBUFFERED"] == "1"
    assert call["env"]["LIBTPU_INIT_ARGS"] == "--xla_a=1 --xla_b=2"
    log = home / "mimjax" / "logs" / "worker-3.log"
    assert f"worker 3 of 4, coordinator {coordinator}:8476" in log.read_text()
    curls = [r["argv"][-1] for r in records("curl")]
    assert any(url.endswith("/attributes/agent-worker-number") for url in curls)


def test_tpu_run_refuses_without_metadata(stubs):
    env, records = stubs
    _, script = tpu_run_command(stubs)
    (Path(env["HOME"]) / "mimjax").mkdir()
    proc = subprocess.run([POSIX_SH, "-c", script], cwd=env["HOME"], capture_output=True,
                          text=True, timeout=30, check=False, env=env)
    assert proc.returncode != 0 and "agent-worker-number" in proc.stderr
    assert records("python") == []


def test_tpu_compilation_cache_and_port(stubs):
    _, script = tpu_run_command(stubs, COMPILATION_CACHE_DIR="gs://bucket/xla cache",
                                TPU_COORDINATOR_PORT="8477")
    assert "set -- '--config.compilation_cache_dir=gs://bucket/xla cache' '--config'" in script
    assert "port='8477'" in script


def test_tpu_compilation_cache_is_not_added_twice(stubs):
    env, records = stubs
    proc = run(TPU, ["run", "--", "--config", "c.py", "--config.compilation_cache_dir", "/a"],
               pod_env(env), COMPILATION_CACHE_DIR="/other-cache")
    assert proc.returncode == 0, proc.stderr
    script = flag_value(records("gcloud")[0]["argv"], "--command")
    assert "/other-cache" not in script and "'--config.compilation_cache_dir' '/a'" in script


def test_tpu_worker_scripts_cannot_match_their_own_pgrep(stubs):
    """pkill/pgrep -f match whole command lines, the shell running the script included;
    the pattern must find a run without finding that shell."""
    env, records = stubs
    _, run_script = tpu_run_command(stubs)
    assert run(TPU, ["stop"], pod_env(env)).returncode == 0
    stop_script = flag_value(records("gcloud")[-1]["argv"], "--command")
    pattern = r"[p]ython main\.py"
    for script in (run_script, stop_script):
        assert pattern in script and not re.search(pattern, script)
    assert re.search(pattern, "/home/u/mimjax-venv/bin/python main.py --config c.py")


def test_tpu_stop_terminates_then_frees_the_tpu(stubs):
    env, records = stubs
    proc = run(TPU, ["stop", "--grace", "0"], pod_env(env))
    assert proc.returncode == 0, proc.stderr
    (call,) = records("gcloud")
    assert "--worker=all" in call["argv"]
    script = flag_value(call["argv"], "--command")
    proc = subprocess.run([POSIX_SH, "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["argv"][0] for r in records("pkill")] == ["-TERM", "-KILL"]
    sudo = [r["argv"] for r in records("sudo")]
    assert sudo[0][:2] == ["lsof", "-t"]
    assert sudo[1] == ["kill", "-9", "4242", "4343"]


def test_tpu_setup(stubs):
    env, records = stubs
    version = re.search(r'"jax>=([0-9.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    proc = run(TPU, ["setup"], pod_env(env), DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert records() == []  # a dry run only prints
    out = proc.stdout
    assert f"git -C {REPO} archive --format=tar.gz" in out and " HEAD" in out
    assert re.search(r"gcloud compute tpus tpu-vm scp .*pod:mimjax.tar.gz --worker=all", out)
    assert "gcloud compute tpus tpu-vm ssh --zone=us-central2-b pod --worker=all" in out
    assert f"jax_req='jax[tpu]=={version}'" in out
    assert 'pip install --quiet -e . "$jax_req"' in out
    remote = out.split("<<'REMOTE'\n", 1)[1].split("\nREMOTE\n", 1)[0]
    check = subprocess.run([POSIX_SH, "-n", "-c", remote], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr


def test_tpu_dry_run_prints_the_command_it_would_run(stubs):
    """Sourcing a dry run's output makes exactly the gcloud call a real run makes."""
    env, records = stubs
    real_argv, _ = tpu_run_command(stubs)
    proc = run(TPU, ["--dry-run", "run", "--", *TRICKY_ARGS], pod_env(env))
    assert proc.returncode == 0, proc.stderr
    assert len(records("gcloud")) == 1  # the dry run called nothing
    replay = subprocess.run([BASH, "-c", proc.stdout], env=env, capture_output=True, text=True,
                            check=False)
    assert replay.returncode == 0, replay.stderr
    assert records("gcloud")[-1]["argv"] == real_argv


def test_tpu_logs_copies_from_each_worker(stubs, tmp_path):
    env, records = stubs
    dest = tmp_path / "pod-logs"
    proc = run(TPU, ["logs", "--dest", str(dest)], pod_env(env), FAKE_TPU_WORKERS="3")
    assert proc.returncode == 0, proc.stderr
    calls = [r["argv"] for r in records("gcloud")]
    assert "describe" in calls[0]
    scps = calls[1:]
    assert [flag_value(c, "--worker") for c in scps] == ["0", "1", "2"]
    for c in scps:
        assert "pod:mimjax/logs/worker-*.log" in c and f"{dest}/" in c
    assert dest.is_dir()


def test_tpu_logs_worker_count_from_env(stubs, tmp_path):
    env, records = stubs
    proc = run(TPU, ["logs", "--dest", str(tmp_path / "d")], pod_env(env), TPU_NUM_WORKERS="2")
    assert proc.returncode == 0, proc.stderr
    calls = [r["argv"] for r in records("gcloud")]
    assert [flag_value(c, "--worker") for c in calls] == ["0", "1"]


# ------------------------------------------------------------------------------ SLURM
def slurm_env(env, submit_dir):
    return {**env, "SLURM_JOB_ID": "4321", "SLURM_SUBMIT_DIR": str(submit_dir),
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16", "SLURM_CPUS_PER_TASK": "16",
            "SLURM_GPUS_PER_TASK": "1", "SLURM_PROCID": "0"}


def slurm_call(stubs, tmp_path, args=TRICKY_ARGS, **extra_env):
    env, records = stubs
    submit = tmp_path / "repo"
    submit.mkdir(exist_ok=True)
    proc = run(SLURM, args, slurm_env(env, submit), **extra_env)
    assert proc.returncode == 0, proc.stderr
    (call,) = records("srun")
    return call, submit


RECOMMENDED_XLA_FLAGS = [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
]


def test_slurm_srun_command(stubs, tmp_path):
    call, submit = slurm_call(stubs, tmp_path)
    assert call["argv"] == ["--kill-on-bad-exit=1", "--cpus-per-task=16",
                            "--output=logs/%x-%j-%t.log", "--open-mode=append",
                            "python", "main.py", "--distributed=on", *TRICKY_ARGS]
    assert call["cwd"] == str(submit) and (submit / "logs").is_dir()
    env = call["env"]
    assert env["XLA_FLAGS"].split() == RECOMMENDED_XLA_FLAGS
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_slurm_overrides(stubs, tmp_path):
    call, _ = slurm_call(stubs, tmp_path, XLA_PYTHON_CLIENT_MEM_FRACTION="0.75",
                         XLA_FLAGS="--xla_dump_to=/tmp/d", MIMJAX_PYTHON="/opt/venv/bin/python",
                         COMPILATION_CACHE_DIR="/shared/xla cache", SLURM_GPUS_PER_TASK="")
    env = call["env"]
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.75"
    assert env["XLA_FLAGS"].split() == [*RECOMMENDED_XLA_FLAGS, "--xla_dump_to=/tmp/d"]
    assert "JAX_LOCAL_DEVICE_IDS" not in env  # tasks that see every GPU of their node
    assert call["argv"][4:] == ["/opt/venv/bin/python", "main.py", "--distributed=on",
                                "--config.compilation_cache_dir=/shared/xla cache",
                                *TRICKY_ARGS]


def test_slurm_own_xla_flags_and_cache_flag(stubs, tmp_path):
    args = ["--config", "c.py", "--config.compilation_cache_dir=/mine"]
    call, _ = slurm_call(stubs, tmp_path, args=args, GPU_XLA_FLAGS="",
                         XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false",
                         COMPILATION_CACHE_DIR="/other")
    assert call["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert call["argv"][-4:] == ["main.py", "--distributed=on", *args][-4:]
    assert "--config.compilation_cache_dir=/other" not in call["argv"]


def test_slurm_refuses_outside_a_job_or_without_arguments(stubs, tmp_path):
    env, records = stubs
    proc = run(SLURM, ["--config", "c.py", "--workdir", "w"], env)
    assert proc.returncode == 2 and "sbatch" in proc.stderr
    proc = run(SLURM, [], slurm_env(env, tmp_path))
    assert proc.returncode == 2 and "usage" in proc.stderr
    assert records("srun") == []


def test_slurm_header():
    """sbatch reads #SBATCH lines only before the first command."""
    lines = SLURM.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if i > 0 and line.strip() and not line.startswith("#"))
    header = [line.split(None, 1)[1] for line in lines[:first_command]
              if line.startswith("#SBATCH")]
    later = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert later == []
    options = dict(opt.lstrip("-").split("=", 1) for opt in header)
    assert options["gpus-per-task"] == "1"
    assert int(options["ntasks-per-node"]) >= 1 and int(options["cpus-per-task"]) >= 1
    assert options["signal"] in ("TERM@120", "B:TERM@120")
    assert options["output"].startswith("logs/")


def test_slurm_xla_flags_exist_in_the_pinned_jaxlib(stubs, tmp_path):
    """XLA rejects an unknown name in XLA_FLAGS when the backend starts, on any platform."""
    call, _ = slurm_call(stubs, tmp_path)
    code = "import jax; jax.numpy.zeros(2).block_until_ready()"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, check=False,
                        env={**call["env"], "JAX_PLATFORMS": "cpu"})
    assert ok.returncode == 0, ok.stderr[-2000:]
