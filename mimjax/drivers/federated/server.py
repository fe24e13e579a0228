"""The server's side of a federated run: strategies, the reply gate, the label-free
universal model, and round checkpoints.

`FederatedStrategy` is a Flower strategy (Message API) wrapped around one of
Flower's own (FedAvg, FedProx, FedAdam, optionally inside Flower's server-side
differential-privacy clipping). Around the inner strategy it
- sends every site the round's local step count (and the round number counted over
  restarts: a resumed server goes on at round r + 1, not at 1);
- gates every reply before anything aggregates it: the reply must name a known site
  once, carry exactly the global part's names, shapes and float32 values, all finite,
  and only the numbers in `site.REPLY_METRICS`. A refused reply is logged with every
  reason and the round goes on with the others (`parameters.check_update`);
- orders the accepted replies by site name, so the aggregate does not depend on the
  order in which sites reply;
- for the "universal" strategy, distils the sites' encoders into the average on the
  server's unlabelled pool (`UniversalDistillation`).

"soup" is the one-shot label-free merge: one round in which every site trains its
whole budget from the same start, then the uniform mean of their encoders.

The server reads no site data and holds no site path: its config is the
`server` and `federated` sections only; what reaches it is parameters and the
numbers above.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mimjax import pretrained as pretrained_lib
from mimjax import train
from mimjax.drivers.federated import parameters
from mimjax.drivers.federated.site import REPLY_METRICS
from mimjax.models import param_tree
from mimjax.models.spec import ModelSpec
from mimjax.run_config import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam", "universal", "soup")
DP_KINDS = ("none", "server_fixed")
REPLY_KEYS = {"arrays", "metrics", "site"}


# ----------------------------------------------------------------- the global start
def initial_arrays(server_cfg, shared) -> dict[str, np.ndarray]:
    """The global encoder the first round starts from: `server.init` (a mimjax
    workdir or checkpoint) or a fresh initialisation of `server.model` with
    `server.seed`; as named float32 arrays of the shared part."""
    model_cfg = server_cfg.model
    if "num_teachers" in model_cfg:  # the distiller: its encoder is all that is needed, and
        # building it with every teacher costs time quadratic in its size (flax traces each
        # variable's sharding), so one teacher; the encoder's initialisation is the same.
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.num_teachers = 1
    spec = ModelSpec.from_config(model_cfg)
    params = spec.init_params(model_cfg, jax.random.PRNGKey(int(server_cfg.seed)))
    init = server_cfg.get("init", None)
    if init:
        params, _ = pretrained_lib.init_from_checkpoint(params, init)
    return parameters.to_wire(jax.device_get(params), tuple(shared))


# ----------------------------------------------------------------- checkpoints
class RoundCheckpoints:
    """`WORKDIR/rounds/<r>/`: the global parameters and the strategy's state after
    round r (orbax), and `WORKDIR/rounds.jsonl`: one line per round (accepted and
    refused sites with reasons, per-site training seconds and loss, round time)."""

    GLOBAL, STRATEGY, INFO = "global", "strategy", "info"

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            os.path.join(self.workdir, "rounds"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=(self.GLOBAL, self.STRATEGY, self.INFO))

    def latest_round(self) -> int:
        return self._manager.latest_step() or 0

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray],
             strategy_state: Mapping[str, Mapping[str, np.ndarray]], info: dict) -> None:
        state = {k: param_tree.unflatten(dict(v)) for k, v in strategy_state.items() if v}
        items = {self.GLOBAL: ocp.args.StandardSave(param_tree.unflatten(dict(arrays))),
                 self.INFO: ocp.args.JsonSave(info)}
        if state:  # FedAdam's moments; FedAvg has none (orbax refuses an empty item)
            items[self.STRATEGY] = ocp.args.StandardSave(state)
        self._manager.save(server_round, args=ocp.args.Composite(**items))
        self._manager.wait_until_finished()
        with open(os.path.join(self.workdir, "rounds.jsonl"), "a") as f:
            f.write(json.dumps({"round": server_round, **info}) + "\n")

    def restore(self, server_round: int) -> tuple[dict, dict, dict]:
        items = {self.GLOBAL: ocp.args.StandardRestore(), self.INFO: ocp.args.JsonRestore()}
        if os.path.isdir(os.path.join(self.workdir, "rounds", str(server_round), self.STRATEGY)):
            items[self.STRATEGY] = ocp.args.StandardRestore()
        restored = self._manager.restore(server_round, args=ocp.args.Composite(**items))
        arrays = {k: np.asarray(v, parameters.WIRE_DTYPE)
                  for k, v in param_tree.flatten(restored[self.GLOBAL]).items()}
        state = {k: {n: np.asarray(a) for n, a in param_tree.flatten(v).items()}
                 for k, v in (restored.get(self.STRATEGY) or {}).items()}
        return arrays, state, dict(restored[self.INFO])

    def close(self) -> None:
        self._manager.close()


def finished_arrays(workdir: str, rounds: int) -> dict[str, np.ndarray] | None:
    """The global parameters of a server workdir that has completed `rounds` rounds
    (None if it has not, or holds none)."""
    if not os.path.isdir(os.path.join(workdir, "rounds")):
        return None
    checkpoints = RoundCheckpoints(workdir)
    try:
        done = checkpoints.latest_round()
        return checkpoints.restore(done)[0] if done >= rounds else None
    finally:
        checkpoints.close()


def optimizer_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The server optimizer's moments (FedAdam's m_t, v_t), wherever the strategy
    wraps it (Flower's DP wrappers keep the inner one as `.strategy`)."""
    while strategy is not None:
        if hasattr(strategy, "m_t"):
            return {k: dict(getattr(strategy, k) or {}) for k in ("m_t", "v_t")}
        strategy = getattr(strategy, "strategy", None)
    return {}


