"""How the daemon waits for the next FUSE request: poll, spin briefly, and only then park.

pyfuse3's session loop calls `trio.lowlevel.wait_readable(fuse_fd)` before every request.
That always parks the task in trio's epoll loop, even when the next request is already
queued: epoll registration, a pass of trio's scheduler and, when the queue is empty, a
sleep and a cross-CPU wake-up.  Measured on this machine kind, that is about 40 µs of
daemon CPU per request (see docs/benchmarks.md), half of what a trivial request costs.

A client that works through a tree (tar, git, cp -r, rm -r) sends its next request a few
tens of µs after our reply.  So before parking, `Waiter.wait_readable` polls the fd once
and, while spinning has been paying off, keeps polling it for up to `spin_us`; only then
does it park in trio as before.  pyfuse3 reaches trio through its module global `trio`
(looked up at every call); `install` gives it a stand-in whose `lowlevel.wait_readable` is
ours and whose every other attribute is trio's own.  If a later pyfuse3 stops calling
through that global, requests are served exactly as before (the figures then show no
polls; tests/test_fuse_loop.py checks that they do).

Concurrency invariants:
- The fast paths return without a trio checkpoint, so the other trio tasks (thread
  completions, timers, the background worker's commit) run only when the session loop
  yields or a handler awaits.  A wait that comes YIELD_NS or more after the last yield
  therefore passes through trio's scheduler first (`trio.lowlevel.checkpoint`: the other
  runnable tasks run, and its epoll_wait does not block, this task being runnable), however
  fast requests arrive.  It does not park: after a request that took longer than YIELD_NS
  (a cold read's disk wait) the next one is usually queued already or comes within the
  spin, and parking made each of them a sleep and a wake-up (in cold random reads, half
  to four fifths of the requests parked: docs/benchmarks.md, issue 24, h65).
- A spin blocks the event loop for at most `spin_us`, and only while at least 4 of 5
  recent waits ended within `spin_us` (a `score` kept per wait), so a mount whose
  requests come slowly stops spinning after a few waits and costs nothing.
- A spinning loop holds the GIL but for the instants of its poll(2) calls, so a thread
  running Python code (prefetch loads, the dedup planner, path resolution for warming,
  large flush encodes) would get it only when CPython forces a switch, every 5 ms.  Such
  work is started through `cowfs.threads.run_in_thread`, and while any of it runs the loop does not
  spin: it parks in epoll_wait, with the GIL released, as pyfuse3 alone would.  (The cold
  replay of bench_cache lost its prefetch speed-up before this: chunk prefetch alone went
  from 0.97x to 0.89x of no prefetch.)

The read lock.  pyfuse3 runs up to max_tasks worker tasks; one at a time holds its read lock
(a `trio.Lock` it makes through the same global) while it waits for the fd, and after each
read it starts another worker if none is waiting.  With trio's Lock every request then costs
a pass of the scheduler: an uncontended acquire is a checkpoint, and once a second worker
waits on the lock, the two hand the lock to each other at every request (the worker that
has just answered parks, the other is woken).  `ReadLock` is the stand-in: a free lock is
taken without a checkpoint, and a release wakes no one, so the worker that answered takes
it straight back.  A parked worker is woken when a trio task step ends with the lock free
(`_WakeWaiting`, a trio instrument): the worker that released it has then given way inside
its handler (a thread, the filesystem lock, a sync) or is gone, and the woken one takes the
lock and serves the next requests meanwhile, as before.  A step that ends with the lock
held is the loop parking in epoll with it: no one is woken.  In an untar of the Django tree
the daemon's CPU went from 5.2-5.3 s with trio's Lock to 4.2 s with a lock whose release
woke the spare worker; that worker then still ran and parked again at every real wait of
the loop (about one request in three in a burst of GETXATTRs), ~6 µs of CPU each, which
waking it only from the instrument saves (docs/benchmarks.md, issue 24).
"""
from __future__ import annotations

import select
import time
from typing import Any

import pyfuse3
import trio

from cowfs import threads

YIELD_NS = 250_000  # pass through trio's scheduler at least this often
SCORE_MAX = 16  # a wait that ended within spin_us: +1 (up to this) ...
SCORE_MISS = 4  # ... a spin that found nothing: -4; spin while the score is above 0


