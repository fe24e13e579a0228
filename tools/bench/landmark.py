"""Times the real landmark train step (`train.jitted_train_step`: the config's heatmap
model and the landmark_heatmap objective, forward, Gaussian-target loss, backward with
batch-norm statistics, AdamW with the config's layer-wise lr decay, non-finite guard),
jitted and sharded as the trainer does, on a synthetic batch in the landmark pipeline's
format (input_pipeline.landmarks.LandmarkAugment: "image" float32 (B, S, S, C),
standard normal; "landmarks" float32 (B, L, 2), [x, y] model-input pixels uniform in
[4, S - 5] per axis; "landmark_valid" (B, L), all True; "index" int32 0..B-1) already on
the devices: no data is read or rendered. Reports the steady-state step time (median and
mean over timed windows), images/s, XLA's FLOP count, TFLOP/s and MFU, memory per device,
as `segmentation` does (table, and JSON on the last line of stdout and in `--json OUT`).
Alone, the config runs as given; `--variant` swaps the ViT size (e.g. S/16; explicit
--config.model.width/depth/num_heads/mlp_dim overrides still win).

`--compare unet` also times the same config with `model.backbone="unet"` and
`optimizer.layer_decay=None` (the 2-D conv U-Net of mimjax.models.unet with the same
1x1 heatmap head, objective, batch and optimizer otherwise: the GU2Net-style baseline
the landmark task trains with `--config.model.backbone=unet`), compiled in the same
process and timed in windows alternating with the ViT's (timing.time_interleaved). The
report has the U-Net's row under "unet" and "speedup_vs_unet" = ViT images/s / U-Net
images/s (above 1: the ViT step is faster).

Defaults (configs/landmarks_hand.py): the demo's ViT (width 192, 4 blocks, patch 16)
with the progressive dense decoder at 128 px, 37 landmarks, sigma 2 px, per-pixel BCE,
batch 16; the U-Net at 16 base channels (16..256 over 5 levels).

FLOPs. There is no model-FLOP formula here: TFLOP/s and MFU are XLA's counted FLOPs of
the compiled step (cost analysis, forward + backward + optimizer) / step time / the
peak (a JAX f32 matmul measured between rounds, or --peak-tflops), for both rows alike.

One run on a 2-core CPU alone (AMD EPYC, one JAX device, float32; the hand config:
ViT width 192, 4 blocks, patch 16, 128 px, heatmaps at stride 2, 37 landmarks, batch 8),
under a minute:
    python tools/benchmark.py landmarks --config configs/landmarks_hand.py \\
        --compare unet --steps 3 --windows 3
                                      ViT        U-Net
    images / s                      17.78        12.59
    step time median (s)            0.450        0.636
    parameters (M)                  2.209        1.966
    XLA GFLOP / step                 23.2         43.4
    MFU (XLA FLOPs)                 24.8%        32.9%   (peak: 0.208 TFLOP/s measured)
    memory, compiled (MiB)          334.9        391.1
    speedup vs U-Net: 1.41x images/s, with about half the U-Net's FLOPs per step.
"""

from __future__ import annotations

import os

from tools import cli
from tools.bench import timing, train_step

# Every process of a multi-host run builds and times the sharded steps; the first reports.
RUNS_ON_EVERY_HOST = True

DEFAULT_CONFIG = "configs/landmarks_hand.py"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Synthetic points stay this many pixels inside the image on each side, so that every
# Gaussian target is whole and every landmark valid.
MARGIN = (4, 5)
LABELS = {"vit": "ViT", "unet": "U-Net"}


# ----------------------------------------------------------------------------- flags
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "landmarks", help="time the landmark heatmap train step (synthetic batch)",
        description="Time the real landmark train step on a synthetic batch; optionally "
                    "against the same config's U-Net backbone. Config overrides: "
                    "--config.KEY=VALUE (any number).")
    # train_step.add_config_arguments makes --config required; this one has a default.
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE[:ARG]",
                   help="a landmark config (task 'landmarks') (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch size (default: config.global_batch_size)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the config's)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="ViT size and patch, e.g. S/16 or B/16: sets model.variant and "
                        "drops the config's width, depth, num_heads and mlp_dim (default: "
                        "the config's encoder)")
    train_step.add_window_arguments(p, windows_help="timed windows; median and mean over them")
    p.add_argument("--compare", choices=["unet"], default=None,
                   help="also time the config with model.backbone=unet and "
                        "optimizer.layer_decay=None, in alternating windows")
    train_step.add_output_arguments(
        p, xla_option_help="XLA debug option for compiling the steps (repeatable; "
                           "process-wide flags go in XLA_FLAGS)")


