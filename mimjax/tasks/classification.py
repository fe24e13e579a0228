"""Task "classification": fine-tuning a ViT classifier (softmax or multi-label)
on labelled splits; val evals keep the best checkpoint, a test eval at the end."""

from __future__ import annotations

from mimjax.evaluators import classifier_eval
from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.tasks.base import Task, TrainData


class ClassificationTask(Task):
    name = "classification"
    model_names = ("vit_classifier",)
    required_objectives = ("classification",)
    example_config = "configs/finetune_base.py"

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        from input_pipeline import finetune  # grain import kept off the model/test paths

        label_key = config.objectives.classification.label_key
        dataset = finetune.make_finetune_train_dataset(
            config.data, image_size=config.model.image_size,
            global_batch_size=config.global_batch_size, seed=config.seed,
            label_keys=(label_key.removeprefix("label_"),),
            process_index=process_index, process_count=process_count)
        return TrainData(dataset, len(finetune.split_source(config.data, "train")))

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        return [classifier_eval.ClassificationHooks(ctx), *super().eval_hooks(ctx)]
