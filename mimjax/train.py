"""The one generic trainer: state, step, and a run that can be entered more than once.

Read top to bottom: the train state; the state built abstractly and created
already sharded, optionally with an encoder from a pretraining checkpoint; the
jitted step (gradient accumulation, non-finite guard, EMA); the `Run`:

    run = Run(config, workdir)      # setup: task, mesh, data, state (resumed or fresh),
                                    # step, checkpoints, hooks
    run.fit(k)                      # k more steps; run.fit() trains to total_steps
    run.fit(k, params=global_params)  # k steps from given parameters
    run.finish()                    # end-of-run evals (test metrics, ...), then close

What differs between pretraining, fine-tuning, image-report runs and later tasks
(the data, the config checks, the eval hooks, workdir side effects) comes from the
task plug-in `mimjax.tasks.for_config(config)`; this module names no task.
Objectives are pure loss functions chosen by config (mimjax.objectives).

Where the parameters come from, in order of precedence:
1. `fit(params=...)`: given parameters always win for that call (a federated round
   passes the global encoder; the rest of the state stays the site's own);
2. the workdir's latest checkpoint: re-running a command resumes it (parameters,
   optimizer, step, RNG and data position), and a `config.init` is then not used
   (the run says so: init only starts a fresh run);
3. `config.init`: the encoder of a pretraining workdir, for a fresh run;
4. random initialisation from `config.seed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from input_pipeline.dequantize import dequantize_images
from mimjax import (
    checkpoint,
    distributed,
    metric_logging,
    optim,
    perf,
    pretrained,
    run_config,
    sharding,
    tasks,
)
from mimjax.evaluators.hooks import HookContext
from mimjax.models import param_tree
from mimjax.models.spec import ModelSpec
from mimjax.objectives import build_loss_fn
from mimjax.run_config import ConfigError

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
    model_state: Any              # pure dict of batch statistics, {} for most models
    nonfinite_total: jax.Array    # int32: steps whose update was skipped
    nonfinite_streak: jax.Array   # int32: consecutive skipped steps up to now


# --------------------------------------------------------------------------- state
def create_train_state(config, mesh, spec: ModelSpec, tx: optax.GradientTransformation):
    """Builds the state abstractly, derives shardings from the rules, then creates it
    already sharded (no host-side or single-device copy of the full state)."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def init():
        params, model_state = spec.init_variables(config.model, init_key)
        ema = jax.tree.map(jnp.copy, params) if config.get("ema_decay", 0.0) else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=train_key, ema_params=ema,
                          model_state=model_state,
                          nonfinite_total=jnp.zeros((), jnp.int32),
                          nonfinite_streak=jnp.zeros((), jnp.int32))

    abstract_state = jax.eval_shape(init)
    shardings = sharding.tree_shardings(abstract_state, mesh, rules_from(config))
    state = jax.jit(init, out_shardings=shardings)()
    return state, abstract_state, shardings


def _place(host: np.ndarray, target_sharding) -> jax.Array:
    """A host array (the same on every process) as a global array with `target_sharding`."""
    return jax.make_array_from_callback(host.shape, target_sharding, lambda i: host[i])


def init_from_pretrained(config, state: TrainState, abstract_state, shardings) -> TrainState:
    """The fresh `state` with its encoder (and the EMA's, if kept) from `config.init`,
    a pretraining workdir; parameters the checkpoint lacks (e.g. the head) and the
    optimizer state stay as initialised (zero Adam moments suit any parameters),
    except a proximal term's anchor, which moves to the loaded parameters (L2-SP
    regularises towards the pretrained weights, not the random ones)."""
    loaded, _ = pretrained.init_from_checkpoint(
        abstract_state.params, config.init, config.get("init_step", None),
        use_ema=bool(config.get("init_use_ema", False)),
        target_channels=config.model.get("channels", None))

    def place(new, current, target_sharding):
        if isinstance(new, jax.ShapeDtypeStruct):  # not in the checkpoint
            return current
        return _place(np.asarray(new), target_sharding)

    params = jax.tree.map(place, loaded, state.params, shardings.params)
    ema = state.ema_params
    if ema:  # its own buffers: params are donated into the step
        ema = jax.tree.map(place, loaded, ema, shardings.ema_params)
    return state.replace(params=params, ema_params=ema,
                         opt_state=optim.set_anchor(state.opt_state, params))


def rules_from(config):
    rules = config.get("sharding_rules", None)
    return tuple((r, tuple(s)) for r, s in rules) if rules else sharding.DEFAULT_RULES


