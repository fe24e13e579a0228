"""Times the real pretraining step (`train.jitted_train_step`: dequantising the
pipeline's uint16 images, MAE / MIRAM forward, loss, backward, AdamW update,
non-finite guard), jitted and sharded exactly as the trainer does, on a synthetic
batch in the pipeline's format already on the devices (no data loading: this
measures the model step). Reports compile time, the steady-state step time
(median and mean over several timed windows of `--steps` steps each, synchronised
only at the end of a window), images/s, achieved TFLOP/s and MFU, memory per device
("memory": XLA's analysis of the compiled step, and the allocator's high-water mark
where the backend reports it), as an aligned table and as one JSON object on the
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

Memory the host maps per step shows as system CPU time and minor page faults, which
both sides report per window (mimjax from its own process's getrusage, HF from its
process's). `--allocator` puts both processes under the same C allocator; the default
runs each as a user would: mimjax with the glibc setting it applies itself at start
(mimjax/host_memory.py: a step's freed buffers are reused instead of mapped afresh),
HF with the C library's default.

Reading the numbers on a CPU host: other processes take cores and memory
bandwidth, so compare figures from one run (the windows alternate), look at the
spread of the windows, `host_load_avg` and `cpu_utilization`, and the peak
re-measured between rounds. Process-wide XLA flags go in the XLA_FLAGS
environment variable; `--xla-option` passes compile options to the mimjax step
only.
"""

from __future__ import annotations

import functools
import os

from tools import cli
from tools.bench import timing, train_step
from tools.bench.hf_vitmae import HFPretrainProcess

# Every process of a multi-host run builds and times the sharded step; the first reports.
RUNS_ON_EVERY_HOST = True


# ----------------------------------------------------------------------------- flags
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="time the MAE / MIRAM pretraining step (synthetic batch)",
        description="Time the real pretraining step on a synthetic batch; optionally "
                    "against HF transformers' ViTMAEForPreTraining. Config overrides: "
                    "--config.KEY=VALUE (any number).")
    train_step.add_config_arguments(
        p, config_help="config file with get_config(arg), e.g. configs/mae_vit_b16.py",
        batch_help="global batch size (default: config.global_batch_size)")
    p.add_argument("--image-size", type=int, default=None,
                   help="base (encoder) resolution; the other scales keep their ratio to it")
    train_step.add_window_arguments(p, windows_help="timed windows; median and mean over them")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also time HF transformers' ViTMAEForPreTraining (PyTorch, CPU)")
    p.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"],
                   help="attn_implementation of the HF model (default: %(default)s)")
    p.add_argument("--allocator", default="auto",
                   metavar="{" + ",".join(timing.ALLOCATORS) + "}|PATH",
                   help="C allocator of both processes (default: %(default)s: mimjax as it "
                        "sets itself up, see mimjax/host_memory.py, HF as the C library "
                        "starts; system: the C library's default for both; retain: mimjax's "
                        "glibc setting for both; hugetlb: glibc.malloc.hugetlb=1; tcmalloc, "
                        "jemalloc or a library's path: LD_PRELOAD). Settings a process takes "
                        "only at its start restart this program with them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the CPU cores JAX uses, i.e. "
                        "all schedulable cores)")
    train_step.add_output_arguments(
        p, xla_option_help="XLA debug option for compiling the mimjax step only, e.g. "
                           "xla_cpu_enable_concurrency_optimized_scheduler=false (repeatable; "
                           "process-wide flags go in the XLA_FLAGS environment variable)")


