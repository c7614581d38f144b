"""Background loading of chunks into the cache (for readahead and learned prefetch).

Requests queue up on the trio thread; WORKERS trio tasks take BATCH of them at a time and run
the KV reads and zstd decoding in `trio.to_thread` (RocksDB reads and zstd
release the GIL), so loads overlap each other, disk waits and the FUSE request loop.  Results
are inserted into the cache back on the trio thread.  A job is a chunk hash, or a callable
that resolves a file's chunk hashes in the worker thread (pure KV reads).  Memory is bounded:
at most QUEUE_MAX queued jobs (the oldest are dropped: they are speculative) and
WORKERS x BATCH chunks in flight.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Awaitable, Callable, Iterable, Union

import trio

from cowfs import faults
from cowfs.chunks import codec
from cowfs.chunks.objects import ObjectStore

log = logging.getLogger(__name__)

WORKERS = 4
BATCH = 4
QUEUE_MAX = 4096
READAHEAD, LEARNED = 0, 1

Job = Union[bytes, Callable[[], list[bytes]]]


class Fetcher:
    def __init__(self, objects: ObjectStore,
                 in_thread: Callable[..., Awaitable[list[tuple[bytes, bytes, int]]]]) -> None:
        """in_thread: how loads run in worker threads (cowfs.store.Store.in_thread: database
        users are counted, so that a reopen never happens under one)."""
        self.objects = objects
        self._in_thread = in_thread
        self.cache = objects.cache
        self._queue: deque[tuple[Job, int]] = deque()
        self._pending: set[bytes] = set()
        self._event = trio.Event()

    def want(self, jobs: Iterable[Job], source: int) -> None:
        """Queue chunk hashes (skipping cached or queued ones) or file resolvers."""
        added = False
        for job in jobs:
            if isinstance(job, bytes):
                if job in self._pending or self.cache.cached(job):
                    continue
                self._pending.add(job)
            if len(self._queue) >= QUEUE_MAX:
                old, _ = self._queue.popleft()
                if isinstance(old, bytes):
                    self._pending.discard(old)
            self._queue.append((job, source))
            added = True
        if added:
            ev, self._event = self._event, trio.Event()
            ev.set()

    def _load(self, jobs: list[tuple[Job, int]]) -> list[tuple[bytes, bytes, int]]:
        """Worker thread: resolve and load; skip what is cached, freed or damaged."""
        faults.point("prefetch_load")
        out = []
        for job, source in jobs:
            try:
                hashes = [job] if isinstance(job, bytes) else job()
                for h in hashes:
                    if not self.cache.cached(h):
                        out.append((h, self.objects.load(h, fetch=False), source))
            except codec.CorruptObject as exc:  # freed since it was queued, damaged, or remote
                log.debug("prefetch skipped: %s", exc)
        return out

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            while not self._queue:
                await self._event.wait()
            jobs = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            try:
                loaded = await self._in_thread(self._load, jobs)
            finally:
                for job, _ in jobs:
                    if isinstance(job, bytes):
                        self._pending.discard(job)
            for h, data, source in loaded:
                self.cache.put_prefetched(h, data, source)
