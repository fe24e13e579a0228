"""Task "landmarks": anatomical landmark detection by heatmap regression (Di Via et al.,
ISBI 2024, on the GU2Net protocol of Zhu et al., MICCAI 2021): the ViT encoder
(initialisable from any pretraining or an imported HF / timm checkpoint) with a dense
decoder, or the U-Net, one heatmap channel per landmark; val MRE evals, the best
checkpoint kept apart, test MRE / SDR in millimetres and figures with error lines."""

from __future__ import annotations

import logging

from mimjax.evaluators import landmark_eval
from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.models import heatmap
from mimjax.run_config import ConfigError
from mimjax.tasks.base import Task, TrainData

log = logging.getLogger(__name__)


class LandmarkTask(Task):
    name = "landmarks"
    model_names = ("heatmap",)
    required_objectives = ("landmark_heatmap",)
    example_config = "configs/landmarks_hand.py"

    def check_config(self, config) -> None:
        super().check_config(config)
        model, data = config.model, config.data
        try:
            count = heatmap.num_landmarks(model)
            landmark_eval.settings(config)
        except ValueError as error:
            raise ConfigError(f"config: {error}") from None
        if count != int(data.get("num_landmarks", -1)):
            raise ConfigError(
                f"config.model.num_landmarks {count} differs from config.data.num_landmarks "
                f"{data.get('num_landmarks', None)}; tie them together (the configs do).")
        if int(model.image_size) != int(data.image_size):
            raise ConfigError(f"config.model.image_size {model.image_size} differs from "
                              f"config.data.image_size {data.image_size}; tie them together.")
        if model.get("backbone", "vit") != "vit" and config.get("init", None):
            raise ConfigError(
                f"config.init loads a pretrained ViT encoder, but model.backbone is "
                f"{model.backbone!r}; use backbone 'vit' or drop init.")
        if model.get("backbone", "vit") != "vit" and config.optimizer.get(
                "layer_decay", None) not in (None, 1.0):
            raise ConfigError(
                "config.optimizer.layer_decay scales a ViT encoder's blocks, and model.backbone "
                f"{model.backbone!r} has none; add --config.optimizer.layer_decay=None.")

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        from input_pipeline import landmarks  # grain import kept off the model/test paths

        plan = landmarks.plan_training(config.data, global_batch_size=config.global_batch_size)
        log.info("Landmark training split: %s", plan.summary())
        dataset = landmarks.make_landmark_train_dataset(
            config.data, global_batch_size=config.global_batch_size, seed=config.seed,
            image_size=config.model.image_size, process_index=process_index,
            process_count=process_count, plan=plan)
        return TrainData(dataset, len(plan.labelled))

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        return [landmark_eval.LandmarkHooks(ctx), *super().eval_hooks(ctx)]