# ----------------------------------------------------------------------------- config
def set_image_size(config, size: int) -> None:
    """Base resolution -> `size`; the other scales keep their ratio to the base."""
    base = int(config.model.image_size)
    scales = [int(s) for s in config.model.scales]
    if any(s % base for s in scales):
        raise cli.UsageError(f"model.scales {scales} are not multiples of image_size {base}.")
    config.model.image_size = size
    config.model.scales = [size * (s // base) for s in scales]


def build_config(spec: str, overrides, image_size: int | None, batch: int | None):
    """The benchmarked config: file + overrides, then --image-size and --batch. The HF
    process builds it again from the same arguments."""
    config = train_step.load_config(spec, overrides, batch=batch)
    if image_size:
        set_image_size(config, image_size)
    return config


def _base_scale_model(config):
    model = config.model.copy_and_resolve_references()
    with model.unlocked():
        model.scales = [int(config.model.image_size)]
    return model


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


# ----------------------------------------------------------------------------- the step
class MimjaxPretrainStep(train_step.MimjaxTrainStep):
    """The MAE / MIRAM pretraining step on what pipeline.make_pretrain_dataset ships:
    unit-quantised uint16, one channel per scale (the step normalises them and repeats
    the channel to data.channels)."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        import numpy as np

        return {f"image_{s}": rng.integers(0, 65536, (local_batch, s, s, 1), dtype=np.uint16)
                for s in config.model.scales}


# ----------------------------------------------------------------------------- run
def run(args, overrides, log) -> dict:
    hf_processes: list[HFPretrainProcess] = []
    try:
        return _run(args, overrides, log, hf_processes)
    finally:
        for process in hf_processes:
            process.close()


def _run(args, overrides, log, hf_processes: list) -> dict:
    train_step.check_windows(args)
    allocator = getattr(args, "allocator_info", None) or {
        "allocator": "auto", "mimjax": "not set up here", "reference": "C library default",
        "reference_env": {}}
    config = build_config(args.config, overrides, args.image_size, args.batch)
    compiler_options = train_step.parse_xla_options(args.xla_option)
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices, platform_name, device = timing.describe_devices()
    log(f"{len(devices)} x {device}; batch {batch}; scales {list(config.model.scales)}; {dtype}")

    runners: list[timing.Timed] = []
    mimjax_step = MimjaxPretrainStep(config, log, compiler_options)
    runners.append(mimjax_step)
    hf_step = None
    if args.compare == "hf":
        make_config = functools.partial(build_config, args.config, list(overrides),
                                        args.image_size, args.batch)
        hf_step = HFPretrainProcess(make_config, args.threads or timing.cores(),
                                    args.hf_attention, log, env=allocator["reference_env"])
        hf_processes.append(hf_step)
        runners.append(hf_step)

    peak = timing.PeakMeter(args.peak_tflops, config, dtype, log)
    torch_measured = []

    def measure_peak():
        peak.measure()
        if hf_step is not None and not peak.tflops:  # reference: torch's GEMM on this host
            torch_measured.append(hf_step.matmul_peak())
            log(f"[peak] torch matmul {torch_measured[-1] / 1e12:.3f} TFLOP/s")

    measure_peak()
    load_before = os.getloadavg()
    per_step = timing.time_interleaved(runners, warmup=args.warmup, steps=args.steps,
                                       windows=args.windows, log=log, after_round=measure_peak)
    load_after = os.getloadavg()

    resolved = peak.resolve(platform_name)
    peak_per_device, peak_total = resolved["per_device"], resolved["total"]
    mimjax = timing.summarize(per_step["mimjax"], batch, timing.cores())
    objective = config.objectives.get("masked_reconstruction", {})
    mask_ratio = objective.get("mask_ratio", 0.75)
    counts = model_flops_per_image(config.model, mask_ratio)
    model_flops = 3 * batch * counts["forward"]
    step_time = mimjax["step_time_s"]
    result = {
        **train_step.report_head("pretrain", args, overrides, config, mimjax_step.mesh),
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
        **timing.xla_throughput(mimjax_step.compiled, step_time, peak_per_device),
        "model_gflops_per_step": model_flops / 1e9,
        "model_gflops_per_image_fwd": {
            "encoder": counts["encoder"] / 1e9,
            **{f"decoder_{s}": f / 1e9 for s, f in counts["decoders"].items()}},
        "model_tflops_per_s": model_flops / step_time / 1e12,
        **peak.fields(resolved),
        "model_mfu": model_flops / step_time / peak_total,
        # Per device: XLA's analysis of the compiled step; the allocator's high-water mark.
        "memory": {**timing.compiled_memory(mimjax_step.compiled), **timing.device_memory()},
        **train_step.report_tail([load_before[0], load_after[0]], compiler_options),
        "allocator": allocator,
    }
    if hf_step is not None:
        result.update(_hf_fields(result, per_step["hf"], hf_step, config, mask_ratio,
                                 peak_total, torch_measured))
    return result


def _hf_fields(result: dict, times, hf_step, config, mask_ratio: float, peak_total: float,
               torch_measured: list[float]) -> dict:
    """The report's "hf" row and "speedup_vs_hf"; adds the torch versions to `result`."""
    batch = result["batch"]
    hf = timing.summarize(times, batch, timing.cores())
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
    result["versions"].update(hf_step.versions)
    return {"hf": hf, "speedup_vs_hf": result["img_per_s"] / hf["img_per_s"]}


# ----------------------------------------------------------------------------- table
def format_table(r: dict) -> str:
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
    row("system CPU s / step", r.get("sys_s_per_step"), hf.get("sys_s_per_step"))
    row("minor page faults / step", r.get("minor_faults_per_step"),
        hf.get("minor_faults_per_step"), "{:.0f}")
    row("major page faults / step", r.get("major_faults_per_step"),
        hf.get("major_faults_per_step"), "{:.0f}")
    row("memory, compiled (MiB/dev)", timing.mib(r["memory"]["compiled_peak_bytes"]), None)
    row("memory, device peak (MiB)", timing.mib(r["memory"]["device_peak_bytes"]), None)
    row("compile (s)", r["compile_s"], None, "{:.1f}")
    row("final loss", r["loss"], hf.get("loss"), "{:.4f}")
    lines = [f"pretrain | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} | scales {r['scales']} | attention {r['attention']}")]
    lines += timing.format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})")
    alloc = r.get("allocator")
    if alloc:
        lines.append(f"allocator {alloc['allocator']}: mimjax {alloc['mimjax']}"
                     + (f"; HF {alloc['reference']}" if hf else ""))
    if hf:
        torch_peak = (f"; torch's own 2048^3 matmul: {hf['torch_matmul_tflops']:.3f} TFLOP/s"
                      if hf["torch_matmul_tflops"] else "")
        lines.append(f"speedup vs HF: {r['speedup_vs_hf']:.2f}x (HF: {hf['attention']} "
                     f"attention, {hf['dtype']}, {hf['threads']} torch threads{torch_peak})")
        if "note" in hf:
            lines.append(hf["note"])
    return "\n".join(lines)
