"""Throughput accounting: FLOPs of a compiled step, a measured matmul peak, MFU.

MFU here is (XLA's FLOP count of the compiled step) / (step time) / (peak FLOP/s of
the devices). The peak is taken from config when given (e.g. 989e12 for an H100 SXM
bf16 dense) or measured by timing a large matmul in the same process, which on CPU
is the only honest peak available.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def compiled_flops(compiled) -> float | None:
    """Total FLOPs per call of a compiled jax function, per XLA cost analysis
    (per device for an SPMD-partitioned program), or None if unavailable."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def measure_matmul_peak(dtype=jnp.float32, size: int | None = None, repeats: int = 5,
                        device: jax.Device | None = None) -> float:
    """Best observed FLOP/s of a square matmul on one device. Runs under a mesh of
    that device alone: a run's first step measures it inside the run's mesh, which a
    one-device computation may not use when the mesh has several devices."""
    device = device or jax.devices()[0]
    if size is None:
        size = 2048 if device.platform == "cpu" else 8192
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("matmul",))):
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
        b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
        matmul = jax.jit(jnp.matmul)
        matmul(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(config_peak_tflops: float | None, dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if config_peak_tflops:
        return float(config_peak_tflops) * 1e12, "config"
    return measure_matmul_peak(dtype), "measured matmul"
