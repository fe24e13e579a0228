"""Records/s of the pretraining input pipeline on ArrayRecord shards (`--data`, or the
phantom dataset generated once), per worker process and in total, for each stage on
its own (read: ArrayRecord random access; decode: `records.decode_record`; augment: the
pretraining transform, random resized crop + flip to `--size`, one scale, quantised to
the uint16 the workers ship (the normalisation runs on the device, in the train step);
record: the three chained) and for the grain pipeline of `pipeline.make_pretrain_dataset`
end to end with mp_prefetch workers, consumed as the trainer does. Every process is
pinned to one OpenCV / OpenMP thread, so a worker is one core; `--sweep` measures 1..N
workers and the scaling efficiency (total / (N x one worker)). Next to the wall-clock
rates, "per CPU-second" (records per CPU-second a worker spent) is what one core gives
when others share the host. Target: 1,000 records/s per worker for 448-px uint16
records to 224.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

from tools import cli
from tools.bench import timing

# One process: nothing to share between hosts.
RUNS_ON_EVERY_HOST = False

TARGET_PER_WORKER = 1000  # records/s per worker process (one core)
STAGES = ("read", "decode", "augment", "record")
# Libraries whose thread pools would let one "worker" use several cores.
_ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_DECODED_POOL = 64  # records held in memory for the decode and augment stages


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loader", help="time the input pipeline: read, decode, augment, grain end to end",
        description="Records/s of the pretraining input pipeline, per worker process (one "
                    "core each) and in total: ArrayRecord reads, record decoding, the "
                    "augmentation (random resized crop + flip to --size, quantised to "
                    "uint16: the pretraining transform with one scale), the three "
                    "chained, and the "
                    "grain pipeline of pipeline.make_pretrain_dataset with mp_prefetch "
                    "workers. Stages run in --workers processes at once (each pinned to "
                    "one OpenCV / OpenMP thread); --sweep repeats everything for 1..N.")
    p.add_argument("--data", default=None, metavar="DIR_OR_GLOB",
                   help="ArrayRecord shards (a directory, a glob or one file); default: the "
                        "phantom dataset, generated once under --phantom-dir")
    p.add_argument("--phantom-dir", default=None, metavar="DIR",
                   help="where the phantom shards are generated and cached (default: "
                        "TMPDIR/mimjax_benchmark_data)")
    p.add_argument("--phantom-images", type=int, default=512,
                   help="phantom records (default: %(default)s)")
    p.add_argument("--phantom-size", type=int, default=448,
                   help="phantom image side in pixels (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the schedulable cores)")
    p.add_argument("--sweep", action="store_true", help="measure 1, 2, ..., --workers workers")
    p.add_argument("--size", type=int, default=224,
                   help="output resolution of the augmentation (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds per measurement (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="batch size of the grain pipeline (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="grain read threads per worker process (data.num_threads; default "
                        "%(default)s, so that a worker is one core)")
    p.add_argument("--seed", type=int, default=0, help="shuffle / augmentation seed")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON here")


@contextlib.contextmanager
def _one_thread_env():
    """Sets the thread-pool variables to 1 for the processes started inside (stage
    workers, grain workers), and restores them after."""
    saved = {name: os.environ.get(name) for name in _ONE_THREAD_ENV}
    os.environ.update({name: "1" for name in _ONE_THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _data_paths(args, log) -> tuple[list[str], str]:
    """(shard paths, description of where they came from)."""
    from input_pipeline import records, rendered

    if args.data:
        try:
            return records.list_shards(args.data), args.data
        except (FileNotFoundError, ValueError) as e:
            raise cli.UsageError(f"--data {args.data!r}: {e}. Pass a directory or glob of "
                                 "*.array_record shards, or omit --data for the phantom."
                                 ) from None
    import tempfile

    root = args.phantom_dir or os.path.join(tempfile.gettempdir(), "mimjax_benchmark_data")
    log(f"[loader] phantom dataset: {args.phantom_images} x {args.phantom_size} px under "
        f"{root} (rendered once, then reused)")
    paths = rendered.ensure_phantom_dataset(root, num_images=args.phantom_images, seed=0,
                                            size=args.phantom_size)
    return paths, os.path.dirname(paths[0])


def _describe_records(paths: list[str]) -> dict:
    """Record count, and shape, dtype, size and shard compression of the first record."""
    import grain
    from array_record.python import array_record_module

    from input_pipeline import records

    raw = grain.sources.ArrayRecordDataSource(paths)
    if not len(raw):
        raise cli.UsageError(f"The shards ({paths[0]}, ...) hold no records; pass --data "
                             "with a non-empty dataset.")
    data = raw[0]
    image, meta = records.decode_record(data)
    reader = array_record_module.ArrayRecordReader(paths[0])
    try:
        options = reader.writer_options_string().split(",")
    finally:
        reader.close()
    compression = next((c for c in ("zstd", "snappy", "brotli") if c in options),
                       "uncompressed")
    return {"num_records": len(raw), "image_shape": list(image.shape),
            "dtype": image.dtype.name, "bits_stored": meta.get("bits_stored"),
            "record_kb": len(data) / 1024, "compression": compression}


def _transform_settings(size: int) -> dict:
    """Keyword arguments of the pretraining augmentation (pipeline defaults), one scale,
    with the uint16 output pipeline.make_pretrain_dataset ships."""
    from input_pipeline import pipeline

    c = pipeline.default_data_config()
    return {"scales": (size,), "crop_scale": tuple(c.crop_scale),
            "crop_ratio": tuple(c.crop_ratio), "hflip": bool(c.hflip),
            "mean": float(c.norm_mean), "std": float(c.norm_std), "channels": int(c.channels),
            "quantize": True}


def _time_loop(fn, seconds: float) -> dict:
    """Calls fn(0), fn(1), ... for `seconds` (after a short untimed warm-up)."""
    warm_until = time.perf_counter() + min(0.25, seconds / 4)
    k = 0
    while time.perf_counter() < warm_until:
        fn(k)
        k += 1
    count, cpu, start = 0, time.process_time(), time.perf_counter()
    end = start + seconds
    while True:
        fn(k + count)
        count += 1
        now = time.perf_counter()
        if now >= end:
            break
    wall = now - start
    return {"records_per_s": count / wall, "records": count, "wall_s": wall,
            "cpu_us_per_record": 1e6 * (time.process_time() - cpu) / count}


def data_config(data: str, *, workers: int = 0, threads: int = 1):
    """The pretraining data config (pipeline defaults) reading the shards at `data`."""
    from input_pipeline import pipeline

    cfg = pipeline.default_data_config()
    cfg.update(source="shards", dir=data, num_workers=workers, num_threads=threads)
    return cfg


def measure_stages(data: str, *, size: int, seconds: float, seed: int,
                          barrier=None) -> dict[str, dict]:
    """Records/s of each stage in this process, one stage after the other.

    read: random-access ArrayRecord reads (bytes); decode: records.decode_record of bytes
    held in memory; augment: the pretraining transform (MultiScaleRandomCrop, one scale)
    through grain's random_map on decoded records held in memory; record: the three
    chained as the pipeline chains them (`pipeline.make_record_dataset`), without
    batching. `barrier` (if given) is waited on before each stage so that concurrent
    processes time the same stage together.
    """
    import cv2

    cv2.setNumThreads(1)
    import grain
    import numpy as np

    from input_pipeline import pipeline, records, transforms

    settings = _transform_settings(size)
    augment = transforms.MultiScaleRandomCrop(settings.pop("scales"), **settings)
    raw = grain.sources.ArrayRecordDataSource(records.list_shards(data))
    n = len(raw)
    order = np.random.default_rng(seed).permutation(n)
    pool = [raw[int(i)] for i in order[:_DECODED_POOL]]
    decoded = []
    for i, data_bytes in zip(order, pool):
        image, meta = records.decode_record(data_bytes)
        decoded.append({"image": image, "meta": meta, "index": int(i)})
    augmented = (grain.MapDataset.range(len(decoded)).repeat().map(decoded.__getitem__)
                 .random_map(augment, seed=seed))
    chained = pipeline.make_record_dataset(data_config(data), scales=(size,), seed=seed)
    stages = {
        "read": lambda k: raw[int(order[k % n])],
        "decode": lambda k: records.decode_record(pool[k % len(pool)]),
        "augment": lambda k: augmented[k],
        "record": lambda k: chained[k],
    }
    out = {}
    for name in STAGES:
        if barrier is not None:
            barrier.wait()
        out[name] = _time_loop(stages[name], seconds)
    return out


def _stage_worker(data, size, seconds, seed, barrier, queue) -> None:
    # Runs in a spawned process: report the figures, or the error that stopped them.
    import traceback

    try:
        queue.put(("ok", measure_stages(data, size=size, seconds=seconds, seed=seed,
                                               barrier=barrier)))
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises it
        barrier.abort()
        queue.put(("error", traceback.format_exc()))


def run_stage_processes(data: str, workers: int, *, size: int, seconds: float,
                        seed: int) -> list[dict]:
    """`measure_stages` in `workers` spawned processes at once; one result each."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_stage_worker, daemon=True,
                         args=(data, size, seconds, seed + 1000 * w, barrier, queue))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    results, errors = [], []
    timeout = 120 + 4 * len(STAGES) * seconds
    try:
        for _ in procs:
            status, payload = queue.get(timeout=timeout)
            (results if status == "ok" else errors).append(payload)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise RuntimeError(f"a loader stage worker failed:\n{errors[0]}")
    return results


