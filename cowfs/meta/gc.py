"""Garbage collection of metadata: the layer tree compacts, and versions no live view can
see go.

A *top* is a layer someone reads from: a branch head, a snapshot's layer, a view the kernel
still uses, and the layer of a live range of shared copies (cowfs.meta.shared: the range
reads its originals as that layer sees them).  Work comes from a queue (`Catalog.queued`,
kept in the KV): a layer is queued in the batch that makes it stop being a top (a delete,
a rollback's old head) and when a child of it goes.  Each queued layer L that is not a
top is, by its number of children:

- none: *dead*, no view sees it.  Its versions go (their references released), then L,
  and L's parent is queued.
- one, C: L *merges into C*.  Every view that sees L sees C too (C is L's only child, and
  L is no top), so for each key L has a version of: if C has one, L's is hidden from every
  view and goes; else L's moves to C.  Then C's parent becomes L's parent and L goes.  So
  deleting snapshots leaves no layer behind: the chain a read visits and the changelogs a
  pass scans hold only what live tops need.
- two or more: a *fork*.  Its versions that every top below it sees through a newer
  version go (one walk of L's subtree numbers it in pre-order, so "is below" is O(1), and
  the tops below it are a sorted list: a key costs the log of that per newer version).

Costs: a pass works on the queued layers only, each in proportion to its own changelog
(and a fork to its subtree), never on the whole history; a store that never had a pass of
this code (`Catalog.walked` false) queues every non-top layer once.  `cowfs gc` also looks
at every fork (their garbage comes from writes below them, which queue nothing).

Every batch leaves a store whose every view reads what it read before: a merge moves or
drops keys a chunk at a time (each chunk planned under the filesystem lock, since C may be
a branch head being written), and only the last chunk reparents C and forgets L; a crash in
between leaves L queued with fewer keys, and the next pass goes on.  The same holds for a
dead layer, whose record goes in the batch of its last keys.

Shared copies: a range's originals are read as its layer P sees them, so P is a top for
the keys of its originals (`pins`) and for the tree's shape (never merged nor dead).  A
range dies when no live top sees P or every copy inode is deleted in every top that
does; `dead_ranges` removes it, with the tombstones that only hid it, before a pass.  A
directory clone (cowfs.meta.shared.Clone) keeps its whole frozen layer as one more live top
while it lives, and the layer its top was written in (`seen`: views see the clone when it
is in their ancestry) as a top of the tree's shape; `dead_clones` removes a clone whose top
and copies are deleted in every live top that sees it, or that no live top sees.

Over 500 lines: the pass's cases, the shared copies' liveness and the rules for several
databases below all decide on the same walk of the layer tree and the same queue.

Several databases (docs/design-many-processes.md, "Step 6"): a branch with a home database of
its own keeps its layers there, and the lineage's older layers stay in the databases that
hold them (`Catalog.member`).  A pass works on the layers of its own database (`home`) only,
and never merges or drops a layer one of whose children lives in another database (a merge
into it would write into a database another process owns; dropping it would take from that
child what it reads): such a layer stays as it is, queued, until its last child elsewhere
goes.  Shared copies and clones are looked at only where their layer is one of ours.

Unpublished layers: a catalog change writes the home records of the layers it creates first,
then publishes them in the reference store (cowfs.kv.split); a crash in between leaves home
keys of a layer the catalog does not name (`unpublished`: found by one seek per layer in
the changelog and the usage and queue records).  No view sees them; a pass asked to
(`stray`) drops them as it drops a dead layer, with the references of their versions.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Callable, Iterable

from cowfs.chunks.refs import RefTxn
from cowfs.kv.base import Batch
from cowfs.kv.base import KV
from cowfs.meta.layers import CF_META, GC_QUEUE, Catalog, LayerView, layer_suffix, usage_key
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Clone, Range
from cowfs.meta.versioned import CF_CHANGES, CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, FAMILY, Versioned, ino_key

CHUNK = 2000  # keys per batch


class Subtree:
    """The layers at and below root, walked once without recursion: pre-order numbers and
    the end of each layer's numbers, so `below(a, t)` (t is a or under it) is O(1)."""

    def __init__(self, children: dict[int, set[int]], root: int) -> None:
        self.pre: dict[int, int] = {}
        self.end: dict[int, int] = {}
        stack: list[tuple[int, bool]] = [(root, False)]
        n = 0
        while stack:
            layer, done = stack.pop()
            if done:
                self.end[layer] = n
                continue
            self.pre[layer] = n
            n += 1
            stack.append((layer, True))
            stack.extend((c, False) for c in children.get(layer, ()))

    def below(self, a: int, t: int) -> bool:
        pa, pt = self.pre.get(a), self.pre.get(t)
        return pa is not None and pt is not None and pa <= pt < self.end[a]


