"""Task "segmentation": subclass segmentation from hierarchical labels (Dai, Lei,
Zhang, MICCAI 2023) — a few images with fine (subclass) masks, the rest with
superclass masks only — on the ViT encoder with a dense decoder (initialisable from
any pretraining) or the paper's 2-D U-Net; per-volume Dice / HD95 evals, the best
checkpoint kept apart, test metrics and overlay figures."""

from __future__ import annotations

import logging

from mimjax.evaluators import segmentation_eval
from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.models import segmenter
from mimjax.run_config import ConfigError
from mimjax.tasks.base import Task, TrainData

log = logging.getLogger(__name__)


class SegmentationTask(Task):
    name = "segmentation"
    model_names = ("segmenter",)
    required_objectives = ("subclass_segmentation",)
    example_config = "configs/segment_acdc.py"

    def check_config(self, config) -> None:
        super().check_config(config)
        model, data = config.model, config.data
        objective = config.objectives.subclass_segmentation
        fine_to_coarse = tuple(data.fine_to_coarse)
        if tuple(objective.get("fine_to_coarse", fine_to_coarse)) != fine_to_coarse:
            raise ConfigError(
                f"config.objectives.subclass_segmentation.fine_to_coarse "
                f"{tuple(objective.fine_to_coarse)} differs from config.data.fine_to_coarse "
                f"{fine_to_coarse}; set one hierarchy (the configs tie them together).")
        num_fine, num_coarse = len(fine_to_coarse), max(fine_to_coarse) + 1
        try:
            model_classes = segmenter.class_counts(model)
        except ValueError as error:
            raise ConfigError(f"config.model: {error}") from None
        if model_classes != (num_fine, num_coarse):
            raise ConfigError(
                f"config.model has {model_classes[0]} fine and {model_classes[1]} coarse "
                f"classes, config.data.fine_to_coarse {fine_to_coarse} gives {num_fine} and "
                f"{num_coarse}.")
        fine_names, coarse_names = segmentation_eval.class_names(config)
        if (len(fine_names), len(coarse_names)) != (num_fine, num_coarse):
            raise ConfigError(
                f"config.segmentation names {len(fine_names)} fine and {len(coarse_names)} coarse "
                f"classes; the labels have {num_fine} and {num_coarse} (background included).")
        if model.get("backbone", "vit") != "vit":
            if config.get("init", None):
                raise ConfigError(
                    f"config.init loads a pretrained ViT encoder, but model.backbone is "
                    f"{model.backbone!r}; use backbone 'vit' or drop init.")
            if config.optimizer.get("layer_decay", None) not in (None, 1.0):
                raise ConfigError(
                    "config.optimizer.layer_decay scales a ViT encoder's blocks, and "
                    f"model.backbone {model.backbone!r} has none; add "
                    "--config.optimizer.layer_decay=None.")
        if int(model.image_size) != int(data.image_size):
            raise ConfigError(f"config.model.image_size {model.image_size} differs from "
                              f"config.data.image_size {data.image_size}; tie them together.")

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        from input_pipeline import segmentation  # grain import kept off the model/test paths

        plan = segmentation.plan_training(config.data, global_batch_size=config.global_batch_size)
        log.info("Segmentation training split: %s", plan.summary())
        dataset = segmentation.make_segmentation_train_dataset(
            config.data, global_batch_size=config.global_batch_size, seed=config.seed,
            image_size=config.model.image_size, process_index=process_index,
            process_count=process_count, plan=plan)
        return TrainData(dataset, len(plan.index.volumes))

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        return [segmentation_eval.SegmentationHooks(ctx), *super().eval_hooks(ctx)]