# ----------------------------------------------------------------------------- config
def _config_path(spec: str) -> str:
    """The default config is the repository's, wherever the command runs from."""
    if spec == DEFAULT_CONFIG and not os.path.isfile(spec):
        return os.path.join(_ROOT, spec)
    return spec


def build_config(spec: str, overrides, image_size: int | None, batch: int | None,
                 variant: str | None):
    """The benchmarked config: file + overrides, --variant, --image-size, --batch."""
    return train_step.load_task_config(
        _config_path(spec), overrides, task="landmarks", example=DEFAULT_CONFIG, batch=batch,
        variant=variant, image_size=image_size)


def unet_config(config):
    """(a copy of `config` with the U-Net backbone, what changed as 'field: old -> new').
    Layer-wise lr decay scales ViT blocks; the U-Net has none, so it is switched off."""
    backbone = config.model.get("backbone", "vit")
    if backbone != "vit":
        raise cli.UsageError(f"--compare unet compares the ViT backbone with the U-Net; "
                             f"model.backbone is {backbone!r}: drop --compare or the "
                             "backbone override.")
    other = config.copy_and_resolve_references()
    changes = []
    for section, field, value in (("model", "backbone", "unet"),
                                  ("optimizer", "layer_decay", None)):
        old = other[section].get(field, None)
        if old != value:
            changes.append(f"{section}.{field}: {old!r} -> {value!r}")
            other[section][field] = value
    return other, changes


# ----------------------------------------------------------------------------- the batch
def synthetic_batch(config, batch_size: int, rng, first_row: int = 0) -> dict:
    """Rows first_row.. of a batch in input_pipeline.landmarks' training format:
    standard-normal images (the pipeline's are normalised), points uniform in
    [4, S - 5] per axis, all valid, the global row as index."""
    import numpy as np

    size = int(config.model.image_size)
    channels = int(config.model.get("channels", 1))
    count = int(config.model.num_landmarks)
    low, high = MARGIN[0], size - MARGIN[1]
    if high <= low:
        raise cli.UsageError(f"--image-size {size} leaves no room for landmarks "
                             f"{MARGIN[0]} px inside the border; use at least 16.")
    points = rng.uniform(low, high, (batch_size, count, 2)).astype(np.float32)
    return {"image": rng.standard_normal((batch_size, size, size, channels), np.float32),
            "landmarks": points,
            "landmark_valid": np.ones((batch_size, count), bool),
            "index": np.arange(first_row, first_row + batch_size, dtype=np.int32)}


class MimjaxLandmarkStep(train_step.MimjaxTrainStep):
    """The landmark train step on a fixed synthetic batch."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        first = self.jax.process_index() * local_batch
        return synthetic_batch(config, local_batch, rng, first_row=first)


# ----------------------------------------------------------------------------- run
def _row(runner, config, times, batch: int, peak_per_device: float, memory_after: dict) -> dict:
    """One model's figures: settings, build times, step times, loss, XLA FLOPs, memory."""
    model = config.model
    backbone = model.get("backbone", "vit")
    vit_side = backbone == "vit"
    summary = timing.summarize(times, batch, timing.cores())
    return {
        "backbone": backbone,
        "variant": model.variant if vit_side else None,
        "decoder": model.get("decoder", None) if vit_side else None,
        "unet_base_channels": None if vit_side else model.get("unet_base_channels", 16),
        "norm": model.get("norm", "batch"),
        "layer_decay": config.optimizer.get("layer_decay", None),
        "params_m": runner.num_params / 1e6,
        "init_s": runner.init_s, "lower_s": runner.lower_s, "compile_s": runner.compile_s,
        **summary,
        "loss": runner.last_loss(),
        **timing.xla_throughput(runner.compiled, summary["step_time_s"], peak_per_device),
        "memory": {**timing.compiled_memory(runner.compiled), **memory_after},
    }


