"""mimjax.host_memory: glibc keeps large freed blocks for reuse once configured, and
configure() leaves the process alone where it should."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mimjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_memory.glibc_version() is None,
    reason="glibc's malloc only")

# A worker thread allocates, touches and frees a 64 MiB block three times (as XLA:CPU
# does with a step's temporaries); reports configure()'s answer and the minor page
# faults of the last two rounds.
PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    from mimjax import host_memory
    status = host_memory.configure()
    again = host_memory.configure()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 64 << 20, []
    def work():
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(size)
            libc.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(json.dumps({"status": status, "again": again, "faults": faults[1:],
                      "jax": "jax" in sys.modules}))
""")


def _probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.ENV)}
    environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_configured_process_reuses_freed_memory():
    r = _probe()
    assert r["status"] == r["again"] == "retain"
    assert not r["jax"]  # importing host_memory does not start JAX
    pages = (64 << 20) // os.sysconf("SC_PAGESIZE")
    assert max(r["faults"]) < pages // 10, r  # reused, not mapped afresh


@glibc_only
def test_switched_off_by_the_environment():
    r = _probe(MIMJAX_ALLOCATOR="system")
    assert r["status"] == "unchanged: MIMJAX_ALLOCATOR=system"
    pages = (64 << 20) // os.sysconf("SC_PAGESIZE")
    assert min(r["faults"]) > pages // 2, r  # glibc's default: mapped afresh each time


@glibc_only
def test_users_own_malloc_setting_wins():
    r = _probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert r["status"] == "unchanged: set by the user (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)"
    assert host_memory.user_malloc_setting({"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"})
    assert host_memory.user_malloc_setting({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    assert host_memory.user_malloc_setting({}) is None


def test_unchanged_once_jax_is_imported_or_off_glibc(monkeypatch):
    import jax  # noqa: F401 -- the test process has JAX already

    monkeypatch.delenv(host_memory.ENV, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(host_memory, "_status", None)
    if host_memory.glibc_version() is not None:
        assert host_memory.configure() == "unchanged: JAX was imported before"
    monkeypatch.setattr(host_memory, "glibc_version", lambda: None)
    assert host_memory.configure() == "unchanged: not glibc"
    monkeypatch.setenv(host_memory.ENV, "fast")
    with pytest.raises(ValueError, match="MIMJAX_ALLOCATOR"):
        host_memory.configure()
