"""Parameter trees as flat {"encoder/norm/scale": array} dicts, the form the converters use.

A mimjax model's pure parameter dict nests modules; lists of modules (`decoders`,
unrolled `transformer/blocks`) appear with integer keys. Flattening names every array
by its "/"-joined path (as `mimjax.sharding.path_to_str`), so converters read and write
single entries; `unflatten` rebuilds the nested dict with integer keys where a path
segment is a number, the layout `nnx.replace_by_pure_dict` expects.

Transformer blocks come in two layouts (see `mimjax.models.vit.Transformer`):
unrolled (`.../transformer/blocks/<i>/attn/...`) and stacked for `nnx.scan`
(`.../transformer/blocks/attn/...` with a leading layer axis). `unroll` and `stack`
convert every stack in a tree (encoder and decoders) between the two.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mimjax import pretrained
from mimjax.sharding import path_to_str

_BLOCKS = "transformer/blocks/"


def flatten(tree) -> dict[str, np.ndarray]:
    """Nested parameters -> {path: float32/... numpy array}."""
    return {
        path_to_str(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten`; numeric path segments become int keys."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _stack_prefixes(flat: dict[str, Any]) -> list[str]:
    """Module prefixes ("encoder/", "decoders/0/") that hold a transformer stack."""
    prefixes = {name[: name.index(_BLOCKS)] for name in flat if _BLOCKS in name}
    return sorted(prefixes)


def _convert(flat: dict[str, Any], layout: str) -> dict[str, Any]:
    out = dict(flat)
    for prefix in _stack_prefixes(flat):
        sub = {n[len(prefix) :]: v for n, v in flat.items() if n.startswith(prefix + _BLOCKS)}
        if pretrained._block_layout(sub) == layout:
            continue
        for name in sub:
            del out[prefix + name]
        for name, value in pretrained._convert_blocks(sub, layout).items():
            out[prefix + name] = np.asarray(value)
    return out


def unroll(flat: dict[str, Any]) -> dict[str, Any]:
    """Every stacked (scan) transformer stack -> one entry per layer."""
    return _convert(flat, "unrolled")


def stack(flat: dict[str, Any]) -> dict[str, Any]:
    """Every unrolled transformer stack -> stacked along a leading layer axis."""
    return _convert(flat, "stacked")


def depth(flat: dict[str, Any], prefix: str) -> int:
    """Number of blocks under `prefix` ("encoder/") in an unrolled tree."""
    start = prefix + _BLOCKS
    indices = {int(n[len(start) :].split("/")[0]) for n in flat if n.startswith(start)}
    if indices != set(range(len(indices))):
        raise ValueError(f"{start}: block indices {sorted(indices)} are not 0..n-1.")
    return len(indices)


def kind_of(flat: dict[str, Any]) -> str:
    """ "mae" (encoder + decoders), "classifier" (encoder + head) or "encoder"."""
    if not any(name.startswith("encoder/") for name in flat):
        raise ValueError(
            "These parameters have no 'encoder' subtree; expected a mimjax model "
            f"(MAE / MIRAM or ViT classifier), got top-level keys "
            f"{sorted({n.split('/')[0] for n in flat})}."
        )
    if any(name.startswith("decoders/") for name in flat):
        return "mae"
    if any(name.startswith("head/") for name in flat):
        return "classifier"
    return "encoder"
