"""Task "distill": the federated server's label-free universal model. The student
`encoder` of the universal distiller (mimjax.models.distiller) learns to reproduce
frozen teacher encoders (the sites' encoders) through one adaptor each
(mimjax.objectives.feature_distillation), on an unlabelled image pool.

The server drives it round by round: `run.set_params({"encoder": average,
"teachers": {k: site k's encoder}})`, then `run.fit(k)`. Its data are images only:
the pool (data.source "shards") must hold no label (input_pipeline.unlabelled:
every record's meta within LABEL_FREE_META_KEYS, no masks), checked before training;
`data.pool` = {phantom: {num_images, seed, size}} renders the embedded phantom pool
under data.dir first (configs/federated_server_demo.py). The batches are the
pretraining pipeline's augmented crops at model.image_size, as batch["image"].
"""

from __future__ import annotations

import copy

from mimjax.run_config import ConfigError
from mimjax.tasks.base import Task, TrainData

FROZEN_PART = "teachers"  # never trained: the sites' encoders, set by the server


class _SingleImage:
    """The pretraining batch's one scale, "image_{size}", as "image" (what the
    feature_distillation objective reads)."""

    def __init__(self, size: int):
        self.key = f"image_{size}"

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        batch["image"] = batch.pop(self.key)
        return batch


class DistillTask(Task):
    name = "distill"
    model_names = ("universal_distiller",)
    required_objectives = ("feature_distillation",)
    example_config = "configs/federated_server_demo.py"

    def check_config(self, config) -> None:
        super().check_config(config)
        data = config.data
        frozen = tuple(config.optimizer.get("frozen", ()) or ())
        if FROZEN_PART not in frozen:
            raise ConfigError(
                f"config.task 'distill' trains the student only: config.optimizer.frozen must "
                f"name {FROZEN_PART!r} (now {frozen}), or weight decay would shrink the sites' "
                f"encoders; see {self.example_config}.")
        if tuple(data.get("label_keys", ()) or ()):
            raise ConfigError(
                f"config.data.label_keys = {tuple(data.label_keys)}: the distill task trains on "
                "unlabelled images and reads no label; set --config.data.label_keys=()")
        if data.get("roi_context", 0.0):
            raise ConfigError(
                f"config.data.roi_context = {data.roi_context}: lesion crops need lesion labels, "
                "which an unlabelled pool does not have; set --config.data.roi_context=0")
        pool = data.get("pool", None)
        if pool:
            from input_pipeline import unlabelled  # light: no grain

            if data.source != "shards":
                raise ConfigError(
                    f"config.data.pool is set, so the run reads the pool's shards under "
                    f"data.dir: set --config.data.source=shards (now {data.source!r}), or "
                    "drop data.pool to read data.source itself")
            try:
                sizes = unlabelled.phantom_pool_sizes(pool)
            except ValueError as error:
                raise ConfigError(f"config.data.pool: {error}") from None
            small = {n: s for n, s in sizes.items() if s < int(config.model.image_size)}
            if small:
                raise ConfigError(
                    f"config.data.pool renders {small} px images, smaller than "
                    f"model.image_size {config.model.image_size}: crops must come from real "
                    "pixels; raise their size or lower model.image_size")

    def train_data(self, config, *, process_index: int, process_count: int) -> TrainData:
        # grain import kept off the model/test paths
        from input_pipeline import pipeline, unlabelled

        data = config.data
        if data.get("pool", None):
            folder = unlabelled.ensure_phantom_pool(data.dir, data.pool)
            data = copy.deepcopy(data)
            with data.unlocked():
                data.dir = folder
        src = pipeline.make_source(data)
        unlabelled.check_unlabelled(src, f"the distill pool ({src.where})")
        size = int(config.model.image_size)
        dataset = pipeline.make_pretrain_dataset(
            data, scales=(size,), global_batch_size=config.global_batch_size, seed=config.seed,
            process_index=process_index, process_count=process_count)
        return TrainData(dataset.map(_SingleImage(size)), len(src))
