"""The one on-disk record format of mimjax, and its ArrayRecord shard writer.

A record is one 2-D single-channel image (uint8 or uint16) plus a JSON metadata
dict (labels, pixel spacing, bits stored, ...). Every data source (phantom,
DICOM, NIfTI, PNG folders) is converted to this format once, so the training
input pipeline has exactly one decoder to make fast and correct.

Byte layout of one record (all integers little-endian):

    b"MIMR"                 4 bytes  magic, so foreign bytes fail loudly
    header_len              4 bytes  uint32
    header                  header_len bytes, UTF-8 JSON:
                            {"shape": [H, W], "dtype": "uint16", "meta": {...}}
    pixels                  H * W * itemsize bytes, C order, little-endian

Raw pixels instead of PNG: decoding is a memcpy (the loader has to sustain
>1000 images/s per worker). Shards are uncompressed by default for the same
reason; ArrayRecord's zstd or snappy can be chosen per dataset (see
COMPRESSIONS for the measured trade-off).
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import uuid
from collections.abc import Iterable

import numpy as np

MAGIC = b"MIMR"
_PREFIX = struct.Struct("<4sI")  # magic, header length
# Little-endian on disk whatever the host byte order, so shards are portable.
_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record its own chunk: random access (what a global
# shuffle does) then reads one record instead of a group.
GROUP_SIZE_OPTION = "group_size:1"
# Per-record read cost of a 448^2 uint16 phantom record (403 kB raw), CPU time:
# uncompressed 145 us, snappy 475 us (298 kB), zstd 631 us (214 kB); the
# crop + resizes + normalize that follow cost ~350 us. Uncompressed keeps a
# worker well above 1000 records/s; pass compression="zstd" to halve the disk
# footprint of large datasets at ~1.8x the loader CPU.
COMPRESSIONS = ("uncompressed", "snappy", "zstd")
_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.array_record$")


def _json_default(obj):
    # numpy scalars/arrays sneak into label dicts easily; store them as plain JSON.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def encode_record(image: np.ndarray, meta: dict | None = None) -> bytes:
    """Serialises a 2-D uint8/uint16 image and its metadata dict to bytes."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W) single channel, got shape {image.shape}")
    if image.dtype.name not in _DTYPES:
        raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    if 0 in image.shape:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    bad_keys = [k for k in meta if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"meta keys must be strings, got {bad_keys!r}")
    header = {"shape": list(image.shape), "dtype": image.dtype.name, "meta": meta}
    try:
        header_bytes = json.dumps(
            header, default=_json_default, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from e
    pixels = np.ascontiguousarray(image, dtype=_DTYPES[image.dtype.name])
    return _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + pixels.tobytes()


def decode_record(data: bytes) -> tuple[np.ndarray, dict]:
    """Inverse of `encode_record`: returns (image HxW, meta). The image is a copy
    the caller may modify."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"record must be bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise ValueError(
            f"truncated record: {len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"not a mimjax record: magic {magic!r} != {MAGIC!r}")
    start = _PREFIX.size + header_len
    if len(data) < start:
        raise ValueError(
            f"truncated record: header needs {header_len} bytes, only "
            f"{len(data) - _PREFIX.size} present"
        )
    try:
        header = json.loads(bytes(data[_PREFIX.size : start]))
        shape = tuple(int(s) for s in header["shape"])
        dtype = _DTYPES[header["dtype"]]
        meta = header["meta"]
        if len(shape) != 2 or min(shape) < 1 or not isinstance(meta, dict):
            raise ValueError(f"shape {shape} / meta type {type(meta).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt record header: {e!r}") from e
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(data) - start != expected:
        problem = "truncated" if len(data) - start < expected else "corrupt"
        raise ValueError(
            f"{problem} record: image {shape} {dtype.name} needs {expected} "
            f"pixel bytes, got {len(data) - start}"
        )
    image = np.frombuffer(data, dtype=dtype, count=shape[0] * shape[1], offset=start).reshape(shape)
    # frombuffer gives a read-only view of `data`; a native-order copy is cheap
    # next to the resizes that follow and saves every caller a surprise.
    return image.astype(dtype.newbyteorder("="), copy=True), meta


def shard_path(out_dir: str, name: str, index: int, count: int) -> str:
    return os.path.join(out_dir, f"{name}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}")


def _existing_shards(out_dir: str, name: str) -> list[str]:
    paths = glob.glob(
        os.path.join(glob.escape(out_dir), f"{glob.escape(name)}-*-of-*{SHARD_SUFFIX}")
    )
    return sorted(
        p for p in paths if (m := _SHARD_RE.match(os.path.basename(p))) and m["name"] == name
    )


def write_shards(
    records: Iterable[tuple[np.ndarray, dict]],
    out_dir: str,
    name: str,
    num_shards: int,
    *,
    overwrite: bool = False,
    compression: str = "uncompressed",
) -> list[str]:
    """Writes (image, meta) records to `num_shards` ArrayRecord files.

    Records are distributed round-robin (record i goes to shard i % num_shards,
    position i // num_shards), which works for a stream of unknown length and
    keeps the shards within one record of each other in size. Reading the shards
    in sorted order therefore does NOT give the input order back.

    Each shard is written under a hidden temporary name and renamed into place
    only after every shard has been closed successfully; on any error the
    temporaries are deleted. A killed writer leaves at most hidden `.tmp` files,
    never a partial file under a shard name. (The renames themselves are atomic
    per file; use a completion marker above this, as `ensure_phantom_dataset`
    does, if a whole set must appear at once.)

    Existing shards called `name` in `out_dir` raise FileExistsError unless
    `overwrite`, in which case same-named files are atomically replaced and
    leftover shards of a different shard count are removed.

    compression: one of COMPRESSIONS; files always use group_size:1.

    Returns the sorted shard paths.
    """
    # Imported here so that reading records never needs the writer's .so.
    from array_record.python import array_record_module

    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    options = f"{GROUP_SIZE_OPTION},{compression}"
    if "/" in name or not name:
        raise ValueError(f"name must be a non-empty file name prefix, got {name!r}")
    os.makedirs(out_dir, exist_ok=True)
    existing = _existing_shards(out_dir, name)
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} shard(s) named {name!r} already exist in {out_dir} "
            f"(e.g. {existing[0]}); pass overwrite=True to replace them"
        )

    final = [shard_path(out_dir, name, i, num_shards) for i in range(num_shards)]
    # Unique per writer so concurrent writers of the same data never collide.
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = [os.path.join(out_dir, f".{os.path.basename(p)}.{token}.tmp") for p in final]
    writers = []
    try:
        for p in tmp:
            writers.append(array_record_module.ArrayRecordWriter(p, options))
        count = 0
        for i, (image, meta) in enumerate(records):
            writers[i % num_shards].write(encode_record(image, meta))
            count += 1
        if count == 0:
            raise ValueError("write_shards got no records")
        for w in writers:
            w.close()
        writers = []
        for t, p in zip(tmp, final):
            os.replace(t, p)
    except BaseException:
        for w in writers:
            try:
                w.close()
            except Exception:  # pylint: disable=broad-except
                pass
        for t in tmp:
            if os.path.exists(t):
                os.remove(t)
        raise
    for p in set(existing) - set(final):
        os.remove(p)  # stale shards of an earlier, different shard count
    return final


def list_shards(path_or_glob: str | os.PathLike) -> list[str]:
    """Sorted ArrayRecord shard paths from a directory, a glob, or one file.

    A directory means every `*.array_record` file in it. Raises
    FileNotFoundError if nothing matches, and ValueError if a directory or glob
    holds an incomplete `-NNNNN-of-MMMMM` shard set (e.g. an interrupted copy),
    which would otherwise silently train on part of the data. (To read a subset
    of shards on purpose, pass the paths to ArrayRecordImageSource directly.)
    """
    path = os.fspath(path_or_glob)
    if os.path.isdir(path):
        paths = glob.glob(os.path.join(glob.escape(path), "*" + SHARD_SUFFIX))
    elif glob.has_magic(path):
        paths = [p for p in glob.glob(path) if os.path.isfile(p)]
    elif os.path.isfile(path):
        return [path]  # one file named explicitly: the caller chose it
    else:
        paths = []
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shards found at {path!r}")
    paths = sorted(paths)
    sets: dict[tuple[str, str, int], set[int]] = {}
    for p in paths:
        if m := _SHARD_RE.match(os.path.basename(p)):
            key = (os.path.dirname(p), m["name"], int(m["count"]))
            sets.setdefault(key, set()).add(int(m["index"]))
    for (d, name, n), found in sets.items():
        missing = sorted(set(range(n)) - found)
        if missing:
            raise ValueError(
                f"incomplete shard set {name!r} in {d or '.'}: {len(found)} of {n} "
                f"shards present, missing indices {missing[:10]}"
            )
    return paths
