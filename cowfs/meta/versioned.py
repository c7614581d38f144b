"""Reads and writes of layer-versioned keys (see cowfs.meta.layers for the model).

A stored key is `base + layer_suffix(layer)`; `base` is ino8 for inodes and
`ino8 + name + b"\\0"` for directory entries and xattrs (names never contain NUL, so all
versions of one name are adjacent and no other name shares the prefix).
"""
from __future__ import annotations

import heapq
import stat
from typing import Callable, Iterator

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import LayerView, layer_suffix, suffix_layer
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Clone, Range, SharedTrees

CF_INODES = "inodes"
CF_DIRENTS = "dirents"
CF_XATTRS = "xattrs"
# ino(8) + parent(8) + name + b"\0" + layer suffix -> b"l": the names of hard-linked files
# (cowfs.meta.links).
CF_LINKS = "links"
# layer(8) + family tag(1) + base key -> b"": every key written in a layer, so that diff and
# garbage collection cost time proportional to what changed, not to the whole store.
CF_CHANGES = "changes"
TAGS = {CF_INODES: b"i", CF_DIRENTS: b"d", CF_XATTRS: b"x", CF_LINKS: b"l"}
FAMILY = {v: k for k, v in TAGS.items()}
RANGED = (CF_INODES, CF_DIRENTS)  # the families a range of the sharer stands for
CLONED = (CF_INODES, CF_DIRENTS, CF_XATTRS, CF_LINKS)  # ... and a clone
LINKED = b"l"  # a names-index key's value (cowfs.meta.links.PRESENT)
TRANSLATE = 256  # entries of a cloned directory given copy numbers at a time


