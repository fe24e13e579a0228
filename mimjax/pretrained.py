"""Initialising a model's encoder from a mimjax pretraining checkpoint.

Two steps, usable separately:
1. `load_pretrained_params(path, step=None)` reads only the parameters (`params`, or
   `ema_params`) of the "state" item a `mimjax.checkpoint.Checkpointer` wrote: no
   optimizer structure, mesh or model config is needed, and the arrays come back on
   the host as numpy arrays.
2. `apply_pretrained(target_params, pretrained)` copies the checkpoint's encoder onto
   the target model's freshly initialised parameters (both pure dicts with an
   `encoder` subtree, e.g. `ViTClassifier` and `MaskedAutoencoder`), adapting what
   legitimately differs between pretraining and fine-tuning:
   - a learned position embedding is resampled (bicubic, over the patch grid) when
     the image size differs; fixed sin-cos tables are not parameters (each model
     builds its own for its size); a learned table that the checkpoint lacks
     (sin-cos pretraining) starts from the sin-cos table the encoder was trained with;
   - the patch embedding is adapted between 1 and C input channels: 1 -> C repeats
     the kernel over channels / C (a gray image replicated to RGB, or to BraTS' four
     sequences, gives the pretrained features), C -> 1 sums over channels;
   - stacked (`scan=True`) and unrolled blocks convert into each other.
   Everything else must match in shape: a mismatch raises ValueError naming the
   parameter, both shapes and the likely cause. Parameters the checkpoint lacks stay
   as initialised (`report.missing`, e.g. the head); checkpoint parameters the target
   does not use are dropped (`report.unexpected`, e.g. the decoders, mask tokens).

`init_from_checkpoint` does both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mimjax.models import param_tree, vit
from mimjax.sharding import path_to_str

log = logging.getLogger(__name__)

STATE_ITEM = "state"  # mimjax.checkpoint.Checkpointer.STATE


@dataclasses.dataclass
class TransferReport:
    """What `apply_pretrained` did, by parameter path ("encoder/norm/scale")."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # kept as initialised
    unexpected: list[str] = dataclasses.field(default_factory=list)  # in checkpoint, unused
    adapted: list[str] = dataclasses.field(default_factory=list)  # "path: what was done"
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # load info, if any

    def summary(self, max_names: int = 12) -> str:
        def names(items):
            shown = ", ".join(items[:max_names])
            return shown + (
                f", ... ({len(items) - max_names} more)" if len(items) > max_names else ""
            )

        lines = [
            f"loaded {len(self.loaded)} parameters"
            + (
                f" from {self.source['checkpoint_dir']} step {self.source['step']}"
                if self.source
                else ""
            )
        ]
        if self.adapted:
            lines.append("adapted: " + "; ".join(self.adapted))
        if self.missing:
            lines.append(
                f"missing (kept as initialised) {len(self.missing)}: {names(self.missing)}"
            )
        if self.unexpected:
            lines.append(f"unexpected (dropped) {len(self.unexpected)}: {names(self.unexpected)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def find_checkpoint_dir(path: str) -> str:
    """A pretraining workdir (holding `checkpoints/`) or its checkpoints directory."""
    path = os.path.abspath(os.fspath(path))
    candidate = os.path.join(path, "checkpoints")
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
        return path
    raise FileNotFoundError(
        f"No mimjax checkpoints in {path}: expected a pretraining workdir containing "
        "checkpoints/<step>/state, or that checkpoints directory itself."
    )


def load_pretrained_params(
    path: str, step: int | None = None, *, use_ema: bool = False
) -> tuple[dict, dict]:
    """Restores only the model parameters of a mimjax checkpoint, as numpy arrays.

    path: pretraining workdir or its `checkpoints` directory; step: None = latest.
    use_ema: take the EMA parameters (the run must have had `ema_decay` > 0).
    Returns (params pure dict, info {"checkpoint_dir", "step", "subtree"}).
    """
    directory = find_checkpoint_dir(path)
    steps = sorted(ocp.step.checkpoint_steps(directory))  # finished saves only
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"No checkpoint for step {step} in {directory}; available: {steps}.")
    item_dir = os.path.join(directory, str(step), STATE_ITEM)
    if not os.path.isdir(item_dir):
        raise FileNotFoundError(f"{item_dir} does not exist: not a mimjax checkpoint step.")

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item_dir).item_metadata.tree
    subtree = "ema_params" if use_ema else "params"
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(
            f"{item_dir} is not a mimjax train state (no 'params' entry); "
            f"found {sorted(tree) if isinstance(tree, dict) else type(tree)}."
        )
    if not tree.get(subtree):
        raise ValueError(
            f"{item_dir} has no {subtree!r} (the run had ema_decay = 0); load with use_ema=False."
        )
    # A partial restore of just this subtree: the optimizer state is never read.
    target = {
        subtree: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[subtree])
    }
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    info = {"checkpoint_dir": directory, "step": int(step), "subtree": subtree}
    return restored[subtree], info


