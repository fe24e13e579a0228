"""Runs a federation config on this machine through Flower's Deployment Engine: one
`flower-superlink`, one `flower-supernode` per site, each a separate process, and
`flwr run` of tools/federated_app. The same processes as a real deployment, on
localhost and insecure (no TLS, no node authentication); README, "Federated
training", gives the commands for real sites.

    python tools/federated_local.py --config configs/federated_demo.py --workdir W

Writes W/server/ (round checkpoints, rounds.jsonl), W/sites/NAME/ (each site's run),
W/logs/ (superlink.log, supernode_NAME.log, flwr_run.log, processes.json) and W/flwr_home/ (Flower's
client configuration, so nothing is written under ~/.flwr). The SuperLink keeps its
state in memory and installs no dependencies; Flower's telemetry and update check
are off. Every
process is ended by its pid when the run ends, fails or times out. Re-running the
command resumes: the server from its last complete round, each site from its own
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "tools" / "federated_app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_arg(spec: str, extra: str) -> str:
    """'configs/x.py' + 'server' -> 'configs/x.py:server'; 'configs/x.py:tiny' ->
    'configs/x.py:tiny,server'."""
    path, sep, arg = spec.partition(":")
    path = str(Path(path).resolve())
    return f"{path}:{arg},{extra}" if sep and arg else f"{path}:{extra}"


def site_names(spec: str) -> list[str]:
    sys.path.insert(0, str(REPO))
    from mimjax import run_config

    config = run_config.load_file(spec)
    return sorted(config.sites)


def toml_string(value: str) -> str:
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} at start-up.")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s.")


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _start(cmd, log_path: Path, env) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(processes, grace: float = 10.0) -> None:
    """SIGTERM to each process group, SIGKILL after `grace` seconds."""
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(spec: str, workdir: str, timeout: float, sites: list[str] | None = None) -> int:
    work = Path(workdir).resolve()
    logs, home = work / "logs", work / "flwr_home"
    logs.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    names = sites or site_names(spec)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    processes = []
    try:
        processes.append(_start(
            [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--port", str(link_port)], logs / "superlink.log", env))
        wait_for_port(link_port, processes[0], 60, f"the SuperLink (log: {logs}/superlink.log)")
        for name in names:
            node = " ".join([f"site={toml_string(name)}",
                             f"config={toml_string(with_arg(spec, 'site=' + name))}",
                             f"workdir={toml_string(work / 'sites' / name)}"])
            processes.append(_start(
                [_bin("flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{link_port}", "--port", str(free_port()), "--node-config", node,
                 "--max-retries", "10"], logs / f"supernode_{name}.log", env))
        run_config = " ".join([f"config={toml_string(with_arg(spec, 'server'))}",
                               f"workdir={toml_string(work / 'server')}"])
        cmd = [_bin("flwr"), "run", str(APP_DIR), "local", "--run-config", run_config,
               "--stream"]
        with open(logs / "flwr_run.log", "w") as log:
            flwr = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(REPO), start_new_session=True)
            processes.append(flwr)
            try:
                code = flwr.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"federated_local: the run did not end within {timeout:.0f} s; stopped "
                      f"(logs in {logs}).", file=sys.stderr)
                return 124
        return code
    finally:
        stop(processes)
        # What was started, by process group (each process leads its own), so a caller
        # can check that nothing is left.
        (logs / "processes.json").write_text(json.dumps(
            [{"pgid": p.pid, "command": os.path.basename(str(p.args[0]))} for p in processes]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                        help="a federation config (e.g. configs/federated_demo.py): its "
                             "':server' part runs at the server, ':site=NAME' at each site.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds the whole run may take (default 3600).")
    args = parser.parse_args(argv)
    code = run(args.config, args.workdir, args.timeout)
    rounds = Path(args.workdir) / "server" / "rounds.jsonl"
    done = len(rounds.read_text().splitlines()) if rounds.exists() else 0
    print(f"federated_local: flwr run exited {code}; {done} round(s) recorded in {rounds}.")
    return code


if __name__ == "__main__":
    sys.exit(main())
