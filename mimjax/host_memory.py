"""The host C allocator's handling of XLA:CPU's per-step buffers.

XLA:CPU allocates a step's temporaries as one buffer (1.4 GB for the ViT-B/16 MAE
step at batch 16, 224 px, f32) with malloc on its worker threads, and frees it when
the step ends. glibc serves a block that large with a fresh mmap and gives it back
with munmap, so every step faults all of its pages in again and the kernel zeroes
them: measured on a 2-core host, 850k minor page faults and 2.5 to 3 s of system
time per step of about 7 s.

`configure()` makes glibc keep freed memory for reuse instead, with three `mallopt`
settings applied in the running process (no re-exec): one malloc arena (a thread's
own arena cannot hold a block larger than its 64 MiB heaps and falls back to mmap),
no mmap for large blocks, and no trimming of the heap's top. The process then keeps
its high-water mark of memory (the next step reuses it: zero page faults per step
after the first). An entry point calls it first, before JAX is imported: a thread
picks its arena at its first malloc, so XLA's threads must start after it.

It does nothing (and says why in its return value):
- with MIMJAX_ALLOCATOR=system (MIMJAX_ALLOCATOR=retain applies it even where the
  default would not);
- when the user set malloc up already: GLIBC_TUNABLES naming `glibc.malloc.*`, or
  an LD_PRELOAD of another allocator (tcmalloc, jemalloc, mimalloc, ...);
- off Linux/glibc (macOS, musl);
- once JAX is imported (too late to matter; a test process is left as it is);
- by default, on a host with a GPU or TPU or with JAX_PLATFORMS naming one: the
  step's buffers live on the accelerator there, and one arena could slow a
  multi-threaded host pipeline;
- when already applied.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV = "MIMJAX_ALLOCATOR"

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (parameter, value): -1 as M_TRIM_THRESHOLD is glibc's "never trim".
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

# The same settings as GLIBC_TUNABLES, for a process started with them (e.g. a
# reference process a benchmark compares against).
TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=18446744073709551615")

_status: str | None = None


def glibc_version() -> str | None:
    """glibc's version ('2.36'), or None where the C library is not glibc."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # 'glibc 2.36'
    except (AttributeError, ValueError, OSError):
        return None
    if not name or not name.startswith("glibc "):
        return None
    return name.split()[1]


def user_malloc_setting(environ=None) -> str | None:
    """The user's own malloc setting in the environment, or None."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    preload = environ.get("LD_PRELOAD", "")
    if "malloc" in preload.lower():
        return f"LD_PRELOAD={preload}"
    return None


def _accelerator_host(environ) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return (os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/accel[0-9]*"))
            or bool(glob.glob("/dev/vfio/[0-9]*")))


def configure() -> str:
    """Applies the allocator settings above where they apply; returns what it did:
    'retain' (applied now or earlier in this process), or 'unchanged: REASON'."""
    global _status
    if _status is not None:
        return _status
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "retain", "system"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 'retain', 'system' or unset.")
    reason = None
    if mode == "system":
        reason = f"{ENV}=system"
    elif user_malloc_setting() is not None:
        reason = f"set by the user ({user_malloc_setting()})"
    elif not sys.platform.startswith("linux") or glibc_version() is None:
        reason = "not glibc"
    elif "jax" in sys.modules:
        reason = "JAX was imported before"
    elif mode == "auto" and _accelerator_host(os.environ):
        reason = "accelerator host"
    if reason is not None:
        return f"unchanged: {reason}"
    libc = ctypes.CDLL(None)
    for param, value in SETTINGS:
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            return f"unchanged: mallopt({param}, {value}) refused"
    _status = "retain"
    return _status