def set_optimizer_state(strategy, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    while strategy is not None:
        if hasattr(strategy, "m_t"):
            for key in ("m_t", "v_t"):
                if state.get(key):
                    setattr(strategy, key, {n: np.asarray(a) for n, a in state[key].items()})
            return
        strategy = getattr(strategy, "strategy", None)


# ----------------------------------------------------------------- universal model
class UniversalDistillation:
    """The label-free server step: the sites' encoders are the frozen teachers of a
    `distill` run (mimjax.tasks.distill) on the server's unlabelled pool; its student
    starts each round from the sites' average and its adaptors persist across rounds.
    Teacher k is the k-th site in name order (a site that did not reply this round
    is represented by the average)."""

    def __init__(self, distill_cfg, workdir: str, site_names: Iterable[str],
                 steps_per_round: int):
        self.site_names = sorted(site_names)
        if int(distill_cfg.model.num_teachers) != len(self.site_names):
            raise ConfigError(
                f"config.server.distill.model.num_teachers is {distill_cfg.model.num_teachers} "
                f"but the server lists {len(self.site_names)} sites; they must be equal.")
        self.steps = int(steps_per_round)
        self.run = train.Run(distill_cfg, workdir)

    def __call__(self, server_round: int, averaged: Mapping[str, np.ndarray],
                 sites: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        todo = server_round * self.steps - self.run.step
        if todo > 0:
            flat = dict(averaged)
            for k, name in enumerate(self.site_names):
                teacher = sites.get(name, averaged)
                flat.update({f"teachers/{k}/{n.split('/', 1)[1]}": v
                             for n, v in teacher.items()})
            self.run.set_params(param_tree.unflatten(flat))
            metrics = self.run.fit(todo)
            log.info("Round %d: universal model distilled for %d steps on the server's "
                     "unlabelled pool (loss %.4f).", server_round, todo,
                     metrics.get("loss", float("nan")))
        return parameters.to_wire(self.run.params(), ("encoder",))

    def close(self) -> None:
        self.run.close()


# ----------------------------------------------------------------- the strategy
def inner_strategy(federated_cfg, num_sites: int):
    """Flower's strategy for `federated.strategy` (+ DP clipping when configured)."""
    from flwr.serverapp import strategy as flwr_strategy

    name = federated_cfg.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"config.federated.strategy must be one of {list(STRATEGIES)}, "
                          f"got {name!r}.")
    # (Sites are not evaluated by Flower here: FederatedStrategy sends no evaluate
    # message, so the inner strategy's evaluate settings never apply.)
    common = dict(fraction_train=1.0,
                  min_train_nodes=int(federated_cfg.min_sites),
                  min_available_nodes=int(federated_cfg.min_sites),
                  weighted_by_key="num-examples")
    if name == "fedprox":
        inner = flwr_strategy.FedProx(proximal_mu=float(federated_cfg.proximal_mu), **common)
    elif name == "fedadam":
        adam = federated_cfg.fedadam
        inner = flwr_strategy.FedAdam(eta=float(adam.eta), beta_1=float(adam.beta_1),
                                      beta_2=float(adam.beta_2), tau=float(adam.tau), **common)
    else:  # fedavg, universal (FedAvg then distillation), soup (FedAvg of equal weights)
        inner = flwr_strategy.FedAvg(**common)
    dp = federated_cfg.dp
    if dp.kind not in DP_KINDS:
        raise ConfigError(f"config.federated.dp.kind must be one of {list(DP_KINDS)}, got "
                          f"{dp.kind!r}.")
    if dp.kind == "server_fixed":
        if name in ("universal", "soup"):
            raise ConfigError(
                f"config.federated.dp.kind='server_fixed' does not combine with strategy "
                f"{name!r}: it needs each site's own encoder, which DP noise would not "
                "protect. Use fedavg, fedprox or fedadam with DP.")
        inner = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=float(dp.noise_multiplier),
            clipping_norm=float(dp.clipping_norm), num_sampled_clients=num_sites)
    return inner


