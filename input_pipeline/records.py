"""The one on-disk record format of mimjax, and its ArrayRecord shard writer.

A record is one single-channel image (uint8 or uint16; 2-D H x W, or 3-D
D x H x W for a volume or a stack of modalities) plus a JSON metadata dict
(labels, pixel spacing, bits stored, ...) and optional named extra arrays of
the same kind (segmentation masks). Every data source (phantom,
DICOM, NIfTI, PNG folders) is converted to this format once, so the training
input pipeline has exactly one decoder to make fast and correct.

Byte layout of one record (all integers little-endian):

    b"MIMR"                 4 bytes  magic, so foreign bytes fail loudly
    header_len              4 bytes  uint32
    header                  header_len bytes, UTF-8 JSON:
                            {"shape": [H, W], "dtype": "uint16", "meta": {...},
                             "extras": [{"name", "shape", "dtype"}, ...]}
    pixels                  H * W * itemsize bytes, C order, little-endian
    extra pixels            each extra array in header order, same encoding

("extras" is omitted when there are none.)

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


def _check_array(what: str, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{what} must be 2-D (H, W) or 3-D (D, H, W) single channel, got shape {array.shape}"
        )
    if array.dtype.name not in _DTYPES:
        raise ValueError(f"{what} dtype must be uint8 or uint16, got {array.dtype}")
    if 0 in array.shape:
        raise ValueError(f"{what} must not be empty, got shape {array.shape}")


def encode_record(
    image: np.ndarray, meta: dict | None = None, extras: dict[str, np.ndarray] | None = None
) -> bytes:
    """Serialises an image, its metadata dict and optional named extra arrays
    (e.g. {"mask": HxW uint8}) to bytes."""
    _check_array("image", image)
    extras = {} if extras is None else extras
    for name, array in extras.items():
        if not isinstance(name, str) or not name or name == "image":
            raise ValueError(
                f"extra array names must be non-empty strings other than 'image', got {name!r}"
            )
        _check_array(f"extra array {name!r}", array)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    bad_keys = [k for k in meta if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"meta keys must be strings, got {bad_keys!r}")
    header = {"shape": list(image.shape), "dtype": image.dtype.name, "meta": meta}
    if extras:
        header["extras"] = [
            {"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in extras.items()
        ]
    try:
        header_bytes = json.dumps(
            header, default=_json_default, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from e
    parts = [_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes]
    for array in (image, *extras.values()):
        parts.append(np.ascontiguousarray(array, dtype=_DTYPES[array.dtype.name]).tobytes())
    return b"".join(parts)


def decode_record(data: bytes) -> tuple[np.ndarray, dict]:
    """Inverse of `encode_record` for the image: returns (image, meta). The image
    is a copy the caller may modify. Extra arrays are checked but not returned
    (see `decode_record_with_extras`)."""
    image, meta, _ = decode_record_with_extras(data, keep_extras=False)
    return image, meta


def _read_header(data: bytes) -> tuple[dict, int]:
    """(header dict with a dict "meta", offset of the first pixel byte)."""
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
        if not isinstance(header["meta"], dict):
            raise TypeError(f"meta type {type(header['meta']).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt record header: {e!r}") from e
    return header, start


def decode_meta(data: bytes) -> dict:
    """The metadata dict of an encoded record, without copying its pixels (for
    scans over labels)."""
    return _read_header(data)[0]["meta"]


def _parse_layout(name: str, entry: dict) -> tuple[str, tuple[int, ...], np.dtype]:
    shape = tuple(int(s) for s in entry["shape"])
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"{name} shape {shape}")
    return name, shape, _DTYPES[entry["dtype"]]


def decode_record_with_extras(
    data: bytes, keep_extras: bool = True
) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    """Inverse of `encode_record`: (image, meta, {name: extra array})."""
    header, start = _read_header(data)
    meta = header["meta"]
    try:
        layout = [_parse_layout("image", header)]
        layout += [_parse_layout(e["name"], e) for e in header.get("extras", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt record header: {e!r}") from e
    expected = sum(int(np.prod(shape)) * dtype.itemsize for _, shape, dtype in layout)
    if len(data) - start != expected:
        problem = "truncated" if len(data) - start < expected else "corrupt"
        what = ", ".join(f"{n} {shape} {dtype.name}" for n, shape, dtype in layout)
        raise ValueError(
            f"{problem} record: {what} need {expected} pixel bytes, got {len(data) - start}"
        )
    arrays = {}
    offset = start
    for name, shape, dtype in layout:
        count = int(np.prod(shape))
        if name == "image" or keep_extras:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            # frombuffer gives a read-only view of `data`; a native-order copy is
            # cheap next to the resizes that follow and saves every caller a surprise.
            arrays[name] = array.astype(dtype.newbyteorder("="), copy=True)
        offset += count * dtype.itemsize
    image = arrays.pop("image")
    return image, meta, arrays


def write_completion_marker(marker: str, info: dict) -> None:
    """Writes a folder's completion marker (JSON) atomically: a temporary file renamed
    over `marker`, so a reader never sees it half-written. Written last, after the
    shards it vouches for."""
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, marker)


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
    records: Iterable[tuple[np.ndarray, dict] | tuple[np.ndarray, dict, dict]],
    out_dir: str,
    name: str,
    num_shards: int,
    *,
    overwrite: bool = False,
    compression: str = "uncompressed",
) -> list[str]:
    """Writes (image, meta) or (image, meta, extras) records to `num_shards`
    ArrayRecord files (extras: named masks, as `encode_record` takes them).

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
        for i, record in enumerate(records):
            writers[i % num_shards].write(encode_record(*record))
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


def write_shard(
    path: str, encoded_records: Iterable[bytes], *, compression: str = "uncompressed"
) -> int:
    """Writes already-encoded records (see `encode_record`) to one ArrayRecord file.

    The file is written under a hidden temporary name in the same directory and
    renamed to `path` only after it has been closed, so a killed writer never
    leaves a partial file under `path`. An empty iterable gives a valid empty
    shard (ingestion can reject every file of a shard). Returns the record count.
    """
    from array_record.python import array_record_module

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(
        out_dir, f".{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    )
    writer = array_record_module.ArrayRecordWriter(tmp, f"{GROUP_SIZE_OPTION},{compression}")
    count = 0
    try:
        for data in encoded_records:
            writer.write(data)
            count += 1
        writer.close()
        writer = None
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # pylint: disable=broad-except
                pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


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
