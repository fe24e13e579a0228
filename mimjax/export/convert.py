"""The two directions end to end, as tools/export_pytorch.py and tools/import_pytorch.py
run them: a mimjax workdir -> HF / timm files, and HF / timm files -> a mimjax checkpoint.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from mimjax.export import common

log = logging.getLogger(__name__)

FORMATS = ("hf", "timm")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; use one of {FORMATS}.")


def export_checkpoint(
    workdir: str,
    out_dir: str,
    fmt: str,
    *,
    step: int | None = None,
    config=None,
    use_ema: bool = False,
    encoder_only: bool = False,
) -> dict:
    """Exports step `step` (None = latest) of `workdir` to `out_dir`; returns the record
    written to OUT/mimjax_export.json (architecture and preprocessing only)."""
    _check_format(fmt)
    source = common.load_source(workdir, step, config=config, use_ema=use_ema)
    if fmt == "hf":
        from mimjax.export import hf

        return hf.save(source, out_dir, encoder_only=encoder_only)
    from mimjax.export import timm

    if encoder_only and source.kind != "encoder":
        source.flat = {n: v for n, v in source.flat.items() if n.startswith("encoder/")}
        source.kind = "encoder"
    return timm.save(source, out_dir)


def import_checkpoint(
    fmt: str,
    path: str,
    out_dir: str,
    *,
    step: int = 0,
    scan: bool = False,
    num_heads: int | None = None,
    layer_norm_eps: float | None = None,
    gelu: str | None = None,
    norm_mean: float | None = None,
    norm_std: float | None = None,
) -> str:
    """Converts an HF / timm checkpoint into a mimjax checkpoint in `out_dir` (the layout
    `--config.init` reads, plus OUT/config.json); returns the checkpoints directory."""
    _check_format(fmt)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    if fmt == "hf":
        from mimjax.export import hf

        flat, config, kind = hf.load(path, scan=scan)
    else:
        from mimjax.export import timm

        flat, config, kind = timm.load(
            path, num_heads=num_heads, layer_norm_eps=layer_norm_eps, gelu=gelu, scan=scan
        )
    record = common.read_export_record(path if os.path.isdir(path) else os.path.dirname(path))
    prep = (record or {}).get("preprocessing", {})
    mean = norm_mean if norm_mean is not None else prep.get("norm_mean")
    std = norm_std if norm_std is not None else prep.get("norm_std")
    if mean is not None and std is not None:
        config.data = ml_collections.ConfigDict({"norm_mean": mean, "norm_std": std})
    if kind == "classifier" and record and record.get("class_names"):
        config.finetune = ml_collections.ConfigDict({"class_names": record["class_names"]})
    directory = common.write_checkpoint(out_dir, flat, config, step=step)
    log.info("Imported a %s (%d parameter arrays) into %s", kind, len(flat), directory)
    return directory
