"""The layer tree behind branches and snapshots.

Every metadata key carries the id of the layer it was written in.  A branch writes only to
its head layer; taking a snapshot freezes the head (the snapshot *is* that layer) and gives
the branch a fresh child layer: O(1), nothing is copied.  A view (a branch or a snapshot)
sees, for each key, the version from its nearest ancestor layer.  Layer ids grow from parent
to child, and keys sort newest layer first, so one seek lands on the right version unless
other branches changed the same key (those versions are skipped, never more than the
number of branches that changed it).
"""
from __future__ import annotations

import json
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from cowfs.kv.base import KV, Batch, Conflict
from cowfs.meta.lineage import Ancestry, Block, Lineage
from cowfs.meta.named import Records, stored

CF_META = "meta"
# The catalog's family: branch/, snap/, layer/ and the counters, in the store's reference store
# (cowfs.kv.split.SplitKV routes it there), changed by compare-and-set only.
CF_CATALOG = "catalog"
# Ids drawn from the reference store's counters at once (one compare-and-set each block): a
# crash skips what was left of a block, as it always has.
LAYER_BLOCK = 64
VIEW_BLOCK = 64
MAX_U64 = (1 << 64) - 1


def layer_suffix(layer: int) -> bytes:
    return (MAX_U64 - layer).to_bytes(8, "big")


def suffix_layer(suffix: bytes) -> int:
    return MAX_U64 - int.from_bytes(suffix, "big")


@dataclass(frozen=True, slots=True)
class LayerView:
    """What one branch or snapshot sees: its top layer and that layer's ancestry."""

    top: int
    ancestors: Ancestry


class Usage(NamedTuple):
    """A view's usage: logical bytes (file sizes), inodes, allocated bytes (stored chunks'
    lengths: what a sparse file's holes do not take, and what the byte quota charges)."""

    logical: int
    inodes: int
    allocated: int


@dataclass
class Branch:
    name: str
    head: int
    view: int
    created: float = field(default_factory=time.time)
    parent: str | None = None  # snapshot or branch it was made from (shown, never trusted)
    # The branch it forked from (directly, or through one of that branch's snapshots):
    # ownership (docs/architecture.md, "Authorization"), which survives the deletion of the
    # snapshot in between.  Never names a deleted branch (Catalog.remove re-parents).
    parent_branch: str | None = None
    epoch: int = 0  # bumped by rollback: inode numbers of the restored tree are new to the kernel
    quota_bytes: int = 0  # 0: no quota
    quota_inodes: int = 0
    # The id of the home (cowfs.homes) whose database holds its head, served by a daemon of its
    # own; None (absent from the record): the store's database.
    home: str | None = None


@dataclass
class Snapshot:
    name: str
    layer: int
    view: int
    # The branch that owns it: the one it was taken from, or, once that branch is deleted,
    # the nearest live branch that branch was made from; None: the store's administrator's.
    branch: str | None
    created: float = field(default_factory=time.time)


