"""Parameter trees as flat {"encoder/norm/scale": array} dicts, and the two layouts
of transformer blocks: the one place that knows a mimjax model's parameter names.

A model's pure parameter dict nests modules; lists of modules (`decoders`, unrolled
`transformer/blocks`) appear with integer keys. `flatten` names every array by its
"/"-joined path (as `mimjax.sharding.path_to_str`), so loaders and converters read
and write single entries; `unflatten` rebuilds the nested dict with integer keys
where a path segment is a number, the layout `nnx.replace_by_pure_dict` expects.

Transformer blocks come in two layouts (see `mimjax.models.vit.Transformer`):
unrolled (`.../transformer/blocks/<i>/attn/...`) and stacked for `nnx.scan`
(`.../transformer/blocks/attn/...` with a leading layer axis). `unroll` and `stack`
convert every stack in a tree (encoder and decoders) between the two;
`convert_blocks` does it for one stack whose names start at "transformer/blocks/".

Used by `mimjax.pretrained` (encoder transfer), `mimjax.inference` and
`mimjax.export` alike.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mimjax.sharding import path_to_str

BLOCKS = "transformer/blocks/"


def flatten(tree) -> dict[str, np.ndarray]:
    """Nested parameters -> {path: numpy array}."""
    return {path_to_str(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flatten_leaves(tree) -> dict[str, Any]:
    """Nested parameters -> {path: leaf}, leaves as they are (arrays or abstract)."""
    return {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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


# --------------------------------------------------------------------------- blocks
def block_layout(flat: dict[str, Any]) -> str | None:
    """'unrolled' (blocks/<i>/...), 'stacked' (blocks/<name>/..., leading layer axis)
    or None (no blocks), for names that start at "transformer/blocks/"."""
    for name in flat:
        if name.startswith(BLOCKS):
            return "unrolled" if name[len(BLOCKS):].split("/")[0].isdigit() else "stacked"
    return None


def block_count(flat: dict[str, Any]) -> int:
    """Number of blocks of one stack (names starting at "transformer/blocks/")."""
    layout = block_layout(flat)
    if layout == "unrolled":
        return 1 + max(int(n[len(BLOCKS):].split("/")[0]) for n in flat if n.startswith(BLOCKS))
    if layout == "stacked":
        return next(np.shape(v)[0] for n, v in flat.items() if n.startswith(BLOCKS))
    return 0


def convert_blocks(flat: dict[str, Any], to_layout: str) -> dict[str, Any]:
    """One stack's block entries rewritten to `to_layout` ('unrolled' or 'stacked')."""
    out = {n: v for n, v in flat.items() if not n.startswith(BLOCKS)}
    blocks = {n[len(BLOCKS):]: v for n, v in flat.items() if n.startswith(BLOCKS)}
    if to_layout == "unrolled":  # stacked -> one entry per layer
        for rest, value in blocks.items():
            for i in range(np.shape(value)[0]):
                out[f"{BLOCKS}{i}/{rest}"] = np.asarray(value[i])
    elif to_layout == "stacked":  # unrolled -> stacked along a new leading axis
        grouped: dict[str, dict[int, Any]] = {}
        for rest, value in blocks.items():
            index, name = rest.split("/", 1)
            grouped.setdefault(name, {})[int(index)] = value
        for name, layers in grouped.items():
            out[f"{BLOCKS}{name}"] = np.stack([np.asarray(layers[i]) for i in sorted(layers)])
    else:
        raise ValueError(f"block layout must be 'unrolled' or 'stacked', got {to_layout!r}.")
    return out


def _stack_prefixes(flat: dict[str, Any]) -> list[str]:
    """Module prefixes ("encoder/", "decoders/0/") that hold a transformer stack."""
    return sorted({name[: name.index(BLOCKS)] for name in flat if BLOCKS in name})


def _convert(flat: dict[str, Any], layout: str) -> dict[str, Any]:
    out = dict(flat)
    for prefix in _stack_prefixes(flat):
        sub = {n[len(prefix):]: v for n, v in flat.items() if n.startswith(prefix + BLOCKS)}
        if block_layout(sub) == layout:
            continue
        for name in sub:
            del out[prefix + name]
        for name, value in convert_blocks(sub, layout).items():
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
    start = prefix + BLOCKS
    indices = {int(n[len(start):].split("/")[0]) for n in flat if n.startswith(start)}
    if indices != set(range(len(indices))):
        raise ValueError(f"{start}: block indices {sorted(indices)} are not 0..n-1.")
    return len(indices)


def kind_of(flat: dict[str, Any]) -> str:
    """ "mae" (encoder + decoders), "classifier" (encoder + head) or "encoder": an
    encoder alone, or with parts that stay in mimjax (a segmenter's dense decoder and
    head), which exports and inference leave out."""
    if not any(name.startswith("encoder/") for name in flat):
        raise ValueError(
            "These parameters have no 'encoder' subtree; expected a mimjax model "
            f"(MAE / MIRAM or ViT classifier), got top-level keys "
            f"{sorted({n.split('/')[0] for n in flat})}.")
    if any(name.startswith("decoders/") for name in flat):
        return "mae"
    if any(name.startswith("head/") for name in flat):
        return "classifier"
    return "encoder"
