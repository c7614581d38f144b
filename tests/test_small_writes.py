"""The small-write log (cowfs/core/smallwrites.py): an fsync of a few dirty pages makes them
durable as log records, folded into chunks later; after a crash the next daemon replays them.

The daemons here run with the `timer_flush` test hook (cowfs/faults.py), which skips the
1 s timer's flush: what fsync logged stays in the log until a release or an operation folds
it, so the SIGKILLs below find records to replay, whatever the machine's load.  The next
daemon's log says how many it replayed.  (Reading the stats commits every acknowledged
write, which folds the log: the tests read them only where that is what they want.)
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

import mounting
from cowfs.core.smallwrites import FOLD_IDLE
from mounting import ok, stats

HOLD = {"COWFS_FAULTS": "timer_flush:eio:*"}
BASE = 1 << 20


def _log(mp) -> dict:
    return stats(mp)["small_write_log"]


def _replayed(m: mounting.Mount, n: int) -> None:
    assert f"{n} small-write log records of a previous daemon replayed" in m.log_text(), m.log_text()[-2000:]


def _replayed_count(m: mounting.Mount) -> int:
    """How many records the daemon's last start replayed (0: none)."""
    found = re.findall(r"(\d+) small-write log records of a previous daemon replayed",
                       m.log_text().split("===== start #")[-1])
    return int(found[0]) if found else 0


def _pwrite(fd: int, model: bytearray, off: int, data: bytes) -> None:
    assert os.pwrite(fd, data, off) == len(data)
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off : off + len(data)] = data


def _base(m: mounting.Mount, seed: int) -> tuple[Path, bytearray, random.Random]:
    """File f of BASE random bytes on m: (its path, the model of its bytes, the random
    source of the writes to come)."""
    rnd = random.Random(seed)
    model = bytearray(rnd.randbytes(BASE))
    path = m.path / "f"
    path.write_bytes(model)
    return path, model, rnd


