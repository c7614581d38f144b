"""A lazy mount's fetched chunks as a bounded on-disk cache of its remote's objects.

A lazy mount (cowfs.fleet.lazy) writes the chunks each fetch brings as one **cache pack**
(chunks.packs: written and fsync'd in the fetch's worker thread, like a flush's pack) and
re-encodes their F records as P pointers into it in the fetch's commit (cowfs.core.lazy),
which also records each one in the family `fetched`: chunk id -> the cache pack, the fetch
time and the F record it had, i.e. where the remote holds its bytes.  Only chunks that came
from the remote are ever in a cache pack; what is written locally goes through flushes into
packs (or inline records) of its own, which nothing here names, so it is never evicted.

Eviction (driven by cowfs.background.lazy_cache) is by whole cache pack, least recently
used first: a read touches the packs of the chunks it reads (`touch`, an in-memory map, no
database read).  `flip`, under the filesystem lock, re-encodes every chunk still pointing
into a victim pack back to its F record (`RefTxn.recode`: the accounting moves back to
"remote") and drops its `fetched` entry, in one commit; the pack is then named by no
pointer and is deleted by the pack gc's condemn and sweep (chunks.liveness).  A chunk that
is a delta's base (pins > 0) keeps its pointer (a delta's base is always a whole local
chunk, one hop at most: chunks.codec): its pack is then repacked, the chunk copied into a
plain pack (packs are immutable, never punched: chunks.packs), and it is local for good.
An eviction is by content: the chunk id is the BLAKE3 of its bytes and the F record names
where the remote holds exactly those bytes (checked again at the next fetch), whichever
files reference the chunk.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from cowfs.chunks import codec
from cowfs.chunks.families import CF_FETCHED, CF_OBJECTS, CF_REFS
from cowfs.chunks.packs import Packs
from cowfs.chunks.refs import RefTxn, parse_ref
from cowfs.kv.base import KV, Batch

_HEAD = struct.Struct("<QQ")  # cache pack id, fetch time (ns); then the F record
LOW_WATER = 8  # an eviction brings the cache down to limit - limit/LOW_WATER (not one pack a fetch)
EVICTED_MAX = 1 << 18  # evicted chunk ids remembered to count refetches (~25 MiB at most)


def entry(pack: int, when: int, remote: bytes) -> bytes:
    return _HEAD.pack(pack, when) + remote


def parse(value: bytes) -> tuple[int, int, bytes]:
    """(cache pack, fetch time, F record) of a `fetched` entry; CorruptObject if it is not one."""
    if len(value) <= _HEAD.size or value[_HEAD.size] != codec.KIND_REMOTE:
        raise codec.CorruptObject(f"a fetched-chunk record of {len(value)} bytes does not decode")
    pack, when = _HEAD.unpack_from(value)
    return pack, when, value[_HEAD.size:]


def cache_packs(kv: KV) -> set[int]:
    """The packs `fetched` entries name (a scan: pack gc leaves them to eviction, chunks.repack)."""
    out = set()
    for _h, value in kv.scan(CF_FETCHED, b""):
        if len(value) >= _HEAD.size:
            out.add(_HEAD.unpack_from(value)[0])
    return out


@dataclass
class CachePack:
    size: int  # bytes of the pack (what leaves the disk when it is deleted)
    chunks: list[bytes] = field(default_factory=list)


@dataclass
class Flip:
    """What `flip` did to one victim pack."""

    evicted: list[bytes] = field(default_factory=list)  # chunks re-encoded as F
    evicted_bytes: int = 0  # their raw content
    kept: int = 0  # chunks still pointing into the pack (delta bases): the pack is repacked


class RemoteCache:
    """The cache packs of one daemon's store, in LRU order, and the figures of its evictions.
    Changed on the event loop only (reads, the fetch's commit, the eviction's commit); `load`
    runs before the daemon serves."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes of cache packs kept at most (0: no bound)
        self.packs: OrderedDict[int, CachePack] = OrderedDict()  # least recently used first
        self.where: dict[bytes, int] = {}  # chunk -> the cache pack it was fetched into
        self.bytes = 0
        self.passes = 0
        self.chunks_evicted = 0
        self.bytes_evicted = 0  # raw content of the chunks evicted
        self.packs_evicted = 0
        self.packs_repacked = 0  # partly evicted (delta bases kept): copied out
        self.refetches = 0  # chunks fetched again after an eviction
        self.failures = 0
        # packs nothing pointed at that the evictor's first pass deleted (an eviction or a
        # fetch cut short by a crash); None until that pass is done
        self.swept_at_start: int | None = None
        self._evicted: OrderedDict[bytes, None] = OrderedDict()

    def load(self, kv: KV, packs: Packs) -> int:
        """The cache packs the store holds (a scan of `fetched`, oldest fetch first: the LRU
        order a restart keeps); entries whose chunk no longer points into their pack (freed,
        re-encoded by the dedup worker, repacked) are deleted.  Returns how many."""
        found: dict[int, tuple[int, list[bytes]]] = {}
        stale = Batch()
        for h, value in kv.scan(CF_FETCHED, b""):
            try:
                pack, when, _remote = parse(value)
            except codec.CorruptObject:
                stale.delete(CF_FETCHED, h)
                continue
            raw = kv.get(CF_OBJECTS, h)
            ext = None if raw is None else codec.packed_extent(raw)
            if ext is None or ext[0] != pack:
                stale.delete(CF_FETCHED, h)
                continue
            first, chunks = found.get(pack, (when, []))
            found[pack] = (min(first, when), chunks + [h])
        for pack, (_when, chunks) in sorted(found.items(), key=lambda kv_: kv_[1][0]):
            size = packs.size(pack)
            if size is None:  # damage fsck reports (a pointer into a missing pack): not cache bytes
                continue
            self.added(pack, size, chunks)
        if len(stale):
            kv.write(stale)
        return len(stale)

    def record(self, batch: Batch, pack: int, when: int, items: list[tuple[bytes, bytes]]) -> None:
        """Put the `fetched` entries of chunks (id, F record) a fetch's commit stores in pack."""
        for h, remote in items:
            batch.put(CF_FETCHED, h, entry(pack, when, remote))

    def added(self, pack: int, size: int, chunks: list[bytes]) -> None:
        """A cache pack is committed (the most recently used)."""
        self.packs[pack] = CachePack(size, list(chunks))
        self.bytes += size
        for h in chunks:
            self.where[h] = pack
            if h in self._evicted:
                del self._evicted[h]
                self.refetches += 1

    def touch(self, h: bytes) -> None:
        """A read of chunk h: its cache pack (if any) becomes the most recently used."""
        pack = self.where.get(h)
        if pack is not None and pack in self.packs:
            self.packs.move_to_end(pack)

    def over(self) -> bool:
        return self.limit > 0 and self.bytes > self.limit

    def victims(self) -> list[int]:
        """The least recently used packs whose eviction brings the cache under its low water;
        never the most recently used one (the pack a read has just fetched, or read from: with a
        limit smaller than one fetch, the read is still served from it)."""
        if not self.over():
            return []
        target = self.limit - self.limit // LOW_WATER
        out, left = [], self.bytes
        for pack, cp in list(self.packs.items())[:-1]:
            if left <= target:
                break
            out.append(pack)
            left -= cp.size
        return out

    def flip(self, kv: KV, pack: int, batch: Batch, txn: RefTxn) -> Flip:
        """Put into batch/txn the eviction of pack: each chunk that still points into it and is
        no delta's base goes back to its F record; every `fetched` entry naming the pack goes.
        Under the filesystem lock, with no checkpoint until the commit."""
        out = Flip()
        for h in self.packs[pack].chunks:
            value = kv.get(CF_FETCHED, h)
            if value is None:
                continue
            fpack, _when, remote = parse(value)
            if fpack != pack:  # evicted before and fetched again into another pack
                continue
            batch.delete(CF_FETCHED, h)
            raw = kv.get(CF_OBJECTS, h)
            ext = None if raw is None else codec.packed_extent(raw)
            if ext is None or ext[0] != pack or h in txn.recode:
                continue  # freed, re-encoded as a delta, or moved: nothing of it left here
            if parse_ref(kv.get(CF_REFS, h)).pins:
                out.kept += 1
                continue
            txn.recode[h] = remote
            out.evicted.append(h)
            out.evicted_bytes += codec.chunk_sizes(raw)[0]  # type: ignore[arg-type]
        return out

    def dropped(self, pack: int, flip: Flip) -> None:
        """The commit of flip is written: the pack's bytes are no longer the cache's (its
        deletion follows), and its evicted chunks are counted if fetched again."""
        cp = self.packs.pop(pack, None)
        if cp is None:
            return
        self.bytes -= cp.size
        for h in cp.chunks:
            if self.where.get(h) == pack:
                del self.where[h]
        for h in flip.evicted:
            self._evicted[h] = None
            if len(self._evicted) > EVICTED_MAX:
                self._evicted.popitem(last=False)
        self.chunks_evicted += len(flip.evicted)
        self.bytes_evicted += flip.evicted_bytes
        self.packs_evicted += 1

    def figures(self) -> dict[str, int]:
        return {"bytes": self.bytes, "limit": self.limit, "packs": len(self.packs), "passes": self.passes,
                "chunks_evicted": self.chunks_evicted, "bytes_evicted": self.bytes_evicted,
                "packs_evicted": self.packs_evicted, "packs_repacked": self.packs_repacked,
                "refetches": self.refetches, "failures": self.failures, "swept_at_start": self.swept_at_start}
