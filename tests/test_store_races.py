"""Races between the event loop's commits and work in threads (docs/architecture.md,
"Concurrency invariants"):

* removing a previous daemon's orphans when a branch is attached is a mutation like any
  other: it waits for a flush that holds the lock while its thread has judged chunks
  already stored (freeing them under it would leave the flush's commit pointing at nothing);
* the database is never reopened (after a failed write) while a worker thread may be using
  its handle: the reopen waits for the jobs in flight, and no new job starts meanwhile.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import threading
import time

import pytest
import trio

import mounting
from cowfs.daemon import admin
from cowfs.core.filesystem import Filesystem
from cowfs.kv.base import Batch
from cowfs.store import ROOT_INO, Store, init_store
from mounting import run_cowfs

MiB = 1 << 20


def wait_for(what: str, fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s")
        time.sleep(0.05)
    return got


def fsck_clean(store) -> None:
    r = run_cowfs("fsck", store, "--json", check=False, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["clean"], f"fsck: {report['problems'][:20]}"


@pytest.mark.timeout(180)
def test_orphans_of_an_attached_branch_wait_for_a_flush_of_another(mount_factory, test_dir):
    m = mount_factory()
    run_cowfs("branch", m.path, "b")
    fork = test_dir / "fork"
    fork.mkdir()
    run_cowfs("mount", m.store, fork, "--branch", "b")
    data = os.urandom(2 * MiB)  # over 512 KiB: flushed in a thread; under 4 MiB: no pack
    with open(fork / "doomed", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    held = open(fork / "doomed", "rb")
    os.unlink(fork / "doomed")  # an orphan until its handle closes ...
    os.kill(m.proc.pid, signal.SIGKILL)  # ... which never happens: the next daemon removes it
    m.proc.wait(timeout=10)
    try:
        held.close()
    except OSError:
        pass
    for mp in (fork, m.path):
        mounting.lazy_unmount(mp)

    # The next daemon holds its first threaded flush 5 s after judging its chunks stored.
    m.env = {"COWFS_FAULTS": "flush_encode:sleep5:1"}
    m.start()
    errors: list[BaseException] = []

    def write_same() -> None:  # the orphan's very bytes, in main: every chunk is "already stored"
        try:
            with open(m.path / "same", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=write_same, daemon=True)
    t.start()
    wait_for("the flush held in its thread", lambda: "injected fault at flush_encode" in m.log_text())
    t0 = time.monotonic()
    # What `cowfs mount` sends once its checks passed (its own start-up could outlast the hold).
    reply = admin.request(str(m.store), {"cmd": "attach", "branch": "b", "mountpoint": str(fork)})
    attach_s = time.monotonic() - t0
    assert reply["ok"], reply
    t.join(30)
    assert not t.is_alive() and not errors, errors
    assert not (fork / "doomed").exists()
    run_cowfs("umount", fork)
    m.remount()  # nothing cached: the data comes from the store
    assert (m.path / "same").read_bytes() == data, f"attach took {attach_s:.1f}s"
    m.stop()
    fsck_clean(m.store)


class _HeldKV:
    """A RocksKV whose next write fails (as a full disk makes it) and whose scans can be held
    mid-way at a gate, as a worker thread is between two reads of an iterator."""

    def __init__(self, kv) -> None:
        self.kv = kv
        self.fail_next = False
        self.gate = threading.Event()
        self.inside = threading.Event()

    def held_scan(self, cf: str) -> int:
        n = 0
        for _ in self.kv.scan(cf, b""):
            n += 1
            if n == 1:
                self.inside.set()
                self.gate.wait(30)
        return n


async def test_a_reopen_waits_for_threads_that_use_the_database(tmp_path):
    """A write fails while a worker thread is inside a scan: the store reopens the database
    once that thread is done (before: at once, under it; RocksDB then refused the reopen,
    'lock hold by current process', and the store stayed read-only)."""
    path = str(tmp_path / "s")
    init_store(path)
    store = Store(path, cache_l1=1 << 20, cache_l2=1 << 20)
    fs = Filesystem(store, "main")
    try:
        root = fs.node(fs.primary, ROOT_INO)
        for i in range(20):
            await fs.make(root, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
        h = _HeldKV(store.kv)
        real_write = store.kv.write

        def failing_write(batch: Batch) -> None:
            if h.fail_next:
                h.fail_next = False
                raise OSError(errno.ENOSPC, "IO error: No space left on device (simulated)")
            real_write(batch)
        store.kv.write = failing_write  # type: ignore[method-assign]
        results: list[int] = []

        async def job() -> None:
            results.append(await store.in_thread(h.held_scan, "inodes"))

        async with trio.open_nursery() as n:
            n.start_soon(job)
            with trio.fail_after(10):
                while not h.inside.is_set():
                    await trio.sleep(0.01)
            h.fail_next = True
            with pytest.raises(Exception) as failed:
                await fs.make(root, b"fails", stat.S_IFREG | 0o644, 0, 0)
            assert "No space" in str(failed.value)
            assert not store.engine.read_only, "reopened under a thread's iterator (and fell back to read-only)"
            assert store._reopen_wanted and store.kv_users == 1
            # A thread job started now waits for the reopen; the reopen waits for the scan.
            ran: list[bool] = []
            n.start_soon(store.in_thread, lambda: ran.append(store._reopen_wanted))
            await trio.sleep(0.3)
            assert not ran and store.kv_users == 1, "a thread job started while a reopen waited"
            h.gate.set()
        assert ran == [False], "the later job ran before the reopen"
        assert results == [store_scan_len(store, "inodes")]
        assert not store.engine.read_only and not store._reopen_wanted
        node = await fs.make(root, b"works", stat.S_IFREG | 0o644, 0, 0)  # writes work again
        await fs.write(node, 0, b"after the reopen")
        await fs.flush()
        assert bytes(fs.read(node, 0, 100)) == b"after the reopen"
    finally:
        h.gate.set()
        store.close()


def store_scan_len(store, cf: str) -> int:
    return sum(1 for _ in store.kv.scan(cf, b""))


@pytest.mark.timeout(240)
def test_failed_commits_while_prefetch_threads_read(mount_factory):
    """Writes fail (injected at the commit: the store then reopens the database) while a
    reader keeps the prefetch threads loading chunks from it: nothing crashes, every read is
    exact, no background task fails, and writes work again afterwards."""
    m = mount_factory(options=["cache_l1=1M", "cache_l2=0", "dedup=off"])  # failures for the writer only
    data = os.urandom(24 * MiB)
    fd = os.open(m.path / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    for off in range(0, len(data), MiB):  # 1 MiB flushes: chunks in RocksDB, read through prefetch
        os.write(fd, data[off:off + MiB])
        os.fsync(fd)
    os.close(fd)
    failures = 25
    m.env = {"COWFS_FAULTS": f"commit:eio:{failures}"}
    m.remount()
    stop = threading.Event()
    passes: list[bool] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                fd = os.open(m.path / "big", os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the daemon again
                    got = b"".join(iter(lambda: os.read(fd, 256 << 10), b""))
                finally:
                    os.close(fd)
                passes.append(got == data)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    made: list[str] = []
    failed = 0
    try:
        wait_for("the reader's first pass", lambda: passes or errors)
        for i in range(failures + 15):
            try:
                fd = os.open(m.path / f"w{i}", os.O_CREAT | os.O_WRONLY, 0o644)
                os.close(fd)
                made.append(f"w{i}")
            except OSError as e:
                assert e.errno == errno.EIO, e  # the injected failure, as it is
                failed += 1
            time.sleep(0.05)
        n = len(passes)
        wait_for("two more passes of the reader", lambda: len(passes) >= n + 2 or errors, timeout=60)
    finally:
        stop.set()
        t.join(60)
    assert not errors and passes and all(passes), (errors, passes)
    assert failed == failures and made[-10:] == [f"w{i}" for i in range(failures + 5, failures + 15)]
    st = json.loads(run_cowfs("stats", m.path, "--json").stdout)
    broken = {k: v for k, v in st["background"].items() if v["failures"]}
    assert not broken and st["prefetch_enabled"], broken
    assert st["cache"]["prefetch"]["readahead"]["prefetched"] > 0, st["cache"]["prefetch"]
    assert "could not recover" not in m.log_text()
    assert sorted(os.listdir(m.path)) == sorted(["big"] + made)
    m.stop()
    fsck_clean(m.store)
