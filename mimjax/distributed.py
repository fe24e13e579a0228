"""Multi-process start-up, agreement between processes, and the stop they share.

A run spans several processes on TPU pods (one per host), multi-node GPU clusters
(one per GPU under SLURM) and, for tests, several local CPU processes. Each
process runs the same `main.py` command; JAX's distributed runtime has to start
before anything else touches JAX (`main.py` calls `initialize` right after
parsing its flags).

How a process learns it is part of a multi-process run (`resolve`):
- explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or the
  environment variables MIMJAX_COORDINATOR / MIMJAX_NUM_PROCESSES /
  MIMJAX_PROCESS_ID), e.g. local processes or a launcher that knows the hosts;
- detected: under SLURM with more than one task, on a TPU pod whose environment
  lists more than one worker (GKE, queued resources, multislice), or under Open MPI
  with more than one rank, JAX's own cluster detection finds the coordinator and
  this process's id (`--distributed=auto`, the default). A TPU VM pod created with
  `gcloud compute tpus tpu-vm create` announces its workers only through the
  metadata server: run it with `--distributed=on` (tools/launch/tpu_pod.sh does);
- otherwise, and with `--distributed=off`, one process.

Then every process logs one line (its index, its local and the global devices),
and `Run` checks that every process resolved the same config (`check_same_config`):
a host with a different checkout or flag would otherwise train a different model
in lockstep until a shape mismatch hangs a collective.

The stop: SIGTERM (a preemption, `scancel`, a TPU maintenance event) may reach
one host only. `StopSignal.should_stop(step)` is true on every process at the same
step: in a multi-process run through JAX's preemption sync point (the
coordination service notices SIGTERM on any process and picks one step all
processes stop at), in a single process through a plain SIGTERM handler. The
trainer then saves (every process takes part in the checkpoint) and returns, and
`main.py` exits 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "MIMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "MIMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MIMJAX_PROCESS_ID"


class DistributedError(ValueError):
    """A multi-process setting that cannot work; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `initialize` does: nothing (`None` kwargs) or jax.distributed.initialize(**kwargs)."""
    kwargs: dict | None
    reason: str  # why this process is (not) part of a multi-process run, for the log


def add_arguments(parser) -> None:
    """main.py's multi-process flags."""
    group = parser.add_argument_group(
        "multi-process runs (TPU pods, GPU clusters; see tools/launch/README.md)")
    group.add_argument(
        "--distributed", choices=MODES, default="auto",
        help="auto (default): start JAX's distributed runtime when --coordinator is given "
             "or a multi-process cluster (SLURM, TPU pod, Open MPI) is detected; on: always, "
             "with JAX's cluster detection; off: one process.")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"address of process 0's coordination service (env "
                            f"{ENV_COORDINATOR}).")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help=f"processes in the run (env {ENV_NUM_PROCESSES}).")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help=f"this process's index, 0..N-1 (env {ENV_PROCESS_ID}).")
    group.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                       help="a process silent this long is declared dead and every other "
                            "process stops with an error instead of waiting forever "
                            "(default: %(default)s).")


def resolve_args(args) -> Settings:
    """`resolve` from the flags `add_arguments` defines (and the environment)."""
    return resolve(args.distributed, args.coordinator, args.num_processes, args.process_id,
                   heartbeat_timeout=args.heartbeat_timeout)


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster this environment describes, or None (one process).

    Only clusters with more than one process count: a single-task SLURM job or a
    single-host TPU VM runs without the distributed runtime."""
    def count(name):
        try:
            return int(environ.get(name, "1") or "1")
        except ValueError:
            return 1
    if "SLURM_JOB_ID" in environ and count("SLURM_NTASKS") > 1 \
            and "SLURM_PROCID" in environ:  # inside an srun step, not the batch shell
        return "slurm"
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):  # GKE, queued resources
        if len([w for w in environ.get(name, "").split(",") if w]) > 1:
            return "tpu"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):  # multislice
        return "tpu"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    return None


def resolve(mode: str = "auto", coordinator: str | None = None,
            num_processes: int | None = None, process_id: int | None = None, *,
            heartbeat_timeout: int = 100, environ: Mapping[str, str] | None = None) -> Settings:
    """The multi-process settings from flags, then the environment (see the module
    docstring). Pure: unit-testable without starting anything."""
    environ = os.environ if environ is None else environ
    if mode not in MODES:
        raise DistributedError(f"--distributed must be one of {MODES}, got {mode!r}.")
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None

    def integer(value, env):
        if value is None and environ.get(env, "") != "":
            try:
                value = int(environ[env])
            except ValueError:
                raise DistributedError(f"{env}={environ[env]!r} is not an integer.") from None
        return value

    num_processes = integer(num_processes, ENV_NUM_PROCESSES)
    process_id = integer(process_id, ENV_PROCESS_ID)
    explicit = [x is not None for x in (coordinator, num_processes, process_id)]
    if mode == "off":
        if any(explicit):
            raise DistributedError(
                "--distributed=off with --coordinator/--num-processes/--process-id (or their "
                f"{ENV_COORDINATOR}/... variables) set: drop one or the other.")
        return Settings(None, "--distributed=off")
    if heartbeat_timeout < 1:
        raise DistributedError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_timeout}.")
    if any(explicit):
        if not all(explicit):
            missing = [name for name, given in zip(
                ("--coordinator", "--num-processes", "--process-id"), explicit) if not given]
            raise DistributedError(
                f"a multi-process run given explicitly needs all of --coordinator, "
                f"--num-processes and --process-id; missing {', '.join(missing)} (or set "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"--coordinator must be HOST:PORT, got {coordinator!r}.")
        if num_processes < 1:
            raise DistributedError(f"--num-processes must be >= 1, got {num_processes}.")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id must be in 0..{num_processes - 1}, got "
                                   f"{process_id}.")
        return Settings(dict(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout),
                        f"explicit coordinator {coordinator}")
    cluster = detect_cluster(environ)
    if mode == "on" or cluster:
        return Settings(dict(heartbeat_timeout_seconds=heartbeat_timeout),
                        f"JAX cluster detection ({cluster or 'required by --distributed=on'})")
    return Settings(None, "no multi-process cluster detected")


def initialize(settings: Settings) -> None:
    """Starts JAX's distributed runtime as `settings` say; call before anything
    else touches JAX. Logs this process's place in the run either way."""
    import jax  # the first JAX import of a run (main.py keeps it here)

    if settings.kwargs is not None:
        # CPU processes need a collectives backend to talk to each other; GPU and TPU
        # clients ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(**settings.kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised with the fix named
            raise DistributedError(
                f"starting JAX's distributed runtime ({settings.reason}) failed: {error}. "
                "Check that every process got the same --coordinator and --num-processes, "
                "that process 0 runs and its port is reachable, and that each --process-id "
                "is used once.") from error
    log_topology(settings.reason)


