"""`BestOfValHook`: what the dense-prediction tasks' hooks share: a val metric picks the
best checkpoint (parameters and model state, kept in WORKDIR/best/ apart from the
resume checkpoints), and the end of the run scores that checkpoint on the test split
into WORKDIR/test_metrics.json, once (a finished run entered again keeps its file).

A subclass sets `select_by` (the aggregate metric key) and `higher_is_better`, calls
`consider` after each val eval and `best_params` in its `finish`.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from mimjax import sharding
from mimjax.evaluators.hooks import EvalHook, HookContext, uses_ema


class BestOfValHook(EvalHook):
    select_by: str
    higher_is_better: bool = True

    def __init__(self, ctx: HookContext):
        from mimjax import checkpoint  # orbax import kept off the metric paths

        config = ctx.config
        super().__init__(config.get("eval_every", 0), use_ema=uses_ema(config))
        self.config, self.spec, self.mesh, self.writer = config, ctx.spec, ctx.mesh, ctx.writer
        self.workdir = ctx.workdir
        self.figures = os.path.join(ctx.workdir, "figures")
        self.params_target = ctx.params_target
        self.best = checkpoint.BestCheckpointer(os.path.join(ctx.workdir, "best"))
        self.best_metrics = self.best.best_metrics()

    @property
    def test_path(self) -> str:
        return os.path.join(self.workdir, "test_metrics.json")

    def consider(self, step: int, state, logged: dict, score: float) -> None:
        """Keeps the evaluated parameters as the new best when `score` beats the best."""
        sign = 1.0 if self.higher_is_better else -1.0
        best = (self.best_metrics or {}).get(self.select_by, -sign * math.inf)
        if math.isfinite(score) and sign * score > sign * best:
            self.best_metrics = dict(logged, step=step, **{self.select_by: float(score)})
            self.best.save(step, {"params": self.eval_params(state),
                                  "model_state": state.model_state}, self.best_metrics)

    def test_done(self, trained: bool) -> bool:
        """True when a finished run is entered again and its test metrics exist."""
        return not trained and os.path.exists(self.test_path)

    def best_params(self, state):
        """(params, model_state, step) of the best checkpoint, on the run's shardings;
        the current ones when no val eval saved any."""
        step = self.best.best_step()
        if step is None:
            return self.eval_params(state), state.model_state, int(sharding.to_host(state.step))
        target = {"params": self.params_target,
                  "model_state": jax.tree.map(
                      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state.model_state)}
        restored = self.best.restore_params(target)
        return restored["params"], restored["model_state"], step

    def write_test(self, result: dict) -> None:
        if jax.process_index() == 0:
            with open(self.test_path, "w") as f:
                json.dump(json_safe(result), f, indent=1)

    def close(self) -> None:
        self.best.close()


def json_safe(value):
    """NaN and infinities as strings (JSON has none); numpy scalars as Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
