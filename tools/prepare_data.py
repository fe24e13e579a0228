#!/usr/bin/env python
"""Medical image files -> de-identified mimjax record shards for pretraining.

Reads a folder (DICOM found by content, also without extension; NIfTI; PNG,
JPEG, BMP, TIFF), a CSV/JSONL manifest (labels, reports, landmarks, masks, patient
ids, splits), or a seed dataset's download folder (--builder), and writes

  OUTPUT/{train,val,test}/data-NNNNN-of-MMMMM.array_record   the records
  OUTPUT/rejected.jsonl   every file / frame / manifest row skipped, with why
  OUTPUT/summary.json     counts per split, rejections by reason, options
  OUTPUT/plan.json, OUTPUT/.done/, OUTPUT/.deid_salt         resume state

Only the split folders are meant to be shared. Rerunning the same command
resumes an interrupted run; see input_pipeline/ingest/engine.py for the
record contents and input_pipeline/ingest/manifest.py for manifest columns.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python tools/prepare_data.py`: put the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import cli  # noqa: E402

EPILOG = """\
examples:
  # a folder of DICOM / NIfTI / PNG files, 512 px, 80/10/10 split by patient
  python tools/prepare_data.py --input /data/dicoms --output /data/shards

  # a manifest with labels (CSV columns: path, patient_id, split, report,
  # landmarks, mask, mask:NAME, channels, options; any other column is a label)
  python tools/prepare_data.py --input labels.csv --output out --size 448 --split 0.9,0.1

  # a seed dataset in its official download layout
  python tools/prepare_data.py --builder cbis_ddsm --input ~/CBIS-DDSM --output cbis

  # pretrain on the result
  python main.py --config configs/miram_vit_b16.py:/data/shards/train --workdir w

De-identification: only whitelisted technical attributes (modality, view,
laterality, photometric, bits stored, model name, burned-in flag) leave a DICOM
header; patient ids become salted hashes. The salt comes from --salt, else
$MIMJAX_DEID_SALT, else OUTPUT/.deid_salt (generated once, mode 0600). Keep it
secret and out of shared copies. Pixels are not scrubbed: check the records'
burned_in_annotation flag.

Splits: by patient (patient_id column, else the DICOM PatientID, else each
file is its own patient); rows with an explicit split keep it.

Exit status: 0 when done (rejected inputs are listed, not fatal); 1 with
--strict at the first rejection; 2 for unusable arguments, manifests or an
output folder holding a different run.
"""


def parse_window(text: str):
    """'auto' | 'minmax' | 'percentile' | 'CENTER,WIDTH'."""
    if text in ("auto", "minmax", "percentile"):
        return text
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--window {text!r}: use auto, minmax, percentile or CENTER,WIDTH (e.g. 40,400)"
        ) from None
    if width <= 0:
        raise argparse.ArgumentTypeError(f"--window {text!r}: width must be > 0")
    return (center, width)


def parse_size(text: str) -> int | None:
    if text.lower() in ("0", "none", "native"):
        return None
    return _int_at_least(text, 8, f"--size {text!r}: an integer >= 8, or 'native'")


def parse_split(text: str) -> dict[str, float]:
    from input_pipeline.ingest import manifest  # pylint: disable=g-import-not-at-top

    try:
        return manifest.parse_fractions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, f"{text!r} is not a positive integer")


def _int_at_least(text: str, low: int, message: str) -> int:
    """int(text) if it is >= low, else argparse's error `message`."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(message)
    return value


