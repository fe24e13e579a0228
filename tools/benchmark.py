#!/usr/bin/env python
"""Throughput benchmarks for mimjax, one subcommand per thing benchmarked.

pretrain
    Times the real pretraining step (`train.make_train_step`: MAE / MIRAM forward,
    loss, backward, AdamW update, non-finite guard), jitted and sharded exactly as
    `train.train_and_evaluate` does, on a synthetic batch already on the devices
    (no data loading: this measures the model step). Reports compile time, the
    steady-state step time (median and mean over several timed windows of
    `--steps` steps each, synchronised only at the end of a window), images/s,
    achieved TFLOP/s and MFU, as an aligned table and as one JSON object on the
    last line of stdout (and in `--json OUT`).

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
    threads as the CPU cores JAX uses. The two are timed in alternating windows
    (mimjax, HF, mimjax, HF, ...) so background load hits both alike, and the ratio
    `speedup_vs_hf` = mimjax img/s / HF img/s is printed. HF ViTMAE has one decoder:
    for a MIRAM (multi-scale) config it is compared at the base scale only and the
    output says so.

    Reading the numbers on a CPU host: other processes take cores and memory
    bandwidth, so compare figures from one run (the windows alternate), look at the
    spread of the windows, `host_load_avg` and `cpu_utilization`, and the peak
    re-measured between rounds. Loading and running torch in the same process can
    slow the JAX windows that follow an HF window (measured up to ~1.5x on a 2-core
    host), so `speedup_vs_hf` errs against mimjax; time mimjax alone (no --compare)
    for its own best figure. Process-wide XLA flags go in the XLA_FLAGS environment
    variable; `--xla-option` passes compile options to the mimjax step only.

Examples:
    python tools/benchmark.py pretrain --config configs/mae_vit_b16.py --image-size 224 \\
        --batch 16 --config.model.dtype=float32 --compare hf
    python tools/benchmark.py pretrain --config configs/miram_vit_b16.py --batch 64 \\
        --config.model.attention=fused --json /tmp/bench.json

Config overrides `--config.a.b=VALUE` take a Python literal (`1`, `0.5`, `"x"`,
`[224, 448]`, `None`, `true`/`false`) or else a bare string, and may set fields
whose default is None (e.g. `--config.model.depth=2`).
"""

from __future__ import annotations

import argparse
import ast
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


def time_interleaved(runners: list[Timed], *, warmup: int, steps: int, windows: int,
                     log, after_round=None) -> dict[str, dict[str, list[float]]]:
    """Warm every runner up, then alternate timed windows of `steps` steps between them
    (calling `after_round()` after each round). Returns {name: {"wall": [seconds per
    step, one per window], "cpu": [process CPU seconds per step, one per window]}}."""
    for r in runners:
        if warmup:
            seconds = r.run(warmup)
            log(f"[{r.name}] warm-up: {warmup} steps in {seconds:.2f} s")
    times: dict[str, dict[str, list[float]]] = {r.name: {"wall": [], "cpu": []} for r in runners}
    for w in range(windows):
        for r in runners:
            cpu = time.process_time()
            seconds = r.run(steps)
            times[r.name]["cpu"].append((time.process_time() - cpu) / steps)
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


# ----------------------------------------------------------------------------- mimjax
class MimjaxPretrainStep(Timed):
    name = "mimjax"

    def __init__(self, config, log, compiler_options: dict | None = None):
        import jax
        import numpy as np

        from mimjax import optim, sharding, train
        from mimjax.objectives import build_loss_fn

        self.jax = jax
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
            ema_decay=config.get("ema_decay", 0.0))
        step_fn = jax.jit(train_step, donate_argnums=0,
                          out_shardings=(shardings, sharding.replicated(mesh)))
        rng = np.random.default_rng(0)
        local = batch_size // jax.process_count()
        channels = config.model.get("channels", 1)
        host_batch = {f"image_{s}": rng.standard_normal((local, s, s, channels), np.float32)
                      for s in config.model.scales}
        self.mesh = mesh
        with jax.set_mesh(mesh):
            self.batch = sharding.global_batch(host_batch, mesh)
            log("[mimjax] compiling the train step ...")
            start = time.perf_counter()
            lowered = step_fn.lower(state, self.batch)
            self.lower_s = time.perf_counter() - start
            start = time.perf_counter()
            self.compiled = lowered.compile(compiler_options=compiler_options or None)
            self.compile_s = time.perf_counter() - start
        log(f"[mimjax] lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s")
        self.state = state
        self.metrics = None

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


