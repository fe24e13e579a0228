"""Drivers: programs that enter the run (mimjax.train.Run) one or more times.

`config.driver` picks one (default "train": one run to total_steps, then its
end-of-run evals). "experiment" pretrains, fine-tunes and probes several arms and
tabulates them (mimjax.drivers.experiment). main.py and the tools are the only
importers of this package.
"""

from __future__ import annotations

import importlib

from mimjax.run_config import ConfigError

# name -> "module:function(config, workdir)"; imported on use, so `main.py --help`
# and drivers that are not run load nothing.
DRIVERS = {
    "train": "mimjax.train:train_and_evaluate",
    "experiment": "mimjax.drivers.experiment:run_experiment",
}
DEFAULT_DRIVER = "train"


def run(config, workdir: str):
    """Runs `config.driver` (default "train") on `workdir`; returns what it returns."""
    name = config.get("driver", DEFAULT_DRIVER)
    if name not in DRIVERS:
        raise ConfigError(f"config.driver must be one of {sorted(DRIVERS)}, got {name!r}.")
    module, _, function = DRIVERS[name].partition(":")
    return getattr(importlib.import_module(module), function)(config, workdir)
