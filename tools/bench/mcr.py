"""Times the image-text train step (model and objective "mcr", jitted and sharded as
the trainer does, on a fixed batch of synthetic pairs in the pairs pipeline's format
already on the devices) for three rows at one batch size, in alternating windows
(`time_interleaved`): MCR (the given config: the masked image and report are the only
inputs of all three losses), the CLIP-style baseline derived from it
(configs.mcr_demo.clip_baseline: no masking, contrastive loss only, no decoder, no MLM
head, class-token pooling) and the two-stream variant (objective option
itc_inputs="unmasked": the masked pass for the reconstruction losses plus an unmasked
pass for the contrastive loss, the design MCR's paper says it saves memory and time
against). Reports pairs/s, step time, XLA's FLOP count, TFLOP/s and MFU (peak as for
`pretrain`), memory per device (XLA's memory analysis of the compiled step:
temporaries + arguments; and the allocator's high-water mark where the backend reports
it, i.e. not on CPU) and the ratios MCR/CLIP and MCR/two-stream, as a table and as JSON
("variants", "ratios").
"""

from __future__ import annotations

import os

from tools import cli
from tools.bench import timing, train_step

# Every process of a multi-host run builds and times the sharded steps; the first reports.
RUNS_ON_EVERY_HOST = True

# The rows: name -> (table label, what it runs).
VARIANTS = {
    "mcr": ("MCR", ("the given config: masked image and report are the only inputs of the "
                    "contrastive, masked image and masked language losses (one pass)")),
    "clip": ("CLIP", ("configs.mcr_demo.clip_baseline of it: unmasked inputs, contrastive "
                      "loss only, no decoder, no MLM head, class-token pooling")),
    "two_stream": ("two-stream", ("it with objectives.mcr.itc_inputs='unmasked': a masked "
                                  "pass for the reconstruction losses plus an unmasked pass "
                                  "for the contrastive loss")),
}

# Figures compared as MCR / other: (key in the row or its "memory", where).
RATIO_KEYS = ("pairs_per_s", "step_time_s", "xla_gflops_per_step", "tflops_per_s",
              "compiled_peak_bytes", "compiled_temp_bytes", "device_peak_bytes", "params_m")


# ----------------------------------------------------------------------------- flags
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mcr", help="time MCR against its CLIP and two-stream baselines (synthetic pairs)",
        description="Time the image-text train step of an MCR config, of the CLIP-style "
                    "baseline derived from it and of the two-stream variant, at one batch "
                    "size, in alternating windows: pairs/s, step time, TFLOP/s, MFU, memory "
                    "and the ratios MCR/CLIP and MCR/two-stream. Config overrides: "
                    "--config.KEY=VALUE (any number), applied before the variants are "
                    "derived.")
    train_step.add_config_arguments(
        p, config_help="an image-text config (task 'image_text', model and objective "
                       "'mcr'), e.g. configs/mcr_demo.py",
        batch_help="global batch size, pairs (default: config.global_batch_size)")
    train_step.add_window_arguments(p, windows_help="timed windows per variant")
    train_step.add_output_arguments(
        p, xla_option_help="XLA debug option for compiling the steps (repeatable)")


# ----------------------------------------------------------------------------- configs
def variant_configs(config) -> dict:
    """{"mcr": the config, "clip": its CLIP-style baseline, "two_stream": its two-stream
    variant}, each a separate copy. The config must be an MCR setting (image masking,
    masked contrastive inputs)."""
    from configs.mcr_demo import clip_baseline

    model, objectives = config.model.get("name", None), list(config.get("objectives", {}))
    if model != "mcr" or "mcr" not in objectives:
        raise cli.UsageError(
            f"--config: the mcr benchmark needs an image-text config (task 'image_text', "
            f"model 'mcr'), got model {model!r} with objectives {objectives}; e.g. "
            "configs/mcr_demo.py.")
    objective = config.objectives.mcr
    image_ratio = objective.get("image_mask_ratio", 0.5)
    itc_inputs = objective.get("itc_inputs", "masked")
    if not image_ratio > 0 or itc_inputs != "masked":
        raise cli.UsageError(
            f"--config: objectives.mcr has image_mask_ratio {image_ratio} and itc_inputs "
            f"{itc_inputs!r}, not an MCR setting (image_mask_ratio > 0, itc_inputs "
            "'masked'); the CLIP and two-stream rows are derived from the MCR config, so "
            "pass that one (e.g. configs/mcr_demo.py, not :clip).")
    variants = {name: config.copy_and_resolve_references() for name in VARIANTS}
    with variants["clip"].unlocked():  # the baseline may set fields the config leaves out
        clip_baseline(variants["clip"])
    with variants["two_stream"].objectives.mcr.unlocked():
        variants["two_stream"].objectives.mcr.itc_inputs = "unmasked"
    return variants


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