def load_encoder_params(
    path: str, step: int | None = None, *, use_ema: bool = False
) -> tuple[dict, dict]:
    """Like `load_pretrained_params`, but returns only the `encoder` subtree; the
    other parameters' paths (decoders, ...) are listed in info["dropped"]."""
    params, info = load_pretrained_params(path, step, use_ema=use_ema)
    if "encoder" not in params:
        raise ValueError(
            f"The checkpoint in {info['checkpoint_dir']} has no 'encoder' "
            f"parameters (top level: {sorted(params)})."
        )
    info["dropped"] = sorted(
        name for name in param_tree.flatten_leaves(params) if not name.startswith("encoder/"))
    return params["encoder"], info


# --------------------------------------------------------------------------- transfer
def resample_posemb(table: np.ndarray, num_tokens: int, method: str = "bicubic") -> np.ndarray:
    """(1, [P +] g*g, D) -> (1, [P +] G*G, D): the grid part is resized (half-pixel
    centres, as torch's align_corners=False); P leading non-grid entries (a class-token
    position, 0 or 1 of them) are kept as they are."""
    table = np.asarray(table)
    src_tokens, width = table.shape[1], table.shape[2]
    for prefix in (0, 1):
        src_grid, dst_grid = math.isqrt(src_tokens - prefix), math.isqrt(num_tokens - prefix)
        if src_grid**2 == src_tokens - prefix and dst_grid**2 == num_tokens - prefix:
            break
    else:
        raise ValueError(
            f"Cannot resample a position embedding of {src_tokens} tokens to "
            f"{num_tokens}: neither is a square patch grid (plus a class token)."
        )
    grid = table[0, prefix:].reshape(src_grid, src_grid, width).astype(np.float32)
    resized = jax.image.resize(grid, (dst_grid, dst_grid, width), method=method)
    resized = np.asarray(resized).reshape(1, dst_grid**2, width)
    return np.concatenate([table[:, :prefix].astype(np.float32), resized], axis=1)


# Rows alone cannot tell a channel change from a patch-size change (8x8x1 has as many
# rows as 4x4x4). The model's own channel count settles it: a C-channel model takes a
# one-channel kernel with rows / C; a one-channel model takes an RGB kernel (3x rows).
# Without the count only RGB <-> gray is assumed, as before.
def patch_kernel_channels(
    source_rows: int, target_rows: int, target_channels: int | None = None
) -> tuple[int, int]:
    """(source, target) channels of a 1 <-> C patch-kernel change (rows are p*p*C);
    raises ValueError for anything else, e.g. a different patch size."""
    if target_channels is not None and target_channels > 1:
        if source_rows * target_channels == target_rows:
            return 1, target_channels
    elif target_channels is None and target_rows == 3 * source_rows:
        return 1, 3
    elif source_rows == 3 * target_rows:
        return 3, 1
    raise ValueError("not a 1 <-> C channel change")


def adapt_patch_kernel(
    kernel: np.ndarray, target_rows: int, target_channels: int | None = None
) -> np.ndarray:
    """(p*p*C_src, D) -> (p*p*C_dst, D) between 1 and C channels; rows are patchify's
    (row, col, channel) order. 1 -> C repeats / C (a gray image replicated to C
    channels gives the pretrained features; e.g. RGB or BraTS' four sequences),
    C -> 1 sums over channels."""
    kernel = np.asarray(kernel)
    rows, width = kernel.shape
    source, target = patch_kernel_channels(rows, target_rows, target_channels)
    if source == 1:
        return np.repeat(kernel[:, None, :], target, axis=1).reshape(target_rows, width) / target
    return kernel.reshape(target_rows, source, width).sum(axis=1)


def _mismatch(name: str, source_shape, target_shape, why: str) -> ValueError:
    return ValueError(
        f"Pretrained parameter {name!r} does not fit the model: checkpoint shape "
        f"{tuple(source_shape)} vs model shape {tuple(target_shape)}: {why}."
    )


def _why(src: dict[str, Any], tgt: dict[str, Any], name: str) -> str:
    """The likeliest configuration difference behind a shape mismatch."""
    width = lambda flat: np.shape(flat["norm/scale"])[-1] if "norm/scale" in flat else None
    if width(src) != width(tgt):
        return (
            f"encoder width {width(src)} vs {width(tgt)}: a different model variant; set "
            "model.variant (and width/depth/num_heads/mlp_dim) to the checkpoint's"
        )
    if "mlp/" in name:
        return "different MLP size: set model.mlp_dim to the checkpoint's"
    if name == "patch_embed/kernel":
        return (
            "different patch size (and/or a channel change other than 1 <-> C): set "
            "model.variant's patch size to the checkpoint's"
        )
    return "the checkpoint was made with a different model configuration"


