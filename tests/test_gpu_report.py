"""tools/gpu_report.py: the batch search, the commands it runs and its table (the
GPU figures themselves need a GPU; CI has none)."""

import os
import subprocess
import sys

from tools import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_largest_batch_doubles_until_a_run_fails():
    tried = []

    def run(batch):
        tried.append(batch)
        return {"mfu": batch / 1000} if batch <= 256 else None  # 512 runs out of memory

    assert gpu_report.largest_batch(run, 32, 4096) == (256, {"mfu": 0.256})
    assert tried == [32, 64, 128, 256, 512]
    assert gpu_report.largest_batch(lambda b: None, 32, 4096) == (0, {})
    assert gpu_report.largest_batch(lambda b: {}, 32, 100) == (64, {})  # the limit stops it


def test_commands_are_the_benchmarks_bf16_mae_step():
    command = gpu_report.pretrain_command("L/16", "fused", 128, 989.4, "x.json", 10, 3)
    assert command[1:4] == ["tools/benchmark.py", "pretrain", "--config"]
    for part in ("--config.model.variant=L/16", "--config.model.attention=fused",
                 "--config.model.dtype=bfloat16"):
        assert part in command
    assert command[command.index("--batch") + 1] == "128"
    proc = subprocess.run([sys.executable, "tools/gpu_report.py", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and "loader --sweep --size 224" in lines[-1]


def test_table_names_the_targets():
    rows = [gpu_report._row("B/16", "xla", 256, {"img_per_s": 1000.0, "mfu": 0.4}),
            gpu_report._row("L/16", "fused", 0, {})]
    table = gpu_report._table(rows, None)
    assert ">= 35%: met" in table and "40.0%" in table
    assert "none ran" in table and ">= 45%: n/a" in table
