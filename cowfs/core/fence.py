"""Branches made read-only while their daemon may not write them: the hold of the remote
branch a branch follows (cowfs.fleet.holds) lapsed or was taken by another host (issue 23,
docs/architecture.md "A mount whose hold is lost turns read-only").

A branch's `Fence` says until when (the event loop's monotonic clock, `time.monotonic`) its
writes are accepted and, past that, why not.  The holder keeps `until` ahead while its lease
is renewed; a write-type request compares it with the clock itself, so the branch turns
read-only at that instant even if no thread noticed the lapse (a daemon stopped, its threads
late).  Only requests that change a branch's tree are refused: the flush of data acknowledged
before, the removal of orphans, snapshots and new branches made from it go on.
"""
from __future__ import annotations

import errno
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cowfs.errors import FSError

if TYPE_CHECKING:
    from cowfs.core.view import View


@dataclass
class Fence:
    """One branch's limit: the earliest of its parts' (one per remote branch it holds)."""
    until: float = math.inf
    why: str = ""
    parts: dict[Any, tuple[float, str]] = field(default_factory=dict)


class Fences:
    """The fences of the branches a daemon serves; set from the holds' threads, read on the loop
    (one float compared per write-type request)."""

    def __init__(self) -> None:
        self._by_branch: dict[str, Fence] = {}
        self._lock = threading.Lock()

    def limit(self, branch: str, part: Any, until: float, why: str) -> None:
        """Writes to branch are refused from monotonic time `until` on (math.inf: no limit from
        this part), with why as the reason."""
        with self._lock:
            f = self._by_branch.setdefault(branch, Fence())
            f.parts[part] = (until, why)
            self._settle(f)

    def lift(self, branch: str, part: Any | None = None) -> None:
        """Drop one part's limit (None: every part, the branch no longer served)."""
        with self._lock:
            f = self._by_branch.get(branch)
            if f is None:
                return
            if part is None:
                f.parts.clear()
            else:
                f.parts.pop(part, None)
            self._settle(f)
            if not f.parts:
                del self._by_branch[branch]

    @staticmethod
    def _settle(f: Fence) -> None:
        until, why = min(f.parts.values(), default=(math.inf, ""), key=lambda p: p[0])
        f.why = why
        f.until = until

    def _closed(self, view: "View") -> Fence | None:
        """The fence of view if it is a branch whose writes are refused now (one read of it:
        a holds thread may lift it meanwhile)."""
        f = self._by_branch.get(view.name)
        return f if f is not None and view.kind != "snapshot" and time.monotonic() >= f.until else None

    def closed(self, view: "View") -> bool:
        return self._closed(view) is not None

    def check(self, view: "View") -> None:
        """EROFS if view is a branch whose writes are refused now."""
        f = self._closed(view)
        if f is not None:
            raise FSError(errno.EROFS, f.why)

    def figures(self, branch: str) -> dict[str, Any]:
        """Whether branch is read-only now, since when (wall clock) and why."""
        f = self._by_branch.get(branch)
        now = time.monotonic()
        if f is None or now < f.until:
            return {"read_only": False}
        return {"read_only": True, "since": round(time.time() - (now - f.until), 3), "why": f.why}
