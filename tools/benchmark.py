#!/usr/bin/env python
"""Throughput benchmarks for mimjax, one subcommand per thing benchmarked.

pretrain
    Times the real pretraining step (`train.make_train_step`: dequantising the
    pipeline's uint16 images, MAE / MIRAM forward, loss, backward, AdamW update,
    non-finite guard), jitted and sharded exactly as `train.train_and_evaluate` does,
    on a synthetic batch in the pipeline's format already on the devices (no data
    loading: this measures the model step). Reports compile time, the
    steady-state step time (median and mean over several timed windows of
    `--steps` steps each, synchronised only at the end of a window), images/s,
    achieved TFLOP/s and MFU, memory per device ("memory": XLA's analysis of the
    compiled step, and the allocator's high-water mark where the backend reports
    it), as an aligned table and as one JSON object on the last line of stdout (and
    in `--json OUT`).

    FLOPs. `xla_gflops_per_step` is XLA's cost analysis of the compiled step (all
    devices together; every op it counts, elementwise included). Next to it,
    `model_gflops_per_step` is an explicit count of the matmul FLOPs the model needs:
    the encoder on the visible tokens (+ class token), the patch embedding of the
    visible patches, every decoder on its full token grid (+ class token), attention
    scores and values, times 3 for forward + backward; layer norms, softmax, GELU,
    the loss and the optimizer are not counted. A reader can judge the XLA figure by
    the ratio of the two. MFU = FLOPs per step / step time / peak, with the peak from
    `--peak-tflops`, else config `peak_tflops_per_device`, else a matmul timed in the
    same run (`perf.measure_matmul_peak`, f32 or bf16 as the model computes).
    Simulated CPU devices (`--xla_force_host_platform_device_count`) share the
    host's cores, so on CPU the measured peak is the host's, shared by all devices.

    `--compare hf` also times HF transformers' `ViTMAEForPreTraining` (PyTorch, eager,
    train mode) built to the same sizes (encoder and decoder width, depth, heads, MLP,
    patch, image size, channels), mask ratio, norm_pix_loss, tanh GELU, LayerNorm
    eps, AdamW betas / eps / weight decay (on matrices only, as mimjax), bf16
    autocast when the mimjax model computes in bf16, with torch using as many intra-op
    threads as the CPU cores JAX uses. The HF model lives in its own spawned
    process: torch and XLA:CPU slow each other down in one process (measured on 2
    cores: mimjax ViT-B 2.71 img/s alone, 1.90 with torch in-process). The two
    processes are timed in alternating windows (mimjax, HF, mimjax, HF, ...; the idle
    one blocks on a pipe, and each window starts with one untimed step, see
    `time_interleaved`), so background load hits both alike, and the ratio
    `speedup_vs_hf` = mimjax img/s / HF img/s is printed. HF ViTMAE has one decoder:
    for a MIRAM (multi-scale) config it is compared at the base scale only and the
    output says so.

    Reading the numbers on a CPU host: other processes take cores and memory
    bandwidth, so compare figures from one run (the windows alternate), look at the
    spread of the windows, `host_load_avg` and `cpu_utilization`, and the peak
    re-measured between rounds. Process-wide XLA flags go in the XLA_FLAGS
    environment variable; `--xla-option` passes compile options to the mimjax step
    only.

mcr
    Times the image-text train step (task "image_text": model and objective "mcr",
    jitted and sharded as the trainer does, on a fixed batch of synthetic pairs in the
    pairs pipeline's format already on the devices) for three rows at one batch size,
    in alternating windows (`time_interleaved`): MCR (the given config: the masked
    image and report are the only inputs of all three losses), the CLIP-style baseline
    derived from it (configs.mcr_demo.clip_baseline: no masking, contrastive loss
    only, no decoder, no MLM head, class-token pooling) and the two-stream variant
    (objective option itc_inputs="unmasked": the masked pass for the reconstruction
    losses plus an unmasked pass for the contrastive loss, the design MCR's paper
    says it saves memory and time against). Reports pairs/s, step time, XLA's FLOP
    count, TFLOP/s and MFU (peak as for `pretrain`), memory per device (XLA's memory
    analysis of the compiled step: temporaries + arguments; and the allocator's
    high-water mark where the backend reports it, i.e. not on CPU) and the ratios
    MCR/CLIP and MCR/two-stream, as a table and as JSON ("variants", "ratios").

loader
    Records/s of the pretraining input pipeline on ArrayRecord shards (`--data`, or
    the phantom dataset generated once), per worker process and in total, for each
    stage on its own (read: ArrayRecord random access; decode:
    `records.decode_record`; augment: the pretraining transform, random resized crop
    + flip to `--size`, one scale, quantised to the uint16 the workers ship (the
    normalisation runs on the device, in the train step); record: the three
    chained) and for
    the grain pipeline of `pipeline.make_pretrain_dataset` end to end with
    mp_prefetch workers, consumed as the trainer does. Every process is pinned to
    one OpenCV / OpenMP thread, so a worker is one core; `--sweep` measures 1..N
    workers and the scaling efficiency (total / (N x one worker)). Next to the
    wall-clock rates, "per CPU-second" (records per CPU-second a worker spent) is
    what one core gives when others share the host. Target: 1,000 records/s per
    worker for 448-px uint16 records to 224.

Examples:
    python tools/benchmark.py pretrain --config configs/mae_vit_b16.py --image-size 224 \\
        --batch 16 --config.model.dtype=float32 --compare hf
    python tools/benchmark.py pretrain --config configs/miram_vit_b16.py --batch 64 \\
        --config.model.attention=fused --json /tmp/bench.json
    python tools/benchmark.py mcr --config configs/mcr_demo.py --batch 64 --steps 3
    python tools/benchmark.py loader --sweep
    python tools/benchmark.py loader --data /data/shards --workers 8 --seconds 5

Config overrides `--config.a.b=VALUE` take a Python literal (`1`, `0.5`, `"x"`,
`[224, 448]`, `None`, `true`/`false`) or else a bare string, and may set fields
whose default is None (e.g. `--config.model.depth=2`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `mimjax`, `configs`, `input_pipeline`


# ----------------------------------------------------------------------------- config
def load_config(spec: str, overrides: list[tuple[str, str]] = ()):
    """`path/to/config.py[:ARG]` -> get_config(ARG), then `--config.key=value` overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no such config file {path!r}.")
    module_spec = importlib.util.spec_from_file_location(
        "_benchmark_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in overrides:
        set_config_value(config, key, value)
    return config


def parse_value(text: str, current):
    if isinstance(current, bool) and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = text  # e.g. --config.data.dir=123
    return value


def set_config_value(config, dotted_key: str, text: str) -> None:
    *parents, leaf = dotted_key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise SystemExit(f"--config.{dotted_key}: config has no field "
                             f"{'.'.join(parents[:i + 1])!r}.")
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"--config.{dotted_key}: config has no field {dotted_key!r}; "
                         f"fields here: {sorted(node.keys())}.")
    value = parse_value(text, node[leaf])
    try:
        node[leaf] = value
    except TypeError as e:
        raise SystemExit(f"--config.{dotted_key}={text}: {e}") from None