class _Under:
    """The ancestry of top t in a Subtree holding the whole tree: membership in O(1)."""

    __slots__ = ("tree", "top", "root")

    def __init__(self, tree: Subtree, top: int, root: bool) -> None:
        self.tree, self.top, self.root = tree, top, root

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.tree.below(layer, self.top)

    def __len__(self) -> int:
        return 1 if self.root else 2  # only "one layer or more" matters (Versioned's point read)


def forest(catalog: Catalog) -> Subtree:
    """The whole layer tree under the virtual root 0."""
    return Subtree(catalog.children, 0)


def _views_of(catalog: Catalog, live_tops: set[int]) -> tuple[Subtree, list[LayerView]]:
    """The whole tree walked once, and each live top's view with O(1) membership."""
    tree = forest(catalog)
    return tree, [LayerView(t, _Under(tree, t, catalog.parents[t] == 0)) for t in live_tops if t in catalog.parents]


def drop_dead_shared(meta: Versioned, catalog: Catalog, live_tops: set[int],
                     commit: Callable[[Batch, RefTxn | None], None], home: str | None = None) -> None:
    """What comes before a pass: the ranges (`dead_ranges`), then the clones (`dead_clones`)
    no live view needs, each removed in a commit(batch, txn) of its own and then from
    meta.shared, with one walk of the layer tree for both (removing them changes no layer).
    home: the database this pass works on (None: the store's); others' are left alone."""
    if not meta.shared:
        return
    walked = _views_of(catalog, live_tops)
    dead, batch, txn = dead_ranges(meta, catalog, live_tops, walked, home)
    if dead:
        commit(batch, txn)
        meta.shared.committed(removed=dead)
    gone, batch = dead_clones(meta, catalog, live_tops, walked, home)
    if gone:
        commit(batch, None)
        meta.shared.clones_committed(removed=gone)


def dead_clones(meta: Versioned, catalog: Catalog, live_tops: set[int],
                walked: tuple[Subtree, list[LayerView]] | None = None,
                home: str | None = None) -> tuple[list[Clone], Batch]:
    """Clones no live view needs, and a batch removing them, their copy numbers and the
    tombstones that only hid their copies (the caller commits it, then tells meta.shared).
    walked: `_views_of(catalog, live_tops)`, if the caller has it."""
    batch = Batch()
    dead: list[Clone] = []
    if not meta.shared.clones:
        return dead, batch
    tree, views = walked or _views_of(catalog, live_tops)
    for c in list(meta.shared.clones.values()):
        if catalog.member(c.layer) != home:
            continue  # another database's clone: its own pass looks at it
        given = [y for _x, y in meta.shared.map.given(c)] if meta.shared.map is not None else []
        if c.layer in catalog.parents and any(_alive(meta, lv, [c.top_y] + given)
                                              for lv in views if tree.below(c.seen, lv.top)):
            continue
        dead.append(c)
        for y in given:
            _drop_tombstones(meta, batch, CF_INODES, ino_key(y))
            for cf in (CF_DIRENTS, CF_XATTRS, CF_LINKS):
                for key, _ in meta.kv.scan(cf, ino_key(y), ino_key(y)):
                    _drop_tombstones(meta, batch, cf, key[:-8])
        meta.shared.remove_clone(c, batch)
        catalog.enqueue(c.layer, batch)  # no longer tops: they may merge or die
        catalog.enqueue(c.seen, batch)
    return dead, batch


