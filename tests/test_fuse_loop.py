"""The FUSE request loop (cowfs.fuse.loop): a request that follows the last reply closely is
taken without parking in trio's event loop, the daemon's other tasks still run while a client
keeps the mount busy, and `-o spin_us=0` leaves pyfuse3's own wait in place."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import AsyncIterator

import trio
import trio.testing

from cowfs import threads
from cowfs.fuse.loop import YIELD_NS, ReadLock, Waiter
import mounting
from mounting import stats


def _burst(path, n: int) -> None:
    """n requests back to back: a GETXATTR of an absent name is never cached by the kernel."""
    for _ in range(n):
        try:
            os.getxattr(path, "user.absent")
        except OSError:
            pass


def _waiting(path) -> int:
    """Requests of path's FUSE connection not answered yet (fusectl's `waiting`)."""
    minor = mounting.mount_entry(path)["dev"].split(":")[1]
    with open(f"/sys/fs/fuse/connections/{minor}/waiting") as f:
        return int(f.read())


def test_requests_in_a_burst_are_taken_without_parking(cowfs_mount):
    """A request already queued when the loop asks for the next one is taken without parking
    in trio.  The burst is made to be queued whatever the scheduler does: 32 requests at
    once, sent while the daemon is stopped (SIGSTOP), so that when it continues the first
    wakes it and every other is there at its next wait.  (A lone client's burst of 3,000
    counted what the scheduler allowed: on a loaded machine the client is often off the CPU
    for longer than the spin, and at load 12 only 1,480-1,650 were taken fast, 123 with four
    clients beside four busy loops.)  Before the loop polled, none was."""
    f = cowfs_mount.path / "f"
    f.write_bytes(b"x")
    clients, rounds = 32, 20
    before = stats(cowfs_mount.path)["fuse_loop"]
    for _ in range(rounds):
        ts = [threading.Thread(target=_burst, args=(f, 1)) for _ in range(clients)]
        with mounting.stopped(cowfs_mount.pid):
            for t in ts:
                t.start()
            deadline = time.monotonic() + 30
            while _waiting(cowfs_mount.path) < clients and time.monotonic() < deadline:
                time.sleep(0.002)
        for t in ts:
            t.join()
    after = stats(cowfs_mount.path)["fuse_loop"]
    assert after["spin_us"] == 50
    fast = after["ready"] + after["spun"] - before["ready"] - before["spun"]
    assert fast >= rounds * (clients - 1), (before, after)
    # The loop parks in trio once the queue runs dry (each round here).
    assert after["parked"] > before["parked"]
    # pyfuse3's spare worker is not woken by the loop's own waits (it was at every request
    # with trio's Lock, which hands the read lock over at each release, then at every real
    # wait of the loop): only when a handler gives way, which a GETXATTR never does.
    assert after["reader_parks"] - before["reader_parks"] <= 20, (before, after)


def test_the_daemon_serves_other_work_while_a_client_keeps_it_busy(cowfs_mount):
    f = cowfs_mount.path / "f"
    f.write_bytes(b"x")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            _burst(f, 200)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.5)
        for i in range(3):
            t0 = time.monotonic()
            stats(cowfs_mount.path)  # the admin socket: a trio task of its own
            # fsync waits for a commit in a worker thread, whose completion trio delivers.
            with open(cowfs_mount.path / f"g{i}", "wb") as g:
                g.write(os.urandom(200_000))
                os.fsync(g.fileno())
            assert time.monotonic() - t0 < 5.0
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    s = stats(cowfs_mount.path)["fuse_loop"]
    assert s["ready"] + s["spun"] > 0 and s["parked"] > 0


async def test_read_lock_stays_with_the_worker_that_answered_until_it_waits():
    """The pattern of pyfuse3's workers: take the lock, wait for the fd, release, handle.  The
    spare worker gets the lock only when the holder really waits (here, in its handler)."""
    lock = ReadLock()
    log: list[str] = []

    async def worker(name: str, requests: int, handler_waits: bool) -> None:
        for _ in range(requests):
            async with lock:
                log.append(name)
            if handler_waits:
                await trio.sleep(0.01)

    with trio.testing.assert_no_checkpoints():
        async with lock:  # a free lock: no checkpoint
            pass
    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(worker, "spare", 1, False)
            await trio.sleep(0.01)  # the spare worker runs and parks on the lock
            assert log == [] and lock.parks == 1
        # Released: the worker that answered takes the lock back at once, as often as it
        # likes, while it does not checkpoint; the spare is not even woken.
        with trio.testing.assert_no_checkpoints():
            for _ in range(3):
                async with lock:
                    log.append("first")
        async with lock:  # the loop's real wait for the fd, lock held: the spare sleeps on
            await trio.sleep(0.01)
        assert lock.parks == 1
        await worker("first", 1, True)  # now the handler waits: the spare gets the lock
    assert log == ["first"] * 4 + ["spare"], log
    assert lock.parks == 1


def test_spin_off_serves_requests_through_pyfuse3s_wait(mount_factory):
    m = mount_factory(options=("spin_us=0",))
    f = m.path / "f"
    f.write_bytes(b"data")
    _burst(f, 200)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(5):
            os.pwrite(fd, b"y", i)
            os.fsync(fd)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"yyyyy"
    s = stats(m.path)
    assert s["fuse_loop"] == {"spin_us": 0}
    assert s["direct_syncs"] == 0  # no Waiter to say the loop is idle: every sync in a thread


def test_a_lone_fsync_syncs_on_the_loop_and_concurrent_ones_share_threaded_syncs(cowfs_mount):
    """Store.sync: with no other request queued, the WAL sync runs on the event loop (no
    hand-off to a thread and back); fsyncs from several threads at once still all return
    with their data, most of them through the threaded, shared syncs."""
    f = cowfs_mount.path / "f"
    f.write_bytes(b"\0" * 65536)
    before = stats(cowfs_mount.path)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(40):
            os.pwrite(fd, bytes([i + 1]) * 4096, (i % 16) * 4096)
            os.fsync(fd)
    finally:
        os.close(fd)
    after = stats(cowfs_mount.path)
    assert after["syncs_done"] - before["syncs_done"] >= 40, (before, after)
    # Nothing else runs on this mount: only a stats call or a timer's commit can be queued,
    # so nearly every sync found the loop idle.  Such a sync runs on the loop unless the one
    # before it was slow (a loaded disk: 2 to 11 of 40 under disk and CPU load 12-20):
    # counted as the code decided, not as the disk allowed.  (Without the loop's own syncs,
    # none of them counts.)
    decided = sum(after[k] - before[k] for k in ("direct_syncs", "syncs_after_slow"))
    assert decided >= 36, (before, after)

    def writer(k: int) -> None:
        fd = os.open(cowfs_mount.path / f"w{k}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(30):
                os.pwrite(fd, bytes([k + 1]) * 4096, i * 4096)
                os.fsync(fd)
        finally:
            os.close(fd)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(4):
        assert (cowfs_mount.path / f"w{k}").read_bytes() == bytes([k + 1]) * (30 * 4096)


class _Other:
    """A task that only passes through trio's scheduler, counting its turns."""

    def __init__(self) -> None:
        self.turns = 0

    async def run(self) -> None:
        while True:
            self.turns += 1
            await trio.sleep(0)