def run(args, overrides, log) -> dict:
    train_step.check_windows(args)
    config = build_config(args.config, list(overrides), args.image_size, args.batch,
                          args.variant)
    configs = {config.model.get("backbone", "vit"): config}
    changes: list[str] = []
    if args.compare == "unet":
        configs["unet"], changes = unet_config(config)
        for change in changes:
            log(f"[unet] {change}")
    compiler_options = train_step.parse_xla_options(args.xla_option)
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices, platform_name, device = timing.describe_devices()
    log(f"{len(devices)} x {device}; batch {batch}; image {config.model.image_size} px; "
        f"{config.model.num_landmarks} landmarks; {dtype}")
    runners = [MimjaxLandmarkStep(cfg, log, compiler_options, name=name)
               for name, cfg in configs.items()]

    peak = timing.PeakMeter(args.peak_tflops, config, dtype, log)
    peak.measure()
    # The allocator's high-water mark after each warm-up (None on CPU): what that row
    # added to the states already resident, as the mcr benchmark reads it.
    memory_after = {}
    load_before = os.getloadavg()
    per_step = timing.time_interleaved(
        runners, warmup=args.warmup, steps=args.steps, windows=args.windows, log=log,
        after_round=peak.measure,
        after_warmup=lambda r: memory_after.__setitem__(r.name, timing.device_memory()))
    load_after = os.getloadavg()
    resolved = peak.resolve(platform_name)

    rows = {r.name: _row(r, configs[r.name], per_step[r.name], batch, resolved["per_device"],
                         memory_after[r.name]) for r in runners}
    main = rows.pop(runners[0].name)
    objective = config.objectives.landmark_heatmap
    result = {
        **train_step.report_head("landmarks", args, overrides, config, runners[0].mesh),
        "num_landmarks": int(config.model.num_landmarks),
        "sigma": float(objective.get("sigma", 2.0)), "loss_type": objective.get("loss", "bce"),
        "warmup_steps": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        **main,
        **peak.fields(resolved),
        **train_step.report_tail([load_before[0], load_after[0]], compiler_options),
    }
    if args.compare == "unet":
        result["unet"] = {**rows["unet"], "changes": changes}
        result["speedup_vs_unet"] = result["img_per_s"] / rows["unet"]["img_per_s"]
    return result


# ----------------------------------------------------------------------------- table
def format_table(r: dict) -> str:
    other = r.get("unet")
    rows = [("", LABELS[r["backbone"]], "U-Net") if other else ("", LABELS[r["backbone"]])]

    def show(v, fmt):
        return "n/a" if v is None else (v if isinstance(v, str) else fmt.format(v))

    def row(label, mine, theirs=None, fmt="{:.2f}"):
        cells = (show(mine, fmt), show(theirs, fmt)) if other else (show(mine, fmt),)
        rows.append((label, *cells))

    def percent(v):
        return None if v is None else f"{100 * v:.1f}%"

    def spread(x):
        return f"{x['step_time_min_s']:.4f}..{x['step_time_max_s']:.4f}"

    o = other or {}
    row("images / s", r["img_per_s"], o.get("img_per_s"))
    row("step time median (s)", r["step_time_s"], o.get("step_time_s"), "{:.4f}")
    row("step time mean (s)", r["step_time_mean_s"], o.get("step_time_mean_s"), "{:.4f}")
    row("step time min..max (s)", spread(r), spread(o) if other else None)
    row("parameters (M)", r["params_m"], o.get("params_m"), "{:.3f}")
    row("XLA GFLOP / step", r["xla_gflops_per_step"], o.get("xla_gflops_per_step"), "{:.1f}")
    row("achieved TFLOP/s (XLA)", r["tflops_per_s"], o.get("tflops_per_s"), "{:.3f}")
    row("MFU (XLA FLOPs)", percent(r["mfu"]), percent(o.get("mfu")))
    row("CPU utilisation", percent(r["cpu_utilization"]), percent(o.get("cpu_utilization")))
    row("memory, compiled (MiB/dev)", timing.mib(r["memory"]["compiled_peak_bytes"]),
        timing.mib(o["memory"]["compiled_peak_bytes"]) if other else None)
    row("compile (s)", r["compile_s"], o.get("compile_s"), "{:.1f}")
    row("final loss", r["loss"], o.get("loss"), "{:.4f}")
    model = (f"ViT {r['variant']} + {r['decoder']} decoder" if r["backbone"] == "vit"
             else f"U-Net, {r['unet_base_channels']} base channels")
    lines = [f"landmarks | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} | {r['image_size']} px | {model}, {r['norm']} norm | "
              f"{r['num_landmarks']} landmarks, sigma {r['sigma']:g} px, {r['loss_type']}")]
    lines += timing.format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']}); host load "
                 f"{r['host_load_avg'][0]:.2f} -> {r['host_load_avg'][1]:.2f}")
    if other:
        lines.append(f"speedup vs U-Net: {r['speedup_vs_unet']:.2f}x images/s (U-Net: "
                     f"{other['unet_base_channels']} base channels; "
                     + "; ".join(other["changes"]) + ")")
    return "\n".join(lines)
