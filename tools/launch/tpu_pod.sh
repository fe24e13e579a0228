#!/usr/bin/env bash
# Run mimjax on a Cloud TPU VM pod: every worker runs the same main.py as one process of
# a multi-process JAX run. `tpu_pod.sh --help` lists the subcommands and settings;
# tools/launch/README.md has the whole workflow.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu_pod.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--dry-run]
                  SUBCOMMAND [options] [-- MAIN_PY_ARGS...]

Cloud TPU VM pods through `gcloud compute tpus tpu-vm`: the same `python main.py` on
every worker, one JAX process per worker.

subcommands:
  setup                 copy the committed tree (git archive HEAD) to every worker, make a
                        venv there and pip install -e . "jax[tpu]==<jax pinned in pyproject.toml>"
  run -- ARGS...        start `python main.py ARGS... --distributed=on --coordinator=...`
                        on every worker in the background; worker N logs to
                        ~/mimjax/logs/worker-N.log (appended, so a resumed run keeps its history)
  logs [--dest DIR]     copy every worker's log back to DIR (default logs/NAME)
  tail [--worker N]     follow worker N's log (default 0)
  stop [--grace S]      SIGTERM every main.py (mimjax agrees on a step, saves and exits 0),
                        wait up to S seconds (default 120), then kill -9 main.py and whatever
                        still holds the TPU devices (/dev/accel*, /dev/vfio/*)

options:
  --name NAME           TPU name (env TPU_NAME)
  --zone ZONE           its zone (env TPU_ZONE)
  --project PROJECT     its project (env TPU_PROJECT; default: gcloud's configured project)
  --dry-run             print the commands instead of running them (env DRY_RUN=1)
  --env KEY=VALUE       run: also export KEY=VALUE on every worker (repeatable)

environment:
  COMPILATION_CACHE_DIR     run: adds --config.compilation_cache_dir=DIR (unless the
                            arguments set it); put it where every worker reads and writes
                            (a gs:// bucket or a shared mount) so one compile serves them all
  TPU_COORDINATOR_PORT      coordinator port on worker 0 (default 8476, see below)
  TPU_PYTHON                setup: the worker's Python >= 3.11 for the venv (default python3)
  JAX_VERSION               setup: override the jax[tpu] version read from pyproject.toml
  TPU_NUM_WORKERS           logs: number of workers (default: asked of gcloud ... describe)
  TPU_REMOTE_DIR, TPU_VENV  where the tree and venv live in each worker's home
                            (default mimjax, mimjax-venv)

examples:
  export TPU_NAME=my-v4-32 TPU_ZONE=us-central2-b
  tools/launch/tpu_pod.sh setup
  tools/launch/tpu_pod.sh run -- --config configs/mae_vit_b16.py --workdir /mnt/shared/mae
  tools/launch/tpu_pod.sh logs
  tools/launch/tpu_pod.sh stop
  DRY_RUN=1 tools/launch/tpu_pod.sh run -- --config configs/demo.py --workdir /mnt/w
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
DRY_RUN=${DRY_RUN:-0}
# Pinned rather than left to JAX: JAX's own Cloud TPU default moved from 8476 to 8482
# in 0.8.1, and the firewall rule GCP creates with a pod opens 8476 (with 8470, 8471,
# 8474, 11211) but not 8482, so workers then hang in RegisterTask (jax-ml/jax#35905).
PORT=${TPU_COORDINATOR_PORT:-8476}
REMOTE_DIR=${TPU_REMOTE_DIR:-mimjax}
VENV=${TPU_VENV:-mimjax-venv}
SUBCOMMAND=""
MAIN_ARGS=()
ENV_PAIRS=()
GRACE=${TPU_STOP_GRACE:-120}
WORKER=0
DEST=""

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# One argument as a POSIX-shell word: the worker's login shell re-reads the --command
# string, so every value (spaces, quotes, $) must survive that second parse unchanged.
q() {
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

# A dry run prints each command as bash that runs it; a multi-line --command is shown as a
# here-document so the worker's script reads as written.
run_cmd() {
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
    return
  fi
  local arg line=""
  for arg in "$@"; do
    if [[ $arg == --command=*$'\n'* ]]; then
      # shellcheck disable=SC2016  # the $( ) is meant literally: it is printed
      printf '%s--command="$(cat <<'"'"'REMOTE'"'"'\n%s\nREMOTE\n)" ' "$line" "${arg#--command=}"
      line=""
    else
      line+="$(printf '%q' "$arg") "
    fi
  done
  echo "$line"
}

tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$1" --zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    cmd+=(--project="$PROJECT")
  fi
  run_cmd "${cmd[@]}" "${@:2}"
}

set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --env)
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
      ENV_PAIRS+=("$2")
      ;;
    --grace)
      [[ $2 =~ ^[0-9]+$ ]] || die "--grace wants whole seconds, got '$2'"
      GRACE=$2
      ;;
    --worker)
      [[ $2 =~ ^[0-9]+$ ]] || die "--worker wants a worker number, got '$2'"
      WORKER=$2
      ;;
    --dest) DEST=$2 ;;
  esac
}

while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run)
      DRY_RUN=1
      shift
      ;;
    --name | --zone | --project | --env | --grace | --worker | --dest)
      (($# >= 2)) || die "$1 needs a value"
      set_option "$1" "$2"
      shift 2
      ;;
    --name=* | --zone=* | --project=* | --env=* | --grace=* | --worker=* | --dest=*)
      set_option "${1%%=*}" "${1#*=}"
      shift
      ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    -*) die "unknown option $1 (main.py arguments go after --; see --help)" ;;
    *)
      [[ -z $SUBCOMMAND ]] || die "one subcommand at a time (got '$SUBCOMMAND' and '$1')"
      SUBCOMMAND=$1
      shift
      ;;
  esac
done

case $SUBCOMMAND in
  setup | run | logs | tail | stop) ;;
  "") die "no subcommand: setup, run, logs, tail or stop (see --help)" ;;
  *) die "unknown subcommand '$SUBCOMMAND': setup, run, logs, tail or stop (see --help)" ;;
esac
[[ -n $NAME ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
[[ -n $ZONE ]] || die "no TPU zone: pass --zone ZONE or set TPU_ZONE"
if [[ $SUBCOMMAND != run && ${#MAIN_ARGS[@]} -gt 0 ]]; then
  die "only run takes main.py arguments (after --)"
fi

# The jax[tpu] version is the one pyproject.toml's range starts from, the version the
# test suite ran on, so every worker runs what was tested.
jax_version() {
  local v
  v=${JAX_VERSION:-$(sed -n 's/^[[:space:]]*"jax>=\([0-9][0-9.]*\).*/\1/p' \
    "$REPO/pyproject.toml" | head -n 1)}
  [[ -n $v ]] || die "no \"jax>=X\" in $REPO/pyproject.toml; set JAX_VERSION"
  echo "$v"
}

