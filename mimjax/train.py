"""The one generic trainer: state, step, loop, evals, figures, checkpoints.

Read top to bottom: the train state; the model bound from parameters; the state
built abstractly and created already sharded, optionally with an encoder from a
pretraining checkpoint; the jitted step (gradient accumulation, non-finite guard,
EMA); the loop (data, logging, evals, figures, checkpoints, SIGTERM). Objectives are
pure loss functions chosen by config.

`config.task` picks what differs between pretraining and fine-tuning, nothing else:
- "pretrain" (default): the multi-scale pretraining pipeline, reconstruction figures;
- "classification" (model "vit_classifier", objective "classification"): the
  fine-tuning pipeline (input_pipeline.finetune), val evals with the best
  parameters kept in WORKDIR/best/, and a test eval of those at the end
  (mimjax.evaluators.classifier_eval);
- "image_text" (model "mcr", objective "mcr"): image-report pairs
  (input_pipeline.pairs), the tokenizer copied to WORKDIR/tokenizer.json, and
  retrieval evals on the val split (mimjax.evaluators.retrieval).
Pretraining can also run a linear probe (`config.evals.linear_probe`,
mimjax.evaluators.probe_hooks) so its curves show probe quality over time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from input_pipeline.dequantize import dequantize_images
from mimjax import checkpoint, inference, metric_logging, optim, perf, pretrained, sharding
from mimjax.evaluators import classifier_eval, probe_hooks, reconstruction, retrieval
from mimjax.models import build_model
from mimjax.objectives import build_loss_fn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array               # int32 scalar: number of steps taken
    params: Any                   # pure dict of f32 arrays
    opt_state: Any
    rng: jax.Array                # uint32[2]; per-step keys are fold_in(rng, step)
    ema_params: Any               # pure dict (EMA enabled) or {} (disabled)
    nonfinite_total: jax.Array    # int32: steps whose update was skipped
    nonfinite_streak: jax.Array   # int32: consecutive skipped steps up to now


# --------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's structure (graphdef) and abstract parameters; binds params to a Module."""
    graphdef: Any
    abstract_params: Any  # nnx.State of ShapeDtypeStructs

    @classmethod
    def from_config(cls, model_cfg) -> "ModelSpec":
        abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("mimjax models hold only nnx.Param state; found other "
                             f"variables: {jax.tree.map(lambda x: x.shape, rest)}")
        return cls(graphdef, abstract_params)

    def init_params(self, model_cfg, rng) -> dict:
        model = build_model(model_cfg, rngs=nnx.Rngs(params=rng))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def bind(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.abstract_params)  # fresh State to fill
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


