"""Driver "federated_loso": leave-one-site-out evaluation of federated encoders
(`config.driver = "federated_loso"`, configs/experiments/federated_loso.py).

For each seed and each held-out site H of `config.held_out`, the other sites are
the training sites, and every arm yields one encoder from the same start (the
server's initial encoder for that seed):
- `random`: the start itself;
- `mim_pooled`: MAE pretrained on the pooled unlabelled images of the training
  sites, as their scanners produce them (the paper's masked-image-modelling
  baseline: a centralised reference that a real federation could not build,
  because it pools the sites' data), for as many steps at the same batch as all
  training sites train together;
- `alone:S`: training site S on its own task for the whole budget (rounds x local
  steps), no federation;
- `soup`: the uniform mean of the `alone` encoders of the training sites (a
  one-shot label-free merge; equal to the federated "soup" strategy's one round);
- one arm per `config.strategies` entry (fedavg, fedprox, fedadam, universal): a
  federation of the training sites through Flower's Simulation Engine
  (mimjax.drivers.federated.simulation), `federation.federated.rounds` rounds.
H is never seen by any arm. Each encoder is then scored on H by a linear probe
(ridge on frozen GAP features, fit on H's `probe.train_split`, scored on
`probe.eval_split`, H's own task labels), and every pair in `config.pairs` gets
the paired bootstrap 95% interval of its macro-AUC difference over H's test images.

Tables: WORKDIR/results.csv (seed, held-out site, arm, AUC, AP), summary.csv (mean
over seeds per held-out site and arm, and the mean over held-out sites),
differences.csv, results.md (all three). Every run has its own workdir under
WORKDIR/seed<S>/ and resumes, so re-running the command completes a killed
experiment without repeating finished runs.
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np

from mimjax import run_config, train
from mimjax.drivers import common, experiment
from mimjax.drivers.federated import parameters, server, simulation
from mimjax.drivers.federated.site import Site
from mimjax.models import param_tree

log = logging.getLogger(__name__)

FEDERATED_ARMS = ("fedavg", "fedprox", "fedadam", "universal")


def _copy(cfg) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg.to_dict())  # resolves references: a frozen copy


def federation_for(config, held_out: str, strategy: str, seed: int):
    """The federation of every site but `held_out`, with `strategy` and `seed`."""
    fed = _copy(config.federation)
    del fed.sites[held_out]
    names = sorted(fed.sites)
    fed.server.sites = tuple(names)
    fed.server.distill.model.num_teachers = len(names)
    fed.federated.min_sites = len(names)
    fed.federated.strategy = strategy
    fed.server.seed = seed
    for section in [*fed.sites.values(), fed.server.distill]:
        section.seed = seed
        section.compilation_cache_dir = config.compilation_cache_dir
    return fed


def _site_config(config, name: str, seed: int):
    site = _copy(config.federation.sites[name])
    site.seed = seed
    site.compilation_cache_dir = config.compilation_cache_dir
    site.optimizer.proximal_mu = 0.0
    return site


def _budget(config) -> tuple[int, int]:
    fed = config.federation.federated
    return int(fed.rounds), int(fed.local_steps)


def train_alone(config, name: str, seed: int, start, workdir: str) -> dict[str, np.ndarray]:
    """Site `name` on its own task for the whole budget, from `start`."""
    rounds, local_steps = _budget(config)
    site = Site(name, _site_config(config, name, seed), workdir)
    try:
        return site.train_round(start, server_round=1, local_steps=rounds * local_steps).arrays
    finally:
        site.close()


def mim_config(config, train_sites, seed: int, pool_dir: str):
    """MAE on the pooled unlabelled images of `train_sites` (each through its own
    scanner), as many steps at the same batch as the training sites take together."""
    rounds, local_steps = _budget(config)
    c = _copy(config.mim)
    c.data.source, c.data.dir, c.data.pool = "shards", pool_dir, None
    c.seed = seed
    c.total_steps = rounds * local_steps * len(train_sites)
    c.warmup_steps = min(int(c.warmup_steps), max(1, c.total_steps // 10))
    c.compilation_cache_dir = config.compilation_cache_dir
    return c


def pretrain_mim(config, train_sites, seed: int, workdir: str) -> str:
    from input_pipeline import unlabelled  # grain import kept off the driver's import path

    pool_dir = os.path.join(workdir, "pool")
    unlabelled.write_unlabelled_pool(
        {name: config.federation.sites[name].data for name in train_sites}, pool_dir)
    run_dir = os.path.join(workdir, "run")
    train.train_and_evaluate(mim_config(config, train_sites, seed, pool_dir), run_dir)
    return run_dir


def _encoder_of_workdir(task_cfg, spec, workdir: str, seed: int) -> dict[str, np.ndarray]:
    params = experiment._encoder_params(task_cfg, spec, workdir, seed)
    return parameters.to_wire(params)


def _with_encoder(task_cfg, spec, encoder: dict[str, np.ndarray], seed: int) -> dict:
    fresh = param_tree.flatten(jax.device_get(
        spec.init_params(task_cfg.model, jax.random.PRNGKey(seed))))
    unknown = sorted(set(encoder) - set(fresh))
    if unknown:
        raise ValueError(f"encoder parameters the probe's model lacks: {unknown[:4]}")
    fresh.update(encoder)
    return param_tree.unflatten(fresh)


def _soup(encoders) -> dict[str, np.ndarray]:
    return parameters.weighted_mean([(e, 1.0) for e in encoders])


def run_held_out(config, held_out: str, seed: int, start, alone: dict, workdir: str):
    """(rows, differences) for one held-out site and seed."""
    train_sites = sorted(n for n in config.federation.sites if n != held_out)
    encoders = {"random": start}
    if config.mim_baseline:
        mim_dir = pretrain_mim(config, train_sites, seed, os.path.join(workdir, "mim_pooled"))
        encoders["mim_pooled"] = mim_dir  # a workdir, loaded like any pretraining
    for name in train_sites:
        encoders[f"alone:{name}"] = alone[name]
    encoders["soup"] = _soup([alone[n] for n in train_sites])
    seconds = {}
    for strategy in config.strategies:
        begin = time.perf_counter()
        fed = federation_for(config, held_out, strategy, seed)
        encoders[strategy] = simulation.run_federation(fed, os.path.join(workdir, strategy))
        seconds[strategy] = time.perf_counter() - begin
        log.info("LOSO seed %d, held out %s: %s federation in %.0f s.", seed, held_out,
                 strategy, seconds[strategy])

    task_cfg = _site_config(config, held_out, seed)
    evaluator, spec = experiment.probe_evaluator(held_out, task_cfg, config.probe)
    scored, rows = {}, []
    for arm, encoder in encoders.items():
        if isinstance(encoder, str):
            encoder = _encoder_of_workdir(task_cfg, spec, encoder, seed)
        scored[arm] = evaluator.fit_and_score(_with_encoder(task_cfg, spec, encoder, seed))
        metrics = {k.rsplit("/", 1)[-1]: v for k, v in evaluator.metrics(scored[arm]).items()}
        rows.append({"seed": seed, "held_out": held_out, "arm": arm,
                     "auc_macro": metrics["auc_macro"], "ap_macro": metrics["ap_macro"],
                     "federation_seconds": seconds.get(arm, math.nan)})
        log.info("LOSO seed %d, held out %s, %s: probe AUC %.4f AP %.4f", seed, held_out, arm,
                 metrics["auc_macro"], metrics["ap_macro"])
    pairs = [(a, b) for a, b in config.pairs if a in scored and b in scored]
    multilabel = bool(task_cfg.objectives.classification.multilabel)
    diffs = experiment.paired_auc_differences(
        held_out, scored, pairs, multilabel=multilabel,
        num_resamples=int(config.probe.bootstrap_resamples), seed=seed)
    for d in diffs:
        d["seed"] = seed
    return rows, diffs


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (held-out site, arm); the site-alone arms also as their
    mean and best per held-out site; then the mean over held-out sites."""
    per = {}
    for r in rows:
        per.setdefault((r["held_out"], r["arm"]), []).append(r["auc_macro"])
    out = []
    held_outs = list(dict.fromkeys(r["held_out"] for r in rows))
    for h in held_outs:
        arms = {a: float(np.mean(v)) for (hh, a), v in per.items() if hh == h}
        alone = {a: v for a, v in arms.items() if a.startswith("alone:")}
        shown = {a: v for a, v in arms.items() if not a.startswith("alone:")}
        if alone:
            shown["alone (mean)"] = float(np.mean(list(alone.values())))
            shown["alone (best)"] = float(np.max(list(alone.values())))
        for arm, value in shown.items():
            seeds = len(per.get((h, arm), [0]))
            out.append({"held_out": h, "arm": arm, "probe_auc_macro": value, "seeds": seeds})
    by_arm = {}
    for r in out:
        by_arm.setdefault(r["arm"], []).append(r["probe_auc_macro"])
    for arm, values in by_arm.items():
        if len(values) == len(held_outs):
            out.append({"held_out": "mean", "arm": arm, "probe_auc_macro": float(np.mean(values)),
                        "seeds": out[0]["seeds"]})
    return out