def _alive(meta: Versioned, lv: LayerView, inos: Iterable[int]) -> bool:
    """Whether some inode of inos is alive in lv."""
    for ino in inos:
        found = meta.get(CF_INODES, ino_key(ino), lv)
        if found is not None and found[1]:
            return True
    return False


def dead_ranges(meta: Versioned, catalog: Catalog, live_tops: set[int],
                walked: tuple[Subtree, list[LayerView]] | None = None,
                home: str | None = None) -> tuple[list[Range], Batch, RefTxn]:
    """Ranges no live view needs, and a batch removing them, their references and the
    tombstones that only hid them (the caller commits it, then tells meta.shared, before
    the pass).  walked: as for `dead_clones`."""
    batch, txn = Batch(), RefTxn()
    dead: list[Range] = []
    if not meta.shared.ranges:  # clones only (dead_clones looks at them): no walk of the layer tree
        return dead, batch, txn
    tree, views = walked or _views_of(catalog, live_tops)
    for r in list(meta.shared.ranges.values()):
        if catalog.member(r.layer) != home:
            continue  # another database's range: its own pass looks at it
        if any(_alive(meta, lv, (y for y, _x in r.pairs())) for lv in views if tree.below(r.layer, lv.top)):
            continue
        dead.append(r)
        meta.shared.remove(r, batch)
        catalog.enqueue(r.layer, batch)  # no longer a top: it may merge or die
        if r.layer in catalog.parents:  # else its originals' versions are gone: nothing to read
            for h in meta.range_roots(r):
                txn.decref(h)
        for y, _x in r.pairs():
            _drop_tombstones(meta, batch, CF_INODES, ino_key(y))
            for key, _ in meta.kv.scan(CF_DIRENTS, ino_key(y), ino_key(y)):
                _drop_tombstones(meta, batch, CF_DIRENTS, key[:-8])
    return dead, batch, txn


def _drop_tombstones(meta: Versioned, batch: Batch, cf: str, base: bytes) -> None:
    versions = meta.versions(cf, base)
    if versions and not any(v for _l, v in versions):
        for layer, _v in versions:
            Versioned.remove(batch, cf, base, layer)


@dataclass
class Chunk:
    """One batch of a pass, for the caller to commit."""

    batch: Batch = field(default_factory=Batch)
    txn: RefTxn = field(default_factory=RefTxn)
    removed: int = 0  # versions removed
    # merges: (layer merged, the layer it merged into, inodes whose record moved between them)
    moved: list[tuple[int, int, list[int]]] = field(default_factory=list)
    reshaped: bool = False  # a layer went: views' ancestries hold a layer that is no more
    touched: set[int] = field(default_factory=set)  # layers whose keys this batch changes
    written: dict[tuple[str, bytes], bool] = field(default_factory=dict)  # merge targets' keys: present?


@dataclass
class _Fork:
    layer: int
    tree: Subtree
    tops: list[int]  # pre-order numbers of the tops below, sorted
    after: bytes = b""  # changelog position reached
    # Source inode -> the layers ranges see it from (`SharedTrees.sources`), computed from
    # `ranges`, a table SharedTrees replaces (never changes) when ranges come or go.
    pins: dict[int, set[int]] = field(default_factory=dict)
    ranges: dict[bytes, Range] | None = None


