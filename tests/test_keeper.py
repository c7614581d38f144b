"""Dedup across the daemons of one store, on real mounts (docs/design-many-processes.md, step 7's
store keeper; cowfs.chunks.dups): branches with daemons of their own that write the same new
data each pack it (neither sees the other's records); `cowfs gc STORE` (the keeper) publishes
one place per duplicate chunk, each daemon points its records there, and the next gc runs
reclaim the other copies, until the packs hold the data once (<= 1.05x), every byte reads back
and fsck is clean; also with a branch daemon killed -9 between two slices of its rewrites, and
with the keeper run again and again while the daemons write.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mounting
from mounting import read, run_cowfs, write

MiB = 1 << 20
GC_ONLY = ("keep_every=0",)  # the keeper runs at `cowfs gc` only: what each run did is its report


def _own_branch(m, name: str) -> None:
    reply = json.loads(run_cowfs("branch", str(m.path), name, "--own-daemon", "--json").stdout)
    assert reply["ok"] and reply["home"], reply


def _pack_bytes(store) -> int:
    """Bytes the store's packs hold (every database's chunks; what the store grows by)."""
    packs = Path(store) / "packs"
    return sum(p.stat().st_size for p in packs.rglob("*.pack"))


def _write_at_once(paths: list[Path], data: bytes) -> None:
    errors: list[str] = []

    def one(p: Path) -> None:
        try:
            write(p, data, sync=True)
        except OSError as e:
            errors.append(f"{p}: {e}")
    threads = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def _wait_packed(store, before: int, size: int, copies: float, timeout: float = 60) -> None:
    """Until the packs grew by `copies` x size over `before`: what an fsync left in a daemon's
    small-write log is packed by its fold a moment later, sooner or later with the load."""
    deadline = time.monotonic() + timeout
    while (grown := (_pack_bytes(store) - before) / size) < copies:
        assert time.monotonic() < deadline, f"packs grew {grown:.2f}x in {timeout} s, not {copies}x"
        time.sleep(0.2)


def _settle(store, before: int, size: int, timeout: float = 90) -> tuple[float, list[dict]]:
    """`cowfs gc STORE` until the packs grew by at most 1.05x size over `before` and nothing
    waits (the daemons rewrite and acknowledge within a second or two between runs);
    (growth / size, every run's report)."""
    runs: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        runs.append(mounting.cowfs_json("gc", str(store)))
        growth = (_pack_bytes(store) - before) / size
        last = runs[-1]
        if growth <= 1.05 and not last.get("packs_waiting") and not last.get("dup_open"):
            return growth, runs
        if time.monotonic() > deadline:
            return growth, runs
        time.sleep(1.5)


def test_the_same_data_written_by_two_branch_daemons_is_stored_once_after_the_keeper(mount_factory):
    m = mount_factory(options=GC_ONLY)
    write(m.path / "base.txt", b"the base\n", sync=True)
    _own_branch(m, "f1")
    _own_branch(m, "f2")
    f1 = mount_factory(store=m.store, init=False, branch="f1", name="f1", options=GC_ONLY)
    f2 = mount_factory(store=m.store, init=False, branch="f2", name="f2", options=GC_ONLY)
    size = 24 * MiB
    data = os.urandom(size)
    before = _pack_bytes(m.store)
    _write_at_once([f1.path / "data.bin", f2.path / "data.bin"], data)
    _wait_packed(m.store, before, size, 1.9)  # two daemons, two copies
    growth, runs = _settle(m.store, before, size)
    assert growth <= 1.05, (growth, json.dumps(runs, indent=1))
    assert runs[0]["dup_found"] >= size // (64 << 10) * 0.95, runs[0]
    assert read(f1.path / "data.bin") == data and read(f2.path / "data.bin") == data
    assert not (m.path / "data.bin").exists() and read(m.path / "base.txt") == b"the base\n"
    # a third write of the same data by a branch daemon dedups against its own (rewritten) records
    write(f1.path / "again.bin", data, sync=True)
    assert (_pack_bytes(m.store) - before) / size <= 1.05
    f2.stop()
    f1.stop()
    m.stop()
    report = mounting.fsck(m.store)
    assert report["counts"].get("dup_records", 0) == 0, report["counts"]  # settled: every record dropped
    m.start()
    f1.start()
    f2.start()
    assert read(f1.path / "data.bin") == data and read(f2.path / "data.bin") == data
    assert read(f1.path / "again.bin") == data


def test_a_branch_daemon_killed_between_two_slices_of_its_rewrites(mount_factory):
    """Two branch daemons write the same data, both armed to SIGKILL themselves once the first
    slice (512 records) of their rewrites is committed, not synced: the one whose copy lost
    dies there (the winner rewrites nothing).  fsck is clean with every byte; after its remount
    the rest is rewritten and its packs collected, and `cowfs gc STORE` with no daemon running
    (the keeper offline) settles the store at one copy."""
    m = mount_factory(options=GC_ONLY)
    _own_branch(m, "f1")
    _own_branch(m, "f2")
    forks = [mount_factory(store=m.store, init=False, branch=b, name=b, env={"COWFS_FAULTS": "dup_rewritten:kill"},
                           options=GC_ONLY) for b in ("f1", "f2")]
    size = 48 * MiB  # 768 chunks: two slices
    data = os.urandom(size)
    before = _pack_bytes(m.store)
    _write_at_once([f.path / "data.bin" for f in forks], data)
    first = mounting.cowfs_json("gc", str(m.store))
    assert first["dup_published"] > 520, first  # more than one slice to rewrite
    mounting.wait_until(lambda: any(f.proc.poll() is not None for f in forks), "the loser's daemon to die", timeout=60)
    (dead,) = [f for f in forks if f.proc.poll() is not None]
    (alive,) = [f for f in forks if f is not dead]
    assert dead.proc.returncode == -signal.SIGKILL
    run_cowfs("umount", dead.path)
    alive.stop()
    m.stop()
    mounting.fsck(m.store)  # the half-rewritten home, the dup records, the condemned packs
    dead.env = {}
    dead.start()  # its rewriter runs at start: the second slice, then collects its packs
    mounting.wait_log(dead, "packs collected after the rewrites", timeout=60)
    assert read(dead.path / "data.bin") == data
    dead.stop()
    # every daemon down: the offline keeper settles the records and reclaims the copies
    growth, runs = _settle(m.store, before, size)
    assert growth <= 1.05, (growth, runs)
    mounting.fsck(m.store)
    alive.env = {}
    m.start()
    for f in forks:
        f.start()
        assert read(f.path / "data.bin") == data


def test_the_keeper_runs_again_and_again_while_two_branch_daemons_write_the_same_files(mount_factory):
    """`cowfs gc STORE` in a loop while two branch daemons write the same six 6 MiB files (each
    fsynced): rewrites, condemnations and the forks' own pack sweeps race the writes; once the
    writers are done the store settles at one copy, every file reads back and fsck is clean."""
    m = mount_factory(options=GC_ONLY)
    _own_branch(m, "f1")
    _own_branch(m, "f2")
    forks = [mount_factory(store=m.store, init=False, branch=b, name=b, options=GC_ONLY) for b in ("f1", "f2")]
    files = [os.urandom(6 * MiB) for _ in range(6)]
    before = _pack_bytes(m.store)
    errors: list[str] = []

    def writer(root: Path) -> None:
        try:
            for i, data in enumerate(files):
                write(root / f"same-{i}.bin", data, sync=True)
        except OSError as e:
            errors.append(f"{root}: {e}")
    threads = [threading.Thread(target=writer, args=(f.path,)) for f in forks]
    for t in threads:
        t.start()
    runs = 0
    while any(t.is_alive() for t in threads):
        mounting.cowfs_json("gc", str(m.store))
        runs += 1
    for t in threads:
        t.join()
    assert not errors and runs >= 1, (errors, runs)
    growth, settled = _settle(m.store, before, 6 * 6 * MiB)
    assert growth <= 1.05, (growth, json.dumps(settled, indent=1))
    for f in forks:
        for i, data in enumerate(files):
            assert read(f.path / f"same-{i}.bin") == data
    for f in reversed(forks):
        f.stop()
    m.stop()
    mounting.fsck(m.store)


def _store_striped_and_three_forks(mount_factory) -> tuple[mounting.Mount, list[mounting.Mount], bytes, int]:
    """The store's daemon (gc only) with 16 MiB written so that it packs three chunks in four
    and keeps every fourth inline (written after, in 1 MiB fsynced flushes), and three branch
    daemons f1-f3 of their own: (store mount, forks, the data, pack bytes before the data)."""
    m = mount_factory(options=GC_ONLY)
    names = ("f1", "f2", "f3")
    for b in names:
        _own_branch(m, b)
    forks = [mount_factory(store=m.store, init=False, branch=b, name=b, options=GC_ONLY) for b in names]
    size, chunk = 16 * MiB, 64 << 10
    data = os.urandom(size)
    stripes = range(3 * chunk, size, 4 * chunk)
    before = _pack_bytes(m.store)
    holed = bytearray(data)
    for off in stripes:
        holed[off:off + chunk] = bytes(chunk)
    fd = os.open(m.path / "data.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, holed, 0)
        os.fsync(fd)
        for i, off in enumerate(stripes):
            os.pwrite(fd, data[off:off + chunk], off)
            if i % 16 == 15:
                os.fsync(fd)
    finally:
        os.close(fd)
    return m, forks, data, before


def test_the_same_data_written_by_the_store_daemon_and_three_branch_daemons_is_stored_once(mount_factory):
    """Four databases write the same 16 MiB: the store's daemon packs three chunks in four and
    keeps every fourth inline (written after, in 1 MiB fsynced flushes), three branch daemons
    pack all of it.  The first fork by name wins every fourth chunk against the other forks
    and loses the rest to the store's database, so each of its packs ends a quarter live with
    the other forks pointing into it: it must still be collected (its daemon repacks its share
    and the others follow), until the packs hold the data once (<= 1.05x), every byte reads
    back and fsck is clean."""
    m, forks, data, before = _store_striped_and_three_forks(mount_factory)
    size = len(data)
    assert (_pack_bytes(m.store) - before) / size <= 0.8  # every fourth chunk inline
    _write_at_once([f.path / "data.bin" for f in forks], data)
    _wait_packed(m.store, before, size, 3.5)  # the store's 0.75 copy and the forks' three
    growth, runs = _settle(m.store, before, size, timeout=120)
    assert growth <= 1.05, (growth, json.dumps(runs, indent=1))
    for mm in (m, *forks):
        assert read(mm.path / "data.bin") == data
    for f in reversed(forks):
        f.stop()
    m.stop()
    mounting.fsck(m.store)


def test_the_keeper_repacks_what_its_rewrites_of_idle_homes_left_partly_dead(mount_factory):
    """As the test above, but the three forks' daemons stopped before any gc: the keeper
    (`cowfs gc STORE` in the store's daemon) rewrites their homes itself, and repacks what that
    left partly dead (the first fork's packs, a quarter live, which the others then point
    into), so the store settles at <= 1.05x without any fork's daemon running."""
    m, forks, data, before = _store_striped_and_three_forks(mount_factory)
    size = len(data)
    _write_at_once([f.path / "data.bin" for f in forks], data)
    for f in reversed(forks):
        f.stop()
    growth, runs = _settle(m.store, before, size, timeout=120)
    assert growth <= 1.05, (growth, json.dumps(runs, indent=1))
    assert sum(r.get("dup_idle_repacked", 0) for r in runs) >= 1, runs
    m.stop()
    mounting.fsck(m.store)
    m.start()
    assert read(m.path / "data.bin") == data
    for f in forks:
        f.start()
        assert read(f.path / "data.bin") == data


_TAKER = """
import sys, time
from cowfs.chunks import dups
from cowfs.kv.sqlite import SQLiteKV
refs = SQLiteKV(sys.argv[1], ("gc",))
lease = dups.KeeperLease(refs, ttl=float(sys.argv[2]))
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
print("took" if lease.take() else "busy", flush=True)
time.sleep(float(sys.argv[4]))
lease.release()
"""


def _takers(path: Path, n: int, ttl: float, hold: float) -> list[subprocess.Popen]:
    start = time.time() + 1.0  # all of them at once
    return [subprocess.Popen([sys.executable, "-c", _TAKER, str(path), str(ttl), str(start), str(hold)],
                             stdout=subprocess.PIPE, text=True) for _ in range(n)]


def test_two_processes_taking_the_keeper_lease_at_once_one_keeps(tmp_path):
    """`gc/lease/keeper` by compare-and-set in the reference store: of processes that try at
    the same instant exactly one takes it; once it dropped it the next one takes it."""
    from cowfs.chunks import dups
    from cowfs.kv.sqlite import SQLiteKV
    path = tmp_path / "refs.sqlite"
    SQLiteKV(str(path), ("gc",)).close()
    procs = _takers(path, 4, 30, 1.0)
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["busy", "busy", "busy", "took"], said
    refs = SQLiteKV(str(path), ("gc",))
    assert dups.KeeperLease(refs).holder() is None  # dropped by its holder
    assert time.time() - dups.KeeperLease(refs).last_pass() < 30  # leaving when its pass ended
    mine = dups.KeeperLease(refs)
    assert mine.take() and mine.renew() and not dups.KeeperLease(refs).take()
    mine.release()
    assert dups.KeeperLease(refs).take()
    refs.close()


def test_a_keeper_killed_while_it_holds_the_lease_is_taken_over_after_its_expiry(tmp_path):
    from cowfs.chunks import dups
    from cowfs.kv.sqlite import SQLiteKV
    path = tmp_path / "refs.sqlite"
    SQLiteKV(str(path), ("gc",)).close()
    (holder,) = _takers(path, 1, 3.0, 600)
    assert holder.stdout.readline().strip() == "took"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    refs = SQLiteKV(str(path), ("gc",))
    nxt = dups.KeeperLease(refs)
    rec = nxt.holder()
    assert rec is not None and rec["pid"] == holder.pid
    assert not nxt.take()  # not before its expiry
    while time.time() < rec["expires"]:
        time.sleep(0.1)
    assert nxt.take() and nxt.holder()["owner"] == nxt.owner
    refs.close()


def test_the_daemons_keep_on_their_own_schedule_without_any_gc_run(mount_factory):
    """Nobody runs `cowfs gc`: two branch daemons write the same 16 MiB, and their schedules
    (-o keep_every=1: look each second; one keeper at a time, by the lease) publish, rewrite
    and sweep until the packs hold it once, within a bounded wait; every byte reads back and
    fsck is clean."""
    m = mount_factory(options=("keep_every=1",))
    _own_branch(m, "f1")
    _own_branch(m, "f2")
    forks = [mount_factory(store=m.store, init=False, branch=b, name=b, options=("keep_every=1",))
             for b in ("f1", "f2")]
    size = 16 * MiB
    data = os.urandom(size)
    before = _pack_bytes(m.store)
    _write_at_once([f.path / "data.bin" for f in forks], data)
    deadline = time.monotonic() + 90
    while (_pack_bytes(m.store) - before) / size > 1.05:
        assert time.monotonic() < deadline, (_pack_bytes(m.store) - before) / size
        time.sleep(0.5)
    logs = "".join(x.log_text() for x in (m, *forks))
    assert "store keeper:" in logs
    for f in forks:
        assert read(f.path / "data.bin") == data
    for f in reversed(forks):
        f.stop()
    m.stop()
    mounting.fsck(m.store)
