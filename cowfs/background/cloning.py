"""The clone measurer: the usage a directory clone adds, counted after the clone.

`clone` of a directory is O(1) (cowfs.commands.clone): it does not read the tree it copies,
so, unless it had to walk it anyway (an unprivileged caller, a branch with a quota), the
usage records of the views that see the copies leave them out (`Clone.measured` False).
This task walks each such clone's frozen original in a worker thread (the event loop never
waits for it; the original cannot change), then, under the lock, adds what it found to the
usage record of every layer descending from the clone's and to the views in memory, and
marks the clone measured, in one commit.  Changes made to the copies meanwhile were counted
as they happened (a record may fall below zero for a while: the counts are signed), so the
sum is exact once the measure is in.  It runs at start for clones left unmeasured by a
previous daemon, and whenever a clone asks for it.

The walk is paced (`Pace`): a million-entry tree is tens of seconds of Python holding the
GIL, and a request handler that wants the GIL back waits for the interpreter's switch
interval (5 ms) at each of its hand-offs between threads.  Clones taken back to back of a
1,000,000-entry tree, each measured behind the next, took 20-64 ms end to end (their own
work: under 1 ms to 19 ms); the walk now sleeps every PACE_STEPS entries, long enough to take
at most QUIET_SHARE of wall time, and quiet.BUSY_SHARE while the mount serves requests.  When the
daemon stops, a walk in progress is given up (`stopping`): the daemon's exit would wait for
its thread; the clone stays unmeasured, for the next daemon.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import trio

from cowfs.background.quiet import Quiet
from cowfs.core.filesystem import Filesystem
from cowfs.kv.base import Batch
from cowfs.meta.shared import Clone

log = logging.getLogger(__name__)


QUIET_SHARE = 0.5  # of wall time the walk may take while the mount is quiet (busy: quiet.BUSY_SHARE)


class Pace:
    """Called by the measuring walk in its thread every PACE_STEPS entries: sleeps (without
    the GIL) for as long as the walk ran since the last call, times (1 - share) / share."""

    def __init__(self, activity: Callable[[], int]) -> None:
        self.quiet = Quiet(activity)
        self.since = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        share = self.quiet.share(QUIET_SHARE)
        time.sleep((now - self.since) * (1 - share) / share)
        self.since = time.monotonic()


class Measurer:
    def __init__(self, fs: Filesystem, activity: Callable[[], int] = lambda: 0) -> None:
        """activity: a count that grows with every foreground (FUSE) request."""
        self.fs = fs
        self.activity = activity
        # Set when the daemon stops: a walk in progress is given up (a thread cannot be
        # cancelled, and the daemon's exit would wait for it); the next daemon measures.
        self.stopping = False
        self.wanted = trio.Event()
        self.wanted.set()  # clones a previous daemon left unmeasured
        self.measured = 0

    def wake(self) -> None:
        self.wanted.set()

    def figures(self) -> dict[str, int]:
        pending = sum(1 for c in self.fs.store.meta.shared.clones.values() if not c.measured)
        return {"measured": self.measured, "unmeasured": pending}

    async def run(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted = trio.Event()
            await self.measure_all()

    async def measure_all(self) -> None:
        for c in [c for c in self.fs.store.meta.shared.clones.values() if not c.measured]:
            if self.stopping:
                return
            await self.measure(c)

    async def measure(self, c: Clone) -> None:
        fs = self.fs
        store = fs.store
        shared = store.meta.shared
        if c.layer not in store.catalog.parents:
            return  # its layer is gone: garbage collection removes it
        usage = await store.in_thread(store.measure_clone, c, None, lambda: self.stopping, Pace(self.activity))
        if usage is None:
            return  # given up: the daemon stops
        async with fs.exclusive():
            if shared.clones.get(c.top_y) is not c:
                return  # removed meanwhile (garbage collection)
            done = dataclasses.replace(c)
            batch = Batch()
            layers = set(store.clone_measured(done, usage, batch))
            store.commit(batch)
            for view in fs.views.all():
                if view.lv.top in layers:
                    view.usage_bytes += usage.logical
                    view.usage_inodes += usage.inodes
                    view.alloc_bytes += usage.allocated
            shared.clones_committed(added=[done])
        self.measured += 1
        log.info("clone of inode %d measured: %d inodes, %d bytes", c.top_x, usage.inodes, usage.logical)