def split_config_overrides(unknown: list[str]) -> list[tuple[str, str]]:
    """['--config.a=1', '--config.b', '2'] -> [('a', '1'), ('b', '2')]; anything else errors."""
    out, i = [], 0
    while i < len(unknown):
        item = unknown[i]
        if not item.startswith("--config."):
            raise SystemExit(f"Unrecognised argument {item!r} (see --help).")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(unknown):
                raise SystemExit(f"{item} needs a value.")
            value, i = unknown[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def set_image_size(config, size: int) -> None:
    """Base resolution -> `size`; the other scales keep their ratio to the base."""
    base = int(config.model.image_size)
    scales = [int(s) for s in config.model.scales]
    if any(s % base for s in scales):
        raise SystemExit(f"model.scales {scales} are not multiples of image_size {base}.")
    config.model.image_size = size
    config.model.scales = [size * (s // base) for s in scales]


# ----------------------------------------------------------------------------- flops
def transformer_fwd_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Matmul FLOPs of `depth` pre-norm blocks on `tokens` tokens (one image, forward):
    q, k, v, out projections 4*T*D*D MACs, MLP 2*T*D*M MACs, scores and values
    2*T*T*D MACs; 1 MAC = 2 FLOPs."""
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens * tokens * width
    return float(depth * per_block)


def model_flops_per_image(model_cfg, mask_ratio: float) -> dict[str, float]:
    """Forward matmul FLOPs per image of the MAE/MIRAM model: the encoder on the
    visible patches, one decoder per scale on its full grid (see module docstring)."""
    from mimjax.models import vit

    enc = vit.vit_config_from(model_cfg)
    t = enc.transformer
    cls = int(enc.class_token)
    patch_dim = enc.patch_size**2 * enc.channels
    num_patches = enc.num_patches
    visible = int(num_patches * (1 - mask_ratio))
    encoder = 2 * visible * patch_dim * t.width
    encoder += transformer_fwd_flops(visible + cls, t.width, t.depth, t.mlp_dim)
    dec = model_cfg.decoder
    d_width, d_depth = dec.width, dec.depth
    d_mlp = dec.get("mlp_dim", None) or 4 * d_width
    decoders = {}
    for scale in model_cfg.scales:
        factor = int(scale) // enc.image_size
        tokens = num_patches * factor**2
        flops = 2 * (visible + cls) * t.width * d_width               # decoder embed
        flops += transformer_fwd_flops(tokens + cls, d_width, d_depth, d_mlp)
        flops += 2 * tokens * d_width * patch_dim                      # prediction head
        decoders[int(scale)] = float(flops)
    return {"encoder": float(encoder), "decoders": decoders,
            "forward": float(encoder + sum(decoders.values()))}


# ----------------------------------------------------------------------------- timing
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


# ----------------------------------------------------------------------------- shared
def describe_devices() -> tuple[list, str, str]:
    """(devices, platform, a one-line description: the CPU model and cores on CPU)."""
    import jax

    devices = jax.devices()
    platform_name = devices[0].platform
    device = devices[0].device_kind
    if platform_name == "cpu":
        device = f"cpu ({_cpu_name()}, {_cores()} cores)"
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


def format_rows(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned table lines: first column left-aligned, the others right-aligned."""
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(x, widths))) for x in rows]


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


# ----------------------------------------------------------------------------- mimjax
class MimjaxTrainStep(Timed):
    """The trainer's step (`train.make_train_step`: `prepare_batch`, loss, backward,
    AdamW, non-finite guard), jitted and sharded as `train.train_and_evaluate` does,
    compiled once for a fixed synthetic batch already on the devices. Subclasses say
    what the batch is (`host_batch`)."""
    name = "mimjax"

    def __init__(self, config, log, compiler_options: dict | None = None, *,
                 name: str | None = None):
        import jax
        import numpy as np

        from input_pipeline.dequantize import dequantize_images
        from mimjax import optim, sharding, train
        from mimjax.objectives import build_loss_fn

        self.jax = jax
        if name:
            self.name = name
        mesh = sharding.make_mesh(config.mesh)
        train.validate_config(config, mesh)
        batch_size = config.global_batch_size
        schedule = optim.make_schedule(config.optimizer, global_batch_size=batch_size,
                                       total_steps=1_000_000, warmup_steps=0)
        tx = optim.make_optimizer(config.optimizer, schedule)
        spec = train.ModelSpec.from_config(config.model)
        start = time.perf_counter()
        state, abstract_state, shardings = train.create_train_state(config, mesh, spec, tx)
        jax.block_until_ready(state)
        self.init_s = time.perf_counter() - start
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
        train_step = train.make_train_step(
            spec, tx, build_loss_fn(config.objectives), schedule,
            grad_accum_steps=config.get("grad_accum_steps", 1),
            ema_decay=config.get("ema_decay", 0.0),
            prepare_batch=lambda batch: dequantize_images(batch, config.data))
        step_fn = jax.jit(train_step, donate_argnums=0,
                          out_shardings=(shardings, sharding.replicated(mesh)))
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


class MimjaxPretrainStep(MimjaxTrainStep):
    """The MAE / MIRAM pretraining step on what pipeline.make_pretrain_dataset ships:
    unit-quantised uint16, one channel per scale (the step normalises them and repeats
    the channel to data.channels)."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        import numpy as np

        return {f"image_{s}": rng.integers(0, 65536, (local_batch, s, s, 1), dtype=np.uint16)
                for s in config.model.scales}


# ----------------------------------------------------------------------------- HF
def hf_vitmae_config(config, image_size: int):
    """transformers.ViTMAEConfig with mimjax's sizes at one scale (`image_size`)."""
    from transformers import ViTMAEConfig

    from mimjax.models import vit

    enc = vit.vit_config_from(config.model)
    t = enc.transformer
    dec = config.model.decoder
    objective = config.objectives.get("masked_reconstruction", {})
    return ViTMAEConfig(
        hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
        intermediate_size=t.mlp_dim,
        hidden_act="gelu_pytorch_tanh" if t.gelu_approximate else "gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=t.layer_norm_eps, image_size=image_size, patch_size=enc.patch_size,
        num_channels=enc.channels, qkv_bias=True,
        decoder_hidden_size=dec.width, decoder_num_hidden_layers=dec.depth,
        decoder_num_attention_heads=dec.num_heads,
        decoder_intermediate_size=dec.get("mlp_dim", None) or 4 * dec.width,
        mask_ratio=objective.get("mask_ratio", 0.75),
        norm_pix_loss=objective.get("norm_pix_loss", True))


class HFPretrainStep(Timed):
    name = "hf"

    def __init__(self, config, threads: int, attn_implementation: str, log):
        import torch
        from transformers import ViTMAEForPreTraining

        from mimjax import optim

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        image_size = int(config.model.image_size)
        hf_config = hf_vitmae_config(config, image_size)
        self.model = ViTMAEForPreTraining._from_config(
            hf_config, attn_implementation=attn_implementation).train()
        self.attn_implementation = self.model.config._attn_implementation
        opt_cfg = config.optimizer
        no_decay = ("cls_token", "mask_token", "position_embeddings")
        decay, rest = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # ViTMAE's sin-cos position tables are frozen
            (decay if p.ndim >= 2 and not any(k in name for k in no_decay) else rest).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt_cfg.get("weight_decay", 0.05)},
             {"params": rest, "weight_decay": 0.0}],
            lr=optim.peak_learning_rate(opt_cfg, config.global_batch_size),
            betas=(opt_cfg.get("b1", 0.9), opt_cfg.get("b2", 0.95)), eps=opt_cfg.get("eps", 1e-8))
        self.clip = opt_cfg.get("grad_clip_norm", None)
        self.bf16 = config.model.get("dtype", "float32") == "bfloat16"
        self.pixel_values = torch.randn(config.global_batch_size, hf_config.num_channels,
                                        image_size, image_size)
        # Trainable only: ViTMAE's sin-cos position tables are (frozen) parameters there.
        self.num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.threads = torch.get_num_threads()
        self.loss = float("nan")
        log(f"[hf] ViTMAEForPreTraining {self.num_params / 1e6:.2f}M parameters, "
            f"attention {self.attn_implementation}, {self.threads} torch threads"
            f"{', bf16 autocast' if self.bf16 else ''}")

    def step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(pixel_values=self.pixel_values).loss
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def matmul_peak(self, size: int = 2048, repeats: int = 10) -> float:
        """Best FLOP/s of a square matmul in torch (as perf.measure_matmul_peak in JAX)."""
        torch = self.torch
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2.0 * size**3 / best

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        self.loss = float(loss.detach())  # CPU torch is synchronous; this is the sync point
        return time.perf_counter() - start

    def info(self) -> dict:
        import transformers

        return {"attn_implementation": self.attn_implementation, "threads": self.threads,
                "bf16": self.bf16, "num_params": self.num_params,
                "versions": {"torch": self.torch.__version__,
                             "transformers": transformers.__version__}}