# --------------------------------------------------------------------------- state
def create_train_state(config, mesh, spec: ModelSpec, tx: optax.GradientTransformation):
    """Builds the state abstractly, derives shardings from the rules, then creates it
    already sharded (no host-side or single-device copy of the full state)."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def init():
        params = spec.init_params(config.model, init_key)
        ema = jax.tree.map(jnp.copy, params) if config.get("ema_decay", 0.0) else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=train_key, ema_params=ema,
                          nonfinite_total=jnp.zeros((), jnp.int32),
                          nonfinite_streak=jnp.zeros((), jnp.int32))

    abstract_state = jax.eval_shape(init)
    shardings = sharding.tree_shardings(abstract_state, mesh, rules_from(config))
    state = jax.jit(init, out_shardings=shardings)()
    return state, abstract_state, shardings


def init_from_pretrained(config, state: TrainState, abstract_state, shardings) -> TrainState:
    """The fresh `state` with its encoder (and the EMA's, if kept) from `config.init`,
    a pretraining workdir; parameters the checkpoint lacks (e.g. the head) and the
    optimizer state stay as initialised (zero Adam moments suit any parameters)."""
    loaded, _ = pretrained.init_from_checkpoint(
        abstract_state.params, config.init, config.get("init_step", None),
        use_ema=bool(config.get("init_use_ema", False)))

    def place(new, current, target_sharding):
        if isinstance(new, jax.ShapeDtypeStruct):  # not in the checkpoint
            return current
        host = np.asarray(new)  # the same on every process
        return jax.make_array_from_callback(host.shape, target_sharding, lambda i: host[i])

    params = jax.tree.map(place, loaded, state.params, shardings.params)
    ema = state.ema_params
    if ema:  # its own buffers: params are donated into the step
        ema = jax.tree.map(place, loaded, ema, shardings.ema_params)
    return state.replace(params=params, ema_params=ema)


def rules_from(config):
    rules = config.get("sharding_rules", None)
    return tuple((r, tuple(s)) for r, s in rules) if rules else sharding.DEFAULT_RULES


# --------------------------------------------------------------------------- step
def make_train_step(spec: ModelSpec, tx, loss_fn: Callable, schedule, *,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    prepare_batch: Callable[[dict], dict] | None = None):
    """Returns `train_step(state, batch) -> (state, metrics)`, pure and jittable.

    `prepare_batch(batch) -> batch` runs in the step before the loss, per microbatch
    (e.g. dequantising compact host images into model inputs on the device)."""

    def loss_of(params, batch, rng):
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        return loss_fn(spec.bind(params), batch, rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def compute_grads(params, batch, rng):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads
        k = grad_accum_steps
        # Microbatch i takes rows i, i+k, ... so every device holds a slice of each.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(grad_fn, params, first, rng))

        def accumulate(carry, inputs):
            index, microbatch = inputs
            out = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, out), None

        summed, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        (loss, metrics), grads = jax.tree.map(lambda x: x / k, summed)
        return loss, metrics, grads

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, metrics, grads = compute_grads(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves parameters and optimizer state untouched.
        keep_if_finite = lambda new, old: jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), new, old)
        params = keep_if_finite(new_params, state.params)
        ema = state.ema_params
        if ema_decay:
            ema = keep_if_finite(
                jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params), ema)
        nonfinite = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params,
            opt_state=keep_if_finite(new_opt_state, state.opt_state), ema_params=ema,
            nonfinite_total=state.nonfinite_total + nonfinite,
            nonfinite_streak=(state.nonfinite_streak + 1) * nonfinite)
        # Skipped steps do not advance the optimizer's own count, hence its schedule.
        applied_updates = state.step - state.nonfinite_total
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(applied_updates),
                       nonfinite_steps=new_state.nonfinite_total,
                       nonfinite_streak=new_state.nonfinite_streak)
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------- loop
TASKS = ("pretrain", "classification", "image_text")
_TASK_MODEL = {"classification": "vit_classifier", "image_text": "mcr"}  # else: pretraining


def task_of(config) -> str:
    """`config.task`, checked against the model and objectives it needs."""
    task = config.get("task", "pretrain")
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {task!r}.")
    model = config.model.name
    needs = _TASK_MODEL.get(task)
    if (needs is not None and model != needs) or (
            needs is None and model in _TASK_MODEL.values()):
        raise ValueError(
            f"config.task {task!r} does not fit model.name {model!r}: task 'classification' "
            "trains model 'vit_classifier', 'image_text' model 'mcr', 'pretrain' a pretraining "
            "model (e.g. 'mae'); set both consistently.")
    if task == "classification" and "classification" not in config.objectives:
        raise ValueError("config.task 'classification' needs config.objectives.classification "
                         "(label_key, multilabel, ...); see configs/finetune_base.py.")
    if task == "image_text" and "mcr" not in config.objectives:
        raise ValueError("config.task 'image_text' needs config.objectives.mcr; see "
                         "configs/mcr_demo.py.")
    return task


def make_train_data(config, task: str):
    """(training batches, records per epoch) of the task's input pipeline."""
    if task == "classification":
        from input_pipeline import finetune  # grain import kept off the model/test paths

        label_key = config.objectives.classification.label_key
        dataset = finetune.make_finetune_train_dataset(
            config.data, image_size=config.model.image_size,
            global_batch_size=config.global_batch_size, seed=config.seed,
            label_keys=(label_key.removeprefix("label_"),),
            process_index=jax.process_index(), process_count=jax.process_count())
        return dataset, len(finetune.split_source(config.data, "train"))
    if task == "image_text":
        from input_pipeline import pairs

        dataset = pairs.make_pairs_train_dataset(
            config.data, image_size=config.model.image_size,
            global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        return dataset, pairs.num_pairs(config.data, "train")
    from input_pipeline import pipeline  # grain import kept off the model/test paths

    dataset = pipeline.make_pretrain_dataset(
        config.data, scales=tuple(config.model.scales), global_batch_size=config.global_batch_size,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return dataset, pipeline.num_records(config.data)


def resolve_steps(config, num_records: int | None) -> tuple[int, int]:
    """(total_steps, warmup_steps) from *_steps or, given the dataset size, *_epochs."""
    def steps(name):
        if config.get(f"{name}_steps", None):
            return int(config.get(f"{name}_steps"))
        epochs = config.get(f"{name}_epochs", None)
        if epochs is None:
            return 0
        if not num_records:
            raise ValueError(f"config.{name}_epochs needs the dataset size; set "
                             f"config.{name}_steps instead.")
        return int(math.ceil(epochs * num_records / config.global_batch_size))
    total, warmup = steps("total"), steps("warmup")
    if total <= 0:
        raise ValueError("Set config.total_steps or config.total_epochs to a positive value.")
    return total, warmup


def validate_config(config, mesh) -> None:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b, k = config.global_batch_size, config.get("grad_accum_steps", 1)
    if b % jax.process_count():
        raise ValueError(f"global_batch_size {b} must be divisible by the process count "
                         f"{jax.process_count()}.")
    if k < 1 or b % k:
        raise ValueError(f"global_batch_size {b} must be divisible by grad_accum_steps {k}.")
    if (b // k) % batch_shards:
        raise ValueError(
            f"Each microbatch ({b} / grad_accum_steps {k} = {b // k}) must split evenly over "
            f"the {batch_shards} batch shards (mesh data x fsdp); change the batch or the mesh.")
    itc = config.get("objectives", {}).get("mcr", {}).get("itc_weight", 0.0)
    if k > 1 and config.get("task", None) == "image_text" and itc:
        # The loss runs once per microbatch, so each sees only its own reports.
        log.warning(
            "grad_accum_steps %d: the contrastive loss takes its negatives from each "
            "microbatch of %d pairs, not from the global batch of %d; it is the loss of "
            "batch %d, with %d times fewer negatives. For global-batch negatives use more "
            "devices (or a smaller global batch) with grad_accum_steps=1.", k, b // k, b,
            b // k, k)


class _StopRequest:
    """Set by SIGTERM: the loop finishes the step in flight, saves, and exits 0."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: finishing the current step, saving, exiting.")
        self.requested = True


def _numeric_arrays(batch: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    keys = history[-1].keys()
    out = {}
    for key in keys:
        values = [float(h[key]) for h in history if key in h]
        finite = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(finite)) if finite else values[-1]
    return out


def _retrieval_hooks(config, spec, mesh, workdir: str, writer):
    """Retrieval evals on the val pairs; the tokenizer is kept beside the
    checkpoints, since the checkpoint's text side is useless without it."""
    import shutil

    from input_pipeline import pairs

    if jax.process_index() == 0:
        shutil.copyfile(pairs.tokenizer_path(config.data), os.path.join(workdir, "tokenizer.json"))
    return retrieval.RetrievalHooks.for_split(config, spec, mesh, workdir, writer)


def make_hooks(config, task: str, spec, mesh, workdir: str, writer) -> list:
    """The eval hooks of the run: `due`, `after_step`, `finish`, `close` each."""
    hooks = []
    if task == "classification":
        hooks.append(classifier_eval.ClassificationHooks(config, spec, mesh, workdir, writer))
    elif task == "image_text":
        hooks.append(_retrieval_hooks(config, spec, mesh, workdir, writer))
    if config.get("evals", None) and config.evals.get("linear_probe", None):
        hooks.append(probe_hooks.LinearProbeHooks(config, spec, workdir, writer))
    return hooks


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains per `config`, resuming from `workdir` if it holds a checkpoint.
    Returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    inference.save_run_config(config, workdir)  # the architecture, for export and inference
    is_chief = jax.process_index() == 0
    task = task_of(config)
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, mesh)
    dataset, num_records = make_train_data(config, task)
    data_iter = iter(dataset)
    total_steps, warmup_steps = resolve_steps(config, num_records)
    schedule = optim.make_schedule(config.optimizer, global_batch_size=config.global_batch_size,
                                   total_steps=total_steps, warmup_steps=warmup_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    spec = ModelSpec.from_config(config.model)
    state, abstract_state, shardings = create_train_state(config, mesh, spec, tx)
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    log.info("Model: %.2fM parameters; mesh %s; %d steps (%d warmup)",
             n_params / 1e6, dict(mesh.shape), total_steps, warmup_steps)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("keep_checkpoints", 3),
                                   save_every=config.checkpoint_every)
    start_step = ckpt.latest_step()
    if start_step is not None:
        state = ckpt.restore(start_step, checkpoint.abstract_with_shardings(abstract_state, shardings),
                             data_iter)
        if config.get("init", None):
            log.info("Resuming from step %d of %s: config.init (%s) is not used.", start_step,
                     ckpt.directory, config.init)
    elif config.get("init", None):
        state = init_from_pretrained(config, state, abstract_state, shardings)
    start_step = int(start_step or 0)

    train_step = make_train_step(
        spec, tx, build_loss_fn(config.objectives), schedule,
        grad_accum_steps=config.get("grad_accum_steps", 1), ema_decay=config.get("ema_decay", 0.0),
        prepare_batch=lambda batch: dequantize_images(batch, config.data))
    step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh)))
    writer = metric_logging.MetricWriter(workdir)
    figures = reconstruction.FigureWriter(config, spec, workdir) if task == "pretrain" else None
    hooks = make_hooks(config, task, spec, mesh, workdir, writer)
    stop = _StopRequest()
    max_streak = config.get("max_consecutive_nonfinite", 10)
    last_metrics: dict[str, float] = {}

    with jax.set_mesh(mesh):
        step = start_step
        if step >= total_steps:
            log.info("Already trained to step %d of %d; nothing to do.", step, total_steps)
        else:
            batch = sharding.global_batch(_numeric_arrays(next(data_iter)), mesh)
            compiled = step_fn.lower(state, batch).compile()
            flops = perf.compiled_flops(compiled)
            peak, peak_source = perf.peak_flops_per_device(
                config.get("peak_tflops_per_device", None),
                dtype=jnp.float32 if config.model.get("dtype", "float32") == "float32" else jnp.bfloat16)
            log.info("Compiled step: %s GFLOP per device; peak %.1f TFLOP/s per device (%s)",
                     f"{flops / 1e9:.1f}" if flops else "n/a", peak / 1e12, peak_source)

        history: list[dict] = []
        pending = None  # metrics of the step in flight, read one step late to keep dispatch async

        def record(step_number, device_metrics):
            history.append(jax.device_get(device_metrics))
            if int(history[-1]["nonfinite_streak"]) >= max_streak:
                writer.write(step_number, history[-1])
                writer.close()
                _raise_nonfinite(history[-1], step_number, ckpt)

        window_start, window_steps, data_wait, data_wait_max = time.perf_counter(), 0, 0.0, 0.0
        while step < total_steps:
            state, metrics = compiled(state, batch)
            step += 1
            window_steps += 1
            if pending is not None:
                record(*pending)
            pending = (step, metrics)
            stop_now = stop.requested or step == total_steps
            if step % config.log_every == 0 or stop_now:
                record(*pending)
                pending = None
                elapsed = time.perf_counter() - window_start
                last_metrics = _mean_metrics(history)
                last_metrics.update(_speed_metrics(config, elapsed, window_steps, data_wait,
                                                   flops, peak, mesh))
                last_metrics["data_wait_max_s"] = data_wait_max
                writer.write(step, last_metrics)
                if is_chief:
                    _log_progress(step, total_steps, last_metrics)
                history, window_steps, data_wait, data_wait_max = [], 0, 0.0, 0.0
                window_start = time.perf_counter()
            if figures and (step % config.figure_every == 0 or step == total_steps):
                figures.write(step, state.params)
            for hook in hooks:
                if hook.due(step, total_steps):
                    last_metrics.update(hook.after_step(step, state))
            # Save before fetching the next batch: the saved iterator position must be
            # the first batch the resumed run has not trained on.
            ckpt.save(step, state, data_iter, force=stop_now)
            if stop.requested:
                log.warning("Stopped by SIGTERM at step %d; checkpoint saved.", step)
                break
            if step < total_steps:
                # Only the loader's share: the host->device copy is not a data wait.
                wait_start = time.perf_counter()
                host_batch = next(data_iter)
                waited = time.perf_counter() - wait_start
                data_wait += waited
                data_wait_max = max(data_wait_max, waited)
                batch = sharding.global_batch(_numeric_arrays(host_batch), mesh)
        if step >= total_steps:
            for hook in hooks:
                hook.finish(state, abstract_state.params, shardings.params,
                            trained=step > start_step)
    ckpt.close()
    for hook in hooks:
        hook.close()
    writer.close()
    if hasattr(data_iter, "close"):
        data_iter.close()  # stops prefetch workers and frees their shared memory
    return last_metrics


def _raise_nonfinite(metrics, step, ckpt):
    streak = int(metrics["nonfinite_streak"])
    ckpt.wait()
    good = ckpt.latest_step()
    raise NonFiniteLossError(
        f"Loss or gradients were non-finite for {streak} consecutive steps, the last at "
        f"step {step}; those updates were skipped and the run is stopped. The last good "
        f"checkpoint is step {good} in {ckpt.directory} (left intact). Lower "
        "optimizer.base_lr, enable optimizer.grad_clip_norm, or check the data for "
        "non-finite values.")


def _speed_metrics(config, elapsed, steps, data_wait, flops, peak, mesh) -> dict[str, float]:
    step_time = elapsed / max(steps, 1)
    out = {"step_time_s": step_time,
           "img_per_s": config.global_batch_size / step_time,
           "data_wait_frac": data_wait / max(elapsed, 1e-9)}
    if flops:
        per_device = flops / step_time
        out["tflops_per_s"] = per_device * mesh.devices.size / 1e12
        out["mfu"] = per_device / peak
    return out


def _log_progress(step, total, m):
    losses = " ".join(f"{k}={m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
    eta = (total - step) * m["step_time_s"]
    speed = f"{m['img_per_s']:.1f} img/s"
    if "mfu" in m:
        speed += f" | {m['tflops_per_s']:.2f} TFLOP/s | MFU {100 * m['mfu']:.1f}%"
    wait = ""
    if m["data_wait_frac"] > 0.05:  # the input pipeline held the steps back
        wait = (f" | waited for data {100 * m['data_wait_frac']:.0f}%"
                f" (max {m['data_wait_max_s']:.2f} s)")
    log.info("step %d/%d | loss %.4f %s | lr %.2e | %s%s | ETA %s", step, total, m["loss"],
             losses, m["lr"], speed, wait, time.strftime("%H:%M:%S", time.gmtime(eta)))
