"""A mimjax train step timed on a synthetic batch, and what every benchmark built on it
shares: its flags, its config (`--config FILE[:ARG]`, overrides, `--batch`), its XLA
compile options, and the fields at the head and tail of its report.

The step is the trainer's own (`train.jitted_train_step`: the on-device dequantisation
of the pipeline's images, the objectives' loss, backward, AdamW, the non-finite guard),
jitted, donated and sharded as the trainer does, and compiled once for a fixed batch in
the pipeline's format already on the devices: no data loading, so this measures the
model step. A benchmark subclasses `MimjaxTrainStep` with the batch its task's pipeline
would ship (`host_batch`).
"""

from __future__ import annotations

import os
import time

from tools import cli
from tools.bench import timing


# ----------------------------------------------------------------------------- flags
def add_config_arguments(p, *, config_help: str, batch_help: str) -> None:
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help=config_help)
    p.add_argument("--batch", type=int, default=None, help=batch_help)


def add_window_arguments(p, *, windows_help: str) -> None:
    p.add_argument("--steps", type=int, default=5,
                   help="steps per timed window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=3, help=windows_help + " (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after compiling (default: %(default)s)")


def add_output_arguments(p, *, xla_option_help: str) -> None:
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: config "
                        "peak_tflops_per_device, else a matmul measured in this run)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help=xla_option_help)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")


def check_windows(args) -> None:
    for name in ("--steps", "--windows"):
        if getattr(args, name[2:]) < 1:
            raise cli.UsageError(f"{name} must be >= 1, got {getattr(args, name[2:])}.")


def parse_xla_options(items: list[str]) -> dict:
    """['name=value', ...] -> {name: bool | int | float | str} for `compile(compiler_options=)`."""
    from mimjax import run_config

    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq:
            raise cli.UsageError(f"--xla-option {item!r}: expected NAME=VALUE.")
        value = run_config.parse_value(text, None)
        out[name.lstrip("-")] = value if isinstance(value, (bool, int, float)) else text
    return out


# ----------------------------------------------------------------------------- config
def load_config(spec: str, overrides, *, batch: int | None = None):
    """The benchmarked config: the file, its overrides, then `--batch`."""
    config = cli.load_config(spec, overrides)
    if batch:
        config.global_batch_size = batch
    return config


# The encoder fields a --variant resets so that the variant's sizes apply.
VARIANT_FIELDS = ("width", "depth", "num_heads", "mlp_dim")


def load_task_config(spec: str, overrides, *, task: str, example: str, batch: int | None,
                     variant: str | None, image_size: int | None):
    """`load_config`, refused unless its task is `task`, then `--variant` (the config's
    width / depth / heads / MLP reset unless the command line sets them) and
    `--image-size` (data and model alike)."""
    from mimjax.models import vit

    config = load_config(spec, overrides, batch=batch)
    if config.get("task", None) != task:
        raise cli.UsageError(f"--config: this benchmark needs a {task} config (task "
                             f"{task!r}), got task {config.get('task')!r}; e.g. {example}.")
    if variant:
        try:
            vit.parse_variant(variant)
        except ValueError as error:
            raise cli.UsageError(f"--variant: {error}") from None
        config.model.variant = variant
        given = {key for key, _ in overrides}
        for field in VARIANT_FIELDS:  # the command line's own overrides win
            if f"model.{field}" not in given:
                config.model[field] = None
    if image_size:
        config.data.image_size = image_size
        config.model.image_size = image_size
    return config


# ----------------------------------------------------------------------------- the step
class MimjaxTrainStep(timing.Timed):
    """The trainer's step built from `config`, compiled once for a fixed synthetic batch
    already on the devices. Subclasses say what the batch is (`host_batch`)."""
    name = "mimjax"

    def __init__(self, config, log, compiler_options: dict | None = None, *,
                 name: str | None = None):
        import jax
        import numpy as np

        from mimjax import optim, sharding, train
        from mimjax.models.spec import ModelSpec

        self.jax = jax
        if name:
            self.name = name
        mesh = sharding.make_mesh(config.mesh)
        train.validate_config(config, mesh)
        batch_size = config.global_batch_size
        schedule = optim.make_schedule(config.optimizer, global_batch_size=batch_size,
                                       total_steps=1_000_000, warmup_steps=0)
        tx = optim.make_optimizer(config.optimizer, schedule)
        spec = ModelSpec.from_config(config.model)
        start = time.perf_counter()
        state, abstract_state, shardings = train.create_train_state(config, mesh, spec, tx)
        jax.block_until_ready(state)
        self.init_s = time.perf_counter() - start
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
        step_fn = train.jitted_train_step(config, spec, tx, schedule, shardings, mesh)
        local = batch_size // jax.process_count()
        host_batch = self.host_batch(config, local, np.random.default_rng(0))
        self.mesh = mesh
        with jax.set_mesh(mesh):
            self.batch = sharding.global_batch(host_batch, mesh)
            log(f"[{self.name}] compiling the train step ...")
            start = time.perf_counter()
            lowered = step_fn.lower(state, self.batch)
            self.lower_s = time.perf_counter() - start
            start = time.perf_counter()
            self.compiled = lowered.compile(compiler_options=compiler_options or None)
            self.compile_s = time.perf_counter() - start
        log(f"[{self.name}] lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s")
        self.state = state
        self.metrics = None

    def host_batch(self, config, local_batch: int, rng) -> dict:
        """This process's rows of the synthetic batch (numpy, the pipeline's format)."""
        raise NotImplementedError

    def run(self, n: int) -> float:
        with self.jax.set_mesh(self.mesh):
            start = time.perf_counter()
            state, metrics = self.state, None
            for _ in range(n):
                state, metrics = self.compiled(state, self.batch)
            self.jax.block_until_ready((state, metrics))
            seconds = time.perf_counter() - start
        self.state, self.metrics = state, metrics
        return seconds

    def last_loss(self) -> float:
        return float(self.metrics["loss"]) if self.metrics is not None else float("nan")


# ----------------------------------------------------------------------------- report
def report_head(benchmark: str, args, overrides, config, mesh) -> dict:
    """The fields a train-step report starts with: what ran, where, at what size."""
    devices, platform_name, device = timing.describe_devices()
    return {
        "benchmark": benchmark,
        "config": " ".join([args.config] + [f"--config.{k}={v}" for k, v in overrides]),
        "device": device, "platform": platform_name, "num_devices": len(devices),
        # XLA:CPU runs on an intra-op pool of one thread per schedulable core.
        "cpu_threads": timing.cores() if platform_name == "cpu" else None,
        "mesh": dict(mesh.shape), "dtype": config.model.get("dtype", "float32"),
        "batch": int(config.global_batch_size), "image_size": int(config.model.image_size),
    }


def report_tail(host_load_avg: list[float], compiler_options: dict) -> dict:
    """The fields a train-step report ends with: what else could have moved the numbers."""
    import jax

    return {
        "host_load_avg": host_load_avg,  # 1-min, before / after timing
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_options": compiler_options,
        "versions": {"jax": jax.__version__},
    }
