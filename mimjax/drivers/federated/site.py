"""A site's side of a federated round: its own `train.Run`, entered once per round.

The site's run config is an ordinary mimjax config (classification, segmentation,
landmarks, pretraining: any task) whose `total_steps` covers every round
(rounds x local steps). Each round the site
1. takes the global parameters of the shared part (named float32 arrays,
   `parameters.from_wire`) into its run (`Run.set_params`: its head, optimizer
   moments, step and data position stay; a FedProx anchor restarts at them),
2. trains up to step `round x local_steps` through the one trainer (`Run.fit`),
   which saves a checkpoint at the end,
3. replies with its shared part and a fixed set of numbers (`REPLY_METRICS`):
   never images, labels, paths or per-example values.

Between rounds the run lives in the site's workdir, so the site survives its own
restart (and Flower's deployment runs every message in a fresh process): a new
`Site` on the same workdir resumes at the last round it finished. A round the site
has already trained (a message delivered again after a server restart) is not
trained twice: the site replies with what it holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from mimjax import train
from mimjax.drivers.federated import parameters
from mimjax.models import param_tree

log = logging.getLogger(__name__)

# The only numbers a site's reply carries (besides the shared parameters).
REPLY_METRICS = ("num-examples", "loss", "train-seconds", "steps")


@dataclass
class Reply:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


class Site:
    """One site's run in `workdir`; `train_round` per federated round."""

    def __init__(self, name: str, config, workdir: str, shared=parameters.DEFAULT_SHARED):
        self.name, self.shared = name, tuple(shared)
        self.run = train.Run(config, workdir)

    def shared_params(self) -> dict[str, np.ndarray]:
        return parameters.to_wire(self.run.params(), self.shared)

    def train_round(self, global_arrays: dict[str, np.ndarray] | None, server_round: int,
                    local_steps: int) -> Reply:
        """Trains round `server_round` (1-based) from `global_arrays` (None: from the
        site's own parameters) and returns its reply."""
        if server_round < 1 or local_steps < 1:
            raise ValueError(f"server_round and local_steps must be >= 1, got {server_round} "
                             f"and {local_steps}.")
        target = server_round * local_steps
        todo = target - self.run.step
        start = time.perf_counter()
        metrics = {}
        if todo <= 0:
            log.warning("Site %s: round %d was trained already (step %d); replying with the "
                        "parameters it holds.", self.name, server_round, self.run.step)
        else:
            if global_arrays is not None:
                self._check_global(global_arrays)
                self.run.set_params(parameters.from_wire(global_arrays))
            metrics = self.run.fit(todo)
        seconds = time.perf_counter() - start
        steps = max(todo, 0)
        loss = float(metrics.get("loss", float("nan")))
        return Reply(
            arrays=self.shared_params(),
            metrics={"num-examples": float(steps * int(self.run.config.global_batch_size)),
                     "loss": loss, "train-seconds": seconds, "steps": float(steps)})

    def _check_global(self, arrays) -> None:
        """The server's parameters must be exactly the site's shared part (its shapes,
        from the run's abstract state: no parameters leave the devices for this)."""
        flat = param_tree.flatten_leaves(self.run.abstract_state.params)
        expected = {name: tuple(leaf.shape) for name, leaf in flat.items()
                    if name.split("/", 1)[0] in self.shared}
        parameters.check_update(arrays, expected, site="the server")

    def close(self) -> None:
        self.run.close()
