"""Unlabelled image pools: what the federated server's label-free distillation
(task "distill") trains on, and the one way to make one from labelled data.

A pool is a folder of mimjax ArrayRecord shards (read with `data.source="shards"`,
`data.dir=<the folder>`) whose records hold an image and, in their meta, only the
keys of LABEL_FREE_META_KEYS: how the pixels were acquired and are to be read, and
where the record came from. Everything else a record may carry is a label and never
reaches a pool: class and pathology labels ("label", "pathology", "finding_labels",
...), lesion geometry ("lesion_*"), landmarks and measurements ("landmarks", "ctr",
"wrist_width_mm"), report text ("report", "findings", "impression"), class lists
("classes", "task"), cardiac phases, and extra arrays (segmentation masks).

- `label_keys_in(meta)`: the keys of a meta that are labels (not allowlisted).
- `check_unlabelled(src, where)`: refuses a source holding a labelled record
  (DataSourceError naming the first one, its label keys and the fix); metas only,
  no pixel decoding.
- `write_unlabelled_pool(inputs, out_dir)`: every record of the inputs (data
  configs, RecordSources, shard folders) as image + allowlisted meta, once.
- `ensure_phantom_pool(data_dir, {phantom: (num_images, seed, size)})`: the rendered
  phantoms' label-stripped union in `data_dir/unlabelled_pool_<hash>/`, once (the
  server's embedded pool in the federated demo). The phantoms are rendered straight
  into the pool: no labelled copy is written.

Every pool record also gets "pool_input" (the name of the input it came from) and
"pool_input_index" (its index in that input), so a record can be traced back.
Pools are idempotent: a marker file, written last, records what the pool was made
from; a later call with the same inputs reuses the shards untouched, a killed one is
redone. Like rendered.py, this module imports neither grain nor JAX at import time
(its spawned render workers import it), and never mimjax.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from input_pipeline import records
from input_pipeline.record_source import DataSourceError, MimjaxRecordDecoder, RecordSource
from input_pipeline.rendered import PHANTOMS

__all__ = [
    "LABEL_FREE_META_KEYS",
    "POOL_PREFIX",
    "check_unlabelled",
    "ensure_phantom_pool",
    "label_keys_in",
    "phantom_pool_dir",
    "write_unlabelled_pool",
]

# Meta keys that are not labels: acquisition (how to read the pixels) and identity /
# provenance (where a record came from). Anything else is treated as a label. Left out
# on purpose: "source_id" (the phantoms spell labels in it, e.g. "cardiac-0003-ES"),
# "frame" and "phase" (a cine frame gives away its cardiac phase), "photo" and "crop"
# (name a natural photograph's content).
LABEL_FREE_META_KEYS = frozenset({
    # Acquisition: intensity scale, geometry, device and view.
    "bits_stored",  # transforms.intensity_max scales pixels by it: the pool must keep it
    "bits_stored_source",
    "photometric",
    "modality",
    "view",
    "view_group",
    "laterality",
    "manufacturer_model",
    "burned_in_annotation",
    "spacing",
    "slice_spacing",
    "slice_thickness",
    "channels",  # names of a multi-channel record's channels (MRI sequences)
    "geometry",  # the ingest engine's resize-and-pad record
    "rows",
    "cols",
    "shape",
    # Identity and provenance.
    "patient",  # a salted pseudonym (ingest) or a phantom patient id
    "source_index",  # frame / slice / time point within its file
    "split",
    "phantom_index",
    "phantom_seed",
    "dataset",
    "source",
    "licence",
    "pool_input",  # written by this module: the input a pool record came from
    "pool_input_index",  # and its index there
})
POOL_PREFIX = "pool"  # the pool's shard names: pool-0000i-of-0000n.array_record
_MARKER = "_COMPLETE.json"
# Changing it (or the allowlist) gives every phantom pool a new folder.
_FORMAT = "mimjax-unlabelled-pool-v1"


def label_keys_in(meta: Mapping[str, Any]) -> list[str]:
    """The keys of `meta` that are labels (not in LABEL_FREE_META_KEYS), sorted."""
    return sorted(k for k in meta if k not in LABEL_FREE_META_KEYS)


def _label_free(meta: Mapping[str, Any]) -> dict:
    return {k: v for k, v in meta.items() if k in LABEL_FREE_META_KEYS}


def _extra_names(data: bytes) -> list[str]:
    """Names of a mimjax record's extra arrays (masks), from its header alone (the
    byte layout of records.py: magic, uint32 header length, JSON header)."""
    header_len = int.from_bytes(bytes(data[4:8]), "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    return [str(e["name"]) for e in header.get("extras", [])]


# ------------------------------------------------------------------ checking

_CHECKED: set[tuple] = set()  # sources found unlabelled (key: shards, sizes, mtimes, indices)


def _source_key(src: RecordSource) -> tuple | None:
    if not src.paths:
        return None
    try:
        files = tuple(
            (os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in src.paths
        )
    except OSError:
        return None
    indices = hashlib.sha256(src.record_indices.tobytes()).hexdigest()
    return files, indices


def check_unlabelled(src: RecordSource, where: str | None = None) -> None:
    """Raises DataSourceError at the first record of `src` whose meta holds a label
    (a key outside LABEL_FREE_META_KEYS) or that carries extra arrays (masks),
    naming the record, its label keys and the fix. Reads every record's meta, never
    its pixels; a set of shards found unlabelled is not read again in this process."""
    key = _source_key(src)
    if key is not None and key in _CHECKED:
        return
    mimjax_records = isinstance(src.decoder, MimjaxRecordDecoder)
    for i in range(len(src)):
        raw = src.raw(i)
        found = label_keys_in(src.decoder.decode_meta(raw))
        if mimjax_records:
            found += [f"{name} (an extra array)" for name in _extra_names(raw)]
        if found:
            raise DataSourceError(
                f"{where or src.where} is not an unlabelled pool: record {i} of {len(src)} has "
                f"label keys {found} (only {len(LABEL_FREE_META_KEYS)} acquisition and identity "
                "keys may be in a pool, input_pipeline.unlabelled.LABEL_FREE_META_KEYS); write "
                "a label-free copy with input_pipeline.unlabelled.write_unlabelled_pool(<these "
                "data>, OUT_DIR), which keeps only each image and those keys, and train on it "
                "with data.source='shards', data.dir=OUT_DIR"
            )
    if key is not None:
        _CHECKED.add(key)


# ------------------------------------------------------------------ writing


def _fingerprint_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _pool_shards(out_dir: str) -> list[str]:
    try:
        return records.list_shards(out_dir)
    except (FileNotFoundError, ValueError):
        return []


def _write_pool(
    out_dir: str,
    fingerprint: dict,
    make_records,
    *,
    num_shards: int,
    compression: str,
    overwrite: bool,
) -> list[str]:
    """`make_records()` -> (image, meta) records into `out_dir/pool-*.array_record`,
    unless the folder's marker says it already holds them (same fingerprint)."""
    out_dir = os.fspath(out_dir)
    marker = os.path.join(out_dir, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        paths = [os.path.join(out_dir, p) for p in done.get("shards", [])]
        if done.get("fingerprint") == fingerprint and paths and all(map(os.path.exists, paths)):
            return paths
        if done.get("fingerprint") != fingerprint and not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds an unlabelled pool of other inputs (see {marker}); "
                "write this one to another folder, or pass overwrite=True to replace it"
            )
        os.remove(marker)  # rewritten below; no marker while the shards change
    foreign = [
        p for p in _pool_shards(out_dir) if not os.path.basename(p).startswith(POOL_PREFIX + "-")
    ]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds other shards ({os.path.basename(foreign[0])}, ...) that would be "
            "read as part of the pool; write the pool to an empty folder"
        )
    counter = {"records": 0}

    def counted() -> Iterator[tuple[np.ndarray, dict]]:
        for record in make_records():
            counter["records"] += 1
            yield record

    paths = records.write_shards(
        counted(), out_dir, POOL_PREFIX, num_shards, overwrite=True, compression=compression
    )
    info = {
        "fingerprint": fingerprint,
        "records": counter["records"],
        "label_free_meta_keys": sorted(LABEL_FREE_META_KEYS),
        "shards": [os.path.basename(p) for p in paths],
    }
    records.write_completion_marker(marker, info)
    return paths


