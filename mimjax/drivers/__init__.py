"""Drivers: programs that enter the run (mimjax.train.Run) one or more times.

`config.driver` picks one (default "train": one run to total_steps, then its
end-of-run evals). "experiment" pretrains, fine-tunes and probes several arms and
tabulates them (mimjax.drivers.experiment); "segmentation_arms" trains segmentation
arms on one budget and tabulates per-volume test metrics with paired bootstrap
intervals (mimjax.drivers.segmentation_arms); "landmark_arms" does the same for
landmark detection (MRE and SDR per test image; mimjax.drivers.landmark_arms);
"federated" runs a federation on Flower's Simulation Engine
(mimjax.drivers.federated.simulation) and "federated_loso" its leave-one-site-out
experiment (mimjax.drivers.federated.loso). main.py
and the tools are the only importers of this package.
"""

from __future__ import annotations

import importlib

from mimjax.run_config import ConfigError

# name -> "module:function(config, workdir)"; imported on use, so `main.py --help`
# and drivers that are not run load nothing.
DRIVERS = {
    "train": "mimjax.train:train_and_evaluate",
    "experiment": "mimjax.drivers.experiment:run_experiment",
    "segmentation_arms": "mimjax.drivers.segmentation_arms:run_experiment",
    "landmark_arms": "mimjax.drivers.landmark_arms:run_experiment",
    "federated": "mimjax.drivers.federated.simulation:run_federation",
    "federated_loso": "mimjax.drivers.federated.loso:run_loso",
}
DEFAULT_DRIVER = "train"
# drivers that run several configs: their whole-experiment check (every run config
# and cross-reference), for tests and tools that check configs without running them
CHECKS = {
    "experiment": "mimjax.drivers.experiment:check_experiment",
    "segmentation_arms": "mimjax.drivers.arms:check_arms",
    "landmark_arms": "mimjax.drivers.arms:check_arms",
    "federated": "mimjax.drivers.federated.simulation:check_federation",
    "federated_loso": "mimjax.drivers.federated.loso:check_loso",
}


def _load(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def check(config) -> bool:
    """Runs the driver's whole-experiment check; False for single-run drivers (check
    those with run_config.check and the task's checks)."""
    name = config.get("driver", DEFAULT_DRIVER)
    if name in CHECKS:
        _load(CHECKS[name])(config)
        return True
    return False


def run(config, workdir: str):
    """Runs `config.driver` (default "train") on `workdir`; returns what it returns."""
    name = config.get("driver", DEFAULT_DRIVER)
    if name not in DRIVERS:
        raise ConfigError(f"config.driver must be one of {sorted(DRIVERS)}, got {name!r}.")
    return _load(DRIVERS[name])(config, workdir)
