"""Optimizer and learning-rate schedule from the `optimizer` config section.

MAE recipe (He et al. 2022, Table 8): AdamW (0.9, 0.95), weight decay 0.05 on
matrices only (not on biases, norms, position embeddings or tokens), linear warmup
then cosine decay, lr = base_lr * global_batch / 256, optional global-norm clipping.

Fine-tuning (BEiT / MAE fine-tuning recipe), both off by default:
- `layer_decay` (e.g. 0.65 for ViT-B, 0.75 for ViT-L): encoder block i (of depth L)
  learns at lr * layer_decay**(L - i), the embeddings (patch embedding, position
  embedding, class token) at lr * layer_decay**(L + 1), everything after the blocks
  (final norm, head) at lr;
- `head_lr_mult`: the head (top-level `head/` parameters) learns at lr * head_lr_mult.
Both scale the optimizer's whole update (weight decay included), as MAE's per-group
`lr_scale` does. Stacked (`scan=True`) blocks get one scale per layer slice.

`frozen` (e.g. ("teachers",)) names top-level parameter parts that are never updated
and get no optimizer state (a distiller's teacher encoders).

`proximal_mu` > 0 (off by default; FedProx's client loss, Li et al. 2020, or L2-SP)
adds the exact gradient of (mu / 2) * ||w - w_anchor||^2 over the top-level parts in
`proximal_parts` (default ("encoder",)) to the raw gradient, before clipping and
AdamW: what adding the term to the loss does. The anchor lives in the optimizer state
(`ProximalState`): the parameters at initialisation, reset by `set_anchor` whenever
parameters are set from outside (`mimjax.train.Run.set_params`, e.g. the global model
at the start of a federated round).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimjax.sharding import path_to_str

# Parameters excluded from weight decay, by the last components of their path.
NO_DECAY_PATTERN = r"(^|.*/)(bias|scale|pos_embedding|cls_token|mask_token|probe)$"


def decay_mask(params):
    """True where weight decay applies."""
    def keep(path, leaf):
        return leaf.ndim >= 2 and not re.match(NO_DECAY_PATTERN, path_to_str(path))
    return jax.tree_util.tree_map_with_path(keep, params)


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
    return opt_cfg.base_lr * global_batch_size / 256


def make_schedule(opt_cfg, *, global_batch_size: int, total_steps: int, warmup_steps: int):
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps); "
            "lower warmup_steps/warmup_epochs or train longer.")
    peak = peak_learning_rate(opt_cfg, global_batch_size)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=opt_cfg.get("min_lr", 0.0))


def make_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
    """Proximal term (optional) -> clipping (optional) -> AdamW -> layer-wise / head
    lr scaling (optional), all but the `frozen` parts."""
    parts = []
    proximal_mu = float(opt_cfg.get("proximal_mu", 0.0) or 0.0)
    if proximal_mu:  # added only when on: with mu = 0 the state stays as it was
        proximal_parts = opt_cfg.get("proximal_parts", None)
        parts.append(proximal(proximal_mu,
                              ("encoder",) if proximal_parts is None else proximal_parts))
    if opt_cfg.get("grad_clip_norm", None):
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95),
        eps=opt_cfg.get("eps", 1e-8), weight_decay=opt_cfg.get("weight_decay", 0.05),
        mask=decay_mask))
    layer_decay = opt_cfg.get("layer_decay", None)
    head_lr_mult = opt_cfg.get("head_lr_mult", None)
    head_lr_mult = 1.0 if head_lr_mult is None else float(head_lr_mult)
    # Added only when it changes something: the optimizer state stays as it was otherwise.
    if (layer_decay is not None and layer_decay != 1.0) or head_lr_mult != 1.0:
        parts.append(scale_by_layerwise_lr(layer_decay, head_lr_mult=head_lr_mult))
    return freeze(optax.chain(*parts), opt_cfg.get("frozen", None) or ())


def freeze(tx: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
    """`tx` for every parameter except the top-level parts named in `frozen` (e.g.
    ("teachers",): a distiller's teacher encoders), whose updates are zero and which
    get no optimizer state. Without `frozen`, `tx` itself (its state unchanged)."""
    frozen = tuple(frozen)
    if not frozen:
        return tx

    def labels(params):
        missing = sorted(set(frozen) - set(params))
        if missing:
            raise ValueError(f"optimizer.frozen names {missing}, which the model does not "
                             f"have; its parameters are {sorted(params)}.")
        return {name: jax.tree.map(lambda _, f=name in frozen: "frozen" if f else "train",
                                   subtree) for name, subtree in params.items()}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------- layer-wise lr decay
_EMBEDDING = re.compile(r"^encoder/(patch_embed|pos_embedding|cls_token)(/|$)")
_BLOCK = re.compile(r"^encoder/transformer/blocks/(?:(\d+)(?:/|$))?")
_HEAD = re.compile(r"^head(/|$)")


def encoder_depth(params) -> int:
    """Number of encoder blocks, unrolled (`blocks/i/...`) or stacked (leading axis)."""
    depth = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        match = _BLOCK.match(path_to_str(path))
        if match:
            index = match.group(1)
            depth = max(depth, int(index) + 1 if index is not None else leaf.shape[0])
    return depth


def layer_ids(params):
    """Per-parameter layer id (BEiT's convention), and the number of layers L + 1.

    0: patch embedding, position embedding, class token; i + 1: encoder block i;
    L + 1: everything else (the encoder's final norm, the head). For stacked blocks the
    id is an int array with one entry per layer slice.
    """
    depth = encoder_depth(params)
    if depth == 0:
        raise ValueError(
            "Layer-wise lr decay needs the encoder's blocks at 'encoder/transformer/blocks/...'; "
            "none were found in the parameters. Set optimizer.layer_decay=None for this model.")
    num_layers = depth + 1

    def layer_id(path, leaf):
        name = path_to_str(path)
        if _EMBEDDING.match(name):
            return 0
        match = _BLOCK.match(name)
        if match is None:
            return num_layers
        if match.group(1) is not None:
            return int(match.group(1)) + 1
        return np.arange(1, leaf.shape[0] + 1)

    return jax.tree_util.tree_map_with_path(layer_id, params), num_layers


def layerwise_lr_scales(params, layer_decay: float | None, head_lr_mult: float = 1.0):
    """Per-parameter lr multipliers: layer_decay ** (L + 1 - layer_id), times
    `head_lr_mult` for the head. Stacked blocks get an array shaped to broadcast
    along their leading layer axis. `layer_decay=None` scales the head only."""
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay must be in (0, 1] (e.g. 0.75), got {layer_decay}.")
    if layer_decay is None:
        ids, num_layers = jax.tree.map(lambda _: 0, params), 0
        layer_decay = 1.0
    else:
        ids, num_layers = layer_ids(params)

    def scale(path, layer_id, leaf):
        value = np.power(np.float64(layer_decay), num_layers - np.asarray(layer_id))
        if _HEAD.match(path_to_str(path)):
            value = value * head_lr_mult
        if value.ndim:  # one scale per stacked layer, broadcast over the rest
            return value.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return float(value)

    return jax.tree_util.tree_map_with_path(scale, ids, params)


def scale_by_layerwise_lr(layer_decay: float | None,
                          head_lr_mult: float = 1.0) -> optax.GradientTransformation:
    """Multiplies each update by its `layerwise_lr_scales` entry. Place it after the
    optimizer (and its weight decay) so the whole update, decay included, is scaled.
    Stateless: the scales depend only on the parameter paths and shapes."""
    if head_lr_mult <= 0:
        raise ValueError(f"optimizer.head_lr_mult must be positive, got {head_lr_mult}.")

    def init(params):
        layerwise_lr_scales(params, layer_decay, head_lr_mult)  # fail early on bad trees
        return optax.EmptyState()

    def update(updates, state, params=None):
        scales = layerwise_lr_scales(updates, layer_decay, head_lr_mult)
        scaled = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return scaled, state

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------- proximal term
class ProximalState(NamedTuple):
    """The anchor w_anchor of the proximal term: {part: parameters} for the parts the
    term covers (inside `freeze`, frozen leaves are optax `MaskedNode`s)."""
    anchor: Any


def proximal(mu: float, parts=("encoder",)) -> optax.GradientTransformation:
    """Adds mu * (w - w_anchor) to the updates of the top-level parameter parts named
    in `parts` (other parts untouched): the exact gradient of (mu / 2) *
    ||w - w_anchor||^2, FedProx's proximal term (Li et al., MLSys 2020) or L2-SP's.
    Place it first, on the raw gradient, so that clipping and the optimizer see the
    gradient of the loss plus the term. `init` copies the parameters as the anchor;
    `update` never changes it (`set_anchor` does)."""
    if isinstance(parts, str) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("optimizer.proximal_parts must be a non-empty tuple of top-level "
                         f"parameter names such as ('encoder',), got {parts!r}.")
    mu, parts = float(mu), tuple(parts)
    if not (mu >= 0 and np.isfinite(mu)):
        raise ValueError(f"optimizer.proximal_mu must be >= 0 (0 = off), got {mu}.")

    def check(params):
        if not isinstance(params, dict):
            raise ValueError("the proximal term needs the parameters as a dict of top-level "
                             f"parts, got {type(params).__name__}.")
        missing = sorted(set(parts) - set(params))
        if missing:
            raise ValueError(f"optimizer.proximal_parts names {missing}, which the model does "
                             f"not have; its parameters are {sorted(params)}.")

    def init(params):
        check(params)
        return ProximalState(anchor={name: jax.tree.map(jnp.copy, params[name])
                                     for name in parts})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the proximal term needs the parameters: call "
                             "tx.update(grads, opt_state, params).")
        out = dict(updates)
        for name in parts:
            out[name] = jax.tree.map(
                lambda g, w, a: g + (mu * (w - a)).astype(g.dtype),
                updates[name], params[name], state.anchor[name])
        return out, state

    return optax.GradientTransformation(init, update)


def _is_proximal(node) -> bool:
    return isinstance(node, ProximalState)


def get_anchor(opt_state):
    """The anchor of the first `ProximalState` in `opt_state` (any nesting of optax
    states), or None where the optimizer has no proximal term."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_proximal) if _is_proximal(s)]
    return found[0].anchor if found else None


def set_anchor(opt_state, params):
    """`opt_state` with each `ProximalState`'s anchor set to the matching entries of
    `params` (a nested dict: all of the model's parameters or some of them; anchor
    entries it does not name stay). New anchor arrays take the dtype and sharding of
    the ones they replace, in buffers of their own (never aliasing `params`, which a
    donating train step consumes). Without a proximal term, `opt_state` itself."""
    if get_anchor(opt_state) is None:
        return opt_state
    given = {path_to_str(path): value
             for path, value in jax.tree_util.tree_leaves_with_path(params)}

    def place(path, old):
        new = given.get(path_to_str(path))
        if new is None:
            return old
        if tuple(np.shape(new)) != tuple(np.shape(old)):
            raise ValueError(f"anchor {path_to_str(path)}: given shape {np.shape(new)}, the "
                             f"optimizer state's is {np.shape(old)}.")
        if isinstance(old, jax.Array):
            if isinstance(new, jax.Array):
                new = new.astype(old.dtype)
            else:
                new = np.asarray(new, dtype=old.dtype)
            return jax.device_put(new, old.sharding, may_alias=False)
        return jnp.array(new, dtype=old.dtype)

    def reset(node):
        if not _is_proximal(node):
            return node
        return node._replace(anchor=jax.tree_util.tree_map_with_path(place, node.anchor))

    return jax.tree.map(reset, opt_state, is_leaf=_is_proximal)
