#!/usr/bin/env python
"""Image-report retrieval metrics (R@1/5/10, median rank) of a saved checkpoint.

  python tools/evaluate_retrieval.py --workdir DIR [--step N] [--split val|test]

Scores the checkpoint as the trainer's retrieval eval does and writes
OUT/retrieval_{split}_step{N}.json and OUT/figures/retrieval_{split}_step{N}.png
(OUT = --out, default the workdir); see mimjax/evaluators/retrieval_checkpoint.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `mimjax`, `configs`, `input_pipeline` from a checkout

EPILOG = """\
examples:
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo              # latest, val
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --split test
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --step 800 --out /tmp/r800
  python tools/evaluate_retrieval.py --workdir workdirs/mcr_demo --finding-probe  # per finding
  python tools/evaluate_retrieval.py --workdir RUN --data-dir /data/mimic_cxr_prepared

The architecture and data settings come from WORKDIR/config.json, the tokenizer from
WORKDIR/tokenizer.json (both written by the trainer).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.add_argument("--config", default=None,
                        help="the run's config when WORKDIR has no config.json.")
    parser.add_argument("--finding-probe", action="store_true",
                        help="also fit linear probes on the train pairs' embeddings and report "
                             "each finding's AUC from the image and from the report side.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mimjax.evaluators import retrieval_checkpoint

    try:
        metrics = retrieval_checkpoint.evaluate_checkpoint(
            args.workdir,
            step=args.step,
            split=args.split,
            data_dir=args.data_dir,
            tokenizer_path=args.tokenizer,
            out_dir=args.out,
            use_ema=args.use_ema,
            batch_size=args.batch_size,
            config=args.config,
            finding_probe=args.finding_probe,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
