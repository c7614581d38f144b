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


class Conditions:
    """Tasks that sleep until a condition holds, looked at by whoever changes what it reads,
    from any thread (a commit: `Store.commits`): a background task with nothing to do then
    costs no wake-up at all, where a poll woke it several times a second."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], trio.Event, trio.lowlevel.TrioToken]] = []

    async def until(self, ready: Callable[[], bool]) -> None:
        """Return once ready() holds (at once if it does now).  ready is called on the thread
        that changed something: it must be cheap and safe there (reads of ints)."""
        if ready():
            return
        w = (ready, trio.Event(), trio.lowlevel.current_trio_token())
        self._waiting.append(w)
        try:
            await w[1].wait()
        finally:
            self._waiting.remove(w)

    def changed(self) -> None:
        """Something the waiting conditions read may have changed: wake those that hold now
        (through the trio token, so any thread may call this)."""
        for ready, event, token in tuple(self._waiting):  # a copy: the loop may add or remove meanwhile
            if not event.is_set() and ready():
                try:
                    token.run_sync_soon(event.set)
                except trio.RunFinishedError:  # a commit in a thread as the loop ended: no one waits
                    pass
