"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend.
Shared helpers live in tests/helpers.py."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == NUM_DEVICES, (
        f"tests need {NUM_DEVICES} simulated devices, got {jax.device_count()}; JAX was "
        "initialised before tests/conftest.py set XLA_FLAGS")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory per test module: phantoms are rendered there once."""
    return tmp_path_factory.mktemp("data")