def measure_pipeline(data: str, *, workers: int, size: int, batch: int, seconds: float,
                            seed: int, threads: int) -> dict:
    """Records/s of pipeline.make_pretrain_dataset (one scale, `workers` mp_prefetch
    processes) as the trainer consumes it, after start-up and after the buffers that
    filled during start-up have been drained."""
    from input_pipeline import pipeline

    cfg = data_config(data, workers=workers, threads=threads)
    start = time.perf_counter()
    it = iter(pipeline.make_pretrain_dataset(cfg, scales=(size,), global_batch_size=batch,
                                             seed=seed))
    try:
        next(it)
        startup = time.perf_counter() - start
        # Drain what was buffered while the others started; then steady state.
        buffered = workers * (int(cfg.prefetch_buffer_size) + 1)
        warm_until = time.perf_counter() + min(1.0, seconds / 2)
        drained = 0
        while drained < buffered or time.perf_counter() < warm_until:
            next(it)
            drained += 1
        ticks = timing.host_cpu_ticks()
        workers_cpu = timing.descendant_cpu_seconds(os.getpid())
        main_cpu, count, begin = time.process_time(), 0, time.perf_counter()
        while True:
            next(it)
            count += 1
            now = time.perf_counter()
            if now - begin >= seconds:
                break
        main_cpu = time.process_time() - main_cpu
        ticks_end = timing.host_cpu_ticks()
        workers_cpu_end = timing.descendant_cpu_seconds(os.getpid())
    finally:
        it.close()
    wall = now - begin
    busy = None
    if ticks and ticks_end and ticks_end[1] > ticks[1]:
        busy = timing.cores() * (ticks_end[0] - ticks[0]) / (ticks_end[1] - ticks[1])
    worker_cpu = sum(workers_cpu_end[p] - workers_cpu[p] for p in workers_cpu_end
                     if p in workers_cpu)
    total = count * batch / wall
    return {"per_worker": total / workers, "total": total,
            # Contention-proof: records per CPU-second the worker processes spent.
            "per_worker_cpu_s": count * batch / worker_cpu if worker_cpu > 0 else None,
            "worker_cpu_cores": worker_cpu / wall, "main_cpu_cores": main_cpu / wall,
            "host_cpu_busy_cores": busy, "batches": count, "wall_s": wall,
            "startup_s": startup}


