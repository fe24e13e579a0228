"""Task "pretrain": masked image reconstruction (MAE, and MIRAM's multi-scale
decoders) on unlabelled images; reconstruction figures as it trains."""

from __future__ import annotations

from mimjax.evaluators import reconstruction
from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.tasks.base import Task, TrainData


class PretrainTask(Task):
    name = "pretrain"
    model_names = ("mae",)
    required_objectives = ("masked_reconstruction",)
    example_config = "configs/demo.py"

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        from input_pipeline import pipeline  # grain import kept off the model/test paths

        dataset = pipeline.make_pretrain_dataset(
            config.data, scales=tuple(config.model.scales),
            global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=process_index, process_count=process_count)
        return TrainData(dataset, pipeline.num_records(config.data))

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        figures = reconstruction.ReconstructionFigureHook(ctx.config, ctx.spec, ctx.workdir)
        return [figures, *super().eval_hooks(ctx)]
