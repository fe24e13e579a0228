"""What every benchmark measures with: timed windows that alternate between runners,
their summary, the peak FLOP/s behind MFU, XLA's FLOP and memory figures of a compiled
step, the host's CPUs, and aligned tables. JAX is imported inside the functions that
need it, so that `--help` stays fast."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def log(message: str) -> None:
    """Progress lines go to stderr: stdout holds the table and the JSON only."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- windows
class Timed:
    """A thing to time: `run(n)` runs n steps and returns seconds, synchronised at the
    end only."""
    name = ""

    def run(self, n: int) -> float:
        raise NotImplementedError

    def timed_run(self, n: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the process that ran the steps)."""
        cpu = time.process_time()
        seconds = self.run(n)
        return seconds, time.process_time() - cpu


def time_interleaved(runners: list[Timed], *, warmup: int, steps: int, windows: int,
                     log, after_round=None, after_warmup=None) -> dict[str, dict[str, list[float]]]:
    """Warm every runner up (calling `after_warmup(runner)` after each runner's warm-up),
    then alternate timed windows of `steps` steps between them (calling
    `after_round()` after each round). With several runners every window
    starts with one untimed step: a step allocates and frees its buffers, and memory a
    process freed while the other one ran costs far more to fault back in (measured on
    a 2-core VM: ViT-B 7.5 s/step instead of 6.0 when timed from the first step).
    Returns {name: {"wall": [seconds per step, one per window], "cpu": [CPU seconds per
    step, one per window]}}."""
    for r in runners:
        if warmup:
            seconds = r.run(warmup)
            log(f"[{r.name}] warm-up: {warmup} steps in {seconds:.2f} s")
        if after_warmup is not None:
            after_warmup(r)
    times: dict[str, dict[str, list[float]]] = {r.name: {"wall": [], "cpu": []} for r in runners}
    for w in range(windows):
        for r in runners:
            if len(runners) > 1:
                r.run(1)
            seconds, cpu = r.timed_run(steps)
            times[r.name]["cpu"].append(cpu / steps)
            times[r.name]["wall"].append(seconds / steps)
            log(f"[{r.name}] window {w + 1}/{windows}: {seconds / steps:.4f} s/step")
        if after_round is not None:
            after_round()
    return times


def summarize(times: dict[str, list[float]], batch: int, cores: int) -> dict:
    """Median / mean / spread of the per-window step times. `cpu_utilization` is process
    CPU time / (wall time x cores): below 1 when threads sit idle or other processes
    take the cores (then `host_load_avg` is high too)."""
    wall = times["wall"]
    median = statistics.median(wall)
    return {"step_time_s": median, "step_time_mean_s": statistics.fmean(wall),
            "step_time_min_s": min(wall), "step_time_max_s": max(wall),
            "step_times_s": wall, "img_per_s": batch / median,
            "cpu_s_per_step": statistics.median(times["cpu"]),
            "cpu_utilization": statistics.fmean(c / w for c, w in zip(times["cpu"], wall)) / cores}


# ----------------------------------------------------------------------------- devices
def describe_devices() -> tuple[list, str, str]:
    """(devices, platform, a one-line description: the CPU model and cores on CPU)."""
    import jax

    devices = jax.devices()
    platform_name = devices[0].platform
    device = devices[0].device_kind
    if platform_name == "cpu":
        device = f"cpu ({cpu_name()}, {cores()} cores)"
    return devices, platform_name, device


class PeakMeter:
    """The peak FLOP/s behind MFU: `--peak-tflops`, else config peak_tflops_per_device,
    else the best of JAX matmuls timed in this run (`measure()`, called before the
    timed windows and after each round of them, so that it sees the same background
    load)."""

    def __init__(self, flag_tflops: float | None, config, dtype: str, log):
        import jax.numpy as jnp

        self.flag = flag_tflops
        self.tflops = flag_tflops or config.get("peak_tflops_per_device", None)
        self.matmul_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
        self.measured: list[float] = []
        self.log = log

    def measure(self) -> None:
        from mimjax import perf

        if not self.tflops:
            self.measured.append(perf.measure_matmul_peak(self.matmul_dtype, repeats=10))
            self.log(f"[peak] JAX matmul {self.measured[-1] / 1e12:.3f} TFLOP/s")

    def resolve(self, platform_name: str) -> dict:
        """{"per_device", "total" (FLOP/s), "source"} for the devices of this run."""
        import jax
        import jax.numpy as jnp

        num_devices = jax.device_count()
        if self.tflops:
            per_device = float(self.tflops) * 1e12
            source = "--peak-tflops" if self.flag else "config peak_tflops_per_device"
            return {"per_device": per_device, "total": per_device * num_devices,
                    "source": source}
        host_peak = max(self.measured)
        source = (f"measured: best {jnp.dtype(self.matmul_dtype).name} matmul "
                  f"(perf.measure_matmul_peak) on one device over {len(self.measured)} "
                  "measurements between the timed windows")
        per_device = host_peak
        if platform_name == "cpu":
            # Simulated CPU devices share the host's cores: the host peak is the total.
            per_device = host_peak / jax.local_device_count()
            if jax.local_device_count() > 1:
                source += (f"; the {jax.local_device_count()} CPU devices share the host's "
                           "cores, so per-device peak = measured / device count")
        return {"per_device": per_device, "total": per_device * num_devices, "source": source}

    def fields(self, resolved: dict) -> dict:
        """The report's peak figures, TFLOP/s; `resolved` is what `resolve` returned."""
        return {"peak_tflops": resolved["total"] / 1e12,
                "peak_tflops_per_device": resolved["per_device"] / 1e12,
                "peak_source": resolved["source"],
                "peak_tflops_measured": [m / 1e12 for m in self.measured]}


# ----------------------------------------------------------------------------- compiled
def xla_throughput(compiled, step_time: float, peak_per_device: float) -> dict:
    """XLA's FLOP count of the compiled step (all devices), TFLOP/s and MFU; None
    where the backend gives no cost analysis."""
    import jax

    from mimjax import perf

    flops_per_device = perf.compiled_flops(compiled)
    if not flops_per_device:
        return {"xla_gflops_per_step": None, "tflops_per_s": None, "mfu": None}
    return {"xla_gflops_per_step": flops_per_device * jax.device_count() / 1e9,
            "tflops_per_s": flops_per_device * jax.device_count() / step_time / 1e12,
            "mfu": flops_per_device / step_time / peak_per_device}


def compiled_memory(compiled) -> dict:
    """Per-device bytes of the compiled step from XLA's memory analysis: temporaries,
    arguments (state + batch), outputs, and outputs aliased to donated arguments.
    `compiled_peak_bytes` = temp + argument: what the step needs on a device at once
    (the donated state's outputs reuse its buffers). None where unavailable."""
    keys = ("temp", "argument", "output", "alias")
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        stats = None
    if stats is None:
        return {f"compiled_{k}_bytes": None for k in (*keys, "peak")}
    out = {f"compiled_{k}_bytes": int(getattr(stats, f"{k}_size_in_bytes")) for k in keys}
    out["compiled_peak_bytes"] = out["compiled_temp_bytes"] + out["compiled_argument_bytes"]
    return out


def device_memory() -> dict:
    """The first device's allocator figures where the backend reports them (GPU, TPU;
    None on CPU): peak_bytes_in_use is the process's high-water mark so far."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "device_bytes_in_use": stats.get("bytes_in_use")}


# ----------------------------------------------------------------------------- host CPUs
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """The cores this process may run on (XLA:CPU's intra-op pool has one thread each)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def descendant_cpu_seconds(root: int) -> dict[int, float]:
    """{pid: user + system CPU seconds} of every live descendant of `root` (Linux /proc;
    empty elsewhere). grain's prefetch workers are children of the process using them."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents, cpu = {}, {}
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parents[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    out = {}
    for pid, seconds in cpu.items():
        p, seen = parents.get(pid), 0
        while p is not None and p != root and p > 1 and seen < 64:
            p, seen = parents.get(p), seen + 1
        if p == root:
            out[pid] = seconds
    return out


# ----------------------------------------------------------------------------- tables
def format_rows(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned table lines: first column left-aligned, the others right-aligned."""
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(x, widths))) for x in rows]


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"
