"""Evaluation hook of the segmentation task: val Dice during training, the best
checkpoint kept apart, test metrics and overlay figures at the end.

`SegmentationEvaluator` runs the model (deterministic: no rng, batch norm on its
running statistics) over every slice of a split (input_pipeline.segmentation_eval),
takes the argmax of the coarse and fine logits, re-stacks the slices into 3-D
volumes (patient and phase) and scores each volume in millimetres
(`segmentation_metrics.volume_rows`: Dice, HD95, precision, recall per class and
their foreground mean), fine labels on the volumes that have fine masks and
coarse labels on every volume. Every process computes (parameters may be sharded
across hosts); the metrics are the same on each, process 0 writes files.

`SegmentationHooks` (the trainer's hook, `config.eval_every` and the last step):
logs "val/fine/dice/mean", "val/coarse/hd95/RV", ... to metrics.jsonl, draws
figures/segmentation_val_STEP.png, and keeps the parameters and batch statistics
with the best val mean fine Dice in WORKDIR/best/; `finish` scores that checkpoint
on the test split: WORKDIR/test_metrics.json (aggregate and per volume, so arms can
be compared with a paired bootstrap over the same test volumes) and
figures/segmentation_test.png.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np

from mimjax import sharding
from mimjax.evaluators import segmentation_metrics, segmentation_overlays
from mimjax.evaluators.best_hook import BestOfValHook
from mimjax.evaluators.hooks import HookContext, eval_batch_size

log = logging.getLogger(__name__)

SELECT_BY = "fine/dice/mean"  # higher is better


def class_names(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fine, coarse) class names: config.segmentation.{fine,coarse}_class_names."""
    section = config.segmentation
    return tuple(section.fine_class_names), tuple(section.coarse_class_names)


class SegmentationEvaluator:
    """Predictions and per-volume metrics of one split (see the module docstring)."""

    def __init__(self, config, spec, mesh, split: str):
        from input_pipeline import segmentation_eval  # grain import kept off the metric paths

        batch_size = eval_batch_size(config, mesh)
        self.split = split
        self.data = segmentation_eval.make_segmentation_eval(
            config.data, split, batch_size=batch_size, image_size=config.model.image_size)
        self.fine_names, self.coarse_names = class_names(config)
        names = config.segmentation.get("channel_names", None)
        self.channel_names = tuple(names) if names else None
        self._figure_volume = None
        self._mesh = mesh
        self._batch_sharding = sharding.batch_sharding(mesh)

        def predict(params, model_state, images):
            logits = spec.bind(params, model_state)(images)
            return (logits["fine_logits"].argmax(-1).astype(np.int32),
                    logits["coarse_logits"].argmax(-1).astype(np.int32))

        self._predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))

    def predictions(self, params, model_state) -> dict[str, np.ndarray]:
        """Every eval row, in row order: the predicted "fine" and "coarse" label maps
        and the batches' "label_fine", "label_coarse" and "has_fine"."""
        keys = ("fine", "coarse", "label_fine", "label_coarse", "has_fine")
        out = {k: [] for k in keys}
        with jax.set_mesh(self._mesh):
            for batch in self.data:
                images = np.asarray(batch["image"])
                images = jax.make_array_from_callback(images.shape, self._batch_sharding,
                                                      lambda index, x=images: x[index])
                fine, coarse = sharding.to_host(self._predict(params, model_state, images))
                valid = np.asarray(batch["valid"], bool)
                rows = {"fine": fine, "coarse": coarse, **{k: batch[k] for k in keys[2:]}}
                for k in keys:
                    out[k].append(np.asarray(rows[k])[valid])
        return {k: np.concatenate(v) for k, v in out.items()}

    def evaluate(self, params, model_state) -> tuple[dict, list[dict], list[dict], tuple]:
        """(aggregate metrics {"fine/dice/mean": ..., "coarse/...": ...}, fine rows per
        volume, coarse rows per volume, the predicted volumes (fine, coarse))."""
        rows = {k: self.data.stack(v) for k, v in self.predictions(params, model_state).items()}
        fine_items, coarse_items = [], []
        for v, volume in enumerate(self.data.volumes):
            coarse_items.append((volume.name, rows["coarse"][v], rows["label_coarse"][v],
                                 volume.spacing))
            if rows["has_fine"][v].all():  # fine metrics on volumes with fine masks only
                fine_items.append((volume.name, rows["fine"][v], rows["label_fine"][v],
                                   volume.spacing))
        fine_rows = segmentation_metrics.volume_rows(fine_items, self.fine_names)
        coarse_rows = segmentation_metrics.volume_rows(coarse_items, self.coarse_names)
        metrics = {f"coarse/{k}": v for k, v in segmentation_metrics.aggregate(coarse_rows).items()}
        if fine_rows:
            metrics.update({f"fine/{k}": v
                            for k, v in segmentation_metrics.aggregate(fine_rows).items()})
        return metrics, fine_rows, coarse_rows, (rows["fine"], rows["coarse"])

    def figure(self, volumes: tuple, path: str, title_step: int) -> str | None:
        """An overlay figure of the volume with the most foreground (process 0)."""
        if jax.process_index() != 0:
            return None
        if self._figure_volume is None:  # chosen once: the same volume at every eval
            sizes = [np.count_nonzero(self.data.volume_labels(v)[1])
                     for v in range(len(self.data.volumes))]
            self._figure_volume = int(np.argmax(sizes))
        v, volume = self._figure_volume, self.data.volumes[self._figure_volume]
        slices = [self.data.slice_arrays(p)
                  for p in range(volume.start, volume.start + volume.num_slices)]
        image = np.stack([s[0] for s in slices])
        truth_coarse = np.stack([s[2] for s in slices])
        fine = None
        if all(s[1] is not None for s in slices):
            fine = segmentation_overlays.LabelMaps(np.stack([s[1] for s in slices]),
                                                   volumes[0][v], self.fine_names)
        coarse = segmentation_overlays.LabelMaps(truth_coarse, volumes[1][v], self.coarse_names)
        return segmentation_overlays.overlay_figure(
            path, image, fine=fine, coarse=coarse, step=title_step,
            channel_names=self.channel_names, volume_id=f"{self.split}: {volume.name}")


