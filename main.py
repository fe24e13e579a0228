"""mimjax entry point.

    python main.py --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]

Re-running the same command on the same workdir resumes from its latest checkpoint.
Multi-process runs (TPU pods, GPU clusters, local processes) run the same command
in every process; JAX's distributed runtime starts first (mimjax/distributed.py,
tools/launch/README.md).
`--config.key=value` sets any field of the config (lists too: --config.model.scales=[64,128]);
a field that does not exist, or a value out of its range, stops the run at once with
one line naming the field and the fix.
"""

import argparse
import logging
import os
import sys

from mimjax import distributed, host_memory  # light: no JAX until the runtime starts

EPILOG = """\
examples:
  python main.py --config configs/demo.py --workdir workdirs/demo
  python main.py --config configs/finetune_cbis_pathology.py --workdir workdirs/ft \\
      --config.init=workdirs/demo --config.total_steps=600
  python main.py --config configs/experiments/miram_vs_mae.py --workdir workdirs/exp

Every field is documented in configs/pretrain_base.py (and the config file you run).
MIMJAX_DEBUG=1 shows the traceback behind a one-line error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train (pretrain, fine-tune, ...) or run an experiment as a config says.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                        help="config file, e.g. configs/demo.py or configs/demo.py:tiny.")
    parser.add_argument("--workdir", required=True,
                        help="directory for checkpoints, metrics and figures (resumed if it "
                             "holds a checkpoint).")
    distributed.add_arguments(parser)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    # First, before JAX starts: glibc keeps a step's freed buffers for the next step
    # instead of mapping them afresh (mimjax/host_memory.py; MIMJAX_ALLOCATOR=system: off).
    try:
        host_memory.configure()
    except ValueError as error:  # a bad MIMJAX_ALLOCATOR value
        print(f"main.py: {error}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    from mimjax import run_config  # light: no JAX

    parser = build_parser()
    try:
        overrides, rest = run_config.split_overrides(argv)
    except run_config.ConfigError as error:
        parser.error(str(error))
    args = parser.parse_args(rest)
    _setup_logging()
    debug = bool(os.environ.get("MIMJAX_DEBUG"))
    try:  # before anything else touches JAX
        distributed.initialize(distributed.resolve_args(args))
    except distributed.DistributedError as error:
        if debug:
            raise
        logging.error("%s", error)
        return 2
    from mimjax import drivers, train  # after parsing: keeps `--help` fast

    try:
        drivers.run(run_config.load(args.config, overrides), args.workdir)
    except (run_config.ConfigError, distributed.DistributedError) as error:
        if debug:
            raise
        logging.error("%s", error)
        return 2
    except train.NonFiniteLossError as error:
        logging.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":  # required: grain workers start with spawn
    sys.exit(main())
