"""mimjax entry point: `python main.py --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value]`.

Re-running the same command on the same workdir resumes from its latest checkpoint.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mimjax import train  # after flags: keeps `--help` fast

    try:
        if FLAGS.config.get("task") == "experiment":  # several runs and a table
            from mimjax import experiment

            experiment.run_experiment(FLAGS.config, FLAGS.workdir)
        else:
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.NonFiniteLossError as error:
        logging.error("%s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":  # required: grain workers start with spawn
    app.run(main)
