"""POSIX details on a real cowfs mount, one behaviour per test.

Operations that involve another user run in a :class:`mounting.Worker` that dropped to an
unprivileged uid (the mount then uses ``-o allow_other``).  Everything else runs in the test
process; the mount's watchdog aborts a hung daemon before pytest-timeout fires, so a hang shows
up as a failure with the daemon's stack dump in its log.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import threading
import time

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Worker, utimensat

CLOCK_REALTIME_COARSE = 5  # Linux; not in Python's time module

GiB = 1 << 30
MiB = 1 << 20


# ---- helpers ---------------------------------------------------------------------------------

def errno_of(fn, *args, **kw):
    """Run fn and return the errno it failed with (None if it succeeded)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return None


def ename(e):
    return errno.errorcode.get(e, str(e)) if e is not None else "success"


def write_file(path, data=b"", mode=0o644):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def other_user(mount_factory):
    """(mount with allow_other, worker running as the unprivileged uid, a dir it owns)."""
    m = mount_factory(options=["allow_other"])
    w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID, umask=0o022, on_timeout=m.abort)
    d = m.path / "user"
    os.mkdir(d)
    os.chown(d, UNPRIV_UID, UNPRIV_GID)
    os.chmod(d, 0o755)
    r = w.call("os.listdir", str(d))
    assert r[0] == "ok", (f"uid {UNPRIV_UID} cannot list its own directory on a mount made "
                          f"with -o allow_other: {ename(r[1])}")
    yield m, w, d
    w.close()


# ---- names -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_name_too_long(cowfs_mount):
    mp = cowfs_mount.path
    ok255 = "n" * 255
    long256 = "n" * 256
    long_utf8 = "é" * 128          # 256 bytes
    write_file(mp / "existing", b"x")
    os.mkdir(mp / "dir")
    # 255 bytes is fine (also in UTF-8)
    write_file(mp / ok255, b"ok")
    assert read_file(mp / ok255) == b"ok"
    assert ok255 in os.listdir(mp)
    os.unlink(mp / ok255)
    utf255 = "é" * 127 + "x"
    os.mkdir(mp / utf255)
    assert utf255 in os.listdir(mp)
    os.rmdir(mp / utf255)
    for name in (long256, long_utf8, "n" * 1000, "n" * 1500):
        cases = {
            "open(O_CREAT)": lambda: os.close(os.open(mp / name, os.O_CREAT | os.O_WRONLY, 0o644)),
            "mkdir": lambda: os.mkdir(mp / name),
            "rename target": lambda: os.rename(mp / "existing", mp / name),
            "rename dir target": lambda: os.rename(mp / "dir", mp / name),
            "symlink (new name)": lambda: os.symlink("existing", mp / name),
            "link (new name)": lambda: os.link(mp / "existing", mp / name),
            "mknod fifo": lambda: os.mkfifo(mp / name),
            "stat": lambda: os.stat(mp / name),
            "open existing": lambda: os.open(mp / name, os.O_RDONLY),
        }
        got = {what: errno_of(fn) for what, fn in cases.items()}
        bad = {w: ename(e) for w, e in got.items() if e != errno.ENAMETOOLONG}
        assert not bad, (f"{len(name.encode())}-byte name: expected ENAMETOOLONG for every "
                         f"operation, got {bad}")
    # nothing was created by the failed calls
    assert sorted(os.listdir(mp)) == ["dir", "existing"]
    # a symlink *target* may be long (it is not a name)
    os.symlink("t" * 300, mp / "longtarget")
    assert os.readlink(mp / "longtarget") == "t" * 300