def write_tables(workdir: str, rows, summary, diffs) -> str:
    common.write_csv(rows, os.path.join(workdir, "results.csv"))
    common.write_csv(summary, os.path.join(workdir, "summary.csv"))
    markdown = ("Probe macro-AUC on each held-out site (mean over seeds):\n\n"
                + common.to_markdown(summary))
    if diffs:
        common.write_csv(diffs, os.path.join(workdir, "differences.csv"))
        markdown += ("\nProbe macro-AUC differences on the held-out site's test images "
                     "(paired bootstrap 95% interval):\n\n" + common.to_markdown(diffs))
    markdown += "\nEvery run:\n\n" + common.to_markdown(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown)
    return markdown


def check_loso(config) -> None:
    sites = set(config.federation.sites)
    unknown = [h for h in config.held_out if h not in sites]
    if unknown:
        raise run_config.ConfigError(f"config.held_out names {unknown}, not sites of "
                                     f"config.federation.sites {sorted(sites)}.")
    for h in config.held_out:
        if config.federation.sites[h].get("task") != "classification":
            raise run_config.ConfigError(
                f"config.held_out: site {h!r} has task {config.federation.sites[h].task!r}; "
                "a held-out site is scored by a linear probe of its classification labels.")
    bad = [s for s in config.strategies if s not in FEDERATED_ARMS]
    if bad:
        raise run_config.ConfigError(f"config.strategies {bad}: each must be one of "
                                     f"{list(FEDERATED_ARMS)}.")
    if len(sites) - 1 < 2:
        raise run_config.ConfigError("a leave-one-site-out federation needs >= 3 sites.")
    first = config.held_out[0]
    for strategy in config.strategies:
        simulation.check_federation(federation_for(config, first, strategy, 0))
    if config.mim_baseline:
        train_sites = sorted(sites - {first})
        common.check_sections([("mim", mim_config(config, train_sites, 0, "pool"))])


def run_loso(config, workdir: str) -> list[dict]:
    check_loso(config)
    os.makedirs(workdir, exist_ok=True)
    rows, diffs = [], []
    for seed in config.seeds:
        seed_dir = os.path.join(workdir, f"seed{seed}")
        server_cfg = _copy(config.federation.server)
        server_cfg.seed = seed
        start = server.initial_arrays(server_cfg, config.federation.federated.shared)
        alone = {name: train_alone(config, name, seed, start,
                                   os.path.join(seed_dir, "alone", name))
                 for name in sorted(config.federation.sites)}
        for held_out in config.held_out:
            r, d = run_held_out(config, held_out, seed, start, alone,
                                os.path.join(seed_dir, f"held_out_{held_out}"))
            rows += r
            diffs += d
            summary = summary_rows(rows)
            write_tables(workdir, rows, summary, diffs)  # partial tables as it goes
    markdown = write_tables(workdir, rows, summary_rows(rows), diffs)
    log.info("Leave-one-site-out results (%s):\n%s", workdir, markdown)
    return rows