class FederatedStrategy:
    """See the module docstring. Built by `make_strategy`; a Flower `Strategy`
    (the class is created lazily so that importing this module needs no flwr)."""


def make_strategy(federated_cfg, *, site_names, expected: Mapping[str, tuple],
                  round_offset: int = 0, universal: UniversalDistillation | None = None):
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import Strategy

    class _FederatedStrategy(Strategy, FederatedStrategy):
        def __init__(self):
            self.inner = inner_strategy(federated_cfg, len(site_names))
            self.site_names = set(site_names)
            self.expected = dict(expected)
            self.offset = int(round_offset)
            self.local_steps = int(federated_cfg.local_steps)
            self.uniform = federated_cfg.strategy == "soup"
            self.universal = universal
            self.last_round: dict = {}
            self._round_start = time.perf_counter()

        def summary(self) -> None:
            self.inner.summary()

        def configure_train(self, server_round, arrays, config, grid):
            self._round_start = time.perf_counter()
            config["local-steps"] = self.local_steps
            return self.inner.configure_train(self.offset + server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            server_round += self.offset
            accepted, refused, sites = self.gate(server_round, replies)
            info = {"accepted": sorted(sites), "refused": refused,
                    "site_seconds": {s: m["train-seconds"] for s, m in sites.items()},
                    "site_loss": {s: m["loss"] for s, m in sites.items()}}
            if not accepted:
                log.error("Round %d: no site's update was accepted; the global parameters "
                          "stay as they were.", server_round)
                self.last_round = info
                return None, None
            arrays, metrics = self.inner.aggregate_train(server_round, accepted)
            if self.universal is not None and arrays is not None:
                averaged = {k: v.numpy() for k, v in arrays.items()}
                site_arrays = {s: {k: v.numpy() for k, v in m.content["arrays"].items()}
                               for s, m in zip(sorted(sites), accepted, strict=True)}
                start = time.perf_counter()
                distilled = self.universal(server_round, averaged, site_arrays)
                info["distill_seconds"] = time.perf_counter() - start
                arrays = ArrayRecord({k: Array(v) for k, v in distilled.items()})
            info["round_seconds"] = time.perf_counter() - self._round_start
            self.last_round = info
            return arrays, metrics

        def gate(self, server_round, replies):
            """(accepted replies in site-name order, {site or node: reason}, {site:
            its metrics})."""
            by_site, refused = {}, {}
            for msg in replies:
                who = f"node {msg.metadata.src_node_id}"
                if msg.has_error():
                    refused[who] = f"the site failed: {msg.error.reason}"
                    continue
                try:
                    site, metrics = self._check_reply(msg, who, by_site)
                except parameters.UpdateRejected as error:
                    refused[who] = str(error)
                    continue
                by_site[site] = (msg, metrics)
            for who, reason in refused.items():
                log.warning("Round %d: update from %s refused: %s", server_round, who, reason)
            order = sorted(by_site)
            accepted = [by_site[s][0] for s in order]
            if self.uniform:  # a soup: every site weighs the same
                for msg in accepted:
                    msg.content["metrics"]["num-examples"] = 1.0
            return accepted, refused, {s: by_site[s][1] for s in order}

        def _check_reply(self, msg, who, seen):
            content = msg.content
            keys = set(content.keys())
            if keys != REPLY_KEYS:
                raise parameters.UpdateRejected(
                    f"reply from {who} has records {sorted(keys)}, expected "
                    f"{sorted(REPLY_KEYS)}")
            site = str(content["site"].get("name", ""))
            if site not in self.site_names:
                raise parameters.UpdateRejected(f"reply from {who} names site {site!r}, "
                                                f"not one of {sorted(self.site_names)}")
            if site in seen:
                raise parameters.UpdateRejected(f"a second reply from site {site!r}")
            metrics = dict(content["metrics"])
            extra = sorted(set(metrics) - set(REPLY_METRICS))
            if extra or "num-examples" not in metrics:
                raise parameters.UpdateRejected(
                    f"site {site} sent metrics {sorted(metrics)}; only {list(REPLY_METRICS)} "
                    "are accepted, num-examples required")
            if not (np.isfinite(metrics["num-examples"]) and metrics["num-examples"] > 0):
                raise parameters.UpdateRejected(
                    f"site {site} sent num-examples={metrics['num-examples']}")
            arrays = {k: v.numpy() for k, v in content["arrays"].items()}
            parameters.check_update(arrays, self.expected, site=site)
            return site, {k: float(metrics.get(k, float("nan"))) for k in REPLY_METRICS}

        def configure_evaluate(self, server_round, arrays, config, grid):
            return []  # sites are evaluated by the experiment (held-out probes), not here

        def aggregate_evaluate(self, server_round, replies):
            return None

        def round_metrics(self) -> MetricRecord:
            accepted = self.last_round.get("accepted", [])
            return MetricRecord({"sites-accepted": len(accepted),
                                 "sites-refused": len(self.last_round.get("refused", {}))})

    return _FederatedStrategy()