def _log_summary(prefix: str, step, metrics: dict, fine_names) -> None:
    per_class = " ".join(f"{name} {metrics.get(f'fine/dice/{name}', math.nan):.3f}"
                         for name in fine_names[1:])
    log.info("%s | fine Dice mean %.4f (%s) | HD95 %.2f mm | coarse Dice %.4f", prefix,
             metrics.get("fine/dice/mean", math.nan), per_class,
             metrics.get("fine/hd95/mean", math.nan), metrics.get("coarse/dice/mean", math.nan))


class SegmentationHooks(BestOfValHook):
    """Val evals, the best checkpoint and the test eval (see the module docstring)."""

    select_by = SELECT_BY
    higher_is_better = True

    def __init__(self, ctx: HookContext):
        super().__init__(ctx)
        self.val = SegmentationEvaluator(ctx.config, ctx.spec, ctx.mesh, "val")

    def after_step(self, step: int, state) -> dict[str, float]:
        metrics, _, _, volumes = self.val.evaluate(self.eval_params(state), state.model_state)
        logged = {f"val/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        self.writer.write(step, logged)
        _log_summary(f"step {step} | val ({len(self.val.data.volumes)} volumes)", step, metrics,
                     self.val.fine_names)
        self.val.figure(volumes, os.path.join(self.figures, f"segmentation_val_{step}.png"), step)
        self.consider(step, state, logged, metrics.get(SELECT_BY, math.nan))
        return logged

    def finish(self, state, *, trained: bool) -> dict | None:
        """Test metrics of the best checkpoint; skipped when a finished run is re-run."""
        if self.test_done(trained):
            return None
        params, model_state, best_step = self.best_params(state)
        test = SegmentationEvaluator(self.config, self.spec, self.mesh, "test")
        metrics, fine_rows, coarse_rows, volumes = test.evaluate(params, model_state)
        _log_summary(f"test ({len(test.data.volumes)} volumes, best val step {best_step})",
                     best_step, metrics, test.fine_names)
        result = {"checkpoint_step": best_step, "metrics": metrics,
                  "fine_volumes": fine_rows, "coarse_volumes": coarse_rows}
        self.write_test(result)
        if jax.process_index() == 0:
            test.figure(volumes, os.path.join(self.figures, "segmentation_test.png"), best_step)
        return result