# ---- special files ---------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_mknod_devices_fifo_socket(cowfs_mount):
    mp = cowfs_mount.path
    specs = {
        "chr": (stat.S_IFCHR | 0o620, os.makedev(1, 3)),
        "blk": (stat.S_IFBLK | 0o640, os.makedev(7, 42)),
        "fifo": (stat.S_IFIFO | 0o600, 0),
        "sock": (stat.S_IFSOCK | 0o755, 0),
    }
    old = os.umask(0)
    try:
        for name, (mode, dev) in specs.items():
            os.mknod(mp / name, mode, dev)
    finally:
        os.umask(old)

    def check(when):
        for name, (mode, dev) in specs.items():
            st = os.lstat(mp / name)
            assert st.st_mode == mode, (f"{when}: {name}: mode {oct(st.st_mode)}, "
                                        f"expected {oct(mode)}")
            if dev:
                assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == \
                    (os.major(dev), os.minor(dev)), f"{when}: {name}: rdev {st.st_rdev:#x}"
            assert st.st_size == 0, f"{when}: {name}: size {st.st_size}"
    check("after mknod")
    # the mount is nodev by default: device nodes cannot be opened
    e = errno_of(os.open, mp / "chr", os.O_RDONLY)
    assert e == errno.EACCES, f"opening a char device on a nodev mount: {ename(e)}, want EACCES"
    # the FIFO works as a FIFO (handled by the kernel)
    r = os.open(mp / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(mp / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through the fifo")
    assert os.read(r, 100) == b"through the fifo"
    os.close(w)
    os.close(r)
    # a socket node can be bound to? No: bind() creates its own node; connecting to a bare
    # node gives ECONNREFUSED.
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        e = errno_of(s.connect, str(mp / "sock"))
    finally:
        s.close()
    assert e == errno.ECONNREFUSED, f"connect to a socket node: {ename(e)}"
    cowfs_mount.remount()
    check("after remount")


@pytest.mark.timeout(60)
def test_unix_socket_bind_on_mount(cowfs_mount):
    import socket
    p = str(cowfs_mount.path / "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(p)
    srv.listen(1)
    try:
        assert stat.S_ISSOCK(os.lstat(p).st_mode)
        cli = socket.socket(socket.AF_UNIX)
        cli.settimeout(10)
        cli.connect(p)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli.close()
    finally:
        srv.close()
    os.unlink(p)


# ---- open-unlinked files ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_unlinked_open_file_stays_usable(cowfs_mount):
    mp = cowfs_mount.path
    p = mp / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"A" * 100_000)
        os.unlink(p)
        assert not os.path.lexists(p)
        st = os.fstat(fd)
        assert st.st_nlink == 0, f"fstat after unlink: st_nlink={st.st_nlink}, expected 0"
        assert st.st_size == 100_000
        assert os.pread(fd, 10, 99_995) == b"A" * 5
        os.pwrite(fd, b"B" * 70_000, 90_000)
        assert os.fstat(fd).st_size == 160_000
        data = os.pread(fd, 200_000, 0)
        assert data == b"A" * 90_000 + b"B" * 70_000
        os.ftruncate(fd, 10)
        assert os.pread(fd, 100, 0) == b"A" * 10
        # a new file under the same name is a different file
        write_file(p, b"new")
        assert os.pread(fd, 100, 0) == b"A" * 10
        assert read_file(p) == b"new"
        assert os.stat(p).st_ino != os.fstat(fd).st_ino
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_file(p) == b"new"
    # with two names, unlinking one leaves nlink 1
    os.link(p, mp / "g")
    assert os.stat(p).st_nlink == 2
    fd = os.open(mp / "g", os.O_RDONLY)
    try:
        os.unlink(mp / "g")
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(p).st_nlink == 1
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_unlinked_fifo_and_directory_keep_their_attributes(cowfs_mount):
    """The kernel sends no OPEN for a FIFO (nor keeps one for a removed directory): after the
    last name goes, fstat and fchmod on the open fd still work, as on ext4 (found by the
    differential test)."""
    mp = cowfs_mount.path
    os.mkfifo(mp / "p", 0o600)
    fd = os.open(mp / "p", os.O_RDONLY | os.O_NONBLOCK)
    os.mkdir(mp / "d", 0o750)
    dfd = os.open(mp / "d", os.O_RDONLY)
    try:
        os.unlink(mp / "p")
        os.rmdir(mp / "d")
        st = os.fstat(fd)
        assert stat.S_ISFIFO(st.st_mode) and st.st_nlink == 0
        os.fchmod(fd, 0o644)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o644
        st = os.fstat(dfd)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_nlink == 0
        os.fchmod(dfd, 0o700)
        assert stat.S_IMODE(os.fstat(dfd).st_mode) == 0o700
    finally:
        os.close(fd)
        os.close(dfd)
    assert sorted(os.listdir(mp)) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dir_cache", ["1", "0"])
def test_directory_removed_while_open_goes_when_closed(mount_factory, dir_cache):
    """With OPENDIR served (-o dir_cache=0), rmdir of a directory someone has open keeps it
    (an orphan) until its handle closes; then it must go (RELEASEDIR once only decremented
    the open count, so the orphan stayed counted until the next mount: `shutil.rmtree` hits
    this when rmdir overtakes the RELEASEDIR of the fd it just closed).  With OPENDIR
    declined (the default: cowfs.fuse.ops) the daemon does not know the directory is open,
    and it goes at once; the open descriptor still stats and lists it (empty)."""
    mp = mount_factory(options=(f"dir_cache={dir_cache}",)).path

    def inodes() -> int:
        return mounting.stats(mp)["usage_inodes"]

    base = inodes()
    os.mkdir(mp / "d")
    dfd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(mp / "d")
        if dir_cache == "0":
            assert inodes() == base + 1  # still open: still counted, like an open unlinked file
        else:
            assert inodes() == base
        assert os.listdir(dfd) == [] and stat.S_ISDIR(os.fstat(dfd).st_mode)
    finally:
        os.close(dfd)
    deadline = time.monotonic() + 10
    while inodes() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inodes() == base


@pytest.mark.timeout(60)
def test_unlinked_open_file_survives_rename_over(cowfs_mount):
    """rename() over a file that is still open must not lose the open file's data."""
    mp = cowfs_mount.path
    write_file(mp / "old", b"old contents")
    write_file(mp / "new", b"new contents")
    fd = os.open(mp / "old", os.O_RDWR)
    try:
        os.rename(mp / "new", mp / "old")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"old contents"
        os.pwrite(fd, b"OLD", 0)
        assert os.pread(fd, 100, 0) == b"OLD contents"
    finally:
        os.close(fd)
    assert read_file(mp / "old") == b"new contents"
    assert os.listdir(mp) == ["old"]


# ---- timestamps ------------------------------------------------------------------------------

TIMES = {
    "epoch": 0,
    "ns precision": 1_234_567_890_123_456_789,
    "just after 2038": 2_147_483_648 * 10**9 + 1,
    "year 2100": 4_102_444_800 * 10**9 + 999_999_999,
    "before 1970": -1 * 10**9 + 1,          # 1969-12-31T23:59:59.000000001
    "year 1960": -315_619_200 * 10**9 + 500,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("label", list(TIMES))
def test_timestamps_exact(cowfs_mount, label):
    t = TIMES[label]
    p = cowfs_mount.path / "f"
    write_file(p, b"x")
    os.utime(p, ns=(t + 7, t))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (t + 7, t), \
        f"set atime={t + 7} mtime={t}, stat gives atime={st.st_atime_ns} mtime={st.st_mtime_ns}"
    cowfs_mount.remount()
    st = os.stat(p)
    assert st.st_mtime_ns == t, f"after remount mtime={st.st_mtime_ns}, expected {t}"
    assert st.st_atime_ns == t + 7, f"after remount atime={st.st_atime_ns}, expected {t + 7}"


@pytest.mark.timeout(60)
def test_utime_now_and_omit(cowfs_mount):
    mp = cowfs_mount.path
    p = mp / "f"
    write_file(p, b"x")
    old_a, old_m = 1_000_000_000_111, 2_000_000_000_222
    os.utime(p, ns=(old_a, old_m))
    # OMIT atime, set mtime
    utimensat(str(p), "omit", 3_000_000_000_333)
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (old_a, 3_000_000_000_333), \
        f"UTIME_OMIT atime: got atime={st.st_atime_ns} mtime={st.st_mtime_ns}"
    # set atime, OMIT mtime
    utimensat(str(p), 4_000_000_000_444, "omit")
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (4_000_000_000_444, 3_000_000_000_333), \
        f"UTIME_OMIT mtime: got atime={st.st_atime_ns} mtime={st.st_mtime_ns}"
    # NOW for mtime only
    before = time.time_ns()
    utimensat(str(p), "omit", "now")
    after = time.time_ns()
    st = os.stat(p)
    assert st.st_atime_ns == 4_000_000_000_444, f"UTIME_OMIT atime changed: {st.st_atime_ns}"
    assert before - 20_000_000 <= st.st_mtime_ns <= after + 20_000_000, \
        f"UTIME_NOW mtime {st.st_mtime_ns} not within [{before}, {after}]"
    # NOW for both (utime(path, None))
    before = time.time_ns()
    os.utime(p)
    after = time.time_ns()
    st = os.stat(p)
    for f in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        v = getattr(st, f)
        assert before - 20_000_000 <= v <= after + 20_000_000, f"{f}={v} not in [{before}, {after}]"
    # OMIT both: nothing changes, not even ctime
    st0 = os.stat(p)
    time.sleep(0.01)
    utimensat(str(p), "omit", "omit")
    st1 = os.stat(p)
    assert (st1.st_atime_ns, st1.st_mtime_ns, st1.st_ctime_ns) == \
        (st0.st_atime_ns, st0.st_mtime_ns, st0.st_ctime_ns)
    # futimens through a file descriptor
    fd = os.open(p, os.O_RDWR)
    try:
        mounting.futimens(fd, 5_000_000_000_555, 6_000_000_000_666)
        st = os.fstat(fd)
        assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000_555, 6_000_000_000_666)
    finally:
        os.close(fd)
    # lutimes on a symlink changes the link, not its target
    os.symlink("f", mp / "l")
    os.utime(mp / "l", ns=(7_000_000_000_777, 8_000_000_000_888), follow_symlinks=False)
    assert os.lstat(mp / "l").st_mtime_ns == 8_000_000_000_888
    assert os.stat(p).st_mtime_ns == 6_000_000_000_666


def _times(p, follow=False):
    st = os.stat(p, follow_symlinks=follow)
    return st.st_mtime_ns, st.st_ctime_ns


@pytest.mark.timeout(90)
def test_timestamps_change_as_posix_says(cowfs_mount):
    """For each operation: which of (mtime, ctime) of the file and its parent must change.

    ``None`` = not checked (POSIX leaves it open, e.g. ctime of a renamed file)."""
    mp = cowfs_mount.path
    os.mkdir(mp / "d")
    os.mkdir(mp / "e")
    write_file(mp / "d/f", b"content")
    write_file(mp / "d/g", b"content")
    failures = []

    def check(label, op, expect):
        before = {p: _times(p) for p in expect}
        time.sleep(0.02)
        op()
        for p, (want_m, want_c) in expect.items():
            after = _times(p)
            got_m, got_c = after[0] != before[p][0], after[1] != before[p][1]
            rel = os.path.relpath(p, mp)
            if want_m is not None and got_m != want_m:
                failures.append(f"{label}: mtime of {rel} {'changed' if got_m else 'did not change'}"
                                f" (expected {'a change' if want_m else 'no change'})")
            if want_c is not None and got_c != want_c:
                failures.append(f"{label}: ctime of {rel} {'changed' if got_c else 'did not change'}"
                                f" (expected {'a change' if want_c else 'no change'})")

    d, e, f, g = mp / "d", mp / "e", mp / "d/f", mp / "d/g"
    Y, N = True, False
    check("create file", lambda: write_file(d / "new", b""), {d: (Y, Y)})
    check("write", lambda: _append(f, b"more"), {f: (Y, Y), d: (N, N)})
    check("truncate (size change)", lambda: os.truncate(f, 3), {f: (Y, Y), d: (N, N)})
    check("ftruncate (size change)", lambda: _ftruncate(f, 1), {f: (Y, Y)})
    check("open O_TRUNC", lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)),
          {f: (Y, Y)})
    check("read", lambda: read_file(g), {g: (N, N), d: (N, N)})
    check("chmod", lambda: os.chmod(f, 0o600), {f: (N, Y), d: (N, N)})
    check("chown", lambda: os.chown(f, 1234, 5678), {f: (N, Y), d: (N, N)})
    check("setxattr", lambda: os.setxattr(f, "user.x", b"1"), {f: (N, Y)})
    check("removexattr", lambda: os.removexattr(f, "user.x"), {f: (N, Y)})
    check("link", lambda: os.link(f, e / "f2"), {f: (N, Y), e: (Y, Y), d: (N, N)})
    check("unlink one of two links", lambda: os.unlink(e / "f2"), {f: (N, Y), e: (Y, Y)})
    check("symlink", lambda: os.symlink("f", d / "sl"), {d: (Y, Y)})
    check("mkdir", lambda: os.mkdir(d / "sub"), {d: (Y, Y)})
    check("rmdir", lambda: os.rmdir(d / "sub"), {d: (Y, Y)})
    check("unlink", lambda: os.unlink(d / "new"), {d: (Y, Y)})
    check("rename within dir", lambda: os.rename(g, d / "g2"), {d: (Y, Y)})
    check("rename across dirs", lambda: os.rename(d / "g2", e / "g"),
          {d: (Y, Y), e: (Y, Y)})
    before = os.stat(e / "g").st_mtime_ns
    check("rename back", lambda: os.rename(e / "g", d / "g"), {d: (Y, Y), e: (Y, Y)})
    if os.stat(d / "g").st_mtime_ns != before:
        failures.append("rename: the mtime of the moved file changed")
    check("rename over existing file", lambda: os.rename(d / "g", f), {d: (Y, Y)})
    check("mknod fifo", lambda: os.mkfifo(d / "fifo"), {d: (Y, Y)})
    check("utime", lambda: os.utime(f, ns=(1, 2)), {f: (None, Y), d: (N, N)})
    assert not failures, "timestamp behaviour differs from POSIX:\n  " + "\n  ".join(failures)