def _hf_process_main(conn, config_spec: str, overrides, image_size, batch, threads: int,
                     attn_implementation: str) -> None:
    """Body of the HF process: builds HFPretrainStep, then serves ("run", n), ("peak",)
    and ("stop",) requests from the pipe until told to stop. Replies ("ok", payload) or
    ("error", traceback)."""
    import traceback

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        config = build_pretrain_config(config_spec, overrides, image_size, batch)
        step = HFPretrainStep(config, threads, attn_implementation, log)
        conn.send(("ok", step.info()))
        while True:
            request = conn.recv()
            if request[0] == "stop":
                break
            if request[0] == "run":
                seconds, cpu = step.timed_run(request[1])
                conn.send(("ok", (seconds, cpu, step.loss)))
            elif request[0] == "peak":
                conn.send(("ok", step.matmul_peak()))
            else:
                raise ValueError(f"unknown request {request!r}")
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class HFPretrainProcess(Timed):
    """HFPretrainStep in its own (spawned) process, driven over a pipe.

    In one process torch and XLA:CPU slow each other down (measured: mimjax ViT-B 2.71
    img/s alone vs 1.90 with torch in the same process, on 2 cores). Here each runs in
    its own process and the windows still alternate: while one times its steps the
    other blocks on the pipe (its threads idle: measured 0.00 CPU-s while waiting).
    """
    name = "hf"

    def __init__(self, config_spec: str, overrides, image_size, batch, threads: int,
                 attn_implementation: str, log):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_hf_process_main, daemon=True,
            args=(child, config_spec, list(overrides), image_size, batch, threads,
                  attn_implementation))
        self._process.start()
        child.close()
        log("[hf] started a separate process for the HF model")
        info = self._receive()
        self.attn_implementation = info["attn_implementation"]
        self.threads, self.bf16 = info["threads"], info["bf16"]
        self.num_params, self.versions = info["num_params"], info["versions"]
        self.loss = float("nan")

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise SystemExit(f"The HF process exited (code {self._process.exitcode}) "
                             "without a reply; see its messages above.") from None
        if status != "ok":
            raise SystemExit(f"The HF process failed:\n{payload}")
        return payload

    def timed_run(self, n: int) -> tuple[float, float]:
        self._conn.send(("run", n))
        seconds, cpu, self.loss = self._receive()
        return seconds, cpu

    def run(self, n: int) -> float:
        return self.timed_run(n)[0]

    def matmul_peak(self) -> float:
        self._conn.send(("peak",))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.terminate()
        self._conn.close()


# ----------------------------------------------------------------------------- pretrain
def add_pretrain_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="time the MAE / MIRAM pretraining step (synthetic batch)",
        description="Time the real pretraining step on a synthetic batch; optionally "
                    "against HF transformers' ViTMAEForPreTraining. Config overrides: "
                    "--config.KEY=VALUE (any number).")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="config file with get_config(arg), e.g. configs/mae_vit_b16.py")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch size (default: config.global_batch_size)")
    p.add_argument("--image-size", type=int, default=None,
                   help="base (encoder) resolution; the other scales keep their ratio to it")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=3, help="timed windows; median and mean over them (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default: %(default)s)")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also time HF transformers' ViTMAEForPreTraining (PyTorch, CPU)")
    p.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"],
                   help="attn_implementation of the HF model (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the CPU cores JAX uses, i.e. "
                        "all schedulable cores)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: config "
                        "peak_tflops_per_device, else a matmul measured in this run)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="XLA debug option for compiling the mimjax step only, e.g. "
                        "xla_cpu_enable_concurrency_optimized_scheduler=false (repeatable; "
                        "process-wide flags go in the XLA_FLAGS environment variable)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")
    p.set_defaults(run=run_pretrain)


def parse_xla_options(items: list[str]) -> dict:
    """['name=value', ...] -> {name: bool | int | float | str} for `compile(compiler_options=)`."""
    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq:
            raise SystemExit(f"--xla-option {item!r}: expected NAME=VALUE.")
        value = parse_value(text, None)
        out[name.lstrip("-")] = value if isinstance(value, (bool, int, float)) else text
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_pretrain_config(config_spec: str, overrides, image_size: int | None,
                          batch: int | None):
    """The benchmarked config: file + overrides, then --image-size and --batch."""
    config = load_config(config_spec, overrides)
    if image_size:
        set_image_size(config, image_size)
    if batch:
        config.global_batch_size = batch
    return config


def run_pretrain(args, overrides, log) -> dict:
    hf_processes: list[HFPretrainProcess] = []
    try:
        return _run_pretrain(args, overrides, log, hf_processes)
    finally:
        for process in hf_processes:
            process.close()


