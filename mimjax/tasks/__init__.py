"""Task registry: `config.task` -> its plug-in (mimjax.tasks.base.Task).

A task module declares its models, objectives, data, workdir side effects and eval
hooks; adding a task is its module plus one line in `TASKS`.
"""

from __future__ import annotations

from mimjax.run_config import ConfigError
from mimjax.tasks.base import Task, TrainData
from mimjax.tasks.classification import ClassificationTask
from mimjax.tasks.distill import DistillTask
from mimjax.tasks.image_text import ImageTextTask
from mimjax.tasks.landmarks import LandmarkTask
from mimjax.tasks.pretrain import PretrainTask
from mimjax.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (PretrainTask, ClassificationTask, ImageTextTask, SegmentationTask,
                 LandmarkTask, DistillTask)
}
DEFAULT_TASK = PretrainTask.name  # configs without a `task` field pretrain

__all__ = ["TASKS", "Task", "TrainData", "for_config", "get"]


def get(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"config.task must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name]()


def for_config(config) -> Task:
    """The plug-in of `config.task`, after checking the config fits it."""
    task = get(config.get("task", DEFAULT_TASK))
    task.check_config(config)
    return task