def _append(p, data):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _ftruncate(p, size):
    fd = os.open(p, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_timestamps_never_go_back_and_persist(cowfs_mount):
    """mtime/ctime never decrease over a sequence of operations, and what stat showed before
    unmounting is what stat shows after mounting again."""
    mp = cowfs_mount.path
    p = mp / "f"
    steps = [
        ("create", lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))),
        ("setxattr", lambda: os.setxattr(p, "user.a", b"1")),
        ("truncate to the same size", lambda: os.truncate(p, 0)),
        ("REMOUNT", None),
        ("write", lambda: _append(p, b"data")),
        ("chmod", lambda: os.chmod(p, 0o600)),
        ("truncate", lambda: os.truncate(p, 2)),
        ("utime now", lambda: os.utime(p)),
        ("write again", lambda: _append(p, b"more")),
        ("ftruncate to the same size", lambda: _ftruncate(p, 6)),
        ("rename", lambda: os.rename(p, mp / "g")),
        ("rename back", lambda: os.rename(mp / "g", p)),
        ("link", lambda: os.link(p, mp / "h")),
        ("unlink the other link", lambda: os.unlink(mp / "h")),
    ]
    problems = []
    prev = None
    def remount_and_compare(after_what):
        before = os.stat(p)
        cowfs_mount.remount()
        after = os.stat(p)
        for f in ("st_mtime_ns", "st_ctime_ns", "st_atime_ns", "st_size", "st_mode"):
            if getattr(before, f) != getattr(after, f):
                problems.append(f"after {after_what}: {f} before unmount {getattr(before, f)}, "
                                f"after mount {getattr(after, f)}")

    for i, (label, op) in enumerate(steps):
        if label == "REMOUNT":
            remount_and_compare(steps[i - 1][0])
            continue
        op()
        st = os.stat(mp / "g") if label == "rename" else os.stat(p)
        cur = (st.st_mtime_ns, st.st_ctime_ns)
        if prev is not None:
            if cur[0] < prev[0]:
                problems.append(f"after {label}: mtime went back from {prev[0]} to {cur[0]}")
            if cur[1] < prev[1]:
                problems.append(f"after {label}: ctime went back from {prev[1]} to {cur[1]}")
        prev = cur
    remount_and_compare(steps[-1][0])
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_truncating_open_keeps_the_kernels_mtime(cowfs_mount, tmp_path):
    """An append then, in the same tick, a truncating open and a write: the kernel's clock
    (Linux >= 6.13: coarse, raised to the last fine-grained time handed out, here by
    chmods of a stat'ed file on tmp_path's filesystem) runs ahead of the daemon's coarse one,
    so the kernel keeps the append's mtime and ctime and sends none; a snapshot must show
    the times the live mount shows (the daemon stamped its own, earlier, time: a CI failure of
    tests/test_history.py)."""
    from cowfs import api
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    f = cowfs_mount.path / "f"
    f.write_bytes(b"a")
    ahead, wrong = 0, []
    for i in range(300):
        time.sleep(0.005)
        os.chmod(probe, 0o600)  # a new ctime; stat'ed; changed again in the same tick: a
        os.stat(probe)  # fine-grained ctime, which raises the kernel's clock of every file
        os.chmod(probe, 0o644)
        _append(f, b"more\n")
        ahead += os.stat(f).st_mtime_ns > time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
        with open(f, "wb") as h:
            h.write(b"new %d" % i)
        api.control(cowfs_mount.path, "snapshot", f"s{i}")
        st, ss = os.stat(f), os.stat(cowfs_mount.path / ".cowfs" / "snapshots" / f"s{i}" / "f")
        live, snap = (st.st_mtime_ns, st.st_ctime_ns), (ss.st_mtime_ns, ss.st_ctime_ns)
        if live != snap:
            wrong.append((i, live, snap))
        if ahead >= 20:
            break
    if not ahead:
        pytest.skip("the kernel's file clock never ran ahead of the coarse clock (Linux < 6.13?)")
    assert not wrong, f"{len(wrong)} of {i + 1} snapshots (the kernel ahead {ahead} times): {wrong[:5]}"


@pytest.mark.timeout(60)
def test_new_file_times_are_now(cowfs_mount):
    before = time.time_ns()
    write_file(cowfs_mount.path / "f", b"x")
    os.mkdir(cowfs_mount.path / "d")
    after = time.time_ns()
    for n in ("f", "d"):
        st = os.stat(cowfs_mount.path / n)
        for f in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            v = getattr(st, f)
            assert before - 20_000_000 <= v <= after + 20_000_000, \
                f"{n}: {f}={v} is not the creation time (between {before} and {after})"


