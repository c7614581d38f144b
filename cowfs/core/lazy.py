"""Chunks of a lazy mount fetched before a read (or a partial write) needs them.

Read handlers never await (cowfs.core.data), so the FUSE layer calls `LazyReads.ensure`
first: it finds the chunks of the range (and of up to AHEAD bytes after it in the same file)
that are F objects (still on the remote, cowfs.chunks.codec), fetches them in a worker
thread (ranged GETs, checked against their ids, re-encoded there), and commits their local
encodings under the filesystem lock (`RefTxn.recode`, as the background worker's delta
encodings): the read that follows, and every later one, is local.  Other requests keep
being served meanwhile; a remote that is down fails only the reads that need it (EIO, one
log line each), and for DOWN_FOR seconds it fails them at once (cowfs.fleet.lazy).

Two reads of one unfetched chunk: the first marks it in flight, the second waits for it
(`_inflight`) and then reads the committed chunk; if the first failed, the second tries
itself.  Paths that read a chunk without this step (a truncate's last chunk, fallocate's
edges, readahead and prefetch threads) fetch it blocking (`RemoteFetcher.fetch_one`); what
they fetched is stored by the next commit here.

With a cache (`LazyReads.cache`, set by the daemon of every lazy mount), the fetched chunks
are stored as one cache pack per fetch and their pack counts towards -o remote_cache_bytes
(cowfs.chunks.remotecache); a read touches the cache packs of its chunks (LRU), and looks
at its range again after every await, since an eviction (cowfs.background.lazy_cache) may
have turned a local chunk back into an F object meanwhile.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import trio

from cowfs import threads
from cowfs.chunks import codec
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.remotecache import RemoteCache
from cowfs.chunks.tree import CHUNK
from cowfs.core.node import Node
from cowfs.errors import FSError
from cowfs.kv.base import Batch

if TYPE_CHECKING:
    from cowfs.chunks.objects import ObjectStore
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

AHEAD = 256 << 10  # fetched with a read's own chunks: the file's next chunks still remote
NEAR_GAP = 16 << 10  # neighbours this close (fleet.lazy.RANGE_GAP): one GET covers them and the read's chunk

# (remote source, pack id) -> the offsets of its blobs that were F objects when the map was
# made, sorted, and alongside them (offset, stored length, chunk id)
PackMap = dict[tuple[int, bytes], tuple[list[int], list[tuple[int, int, bytes]]]]


class Packed(NamedTuple):
    """A fetch's cache pack (chunks.remotecache): its id, bytes, and each chunk's pointer."""
    pack: int
    size: int
    pointers: dict[bytes, bytes]


class LazyReads:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self._inflight: dict[bytes, trio.Event] = {}
        self.waits = 0  # reads that waited for another's fetch of the same chunk
        # reads and writes that looked their chunks up for F objects (none once the store
        # has no F object left: ObjectStore.remote_left)
        self.checks = 0
        # -o lazy_near (set by the daemon): the F chunks lying within this many bytes of a
        # read's chunks in their remote pack are fetched in the same GET (0: none)
        self.near = 0
        self.near_fetched = 0  # chunks fetched as such neighbours
        self._packs: PackMap | None = None
        self._mapping: trio.Event | None = None
        # Set by the daemon of a lazy mount: its fetched chunks go into cache packs, evicted
        # past -o remote_cache_bytes (cowfs.background.lazy_cache, woken by cache_over)
        self.cache: RemoteCache | None = None
        self.cache_over: Callable[[], None] | None = None

    def _remote(self, node: Node, first: int, last: int) -> list[tuple[bytes, bytes]]:
        objects = self.fs.store.objects
        out = []
        for i in range(first, last + 1):
            h = node.stored_hash(i, objects)
            if h is None:
                continue
            raw = objects.remote_record(h)
            if raw is not None:
                out.append((h, raw))
        return out

    async def ensure(self, node: Node, off: int, size: int, edges_only: bool = False) -> None:
        """Make the stored chunks a read of [off, off+size) needs local (edges_only: a write's,
        which reads only the chunks it covers in part).  FSError(EIO) if the remote fails."""
        objects = self.fs.store.objects
        if objects.fetcher is None or size <= 0:
            return
        file_size = node.attrs.size
        end = off + size if edges_only else min(off + size, file_size)
        first, last = off // CHUNK, (end - 1) // CHUNK
        if off >= end or first * CHUNK >= file_size:
            return
        if self.cache is not None and self.cache.packs and not edges_only:
            for i in range(first, last + 1):  # the read's cache packs become the most recently used
                h = node.stored_hash(i, objects)
                if h is not None:
                    self.cache.touch(h)
        if not objects.remote_left():
            return
        self.checks += 1
        want = self._wanted(node, off, end, edges_only, ahead=not edges_only)
        if not want:
            return
        if self.near > 0 and not edges_only:
            await self._map_packs()
        # A second round only if a chunk is still remote after this one: another read's fetch
        # of it failed, or an eviction (a tight -o remote_cache_bytes) took it back meanwhile.
        for _try in range(3):
            mine = [(h, raw) for h, raw in want if h not in self._inflight]
            others = [self._inflight[h] for h, _raw in want if h in self._inflight]
            if mine:
                await self._fetch(node, off, mine)
            for ev in others:
                self.waits += 1
                await ev.wait()
            want = self._wanted(node, off, end, edges_only, ahead=False)
            if not want:
                return
        log.error("lazy fetch for inode %d at %d: %d chunks still on the remote", node.ino, off, len(want))
        raise FSError(errno.EIO)

    def _wanted(self, node: Node, off: int, end: int, edges_only: bool, ahead: bool) -> list[tuple[bytes, bytes]]:
        """The F chunks (id, record) the range [off, end) needs (ahead: and the file's next
        ones up to AHEAD bytes); FSError(EIO) for a damaged record."""
        first, last = off // CHUNK, (end - 1) // CHUNK
        file_size = node.attrs.size
        try:
            if edges_only:
                # A write that starts inside a chunk holding stored bytes needs that chunk even
                # at or past EOF (the chunk EOF is in): left remote, it would be the base of a
                # sparse buffer (core.node.Sparse) that only a flush fetches, and while the
                # remote is down every flush of the mount would fail on it.
                want = []
                if off % CHUNK:
                    want += self._remote(node, first, first)
                if end % CHUNK and end < file_size and (last != first or not off % CHUNK):
                    want += self._remote(node, last, last)
                return want
            stop = min((file_size - 1) // CHUNK, (end + AHEAD - 1) // CHUNK) if ahead else last
            return self._remote(node, first, stop)
        except codec.CorruptObject as exc:
            log.error("lazy fetch for inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc

    async def _map_packs(self) -> None:
        """Make the pack map of the store's F objects once (a scan of every object record,
        in a worker thread; reads meanwhile wait for it).  Entries go stale as chunks are
        fetched or freed: `_near` checks each against its record."""
        if self._packs is not None:
            return
        if self._mapping is not None:
            await self._mapping.wait()
            return
        self._mapping = trio.Event()
        try:
            self._packs = await threads.run_in_thread(self._scan)
        finally:
            self._mapping.set()

    def _scan(self) -> PackMap:
        by: dict[tuple[int, bytes], list[tuple[int, int, bytes]]] = {}
        for h, raw in self.fs.store.objects.remote_records():
            loc = codec.remote_loc(raw)
            assert loc is not None
            by.setdefault((loc.source, loc.pack), []).append((loc.offset, loc.length, h))
        out: PackMap = {}
        for key, blobs in by.items():
            blobs.sort()
            out[key] = ([b[0] for b in blobs], blobs)
        return out

    def _near(self, items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The F chunks not in flight that lie within `near` bytes before or after each of
        items in its pack, each less than NEAR_GAP from the last one taken (so the GET of the
        item covers them too)."""
        if self._packs is None:
            return []
        objects = self.fs.store.objects
        taken = {h for h, _raw in items}
        out: list[tuple[bytes, bytes]] = []
        for _h, raw in items:
            loc = codec.remote_loc(raw)
            entry = None if loc is None else self._packs.get((loc.source, loc.pack))
            if loc is None or entry is None:
                continue
            offsets, blobs = entry
            start, end = loc.offset, loc.offset + loc.length
            i = bisect.bisect_left(offsets, start)
            # after the item: walk forward from its end
            edge = end
            for b_off, b_len, h in blobs[bisect.bisect_left(offsets, end, lo=i):]:
                if b_off - edge > NEAR_GAP or b_off + b_len - end > self.near:
                    break
                got = self._take(objects, h, taken)
                if got is not None:
                    out.append(got)
                    edge = b_off + b_len
                elif h in taken:
                    edge = max(edge, b_off + b_len)
            # before it: walk back from its start
            edge = start
            for b_off, b_len, h in reversed(blobs[:i]):
                if edge - (b_off + b_len) > NEAR_GAP or start - b_off > self.near:
                    break
                got = self._take(objects, h, taken)
                if got is not None:
                    out.append(got)
                    edge = b_off
                elif h in taken:
                    edge = min(edge, b_off)
        return out

    def _take(self, objects: "ObjectStore", h: bytes, taken: set[bytes]) -> tuple[bytes, bytes] | None:
        """(h, its F record) if h is still remote, not in flight and not taken yet (then taken)."""
        if h in taken or h in self._inflight:
            return None
        raw = objects.remote_record(h)
        if raw is None:
            return None
        taken.add(h)
        return h, raw

    async def _fetch(self, node: Node, off: int, items: list[tuple[bytes, bytes]]) -> None:
        near = self._near(items) if self.near > 0 else []
        with self._in_flight(items + near):
            try:
                got = await threads.run_in_thread(self._fetched, items + near)
                self.near_fetched += len(near)
            except codec.CorruptObject as exc:
                if not near:
                    log.error("read of inode %d at %d: %s", node.ino, off, exc)
                    raise FSError(errno.EIO) from exc
                # A neighbour may be what failed: the read's own chunks alone, once more (a
                # remote that is down fails this at once: fleet.lazy.DOWN_FOR).
                try:
                    got = await threads.run_in_thread(self._fetched, items)
                except codec.CorruptObject:
                    log.error("read of inode %d at %d: %s", node.ino, off, exc)
                    raise FSError(errno.EIO) from exc
                log.warning("read of inode %d at %d: its %d neighbours were not fetched: %s",
                            node.ino, off, len(near), exc)
            await self._store(got)

    def _fetched(self, items: list[tuple[bytes, bytes]]) -> dict[bytes, tuple[bytes, bytes]]:
        """In a worker thread: items fetched (checked, encoded at the mount's level), with what
        the blocking paths fetched meanwhile (`RemoteFetcher.take_landed`)."""
        fetcher = self.fs.store.objects.fetcher
        assert fetcher is not None
        got = fetcher.fetch_many(items, self.fs.level)
        got.update(fetcher.take_landed())  # type: ignore[attr-defined]
        return got

    def _pack(self, got: dict[bytes, tuple[bytes, bytes]]) -> Packed | None:
        """In a worker thread, under Filesystem.lock: fetched chunks written as one cache pack
        (chunks.remotecache).  None if it cannot be written (a full disk): they are then
        stored inline, as before caches, and not evictable."""
        objects = self.fs.store.objects
        order = list(got)
        try:
            pointers = objects.pack([(h, got[h][1]) for h in order])
            pack = codec.packed_extent(pointers[0])[0]  # type: ignore[index]
            size = objects.packs.size(pack) or 0
        except OSError as exc:
            log.warning("%d fetched chunks are stored inline, not in a cache pack: %s", len(order), exc)
            return None
        return Packed(pack, size, dict(zip(order, pointers)))

    @contextlib.contextmanager
    def _in_flight(self, items: list[tuple[bytes, bytes]]) -> Iterator[None]:
        """Mark items' chunks in flight while fetched: a read of one waits for the event
        instead of fetching it again, and is woken whether the fetch worked or not."""
        events = {h: trio.Event() for h, _raw in items}
        self._inflight.update(events)
        try:
            yield
        finally:
            for h, ev in events.items():
                del self._inflight[h]
                ev.set()

    async def fetch_ahead(self, items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Fetch F chunks no read asked for yet (a lazy mount's pushed cold start,
        cowfs.background.lazy_warming), the same way as a read's: marked in flight (a read of
        one waits for this fetch instead of fetching it again), fetched in a thread, committed
        by `_store`.  The items it fetched (not those a read was fetching already);
        codec.CorruptObject (RemoteChunk) if the remote fails."""
        fetcher = self.fs.store.objects.fetcher
        mine = [(h, raw) for h, raw in items if h not in self._inflight]
        if fetcher is None or not mine:
            return []
        with self._in_flight(mine):
            await self._store(await threads.run_in_thread(self._fetched, mine))
        return mine

    async def _store(self, got: dict[bytes, tuple[bytes, bytes]]) -> None:
        """Commit the local encodings of fetched chunks that are still F objects (one may have
        been freed meanwhile: nothing to store then).  With a cache, they are first written as
        one cache pack, in a thread, under Filesystem.lock as a flush's pack is (so a pack gc,
        which lists packs under the lock, never condemns a pack whose commit is still to come),
        and committed as pointers into it with their `fetched` entries."""
        fs = self.fs
        objects = fs.store.objects
        kept: list[tuple[bytes, bytes]] = []
        packed: Packed | None = None
        async with fs.lock:
            live = {h: got[h] for h in got if objects.remote_record(h) is not None}
            if live and self.cache is not None:
                packed = await threads.run_in_thread(self._pack, live)
            txn = RefTxn()
            for h, (data, enc) in live.items():
                pointer = packed.pointers[h] if packed is not None else None
                txn.recode[h] = enc if pointer is None else pointer
                if pointer is not None:
                    kept.append((h, objects.remote_record(h)))  # type: ignore[arg-type]
                objects.cache.put(h, data)
            if not txn.recode:
                return
            batch = Batch()
            if packed is not None:
                txn.staged = [packed.pack]  # deleted again if the commit fails
                self.cache.record(batch, packed.pack, time.time_ns(), kept)  # type: ignore[union-attr]
            try:
                fs.store.commit(batch, txn)
            except Exception as exc:  # e.g. a full disk: the chunks stay remote, this read is served
                log.error("storing %d fetched chunks failed: %s", len(txn.recode), exc)
                fs.store.recover()
                return
        if packed is not None and self.cache is not None:
            self.cache.added(packed.pack, packed.size, [h for h, _raw in kept])
            if self.cache.over() and self.cache_over is not None:
                self.cache_over()
