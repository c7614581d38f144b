"""Reference-counted, content-addressed object store (chunks and tree nodes).

Every reference-count change goes through a `RefTxn`, applied inside the single commit of
the caller's batch (see cowfs.store.Store.commit), so a dedup hit can never race a free:
increments are applied before decrements, creations store their data exactly once, and a
free cascades to the children of a freed node, and to the base of a freed delta, in the
same batch.

A reference count has two parts: references from files (inode-record versions and tree
node slots) and *pins* from delta objects on their base.  Both keep an object alive; only
the first counts as logical data.  The same batches keep the space accounting (`Space`),
the background queue (`pending`: chunks not yet looked at for delta encoding) and its
length up to date, so the figures are exact without walking the store.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import NamedTuple

from cowfs.cache import ChunkCache
from cowfs.chunks import codec
from cowfs.chunks.packs import PackStore, merge_extents
from cowfs.kv.base import KV, Batch

CF_OBJECTS = "objects"
RUN_READ_AHEAD = 16 << 20  # bytes of a pack read ahead after a run read (ObjectStore.read_run)
CF_REFS = "refs"
CF_PENDING = "pending"  # chunk hash -> b"": created, not yet considered for delta encoding
CF_SIMILAR = "similar"  # super-feature -> hash of a whole chunk that had it (checked on use)
CF_SPACE = "space"  # SPACE_KEY -> packed Space
SPACE_KEY = b"space"
FAMILIES = (CF_OBJECTS, CF_REFS, CF_PENDING, CF_SIMILAR, CF_SPACE)


ROOT, SLOT, PIN = 0, 1, 2  # where a reference comes from
SIZES_MAX = 1 << 15  # remembered content sizes (~5 MiB), see ObjectStore._remember_size
# Node pairs netted by slot difference (ObjectStore.apply): at most this many per batch, and
# only nodes that differ from their pair in at most PAIR_SLOTS slots (else listing is cheaper).
PAIRS_MAX = 8
PAIR_SLOTS = 16


class MissingObject(codec.CorruptObject):
    """A referenced object is not in the store."""


@dataclass
class Space:
    """Store-wide figures, kept exact by the commits that change them.

    Identities: logical = unique + dedup saved; unique = chunk_bytes + compression saved +
    delta saved, with compression saved = unique - plain_bytes and delta saved =
    plain_bytes - chunk_bytes (plain_bytes: what the chunks would take encoded whole).
    """

    chunks: int = 0
    delta_chunks: int = 0
    unique_bytes: int = 0  # raw content of distinct chunks
    plain_bytes: int = 0  # their whole (R/Z) encodings
    chunk_bytes: int = 0  # their stored encodings (deltas included)
    logical_bytes: int = 0  # raw content times references from files
    nodes: int = 0
    node_bytes: int = 0
    queue: int = 0  # entries in CF_PENDING

    def pack(self) -> bytes:
        # Every commit that changes a count packs this: struct over the instance dict, not
        # dataclasses.astuple (a deep copy, ~10% of the daemon's busy time in rm -rf).
        return _SPACE.pack(*self.__dict__.values())

    def copy(self) -> "Space":
        # Every commit copies the figures: copy.copy (the pickle protocol) costs five times as much.
        return Space(*self.__dict__.values())

    @classmethod
    def unpack(cls, raw: bytes) -> "Space":
        return cls(*(int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)))

    def add_object(self, value: bytes, sign: int) -> None:
        """Count (sign 1) or uncount (sign -1) one stored object."""
        if value[0] == codec.KIND_NODE:
            self.nodes += sign
            self.node_bytes += sign * len(value)
            return
        raw, plain = codec.chunk_sizes(value)
        self.chunks += sign
        self.delta_chunks += sign * (value[0] == codec.KIND_DELTA)
        self.unique_bytes += sign * raw
        self.plain_bytes += sign * plain
        self.chunk_bytes += sign * codec.stored_len(value)

    def figures(self) -> dict[str, int]:
        return {
            "logical_bytes": self.logical_bytes,
            "unique_bytes": self.unique_bytes,
            "chunk_bytes": self.chunk_bytes,
            "dedup_saved_bytes": self.logical_bytes - self.unique_bytes,
            "delta_saved_bytes": self.plain_bytes - self.chunk_bytes,
            "compression_saved_bytes": self.unique_bytes - self.plain_bytes,
            "chunks": self.chunks,
            "delta_chunks": self.delta_chunks,
            "whole_chunks": self.chunks - self.delta_chunks,
            "tree_nodes": self.nodes,
            "tree_node_bytes": self.node_bytes,
            "background_queue": self.queue,
        }


_SPACE = struct.Struct("<" + "q" * len(fields(Space)))


class Ref(NamedTuple):
    """A reference-count record.

    count: all references (file roots + node slots + delta pins); pins: from deltas on this
    base; roots: from inode-record versions (the file's tree root is this object); size:
    the content bytes under the object (a chunk's raw size, a node's sum over its slots).
    size -1 marks a record of the old 8-byte format (count only).
    """

    count: int
    pins: int = 0
    roots: int = 0
    size: int = 0

    def pack(self) -> bytes:
        return (self.count.to_bytes(8, "little") + self.pins.to_bytes(4, "little")
                + self.roots.to_bytes(4, "little") + self.size.to_bytes(8, "little"))


def parse_ref(value: bytes | None) -> Ref:
    if not value:
        return Ref(0)
    if len(value) < 24:
        return Ref(int.from_bytes(value[:8], "little"), 0, 0, -1)
    return Ref(int.from_bytes(value[:8], "little"), int.from_bytes(value[8:12], "little"),
               int.from_bytes(value[12:16], "little"), int.from_bytes(value[16:24], "little"))


def scan_space(kv: KV) -> Space:
    """The accounting recounted from a full walk of objects, refs and the queue (fsck)."""
    space = Space()
    for h, value in kv.scan(CF_OBJECTS, b""):
        space.add_object(value, 1)
    for h, v in kv.scan(CF_REFS, b""):
        r = parse_ref(v)
        space.logical_bytes += r.roots * r.size
    space.queue = sum(1 for _ in kv.scan(CF_PENDING, b""))
    return space


def tree_sizes(kv: KV, hashes: list[bytes]) -> dict[bytes, int]:
    """Content bytes under each object, from the objects themselves (memoized walk)."""
    sizes: dict[bytes, int] = {}

    def size(h: bytes) -> int:
        n = sizes.get(h)
        if n is None:
            raw = kv.get(CF_OBJECTS, h)
            if raw is None:
                n = 0
            elif raw[0] == codec.KIND_NODE:
                n = sum(size(c) for c in codec.node_children(raw[1:]))
            else:
                n = codec.chunk_sizes(raw)[0]
            sizes[h] = n
        return n

    for h in hashes:
        size(h)
    return sizes


class RefTxn:
    """Reference deltas and new objects gathered by one filesystem operation."""

    __slots__ = ("delta", "new", "pairs", "recode", "done", "staged", "root_sizes")

    def __init__(self) -> None:
        self.delta: dict[bytes, int] = {}
        # hash -> (encoded value, child hashes): only needed if the object turns out to be new.
        self.new: dict[bytes, tuple[bytes, list[bytes]]] = {}
        # new node -> the stored node it was made from by changing a few slots (a hint that
        # lets apply net their children's references without touching the common ones).
        self.pairs: dict[bytes, bytes] = {}
        # Background work: hash -> new encoding of an existing chunk (a D object); hashes to
        # take off the queue.
        self.recode: dict[bytes, bytes] = {}
        self.done: list[bytes] = []
        # Pack extents written for this transaction's new objects (P values in `new`):
        # whatever the commit does not store is punched out again.
        self.staged: list[tuple[int, int, int]] = []
        # Filled by apply: content bytes under each tree root whose file references changed
        # (what a file's allocation is once the batch is written; see ObjectStore.content_size).
        self.root_sizes: dict[bytes, int] = {}

    def incref(self, h: bytes | None, n: int = 1) -> None:
        if h is not None:
            self.delta[h] = self.delta.get(h, 0) + n

    def decref(self, h: bytes | None, n: int = 1) -> None:
        if h is not None:
            self.delta[h] = self.delta.get(h, 0) - n

    def add_object(self, h: bytes, value: bytes, children: list[bytes]) -> None:
        self.new[h] = (value, children)

    def empty(self) -> bool:
        return not self.new and not self.recode and not self.done and not any(self.delta.values())


class ObjectStore:
    """Reads objects through the chunk cache (L1 decoded, L2 lz4 pages); writes via RefTxn."""

    def __init__(self, kv: KV, cache: ChunkCache, packs: PackStore) -> None:
        self.kv = kv
        self.cache = cache
        self.packs = packs
        self._punch: list[tuple[int, int, int]] = []  # extents to free once the batch is written
        raw = kv.get(CF_SPACE, SPACE_KEY)
        # None: a store from before the accounting (the caller runs `rebuild`).
        self.space: Space | None = Space.unpack(raw) if raw is not None else None
        self._staged: Space | None = None
        self._sizes: dict[bytes, int] = {}

    def rebuild(self, roots: dict[bytes, int]) -> None:
        """Rewrite every refs record in full (roots: references from inode-record versions)
        and count the accounting once; from then on commits keep both exact."""
        pins: dict[bytes, int] = {}
        for _h, value in self.kv.scan(CF_OBJECTS, b""):
            base = codec.delta_base(value) if value[0] != codec.KIND_NODE else None
            if base is not None:
                pins[base] = pins.get(base, 0) + 1
        refs = [(h, parse_ref(v).count) for h, v in self.kv.scan(CF_REFS, b"")]
        sizes = tree_sizes(self.kv, [h for h, _ in refs])
        batch = Batch()
        for h, count in refs:
            batch.put(CF_REFS, h, Ref(count, pins.get(h, 0), roots.get(h, 0), sizes[h]).pack())
        self.kv.write(batch)
        self.space = scan_space(self.kv)
        batch = Batch()
        batch.put(CF_SPACE, SPACE_KEY, self.space.pack())
        self.kv.write(batch)

    # -- reads ---------------------------------------------------------------------------
    def resolve(self, raw: bytes) -> bytes:
        """The encoding an object value stands for (a P pointer's payload comes from its pack)."""
        ext = codec.packed_extent(raw)
        if ext is None:
            return raw
        return bytes((codec.packed_kind(raw),)) + self.packs.read(*ext)

    def read_run(self, hashes: list[bytes], need: int) -> bytes | None:
        """The content of consecutive chunks as one pread, when they are raw chunks stored
        back to back in one pack (a file streamed in): at least `need` bytes, every chunk
        but the last whole.  None when they are not (the caller reads chunk by chunk).

        Streaming reads take this path without the per-chunk decode, hash check and cache
        insert (fsck verifies every chunk; the kernel's page cache and readahead on the pack
        do the caching).  On the event loop only: no commit can run between the pointer
        lookups and the pread."""
        first = None
        pos = 0
        for n, h in enumerate(hashes, 1):
            raw = self.kv.get(CF_OBJECTS, h)
            if raw is None or raw[0] != codec.KIND_PACKED or codec.packed_kind(raw) != codec.KIND_RAW:
                return None
            pack, off, length = codec.packed_extent(raw)  # type: ignore[misc]
            if first is None:
                first = (pack, off)
            elif pack != first[0] or off != first[1] + pos:
                return None
            pos += length
            if length != codec.CHUNK and n < len(hashes):
                return None
        if first is None or pos < need:
            return None
        data = self.packs.read(first[0], first[1], need)
        # Chunks streamed in together lie together: have the next requests' bytes read ahead.
        self.packs.read_ahead(first[0], first[1] + pos, RUN_READ_AHEAD)
        return data

    def stored(self, h: bytes) -> bytes | None:
        """Object h's encoding (pointers resolved), or None."""
        raw = self.kv.get(CF_OBJECTS, h)
        return None if raw is None else self.resolve(raw)

    def load(self, h: bytes) -> bytes:
        """Load and decode chunk h from the store, bypassing the cache.  Thread-safe: the
        readahead and prefetch workers call it from threads."""
        raw = self.kv.get(CF_OBJECTS, h)
        if raw is None:
            raise MissingObject(f"chunk {h.hex()} is missing")
        try:
            return self._decode(raw, h)
        except (codec.CorruptObject, OSError):
            # A thread can read a pointer just before a commit re-encodes the chunk and
            # punches its extent: read the record again before calling it damaged.
            again = self.kv.get(CF_OBJECTS, h)
            if again is None or again == raw:
                raise
            return self._decode(again, h)

    def _decode(self, raw: bytes, h: bytes) -> bytes:
        ext = codec.packed_extent(raw)
        if ext is None:
            return codec.decode_chunk(raw, h, self._base)
        return codec.decode_payload(codec.packed_kind(raw), self.packs.read(*ext), h)

    def read_ahead(self, hashes: list[bytes]) -> None:
        """Have the kernel read the pack extents of these chunks in the background (pack
        files are read without kernel readahead, see PackStore._fd)."""
        extents = []
        for h in hashes:
            raw = self.kv.get(CF_OBJECTS, h)
            if raw is not None and raw[0] == codec.KIND_PACKED:
                extents.append(codec.packed_extent(raw))
        for pack, off, length in merge_extents(extents):  # type: ignore[arg-type]
            self.packs.read_ahead(pack, off, length)

    def pack(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """Append whole encodings (R/Z values, without their kind byte) to a pack, durably;
        return their P pointers.  Runs in the flush thread; the caller puts the extents in
        txn.staged."""
        exts = self.packs.append([memoryview(v)[1:] for _h, v in items])
        return [codec.encode_packed(v[0], pack, off, length, codec.chunk_sizes(v)[0])
                for (_h, v), (pack, off, length) in zip(items, exts)]

    def discard_staged(self, txn: RefTxn) -> None:
        """The commit of txn did not happen: its pack extents hold nothing."""
        if txn.staged:
            self.packs.punch(txn.staged)
        txn.staged = []

    def _base(self, h: bytes) -> bytes:
        """A delta's base (always stored whole: one hop): from L1 if there, without touching
        its order (thread-safe), else from the store."""
        data = self.cache.l1.peek(h)
        return data if data is not None else self.load(h)

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

    def ref(self, h: bytes) -> Ref:
        return parse_ref(self.kv.get(CF_REFS, h))

    def refcount(self, h: bytes) -> int:
        return self.ref(h).count

    def exists(self, h: bytes) -> bool:
        return self.kv.get(CF_REFS, h) is not None

    # -- the one writer of reference counts ----------------------------------------------
    def apply(self, txn: RefTxn, batch: Batch) -> tuple[int, int]:
        """Fold txn into batch; return (objects created, objects freed).

        txn.delta holds file-root references; node slots and delta pins follow from objects
        created and freed.  Changes are netted per object before a count is read: rewriting
        one chunk of a big file replaces a 512-slot node, and its 511 unchanged children gain
        a slot reference from the new node and lose one from the old, so they are neither
        read nor written.  Every increment is known before any free is decided, so nothing
        this batch still references can be freed.  The new accounting is staged: `settle`
        makes it current once the batch is written.

        A new node X that txn.pairs says was made from a stored node Y is not expanded child by
        child: X's children are Y's, minus the few slots that differ (found by bisecting the
        two bodies) plus X's own there.  So X's creation bumps only the differing slots and
        adds one to group[Y], a pending "+1 to every child of Y".  If Y is freed, its "-1 to
        every child" cancels one group increment instead of being expanded; a group still
        pending after the decrements is expanded then.  While a group is pending, a decision
        about any object counts the group's contribution (eff), so nothing Y holds is freed
        early, and an object looked at meanwhile is looked at again when the group shrinks.
        """
        assert self.space is not None
        refs: dict[bytes, Ref] = {}
        space = self.space.copy()
        d_count: dict[bytes, int] = {}
        d_pins: dict[bytes, int] = {}
        d_roots: dict[bytes, int] = {}

        def bump(h: bytes, d: int, src: int) -> None:
            d_count[h] = d_count.get(h, 0) + d
            if src == PIN:
                d_pins[h] = d_pins.get(h, 0) + d
            elif src == ROOT:
                d_roots[h] = d_roots.get(h, 0) + d

        def current(h: bytes) -> Ref:
            r = refs.get(h)
            if r is None:
                r = refs[h] = self.ref(h)
                self._remember_size(h, r.size)
            return r

        created: dict[bytes, int] = {}  # new object -> its content size (-1: not summed yet)
        group: dict[bytes, int] = {}  # stored node Y -> pending "+n to each child of Y"
        bodies: dict[bytes, bytes] = {}  # Y -> its node body
        looked: dict[bytes, set[bytes]] = {}  # Y -> objects decided while group[Y] was pending
        made_from: dict[bytes, tuple[bytes, list[bytes], list[bytes]]] = {}  # X -> (Y, gained, lost)

        def size_of(h: bytes) -> int:
            n = created.get(h)
            if n is None:
                n = self._sizes.get(h)
                return current(h).size if n is None else n
            if n < 0:
                pair = made_from.get(h)
                if pair is None:
                    n = sum(size_of(c) for c in txn.new[h][1])
                else:
                    y, gained, lost = pair
                    n = size_of(y) + sum(map(size_of, gained)) - sum(map(size_of, lost))
                created[h] = n
            return n

        def eff(h: bytes) -> int:
            """h's net count change, pending groups included."""
            d = d_count.get(h, 0)
            for y, g in group.items():
                if g:
                    k = codec.slot_count(bodies[y], h)
                    if k:
                        d += g * k
                        looked[y].add(h)
            return d

        def pair_of(h: bytes, value: bytes) -> tuple[bytes, list[bytes], list[bytes]] | None:
            y = txn.pairs.get(h)
            if y is None or (y not in bodies and len(bodies) >= PAIRS_MAX):
                return None
            body = bodies.get(y)
            if body is None:
                body = self.cache.node(y)
                if body is None:
                    raw = self.kv.get(CF_OBJECTS, y)
                    if raw is None or raw[0] != codec.KIND_NODE:
                        return None
                    body = raw[1:]
            diff = codec.node_diff(value[1:], body, PAIR_SLOTS)
            if diff is None:
                return None
            bodies[y] = body
            looked.setdefault(y, set())
            return y, diff[0], diff[1]

        for h, d in txn.delta.items():
            if d:
                bump(h, d, ROOT)
        for h, value in txn.recode.items():
            old = self.kv.get(CF_OBJECTS, h)
            if old is None or current(h).count == 0:
                raise MissingObject(f"re-encoding unknown object {h.hex()}")
            batch.put(CF_OBJECTS, h, value)
            self._free_extent(old)
            space.add_object(old, -1)
            space.add_object(value, 1)
            base = codec.delta_base(value)
            if base is not None:
                bump(base, 1, PIN)
        dequeued: set[bytes] = set()
        for h in txn.done:
            if self.kv.get(CF_PENDING, h) is not None:
                batch.delete(CF_PENDING, h)
                space.queue -= 1
                dequeued.add(h)
        # 1. Creations: only objects this transaction brings can be new; a new object's
        #    children gain a slot reference (which can make them new in turn).
        todo = [h for h, d in d_count.items() if d > 0 and h in txn.new]
        while todo:
            h = todo.pop()
            if h in created or current(h).count:
                continue
            value, children = txn.new[h]
            created[h] = -1
            batch.put(CF_OBJECTS, h, value)
            space.add_object(value, 1)
            pair = pair_of(h, value) if h in txn.pairs else None
            if pair is not None:
                made_from[h] = pair
                y, children, lost = pair
                group[y] = group.get(y, 0) + 1
                for c in lost:
                    bump(c, -1, SLOT)
            for c in children:
                bump(c, 1, SLOT)
                if c in txn.new:
                    todo.append(c)
            if value[0] != codec.KIND_NODE:
                created[h] = codec.chunk_sizes(value)[0]
                batch.put(CF_PENDING, h, b"")
                space.queue += 1
        for h in list(created):
            self._remember_size(h, size_of(h))
        # 2. Decrements, cascading to the children of freed nodes and the bases of freed deltas.
        freed: dict[bytes, int] = {}  # hash -> its net count change when it was freed
        todo = [h for h, d in d_count.items() if d < 0]
        while todo:
            h = todo.pop()
            d = eff(h)
            if h in freed:
                if d != freed[h]:
                    raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
                continue
            if not d:  # as many references gained as lost: the count stays, unread
                continue
            left = (0 if h in created else current(h).count) + d
            if left < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if left:
                continue
            freed[h] = d
            raw = txn.recode.get(h) or (txn.new[h][0] if h in created else self.kv.get(CF_OBJECTS, h))
            if raw is not None:
                space.add_object(raw, -1)
                if raw[0] == codec.KIND_NODE:
                    if group.get(h):
                        group[h] -= 1  # "-1 to each child" meets a pending "+1 to each child"
                        todo.extend(looked[h])
                    else:
                        for c in codec.node_children(raw[1:]):
                            bump(c, -1, SLOT)
                            todo.append(c)
                else:
                    base = codec.delta_base(raw)
                    if base is not None:
                        bump(base, -1, PIN)
                        todo.append(base)
                    if h in created or (space.queue > 0 and h not in dequeued
                                        and self.kv.get(CF_PENDING, h) is not None):
                        batch.delete(CF_PENDING, h)
                        space.queue -= 1
            if raw is not None and h not in created:
                self._free_extent(raw)
            batch.delete(CF_OBJECTS, h)
            self.cache.discard(h)
        for y, g in group.items():
            if g:  # Y stays: the nodes made from it really do add a reference to its children
                for c in codec.node_children(bodies[y]):
                    bump(c, g, SLOT)
        # 3. Write every record that changed, and the logical bytes of file references.
        for h in d_count.keys() | created.keys():
            dc, dp, dr = d_count.get(h, 0), d_pins.get(h, 0), d_roots.get(h, 0)
            if not (dc or dp or dr) and h not in created:
                continue
            r = Ref(0, 0, 0, created[h]) if h in created else current(h)
            new = Ref(r.count + dc, r.pins + dp, r.roots + dr, r.size)
            if new.count < 0 or new.pins < 0 or new.roots < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if new.count and not r.count and h not in created:
                raise MissingObject(f"reference to unknown object {h.hex()}")
            space.logical_bytes += dr * r.size
            if dr and new.count:
                txn.root_sizes[h] = r.size
            if new.count:
                batch.put(CF_REFS, h, new.pack())
            else:
                batch.delete(CF_REFS, h)
                self._sizes.pop(h, None)
        # Staged pack extents whose object this batch does not store (it existed already, or
        # was created and freed at once) are garbage once the batch is written.
        if txn.staged:
            kept = {codec.packed_extent(txn.new[h][0]) for h in created if h not in freed}
            self._punch.extend(ext for ext in txn.staged if ext not in kept)
        batch.put(CF_SPACE, SPACE_KEY, space.pack())
        self._staged = space
        return len(created), len(freed)

    def content_size(self, h: bytes | None, txn: RefTxn | None = None) -> int:
        """Content bytes under object h (a chunk's length, a node's sum over its slots): the
        bytes a file whose tree root is h has allocated.  txn: one being committed, whose new
        roots are not in the refs family yet."""
        if h is None:
            return 0
        if txn is not None:
            n = txn.root_sizes.get(h)
            if n is not None:
                return n
        n = self._sizes.get(h)
        if n is None:
            n = max(self.ref(h).size, 0)
            self._remember_size(h, n)
        return n

    def _remember_size(self, h: bytes, size: int) -> None:
        """Content sizes never change for a hash: keep recent ones so a new node's size is a
        sum of cached figures, not hundreds of refs reads (FIFO-bounded)."""
        if size < 0:
            return
        sizes = self._sizes
        if len(sizes) >= SIZES_MAX:
            del sizes[next(iter(sizes))]
        sizes[h] = size

    def _free_extent(self, raw: bytes) -> None:
        ext = codec.packed_extent(raw)
        if ext is not None:
            self._punch.append(ext)

    def settle(self) -> None:
        """The batch of the last apply is written: its accounting is now the store's, and
        the pack extents it freed can go."""
        if self._staged is not None:
            self.space, self._staged = self._staged, None
        if self._punch:
            punch, self._punch = self._punch, []
            self.packs.punch(punch)

    def abort(self, txn: RefTxn | None) -> None:
        """The batch of the last apply was not written: forget what it would have freed."""
        self._staged = None
        self._punch = []
        if txn is not None:
            self.discard_staged(txn)
