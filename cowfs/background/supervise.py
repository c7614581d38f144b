"""Supervision of the daemon's background tasks.

Every background task (flusher, garbage collection, dedup worker, sharer, prefetch, model
saver, warming, ...) runs in the nursery that also runs pyfuse3's request loop: an exception
that escaped one would cancel them all and end the FUSE session, i.e. unmount every branch
the daemon serves.  So each runs under `Supervisor`: an unexpected error is logged with its
traceback and counted (per task, in the stats); then the task starts again after a back-off
(BACKOFF_FIRST seconds, doubled at each failure up to BACKOFF_MAX, back to the first after
STEADY seconds without one), or, for speculative work (prefetch, warming), stops for the
rest of the mount.  The tasks keep handling the errors they expect (a full disk, a
damaged object) themselves; this is for the rest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
STEADY = 60.0


@dataclass
class Task:
    """One supervised task and what happened to it."""

    name: str
    speculative: bool
    running: bool = False
    failures: int = 0
    restarts: int = 0
    stopped: bool = False  # speculative, and failed: off for the rest of the mount
    last_error: str = ""

    def figures(self, detail: bool) -> dict[str, object]:
        out: dict[str, object] = {"running": self.running, "failures": self.failures, "restarts": self.restarts,
                                  "stopped": self.stopped}
        if detail:  # error texts may name host paths: not for the sandbox's .cowfs/stats
            out["last_error"] = self.last_error
        return out


class _Once:
    """A task status that passes on only the first `started` (a restarted server calls it again)."""

    def __init__(self, status: "trio.TaskStatus[None]") -> None:
        self.status = status
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self.status.started(value)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class Supervisor:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def start(self, nursery: trio.Nursery, name: str, fn: Callable[[], Awaitable[object]],
              speculative: bool = False, on_stop: Callable[[], None] | None = None) -> None:
        """Run fn() in nursery under supervision; on_stop: called when speculative work stops."""
        task = self.tasks[name] = Task(name, speculative)
        nursery.start_soon(self._run, task, fn, on_stop, None, name=f"supervised {name}")

    async def serve(self, nursery: trio.Nursery, name: str, fn: Callable[..., Awaitable[object]]) -> None:
        """As `nursery.start(fn)` (fn(task_status=...) says when it serves), then supervised;
        a failure before it first served is the caller's (the daemon cannot start)."""
        task = self.tasks[name] = Task(name, False)
        await nursery.start(self._run_started, task, fn, name=f"supervised {name}")

    async def _run_started(self, task: Task, fn: Callable[..., Awaitable[object]],
                           task_status: "trio.TaskStatus[None]" = trio.TASK_STATUS_IGNORED) -> None:
        await self._run(task, fn, None, _Once(task_status))

    async def _run(self, task: Task, fn: Callable[..., Awaitable[object]], on_stop: Callable[[], None] | None,
                   status: "_Once | None") -> None:
        delay = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            task.running = True
            try:
                await (fn() if status is None else fn(task_status=status))
                return  # done (a one-shot task)
            except Exception as exc:  # noqa: BLE001 - cancellation (a BaseException) passes
                if status is not None and not status.done:
                    raise
                task.failures += 1
                task.last_error = _describe(exc)
                log.error("background task %s failed (failure %d)", task.name, task.failures, exc_info=exc)
            finally:
                task.running = False
            if task.speculative:
                task.stopped = True
                log.warning("background task %s stopped for the rest of this mount (speculative work)", task.name)
                if on_stop is not None:
                    on_stop()
                return
            if time.monotonic() - started >= STEADY:
                delay = BACKOFF_FIRST
            log.info("background task %s restarts in %.1f s", task.name, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            task.restarts += 1

    def figures(self, detail: bool = True) -> dict[str, dict[str, object]]:
        return {name: t.figures(detail) for name, t in self.tasks.items()}