# ----------------------------------------------------------------------------- the step
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
        raise cli.UsageError(f"data.max_text_length {length} exceeds model.text.max_length "
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


class ImageTextStep(train_step.MimjaxTrainStep):
    """The image-text (MCR) train step on a fixed batch of synthetic pairs."""

    def host_batch(self, config, local_batch: int, rng) -> dict:
        first = self.jax.process_index() * local_batch
        return synthetic_pairs_batch(config, local_batch, rng, first_index=first)


# ----------------------------------------------------------------------------- run
def _figure(row: dict, key: str):
    return row["memory"][key] if key in row["memory"] else row.get(key)


def ratios(mine: dict, other: dict) -> dict:
    """{figure: mine / other} (None where either is missing or zero)."""
    out = {}
    for key in RATIO_KEYS:
        a, b = _figure(mine, key), _figure(other, key)
        out[key] = a / b if a is not None and b else None
    return out


def run(args, overrides, log) -> dict:
    train_step.check_windows(args)
    config = train_step.load_config(args.config, overrides, batch=args.batch)
    variants = variant_configs(config)
    batch = int(config.global_batch_size)
    dtype = config.model.get("dtype", "float32")
    devices, platform_name, device = timing.describe_devices()
    log(f"{len(devices)} x {device}; batch {batch} pairs; image {config.model.image_size} px; "
        f"{dtype}")
    compiler_options = train_step.parse_xla_options(args.xla_option)
    runners = [ImageTextStep(cfg, log, compiler_options, name=name)
               for name, cfg in variants.items()]

    peak = timing.PeakMeter(args.peak_tflops, config, dtype, log)
    peak.measure()
    device_memory_after_warmup = {}
    load_before = os.getloadavg()
    per_step = timing.time_interleaved(
        runners, warmup=args.warmup, steps=args.steps, windows=args.windows, log=log,
        after_round=peak.measure,
        after_warmup=lambda r: device_memory_after_warmup.__setitem__(r.name,
                                                                      timing.device_memory()))
    load_after = os.getloadavg()
    resolved = peak.resolve(platform_name)

    rows = {}
    for runner in runners:
        summary = timing.summarize(per_step[runner.name], batch, timing.cores())
        summary["pairs_per_s"] = summary.pop("img_per_s")
        label, description = VARIANTS[runner.name]
        rows[runner.name] = {
            "label": label, "description": description,
            **_variant_settings(variants[runner.name]),
            "params_m": runner.num_params / 1e6, "init_s": runner.init_s,
            "lower_s": runner.lower_s, "compile_s": runner.compile_s,
            **summary, "loss": runner.last_loss(),
            **timing.xla_throughput(runner.compiled, summary["step_time_s"],
                                    resolved["per_device"]),
            "memory": {**timing.compiled_memory(runner.compiled),
                       **device_memory_after_warmup[runner.name]},
        }
    text_cfg = config.model.text
    return {
        **train_step.report_head("mcr", args, overrides, config, runners[0].mesh),
        "text_length": int(config.data.get("max_text_length", None) or text_cfg.max_length),
        "vocab_size": int(text_cfg.vocab_size),
        "warmup_steps": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        "variants": rows,
        "ratios": {f"mcr_over_{other}": ratios(rows["mcr"], rows[other])
                   for other in ("clip", "two_stream")},
        **peak.fields(resolved),
        **train_step.report_tail([load_before[0], load_after[0]], compiler_options),
    }


# ----------------------------------------------------------------------------- table
def format_table(r: dict) -> str:
    names = list(VARIANTS)
    rows_by_name = r["variants"]
    ratio_keys = ("mcr_over_clip", "mcr_over_two_stream")
    rows = [("", *(VARIANTS[n][0] for n in names), "MCR/CLIP", "MCR/two-stream")]

    def show(value, fmt):
        if value is None:
            return "n/a"
        return value if isinstance(value, str) else fmt.format(value)

    def row(label, key=None, fmt="{:.2f}", values=None, ratio=True):
        values = values or [_figure(rows_by_name[n], key) for n in names]
        ratios = [r["ratios"][k][key] if ratio else None for k in ratio_keys]
        rows.append((label, *(show(v, fmt) for v in values),
                     *("" if not ratio else show(x, "{:.2f}x") for x in ratios)))

    def memory(key):
        return [timing.mib(rows_by_name[n]["memory"][key]) for n in names]

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
    row("memory, compiled (MiB/dev)", values=memory("compiled_peak_bytes"),
        key="compiled_peak_bytes")
    row("  of which temporaries", values=memory("compiled_temp_bytes"),
        key="compiled_temp_bytes")
    row("memory, device peak (MiB)", values=memory("device_peak_bytes"), key="device_peak_bytes")
    row("parameters (M)", "params_m")
    row("CPU utilisation", values=[f"{100 * rows_by_name[n]['cpu_utilization']:.0f}%"
                                   for n in names], ratio=False)
    row("compile (s)", "compile_s", "{:.1f}", ratio=False)
    row("final loss", "loss", "{:.4f}", ratio=False)
    lines = [f"mcr | {r['config']}",
             (f"{r['num_devices']} x {r['device']} | mesh {r['mesh']} | {r['dtype']} | batch "
              f"{r['batch']} pairs | image {r['image_size']} px | text {r['text_length']} "
              f"tokens | vocab {r['vocab_size']}")]
    lines += timing.format_rows(rows)
    lines.append(f"peak {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']}); host load "
                 f"{r['host_load_avg'][0]:.2f} -> {r['host_load_avg'][1]:.2f}")
    lines.append("memory, compiled: XLA's analysis of each step per device (temporaries + "
                 "arguments: state and batch). device peak: the allocator's high-water mark "
                 "after each row's warm-up (all three states resident, rows warmed up in "
                 "table order), where the backend reports it")
    for name in names:
        lines.append(f"{VARIANTS[name][0]}: {VARIANTS[name][1]}")
    return "\n".join(lines)