setup_script() {
  cat <<EOF
set -e
cd "\$HOME"
py=$(q "${TPU_PYTHON:-python3}")
dir=$(q "$REMOTE_DIR")
venv=$(q "$VENV")
jax_req=$(q "jax[tpu]==$1")
EOF
  cat <<'EOF'
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "$(hostname): mimjax needs Python >= 3.11 and $py is not (set TPU_PYTHON, e.g." \
    "python3.11 after: sudo apt-get install -y python3.11 python3.11-venv)" >&2
  exit 1
fi
# A fresh tree, so files deleted since the last setup do not linger; logs are kept.
rm -rf "$dir.new"
mkdir "$dir.new"
tar -xzf mimjax.tar.gz -C "$dir.new"
rm -f mimjax.tar.gz
if [ -d "$dir/logs" ]; then mv "$dir/logs" "$dir.new/logs"; fi
rm -rf "$dir"
mv "$dir.new" "$dir"
if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi
"$HOME/$venv/bin/python" -m pip install --quiet --upgrade pip
cd "$dir"
"$HOME/$venv/bin/python" -m pip install --quiet -e . "$jax_req"
echo "$(hostname): ready ($("$HOME/$venv/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
EOF
}

has_cache_flag() {
  local arg
  for arg in "$@"; do
    case $arg in
      --config.compilation_cache_dir | --config.compilation_cache_dir=*) return 0 ;;
    esac
  done
  return 1
}