def _adapt_encoder(
    src: dict[str, Any], tgt: dict[str, Any], report: TransferReport,
    target_channels: int | None,
):
    """Returns {encoder path: new value}; records into `report` (paths prefixed)."""
    out: dict[str, Any] = {}
    src_layout, tgt_layout = param_tree.block_layout(src), param_tree.block_layout(tgt)
    src_depth, tgt_depth = param_tree.block_count(src), param_tree.block_count(tgt)
    if src_depth != tgt_depth:
        raise ValueError(
            f"Pretrained encoder has {src_depth} blocks, the model {tgt_depth} "
            "(encoder/transformer/blocks): a different model variant; set model.variant / "
            "model.depth to the checkpoint's."
        )
    if src_layout and tgt_layout and src_layout != tgt_layout:
        src = param_tree.convert_blocks(src, tgt_layout)
        report.adapted.append(
            f"encoder/{param_tree.BLOCKS[:-1]}: {src_layout} -> {tgt_layout} layers")

    for name, target in tgt.items():
        full = f"encoder/{name}"
        tshape = np.shape(target)
        if name not in src:
            if name == "pos_embedding" and tshape[-1] % 4 == 0:
                grid = math.isqrt(tshape[1])
                table = vit.sincos_posemb_2d(tshape[-1], grid)[None]
                out[name] = table.astype(target.dtype)
                report.adapted.append(
                    f"{full}: initialised from the fixed sin-cos table "
                    "(the checkpoint's encoder used it)"
                )
            else:
                report.missing.append(full)
            continue
        value = np.asarray(src[name])
        sshape = value.shape
        if sshape != tshape:
            if name == "pos_embedding" and sshape[-1] == tshape[-1]:
                value = resample_posemb(value, tshape[1])
                report.adapted.append(
                    f"{full}: resampled {sshape[1]} -> {tshape[1]} tokens "
                    "(bicubic over the patch grid)"
                )
            elif name == "patch_embed/kernel" and sshape[-1] == tshape[-1]:
                try:
                    value = adapt_patch_kernel(value, tshape[0], target_channels)
                except ValueError:
                    raise _mismatch(full, sshape, tshape, _why(src, tgt, name)) from None
                channels = patch_kernel_channels(sshape[0], tshape[0], target_channels)
                report.adapted.append(f"{full}: {channels[0]} -> {channels[1]} input channels")
            else:
                raise _mismatch(full, sshape, tshape, _why(src, tgt, name))
        out[name] = value.astype(target.dtype)
        report.loaded.append(full)
    report.unexpected.extend(f"encoder/{name}" for name in src if name not in tgt)
    return out


def apply_pretrained(
    target_params: dict, pretrained: dict, *, target_channels: int | None = None
) -> tuple[dict, TransferReport]:
    """Copies a pretrained encoder into `target_params` (see the module docstring).

    target_params: the model's initialised parameters (pure dict with an `encoder`
    subtree); pretrained: `load_pretrained_params`'s params (the whole pretraining
    model) or `load_encoder_params`'s encoder subtree. Returns (params with the target's
    structure and dtypes, report); copied entries are host numpy arrays. The target may
    be abstract (`jax.ShapeDtypeStruct` leaves, e.g. from `jax.eval_shape`): the checks
    need only shapes, and missing entries then stay abstract for the caller to fill.
    target_channels: the model's input channels, when known; it tells a channel change
    of the patch embedding from a patch-size mismatch (see `patch_kernel_channels`).
    """
    if "encoder" not in target_params:
        raise ValueError(
            "target parameters have no 'encoder' subtree; expected a mimjax "
            f"model's parameters, got top-level keys {sorted(target_params)}."
        )
    if "encoder" not in pretrained and "patch_embed" in pretrained:
        pretrained = {"encoder": pretrained}  # a bare encoder subtree
    if "encoder" not in pretrained:
        raise ValueError(
            "pretrained parameters have no 'encoder' subtree; got top-level keys "
            f"{sorted(pretrained)}."
        )
    report = TransferReport()
    encoder = _adapt_encoder(
        param_tree.flatten_leaves(pretrained["encoder"]),
        param_tree.flatten_leaves(target_params["encoder"]), report, target_channels
    )
    if not report.loaded:
        raise ValueError("No pretrained encoder parameter matched the model's by name.")
    report.unexpected.extend(
        name for name in param_tree.flatten_leaves(pretrained) if not name.startswith("encoder/")
    )
    report.missing.extend(
        name for name in param_tree.flatten_leaves(target_params) if not name.startswith("encoder/")
    )

    def pick(path, leaf):
        name = path_to_str(path)
        inner = name[len("encoder/") :] if name.startswith("encoder/") else None
        return encoder.get(inner, leaf)

    return jax.tree_util.tree_map_with_path(pick, target_params), report


def init_from_checkpoint(
    target_params: dict, path: str, step: int | None = None, *, use_ema: bool = False,
    target_channels: int | None = None,
) -> tuple[dict, TransferReport]:
    """`load_pretrained_params` then `apply_pretrained`; logs the report's summary."""
    pretrained, info = load_pretrained_params(path, step, use_ema=use_ema)
    params, report = apply_pretrained(
        target_params, pretrained, target_channels=target_channels)
    report.source = info
    log.info("Pretrained encoder: %s", report.summary())
    return params, report
