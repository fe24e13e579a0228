"""Task "image_text": image-report pretraining (MCR, and its CLIP-style and
two-stream baselines) on paired images and reports; retrieval evals."""

from __future__ import annotations

import logging
import os
import shutil

from mimjax.evaluators import retrieval
from mimjax.evaluators.hooks import EvalHook, HookContext
from mimjax.tasks.base import Task, TrainData

log = logging.getLogger(__name__)


class ImageTextTask(Task):
    name = "image_text"
    model_names = ("mcr",)
    required_objectives = ("mcr",)
    example_config = "configs/mcr_demo.py"

    def check_config(self, config) -> None:
        super().check_config(config)
        k, b = config.get("grad_accum_steps", 1), config.global_batch_size
        if k > 1 and config.objectives.mcr.get("itc_weight", 0.0):
            # The loss runs once per microbatch, so each sees only its own reports.
            log.warning(
                "grad_accum_steps %d: the contrastive loss takes its negatives from each "
                "microbatch of %d pairs, not from the global batch of %d; it is the loss of "
                "batch %d, with %d times fewer negatives. For global-batch negatives use more "
                "devices (or a smaller global batch) with grad_accum_steps=1.", k, b // k, b,
                b // k, k)

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        from input_pipeline import pairs  # grain import kept off the model/test paths

        dataset = pairs.make_pairs_train_dataset(
            config.data, image_size=config.model.image_size,
            global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=process_index, process_count=process_count)
        return TrainData(dataset, pairs.num_pairs(config.data, "train"))

    def prepare_workdir(self, config, workdir: str, *, is_chief: bool) -> None:
        """Keeps the tokenizer beside the checkpoints: the text tower's token ids mean
        nothing without it (tools/evaluate_retrieval.py reads it from there)."""
        from input_pipeline import pairs

        if is_chief:
            shutil.copyfile(pairs.tokenizer_path(config.data),
                            os.path.join(workdir, "tokenizer.json"))

    def eval_hooks(self, ctx: HookContext) -> list[EvalHook]:
        hook = retrieval.RetrievalHooks.for_split(ctx.config, ctx.spec, ctx.mesh, ctx.workdir,
                                                  ctx.writer)
        return [hook, *super().eval_hooks(ctx)]