def run_pretrain(args, overrides, log) -> dict:
    import jax
    import jax.numpy as jnp

    from mimjax import perf

    config = load_config(args.config, overrides)
    if args.image_size:
        set_image_size(config, args.image_size)
    if args.batch:
        config.global_batch_size = args.batch
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices = jax.devices()
    platform_name = devices[0].platform
    device = devices[0].device_kind
    if platform_name == "cpu":
        device = f"cpu ({_cpu_name()}, {_cores()} cores)"
    log(f"{len(devices)} x {device}; batch {batch}; scales {list(config.model.scales)}; {dtype}")

    runners: list[Timed] = []
    mimjax_step = MimjaxPretrainStep(config, log, parse_xla_options(args.xla_option))
    runners.append(mimjax_step)
    hf_step = None
    if args.compare == "hf":
        threads = args.threads or _cores()
        hf_step = HFPretrainStep(config, threads, args.hf_attention, log)
        runners.append(hf_step)

    # Peak: flag, config, or a matmul timed before the windows and after each round of
    # them, so that it sees the same background load; the best is kept.
    peak_tflops = args.peak_tflops or config.get("peak_tflops_per_device", None)
    matmul_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
    measured, torch_measured = [], []

    def measure_peak():
        if not peak_tflops:
            measured.append(perf.measure_matmul_peak(matmul_dtype, repeats=10))
            log(f"[peak] JAX matmul {measured[-1] / 1e12:.3f} TFLOP/s")
        if hf_step is not None and not peak_tflops:  # reference: torch's GEMM on this host
            torch_measured.append(hf_step.matmul_peak())
            log(f"[peak] torch matmul {torch_measured[-1] / 1e12:.3f} TFLOP/s")

    measure_peak()
    load_before = os.getloadavg()
    per_step = time_interleaved(runners, warmup=args.warmup, steps=args.steps,
                                windows=args.windows, log=log, after_round=measure_peak)
    load_after = os.getloadavg()

    num_devices = len(devices)
    if peak_tflops:
        peak_per_device = float(peak_tflops) * 1e12
        peak_total = peak_per_device * num_devices
        source = "--peak-tflops" if args.peak_tflops else "config peak_tflops_per_device"
    else:
        host_peak = max(measured)
        source = (f"measured: best {jnp.dtype(matmul_dtype).name} matmul (perf.measure_matmul_peak)"
                  f" on one device over {len(measured)} measurements between the timed windows")
        if platform_name == "cpu":
            # Simulated CPU devices share the host's cores: the host peak is the total.
            peak_per_device = host_peak / jax.local_device_count()
            peak_total = peak_per_device * num_devices
            if jax.local_device_count() > 1:
                source += (f"; the {jax.local_device_count()} CPU devices share the host's "
                           "cores, so per-device peak = measured / device count")
        else:
            peak_per_device, peak_total = host_peak, host_peak * num_devices

    mimjax = summarize(per_step["mimjax"], batch, _cores())
    xla_flops_per_device = perf.compiled_flops(mimjax_step.compiled)
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
        "xla_gflops_per_step": (xla_flops_per_device * num_devices / 1e9
                                if xla_flops_per_device else None),
        "model_gflops_per_step": model_flops / 1e9,
        "model_gflops_per_image_fwd": {
            "encoder": counts["encoder"] / 1e9,
            **{f"decoder_{s}": f / 1e9 for s, f in counts["decoders"].items()}},
        "tflops_per_s": None, "model_tflops_per_s": model_flops / step_time / 1e12,
        "peak_tflops": peak_total / 1e12, "peak_tflops_per_device": peak_per_device / 1e12,
        "peak_source": source,
        "peak_tflops_measured": [m / 1e12 for m in measured],
        "mfu": None, "model_mfu": model_flops / step_time / peak_total,
        "host_load_avg": [load_before[0], load_after[0]],  # 1-min, before / after timing
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_options": parse_xla_options(args.xla_option),
        "versions": {"jax": jax.__version__},
    }
    if xla_flops_per_device:
        result["tflops_per_s"] = xla_flops_per_device * num_devices / step_time / 1e12
        result["mfu"] = xla_flops_per_device / step_time / peak_per_device
    if hf_step is not None:
        import torch
        import transformers

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
        result["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
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
    row("compile (s)", r["compile_s"], None, "{:.1f}")
    row("final loss", r["loss"], hf.get("loss"), "{:.4f}")
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [f"pretrain | {r['config']}",
             f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
             f"{r['batch']} | scales {r['scales']} | attention {r['attention']}"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(x, widths))) for x in rows]
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})")
    if hf:
        torch_peak = (f"; torch's own 2048^3 matmul: {hf['torch_matmul_tflops']:.3f} TFLOP/s"
                      if hf["torch_matmul_tflops"] else "")
        lines.append(f"speedup vs HF: {r['speedup_vs_hf']:.2f}x (HF: {hf['attention']} "
                     f"attention, {hf['dtype']}, {hf['threads']} torch threads{torch_peak})")
        if "note" in hf:
            lines.append(hf["note"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
SUBCOMMANDS = {
    # name: (add_parser(subparsers), format(result) -> str)
    "pretrain": (add_pretrain_parser, format_pretrain_table),
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
    if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
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
