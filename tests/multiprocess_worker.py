"""One process of the multi-process tests (tests/test_multiprocess.py).

    python tests/multiprocess_worker.py DUMP_DIR NUM_BATCHES -- MAIN_PY_ARGS...

Starts JAX's distributed runtime as main.py would (its flags among MAIN_PY_ARGS),
writes the first NUM_BATCHES batches this process's training pipeline gives to
DUMP_DIR/batches_p{process index}.npz, then runs main.py's program with the same
arguments in this process. The dump comes from a separate iterator over the same
pipeline the run builds (both start at stream position 0), so the test can check
that the processes' batches together are the one-process batch.
"""

import os
import sys

import numpy as np


def dump_batches(config, directory: str, num_batches: int) -> None:
    import jax

    from mimjax import distributed, tasks

    data = distributed.chief_first(lambda: tasks.for_config(config).train_data(
        config, process_index=jax.process_index(), process_count=jax.process_count()), "data")
    iterator = iter(data.dataset)
    batches = [next(iterator) for _ in range(num_batches)]
    if hasattr(iterator, "close"):
        iterator.close()
    arrays = {f"{k}_{i}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()
              if isinstance(v, np.ndarray)}
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, f"batches_p{jax.process_index()}.npz"), **arrays)


def main(argv) -> int:
    split = argv.index("--")
    directory, num_batches = argv[0], int(argv[1])
    main_args = argv[split + 1:]
    import main as entry
    from mimjax import distributed, run_config

    overrides, rest = run_config.split_overrides(main_args)
    args = entry.build_parser().parse_args(rest)
    entry._setup_logging()
    distributed.initialize(distributed.resolve_args(args))
    dump_batches(run_config.load(args.config, overrides), directory, num_batches)
    from mimjax import drivers

    drivers.run(run_config.load(args.config, overrides), args.workdir)
    return 0


if __name__ == "__main__":  # required: grain workers start with spawn
    sys.exit(main(sys.argv[1:]))
