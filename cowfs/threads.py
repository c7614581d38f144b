"""Thread work that runs Python code, i.e. needs the GIL while it runs.

The request loop (cowfs.fuse.loop) may spin between FUSE requests, holding the GIL; it does
not while any job started here is in flight, so the job gets the GIL whenever the loop waits.
Work that mostly waits in C with the GIL released (a WAL fsync, the kernel calls on our own
mount) does not need this: it uses `trio.to_thread.run_sync` directly, or `run_in_c_thread`.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # trio's own dependency: what start_thread_soon hands back

T = TypeVar("T")
busy = 0  # jobs in flight; read by the request loop, changed only on the trio thread


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    global busy
    busy += 1
    try:
        return await trio.to_thread.run_sync(fn, *args)
    finally:
        busy -= 1


async def run_in_c_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread, for work that waits in C with the GIL released and needs
    nothing of trio inside (the WAL fsync of every fsync(2), a compaction): trio's thread
    cache and a wake-up of this task, without `trio.to_thread.run_sync`'s capacity limiter,
    context copy and cancellation bookkeeping.  ~40 µs of daemon CPU per call instead of
    ~65 on this machine kind (docs/benchmarks.md, issue 24).  Not cancellable, as run_sync
    by default: the caller always waits for fn to return (or raise)."""
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: "outcome.Outcome[T]") -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    return await trio.lowlevel.wait_task_rescheduled(lambda _raise_cancel: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]
