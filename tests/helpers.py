"""Shared test helpers: tiny model and trainer configs, a sharded training set-up,
and the one way tests run main.py and the tools in a subprocess.

(tests/conftest.py only sets up the simulated devices; these are imported where
used: `from helpers import ...`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- configs
def tiny_model_config(scales=(32, 64), **overrides) -> ml_collections.ConfigDict:
    """A ViT small enough for CPU tests: width 64, 2 blocks, patch 8."""
    cfg = ml_collections.ConfigDict(dict(
        name="mae", variant="Ti/8", width=64, depth=2, num_heads=4, mlp_dim=128,
        image_size=scales[0], scales=list(scales), channels=1, posemb="sincos2d",
        class_token=True, dtype="float32", layer_norm_eps=1e-6, gelu_approximate=True,
        scan=False, remat=False, attention="xla",
        decoder=dict(width=32, depth=1, num_heads=2, mlp_dim=None, posemb="sincos2d")))
    cfg.update(overrides)
    return cfg


def trainer_config(mesh, model=None, **overrides) -> ml_collections.ConfigDict:
    """The config fields the train step needs, around `tiny_model_config` (MIRAM 32 -> 64)."""
    cfg = ml_collections.ConfigDict(dict(
        seed=0, model=model or tiny_model_config(), mesh=mesh, ema_decay=0.0,
        objectives=dict(masked_reconstruction=dict(weight=1.0, mask_ratio=0.75,
                                                   norm_pix_loss=True, scale_weights=[1.0, 0.5])),
        optimizer=dict(base_lr=1e-3, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.05, grad_clip_norm=1.0),
        sharding_rules=None, global_batch_size=16))
    cfg.update(overrides)
    return cfg


def random_batch(batch_size=16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image_32": rng.normal(size=(batch_size, 32, 32, 1)).astype(np.float32),
            "image_64": rng.normal(size=(batch_size, 64, 64, 1)).astype(np.float32)}


def training_setup(mesh_cfg=None, devices=None, model=None, **overrides) -> types.SimpleNamespace:
    """Config, mesh, model spec, optimizer, schedule and a sharded initial state."""
    from mimjax import optim, sharding, train
    from mimjax.models.spec import ModelSpec

    config = trainer_config(mesh_cfg or {"data": -1, "fsdp": 1, "tensor": 1}, model, **overrides)
    mesh = sharding.make_mesh(config.mesh, devices)
    schedule = optim.make_schedule(config.optimizer, global_batch_size=16, total_steps=10,
                                   warmup_steps=2)
    tx = optim.make_optimizer(config.optimizer, schedule)
    spec = ModelSpec.from_config(config.model)
    state, abstract, shardings = train.create_train_state(config, mesh, spec, tx)
    return types.SimpleNamespace(config=config, mesh=mesh, spec=spec, tx=tx, schedule=schedule,
                                 state=state, abstract=abstract, shardings=shardings)


# --------------------------------------------------------------------------- subprocesses
def one_device_env(**extra) -> dict[str, str]:
    """The environment of a user's laptop: one CPU device, unbuffered output."""
    return dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1", **extra)


def main_command(config: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, "main.py", "--config", config, "--workdir", str(workdir),
            *overrides]


def run_main(config: str, workdir, *overrides: str, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """`python main.py --config CONFIG --workdir WORKDIR OVERRIDES...` on one device;
    with `check`, a non-zero exit fails the test with the end of its log."""
    proc = subprocess.run(main_command(config, workdir, *overrides), cwd=REPO,
                          env=one_device_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_main(config: str, workdir, *overrides: str, **popen_kwargs) -> subprocess.Popen:
    """main.py started in the background (stdout discarded, stderr piped by default)."""
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(main_command(config, workdir, *overrides), cwd=REPO,
                            env=one_device_env(), text=True, **popen_kwargs)


def run_tool(tool: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python tools/TOOL.py ARGS...` on one device (the caller checks the exit code)."""
    return subprocess.run([sys.executable, f"tools/{tool}.py", *map(str, args)], cwd=REPO,
                          env=one_device_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def metric_records(workdir) -> list[dict]:
    """Every record of WORKDIR/metrics.jsonl, in order."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------- pipelines
def take(it, n: int) -> list[dict[str, np.ndarray]]:
    """The next `n` batches of a pipeline iterator, copied (np.array) out of grain's
    shared-memory arrays before they are freed."""
    return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def assert_batches_equal(a, b) -> None:
    """Two lists of batches hold the same keys and bitwise-equal arrays."""
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (sorted(x), sorted(y))
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
