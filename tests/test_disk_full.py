"""Disk full: the store on a 64 MiB tmpfs, filled by a writer until it fails.

What must hold: writers get ENOSPC (never EIO, never a hang); nothing already stored is
damaged (reads keep working and are exact, fsck is clean after unmount); unlink and `delete`
of a snapshot still work while the disk is full; the daemon keeps serving; and once space is
freed (unlink, delete, `cowfs gc`) writes succeed again.

With the kernel's writeback cache, write(2) into the page cache succeeds; the daemon sees the
data at writeback and refuses it, and the caller gets ENOSPC from fsync(2) or close(2) (the
kernel keeps a writeback error for the next fsync/close).  The test records exactly where each
failure showed.
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import mounting

MiB = 1 << 20


@pytest.fixture
def small_disk():
    # A short path: the daemon's admin socket lives in the store (AF_UNIX paths are short).
    d = Path(tempfile.mkdtemp(prefix="cowfs-df-", dir="/tmp"))
    os.chmod(d, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(d)])
        if not os.path.ismount(d):
            os.rmdir(d)


def ctl(mp, line: str) -> tuple[int, bytes]:
    return mounting.ctl_exchange(mp, line.encode() + b"\n")


def write_file(path, data: bytes) -> tuple[str, int] | None:
    """Write, fsync, close; None if all went well, else (the call that failed, errno)."""
    stage = "open"
    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stage = "write"
        for off in range(0, len(data), MiB):
            os.write(fd, data[off:off + MiB])
        stage = "fsync"
        os.fsync(fd)
    except OSError as e:
        try:
            os.close(fd) if fd is not None else None
        except OSError:
            pass
        return stage, e.errno
    stage = "close"
    try:
        os.close(fd)
    except OSError as e:
        return stage, e.errno
    return None


def daemon_alive(m) -> None:
    assert m.alive(), f"the daemon died (exit {m.proc.poll()})\n{m.describe()}"


@pytest.mark.timeout(240)
def test_disk_full_enospc_then_recovers(small_disk, mount_factory):
    store = small_disk / "store"
    mounting.init_store(store)
    m = mount_factory(store=store, init=False)
    mp = m.path
    rnd = random.Random(5)
    precious = {f"keep/p{i}": rnd.randbytes(300_000) for i in range(5)}
    os.mkdir(mp / "keep")
    for rel, data in precious.items():
        assert write_file(mp / rel, data) is None
    err, reply = ctl(mp, "snapshot before-full")
    assert err == 0, reply

    # Fill the disk with incompressible data until a writer fails.
    failures: list[tuple[str, str, str]] = []
    written = []
    for i in range(40):
        res = write_file(mp / f"fill{i}", rnd.randbytes(4 * MiB))
        if res is None:
            written.append(f"fill{i}")
            continue
        failures.append((f"fill{i}", res[0], errno.errorcode.get(res[1], str(res[1]))))
        if len(failures) >= 3:
            break
    daemon_alive(m)
    assert failures, f"64 MiB tmpfs never filled: {len(written)} x 4 MiB written"
    wrong = [f for f in failures if f[2] != "ENOSPC"]
    assert not wrong, f"writers on a full disk must get ENOSPC; got {failures}\n{m.describe()}"

    # Still serving: metadata and exact reads of what was stored, snapshot view included.
    for rel, data in precious.items():
        assert (mp / rel).read_bytes() == data, rel
        assert (mp / ".cowfs/snapshots/before-full" / rel).read_bytes() == data, rel
    assert sorted(os.listdir(mp / "keep")) == sorted(p.split("/")[1] for p in precious)
    assert os.statvfs(mp).f_bavail >= 0
    daemon_alive(m)

    # Deletes work on a full disk.
    for name in written:
        os.unlink(mp / name)
    for f, _, _ in failures:
        try:
            os.unlink(mp / f)
        except FileNotFoundError:
            pass
    err, reply = ctl(mp, "delete before-full")
    assert err == 0, f"delete of a snapshot on a full disk failed: {reply!r}\n{m.describe()}"
    daemon_alive(m)

    # Space comes back after gc, and writes succeed again.
    mounting.run_cowfs("gc", mp, timeout=120)
    again = rnd.randbytes(8 * MiB)
    res = write_file(mp / "after", again)
    assert res is None, f"writing after freeing space and gc failed in {res[0]} with " \
                        f"{errno.errorcode.get(res[1])}\n{m.describe()}"
    assert (mp / "after").read_bytes() == again
    for rel, data in precious.items():
        assert (mp / rel).read_bytes() == data, rel
    m.stop()
    r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=120)
    assert r.returncode == 0, f"fsck after the disk-full episode: {r.stdout[-3000:]!r}"
    print("writers saw:", failures)


@pytest.mark.timeout(240)
def test_disk_filled_behind_cowfs_back_rocksdb_resumes(small_disk, mount_factory):
    """Another process fills the store's disk to the last bytes, so RocksDB itself hits ENOSPC
    (cowfs's headroom check cannot help): writers must get ENOSPC, and once that process's
    file goes, cowfs must write again without a remount (RocksDB resumed from its error state)."""
    store = small_disk / "store"
    mounting.init_store(store)
    m = mount_factory(store=store, init=False)
    mp = m.path
    rnd = random.Random(6)
    precious = rnd.randbytes(1 * MiB)
    assert write_file(mp / "precious", precious) is None
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # everything but ~64 KiB
        try:
            while True:
                f.write(b"\0" * (64 << 10) if os.statvfs(small_disk).f_bavail * 4096 > MiB else b"\0" * 4096)
                f.flush()
                if os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize < (64 << 10):
                    break
        except OSError as e:
            assert e.errno == errno.ENOSPC
    failures = []
    for i in range(4):
        res = write_file(mp / f"w{i}", rnd.randbytes(2 * MiB))
        if res is not None:
            failures.append((f"w{i}", res[0], errno.errorcode.get(res[1], str(res[1]))))
    daemon_alive(m)
    assert failures, "writes of 8 MiB succeeded on a disk with 64 KiB free"
    wrong = [f for f in failures if f[2] != "ENOSPC"]
    assert (mp / "precious").read_bytes() == precious
    os.unlink(ballast)
    time.sleep(1.5)  # the daemon looks at the free space at most every 0.25 s
    ok_again = write_file(mp / "after", rnd.randbytes(2 * MiB))
    daemon_alive(m)
    mkdir_ok = True
    try:
        os.mkdir(mp / "dir_after")
    except OSError as e:
        mkdir_ok = errno.errorcode.get(e.errno)
    assert not wrong and ok_again is None and mkdir_ok is True, (
        f"disk filled behind cowfs's back: writers saw {failures} (want ENOSPC); after space came "
        f"back, a 2 MiB write gave {ok_again} and mkdir gave {mkdir_ok} (want success)\n{m.describe()}")
    assert (mp / "precious").read_bytes() == precious
    m.stop()
    r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=120)
    assert r.returncode == 0, f"fsck after the disk-full episode: {r.stdout[-3000:]!r}"
    print("writers saw:", failures)