def _check_args(args, overrides, workers: int) -> None:
    if overrides:
        raise cli.UsageError("loader takes no --config.* overrides (see --help).")
    for name, value in (("--workers", workers), ("--size", args.size), ("--batch", args.batch),
                        ("--threads", args.threads), ("--phantom-images", args.phantom_images),
                        ("--phantom-size", args.phantom_size)):
        if value < 1:
            raise cli.UsageError(f"{name} must be >= 1, got {value}.")
    if not args.seconds > 0:
        raise cli.UsageError(f"--seconds must be > 0, got {args.seconds}.")


def _measure_with_workers(data: str, workers: int, args, log) -> dict:
    """Every stage in `workers` processes at once, then the grain pipeline."""
    per_process = run_stage_processes(data, workers, size=args.size, seconds=args.seconds,
                                      seed=args.seed)
    stages = {}
    for name in STAGES:
        rates = [r[name]["records_per_s"] for r in per_process]
        cpu_us = statistics.fmean(r[name]["cpu_us_per_record"] for r in per_process)
        stages[name] = {"per_worker": statistics.fmean(rates), "total": sum(rates),
                        "per_worker_cpu_s": 1e6 / cpu_us, "per_process": rates,
                        "cpu_us_per_record": cpu_us}
        log(f"[loader] {workers} worker(s) {name}: {stages[name]['per_worker']:.0f} "
            f"records/s per worker, {stages[name]['total']:.0f} total")
    grain_run = measure_pipeline(data, workers=workers, size=args.size,
                                        batch=args.batch, seconds=args.seconds, seed=args.seed,
                                        threads=args.threads)
    log(f"[loader] {workers} worker(s) pipeline: {grain_run['per_worker']:.0f} records/s per "
        f"worker, {grain_run['total']:.0f} total (start-up {grain_run['startup_s']:.1f} s)")
    return {"workers": workers, "stages": stages, "pipeline": grain_run}


