"""Flower's ServerApp and ClientApp for mimjax (Message API).

Two ways to run them:
- one machine, Flower's Simulation Engine: `python main.py --config
  configs/federated_demo.py --workdir W` (mimjax.drivers.federated.simulation)
  builds the apps below around the config and calls `flwr.simulation.run_simulation`;
- real sites, Flower's Deployment Engine: a `flower-superlink`, one
  `flower-supernode` per site and `flwr run` on `tools/federated_app/` (README,
  "Federated training"); the module-level `server_app` and `client_app` read
  their config from Flower's run config (`config`, `workdir`: the server's) and
  node config (`config`, `workdir`, `site`: each site's own).

The server's config holds no site data paths: it is the `server` and `federated`
sections of a federation config (`configs/federated_demo.py:server`). A site's
config is an ordinary run config (`configs/federated_demo.py:site=NAME`).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from mimjax import run_config
from mimjax.drivers.federated import server as server_lib
from mimjax.drivers.federated.site import Site
from mimjax.run_config import ConfigError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------- server
def check_server_config(config) -> None:
    fed = config.federated
    for key in ("rounds", "local_steps", "min_sites"):
        if int(fed[key]) < 1:
            raise ConfigError(f"config.federated.{key} must be >= 1, got {fed[key]}.")
    if fed.strategy == "soup" and int(fed.rounds) != 1:
        raise ConfigError("config.federated.strategy='soup' is a one-shot merge: set "
                          "config.federated.rounds=1 (and local_steps to the whole budget).")
    if int(fed.min_sites) > len(config.server.sites):
        raise ConfigError(f"config.federated.min_sites={fed.min_sites} is more than the "
                          f"{len(config.server.sites)} sites in config.server.sites.")
    server_lib.inner_strategy(fed, len(config.server.sites))  # strategy and DP values


def serve(grid, config, workdir: str):
    """The ServerApp's work: rounds `done + 1 .. federated.rounds` (resuming from the
    last complete round in `workdir`), a checkpoint after each. Returns the final
    global arrays."""
    check_server_config(config)
    fed, srv = config.federated, config.server
    checkpoints = server_lib.RoundCheckpoints(workdir)
    done = checkpoints.latest_round()
    if done:
        arrays, state, _ = checkpoints.restore(done)
        log.info("Server: resuming after round %d of %d from %s.", done, fed.rounds, workdir)
    else:
        arrays, state = server_lib.initial_arrays(srv, fed.shared), {}
    universal = None
    try:
        if done >= int(fed.rounds):
            log.info("Server: all %d rounds are done.", fed.rounds)
            return arrays
        if fed.strategy == "universal":
            universal = server_lib.UniversalDistillation(
                srv.distill, os.path.join(workdir, "distill"), srv.sites,
                int(srv.distill_steps))
        strategy = server_lib.make_strategy(
            fed, site_names=list(srv.sites), expected=parameters_spec(arrays),
            round_offset=done, universal=universal)
        server_lib.set_optimizer_state(strategy.inner, state)

        def after_round(current: int, record: ArrayRecord):
            if current == 0:
                return None
            named = {k: v.numpy() for k, v in record.items()}
            checkpoints.save(done + current, named, server_lib.optimizer_state(strategy.inner),
                             strategy.last_round)
            log.info("Server: round %d of %d saved (%s accepted, %d refused, %.1f s).",
                     done + current, fed.rounds, strategy.last_round.get("accepted"),
                     len(strategy.last_round.get("refused", {})),
                     strategy.last_round.get("round_seconds", float("nan")))
            return strategy.round_metrics()

        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            num_rounds=int(fed.rounds) - done, timeout=float(fed.round_timeout),
            train_config=ConfigRecord({}), evaluate_fn=after_round)
        return {k: v.numpy() for k, v in result.arrays.items()} if result.arrays else arrays
    finally:
        if universal is not None:
            universal.close()
        checkpoints.close()


def parameters_spec(arrays):
    return {name: tuple(np.shape(v)) for name, v in arrays.items()}


def make_server_app(config, workdir: str) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid, context):
        serve(grid, config, workdir)

    return app


# ----------------------------------------------------------------- sites
_SITES: dict[str, Site] = {}  # workdir -> Site, for engines that keep the process


def site_for(name: str, config, workdir: str) -> Site:
    """The site's run, reused while this process lives (the simulation engine's
    worker), else resumed from its workdir (the deployment engine starts a process
    per message)."""
    key = os.path.abspath(workdir)
    if key not in _SITES:
        _SITES[key] = Site(name, config, workdir)
    return _SITES[key]


def close_sites() -> None:
    for site in _SITES.values():
        site.close()
    _SITES.clear()


def train_message(msg: Message, site: Site) -> Message:
    """A site's reply to a train message: its shared parameters after the round,
    the numbers of `site.REPLY_METRICS` and its name."""
    config = msg.content["config"]
    mu = float(config.get("proximal-mu", 0.0))
    own = float(site.run.config.optimizer.get("proximal_mu", 0.0) or 0.0)
    if abs(mu - own) > 1e-12:
        raise ConfigError(
            f"site {site.name}: the server runs FedProx with proximal-mu {mu} but the site's "
            f"config has optimizer.proximal_mu={own}; start the site with the same value "
            "(the federation config sets it for every site).")
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    reply = site.train_round(arrays, int(config["server-round"]), int(config["local-steps"]))
    log.info("Site %s: round %s trained in %.1f s (loss %.4f).", site.name,
             config["server-round"], reply.metrics["train-seconds"], reply.metrics["loss"])
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in reply.arrays.items()}),
        "metrics": MetricRecord(reply.metrics),
        "site": ConfigRecord({"name": site.name}),
    }), reply_to=msg)


def make_client_app(resolve) -> ClientApp:
    """A ClientApp whose site is `resolve(context) -> (name, run config, workdir)`."""
    app = ClientApp()

    @app.train()
    def train_fn(msg, context):
        return train_message(msg, site_for(*resolve(context)))

    return app


# ----------------------------------------------------------------- deployment
def _required(record, keys, what: str):
    missing = [k for k in keys if k not in record]
    if missing:
        raise ConfigError(f"the {what} lacks {missing}; pass them with "
                          f"{'--run-config' if what == 'run config' else '--node-config'} "
                          "(README, 'Federated training').")


server_app = ServerApp()


@server_app.main()
def _deployed_server(grid, context):
    _required(context.run_config, ("config", "workdir"), "run config")
    config = run_config.load(str(context.run_config["config"]), [])
    serve(grid, config, str(context.run_config["workdir"]))


def _deployed_site(context):
    _required(context.node_config, ("config", "workdir", "site"), "node config")
    node = context.node_config
    return str(node["site"]), run_config.load(str(node["config"]), []), str(node["workdir"])


client_app = make_client_app(_deployed_site)