def ino_key(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def name_key(ino: int, name: bytes) -> bytes:
    return ino.to_bytes(8, "big") + name + b"\x00"


def key_ino(base: bytes) -> int:
    """The inode of an ino_key or a name_key."""
    return int.from_bytes(base[:8], "big")


def key_name(base: bytes) -> bytes:
    """The name of a name_key."""
    return base[8:-1]


def _tagged(items: Iterator[tuple[bytes, bytes]], level: int) -> Iterator[tuple[bytes, int, bytes]]:
    for name, value in items:
        yield name, level, value


class Versioned:
    """Layer-versioned keys; inode records and entries of shared copies (cowfs.meta.shared)
    resolve through their range when no real layer of the view has a version."""

    def __init__(self, kv: KV, shared: SharedTrees | None = None,
                 layer_view: Callable[[int], LayerView] | None = None) -> None:
        """layer_view: the catalog's, for the views ranges read their sources from."""
        self.kv = kv
        self.shared = shared if shared is not None else SharedTrees()
        self._layer_view = layer_view
        self._views: dict[int, LayerView] = {}  # a range's layer -> its view (layers are frozen)

    def range_view(self, r: Range) -> LayerView:
        """The view range r reads its sources from: its frozen layer's."""
        lv = self._views.get(r.layer)
        if lv is None:
            assert self._layer_view is not None, "ranges need the catalog's ancestry"
            lv = self._views[r.layer] = self._layer_view(r.layer)
        return lv

    def forget_views(self) -> None:
        """The layer tree changed (garbage collection merged layers): ranges' views are made again."""
        self._views = {}

    def _real(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        if len(lv.ancestors) == 1:
            # A view with one layer (no snapshot yet): a point read is exact, and much
            # cheaper than an iterator seek.
            value = self.kv.get(cf, base + layer_suffix(lv.top))
            return None if value is None else (lv.top, value)
        for key, value in self.kv.scan(cf, base + layer_suffix(lv.top), base):
            layer = suffix_layer(key[-8:])
            if layer in lv.ancestors:
                return layer, value
        return None

    def _aliased(self, cf: str) -> bool:
        return bool(self.shared) and (cf in RANGED or (cf in CLONED and bool(self.shared.clones)))

    def get(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        """(layer, value) of the version lv sees (value may be a tombstone b""), or None."""
        found = self._real(cf, base, lv)
        if found is None and self._aliased(cf):
            return self._shared_get(cf, base, lv)
        return found

    def _alias(self, ino: int, lv: LayerView) -> tuple[Range | Clone, int] | None:
        hit = self.shared.find(ino)
        if hit is None or hit[0].seen not in lv.ancestors:
            return None
        return hit

    def _shared_get(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        """The version of a copy's key, read through its range or clone (through each clone
        of a clone in turn: a loop, not a recursion), then made the copy's."""
        chain: list[tuple[Range | Clone, int, int]] = []
        ino, rest = int.from_bytes(base[:8], "big"), base[8:]
        while True:
            hit = self._alias(ino, lv)
            if hit is None or any(r is hit[0] for r, _y, _x in chain):
                return None
            r, x = hit
            if isinstance(r, Range) and cf not in RANGED:
                return None
            if isinstance(r, Clone) and ino == r.top_y and cf in (CF_INODES, CF_XATTRS):
                return None  # a clone's top has a record and xattrs of its own, never the original's
            chain.append((r, ino, x))
            lv = self.range_view(r)
            if cf == CF_LINKS:  # a clone's names of a hard-linked copy: computed, never stored
                names = self.clone_names(r, ino, x)  # type: ignore[arg-type]
                return (r.layer, LINKED) if (int.from_bytes(rest[:8], "big"), rest[8:-1]) in names else None
            found = self._real(cf, x.to_bytes(8, "big") + rest, lv)
            if found is not None:
                break
            if isinstance(r, Range):
                return None  # a range's sources are never copies: one step
            ino = x
        if not found[1]:
            return None
        value = found[1]
        for r, y, x in reversed(chain):
            value = self._as_copy(cf, r, y, x, value)
        return chain[0][0].layer, value

    def _as_copy(self, cf: str, r: Range | Clone, y: int, x: int, value: bytes) -> bytes:
        """An original's version of a key made copy y's."""
        if cf == CF_XATTRS:
            return value
        if cf == CF_DIRENTS:
            if isinstance(r, Range):
                return self._entry(r, value)
            return self.copy_numbers(r, [int.from_bytes(value[:8], "big")])[0].to_bytes(8, "big") + value[8:]
        a = Attrs.unpack(value)
        if isinstance(r, Range):
            atime, a.ctime_ns = r.times(y)
            if atime is not None:
                a.atime_ns = atime
            if a.parent:
                a.parent = r.y_of(a.parent) or a.parent
            return a.pack()
        a.ctime_ns = r.ctime
        if r.uid >= 0:
            a.uid, a.gid = r.uid, r.gid
            if not a.is_dir:
                a.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        if not a.is_dir and a.nlink > 1:
            names = self.clone_names(r, y, x)
            a.nlink = max(len(names), 1)
            if names:
                a.parent, a.name = names[0]
        elif a.parent:
            a.parent = self.copy_numbers(r, [a.parent])[0]
        return a.pack()

    def copy_numbers(self, c: Clone, xs: list[int]) -> list[int]:
        assert self.shared.map is not None, "clones need a store's copy numbers"
        return self.shared.map.copies(c, xs)

    def inside(self, c: Clone, ino: int, lv: LayerView, limit: int = 1 << 20) -> bool:
        """Whether directory ino of lv (a clone's source view) is in the clone's original
        tree: a walk up its parents (no recursion), at most `limit` steps."""
        for _ in range(limit):
            if ino == c.top_x:
                return True
            found = self.get(CF_INODES, ino_key(ino), lv)
            if not found or not found[1]:
                return False
            parent = Attrs.unpack(found[1]).parent
            if not parent or parent == ino:
                return False
            ino = parent
        return False

    def clone_names(self, c: Clone, y: int, x: int) -> list[tuple[int, bytes]]:
        """(parent, name) of the copy y of a hard-linked file x: x's names inside the clone's
        original tree, as copies, sorted as the names index sorts them."""
        lv = self.range_view(c)
        inner = []
        for rest, _ in self.scan_names(CF_LINKS, x, lv):
            parent, name = int.from_bytes(rest[:8], "big"), rest[8:]
            found = self.get(CF_DIRENTS, name_key(parent, name), lv)
            if found and found[1] and int.from_bytes(found[1][:8], "big") == x and self.inside(c, parent, lv):
                inner.append((parent, name))
        ys = self.copy_numbers(c, [p for p, _n in inner])
        return sorted(zip(ys, (n for _p, n in inner)))

    def range_roots(self, r: Range) -> list[bytes]:
        """Tree roots of r's originals as its layer sees them: a range holds one reference to
        each for its copies (taken over from their records), as an inode-record version does."""
        lv = self.range_view(r)
        out = []
        for _y, x in r.pairs():
            found = self._real(CF_INODES, ino_key(x), lv)
            if found is not None and found[1]:
                root = Attrs.unpack(found[1]).root
                if root is not None:
                    out.append(root.hash)
        return out

    @staticmethod
    def _entry(r: Range, value: bytes) -> bytes:
        y = r.y_of(int.from_bytes(value[:8], "big"))
        return value if y is None else y.to_bytes(8, "big") + value[8:]

    def has_older(self, cf: str, base: bytes, lv: LayerView) -> bool:
        """Whether an ancestor below the top layer holds a version (then deletes need a tombstone)."""
        if self._aliased(cf):
            found = self._shared_get(cf, base, lv)
            if found is not None:
                return True
        if len(lv.ancestors) == 1:
            return False
        for key, value in self.kv.scan(cf, base + layer_suffix(lv.top - 1), base):
            if suffix_layer(key[-8:]) in lv.ancestors:
                return True
        return False

    @staticmethod
    def put(batch: Batch, cf: str, base: bytes, layer: int, value: bytes) -> None:
        batch.put(cf, base + layer_suffix(layer), value)
        batch.put(CF_CHANGES, layer.to_bytes(8, "big") + TAGS[cf] + base, b"")

    def delete(self, batch: Batch, cf: str, base: bytes, lv: LayerView) -> None:
        """Hide base from lv's top layer onwards."""
        if self.has_older(cf, base, lv):
            self.put(batch, cf, base, lv.top, b"")
        else:
            self.remove(batch, cf, base, lv.top)

    @staticmethod
    def remove(batch: Batch, cf: str, base: bytes, layer: int) -> None:
        """Remove base's version in layer and its changelog entry (no tombstone)."""
        batch.delete(cf, base + layer_suffix(layer))
        batch.delete(CF_CHANGES, layer.to_bytes(8, "big") + TAGS[cf] + base)

    def changed(self, layer: int, shared: bool = True) -> Iterator[tuple[str, bytes]]:
        """(family, base key) of every key that has a version in layer; shared: also the
        keys of the copies shared in that layer (their records left it for a range)."""
        prefix = layer.to_bytes(8, "big")
        for key, _ in self.kv.scan(CF_CHANGES, prefix, prefix):
            yield FAMILY[key[8:9]], key[9:]
        if not shared:
            return
        for r in [r for r in self.shared.ranges.values() if r.layer == layer]:
            lv = self.range_view(r)
            for y, x in r.pairs():
                yield CF_INODES, ino_key(y)
                for name, _ in self.scan_names(CF_DIRENTS, x, lv):
                    yield CF_DIRENTS, name_key(y, name)
        for c in [c for c in self.shared.clones.values() if c.seen == layer]:
            yield from self.clone_keys(c)

    def clone_keys(self, c: Clone) -> Iterator[tuple[str, bytes]]:
        """(family, base key) of every key of c's copies, as the clone made them: a walk of
        the original tree with an explicit stack (any depth); copies get their numbers."""
        lv = self.range_view(c)
        pending, done = [(c.top_x, c.top_y)], {c.top_x}
        while pending:
            x, y = pending.pop()
            if y != c.top_y:
                yield CF_INODES, ino_key(y)
            for name, _ in self.scan_names(CF_XATTRS, x, lv):
                if y != c.top_y:
                    yield CF_XATTRS, name_key(y, name)
            entries = [(name, int.from_bytes(v[:8], "big"), v[8:9]) for name, v in self.scan_names(CF_DIRENTS, x, lv)]
            ys = self.copy_numbers(c, [e[1] for e in entries])
            for (name, cx, kind), cy in zip(entries, ys):
                yield CF_DIRENTS, name_key(y, name)
                if cx in done:
                    continue
                done.add(cx)
                if kind == bytes((stat.S_IFDIR >> 12,)):
                    pending.append((cx, cy))
                else:
                    yield CF_INODES, ino_key(cy)
                    for xname, _ in self.scan_names(CF_XATTRS, cx, lv):
                        yield CF_XATTRS, name_key(cy, xname)

    def name_versions(self, cf: str, ino: int) -> Iterator[tuple[bytes, int, bytes]]:
        """(name, layer, value) of every stored version of every name under ino, in key order
        (by name, newest layer first), tombstones included: what one layer holds, unmerged."""
        prefix = ino_key(ino)
        for key, value in self.kv.scan(cf, prefix, prefix):
            yield key[8:-9], suffix_layer(key[-8:]), value

    def only_version(self, cf: str, base: bytes) -> tuple[int, bytes] | None:
        """(layer, value) of base's single live version; None if it has none, or several."""
        found = None
        for key, value in self.kv.scan(cf, base, base):
            if found is not None or not value or len(key) != len(base) + 8:
                return None
            found = (suffix_layer(key[-8:]), value)
        return found

    def versions(self, cf: str, base: bytes) -> list[tuple[int, bytes]]:
        """Every (layer, value) of base, newest layer first."""
        return [(suffix_layer(k[-8:]), v) for k, v in self.kv.scan(cf, base, base)]

    def scan_names(self, cf: str, ino: int, lv: LayerView, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(name, value) of every live name under ino visible in lv, in name order.

        A copy directory's listing is its own versions over its original's, and the
        original's over its own original's for a clone of a clone: one merge of every level's
        versions (the nearest level's version of a name wins; a tombstone hides it), built in
        a loop, so nesting costs no recursion."""
        levels: list[tuple[Range | Clone | None, int, LayerView]] = [(None, ino, lv)]
        computed: Iterator[tuple[bytes, bytes]] | None = None  # a clone's names of a hard-linked copy
        if self._aliased(cf) and cf != CF_INODES:
            while True:
                hit = self._alias(levels[-1][1], levels[-1][2])
                if hit is None or (isinstance(hit[0], Range) and cf != CF_DIRENTS) \
                        or any(r is hit[0] for r, _i, _lv in levels):
                    break
                r, x = hit
                if isinstance(r, Clone) and cf == CF_LINKS:
                    computed = iter([(k, LINKED) for k in (p.to_bytes(8, "big") + n
                                                           for p, n in self.clone_names(r, levels[-1][1], x))
                                     if k >= start])
                    break
                levels.append((r, x, self.range_view(r)))
                if isinstance(r, Range):
                    break  # a range's sources are never copies: one step
        if len(levels) == 1 and computed is None:
            for name, value in self._scan_real(cf, ino, lv, start):
                if value:
                    yield name, value
            return
        # computed names are the last level's own original's, already as that level's copies.
        sources = [_tagged(self._scan_real(cf, i, v, start), k) for k, (_r, i, v) in enumerate(levels)]
        if computed is not None:
            sources.append(_tagged(computed, len(levels)))
        merged = heapq.merge(*sources, key=lambda item: (item[0], item[1]))
        part: list[tuple[bytes, int, bytes]] = []
        last = None
        for name, k, value in merged:
            if name == last:
                continue  # a deeper level's version of a name a nearer level decided
            last = name
            if value:
                part.append((name, k, value))
                if len(part) == TRANSLATE:
                    yield from self._lifted(cf, levels, part, computed is not None)
                    part = []
        if part:
            yield from self._lifted(cf, levels, part, computed is not None)

    def _lifted(self, cf: str, levels: list[tuple[Range | Clone | None, int, LayerView]],
                part: list[tuple[bytes, int, bytes]], computed: bool) -> Iterator[tuple[bytes, bytes]]:
        """Values found at deeper levels made the top level's: each level's translation in
        turn, a batch at a time (copy numbers are given TRANSLATE at a time)."""
        values = [value for _n, _k, value in part]
        if cf == CF_DIRENTS:
            for lvl in range(len(levels) - 1, 0, -1):
                r = levels[lvl][0]
                idx = [j for j, (_n, k, _v) in enumerate(part) if k >= lvl]
                if not idx:
                    continue
                if isinstance(r, Range):
                    for j in idx:
                        values[j] = self._entry(r, values[j])
                else:
                    assert isinstance(r, Clone)
                    ys = self.copy_numbers(r, [int.from_bytes(values[j][:8], "big") for j in idx])
                    for j, y in zip(idx, ys):
                        values[j] = y.to_bytes(8, "big") + values[j][8:]
        for (name, _k, _v), value in zip(part, values):
            yield name, value

    def _scan_real(self, cf: str, ino: int, lv: LayerView, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(name, value) of the version lv sees of every name under ino, tombstones included."""
        prefix = ino.to_bytes(8, "big")
        last = None
        for key, value in self.kv.scan(cf, prefix + start, prefix):
            name = key[8:-9]
            if name == last:
                continue
            if suffix_layer(key[-8:]) in lv.ancestors:
                last = name
                yield name, value
