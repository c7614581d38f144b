"""Reference counts: the record format (Ref), the transaction that gathers changes (RefTxn),
and their application to a batch (`RefApply`), the one writer of counts.

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

Counts, objects and the queue are read from the object store's `home`, content sizes and
bodies through its view (`kv`).  A fork's home may count *foreign* objects, stored by an
ancestor's database (docs/design-many-processes.md, "Step 6"): nothing below one is expanded
when it is first counted or freed, only its home refs record changes (ObjectStore).
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, AbstractSet, NamedTuple

from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS, CF_PENDING, CF_REFS, CF_SPACE, SPACE_KEY
from cowfs.chunks.space import Space
from cowfs.kv.base import KV, Batch

if TYPE_CHECKING:
    from cowfs.chunks.objects import ObjectStore

ROOT, SLOT, PIN = 0, 1, 2  # where a reference comes from
# Node pairs netted by slot difference (RefApply): at most this many per batch, and only
# nodes that differ from their pair in at most PAIR_SLOTS slots (else listing is cheaper).
# A fold of a few hundred chunks of a 1 GiB file changes all of its 32 leaves, ~8-16 slots
# each: with 8 pairs of at most 16 slots, most leaves were listed child by child (512 slots
# created, 512 freed); 64 of 64 take 2-3x less time for folds of 32-512 chunks there
# (docs/benchmarks.md, "Sparse dirty buffers").
PAIRS_MAX = 64
PAIR_SLOTS = 64
INDEX_AFTER = 16  # searches of a paired node's body before its slots are counted once


class MissingObject(codec.CorruptObject):
    """A referenced object is not in the store."""


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
    for _h, value in kv.scan(CF_OBJECTS, b""):
        space.add_object(value, 1)
    for _h, v in kv.scan(CF_REFS, b""):
        r = parse_ref(v)
        space.logical_bytes += r.roots * r.size
    space.queue = sum(1 for _ in kv.scan(CF_PENDING, b""))
    return space


def tree_sizes(kv: KV, hashes: list[bytes]) -> dict[bytes, int]:
    """Content bytes under each object, from the objects themselves (memoized walk), read
    through kv (a fork's view, for its foreign objects)."""
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

    __slots__ = ("delta", "new", "pairs", "recode", "done", "staged", "root_sizes", "absent")

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
        # Packs written for this transaction's new objects (P values in `new` point into
        # them): a pack the commit stores no pointer into is deleted again.
        self.staged: list[int] = []
        # Filled by apply: content bytes under each tree root whose file references changed
        # (what a file's allocation is once the batch is written; see ObjectStore.content_size).
        self.root_sizes: dict[bytes, int] = {}
        # Objects the caller knows the store has no record of (a new store's build, which
        # made them in this transaction only): apply takes their count as 0 without a read.
        self.absent: AbstractSet[bytes] = frozenset()

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


class RefApply:
    """One application of a RefTxn to a batch (`run`); see `run` for the algorithm.

    The state of the application lives here, one attribute per concern, and each step is a
    method: `_roots`, `_recodes`, `_dequeue` (what the transaction brings), `_create`
    (phase 1), `_decrement` (phase 2), `_expand_groups` and `_write_records` (phase 3)."""

    def __init__(self, objects: "ObjectStore", txn: RefTxn, batch: Batch) -> None:
        assert objects.space is not None
        self.objects = objects
        self.home = objects.home  # counts, objects and queue read here; the batch writes here
        self.view = objects.kv  # object bodies read through (a pair's stored node may be foreign)
        self.txn = txn
        self.batch = batch
        self.space = objects.space.copy()
        self.refs: dict[bytes, Ref] = {}  # records read so far
        self.d_count: dict[bytes, int] = {}
        self.d_pins: dict[bytes, int] = {}
        self.d_roots: dict[bytes, int] = {}
        self.created: dict[bytes, int] = {}  # new object -> its content size (-1: not summed yet)
        self.group: dict[bytes, int] = {}  # stored node Y -> pending "+n to each child of Y"
        self.bodies: dict[bytes, bytes] = {}  # Y -> its node body
        self.looked: dict[bytes, set[bytes]] = {}  # Y -> objects decided while group[Y] was pending
        self.slot_asks: dict[bytes, int] = {}  # Y -> searches of its body so far (`_slots_of`)
        self.slot_index: dict[bytes, Counter[bytes]] = {}  # Y -> count of each hash in its slots
        self.made_from: dict[bytes, tuple[bytes, list[bytes], list[bytes]]] = {}  # X -> (Y, gained, lost)
        self.dequeued: set[bytes] = set()
        self.freed: dict[bytes, int] = {}  # hash -> its net count change when it was freed

    def run(self) -> tuple[int, int]:
        """Fold the transaction into the batch; return (objects created, objects freed).

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
        txn = self.txn
        if txn.absent and not (txn.recode or txn.done or txn.pairs) and min(txn.delta.values(), default=0) >= 0:
            counts = self._run_adding()
        else:
            counts = self._run_general()
        self.batch.put(CF_SPACE, SPACE_KEY, self.space.pack())
        return counts

    def _run_general(self) -> tuple[int, int]:
        self._roots()
        self._recodes()
        self._dequeue()
        self._create()
        self._decrement()
        self._expand_groups()
        self._write_records()
        return len(self.created), len(self.freed)

    def _run_adding(self) -> tuple[int, int]:
        """`run` for a transaction that only adds references, to objects most of which it
        brings and the store has no record of (txn.absent: a new store's build, 25,000 F
        objects for issue 23's sandbox): the same records and accounting as the general
        path (tests/unit/test_refcounts.py compares them), with nothing to net or free, so
        no decrement phase, no per-source bookkeeping, no read of an absent object's count."""
        txn, batch, space, new, absent = self.txn, self.batch, self.space, self.txn.new, self.txn.absent
        gain = {h: d for h, d in txn.delta.items() if d}    # references each object gains
        created = self.created
        todo = [h for h in gain if h in new]
        while todo:
            h = todo.pop()
            if h in created or (h not in absent and self.current(h).count):
                continue
            value, children = new[h]
            created[h] = -1
            batch.put(CF_OBJECTS, h, value)
            space.add_object(value, 1)
            for c in children:
                gain[c] = gain.get(c, 0) + 1
                if c in new:
                    todo.append(c)
            if value[0] != codec.KIND_NODE:
                created[h] = codec.chunk_sizes(value)[0]
                batch.put(CF_PENDING, h, b"")
                space.queue += 1
        for h in list(created):
            self.objects.remember_size(h, self.size_of(h))
        roots = txn.delta
        for h, dc in gain.items():
            size = created.get(h)
            if size is None:
                r = self.current(h)
                if r.count:
                    count, pins, nroots, size = r
                elif self.objects.split:
                    count = pins = nroots = 0
                    size = self.objects.foreign_size(h)
                else:
                    raise MissingObject(f"reference to unknown object {h.hex()}")
            else:
                count = pins = nroots = 0
            dr = roots.get(h, 0)
            if dr:
                space.logical_bytes += dr * size
                txn.root_sizes[h] = size
            batch.put(CF_REFS, h, Ref(count + dc, pins, nroots + dr, size).pack())
        return len(created), 0

    # -- helpers -------------------------------------------------------------------------
    def bump(self, h: bytes, d: int, src: int) -> None:
        self.d_count[h] = self.d_count.get(h, 0) + d
        if src == PIN:
            self.d_pins[h] = self.d_pins.get(h, 0) + d
        elif src == ROOT:
            self.d_roots[h] = self.d_roots.get(h, 0) + d

    def current(self, h: bytes) -> Ref:
        """h's stored record (read once)."""
        r = self.refs.get(h)
        if r is None:
            r = self.refs[h] = Ref(0) if h in self.txn.absent else self.objects.ref(h)
            if r.count:  # no record: a new object (its size comes with it) or a foreign one
                self.objects.remember_size(h, r.size)
        return r

    def size_of(self, h: bytes) -> int:
        n = self.created.get(h)
        if n is None:
            n = self.objects.known_size(h)
            if n is not None:
                return n
            r = self.current(h)
            return self.objects.foreign_size(h) if self.objects.split and not r.count else r.size
        if n < 0:
            pair = self.made_from.get(h)
            if pair is None:
                n = sum(self.size_of(c) for c in self.txn.new[h][1])
            else:
                y, gained, lost = pair
                n = self.size_of(y) + sum(map(self.size_of, gained)) - sum(map(self.size_of, lost))
            self.created[h] = n
        return n

    def eff(self, h: bytes) -> int:
        """h's net count change, pending groups included."""
        d = self.d_count.get(h, 0)
        for y, g in self.group.items():
            if g:
                k = self._slots_of(y, h)
                if k:
                    d += g * k
                    self.looked[y].add(h)
        return d

    def _slots_of(self, y: bytes, h: bytes) -> int:
        """How many slots of stored node y hold h: a search of its body (~2-5 µs for 512
        slots), or, once y has been searched INDEX_AFTER times (a flush of many chunks of a
        big file nets each freed chunk against every pending leaf), a count of its slots."""
        index = self.slot_index.get(y)
        if index is None:
            asked = self.slot_asks[y] = self.slot_asks.get(y, 0) + 1
            if asked < INDEX_AFTER:
                return codec.slot_count(self.bodies[y], h)
            index = self.slot_index[y] = Counter(codec.node_children(self.bodies[y]))  # h is no hole
        return index.get(h, 0)

    def pair_of(self, h: bytes, value: bytes) -> tuple[bytes, list[bytes], list[bytes]] | None:
        """(Y, children gained, children lost) if new node h can be netted against stored node Y."""
        y = self.txn.pairs.get(h)
        if y is None or (y not in self.bodies and len(self.bodies) >= PAIRS_MAX):
            return None
        body = self.bodies.get(y)
        if body is None:
            body = self.objects.cache.node(y)
            if body is None:
                raw = self.view.get(CF_OBJECTS, y)
                if raw is None or raw[0] != codec.KIND_NODE:
                    return None
                body = raw[1:]
        diff = codec.node_diff(value[1:], body, PAIR_SLOTS)
        if diff is None:
            return None
        self.bodies[y] = body
        self.looked.setdefault(y, set())
        return y, diff[0], diff[1]

    # -- what the transaction brings -----------------------------------------------------
    def _roots(self) -> None:
        for h, d in self.txn.delta.items():
            if d:
                self.bump(h, d, ROOT)

    def _recodes(self) -> None:
        for h, value in self.txn.recode.items():
            old = self.home.get(CF_OBJECTS, h)
            if old is None or self.current(h).count == 0:
                raise MissingObject(f"re-encoding unknown object {h.hex()}")
            self.batch.put(CF_OBJECTS, h, value)
            self.space.add_object(old, -1)
            self.space.add_object(value, 1)
            base = codec.delta_base(value)
            if base is not None:
                self.bump(base, 1, PIN)

    def _dequeue(self) -> None:
        for h in self.txn.done:
            if self.home.get(CF_PENDING, h) is not None:
                self.batch.delete(CF_PENDING, h)
                self.space.queue -= 1
                self.dequeued.add(h)

    # -- 1. creations --------------------------------------------------------------------
    def _create(self) -> None:
        """Only objects this transaction brings can be new; a new object's children gain a
        slot reference (which can make them new in turn)."""
        txn, batch, space = self.txn, self.batch, self.space
        todo = [h for h, d in self.d_count.items() if d > 0 and h in txn.new]
        while todo:
            h = todo.pop()
            if h in self.created or self.current(h).count:
                continue
            value, children = txn.new[h]
            self.created[h] = -1
            batch.put(CF_OBJECTS, h, value)
            space.add_object(value, 1)
            pair = self.pair_of(h, value) if h in txn.pairs else None
            if pair is not None:
                self.made_from[h] = pair
                y, children, lost = pair
                self.group[y] = self.group.get(y, 0) + 1
                for c in lost:
                    self.bump(c, -1, SLOT)
            for c in children:
                self.bump(c, 1, SLOT)
                if c in txn.new:
                    todo.append(c)
            if value[0] != codec.KIND_NODE:
                self.created[h] = codec.chunk_sizes(value)[0]
                batch.put(CF_PENDING, h, b"")
                space.queue += 1
        for h in list(self.created):
            self.objects.remember_size(h, self.size_of(h))

    # -- 2. decrements -------------------------------------------------------------------
    def _decrement(self) -> None:
        """Decrements, cascading to the children of freed nodes and the bases of freed deltas."""
        todo = [h for h, d in self.d_count.items() if d < 0]
        while todo:
            h = todo.pop()
            d = self.eff(h)
            if h in self.freed:
                if d != self.freed[h]:
                    raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
                continue
            if not d:  # as many references gained as lost: the count stays, unread
                continue
            left = (0 if h in self.created else self.current(h).count) + d
            if left < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if left:
                continue
            self.freed[h] = d
            self._free(h, todo)

    def _free(self, h: bytes, todo: list[bytes]) -> None:
        """Drop object h (its count reached zero) and queue what it referenced."""
        txn, space = self.txn, self.space
        raw = txn.recode.get(h) or (txn.new[h][0] if h in self.created else self.home.get(CF_OBJECTS, h))
        if raw is None and self.objects.split:
            return  # foreign: its count is the home's whole part in it (a pending group of a pair stays)
        if raw is not None:
            space.add_object(raw, -1)
            if raw[0] == codec.KIND_NODE:
                if self.group.get(h):
                    self.group[h] -= 1  # "-1 to each child" meets a pending "+1 to each child"
                    todo.extend(self.looked[h])
                else:
                    for c in codec.node_children(raw[1:]):
                        self.bump(c, -1, SLOT)
                        todo.append(c)
            else:
                base = codec.delta_base(raw)
                if base is not None:
                    self.bump(base, -1, PIN)
                    todo.append(base)
                if h in self.created or (space.queue > 0 and h not in self.dequeued
                                         and self.home.get(CF_PENDING, h) is not None):
                    self.batch.delete(CF_PENDING, h)
                    space.queue -= 1
        # A packed chunk's bytes stay in their pack, dead, until garbage collection
        # repacks it (chunks.packs): dropping the pointer is the whole free.
        self.batch.delete(CF_OBJECTS, h)
        self.objects.cache.discard(h)

    # -- 3. the records ------------------------------------------------------------------
    def _expand_groups(self) -> None:
        for y, g in self.group.items():
            if g:  # Y stays: the nodes made from it really do add a reference to its children
                for c in codec.node_children(self.bodies[y]):
                    self.bump(c, g, SLOT)

    def _write_records(self) -> None:
        """Write every record that changed, and the logical bytes of file references."""
        created = self.created
        for h in self.d_count.keys() | created.keys():
            dc, dp, dr = self.d_count.get(h, 0), self.d_pins.get(h, 0), self.d_roots.get(h, 0)
            if not (dc or dp or dr) and h not in created:
                continue
            r = Ref(0, 0, 0, created[h]) if h in created else self.current(h)
            if not r.count and dc > 0 and self.objects.split and h not in created:
                r = Ref(0, 0, 0, self.objects.foreign_size(h))  # first counted at home: foreign
            new = Ref(r.count + dc, r.pins + dp, r.roots + dr, r.size)
            if new.count < 0 or new.pins < 0 or new.roots < 0:
                raise codec.CorruptObject(f"reference count of {h.hex()} would drop below zero")
            if new.count and not r.count and h not in created and not self.objects.split:
                raise MissingObject(f"reference to unknown object {h.hex()}")
            self.space.logical_bytes += dr * r.size
            if dr and new.count:
                self.txn.root_sizes[h] = r.size
            if new.count:
                self.batch.put(CF_REFS, h, new.pack())
            else:
                self.batch.delete(CF_REFS, h)
                self.objects.forget_size(h)

    def kept_packs(self) -> set[int]:
        """Packs that objects this application stores point into (new objects, and the
        re-encodings of a lazy mount's fetched chunks into its cache pack: chunks.remotecache)."""
        out = set()
        values = [self.txn.new[h][0] for h in self.created if h not in self.freed]
        values += [v for h, v in self.txn.recode.items() if h not in self.freed]
        for value in values:
            ext = codec.packed_extent(value)
            if ext is not None:
                out.add(ext[0])
        return out
