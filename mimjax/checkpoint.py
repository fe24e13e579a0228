"""Checkpoints: train state and data-iterator state as two orbax items of one step.

- Saves are asynchronous; orbax writes each step into a temporary directory and
  renames it when complete, so a run killed at any moment (SIGKILL included)
  leaves either a finished checkpoint or none: a half-written one is never picked.
- Restores always go through an abstract target built on the *current* mesh, so a
  checkpoint written on 8 devices restores onto 4 or 1 (orbax reshards on read).
- "latest" checkpoints (for resume) live in `WORKDIR/checkpoints`; a later
  "best" retention must use its own directory so the two policies never collide.
- The data-iterator state is the pipeline's global position ({"global_position":
  n}, the same on every process), written once, by the primary process, as JSON;
  every process restores it, whatever the process count that wrote it. (grain's
  own handler writes one file per process, named by index and count, which a run
  with another process count cannot find.) Checkpoints in that older per-process
  layout still restore: their process 0 file holds the same global position.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the target shardings (orbax reshards onto them)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


class Checkpointer:
    STATE, DATA = "state", "data_iter"

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every,
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(self.STATE, self.DATA))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
        items = {self.STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[self.DATA] = ocp.args.JsonSave(data_iter.get_state())
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("Saving checkpoint for step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores the train state (onto `abstract_state`'s shardings) and, if given,
        the data iterator in place.

        A state field the checkpoint lacks is filled from `abstract_state` when it holds
        no arrays (e.g. TrainState.model_state, {} for most models, added after older
        checkpoints were written); a missing field with arrays is an error."""
        target, filled = self._stored_fields(step, abstract_state)
        items = {self.STATE: ocp.args.StandardRestore(target)}
        legacy_data = self._per_process_data_state(step) if data_iter is not None else None
        if data_iter is not None and legacy_data is None:
            items[self.DATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            data_iter.set_state(legacy_data if legacy_data is not None else
                                dict(restored[self.DATA]))
        restored = restored[self.STATE]
        log.info("Restored step %d from %s", step, self.directory)
        if filled:
            restored = dataclasses.replace(abstract_state, **restored, **filled)
        return restored

    def _per_process_data_state(self, step: int) -> dict | None:
        """The iterator state of a checkpoint in grain's per-process layout (process 0's
        file: the global position is the same in every process's), else None."""
        item_dir = os.path.join(self.directory, str(step), self.DATA)
        legacy = sorted(glob.glob(os.path.join(item_dir, "process_0-of-*.json")))
        if not legacy:
            return None
        with open(legacy[0]) as f:
            return json.load(f)

    def _stored_fields(self, step: int, abstract_state):
        """(the restore target, {field: empty value} for fields the checkpoint lacks)."""
        if not dataclasses.is_dataclass(abstract_state):
            return abstract_state, {}
        item_dir = os.path.join(self.directory, str(step), self.STATE)
        stored = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata.tree
        fields = {f.name: getattr(abstract_state, f.name)
                  for f in dataclasses.fields(abstract_state)}
        missing = {name: value for name, value in fields.items() if name not in stored}
        if not missing:
            return abstract_state, {}
        with_arrays = [name for name, value in missing.items() if jax.tree.leaves(value)]
        if with_arrays:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} has no {with_arrays}, which this "
                "model needs; it was written by a different model or an older mimjax. Start "
                "a fresh run in a new --workdir (config.init can load its encoder).")
        present = {name: value for name, value in fields.items() if name in stored}
        return present, missing

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class BestCheckpointer:
    """The best parameters so far and their metrics, in a directory of their own
    (e.g. WORKDIR/best, apart from the "latest" checkpoints used for resume).

    Holds one step (max_to_keep=1): a save happens only when the caller found the new
    result better, so the newest step is the best. The metrics are saved beside the
    parameters, so a resumed run compares against the best of the runs before it.
    """

    PARAMS, METRICS = "params", "metrics"

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(self.PARAMS, self.METRICS))

    def best_step(self) -> int | None:
        return self._manager.latest_step()

    def best_metrics(self) -> dict | None:
        step = self.best_step()
        if step is None:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{self.METRICS: ocp.args.JsonRestore()}))
        return dict(restored[self.METRICS])

    def save(self, step: int, params, metrics: dict) -> None:
        if step in self._manager.all_steps():  # re-evaluated after a resume
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(**{
            self.PARAMS: ocp.args.StandardSave(params),
            self.METRICS: ocp.args.JsonSave(metrics)}), force=True)
        log.info("New best at step %d saved to %s", step, self.directory)

    def restore_params(self, abstract_params):
        step = self.best_step()
        args = ocp.args.Composite(**{self.PARAMS: ocp.args.StandardRestore(abstract_params)})
        return self._manager.restore(step, args=args)[self.PARAMS]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
