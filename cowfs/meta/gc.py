"""Garbage collection of metadata versions no live view can see.

A version (key, layer l) is garbage when every live top that has l in its ancestry has a
newer version of the key on its path, or when no live top has l in its ancestry at all
(a dead layer: the old head after a rollback, a deleted snapshot or branch).  Only layers
that are not themselves live tops can hold garbage, and the per-layer changelog lists
their keys, so a pass costs time proportional to the keys in those layers.
"""
from __future__ import annotations

from typing import Iterator

from cowfs.chunks.store import RefTxn
from cowfs.kv.base import Batch
from cowfs.meta.layers import Catalog, layer_suffix
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_CHANGES, CF_INODES, TAGS, Versioned


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


def collect(meta: Versioned, catalog: Catalog, live_tops: set[int],
            chunk: int = 2000) -> Iterator[tuple[Batch, RefTxn, int]]:
    """Yield (batch, txn, versions removed) in chunks; the caller commits each under its lock."""
    dead, interior = plan(catalog, live_tops)
    anc = {top: set(catalog.ancestry(top)) for top in live_tops}
    batch, txn, n = Batch(), RefTxn(), 0

    def drop(cf: str, base: bytes, layer: int, value: bytes) -> None:
        batch.delete(cf, base + layer_suffix(layer))
        batch.delete(CF_CHANGES, layer.to_bytes(8, "big") + TAGS[cf] + base)
        if cf == CF_INODES and value:
            root = Attrs.unpack(value).root
            if root is not None:
                txn.decref(root.hash)

    for layer in dead:
        for cf, base in list(meta.changed(layer)):
            for l, value in meta.versions(cf, base):
                if l == layer:
                    drop(cf, base, l, value)
                    n += 1
            if len(batch) >= chunk:
                yield batch, txn, n
                batch, txn, n = Batch(), RefTxn(), 0
        catalog.forget_layer(layer, batch)
    for layer, tops in interior.items():
        for cf, base in list(meta.changed(layer)):
            versions = meta.versions(cf, base)
            mine = [v for l, v in versions if l == layer]
            if not mine:
                continue
            newer = [l for l, _ in versions if l > layer]
            if all(any(l in anc[t] for l in newer) for t in tops):
                drop(cf, base, layer, mine[0])
                n += 1
            if len(batch) >= chunk:
                yield batch, txn, n
                batch, txn, n = Batch(), RefTxn(), 0
    if len(batch):
        yield batch, txn, n