def build_parser() -> argparse.ArgumentParser:
    from input_pipeline import builders  # pylint: disable=g-import-not-at-top

    p = cli.argument_parser(__doc__, EPILOG, prog="prepare_data.py")
    p.add_argument(
        "--input",
        required=True,
        help="a folder of image files (scanned recursively, hidden files skipped), a "
        "manifest (.csv, .tsv, .jsonl), or with --builder the dataset's download folder",
    )
    p.add_argument("--output", required=True, help="output folder (created; resumed if it exists)")
    p.add_argument(
        "--size",
        type=parse_size,
        default=512,
        help="output side in pixels: aspect-preserving resize, then pad to SIZE x SIZE; "
        "'native' keeps each image's size (default 512)",
    )
    p.add_argument(
        "--builder",
        choices=sorted(builders.BUILDERS),
        metavar="NAME",
        help="dataset whose download layout --input has (input_pipeline/builders): "
        + ", ".join(sorted(builders.BUILDERS)),
    )
    p.add_argument(
        "--window",
        type=parse_window,
        default="auto",
        help="intensity window to [0, 1]: auto (the file's VOI LUT or window if any, else "
        "full scale for PNG/JPEG/BMP, -1000..1000 HU for CT, 0.5/99.5 percentiles "
        "otherwise), minmax, percentile, or CENTER,WIDTH in modality units (default auto)",
    )
    p.add_argument(
        "--split",
        type=parse_split,
        default="0.8,0.1,0.1",
        help="train,val,test fractions for rows without an explicit split, drawn per "
        "patient (default 0.8,0.1,0.1; '1' puts everything in train)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split draw (default 0)")
    p.add_argument(
        "--salt",
        help="de-identification salt (visible in the process list: prefer "
        "$MIMJAX_DEID_SALT); default $MIMJAX_DEID_SALT, else OUTPUT/.deid_salt",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(os.cpu_count() or 1, 8),
        help="worker processes (default min(cores, 8) = %(default)s; 1 = no subprocesses)",
    )
    p.add_argument(
        "--rows-per-shard",
        type=positive_int,
        default=256,
        help="input rows (files) per shard; a multi-frame file gives several records (default 256)",
    )
    p.add_argument(
        "--compression",
        choices=("uncompressed", "snappy", "zstd"),
        default="uncompressed",
        help="ArrayRecord compression (default uncompressed: fastest to read)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with exit status 1 at the first rejected input, printing its reason",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run in --output with other inputs or options and start over",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_rows(args) -> tuple[list, list[dict], str, dict[str, int]]:
    """(rows, rejected manifest rows, base folder, ignored files by extension)."""
    from input_pipeline.ingest import manifest  # pylint: disable=g-import-not-at-top

    source = os.path.abspath(os.path.expanduser(args.input))
    if args.builder:
        from input_pipeline import builders  # pylint: disable=g-import-not-at-top

        return list(builders.build_rows(args.builder, source)), [], source, {}
    if os.path.isdir(source):
        rows, ignored = manifest.scan_directory_with_ignored(source)
        return rows, [], source, ignored
    if os.path.isfile(source):
        rows, rejected = manifest.read_manifest(source)
        return rows, rejected, os.path.dirname(source), {}
    raise manifest.ManifestError(f"--input {args.input!r}: no such folder or manifest file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from input_pipeline.ingest import engine, manifest  # pylint: disable=g-import-not-at-top

    user_errors = (
        engine.PlanMismatchError,
        manifest.ManifestError,
        FileNotFoundError,  # builders.LayoutError included
        ValueError,
    )
    return cli.run(lambda: prepare(args), user_errors=user_errors)


def prepare(args) -> int:
    """Ingests --input into --output; 1 at the first rejection under --strict."""
    from input_pipeline.ingest import engine, manifest  # pylint: disable=g-import-not-at-top

    try:
        rows, rejected_rows, base_dir, ignored = load_rows(args)
        if not rows and not rejected_rows:
            raise manifest.ManifestError(f"--input {args.input!r}: no image files found")
        summary = engine.ingest(
            rows,
            args.output,
            size=args.size,
            window=args.window,
            workers=args.workers,
            rows_per_shard=args.rows_per_shard,
            salt=args.salt,
            strict=args.strict,
            overwrite=args.overwrite,
            fractions=args.split,
            split_seed=args.split_seed,
            compression=args.compression,
            rejected_rows=rejected_rows,
            base_dir=base_dir,
            ignored_files=ignored,
            progress=not args.no_progress,
        )
    except engine.StrictModeError as e:
        print(f"prepare_data: rejected (--strict): {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
