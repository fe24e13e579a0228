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

loader
    Records/s of the pretraining input pipeline on ArrayRecord shards (`--data`, or
    the phantom dataset generated once), per worker process and in total, for each
    stage on its own (read: ArrayRecord random access; decode:
    `records.decode_record`; augment: the pretraining transform, random resized crop
    + flip + normalize to `--size`, one scale; record: the three chained) and for
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
                     log, after_round=None) -> dict[str, dict[str, list[float]]]:
    """Warm every runner up, then alternate timed windows of `steps` steps between them
    (calling `after_round()` after each round). With several runners every window
    starts with one untimed step: a step allocates and frees its buffers, and memory a
    process freed while the other one ran costs far more to fault back in (measured on
    a 2-core VM: ViT-B 7.5 s/step instead of 6.0 when timed from the first step).
    Returns {name: {"wall": [seconds per step, one per window], "cpu": [CPU seconds per
    step, one per window]}}."""
    for r in runners:
        if warmup:
            seconds = r.run(warmup)
            log(f"[{r.name}] warm-up: {warmup} steps in {seconds:.2f} s")
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
    import jax.numpy as jnp

    from mimjax import perf

    config = build_pretrain_config(args.config, overrides, args.image_size, args.batch)
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
        hf_step = HFPretrainProcess(args.config, overrides, args.image_size, args.batch,
                                    threads, args.hf_attention, log)
        hf_processes.append(hf_step)
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
                    "augmentation (random resized crop + flip + normalize to --size, the "
                    "pretraining transform with one scale), the three chained, and the "
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
    """Keyword arguments of the pretraining augmentation (pipeline defaults), one scale."""
    from input_pipeline import pipeline

    c = pipeline.default_data_config()
    return {"scales": (size,), "crop_scale": tuple(c.crop_scale),
            "crop_ratio": tuple(c.crop_ratio), "hflip": bool(c.hflip),
            "mean": float(c.norm_mean), "std": float(c.norm_std), "channels": int(c.channels)}


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
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    shape = "x".join(str(s) for s in r["image_shape"])
    lines = [(f"loader | {r['data']} | {r['num_records']} records, {shape} {r['dtype']}, "
              f"{r['compression']}, {r['record_kb']:.0f} KiB each"),
             (f"random resized crop {r['crop_scale'][0]:g}-{r['crop_scale'][1]:g}"
              f"{' + flip' if r['hflip'] else ''} + normalize -> {r['size']} | batch "
              f"{r['batch']} | {r['device']} | {r['seconds_per_measurement']:g} s each")]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(x, widths))) for x in rows]
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
    if args.command == "pretrain" and sys.modules["jax"].process_index() != 0:
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