@contextlib.asynccontextmanager
async def _readable_pipe_and_other_task() -> AsyncIterator[tuple[int, _Other]]:
    """The read end of a pipe that stays readable (a byte nobody reads), as /dev/fuse with
    requests queued, and another task running beside the block (cancelled at its end)."""
    r, w = os.pipe()
    other = _Other()
    try:
        os.write(w, b"x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other.run)
            yield r, other
            nursery.cancel_scope.cancel()
    finally:
        os.close(r)
        os.close(w)


async def test_a_fd_that_stays_readable_still_lets_other_tasks_run():
    """The invariant behind YIELD_NS, without a mount: however many requests are queued, the
    loop passes through trio's scheduler every YIELD_NS, so other tasks keep running.

    Counted in events, not in turns per wall-clock window: the loop can only yield while it
    runs, and on a loaded machine the process is off the CPU for whole time slices (at load
    7 on 2 cores, a 25 ms window held 28 to 44 turns of the other task instead of ~100)."""
    waiter = Waiter(spin_us=50)
    late: list[int] = []  # requests taken without a yield more than YIELD_NS after the last one
    async with _readable_pipe_and_other_task() as (r, other):
        last_wait = time.perf_counter_ns()
        with trio.fail_after(20):
            while waiter.yielded < 100:  # 100 yields, however long they take to come
                yielded = waiter.yielded + waiter.parked
                t = time.perf_counter_ns()
                await waiter.wait_readable(r)
                if waiter.yielded + waiter.parked > yielded:
                    last_wait = time.perf_counter_ns()
                elif t - last_wait >= YIELD_NS:
                    late.append(t - last_wait)
    assert not late, late[:5]
    assert waiter.parked <= 1  # the fd never runs dry: no sleep in epoll (but maybe the first) ...
    assert waiter.ready > 10 * waiter.yielded  # ... most requests are taken without a yield ...
    assert other.turns >= waiter.yielded - 1  # ... and at every yield the other task ran


async def test_a_request_that_comes_long_after_the_last_yield_is_taken_without_sleeping():
    """A request served for longer than YIELD_NS (a cold read's disk wait) is followed by a
    pass of trio's scheduler, not by a sleep in epoll: the next request, already queued or
    arriving within the spin, is taken at once (before: every such request slept and was
    woken, ~40 µs of CPU and a wake-up each; docs/benchmarks.md, issue 24, h65)."""
    waiter = Waiter(spin_us=50)
    async with _readable_pipe_and_other_task() as (r, other):
        await trio.sleep(0)
        ran = other.turns
        for _ in range(5):
            waiter._yielded_at = time.perf_counter_ns() - 2 * YIELD_NS  # as if after a long request
            await waiter.wait_readable(r)
        # trio runs a batch's tasks in either order: the other task's turn in a yield's
        # batch may come after this one resumed, so count it at the end.
        assert other.turns >= ran + 4
    assert waiter.parked == 0 and waiter.yielded == 5 and waiter.ready == 5


async def test_a_spin_that_finds_nothing_gives_up_and_stops_spinning():
    r, w = os.pipe()
    waiter = Waiter(spin_us=200)
    try:
        os.write(w, b"x")
        await waiter.wait_readable(r)  # the first wait yields, then finds the byte there
        os.read(r, 1)
        for _ in range(20):
            with trio.move_on_after(0.002):
                # As if the previous request had just been answered: within YIELD_NS.
                waiter._yielded_at = time.perf_counter_ns()
                await waiter.wait_readable(r)
    finally:
        os.close(r)
        os.close(w)
    # Each miss costs 4 points of a score of at most 16: 4 spins miss, then none is tried.
    # (Counted, not inferred from the time spent spinning: on a loaded machine a spin's wall
    # time includes the time slices the process spends off the CPU.)
    assert waiter.missed == 4
    assert waiter.spin_miss_ns >= 4 * 200_000  # each spun for its whole window
    assert waiter.spun == 0 and waiter.ready == 1


async def test_no_spin_while_thread_work_needs_the_gil():
    """While a `threads.run_in_thread` job runs, the loop parks instead of spinning (a
    spinning loop holds the GIL the job needs)."""
    r, w = os.pipe()
    waiter = Waiter(spin_us=200)
    release = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(threads.run_in_thread, lambda: release.wait(10))
            await trio.sleep(0.01)
            assert threads.busy == 1
            for _ in range(5):
                with trio.move_on_after(0.002):
                    waiter._yielded_at = time.perf_counter_ns()
                    await waiter.wait_readable(r)
            release.set()
        assert threads.busy == 0
    finally:
        release.set()
        os.close(r)
        os.close(w)
    assert waiter.spin_miss_ns == 0 and waiter.parked == 5


def _allowed(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of every thread of pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[int(tid)] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            pass
    return out


def test_cpus_pins_every_daemon_thread(mount_factory, test_dir):
    """-o cpus=: the daemon's threads (RocksDB's, trio's, prefetch's) all run on the CPUs
    named, those started before the pinning and after; a CPU this process may not use, or a
    list spelled wrong, is refused before anything is mounted."""
    cpu = max(os.sched_getaffinity(0))
    m = mount_factory(options=(f"cpus={cpu}",))
    f = m.path / "f"
    f.write_bytes(os.urandom(1 << 20))  # a flush, reads: threads start after the pinning
    assert f.read_bytes()
    pid = stats(m.path)["daemon_pid"]
    allowed = _allowed(pid)
    assert len(allowed) >= 3 and set(allowed.values()) == {str(cpu)}, allowed
    assert stats(m.path)["daemon_cpus"] == [cpu]

    mp = test_dir / "other"
    mp.mkdir()
    store = test_dir / "s2"
    mounting.run_cowfs("init", store)
    for bad, why in ((f"cpus={cpu + 4000}", b"is not one this process may run on"),
                     ("cpus=1-0", b"bad value in mount option 'cpus=1-0'")):
        r = mounting.run_cowfs("mount", store, mp, "-o", bad, check=False)
        assert r.returncode != 0 and why in r.stderr, r
        assert not mounting.fuse_mounts_under(str(mp))
