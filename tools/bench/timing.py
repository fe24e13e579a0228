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

try:
    import resource
except ImportError:  # not POSIX
    resource = None


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

    def measured_run(self, n: int) -> dict:
        """Runs n steps: {"wall", "cpu", "sys" (seconds), "minflt", "majflt" (page
        faults)} of the process that ran them. A runner whose steps run in another
        process (its own `timed_run`) gives that process's figures where it reports
        them (`last_usage`, set by its `timed_run`), else None for sys and faults."""
        if type(self).timed_run is Timed.timed_run:
            before = process_usage()
            seconds = self.run(n)
            return {"wall": seconds, **usage_since(before)}
        seconds, cpu = self.timed_run(n)
        usage = getattr(self, "last_usage", None) or {}
        return {"wall": seconds, "cpu": cpu,
                **{k: usage.get(k) for k in ("sys", "minflt", "majflt")}}


def process_usage() -> dict | None:
    """This process's CPU seconds (all threads; user + system, system) and page faults
    (minor: memory mapped without I/O, e.g. freshly allocated pages; major: read from
    disk) so far; None where `resource` is missing."""
    if resource is None:
        return None
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": u.ru_utime + u.ru_stime, "sys": u.ru_stime,
            "minflt": u.ru_minflt, "majflt": u.ru_majflt}


def usage_since(before: dict | None) -> dict:
    """process_usage() now minus `before` ({"cpu", "sys", "minflt", "majflt"})."""
    after = process_usage()
    if before is None or after is None:
        return {"cpu": None, "sys": None, "minflt": None, "majflt": None}
    return {k: after[k] - before[k] for k in after}


def time_interleaved(runners: list[Timed], *, warmup: int, steps: int, windows: int,
                     log, after_round=None, after_warmup=None) -> dict[str, dict[str, list[float]]]:
    """Warm every runner up (calling `after_warmup(runner)` after each runner's warm-up),
    then alternate timed windows of `steps` steps between them (calling
    `after_round()` after each round). With several runners every window
    starts with one untimed step: a step allocates and frees its buffers, and memory a
    process freed while the other one ran costs far more to fault back in (measured on
    a 2-core VM: ViT-B 7.5 s/step instead of 6.0 when timed from the first step).
    Returns {name: {"wall": [seconds per step, one per window], "cpu": [CPU seconds per
    step, one per window], "sys": [system CPU seconds per step, ...], "minflt" / "majflt":
    [minor / major page faults per step, ...]}} (see Timed.measured_run; None entries
    where a runner does not report them)."""
    for r in runners:
        if warmup:
            seconds = r.run(warmup)
            log(f"[{r.name}] warm-up: {warmup} steps in {seconds:.2f} s")
        if after_warmup is not None:
            after_warmup(r)
    keys = ("wall", "cpu", "sys", "minflt", "majflt")
    times: dict[str, dict[str, list]] = {r.name: {k: [] for k in keys} for r in runners}
    for w in range(windows):
        for r in runners:
            if len(runners) > 1:
                r.run(1)
            measured = r.measured_run(steps)
            for k in keys:
                v = measured.get(k)
                times[r.name][k].append(None if v is None else v / steps)
            faults = ("" if measured.get("minflt") is None else
                      f", {measured['minflt'] / steps:.0f} minor page faults and "
                      f"{measured['sys'] / steps:.2f} s system CPU per step")
            log(f"[{r.name}] window {w + 1}/{windows}: {measured['wall'] / steps:.4f} "
                f"s/step{faults}")
        if after_round is not None:
            after_round()
    return times


def summarize(times: dict[str, list[float]], batch: int, cores: int) -> dict:
    """Median / mean / spread of the per-window step times. `cpu_utilization` is process
    CPU time / (wall time x cores): below 1 when threads sit idle or other processes
    take the cores (then `host_load_avg` is high too). System CPU time and page
    faults per step (median over the windows, and one per window): a step that maps
    fresh memory for its buffers shows them (see mimjax.host_memory); None where the
    runner does not report them."""
    wall = times["wall"]
    median = statistics.median(wall)
    out = {"step_time_s": median, "step_time_mean_s": statistics.fmean(wall),
           "step_time_min_s": min(wall), "step_time_max_s": max(wall),
           "step_times_s": wall, "img_per_s": batch / median,
           "cpu_s_per_step": statistics.median(times["cpu"]),
           "cpu_utilization": statistics.fmean(c / w for c, w in zip(times["cpu"], wall)) / cores}
    for key, name in (("sys", "sys_s"), ("minflt", "minor_faults"), ("majflt", "major_faults")):
        values = times.get(key) or [None]
        known = None not in values
        out[f"{name}_per_step"] = statistics.median(values) if known else None
        out[f"{name}_per_step_windows"] = values if known else None
    return out


