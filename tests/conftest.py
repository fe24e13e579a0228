"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
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