def log_topology(reason: str = "") -> None:
    """One line per process: its index, its devices and the run's."""
    import jax

    local = jax.local_devices()
    log.info("Process %d of %d (%s): %d local device(s) %s; %d global device(s) on %s",
             jax.process_index(), jax.process_count(), reason or "one process", len(local),
             [d.id for d in local], jax.device_count(), local[0].platform if local else "?")


def config_digest(config) -> str:
    """A hash of the resolved config (sorted JSON)."""
    text = config.to_json_best_effort(sort_keys=True) if hasattr(config, "to_json_best_effort") \
        else json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config) -> None:
    """Refuses to train when the processes resolved different configs (a host with
    another checkout, another flag or another environment)."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(config_digest(config)), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differ = [p for p in range(digests.shape[0]) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise DistributedError(
            f"process(es) {differ} resolved a different config from process 0 (config hashes "
            "differ). Every process must run the same checkout with the same --config and "
            "--config.* flags and the same environment; compare each host's WORKDIR/config.json "
            "log line or run `git rev-parse HEAD` on each.")


def chief_first(fn: Callable[[], T], what: str) -> T:
    """`fn()` on process 0 first, then on the others: for steps that write files
    (rendering a phantom, ingesting DICOM) which every process then reads. On shared
    storage the others find the files done; on per-host disks each host writes its
    own copy, one after another, instead of several processes racing in one folder."""
    import jax

    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"mimjax: process 0 prepared {what}")
    if jax.process_index() != 0:
        result = fn()
    multihost_utils.sync_global_devices(f"mimjax: every process prepared {what}")
    return result


def set_compilation_cache(directory: str | None) -> None:
    """Persistent XLA compilation cache in `directory` (shared storage on a pod, so
    one host's compile serves the others and the next run)."""
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every compiled step, not only those slower than JAX's 1 s default.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    log.info("Persistent compilation cache: %s", directory)


class StopSignal:
    """SIGTERM on any process -> `should_stop(step)` true on every process at one step.

    Several processes: JAX's preemption sync point (its coordination service catches
    SIGTERM on any process and agrees on a step); `should_stop` must then be called
    by every process at every step, with the same step numbers. One process: a
    SIGTERM handler sets a flag read at the next step. Only the main thread can
    install a signal handler; elsewhere a single-process run cannot be stopped this way.
    """

    def __init__(self):
        import jax

        self._multi = jax.process_count() > 1 and jax.distributed.is_initialized()
        if jax.process_count() > 1 and not self._multi:
            log.warning(
                "%d processes but JAX's distributed runtime was not started (a TPU pod run "
                "without --distributed=on?): a SIGTERM stops only the process that gets it, "
                "and the others wait for it at the next collective.", jax.process_count())
        self._requested = False
        if not self._multi and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: finishing the current step, saving, exiting.")
        self._requested = True

    def should_stop(self, step: int) -> bool:
        if self._multi and not self._requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("SIGTERM reached a process of this run: every process stops at "
                            "step %d, saves and exits.", step)
                self._requested = True
        return self._requested

    @property
    def requested(self) -> bool:
        return self._requested
