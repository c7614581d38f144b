"""Byte-bounded LRU of decoded objects.

Keys are content hashes, so an entry can never be stale: content changes produce new
hashes.  Nothing ever needs invalidating except entries of freed objects (to return memory).
"""
from __future__ import annotations

from collections import OrderedDict


class ByteLRU:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: bytes, value: bytes) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        if len(value) > self.max_bytes:
            return
        self._d[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, v = self._d.popitem(last=False)
            self.bytes -= len(v)
            self.evictions += 1

    def discard(self, key: bytes) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self.bytes -= len(v)

    def stats(self) -> dict[str, int]:
        return {"bytes": self.bytes, "max_bytes": self.max_bytes, "entries": len(self._d),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