def _run_pretrain(args, overrides, log, hf_processes: list) -> dict:
    import jax

    config = build_pretrain_config(args.config, overrides, args.image_size, args.batch)
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices, platform_name, device = describe_devices()
    log(f"{len(devices)} x {device}; batch {batch}; scales {list(config.model.scales)}; {dtype}")

    runners: list[Timed] = []
    mimjax_step = MimjaxPretrainStep(config, log, parse_xla_options(args.xla_option))
    runners.append(mimjax_step)
    hf_step = None
    if args.compare == "hf":
        threads = args.threads or _cores()
        hf_step = HFPretrainProcess(args.config, overrides, args.image_size, args.batch,
                                    threads, args.hf_attention, log)
        hf_processes.append(hf_step)
        runners.append(hf_step)

    peak = PeakMeter(args.peak_tflops, config, dtype, log)
    torch_measured = []

    def measure_peak():
        peak.measure()
        if hf_step is not None and not peak.tflops:  # reference: torch's GEMM on this host
            torch_measured.append(hf_step.matmul_peak())
            log(f"[peak] torch matmul {torch_measured[-1] / 1e12:.3f} TFLOP/s")

    measure_peak()
    load_before = os.getloadavg()
    per_step = time_interleaved(runners, warmup=args.warmup, steps=args.steps,
                                windows=args.windows, log=log, after_round=measure_peak)
    load_after = os.getloadavg()

    num_devices = len(devices)
    resolved = peak.resolve(platform_name)
    peak_per_device, peak_total = resolved["per_device"], resolved["total"]
    mimjax = summarize(per_step["mimjax"], batch, _cores())
    objective = config.objectives.get("masked_reconstruction", {})
    mask_ratio = objective.get("mask_ratio", 0.75)
    counts = model_flops_per_image(config.model, mask_ratio)
    model_flops = 3 * batch * counts["forward"]
    step_time = mimjax["step_time_s"]
    result = {
        "benchmark": "pretrain",
        "config": " ".join([args.config] + [f"--config.{k}={v}" for k, v in overrides]),
        "device": device, "platform": platform_name, "num_devices": num_devices,
        # XLA:CPU runs on an intra-op pool of one thread per schedulable core.
        "cpu_threads": _cores() if platform_name == "cpu" else None,
        "mesh": dict(mimjax_step.mesh.shape), "dtype": dtype, "batch": batch,
        "image_size": int(config.model.image_size),
        "scales": [int(s) for s in config.model.scales],
        "attention": config.model.get("attention", "xla"),
        "scan": bool(config.model.get("scan", False)),
        "remat": bool(config.model.get("remat", False)),
        "params_m": mimjax_step.num_params / 1e6,
        "init_s": mimjax_step.init_s, "lower_s": mimjax_step.lower_s,
        "compile_s": mimjax_step.compile_s,
        "warmup_steps": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        **mimjax,
        "loss": mimjax_step.last_loss(),
        **xla_throughput(mimjax_step.compiled, step_time, peak_per_device),
        "model_gflops_per_step": model_flops / 1e9,
        "model_gflops_per_image_fwd": {
            "encoder": counts["encoder"] / 1e9,
            **{f"decoder_{s}": f / 1e9 for s, f in counts["decoders"].items()}},
        "model_tflops_per_s": model_flops / step_time / 1e12,
        "peak_tflops": peak_total / 1e12, "peak_tflops_per_device": peak_per_device / 1e12,
        "peak_source": resolved["source"],
        "peak_tflops_measured": [m / 1e12 for m in peak.measured],
        "model_mfu": model_flops / step_time / peak_total,
        # Per device: XLA's analysis of the compiled step; the allocator's high-water mark.
        "memory": {**compiled_memory(mimjax_step.compiled), **device_memory()},
        "host_load_avg": [load_before[0], load_after[0]],  # 1-min, before / after timing
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_options": parse_xla_options(args.xla_option),
        "versions": {"jax": jax.__version__},
    }
    if hf_step is not None:
        hf = summarize(per_step["hf"], batch, _cores())
        hf_counts = model_flops_per_image(_base_scale_model(config), mask_ratio)
        hf_flops = 3 * batch * hf_counts["forward"]
        hf.update({
            "model": "transformers.ViTMAEForPreTraining", "attention": hf_step.attn_implementation,
            "dtype": "bfloat16 autocast" if hf_step.bf16 else "float32",
            "threads": hf_step.threads, "params_m": hf_step.num_params / 1e6,
            "image_size": int(config.model.image_size), "loss": hf_step.loss,
            "model_gflops_per_step": hf_flops / 1e9,
            "model_tflops_per_s": hf_flops / hf["step_time_s"] / 1e12,
            "model_mfu": hf_flops / hf["step_time_s"] / peak_total,
            "torch_matmul_tflops": max(torch_measured) / 1e12 if torch_measured else None,
        })
        if len(config.model.scales) > 1:
            hf["note"] = (f"HF ViTMAE has one decoder: compared at the base scale "
                          f"{int(config.model.image_size)} only, while mimjax runs all "
                          f"scales {[int(s) for s in config.model.scales]}.")
        result["hf"] = hf
        result["speedup_vs_hf"] = result["img_per_s"] / hf["img_per_s"]
        result["versions"].update(hf_step.versions)
    return result


def _base_scale_model(config):
    model = config.model.copy_and_resolve_references()
    with model.unlocked():
        model.scales = [int(config.model.image_size)]
    return model


def format_pretrain_table(r: dict) -> str:
    hf = r.get("hf")
    rows = [("", "mimjax", "HF ViTMAE") if hf else ("", "mimjax")]

    def row(label, mine, theirs=None, fmt="{:.2f}"):
        show = lambda v: "n/a" if v is None else (fmt.format(v) if not isinstance(v, str) else v)
        rows.append((label, show(mine), show(theirs)) if hf else (label, show(mine)))

    hf = hf or {}
    row("images / s", r["img_per_s"], hf.get("img_per_s"))
    row("step time median (s)", r["step_time_s"], hf.get("step_time_s"), "{:.4f}")
    row("step time mean (s)", r["step_time_mean_s"], hf.get("step_time_mean_s"), "{:.4f}")
    row("step time min..max (s)", f"{r['step_time_min_s']:.4f}..{r['step_time_max_s']:.4f}",
        f"{hf['step_time_min_s']:.4f}..{hf['step_time_max_s']:.4f}" if hf else None)
    row("parameters (M)", r["params_m"], hf.get("params_m"))
    row("model GFLOP / step", r["model_gflops_per_step"], hf.get("model_gflops_per_step"), "{:.1f}")
    row("XLA GFLOP / step", r["xla_gflops_per_step"], None, "{:.1f}")
    row("achieved TFLOP/s (XLA)", r["tflops_per_s"], None, "{:.3f}")
    row("achieved TFLOP/s (model)", r["model_tflops_per_s"], hf.get("model_tflops_per_s"), "{:.3f}")
    row("MFU (XLA FLOPs)", None if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", None)
    row("MFU (model FLOPs)", f"{100 * r['model_mfu']:.1f}%",
        f"{100 * hf['model_mfu']:.1f}%" if hf else None)
    row("CPU utilisation", f"{100 * r['cpu_utilization']:.0f}%",
        f"{100 * hf['cpu_utilization']:.0f}%" if hf else None)
    row("memory, compiled (MiB/dev)", _mib(r["memory"]["compiled_peak_bytes"]), None)
    row("memory, device peak (MiB)", _mib(r["memory"]["device_peak_bytes"]), None)
    row("compile (s)", r["compile_s"], None, "{:.1f}")
    row("final loss", r["loss"], hf.get("loss"), "{:.4f}")
    lines = [f"pretrain | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} | scales {r['scales']} | attention {r['attention']}")]
    lines += format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})")
    if hf:
        torch_peak = (f"; torch's own 2048^3 matmul: {hf['torch_matmul_tflops']:.3f} TFLOP/s"
                      if hf["torch_matmul_tflops"] else "")
        lines.append(f"speedup vs HF: {r['speedup_vs_hf']:.2f}x (HF: {hf['attention']} "
                     f"attention, {hf['dtype']}, {hf['threads']} torch threads{torch_peak})")
        if "note" in hf:
            lines.append(hf["note"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- mcr
# Rows of the mcr benchmark: name -> (table label, what it runs).
MCR_VARIANTS = {
    "mcr": ("MCR", ("the given config: masked image and report are the only inputs of the "
                    "contrastive, masked image and masked language losses (one pass)")),
    "clip": ("CLIP", ("configs.mcr_demo.clip_baseline of it: unmasked inputs, contrastive "
                      "loss only, no decoder, no MLM head, class-token pooling")),
    "two_stream": ("two-stream", ("it with objectives.mcr.itc_inputs='unmasked': a masked "
                                  "pass for the reconstruction losses plus an unmasked pass "
                                  "for the contrastive loss")),
}


def add_mcr_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mcr", help="time MCR against its CLIP and two-stream baselines (synthetic pairs)",
        description="Time the image-text train step of an MCR config, of the CLIP-style "
                    "baseline derived from it and of the two-stream variant, at one batch "
                    "size, in alternating windows: pairs/s, step time, TFLOP/s, MFU, memory "
                    "and the ratios MCR/CLIP and MCR/two-stream. Config overrides: "
                    "--config.KEY=VALUE (any number), applied before the variants are "
                    "derived.")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="an image-text config (task 'image_text', model and objective "
                        "'mcr'), e.g. configs/mcr_demo.py")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch size, pairs (default: config.global_batch_size)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=3, help="timed windows per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: config "
                        "peak_tflops_per_device, else a matmul measured in this run)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="XLA debug option for compiling the steps (repeatable)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")
    p.set_defaults(run=run_mcr)