# --------------------------------------------------------------------------- step
def make_train_step(spec: ModelSpec, tx, loss_fn: Callable, schedule, *,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    prepare_batch: Callable[[dict], dict] | None = None):
    """Returns `train_step(state, batch) -> (state, metrics)`, pure and jittable.

    `prepare_batch(batch) -> batch` runs in the step before the loss, per microbatch
    (e.g. dequantising compact host images into model inputs on the device). The loss
    sees the batch with `batch["step"]`, the step being taken (int32), for objectives
    whose weights follow a schedule. A model with state (batch statistics) updates it
    in its forward pass; the step keeps the new state (microbatch after microbatch
    with gradient accumulation), except on a non-finite step."""

    def loss_of(params, model_state, batch, rng, step):
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        model = spec.bind(params, model_state)
        loss, metrics = loss_fn(model, dict(batch, step=step), rng)
        return loss, (metrics, spec.model_state(model))

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def compute_grads(params, model_state, batch, rng, step):
        if grad_accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, rng, step)
            return loss, metrics, grads, model_state
        k = grad_accum_steps
        # Microbatch i takes rows i, i+k, ... so every device holds a slice of each.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        (loss_shape, (metrics_shape, _)), grads_shape = jax.eval_shape(
            grad_fn, params, model_state, first, rng, step)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             (loss_shape, metrics_shape, grads_shape))

        def accumulate(carry, inputs):
            summed, model_state = carry
            index, microbatch = inputs
            (loss, (metrics, model_state)), grads = grad_fn(
                params, model_state, microbatch, jax.random.fold_in(rng, index), step)
            summed = jax.tree.map(jnp.add, summed, (loss, metrics, grads))
            return (summed, model_state), None

        (summed, model_state), _ = jax.lax.scan(
            accumulate, (zeros, model_state), (jnp.arange(k), micro))
        loss, metrics, grads = jax.tree.map(lambda x: x / k, summed)
        return loss, metrics, grads, model_state

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, metrics, grads, model_state = compute_grads(
            state.params, state.model_state, batch, rng, state.step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(params, opt_state, ema, _):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if ema_decay:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
            return params, opt_state, ema, model_state

        # A non-finite step leaves parameters, optimizer state, EMA and model state
        # untouched. One conditional rather than a select per leaf: selecting between the
        # donated old state and the new one made XLA:CPU copy the whole optimizer state at
        # the start of the step and hold it through forward and backward (ViT-B MAE:
        # 0.41 GB more temporaries).
        params, opt_state, ema, model_state = jax.lax.cond(
            finite, apply_update, lambda *old: old,
            state.params, state.opt_state, state.ema_params, state.model_state)
        nonfinite = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
            model_state=model_state,
            nonfinite_total=state.nonfinite_total + nonfinite,
            nonfinite_streak=(state.nonfinite_streak + 1) * nonfinite)
        # Skipped steps do not advance the optimizer's own count, hence its schedule.
        applied_updates = state.step - state.nonfinite_total
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(applied_updates),
                       nonfinite_steps=new_state.nonfinite_total,
                       nonfinite_streak=new_state.nonfinite_streak)
        return new_state, metrics

    return train_step


def jitted_train_step(config, spec: ModelSpec, tx, schedule, shardings, mesh):
    """The config's train step (objectives, gradient accumulation, EMA, on-device
    dequantisation), jitted with the state donated and sharded as `shardings`."""
    train_step = make_train_step(
        spec, tx, build_loss_fn(config.objectives), schedule,
        grad_accum_steps=config.get("grad_accum_steps", 1), ema_decay=config.get("ema_decay", 0.0),
        prepare_batch=lambda batch: dequantize_images(batch, config.data))
    return jax.jit(train_step, donate_argnums=0,
                   out_shardings=(shardings, sharding.replicated(mesh)))


# --------------------------------------------------------------------------- checks
def resolve_steps(config, num_records: int | None) -> tuple[int, int]:
    """(total_steps, warmup_steps) from *_steps or, given the dataset size, *_epochs."""
    def steps(name):
        if config.get(f"{name}_steps", None):
            return int(config.get(f"{name}_steps"))
        epochs = config.get(f"{name}_epochs", None)
        if epochs is None:
            return 0
        if not num_records:
            raise ConfigError(f"config.{name}_epochs needs the dataset size; set "
                              f"config.{name}_steps instead.")
        return int(math.ceil(epochs * num_records / config.global_batch_size))
    total, warmup = steps("total"), steps("warmup")
    if total <= 0:
        raise ConfigError("Set config.total_steps or config.total_epochs to a positive value.")
    if warmup >= total:
        raise ConfigError(f"warmup ({warmup} steps) must be shorter than training ({total} "
                          "steps); lower warmup_steps/warmup_epochs or train longer.")
    return total, warmup


