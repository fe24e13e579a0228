"""Objective registry. An objective is `loss_fn(model, batch, rng, **kwargs) -> (loss, metrics)`.

`config.objectives` maps objective names to their settings: `weight` plus keyword
arguments of that objective, e.g.
    objectives = {"masked_reconstruction": {"weight": 1.0, "mask_ratio": 0.75}}
"""

from __future__ import annotations

import functools

import jax

from mimjax.objectives import (
    classification,
    feature_distillation,
    landmark_heatmap,
    masked_reconstruction,
    mcr,
    subclass_segmentation,
)

OBJECTIVES = {
    "masked_reconstruction": masked_reconstruction.loss_fn,
    "classification": classification.loss_fn,
    "mcr": mcr.loss_fn,
    "subclass_segmentation": subclass_segmentation.loss_fn,
    "landmark_heatmap": landmark_heatmap.loss_fn,
    "feature_distillation": feature_distillation.loss_fn,
}


def build_loss_fn(objectives_cfg):
    """Weighted sum of the configured objectives, one pure function."""
    if not objectives_cfg:
        raise ValueError("config.objectives is empty; name at least one of "
                         f"{sorted(OBJECTIVES)}.")
    terms = []
    for name, settings in objectives_cfg.items():
        if name not in OBJECTIVES:
            raise ValueError(f"Unknown objective {name!r}; known: {sorted(OBJECTIVES)}.")
        kwargs = dict(settings)
        weight = float(kwargs.pop("weight", 1.0))
        terms.append((name, weight, functools.partial(OBJECTIVES[name], **kwargs)))

    def loss_fn(model, batch, rng):
        total, metrics = 0.0, {}
        for i, (name, weight, fn) in enumerate(terms):
            loss, term_metrics = fn(model, batch, jax.random.fold_in(rng, i))
            if len(terms) > 1:
                metrics[f"{name}_loss"] = loss
            metrics.update(term_metrics)
            total = total + weight * loss
        return total, metrics

    return loss_fn
