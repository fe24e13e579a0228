"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import types  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == NUM_DEVICES, (
        f"tests need {NUM_DEVICES} simulated devices, got {jax.device_count()}; JAX was "
        "initialised before tests/conftest.py set XLA_FLAGS")


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

    config = trainer_config(mesh_cfg or {"data": -1, "fsdp": 1, "tensor": 1}, model, **overrides)
    mesh = sharding.make_mesh(config.mesh, devices)
    schedule = optim.make_schedule(config.optimizer, global_batch_size=16, total_steps=10,
                                   warmup_steps=2)
    tx = optim.make_optimizer(config.optimizer, schedule)
    spec = train.ModelSpec.from_config(config.model)
    state, abstract, shardings = train.create_train_state(config, mesh, spec, tx)
    return types.SimpleNamespace(config=config, mesh=mesh, spec=spec, tx=tx, schedule=schedule,
                                 state=state, abstract=abstract, shardings=shardings)
