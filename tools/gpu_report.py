"""The accelerator figures of the README's Speed section, in one command on one GPU:

    python tools/gpu_report.py --out gpu_report            # about 10-20 minutes on one H100
    python tools/gpu_report.py --dry-run                   # the commands it would run

1. bf16 MFU of the ViT-B/16 and ViT-L/16 MAE pretraining steps (224 px, mask 0.75,
   8-block 512-wide decoder, AdamW), with the explicit ("xla") and the fused
   (`jax.nn.dot_product_attention`, cuDNN flash attention on GPU) attention paths, at
   the largest batch that fits: the batch doubles from --start-batch until the step
   no longer compiles or runs (out of memory), and the last one that ran is reported
   with its images/s, MFU and compiled memory. MFU uses XLA's FLOP count of the step
   and the device's bf16 peak (`--peak-tflops`, default 989.4 for an H100 SXM's dense
   bf16; set it for other parts).
2. The input pipeline's records per second per CPU core at 224 px
   (`tools/benchmark.py loader --sweep`).

Every figure comes from `tools/benchmark.py`, run once per setting in its own process
(a failed, out-of-memory compile cannot poison the next); the raw JSON of each run
is kept under --out, with report.md (the table) and report.json. Targets (from the
project's issue): MFU >= 35% for ViT-B/16, >= 45% for ViT-L/16.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("B/16", "L/16")
ATTENTION = ("xla", "fused")
TARGETS = {"B/16": 0.35, "L/16": 0.45}
H100_BF16_DENSE_TFLOPS = 989.4


def pretrain_command(variant: str, attention: str, batch: int, peak_tflops: float,
                     json_path: str, steps: int, windows: int) -> list[str]:
    return [sys.executable, "tools/benchmark.py", "pretrain", "--config",
            "configs/mae_vit_b16.py", "--image-size", "224", "--batch", str(batch),
            f"--config.model.variant={variant}", f"--config.model.attention={attention}",
            "--config.model.dtype=bfloat16", "--peak-tflops", str(peak_tflops),
            "--steps", str(steps), "--windows", str(windows), "--json", json_path]


def loader_command(json_path: str) -> list[str]:
    return [sys.executable, "tools/benchmark.py", "loader", "--sweep", "--size", "224",
            "--json", json_path]


def largest_batch(run: Callable[[int], dict | None], start: int, limit: int) -> tuple[int, dict]:
    """Doubles the batch from `start` while `run(batch)` succeeds (returns a result);
    returns the largest batch that ran and its result. (0, {}) if even `start` failed."""
    best, result, batch = 0, {}, start
    while batch <= limit:
        outcome = run(batch)
        if outcome is None:
            break
        best, result = batch, outcome
        batch *= 2
    return best, result


def _run_json(command: list[str], json_path: str, log_path: str, timeout: int) -> dict | None:
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
    if proc.returncode != 0 or not os.path.exists(json_path):
        return None
    with open(json_path) as f:
        return json.load(f)


def _row(variant, attention, batch, result) -> dict:
    fields = ("img_per_s", "mfu", "xla_gflops_per_step", "memory")
    row = {"variant": variant, "attention": attention, "batch": batch}
    row.update({k: result.get(k) for k in fields if k in result})
    return row


def _table(rows: list[dict], loader: dict | None) -> str:
    lines = ["| model | attention | largest batch | images / s | MFU (bf16) | target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mfu = r.get("mfu")
        target = TARGETS[r["variant"]]
        verdict = "n/a" if mfu is None else ("met" if mfu >= target else "missed")
        lines.append(f"| ViT-{r['variant']} MAE | {r['attention']} | {r['batch'] or 'none ran'} | "
                     f"{r.get('img_per_s', 'n/a')} | "
                     f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                     f">= {100 * target:.0f}%: {verdict} |")
    if loader:
        lines += ["", "Input pipeline at 224 px (tools/benchmark.py loader --sweep):", "",
                  "```", json.dumps(loader, indent=1)[:4000], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", default="gpu_report", help="folder for the results")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="bf16 peak TFLOP/s of one device (default: %(default)s, H100 SXM)")
    parser.add_argument("--start-batch", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per benchmark run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args(argv)
    if args.start_batch < 1 or args.max_batch < args.start_batch:
        parser.error("need 1 <= --start-batch <= --max-batch")

    if args.dry_run:
        for variant in args.variants:
            for attention in ATTENTION:
                print(shlex.join(pretrain_command(
                    variant, attention, args.start_batch, args.peak_tflops,
                    os.path.join(args.out, "RUN.json"), args.steps, args.windows)),
                      f"  # then batch x2 while it runs, up to {args.max_batch}")
        print(shlex.join(loader_command(os.path.join(args.out, "loader.json"))))
        return 0

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for variant in args.variants:
        for attention in ATTENTION:
            tag = f"{variant.replace('/', '')}_{attention}"

            def run(batch, variant=variant, attention=attention, tag=tag):
                json_path = os.path.join(args.out, f"{tag}_b{batch}.json")
                log_path = os.path.join(args.out, f"{tag}_b{batch}.log")
                return _run_json(pretrain_command(variant, attention, batch, args.peak_tflops,
                                                  json_path, args.steps, args.windows),
                                 json_path, log_path, args.timeout)

            batch, result = largest_batch(run, args.start_batch, args.max_batch)
            rows.append(_row(variant, attention, batch, result))
            print(f"ViT-{variant} {attention}: largest batch {batch}, "
                  f"MFU {result.get('mfu')}", flush=True)
    loader_json = os.path.join(args.out, "loader.json")
    loader = _run_json(loader_command(loader_json), loader_json,
                       os.path.join(args.out, "loader.log"), args.timeout)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"pretrain": rows, "loader": loader}, f, indent=1)
    table = _table(rows, loader)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
