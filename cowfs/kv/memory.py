"""An in-memory KV: sorted maps per column family, for tests of the core without a disk.

Each family is a pair (sorted key list, dict) that a write replaces as a whole (copy on
write), never changes in place: a scan keeps the pair it started with, so it sees the
family as of its first step, as a RocksDB iterator does, and a reader thread sees one
state or the next.  Writes and their compare-and-set checks run under one lock.  A write
copies the families it touches (O(keys) per write): meant for test-sized data.
Nothing is durable beyond the object's life; `sync` has nothing to wait for.
"""
from __future__ import annotations

import bisect
import threading
from typing import Iterator, Sequence

from cowfs.kv.base import KV, Batch, Conflict, Expect


class MemoryKV(KV):
    def __init__(self, families: tuple[str, ...]) -> None:
        self._families: dict[str, tuple[list[bytes], dict[bytes, bytes]]] = {
            name: ([], {}) for name in families}
        self._lock = threading.Lock()
        self.closed = False

    def _family(self, cf: str) -> tuple[list[bytes], dict[bytes, bytes]]:
        if self.closed:
            raise ValueError("operation on a closed MemoryKV")
        return self._families[cf]

    def get(self, cf: str, key: bytes) -> bytes | None:
        return self._family(cf)[1].get(key)

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        keys, values = self._family(cf)
        n = len(prefix)
        for i in range(bisect.bisect_left(keys, start), len(keys)):
            key = keys[i]
            if key[:n] != prefix:
                return
            yield key, values[key]

    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        with self._lock:
            for cf, key, value in expect:
                found = self._family(cf)[1].get(key)
                if found != value:
                    raise Conflict(cf, key, value, found)
            changed: dict[str, tuple[dict[bytes, bytes], bool]] = {}  # cf -> (new map, keys changed)
            for cf, key, value in batch.ops:
                entry = changed.get(cf)
                if entry is None:
                    entry = changed[cf] = (dict(self._family(cf)[1]), False)
                values, reshaped = entry
                key = bytes(key)
                if value is None:
                    reshaped = values.pop(key, None) is not None or reshaped
                else:
                    reshaped = reshaped or key not in values
                    values[key] = bytes(value)
                changed[cf] = (values, reshaped)
            for cf, (values, reshaped) in changed.items():
                keys = sorted(values) if reshaped else self._families[cf][0]
                self._families[cf] = (keys, values)

    def sync(self) -> None:
        if self.closed:
            raise ValueError("operation on a closed MemoryKV")

    def close(self) -> None:
        self.closed = True
