"""The resumable, parallel conversion of `ManifestRow`s into de-identified shards.

Output layout (OUTPUT = `output_dir`):

  OUTPUT/{split}/data-{i:05d}-of-{n:05d}.array_record   the records (shareable)
  OUTPUT/rejected.jsonl   one JSON object per rejected file, frame or manifest
                          row: {"path", "source", "reason"[, "frame"]}
  OUTPUT/summary.json     counts per split, rejections by reason, options
  OUTPUT/plan.json        shard -> rows assignment and the options hash; a rerun
                          with other inputs or options stops unless overwrite
  OUTPUT/.done/{split}-{i:05d}.json   per-shard completion marker (counts and
                          rejections), written after the shard is renamed in
  OUTPUT/.deid_salt       the generated salt (mode 0600), when none was given
  OUTPUT/.lock            held while a run writes (one run per folder at a time)

Only the split folders are meant to leave the machine: plan.json,
rejected.jsonl and the markers name input paths, and the salt is a secret.

Per row, in a worker process: `convert.convert_row` (what a record holds).

Resume: shards are planned deterministically (rows in input order, split by
split, `rows_per_shard` rows a shard). A shard whose file and marker both exist
is skipped, so rerunning the same command after a crash or a kill finishes the
rest; rejected.jsonl and summary.json are rebuilt from the markers each run.
A shard appears only by rename after it is complete, so a killed run never
leaves a partial shard under a shard name.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from input_pipeline import records
from input_pipeline.ingest import manifest
from input_pipeline.ingest.convert import RowTask, convert_row
from input_pipeline.ingest.manifest import ManifestRow

FORMAT_VERSION = 1
SHARD_NAME = "data"
SALT_FILE = ".deid_salt"
SALT_ENV = "MIMJAX_DEID_SALT"
DONE_DIR = ".done"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
REJECTED_FILE = "rejected.jsonl"
_LOCK_FILE = ".lock"
DEFAULT_ROWS_PER_SHARD = 256
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


class StrictModeError(RuntimeError):
    """Raised in strict mode at the first rejection; the message is its reason."""


class PlanMismatchError(RuntimeError):
    """The output folder holds a run of other inputs or options."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that changes the records (workers and strictness do not)."""

    size: int | None = 512
    window: Any = "auto"  # "auto" | "minmax" | "percentile" | (center, width)
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    fractions: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    split_seed: int = 0
    compression: str = "uncompressed"

    def to_json(self) -> dict:
        window = list(self.window) if isinstance(self.window, (tuple, list)) else self.window
        return {
            "format_version": FORMAT_VERSION,
            "size": self.size,
            "window": window,
            "rows_per_shard": self.rows_per_shard,
            "split_fractions": self.fractions,
            "split_seed": self.split_seed,
            "compression": self.compression,
        }


