"""Evaluation hook of the landmark task: val MRE during training, the best checkpoint
(lowest val MRE) kept apart, test metrics and figures at the end.

`LandmarkEvaluator` runs the model (deterministic) over every image of a split
(input_pipeline.landmarks.LandmarkEvalSet, each placed whole at S x S), reads each
landmark's point (`config.landmarks.decode`: a heatmap decoder of landmark_decoding, the
argmax refined to sub-pixel, or "softargmax", the DSNT expectation of the logits),
maps the points back to the original image through each image's geometry, and scores
them against the original-pixel truth in millimetres (landmark_metrics, the spacing of
`data.spacing`): MRE, SDR at `config.landmarks.thresholds`, per landmark and per image.
Every process computes (parameters may be sharded across hosts); process 0 writes.

`LandmarkHooks` (`config.eval_every` and the last step): logs "val/mre", "val/sdr/2",
... to metrics.jsonl, draws figures/landmarks_val_STEP.png, keeps the best val MRE's
parameters in WORKDIR/best/; `finish` scores them on the test split:
WORKDIR/test_metrics.json ({"checkpoint_step", "metrics", "images": one row per test
image, for paired bootstraps}) and figures/landmarks_test.png.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from mimjax import sharding
from mimjax.evaluators import landmark_decoding, landmark_figures, landmark_metrics
from mimjax.evaluators.best_hook import BestOfValHook
from mimjax.evaluators.hooks import HookContext, eval_batch_size
from mimjax.objectives import landmark_heatmap

log = logging.getLogger(__name__)

SELECT_BY = "mre"  # lower is better


# Read-outs: the heatmap decoders of landmark_decoding (argmax refined to sub-pixel, on
# the sigmoid heatmaps), or "softargmax": the DSNT expectation the coordinate term
# trains (landmark_heatmap.soft_argmax of the logits), computed on the devices.
DECODERS = (*landmark_decoding.METHODS, "softargmax")


def settings(config) -> dict:
    """config.landmarks: decode method, thresholds, figure images (checked)."""
    section = config.get("landmarks", None) or {}
    method = section.get("decode", "quadratic")
    if method not in DECODERS:
        raise ValueError(f"config.landmarks.decode must be one of {list(DECODERS)}, got "
                         f"{method!r}.")
    thresholds = tuple(float(t) for t in section.get(
        "thresholds", landmark_metrics.DEFAULT_THRESHOLDS))
    return {"decode": method, "thresholds": thresholds,
            "figure_images": int(section.get("figure_images", 4))}


def spacing_of(data, data_cfg):
    """The metrics' spacing for a LandmarkEvalSet, by data.spacing (the pipeline's
    module docstring): a landmark_metrics.Spacing, or None (pixels, with a warning)."""
    mode = data.spacing_mode
    if mode == "record":
        return landmark_metrics.Spacing(data.record_spacing, "mm")
    if mode == "hand_wrist":
        pair = tuple(int(v) for v in data_cfg.get("wrist_landmarks", (0, 4)))
        return landmark_metrics.hand_spacing_from_wrist(data.truth, landmarks=pair)
    if mode == "chest":
        return landmark_metrics.chest_spacing(data.original_shapes)
    return None


class LandmarkEvaluator:
    """Predictions and metrics of one split (see the module docstring)."""

    def __init__(self, config, spec, mesh, split: str):
        from input_pipeline import landmarks  # grain import kept off the metric paths

        batch_size = eval_batch_size(config, mesh)
        self.split, self.settings = split, settings(config)
        self.data = landmarks.LandmarkEvalSet(config.data, split, batch_size=batch_size,
                                              image_size=config.model.image_size)
        self.spacing = spacing_of(self.data, config.data)
        self._mesh = mesh
        self._batch_sharding = sharding.batch_sharding(mesh)

        beta = float(config.objectives.landmark_heatmap.get("softargmax_beta", 1.0))

        def predict(params, model_state, images):
            logits = spec.bind(params, model_state)(images)
            if self.settings["decode"] == "softargmax":
                return landmark_heatmap.soft_argmax(logits, beta=beta)
            return jax.nn.sigmoid(logits)

        self._predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))

    def predict_points(self, params, model_state) -> np.ndarray:
        """(N, L, 2) predicted points in original-image pixels, in split order."""
        points = []
        with jax.set_mesh(self._mesh):
            for batch in self.data:
                images = batch["image"]
                images = jax.make_array_from_callback(images.shape, self._batch_sharding,
                                                      lambda index, x=images: x[index])
                out = sharding.to_host(
                    self._predict(params, model_state, images))[batch["valid"]]
                if self.settings["decode"] != "softargmax":
                    out = landmark_decoding.decode(out, self.settings["decode"])
                points.append(np.asarray(out, np.float64))
        inputs = np.concatenate(points)
        return landmark_decoding.to_original(inputs, self.data.geometries())

    def evaluate(self, params, model_state):
        """(LandmarkMetrics, predicted original-pixel points (N, L, 2))."""
        pred = self.predict_points(params, model_state)
        metrics = landmark_metrics.landmark_metrics(
            pred, self.data.truth, self.spacing, image_ids=self.data.names,
            thresholds=self.settings["thresholds"])
        return metrics, pred

    def figure(self, pred: np.ndarray, errors: np.ndarray, path: str, step: int,
               unit: str) -> str | None:
        if jax.process_index() != 0:
            return None
        count = min(self.settings["figure_images"], len(self.data))
        if count < 1:
            return None
        # The same images every eval: evenly spread over the split.
        chosen = np.linspace(0, len(self.data) - 1, count).round().astype(int)
        geometries = self.data.geometries()
        panels = [landmark_figures.Panel(
            image=self.data.images[i].astype(np.float32),
            truth=landmark_decoding.to_model_input(self.data.truth[i], geometries[i]),
            pred=landmark_decoding.to_model_input(pred[i], geometries[i]),
            title=f"{self.data.names[i]}: MRE {errors[i].mean():.2f} {unit}") for i in chosen]
        return landmark_figures.landmark_figure(
            path, panels, legend=f"{self.split}, step {step}: ground truth (green), prediction "
                                 f"(red), error lines (yellow)")


def _log_summary(prefix: str, metrics: landmark_metrics.LandmarkMetrics) -> None:
    sdr = " ".join(f"{t:g}: {v:.3f}" for t, v in list(metrics.sdr.items())[:4])
    log.info("%s | MRE %.3f +- %.3f %s | SDR %s", prefix, metrics.mre, metrics.mre_std,
             metrics.unit, sdr)


class LandmarkHooks(BestOfValHook):
    """Val evals, the best checkpoint and the test eval (see the module docstring)."""

    select_by = SELECT_BY
    higher_is_better = False

    def __init__(self, ctx: HookContext):
        super().__init__(ctx)
        self.val = LandmarkEvaluator(ctx.config, ctx.spec, ctx.mesh, "val")

    def after_step(self, step: int, state) -> dict[str, float]:
        metrics, pred = self.val.evaluate(self.eval_params(state), state.model_state)
        summary = metrics.summary()
        logged = {f"val/{k}": float(v) for k, v in summary.items()
                  if isinstance(v, (int, float)) and not k.startswith("mre/landmark_")}
        self.writer.write(step, logged)
        _log_summary(f"step {step} | val ({len(self.val.data)} images)", metrics)
        self.val.figure(pred, metrics.errors,
                        os.path.join(self.figures, f"landmarks_val_{step}.png"), step,
                        metrics.unit)
        self.consider(step, state, logged, metrics.mre)
        return logged

    def finish(self, state, *, trained: bool) -> dict | None:
        """Test metrics of the best checkpoint; skipped when a finished run is re-run."""
        if self.test_done(trained):
            return None
        params, model_state, best_step = self.best_params(state)
        test = LandmarkEvaluator(self.config, self.spec, self.mesh, "test")
        metrics, pred = test.evaluate(params, model_state)
        _log_summary(f"test ({len(test.data)} images, best val step {best_step})", metrics)
        result = {"checkpoint_step": best_step, "metrics": metrics.summary(),
                  "images": metrics.rows()}
        self.write_test(result)
        test.figure(pred, metrics.errors, os.path.join(self.figures, "landmarks_test.png"),
                    best_step, metrics.unit)
        return result