def _is_data_config(value: Any) -> bool:
    return not isinstance(value, (str, os.PathLike, RecordSource)) and hasattr(value, "source")


def _open_input(value: Any) -> tuple[str, RecordSource]:
    """(a default name, the records) of a data config, RecordSource or shard path."""
    from input_pipeline import sources  # pylint: disable=g-import-not-at-top  (grain)

    if isinstance(value, RecordSource):
        return os.path.basename(os.path.normpath(value.root)) or "records", value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        return os.path.basename(os.path.normpath(path)), sources.ArrayRecordImageSource(path)
    if _is_data_config(value):
        src = sources.resolve(value, sources.pretrain_split(value))
        return str(value.source), src
    raise TypeError(
        "write_unlabelled_pool takes data configs (with data.source), RecordSources or "
        f"shard folders / globs, or a name -> input mapping of them; got {type(value).__name__}"
    )


def _named_inputs(inputs: Any) -> list[tuple[str, RecordSource]]:
    if isinstance(inputs, Mapping):
        return [(str(name), _open_input(value)[1]) for name, value in inputs.items()]
    if isinstance(inputs, (str, os.PathLike, RecordSource)) or _is_data_config(inputs):
        inputs = [inputs]
    named, seen = [], {}
    for value in inputs:
        name, src = _open_input(value)
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", src))
    return named


