"""Reads and writes of layer-versioned keys (see cowfs.meta.layers for the model).

A stored key is `base + layer_suffix(layer)`; `base` is ino8 for inodes and
`ino8 + name + b"\\0"` for directory entries and xattrs (names never contain NUL, so all
versions of one name are adjacent and no other name shares the prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import layer_suffix, suffix_layer
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Range, SharedTrees

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


@dataclass(frozen=True, slots=True)
class LayerView:
    """What one branch or snapshot sees: its top layer and that layer's ancestry."""

    top: int
    ancestors: frozenset[int]


def ino_key(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def name_key(ino: int, name: bytes) -> bytes:
    return ino.to_bytes(8, "big") + name + b"\x00"


class Versioned:
    """Layer-versioned keys; inode records and entries of shared copies (cowfs.meta.shared)
    resolve through their range when no real layer of the view has a version."""

    def __init__(self, kv: KV, shared: SharedTrees | None = None,
                 ancestry: Callable[[int], list[int]] | None = None) -> None:
        """ancestry: the catalog's, for the views ranges read their sources from."""
        self.kv = kv
        self.shared = shared if shared is not None else SharedTrees()
        self._ancestry = ancestry
        self._views: dict[int, LayerView] = {}  # a range's layer -> its view (layers are frozen)

    def range_view(self, r: Range) -> LayerView:
        """The view range r reads its sources from: its frozen layer's."""
        lv = self._views.get(r.layer)
        if lv is None:
            assert self._ancestry is not None, "ranges need the catalog's ancestry"
            lv = self._views[r.layer] = LayerView(r.layer, frozenset(self._ancestry(r.layer)))
        return lv

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

    def get(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        """(layer, value) of the version lv sees (value may be a tombstone b""), or None."""
        found = self._real(cf, base, lv)
        if found is None and self.shared and (cf == CF_INODES or cf == CF_DIRENTS):
            return self._shared_get(cf, base, lv)
        return found

    def _alias(self, ino: int, lv: LayerView) -> tuple[Range, int] | None:
        hit = self.shared.find(ino)
        if hit is None or hit[0].layer not in lv.ancestors:
            return None
        return hit

    def _shared_get(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        hit = self._alias(int.from_bytes(base[:8], "big"), lv)
        if hit is None:
            return None
        r, x = hit
        found = self._real(cf, x.to_bytes(8, "big") + base[8:], self.range_view(r))
        if found is None or not found[1]:
            return None
        if cf == CF_DIRENTS:
            return r.layer, self._entry(r, found[1])
        a = Attrs.unpack(found[1])
        y = int.from_bytes(base[:8], "big")
        atime, a.ctime_ns = r.times(y)
        if atime is not None:
            a.atime_ns = atime
        if a.parent:
            a.parent = r.y_of(a.parent) or a.parent
        return r.layer, a.pack()

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
        if self.shared and (cf == CF_INODES or cf == CF_DIRENTS):
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

    def versions(self, cf: str, base: bytes) -> list[tuple[int, bytes]]:
        """Every (layer, value) of base, newest layer first."""
        return [(suffix_layer(k[-8:]), v) for k, v in self.kv.scan(cf, base, base)]

    def scan_names(self, cf: str, ino: int, lv: LayerView, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(name, value) of every live name under ino visible in lv, in name order."""
        hit = self._alias(ino, lv) if self.shared and cf == CF_DIRENTS else None
        if hit is None:
            for name, value in self._scan_real(cf, ino, lv, start):
                if value:
                    yield name, value
            return
        r, x = hit
        # Merge the real versions (tombstones included: they hide names) over the range's.
        own = self._scan_real(cf, ino, lv, start)
        shared = self.scan_names(cf, x, self.range_view(r), start)
        a, b = next(own, None), next(shared, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a[0] <= b[0]):
                if a[1]:  # type: ignore[index]
                    yield a  # type: ignore[misc]
                if b is not None and a[0] == b[0]:  # type: ignore[index]
                    b = next(shared, None)
                a = next(own, None)
            else:
                yield b[0], self._entry(r, b[1])
                b = next(shared, None)

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
