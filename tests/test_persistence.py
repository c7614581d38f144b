"""Persistence: what was written through a cowfs mount is there, bit for bit and with all its
metadata (inode numbers and timestamps included), after unmounting and mounting again -
whichever clean way the daemon was stopped, and without fsync.
"""
from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import time

import pytest

import mounting
from mounting import compare_snapshots, snapshot

MiB = 1 << 20


def write(path, data=b"", mode=0o644):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def build_varied_tree(root):
    """Directories, every kind of file and metadata cowfs has to store."""
    r = lambda p: os.path.join(root, p)  # noqa: E731
    rnd = random.Random(1234)
    old = os.umask(0)
    try:
        os.makedirs(r("d1/d2/d3/d4"), 0o755)
        os.mkdir(r("empty"), 0o755)
        os.mkdir(r("sticky"), 0o1777)
        os.mkdir(r("sgid"), 0o2750)
        os.chown(r("sgid"), 0, 4242)
        os.mkdir(r("private"), 0o700)
        write(r("zero"))
        write(r("one"), b"1")
        for name, size in (("c64k-1", 65535), ("c64k", 65536), ("c64k+1", 65537),
                           ("ten_mib", 10 * MiB), ("d1/d2/d3/d4/deep", 3000),
                           ("private/inside", 100)):
            write(r(name), rnd.randbytes(size))
        write(r("zeros"), bytes(200_000))           # all-zero data (dedup/compression paths)
        write(r("text"), b"hello world\n" * 10_000)
        # sparse files
        fd = os.open(r("sparse"), os.O_CREAT | os.O_RDWR, 0o644)
        os.ftruncate(fd, 50 * MiB)
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"in the middle", 20 * MiB + 123)
        os.close(fd)
        fd = os.open(r("sparse_tail"), os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, b"tail", 3 * MiB)
        os.close(fd)
        # odd modes and owners
        for name, mode in (("m000", 0o000), ("m4755", 0o4755), ("m2755", 0o2755),
                           ("m1644", 0o1644), ("m777", 0o777), ("m400", 0o400)):
            write(r(name), name.encode(), mode)
            os.chmod(r(name), mode)
        write(r("owned"), b"owned")
        os.chown(r("owned"), 1234, 5678)
        os.symlink("one", r("owned_link"))
        os.chown(r("owned_link"), 1234, 5678, follow_symlinks=False)
        # symlinks
        os.symlink("one", r("sl_rel"))
        os.symlink("/etc/passwd", r("sl_abs"))
        os.symlink("nope/nothing", r("sl_dangling"))
        os.symlink("d1/d2", r("sl_dir"))
        os.symlink("x" * 1000, r("sl_long"))
        os.symlink("ünïcødé→目標", r("sl_utf8"))
        os.symlink("../../one", r("d1/d2/sl_up"))
        # hard links
        os.link(r("one"), r("d1/one_link"))
        os.link(r("one"), r("d1/d2/one_link2"))
        # special files
        os.mkfifo(r("fifo"), 0o640)
        os.mknod(r("sock"), stat.S_IFSOCK | 0o755)
        os.mknod(r("chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(r("blk"), stat.S_IFBLK | 0o600, os.makedev(8, 1))
        # names
        for name in ("名前.txt", "with space", "-dash", "n" * 255, "tab\tand\nnewline",
                     "\x01ctrl"):
            write(r(name), name.encode())
        # xattrs
        os.setxattr(r("one"), "user.a", b"alpha")
        os.setxattr(r("one"), "user.bin", rnd.randbytes(200))
        os.setxattr(r("c64k"), "user.big", rnd.randbytes(65536))
        os.setxattr(r("c64k"), "user.empty", b"")
        os.setxattr(r("d1"), "user.dir", b"on a directory")
        os.setxattr(r("ten_mib"), "trusted.t", b"trusted namespace")
        # nanosecond timestamps, last (children first so that directories keep theirs)
        times = {
            "one": (1_111_111_111_111_111_111, 1_222_222_222_222_222_222),
            "zero": (-1, -999_999_999),
            "ten_mib": (4_102_444_800_000_000_001, 4_102_444_800_999_999_999),
            "sl_rel": (5, 6),
            "fifo": (7, 8),
            "d1/d2/d3/d4": (1_500_000_000_000_000_001, 1_500_000_000_000_000_002),
            "d1/d2/d3": (1_500_000_000_000_000_003, 1_500_000_000_000_000_004),
            "empty": (0, 0),
        }
        for name, ns in times.items():
            os.utime(r(name), ns=ns, follow_symlinks=False)
    finally:
        os.umask(old)


def take(root):
    return snapshot(str(root), content_limit=MiB, xattr_prefixes=("user.", "trusted."))


def assert_same(before, after, what):
    diffs = compare_snapshots(after, before, names=("after", "before"), ignore=("atime",))
    assert not diffs, f"{what}:\n  " + "\n  ".join(diffs[:60])


@pytest.mark.timeout(180)
def test_varied_tree_survives_remount(cowfs_mount):
    build_varied_tree(cowfs_mount.path)
    before = take(cowfs_mount.path)
    assert before["one"]["nlink"] == 3 and before["ten_mib"]["size"] == 10 * MiB
    cowfs_mount.remount()
    after = take(cowfs_mount.path)
    assert_same(before, after, "the tree changed across unmount + mount")
    # and once more, after reading everything (reads must not change anything either)
    cowfs_mount.remount()
    assert_same(before, take(cowfs_mount.path), "the tree changed across a second remount")


def make_unsynced_changes(mp, rnd):
    """Changes made right before unmounting, never fsync'ed.  Returns the expected tree."""
    write(mp / "small", b"small file")
    write(mp / "big", rnd.randbytes(3 * MiB + 17))
    fd = os.open(mp / "existing", os.O_RDWR)
    os.pwrite(fd, b"PATCHED", 70_000)
    os.close(fd)
    os.rename(mp / "to_rename", mp / "renamed")
    os.mkdir(mp / "newdir")
    write(mp / "newdir/inner", b"inner")
    os.unlink(mp / "to_delete")
    os.chmod(mp / "existing", 0o600)
    os.setxattr(mp / "existing", "user.late", b"late")
    os.utime(mp / "small", ns=(123_456_789, 987_654_321))
    os.truncate(mp / "to_truncate", 5)
    fd = os.open(mp / "appended", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+appended")
    os.close(fd)


def prepare_existing(mp, rnd):
    write(mp / "existing", rnd.randbytes(200_000))
    write(mp / "to_rename", b"rename me")
    write(mp / "to_delete", b"delete me")
    write(mp / "to_truncate", b"0123456789" * 1000)
    write(mp / "appended", b"base")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["cowfs", "fusermount", "sigterm"])
def test_unsynced_changes_survive_clean_unmount(cowfs_mount, method):
    """Unmount via `cowfs umount`, `fusermount3 -u` or SIGTERM right after writing (no fsync):
    the daemon exits 0 and everything is there after mounting again."""
    mp = cowfs_mount.path
    rnd = random.Random(7)
    prepare_existing(mp, rnd)
    cowfs_mount.remount()
    make_unsynced_changes(mp, rnd)
    before = take(mp)
    rc = cowfs_mount.stop(method)
    assert rc == 0, f"daemon exit code after unmount via {method}: {rc}, expected 0\n" \
                    f"{cowfs_mount.describe()}"
    assert not cowfs_mount.mounted()
    cowfs_mount.start()
    after = take(mp)
    assert_same(before, after, f"changes made just before unmounting via {method} were lost")
    assert read(mp / "renamed") == b"rename me"
    assert not os.path.exists(mp / "to_delete")
    assert read(mp / "appended") == b"base+appended"


@pytest.mark.timeout(180)
def test_repeated_remounts_with_changes(cowfs_mount):
    """Several rounds of edits + remount, checked against an in-memory model each time."""
    mp = cowfs_mount.path
    rnd = random.Random(99)
    model: dict[str, bytearray] = {}
    for rnd_no in range(4):
        for _ in range(25):
            name = f"f{rnd.randrange(8)}"
            p = mp / name
            op = rnd.choice(["write", "pwrite", "append", "truncate", "rename", "unlink"])
            if op == "write" or name not in model:
                data = rnd.randbytes(rnd.choice([0, 1, 4096, 65536, 70_000, 300_000]))
                write(p, data)
                model[name] = bytearray(data)
            elif op == "pwrite":
                off = rnd.choice([0, 1, 65535, 65536, 200_000, len(model[name])])
                data = rnd.randbytes(rnd.choice([1, 100, 65536, 100_000]))
                fd = os.open(p, os.O_WRONLY)
                os.pwrite(fd, data, off)
                os.close(fd)
                m = model[name]
                if off > len(m):
                    m.extend(bytes(off - len(m)))
                m[off:off + len(data)] = data
            elif op == "append":
                data = rnd.randbytes(rnd.choice([1, 5000, 65536]))
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                os.write(fd, data)
                os.close(fd)
                model[name].extend(data)
            elif op == "truncate":
                size = rnd.choice([0, 1, 65536, 100_000, 400_000])
                os.truncate(p, size)
                m = model[name]
                if size < len(m):
                    del m[size:]
                else:
                    m.extend(bytes(size - len(m)))
            elif op == "rename":
                dst = f"f{rnd.randrange(8)}"
                os.rename(p, mp / dst)
                model[dst] = model.pop(name)
            elif op == "unlink":
                os.unlink(p)
                del model[name]
        cowfs_mount.remount()
        names = sorted(n for n in os.listdir(mp))
        assert names == sorted(model), f"round {rnd_no}: names {names} != {sorted(model)}"
        for n, want in model.items():
            got = read(mp / n)
            assert got == bytes(want), f"round {rnd_no}: {n}: " + \
                mounting._fmt_bytes_diff(got, bytes(want))


@pytest.mark.timeout(120)
def test_background_mount_and_cowfs_umount(tmp_path, test_dir):
    """`cowfs mount` without --foreground returns once the mount is usable and leaves a
    daemon; `cowfs umount` flushes, unmounts and returns only after the daemon exited."""
    store = tmp_path / "store"
    mounting.init_store(store)
    mp = test_dir / "mnt"
    mp.mkdir()
    pids = []
    try:
        r = mounting.run_cowfs("mount", store, mp, timeout=60)
        assert mounting.is_mounted(mp), f"`cowfs mount` returned but {mp} is not mounted"
        pids = mounting.pids_mentioning(mp)
        # usable right away
        mounting.call_with_timeout(write, mp / "f", b"written right after mount",
                                   timeout=20)
        data = os.urandom(MiB)
        mounting.call_with_timeout(write, mp / "g", data, timeout=20)
        t0 = time.monotonic()
        mounting.run_cowfs("umount", mp, timeout=90)
        took = time.monotonic() - t0
        assert not mounting.is_mounted(mp), "`cowfs umount` returned but the mount is still there"
        alive = [p for p in pids if mounting.pid_alive(p)]
        assert not alive, f"`cowfs umount` returned (after {took:.1f}s) but daemon pid(s) " \
                          f"{alive} still run"
        # the data is there for the next mount
        m = mounting.Mount(store, mp, tmp_path / "fg.log")
        try:
            m.start()
            assert read(mp / "f") == b"written right after mount"
            assert read(mp / "g") == data
        finally:
            problems = m.close()
        assert not problems, problems
        # a second init of the same store is refused and does not harm it
        r = mounting.run_cowfs("init", store, check=False, timeout=60)
        assert r.returncode != 0, "`cowfs init` on an existing store succeeded"
        m = mounting.Mount(store, mp, tmp_path / "fg2.log")
        try:
            m.start()
            assert read(mp / "f") == b"written right after mount"
        finally:
            problems = m.close()
        assert not problems, problems
    finally:
        if mounting.is_mounted(mp):
            mounting.lazy_unmount(mp)
        for p in pids + mounting.pids_mentioning(mp):
            if mounting.pid_alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_fsynced_data_survives_daemon_kill(cowfs_mount):
    """After SIGKILL of the daemon (a crash), fsync'ed data is there on the next mount."""
    mp = cowfs_mount.path
    data = os.urandom(2 * MiB + 3)
    fd = os.open(mp / "durable", os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.mkdir(mp / "dir")
    dfd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    os.killpg(cowfs_mount.pid, signal.SIGKILL)
    cowfs_mount.proc.wait(timeout=30)
    cowfs_mount.exit_codes.append(cowfs_mount.proc.returncode)
    # the dead mount is still in the mount table: clean it away as an admin would
    subprocess.run(["fusermount3", "-u", str(mp)], timeout=30)
    if cowfs_mount.mounted():
        mounting.lazy_unmount(mp)
    cowfs_mount.start()
    assert read(mp / "durable") == data, "fsync'ed data lost after a daemon crash"
    st = os.stat(mp / "durable")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == len(data)
    assert os.path.isdir(mp / "dir")