@contextlib.contextmanager
def _opened(path, flags: int = os.O_RDWR) -> Iterator[int]:
    """path opened; closed after, an error of a handle of a killed daemon's connection ignored."""
    fd = os.open(path, flags, 0o644)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _small_writes(fd: int, model: bytearray, rnd: random.Random, n: int) -> None:
    """n small pwrites, each fsync'd: within pages, across pages and chunk boundaries."""
    for _ in range(n):
        size = rnd.choice([1, 100, 4096, 5000, 8192])
        off = rnd.choice([rnd.randrange(len(model)), 65536 * rnd.randrange(1, len(model) // 65536) - 7])
        _pwrite(fd, model, off, rnd.randbytes(size))
        os.fsync(fd)


@pytest.mark.timeout(180)
def test_fsynced_small_writes_survive_sigkill_through_the_log(mount_factory):
    m = mount_factory(env=HOLD)
    path, model, rnd = _base(m, 24)
    with _opened(path) as fd:
        os.fsync(fd)  # the base is committed as chunks (more than an fsync logs)
        _small_writes(fd, model, rnd, 40)
        _pwrite(fd, model, len(model) + 70000, b"past the end, after a hole")  # grows the file
        os.fsync(fd)
        os.fchmod(fd, 0o600)  # a SETATTR deferred with the dirty data: in the next record
        os.utime(fd, ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
        _pwrite(fd, model, 3, b"last")
        os.fsync(fd)
        assert os.pread(fd, len(model) + 10, 0) == model  # reads see the logged writes
        live = os.fstat(fd)
        mounting.sigkill_fsck_start(m)
    _replayed(m, 42)  # every fsync was logged, none folded: the records were all the store had
    assert path.read_bytes() == model
    st = os.stat(path)
    assert st.st_size == len(model) and st.st_mode & 0o777 == 0o600
    # The times the kernel sent before the last fsync (the write after utime stamped mtime).
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_000_000_000_000, live.st_mtime_ns)
    log = _log(m.path)
    assert log["pending_records"] == 0 and log["folds"] == 1, log  # the replay's fold
    # Replayed once: a second crash changes nothing.
    mounting.sigkill_fsck_start(m)
    assert path.read_bytes() == model


@pytest.mark.timeout(240)
def test_logged_pages_go_into_snapshots_clones_and_branches(mount_factory):
    """A snapshot, a clone and a branch made while a file has logged pages hold those pages
    (the operation folds the log first); the pages logged after them survive SIGKILL in the
    live file only."""
    m = mount_factory(env=HOLD)
    path, model, rnd = _base(m, 25)
    with _opened(path) as fd:
        os.fsync(fd)
        states = {}
        for op in ("snapshot s1", "clone f f2", "branch b1"):
            _small_writes(fd, model, rnd, 12)
            ok(m.path, op)
            states[op] = bytes(model)
        _small_writes(fd, model, rnd, 12)
        mounting.sigkill_fsck_start(m)
    _replayed(m, 12)  # the operations folded the earlier ones
    assert path.read_bytes() == model
    assert (m.path / ".cowfs/snapshots/s1/f").read_bytes() == states["snapshot s1"]
    assert (m.path / "f2").read_bytes() == states["clone f f2"]
    m.stop()
    b = mount_factory(store=m.store, init=False, branch="b1", name="b1")
    assert (b.path / "f").read_bytes() == states["branch b1"]
    assert (b.path / "f2").read_bytes() == states["clone f f2"]


@pytest.mark.timeout(180)
def test_records_replay_into_the_branch_they_were_written_in(mount_factory):
    """A daemon serving another branch replays them: into their branch, not its own."""
    m = mount_factory(env=HOLD)
    _path, model, rnd = _base(m, 26)
    ok(m.path, "branch side")
    m.stop()
    side = mount_factory(store=m.store, init=False, branch="side", name="side", env=HOLD)
    side_model = bytearray(model)
    with _opened(side.path / "f") as fd:
        _small_writes(fd, side_model, rnd, 10)
        mounting.sigkill(side)
    m.start()  # main's daemon replays side's records
    _replayed(m, 10)
    assert (m.path / "f").read_bytes() == model
    m.stop()
    assert mounting.fsck(m.store)["clean"]
    side.start()
    assert "replayed" not in side.log_text().split("start #2")[-1]
    assert (side.path / "f").read_bytes() == side_model


@pytest.mark.timeout(180)
def test_fsync_of_more_than_the_log_takes_flushes_as_before(mount_factory):
    """An fsync of more than 256 KiB unlogged commits chunks, not records."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(27)
    model = rnd.randbytes(BASE)
    path = m.path / "f"
    with _opened(path, os.O_RDWR | os.O_CREAT) as fd:
        before = stats(m.path)
        assert os.pwrite(fd, model, 0) == len(model)
        os.fsync(fd)
        after = stats(m.path)
        mounting.sigkill_fsck_start(m)
    assert after["small_write_log"]["records"] == before["small_write_log"]["records"] == 0
    assert after["flushes"] > before["flushes"]
    assert "replayed" not in m.log_text()
    assert path.read_bytes() == model


@pytest.mark.timeout(180)
def test_a_page_fsynced_again_and_again_stays_in_the_log_until_an_idle_fold(mount_factory):
    """With the 1 s timer running (the `log_fold` hook holding the background folds): 50
    fsyncs of one page over ~2.5 s stay log records, so its chunk is not re-encoded every
    second, and another file's write that no record held is committed by the timer as one
    more record.  Without the hook, once no record was written for FOLD_IDLE seconds, the
    background task folds the log."""
    m = mount_factory(env={"COWFS_FAULTS": "log_fold:eio:*"})
    path, model, rnd = _base(m, 28)
    other = m.path / "g"
    other.write_bytes(bytes(8192))
    # The kernel sends RELEASE in the background: one arriving during the fsyncs below
    # would fold the log (a release of a written handle commits every dirty node).
    mounting.wait_until(lambda: stats(m.path)["requests"].get("release", 0) >= 2, "the releases of f and g", 20)
    with _opened(path) as fd, _opened(other, os.O_RDWR | os.O_DIRECT) as gfd:
        os.fsync(fd)
        for _ in range(50):
            _pwrite(fd, model, 8192 + rnd.randrange(4096 - 100), rnd.randbytes(100))
            os.fsync(fd)
            time.sleep(0.05)
        unlogged = rnd.randbytes(4096)
        mounting.direct_pwrite(gfd, 4096, unlogged)  # reaches the daemon now, no fsync follows
        time.sleep(2.5)
        mounting.sigkill_fsck_start(m)
    # None folded by the timer (before: one fold a second); g's write is a 51st.  A SETATTR
    # of f's times the kernel may send later (a sync(2) of another process) is one more.
    assert 51 <= _replayed_count(m) <= 52, m.log_text()[-1500:]
    assert path.read_bytes() == model
    assert other.read_bytes() == bytes(4096) + unlogged  # the timer committed it
    m.stop()
    m.env = {}
    m.start()
    with _opened(path) as fd:
        for _ in range(5):
            _pwrite(fd, model, rnd.randrange(len(model) - 100), rnd.randbytes(100))
            os.fsync(fd)
        time.sleep(FOLD_IDLE + 2)
        mounting.sigkill_fsck_start(m)
    assert "replayed" not in m.log_text().split("start #4")[-1]  # folded while idle
    assert path.read_bytes() == model


@pytest.mark.timeout(180)
def test_fsyncs_during_a_fold_are_logged_without_waiting_and_outlive_its_commit(mount_factory):
    """The idle fold of 1 MiB of logged pages encodes in a thread (held 5 s there by the
    `flush_encode` hook): fsyncs meanwhile are logged and return without waiting for it,
    its commit deletes only the records it took, and after SIGKILL the next daemon replays
    exactly the records written during the fold, over the tree the fold committed."""
    m = mount_factory(env={"COWFS_FAULTS": "flush_encode:sleep5"})
    rnd = random.Random(29)
    model = bytearray()
    path = m.path / "f"
    with _opened(path, os.O_RDWR | os.O_CREAT) as fd:
        for i in range(16):  # 16 chunks, each logged: the fold's 1 MiB is encoded in a thread
            _pwrite(fd, model, i * 65536, rnd.randbytes(65536))
            os.fsync(fd)
        time.sleep(FOLD_IDLE + 1.5)  # the fold took them and sleeps in its thread
        waits = []
        for _ in range(20):
            _pwrite(fd, model, rnd.randrange(len(model) - 100), rnd.randbytes(100))
            t = time.monotonic()
            os.fsync(fd)
            waits.append(time.monotonic() - t)
            time.sleep(0.3)  # records keep coming: no idle fold of these
        assert os.pread(fd, len(model), 0) == model
        mounting.sigkill_fsck_start(m)
    assert max(waits) < 2.5, waits  # before: the first waited for the fold's thread (5 s)
    # The fold committed the 16 and left the 20 written after its take (a late SETATTR of
    # f's times, logged by the timer, may add one); a commit deleting every record left 7.
    assert 20 <= _replayed_count(m) <= 21, m.log_text()[-1500:]
    assert path.read_bytes() == model
