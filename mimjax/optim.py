"""Optimizer and learning-rate schedule from the `optimizer` config section.

MAE recipe (He et al. 2022, Table 8): AdamW (0.9, 0.95), weight decay 0.05 on
matrices only (not on biases, norms, position embeddings or tokens), linear warmup
then cosine decay, lr = base_lr * global_batch / 256, optional global-norm clipping.
"""

from __future__ import annotations

import re

import jax
import optax

from mimjax.sharding import path_to_str

# Parameters excluded from weight decay, by the last components of their path.
NO_DECAY_PATTERN = r"(^|.*/)(bias|scale|pos_embedding|cls_token|mask_token)$"


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
    parts = []
    if opt_cfg.get("grad_clip_norm", None):
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95),
        eps=opt_cfg.get("eps", 1e-8), weight_decay=opt_cfg.get("weight_decay", 0.05),
        mask=decay_mask))
    return optax.chain(*parts)