def _source_fingerprint(name: str, src: RecordSource) -> dict:
    entry: dict[str, Any] = {"name": name, "records": len(src), "where": src.where}
    if src.paths:
        entry["shards"] = [
            [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in src.paths
        ]
        entry["indices"] = hashlib.sha256(src.record_indices.tobytes()).hexdigest()
    return entry


def write_unlabelled_pool(
    inputs: Any,
    out_dir: str | os.PathLike,
    *,
    num_shards: int = 4,
    compression: str = "uncompressed",
    overwrite: bool = False,
) -> list[str]:
    """Writes every record of `inputs` to an unlabelled pool in `out_dir`: the image
    bitwise as it is, its meta cut to LABEL_FREE_META_KEYS plus "pool_input" (the
    input's name) and "pool_input_index" (the record's index in it); extra arrays
    (masks) are dropped. Returns the sorted shard paths (read them with
    data.source="shards", data.dir=out_dir).

    inputs: a data config (its `source` and `dir`, read at the split pretraining
    reads, sources.pretrain_split), a RecordSource, a folder or glob of shards, a
    sequence of these, or a {name: input} mapping (the names go into "pool_input").

    Idempotent: a second call with the same inputs (the same records of the same
    shard files) returns the pool's shards untouched; a pool of other inputs in
    `out_dir` raises FileExistsError unless `overwrite`. Records are spread
    round-robin over `num_shards` shards (records.write_shards), so the shards'
    order is not the inputs' order: "pool_input_index" traces each one back.
    """
    named = _named_inputs(inputs)
    if not named:
        raise ValueError("write_unlabelled_pool got no inputs")
    empty = [name for name, src in named if len(src) == 0]
    if empty:
        raise ValueError(f"write_unlabelled_pool: inputs {empty} have no records")
    fingerprint = {
        "format": _FORMAT,
        "inputs": [_source_fingerprint(name, src) for name, src in named],
        "label_free_meta_keys": sorted(LABEL_FREE_META_KEYS),
        "num_shards": num_shards,
        "compression": compression,
    }

    def make_records() -> Iterator[tuple[np.ndarray, dict]]:
        for name, src in named:
            for i in range(len(src)):
                image, meta = src.decoder.decode(src.raw(i))
                yield image, {**_label_free(meta), "pool_input": name, "pool_input_index": i}

    return _write_pool(
        os.fspath(out_dir),
        fingerprint,
        make_records,
        num_shards=num_shards,
        compression=compression,
        overwrite=overwrite,
    )


# ------------------------------------------------------------------ phantom pools


def _phantom_spec(phantoms: Any) -> list[tuple[str, int, int, int]]:
    """{name: (num_images, seed, size) or {num_images, seed, size}} -> sorted
    [(name, num_images, seed, size)], checked."""
    if phantoms is None or not hasattr(phantoms, "items") or not len(phantoms):
        raise ValueError(
            "a phantom pool names at least one phantom: {name: {num_images, seed, size}} "
            f"with names of {sorted(PHANTOMS)}, got {phantoms!r}"
        )
    spec = []
    for name, value in phantoms.items():
        if name not in PHANTOMS:
            raise ValueError(f"unknown phantom {name!r} in the pool: one of {sorted(PHANTOMS)}")
        if hasattr(value, "keys"):
            keys = set(value.keys())
            if keys != {"num_images", "seed", "size"}:
                raise ValueError(
                    f"pool phantom {name!r} needs exactly the fields num_images, seed and "
                    f"size, got {sorted(keys)}"
                )
            value = (value["num_images"], value["seed"], value["size"])
        if not isinstance(value, Sequence) or len(value) != 3:
            raise ValueError(
                f"pool phantom {name!r}: give (num_images, seed, size) or a dict of them, got "
                f"{value!r}"
            )
        num_images, seed, size = value
        ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        min_size = PHANTOMS[name].min_size
        if not ints or num_images < 1 or not 0 <= seed < 2**32 or size < min_size:
            raise ValueError(
                f"pool phantom {name!r}: need integers num_images >= 1, 0 <= seed < 2**32 and "
                f"size >= {min_size}, got num_images={num_images!r}, seed={seed!r}, "
                f"size={size!r}"
            )
        spec.append((str(name), int(num_images), int(seed), int(size)))
    return sorted(spec)


def phantom_pool_sizes(phantoms: Any) -> dict[str, int]:
    """{phantom name: its image side} of a pool spec (checked as ensure_phantom_pool does)."""
    return {name: size for name, _, _, size in _phantom_spec(phantoms)}


def _pool_fingerprint(spec: list[tuple[str, int, int, int]], num_shards: int) -> dict:
    return {
        "format": _FORMAT,
        "phantoms": [list(s) for s in spec],
        "label_free_meta_keys": sorted(LABEL_FREE_META_KEYS),
        "num_shards": num_shards,
    }


def phantom_pool_dir(data_dir: str | os.PathLike, phantoms: Any, *, num_shards: int = 4) -> str:
    """The folder `ensure_phantom_pool` writes: data_dir/unlabelled_pool_<hash>/, the
    hash of the phantoms' (name, num_images, seed, size), the allowlist and the
    shard count."""
    fingerprint = _pool_fingerprint(_phantom_spec(phantoms), num_shards)
    digest = hashlib.sha256(_fingerprint_json(fingerprint).encode()).hexdigest()[:12]
    return os.path.join(os.fspath(data_dir), f"unlabelled_pool_{digest}")


def _init_render_worker() -> None:
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)  # one process per core already


