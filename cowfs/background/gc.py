"""Garbage collection: metadata versions no live view can see (cowfs.meta.gc decides which),
their references to data, and the pack bytes nothing points at any more.

The daemon runs a pass after each rollback and delete (`Filesystem.schedule_gc`); `cowfs gc`
runs one, sweeps the packs and compacts the database.  A pass plans under the lock and
commits chunk by chunk, taking the lock for each (docs/architecture.md, "Concurrency
invariants"); it never overlaps a pass of the sharer (`Filesystem.maintenance`).
"""
from __future__ import annotations

import logging
from typing import Callable

import trio

from cowfs import faults
from cowfs.core.filesystem import Filesystem
from cowfs.meta import gc

log = logging.getLogger(__name__)

SETTLE = 0.5  # seconds a burst of deletes gets to settle into one pass


async def run_gc(fs: Filesystem, progress: Callable[[int], None] | None = None) -> int:
    """One full garbage-collection pass, in chunks, yielding to other work between them;
    progress(versions removed so far) after each chunk."""
    removed = 0
    async with fs.maintenance:
        async with fs.exclusive():
            tops = fs.live_tops()
            dead, batch, txn = gc.dead_ranges(fs.store.meta, fs.store.catalog, tops)
            if dead:
                fs.store.commit(batch, txn)
                fs.store.meta.shared.committed(removed=dead)
            chunks = list(gc.collect(fs.store.meta, fs.store.catalog, tops))
        for batch, txn, n in chunks:
            async with fs.lock:
                fs.store.commit(batch, txn)
            removed += n
            if progress is not None:
                progress(removed)
            await trio.sleep(0)
    return removed


async def sweep_packs(fs: Filesystem) -> int:
    """Give back pack space nothing points at; under the lock, so no flush appends meanwhile."""
    async with fs.lock:
        return await fs.store.in_thread(fs.store.sweep_packs)


async def collect_when_wanted(fs: Filesystem) -> None:
    """The daemon's collector: a pass whenever one is owed (`Filesystem.schedule_gc`)."""
    while True:
        await fs.gc_wanted.wait()
        fs.gc_wanted = trio.Event()
        await trio.sleep(SETTLE)
        try:
            faults.point("gc")
            n = await run_gc(fs)
        except Exception:
            fs.gc_wanted.set()  # the pass is still owed: the supervisor restarts us
            raise
        log.info("garbage collection removed %d metadata versions", n)
