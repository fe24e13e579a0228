"""A small thread-safe cache of per-epoch draws (record orders, sampled indices) for
the samplers that map a stream position to a record. Grain's threads ask for the same
epoch concurrently, so the draws are computed outside the lock and the oldest epochs
are dropped; pickling (to worker processes) carries only the settings, so every
process starts with an empty cache and recomputes the same draws from their seeds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class EpochCache:
    def __init__(self, limit: int, age: Callable[[Hashable], Any] | None = None):
        """limit: entries kept; age: the key's epoch, to drop the oldest (None: the key
        itself). Give a picklable callable (e.g. operator.itemgetter)."""
        self.limit, self.age = int(limit), age
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]):
        """The entry for `key`, computed by `compute()` on a miss."""
        with self._lock:
            value = self._entries.get(key)
        if value is None:
            value = compute()
            with self._lock:
                self._entries[key] = value
                while len(self._entries) > self.limit:
                    self._entries.pop(min(self._entries, key=self.age))
        return value

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "age": self.age}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"], state["age"])