def _render_job(args):
    render_fn, index, seed, size = args
    return render_fn(index, seed, size)


def _render_fn(name: str):
    module, function = PHANTOMS[name].render.split(":")
    return getattr(importlib.import_module(module), function)


def _rendered_records(
    spec: list[tuple[str, int, int, int]], num_procs: int | None
) -> Iterator[tuple[np.ndarray, dict]]:
    pool = None
    try:
        for name, num_images, seed, size in spec:
            jobs: Iterable = ((_render_fn(name), i, seed, size) for i in range(num_images))
            procs = num_procs
            if procs is None:  # a process pool pays off from parallel_from 448-px images
                parallel = num_images * (size / 448) ** 2 >= PHANTOMS[name].parallel_from
                procs = min(os.cpu_count() or 1, 8) if parallel else 1
            if procs > 1:
                if pool is None:
                    pool = multiprocessing.get_context("spawn").Pool(procs, _init_render_worker)
                outputs = pool.imap(_render_job, jobs, chunksize=4)
            else:
                outputs = map(_render_job, jobs)
            for i, output in enumerate(outputs):  # (image, meta) or (image, meta, masks)
                image, meta = output[0], output[1]
                yield image, {**_label_free(meta), "pool_input": name, "pool_input_index": i}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def ensure_phantom_pool(
    data_dir: str | os.PathLike,
    phantoms: Any,
    *,
    num_shards: int = 4,
    num_procs: int | None = None,
) -> str:
    """Renders each phantom of `phantoms` ({name of rendered.PHANTOMS: (num_images,
    seed, size) or {"num_images", "seed", "size"}}) and writes their label-stripped
    union (as write_unlabelled_pool writes records; "pool_input" is the phantom's
    name) into `phantom_pool_dir(data_dir, phantoms)`, once. Returns that folder.

    Phantoms go in name order, each rendered by index as its cache would hold it
    (the same images, bitwise). num_procs: render processes; None = one per core (at
    most 8) for a phantom of at least its `parallel_from` images counted at 448 px
    (a 64-px image is 1/49 of one), else 1.
    """
    spec = _phantom_spec(phantoms)
    out_dir = phantom_pool_dir(data_dir, phantoms, num_shards=num_shards)
    _write_pool(
        out_dir,
        _pool_fingerprint(spec, num_shards),
        lambda: _rendered_records(spec, num_procs),
        num_shards=num_shards,
        compression="uncompressed",
        overwrite=True,  # the folder is named by its contents: a different pool is a stale one
    )
    return out_dir
