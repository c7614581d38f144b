"""When the mount is quiet, for the work beside requests that paces itself by it: the dedup
worker (and the sharer, through it) and the clone measurer's walk.  Their Python competes
with the request handlers for the GIL and the CPU, so while requests come they take at most
BUSY_SHARE of wall time, or wait."""
from __future__ import annotations

import time
from typing import Callable

BUSY_SHARE = 0.05  # share of wall time background work may take while the mount is busy ...
QUIET_AFTER = 0.5  # ... i.e. served a foreground request within this many seconds


class Quiet:
    """Called: whether no foreground request came for QUIET_AFTER seconds, judged by
    activity, a count that grows with every one (safe to read from any thread)."""

    def __init__(self, activity: Callable[[], int]) -> None:
        self.activity = activity
        self.seen = activity()
        self.active_at = 0.0

    def mark(self) -> None:
        """Count a request now (the mount, whose clients start right after it: the next
        QUIET_AFTER seconds are not quiet)."""
        self.active_at = time.monotonic()

    def __call__(self) -> bool:
        n, now = self.activity(), time.monotonic()
        if n != self.seen:
            self.seen, self.active_at = n, now
        return now - self.active_at >= QUIET_AFTER

    def share(self, quiet_share: float) -> float:
        """The share of wall time that work allowed quiet_share on a quiet mount may take now."""
        return quiet_share if self() else min(quiet_share, BUSY_SHARE)
