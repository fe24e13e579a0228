"""Evaluation hook of the classification fine-tuning path of the trainer.

`ClassifierEvaluator` builds a split's padded eval batches once
(`input_pipeline.finetune.make_eval_batches`), runs the classifier over them with a
jitted, deterministic forward pass (no rng: no drop path), gathers the logits and
computes the whole-split metrics (`evaluators.classification`), and can draw the
confusion matrix. Every process computes (parameters may be sharded across hosts);
the host-side metrics are the same on each, process 0 writes the figures.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

from mimjax import sharding
from mimjax.evaluators import classification
from mimjax.evaluators.hooks import EvalHook, HookContext, eval_batch_size, uses_ema

log = logging.getLogger(__name__)


class ClassifierEvaluator:
    def __init__(self, config, spec, mesh, split: str):
        from input_pipeline import finetune  # grain import kept off the model/test paths

        objective = config.objectives.classification
        self.split = split
        self.label_key = objective.label_key
        self.multilabel = bool(objective.get("multilabel", False))
        self.class_names = tuple(config.finetune.class_names)
        batch_size = eval_batch_size(config, mesh)
        self.batches = finetune.make_eval_batches(
            config.data,
            split,
            image_size=config.model.image_size,
            batch_size=batch_size,
            label_keys=(self.label_key.removeprefix("label_"),),
        )
        self._mesh = mesh
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._forward = jax.jit(
            lambda params, images: spec.bind(params)(images),
            out_shardings=sharding.replicated(mesh),
        )

    def _global(self, images: np.ndarray) -> jax.Array:
        # Every process holds the whole eval batch: build the global array from it.
        return jax.make_array_from_callback(
            images.shape, self._batch_sharding, lambda index: images[index]
        )

    def evaluate(self, params) -> dict:
        """All metrics of the split (`classification.classification_metrics`)."""
        accumulator = classification.MetricAccumulator(
            multilabel=self.multilabel, class_names=self.class_names, from_logits=True
        )  # softmax for single-label; sigmoid for the accuracies
        with jax.set_mesh(self._mesh):
            for batch in self.batches:
                logits = sharding.to_host(self._forward(params, self._global(batch["image"])))
                accumulator.add(batch[self.label_key], logits, batch["valid"])
        return accumulator.compute()

    def confusion_figure(self, metrics: dict, path: str, title: str) -> str | None:
        if jax.process_index() != 0:
            return None
        matrix = metrics.get("multilabel_confusion_matrix", metrics.get("confusion_matrix"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return classification.confusion_matrix_figure(matrix, self.class_names, path, title)


class ClassificationHooks(EvalHook):
    """Val evals, the best checkpoint and the test eval of the "classification" task.

    `after_step`: every `config.eval_every` steps and at the last step, evaluates on
    "val", logs the scalar metrics as "val/NAME" into metrics.jsonl, draws
    figures/confusion_val_STEP.png, and keeps the parameters with the best val macro
    ROC-AUC (`classification.is_better`) in WORKDIR/best/. `finish`: evaluates that
    best checkpoint (the current parameters if no eval ever ran) on "test" and writes
    WORKDIR/test_metrics.json and figures/confusion_test.png.
    Parameters are the EMA's when `config.eval_use_ema` (and EMA is on).
    """

    SELECT_BY = "auc_macro"

    def __init__(self, ctx: HookContext):
        from mimjax import checkpoint  # orbax import kept off the metric paths

        config = ctx.config
        super().__init__(config.get("eval_every", 0), use_ema=uses_ema(config))
        self.config, self.spec, self.mesh, self.writer = config, ctx.spec, ctx.mesh, ctx.writer
        self.workdir = ctx.workdir
        self.params_target = ctx.params_target
        self.figures = os.path.join(ctx.workdir, "figures")
        self.val = ClassifierEvaluator(config, ctx.spec, ctx.mesh, "val")
        self.best = checkpoint.BestCheckpointer(os.path.join(ctx.workdir, "best"))
        self.best_metrics = self.best.best_metrics()

    def after_step(self, step: int, state) -> dict[str, float]:
        """Runs the val eval; returns its scalars ("val/NAME")."""
        params = self.eval_params(state)
        metrics = self.val.evaluate(params)
        scalars = classification.scalar_metrics(metrics)
        # Undefined per-class entries (NaN: a class absent from val) stay out of the log.
        logged = {f"val/{k}": v for k, v in scalars.items() if math.isfinite(v)}
        self.writer.write(step, logged)
        log.info(
            "step %d | val (%d images): accuracy %.4f | AUC macro %.4f | AP macro %.4f",
            step,
            metrics["num_examples"],
            metrics["accuracy"],
            metrics["auc_macro"],
            metrics["ap_macro"],
        )
        self.val.confusion_figure(
            metrics, os.path.join(self.figures, f"confusion_val_{step}.png"), f"val, step {step}"
        )
        if classification.is_better(metrics, self.best_metrics, self.SELECT_BY):
            self.best_metrics = classification.json_safe(dict(scalars, step=step))
            self.best.save(step, params, self.best_metrics)
        return logged

    def finish(self, state, *, trained: bool) -> dict | None:
        """Test metrics of the best checkpoint; skipped when a finished run is re-run."""
        path = os.path.join(self.workdir, "test_metrics.json")
        if not trained and os.path.exists(path):
            return None
        best_step = self.best.best_step()
        if best_step is None:
            params, best_step = self.eval_params(state), int(state.step)
        else:
            params = self.best.restore_params(self.params_target)
        metrics = ClassifierEvaluator(self.config, self.spec, self.mesh, "test").evaluate(params)
        metrics = dict(metrics, checkpoint_step=best_step)
        log.info(
            "test (%d images, best val step %d): accuracy %.4f | AUC macro %.4f",
            metrics["num_examples"],
            best_step,
            metrics["accuracy"],
            metrics["auc_macro"],
        )
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(classification.json_safe(metrics), f, indent=1, allow_nan=False)
            self.val.confusion_figure(
                metrics,
                os.path.join(self.figures, "confusion_test.png"),
                f"test, best val step {best_step}",
            )
        return metrics

    def close(self) -> None:
        self.best.close()
