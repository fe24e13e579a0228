"""What every input pipeline reads: a random-access source of raw records plus
the decoder that turns one raw record into mimjax's (image, meta).

The two halves are kept apart on purpose. grain reads the raw records (bytes
for mimjax ArrayRecord shards, serialized examples for TFDS) and meters every
element it reads by walking its tree: on bytes that is a len(), on a decoded
element it costs tens of microseconds per record (see
pipeline._decoded_records). So the training graphs hand grain `source.records`
and decode in a map step with `source.decoder`. Both halves are picklable,
which is what grain's spawned mp_prefetch workers receive.

Every layout of sources.py resolves to a RecordSource; only the decoder and
the raw records differ between layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from input_pipeline import records as records_lib


class DataSourceError(ValueError):
    """A data setting that names no readable data; the message names the setting,
    what exists, and the fix."""


class DataNotFoundError(DataSourceError, FileNotFoundError):
    """DataSourceError for data that is not where the config says (a missing split
    folder, no shards, an unprepared TFDS dataset); also a FileNotFoundError."""


class RecordDecoder(Protocol):
    """Raw record -> mimjax's record contents. Implementations must be picklable."""

    def decode(self, data: Any) -> tuple[np.ndarray, dict]:
        """(image: uint8/uint16 2-D or 3-D, meta: JSON-like dict)."""

    def decode_meta(self, data: Any) -> dict:
        """meta alone, without decoding pixels (label scans, pair filtering)."""

    def decode_with_extras(self, data: Any) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
        """(image, meta, {name: extra array, e.g. a mask})."""


class MimjaxRecordDecoder:
    """The decoder of mimjax's own ArrayRecord records (records.py)."""

    def decode(self, data: bytes) -> tuple[np.ndarray, dict]:
        return records_lib.decode_record(data)

    def decode_meta(self, data: bytes) -> dict:
        return records_lib.decode_meta(data)

    def decode_with_extras(self, data: bytes) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
        return records_lib.decode_record_with_extras(data)

    def __repr__(self) -> str:
        return "MimjaxRecordDecoder()"


class IndexedRecords:
    """records[indices[i]] as a sequence of its own (picklable if `records` is)."""

    def __init__(self, records: Sequence, indices: np.ndarray):
        self._records = records
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self._records[int(self.indices[index])]


class RecordSource:
    """One split of one data layout: raw records, their decoder, and where they live.

    source[i] -> {"image", "meta", "index": i}, decoded (for figures, eval sets,
    statistics); `records` -> the raw records for grain; `decoder` -> decodes
    one raw record. `record_indices[i]` is the position of element i in the
    layout's underlying record set (e.g. a phantom record index, or a record of
    a prepared split folder), so a batch row can be traced back to its record.

    Attributes:
      where: words for messages ("the phantom (48 records, ...)", a folder, a TFDS split).
      root: the folder this data belongs to (the tokenizer and caches go there).
      paths: the ArrayRecord shard paths behind it, None for other storage.
    """

    def __init__(
        self,
        records: Sequence,
        decoder: RecordDecoder,
        *,
        where: str,
        root: str,
        paths: Sequence[str] | None = None,
        record_indices: Sequence[int] | None = None,
    ):
        self._base = records
        self.decoder = decoder
        self.where = where
        self.root = root
        self.paths = None if paths is None else list(paths)
        self._indices = None if record_indices is None else np.asarray(record_indices, np.int64)

    # -------------------------------------------------------------- raw side

    @property
    def records(self) -> Sequence:
        """This source's raw records, position i = element i (what grain reads)."""
        if self._indices is None:
            return self._base
        return IndexedRecords(self._base, self._indices)

    @property
    def record_indices(self) -> np.ndarray:
        if self._indices is None:
            return np.arange(len(self._base), dtype=np.int64)
        return self._indices.copy()

    @property
    def is_whole(self) -> bool:
        """True when the source is its underlying record set, in order, uncut."""
        return self._indices is None

    def subset(self, indices: Sequence[int], *, where: str | None = None) -> RecordSource:
        """Elements `indices` of this source, as a source (record_indices compose)."""
        indices = np.asarray(indices, dtype=np.int64)
        return RecordSource(
            self._base,
            self.decoder,
            where=self.where if where is None else where,
            root=self.root,
            paths=self.paths,
            record_indices=indices if self._indices is None else self._indices[indices],
        )

    def raw(self, index: int):
        if self._indices is not None:
            index = int(self._indices[index])
        return self._base[int(index)]

    # ---------------------------------------------------------- decoded side

    def __len__(self) -> int:
        return len(self._base) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> dict:
        image, meta = self.decoder.decode(self.raw(index))
        return {"image": image, "meta": meta, "index": int(index)}

    def meta(self, index: int) -> dict:
        """Element `index`'s meta, without decoding its pixels."""
        return self.decoder.decode_meta(self.raw(index))

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records of {self.where})"