class Waiter:
    """The stand-in for `trio.lowlevel.wait_readable` on the FUSE fd, and its figures."""

    def __init__(self, spin_us: int) -> None:
        self.spin_ns = spin_us * 1000
        self._fd = -1
        self._poll = select.poll()
        self._yielded_at = 0  # perf_counter_ns of the last return from trio (a real wait or a checkpoint)
        self._score = SCORE_MAX
        self.ready = 0  # the next request was already queued
        self.spun = 0  # ... arrived while spinning
        self.parked = 0  # waited in trio
        self.yielded = 0  # passed through trio's scheduler without waiting (every YIELD_NS)
        self.missed = 0  # spins that found nothing
        self.spin_miss_ns = 0  # time spent in them
        self.locks: list[ReadLock] = []

    def new_lock(self) -> ReadLock:
        self.locks.append(ReadLock())
        return self.locks[-1]

    def figures(self) -> dict[str, Any]:
        return {"spin_us": self.spin_ns // 1000, "ready": self.ready, "spun": self.spun,
                "parked": self.parked, "yielded": self.yielded, "spin_misses": self.missed, "spin_missed_ms": round(self.spin_miss_ns / 1e6, 1),
                "reader_parks": sum(lock.parks for lock in self.locks)}

    def idle(self) -> bool:
        """Whether no request is queued on the FUSE fd (one poll(2)): then a WAL sync may
        block the loop (`Store.sync`), as there is nothing for it to serve meanwhile."""
        return self._fd >= 0 and not self._poll.poll(0)

    async def wait_readable(self, fd: int) -> None:
        if fd != self._fd:
            if self._fd >= 0:
                self._poll.unregister(self._fd)
            self._poll.register(fd, select.POLLIN)
            self._fd = fd
        poll = self._poll.poll
        t0 = time.perf_counter_ns()
        if t0 - self._yielded_at >= YIELD_NS:
            # Let the other tasks run without going to sleep: a pass of trio's scheduler
            # (its epoll_wait does not block while this task is runnable).
            self.yielded += 1
            await trio.lowlevel.checkpoint()
            self._yielded_at = t0 = time.perf_counter_ns()
        if poll(0):
            self.ready += 1
            return
        if self._score > 0 and self.spin_ns and not threads.busy:
            end = t0 + self.spin_ns
            now = t0
            while now < end:
                if poll(0):
                    self.spun += 1
                    self._score = min(self._score + 1, SCORE_MAX)
                    return
                now = time.perf_counter_ns()
            self.missed += 1
            self.spin_miss_ns += now - t0
            self._score -= SCORE_MISS
        self.parked += 1
        await trio.lowlevel.wait_readable(fd)
        self._yielded_at = end = time.perf_counter_ns()
        if end - t0 <= self.spin_ns:
            # The request came within the spin window (the wake-up included): spinning
            # would have caught it.
            self._score = min(self._score + 1, SCORE_MAX)


class ReadLock:
    """pyfuse3's read lock: no checkpoint when free, no hand-off on release (see above)."""

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self.parks = 0  # a worker found the lock taken and parked
        trio.lowlevel.add_instrument(_WakeWaiting(self))

    async def __aenter__(self) -> None:
        while self._held:
            self.parks += 1
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False


class _WakeWaiting(trio.abc.Instrument):
    """Wakes a worker parked on the read lock when a task step ends with the lock free: the
    task that released it awaits in a handler, or has ended (see above).  Each release
    happens inside a task step, so a free lock with waiters is always seen by this hook."""

    def __init__(self, lock: ReadLock) -> None:
        self.lock = lock

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        lock = self.lock
        if not lock._held and lock._lot:
            lock._lot.unpark()


class _Lowlevel:
    def __init__(self, waiter: Waiter) -> None:
        self.wait_readable = waiter.wait_readable

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _Trio:
    def __init__(self, waiter: Waiter) -> None:
        self.lowlevel = _Lowlevel(waiter)
        self.Lock = waiter.new_lock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(spin_us: int) -> Waiter:
    """Route pyfuse3's waits for the FUSE fd through a Waiter (for this process's one session)."""
    waiter = Waiter(spin_us)
    pyfuse3.trio = _Trio(waiter)  # type: ignore[attr-defined]
    return waiter
