"""Reference-counted, content-addressed object store (chunks and tree nodes).

Every reference-count change goes through a `RefTxn`, applied inside the single commit of
the caller's batch (see cowfs.store.Store.commit), so a dedup hit can never race a free:
increments are applied before decrements, creations store their data exactly once, and a
free cascades to the children of a freed node in the same batch.
"""
from __future__ import annotations

from cowfs.cache import ByteLRU
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
    """Reads objects through a byte-bounded cache of decoded content; writes via RefTxn."""

    def __init__(self, kv: KV, cache: ByteLRU) -> None:
        self.kv = kv
        self.cache = cache

    # -- reads ---------------------------------------------------------------------------
    def chunk(self, h: bytes) -> bytes:
        data = self.cache.get(h)
        if data is None:
            raw = self.kv.get(CF_OBJECTS, h)
            if raw is None:
                raise MissingObject(f"chunk {h.hex()} is missing")
            data = codec.decode_chunk(raw, h)
            self.cache.put(h, data)
        return data

    def node(self, h: bytes) -> bytes:
        data = self.cache.get(h)
        if data is None:
            raw = self.kv.get(CF_OBJECTS, h)
            if raw is None:
                raise MissingObject(f"tree node {h.hex()} is missing")
            data = codec.decode_node(raw)
            if codec.node_hash(data) != h:
                raise codec.CorruptObject(f"tree node {h.hex()} does not match its hash")
            self.cache.put(h, data)
        return data

    def refcount(self, h: bytes) -> int:
        return _count(self.kv.get(CF_REFS, h))

    def exists(self, h: bytes) -> bool:
        return self.kv.get(CF_REFS, h) is not None

    # -- the one writer of reference counts ----------------------------------------------
    def apply(self, txn: RefTxn, batch: Batch) -> tuple[int, int]:
        """Fold txn into batch; return (objects created, objects freed).

        Changes are netted per object before any count is read: rewriting one chunk of a big
        file replaces a 512-child node, and its 511 unchanged children gain a reference from
        the new node and lose one from the old, so they are neither read nor written.
        Every increment is known before any free is decided, so nothing this batch still
        references can be freed.
        """
        delta = dict(txn.delta)
        counts: dict[bytes, int] = {}

        def current(h: bytes) -> int:
            c = counts.get(h)
            if c is None:
                c = counts[h] = _count(self.kv.get(CF_REFS, h))
            return c

        # 1. Increments: only objects this transaction brings can be new, and a new object's
        #    children gain a reference (which can make them new in turn).
        created: set[bytes] = set()
        todo = [h for h, d in delta.items() if d > 0 and h in txn.new]
        while todo:
            h = todo.pop()
            if h in created or current(h):
                continue
            created.add(h)
            value, children = txn.new[h]
            batch.put(CF_OBJECTS, h, value)
            for c in children:
                delta[c] = delta.get(c, 0) + 1
                if c in txn.new:
                    todo.append(c)
        # 2. Decrements, cascading to the children of freed objects.
        freed: dict[bytes, int] = {}  # hash -> its net change when it was freed
        todo = [h for h, d in delta.items() if d < 0]
        while todo:
            h = todo.pop()
            d = delta[h]
            if h in freed:
                if d != freed[h]:
                    raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
                continue
            if not d:  # as many references gained as lost: the count stays, unread
                continue
            left = current(h) + d
            if left < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if left:
                continue
            freed[h] = d
            raw = txn.new[h][0] if h in created else self.kv.get(CF_OBJECTS, h)
            if raw is not None and raw[0] == codec.KIND_NODE:
                for c in codec.node_children(raw[1:]):
                    delta[c] = delta.get(c, 0) - 1
                    todo.append(c)
            batch.delete(CF_OBJECTS, h)
            self.cache.discard(h)
        # 3. Write every count that changed.
        for h, d in delta.items():
            if not d and h not in created:
                continue
            c = current(h) + d
            if c < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if c and h not in created and counts[h] == 0:
                raise MissingObject(f"reference to unknown object {h.hex()}")
            if c:
                batch.put(CF_REFS, h, c.to_bytes(8, "little"))
            else:
                batch.delete(CF_REFS, h)
        return len(created), len(freed)
