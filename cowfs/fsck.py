"""Full consistency check of a store (and repair of what can be fixed without losing data).

What is checked, in order:
  1. the catalog (in the reference store): branch heads and snapshots name known layers;
     every layer's ancestry ends at the root layer; every home a layer lives in
     (cowfs.homes) exists and is a liveness member, every branch's home is its head's, and
     homes nothing names (a branch's publication cut short) are counted; the counters
     exceed every layer id, view id and inode number in use (a counter behind would hand out a used one); layers with
     home keys that the catalog does not name (unpublished: a catalog change cut off by a
     crash, cowfs.meta.gc.unpublished) are counted, not a problem (gc removes them);
  2. every visible tree (each branch head and snapshot): the directory tree is connected,
     entries point at live inodes of the type they claim, link counts are right, every name
     of a file with more than one is in the index of names (cowfs.meta.links), no inode
     record is unreachable (an orphan) unless it is an open-but-unlinked file of the
     orphans list;
  3. references: the count stored for every object equals the references to it (one per
     inode-record version or shared-copy range holding a tree root, one per child slot of
     each node, one pin per delta object on its base); every referenced object exists; no
     object is stored without references; delta bases are whole chunks;
  4. every stored object decodes (a delta through its base) and matches its BLAKE3 hash;
  5. every versioned key has its changelog entry (garbage collection relies on it);
  6. the space accounting equals a recount, the background queue names stored chunks only;
  7. the usage recorded for every branch head and snapshot (logical bytes, inodes, allocated
     bytes: what `list` shows and quotas charge) equals a recount of what it sees;
  8. every small-write log record a daemon left (cowfs.core.smallwrites: fsync'd writes the
     next daemon replays) parses: a damaged one keeps every daemon from starting;
  9. across databases (cowfs.chunks.liveness): every pointer of a member database names bytes
     of an existing pack; the condemned list parses, and no pointer of any database names a
     condemned pack that is due (every writer of its round acknowledged it: the next sweep
     would delete live data).  A condemned pack already deleted is a sweep cut short, not a
     problem; a marked one whose round is not acknowledged yet is the next sweep's to pardon;
     every serve record (cowfs.meta.serving: who serves which branch) parses and names a
     branch; stale ones (their process gone) are counted; the store keeper's dup records
     (cowfs.chunks.dups) name a whole chunk where its pack's index lists it (ones naming a
     pack gone are counted).
--repair removes damaged dup records, removes unnamed homes (older than homes.UNNAMED_GRACE) and registers named ones
that are no liveness member, deletes damaged small-write log records (the writes they held
are lost), pardons condemned packs a pointer names, removes damaged, stale and dangling serve
records, raises counters that are behind, rewrites wrong reference counts, link counts and
usage records, indexes missing names of hard-linked files, deletes unreferenced objects,
dangling directory entries and missing changelog entries, and links orphaned inodes into
/lost+found of the branch they belong to. It reports what it could not fix (a missing or
damaged chunk: the files that use it are named).

Over 500 lines: one checker, a method per numbered check above, sharing what the tree walks
gather (the references and link counts they find, the usage they recount); splitting it
would pass that state between modules.
"""
from __future__ import annotations

import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from cowfs import homes
from cowfs.chunks import codec, dups
from cowfs.chunks.liveness import CF_GC, mark
from cowfs.chunks.families import CF_OBJECTS, CF_PENDING, CF_REFS, CF_SPACE, SPACE_KEY
from cowfs.chunks.packs import IndexEntry, pack_name
from cowfs.chunks.refs import Ref, parse_ref, scan_space, tree_sizes
from cowfs.chunks.space import Space
from cowfs.kv.base import KV, Batch
from cowfs.meta.gc import unpublished
from cowfs.meta.layers import CF_CATALOG, Catalog, Usage, layer_suffix, suffix_layer
from cowfs.meta.records import Attrs
from cowfs.meta.shared import COPY_INO_BASE
from cowfs.meta import links as link_index
from cowfs.meta.versioned import CF_CHANGES, CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, TAGS, LayerView, name_key
from cowfs.meta import orphans as orphan_records
from cowfs.meta import writelog
from cowfs.errors import StoreError
from cowfs.store import ROOT_INO, Store
from cowfs.storedir import DB_DIR, home_db, home_dir

LOST_FOUND = b"lost+found"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    @property
    def clean(self) -> bool:
        return not self.problems


Progress = Callable[[str, int], None]


