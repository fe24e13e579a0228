"""What every program in tools/ shares: logging, a user's mistake as one line, and the
`--config FILE[:ARG] --config.KEY=VALUE` command line.

A tool script starts with

    if __package__ in (None, ""):  # `python tools/NAME.py`: put the repo root on sys.path
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools import cli

and its `main(argv=None) -> int` returns `cli.main(build_parser(), body, argv,
user_errors=...)` (parse, logging, then `body(args)`) or, for a body that is no more than
a call, `cli.run(body, user_errors=...)`: the body's exit status, or 2 after one line
`error: MESSAGE` on stderr when the body raises a user's mistake (a bad flag value, a
config field that does not exist, a missing file), so that a person sees what to fix and
not a traceback. Other exceptions are bugs and keep their traceback.

Nothing here imports JAX: `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

# Libraries whose INFO lines would drown what a tool says.
NOISY_LOGGERS = ("absl", "orbax", "jax._src", "grain")


class UsageError(ValueError):
    """A mistake in a tool's command line or inputs; its message says how to fix it."""


def argument_parser(doc: str, epilog: str, **kwargs) -> argparse.ArgumentParser:
    """A tool's argument parser: --help shows the first paragraph of the tool's docstring
    `doc`, the options, then `epilog` (examples and notes) with its line breaks kept."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   **kwargs)


def setup_logging() -> None:
    """INFO lines of mimjax as `LEVEL message`; the noisy libraries at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(body: Callable[[], int | None], *,
        user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """body()'s exit status (None = 0); 2 with one line `error: MESSAGE` on stderr when
    it raises UsageError, mimjax.run_config.ConfigError or one of `user_errors`."""
    from mimjax.run_config import ConfigError

    try:
        status = body()
    except (UsageError, ConfigError, *user_errors) as error:
        message = " ".join(str(error).split("\n"))  # one line, also for wrapped messages
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0 if status is None else status


def main(parser: argparse.ArgumentParser, body: Callable[..., int | None],
         argv: Sequence[str] | None = None, *,
         user_errors: tuple[type[BaseException], ...] = (),
         config_overrides: bool = False) -> int:
    """A tool's whole `main(argv)`: parses `argv` (None: sys.argv[1:]) with `parser`, sets
    up logging and returns `run(body(args))`. With `config_overrides` the command line
    may also hold `--config.KEY=VALUE` (see parse_args), and the body is called as
    `body(args, overrides)`."""

    def parse_then_body():
        if config_overrides:
            args, overrides = parse_args(parser, argv)
            extra = (overrides,)
        else:
            args, extra = parser.parse_args(argv), ()
        setup_logging()
        return body(args, *extra)

    return run(parse_then_body, user_errors=user_errors)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
               ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """(the parsed arguments, the `--config.KEY=VALUE` overrides among them, in order).
    Anything else the parser does not know stops with argparse's usage message."""
    from mimjax import run_config

    overrides, rest = run_config.split_overrides(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(rest), overrides


def load_config(spec: str | None, overrides: Sequence[tuple[str, str]] = (), *,
                workdir: str | None = None):
    """The config of `--config FILE[:ARG]` with the overrides applied (locked: see
    mimjax.run_config.load). Tools whose --config is optional pass `workdir`: without
    --config the overrides apply to the run's WORKDIR/config.json, and with no overrides
    either the result is None (the tool reads the workdir's config itself)."""
    from mimjax import run_config

    if spec is not None:
        return run_config.load(spec, overrides)
    if not overrides:
        return None
    if workdir is None:
        raise UsageError("--config.KEY=VALUE overrides need --config FILE[:ARG].")
    config = run_config.load_run_config(workdir)
    for key, text in overrides:
        run_config.set_value(config, key, text)
    config.lock()
    return config


def checkpoint_options(args: argparse.Namespace, overrides: Sequence[tuple[str, str]]) -> dict:
    """`step`, `config` and `use_ema` keyword arguments (as inference.load_checkpoint takes
    them) from a tool's --workdir, --step, --config and --use-ema and its overrides: the
    one rule for which checkpoint of which run a tool reads."""
    return {
        "step": args.step,
        "config": load_config(args.config, overrides, workdir=args.workdir),
        "use_ema": args.use_ema,
    }
