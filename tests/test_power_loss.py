"""Power loss: the store lives on tests/lazyfs.py, which keeps unsynced data in memory and
drops it on a simulated power cut; the durability rules must hold for what was synced.

SIGKILL (tests/test_crash_workload.py) leaves data that the daemon wrote but did not fsync
in the kernel's page cache, so it cannot catch a missing fsync.  Here every byte that RocksDB
wrote without fsync/fdatasync is gone after the cut.  A cut: SIGSTOP the cowfs daemon (it can
acknowledge nothing more), tell lazyfs to drop unsynced data (SIGUSR1), SIGKILL the daemon,
unmount both, start a fresh lazyfs on the same backing directory ("the disk"), require a clean
``cowfs fsck``, mount, and check with tests/workload.py (mode "power"): the tree is a prefix of
the operations that includes everything up to the last fsync/fsyncdir that returned, and each
snapshot of that prefix is exact.  What lazyfs does not model is in its docstring (namespace
changes are durable at once).

COWFS_POWER_ROUNDS sets the number of cuts (default 5).
"""
from __future__ import annotations

import os
import random
import time
from typing import Callable

import pytest

import mounting
import workload
from cowfs.store import WAL_SYNCS
from mounting import stats, sync_tree

ROUNDS = int(os.environ.get("COWFS_POWER_ROUNDS", "5"))


@pytest.mark.timeout(120 + 60 * ROUNDS)
def test_power_cut_during_mixed_workload(lazy, mount_factory, tmp_path):
    store = os.path.join(lazy.mp, "store")
    mounting.init_store(store)
    sync_tree(store)  # see test_init_survives_power_cut: init itself does not sync everything
    m = mount_factory(store=store, init=False)
    rnd = random.Random(int(os.environ.get("COWFS_POWER_SEED", "4242")))
    lost_total = 0
    for r in range(ROUNDS):
        rel = tag = f"p{r}"
        log = str(tmp_path / f"{rel}.log")
        seed = rnd.randrange(1 << 30)
        w = workload.start_workload(str(m.path), rel, log, seed, tag, "--fsync-p", "0.3")
        steps = mounting.Steps(lambda: workload.release(lazy, (m,), (w,)))
        try:
            workload.wait_acked(log, 3, w, timeout=60)
            time.sleep(rnd.uniform(0.2, 2.0))
            cut_time, figures = workload.power_cut(lazy, (m,), steps)
            steps("exit of the workload", 60, w.wait)
        finally:
            workload.reap(w)
        w.stderr.close()
        lost_total += figures["lost_bytes"]
        steps("start of a new lazyfs", 30, lazy.start)
        steps("fsck of the store", 120, workload.fsck_clean, store)
        steps("start of the daemon", 60, m.start)
        k, how, probs = steps("check against the workload's log", 60, workload.check,
                              str(m.path), rel, log, "power", tag + "-", cut_time)
        assert not probs, f"round {r} (seed {seed}, log {log}, lazyfs: {figures}):\n" + "\n".join(probs)
        ops, outcome = workload.read_log(log, cut_time)
        print(f"round {r}: {len(ops)} ops begun, {outcome.count('ok')} acknowledged, state = first {k} "
              f"({how}); lazyfs dropped {figures['lost_bytes']} unsynced bytes in {figures['lost_files']} files")
    assert lost_total > 0, "no cut dropped any data: the test did not test anything"
    m.stop()
    workload.fsck_clean(store)


@pytest.mark.timeout(120)
def test_fsynced_data_survives_and_unsynced_is_prefix(lazy, mount_factory):
    """The simplest case, by hand: fsynced files are there after the cut, later ones may not be."""
    store = os.path.join(lazy.mp, "store")
    mounting.init_store(store)
    sync_tree(store)
    m = mount_factory(store=store, init=False)
    for i in range(3):
        with open(m.path / f"synced{i}", "wb") as f:
            f.write(bytes([i]) * 300_000)
            f.flush()
            os.fsync(f.fileno())
    for i in range(3):
        (m.path / f"later{i}").write_bytes(bytes([i]) * 100_000)  # closed, not fsynced
    workload.power_cut(lazy, (m,))
    lazy.start()
    workload.fsck_clean(store)
    m.start()
    for i in range(3):
        assert (m.path / f"synced{i}").read_bytes() == bytes([i]) * 300_000
    later = [(m.path / f"later{i}").exists() for i in range(3)]
    assert later in ([False] * 3, [True, False, False], [True, True, False], [True] * 3), later
    for i, present in enumerate(later):
        if present:
            assert (m.path / f"later{i}").read_bytes() == bytes([i]) * 100_000


def _fsynced_small_writes(fd: int, model: bytearray, rnd: random.Random, n: int) -> None:
    """n small pwrites at random offsets of fd's file, each fsync'd; model follows them."""
    for _ in range(n):
        off = rnd.randrange(len(model) - 5000)
        data = rnd.randbytes(rnd.choice([10, 4096, 5000]))
        os.pwrite(fd, data, off)
        model[off : off + len(data)] = data
        os.fsync(fd)


