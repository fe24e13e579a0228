"""Multi-process settings from flags and environment (mimjax.distributed.resolve),
cluster detection, the config hash, and the mesh's refusal of a tensor axis across
processes. The real multi-process runs are in tests/test_multiprocess.py."""

import subprocess
import sys

import jax
import ml_collections
import pytest

from mimjax import distributed, sharding
from mimjax.distributed import DistributedError, resolve

from helpers import REPO


def test_one_process_without_flags_or_cluster():
    settings = resolve(environ={})
    assert settings.kwargs is None
    assert resolve("off", environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4",
                                   "SLURM_PROCID": "0"}).kwargs is None


def test_explicit_flags_and_their_environment_fallbacks():
    settings = resolve("auto", "10.0.0.1:8476", 4, 2, heartbeat_timeout=30, environ={})
    assert settings.kwargs == dict(coordinator_address="10.0.0.1:8476", num_processes=4,
                                   process_id=2, heartbeat_timeout_seconds=30)
    env = {"MIMJAX_COORDINATOR": "host:1234", "MIMJAX_NUM_PROCESSES": "2",
           "MIMJAX_PROCESS_ID": "1"}
    assert resolve(environ=env).kwargs == dict(
        coordinator_address="host:1234", num_processes=2, process_id=1,
        heartbeat_timeout_seconds=100)
    # A flag wins over its variable.
    assert resolve(process_id=0, environ=env).kwargs["process_id"] == 0


@pytest.mark.parametrize("args, env, message", [
    (("auto", "host:1", None, 0), {}, "missing --num-processes"),
    (("auto", "host", 2, 0), {}, "HOST:PORT"),
    (("auto", "host:1", 2, 2), {}, r"--process-id must be in 0\.\.1"),
    (("auto", "host:1", 0, 0), {}, "--num-processes must be >= 1"),
    (("auto", None, None, None), {"MIMJAX_NUM_PROCESSES": "two"}, "not an integer"),
    (("off", "host:1", 2, 0), {}, "drop one or the other"),
    (("sometimes", None, None, None), {}, "--distributed must be one of"),
])
def test_bad_settings_name_the_fix(args, env, message):
    with pytest.raises(DistributedError, match=message):
        resolve(*args, environ=env)


@pytest.mark.parametrize("env, cluster", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "3"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),  # the batch shell, not an srun task
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8471,10.0.0.2:8471"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpi"),
    ({}, None),
])
def test_cluster_detection(env, cluster):
    assert distributed.detect_cluster(env) == cluster
    settings = resolve(environ=env)
    assert (settings.kwargs is not None) == (cluster is not None)
    if cluster:  # JAX's own detection finds the coordinator and the ids
        assert settings.kwargs == {"heartbeat_timeout_seconds": 100}
    assert resolve("on", environ=env).kwargs == {"heartbeat_timeout_seconds": 100}


def test_config_digest_sees_every_field():
    a = ml_collections.ConfigDict({"x": 1, "nested": {"y": [1, 2]}})
    b = ml_collections.ConfigDict({"nested": {"y": [1, 2]}, "x": 1})
    assert distributed.config_digest(a) == distributed.config_digest(b)
    b.nested.y = [1, 3]
    assert distributed.config_digest(a) != distributed.config_digest(b)
    distributed.check_same_config(a)  # one process: nothing to compare


def test_mesh_dcn_factor_and_tensor_within_a_process():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # One process holds every device: no group of processes to spread dcn_data over.
    with pytest.raises(ValueError, match="dcn_data = 2"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                                          dcn_data=2)))
    with pytest.raises(ValueError, match="multiple of mesh.dcn_data"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                                                          dcn_data=2)))


class _FakeDevice:
    def __init__(self, process_index):
        self.process_index = process_index


def test_tensor_axis_across_processes_is_refused():
    # 2 processes x 2 devices; tensor=4 would need devices of both.
    devices = [_FakeDevice(p) for p in (0, 0, 1, 1)]
    mesh = type("M", (), {"shape": {"tensor": 4}, "devices": devices})()
    with pytest.raises(ValueError, match=r"mesh.tensor = 4 would span processes \[0, 1\]"):
        sharding._check_tensor_within_processes(mesh)
    mesh.shape = {"tensor": 2}
    sharding._check_tensor_within_processes(mesh)  # each pair within one process


def test_main_refuses_bad_distributed_flags_in_one_line():
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/demo.py:tiny", "--workdir", "/tmp/x",
         "--coordinator", "localhost:1", "--process-id", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "missing --num-processes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert jax.process_count() == 1
