"""Driver "federated": the federation of a config on one machine, through Flower's
Simulation Engine (`flwr.simulation.run_simulation`, Ray workers).

    python main.py --config configs/federated_demo.py --workdir W

The ServerApp gets the config's `server` and `federated` sections only and works in
W/server; site i of `config.sites` (in name order) is SuperNode i, whose ClientApp
trains that site's run in W/sites/NAME. A Ray worker keeps its process between
messages, so each site's run (compiled step, data pipeline) is built once and entered
once per round. Re-running the command resumes: the server from its last complete
round, each site from its own checkpoint.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from mimjax.drivers import common
from mimjax.drivers.federated import server as server_lib
from mimjax.models.spec import ModelSpec
from mimjax.run_config import ConfigError

log = logging.getLogger(__name__)


def server_config(config) -> ml_collections.ConfigDict:
    """What the server may read: no site section."""
    return ml_collections.ConfigDict({"federated": config.federated, "server": config.server})


def site_config(config, name: str):
    """Site `name`'s run config, with the federation's FedProx weight applied."""
    site = ml_collections.ConfigDict(config.sites[name].to_dict())
    mu = float(config.federated.proximal_mu) if config.federated.strategy == "fedprox" else 0.0
    site.optimizer.proximal_mu = mu
    return site


def check_federation(config) -> None:
    from mimjax.drivers.federated import apps

    names = sorted(config.sites)
    if sorted(config.server.sites) != names:
        raise ConfigError(f"config.server.sites {sorted(config.server.sites)} must name the "
                          f"sites of config.sites {names}.")
    apps.check_server_config(server_config(config))
    sections = [(f"sites.{n}", site_config(config, n)) for n in names]
    if config.federated.strategy == "universal":
        sections.append(("server.distill", config.server.distill))
    common.check_sections(sections)
    # Every site's model builds (abstractly) before anything trains. (The server's
    # distiller is the sites' encoder several times over; its build is the server's
    # first step.)
    for name, section in sections[:len(names)]:
        try:
            ModelSpec.from_config(section.model)
        except ConfigError as error:
            raise ConfigError(str(error).replace("config.model", f"config.{name}.model", 1)
                              ) from None


def run_federation(config, workdir: str):
    """Runs (or resumes) the federation; returns the final global arrays."""
    check_federation(config)
    try:
        from flwr.simulation import run_simulation
    except ImportError as error:
        raise ConfigError(
            "the federated driver needs Flower's simulation engine: pip install -e "
            f"\".[federated]\" ({error}).") from None
    from mimjax.drivers.federated import apps

    names = sorted(config.sites)
    sites = {n: (n, site_config(config, n), os.path.join(workdir, "sites", n)) for n in names}
    server_workdir = os.path.join(workdir, "server")
    finished = server_lib.finished_arrays(server_workdir, int(config.federated.rounds))
    if finished is not None:  # nothing to run: Flower is not started at all
        log.info("Federation in %s: all %d rounds are done.", workdir, config.federated.rounds)
        return finished
    result = {}

    server_app = apps.ServerApp()

    @server_app.main()
    def _serve(grid, context):  # the ServerApp sees the server sections only
        result["arrays"] = apps.serve(grid, server_config(config), server_workdir)

    client_app = apps.make_client_app(
        lambda context: sites[names[int(context.node_config["partition-id"])]])
    cpus = config.federated.get("ray_num_cpus", None) or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False,
                             "log_to_driver": True}}
    log.info("Federation: %d sites %s, strategy %s, %d rounds x %d local steps, in %s",
             len(names), names, config.federated.strategy, config.federated.rounds,
             config.federated.local_steps, workdir)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(names),
                   backend_config=backend)
    if "arrays" not in result:
        raise RuntimeError(f"the federation in {workdir} ended without a result; see the log "
                           "above (a site's error is logged by the ServerApp's round).")
    return result["arrays"]
