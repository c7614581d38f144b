"""A lazy mount's cold start fetched ahead of its workload (issue 23).

The store a snapshot was pushed from had learned what its mounts read first
(cowfs.cache.learned: the model's files in its cold-start directories, with the chunks read);
the push sends that as chunk ids in first-read order (`warm/<id>`, cowfs.fleet.objects), the
lazy build keeps them in the store's lazy.json, and this task fetches them in that order
right after the mount is ready, before any read asks.  Through the read path's own fetch
(`LazyReads.fetch_ahead`: the same RemoteFetcher, the same commit that turns F objects into
local ones), a batch at a time in a worker thread, so reads keep being served; a read of a
chunk in the batch being fetched waits for it rather than fetching it twice.

Bounded: at most BUDGET_BYTES of chunk content and BUDGET_GETS ranged GETs (the fetcher's
count, reads' GETs meanwhile included); chunks already local are skipped without a GET.  It
stops when the mount ends (the daemon cancels it before its last flush), and at the first
failure of the remote with one log line: reads then fetch what they need themselves.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import trio

from cowfs import faults
from cowfs.chunks import codec

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

BATCH_BYTES = 2 << 20      # chunk content per fetch: what a read may wait for if it wants one of them
BUDGET_BYTES = 512 << 20   # chunk content one mount's warming fetches at most
BUDGET_GETS = 2048         # ranged GETs it lets the fetcher make at most


class LazyWarming:
    def __init__(self, fs: "Filesystem", chunks: list[bytes], budget_bytes: int = BUDGET_BYTES,
                 budget_gets: int = BUDGET_GETS) -> None:
        self.fs = fs
        self.chunks = chunks
        self.budget_bytes = budget_bytes
        self.budget_gets = budget_gets
        self.state = "waiting" if chunks else "none"
        self.fetched = 0          # chunks this task fetched
        self.bytes = 0            # their raw content
        self.gets = 0             # the fetcher's GETs while it ran
        self.skipped = 0          # local already (a read fetched them first, or the store had them)
        self.seconds = 0.0
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        """The mount ends: no more fetching (a fetch in its thread finishes, nothing is committed after)."""
        self._scope.cancel()
        if self.state == "waiting":
            self.state = "stopped"

    async def run(self) -> None:
        fetcher = self.fs.store.objects.fetcher
        if fetcher is None or not self.chunks:
            return
        self.state = "running"
        t0 = time.monotonic()
        try:
            with self._scope:
                await self._warm(fetcher)
        except (codec.CorruptObject, OSError) as exc:   # the remote down, a damaged record: reads fetch alone
            self.state = "failed"
            log.warning("lazy warming stopped after %d chunks: %s", self.fetched, exc)
        finally:
            self.seconds = time.monotonic() - t0
            if self.state == "running":
                self.state = "stopped"      # cancelled: the mount ends

    async def _warm(self, fetcher: Any) -> None:
        objects = self.fs.store.objects
        i = 0
        while i < len(self.chunks):
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            while i < len(self.chunks) and size < BATCH_BYTES:
                h = self.chunks[i]
                i += 1
                raw = objects.remote_record(h)
                if raw is None:
                    self.skipped += 1
                    continue
                batch.append((h, raw))
                size += codec.chunk_sizes(raw)[0]
            if not batch:
                continue
            faults.point("lazy_warming")
            if self.bytes + size > self.budget_bytes or self.gets >= self.budget_gets:
                self.state = "budget"
                log.info("lazy warming stopped at its budget: %d chunks (%d bytes) in %d GETs, %d left",
                         self.fetched, self.bytes, self.gets, len(self.chunks) - i + len(batch))
                return
            gets0 = fetcher.gets
            try:
                mine = await self.fs.lazy.fetch_ahead(batch)
            finally:
                self.gets += fetcher.gets - gets0
            self.fetched += len(mine)
            self.bytes += sum(codec.chunk_sizes(raw)[0] for _h, raw in mine)
            self.skipped += len(batch) - len(mine)
        self.state = "done"
        log.info("lazy warming done: %d chunks (%d bytes) fetched ahead in %d GETs; %d already local",
                 self.fetched, self.bytes, self.gets, self.skipped)

    def figures(self) -> dict[str, Any]:
        return {"state": self.state, "chunks": len(self.chunks), "fetched": self.fetched, "bytes": self.bytes,
                "gets": self.gets, "skipped": self.skipped, "seconds": round(self.seconds, 3)}


class LazyPrefetch:
    """The learned model's predictions fetched ahead on a lazy mount (issue 23): on an open,
    cowfs.core.prefetch hands the files the model predicts next (`want`: jobs that resolve a
    file's recorded chunks to their ids, pure KV reads) here, since the prefetch threads never
    fetch from the remote (`ObjectStore.load(fetch=False)`).  Queued jobs are resolved in a
    worker thread together, and those chunks still F objects go through `LazyReads.fetch_ahead`
    (a read's fetch: one ranged GET per run of neighbouring blobs, the same in-flight marks and
    commit), at most BATCH_BYTES of content at a time.  Speculative: a queue that is full drops
    the new predictions, and a remote that fails costs the batch (one log line, then one per
    minute), never a read.  A lazy store's model is seeded with the pushing host's at its build
    (cowfs.fleet.model), so the first opens already predict."""

    QUEUE = 256       # files waiting to be fetched ahead; more are dropped

    def __init__(self, fs: "Filesystem", model_error: str | None = None) -> None:
        self.fs = fs
        self.model_error = model_error    # why the build could not seed the pushed model (lazy.json)
        self._scope = trio.CancelScope()
        self._send, self._recv = trio.open_memory_channel(self.QUEUE)   # of jobs
        self.files = self.dropped = self.fetched = self.bytes = self.gets = self.skipped = self.failures = 0
        self._logged = 0.0

    def want(self, jobs: list[Callable[[], list[bytes]]]) -> None:
        """Files predicted by an open (on the loop thread, no checkpoint)."""
        for job in jobs:
            try:
                self._send.send_nowait(job)
                self.files += 1
            except trio.WouldBlock:
                self.dropped += 1

    def stop(self) -> None:
        """The mount ends: nothing is fetched or committed after its last flush."""
        self._scope.cancel()

    async def run(self) -> None:
        if self.model_error:
            log.warning("the prefetch model pushed with the snapshot is not used (%s): this mount's model "
                        "learns afresh", self.model_error)
        fetcher = self.fs.store.objects.fetcher
        if fetcher is not None:
            with self._scope:
                await self._serve(fetcher)

    async def _serve(self, fetcher: Any) -> None:
        objects = self.fs.store.objects
        async for job in self._recv:
            jobs = [job]
            while len(jobs) < self.QUEUE:
                try:
                    jobs.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            hashes = await self.fs.store.in_thread(lambda: [h for j in jobs for h in j()])
            batch: list[tuple[bytes, bytes]] = []
            seen: set[bytes] = set()
            for h in hashes:
                raw = None if h in seen else objects.remote_record(h)
                seen.add(h)
                if raw is None:
                    self.skipped += 1
                    continue
                batch.append((h, raw))
            i = 0
            while i < len(batch):
                part, size = [], 0
                while i < len(batch) and size < BATCH_BYTES:
                    part.append(batch[i])
                    size += codec.chunk_sizes(batch[i][1])[0]
                    i += 1
                await self._fetch(fetcher, part)

    async def _fetch(self, fetcher: Any, part: list[tuple[bytes, bytes]]) -> None:
        gets0 = fetcher.gets
        try:
            mine = await self.fs.lazy.fetch_ahead(part)
        except (codec.CorruptObject, OSError) as exc:   # the remote down, a damaged record: reads fetch alone
            self.failures += 1
            if time.monotonic() - self._logged > 60:
                self._logged = time.monotonic()
                log.warning("lazy prefetch of %d predicted chunks failed: %s", len(part), exc)
            return
        finally:
            self.gets += fetcher.gets - gets0
        self.fetched += len(mine)
        self.bytes += sum(codec.chunk_sizes(raw)[0] for _h, raw in mine)
        self.skipped += len(part) - len(mine)

    def figures(self) -> dict[str, Any]:
        return {"files": self.files, "dropped": self.dropped, "fetched": self.fetched, "bytes": self.bytes,
                "gets": self.gets, "skipped": self.skipped, "failures": self.failures}