def _versions(store: Store, cf: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(base key, layer, value) of every version stored in a versioned family of the store's
    own database (a fork's home: not those of the lineage's databases below it)."""
    for key, value in store.objects.home.scan(cf, b""):
        yield key[:-8], suffix_layer(key[-8:]), value


V = TypeVar("V")


def _inode_versions(kv: KV, make: Callable[[int, bytes], V]) -> dict[int, list[tuple[bytes, V | None]]]:
    """Every version of an inode record in kv, by its layer: (inode key, make(layer, value),
    or None for a tombstone).  One scan for all the views `_per_top` then visits."""
    out: dict[int, list[tuple[bytes, V | None]]] = defaultdict(list)
    for key, value in kv.scan(CF_INODES, b""):
        layer = suffix_layer(key[-8:])
        out[layer].append((key[:-8], make(layer, value) if value else None))
    return out


def _per_top(parents: dict[int, int], tops: list[tuple[str, int]],
             changes: dict[int, list[tuple[bytes, V | None]]]) -> Iterator[tuple[str, int, dict[bytes, V]]]:
    """(name, top, what top sees) for every top whose ancestry reaches the root layer, in
    the order of a depth-first walk of the layer tree: what a layer sees is its parent's
    with its own versions applied (a tombstone removes the key), undone when the walk
    leaves it.  Each version is applied once in all, where a scan of every version per
    view made fsck quadratic in the number of snapshots (2,000: 27 s).  The mapping is
    the walk's own: read it before the next item is taken."""
    at: dict[int, list[str]] = defaultdict(list)
    for name, top in tops:
        at[top].append(name)
    children: dict[int, list[int]] = defaultdict(list)
    for layer, parent in parents.items():
        children[parent].append(layer)
    state: dict[bytes, V] = {}
    absent = object()
    undo: list[list[tuple[bytes, object]]] = []
    stack = sorted(children.get(0, ()), reverse=True)
    while stack:
        layer = stack.pop()
        if layer == 0:  # a sentinel: leave the layer entered last
            for key, old in reversed(undo.pop()):
                if old is absent:
                    state.pop(key, None)
                else:
                    state[key] = old  # type: ignore[assignment]
            continue
        saved = []
        for key, value in changes.get(layer, ()):
            saved.append((key, state.get(key, absent)))
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        undo.append(saved)
        for name in at.get(layer, ()):
            yield name, layer, state
        stack.append(0)
        stack.extend(sorted(children.get(layer, ()), reverse=True))


def _broken_ancestries(parents: dict[int, int]) -> dict[int, int]:
    """Each layer whose ancestry does not end at the root layer, with the layer where it
    breaks (a missing parent, or where it first meets a layer again: a cycle), each layer
    walked once (remembered verdicts end the walks of its descendants)."""
    good: set[int] = {0}
    broken: dict[int, int] = {}
    for start in parents:
        path: list[int] = []
        on_path: dict[int, int] = {}
        cur = start
        while cur not in good and cur not in broken:
            if cur in on_path or cur not in parents:
                break
            on_path[cur] = len(path)
            path.append(cur)
            cur = parents[cur]
        if cur in good:
            good.update(path)
        elif cur in broken:
            broken.update((layer, broken[cur]) for layer in path)
        elif cur in on_path:  # a cycle: from its members it breaks at each one itself
            i = on_path[cur]
            broken.update((layer, cur) for layer in path[:i])
            broken.update((layer, layer) for layer in path[i:])
        else:  # a missing parent
            broken.update((layer, cur) for layer in path)
    return broken


class Fsck:
    def __init__(self, store: Store, repair: bool = False, progress: Progress | None = None,
                 verify_data: bool = True, whole_store: bool = True) -> None:
        """whole_store: also what the store shares (the catalog, the homes, the condemned packs,
        the serve records); False for a home's database, checked after the store's."""
        self.store = store
        self.whole_store = whole_store
        self.repair = repair
        self.progress = progress or (lambda _stage, _n: None)
        self.verify_data = verify_data
        self.report = Report()
        self.batch = Batch()
        self.cat: Catalog = store.catalog
        self._pack_sizes: dict[int, int] = {}
        self._last_view: LayerView | None = None
        self._listed_orphans: set[int] = set()  # open-but-unlinked inodes (cowfs.meta.orphans)
        self._max_ino = 0  # the largest inode number with a record (check_references)
        self._pack_index: dict[int, dict[bytes, IndexEntry] | None] = {}  # None: no index (or damaged)

    def run(self) -> Report:
        if self.whole_store:
            self.check_catalog()
            self.check_homes()
        self.check_shared()
        tops = self._tops()
        self._listed_orphans = orphan_records.every(self.store.kv)
        owned = _inode_versions(self.store.objects.home, lambda layer, _value: layer)
        for name, top, visible in _per_top(self.cat.parents, tops, owned):
            self.check_tree(name, top, visible)
        self.check_references()
        self.check_counters()
        self.check_changelog()
        self.check_queue()
        self.check_small_write_log()
        if self.whole_store:
            self.check_across_databases()
            self.check_serve_records()
        if self.repair and len(self.batch):
            self.store.kv.write(self.batch)
            self.store.kv.sync()
        self.check_space()
        self.check_usage(tops)
        return self.report

    # -- 1. catalog ------------------------------------------------------------------------
    def _tops(self) -> list[tuple[str, int]]:
        tops = [(f"branch {b.name}", b.head) for b in self.cat.branches.values()]
        tops += [(f"snapshot {s.name}", s.layer) for s in self.cat.snapshots.values()]
        return [(n, t) for n, t in tops if t in self.cat.parents]

    def check_catalog(self) -> None:
        for b in self.cat.branches.values():
            if b.head not in self.cat.parents:
                self.report.problem(f"branch {b.name}: head layer {b.head} does not exist")
                self.report.unrepairable.append(f"branch {b.name} has no layer to read")
        for s in self.cat.snapshots.values():
            if s.layer not in self.cat.parents:
                self.report.problem(f"snapshot {s.name}: layer {s.layer} does not exist")
                self.report.unrepairable.append(f"snapshot {s.name} has no layer to read")
        for layer, cur in sorted(_broken_ancestries(self.cat.parents).items()):
            self.report.problem(f"layer {layer}: its ancestry is broken at layer {cur}")

    def check_homes(self) -> None:
        """Every home the catalog names (`home/<layer>`) exists and is a liveness member (else a
        pack gc would not mark its pointers), every branch's home is its head's; a home nothing
        names (a branch's publication cut short) is counted, and removed by --repair once older
        than homes.UNNAMED_GRACE."""
        store, cat = self.store, self.cat
        try:
            members = store.liveness.members()
        except codec.CorruptObject:
            members = {}  # reported by check_across_databases
        named = set(cat.homes.values())
        for home in sorted(named):
            if not homes.HOME_ID.match(home):
                self.report.problem(f"the catalog names a home {home!r}, which is no home id")
            elif not os.path.isdir(os.path.join(home_dir(store.path, home), DB_DIR)):
                self.report.problem(f"home {home}, which holds layers, does not exist")
                self.report.unrepairable.append(f"the layers of home {home} are lost")
            elif members.get(homes.member_name(home)) != home_db(home):
                self.report.problem(f"home {home} is not registered as a liveness member")
                if self.repair and homes.member_name(home) not in members:
                    store.liveness.add_member(homes.member_name(home), home_db(home))
                    self.report.repaired.append(f"registered home {home} as a liveness member")
        for b in cat.branches.values():
            if b.head in cat.parents and cat.member(b.head) != b.home:
                self.report.problem(f"branch {b.name}: its record's home is {b.home}, its head's {cat.member(b.head)}")
        for entry in homes.listed(store.path):
            if not homes.HOME_ID.match(entry):
                self.report.problem(f"{entry!r} in the homes directory is no home")
        old, young = homes.unnamed(store.path, named)
        self.report.counts["unnamed_homes"] = len(old) + len(young)
        if self.repair:
            for home in old:
                if homes.remove(store.path, store.liveness, home):
                    self.report.repaired.append(f"removed home {home}, which no branch names")

    def check_shared(self) -> None:
        """Every range of shared copies reads from an existing layer, and no copy inode is
        also an original (resolution must be one step)."""
        shared = self.store.meta.shared
        sources = shared.sources()
        for r in list(shared.ranges.values()):
            self.report.counts["shared_inodes"] += r.size
            if r.layer not in self.cat.parents:
                self.report.problem(f"shared range {r.key.hex()}: its layer {r.layer} does not exist")
                if self.repair:
                    shared.remove(r, self.batch)
                    shared.committed(removed=[r])
                    self.report.repaired.append(f"removed shared range {r.key.hex()} (its copies are lost)")
                continue
            for y, _x in r.pairs():
                if y in sources:
                    self.report.problem(f"shared range {r.key.hex()}: copy inode {y} is also an original")
                    break
        for c in list(shared.clones.values()):
            self.report.counts["clones"] += 1
            for what, layer in (("frozen layer", c.layer), ("layer", c.seen)):
                if layer not in self.cat.parents:
                    self.report.problem(f"clone of inode {c.top_x} at inode {c.top_y}: its {what} {layer} does not exist")
                    if self.repair:
                        shared.remove_clone(c, self.batch)
                        shared.clones_committed(removed=[c])
                        self.report.repaired.append(f"removed the clone at inode {c.top_y} (its copies are lost)")
                    break

    # -- 2. trees --------------------------------------------------------------------------
    def check_tree(self, name: str, top: int, visible: dict[bytes, int]) -> None:
        """visible: the inodes with a live version in the home database that top sees, by key,
        each with that version's layer (the orphan check's candidates, `_per_top`)."""
        lv = self._view(top)
        meta = self.store.meta
        records: dict[int, Attrs] = {}
        links: Counter[int] = Counter()
        subdirs: Counter[int] = Counter()
        where: dict[int, tuple[int, bytes]] = {}
        names: dict[int, list[tuple[int, bytes]]] = {}  # of files with more than one name
        found = meta.get(CF_INODES, ROOT_INO.to_bytes(8, "big"), lv)
        if not found or not found[1]:
            self.report.problem(f"{name}: the root directory is missing")
            return
        records[ROOT_INO] = Attrs.unpack(found[1])
        stack = [ROOT_INO]
        while stack:
            d = stack.pop()
            for entry, value in list(meta.scan_names(CF_DIRENTS, d, lv)):
                child = int.from_bytes(value[:8], "big")
                self.report.counts["entries"] += 1
                if child not in records:
                    rec = meta.get(CF_INODES, child.to_bytes(8, "big"), lv)
                    if not rec or not rec[1]:
                        self.report.problem(f"{name}: entry {self._path(where, d, entry)!r} points at "
                                            f"missing inode {child}")
                        if self.repair and self._writable(top):
                            meta.put(self.batch, CF_DIRENTS, name_key(d, entry), top, b"")  # tombstone
                            self.report.repaired.append(f"{name}: removed dangling entry {entry!r}")
                        continue
                    a = Attrs.unpack(rec[1])
                    records[child] = a
                    where[child] = (d, entry)
                    if stat.S_ISDIR(a.mode):
                        stack.append(child)
                        subdirs[d] += 1
                a = records[child]
                if stat.S_IFMT(a.mode) >> 12 != value[8]:
                    self.report.problem(f"{name}: entry {self._path(where, d, entry)!r} has file type "
                                        f"{value[8]} but inode {child} is {stat.S_IFMT(a.mode) >> 12}")
                links[child] += 1
                if stat.S_ISDIR(a.mode) and links[child] > 1:
                    self.report.problem(f"{name}: directory inode {child} has {links[child]} names")
                elif links[child] > 1:
                    names.setdefault(child, [where[child]]).append((d, entry))
            self.progress("trees", 1)
        self.report.counts["inodes"] += len(records)
        self._check_links(name, top, lv, records, links, subdirs)
        self._check_link_index(name, top, lv, names, where)
        self._check_orphans(name, top, lv, records, visible)

    def _view(self, top: int) -> LayerView:
        """top's view, kept until the next is made: the catalog keeps the blocks of an
        ancestry only while a view holds them, and the next top of the walk (`_per_top`)
        shares most of them, so each is made once, not once per view (quadratic)."""
        self._last_view = self.cat.layer_view(top)
        return self._last_view

    def _path(self, where: dict[int, tuple[int, bytes]], parent: int, name: bytes) -> str:
        parts = [name]
        cur = parent
        while cur != ROOT_INO and cur in where:
            cur, n = where[cur]
            parts.append(n)
        return "/" + b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def _writable(self, top: int) -> bool:
        return top in {b.head for b in self.cat.branches.values()}

    def _check_links(self, name: str, top: int, lv: LayerView, records: dict[int, Attrs],
                     links: Counter[int], subdirs: Counter[int]) -> None:
        for ino, a in records.items():
            want = 2 + subdirs[ino] if stat.S_ISDIR(a.mode) else links[ino]
            if a.nlink != want:
                self.report.problem(f"{name}: inode {ino} has link count {a.nlink}, expected {want}")
                if self.repair and self._writable(top):
                    a.nlink = want
                    self.store.meta.put(self.batch, CF_INODES, ino.to_bytes(8, "big"), top, a.pack())
                    self.report.repaired.append(f"{name}: link count of inode {ino} set to {want}")

    def _check_link_index(self, name: str, top: int, lv: LayerView, names: dict[int, list[tuple[int, bytes]]],
                          where: dict[int, tuple[int, bytes]]) -> None:
        """Every name of a file with more than one name is in the index of names (diff relies
        on it to report every path of a changed file)."""
        for ino, found in names.items():
            have = set(link_index.names(self.store.meta, ino, lv))
            for parent, entry in found:
                if (parent, entry) in have:
                    continue
                self.report.problem(f"{name}: {self._path(where, parent, entry)!r} (inode {ino}) is missing "
                                    f"from the index of hard-linked files' names")
                if self.repair and self._writable(top):
                    self.store.meta.put(self.batch, CF_LINKS, link_index.key(ino, parent, entry), top,
                                        link_index.PRESENT)
                    self.report.repaired.append(f"{name}: indexed a name of inode {ino}")

    def _check_orphans(self, name: str, top: int, lv: LayerView, records: dict[int, Attrs],
                       visible: dict[bytes, int]) -> None:
        listed = self._listed_orphans
        orphans = []
        for key, layer in sorted(visible.items()):
            ino = int.from_bytes(key, "big")
            if ino not in records and ino not in listed:
                value = self.store.objects.home.get(CF_INODES, key + layer_suffix(layer))
                orphans.append((ino, Attrs.unpack(value)))  # type: ignore[arg-type]
        for ino, a in orphans:
            self.report.problem(f"{name}: inode {ino} is not reachable from the root (orphan)")
            if self.repair and self._writable(top):
                self._link_lost(top, lv, ino, a)
                self.report.repaired.append(f"{name}: linked orphan inode {ino} into /lost+found")

    def _link_lost(self, top: int, lv: LayerView, ino: int, a: Attrs) -> None:
        meta = self.store.meta
        found = meta.get(CF_DIRENTS, name_key(ROOT_INO, LOST_FOUND), lv)
        if found and found[1]:
            lost = int.from_bytes(found[1][:8], "big")
        else:
            lost = self.store.alloc_ino()
            root = Attrs.unpack(meta.get(CF_INODES, ROOT_INO.to_bytes(8, "big"), lv)[1])  # type: ignore[index]
            now = root.mtime_ns
            d = Attrs(stat.S_IFDIR | 0o700, 0, 0, 2, 0, 0, now, now, now, parent=ROOT_INO, name=LOST_FOUND)
            meta.put(self.batch, CF_INODES, lost.to_bytes(8, "big"), top, d.pack())
            meta.put(self.batch, CF_DIRENTS, name_key(ROOT_INO, LOST_FOUND), top,
                     lost.to_bytes(8, "big") + bytes((stat.S_IFDIR >> 12,)))
            root.nlink += 1
            meta.put(self.batch, CF_INODES, ROOT_INO.to_bytes(8, "big"), top, root.pack())
        entry = f"#{ino}".encode()
        meta.put(self.batch, CF_DIRENTS, name_key(lost, entry), top,
                 ino.to_bytes(8, "big") + bytes((stat.S_IFMT(a.mode) >> 12,)))
        a.parent, a.name, a.nlink = lost, entry, (2 if stat.S_ISDIR(a.mode) else 1)
        meta.put(self.batch, CF_INODES, ino.to_bytes(8, "big"), top, a.pack())

    # -- 3 and 4. references and objects ---------------------------------------------------
    def check_counters(self) -> None:
        """Each counter of the catalog is past every number in use; unpublished layers counted."""
        cat = self.cat
        views = [b.view for b in cat.branches.values()] + [s.view for s in cat.snapshots.values()]
        for name, used in ((b"layer", max(cat.parents, default=0)), (b"view", max(views, default=0)),
                           (b"ino", self._max_ino)):
            key = b"counter/" + name
            raw = self.store.kv.get(CF_CATALOG, key)
            value = int.from_bytes(raw, "big") if raw else 0
            if value <= used:
                self.report.problem(f"counter/{name.decode()} is {value}, not past {used} in use")
                if self.repair:
                    self.batch.expects(CF_CATALOG, key, raw)
                    self.batch.put(CF_CATALOG, key, (used + 1).to_bytes(8, "big"))
                    self.report.repaired.append(f"counter/{name.decode()} raised to {used + 1}")
        self.report.counts["unpublished_layers"] = len(unpublished(self.store.objects.home, cat))

    def check_references(self) -> None:
        expected: Counter[bytes] = Counter()
        users: dict[bytes, list[str]] = defaultdict(list)
        for base, layer, value in _versions(self.store, CF_INODES):
            ino = int.from_bytes(base[:8], "big")
            if ino < COPY_INO_BASE:  # copies of clones are numbered by a counter of their own
                self._max_ino = max(self._max_ino, ino)
            if value:
                a = Attrs.unpack(value)
                if a.root is not None:
                    expected[a.root.hash] += 1
                    users[a.root.hash].append(f"inode {int.from_bytes(base, 'big')} (layer {layer})")
        meta = self.store.meta
        for r in meta.shared.ranges.values():
            if r.layer in self.cat.parents and self.cat.member(r.layer) == self.store.home:  # its own
                for h in meta.range_roots(r):
                    expected[h] += 1
                    users[h].append(f"shared copies of layer {r.layer}")
        # Walk nodes from the roots: each node object contributes its children once, each
        # delta object one pin on its base.  Counts are the home database's, of its own
        # layers' records (a fork's home: docs/design-many-processes.md, "Step 6"): an object
        # the home does not store is foreign, found through the lineage's lower members (the
        # view), counted at home and not walked (its own database counts what is below it).
        home, split = self.store.objects.home, self.store.objects.split
        foreign: set[bytes] = set()
        kinds: dict[bytes, int] = {}
        pins: Counter[bytes] = Counter()
        roots = Counter(expected)
        pending = list(expected)
        seen: set[bytes] = set()
        damaged: set[bytes] = set()
        while pending:
            h = pending.pop()
            if h in seen:
                continue
            seen.add(h)
            raw = home.get(CF_OBJECTS, h)
            if raw is None:
                if split and self.store.kv.get(CF_OBJECTS, h) is not None:
                    foreign.add(h)
                continue
            kinds[h] = raw[0]
            if raw[0] == codec.KIND_REMOTE:  # a lazy mount's chunk not fetched yet: not missing
                self.report.counts["remote_chunks"] += 1
            ext = codec.packed_extent(raw)
            if ext is not None and not self._in_pack(ext):
                damaged.add(h)
                self.report.problem(f"object {h.hex()} points past the end of pack {pack_name(ext[0])}")
                continue
            if ext is not None and not self._indexed(h, raw, ext[0]):
                self.report.problem(f"object {h.hex()} points into pack {pack_name(ext[0])}, whose index "
                                    "does not list it there")
            if raw[0] == codec.KIND_NODE:
                node = raw[1:]
                if codec.node_hash(node) != h:
                    damaged.add(h)
                    continue
                for c in codec.node_children(node):
                    expected[c] += 1
                    users[c].extend(users[h][:3])
                    pending.append(c)
            base = codec.delta_base(raw)
            if base is not None:
                expected[base] += 1
                pins[base] += 1
                users[base].extend(users[h][:3])
                pending.append(base)
            self.progress("objects", 1)
        stored: dict[bytes, Ref] = {}
        for h, v in home.scan(CF_REFS, b""):
            stored[h] = parse_ref(v)
        for base in pins:
            if kinds.get(base) not in (*codec.WHOLE, None):
                damaged.add(base)
                self.report.problem(f"object {base.hex()} is a delta base but not a whole chunk")
        if split:
            self.report.counts["foreign_objects"] = len(foreign)
        present = {h for h, _ in home.scan(CF_OBJECTS, b"")} if not self.verify_data else set()
        if self.verify_data:
            def load_base(b: bytes) -> bytes:
                raw = home.get(CF_OBJECTS, b)
                if raw is None or raw[0] == codec.KIND_DELTA:
                    raise codec.CorruptObject(f"delta base {b.hex()} is missing or not whole")
                return codec.decode_chunk(self.store.objects.resolve(raw), b)

            for h, raw in home.scan(CF_OBJECTS, b""):
                present.add(h)
                try:
                    if raw[0] == codec.KIND_NODE:
                        if codec.node_hash(raw[1:]) != h:
                            raise codec.CorruptObject("node does not match its hash")
                    elif raw[0] == codec.KIND_REMOTE:
                        codec.remote_loc(raw)  # still on the remote: its place must decode
                    else:
                        codec.decode_chunk(self.store.objects.resolve(raw), h, load_base)
                except (codec.CorruptObject, IndexError, OSError) as exc:
                    damaged.add(h)
                    self.report.counts["damaged_objects"] += 1
                    self.report.problem(f"object {h.hex()} is damaged ({exc})")
                self.report.counts["objects"] += 1
                self.progress("verify", 1)
        for h in damaged | {h for h in expected if h not in present and h not in foreign}:
            files = ", ".join(sorted(set(users.get(h, [])))[:10]) or "no file"
            if h not in present:
                self.report.problem(f"object {h.hex()} is referenced but missing; used by {files}")
            self.report.unrepairable.append(f"data of {files} is lost (object {h.hex()[:16]}…)")
        sizes = tree_sizes(self.store.kv, list(set(expected) | set(stored)))
        self.logical = sum(n * sizes[h] for h, n in roots.items())
        for h in set(expected) | set(stored):
            want, have = expected.get(h, 0), stored.get(h, Ref(0))
            right = Ref(want, pins[h], roots[h], sizes[h])
            if want and have != right:
                self.report.problem(f"object {h.hex()}: reference count {have.count}, expected {want} "
                                    f"(stored {have}, expected {right})")
                if self.repair:
                    self.batch.put(CF_REFS, h, right.pack())
                    self.report.repaired.append(f"reference count of {h.hex()[:16]}… set to {want}")
            elif have.count and not want:
                self.report.problem(f"object {h.hex()}: reference count {have.count}, expected 0")
                if self.repair:
                    self.batch.delete(CF_REFS, h)
                    self.report.repaired.append(f"reference count of {h.hex()[:16]}… set to 0")
        for h in present - set(expected):
            self.report.problem(f"object {h.hex()} is stored but nothing references it")
            if self.repair:
                self.batch.delete(CF_OBJECTS, h)
                self.batch.delete(CF_REFS, h)
                self.report.repaired.append(f"deleted unreferenced object {h.hex()[:16]}…")

    def _indexed(self, h: bytes, raw: bytes, pack: int) -> bool:
        """Whether the pack's index lists the pointer's encoding where it points (a pack
        without an index, written before indexes existed, lists nothing and is not checked;
        one whose index is damaged is reported once)."""
        if pack not in self._pack_index:
            try:
                entries = self.store.packs.index(pack, self._pack_sizes.get(pack))
            except codec.CorruptObject as exc:
                self.report.problem(str(exc))
                self.report.unrepairable.append(f"pack {pack_name(pack)}: its index is damaged")
                entries = None
            if entries is None:
                self.report.counts["packs_without_index"] += 1
            self._pack_index[pack] = None if entries is None else {e.hash: e for e in entries}
        index = self._pack_index[pack]
        if index is None:
            return True
        _p, off, length = codec.packed_extent(raw)  # type: ignore[misc]
        e = index.get(h)
        return e is not None and (e.kind, e.offset, e.length, e.raw_size) == (
            codec.packed_kind(raw), off, length, codec.chunk_sizes(raw)[0])

    def _in_pack(self, ext: tuple[int, int, int]) -> bool:
        pack, off, length = ext
        size = self._pack_sizes.get(pack)
        if size is None:
            found = self.store.packs.size(pack)
            size = self._pack_sizes[pack] = -1 if found is None else found
        return off + length <= size

    # -- 9. across databases ------------------------------------------------------------
    def check_across_databases(self) -> None:
        liveness = self.store.liveness
        try:
            condemned = liveness.condemned()
        except codec.CorruptObject as exc:
            self.report.problem(str(exc))
            if not self.repair:
                return
            liveness.reset_condemned()
            self.report.repaired.append("dropped the damaged condemned list (the next gc condemns again)")
            condemned = liveness.condemned()
        try:
            members = self.store.members()
        except (codec.CorruptObject, StoreError) as exc:
            self.report.problem(str(exc))
            self.report.unrepairable.append(str(exc))
            return
        try:
            live = mark([self.store.objects.home])
            for name, kv in members:
                for h, raw in kv.scan(CF_OBJECTS, b""):
                    ext = codec.packed_extent(raw)
                    if ext is not None and not self._in_pack(ext):
                        self.report.problem(f"member {name}: object {h.hex()} points past the end of "
                                            f"pack {pack_name(ext[0])} or into a missing pack")
                mark([kv], live)
        finally:
            for _name, kv in members:
                kv.close()
        due = liveness.due(condemned)
        self.report.counts["condemned_packs"] = len(condemned.packs)
        bad = sorted(p for p in due if live.get(p))
        for p in bad:
            self.report.problem(f"pack {pack_name(p)} is condemned (round {condemned.packs[p]}, acknowledged "
                                "by every writer) but a pointer names it")
        self.report.counts["condemned_marked_waiting"] = sum(1 for p in condemned.packs if live.get(p) and p not in due)
        if bad and self.repair:
            liveness.forget(bad)
            self.report.repaired.append(f"pardoned {len(bad)} condemned packs a pointer names")
        self.check_dups()

    def check_dups(self) -> None:
        """The store keeper's records (chunks.dups): its scan state and generation parse, every
        dup record is a whole P record whose pack's index lists the chunk there (and, with
        verify_data, whose bytes there match its hash).  One naming a pack that is gone (every
        copy there dropped and swept; the keeper's next pass drops the record, and no rewrite
        follows it) is counted, not a problem."""
        refs, drop = self.store.refs, Batch()
        try:
            dups.ScanState.unpack(refs.get(CF_GC, dups.SCAN_STATE))
            dups.generation(refs)
        except (codec.CorruptObject, ValueError) as exc:
            self.report.problem(f"the store keeper's state is damaged: {exc}")
            drop.delete(CF_GC, dups.SCAN_STATE)  # the next pass reads every pack index again
            drop.delete(CF_GC, dups.GEN)
        for h, raw in dups.records(refs):
            self.report.counts["dup_records"] += 1
            if len(h) != codec.HASH_LEN or not dups.valid_record(raw):
                self.report.problem(f"dup record {h.hex()} is damaged")
                drop.delete(dups.CF_DUP, h)
                continue
            ext = codec.packed_extent(raw)
            assert ext is not None
            in_pack = self._in_pack(ext)
            if self._pack_sizes[ext[0]] < 0:
                self.report.counts["dup_records_stale"] += 1
                continue
            if not in_pack or not self._indexed(h, raw, ext[0]):
                self.report.problem(f"dup record {h.hex()} names a place in pack {pack_name(ext[0])} that does "
                                    "not hold that chunk")
                drop.delete(dups.CF_DUP, h)
                continue
            if self.verify_data:
                try:
                    codec.decode_payload(codec.packed_kind(raw), self.store.packs.read(*ext), h)
                except (codec.CorruptObject, OSError) as exc:
                    self.report.problem(f"dup record {h.hex()}: the chunk at its place is damaged ({exc})")
                    drop.delete(dups.CF_DUP, h)
        if self.repair and len(drop):
            refs.write(drop)
            self.report.repaired.append(f"removed {len(drop)} damaged store keeper records")

    def check_serve_records(self) -> None:
        """Who serves which branch (cowfs.meta.serving): a damaged record, or a live one
        naming no branch, is a problem; a stale one (its process gone) is only counted, the
        next mount of its branch takes it over.  --repair removes all three."""
        serving = self.store.serving
        known = set(self.cat.branches)
        stale = 0
        for branch, rec in serving.all().items():
            if isinstance(rec, codec.CorruptObject):
                self.report.problem(str(rec))
            elif not rec.alive(serving.boot):
                stale += 1
            elif branch not in known:
                self.report.problem(f"serve/{branch} names a branch that does not exist (served by "
                                    f"{rec.describe()})")
        self.report.counts["stale_serve_records"] = stale
        if self.repair:
            gone = serving.prune(known)
            if gone:
                self.report.repaired.append(f"removed the serve records of {', '.join(sorted(gone))} (damaged, "
                                            "stale, or naming no branch)")

    # -- 5. changelog ----------------------------------------------------------------------
    def check_changelog(self) -> None:
        logged = {k for k, _ in self.store.objects.home.scan(CF_CHANGES, b"")}
        for cf in (CF_INODES, CF_DIRENTS, CF_XATTRS, CF_LINKS):
            for base, layer, _value in _versions(self.store, cf):
                key = layer.to_bytes(8, "big") + TAGS[cf] + base
                if key not in logged:
                    self.report.problem(f"{cf} key {base.hex()} in layer {layer} is missing from the changelog")
                    if self.repair:
                        self.batch.put(CF_CHANGES, key, b"")
                        self.report.repaired.append(f"changelog entry added for layer {layer}")
                else:
                    logged.discard(key)
        for key in logged:
            self.report.problem(f"changelog entry {key.hex()} names a key that does not exist")
            if self.repair:
                self.batch.delete(CF_CHANGES, key)
                self.report.repaired.append("removed a stale changelog entry")

    # -- 6. queue and accounting -----------------------------------------------------------
    def check_queue(self) -> None:
        for h, _ in self.store.kv.scan(CF_PENDING, b""):
            if self.store.kv.get(CF_OBJECTS, h) is None:
                self.report.problem(f"background queue names missing object {h.hex()}")
                if self.repair:
                    self.batch.delete(CF_PENDING, h)
                    self.report.repaired.append(f"removed {h.hex()[:16]}… from the background queue")

    def check_small_write_log(self) -> None:
        """Pending records are no problem (the next daemon replays them); one that does not
        parse stops that replay, so no daemon could serve the store."""
        for seq, value in writelog.every(self.store.kv):
            try:
                writelog.Record.unpack(value)
            except writelog.DamagedRecord as exc:
                self.report.problem(f"small-write log record {seq} is damaged: {exc}")
                if self.repair:
                    writelog.delete(self.batch, seq)
                    self.report.repaired.append(f"deleted damaged small-write log record {seq} "
                                                "(the fsync'd writes it held are lost)")

    def check_usage(self, tops: list[tuple[str, int]]) -> None:
        """Recorded usage against a recount (after repairs, which may change what is seen), of
        the tops in this database: a top in another home is that home's fsck's to count (its
        directory clones are measured there, with what only its own view holds)."""
        batch = Batch()
        unmeasured = {c.top_y: self.store.measure_clone(c) for c in self.store.meta.shared.clones.values()
                      if not c.measured and c.layer in self.cat.parents}
        seen = _inode_versions(self.store.kv, lambda _layer, value: value)
        for name, top, visible in _per_top(self.cat.parents, tops, seen):
            if self.cat.member(top) != self.store.home:
                continue
            lv = self._view(top)
            counted = self.store.count_usage(lv, visible)
            stored = self.cat.usage(top)
            # What the clone measurer will add to the record (cowfs.background.cloning).
            pending = [unmeasured[c.top_y] for c in self.store.meta.shared.visible_clones(lv.ancestors)
                       if c.top_y in unmeasured]
            expected = Usage(*(n - sum(u[i] for u in pending) for i, n in enumerate(counted)))
            if stored is not None and stored != expected:
                self.report.problem(f"{name}: recorded usage {tuple(stored)} (logical bytes, inodes, allocated "
                                    f"bytes) differs from a recount {tuple(expected)}")
                if self.repair:
                    self.cat.save_usage(top, expected, batch)
                    self.report.repaired.append(f"{name}: usage recounted")
        if len(batch):
            self.store.kv.write(batch)
            self.store.kv.sync()

    def check_space(self) -> None:
        """Stored figures against a recount (after repairs, which change them)."""
        counted = scan_space(self.store.objects.home)
        raw = self.store.objects.home.get(CF_SPACE, SPACE_KEY)
        stored = Space.unpack(raw) if raw is not None else None
        if counted.logical_bytes != self.logical and not self.repair:
            self.report.problem(f"logical bytes by reference records {counted.logical_bytes} differ from "
                                f"the file walk's {self.logical}")
        if stored != counted:
            self.report.problem(f"space accounting {stored} differs from a recount {counted}")
            if self.repair:
                b = Batch()
                b.put(CF_SPACE, SPACE_KEY, counted.pack())
                self.store.kv.write(b)
                self.store.kv.sync()
                self.store.objects.space = counted
                self.report.repaired.append("space accounting recounted")
        self.report.counts["logical_bytes"] = self.logical
