#!/usr/bin/env python
"""Exports a mimjax checkpoint for PyTorch: Hugging Face transformers or timm.

  python tools/export_pytorch.py --workdir DIR [--step N] --format hf|timm --out OUT

--format hf writes OUT/config.json + OUT/model.safetensors (transformers'
save_pretrained), loadable offline with
  ViTMAEForPreTraining.from_pretrained(OUT)   an MAE / MIRAM checkpoint (base-scale decoder)
  ViTForImageClassification.from_pretrained(OUT)   a classifier with head "cls"
  ViTModel.from_pretrained(OUT, add_pooling_layer=False)   the encoder of any of these
--format timm writes OUT/model.npz (big_vision layout, for VisionTransformer's
load_pretrained), OUT/model.safetensors (a timm state dict) and OUT/timm_args.json
(the VisionTransformer arguments that match). Both write OUT/mimjax_export.json:
architecture and input normalisation, no data, paths or patient identifiers.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python tools/export_pytorch.py`: put the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import cli  # noqa: E402

EPILOG = """\
examples:
  python tools/export_pytorch.py --workdir workdirs/demo --format hf --out export/demo_hf
  python tools/export_pytorch.py --workdir workdirs/ft --step 300 --format timm --out export/ft

  # in PyTorch
  from transformers import ViTMAEForPreTraining, ViTModel
  mae = ViTMAEForPreTraining.from_pretrained("export/demo_hf")
  encoder = ViTModel.from_pretrained("export/demo_hf", add_pooling_layer=False)

The architecture comes from WORKDIR/config.json; for a workdir without one pass the
config the run used: --config configs/demo.py or --config configs/demo.py:tiny.
--config.KEY=VALUE (any number) overrides a field of that config, or of config.json.
Settings PyTorch cannot express (e.g. no class token for HF, a "gap" / "map" head
for ViTForImageClassification) stop the export with a message naming the fix.
"""

# A setting PyTorch cannot express, a missing checkpoint or config: the user's to fix.
USER_ERRORS = (ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.argument_parser(__doc__, EPILOG)
    parser.add_argument("--workdir", required=True, help="mimjax workdir (or its checkpoints/).")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest).")
    parser.add_argument("--format", required=True, choices=("hf", "timm"), help="target library.")
    parser.add_argument("--out", required=True, help="output directory.")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE[:ARG]",
        help="the run's config when WORKDIR has no config.json.",
    )
    parser.add_argument("--use-ema", action="store_true", help="export the EMA parameters.")
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="export only the encoder (HF: ViTModel; timm: no head).",
    )
    return parser


def main(argv=None) -> int:
    return cli.main(build_parser(), export, argv, user_errors=USER_ERRORS, config_overrides=True)


def export(args, overrides) -> None:
    from mimjax.export import convert

    record = convert.export_checkpoint(
        args.workdir,
        args.out,
        args.format,
        encoder_only=args.encoder_only,
        **cli.checkpoint_options(args, overrides),
    )
    target = record.get("hf_class") or "timm VisionTransformer"
    print(f"Exported step {record['step']} ({record['kind']}) as {target} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