def validate_config(config, mesh) -> None:
    """The batch fits the processes, the accumulation and the mesh's batch shards."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b, k = config.global_batch_size, config.get("grad_accum_steps", 1)
    if b % jax.process_count():
        raise ConfigError(f"global_batch_size {b} must be divisible by the process count "
                          f"{jax.process_count()}.")
    if k < 1 or b % k:
        raise ConfigError(f"global_batch_size {b} must be divisible by grad_accum_steps {k}.")
    if (b // k) % batch_shards:
        raise ConfigError(
            f"Each microbatch ({b} / grad_accum_steps {k} = {b // k}) must split evenly over "
            f"the {batch_shards} batch shards (mesh data x fsdp); change the batch or the mesh.")


@contextlib.contextmanager
def _as_config_error(section: str):
    """A data or model setting that cannot be built is the user's to fix: one line."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if error.args else repr(error)
        raise ConfigError(f"config.{section}: {message}") from error


# --------------------------------------------------------------------------- run
def _numeric_arrays(batch: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"}


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    out = {}
    for key in history[-1].keys():
        values = [float(h[key]) for h in history if key in h]
        finite = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(finite)) if finite else values[-1]
    return out


class Run:
    """One training run in `workdir`, entered once (`fit()` to the end) or many
    times (`fit(k)` repeatedly, e.g. one federated round each). See the module
    docstring for where the parameters come from. Use as a context manager, or call
    `close()` (`finish()` closes too)."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.is_chief = jax.process_index() == 0
        self._closed = False
        os.makedirs(workdir, exist_ok=True)
        run_config.check(config)
        distributed.check_same_config(config)
        distributed.set_compilation_cache(config.get("compilation_cache_dir", None))
        self.task = tasks.for_config(config)
        self.mesh = sharding.make_mesh(config.mesh)
        validate_config(config, self.mesh)
        self.spec = ModelSpec.from_config(config.model)
        with _as_config_error("data"):
            data = distributed.chief_first(lambda: self.task.train_data(
                config, process_index=jax.process_index(),
                process_count=jax.process_count()), "the training data")
        self._data_iter = iter(data.dataset)
        self.total_steps, warmup_steps = resolve_steps(config, data.num_records)
        self.schedule = optim.make_schedule(
            config.optimizer, global_batch_size=config.global_batch_size,
            total_steps=self.total_steps, warmup_steps=warmup_steps)
        self.tx = optim.make_optimizer(config.optimizer, self.schedule)
        # The checked config, for export and inference (a refused one leaves no trace).
        run_config.save_run_config(config, workdir, is_chief=self.is_chief)
        state, self.abstract_state, self.shardings = create_train_state(
            config, self.mesh, self.spec, self.tx)
        n_params = sum(x.size for x in jax.tree.leaves(self.abstract_state.params))
        log.info("Model: %.2fM parameters; mesh %s; %d steps (%d warmup); task %s",
                 n_params / 1e6, dict(self.mesh.shape), self.total_steps, warmup_steps,
                 self.task.name)
        self._ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_checkpoints", 3),
            save_every=config.checkpoint_every)
        self.state = self._initial_state(state)
        self.start_step = self.step
        self.task.prepare_workdir(config, workdir, is_chief=self.is_chief)
        self._step_fn = jitted_train_step(config, self.spec, self.tx, self.schedule,
                                          self.shardings, self.mesh)
        self._compiled = None
        self._flops, self._peak = None, None
        self.writer = metric_logging.MetricWriter(workdir)
        params_target = checkpoint.abstract_with_shardings(self.abstract_state.params,
                                                           self.shardings.params)
        context = HookContext(config=config, spec=self.spec, mesh=self.mesh, workdir=workdir,
                              writer=self.writer, params_target=params_target)
        # Every process at once, not chief_first: hooks may hold checkpoint managers whose
        # creation is a collective. (Their data is the training data's, prepared above.)
        with _as_config_error("data"):
            self.hooks = self.task.eval_hooks(context)
        self._stop = distributed.StopSignal()
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    def _initial_state(self, fresh: TrainState) -> TrainState:
        latest = self._ckpt.latest_step()
        init = self.config.get("init", None)
        if latest is not None:
            if init:
                log.warning(
                    "Resuming from step %d of %s: config.init (%s) is not used. The "
                    "workdir's own checkpoint holds this run's progress (parameters, optimizer, "
                    "step, data position); init only starts a fresh run. To start from %s, "
                    "use a new --workdir.", latest, self._ckpt.directory, init, init)
            target = checkpoint.abstract_with_shardings(self.abstract_state, self.shardings)
            return self._ckpt.restore(latest, target, self._data_iter)
        if init:
            return init_from_pretrained(self.config, fresh, self.abstract_state, self.shardings)
        return fresh

    @property
    def step(self) -> int:
        return int(sharding.to_host(self.state.step))

    @property
    def stopped(self) -> bool:
        """True once SIGTERM stopped a fit (the state is saved)."""
        return self._stop.requested

    def params(self) -> dict:
        """The current parameters as a nested dict of host numpy arrays (on every
        process: a collective in a multi-process run)."""
        return sharding.to_host(self.state.params)

    def set_params(self, params: dict) -> None:
        """Replaces the parameters named in `params` (a nested dict, all of the model's
        or a part such as {"encoder": ...}); the rest of the state (other parameters,
        optimizer moments, step, data position) stays. With an EMA, its entries restart
        from the given values: an average over another trajectory would mean nothing.
        With a proximal term (optimizer.proximal_mu), its anchor restarts from the
        parameters as now set (FedProx: the global model a round starts from)."""
        given = param_tree.flatten(params)
        current = param_tree.flatten_leaves(self.state.params)
        targets = param_tree.flatten_leaves(self.shardings.params)
        unknown = sorted(set(given) - set(current))
        if unknown:
            raise ValueError(f"given parameters the model does not have: {unknown[:6]}"
                             f"{' ...' if len(unknown) > 6 else ''}")
        for name, value in given.items():
            if value.shape != current[name].shape:
                raise ValueError(f"given parameter {name} has shape {value.shape}, the model's "
                                 f"is {current[name].shape}.")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"given parameter {name} has non-finite values.")

        def replace(tree):
            flat = param_tree.flatten_leaves(tree)
            for name, value in given.items():
                flat[name] = _place(value.astype(current[name].dtype), targets[name])
            return param_tree.unflatten(flat)

        ema = replace(self.state.ema_params) if self.state.ema_params else self.state.ema_params
        new_params = replace(self.state.params)
        # The proximal term's anchor (optimizer.proximal_mu) restarts from the parameters
        # now set, all of them (in copies with the anchor's own shardings); no-op without it.
        opt_state = optim.set_anchor(self.state.opt_state, new_params)
        self.state = self.state.replace(params=new_params, ema_params=ema, opt_state=opt_state)
        log.info("Step %d: %d of %d parameter arrays replaced by the given parameters.",
                 self.step, len(given), len(current))

    # ------------------------------------------------------------------ training
    def _next_batch(self):
        """The next global batch and the seconds spent waiting for the loader."""
        start = time.perf_counter()
        host_batch = next(self._data_iter)
        waited = time.perf_counter() - start  # the host->device copy is not a data wait
        return sharding.global_batch(_numeric_arrays(host_batch), self.mesh), waited

    def _compile(self, batch) -> None:
        self._compiled = self._step_fn.lower(self.state, batch).compile()
        self._flops = perf.compiled_flops(self._compiled)
        dtype = jnp.float32 if self.config.model.get("dtype", "float32") == "float32" \
            else jnp.bfloat16
        self._peak, peak_source = perf.peak_flops_per_device(
            self.config.get("peak_tflops_per_device", None), dtype=dtype)
        log.info("Compiled step: %s GFLOP per device; peak %.1f TFLOP/s per device (%s)",
                 f"{self._flops / 1e9:.1f}" if self._flops else "n/a", self._peak / 1e12,
                 peak_source)

    def fit(self, num_steps: int | None = None, *, params: dict | None = None) -> dict:
        """Trains `num_steps` more steps (None: to config.total_steps) through the one
        jitted step, logging, hooks and checkpoints, and saves at the end. `params`
        replace the current parameters first (`set_params`). Returns the last logged
        metrics. Stops early, saved, on SIGTERM (`stopped`)."""
        if params is not None:
            self.set_params(params)
        step = self.step
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        end = self.total_steps if num_steps is None else step + num_steps
        if end > self.total_steps:
            raise ConfigError(
                f"fit({num_steps}) from step {step} would end at step {end}, past "
                f"config.total_steps = {self.total_steps}, where the learning-rate schedule "
                "ends; raise total_steps to the whole budget (e.g. rounds x local steps).")
        if step >= end:
            if num_steps is None:
                log.info("Already trained to step %d of %d; nothing to do.", step,
                         self.total_steps)
            return self.last_metrics
        config, writer = self.config, self.writer
        max_streak = config.get("max_consecutive_nonfinite", 10)
        history: list[dict] = []
        pending = None  # metrics of the step in flight, read one step late (async dispatch)

        def record(step_number, device_metrics):
            history.append(jax.device_get(device_metrics))
            if int(history[-1]["nonfinite_streak"]) >= max_streak:
                writer.write(step_number, history[-1])
                self._raise_nonfinite(history[-1], step_number)

        with jax.set_mesh(self.mesh):
            batch, _ = self._next_batch()
            if self._compiled is None:
                self._compile(batch)
            window_start, window_steps, data_wait, data_wait_max = time.perf_counter(), 0, 0.0, 0.0
            while step < end:
                self.state, metrics = self._compiled(self.state, batch)
                step += 1
                window_steps += 1
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                # Every process asks at every step: a SIGTERM on any host stops all
                # of them at the same step (distributed.StopSignal).
                stop = self._stop.should_stop(step)
                at_end = stop or step == end
                if step % config.log_every == 0 or at_end:
                    record(*pending)
                    pending = None
                    elapsed = time.perf_counter() - window_start
                    self.last_metrics = _mean_metrics(history)
                    self.last_metrics.update(_speed_metrics(
                        config, elapsed, window_steps, data_wait, self._flops, self._peak,
                        self.mesh))
                    self.last_metrics["data_wait_max_s"] = data_wait_max
                    writer.write(step, self.last_metrics)
                    if self.is_chief:
                        _log_progress(step, self.total_steps, self.last_metrics)
                    history, window_steps, data_wait, data_wait_max = [], 0, 0.0, 0.0
                    window_start = time.perf_counter()
                for hook in self.hooks:
                    if hook.due(step, self.total_steps):
                        self.last_metrics.update(hook.after_step(step, self.state))
                # Save before fetching the next batch: the saved iterator position must
                # be the first batch a resumed run has not trained on.
                self._ckpt.save(step, self.state, self._data_iter, force=at_end)
                if stop:
                    log.warning("Stopped by SIGTERM at step %d; checkpoint saved.", step)
                    break
                if step < end:
                    batch, waited = self._next_batch()
                    data_wait += waited
                    data_wait_max = max(data_wait_max, waited)
        return self.last_metrics

    def _raise_nonfinite(self, metrics, step):
        streak = int(metrics["nonfinite_streak"])
        self._ckpt.wait()
        good = self._ckpt.latest_step()
        raise NonFiniteLossError(
            f"Loss or gradients were non-finite for {streak} consecutive steps, the last at "
            f"step {step}; those updates were skipped and the run is stopped. The last good "
            f"checkpoint is step {good} in {self._ckpt.directory} (left intact). Lower "
            "optimizer.base_lr, enable optimizer.grad_clip_norm, or check the data for "
            "non-finite values.")

    # ------------------------------------------------------------------ end
    def finish(self) -> dict:
        """The hooks' end-of-run work (test metrics, final files) once the run has
        reached total_steps; then closes. Returns {hook class name: its result}."""
        results = {}
        if self.step >= self.total_steps and not self._closed:
            trained = self.step > self.start_step
            with jax.set_mesh(self.mesh):
                for hook in self.hooks:
                    result = hook.finish(self.state, trained=trained)
                    if result is not None:
                        results[type(hook).__name__] = result
        self.close()
        return results

    def close(self) -> None:
        """Waits for pending saves and releases the hooks, writer and data workers."""
        if self._closed:
            return
        self._closed = True
        self._ckpt.close()
        for hook in self.hooks:
            hook.close()
        self.writer.close()
        if hasattr(self._data_iter, "close"):
            self._data_iter.close()  # stops prefetch workers and frees their shared memory

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains per `config` to total_steps, resuming from `workdir` if it holds a
    checkpoint, then runs the end-of-run evals. Returns the last logged metrics."""
    with Run(config, workdir) as run:
        metrics = run.fit()
        if not run.stopped:
            run.finish()
    return metrics


# --------------------------------------------------------------------------- logging
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