# ---- setuid / setgid -------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_write_by_non_root_clears_setuid_setgid(other_user):
    m, w, d = other_user
    results = {}
    for name, owner, mode in (("own-6777", UNPRIV_UID, 0o6777), ("root-6777", 0, 0o6777),
                              ("own-4755", UNPRIV_UID, 0o4755), ("own-2775", UNPRIV_UID, 0o2775)):
        p = d / name
        write_file(p, b"data")
        os.chown(p, owner, UNPRIV_GID)
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
        r = w.call("write_file", str(p), os.O_WRONLY, 0, 4, b"more")
        assert r == ("ok", 4), f"{name}: write by uid {UNPRIV_UID} failed: {r}"
        results[name] = stat.S_IMODE(os.stat(p).st_mode)
    expected = {"own-6777": 0o0777, "root-6777": 0o0777, "own-4755": 0o0755,
                "own-2775": 0o0775}
    wrong = {n: f"{oct(results[n])} (expected {oct(v)})" for n, v in expected.items()
             if results[n] != v}
    assert not wrong, f"mode after a write by a non-root user: {wrong}"
    # truncate by a non-root user clears them as well
    p = d / "trunc"
    write_file(p, b"data")
    os.chown(p, UNPRIV_UID, UNPRIV_GID)
    os.chmod(p, 0o6777)
    assert w.call("os.truncate", str(p), 1) == ("ok", None)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o777, \
        f"truncate by non-root left mode {oct(stat.S_IMODE(os.stat(p).st_mode))}"


@pytest.mark.timeout(60)
def test_chown_clears_setuid_setgid(cowfs_mount):
    mp = cowfs_mount.path
    cases = {"6755": (0o6755, 0o0755), "4755": (0o4755, 0o0755), "2755": (0o2755, 0o0755),
             # setgid without group-exec is mandatory locking, not 'setgid': kept
             "2745": (0o2745, 0o2745)}
    wrong = {}
    for name, (mode, want) in cases.items():
        p = mp / name
        write_file(p, b"x")
        os.chmod(p, mode)
        os.chown(p, 1000, 1000)
        got = stat.S_IMODE(os.stat(p).st_mode)
        if got != want:
            wrong[name] = f"{oct(got)} (expected {oct(want)})"
    # directories keep their setgid bit on chown
    os.mkdir(mp / "dir")
    os.chmod(mp / "dir", 0o2755)
    os.chown(mp / "dir", 1000, 1000)
    if stat.S_IMODE(os.stat(mp / "dir").st_mode) != 0o2755:
        wrong["dir 2755"] = oct(stat.S_IMODE(os.stat(mp / "dir").st_mode))
    assert not wrong, f"mode after chown by root: {wrong}"


# ---- sizes -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_truncate_to_absurd_size(cowfs_mount):
    p = cowfs_mount.path / "huge"
    write_file(p, b"head")
    size = 2 ** 62
    e = errno_of(os.truncate, p, size)
    if e is not None:
        assert e in (errno.EFBIG, errno.EINVAL), f"truncate to 2**62 failed with {ename(e)}"
        assert os.stat(p).st_size == 4, "a failed truncate changed the size"
        assert read_file(p) == b"head"
    else:
        assert os.stat(p).st_size == size, f"truncate(2**62) ok, but st_size={os.stat(p).st_size}"
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.pread(fd, 8, 0) == b"head\0\0\0\0"
            assert os.pread(fd, 10, size - 4) == b"\0" * 4
            assert os.pread(fd, 10, size) == b""
        finally:
            os.close(fd)
        os.truncate(p, 4)
        assert read_file(p) == b"head"
    # beyond the largest offset the kernel allows
    e = errno_of(os.truncate, p, 2 ** 63 - 1)
    assert e in (None, errno.EFBIG, errno.EINVAL), f"truncate to 2**63-1: {ename(e)}"


