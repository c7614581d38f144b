"""A lazy mount's store kept a bounded cache of its remote (-o remote_cache_bytes, issue 23).

The chunks a lazy mount fetches are written as cache packs (cowfs.core.lazy), whose bytes
`RemoteCache` counts (cowfs.chunks.remotecache).  Once they pass the limit, the fetch's
commit wakes this task, which evicts the least recently used cache packs down to the low
water (limit - limit/8, so it runs once per limit/8 bytes fetched, not at every fetch):

  1. under `Filesystem.maintenance` (no pack gc, repack or sweep of `cowfs gc` meanwhile) and
     then `Filesystem.lock`, with no checkpoint until the commit: the victims' chunks go back
     to their F records (`RemoteCache.flip`) in one commit, and leave the L1/L2 caches;
  2. the commit is synced (no crash can bring a pointer into a victim back);
  3. a victim left with pointers (a delta's base: never evicted) is repacked as the pack gc
     does (`Store.copy_packs` in a thread, `commit_moves` under the lock, a sync);
  4. the victims are condemned and swept (chunks.liveness: deleted once a fresh mark finds
     them unmarked and every writer has acknowledged the round; this daemon, the only writer
     of a lazy store, acknowledges its own round as it condemns), in threads.

Reads meanwhile: a read on the loop looks a pointer up and reads its pack in one synchronous
step, so it sees the chunk either in its pack (not deleted before step 4) or F again, which
its `LazyReads.ensure` fetches (it looks again after every await); a worker thread that read
a pointer before the commit reads the record again when the pack is gone
(`ObjectStore.load`).  A crash after step 2 and before step 4 (or in a fetch, between its
pack put and its commit) leaves packs nothing points at: the next daemon's evictor deletes
them first thing (`sweep_packs` with nothing to repack), when the store has a cache.  A
clean unmount does not leave them: the daemon lets a pass under way reach its sweep
(`CacheEvictor.finish`, before its last flush) and starts no other.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from cowfs.background.gc import sweep_packs
from cowfs.background.lazy_warming import BUDGET_BYTES, LazyPrefetch, LazyWarming
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.remotecache import Flip, RemoteCache
from cowfs.kv.base import Batch

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

AUTO_MAX = 2 << 30  # -o remote_cache_bytes=auto: at most this ...
AUTO_SHARE = 4  # ... and at most 1/AUTO_SHARE of the disk space free for it at mount time ...
AUTO_MIN = 16 << 20  # ... but never less than this


def default_limit(store_path: str, cached: int) -> int:
    """-o remote_cache_bytes=auto: min(AUTO_MAX, (free space + the cache's bytes) / AUTO_SHARE),
    at least AUTO_MIN (docs/architecture.md, "A bounded cache of the remote")."""
    st = os.statvfs(store_path)
    return max(AUTO_MIN, min(AUTO_MAX, (st.f_bavail * st.f_frsize + cached) // AUTO_SHARE))


def lazy_tasks(fs: "Filesystem", source: dict[str, Any] | None, warm: list[bytes], limit: int | None
               ) -> tuple["CacheEvictor | None", LazyWarming | None, LazyPrefetch | None]:
    """A lazy mount's background work (source: its lazy.json, None for any other store): the
    cache's evictor (`attach`), the warming of its pushed cold start `warm` (at most half the
    cache: beyond, it would evict what it fetched itself) and the pushed model's prefetch."""
    if source is None:
        return None, None, None
    evictor = attach(fs, limit)
    budget = BUDGET_BYTES if not evictor.cache.limit else min(BUDGET_BYTES, evictor.cache.limit // 2)
    return evictor, LazyWarming(fs, warm, budget_bytes=budget), LazyPrefetch(fs, source.get("model_error"))


def attach(fs: "Filesystem", limit: int | None) -> "CacheEvictor":
    """Give a lazy mount's filesystem its cache of the remote, loaded from the store (before
    the daemon serves), limited to `limit` bytes (None: `default_limit`; 0: no bound)."""
    store = fs.store
    cache = RemoteCache(0)
    stale = cache.load(store.kv, store.packs)
    cache.limit = default_limit(store.path, cache.bytes) if limit is None else limit
    if stale:
        log.info("remote cache: %d stale fetched-chunk records dropped", stale)
    evictor = CacheEvictor(fs, cache)
    fs.lazy.cache, fs.lazy.cache_over = cache, evictor.wake
    return evictor


class CacheEvictor:
    def __init__(self, fs: "Filesystem", cache: RemoteCache) -> None:
        self.fs = fs
        self.cache = cache
        self._wanted = trio.Event()
        self._stopping = False
        self._pass: trio.Event | None = None  # set when the pass under way (past its commit's lock) ends

    async def finish(self) -> None:
        """The mount ends (before its last flush): a pass under way runs to its sweep, and no
        new one starts, so a clean unmount leaves no evicted pack on disk (cancelled between
        its commit and its sweep, a pass left them, beyond the limit, to the next mount)."""
        self._stopping = True
        if self._pass is not None:
            await self._pass.wait()

    def wake(self) -> None:
        """The cache passed its limit (called on the loop by the fetch's commit)."""
        self._wanted.set()

    async def run(self) -> None:
        if self.cache.swept_at_start is None:
            # Packs an earlier daemon's eviction or fetch left when it was killed (between the
            # commit and the sweep, or the pack put and the commit) are outside the cache's
            # count: delete them now (condemn and sweep only; below=0 repacks nothing).
            swept = await sweep_packs(self.fs, below=0.0) if self.cache.packs else {"packs_deleted": 0}
            self.cache.swept_at_start = swept["packs_deleted"]
        if self.cache.over():  # a smaller limit than the cache the store holds
            self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                await self.evict()
            except Exception:
                self.cache.failures += 1
                raise

    async def evict(self) -> None:
        """One eviction pass (the module's steps), none once the mount ends (`finish`)."""
        async with self.fs.maintenance:
            if self._stopping:
                return
            done = self._pass = trio.Event()
            try:
                await self._evict()
            finally:
                self._pass = None
                done.set()

    async def _evict(self) -> None:
        """The pass's steps, under Filesystem.maintenance."""
        fs, cache = self.fs, self.cache
        store = fs.store
        async with fs.lock:
            victims = cache.victims()
            if not victims:
                return
            batch, txn = Batch(), RefTxn()
            flips: dict[int, Flip] = {p: cache.flip(store.kv, p, batch, txn) for p in victims}
            store.commit(batch, txn)
            for pack, flip in flips.items():
                for h in flip.evicted:
                    store.objects.cache.discard(h)
                cache.dropped(pack, flip)
        cache.passes += 1
        await store.sync()
        partly = [p for p, f in flips.items() if f.kept]
        for pack in partly:
            c = await store.in_thread(store.copy_packs, [pack])
            async with fs.lock:
                moved = store.commit_moves(c)
            await store.sync()
            await store.in_thread(store.retire_packs, c, moved)
            cache.packs_repacked += 1
        await store.in_thread(store.condemn_packs, victims)
        swept = await store.in_thread(store.sweep_packs)
        log.debug("remote cache: evicted %d packs (%d kept delta bases), %d packs deleted, %d waiting",
                  len(victims), sum(f.kept for f in flips.values()), swept["packs_deleted"], swept["packs_waiting"])