# Coordinator and process id are passed explicitly (not left to JAX's detection) so
# the port is the pinned one above and each worker's log states what it joined with.
# Both come from the metadata server, the source JAX's own Cloud TPU detection reads:
# agent-worker-number is this worker's index, worker-network-endpoints lists the workers
# in that order (hostnames, or name:id:ip triples in older images; the address is the
# last field either way). Written for any POSIX shell; it must not contain the text
# "python main.py", or the pgrep below would find the very shell running it.
run_script() {
  local args=() pair
  if [[ -n ${COMPILATION_CACHE_DIR:-} ]] && ! has_cache_flag "${MAIN_ARGS[@]}"; then
    args+=("--config.compilation_cache_dir=$COMPILATION_CACHE_DIR")
  fi
  args+=("${MAIN_ARGS[@]}")
  echo "set -e"
  printf 'dir=%s\nvenv=%s\nport=%s\n' "$(q "$REMOTE_DIR")" "$(q "$VENV")" "$(q "$PORT")"
  printf 'set --'
  for pair in "${args[@]}"; do
    printf ' %s' "$(q "$pair")"
  done
  echo
  echo "export PYTHONUNBUFFERED=1"
  for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
    printf 'export %s=%s\n' "${pair%%=*}" "$(q "${pair#*=}")"
  done
  cat <<'EOF'
cd "$HOME/$dir"
md() {
  curl -sf -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}
id=$(md agent-worker-number) || {
  echo "$(hostname): no agent-worker-number from the metadata server" >&2; exit 1; }
endpoints=$(md worker-network-endpoints) || {
  echo "$(hostname): no worker-network-endpoints from the metadata server" >&2; exit 1; }
first=${endpoints%%,*}
coordinator=${first##*:}
n=$(printf '%s\n' "$endpoints" | tr ',' '\n' | grep -c .)
if pgrep -f '[p]ython main\.py' >/dev/null; then
  echo "worker $id: a mimjax run is still running here; tpu_pod.sh stop ends it" >&2
  exit 1
fi
mkdir -p logs
log="logs/worker-$id.log"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $id of $n, coordinator $coordinator:$port" >>"$log"
py="$HOME/$venv/bin/python"
setsid nohup "$py" main.py --distributed=on --coordinator="$coordinator:$port" \
  --num-processes="$n" --process-id="$id" "$@" </dev/null >>"$log" 2>&1 &
echo "worker $id: started (pid $!), log ~/$dir/$log"
EOF
}

stop_script() {
  printf 'grace=%s\n' "$GRACE"
  cat <<'EOF'
pkill -TERM -f '[p]ython main\.py' || true
waited=0
while [ "$waited" -lt "$grace" ] && pgrep -f '[p]ython main\.py' >/dev/null; do
  sleep 1
  waited=$((waited + 1))
done
pkill -KILL -f '[p]ython main\.py' || true
# Anything else still holding the chips (a crashed run's orphans, a notebook) would make
# the next run fail with "TPU in use".
pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null || true)
# shellcheck disable=SC2086  # one pid per word
if [ -n "$pids" ]; then sudo kill -9 $pids; fi
echo "$(hostname): stopped"
EOF
}

num_workers() {
  if [[ -n ${TPU_NUM_WORKERS:-} ]]; then
    echo "$TPU_NUM_WORKERS"
  elif [[ $DRY_RUN == 1 ]]; then
    tpu describe "$NAME" --format='value(networkEndpoints.len())' >&2
    echo "tpu_pod.sh: dry run: showing worker 0 only (set TPU_NUM_WORKERS)" >&2
    echo 1
  else
    tpu describe "$NAME" --format='value(networkEndpoints.len())'
  fi
}

case $SUBCOMMAND in
  setup)
    version=$(jax_version)
    tarball="${TMPDIR:-/tmp}/mimjax-$$.tar.gz"
    if [[ $DRY_RUN != 1 ]]; then
      trap 'rm -f "$tarball"' EXIT
      if [[ -n $(git -C "$REPO" --no-optional-locks status --porcelain --untracked-files=no) ]]; then
        echo "tpu_pod.sh: warning: uncommitted changes are not copied (git archive HEAD)" >&2
      fi
    fi
    run_cmd git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
    tpu scp "$tarball" "$NAME:mimjax.tar.gz" --worker=all
    tpu ssh "$NAME" --worker=all --command="$(setup_script "$version")"
    ;;
  run)
    ((${#MAIN_ARGS[@]})) ||
      die "run needs main.py arguments after --, e.g. run -- --config configs/demo.py --workdir DIR"
    tpu ssh "$NAME" --worker=all --command="$(run_script)"
    ;;
  logs)
    dest=${DEST:-logs/$NAME}
    n=$(num_workers)
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || die "cannot tell how many workers $NAME has (got '$n')"
    run_cmd mkdir -p "$dest"
    # gcloud copies from one worker at a time; the names differ, so they share one folder.
    for ((w = 0; w < n; w++)); do
      tpu scp "$NAME:$REMOTE_DIR/logs/worker-*.log" "$dest/" --worker="$w" ||
        echo "tpu_pod.sh: no log copied from worker $w" >&2
    done
    ;;
  tail)
    tpu ssh "$NAME" --worker="$WORKER" \
      --command="tail -n 100 -F $(q "$REMOTE_DIR")/logs/worker-*.log"
    ;;
  stop)
    tpu ssh "$NAME" --worker=all --command="$(stop_script)"
    ;;
esac