class Collector:
    """One pass over the queue (and, for `cowfs gc`, every fork).  `next` plans one batch of
    up to `chunk` keys, from as many layers as that takes; the caller holds the filesystem's
    lock from `next` to its commit, with no checkpoint, and may yield between batches."""

    def __init__(self, meta: Versioned, catalog: Catalog, forks: bool = False, stray: bool = False,
                 home: str | None = None, own: KV | None = None) -> None:
        """stray: drop unpublished layers first (a store whose last writer died).  home: the
        database this pass works on (None: the store's), own: that database alone, where
        its unpublished layers are looked for (default meta.kv)."""
        self.meta, self.cat = meta, catalog
        self.home = home
        self.walk = not catalog.walked
        self._stray = sorted(unpublished(own if own is not None else meta.kv, catalog)) if stray else []
        self.strays = len(self._stray)
        more: set[int] = set()
        if self.walk:
            more = set(catalog.parents)  # tops are skipped when their turn comes
        elif forks:
            more = {l for l, kids in catalog.children.items() if len(kids) > 1 and l in catalog.parents}
        todo = set(catalog.queued) | {l for l in more if catalog.member(l) == home}
        self._gone: list[int] = []  # layers forgotten by a committed batch: their queue entries go next
        self._heap = [-l for l in todo]
        heapq.heapify(self._heap)
        self._fork: _Fork | None = None

    def next(self, live_tops: set[int], chunk: int = CHUNK) -> Chunk | None:
        """The next batch (None: the pass is done).  live_tops: the layers read from now."""
        cat = self.cat
        shared = self.meta.shared
        # A live clone's layer is read whole (a live top); the layer its top was written in
        # decides which views see it, so it must stay as it is too.
        live_tops = live_tops | {c.layer for c in shared.clones.values() if c.layer in cat.parents}
        tops = (live_tops | {r.layer for r in shared.ranges.values()}
                | {c.seen for c in shared.clones.values()})
        leaves: set[int] | None = None
        c = Chunk()
        budget = chunk
        for layer in self._gone:  # published by the batch before: no longer needed queued
            cat.dequeue(layer, c.batch)
        self._gone.clear()
        while budget > 0 and self._stray:
            budget -= self._stray_keys(c, self._stray[-1], budget)
        while budget > 0 and (self._heap or self._fork is not None):
            if self._fork is not None:
                budget -= self._fork_keys(c, self._fork, budget)
                continue
            layer = -self._heap[0]
            if layer in cat.parents and self._elsewhere(layer):
                heapq.heappop(self._heap)
                if cat.member(layer) != self.home and layer in cat.queued:
                    cat.dequeue(layer, c.batch)  # another database's: its own passes (or its home's end)
                continue  # one of ours with a child elsewhere stays queued, for when that child is gone
            if layer not in cat.parents or layer in tops:
                heapq.heappop(self._heap)
                if layer in cat.queued:
                    if leaves is None:
                        leaves = cat.leaves()
                    # A layer that is gone, or a snapshot's or branch's (queued again when
                    # deleted), leaves the queue; one only a view the kernel holds keeps a
                    # top stays in it, for a pass once the view goes.
                    if layer not in cat.parents or layer in leaves:
                        cat.dequeue(layer, c.batch)
                continue
            kids = cat.children.get(layer, ())
            # Plans read the KV, which does not hold this batch yet: a layer whose changelog
            # this batch changes, or a fork (its reads span layers), waits for the next one;
            # merges into a child this batch wrote read it through `Chunk.written`.
            if len(c.batch) and (layer in c.touched or len(kids) > 1):
                break
            if not kids:
                budget -= self._dead_keys(c, layer, budget)
            elif len(kids) == 1:
                budget -= self._merge_keys(c, layer, next(iter(kids)), budget, tops)
            else:
                heapq.heappop(self._heap)
                self._fork = self._start_fork(layer, live_tops)
        if self.walk and not self._heap and self._fork is None:
            self.walk = False
            cat.mark_walked(c.batch)
        return c if len(c.batch) or self._heap or self._fork is not None or self._stray or self._gone else None

    def _elsewhere(self, layer: int) -> bool:
        """Whether layer is not this pass's to touch: in another database, or with a child there."""
        cat = self.cat
        return (cat.member(layer) != self.home
                or any(cat.member(k) != self.home for k in cat.children.get(layer, ())))

    def _remove_keys(self, c: Chunk, layer: int, budget: int) -> list[tuple[str, bytes]]:
        """Up to budget of the versioned keys layer wrote, removed in c's batch, with what
        their values referenced released; the keys (fewer than budget: the layer's last)."""
        c.touched.add(layer)
        keys = self._changes(layer, budget)
        for cf, base in keys:
            value = self.meta.kv.get(cf, base + layer_suffix(layer))
            Versioned.remove(c.batch, cf, base, layer)
            if value is not None:
                self._released(c, cf, value)
        return keys

    # -- an unpublished layer -------------------------------------------------------------
    def _stray_keys(self, c: Chunk, layer: int, budget: int) -> int:
        """As a dead layer, but the catalog never named it: its queue and usage records go
        with its last keys."""
        keys = self._remove_keys(c, layer, budget)
        if len(keys) < budget:
            self._stray.pop()
            self.cat.dequeue(layer, c.batch)
            c.batch.delete(CF_META, usage_key(layer))
            return len(keys) + 1
        return len(keys)

    # -- a dead layer ---------------------------------------------------------------------
    def _dead_keys(self, c: Chunk, layer: int, budget: int) -> int:
        keys = self._remove_keys(c, layer, budget)
        if len(keys) < budget:  # the last of it: the layer goes, its parent may be next
            heapq.heappop(self._heap)
            parent = self.cat.parents[layer]
            self.cat.forget_layer(layer, c.batch)
            self._gone.append(layer)
            c.reshaped = True
            if parent and parent not in self.cat.queued and self.cat.member(parent) == self.home:
                self.cat.enqueue(parent, c.batch)
                heapq.heappush(self._heap, -parent)
            return len(keys) + 1
        return len(keys)

    # -- a merge --------------------------------------------------------------------------
    def _merge_keys(self, c: Chunk, layer: int, child: int, budget: int, tops: set[int]) -> int:
        kv = self.meta.kv
        c.touched |= {layer, child}
        keys = self._changes(layer, budget)
        moved: list[int] = []
        for cf, base in keys:
            value = kv.get(cf, base + layer_suffix(layer))
            Versioned.remove(c.batch, cf, base, layer)
            if value is None:
                continue  # a changelog key without its version: nothing to move
            key = base + layer_suffix(child)
            there = c.written.get((cf, key))
            if there is None:
                there = kv.get(cf, key) is not None
            if there:
                self._released(c, cf, value)  # the child's version hides it from every view
            else:
                Versioned.put(c.batch, cf, base, child, value)
                c.written[(cf, key)] = True
                if cf == CF_INODES:
                    moved.append(int.from_bytes(base[:8], "big"))
        if moved:
            c.moved.append((layer, child, moved))
        if len(keys) < budget:
            heapq.heappop(self._heap)
            self.cat.reparent(child, self.cat.parents[layer], c.batch)
            self.cat.forget_layer(layer, c.batch)
            self._gone.append(layer)
            c.reshaped = True
            if child not in tops and child not in self.cat.queued:
                # A fork got versions it may not need (or a layer that merges on): look again.
                self.cat.enqueue(child, c.batch)
                heapq.heappush(self._heap, -child)
            return len(keys) + 1
        return len(keys)

    # -- a fork ---------------------------------------------------------------------------
    def _start_fork(self, layer: int, tops: set[int]) -> _Fork:
        """tops: the live ones (a range's layer reads only its originals: `pins`)."""
        tree = Subtree(self.cat.children, layer)
        return _Fork(layer, tree, sorted(tree.pre[t] for t in tops if t in tree.pre and t != layer))

    def _fork_keys(self, c: Chunk, f: _Fork, budget: int) -> int:
        """Up to budget keys of f's changelog looked at, its garbage into c; once read
        through, f is done and leaves the queue."""
        prefix = f.layer.to_bytes(8, "big")
        shared = self.meta.shared
        if f.ranges is not shared.ranges:  # once per fork, not per batch: a walk of every range
            f.ranges, f.pins = shared.ranges, shared.sources()
        pins = f.pins
        rows = []
        for key, _ in self.meta.kv.scan(CF_CHANGES, prefix + f.after, prefix):
            if key[8:] != f.after:
                rows.append(key[8:])
                if len(rows) >= budget:
                    break
        for row in rows:
            cf, base = FAMILY[row[:1]], row[1:]
            versions = self.meta.versions(cf, base)
            mine = [v for l, v in versions if l == f.layer]
            if not mine:
                continue
            pinned = pins.get(int.from_bytes(base[:8], "big"), set()) if cf in (CF_INODES, CF_DIRENTS) else set()
            if self._hidden(f, [l for l, _ in versions if l != f.layer], pinned):
                Versioned.remove(c.batch, cf, base, f.layer)
                self._released(c, cf, mine[0])
        if rows:
            f.after = rows[-1]
        if len(rows) < budget:
            self._fork = None
            self.cat.dequeue(f.layer, c.batch)
            return len(rows) + 1
        return len(rows)

    @staticmethod
    def _hidden(f: _Fork, newer: list[int], pinned: set[int]) -> bool:
        """Whether every top below f's layer (and every pin below it) sees one of `newer`."""
        spans = sorted((f.tree.pre[l], f.tree.end[l]) for l in newer if l in f.tree.pre)
        covered = 0
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        for a, b in merged:
            covered += bisect.bisect_left(f.tops, b) - bisect.bisect_left(f.tops, a)
        if covered != len(f.tops):
            return False
        for p in pinned:
            pp = f.tree.pre.get(p)
            if pp is None or p == f.layer:
                continue
            i = bisect.bisect_right(merged, (pp, 1 << 62)) - 1
            if i < 0 or not (merged[i][0] <= pp < merged[i][1]):
                return False
        return True

    # -- shared ---------------------------------------------------------------------------
    def _changes(self, layer: int, limit: int) -> list[tuple[str, bytes]]:
        """The first `limit` keys of layer's changelog (those done are gone from it)."""
        prefix = layer.to_bytes(8, "big")
        out = []
        for key, _ in self.meta.kv.scan(CF_CHANGES, prefix, prefix):
            out.append((FAMILY[key[8:9]], key[9:]))
            if len(out) >= limit:
                break
        return out

    @staticmethod
    def _released(c: Chunk, cf: str, value: bytes) -> None:
        """A version went: its reference to its file's data too."""
        c.removed += 1
        if cf == CF_INODES and value:
            root = Attrs.unpack(value).root
            if root is not None:
                c.txn.decref(root.hash)


