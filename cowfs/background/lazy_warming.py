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
from typing import TYPE_CHECKING, Any

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