@dataclasses.dataclass
class Summary:
    """What a run produced (also written to OUTPUT/summary.json)."""

    output_dir: str
    splits: dict[str, dict[str, int]]  # split -> rows, records, shards, rejected
    rows: int
    records: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards_written: int  # in this run
    shards_reused: int  # complete from an earlier run
    seconds: float
    options: dict
    ignored_files: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out

    def format(self) -> str:
        """A few human-readable lines for the console."""
        lines = [f"prepared {self.output_dir}: {self.records} records from {self.rows} rows"]
        for split, c in self.splits.items():
            lines.append(
                f"  {split:>8}: {c['records']} records, {c['rows']} rows, {c['shards']} shards, "
                f"{c['rejected']} rejected"
            )
        lines.append(
            f"  shards written {self.shards_written}, reused {self.shards_reused}, "
            f"{self.seconds:.1f} s"
        )
        if self.ignored_files:
            lines.append(f"  files ignored (not images), by extension: {self.ignored_files}")
        if self.rejected:
            lines.append(
                f"  rejected {self.rejected} (listed in "
                f"{os.path.join(self.output_dir, REJECTED_FILE)}):"
            )
            for reason, n in sorted(self.rejected_by_reason.items(), key=lambda x: -x[1]):
                lines.append(f"    {n:6d}  {reason}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- salt
def resolve_salt(output_dir: str, salt: str | None = None, log: Callable | None = None) -> str:
    """The de-identification salt: `salt`, else $MIMJAX_DEID_SALT, else the one
    stored in OUTPUT/.deid_salt, else a new random one stored there (mode 0600)."""
    log = log or _log
    if salt:
        return salt
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = os.path.join(output_dir, SALT_FILE)
    if not os.path.exists(path):
        os.makedirs(output_dir, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # a concurrent run made it first; read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            log(f"generated a de-identification salt in {path}")
    with open(path) as f:
        value = f.read().strip()
    if not value:
        raise ValueError(f"{path} is empty; delete it (a new salt is made) or pass --salt")
    log(
        f"WARNING: patient hashes are salted with {path}. Keep it secret and out of "
        "any shared copy of this folder (share only the split folders); keep it (or "
        f"set ${SALT_ENV}) to get the same hashes in later runs."
    )
    return value


def _salt_fingerprint(salt: str) -> str:
    # Lets a rerun detect a different salt without storing the salt.
    return hashlib.sha256(f"mimjax-salt-check\x1f{salt}".encode()).hexdigest()[:16]


def salted_id(kind: str, value: str, salt: str) -> str:
    """Keyed, non-reversible id of a path or other identifying string, e.g.
    salted_id("source", "a/b.dcm", salt) -> "s_" + 16 hex."""
    digest = hmac.new(salt.encode(), f"{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0]}_{digest[:16]}"


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass
class ShardPlan:
    split: str
    index: int
    count: int
    rows: list[int]  # indices into the planned rows, in record order
    digest: str  # of the rows' content: a marker from other rows never counts

    @property
    def name(self) -> str:
        return os.path.basename(records.shard_path("", SHARD_NAME, self.index, self.count))

    def path(self, output_dir: str) -> str:
        return records.shard_path(
            os.path.join(output_dir, self.split), SHARD_NAME, self.index, self.count
        )

    def marker(self, output_dir: str) -> str:
        return os.path.join(output_dir, DONE_DIR, f"{self.split}-{self.index:05d}.json")


def _sha(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _relative(path: str, base_dir: str | None) -> str:
    return os.path.relpath(path, base_dir) if base_dir else path


def _row_digest(row: ManifestRow, patient: str, base_dir: str | None) -> str:
    def rel(p):
        return _relative(p, base_dir)

    return _sha(
        {
            "path": rel(row.path),
            "patient": patient,
            "split": row.split,
            "labels": row.labels,
            "report": row.report,
            "landmarks": row.landmarks,
            "masks": {k: rel(v) for k, v in row.mask_paths.items()},
            "channels": [rel(p) for p in row.channel_paths],
            "channel_names": row.channel_names,
            "options": row.options,
        }
    )


def _split_order(split: str) -> tuple[int, str]:
    known = manifest.SPLIT_NAMES
    return (known.index(split), "") if split in known else (len(known), split)


def plan_shards(
    rows: list[ManifestRow], digests: list[str], rows_per_shard: int
) -> list[ShardPlan]:
    """Rows (with splits) -> shards: per split in input order, `rows_per_shard`
    rows each. The same rows and options always give the same plan."""
    by_split: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_split.setdefault(row.split, []).append(i)
    shards = []
    for split in sorted(by_split, key=_split_order):
        indices = by_split[split]
        count = math.ceil(len(indices) / rows_per_shard)
        for k in range(count):
            chunk = indices[k * rows_per_shard : (k + 1) * rows_per_shard]
            shards.append(ShardPlan(split, k, count, chunk, _sha([digests[i] for i in chunk])))
    return shards


def _plan_json(options: Options, salt: str, digests: list[str], shards: list[ShardPlan]) -> dict:
    opts = options.to_json()
    fingerprint = _salt_fingerprint(salt)
    return {
        "format_version": FORMAT_VERSION,
        "options": opts,
        "salt_fingerprint": fingerprint,
        "options_hash": _sha([opts, fingerprint])[:16],
        "rows": len(digests),
        "inputs_digest": _sha(digests)[:16],
        "shards": [
            {
                "split": s.split,
                "index": s.index,
                "count": s.count,
                "rows": s.rows,
                "digest": s.digest[:16],
            }
            for s in shards
        ],
    }


def _plan_difference(old: dict, new: dict) -> str:
    problems = []
    old_opts, new_opts = old.get("options", {}), new["options"]
    changed = sorted(k for k in set(old_opts) | set(new_opts) if old_opts.get(k) != new_opts.get(k))
    for k in changed:
        problems.append(f"option {k}: {old_opts.get(k)!r} then, {new_opts.get(k)!r} now")
    if old.get("salt_fingerprint") != new["salt_fingerprint"]:
        problems.append(
            f"a different de-identification salt (--salt / $MIMJAX_DEID_SALT / {SALT_FILE})"
        )
    if old.get("inputs_digest") != new["inputs_digest"]:
        old_digests = {(s["split"], s["index"], s["count"]): s["digest"] for s in old["shards"]}
        differ = sum(
            old_digests.get((s["split"], s["index"], s["count"])) != s["digest"]
            for s in new["shards"]
        )
        problems.append(
            f"different input rows ({old.get('rows')} then, {new['rows']} now; "
            f"{differ} of {len(new['shards'])} planned shards differ)"
        )
    return "; ".join(problems) or "a different plan"


# ----------------------------------------------------------------------------- output folder
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: str, value: Any, indent: int | None = None) -> None:
    """Atomic: a reader (or a rerun after a kill) sees the old file or the new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent, separators=None if indent else (",", ":"))
        f.write("\n")
    os.replace(tmp, path)


def _managed_shards(output_dir: str) -> list[str]:
    pattern = os.path.join(
        glob.escape(output_dir), "*", f"{SHARD_NAME}-*-of-*{records.SHARD_SUFFIX}"
    )
    return glob.glob(pattern)


def _remove_temporaries(output_dir: str) -> None:
    # Left by a killed run: hidden write_shard temporaries and half-written JSON.
    patterns = [
        os.path.join(glob.escape(output_dir), "*", f".{SHARD_NAME}-*{records.SHARD_SUFFIX}.*.tmp"),
        os.path.join(glob.escape(output_dir), DONE_DIR, "*.tmp"),
        os.path.join(glob.escape(output_dir), "*.json*.tmp"),
    ]
    for pattern in patterns:
        for path in glob.glob(pattern):
            os.remove(path)


def _prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses a non-empty folder this engine did not write (unless overwrite);
    with overwrite, deletes what an earlier run wrote (the salt file stays)."""
    if not os.path.isdir(output_dir):
        os.makedirs(output_dir, exist_ok=True)
        return
    ours = {SALT_FILE, DONE_DIR, PLAN_FILE, SUMMARY_FILE, REJECTED_FILE, _LOCK_FILE}
    if not os.path.exists(os.path.join(output_dir, PLAN_FILE)) and not overwrite:
        foreign = sorted(e for e in os.listdir(output_dir) if e not in ours)
        if foreign:
            raise PlanMismatchError(
                f"output folder {output_dir} is not empty ({len(foreign)} entries, e.g. "
                f"{foreign[:3]}) and was not written by this tool (no {PLAN_FILE}); choose a "
                "new folder, or pass --overwrite to write into it (its data-* shards are deleted)"
            )
    if overwrite:
        for path in _managed_shards(output_dir):
            os.remove(path)
        shutil.rmtree(os.path.join(output_dir, DONE_DIR), ignore_errors=True)
        for name in (PLAN_FILE, SUMMARY_FILE, REJECTED_FILE):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))


class _OutputLock:
    """One run at a time per output folder (released by the OS, even on SIGKILL)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, _LOCK_FILE)
        self.file = None

    def __enter__(self):
        import fcntl  # pylint: disable=g-import-not-at-top

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            raise PlanMismatchError(
                f"another run is writing {os.path.dirname(self.path)} (it holds {self.path}); "
                "wait for it to finish or stop it"
            ) from e
        return self

    def __exit__(self, *exc):
        self.file.close()


def _read_marker(shard: ShardPlan, output_dir: str, options_hash: str) -> dict | None:
    """The shard's completion marker, if the shard is complete for this plan."""
    try:
        with open(shard.marker(output_dir)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if (
        marker.get("digest") != shard.digest
        or marker.get("options_hash") != options_hash
        or not os.path.isfile(shard.path(output_dir))
    ):
        return None
    return marker


# ----------------------------------------------------------------------------- workers
def _init_worker(parent_pid: int) -> None:
    # One process per core already; OpenCV's own thread pool would oversubscribe.
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)

    # A parent killed with SIGKILL cannot stop its pool; don't linger as orphans.
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class _Executor:
    """Ordered lazy map: in this process for workers == 1, else a spawn Pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.workers, _init_worker, (os.getpid(),))
        return self

    def map(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        if self.pool is None:
            return map(fn, items)
        return self.pool.imap(fn, items, chunksize=chunksize)

    def __exit__(self, *exc):
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


# ----------------------------------------------------------------------------- the run
def _reason_category(reason: str) -> str:
    return reason.split(":", 1)[0].strip()[:80]


def _check_options(options: Options) -> None:
    if options.size is not None and (not isinstance(options.size, int) or options.size < 8):
        raise ValueError(
            f"size must be an integer >= 8 (or None to keep sizes), got {options.size!r}"
        )
    if not isinstance(options.rows_per_shard, int) or options.rows_per_shard < 1:
        raise ValueError(
            f"rows_per_shard must be a positive integer, got {options.rows_per_shard!r}"
        )
    if options.compression not in records.COMPRESSIONS:
        raise ValueError(
            f"compression must be one of {records.COMPRESSIONS}, got {options.compression!r}"
        )
    window = options.window
    if isinstance(window, (tuple, list)):
        if len(window) != 2 or not float(window[1]) > 0:
            raise ValueError(f"window must be (center, width) with width > 0, got {window!r}")
    elif window not in ("auto", "minmax", "percentile"):
        raise ValueError(
            f"window must be 'auto', 'minmax', 'percentile' or (center, width), got {window!r}"
        )
    manifest.check_fractions(options.fractions)


def ingest(
    rows: list[ManifestRow],
    output_dir: str,
    *,
    size: int | None = 512,
    window: Any = "auto",
    workers: int | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    salt: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    fractions: dict[str, float] | None = None,
    split_seed: int = 0,
    compression: str = "uncompressed",
    rejected_rows: Iterable[dict] = (),
    base_dir: str | None = None,
    ignored_files: dict[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Converts `rows` into OUTPUT/{split}/ shards (see the module docstring).

    size: output side (aspect-preserving resize, then pad to size x size), or
      None to keep each image's size. window: see `preprocess.to_unit_interval`.
    workers: processes (default min(cores, 8)); 1 runs everything here.
    salt: de-identification salt (default $MIMJAX_DEID_SALT, else OUTPUT/.deid_salt).
    strict: raise StrictModeError at the first rejection instead of going on.
    overwrite: start over in a folder holding another plan.
    fractions: {split: fraction} for rows without an explicit split (default
      0.8/0.1/0.1 train/val/test), drawn per patient (manifest.assign_splits).
    rejected_rows: manifest rows that could not be read ({"source", "reason"}),
      listed in rejected.jsonl with the rest.
    base_dir: folder the inputs are relative to (for source_id and the plan's
      input digest, so a moved dataset still resumes).
    Raises PlanMismatchError if OUTPUT holds a run of other inputs or options.
    """
    start = time.time()
    log = log or _log
    options = Options(
        size=size,
        window=tuple(window) if isinstance(window, list) else window,
        rows_per_shard=rows_per_shard,
        fractions=dict(fractions or DEFAULT_FRACTIONS),
        split_seed=split_seed,
        compression=compression,
    )
    _check_options(options)
    rejected_rows = [dict(r) for r in rejected_rows]
    if strict and rejected_rows:
        first = rejected_rows[0]
        raise StrictModeError(f"{first.get('source') or first.get('path')}: {first['reason']}")
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    with _OutputLock(output_dir):
        _prepare_output_dir(output_dir, overwrite)
        salt = resolve_salt(output_dir, salt, log)
        with _Executor(min(workers, max(len(rows), 1))) as executor:
            key_of = functools.partial(manifest.patient_key, base_dir=base_dir)
            keys = list(executor.map(key_of, rows, chunksize=16))
            rows = manifest.assign_splits(rows, options.fractions, options.split_seed, keys=keys)
            patients = [_patient_hash(k, salt) for k in keys]
            digests = [_row_digest(r, p, base_dir) for r, p in zip(rows, patients)]
            shards = plan_shards(rows, digests, options.rows_per_shard)
            plan = _plan_json(options, salt, digests, shards)
            _check_or_write_plan(output_dir, plan, overwrite)
            _remove_temporaries(output_dir)
            _remove_stale_shards(output_dir, shards)
            options_hash = plan["options_hash"]
            pending = [s for s in shards if _read_marker(s, output_dir, options_hash) is None]
            tasks = (
                RowTask(
                    row=rows[i],
                    split=rows[i].split,
                    patient=patients[i],
                    source_id=salted_id("source", _relative(rows[i].path, base_dir), salt),
                    size=options.size,
                    window=options.window,
                )
                for shard in pending
                for i in shard.rows
            )
            results = executor.map(convert_row, tasks)
            _write_pending(
                pending, rows, results, output_dir, options, options_hash, strict, progress
            )
        summary = _finish(
            output_dir,
            shards,
            rejected_rows,
            options,
            options_hash,
            start,
            shards_written=len(pending),
            ignored_files=ignored_files or {},
        )
    return summary


def _patient_hash(key: str, salt: str) -> str:
    from input_pipeline.ingest import deid  # pylint: disable=g-import-not-at-top

    # "id:X" keys hash the bare id, so the hash matches deid.hash_patient_id(X, salt).
    return deid.hash_patient_id(key.removeprefix("id:"), salt)


def _check_or_write_plan(output_dir: str, plan: dict, overwrite: bool) -> None:
    path = os.path.join(output_dir, PLAN_FILE)
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = {}
        same = (old.get("options_hash"), old.get("inputs_digest")) == (
            plan["options_hash"],
            plan["inputs_digest"],
        )
        if not same:
            raise PlanMismatchError(
                f"{output_dir} was prepared with other inputs or options: "
                f"{_plan_difference(old, plan)}. Rerun the original command to finish it, "
                "choose another output folder, or pass --overwrite to start over."
            )
        return
    _write_json(path, plan)


def _remove_stale_shards(output_dir: str, shards: list[ShardPlan]) -> None:
    # data-* shards this plan does not name (another shard count) would make
    # list_shards see an incomplete set; only possible after manual edits.
    planned = {os.path.abspath(s.path(output_dir)) for s in shards}
    for path in _managed_shards(output_dir):
        if os.path.abspath(path) not in planned:
            os.remove(path)


def _write_pending(
    pending: list[ShardPlan],
    rows: list[ManifestRow],
    results: Iterator,
    output_dir: str,
    options: Options,
    options_hash: str,
    strict: bool,
    progress: bool,
) -> None:
    """Writes each pending shard from the ordered row results, then its marker."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    total = sum(len(s.rows) for s in pending)
    with tqdm(
        total=total,
        unit="file",
        file=sys.stderr,
        disable=not progress or total == 0,
        desc="ingest",
        dynamic_ncols=True,
    ) as bar:
        rejected_so_far = 0
        for shard in pending:
            rejections: list[dict] = []

            def shard_records(shard=shard, rejections=rejections):
                nonlocal rejected_so_far
                for i in shard.rows:
                    encoded, row_rejections = next(results)
                    bar.update(1)
                    for r in row_rejections:
                        entry = {"path": rows[i].path, "source": rows[i].source, **r}
                        rejections.append(entry)
                        if strict:
                            raise StrictModeError(f"{rows[i].path}: {r['reason']}")
                    if row_rejections:
                        rejected_so_far += len(row_rejections)
                        bar.set_postfix(rejected=rejected_so_far, refresh=False)
                    yield from encoded

            count = records.write_shard(
                shard.path(output_dir), shard_records(), compression=options.compression
            )
            _write_json(
                shard.marker(output_dir),
                {
                    "split": shard.split,
                    "index": shard.index,
                    "count": shard.count,
                    "file": shard.name,
                    "digest": shard.digest,
                    "options_hash": options_hash,
                    "rows": len(shard.rows),
                    "records": count,
                    "rejected": rejections,
                },
            )


def _finish(
    output_dir: str,
    shards: list[ShardPlan],
    rejected_rows: list[dict],
    options: Options,
    options_hash: str,
    start: float,
    *,
    shards_written: int,
    ignored_files: dict[str, int],
) -> Summary:
    """Rebuilds rejected.jsonl and summary.json from the markers of all shards."""
    splits: dict[str, dict[str, int]] = {}
    rejected = list(rejected_rows)
    rows = records_total = 0
    for shard in shards:
        marker = _read_marker(shard, output_dir, options_hash)
        if marker is None:
            raise RuntimeError(f"shard {shard.path(output_dir)} has no valid completion marker")
        counts = splits.setdefault(
            shard.split, {"rows": 0, "records": 0, "shards": 0, "rejected": 0}
        )
        counts["rows"] += marker["rows"]
        counts["records"] += marker["records"]
        counts["shards"] += 1
        counts["rejected"] += len(marker["rejected"])
        rows += marker["rows"]
        records_total += marker["records"]
        rejected.extend(marker["rejected"])
    by_reason: dict[str, int] = {}
    for entry in rejected:
        category = _reason_category(entry["reason"])
        by_reason[category] = by_reason.get(category, 0) + 1
    path = os.path.join(output_dir, REJECTED_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        for entry in rejected:
            f.write(json.dumps(entry, default=str) + "\n")
    os.replace(tmp, path)
    summary = Summary(
        output_dir=output_dir,
        splits=splits,
        rows=rows + len(rejected_rows),
        records=records_total,
        rejected=len(rejected),
        rejected_by_reason=by_reason,
        shards_written=shards_written,
        shards_reused=len(shards) - shards_written,
        seconds=time.time() - start,
        options=options.to_json(),
        ignored_files=dict(ignored_files),
    )
    _write_json(os.path.join(output_dir, SUMMARY_FILE), summary.to_json(), indent=1)
    return summary
