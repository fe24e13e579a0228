#!/usr/bin/env python
"""Image-report retrieval metrics (R@1/5/10, median rank) of a saved checkpoint.

  python tools/evaluate_retrieval.py --workdir DIR [--step N] [--split val|test]

Scores the checkpoint as the trainer's retrieval eval does and writes
OUT/retrieval_{split}_step{N}.json and OUT/figures/retrieval_{split}_step{N}.png
(OUT = --out, default the workdir); see mimjax/evaluators/retrieval_checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python tools/evaluate_retrieval.py`: put the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import cli  # noqa: E402

EPILOG = """\
examples:
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo              # latest, val
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --split test
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --step 800 --out /tmp/r800
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --finding-probe  # per finding
  python tools/evaluate_retrieval.py --workdir RUN --data-dir /data/mimic_cxr_prepared

The architecture and data settings come from WORKDIR/config.json, the tokenizer from
WORKDIR/tokenizer.json (both written by the trainer). --config.KEY=VALUE (any number)
overrides a field of that config, or of --config FILE[:ARG].
"""

# Bad settings or a missing checkpoint, data or tokenizer: the user's to fix.
USER_ERRORS = (ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.argument_parser(__doc__, EPILOG)
    parser.add_argument("--workdir", required=True, help="an image-report (mcr) run's workdir.")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest).")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--data-dir", default=None, help="the data, if not at the run's data.dir.")
    parser.add_argument("--tokenizer", default=None,
                        help="the run's tokenizer.json, if not in the workdir.")
    parser.add_argument("--out", default=None, help="output directory (default: the workdir).")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="eval batch size (default: the run's eval_batch_size).")
    parser.add_argument("--use-ema", action="store_true", help="score the EMA parameters.")
    parser.add_argument("--config", default=None, metavar="FILE[:ARG]",
                        help="the run's config when WORKDIR has no config.json.")
    parser.add_argument("--finding-probe", action="store_true",
                        help="also fit linear probes on the train pairs' embeddings and report "
                             "each finding's AUC from the image and from the report side.")
    return parser


def main(argv=None) -> int:
    return cli.main(build_parser(), evaluate, argv, user_errors=USER_ERRORS, config_overrides=True)


def evaluate(args, overrides) -> None:
    from mimjax.evaluators import retrieval_checkpoint

    metrics = retrieval_checkpoint.evaluate_checkpoint(
        args.workdir,
        split=args.split,
        data_dir=args.data_dir,
        tokenizer_path=args.tokenizer,
        out_dir=args.out,
        batch_size=args.batch_size,
        finding_probe=args.finding_probe,
        **cli.checkpoint_options(args, overrides),
    )
    print(f"step {metrics['step']}, {args.split} split, {int(metrics['num_pairs'])} pairs")
    for direction in ("i2t", "t2i"):
        print(f"  {direction}: " + "  ".join(
            f"{k} {metrics[f'{direction}_{k}']:.3f}" for k in ("R@1", "R@5", "R@10"))
            + f"  median rank {metrics[f'{direction}_median_rank']:.0f}")
    probed = [k[len("image_auc/"):] for k in metrics if k.startswith("image_auc/")]
    if probed:
        print(f"finding probe AUC (fit on {metrics['probe_train_pairs']} train pairs; "
              "image embedding / report embedding):")
        width = max(len(name) for name in probed)
        for name in probed:
            print(f"  {name:<{width}}  {metrics[f'image_auc/{name}']:.3f} / "
                  f"{metrics[f'text_auc/{name}']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