@pytest.mark.timeout(120)
def test_file_larger_than_4gib(cowfs_mount):
    p = cowfs_mount.path / "big"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"start", 0)
        os.pwrite(fd, b"across-4GiB", 4 * GiB - 5)
        os.pwrite(fd, b"at-5GiB", 5 * GiB)
        assert os.fstat(fd).st_size == 5 * GiB + 7
        assert os.pread(fd, 11, 4 * GiB - 5) == b"across-4GiB"
        assert os.pread(fd, 100, 5 * GiB) == b"at-5GiB"
        assert os.pread(fd, 16, 3 * GiB) == b"\0" * 16
        assert os.pread(fd, 5, 0) == b"start"
    finally:
        os.close(fd)
    cowfs_mount.remount()
    assert os.stat(p).st_size == 5 * GiB + 7
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 5 * GiB) == b"at-5GiB"
        assert os.pread(fd, 11, 4 * GiB - 5) == b"across-4GiB"
        os.lseek(fd, 5 * GiB + 3, os.SEEK_SET)
        assert os.read(fd, 100) == b"5GiB"
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_sparse_files(cowfs_mount):
    mp = cowfs_mount.path
    dense = mp / "dense"
    write_file(dense, random.Random(1).randbytes(MiB))
    sparse = mp / "sparse"
    fd = os.open(sparse, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, 100 * MiB)
        os.pwrite(fd, b"middle", 50 * MiB)
        os.pwrite(fd, b"end", 100 * MiB - 3)
    finally:
        os.close(fd)
    assert os.stat(sparse).st_size == 100 * MiB
    # reading the holes gives zeros (read all of it, in big chunks)
    h = hashlib.sha256()
    with open(sparse, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    want = hashlib.sha256()
    zero = bytes(4 * MiB)
    buf = bytearray(100 * MiB)
    buf[50 * MiB:50 * MiB + 6] = b"middle"
    buf[-3:] = b"end"
    want.update(buf)
    del zero
    assert h.hexdigest() == want.hexdigest(), "the contents of the sparse file are wrong"
    blocks_sparse = os.stat(sparse).st_blocks
    blocks_dense = os.stat(dense).st_blocks
    if blocks_sparse * 512 >= 100 * MiB:
        pytest.skip(f"cowfs derives st_blocks from st_size ({blocks_sparse} blocks for "
                    f"100 MiB), not from stored data: only the zero-reads were checked")
    assert blocks_dense * 512 >= MiB // 2, \
        f"1 MiB of random data reports only {blocks_dense} blocks"
    assert blocks_sparse * 512 <= 8 * MiB, \
        f"a 100 MiB file with 9 bytes of data reports {blocks_sparse} blocks"


# ---- permissions -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_mode_000_file_writable_through_creating_handle(other_user):
    m, w, d = other_user
    p = str(d / "f")
    fd = w.ok("os.open", p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o000)
    try:
        r = w.call("os.write", fd, b"written through the creating handle")
        assert r[0] == "ok", f"write through the handle that created a 0000 file: {ename(r[1])}"
        assert w.ok("os.pread", fd, 100, 0) == b"written through the creating handle"
        assert stat.S_IMODE(w.ok("fstat", fd)["mode"]) == 0
    finally:
        w.ok("os.close", fd)
    r = w.call("os.open", p, os.O_RDONLY)
    assert r == ("err", errno.EACCES), f"reopening a 0000 file as its (non-root) owner: {r}"
    assert read_file(p) == b"written through the creating handle"   # root may


@pytest.mark.timeout(60)
def test_permission_checks_for_other_user(other_user):
    m, w, d = other_user
    # a root-owned 0700 dir: the user cannot enter, list or create in it
    os.mkdir(d / "private", 0o700)
    write_file(d / "private/secret", b"s", 0o644)
    expect = {
        ("os.listdir", str(d / "private")): errno.EACCES,
        ("os.stat", str(d / "private/secret")): errno.EACCES,
        ("os.mkdir", str(d / "private/x")): errno.EACCES,
    }
    # own dir chmod 000: create in it fails, even though the user owns it
    os.mkdir(d / "locked")
    os.chown(d / "locked", UNPRIV_UID, UNPRIV_GID)
    os.chmod(d / "locked", 0o000)
    expect[("write_file", str(d / "locked/x"), os.O_CREAT | os.O_WRONLY, 0o644, 0, b"")] = \
        errno.EACCES
    # own dir 0555: unlink in it fails
    os.mkdir(d / "ro")
    write_file(d / "ro/f")
    os.chown(d / "ro", UNPRIV_UID, UNPRIV_GID)
    os.chmod(d / "ro", 0o555)
    expect[("os.unlink", str(d / "ro/f"))] = errno.EACCES
    # root-owned 0644 file: no write, no chmod, no chown, no utime to a given time
    write_file(d / "rootfile", b"r", 0o644)
    expect[("write_file", str(d / "rootfile"), os.O_WRONLY, 0, 0, b"x")] = errno.EACCES
    expect[("os.chmod", str(d / "rootfile"), 0o777)] = errno.EPERM
    expect[("os.chown", str(d / "rootfile"), UNPRIV_UID, UNPRIV_GID)] = errno.EPERM
    expect[("utimensat", str(d / "rootfile"), 1, 1)] = errno.EPERM
    expect[("utimensat", str(d / "rootfile"), "now", "now")] = errno.EACCES
    # giving a file away is not allowed
    write_file(d / "mine")
    os.chown(d / "mine", UNPRIV_UID, UNPRIV_GID)
    expect[("os.chown", str(d / "mine"), 0, -1)] = errno.EPERM
    expect[("os.chown", str(d / "mine"), -1, 0)] = errno.EPERM
    # sticky dir: cannot remove someone else's file
    os.mkdir(d / "tmp")
    os.chmod(d / "tmp", 0o1777)
    write_file(d / "tmp/roots", b"", 0o666)
    os.chmod(d / "tmp/roots", 0o666)
    expect[("os.unlink", str(d / "tmp/roots"))] = errno.EPERM
    expect[("os.rename", str(d / "tmp/roots"), str(d / "tmp/x"))] = errno.EPERM
    wrong = {}
    for call, want in expect.items():
        r = w.call(*call)
        got = r[1] if r[0] == "err" else None
        if got != want:
            wrong[f"{call[0]}{tuple(os.path.relpath(a, d) if isinstance(a, str) and a.startswith(str(d)) else a for a in call[1:])}"] = \
                f"{ename(got)} (expected {ename(want)})"
    # and the allowed ones
    assert w.call("write_file", str(d / "tmp/roots"), os.O_WRONLY, 0, 0, b"ok")[0] == "ok"
    assert w.call("os.chmod", str(d / "mine"), 0o600) == ("ok", None)
    assert w.call("utimensat", str(d / "mine"), 5, 5) == ("ok", None)
    assert not wrong, f"permission checks for uid {UNPRIV_UID}: {wrong}"


@pytest.mark.timeout(60)
def test_access(other_user):
    m, w, d = other_user
    write_file(d / "r600", b"", 0o600)          # root's
    write_file(d / "r644", b"", 0o644)
    write_file(d / "r755", b"", 0o755)
    write_file(d / "r644x", b"", 0o644)
    os.mkdir(d / "noexec", 0o700)
    write_file(d / "noexec/f", b"", 0o777)
    os.chmod(d / "r600", 0o600)
    os.chmod(d / "r644", 0o644)
    os.chmod(d / "r755", 0o755)
    as_user = {
        ("r600", os.R_OK): False, ("r644", os.R_OK): True, ("r644", os.W_OK): False,
        ("r755", os.X_OK): True, ("r644", os.X_OK): False, ("r644", os.F_OK): True,
        ("noexec/f", os.F_OK): False, ("missing", os.F_OK): False,
    }
    as_root = {
        ("r600", os.R_OK | os.W_OK): True, ("r644", os.X_OK): False, ("r755", os.X_OK): True,
        ("noexec/f", os.R_OK): True,
    }
    wrong = []
    for (n, mode), want in as_user.items():
        got = w.ok("os.access", str(d / n), mode)
        if got != want:
            wrong.append(f"uid {UNPRIV_UID}: access({n}, {mode}) = {got}, expected {want}")
    for (n, mode), want in as_root.items():
        got = os.access(d / n, mode)
        if got != want:
            wrong.append(f"root: access({n}, {mode}) = {got}, expected {want}")
    assert not wrong, "\n".join(wrong)


# ---- ownership -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_new_files_get_callers_uid_gid(mount_factory):
    m = mount_factory(options=["allow_other"])
    d = m.path / "shared"
    os.mkdir(d)
    os.chmod(d, 0o777)
    # a gid different from the uid, to see that the gid is really the caller's
    w = Worker(uid=UNPRIV_UID, gid=4321, umask=0o022, on_timeout=m.abort)
    try:
        w.ok("write_file", str(d / "file"), os.O_CREAT | os.O_WRONLY, 0o644, 0, b"x")
        w.ok("os.mkdir", str(d / "dir"), 0o755)
        w.ok("os.symlink", "file", str(d / "link"))
        w.ok("os.mkfifo", str(d / "fifo"), 0o644)
        w.ok("os.mknod", str(d / "node"), stat.S_IFREG | 0o644)
    finally:
        w.close()
    write_file(d / "rootfile")
    wrong = {}
    for n in ("file", "dir", "link", "fifo", "node"):
        st = os.lstat(d / n)
        if (st.st_uid, st.st_gid) != (UNPRIV_UID, 4321):
            wrong[n] = (st.st_uid, st.st_gid)
    st = os.lstat(d / "rootfile")
    if (st.st_uid, st.st_gid) != (0, 0):
        wrong["rootfile"] = (st.st_uid, st.st_gid)
    assert not wrong, f"owner (uid, gid) of new entries, expected ({UNPRIV_UID}, 4321) " \
                      f"for the user's and (0, 0) for root's: {wrong}"


@pytest.mark.timeout(60)
def test_setgid_directory_inheritance(other_user):
    m, w, d = other_user
    sg = d / "sg"
    os.mkdir(sg)
    os.chown(sg, 0, 4242)
    os.chmod(sg, 0o2777)
    w.ok("write_file", str(sg / "file"), os.O_CREAT | os.O_WRONLY, 0o644, 0, b"x")
    w.ok("os.mkdir", str(sg / "sub"), 0o755)
    w.ok("os.mkfifo", str(sg / "fifo"), 0o644)
    write_file(sg / "rootfile")
    os.mkdir(sg / "rootsub", 0o700)
    got = {n: (os.lstat(sg / n).st_gid, oct(stat.S_IMODE(os.lstat(sg / n).st_mode)))
           for n in ("file", "sub", "fifo", "rootfile", "rootsub")}
    wrong = {}
    for n, (gid, mode) in got.items():
        if gid != 4242:
            wrong[n] = f"gid {gid} (expected 4242 from the setgid directory)"
    for n in ("sub", "rootsub"):
        if not os.stat(sg / n).st_mode & stat.S_ISGID:
            wrong[n + " mode"] = f"{got[n][1]}: subdirectory did not inherit the setgid bit"
    if os.stat(sg / "file").st_mode & stat.S_ISGID:
        wrong["file mode"] = f"{got['file'][1]}: a plain file got the setgid bit"
    assert not wrong, wrong
    # a subdirectory of the subdirectory still inherits
    w.ok("os.mkdir", str(sg / "sub/deeper"), 0o755)
    st = os.stat(sg / "sub/deeper")
    assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID, (st.st_gid, oct(st.st_mode))


@pytest.mark.timeout(60)
def test_setgid_bit_of_new_file_kept_outside_setgid_dirs(other_user):
    """A non-root user creating a file with S_ISGID in its mode keeps the bit when the file's
    group is the user's own group (the directory is not setgid), whoever owns the directory."""
    m, w, d = other_user
    os.mkdir(d / "rootdir")
    os.chmod(d / "rootdir", 0o777)           # root:root, not setgid
    got = {}
    for where in ("", "rootdir"):
        base = d / where if where else d
        w.ok("os.close", w.ok("os.open", str(base / "file"), os.O_CREAT | os.O_WRONLY, 0o2755))
        w.ok("os.mkfifo", str(base / "fifo"), 0o2755)
        for n in ("file", "fifo"):
            st = os.lstat(base / n)
            got[f"{where or 'own dir'}/{n}"] = (oct(stat.S_IMODE(st.st_mode)), st.st_gid)
    wrong = {k: v for k, v in got.items() if v != ("0o2755", UNPRIV_GID)}
    assert not wrong, (f"(mode, gid) of files created with mode 02755 by uid {UNPRIV_UID}, "
                       f"expected ('0o2755', {UNPRIV_GID}): {wrong}")


@pytest.mark.timeout(60)
def test_xattr_name_validation(other_user):
    m, w, d = other_user
    p = d / "f"
    write_file(p, b"x")
    os.chown(p, UNPRIV_UID, UNPRIV_GID)
    os.symlink("f", d / "l")
    os.mkfifo(d / "fifo")
    cases = [
        ("root", "os.setxattr", (str(p), "user.", b"v"), errno.EINVAL),
        ("root", "os.getxattr", (str(p), "user."), errno.EINVAL),
        ("root", "os.removexattr", (str(p), "user."), errno.EINVAL),
        ("root", "os.setxattr", (str(p), "nonamespace", b"v"), errno.EOPNOTSUPP),
        ("root", "os.getxattr", (str(p), "nonamespace"), errno.EOPNOTSUPP),
        ("root", "os.setxattr", (str(p), "user." + "x" * 251, b"v"), errno.ERANGE),
        ("root", "os.getxattr", (str(p), "user.missing"), errno.ENODATA),
        ("root", "os.removexattr", (str(p), "user.missing"), errno.ENODATA),
        ("root", "os.setxattr", (str(p), "user.new", b"v", os.XATTR_REPLACE), errno.ENODATA),
        ("root", "os.setxattr", (str(d / "fifo"), "user.a", b"v"), errno.EPERM),
        ("user", "os.setxattr", (str(p), "trusted.a", b"v"), errno.EPERM),
        ("user", "os.setxattr", (str(d / "l"), "user.a", b"v"), errno.EPERM),
    ]
    admin = Worker()
    try:
        wrong = []
        for who, op, args, want in cases:
            kw = {"follow_symlinks": False} if args[0].endswith("/l") else {}
            r = (admin if who == "root" else w).call(op, *args, **kw)
            got = r[1] if r[0] == "err" else None
            if got != want:
                wrong.append(f"{who}: {op}{tuple(a if not isinstance(a, str) else a[-20:] for a in args)}"
                             f" -> {ename(got)}, expected {ename(want)}")
        assert admin.call("os.setxattr", str(p), "user.ok", b"v", os.XATTR_CREATE) == ("ok", None)
        r = admin.call("os.setxattr", str(p), "user.ok", b"w", os.XATTR_CREATE)
        if r != ("err", errno.EEXIST):
            wrong.append(f"XATTR_CREATE on an existing name -> {r}, expected EEXIST")
    finally:
        admin.close()
    assert not wrong, "\n".join(wrong)


# ---- inode numbers ---------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_inode_numbers_stable_and_unique(cowfs_mount):
    mp = cowfs_mount.path
    os.makedirs(mp / "a/b/c")
    for i in range(20):
        write_file(mp / f"a/f{i}", b"x" * i)
    os.link(mp / "a/f1", mp / "a/b/hard")
    os.symlink("../f2", mp / "a/b/sym")
    os.mkfifo(mp / "a/b/c/fifo")
    paths = [p for p in mounting._w_list_paths(str(mp), max_depth=10)]
    inos = {p: os.lstat(mp / p).st_ino for p in paths}
    inos[""] = os.lstat(mp).st_ino
    assert inos["a/f1"] == inos["a/b/hard"], "hard links have different inode numbers"
    distinct = {v for k, v in inos.items() if k != "a/b/hard"}
    assert len(distinct) == len(inos) - 1, "inode numbers are not unique"
    # an open-and-unlinked file does not give its number away while open
    fd = os.open(mp / "a/f3", os.O_RDONLY)
    os.unlink(mp / "a/f3")
    write_file(mp / "a/new")
    assert os.stat(mp / "a/new").st_ino != inos["a/f3"], "inode number of an open file reused"
    os.close(fd)
    del inos["a/f3"]
    inos["a/new"] = os.stat(mp / "a/new").st_ino
    cowfs_mount.remount()
    after = {p: os.lstat(mp / p).st_ino if p else os.lstat(mp).st_ino for p in inos}
    changed = {p: (inos[p], after[p]) for p in inos if inos[p] != after[p]}
    assert not changed, f"inode numbers changed across remount (before, after): {changed}"
    # readdir reports the same numbers as stat
    with os.scandir(mp / "a") as it:
        for ent in it:
            assert ent.inode() == os.lstat(ent.path).st_ino, \
                f"readdir d_ino {ent.inode()} != st_ino {os.lstat(ent.path).st_ino} for {ent.name}"


# ---- directories -----------------------------------------------------------------------------

def _make_files(d, n):
    for i in range(n):
        os.close(os.open(os.path.join(d, f"{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))


@pytest.mark.timeout(240)
def test_readdir_while_deleting(cowfs_mount):
    """Entries deleted (seen and not yet seen) while a scandir reads the directory: none twice,
    none that stayed skipped.  4,000 entries are ~30 READDIR pages of 4 KiB (10,000 took 3x as long)."""
    d = cowfs_mount.path / "big"
    os.mkdir(d)
    n = 4_000
    _make_files(d, n)
    names = {f"{i:06d}" for i in range(n)}
    assert set(os.listdir(d)) == names
    rng = random.Random(42)
    order = sorted(names)
    rng.shuffle(order)
    deleted = set()
    seen = []
    errors = []
    try:
        with os.scandir(d) as it:
            for ent in it:
                seen.append(ent.name)
                # delete one entry not yet seen and, every other step, one already seen
                while order:
                    victim = order.pop()
                    if victim not in deleted:
                        break
                else:
                    victim = None
                if victim is not None:
                    os.unlink(d / victim)
                    deleted.add(victim)
                if len(seen) % 2 == 0 and seen[-2] not in deleted:
                    os.unlink(d / seen[-2])
                    deleted.add(seen[-2])
    except OSError as e:
        errors.append(repr(e))
    assert not errors, f"readdir failed while entries were being deleted: {errors}"
    dup = {x for x, k in collections.Counter(seen).items() if k > 1}
    assert not dup, f"readdir returned {len(dup)} entries twice, e.g. {sorted(dup)[:5]}"
    missing = names - deleted - set(seen)
    assert not missing, (f"readdir skipped {len(missing)} entries that were never deleted, "
                         f"e.g. {sorted(missing)[:5]}")
    unknown = set(seen) - names
    assert not unknown, f"readdir returned names that never existed: {sorted(unknown)[:5]}"
    assert set(os.listdir(d)) == names - deleted


def _read_evicting_cache(d, names, delete, after=100):
    """scandir d, whose listing the kernel cached (FOPEN_CACHE_DIR) by reading it to the end;
    after `after` entries delete those seen (delete(name)) and reclaim the cache's pages
    (as memory pressure or `drop_caches` do; here fadvise DONTNEED), so the kernel continues
    through the daemon at the offset of the last entry it returned.  Asserts that no entry is
    returned twice and none that was never deleted is skipped."""
    assert set(os.listdir(d)) == names  # read to the end: the kernel caches the listing
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    deleted: set[str] = set()
    seen = []
    try:
        with os.scandir(d) as it:
            for ent in it:
                seen.append(ent.name)
                if len(seen) == after:
                    for name in seen:
                        delete(name)
                        deleted.add(name)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert len(seen) > after
    dup = {x for x, k in collections.Counter(seen).items() if k > 1}
    assert not dup, f"readdir returned {len(dup)} entries twice, e.g. {sorted(dup)[:5]}"
    missing = names - deleted - set(seen)
    assert not missing, (f"readdir skipped {len(missing)} entries that were never deleted, "
                         f"e.g. {sorted(missing)[:5]}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("options", [(), ("fuse_ext=0",)], ids=["by_inode", "opendir"])
def test_readdir_continues_after_cached_listing_is_evicted(mount_factory, options):
    """A listing the kernel serves from its cache continues through the daemon, after the
    cache is reclaimed, exactly after the last entry returned, also when names before it
    were removed since (offsets were positions in a listing: 100 names skipped here)."""
    d = mount_factory(options=options).path / "evicted"
    os.mkdir(d)
    n = 3_000
    _make_files(d, n)
    _read_evicting_cache(d, {f"{i:06d}" for i in range(n)}, lambda name: os.unlink(d / name))


@pytest.mark.timeout(240)
def test_snapshots_listing_continues_after_cached_listing_is_evicted(cowfs_mount):
    """The same for `.cowfs/snapshots`, whose entries come and go by the control file (long
    names: a `getdents` of Python's 32 KiB returns ~240 of them, not the whole listing)."""
    mp = cowfs_mount.path
    names = {f"s{i:04d}-" + "x" * 110 for i in range(600)}
    for name in sorted(names):
        mounting.ok(mp, f"snapshot {name}\n".encode())
    _read_evicting_cache(mp / ".cowfs" / "snapshots", names,
                         lambda name: mounting.ok(mp, f"delete {name}\n".encode()), after=20)


def _create_and_list(d, n):
    os.mkdir(d)
    t0 = time.perf_counter()
    _make_files(d, n)
    t1 = time.perf_counter()
    count = 0
    with os.scandir(d) as it:
        for _ in it:
            count += 1
    t2 = time.perf_counter()
    assert count == n, f"readdir of {n} entries returned {count}"
    return (t1 - t0) / n, (t2 - t1) / n


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_large_directory_scales(cowfs_mount):
    """Per-entry create+readdir cost with N entries (default 100,000) is at most 3x the cost
    with 1,000 entries.  COWFS_BIG_DIR_ENTRIES changes N."""
    big = int(os.environ.get("COWFS_BIG_DIR_ENTRIES", "100000"))
    mp = cowfs_mount.path
    # the small case is short and noisy: take the median of three runs
    runs = sorted((_create_and_list(mp / f"small{i}", 1000) for i in range(3)),
                  key=lambda t: t[0] + t[1])
    small_c, small_r = runs[1]
    # lookups of missing names in a big directory also must not degrade
    big_c, big_r = _create_and_list(mp / "big", big)
    t0 = time.perf_counter()
    for i in range(0, big, max(1, big // 1000)):
        os.stat(mp / "big" / f"{i:06d}")
    lookup = (time.perf_counter() - t0) / len(range(0, big, max(1, big // 1000)))
    t0 = time.perf_counter()
    for i in range(1000):
        os.stat(mp / "small0" / f"{i:06d}")
    small_lookup = (time.perf_counter() - t0) / 1000
    small, large = small_c + small_r, big_c + big_r
    msg = (f"per entry: 1,000 entries: create {small_c * 1e6:.0f} us + readdir "
           f"{small_r * 1e6:.0f} us; {big:,} entries: create {big_c * 1e6:.0f} us + readdir "
           f"{big_r * 1e6:.0f} us; stat {small_lookup * 1e6:.0f} vs {lookup * 1e6:.0f} us")
    print(msg)
    assert large <= 3 * small, "large directories scale badly: " + msg
    assert lookup <= 3 * small_lookup + 50e-6, "lookups in a large directory are slow: " + msg


@pytest.mark.timeout(60)
def test_hidden_control_entry(cowfs_mount):
    mp = cowfs_mount.path
    write_file(mp / "f")
    assert ".cowfs" not in os.listdir(mp), "readdir of the root lists .cowfs"
    with os.scandir(mp) as it:
        assert ".cowfs" not in [e.name for e in it]
    assert os.path.lexists(mp / ".cowfs"), "lookup of .cowfs at the mount root fails"
    os.mkdir(mp / "d")
    assert not os.path.lexists(mp / "d/.cowfs"), ".cowfs exists in a subdirectory"


@pytest.mark.timeout(60)
def test_fsyncdir_and_fsync(cowfs_mount):
    mp = cowfs_mount.path
    os.mkdir(mp / "d")
    write_file(mp / "d/f", b"x")
    for p in (mp, mp / "d"):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    fd = os.open(mp / "d/f", os.O_RDWR)
    try:
        os.write(fd, b"y")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    mounting.syncfs(mp)


# ---- mount options / statfs ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_mount_defaults_nosuid_nodev(mount_factory):
    m = mount_factory(options=["allow_other"])
    e = mounting.mount_entry(m.path)
    assert e is not None
    assert e["fstype"].startswith("fuse"), e
    opts = set(e["mount_options"])
    assert {"nosuid", "nodev"} <= opts, f"mount options {sorted(opts)} lack nosuid/nodev"
    # nosuid is effective: a setuid-root copy of `id` run by another user stays that user
    dst = m.path / "id"
    shutil.copyfile(shutil.which("id"), dst)
    os.chmod(dst, 0o4755)
    r = subprocess.run([str(dst), "-u"], user=UNPRIV_UID, group=UNPRIV_GID, extra_groups=[],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, f"running a binary from the mount failed: {r.stderr}"
    assert r.stdout.strip() == str(UNPRIV_UID), \
        f"setuid-root binary on a nosuid mount ran with euid {r.stdout.strip()}"


@pytest.mark.timeout(60)
def test_statfs(cowfs_mount):
    mp = cowfs_mount.path
    s = os.statvfs(mp)
    problems = []
    for f in ("f_bsize", "f_frsize", "f_blocks", "f_files"):
        if getattr(s, f) <= 0:
            problems.append(f"{f}={getattr(s, f)}")
    if not (0 <= s.f_bavail <= s.f_bfree <= s.f_blocks):
        problems.append(f"not 0 <= f_bavail={s.f_bavail} <= f_bfree={s.f_bfree} "
                        f"<= f_blocks={s.f_blocks}")
    if not (0 <= s.f_favail <= s.f_ffree <= s.f_files):
        problems.append(f"not 0 <= f_favail={s.f_favail} <= f_ffree={s.f_ffree} "
                        f"<= f_files={s.f_files}")
    if s.f_namemax != 255:
        problems.append(f"f_namemax={s.f_namemax} (names up to 255 bytes are accepted, 256 not)")
    assert not problems, f"statvfs of the mount: {problems}"
    # df works
    r = subprocess.run(["df", "-P", str(mp)], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


# ---- concurrency -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_o_append_from_two_descriptors(cowfs_mount):
    p = cowfs_mount.path / "log"
    write_file(p, b"head\n")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    expected = [b"head\n"]
    try:
        for i in range(200):
            fd = a if i % 3 else b
            rec = f"{'a' if fd == a else 'b'}{i:04d}\n".encode() * (1 + i % 5)
            os.write(fd, rec)
            expected.append(rec)
        # pwrite on an O_APPEND descriptor appends on Linux
        os.pwrite(a, b"pwrite\n", 0)
        expected.append(b"pwrite\n")
    finally:
        os.close(a)
        os.close(b)
    got = read_file(p)
    want = b"".join(expected)
    assert got == want, mounting._fmt_bytes_diff(got, want)


@pytest.mark.timeout(120)
def test_concurrent_threads(cowfs_mount):
    mp = cowfs_mount.path
    nthreads, records, rec_size = 4, 150, 4096
    shared = mp / "shared"
    write_file(shared, b"\0" * (nthreads * records * rec_size))
    errors = []
    stop = threading.Event()

    def pattern(t, i):
        return bytes([(t * 37 + i) % 251 + 1]) * rec_size

    def own_file(t):
        try:
            p = mp / f"own{t}"
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                for i in range(records):
                    os.write(fd, pattern(t, i))
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(f"writer of own{t}: {e!r}")

    def shared_writer(t):
        try:
            fd = os.open(shared, os.O_WRONLY)
            try:
                for i in range(records):
                    # interleave: record i of thread t at slot i*nthreads + t
                    os.pwrite(fd, pattern(t, i), (i * nthreads + t) * rec_size)
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(f"shared writer {t}: {e!r}")

    def reader():
        try:
            fd = os.open(shared, os.O_RDONLY)
            try:
                while not stop.is_set():
                    off = random.randrange(nthreads * records) * rec_size
                    b = os.pread(fd, rec_size, off)
                    slot = off // rec_size
                    want = pattern(slot % nthreads, slot // nthreads)
                    if len(b) != rec_size or not all(x in (0, want[0]) for x in set(b)):
                        errors.append(f"reader saw foreign bytes at slot {slot}: "
                                      f"{sorted(set(b))[:5]}")
                        return
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(f"reader: {e!r}")

    threads = [threading.Thread(target=own_file, args=(t,)) for t in range(nthreads)]
    threads += [threading.Thread(target=shared_writer, args=(t,)) for t in range(nthreads)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(90)
    stop.set()
    for t in readers:
        t.join(30)
    assert not any(t.is_alive() for t in threads + readers), "threads hung"
    assert not errors, errors
    for t in range(nthreads):
        got = read_file(mp / f"own{t}")
        want = b"".join(pattern(t, i) for i in range(records))
        assert got == want, f"own{t}: " + mounting._fmt_bytes_diff(got, want)
    got = read_file(shared)
    want = b"".join(pattern(s % nthreads, s // nthreads) for s in range(nthreads * records))
    assert got == want, "shared file: " + mounting._fmt_bytes_diff(got, want)


# ---- xattrs / ACLs ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_xattr_large_values_and_many_names(cowfs_mount):
    p = cowfs_mount.path / "f"
    write_file(p, b"x")
    big = random.Random(3).randbytes(65536)
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    e = errno_of(os.setxattr, p, "user.toobig", b"x" * 65537)
    assert e == errno.E2BIG, f"65537-byte xattr value: {ename(e)}, expected E2BIG"
    names = [f"user.n{i:03d}" for i in range(100)]
    for i, n in enumerate(names):
        os.setxattr(p, n, str(i).encode())
    assert set(os.listxattr(p)) >= set(names) | {"user.big"}
    # a 255-byte name works, a 256-byte one is ERANGE
    long_name = "user." + "l" * 250
    os.setxattr(p, long_name, b"long")
    assert os.getxattr(p, long_name) == b"long"
    e = errno_of(os.setxattr, p, "user." + "l" * 251, b"x")
    assert e == errno.ERANGE, f"256-byte xattr name: {ename(e)}, expected ERANGE"
    # xattrs on a directory, binary values, empty value
    os.mkdir(cowfs_mount.path / "d")
    os.setxattr(cowfs_mount.path / "d", "user.empty", b"")
    assert os.getxattr(cowfs_mount.path / "d", "user.empty") == b""
    cowfs_mount.remount()
    assert os.getxattr(p, "user.big") == big
    assert os.getxattr(p, long_name) == b"long"
    assert all(os.getxattr(p, n) == str(i).encode() for i, n in enumerate(names))
    assert os.getxattr(cowfs_mount.path / "d", "user.empty") == b""


@pytest.mark.timeout(60)
def test_posix_acl_consistent(other_user):
    """setfacl either fails with EOPNOTSUPP (ACLs unsupported) or takes effect: getfacl
    shows the entry and the kernel/daemon enforces it."""
    m, w, d = other_user
    p = d / "f"
    write_file(p, b"acl-protected")
    os.chmod(p, 0o600)
    r = subprocess.run(["setfacl", "-m", f"u:{UNPRIV_UID}:r--", str(p)], capture_output=True,
                       timeout=30, text=True)
    if r.returncode != 0:
        assert "not supported" in r.stderr.lower(), f"setfacl failed oddly: {r.stderr}"
        e = errno_of(os.setxattr, p, "system.posix_acl_access",
                     bytes.fromhex("02000000" "01000600ffffffff" "04000000ffffffff"
                                   "20000000ffffffff"))
        assert e == errno.EOPNOTSUPP, f"setxattr(system.posix_acl_access): {ename(e)}"
        assert "system.posix_acl_access" not in os.listxattr(p)
        # and nothing changed
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        assert w.call("read_file", str(p)) == ("err", errno.EACCES)
        return
    g = subprocess.run(["getfacl", "-n", str(p)], capture_output=True, timeout=30, text=True)
    assert f"user:{UNPRIV_UID}:r--" in g.stdout, f"getfacl after setfacl: {g.stdout}"
    assert w.call("read_file", str(p)) == ("ok", b"acl-protected"), \
        "ACL grants read, but the user cannot read"
    assert w.call("write_file", str(p), os.O_WRONLY, 0, 0, b"x") == ("err", errno.EACCES)
    # mask shows in the group bits
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, oct(os.stat(p).st_mode)
    # default ACL on a directory is inherited
    r = subprocess.run(["setfacl", "-d", "-m", f"u:{UNPRIV_UID}:rwx", str(d)],
                       capture_output=True, timeout=30, text=True)
    assert r.returncode == 0, r.stderr
    write_file(d / "inherited")
    g = subprocess.run(["getfacl", "-n", str(d / "inherited")], capture_output=True,
                       timeout=30, text=True)
    assert f"user:{UNPRIV_UID}:rw" in g.stdout, f"default ACL not inherited: {g.stdout}"
    # removing it removes enforcement
    subprocess.run(["setfacl", "-b", str(p)], check=True, timeout=30)
    assert w.call("read_file", str(p)) == ("err", errno.EACCES)