# ----------------------------------------------------------------------------- allocator
# `--allocator`: the C allocator both sides of a comparison run under. "auto": as each
# runs for a user (mimjax with mimjax.host_memory's setting, the reference process with
# its C library's default); "system": the C library's default for both; "retain":
# host_memory's glibc setting for both (mallopt here, GLIBC_TUNABLES in the reference
# process); "hugetlb": glibc with transparent huge pages for its heap
# (GLIBC_TUNABLES=glibc.malloc.hugetlb=1); "tcmalloc", "jemalloc" or a path to a
# malloc library: that library preloaded (LD_PRELOAD) into both.
ALLOCATORS = ("auto", "system", "retain", "hugetlb", "tcmalloc", "jemalloc")
_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")


def allocator_library(name: str) -> str:
    """The shared library behind `--allocator NAME` (tcmalloc, jemalloc, or a path)."""
    import ctypes.util
    import glob

    from tools import cli

    if name not in _LIBRARIES:
        if os.path.isfile(name):
            return os.path.abspath(name)
        raise cli.UsageError(f"--allocator {name!r}: expected one of {', '.join(ALLOCATORS)} "
                             "or the path of a malloc library (.so).")
    dirs = (os.path.join(sys.prefix, "lib"),) + _LIBRARY_DIRS
    for lib in _LIBRARIES[name]:
        for d in dirs:
            found = sorted(glob.glob(os.path.join(d, f"lib{lib}.so*")))
            if found:
                return found[0]
        if ctypes.util.find_library(lib):
            return ctypes.util.find_library(lib)
    raise cli.UsageError(
        f"--allocator {name}: no lib{'/lib'.join(_LIBRARIES[name])}.so found (looked in "
        f"{', '.join(dirs)} and the linker's cache). Install it (Debian/Ubuntu: apt-get "
        f"install {'libtcmalloc-minimal4' if name == 'tcmalloc' else 'libjemalloc2'}) or "
        f"pass its path: --allocator /path/to/lib{_LIBRARIES[name][0]}.so.")


def prepare_allocator(name: str, *, program: bool) -> dict:
    """Sets up `--allocator NAME` for this process (before JAX starts) and returns
    {"allocator", "mimjax", "reference", "reference_env"}: what this process and a
    reference process run with, and the variables the latter is to start with. A
    setting that a process can only take when it starts (GLIBC_TUNABLES, LD_PRELOAD)
    re-executes this program with it (`program`: run as a program; otherwise the
    caller must start with it)."""
    from mimjax import host_memory
    from tools import cli

    startup, inprocess, reference = {}, {}, {}
    if name == "system":
        inprocess = {host_memory.ENV: "system"}
    elif name == "retain":
        inprocess = {host_memory.ENV: "retain"}
        reference = {"GLIBC_TUNABLES": host_memory.TUNABLES}
    elif name == "hugetlb":
        startup = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    elif name != "auto":
        startup = {"LD_PRELOAD": allocator_library(name)}
    missing = {k: v for k, v in startup.items() if os.environ.get(k) != v}
    if missing:
        settings = " ".join(f"{k}={v}" for k, v in missing.items())
        if not program or "jax" in sys.modules:
            raise cli.UsageError(f"--allocator {name} needs {settings} from the start of "
                                 "the process: run tools/benchmark.py as a program, or "
                                 "start it with that environment.")
        log(f"[allocator] restarting with {settings}")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**os.environ, **missing})
    os.environ.update(inprocess)
    status = host_memory.configure()
    described = " ".join(f"{k}={v}" for k, v in startup.items())
    # A reference process inherits the startup settings; `reference_env` comes on top.
    reference_text = described or " ".join(f"{k}={v}" for k, v in reference.items())
    return {"allocator": name, "mimjax": described or f"host_memory: {status}",
            "reference": reference_text or "C library default", "reference_env": reference}


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