def _add_scaling(runs: list[dict]) -> None:
    """scaling = total / (workers x the one-worker total), when one worker was measured."""
    if runs[0]["workers"] != 1:
        return
    for run in runs:
        measured = [(run["stages"][n], runs[0]["stages"][n]) for n in STAGES]
        measured.append((run["pipeline"], runs[0]["pipeline"]))
        for m, one in measured:
            m["scaling"] = m["total"] / (one["total"] * run["workers"])


def run(args, overrides, log) -> dict:
    cores = timing.cores()
    workers = cores if args.workers is None else args.workers
    _check_args(args, overrides, workers)
    paths, source = _data_paths(args, log)
    info = _describe_records(paths)
    if len(info["image_shape"]) != 2:
        raise cli.UsageError(f"--data holds {len(info['image_shape'])}-D records (shape "
                             f"{info['image_shape']}); the pretraining transform timed here "
                             "takes 2-D images.")
    if min(info["image_shape"]) < args.size:
        raise cli.UsageError(f"--size {args.size} exceeds the records' short side (image "
                             f"shape {info['image_shape']}); pick a smaller --size or larger "
                             "images.")
    num_records = info["num_records"]
    if num_records < args.batch:
        raise cli.UsageError(f"{num_records} records cannot fill --batch {args.batch}; pass "
                             "a smaller --batch or more data.")
    log(f"[loader] {num_records} records {info['image_shape']} {info['dtype']} "
        f"({info['compression']}, {info['record_kb']:.0f} KiB) -> {args.size}")
    with _one_thread_env():
        runs = [_measure_with_workers(source, n, args, log)
                for n in (range(1, workers + 1) if args.sweep else [workers])]
    _add_scaling(runs)

    import cv2
    import grain
    import numpy

    settings = _transform_settings(args.size)
    final = runs[-1]["pipeline"]
    per_worker_cpu = final["per_worker_cpu_s"]
    return {
        "benchmark": "loader", "data": source, "num_shards": len(paths), **info,
        "size": args.size, "crop_scale": list(settings["crop_scale"]),
        "crop_ratio": list(settings["crop_ratio"]), "hflip": settings["hflip"],
        "batch": args.batch, "read_threads_per_worker": args.threads,
        "seconds_per_measurement": args.seconds,
        "device": f"cpu ({timing.cpu_name()}, {cores} cores)", "cores": cores,
        "workers": runs[-1]["workers"],
        # The headline: the grain pipeline at the largest worker count, per worker by the
        # clock and per CPU-second a worker spent (the target is per worker = one core).
        "records_per_s_per_worker": final["per_worker"],
        "records_per_worker_cpu_s": per_worker_cpu,
        "records_per_s": final["total"],
        "target_per_worker": TARGET_PER_WORKER,
        "meets_target": max(final["per_worker"], per_worker_cpu or 0) >= TARGET_PER_WORKER,
        "runs": runs,
        "versions": {"grain": getattr(grain, "__version__", None), "numpy": numpy.__version__,
                     "opencv": cv2.__version__},
    }