def mcr_variant_configs(config) -> dict:
    """{"mcr": the config, "clip": its CLIP-style baseline, "two_stream": its two-stream
    variant}, each a separate copy. The config must be an MCR setting (image masking,
    masked contrastive inputs)."""
    from configs.mcr_demo import clip_baseline
    from mimjax import train

    try:
        task = train.task_of(config)
    except ValueError as e:
        raise SystemExit(f"--config: {e}") from None
    if task != "image_text":
        raise SystemExit(f"--config: the mcr benchmark needs an image-text config (task "
                         f"'image_text', model 'mcr'), got task {task!r}; e.g. "
                         "configs/mcr_demo.py.")
    objective = config.objectives.mcr
    image_ratio = objective.get("image_mask_ratio", 0.5)
    itc_inputs = objective.get("itc_inputs", "masked")
    if not image_ratio > 0 or itc_inputs != "masked":
        raise SystemExit(
            f"--config: objectives.mcr has image_mask_ratio {image_ratio} and itc_inputs "
            f"{itc_inputs!r}, not an MCR setting (image_mask_ratio > 0, itc_inputs "
            "'masked'); the CLIP and two-stream rows are derived from the MCR config, so "
            "pass that one (e.g. configs/mcr_demo.py, not :clip).")
    variants = {name: config.copy_and_resolve_references() for name in MCR_VARIANTS}
    clip_baseline(variants["clip"])
    with variants["two_stream"].objectives.mcr.unlocked():
        variants["two_stream"].objectives.mcr.itc_inputs = "unmasked"
    return variants


