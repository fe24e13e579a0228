"""Federated runs through Flower for real:
- the Simulation Engine (Ray) with stand-in sites: a corrupt update is refused in a
  real round with its reason logged, the round completes with the other sites
  (FedAvg's weighted mean), the server checkpoints every round and a second run
  resumes after the last complete one;
- the Deployment Engine: a SuperLink and 2 SuperNodes as separate processes on
  localhost (free ports, in-memory state), 2 rounds of the tiny federation with real
  sites training through their own runs, server checkpoints written, every process
  ended, and nothing of the sites' data (images, labels, paths) on the server side.
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from federated_fakes import SITES, make_fake_client_app

from mimjax import run_config
from mimjax.drivers.federated import apps, server

from helpers import REPO

TINY = "configs/federated_demo.py:tiny"


def _server_config(rounds, strategy="fedavg"):
    config = run_config.load(f"{TINY},server")
    c = ml_collections.ConfigDict(config.to_dict())
    c.federated.strategy = strategy
    c.federated.rounds = rounds
    c.federated.min_sites = len(SITES)
    c.server.sites = SITES
    return c


def _simulate(config, workdir, monkeypatch):
    from flwr.simulation import run_simulation

    # Ray's workers import the stand-in sites by module name.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    run_simulation(server_app=apps.make_server_app(config, str(workdir)),
                   client_app=make_fake_client_app(), num_supernodes=len(SITES),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False}})


def _rounds(workdir):
    with open(os.path.join(workdir, "rounds.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_corrupt_update_is_refused_in_a_round_and_the_server_resumes(tmp_path, monkeypatch):
    workdir = tmp_path / "server"
    start = server.initial_arrays(_server_config(2).server, ("encoder",))
    _simulate(_server_config(2), workdir, monkeypatch)
    rounds = _rounds(workdir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["accepted"] == ["site_a", "site_b"]
        (reason,) = r["refused"].values()
        assert "update from site_c refused" in reason and "non-finite" in reason
    assert sorted(os.listdir(workdir / "rounds")) == ["1", "2"]
    # Each round: the accepted sites' weighted mean, site_a (+1, weight 1) and site_b
    # (+2, weight 2): +5/3 per round.
    arrays, _, _ = server.RoundCheckpoints(str(workdir)).restore(2)
    for name, value in start.items():
        np.testing.assert_allclose(arrays[name], value + 2 * 5 / 3, rtol=1e-5, atol=1e-5)

    # A third round in a new server process resumes after round 2.
    _simulate(_server_config(3), workdir, monkeypatch)
    assert [r["round"] for r in _rounds(workdir)] == [1, 2, 3]
    arrays, _, _ = server.RoundCheckpoints(str(workdir)).restore(3)
    for name, value in start.items():
        np.testing.assert_allclose(arrays[name], value + 3 * 5 / 3, rtol=1e-5, atol=1e-5)


def _text_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    yield path, f.read()
            except (UnicodeDecodeError, OSError):
                continue  # binary (arrays, event files)


def test_a_deployed_federation_superlink_and_two_supernodes(tmp_path):
    """tools/federated_local.py: flower-superlink, 2 flower-supernode processes and
    `flwr run`, each site resuming its own run in a new process every round."""
    workdir = tmp_path / "fed"
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", "")]))
    proc = subprocess.run(
        [sys.executable, "tools/federated_local.py", "--config", TINY, "--workdir",
         str(workdir), "--timeout", "600"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = workdir / "logs"
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:],
                                  (logs / "flwr_run.log").read_text()[-4000:])
    rounds = _rounds(workdir / "server")
    assert [r["round"] for r in rounds] == [1, 2]
    config = run_config.load(TINY)
    names = sorted(config.sites)
    for r in rounds:
        assert r["accepted"] == names and r["refused"] == {}
        assert set(r["site_seconds"]) == set(names)
        assert all(np.isfinite(v) for v in r["site_loss"].values())
    assert sorted(os.listdir(workdir / "server" / "rounds")) == ["1", "2"]
    for name in names:  # each site trained 2 rounds x 2 steps through its own run
        with open(workdir / "sites" / name / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f]
        assert max(steps) == 4
    # Every process the tool started has ended: the SuperLink, both SuperNodes and
    # `flwr run`, each with whatever it started in its process group.
    started = json.loads((logs / "processes.json").read_text())
    assert sorted(p["command"] for p in started) == [
        "flower-superlink", "flower-supernode", "flower-supernode", "flwr"]
    groups = {p["pgid"] for p in started}
    table = subprocess.run(["ps", "-eo", "pgid=,stat=,args="], capture_output=True, text=True)
    alive = [line for line in table.stdout.splitlines()
             if int(line.split()[0]) in groups and not line.split()[1].startswith("Z")]
    assert alive == [], alive  # (exited children an init-less container has not reaped: Z)
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout

    # Privacy: nothing of a site's data reaches the server side (its workdir, the
    # SuperLink's and the ServerApp's logs): no site path, no site data folder, no
    # label name; the round records hold site names and fixed numbers only.
    from input_pipeline import sources

    secrets = [str(workdir / "sites")]
    for name in names:
        site = config.sites[name]
        secrets.append(os.path.basename(sources.data_root(site.data)))
        secrets += [str(n) for n in site.finetune.class_names if len(str(n)) > 3]
    server_side = list(_text_files(workdir / "server"))
    server_side += [(str(p), p.read_text()) for p in (logs / "superlink.log",
                                                       logs / "flwr_run.log")]
    assert server_side
    for path, text in server_side:
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {path}"
    for r in rounds:
        assert set(r) <= {"round", "accepted", "refused", "site_seconds", "site_loss",
                          "distill_seconds", "round_seconds"}
    # The server's config has no site section and no site data: its only data is the
    # distillation pool, rendered with a seed no site uses.
    server_cfg = run_config.load(f"{TINY},server")
    assert set(server_cfg) == {"driver", "federated", "server"}
    assert sorted(server_cfg.server.sites) == names  # names only
    flat = json.dumps(server_cfg.to_dict())
    for name in names:
        assert str(workdir / "sites" / name) not in flat
    site_seeds = {int(config.sites[n].data.phantom_seed) for n in names}
    pool_seeds = {int(p.seed) for p in server_cfg.server.distill.data.pool.values()}
    assert not site_seeds & pool_seeds
