#!/usr/bin/env python
"""Imports PyTorch ViT weights (Hugging Face transformers, timm, big_vision) into mimjax.

  python tools/import_pytorch.py --from hf|timm PATH --out DIR

PATH for --from hf: a save_pretrained directory of a ViTModel, ViTForImageClassification
or ViTMAEForPreTraining. For --from timm: a directory written by
tools/export_pytorch.py --format timm, a big_vision / original ViT .npz, or a timm
state dict (.safetensors, .pth, .bin). DIR receives a mimjax checkpoint
(DIR/checkpoints/<step>/state) and DIR/config.json; fine-tune from it with
--config.init=DIR, or embed images with mimjax.inference.Encoder.from_workdir(DIR).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python tools/import_pytorch.py`: put the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import cli  # noqa: E402

EPILOG = """\
examples:
  python tools/import_pytorch.py --from hf export/demo_hf --out workdirs/demo_from_hf
  python tools/import_pytorch.py --from timm B_16-i21k.npz --out workdirs/vit_b16 --gelu tanh
  python tools/import_pytorch.py --from timm vit.safetensors --num-heads 12 --out w

  # fine-tune from it
  python main.py --config configs/finetune_cbis_pathology.py --workdir ft \\
      --config.init=workdirs/demo_from_hf

What the weights do not record comes from the files beside them (config.json,
timm_args.json, mimjax_export.json) or the options below: --num-heads (timm state
dicts), --layer-norm-eps (timm: default 1e-6), --gelu (timm: default tanh for .npz,
exact for state dicts), --norm-mean/--norm-std (input normalisation for
mimjax.inference on integer images). A fixed sin-cos position table is recognised
and imported as posemb "sincos2d"; any other table as a learned one.
"""

# Weights mimjax cannot express, a missing file, a non-empty --out: the user's to fix.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.argument_parser(__doc__, EPILOG)
    parser.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=("hf", "timm"),
        help="source library of PATH.",
    )
    parser.add_argument("path", help="the checkpoint directory or file.")
    parser.add_argument("--out", required=True, help="output mimjax workdir (must be empty).")
    parser.add_argument("--step", type=int, default=0, help="step number to save under (0).")
    parser.add_argument(
        "--scan", action="store_true", help="write scan-stacked blocks (model.scan=True)."
    )
    parser.add_argument("--num-heads", type=int, default=None, help="timm state dicts only.")
    parser.add_argument("--layer-norm-eps", type=float, default=None, help="timm only.")
    parser.add_argument("--gelu", choices=("tanh", "exact"), default=None, help="timm only.")
    parser.add_argument("--norm-mean", type=float, default=None, help="input normalisation mean.")
    parser.add_argument("--norm-std", type=float, default=None, help="input normalisation std.")
    return parser


def main(argv=None) -> int:
    return cli.main(build_parser(), import_weights, argv, user_errors=USER_ERRORS)


def import_weights(args) -> None:
    from mimjax.export import convert

    directory = convert.import_checkpoint(
        args.source_format,
        args.path,
        args.out,
        step=args.step,
        scan=args.scan,
        num_heads=args.num_heads,
        layer_norm_eps=args.layer_norm_eps,
        gelu=args.gelu,
        norm_mean=args.norm_mean,
        norm_std=args.norm_std,
    )
    print(f"Wrote {directory}; use --config.init={os.path.abspath(args.out)}")


if __name__ == "__main__":
    sys.exit(main())
