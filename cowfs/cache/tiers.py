"""The two cache levels in front of the object store, and who brought each chunk in.

L1 holds decoded content (chunks, and tree nodes under a suffixed key) keyed by hash.  L2 is
a victim cache of chunks re-encoded as 4 KiB lz4 pages (cowfs.cache.l2): a chunk enters it
when L1 evicts it after it was read again while in L1.  Packing costs ~80 µs per 64 KiB
chunk, so it is paid only for chunks that showed reuse, never on the miss path and never for
a stream read once (a cold start or a 4 GiB sequential read packs nothing).  A read looks in
L1, then L2; a whole-chunk L2 hit is promoted to L1, a partial one is served from its pages
only (decoding 1-2 pages, not 16).  Chunks loaded by readahead or learned prefetch are
remembered with their origin so the stats can say how many were later read (precision) and
how many reads they served (recall).  Only the trio thread calls in here (worker threads
return their results to it), except `cached` and `l1.peek`, which are single dict reads.
"""
from __future__ import annotations

from cowfs.cache.l2 import Packed, pack
from cowfs.cache.lru import ByteLRU

SOURCES = ("readahead", "learned")
ORIGIN_MAX = 1 << 17  # prefetched chunks remembered for the stats (~20 MiB at most)
NODE = b"N"  # suffix of tree-node keys in L1: nodes never move to L2


class ChunkCache:
    def __init__(self, l1_bytes: int, l2_bytes: int) -> None:
        self.l2: ByteLRU[Packed] = ByteLRU(l2_bytes, Packed.nbytes)
        self.l1: ByteLRU[bytes] = ByteLRU(l1_bytes, on_evict=self._demote if l2_bytes > 0 else None)
        # hash -> [source index, read since?] for chunks brought in by prefetch
        self._origin: dict[bytes, list[int]] = {}
        self.prefetched = [0, 0]
        self.used = [0, 0]  # prefetched chunks read at least once
        self.served = [0, 0]  # chunk reads answered by a prefetched chunk
        self.chunk_reads = 0

    def _demote(self, key: bytes, data: bytes) -> None:
        if not key.endswith(NODE) and key not in self.l2:
            self.l2.put(key, pack(data))

    # -- lookups -------------------------------------------------------------------------------
    def node(self, h: bytes) -> bytes | None:
        return self.l1.get(h + NODE)

    def peek_node(self, h: bytes) -> bytes | None:
        """node() for worker threads: one dict read, no LRU update."""
        return self.l1.peek(h + NODE)

    def get(self, h: bytes) -> bytes | None:
        """The whole decoded chunk, from L1 or (promoted) from L2."""
        data = self.l1.get(h)
        if data is None:
            p = self.l2.get(h)
            if p is None:
                return None
            data = p.whole()
            self.l1.put(h, data)
        return data

    def read(self, h: bytes, a: int, b: int) -> bytes | memoryview | None:
        """Bytes [a, b) of chunk h (clipped at its end) for a file read, or None on a miss."""
        self.chunk_reads += 1
        data = self.l1.get(h)
        if data is not None:
            out: bytes | memoryview = memoryview(data)[a:b]
        else:
            p = self.l2.get(h)
            if p is None:
                return None
            b = min(b, p.size)
            if a == 0 and b == p.size:
                out = p.whole()
                self.l1.put(h, out)
            else:
                out = p.read(a, b) if a < b else b""
        o = self._origin.get(h)
        if o is not None:
            self.served[o[0]] += 1
            if not o[1]:
                o[1] = 1
                self.used[o[0]] += 1
        return out

    def cached(self, h: bytes) -> bool:
        return h in self.l1 or h in self.l2

    # -- inserts -------------------------------------------------------------------------------
    def put(self, h: bytes, data: bytes) -> None:
        """A chunk loaded for a read: if a prefetch had brought it in, that copy was evicted unread."""
        self._origin.pop(h, None)
        self.l1.put(h, data)

    def put_node(self, h: bytes, node: bytes) -> None:
        self.l1.put(h + NODE, node)

    def put_prefetched(self, h: bytes, data: bytes, source: int) -> None:
        if self.cached(h):
            return
        self.put(h, data)
        self.prefetched[source] += 1
        if len(self._origin) >= ORIGIN_MAX:
            del self._origin[next(iter(self._origin))]
        self._origin[h] = [source, 0]

    def discard(self, h: bytes) -> None:
        self.l1.discard(h)
        self.l1.discard(h + NODE)
        self.l2.discard(h)

    def stats(self) -> dict[str, object]:
        reads = self.chunk_reads
        pf: dict[str, object] = {}
        for i, name in enumerate(SOURCES):
            n = self.prefetched[i]
            pf[name] = {"prefetched": n, "used": self.used[i], "served_reads": self.served[i],
                        "precision": round(self.used[i] / n, 4) if n else 0.0}
        pf["chunk_reads"] = reads
        pf["recall"] = round(sum(self.served) / reads, 4) if reads else 0.0
        return {"l1": self.l1.stats(), "l2": self.l2.stats(), "prefetch": pf}