def collect_now(meta: Versioned, catalog: Catalog, live_tops: set[int], commit, forks: bool = True,
                stray: bool = True, home: str | None = None, own: KV | None = None) -> int:
    """A whole pass with nothing else running (offline, tests): commit(batch, txn) each
    batch; the versions removed.  home, own: as for Collector."""
    removed = 0
    col = Collector(meta, catalog, forks, stray, home, own)
    while (c := col.next(live_tops)) is not None:
        commit(c.batch, c.txn)
        removed += c.removed
    meta.forget_views()
    return removed


def unpublished(kv: KV, catalog: Catalog) -> set[int]:
    """Layers with keys in the home database (changelog, usage, queue) that the catalog does
    not name: left by a catalog change whose publication a crash cut off.  One seek per layer
    that has keys: a skip-scan of each prefix."""
    out: set[int] = set()
    for cf, prefix in ((CF_CHANGES, b""), (CF_META, b"usage/"), (CF_META, GC_QUEUE)):
        start = prefix
        while True:
            found = next(iter(kv.scan(cf, start, prefix)), None)
            if found is None:
                break
            raw = found[0][len(prefix):len(prefix) + 8]
            layer = int.from_bytes(raw, "big")
            if len(raw) == 8 and layer not in catalog.parents:
                out.add(layer)
            if len(raw) < 8 or layer == (1 << 64) - 1:
                break
            start = prefix + (layer + 1).to_bytes(8, "big")
    return out