def _small_writes_and_a_cut(lazy, mount_factory, seed: int,
                            writes: Callable[[mounting.Mount, int, bytearray, random.Random], None]):
    """On a store in LazyFS, held by the `timer_flush` hook (what fsync logs stays logged): a
    file of 1 MiB written and fsync'd (a flush: more than the log takes), then `writes`, then
    5 writes not fsync'd (only in the daemon's memory) and the power cut; fsck after it, and
    the next daemon started.  Returns that mount, the file and its model."""
    store = os.path.join(lazy.mp, "store")
    mounting.init_store(store)
    sync_tree(store)
    m = mount_factory(store=store, init=False, env={"COWFS_FAULTS": "timer_flush:eio:*"})
    rnd = random.Random(seed)
    model = bytearray(rnd.randbytes(1 << 20))
    path = m.path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, model, 0)
        os.fsync(fd)
        writes(m, fd, model, rnd)
        for _ in range(5):
            os.pwrite(fd, b"x" * 4096, rnd.randrange(len(model) - 4096))
        workload.power_cut(lazy, (m,))
    finally:
        mounting.close_after_kill(fd)  # a handle of the dead daemon's connection
    lazy.start()
    workload.fsck_clean(store)
    m.start()
    return m, path, model


@pytest.mark.timeout(120)
def test_fsynced_small_writes_survive_a_power_cut_through_the_log(lazy, mount_factory):
    """Small fsync'd writes are made durable as small-write log records (cowfs/core/smallwrites.py):
    after the cut the next daemon replays every one, and what was written after the last
    fsync is gone."""
    m, path, model = _small_writes_and_a_cut(
        lazy, mount_factory, 9, lambda m, fd, model, rnd: _fsynced_small_writes(fd, model, rnd, 30))
    assert "30 small-write log records of a previous daemon replayed" in m.log_text()
    assert path.read_bytes() == model


@pytest.mark.timeout(180)
def test_fsyncs_through_a_recycled_wal_survive_a_power_cut(lazy, mount_factory):
    """After WAL_SYNCS fsyncs the daemon switches RocksDB to a recycled write-ahead log
    (Store.wal_keeper, RocksKV.rotate_wal), which later syncs overwrite in place over the
    records of its previous use: after a cut, every fsync'd write made through it is
    replayed, nothing written after the last fsync or left in the log's tail comes back."""

    def writes(m: mounting.Mount, fd: int, model: bytearray, rnd: random.Random) -> None:
        _fsynced_small_writes(fd, model, rnd, WAL_SYNCS + 6)
        deadline = time.monotonic() + 60
        while stats(m.path)["wal_rotations"] < 1:  # (stats fold the log: nothing pending now)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _fsynced_small_writes(fd, model, rnd, 40)

    m, path, model = _small_writes_and_a_cut(lazy, mount_factory, 11, writes)
    assert "40 small-write log records of a previous daemon replayed" in m.log_text()
    assert path.read_bytes() == model


@pytest.mark.timeout(180)
def test_packed_chunks_survive_a_power_cut(lazy, mount_factory):
    """Files large enough for pack files (chunks/packs.py): a pack append is made durable
    before the commit that points at it, so every file the cut left has all its bytes."""
    store = os.path.join(lazy.mp, "store")
    mounting.init_store(store)
    sync_tree(store)
    m = mount_factory(store=store, init=False, options=("dedup=off",))
    rnd = random.Random(7)
    data = {name: rnd.randbytes(6 << 20) for name in ("synced0", "synced1", "later0", "later1", "later2")}
    for name in ("synced0", "synced1"):
        with open(m.path / name, "wb") as f:
            f.write(data[name])
            f.flush()
            os.fsync(f.fileno())
    for name in ("later0", "later1", "later2"):
        (m.path / name).write_bytes(data[name])  # closed (committed), not fsynced
    assert any(os.scandir(os.path.join(store, "packs"))), "6 MiB files should go to a pack"
    workload.power_cut(lazy, (m,))
    lazy.start()
    workload.fsck_clean(store)
    m.start()
    for name in ("synced0", "synced1"):
        assert (m.path / name).read_bytes() == data[name], name
    later = [(m.path / f"later{i}").exists() for i in range(3)]
    assert later in ([False] * 3, [True, False, False], [True, True, False], [True] * 3), later
    for i, present in enumerate(later):
        if present:
            got = (m.path / f"later{i}").read_bytes()
            # A file whose creation survived but whose data commit did not is empty; a file
            # with data has all of it (never a pointer to bytes the cut dropped).
            assert got in (b"", data[f"later{i}"]), (i, len(got))


@pytest.mark.timeout(120)
def test_a_cut_under_two_daemons_while_this_process_holds_dirty_pages_on_one(lazy, mount_factory):
    """The cut kills every stopped daemon before this process forks (fusermount3): a forked
    child closes its copies of our descriptors, and the close of a file with dirty pages on
    a stopped daemon's mount waits until that daemon writes them back (fuse_flush), while the
    parent waits for its vforked child.  Killing and unmounting one daemon before killing the
    next hung the power cut under a branch daemon's home for 400 s (tests/test_own_daemon_more.py)."""
    a, b = (mount_factory(store=mounting.init_store(os.path.join(lazy.mp, name)), init=False)
            for name in ("a", "b"))
    fd = os.open(b.path / "dirty", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(100_000))  # in the kernel's cache (writeback), not yet b's
        t0 = time.monotonic()
        workload.power_cut(lazy, (a, b))
        assert time.monotonic() - t0 < 20
    finally:
        mounting.close_after_kill(fd)


@pytest.mark.timeout(120)
def test_init_survives_power_cut(lazy, tmp_path):
    """A store that `cowfs init` reported as created must still be a store after a power cut."""
    store = os.path.join(lazy.mp, "store")
    mounting.run_cowfs("init", store)  # the CLI itself: init_store copies a template
    lazy.cut()
    lazy.stop()
    lazy.start()
    r = mounting.run_cowfs("fsck", store, "--json", check=False)
    assert r.returncode == 0, (f"after a power cut right after `cowfs init`: fsck exit {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()}")