class Catalog:
    """Layers, branches and snapshots, kept in memory and written through the caller's batch.

    The records live in family CF_CATALOG (the reference store), the garbage-collection
    queue and usage records in CF_META (the home database); every change of a record puts
    in the batch what the record must still hold when the batch is published (`Batch.expect`:
    absent for a new name or layer), so that a record changed by another process meanwhile
    makes the change fail instead of overwriting it.

    Opening a store reads every layer's parent (a view's ancestry is made from them), but
    reads and parses a branch or snapshot record only when it is first used (`Records`),
    and makes the children index only when something first walks the tree downwards
    (garbage collection, a layer's subtree): a mount costs a scan of the layers' keys, not
    the reading of the whole history."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.parents: dict[int, int] = {}
        self._children: dict[int, set[int]] | None = None  # made at first use: `children`
        # For `layer_view`: depths of the layers views were made of, and the blocks views hold.
        self._depths: dict[int, int] = {}
        self._blocks: weakref.WeakValueDictionary[tuple[int, int], Block] = weakref.WeakValueDictionary()
        for key, value in kv.scan(CF_CATALOG, b"layer/", b"layer/"):
            self.parents[int.from_bytes(key[6:], "big")] = int.from_bytes(value, "big")
        # The layers that live in a home's database (format 12): layer -> home id; every other
        # layer lives in the store's database.
        self.homes: dict[int, str] = {int.from_bytes(k[len(HOME):], "big"): v.decode()
                                      for k, v in kv.scan(CF_CATALOG, HOME, HOME)}
        # Layers garbage collection has to look at (cowfs.meta.gc): no longer a top, or a
        # parent that lost a child; written in the batch of the change that made it so.
        self.queued: set[int] = {int.from_bytes(k[len(GC_QUEUE):], "big")
                                 for k, _ in kv.scan(CF_META, GC_QUEUE, GC_QUEUE)}
        # Whether a pass has looked at every layer once (stores from before the queue had
        # none, and deleted layers that were never compacted).
        self.walked = kv.get(CF_META, GC_WALKED) is not None
        self.branches: Records[Branch] = Records(Branch, *stored(kv, CF_CATALOG, b"branch/"))
        self.snapshots: Records[Snapshot] = Records(Snapshot, *stored(kv, CF_CATALOG, b"snap/"))
        # Bumped by every change to a branch or snapshot record: what a cache of something
        # derived from them (the names `.cowfs/snapshots` lists) compares, in O(1).
        self.changes = 0
        if kv.get(CF_CATALOG, OWNERS_SETTLED) is None:
            self._settle_owners()
        # Layer ids are never reused, even once a layer is gone (views keep sets of them):
        # drawn in blocks from counter/layer (`draw`), the first at the first new layer.
        self.next_layer = self.layer_end = 0
        # View ids become inode-number prefixes: never reuse one, even after a delete.
        self.next_view = self.view_end = 0

    def reload(self) -> None:
        """Read everything again from the stores: after a change that was not published
        (cowfs.kv.split.Unpublished), memory goes back to what the catalog holds.  Ids drawn
        stay drawn: the next ones come from a new block."""
        changes = self.changes
        self.__init__(self.kv)  # type: ignore[misc]
        self.changes = changes + 1

    @property
    def children(self) -> dict[int, set[int]]:
        """Every layer with children: its children (made from `parents` at first use, then
        kept up to date with it)."""
        if self._children is None:
            kids: dict[int, set[int]] = {}
            for lid, parent in self.parents.items():
                kids.setdefault(parent, set()).add(lid)
            self._children = kids
        return self._children

    def _settle_owners(self) -> None:
        """Older cowfs deleted branches without re-parenting: references to a branch that no
        longer exists are cleared (the store's administrator's), once, so that a new branch
        given that name never inherits another's snapshots or forks.  Done once per store
        (OWNERS_SETTLED, which a new store has from the start): every cowfs that reads this
        store's format re-parents at each delete (`remove`), and this walk parses every
        record."""
        batch = Batch()
        for s in self.snapshots.values():
            if s.branch is not None and s.branch not in self.branches:
                s.branch = None
                self.save_snapshot(s, batch)
        for b in self.branches.values():
            if b.parent_branch is not None and b.parent_branch not in self.branches:
                b.parent_branch = None
                self.save_branch(b, batch)
        batch.put(CF_CATALOG, OWNERS_SETTLED, b"")
        self.kv.write(batch)

    def figures(self) -> dict[str, int]:
        """Branch and snapshot records read from the store so far, and how many of them have
        been parsed (`Records`)."""
        (rb, pb), (rs, ps) = self.branches.figures(), self.snapshots.figures()
        return {"catalog_records_read": rb + rs, "catalog_records_parsed": pb + ps}

    def member(self, layer: int) -> str | None:
        """Which database holds layer's keys: the id of its home, or None for the store's."""
        return self.homes.get(layer)

    def ancestry(self, layer: int) -> list[int]:
        """layer, its parent, ... up to the root layer."""
        out = []
        while layer:
            out.append(layer)
            layer = self.parents[layer]
        return out

    def layer_view(self, top: int) -> LayerView:
        """top's view: its ancestry as the Fenwick blocks of its line (`Block`): the n = depth
        + 1 layers from the root to top split into blocks of n's bits, lowest first from top
        down, each block kept (weakly) by (end, size) and shared by every view that has it."""
        path = self._depth_walk(top)
        n = self._depths[top] + 1 if top else 0  # 0: no layer, an empty ancestry
        levels: list[frozenset[int]] = []
        end, offset = top, 0
        while n:
            size = n & -n
            b = self._block(end, size, path, offset)
            levels.append(b)
            end, n, offset = b.below, n - size, offset + size
        levels.reverse()  # largest (oldest layers) first
        return LayerView(top, Lineage(tuple(levels)))

    def _depth_walk(self, top: int) -> list[int]:
        """Layers from top up to the first whose depth (layers above it) is known, their
        depths recorded; the root layer has depth 0."""
        path: list[int] = []
        layer, base = top, -1
        while layer:
            d = self._depths.get(layer)
            if d is not None:
                base = d
                break
            path.append(layer)
            layer = self.parents[layer]
        k = len(path)
        self._depths.update(zip(path, range(base + k, base, -1)))
        return path

    def _block(self, end: int, size: int, path: list[int], offset: int) -> Block:
        """The block of `size` layers from end up, made once (from the walk just taken when
        it covers them) and kept while some view holds it."""
        key = (end, size)
        b = self._blocks.get(key)
        if b is not None:
            return b
        if offset + size <= len(path):
            members = path[offset:offset + size]
            below = path[offset + size] if offset + size < len(path) else self.parents[members[-1]]
        else:
            members, layer = [], end
            for _ in range(size):
                members.append(layer)
                layer = self.parents[layer]
            below = layer
        b = Block(members)
        b.below = below
        self._blocks[key] = b
        return b

    def _reshaped(self) -> None:
        """A layer's parent changed or a layer went: depths and blocks are made again."""
        self._depths.clear()
        self._blocks.clear()

    def draw(self, counter: bytes, count: int, floor: int = 0) -> int:
        """The first of count numbers never handed out, from the reference store's counter
        (its value: the first number not yet drawn; floor: at least this), taken at once by
        compare-and-set against what was read (another process may draw meanwhile)."""
        key = b"counter/" + counter
        for _ in range(64):
            raw = self.kv.get(CF_CATALOG, key)
            start = max(int.from_bytes(raw, "big") if raw else 1, floor)
            b = Batch()
            b.put(CF_CATALOG, key, (start + count).to_bytes(8, "big"))
            try:
                self.kv.write(b, [(CF_CATALOG, key, raw)])
            except Conflict:
                continue
            return start
        raise RuntimeError(f"could not draw from counter/{counter.decode()}: the reference store kept changing")

    def new_layer(self, parent: int, batch: Batch, home: str | None = None) -> int:
        """A new layer, child of parent: its id exceeds parent's (`Versioned` finds a key's
        version with one seek because children sort first), drawn afresh if this process's
        block cannot give one (every id was drawn from the counter, which only grows).  home:
        the home whose database will hold its keys (`home/<id>` published with `layer/<id>`,
        so no process ever sees the layer without knowing where it lives)."""
        if self.next_layer >= self.layer_end or self.next_layer <= parent:
            floor = max(self.parents, default=0) + 1
            self.next_layer = self.draw(b"layer", LAYER_BLOCK, floor)
            self.layer_end = self.next_layer + LAYER_BLOCK
        lid = self.next_layer
        self.next_layer += 1
        self.parents[lid] = parent
        if self._children is not None:
            self._children.setdefault(parent, set()).add(lid)
        key = b"layer/" + lid.to_bytes(8, "big")
        batch.expects(CF_CATALOG, key, None)
        batch.put(CF_CATALOG, key, parent.to_bytes(8, "big"))
        if home is not None:
            self.homes[lid] = home
            batch.expects(CF_CATALOG, HOME + lid.to_bytes(8, "big"), None)
            batch.put(CF_CATALOG, HOME + lid.to_bytes(8, "big"), home.encode())
        return lid

    def reparent(self, layer: int, parent: int, batch: Batch) -> None:
        """layer's parent becomes parent (its old parent is being merged into it)."""
        old = self.parents[layer]
        self.parents[layer] = parent
        self._reshaped()
        if self._children is not None:
            self._children.get(old, set()).discard(layer)
            self._children.setdefault(parent, set()).add(layer)
        key = b"layer/" + layer.to_bytes(8, "big")
        batch.expects(CF_CATALOG, key, old.to_bytes(8, "big"))
        batch.put(CF_CATALOG, key, parent.to_bytes(8, "big"))

    def enqueue(self, layer: int, batch: Batch) -> None:
        """Have garbage collection look at layer (see `queued`)."""
        if layer and layer in self.parents:
            self.queued.add(layer)
            batch.put(CF_META, GC_QUEUE + layer.to_bytes(8, "big"), b"")

    def dequeue(self, layer: int, batch: Batch) -> None:
        self.queued.discard(layer)
        batch.delete(CF_META, GC_QUEUE + layer.to_bytes(8, "big"))

    def mark_walked(self, batch: Batch) -> None:
        self.walked = True
        batch.put(CF_META, GC_WALKED, b"")

    def new_view(self, batch: Batch) -> int:
        """A view id never handed out (batch: kept for the callers' symmetry; the id is drawn
        from the reference store at once, in blocks)."""
        if self.next_view >= self.view_end:
            self.next_view = self.draw(b"view", VIEW_BLOCK)
            self.view_end = self.next_view + VIEW_BLOCK
        v = self.next_view
        self.next_view += 1
        return v

    def _expect(self, batch: Batch, key: bytes, existed: bool) -> None:
        """What key must hold when batch is published: absent for a record this catalog did
        not have, else the stored record (read once per batch: the first condition wins);
        a record gone meanwhile (another process deleted it) expects b"", which no record
        is, so that the publication fails."""
        if not existed:
            batch.expects(CF_CATALOG, key, None)
        elif not any(c == CF_CATALOG and k == key for c, k, _v in batch.expect):
            stored = self.kv.get(CF_CATALOG, key)
            batch.expects(CF_CATALOG, key, b"" if stored is None else stored)

    def save_branch(self, b: Branch, batch: Batch) -> None:
        key = b"branch/" + b.name.encode()
        self._expect(batch, key, b.name in self.branches)
        self.branches[b.name] = b
        self.changes += 1
        record = asdict(b)
        if b.home is None:
            del record["home"]  # a branch of the store's database: its record as before format 12
        batch.put(CF_CATALOG, key, json.dumps(record).encode())

    def save_snapshot(self, s: Snapshot, batch: Batch) -> None:
        key = b"snap/" + s.name.encode()
        self._expect(batch, key, s.name in self.snapshots)
        self.snapshots[s.name] = s
        self.changes += 1
        batch.put(CF_CATALOG, key, json.dumps(asdict(s)).encode())

    def keep(self, name: str, batch: Batch) -> None:
        """Publish batch only if snapshot name's record is still what it is now (a branch
        made from it must not survive its delete by another process)."""
        self._expect(batch, b"snap/" + name.encode(), True)

    def remove(self, name: str, batch: Batch) -> None:
        """Delete a snapshot or a branch.  A branch's snapshots and the branches made from it
        pass to the branch it was made from (None at the top of the line): who owns what
        stays as it was for every live branch, and no entry names the deleted branch, whose
        name may be given to a new branch of someone else."""
        self.changes += 1
        b = self.branches.get(name)
        if b is not None:
            key = b"branch/" + name.encode()
            self._expect(batch, key, True)
            del self.branches[name]
            batch.delete(CF_CATALOG, key)
            self.enqueue(b.head, batch)
            for s in self.snapshots.values():
                if s.branch == name:
                    s.branch = b.parent_branch
                    self.save_snapshot(s, batch)
            for c in self.branches.values():
                if c.parent_branch == name:
                    c.parent_branch = b.parent_branch
                    self.save_branch(c, batch)
        s = self.snapshots.get(name)
        if s is not None:
            key = b"snap/" + name.encode()
            self._expect(batch, key, True)
            del self.snapshots[name]
            batch.delete(CF_CATALOG, key)
            self.enqueue(s.layer, batch)

    def leaves(self) -> set[int]:
        """Layers someone can see from: branch heads and snapshot layers."""
        return {b.head for b in self.branches.values()} | {s.layer for s in self.snapshots.values()}

    def forget_layer(self, layer: int, batch: Batch) -> None:
        parent = self.parents.pop(layer, None)
        self._reshaped()
        if self._children is not None:
            if parent is not None:
                kids = self._children.get(parent)
                if kids is not None:
                    kids.discard(layer)
                    if not kids:
                        del self._children[parent]
            self._children.pop(layer, None)
        # Its queue entry stays in the store until a later batch (Collector): a crash before
        # this batch is published leaves the layer named, and queued for the next pass.
        self.queued.discard(layer)
        key = b"layer/" + layer.to_bytes(8, "big")
        if parent is not None:
            batch.expects(CF_CATALOG, key, parent.to_bytes(8, "big"))
        batch.delete(CF_CATALOG, key)
        home = self.homes.pop(layer, None)
        if home is not None:
            batch.expects(CF_CATALOG, HOME + layer.to_bytes(8, "big"), home.encode())
            batch.delete(CF_CATALOG, HOME + layer.to_bytes(8, "big"))
        batch.delete(CF_META, usage_key(layer))

    def usage(self, layer: int) -> Usage | None:
        """What the layer's view sees, recorded at its last change (None: never recorded, or
        a record of format 4 or older, without allocated bytes)."""
        raw = self.kv.get(CF_META, usage_key(layer))
        if raw is None or len(raw) < 24:
            return None
        return Usage(*(int.from_bytes(raw[i:i + 8], "big", signed=True) for i in (0, 8, 16)))

    @staticmethod
    def save_usage(layer: int, usage: Usage, batch: Batch) -> None:
        """Signed: a view's record may fall below zero for a while, when copies of a clone not
        measured yet are deleted (cowfs.meta.shared.Clone.measured)."""
        batch.put(CF_META, usage_key(layer), b"".join(n.to_bytes(8, "big", signed=True) for n in usage))


GC_QUEUE = b"gcq/"
HOME = b"home/"  # home/<layer> -> the id of the home holding it (format 12; absent: the store's db)
GC_WALKED = b"gc/walked"
OWNERS_SETTLED = b"catalog/owners-settled"


def save_format(batch: Batch, version: int) -> None:
    """The database's `format` key: the store format its records are in (a new home's)."""
    batch.put(CF_META, b"format", str(version).encode())


def usage_key(layer: int) -> bytes:
    return b"usage/" + layer.to_bytes(8, "big")


# -- the learned prefetch models (cowfs.cache.learned), one serialized blob per branch --------
def model_key(branch: str) -> bytes:
    return b"prefetch/" + branch.encode()


def load_model(kv: KV, branch: str) -> bytes | None:
    return kv.get(CF_META, model_key(branch))


def save_model(batch: Batch, branch: str, blob: bytes) -> None:
    batch.put(CF_META, model_key(branch), blob)


def drop_model(batch: Batch, branch: str) -> None:
    batch.delete(CF_META, model_key(branch))
