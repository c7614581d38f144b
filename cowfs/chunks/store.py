"""Reference-counted, content-addressed object store (chunks and tree nodes).

Every reference-count change goes through a `RefTxn`, applied inside the single commit of
the caller's batch (see cowfs.store.Store.commit), so a dedup hit can never race a free:
increments are applied before decrements, creations store their data exactly once, and a
free cascades to the children of a freed node in the same batch.
"""
from __future__ import annotations

from collections import deque

from cowfs.cache import ChunkCache
from cowfs.chunks import codec
from cowfs.kv.base import KV, Batch

CF_OBJECTS = "objects"
CF_REFS = "refs"


class MissingObject(codec.CorruptObject):
    """A referenced object is not in the store."""


def _count(value: bytes | None) -> int:
    return int.from_bytes(value, "little") if value else 0


class RefTxn:
    """Reference deltas and new objects gathered by one filesystem operation."""

    __slots__ = ("delta", "new")

    def __init__(self) -> None:
        self.delta: dict[bytes, int] = {}
        # hash -> (encoded value, child hashes): only needed if the object turns out to be new.
        self.new: dict[bytes, tuple[bytes, list[bytes]]] = {}

    def incref(self, h: bytes | None, n: int = 1) -> None:
        if h is not None:
            self.delta[h] = self.delta.get(h, 0) + n

    def decref(self, h: bytes | None, n: int = 1) -> None:
        if h is not None:
            self.delta[h] = self.delta.get(h, 0) - n

    def add_object(self, h: bytes, value: bytes, children: list[bytes]) -> None:
        self.new[h] = (value, children)

    def empty(self) -> bool:
        return not self.new and not any(self.delta.values())


class ObjectStore:
    """Reads objects through the chunk cache (L1 decoded, L2 lz4 pages); writes via RefTxn."""

    def __init__(self, kv: KV, cache: ChunkCache) -> None:
        self.kv = kv
        self.cache = cache

    # -- reads ---------------------------------------------------------------------------
    def load(self, h: bytes) -> bytes:
        """Load and decode chunk h from the store, bypassing the cache.  Thread-safe: the
        readahead and prefetch workers call it from threads."""
        raw = self.kv.get(CF_OBJECTS, h)
        if raw is None:
            raise MissingObject(f"chunk {h.hex()} is missing")
        return codec.decode_chunk(raw, h)

    def _loaded(self, h: bytes) -> bytes:
        data = self.load(h)
        self.cache.put(h, data)
        return data

    def chunk(self, h: bytes) -> bytes:
        data = self.cache.get(h)
        return data if data is not None else self._loaded(h)

    def read(self, h: bytes, a: int, b: int) -> bytes | memoryview:
        """Bytes [a, b) of chunk h for a file read (fewer if the chunk ends before b)."""
        got = self.cache.read(h, a, b)
        return got if got is not None else memoryview(self._loaded(h))[a:b]

    def load_node(self, h: bytes) -> bytes:
        """Load, decode and verify tree node h, bypassing the cache (thread-safe)."""
        raw = self.kv.get(CF_OBJECTS, h)
        if raw is None:
            raise MissingObject(f"tree node {h.hex()} is missing")
        data = codec.decode_node(raw)
        if codec.node_hash(data) != h:
            raise codec.CorruptObject(f"tree node {h.hex()} does not match its hash")
        return data

    def peek_node(self, h: bytes) -> bytes:
        """node() for worker threads: uses L1 without touching its order, never inserts."""
        data = self.cache.peek_node(h)
        return data if data is not None else self.load_node(h)

    def node(self, h: bytes) -> bytes:
        data = self.cache.node(h)
        if data is None:
            data = self.load_node(h)
            self.cache.put_node(h, data)
        return data

    def refcount(self, h: bytes) -> int:
        return _count(self.kv.get(CF_REFS, h))

    def exists(self, h: bytes) -> bool:
        return self.kv.get(CF_REFS, h) is not None

    # -- the one writer of reference counts ----------------------------------------------
    def apply(self, txn: RefTxn, batch: Batch) -> tuple[int, int]:
        """Fold txn into batch; return (objects created, objects freed)."""
        counts: dict[bytes, int] = {}

        def current(h: bytes) -> int:
            c = counts.get(h)
            if c is None:
                c = counts[h] = _count(self.kv.get(CF_REFS, h))
            return c

        created = freed = 0
        incs = deque((h, d) for h, d in txn.delta.items() if d > 0)
        decs = deque((h, -d) for h, d in txn.delta.items() if d < 0)
        while incs:
            h, d = incs.popleft()
            cur = current(h)
            if cur == 0:
                new = txn.new.get(h)
                if new is None:
                    raise MissingObject(f"reference to unknown object {h.hex()}")
                value, children = new
                batch.put(CF_OBJECTS, h, value)
                created += 1
                incs.extend((c, 1) for c in children)
            counts[h] = cur + d
        while decs:
            h, d = decs.popleft()
            cur = current(h)
            if cur < d:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            counts[h] = cur - d
            if cur == d:
                raw = self.kv.get(CF_OBJECTS, h)
                if raw is None and h in txn.new:  # created and dropped within this txn
                    raw = txn.new[h][0]
                if raw is not None and raw[0] == codec.KIND_NODE:
                    decs.extend((c, 1) for c in codec.node_children(raw[1:]))
                batch.delete(CF_OBJECTS, h)
                self.cache.discard(h)
                freed += 1
        for h, c in counts.items():
            if c:
                batch.put(CF_REFS, h, c.to_bytes(8, "little"))
            else:
                batch.delete(CF_REFS, h)
        return created, freed
