"""Sparse files and allocated space (issue 19, items 7 and 13), on real mounts.

What a file allocates is the length of its stored chunks (holes, and chunks of zeros, take
nothing): st_blocks, `du`, the branch usage that quotas charge and `df` under a quota all
count that, checked against the kernel's own filesystem (a plain directory under /tmp) where
Linux defines the answer.  Exact equality with ext4 is not expected (cowfs allocates in
chunks' lengths, ext4 in 4 KiB blocks, and cowfs keeps zeros as holes), so the comparisons
allow one 64 KiB chunk per data region.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB


def stats(target) -> dict:
    return mounting.stats(target)


def listing(target) -> dict:
    return json.loads(mounting.run_cowfs("list", target, "--json").stdout)


def fsck(store) -> dict:
    r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=300)
    report = json.loads(r.stdout)
    assert report["clean"], report["problems"][:20]
    return report


def as_user(cwd, *cmd, timeout=120) -> subprocess.CompletedProcess:
    """Run a command as the unprivileged test user (no supplementary groups)."""
    return subprocess.run(["setpriv", f"--reuid={UNPRIV_UID}", f"--regid={UNPRIV_GID}", "--clear-groups", *cmd],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def du_bytes(path) -> int:
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True,
                              timeout=60).stdout.split()[0])


# name -> (operations, nonzero data bytes, data regions); operations are ("write", offset,
# bytes) and ("truncate", size), applied in order.
def layouts() -> dict[str, tuple[list[tuple], int, int]]:
    rnd = random.Random(7)
    r = rnd.randbytes
    return {
        "truncated-1g": ([("truncate", GiB)], 0, 0),
        "dense-3m": ([("write", 0, r(3 * MiB))], 3 * MiB, 1),
        "small": ([("write", 0, b"x" * 100)], 100, 1),
        "islands": ([("write", 0, r(CHUNK)), ("write", 10 * MiB, r(4 * KiB)),
                     ("write", 50 * MiB + 123, r(70 * KiB)), ("truncate", 100 * MiB)], CHUNK + 74 * KiB, 3),
        "grown-tail": ([("write", 0, r(MiB)), ("truncate", 100 * MiB)], MiB, 1),
        "shrunk": ([("write", 0, r(5 * MiB)), ("truncate", MiB + 10)], MiB + 10, 1),
        # ext4 allocates written zeros; cowfs keeps them as holes (never more than ext4)
        "zeros": ([("write", 0, bytes(2 * MiB)), ("write", 4 * MiB, b"end")], 3, 1),
        "only-zeros": ([("write", 0, bytes(300_000))], 0, 0),
    }


def build(root: Path) -> None:
    for name, (ops, _data, _regions) in layouts().items():
        fd = os.open(root / name, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for op in ops:
                if op[0] == "write":
                    assert os.pwrite(fd, op[2], op[1]) == len(op[2])
                else:
                    os.ftruncate(fd, op[1])
        finally:
            os.close(fd)


def check_against(ref: Path, mp: Path) -> None:
    for name, (_ops, data, regions) in layouts().items():
        want, got = os.stat(ref / name), os.stat(mp / name)
        assert got.st_size == want.st_size, name
        ext4, cow = want.st_blocks * 512, got.st_blocks * 512
        assert data <= cow <= ext4 + regions * CHUNK, \
            f"{name}: {cow} bytes allocated for {data} bytes of data (ext4: {ext4}, size {got.st_size})"
    assert du_bytes(mp) <= du_bytes(ref) + 8 * CHUNK, "du over the mount counts more than ext4's"
    assert du_bytes(mp) < 16 * MiB, "du counts holes"


@pytest.mark.timeout(180)
def test_st_blocks_and_du_count_allocated_bytes_like_ext4(cowfs_mount, test_dir):
    ref = test_dir / "ext4"
    ref.mkdir()
    build(ref)
    build(cowfs_mount.path)
    check_against(ref, cowfs_mount.path)          # on the live mount
    cowfs_mount.remount()
    check_against(ref, cowfs_mount.path)          # as committed
    # a rewrite allocates nothing new; a chunk of zeros over data gives its space back
    p = cowfs_mount.path / "dense-3m"
    before = allocated(p)
    with open(p, "r+b") as f:
        f.write(os.urandom(MiB))
        f.seek(2 * MiB)
        f.write(bytes(MiB))
    assert allocated(p) == before - MiB
    s = stats(cowfs_mount.path)
    total = sum(allocated(cowfs_mount.path / n) for n in layouts())
    assert 0 <= total - s["usage_allocated_bytes"] < 512 * len(layouts()), (s["usage_allocated_bytes"], total)
    assert s["usage_bytes"] == sum(os.stat(cowfs_mount.path / n).st_size for n in layouts())
    cowfs_mount.stop()
    fsck(cowfs_mount.store)


@pytest.mark.timeout(180)
def test_quota_charges_allocated_bytes_for_an_unprivileged_user(mount_factory):
    m = mount_factory(options=["allow_other", "quota_bytes=50M"])
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    # a sparse gigabyte allocates nothing: within a 50M quota
    r = as_user(m.path, "truncate", "-s", "1G", "big")
    assert r.returncode == 0, r.stderr
    r = as_user(m.path, "dd", "if=/dev/urandom", "of=big", "bs=1M", "count=10", "seek=100", "conv=notrunc")
    assert r.returncode == 0, r.stderr
    assert os.stat(m.path / "big").st_size == GiB and allocated(m.path / "big") == 10 * MiB
    # df: the quota is the size, the branch's allocated bytes are what is used
    r = as_user(m.path, "df", "-B1", "--output=size,used,avail", ".")
    size, used, avail = map(int, r.stdout.split()[3:6])
    assert size == 50 * MiB and used == 10 * MiB and avail == 40 * MiB, r.stdout
    # filling the rest fails with EDQUOT, and no further
    r = as_user(m.path, "dd", "if=/dev/urandom", "of=fill", "bs=1M", "count=60")
    assert r.returncode != 0 and "quota" in r.stderr.lower(), r.stderr
    assert allocated(m.path / "fill") <= 40 * MiB
    s = stats(m.path)
    assert s["quota_bytes"] == 50 * MiB and s["usage_allocated_bytes"] <= 50 * MiB
    assert s["usage_bytes"] == GiB + os.stat(m.path / "fill").st_size     # logical: sizes
    # zeros written do not count; holes do not count
    os.unlink(m.path / "fill")
    r = as_user(m.path, "dd", "if=/dev/zero", "of=zeros", "bs=1M", "count=100")
    assert r.returncode == 0, r.stderr
    assert stats(m.path)["usage_allocated_bytes"] == 10 * MiB
    main = next(b for b in listing(m.path)["branches"] if b["name"] == "main")
    assert main["allocated_bytes"] == 10 * MiB and main["logical_bytes"] == GiB + 100 * MiB
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(180)
def test_allocated_usage_of_snapshots_branches_rollback_and_clone(mount_factory):
    m = mount_factory(options=["quota_bytes=20M"])
    mp = m.path
    with open(mp / "sparse", "wb") as f:
        f.truncate(GiB)
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
    mounting.run_cowfs("snapshot", mp, "two")
    with open(mp / "sparse", "r+b") as f:
        f.seek(100 * MiB)
        f.write(os.urandom(3 * MiB))
    # a clone of a sparse gigabyte allocates 5 MiB more, not a gigabyte: within the quota
    mounting.run_cowfs("clone", mp, "sparse", "copy")
    assert stats(mp)["usage_allocated_bytes"] == 10 * MiB
    rows = {r["name"]: r for r in listing(mp)["snapshots"] + listing(mp)["branches"]}
    assert rows["two"]["allocated_bytes"] == 2 * MiB and rows["two"]["logical_bytes"] == GiB
    assert rows["main"]["allocated_bytes"] == 10 * MiB and rows["main"]["logical_bytes"] == 2 * GiB
    mounting.run_cowfs("branch", mp, "b2", "--from", "two")
    rows = {r["name"]: r for r in listing(mp)["branches"]}
    assert rows["b2"]["allocated_bytes"] == 2 * MiB
    mounting.run_cowfs("rollback", mp, "two")
    assert stats(mp)["usage_allocated_bytes"] == 2 * MiB
    m.remount()
    assert stats(mp)["usage_allocated_bytes"] == 2 * MiB
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(120)
def test_format_4_store_gets_allocated_usage_at_first_open(mount_factory):
    from cowfs.kv.base import Batch
    from cowfs.meta.layers import CF_META
    from cowfs.store import FORMAT_VERSION, Store

    m = mount_factory()
    with open(m.path / "sparse", "wb") as f:
        f.truncate(GiB)
        f.write(os.urandom(MiB))
    mounting.run_cowfs("snapshot", m.path, "s1")
    (m.path / "dense").write_bytes(os.urandom(3 * MiB))
    m.stop()
    st = Store(str(m.store))
    b = Batch()  # what format 4 left: (logical bytes, inodes) only
    for key, value in st.kv.scan(CF_META, b"usage/", b"usage/"):
        b.put(CF_META, key, value[:16])
    b.put(CF_META, b"format", b"4")
    st.kv.write(b)
    st.close()
    marker = m.store / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 4}))
    m.start()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION
    assert stats(m.path)["usage_allocated_bytes"] == 4 * MiB
    rows = {r["name"]: r for r in listing(m.path)["snapshots"]}
    assert rows["s1"]["allocated_bytes"] == MiB
    assert "allocated bytes counted" in m.log_text()
    m.stop()
    fsck(m.store)


# -- SEEK_DATA / SEEK_HOLE ------------------------------------------------------------------------
def fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """fallocate(2): 0, or the errno."""
    try:
        mounting.fallocate(fd, mode, off, length)
    except OSError as e:
        return e.errno
    return 0


def seek(fd: int, off: int, whence: int) -> int | str:
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return errno.errorcode[e.errno]


def data_map(fd: int) -> list[tuple[int, int]]:
    """The data regions SEEK_DATA/SEEK_HOLE report, as [start, end) pairs."""
    size = os.fstat(fd).st_size
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO, e
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        assert start < end <= size, (start, end, size)
        out.append((start, end))
        pos = end
    return out


def check_map(fd: int, content: bytes) -> list[tuple[int, int]]:
    """What any filesystem's answers must satisfy: data regions hold every nonzero byte
    (a copier that skips holes loses nothing), and cover no more than is allocated."""
    regions = data_map(fd)
    covered = bytearray(len(content))
    for a, b in regions:
        covered[a:b] = b"\1" * (b - a)
    lost = [i for i in range(0, len(content), 4096)
            if any(content[i:i + 4096]) and not all(covered[i:i + 4096][j] for j, c in
                                                      enumerate(content[i:i + 4096]) if c)]
    assert not lost, f"nonzero bytes in reported holes at {lost[:5]}"
    assert sum(b - a for a, b in regions) <= os.fstat(fd).st_blocks * 512
    return regions


class Fds:
    """Descriptors a test opens, all closed at teardown (before the mount's, so that a failed
    assertion does not leave the mount busy)."""

    def __init__(self) -> None:
        self.open: list[int] = []

    def __call__(self, path, flags=os.O_CREAT | os.O_RDWR) -> int:
        fd = os.open(path, flags, 0o644)
        self.open.append(fd)
        return fd

    def pair(self, ref: Path, mp: Path, name: str) -> tuple[int, int]:
        return self(ref / name), self(mp / name)

    def close(self, fd: int) -> None:
        self.open.remove(fd)
        os.close(fd)


@pytest.fixture
def fds():
    f = Fds()
    yield f
    for fd in f.open:
        os.close(fd)


@pytest.mark.timeout(180)
def test_seek_data_and_hole_match_ext4(cowfs_mount, test_dir, fds):
    ref, mp = test_dir / "ext4", cowfs_mount.path
    ref.mkdir()
    rnd = random.Random(3)
    # chunk-aligned data, where ext4's 4 KiB blocks and cowfs's chunks give the same answers
    layout = [(0, CHUNK), (5 * MiB, 3 * CHUNK), (40 * MiB, MiB), (100 * MiB - CHUNK, CHUNK)]
    pair = fds.pair(ref, mp, "aligned")
    for fd in pair:
        os.ftruncate(fd, 200 * MiB)
    for off, n in layout:
        data = rnd.randbytes(n)
        for fd in pair:
            os.pwrite(fd, data, off)
    # asked on the handle that wrote, before any close (the pages may not have reached the daemon)
    offsets = [0, 1, CHUNK - 1, CHUNK, 3 * MiB, 5 * MiB + CHUNK, 50 * MiB, 100 * MiB - 1, 150 * MiB,
               200 * MiB - 1, 200 * MiB, 300 * MiB, -1]
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):
        want = [seek(pair[0], o, whence) for o in offsets]
        assert [seek(pair[1], o, whence) for o in offsets] == want, whence
    assert data_map(pair[1]) == data_map(pair[0]) == [(0, CHUNK), (5 * MiB, 5 * MiB + 3 * CHUNK),
                                                      (40 * MiB, 41 * MiB), (100 * MiB - CHUNK, 100 * MiB)]
    # unaligned writes: the answers differ in granularity, never in what they promise
    pair = fds.pair(ref, mp, "unaligned")
    content = bytearray(3 * MiB)
    for off, n in [(10, 100), (70_000, 5000), (1_000_000, 200_000), (3 * MiB - 7, 7)]:
        data = rnd.randbytes(n)
        content[off:off + n] = data
        for fd in pair:
            os.pwrite(fd, data, off)
    for fd in pair:
        check_map(fd, bytes(content))
    for fd in list(fds.open):
        fds.close(fd)
    cowfs_mount.remount()
    fd = fds(mp / "aligned", os.O_RDONLY)
    assert data_map(fd)[1] == (5 * MiB, 5 * MiB + 3 * CHUNK)
    fd = fds(mp / "unaligned", os.O_RDONLY)
    assert check_map(fd, bytes(content))[0][0] == 0
    assert stats(mp)["fuse_ext"] == {"installed": True, "reason": None, "readdir_by_inode": True}


# -- fallocate ------------------------------------------------------------------------------------
def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


@pytest.mark.timeout(180)
def test_fallocate_modes_match_ext4(cowfs_mount, test_dir, fds):
    ref, mp = test_dir / "ext4", cowfs_mount.path
    ref.mkdir()
    rnd = random.Random(11)
    pair = fds.pair(ref, mp, "f")
    steps = [
        ("allocate", 0, 0, MiB),
        ("write", 100 * KiB, rnd.randbytes(300 * KiB)),
        ("allocate", FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB),           # reserved beyond EOF
        ("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 150 * KiB, 200 * KiB),
        ("zero", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 330 * KiB, 50 * KiB),
        ("zero", FALLOC_FL_ZERO_RANGE, MiB - 10 * KiB, 200 * KiB),  # grows the file
        ("allocate", 0, 4 * MiB, MiB),                               # grows it further
        ("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8 * MiB),
        ("write", 3 * MiB, rnd.randbytes(70 * KiB)),
        ("allocate", FALLOC_FL_KEEP_SIZE, 6 * MiB, 4 * MiB),
        ("truncate", 2 * MiB),                                       # gives back what lies beyond
    ]
    for step in steps:
        for fd in pair:
            if step[0] == "write":
                os.pwrite(fd, step[2], step[1])
            elif step[0] == "truncate":
                os.ftruncate(fd, step[1])
            else:
                assert fallocate(fd, *step[1:]) == 0, step
        want, got = read_all(pair[0]), read_all(pair[1])
        assert len(got) == len(want) and got == want, step
        ext4, cow = os.fstat(pair[0]).st_blocks * 512, os.fstat(pair[1]).st_blocks * 512
        assert abs(cow - ext4) <= 4 * CHUNK, (step, ext4, cow)
        check_map(pair[1], got)
    # the figures survive a remount (reservations beyond EOF included)
    assert fallocate(pair[1], FALLOC_FL_KEEP_SIZE, 2 * MiB, 3 * MiB) == 0
    before = os.fstat(pair[1]).st_blocks, read_all(pair[1])
    for fd in pair:
        fds.close(fd)
    cowfs_mount.remount()
    fd = fds(mp / "f", os.O_RDWR)
    assert (os.fstat(fd).st_blocks, read_all(fd)) == before
    assert os.fstat(fd).st_size == 2 * MiB and before[0] * 512 == 3 * MiB  # all reserved beyond EOF
    os.ftruncate(fd, MiB)
    assert os.fstat(fd).st_blocks == 0
    fds.close(fd)
    cowfs_mount.stop()
    fsck(cowfs_mount.store)


@pytest.mark.timeout(120)
def test_fallocate_errors_match_ext4(cowfs_mount, test_dir, fds):
    ref, mp = test_dir / "ext4", cowfs_mount.path
    ref.mkdir()
    for d in (ref, mp):
        (d / "f").write_bytes(b"data")
    cases = [
        ("O_RDONLY", os.O_RDONLY, 0, 0, 4096),                                   # EBADF
        ("zero length", os.O_RDWR, 0, 0, 0),                                     # EINVAL
        ("negative offset", os.O_RDWR, 0, -1, 4096),                             # EINVAL
        ("overflow", os.O_RDWR, 0, 1 << 62, 1 << 62),                            # EFBIG
        ("punch without keep_size", os.O_RDWR, FALLOC_FL_PUNCH_HOLE, 0, 4096),    # EOPNOTSUPP
        ("punch and zero", os.O_RDWR, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096),
        ("O_APPEND punch", os.O_RDWR | os.O_APPEND, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096),  # ok
    ]
    for name, flags, mode, off, length in cases:
        got = []
        for d in (ref, mp):
            fd = fds(d / "f", flags)
            got.append(errno.errorcode.get(fallocate(fd, mode, off, length), "ok"))
            fds.close(fd)
        assert got[1] == got[0], (name, got)
    # modes FUSE does not pass on (ext4 has them): EOPNOTSUPP, the file untouched
    (mp / "f").write_bytes(b"data")
    fd = fds(mp / "f", os.O_RDWR)
    assert fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096) == errno.EOPNOTSUPP
    fds.close(fd)
    assert (mp / "f").read_bytes() == b"data"
    os.mkfifo(mp / "fifo")
    fd = fds(mp / "fifo", os.O_RDWR)
    assert fallocate(fd, 0, 0, 4096) == errno.ESPIPE


@pytest.mark.timeout(180)
def test_fallocate_reserves_against_the_quota_for_an_unprivileged_user(mount_factory):
    m = mount_factory(options=["allow_other", "quota_bytes=20M"])
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    w = mounting.Worker(uid=UNPRIV_UID, gid=UNPRIV_GID, on_timeout=m.abort)
    try:
        db = w.ok("os.open", str(m.path / "db"), os.O_CREAT | os.O_RDWR, 0o644)
        assert w.call("os.posix_fallocate", db, 0, 30 * MiB) == ("err", errno.EDQUOT)
        assert os.stat(m.path / "db").st_size == 0 and allocated(m.path / "db") == 0
        w.ok("os.posix_fallocate", db, 0, 12 * MiB)                   # reserved: 12 of 20 MiB
        assert allocated(m.path / "db") == 12 * MiB
        assert stats(m.path)["usage_allocated_bytes"] == 12 * MiB
        # the rest of the quota is 8 MiB: another file gets no more ...
        other = w.ok("os.open", str(m.path / "other"), os.O_CREAT | os.O_RDWR, 0o644)
        chunk = os.urandom(MiB)
        written = 0
        while True:
            r = w.call("os.pwrite", other, chunk, written)
            if r[0] == "err":
                assert r[1] == errno.EDQUOT, r
                break
            written += r[1]
            assert written <= 8 * MiB
        assert written >= 7 * MiB
        # ... while the reserved file is written in full: its space was charged already
        for i in range(12):
            assert w.ok("os.pwrite", db, chunk, i * MiB) == MiB
        assert stats(m.path)["usage_allocated_bytes"] <= 20 * MiB
        # a reservation over data already there costs nothing; a punch gives space back
        assert w.call("os.posix_fallocate", other, 0, MiB) == ("ok", None)
        assert w.call("os.pwrite", other, chunk, written) == ("err", errno.EDQUOT)
        assert w.call("fallocate", db, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * MiB) == ("ok", None)
        assert w.ok("os.pwrite", other, chunk, written) == MiB
        for fd in (db, other):
            w.ok("os.close", fd)
    finally:
        w.close()
    m.remount()
    assert allocated(m.path / "db") == 8 * MiB
    m.stop()
    fsck(m.store)


# -- df per branch ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_df_shows_each_mounted_branch_its_own_quota_and_usage(mount_factory, test_dir):
    m = mount_factory(options=["quota_bytes=50M"])
    (m.path / "main-data").write_bytes(os.urandom(10 * MiB))
    mounting.run_cowfs("branch", m.path, "b2")
    fork = test_dir / "fork"
    fork.mkdir()
    mounting.run_cowfs("mount", m.store, fork, "--branch", "b2", "-o", "quota_bytes=20M")
    try:
        (fork / "fork-data").write_bytes(os.urandom(3 * MiB))
        (fork / "sub").mkdir()
        for path, quota, used in ((m.path, 50, 10), (fork, 20, 13), (fork / "sub", 20, 13),
                                  (fork / ".cowfs", 20, 13), (m.path / "main-data", 50, 10)):
            st = os.statvfs(path)
            assert (st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize) == (quota * MiB, used * MiB), path
            assert st.f_bavail * st.f_frsize == (quota - used) * MiB, path
    finally:
        mounting.run_cowfs("umount", fork)


# -- export ------------------------------------------------------------------------------------------
def make_islands(path: Path, size: int) -> dict[int, bytes]:
    rnd = random.Random(5)
    islands = {0: rnd.randbytes(MiB), size // 5 + 123: rnd.randbytes(3 * MiB),
               size - size // 5: rnd.randbytes(2 * MiB), size - 100: rnd.randbytes(100)}
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in islands.items():
            os.pwrite(f.fileno(), data, off)
    return islands


def check_extracted(path: Path, size: int, islands: dict[int, bytes]) -> None:
    """The same size and bytes, and sparse: nothing outside the islands' chunks is data."""
    assert os.stat(path).st_size == size
    assert allocated(path) < 16 * MiB, f"{allocated(path)} bytes allocated: the holes were filled"
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, data in islands.items():
            assert os.pread(fd, len(data), off) == data, off
        spans = [(off // CHUNK * CHUNK, -(-(off + len(data)) // CHUNK) * CHUNK) for off, data in islands.items()]
        for a, b in data_map(fd):  # data only where the islands are: the rest are holes, hence zeros
            assert any(lo <= a and b <= hi for lo, hi in spans), (a, b)
    finally:
        os.close(fd)


def export_tar(mp: Path, snapshot: str, out: Path) -> int:
    with open(out, "wb") as f:
        r = subprocess.run(mounting.cowfs_command() + ["export", str(mp), snapshot, "-"], stdout=f,
                           stderr=subprocess.PIPE, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return os.path.getsize(out)


@pytest.mark.timeout(600)
def test_export_tar_keeps_the_holes_of_a_5_gib_file(mount_factory, test_dir):
    m = mount_factory()
    size = 5 * GiB
    islands = make_islands(m.path / "big", size)
    (m.path / "notes.txt").write_text("a small file beside it\n")
    mounting.run_cowfs("snapshot", m.path, "s")
    tar = test_dir / "s.tar"
    assert export_tar(m.path, "s", tar) < 16 * MiB
    out = test_dir / "out"
    out.mkdir()
    r = subprocess.run(["tar", "-x", "--sparse", "-f", str(tar), "-C", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    check_extracted(out / "big", size, islands)
    assert (out / "notes.txt").read_text() == "a small file beside it\n"


@pytest.mark.timeout(300)
def test_without_the_fuse_extensions_the_kernel_fallbacks_hold(mount_factory, test_dir):
    """-o fuse_ext=0: what a daemon whose libfuse layout does not check out serves."""
    m = mount_factory(options=["fuse_ext=0"])
    ext = stats(m.path)["fuse_ext"]
    assert ext["installed"] is False and "fuse_ext=0" in ext["reason"]
    fd = os.open(m.path / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert fallocate(fd, 0, 0, MiB) == errno.EOPNOTSUPP
        os.ftruncate(fd, 10 * MiB)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) == 10 * MiB
    finally:
        os.close(fd)
    size = GiB
    islands = make_islands(m.path / "big", size)
    assert allocated(m.path / "big") < 16 * MiB     # st_blocks does not need the extensions
    mounting.run_cowfs("snapshot", m.path, "s")
    tar = test_dir / "s.tar"
    assert export_tar(m.path, "s", tar) < 16 * MiB  # tar found the holes by reading
    out = test_dir / "out"
    out.mkdir()
    subprocess.run(["tar", "-x", "--sparse", "-f", str(tar), "-C", str(out)], check=True, timeout=300)
    check_extracted(out / "big", size, islands)


def test_session_layout_check_refuses_what_it_does_not_know():
    """cowfs.fuse.ext writes into libfuse's session only when every check passes."""
    from cowfs.fuse import ext as fuse_ext

    class Lib:
        def __init__(self, version: int, fd: int) -> None:
            self.version, self.fd = version, fd

        def fuse_version(self) -> int:
            return self.version

        def fuse_session_fd(self, se: int) -> int:
            return self.fd

    rfd = os.open("/dev/fuse", os.O_RDWR)
    try:
        s = fuse_ext._Session()
        s.mountpoint, s.fd = b"/mnt/x", rfd
        for i, name in enumerate(fuse_ext.OPS):
            s.op[i] = 0x1000 + i if name in fuse_ext.PYFUSE3_OPS else 0
        se = ctypes.addressof(s)
        assert fuse_ext.check_session(Lib(314, rfd), se, b"/mnt/x") is None
        assert "version 315" in fuse_ext.check_session(Lib(315, rfd), se, b"/mnt/x")
        assert "fuse_session_fd" in fuse_ext.check_session(Lib(314, rfd + 1), se, b"/mnt/x")
        assert "mount point" in fuse_ext.check_session(Lib(314, rfd), se, b"/mnt/y")
        s.op[fuse_ext.OPS.index("lseek")] = 0x99
        assert "['lseek'] set" in fuse_ext.check_session(Lib(314, rfd), se, b"/mnt/x")
        s.op[fuse_ext.OPS.index("lseek")] = 0
        s.fd = 0
        assert "not /dev/fuse" in fuse_ext.check_session(Lib(314, 0), se, b"/mnt/x")
    finally:
        os.close(rfd)