def synthetic_pairs_batch(config, batch_size: int, rng, first_index: int = 0) -> dict:
    """A batch of the pairs pipeline's contract (input_pipeline.pairs): "image" float32
    [B, S, S, C] (normalised: standard normal), "text_ids" int32 [B, L] = [CLS], random
    regular tokens, [SEP], then [PAD], with report lengths uniform from half of L to L,
    "text_mask" int32 [B, L] (1 = real token), "pair_index" int32 [B]."""
    import numpy as np

    from mimjax.models import text

    model = config.model
    size, channels = int(model.image_size), int(model.get("channels", 1))
    vocab = int(model.text.vocab_size)
    length = int(config.data.get("max_text_length", None) or model.text.max_length)
    if length > int(model.text.max_length):
        raise SystemExit(f"data.max_text_length {length} exceeds model.text.max_length "
                         f"{model.text.max_length}; make them equal.")
    ids = np.zeros((batch_size, length), np.int32)
    words = rng.integers(max(1, length // 2), length - 2, size=batch_size, endpoint=True)
    for row, n in enumerate(words):
        ids[row, 0] = text.CLS_ID
        ids[row, 1:1 + n] = rng.integers(text.NUM_SPECIAL_TOKENS, vocab, size=n)
        ids[row, 1 + n] = text.SEP_ID
    return {"image": rng.standard_normal((batch_size, size, size, channels), np.float32),
            "text_ids": ids, "text_mask": (ids != text.PAD_ID).astype(np.int32),
            "pair_index": np.arange(first_index, first_index + batch_size, dtype=np.int32)}


class ImageTextStep(MimjaxTrainStep):
    """The image-text (MCR) train step on a fixed batch of synthetic pairs."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        first = self.jax.process_index() * local_batch
        return synthetic_pairs_batch(config, local_batch, rng, first_index=first)


def _variant_settings(config) -> dict:
    objective, model = config.objectives.mcr, config.model
    return {"image_mask_ratio": objective.get("image_mask_ratio", 0.5),
            "text_mask_ratio": objective.get("text_mask_ratio", 0.25),
            "itc_inputs": objective.get("itc_inputs", "masked"),
            "mim_weight": objective.get("mim_weight", 1.0),
            "mlm_weight": objective.get("mlm_weight", 1.0),
            "pooling": model.get("pooling", "map_then_mean"),
            "decoder": model.get("decoder", None) is not None,
            "mlm_head": bool(model.text.get("mlm_head", True))}


# Figures compared as MCR / other: (key in the row or its "memory", where).
_MCR_RATIO_KEYS = ("pairs_per_s", "step_time_s", "xla_gflops_per_step", "tflops_per_s",
                   "compiled_peak_bytes", "compiled_temp_bytes", "device_peak_bytes",
                   "params_m")


def _figure(row: dict, key: str):
    return row["memory"][key] if key in row["memory"] else row.get(key)


def mcr_ratios(mine: dict, other: dict) -> dict:
    """{figure: mine / other} (None where either is missing or zero)."""
    out = {}
    for key in _MCR_RATIO_KEYS:
        a, b = _figure(mine, key), _figure(other, key)
        out[key] = a / b if a is not None and b else None
    return out


def run_mcr(args, overrides, log) -> dict:
    import jax

    for name in ("--steps", "--windows"):
        if getattr(args, name[2:]) < 1:
            raise SystemExit(f"{name} must be >= 1, got {getattr(args, name[2:])}.")
    config = build_pretrain_config(args.config, overrides, None, args.batch)
    variants = mcr_variant_configs(config)
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices, platform_name, device = describe_devices()
    log(f"{len(devices)} x {device}; batch {batch} pairs; image {config.model.image_size} px; "
        f"{dtype}")
    compiler_options = parse_xla_options(args.xla_option)
    runners = [ImageTextStep(cfg, log, compiler_options, name=name)
               for name, cfg in variants.items()]

    peak = PeakMeter(args.peak_tflops, config, dtype, log)
    peak.measure()
    device_memory_after_warmup = {}
    load_before = os.getloadavg()
    per_step = time_interleaved(
        runners, warmup=args.warmup, steps=args.steps, windows=args.windows, log=log,
        after_round=peak.measure,
        after_warmup=lambda r: device_memory_after_warmup.__setitem__(r.name, device_memory()))
    load_after = os.getloadavg()
    resolved = peak.resolve(platform_name)

    rows = {}
    for runner in runners:
        timing = summarize(per_step[runner.name], batch, _cores())
        timing["pairs_per_s"] = timing.pop("img_per_s")
        label, description = MCR_VARIANTS[runner.name]
        rows[runner.name] = {
            "label": label, "description": description,
            **_variant_settings(variants[runner.name]),
            "params_m": runner.num_params / 1e6, "init_s": runner.init_s,
            "lower_s": runner.lower_s, "compile_s": runner.compile_s,
            **timing, "loss": runner.last_loss(),
            **xla_throughput(runner.compiled, timing["step_time_s"], resolved["per_device"]),
            "memory": {**compiled_memory(runner.compiled),
                       **device_memory_after_warmup[runner.name]},
        }
    text_cfg = config.model.text
    return {
        "benchmark": "mcr",
        "config": " ".join([args.config] + [f"--config.{k}={v}" for k, v in overrides]),
        "device": device, "platform": platform_name, "num_devices": len(devices),
        "cpu_threads": _cores() if platform_name == "cpu" else None,
        "mesh": dict(runners[0].mesh.shape), "dtype": dtype, "batch": batch,
        "image_size": int(config.model.image_size),
        "text_length": int(config.data.get("max_text_length", None) or text_cfg.max_length),
        "vocab_size": int(text_cfg.vocab_size),
        "warmup_steps": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        "variants": rows,
        "ratios": {f"mcr_over_{other}": mcr_ratios(rows["mcr"], rows[other])
                   for other in ("clip", "two_stream")},
        "peak_tflops": resolved["total"] / 1e12,
        "peak_tflops_per_device": resolved["per_device"] / 1e12,
        "peak_source": resolved["source"],
        "peak_tflops_measured": [m / 1e12 for m in peak.measured],
        "host_load_avg": [load_before[0], load_after[0]],  # 1-min, before / after timing
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_options": compiler_options,
        "versions": {"jax": jax.__version__},
    }


def format_mcr_table(r: dict) -> str:
    names = list(MCR_VARIANTS)
    rows_by_name = r["variants"]
    ratio_keys = ("mcr_over_clip", "mcr_over_two_stream")
    rows = [("", *(MCR_VARIANTS[n][0] for n in names), "MCR/CLIP", "MCR/two-stream")]

    def show(value, fmt):
        if value is None:
            return "n/a"
        return value if isinstance(value, str) else fmt.format(value)

    def row(label, key=None, fmt="{:.2f}", values=None, ratio=True):
        values = values or [_figure(rows_by_name[n], key) for n in names]
        ratios = [r["ratios"][k][key] if ratio else None for k in ratio_keys]
        rows.append((label, *(show(v, fmt) for v in values),
                     *("" if not ratio else show(x, "{:.2f}x") for x in ratios)))

    row("pairs / s", "pairs_per_s")
    row("step time median (s)", "step_time_s", "{:.4f}")
    row("step time min..max (s)", values=[
        f"{rows_by_name[n]['step_time_min_s']:.4f}..{rows_by_name[n]['step_time_max_s']:.4f}"
        for n in names], ratio=False)
    row("XLA GFLOP / step", "xla_gflops_per_step", "{:.1f}")
    row("achieved TFLOP/s (XLA)", "tflops_per_s", "{:.3f}")
    row("MFU (XLA FLOPs)", values=[
        None if rows_by_name[n]["mfu"] is None else f"{100 * rows_by_name[n]['mfu']:.1f}%"
        for n in names], ratio=False)
    row("memory, compiled (MiB/dev)", values=[
        _mib(rows_by_name[n]["memory"]["compiled_peak_bytes"]) for n in names],
        key="compiled_peak_bytes")
    row("  of which temporaries", values=[
        _mib(rows_by_name[n]["memory"]["compiled_temp_bytes"]) for n in names],
        key="compiled_temp_bytes")
    row("memory, device peak (MiB)", values=[
        _mib(rows_by_name[n]["memory"]["device_peak_bytes"]) for n in names],
        key="device_peak_bytes")
    row("parameters (M)", "params_m")
    row("CPU utilisation", values=[f"{100 * rows_by_name[n]['cpu_utilization']:.0f}%"
                                   for n in names], ratio=False)
    row("compile (s)", "compile_s", "{:.1f}", ratio=False)
    row("final loss", "loss", "{:.4f}", ratio=False)
    lines = [f"mcr | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} pairs | image {r['image_size']} px | text {r['text_length']} "
              f"tokens | vocab {r['vocab_size']}")]
    lines += format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']}); host load "
                 f"{r['host_load_avg'][0]:.2f} -> {r['host_load_avg'][1]:.2f}")
    lines.append("memory, compiled: XLA's analysis of each step per device (temporaries + "
                 "arguments: state and batch). device peak: the allocator's high-water mark "
                 "after each row's warm-up (all three states resident, rows warmed up in "
                 "table order), where the backend reports it")
    for name in names:
        lines.append(f"{MCR_VARIANTS[name][0]}: {MCR_VARIANTS[name][1]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loader
LOADER_TARGET_PER_WORKER = 1000  # records/s per worker process (one core)
LOADER_STAGES = ("read", "decode", "augment", "record")
# Libraries whose thread pools would let one "worker" use several cores.
_ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_DECODED_POOL = 64  # records held in memory for the decode and augment stages


def add_loader_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loader", help="time the input pipeline: read, decode, augment, grain end to end",
        description="Records/s of the pretraining input pipeline, per worker process (one "
                    "core each) and in total: ArrayRecord reads, record decoding, the "
                    "augmentation (random resized crop + flip to --size, quantised to "
                    "uint16: the pretraining transform with one scale), the three "
                    "chained, and the "
                    "grain pipeline of pipeline.make_pretrain_dataset with mp_prefetch "
                    "workers. Stages run in --workers processes at once (each pinned to "
                    "one OpenCV / OpenMP thread); --sweep repeats everything for 1..N.")
    p.add_argument("--data", default=None, metavar="DIR_OR_GLOB",
                   help="ArrayRecord shards (a directory, a glob or one file); default: the "
                        "phantom dataset, generated once under --phantom-dir")
    p.add_argument("--phantom-dir", default=None, metavar="DIR",
                   help="where the phantom shards are generated and cached (default: "
                        "TMPDIR/mimjax_benchmark_data)")
    p.add_argument("--phantom-images", type=int, default=512,
                   help="phantom records (default: %(default)s)")
    p.add_argument("--phantom-size", type=int, default=448,
                   help="phantom image side in pixels (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the schedulable cores)")
    p.add_argument("--sweep", action="store_true", help="measure 1, 2, ..., --workers workers")
    p.add_argument("--size", type=int, default=224,
                   help="output resolution of the augmentation (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds per measurement (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="batch size of the grain pipeline (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="grain read threads per worker process (data.num_threads; default "
                        "%(default)s, so that a worker is one core)")
    p.add_argument("--seed", type=int, default=0, help="shuffle / augmentation seed")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")
    p.set_defaults(run=run_loader)


@contextlib.contextmanager
def _one_thread_env():
    """Sets the thread-pool variables to 1 for the processes started inside (stage
    workers, grain workers), and restores them after."""
    saved = {name: os.environ.get(name) for name in _ONE_THREAD_ENV}
    os.environ.update({name: "1" for name in _ONE_THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _loader_data_paths(args, log) -> tuple[list[str], str]:
    """(shard paths, description of where they came from)."""
    from input_pipeline import records, sources

    if args.data:
        try:
            return records.list_shards(args.data), args.data
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--data {args.data!r}: {e}. Pass a directory or glob of "
                             "*.array_record shards, or omit --data for the phantom.") from None
    import tempfile

    root = args.phantom_dir or os.path.join(tempfile.gettempdir(), "mimjax_benchmark_data")
    log(f"[loader] phantom dataset: {args.phantom_images} x {args.phantom_size} px under "
        f"{root} (rendered once, then reused)")
    paths = sources.ensure_phantom_dataset(root, num_images=args.phantom_images, seed=0,
                                           size=args.phantom_size)
    return paths, os.path.dirname(paths[0])


def _describe_records(paths: list[str]) -> dict:
    """Record count, and shape, dtype, size and shard compression of the first record."""
    import grain
    from array_record.python import array_record_module

    from input_pipeline import records

    raw = grain.sources.ArrayRecordDataSource(paths)
    if not len(raw):
        raise SystemExit(f"The shards ({paths[0]}, ...) hold no records; pass --data with "
                         "a non-empty dataset.")
    data = raw[0]
    image, meta = records.decode_record(data)
    reader = array_record_module.ArrayRecordReader(paths[0])
    try:
        options = reader.writer_options_string().split(",")
    finally:
        reader.close()
    compression = next((c for c in ("zstd", "snappy", "brotli") if c in options),
                       "uncompressed")
    return {"num_records": len(raw), "image_shape": list(image.shape),
            "dtype": image.dtype.name, "bits_stored": meta.get("bits_stored"),
            "record_kb": len(data) / 1024, "compression": compression}


def _loader_transform_settings(size: int) -> dict:
    """Keyword arguments of the pretraining augmentation (pipeline defaults), one scale,
    with the uint16 output pipeline.make_pretrain_dataset ships."""
    from input_pipeline import pipeline

    c = pipeline.default_data_config()
    return {"scales": (size,), "crop_scale": tuple(c.crop_scale),
            "crop_ratio": tuple(c.crop_ratio), "hflip": bool(c.hflip),
            "mean": float(c.norm_mean), "std": float(c.norm_std), "channels": int(c.channels),
            "quantize": True}


def _time_loop(fn, seconds: float) -> dict:
    """Calls fn(0), fn(1), ... for `seconds` (after a short untimed warm-up)."""
    warm_until = time.perf_counter() + min(0.25, seconds / 4)
    k = 0
    while time.perf_counter() < warm_until:
        fn(k)
        k += 1
    count, cpu, start = 0, time.process_time(), time.perf_counter()
    end = start + seconds
    while True:
        fn(k + count)
        count += 1
        now = time.perf_counter()
        if now >= end:
            break
    wall = now - start
    return {"records_per_s": count / wall, "records": count, "wall_s": wall,
            "cpu_us_per_record": 1e6 * (time.process_time() - cpu) / count}


def loader_data_config(data: str, *, workers: int = 0, threads: int = 1):
    """The pretraining data config (pipeline defaults) reading the shards at `data`."""
    from input_pipeline import pipeline

    cfg = pipeline.default_data_config()
    cfg.update(source="arrayrecord", dir=data, num_workers=workers, num_threads=threads)
    return cfg


def measure_loader_stages(data: str, *, size: int, seconds: float, seed: int,
                          barrier=None) -> dict[str, dict]:
    """Records/s of each stage in this process, one stage after the other.

    read: random-access ArrayRecord reads (bytes); decode: records.decode_record of bytes
    held in memory; augment: the pretraining transform (MultiScaleRandomCrop, one scale)
    through grain's random_map on decoded records held in memory; record: the three
    chained as the pipeline chains them (`pipeline.make_record_dataset`), without
    batching. `barrier` (if given) is waited on before each stage so that concurrent
    processes time the same stage together.
    """
    import cv2

    cv2.setNumThreads(1)
    import grain
    import numpy as np

    from input_pipeline import pipeline, records, transforms

    settings = _loader_transform_settings(size)
    augment = transforms.MultiScaleRandomCrop(settings.pop("scales"), **settings)
    raw = grain.sources.ArrayRecordDataSource(records.list_shards(data))
    n = len(raw)
    order = np.random.default_rng(seed).permutation(n)
    pool = [raw[int(i)] for i in order[:_DECODED_POOL]]
    decoded = []
    for i, data_bytes in zip(order, pool):
        image, meta = records.decode_record(data_bytes)
        decoded.append({"image": image, "meta": meta, "index": int(i)})
    augmented = (grain.MapDataset.range(len(decoded)).repeat().map(decoded.__getitem__)
                 .random_map(augment, seed=seed))
    chained = pipeline.make_record_dataset(loader_data_config(data), scales=(size,), seed=seed)
    stages = {
        "read": lambda k: raw[int(order[k % n])],
        "decode": lambda k: records.decode_record(pool[k % len(pool)]),
        "augment": lambda k: augmented[k],
        "record": lambda k: chained[k],
    }
    out = {}
    for name in LOADER_STAGES:
        if barrier is not None:
            barrier.wait()
        out[name] = _time_loop(stages[name], seconds)
    return out


def _stage_worker(data, size, seconds, seed, barrier, queue) -> None:
    # Runs in a spawned process: report the figures, or the error that stopped them.
    import traceback

    try:
        queue.put(("ok", measure_loader_stages(data, size=size, seconds=seconds, seed=seed,
                                               barrier=barrier)))
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises it
        barrier.abort()
        queue.put(("error", traceback.format_exc()))


def run_stage_processes(data: str, workers: int, *, size: int, seconds: float,
                        seed: int) -> list[dict]:
    """`measure_loader_stages` in `workers` spawned processes at once; one result each."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_stage_worker, daemon=True,
                         args=(data, size, seconds, seed + 1000 * w, barrier, queue))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    results, errors = [], []
    timeout = 120 + 4 * len(LOADER_STAGES) * seconds
    try:
        for _ in procs:
            status, payload = queue.get(timeout=timeout)
            (results if status == "ok" else errors).append(payload)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise RuntimeError(f"a loader stage worker failed:\n{errors[0]}")
    return results


def _host_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _descendant_cpu_seconds(root: int) -> dict[int, float]:
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


def measure_loader_pipeline(data: str, *, workers: int, size: int, batch: int, seconds: float,
                            seed: int, threads: int) -> dict:
    """Records/s of pipeline.make_pretrain_dataset (one scale, `workers` mp_prefetch
    processes) as the trainer consumes it, after start-up and after the buffers that
    filled during start-up have been drained."""
    from input_pipeline import pipeline

    cfg = loader_data_config(data, workers=workers, threads=threads)
    start = time.perf_counter()
    it = iter(pipeline.make_pretrain_dataset(cfg, scales=(size,), global_batch_size=batch,
                                             seed=seed))
    try:
        next(it)
        startup = time.perf_counter() - start
        # Drain what was buffered while the others started; then steady state.
        buffered = workers * (int(cfg.prefetch_buffer_size) + 1)
        warm_until = time.perf_counter() + min(1.0, seconds / 2)
        drained = 0
        while drained < buffered or time.perf_counter() < warm_until:
            next(it)
            drained += 1
        ticks, workers_cpu = _host_cpu_ticks(), _descendant_cpu_seconds(os.getpid())
        main_cpu, count, begin = time.process_time(), 0, time.perf_counter()
        while True:
            next(it)
            count += 1
            now = time.perf_counter()
            if now - begin >= seconds:
                break
        main_cpu = time.process_time() - main_cpu
        ticks_end, workers_cpu_end = _host_cpu_ticks(), _descendant_cpu_seconds(os.getpid())
    finally:
        it.close()
    wall = now - begin
    busy = None
    if ticks and ticks_end and ticks_end[1] > ticks[1]:
        busy = _cores() * (ticks_end[0] - ticks[0]) / (ticks_end[1] - ticks[1])
    worker_cpu = sum(workers_cpu_end[p] - workers_cpu[p] for p in workers_cpu_end
                     if p in workers_cpu)
    total = count * batch / wall
    return {"per_worker": total / workers, "total": total,
            # Contention-proof: records per CPU-second the worker processes spent.
            "per_worker_cpu_s": count * batch / worker_cpu if worker_cpu > 0 else None,
            "worker_cpu_cores": worker_cpu / wall, "main_cpu_cores": main_cpu / wall,
            "host_cpu_busy_cores": busy, "batches": count, "wall_s": wall,
            "startup_s": startup}


def _check_loader_args(args, overrides, workers: int) -> None:
    if overrides:
        raise SystemExit("loader takes no --config.* overrides (see --help).")
    for name, value in (("--workers", workers), ("--size", args.size), ("--batch", args.batch),
                        ("--threads", args.threads), ("--phantom-images", args.phantom_images),
                        ("--phantom-size", args.phantom_size)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}.")
    if not args.seconds > 0:
        raise SystemExit(f"--seconds must be > 0, got {args.seconds}.")


def _measure_with_workers(data: str, workers: int, args, log) -> dict:
    """Every stage in `workers` processes at once, then the grain pipeline."""
    per_process = run_stage_processes(data, workers, size=args.size, seconds=args.seconds,
                                      seed=args.seed)
    stages = {}
    for name in LOADER_STAGES:
        rates = [r[name]["records_per_s"] for r in per_process]
        cpu_us = statistics.fmean(r[name]["cpu_us_per_record"] for r in per_process)
        stages[name] = {"per_worker": statistics.fmean(rates), "total": sum(rates),
                        "per_worker_cpu_s": 1e6 / cpu_us, "per_process": rates,
                        "cpu_us_per_record": cpu_us}
        log(f"[loader] {workers} worker(s) {name}: {stages[name]['per_worker']:.0f} "
            f"records/s per worker, {stages[name]['total']:.0f} total")
    grain_run = measure_loader_pipeline(data, workers=workers, size=args.size,
                                        batch=args.batch, seconds=args.seconds, seed=args.seed,
                                        threads=args.threads)
    log(f"[loader] {workers} worker(s) pipeline: {grain_run['per_worker']:.0f} records/s per "
        f"worker, {grain_run['total']:.0f} total (start-up {grain_run['startup_s']:.1f} s)")
    return {"workers": workers, "stages": stages, "pipeline": grain_run}


def _add_scaling(runs: list[dict]) -> None:
    """scaling = total / (workers x the one-worker total), when one worker was measured."""
    if runs[0]["workers"] != 1:
        return
    for run in runs:
        measured = [(run["stages"][n], runs[0]["stages"][n]) for n in LOADER_STAGES]
        measured.append((run["pipeline"], runs[0]["pipeline"]))
        for m, one in measured:
            m["scaling"] = m["total"] / (one["total"] * run["workers"])


def run_loader(args, overrides, log) -> dict:
    cores = _cores()
    workers = cores if args.workers is None else args.workers
    _check_loader_args(args, overrides, workers)
    paths, source = _loader_data_paths(args, log)
    info = _describe_records(paths)
    if len(info["image_shape"]) != 2:
        raise SystemExit(f"--data holds {len(info['image_shape'])}-D records (shape "
                         f"{info['image_shape']}); the pretraining transform timed here takes "
                         "2-D images.")
    if min(info["image_shape"]) < args.size:
        raise SystemExit(f"--size {args.size} exceeds the records' short side (image shape "
                         f"{info['image_shape']}); pick a smaller --size or larger images.")
    num_records = info["num_records"]
    if num_records < args.batch:
        raise SystemExit(f"{num_records} records cannot fill --batch {args.batch}; pass a "
                         "smaller --batch or more data.")
    log(f"[loader] {num_records} records {info['image_shape']} {info['dtype']} "
        f"({info['compression']}, {info['record_kb']:.0f} KiB) -> {args.size}")
    with _one_thread_env():
        runs = [_measure_with_workers(source, n, args, log)
                for n in (range(1, workers + 1) if args.sweep else [workers])]
    _add_scaling(runs)

    import cv2
    import grain
    import numpy

    settings = _loader_transform_settings(args.size)
    final = runs[-1]["pipeline"]
    per_worker_cpu = final["per_worker_cpu_s"]
    return {
        "benchmark": "loader", "data": source, "num_shards": len(paths), **info,
        "size": args.size, "crop_scale": list(settings["crop_scale"]),
        "crop_ratio": list(settings["crop_ratio"]), "hflip": settings["hflip"],
        "batch": args.batch, "read_threads_per_worker": args.threads,
        "seconds_per_measurement": args.seconds,
        "device": f"cpu ({_cpu_name()}, {cores} cores)", "cores": cores,
        "workers": runs[-1]["workers"],
        # The headline: the grain pipeline at the largest worker count, per worker by the
        # clock and per CPU-second a worker spent (the target is per worker = one core).
        "records_per_s_per_worker": final["per_worker"],
        "records_per_worker_cpu_s": per_worker_cpu,
        "records_per_s": final["total"],
        "target_per_worker": LOADER_TARGET_PER_WORKER,
        "meets_target": max(final["per_worker"], per_worker_cpu or 0) >= LOADER_TARGET_PER_WORKER,
        "runs": runs,
        "versions": {"grain": getattr(grain, "__version__", None), "numpy": numpy.__version__,
                     "opencv": cv2.__version__},
    }


def format_loader_table(r: dict) -> str:
    rows = [("records / s", "workers", "per worker", "total", "scaling", "per CPU-second")]
    for name in (*LOADER_STAGES, "pipeline"):
        for run in r["runs"]:
            m = run["pipeline"] if name == "pipeline" else run["stages"][name]
            scaling, per_cpu = m.get("scaling"), m.get("per_worker_cpu_s")
            rows.append((name if name != "pipeline" else "pipeline (grain)", str(run["workers"]),
                         f"{m['per_worker']:.0f}", f"{m['total']:.0f}",
                         "n/a" if scaling is None else f"{100 * scaling:.0f}%",
                         "n/a" if per_cpu is None else f"{per_cpu:.0f}"))
    shape = "x".join(str(s) for s in r["image_shape"])
    lines = [(f"loader | {r['data']} | {r['num_records']} records, {shape} {r['dtype']}, "
              f"{r['compression']}, {r['record_kb']:.0f} KiB each"),
             (f"random resized crop {r['crop_scale'][0]:g}-{r['crop_scale'][1]:g}"
              f"{' + flip' if r['hflip'] else ''} -> {r['size']} uint16 | batch "
              f"{r['batch']} | {r['device']} | {r['seconds_per_measurement']:g} s each")]
    lines += format_rows(rows)
    lines.append("read: ArrayRecord random access; decode: records.decode_record; augment: the "
                 "transform alone; record: the three chained; pipeline: make_pretrain_dataset "
                 "with mp_prefetch workers, as the trainer sees it. per CPU-second: records per "
                 "CPU-second of a worker (what one uncontended core gives)")
    last = r["runs"][-1]["pipeline"]
    usage = f"workers used {last['worker_cpu_cores']:.2f} cores, the consumer {last['main_cpu_cores']:.2f}"
    if last["host_cpu_busy_cores"] is not None:
        usage += f", the whole host {last['host_cpu_busy_cores']:.2f} of {r['cores']}"
    lines.append(f"pipeline with {r['workers']} worker(s): {usage}")
    verdict = "met" if r["meets_target"] else "NOT met"
    per_cpu = r["records_per_worker_cpu_s"]
    lines.append(f"target {r['target_per_worker']} records/s per worker (one core): {verdict} "
                 f"({r['records_per_s_per_worker']:.0f} wall-clock, "
                 f"{'n/a' if per_cpu is None else f'{per_cpu:.0f}'} per worker CPU-second)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
SUBCOMMANDS = {
    # name: (add_parser(subparsers), format(result) -> str)
    "pretrain": (add_pretrain_parser, format_pretrain_table),
    "mcr": (add_mcr_parser, format_mcr_table),
    "loader": (add_loader_parser, format_loader_table),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser, _ in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Runs one benchmark; prints the table and then the JSON (last line of stdout)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = build_parser().parse_known_args(argv)
    overrides = split_config_overrides(unknown)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result = args.run(args, overrides, log)
    if args.command in ("pretrain", "mcr") and sys.modules["jax"].process_index() != 0:
        return result  # multi-host: the first process reports
    text = json.dumps(result, sort_keys=False)
    print(SUBCOMMANDS[args.command][1](result), flush=True)
    print(text, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
