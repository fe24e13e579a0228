#!/usr/bin/env python
"""Throughput benchmarks for mimjax, one subcommand per thing benchmarked. Each is a
module of tools/bench/ whose docstring is its section below; adding a benchmark is adding
a module and a line to BENCHMARKS.

Examples:
    python tools/benchmark.py pretrain --config configs/mae_vit_b16.py --image-size 224 \\
        --batch 16 --config.model.dtype=float32 --compare hf
    python tools/benchmark.py pretrain --config configs/mae_vit_b16.py --image-size 224 \\
        --batch 16 --config.model.dtype=float32 --compare hf --allocator tcmalloc
    python tools/benchmark.py pretrain --config configs/miram_vit_b16.py --batch 64 \\
        --config.model.attention=fused --json /tmp/bench.json
    python tools/benchmark.py mcr --config configs/mcr_demo.py --batch 64 --steps 3
    python tools/benchmark.py segmentation --config configs/segment_acdc.py --variant B/16 \\
        --image-size 128 --batch 8 --compare monai
    python tools/benchmark.py landmarks --config configs/landmarks_hand.py --batch 16 \\
        --compare unet
    python tools/benchmark.py loader --sweep
    python tools/benchmark.py loader --data /data/shards --workers 8 --seconds 5

Config overrides `--config.a.b=VALUE` take a Python literal (`1`, `0.5`, `"x"`,
`[224, 448]`, `None`, `true`/`false`) where the field is not a string, and may set
fields whose default is None (e.g. `--config.model.depth=2`); a field that does not
exist is refused with the closest names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

if __package__ in (None, ""):  # `python tools/benchmark.py`: put the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mimjax import host_memory  # noqa: E402
from tools import cli  # noqa: E402
from tools.bench import landmark, loader, mcr, pretrain, segmentation, timing  # noqa: E402

# The subcommands, in --help order: name -> module (see tools/bench/__init__.py).
BENCHMARKS = {
    "pretrain": pretrain,
    "mcr": mcr,
    "segmentation": segmentation,
    "landmarks": landmark,
    "loader": loader,
}


def build_parser() -> argparse.ArgumentParser:
    sections = [f"{name}\n{textwrap.indent(module.__doc__.strip(), '    ')}"
                for name, module in BENCHMARKS.items()]
    head, examples = __doc__.split("\n\nExamples:", 1)
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description="\n\n".join([head, *sections, "Examples:" + examples.rstrip()]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in BENCHMARKS.values():
        module.add_parser(subparsers)
    return parser


def run(argv: list[str] | None = None, *, program: bool = False) -> dict:
    """Runs one benchmark; prints the table and then the JSON (last line of stdout) and
    returns the result. A user's mistake raises cli.UsageError or ConfigError.
    `program`: run as a program (`main()` on sys.argv), which `--allocator` may
    restart with the environment it needs."""
    args, overrides = cli.parse_args(build_parser(), argv)
    module = BENCHMARKS[args.command]
    # The C allocator is set up before JAX starts (see mimjax.host_memory).
    if getattr(args, "allocator", None):
        args.allocator_info = timing.prepare_allocator(args.allocator, program=program)
    else:
        host_memory.configure()
    result = module.run(args, overrides, timing.log)
    if module.RUNS_ON_EVERY_HOST and sys.modules["jax"].process_index() != 0:
        return result  # multi-host: the first process reports
    text = json.dumps(result, sort_keys=False)
    print(module.format_table(result), flush=True)
    print(text, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """`run` as a program: exit status 0, or 2 with one line on stderr for a mistake."""
    def body():
        run(argv, program=argv is None)

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