def format_table(r: dict) -> str:
    rows = [("records / s", "workers", "per worker", "total", "scaling", "per CPU-second")]
    for name in (*STAGES, "pipeline"):
        for run in r["runs"]:
            m = run["pipeline"] if name == "pipeline" else run["stages"][name]
            scaling, per_cpu = m.get("scaling"), m.get("per_worker_cpu_s")
            rows.append((name if name != "pipeline" else "pipeline (grain)", str(run["workers"]),
                         f"{m['per_worker']:.0f}", f"{m['total']:.0f}",
                         "n/a" if scaling is None else f"{100 * scaling:.0f}%",
                         "n/a" if per_cpu is None else f"{per_cpu:.0f}"))
    shape = "x".join(str(s) for s in r["image_shape"])
    lines = [(f"loader | {r['data']} | {r['num_records']} records, {shape} {r['dtype']}, "
              f"{r['compression']}, {r['record_kb']:.0f} KiB each"),
             (f"random resized crop {r['crop_scale'][0]:g}-{r['crop_scale'][1]:g}"
              f"{' + flip' if r['hflip'] else ''} -> {r['size']} uint16 | batch "
              f"{r['batch']} | {r['device']} | {r['seconds_per_measurement']:g} s each")]
    lines += timing.format_rows(rows)
    lines.append("read: ArrayRecord random access; decode: records.decode_record; augment: the "
                 "transform alone; record: the three chained; pipeline: make_pretrain_dataset "
                 "with mp_prefetch workers, as the trainer sees it. per CPU-second: records per "
                 "CPU-second of a worker (what one uncontended core gives)")
    last = r["runs"][-1]["pipeline"]
    usage = (f"workers used {last['worker_cpu_cores']:.2f} cores, the consumer "
             f"{last['main_cpu_cores']:.2f}")
    if last["host_cpu_busy_cores"] is not None:
        usage += f", the whole host {last['host_cpu_busy_cores']:.2f} of {r['cores']}"
    lines.append(f"pipeline with {r['workers']} worker(s): {usage}")
    verdict = "met" if r["meets_target"] else "NOT met"
    per_cpu = r["records_per_worker_cpu_s"]
    lines.append(f"target {r['target_per_worker']} records/s per worker (one core): {verdict} "
                 f"({r['records_per_s_per_worker']:.0f} wall-clock, "
                 f"{'n/a' if per_cpu is None else f'{per_cpu:.0f}'} per worker CPU-second)")
    return "\n".join(lines)
