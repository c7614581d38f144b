"""Garbage collection of metadata versions no live view can see.

A version (key, layer l) is garbage when every live top that has l in its ancestry has a
newer version of the key on its path, or when no live top has l in its ancestry at all
(a dead layer: the old head after a rollback, a deleted snapshot or branch).  Only layers
that are not themselves live tops can hold garbage, and the per-layer changelog lists
their keys, so a pass costs time proportional to the keys in those layers.

Shared copies (cowfs.meta.shared): a range's layer acts as one more top for the keys of
its originals, which stay as that layer sees them while the range lives.  A range dies
when no live top sees it or every copy inode is deleted in every top that does; then it
goes, with the tombstones that only hid it.  A clone (cowfs.meta.shared.Clone) keeps its
whole frozen layer as one more live top while it lives; it dies the same way (its top and
every copy given a number deleted in every live top that sees it, or no live top seeing it),
and goes with its copy numbers and the tombstones that only hid its copies.
"""
from __future__ import annotations

from typing import Iterator

from cowfs.chunks.refs import RefTxn
from cowfs.kv.base import Batch
from cowfs.meta.layers import Catalog
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Clone, Range
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, Versioned, ino_key


def plan(catalog: Catalog, live_tops: set[int]) -> tuple[list[int], dict[int, set[int]]]:
    """(dead layers, {interior live layer: live tops below it})."""
    below: dict[int, set[int]] = {}
    for top in live_tops:
        for layer in catalog.ancestry(top):
            below.setdefault(layer, set()).add(top)
    # Children before parents (a child's id is larger): a crash between batches never leaves
    # a remaining layer whose parent record is already gone.
    dead = sorted((l for l in catalog.parents if l not in below), reverse=True)
    interior = {l: tops for l, tops in below.items() if l not in live_tops}
    return dead, interior


def dead_clones(meta: Versioned, catalog: Catalog, live_tops: set[int]) -> tuple[list[Clone], Batch]:
    """Clones no live view needs, and a batch removing them, their copy numbers and the
    tombstones that only hid their copies (the caller commits it, then tells meta.shared)."""
    views = [LayerView(t, frozenset(catalog.ancestry(t))) for t in live_tops if t in catalog.parents]
    batch = Batch()
    dead = []
    for c in list(meta.shared.clones.values()):
        given = [y for _x, y in meta.shared.map.given(c)] if meta.shared.map is not None else []
        if c.layer in catalog.parents and any(_alive(meta, lv, [c.top_y] + given)
                                              for lv in views if c.seen in lv.ancestors):
            continue
        dead.append(c)
        for y in given:
            _drop_tombstones(meta, batch, CF_INODES, ino_key(y))
            for cf in (CF_DIRENTS, CF_XATTRS, CF_LINKS):
                for key, _ in meta.kv.scan(cf, ino_key(y), ino_key(y)):
                    _drop_tombstones(meta, batch, cf, key[:-8])
        meta.shared.remove_clone(c, batch)
    return dead, batch


def _alive(meta: Versioned, lv: LayerView, inos: list[int]) -> bool:
    for ino in inos:
        found = meta.get(CF_INODES, ino_key(ino), lv)
        if found is not None and found[1]:
            return True
    return False


def dead_ranges(meta: Versioned, catalog: Catalog, live_tops: set[int]) -> tuple[list[Range], Batch, RefTxn]:
    """Ranges no live view needs, and a batch removing them, their references and the
    tombstones that only hid them (the caller commits it, then tells meta.shared, before
    `collect`)."""
    views = [LayerView(t, frozenset(catalog.ancestry(t))) for t in live_tops if t in catalog.parents]
    batch, txn = Batch(), RefTxn()
    dead = []
    for r in list(meta.shared.ranges.values()):
        seeing = [lv for lv in views if r.layer in lv.ancestors]
        if any(_needs(meta, lv, r) for lv in seeing):
            continue
        dead.append(r)
        meta.shared.remove(r, batch)
        if r.layer in catalog.parents:  # else its originals' versions are gone: nothing to read
            for h in meta.range_roots(r):
                txn.decref(h)
        for y, _x in r.pairs():
            _drop_tombstones(meta, batch, CF_INODES, ino_key(y))
            for key, _ in meta.kv.scan(CF_DIRENTS, ino_key(y), ino_key(y)):
                _drop_tombstones(meta, batch, CF_DIRENTS, key[:-8])
    return dead, batch, txn


def _needs(meta: Versioned, lv: LayerView, r: Range) -> bool:
    """Whether some copy inode of r is still alive in lv."""
    for y, _x in r.pairs():
        found = meta.get(CF_INODES, ino_key(y), lv)
        if found is not None and found[1]:
            return True
    return False


def _drop_tombstones(meta: Versioned, batch: Batch, cf: str, base: bytes) -> None:
    versions = meta.versions(cf, base)
    if versions and not any(v for _l, v in versions):
        for layer, _v in versions:
            Versioned.remove(batch, cf, base, layer)


def collect(meta: Versioned, catalog: Catalog, live_tops: set[int],
            chunk: int = 2000) -> Iterator[tuple[Batch, RefTxn, int]]:
    """Yield (batch, txn, versions removed) in chunks; the caller commits each under its lock.
    The layers of live clones count as live tops."""
    live_tops = live_tops | {c.layer for c in meta.shared.clones.values() if c.layer in catalog.parents}
    dead, interior = plan(catalog, live_tops)
    anc = {top: set(catalog.ancestry(top)) for top in live_tops}
    # Originals of live ranges: their range's layer is one more top for their keys.
    pins = meta.shared.sources()
    for layers in pins.values():
        for layer in layers:
            if layer not in anc:
                anc[layer] = set(catalog.ancestry(layer))
    batch, txn, n = Batch(), RefTxn(), 0

    def drop(cf: str, base: bytes, layer: int, value: bytes) -> None:
        Versioned.remove(batch, cf, base, layer)
        if cf == CF_INODES and value:
            root = Attrs.unpack(value).root
            if root is not None:
                txn.decref(root.hash)

    for layer in dead:
        for cf, base in list(meta.changed(layer, shared=False)):
            for l, value in meta.versions(cf, base):
                if l == layer:
                    drop(cf, base, l, value)
                    n += 1
            if len(batch) >= chunk:
                yield batch, txn, n
                batch, txn, n = Batch(), RefTxn(), 0
        catalog.forget_layer(layer, batch)
    for layer, tops in interior.items():
        for cf, base in list(meta.changed(layer, shared=False)):
            versions = meta.versions(cf, base)
            mine = [v for l, v in versions if l == layer]
            if not mine:
                continue
            newer = [l for l, _ in versions if l > layer]
            pinned = pins.get(int.from_bytes(base[:8], "big"), ()) if cf in (CF_INODES, CF_DIRENTS) else ()
            keep_for = [p for p in pinned if layer in anc[p]]
            if all(any(l in anc[t] for l in newer) for t in list(tops) + keep_for):
                drop(cf, base, layer, mine[0])
                n += 1
            if len(batch) >= chunk:
                yield batch, txn, n
                batch, txn, n = Batch(), RefTxn(), 0
    if len(batch):
        yield batch, txn, n
