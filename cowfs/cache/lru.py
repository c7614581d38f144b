"""Byte-bounded LRU: the one eviction policy both cache levels use.

Keys are content hashes, so an entry can never be stale: content changes produce new
hashes.  Nothing ever needs invalidating except entries of freed objects (to return memory).
Only the trio thread calls into it (worker threads hand their results back), so it needs no lock.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")

# What one entry costs beyond its payload: the OrderedDict slot and links, the 32-byte key
# object and the value object's header (measured with tracemalloc: ~180-230 bytes).
ENTRY_OVERHEAD = 256


class ByteLRU(Generic[V]):
    """on_evict(key, value) is called for evicted entries that were hit since their insertion
    (reused: worth keeping in a lower level), not for ones read once."""

    def __init__(self, max_bytes: int, size: Callable[[V], int] = len,  # type: ignore[assignment]
                 on_evict: Callable[[bytes, V], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._on_evict = on_evict
        self._reused: set[bytes] = set()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._d: OrderedDict[bytes, V] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: bytes) -> V | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self._reused.add(key)
        self.hits += 1
        return v

    def peek(self, key: bytes) -> V | None:
        """A lookup that changes nothing (one atomic dict read): safe from worker threads."""
        return self._d.get(key)

    def put(self, key: bytes, value: V) -> None:
        self.discard(key)
        cost = self._size(value) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        self._d[key] = value
        self.bytes += cost
        while self.bytes > self.max_bytes:
            k, v = self._d.popitem(last=False)
            self.bytes -= self._size(v) + ENTRY_OVERHEAD
            self.evictions += 1
            if k in self._reused:
                self._reused.discard(k)
                if self._on_evict is not None:
                    self._on_evict(k, v)

    def discard(self, key: bytes) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self.bytes -= self._size(v) + ENTRY_OVERHEAD
            self._reused.discard(key)

    def stats(self) -> dict[str, int | float]:
        looked = self.hits + self.misses
        return {"bytes": self.bytes, "max_bytes": self.max_bytes, "entries": len(self._d),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": round(self.hits / looked, 4) if looked else 0.0}
