"""Thread work that runs Python code, i.e. needs the GIL while it runs.

The request loop (cowfs.fuse.loop) may spin between FUSE requests, holding the GIL; it does
not while any job started here is in flight, so the job gets the GIL whenever the loop waits.
Work that mostly waits in C with the GIL released (a WAL fsync, the kernel calls on our own
mount) does not need this and uses `trio.to_thread.run_sync` directly.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import trio

T = TypeVar("T")
busy = 0  # jobs in flight; read by the request loop, changed only on the trio thread


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    global busy
    busy += 1
    try:
        return await trio.to_thread.run_sync(fn, *args)
    finally:
        busy -= 1
