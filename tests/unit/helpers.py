"""Shared helpers of the unit tests: stores built on MemoryKV, and brute-force models.

Everything here runs in process without FUSE, RocksDB or the disk: the object store's packs
live in a MemoryBlobStore.
"""
from __future__ import annotations

from pathlib import Path

from cowfs.blob.memory import MemoryBlobStore
from cowfs.cache import ChunkCache
from cowfs.chunks import codec, upgrade
from cowfs.chunks.families import CF_OBJECTS, CF_REFS
from cowfs.chunks.objects import ObjectStore
from cowfs.chunks.packs import Packs
from cowfs.chunks.refs import RefTxn, parse_ref
from cowfs.chunks.tree import Root
from cowfs.kv.base import Batch
from cowfs.kv.memory import MemoryKV
from cowfs.meta.layers import Catalog
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Range, SharedTrees, runs_of
from cowfs.meta.versioned import LayerView, Versioned
from cowfs.store import FAMILIES
from cowfs.meta.layers import CF_CATALOG


def memory_kv() -> MemoryKV:
    """An empty MemoryKV with every family of a store."""
    return MemoryKV(FAMILIES + (CF_CATALOG,))


class Meta:
    """The metadata layers (catalog, versioned keys, shared ranges) on a MemoryKV."""

    def __init__(self, kv: MemoryKV | None = None) -> None:
        self.kv = kv if kv is not None else memory_kv()
        self.catalog = Catalog(self.kv)
        self.meta = Versioned(self.kv, SharedTrees.load(self.kv), self.catalog.layer_view)

    def layer(self, parent: int = 0) -> int:
        """A new layer under parent (0: a root layer), committed."""
        b = Batch()
        lid = self.catalog.new_layer(parent, b)
        self.kv.write(b)
        return lid

    def view(self, top: int) -> LayerView:
        return self.catalog.layer_view(top)


def visible(versions: dict[int, bytes], ancestry: list[int]) -> tuple[int, bytes] | None:
    """The brute-force read: the version of the nearest layer of ancestry (top first)."""
    for layer in ancestry:
        if layer in versions:
            return layer, versions[layer]
    return None


POOL = [bytes([k]) * (100 + k) for k in range(1, 7)]  # a few small chunks: files share and repeat them


def chunk(k: int) -> tuple[bytes, bytes]:
    """(hash, encoding) of POOL[k]."""
    return codec.chunk_hash(POOL[k]), codec.encode_chunk(POOL[k], 1)


class Objects:
    """An ObjectStore on a MemoryKV, committed as cowfs.store.Store.commit does (apply the
    RefTxn into the batch, write it, settle the accounting; abort if the write fails)."""

    def __init__(self, pack_dir: Path | None = None) -> None:
        self.kv = memory_kv()
        self.blobs = MemoryBlobStore()
        self.packs = Packs(self.blobs)
        self.objects = ObjectStore(self.kv, ChunkCache(1 << 20, 1 << 20), self.packs)
        # an empty store's accounting, as init_store's first open does
        self.objects.space = upgrade.rebuild(self.kv, {})

    def commit(self, batch: Batch, txn: RefTxn) -> tuple[int, int]:
        try:
            created, freed = self.objects.apply(txn, batch)
            self.kv.write(batch)
        except BaseException:
            self.objects.abort(txn)
            raise
        self.objects.settle()
        return created, freed

    def refs(self) -> dict[bytes, tuple[int, int]]:
        """(count, roots) of every refs record."""
        return {h: (r.count, r.roots) for h, r in ((h, parse_ref(v)) for h, v in self.kv.scan(CF_REFS, b""))}

    def stored(self) -> set[bytes]:
        return {h for h, _ in self.kv.scan(CF_OBJECTS, b"")}

    def close(self) -> None:
        self.packs.close()
        self.kv.close()


def recount(files: dict[int, tuple[Root | None, int]], load_node) -> dict[bytes, tuple[int, int]]:
    """(count, roots) of every object, from the live roots: one reference per file root, one
    per slot of every distinct live node."""
    want: dict[bytes, list[int]] = {}
    seen: set[bytes] = set()

    def visit(h: bytes, level: int) -> None:
        if level == 0 or h in seen:
            return
        seen.add(h)
        for c in codec.node_children(load_node(h)):
            want.setdefault(c, [0, 0])[0] += 1
            visit(c, level - 1)

    for root, _n in files.values():
        if root is not None:
            w = want.setdefault(root.hash, [0, 0])
            w[0] += 1
            w[1] += 1
            visit(root.hash, root.depth)
    return {h: (c, r) for h, (c, r) in want.items()}


def dirent(ino: int, kind: int = 8) -> bytes:
    """A directory entry's value: the child's inode number and its file type (as filesystem.py)."""
    return ino.to_bytes(8, "big") + bytes((kind,))


def record(mode: int = 0o100644, parent: int = 0, name: bytes = b"", root: Root | None = None,
           ctime: int = 1, atime: int = 1) -> bytes:
    """A packed inode record (cowfs.meta.records.Attrs)."""
    return Attrs(mode, 0, 0, 1, 0, 0, atime, 1, ctime, root, b"", parent, name).pack()


def share(m: Meta, layer: int, pairs: list[tuple[int, int]], ctimes: list[int],
          atimes: list[int] | None = None) -> Range:
    """Make copy inodes read as their originals of `layer` (as the sharer commits a range)."""
    r = Range(layer, runs_of(sorted(pairs)), ctimes, atimes or [])
    b = Batch()
    m.meta.shared.add(r, b)
    m.kv.write(b)
    m.meta.shared.committed(added=[r])
    return r
