"""Snapshots, branches, rollback, clone, delete, list and diff through ``.cowfs/ctl`` (and the
CLI wrappers), on real mounts.

Every test uses the ``cowfs_mount`` / ``mount_factory`` fixtures (tests/mounting.py): the mount
is always unmounted, and its watchdog aborts a hung daemon (which unblocks any call stuck in a
FUSE request) before pytest's own timeout.  Control-file calls run in a thread with a timeout;
subprocesses have timeouts; the unprivileged checks run in a ``Worker`` (timeouts per call).

The control-file helpers (``ctl``, ``ok``, ``fails``, ``stats``, ``disk_bytes``) are
tests/mounting.py's, shared with the other test modules.

Scale: the O(1) clone test clones a 256 MiB file in the suite, a ``COWFS_CLONE_BIG_MIB`` MiB
one (default 1024) in its long form (``full``, scripts/test_slow.sh).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import time

import pytest

from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import (CTL_TIMEOUT, MiB, Worker, call_with_timeout, compare_snapshots, ctl, ctl_raw, disk_bytes, fails,
                      names, ok, read, run_cowfs, snapshot, stats, syncfs, write)

CHUNK = 64 << 10
BIG_MIB = int(os.environ.get("COWFS_CLONE_BIG_MIB", "1024"))


def cli(*args, check=True, timeout=60):
    return run_cowfs(*args, timeout=timeout, check=check)


def sh(cmd: str, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def make_tree(root) -> None:
    """A small tree with every kind of entry: dirs, modes, symlinks, hard links, xattrs."""
    r = lambda p: os.path.join(root, p)  # noqa: E731
    rnd = random.Random(7)
    old = os.umask(0)
    try:
        os.makedirs(r("src/pkg/sub"), 0o755)
        os.mkdir(r("src/private"), 0o700)
        os.mkdir(r("empty"), 0o750)
        write(r("README"), b"read me\n")
        write(r("src/main.py"), b"print('hi')\n" * 50, 0o755)
        write(r("src/pkg/__init__.py"), b"")
        write(r("src/pkg/data.bin"), rnd.randbytes(200_000), 0o640)
        write(r("src/pkg/sub/deep.txt"), b"deep\n" * 1000, 0o600)
        write(r("src/private/secret"), b"s3cr3t", 0o400)
        write(r("src/setuid"), b"#!/bin/sh\n", 0o4755)
        os.chmod(r("src/setuid"), 0o4755)
        os.symlink("main.py", r("src/link_rel"))
        os.symlink("/nonexistent/target", r("src/link_dangling"))
        os.symlink("pkg/sub", r("src/link_dir"))
        os.link(r("src/pkg/data.bin"), r("src/pkg/data.hardlink"))
        os.link(r("README"), r("src/readme.outside_link"))  # a link to a file outside src/
        os.setxattr(r("src/main.py"), "user.lang", b"python")
        os.setxattr(r("src/pkg"), "user.kind", b"package")
        os.mkfifo(r("src/fifo"), 0o644)
    finally:
        os.umask(old)


# ============================================================================================
# snapshots
# ============================================================================================

@pytest.mark.timeout(120)
def test_snapshot_view_shows_old_content(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    # Data still in the kernel's page cache (no close, no fsync) must be in the snapshot too.
    fd = os.open(mp / "unflushed", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written just before the snapshot\n")
    before = snapshot(str(mp))
    r = ok(mp, "snapshot s")
    assert r["snapshot"] == "s" and r["branch"] == "main" and r["daemon_ms"] >= 0, r
    os.write(fd, b"and after it\n")
    os.close(fd)

    # change everything
    write(mp / "README", b"new readme\n")
    os.unlink(mp / "src/pkg/sub/deep.txt")
    os.rename(mp / "src/main.py", mp / "src/app.py")
    os.chmod(mp / "src/pkg/data.bin", 0o600)
    os.mkdir(mp / "added_dir")
    write(mp / "added_dir/new", b"new")
    os.setxattr(mp / "src/pkg", "user.kind", b"changed")
    os.rmdir(mp / "empty")
    with open(mp / "src/pkg/data.bin", "r+b") as f:
        f.seek(100_000)
        f.write(b"XXXX")

    assert os.listdir(mp / ".cowfs/snapshots") == ["s"]
    view = snapshot(str(mp / ".cowfs/snapshots/s"))
    diffs = compare_snapshots(view, before, names=("snapshot view", "tree at snapshot time"),
                              ignore=("ino", "atime", "ctime", "blocks", "blksize"))
    assert not diffs, "snapshot view differs from the tree at snapshot time:\n" + "\n".join(diffs)
    assert read(mp / ".cowfs/snapshots/s/unflushed") == b"written just before the snapshot\n"
    assert read(mp / "unflushed") == b"written just before the snapshot\nand after it\n"

    # diff -r between the snapshot view and the live tree, as a user would run it
    r = subprocess.run(["diff", "-r", "--no-dereference", ".cowfs/snapshots/s", "."], cwd=mp,
                       capture_output=True, timeout=60, text=True)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    out = r.stdout
    for expect in ("Only in .cowfs/snapshots/s/src: main.py", "Only in ./src: app.py",
                   "Only in .: added_dir", "Only in .cowfs/snapshots/s: empty",
                   "Only in .cowfs/snapshots/s/src/pkg/sub: deep.txt",
                   "diff -r --no-dereference .cowfs/snapshots/s/README ./README",
                   "< read me", "> new readme", "Binary files .cowfs/snapshots/s/src/pkg/data.bin "
                   "and ./src/pkg/data.bin differ"):
        assert expect in out, f"{expect!r} missing from diff -r output:\n{out}"
    assert ".cowfs" not in out.replace(".cowfs/snapshots/s", ""), out

    # a snapshot of an unchanged tree: diff -r finds nothing (diff cannot compare FIFOs)
    ok(mp, "snapshot s2")
    r = subprocess.run(["diff", "-r", "--no-dereference", "-x", "fifo", ".cowfs/snapshots/s2", "."], cwd=mp,
                       capture_output=True, timeout=60, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sorted(os.listdir(mp / ".cowfs/snapshots")) == ["s", "s2"]
    # the CLI wrapper, and snapshots survive a remount
    cli("snapshot", mp, "s3")
    cowfs_mount.remount()
    assert sorted(os.listdir(mp / ".cowfs/snapshots")) == ["s", "s2", "s3"]
    view2 = snapshot(str(mp / ".cowfs/snapshots/s"))
    assert not compare_snapshots(view2, view, ignore=("atime",)), \
        compare_snapshots(view2, view, ignore=("atime",))


@pytest.mark.timeout(90)
def test_snapshot_view_is_read_only_even_for_root(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    ok(mp, "snapshot ro")
    s = mp / ".cowfs/snapshots/ro"
    before = snapshot(str(s))
    attempts = {
        "create": lambda: os.open(s / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "open for write": lambda: os.open(s / "README", os.O_WRONLY),
        "open O_RDWR": lambda: os.open(s / "README", os.O_RDWR),
        "open O_TRUNC": lambda: os.open(s / "README", os.O_WRONLY | os.O_TRUNC),
        "truncate": lambda: os.truncate(s / "README", 0),
        "unlink": lambda: os.unlink(s / "README"),
        "rmdir": lambda: os.rmdir(s / "empty"),
        "mkdir": lambda: os.mkdir(s / "newdir"),
        "mkdir in subdir": lambda: os.mkdir(s / "src/newdir"),
        "chmod": lambda: os.chmod(s / "README", 0o777),
        "chmod root": lambda: os.chmod(s, 0o777),
        "chown": lambda: os.chown(s / "README", 1, 1),
        "utime": lambda: os.utime(s / "README", (1, 1)),
        "setxattr": lambda: os.setxattr(s / "README", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(s / "src/main.py", "user.lang"),
        "rename": lambda: os.rename(s / "README", s / "README2"),
        "rename out": lambda: os.rename(s / "README", mp / "stolen"),
        "symlink": lambda: os.symlink("x", s / "sl"),
        "link": lambda: os.link(s / "README", s / "hl"),
        "mkfifo": lambda: os.mkfifo(s / "ff"),
    }
    wrong = {}
    for what, fn in attempts.items():
        try:
            fd = fn()
            if isinstance(fd, int):
                os.close(fd)
            wrong[what] = "succeeded"
        except OSError as e:
            if e.errno != errno.EROFS:
                wrong[what] = errno.errorcode.get(e.errno, e.errno)
    assert not wrong, f"snapshot view accepted or mis-refused changes (expected EROFS): {wrong}"
    assert os.path.exists(mp / "README")
    assert not compare_snapshots(snapshot(str(s)), before, ignore=("atime",))
    # reading works
    assert read(s / "README") == b"read me\n"
    assert os.readlink(s / "src/link_rel") == "main.py"
    assert os.getxattr(s / "src/main.py", "user.lang") == b"python"


@pytest.mark.timeout(90)
def test_rename_or_link_into_snapshot_is_refused_without_data_loss(cowfs_mount):
    """rename(2)/link(2) from the live tree into a snapshot view must fail (EROFS, or EXDEV as
    between file systems) and leave the file where it was."""
    mp = cowfs_mount.path
    os.mkdir(mp / "d")
    os.mkdir(mp / "gone")
    ok(mp, "snapshot s")
    os.rmdir(mp / "gone")                      # exists only in the snapshot now
    s = mp / ".cowfs/snapshots/s"
    wrong = {}
    for what, src, dst, fn in (
            ("rename into snapshot dir", "f1", s / "d/f1", os.rename),
            ("rename into snapshot dir gone from the live tree", "f2", s / "gone/f2", os.rename),
            ("rename into snapshot root", "f3", s / "f3", os.rename),
            ("link into snapshot dir", "f4", s / "d/f4", os.link),
            ("link into snapshot dir gone from the live tree", "f5", s / "gone/f5", os.link)):
        write(mp / src, b"precious " + src.encode())
        try:
            fn(mp / src, dst)
            wrong[what] = "succeeded"
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EXDEV):
                wrong[what] = errno.errorcode.get(e.errno, e.errno)
        if not os.path.exists(mp / src):
            wrong[what] = wrong.get(what, "") + "; the file left the live tree (live d/: " \
                f"{sorted(os.listdir(mp / 'd'))}, view of {dst.parent.name}/: {sorted(os.listdir(dst.parent))})"
    assert sorted(os.listdir(s)) == ["d", "gone"] and os.listdir(s / "d") == [] \
        and os.listdir(s / "gone") == [], "the snapshot view changed"
    assert not wrong, f"cross-view rename/link into a snapshot: {wrong}"


@pytest.mark.timeout(90)
def test_cowfs_dir_hidden_and_reserved(cowfs_mount, tmp_path):
    mp = cowfs_mount.path
    make_tree(mp)
    assert ".cowfs" not in os.listdir(mp)
    assert ".cowfs" not in [e.name for e in os.scandir(mp)]
    r = subprocess.run(["find", "."], cwd=mp, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and ".cowfs" not in r.stdout, r.stdout
    r = subprocess.run(["du", "-a", "."], cwd=mp, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and ".cowfs" not in r.stdout, r.stdout
    r = subprocess.run(["ls", "-A"], cwd=mp, capture_output=True, text=True, timeout=60)
    assert ".cowfs" not in r.stdout.split(), r.stdout
    st = os.stat(mp / ".cowfs")
    assert stat.S_ISDIR(st.st_mode), oct(st.st_mode)
    assert stat.S_ISREG(os.stat(mp / ".cowfs/ctl").st_mode)
    assert stat.S_IMODE(os.stat(mp / ".cowfs/ctl").st_mode) == 0o600
    assert os.listdir(mp / ".cowfs") == []                  # found by name, never listed (rm -rf .cowfs)
    assert stat.S_ISDIR(os.stat(mp / ".cowfs/snapshots").st_mode)
    st = json.loads(read(mp / ".cowfs/stats"))
    assert isinstance(st, dict), st

    attempts = {
        "mkdir": (lambda: os.mkdir(mp / ".cowfs"), {errno.EEXIST}),
        "create O_EXCL": (lambda: os.open(mp / ".cowfs", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
                          {errno.EEXIST}),
        "create": (lambda: os.open(mp / ".cowfs", os.O_CREAT | os.O_WRONLY), {errno.EISDIR, errno.EEXIST}),
        "symlink": (lambda: os.symlink("x", mp / ".cowfs"), {errno.EEXIST}),
        "link": (lambda: os.link(mp / "README", mp / ".cowfs"), {errno.EEXIST}),
        "mkfifo": (lambda: os.mkfifo(mp / ".cowfs"), {errno.EEXIST}),
        "rename file onto": (lambda: os.rename(mp / "README", mp / ".cowfs"),
                             {errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}),
        "rename dir onto": (lambda: os.rename(mp / "empty", mp / ".cowfs"), {errno.EPERM, errno.EEXIST}),
        "rename away": (lambda: os.rename(mp / ".cowfs", mp / "x"), {errno.EPERM}),
        "rmdir": (lambda: os.rmdir(mp / ".cowfs"), {errno.EPERM}),
        "unlink": (lambda: os.unlink(mp / ".cowfs"), {errno.EPERM, errno.EISDIR}),
        "chmod": (lambda: os.chmod(mp / ".cowfs", 0o777), {errno.EPERM}),
        "create inside": (lambda: os.open(mp / ".cowfs/x", os.O_CREAT | os.O_WRONLY), {errno.EPERM, errno.EACCES}),
        "mkdir in snapshots": (lambda: os.mkdir(mp / ".cowfs/snapshots/x"), {errno.EPERM, errno.EACCES}),
        "unlink ctl": (lambda: os.unlink(mp / ".cowfs/ctl"), {errno.EPERM, errno.EACCES}),
    }
    wrong = {}
    for what, (fn, allowed) in attempts.items():
        try:
            fd = fn()
            if isinstance(fd, int):
                os.close(fd)
            wrong[what] = "succeeded"
        except OSError as e:
            if e.errno not in allowed:
                wrong[what] = errno.errorcode.get(e.errno, e.errno)
    assert not wrong, f".cowfs is not reserved as expected: {wrong}"
    assert os.path.exists(mp / "README") and os.path.isdir(mp / "empty")
    # only the mount root reserves the name
    os.mkdir(mp / "src/.cowfs")
    write(mp / "src/.cowfs/ok", b"fine")
    assert os.listdir(mp / "src/.cowfs") == ["ok"]
    ok(mp, "snapshot h")
    assert not os.path.lexists(mp / ".cowfs/snapshots/h/.cowfs")
    assert os.path.exists(mp / ".cowfs/snapshots/h/src/.cowfs/ok")

    # tar: a tree containing a top-level .cowfs extracts except for that entry
    src = tmp_path / "tarsrc"
    (src / ".cowfs").mkdir(parents=True)
    (src / "sub").mkdir()
    (src / "a").write_bytes(b"a\n")
    (src / ".cowfs/x").write_bytes(b"x\n")
    (src / "sub/b").write_bytes(b"b\n")
    (src / "z").write_bytes(b"z\n")
    tarball = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(tarball), "a", ".cowfs", "sub", "z"],
                   check=True, timeout=60)
    dest = mp / "untar"
    os.mkdir(dest)
    r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr             # below the root .cowfs is an ordinary name
    assert read(dest / ".cowfs/x") == b"x\n"
    r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(mp)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0, "tar extracting a .cowfs entry into the mount root succeeded"
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tar: ") and "Exiting" not in ln]
    assert err_lines and all(ln.startswith("tar: .cowfs") for ln in err_lines), r.stderr
    assert read(mp / "a") == b"a\n" and read(mp / "sub/b") == b"b\n" and read(mp / "z") == b"z\n"
    assert not os.path.exists(mp / ".cowfs/x")
    assert stat.S_ISDIR(os.stat(mp / ".cowfs").st_mode)
    ok(mp, "list")   # the control file still works


# ============================================================================================
# rollback
# ============================================================================================

@pytest.mark.timeout(120)
def test_rollback_restores_tree_and_old_handles_stay_old(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    write(mp / "removed_later", b"I will be removed\n")
    write(mp / "f", b"original\n")
    os.mkdir(mp / "gone_dir")
    write(mp / "gone_dir/inner", b"inner\n")
    expected = snapshot(str(mp))
    ok(mp, "snapshot base")

    write(mp / "f", b"modified after the snapshot\n")
    write(mp / "added", b"added\n")
    os.mkdir(mp / "added_dir")
    write(mp / "added_dir/x", b"x")
    h_removed = os.open(mp / "removed_later", os.O_RDONLY)
    os.unlink(mp / "removed_later")
    os.unlink(mp / "gone_dir/inner")
    os.rmdir(mp / "gone_dir")
    os.rename(mp / "src", mp / "src_renamed")
    os.chmod(mp / "README", 0o600)
    h_f = os.open(mp / "f", os.O_RDWR)
    h_added = os.open(mp / "added", os.O_RDWR)
    cwd_fd = os.open(mp, os.O_RDONLY)
    ino_f_old = os.fstat(h_f).st_ino
    try:
        r = ok(mp, "rollback base")
        assert r["rollback"] == "base" and r["branch"] == "main", r
        # at once, through a fresh process
        c = subprocess.run(["cat", str(mp / "f")], capture_output=True, timeout=30)
        assert c.stdout == b"original\n", c
        assert not os.path.exists(mp / "added") and not os.path.exists(mp / "added_dir")
        assert read(mp / "removed_later") == b"I will be removed\n"
        assert read(mp / "gone_dir/inner") == b"inner\n"
        assert os.path.isdir(mp / "src") and not os.path.exists(mp / "src_renamed")
        after = snapshot(str(mp))
        diffs = compare_snapshots(after, expected, names=("after rollback", "at the snapshot"),
                                  ignore=("ino", "atime", "ctime", "blocks", "blksize"))
        assert not diffs, "\n".join(diffs)
        # handles opened before the rollback still see the pre-rollback files
        assert os.pread(h_f, 100, 0) == b"modified after the snapshot\n"
        assert os.pread(h_removed, 100, 0) == b"I will be removed\n"
        assert os.pread(h_added, 100, 0) == b"added\n"
        assert os.fstat(h_f).st_ino != os.stat(mp / "f").st_ino, \
            "new lookups after rollback return the pre-rollback inode"
        # ... and their writes do not show in the restored tree
        os.pwrite(h_f, b"WRITTEN THROUGH AN OLD HANDLE", 0)
        os.pwrite(h_added, b"zombie", 0)
        os.fsync(h_f)
        assert read(mp / "f") == b"original\n"
        assert not os.path.exists(mp / "added")
        assert os.pread(h_f, 100, 0).startswith(b"WRITTEN THROUGH")
        assert os.fstat(h_f).st_ino == ino_f_old
        os.fstat(cwd_fd)
    finally:
        for h in (h_f, h_added, h_removed, cwd_fd):
            os.close(h)
    assert read(mp / "f") == b"original\n"
    assert not os.path.exists(mp / "added")
    # the snapshot itself is untouched, the branch keeps working, rollback persists
    assert read(mp / ".cowfs/snapshots/base/f") == b"original\n"
    write(mp / "after_rollback", b"ok")
    ok(mp, "snapshot base2")
    write(mp / "f", b"again\n")
    ok(mp, "rollback base2")
    assert read(mp / "f") == b"original\n"
    assert read(mp / "after_rollback") == b"ok"
    ok(mp, "rollback base")
    assert not os.path.exists(mp / "after_rollback")
    assert sorted(names(ok(mp, "list"), "snapshots")) == ["base", "base2"]
    cowfs_mount.remount()
    assert read(mp / "f") == b"original\n" and not os.path.exists(mp / "after_rollback")
    diffs = compare_snapshots(snapshot(str(mp)), expected, names=("after remount", "at the snapshot"),
                              ignore=("ino", "atime", "ctime", "blocks", "blksize"))
    assert not diffs, "\n".join(diffs)
    cli("rollback", mp, "base2")
    assert read(mp / "after_rollback") == b"ok"


@pytest.mark.timeout(120)
def test_rollback_new_lookups_never_see_pre_rollback_inode(cowfs_mount):
    """Right after ``rollback`` returns, a path must resolve to the restored file - never to
    the pre-rollback inode still cached by the kernel (whose writes would then leak into the
    restored tree).  Repeated, since the window is short."""
    mp = cowfs_mount.path
    bad = []
    rounds = 200
    for i in range(rounds):
        name = f"n{i}"
        write(mp / name, b"v1\n")
        ok(mp, f"snapshot p{i}")
        write(mp / name, b"v2\n")
        fd = os.open(mp / name, os.O_RDWR)
        try:
            ino_old = os.fstat(fd).st_ino
            ok(mp, f"rollback p{i}")
            ino_new = os.stat(mp / name).st_ino
            got = read(mp / name)
            os.pwrite(fd, b"XX", 0)
        finally:
            os.close(fd)
        got2 = read(mp / name)
        if ino_old == ino_new or got != b"v1\n" or got2 != b"v1\n":
            bad.append((i, hex(ino_old), hex(ino_new), got, got2))
    assert not bad, (f"{len(bad)}/{rounds} rollbacks: a lookup right after rollback returned the "
                     f"pre-rollback inode / content (i, old ino, new ino, read, read after a "
                     f"write through the old handle): {bad[:5]}")


@pytest.mark.timeout(120)
def test_no_name_resolves_inside_a_tree_a_rollback_replaced(cowfs_mount):
    """A name looked up in a pre-rollback directory would put new files into a tree no path
    reaches any more (their data lost at once).  A directory fd opened before the rollback
    (or a current directory there) reaches that tree: lookups, creates, opens and changes
    through it fail with ESTALE, while handles opened before keep working."""
    mp = cowfs_mount.path
    os.mkdir(mp / "d")
    write(mp / "d/f", b"old")
    ok(mp, "snapshot s")
    write(mp / "d/f", b"newer")
    dfd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    ffd = os.open(mp / "d/f", os.O_RDWR)
    try:
        ok(mp, "rollback s")
        for what, fn in [("stat", lambda: os.stat("never-seen", dir_fd=dfd)),
                         ("create", lambda: os.open("g", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)),
                         ("mkdir", lambda: os.mkdir("e", dir_fd=dfd)),
                         ("unlink", lambda: os.unlink("f", dir_fd=dfd)),
                         ("rename", lambda: os.rename("f", "h", src_dir_fd=dfd, dst_dir_fd=dfd)),
                         ("symlink", lambda: os.symlink("t", "l", dir_fd=dfd))]:
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == errno.ESTALE, (what, e.value)
        # Handles opened before the rollback keep working on the old tree.
        assert os.pread(ffd, 10, 0) == b"newer"
        os.pwrite(ffd, b"N", 0)
        os.fchmod(ffd, 0o600)
        assert os.fstat(ffd).st_size == 5
        # Paths from the mount root resolve in the restored tree, which nothing above touched.
        assert read(mp / "d/f") == b"old"
        assert sorted(os.listdir(mp / "d")) == ["f"]
    finally:
        os.close(ffd)
        os.close(dfd)


# ============================================================================================
# clone
# ============================================================================================

def _objects(mp) -> tuple[int, int]:
    s = stats(mp)
    return s["objects_created"], s["objects_freed"]


def stored(mp) -> int:
    """Bytes of stored chunk encodings and tree nodes (the store's own exact accounting)."""
    s = stats(mp)
    return s["chunk_bytes"] + s["tree_node_bytes"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mib", [256, pytest.param(BIG_MIB, marks=pytest.mark.slow, id="full")])
def test_clone_big_file_is_o1_and_shares_chunks(cowfs_mount, mib):
    """Cloning shares every chunk: no object created, the store grows by less than 4 MiB
    (a copy of the chunk references alone would create tree nodes; of the data, mib MiB)."""
    mp = cowfs_mount.path
    size = mib * MiB
    rnd = random.Random(99)
    fd = os.open(mp / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        block = 8 * MiB
        for off in range(0, size, block):
            os.pwrite(fd, rnd.randbytes(block), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    d0 = disk_bytes(mp)
    o0, _ = _objects(mp)
    assert d0 > size * 0.9, f"store holds {d0} bytes after writing {size} random bytes"
    t0 = time.monotonic()
    r = ok(mp, "clone big big.clone")
    wall_ms = (time.monotonic() - t0) * 1000
    assert r["entries"] == 1 and r["cloned"] == "big" and r["to"] == "big.clone", r
    assert os.stat(mp / "big.clone").st_size == size
    d1 = disk_bytes(mp)
    o1, _ = _objects(mp)
    assert o1 == o0, f"cloning created {o1 - o0} objects (must share every chunk)"
    assert d1 - d0 < 4 * MiB, f"store grew by {(d1 - d0) / MiB:.1f} MiB when cloning a {mib} MiB file"
    print(f"clone of {mib} MiB: daemon {r['daemon_ms']} ms, end to end {wall_ms:.1f} ms, "
          f"store {d0} -> {d1}")
    # same content (sampled: start, end, random chunks)
    with open(mp / "big", "rb") as a, open(mp / "big.clone", "rb") as b:
        for off in [0, size - CHUNK] + [rnd.randrange(0, size - CHUNK) for _ in range(40)]:
            a.seek(off)
            b.seek(off)
            assert a.read(CHUNK) == b.read(CHUNK), f"clone differs at {off}"
    # change one byte of the clone: about one chunk (and its tree path) more
    stored_before = stored(mp)
    off = size // 2 + 12345
    with open(mp / "big", "rb") as f:
        f.seek(off)
        orig = f.read(1)
    fd = os.open(mp / "big.clone", os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([orig[0] ^ 0xFF]), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    d2 = disk_bytes(mp)
    o2, _ = _objects(mp)
    assert 1 <= o2 - o1 <= 4, f"changing one byte created {o2 - o1} objects (1 chunk + tree nodes expected)"
    # Exact: one chunk and the nodes on its path.  On disk: the same, give or take RocksDB's
    # own file churn (a memtable flush, a new WAL), which once came to 2.3 MiB in CI.
    grown = stored(mp) - stored_before
    assert grown <= CHUNK + 3 * 16 * 1024, f"changing one byte stored {grown} more bytes of chunks and nodes"
    assert d2 - d1 < 4 * MiB, f"changing one byte grew the store by {(d2 - d1) / MiB:.2f} MiB"
    print(f"one byte changed: {o2 - o1} new objects, store {d1} -> {d2} ({(d2 - d1) / 1024:.0f} KiB)")
    with open(mp / "big", "rb") as a, open(mp / "big.clone", "rb") as b:
        a.seek(off)
        b.seek(off)
        assert a.read(1) == orig and b.read(1) == bytes([orig[0] ^ 0xFF])


@pytest.mark.timeout(120)
def test_clone_directory_tree_preserves_everything(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    src_before = snapshot(str(mp / "src"))
    r = ok(mp, "clone src dst")
    assert "entries" not in r, r  # O(1): the clone did not read the tree (its usage is measured later)
    dst = snapshot(str(mp / "dst"))
    diffs = compare_snapshots(dst, src_before, names=("clone", "source"),
                              ignore=("ino", "atime", "ctime", "blocks", "blksize"))
    # a hard link to a file outside the cloned tree is a file of its own in the clone
    diffs.remove("/readme.outside_link: nlink clone=1 source=2")
    assert not diffs, "clone differs from its source:\n" + "\n".join(diffs)
    # hard links inside the tree are links in the clone; a link to outside is a plain file
    assert os.stat(mp / "dst/pkg/data.bin").st_ino == os.stat(mp / "dst/pkg/data.hardlink").st_ino
    assert os.stat(mp / "dst/pkg/data.bin").st_nlink == 2
    assert os.stat(mp / "dst/pkg/data.bin").st_ino != os.stat(mp / "src/pkg/data.bin").st_ino
    assert os.stat(mp / "src/pkg/data.bin").st_nlink == 2
    assert os.stat(mp / "dst/readme.outside_link").st_nlink == 1
    assert os.stat(mp / "README").st_nlink == 2
    assert os.stat(mp / "dst").st_nlink == os.stat(mp / "src").st_nlink
    # isolation both ways
    write(mp / "dst/pkg/data.bin", b"changed in the clone")
    assert read(mp / "dst/pkg/data.hardlink") == b"changed in the clone"
    assert len(read(mp / "src/pkg/data.bin")) == 200_000
    write(mp / "src/main.py", b"changed in the source")
    assert read(mp / "dst/main.py") == b"print('hi')\n" * 50
    os.unlink(mp / "src/pkg/sub/deep.txt")
    assert os.path.exists(mp / "dst/pkg/sub/deep.txt")
    # clone survives a remount
    after = snapshot(str(mp / "dst"))
    cowfs_mount.remount()
    assert not compare_snapshots(snapshot(str(mp / "dst")), after, ignore=("atime",))
    # file clone through the CLI; clone of a symlink copies the link
    cli("clone", mp, "README", "README.copy")
    assert read(mp / "README.copy") == b"read me\n" and os.stat(mp / "README.copy").st_nlink == 1
    ok(mp, "clone src/link_dangling sl_copy")
    assert os.readlink(mp / "sl_copy") == "/nonexistent/target"
    ok(mp, "clone empty empty2")
    assert os.listdir(mp / "empty2") == [] and stat.S_IMODE(os.stat(mp / "empty2").st_mode) == 0o750
    ok(mp, "clone src/fifo fifo2")
    assert stat.S_ISFIFO(os.lstat(mp / "fifo2").st_mode)
    # a clone into itself is refused
    fails(mp, "clone src src/pkg/inside", "EINVAL")


@pytest.mark.timeout(60)
def test_clone_updates_target_directory_attributes_at_once(cowfs_mount):
    """After clone returns, stat(2) of the target's directory shows the new link count and
    mtime/ctime (the kernel caches directory attributes for 60 s: the daemon must invalidate
    them, as it does for the root after a rollback)."""
    mp = cowfs_mount.path
    os.makedirs(mp / "src/inner")
    write(mp / "src/f", b"f")
    os.mkdir(mp / "parent")
    problems = []
    for target, parent in (("parent/copy", mp / "parent"), ("copy2", mp)):
        before = os.stat(parent)
        time.sleep(0.05)
        ok(mp, f"clone src {target}")
        after = os.stat(parent)
        if after.st_nlink != before.st_nlink + 1:
            problems.append(f"{parent.name or '/'}: nlink {before.st_nlink} -> {after.st_nlink} "
                            f"after cloning a directory into it")
        if after.st_mtime_ns == before.st_mtime_ns or after.st_ctime_ns == before.st_ctime_ns:
            problems.append(f"{parent.name or '/'}: mtime/ctime unchanged after a clone into it")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(90)
def test_restore_file_from_snapshot(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    ok(mp, "snapshot before")
    write(mp / "README", b"ruined\n")
    os.unlink(mp / "src/pkg/sub/deep.txt")
    shutil.rmtree(mp / "src/pkg")
    fails(mp, "clone .cowfs/snapshots/before/README README", "EEXIST")
    os.unlink(mp / "README")
    ok(mp, "clone .cowfs/snapshots/before/README README")
    assert read(mp / "README") == b"read me\n"
    ok(mp, "clone .cowfs/snapshots/before/src/pkg src/pkg")
    diffs = compare_snapshots(snapshot(str(mp / "src/pkg")),
                              snapshot(str(mp / ".cowfs/snapshots/before/src/pkg")),
                              names=("restored", "snapshot"),
                              ignore=("ino", "atime", "ctime", "blocks", "blksize"))
    assert not diffs, "\n".join(diffs)
    # the restored copy is writable and independent of the snapshot
    write(mp / "src/pkg/sub/deep.txt", b"new")
    assert read(mp / ".cowfs/snapshots/before/src/pkg/sub/deep.txt") == b"deep\n" * 1000
    cli("clone", mp, ".cowfs/snapshots/before/src/main.py", "main_from_snapshot.py")
    assert read(mp / "main_from_snapshot.py") == b"print('hi')\n" * 50
    fails(mp, "clone .cowfs/snapshots/nosuch/README x", "ENOENT")
    fails(mp, "clone .cowfs/snapshots/before/nosuch x", "ENOENT")
    fails(mp, "clone .cowfs/ctl x", "EINVAL")


@pytest.mark.timeout(90)
def test_clone_sees_data_not_yet_flushed(cowfs_mount):
    mp = cowfs_mount.path
    fd = os.open(mp / "hot", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"A" * 100_000)
        ok(mp, "clone hot hot.copy")
        assert read(mp / "hot.copy") == b"A" * 100_000
        os.pwrite(fd, b"B" * 10, 0)
        ok(mp, "snapshot hot")
        assert read(mp / ".cowfs/snapshots/hot/hot")[:11] == b"B" * 10 + b"A"
    finally:
        os.close(fd)
    assert read(mp / "hot.copy") == b"A" * 100_000


DEEP = 3000


def _walk_down(top_fd: int, levels: int) -> int:
    """An O_RDONLY descriptor of the directory `levels` "d" entries below top_fd (closed)."""
    fd = top_fd
    for _ in range(levels):
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@pytest.mark.timeout(240)
def test_clone_and_diff_of_a_tree_3000_levels_deep(mount_factory):
    """Commands walk trees with explicit stacks, not by recursion: clone of a tree 3,000
    levels deep failed with RecursionError (issue 20), and so did a diff naming a path that
    deep.  The inode quota makes clone measure the tree first (another walk)."""
    m = mount_factory(options=("quota_inodes=100000",))
    mp = m.path
    os.mkdir(mp / "deep")
    fd = os.open(mp / "deep", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEEP):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    try:
        for name in ("f", "g"):
            f = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(f, b"at the bottom\n")
            os.close(f)
        os.link("f", "f.link", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    ok(mp, "snapshot before")
    fd = _walk_down(os.open(mp / "deep", os.O_RDONLY | os.O_DIRECTORY), DEEP)
    try:
        f = os.open("g", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
        os.write(f, b"changed\n")
        os.close(f)
    finally:
        os.close(fd)
    bottom = "deep/" + "d/" * DEEP
    assert _changes(ok(mp, "diff before")) == {("modified", bottom + "g", None, "file")}
    r = ok(mp, "clone deep deep2", timeout=120)
    assert r["inodes"] == DEEP + 3, r  # deep, DEEP directories, f (two names) and g: the quota walked it
    fd = _walk_down(os.open(mp / "deep2", os.O_RDONLY | os.O_DIRECTORY), DEEP)
    try:
        assert sorted(os.listdir(fd)) == ["f", "f.link", "g"]
        st = [os.stat(n, dir_fd=fd) for n in ("f", "f.link", "g")]
        assert st[0].st_ino == st[1].st_ino and st[0].st_nlink == 2 and st[2].st_nlink == 1
        f = os.open("g", os.O_RDONLY, dir_fd=fd)
        assert os.read(f, 100) == b"at the bottom\nchanged\n"
        os.close(f)
        assert os.stat(".", dir_fd=fd).st_nlink == 2  # the bottom directory has no subdirectory
    finally:
        os.close(fd)
    assert os.stat(mp / "deep2").st_nlink == 3
    assert stats(mp)["usage_inodes"] == 1 + 2 * (DEEP + 3)  # the root; each tree: DEEP + 1 directories, 2 files


# ============================================================================================
# list, diff, branches
# ============================================================================================

@pytest.mark.timeout(90)
def test_list_shows_snapshots_and_branches(cowfs_mount):
    mp = cowfs_mount.path
    write(mp / "a", b"a" * 1000)
    write(mp / "b", b"b" * 2000)
    os.link(mp / "b", mp / "b.link")           # counted once
    os.mkdir(mp / "d")
    os.symlink("a", mp / "sl")
    t0 = time.time()
    ok(mp, "snapshot s1")
    t1 = time.time()
    write(mp / "c", b"c" * 5000)
    r = ok(mp, "branch b1")
    assert r["branch"] == "b1" and r["from"] == "main", r
    r = ok(mp, "branch b2 s1")
    assert r["branch"] == "b2" and r["from"] == "s1", r
    write(mp / "d/e", b"e" * 7)
    ok(mp, "snapshot s2")
    fails(mp, "branch b3 b1", "EINVAL")          # from another branch: through its own mount
    fails(mp, "branch b3 nosuch", "ENOENT")
    r = ok(mp, "branch b3 main")
    assert r["from"] == "main"
    t2 = time.time()

    lst = ok(mp, "list")
    snaps, brs = names(lst, "snapshots"), names(lst, "branches")
    assert set(snaps) == {"s1", "s2"}, snaps
    assert set(brs) == {"main", "b1", "b2", "b3"}, brs
    assert snaps["s1"]["parent"] == "main" and snaps["s2"]["parent"] == "main"
    assert brs["main"]["parent"] is None
    assert brs["b1"]["parent"] == "main" and brs["b2"]["parent"] == "s1" and brs["b3"]["parent"] == "main"
    assert brs["main"]["mounted_here"] is True and brs["b1"]["mounted_here"] is False
    assert all(r["kind"] == "snapshot" for r in snaps.values())
    assert all(r["kind"] == "branch" for r in brs.values())
    assert t0 - 1 <= snaps["s1"]["created"] <= t1 + 1, (t0, snaps["s1"], t1)
    for r in list(snaps.values()) + list(brs.values()):
        assert t0 - 600 <= r["created"] <= t2 + 1, r
    assert snaps["s1"]["created"] < snaps["s2"]["created"]
    assert [r["name"] for r in lst["snapshots"]] == ["s1", "s2"]    # by creation time
    assert snaps["s1"]["logical_bytes"] == 3000, snaps["s1"]
    assert brs["b2"]["logical_bytes"] == 3000
    assert brs["b1"]["logical_bytes"] == 8000, brs["b1"]
    assert snaps["s2"]["logical_bytes"] == 8007
    assert brs["main"]["logical_bytes"] == 8007

    # logical size follows clones, deletes and rollbacks
    ok(mp, "clone c c2")
    assert names(ok(mp, "list"), "branches")["main"]["logical_bytes"] == 13007
    os.unlink(mp / "a")
    assert names(ok(mp, "list"), "branches")["main"]["logical_bytes"] == 12007
    ok(mp, "rollback s1")
    assert names(ok(mp, "list"), "branches")["main"]["logical_bytes"] == 3000
    ok(mp, "rollback s2")
    assert names(ok(mp, "list"), "branches")["main"]["logical_bytes"] == 8007

    # the CLI: text table and --json
    r = cli("list", mp)
    text = r.stdout.decode()
    assert "NAME" in text and all(n in text for n in ("s1", "s2", "b1", "b2", "b3", "main")), text
    assert json.loads(cli("list", mp, "--json").stdout)["ok"] is True
    cli("branch", mp, "b4", "--from", "s2")
    assert names(ok(mp, "list"), "branches")["b4"]["parent"] == "s2"
    # a delete shows in the list
    ok(mp, "delete b4")
    cli("delete", mp, "s2")
    lst = ok(mp, "list")
    assert set(names(lst, "snapshots")) == {"s1"} and "b4" not in names(lst, "branches")
    cowfs_mount.remount()
    lst2 = ok(mp, "list")
    assert names(lst2, "snapshots")["s1"]["created"] == snaps["s1"]["created"]
    assert set(names(lst2, "branches")) == {"main", "b1", "b2", "b3"}


def _changes(reply) -> set:
    out = set()
    for c in reply["changes"]:
        out.add((c["change"], c["path"], c.get("from"), c["type"]))
    return out


@pytest.mark.timeout(120)
def test_diff_reports_exact_changes(cowfs_mount):
    mp = cowfs_mount.path
    for n in ("keep", "mod", "del", "ren_src", "modemod", "rm2", "touched_read"):
        write(mp / n, n.encode() * 10)
    os.mkdir(mp / "olddir")
    write(mp / "olddir/f", b"f")
    os.mkdir(mp / "stay")
    write(mp / "stay/inner", b"inner")
    os.mkdir(mp / "mvdir")
    write(mp / "mvdir/child", b"child")
    ok(mp, "snapshot A")
    ok(mp, "snapshot A2")
    assert ok(mp, "diff A A2")["changes"] == []
    assert ok(mp, "diff A")["changes"] == []

    write(mp / "added", b"new")
    os.unlink(mp / "del")
    write(mp / "mod", b"different content")
    os.rename(mp / "ren_src", mp / "ren_dst")
    os.chmod(mp / "modemod", 0o600)
    os.mkdir(mp / "newdir")
    write(mp / "newdir/f", b"nf")
    os.unlink(mp / "olddir/f")
    os.rmdir(mp / "olddir")
    os.rename(mp / "rm2", mp / "stay/rm2b")
    with open(mp / "stay/rm2b", "ab") as f:
        f.write(b"+more")
    os.symlink("keep", mp / "lnk")
    os.rename(mp / "mvdir", mp / "mvdir2")
    read(mp / "touched_read")                  # a read is not a change
    read(mp / "keep")
    syncfs(mp)
    ok(mp, "snapshot B")

    expected = {
        ("added", "added", None, "file"),
        ("removed", "del", None, "file"),
        ("modified", "mod", None, "file"),
        ("renamed", "ren_dst", "ren_src", "file"),
        ("modified", "modemod", None, "file"),
        ("added", "newdir", None, "dir"),
        ("added", "newdir/f", None, "file"),
        ("removed", "olddir", None, "dir"),
        ("removed", "olddir/f", None, "file"),
        ("renamed", "stay/rm2b", "rm2", "file"),
        ("modified", "stay/rm2b", None, "file"),
        ("modified", "stay", None, "dir"),      # an entry was added to it
        ("added", "lnk", None, "symlink"),
        ("renamed", "mvdir2", "mvdir", "dir"),
    }
    got = _changes(ok(mp, "diff A B"))
    assert got == expected, (f"diff A B\n  missing: {sorted(expected - got, key=str)}\n"
                             f"  unexpected: {sorted(got - expected, key=str)}")
    # B to A is the mirror image
    mirror = set()
    for change, path, frm, typ in expected:
        if change == "added":
            mirror.add(("removed", path, None, typ))
        elif change == "removed":
            mirror.add(("added", path, None, typ))
        elif change == "renamed":
            mirror.add(("renamed", frm, path, typ))
        elif (change, path) == ("modified", "stay/rm2b"):
            mirror.add(("modified", "rm2", None, typ))
        else:
            mirror.add((change, path, frm, typ))
    got = _changes(ok(mp, "diff B A"))
    assert got == mirror, (f"diff B A\n  missing: {sorted(mirror - got, key=str)}\n"
                           f"  unexpected: {sorted(got - mirror, key=str)}")
    # A to live = A to B while nothing changed; then one more change
    assert _changes(ok(mp, "diff A")) == expected
    assert ok(mp, "diff B")["changes"] == []
    # the CLI: text and --json
    text = cli("diff", mp, "A", "B").stdout.decode()
    for line in ("+\tadded", "-\tdel", "M\tmod", "R\tren_dst (from ren_src)"):
        assert line in text.splitlines(), (line, text)
    j = json.loads(cli("diff", mp, "A", "B", "--json").stdout)
    assert _changes(j) == expected
    fails(mp, "diff nosuch", "ENOENT")
    fails(mp, "diff", "EINVAL")
    fails(mp, "diff A B C", "EINVAL")


@pytest.mark.timeout(60)
def test_diff_with_hard_links_names_existing_paths(cowfs_mount):
    """Adding and removing hard links: every path diff reports must exist on its side, and a
    file whose name still exists was not renamed."""
    mp = cowfs_mount.path
    os.mkdir(mp / "hl")
    write(mp / "hl/f", b"x")
    ok(mp, "snapshot h1")
    os.link(mp / "hl/f", mp / "hl/g")           # h2: a second name
    ok(mp, "snapshot h2")
    os.unlink(mp / "hl/g")                      # h3: back to one name (f)
    ok(mp, "snapshot h3")
    os.link(mp / "hl/f", mp / "hl/g2")          # h4: f renamed to g2, through a link
    os.unlink(mp / "hl/f")
    ok(mp, "snapshot h4")
    trees = {n: {p for p in ("hl/f", "hl/g", "hl/g2") if os.path.lexists(mp / ".cowfs/snapshots" / n / p)}
             for n in ("h1", "h2", "h3", "h4")}
    problems = []
    for a, b in (("h1", "h2"), ("h2", "h3"), ("h1", "h3"), ("h3", "h4"), ("h1", "h4")):
        changes = ok(mp, f"diff {a} {b}")["changes"]
        for c in changes:
            if c["type"] != "file":
                continue
            side, name = (a, "A") if c["change"] == "removed" else (b, "B")
            if c["path"] not in trees[side]:
                problems.append(f"diff {a} {b}: {c} - {c['path']!r} does not exist in {side}")
            if c["change"] == "renamed":
                if c["from"] not in trees[a]:
                    problems.append(f"diff {a} {b}: {c} - 'from' {c['from']!r} does not exist in {a}")
                elif c["from"] in trees[b]:
                    problems.append(f"diff {a} {b}: {c} - {c['from']!r} still exists in {b}")
        mentioned = {c["path"] for c in changes} | {c.get("from") for c in changes}
        for p in trees[a] ^ trees[b]:
            if p not in mentioned:
                problems.append(f"diff {a} {b}: {p!r} exists only in {a if p in trees[a] else b} "
                                f"but is not reported: {changes}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_diff_reports_every_path_of_a_changed_hard_linked_file(cowfs_mount):
    """A change to a hard-linked file shows at each of its paths, whichever name was made
    last and whichever names are gone (before: `M hl/b` only, and after `rm hl/b` nothing
    about hl/a at all, while `diff -r` shows it)."""
    mp = cowfs_mount.path
    os.mkdir(mp / "hl")
    write(mp / "hl/a", b"1\n")
    os.link(mp / "hl/a", mp / "hl/b")
    ok(mp, "snapshot s1")
    with open(mp / "hl/a", "ab") as f:
        f.write(b"2\n")
    want = {("modified", "hl/a", None, "file"), ("modified", "hl/b", None, "file")}
    assert _changes(ok(mp, "diff s1")) == want
    # File times come from the kernel's coarse clock (a 4 ms tick here): without a tick
    # between the link and the unlink, hl's mtime would not change and hl would rightly not
    # be reported modified (seen once in CI).
    time.sleep(0.01)
    os.unlink(mp / "hl/b")                  # the name the record kept goes
    want = {("modified", "hl/a", None, "file"), ("removed", "hl/b", None, "file"),
            ("modified", "hl", None, "dir")}
    assert _changes(ok(mp, "diff s1")) == want
    ok(mp, "snapshot s2")
    time.sleep(0.01)                        # a tick, so hl's mtime moves from s2 to s4
    # three names, one renamed, back to one: each step names what is there
    os.link(mp / "hl/a", mp / "hl/c")
    os.mkdir(mp / "sub")
    os.link(mp / "hl/a", mp / "sub/d")
    os.rename(mp / "hl/c", mp / "sub/e")
    ok(mp, "snapshot s3")
    with open(mp / "sub/d", "ab") as f:
        f.write(b"3\n")
    want = {("modified", p, None, "file") for p in ("hl/a", "sub/d", "sub/e")}
    assert _changes(ok(mp, "diff s3")) == want
    os.unlink(mp / "hl/a")
    os.unlink(mp / "sub/e")                 # one name left: sub/d, not the last one made
    ok(mp, "snapshot s4")
    os.chmod(mp / "sub/d", 0o600)
    assert _changes(ok(mp, "diff s4")) == {("modified", "sub/d", None, "file")}
    assert _changes(ok(mp, "diff s2 s4")) == {
        ("renamed", "sub/d", "hl/a", "file"), ("modified", "sub/d", None, "file"),
        ("added", "sub", None, "dir"), ("modified", "hl", None, "dir")}
    # a clone keeps the links inside the cloned tree: both names of the copy
    write(mp / "sub/f", b"f")
    os.link(mp / "sub/f", mp / "sub/g")
    ok(mp, "clone sub sub2")
    ok(mp, "snapshot s5")
    write(mp / "sub2/f", b"changed")
    assert _changes(ok(mp, "diff s5")) == {("modified", "sub2/f", None, "file"),
                                           ("modified", "sub2/g", None, "file")}
    # the same through a remount, and fsck finds the index of names complete
    cowfs_mount.remount()
    assert _changes(ok(mp, "diff s5")) == {("modified", "sub2/f", None, "file"),
                                           ("modified", "sub2/g", None, "file")}
    cowfs_mount.stop()
    r = run_cowfs("fsck", cowfs_mount.store, check=False, timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


@pytest.mark.timeout(120)
def test_format_5_store_gets_its_hard_link_names_indexed(cowfs_mount):
    """A store from before format 6 has hard links without index keys: the upgrade at the
    first open writes them, and diff then names every path as in a new store."""
    from cowfs.kv.base import Batch
    from cowfs.meta.versioned import CF_CHANGES, CF_LINKS, TAGS
    from cowfs.store import FORMAT_VERSION, Store

    mp = cowfs_mount.path
    os.mkdir(mp / "hl")
    write(mp / "hl/a", b"1")
    os.link(mp / "hl/a", mp / "hl/b")
    os.link(mp / "hl/a", mp / "hl/c")
    ok(mp, "snapshot s1")
    time.sleep(0.02)   # mtimes come from the coarse clock (4 ms ticks, as ext4's): let hl's change
    os.unlink(mp / "hl/c")
    cowfs_mount.stop()
    st = Store(str(cowfs_mount.store))
    b = Batch()  # what cowfs before format 6 left: no index, no changelog entries for it
    for k, _ in st.kv.scan(CF_LINKS, b""):
        b.delete(CF_LINKS, k)
    for k, _ in st.kv.scan(CF_CHANGES, b""):
        if k[8:9] == TAGS[CF_LINKS]:
            b.delete(CF_CHANGES, k)
    assert len(b), "hard links made no index keys"
    st.kv.write(b)
    st.close()
    marker = cowfs_mount.store / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 5}))
    cowfs_mount.start()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION
    with open(mp / "hl/b", "ab") as f:
        f.write(b"2")
    assert _changes(ok(mp, "diff s1")) == {("modified", "hl/a", None, "file"), ("modified", "hl/b", None, "file"),
                                           ("removed", "hl/c", None, "file"), ("modified", "hl", None, "dir")}
    cowfs_mount.stop()
    r = run_cowfs("fsck", cowfs_mount.store, check=False, timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


@pytest.mark.timeout(60)
def test_diff_against_live_sees_writes_still_in_page_cache(cowfs_mount):
    """``diff A`` compares with the live tree: a write(2) that returned is part of it, even
    while its data is still in the kernel's page cache (snapshot and clone sync the kernel
    first; diff must too, or it answers about a stale tree)."""
    mp = cowfs_mount.path
    write(mp / "keep", b"keep")
    ok(mp, "snapshot B")
    fd = os.open(mp / "keep", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" appended, not yet flushed")
        got = _changes(ok(mp, "diff B"))
    finally:
        os.close(fd)
    assert got == {("modified", "keep", None, "file")}, \
        f"ctl 'diff B' right after a write returned: {got} (the CLI syncs first; the control file does not)"


@pytest.mark.timeout(90)
def test_branch_of_deleted_snapshot_stays_manageable(cowfs_mount):
    """A branch made from a snapshot must stay listable and deletable from the mount that
    made it after that snapshot is deleted (its name stays taken, so it must not vanish)."""
    mp = cowfs_mount.path
    write(mp / "x", b"x")
    ok(mp, "snapshot base")
    ok(mp, "branch work base")
    ok(mp, "delete base")
    assert "work" in names(ok(mp, "list"), "branches"), \
        "branch 'work' vanished from list after its parent snapshot was deleted"
    fails(mp, "snapshot work", "EEXIST")
    ok(mp, "delete work")
    ok(mp, "snapshot work")


# ============================================================================================
# delete + gc
# ============================================================================================

@pytest.mark.timeout(180)
def test_delete_snapshot_and_gc_reclaim_space(cowfs_mount):
    mp = cowfs_mount.path
    make_tree(mp)
    syncfs(mp)
    ok(mp, "snapshot before")
    base = disk_bytes(mp)
    _, freed0 = _objects(mp)
    big = 96 * MiB
    rnd = random.Random(5)
    fd = os.open(mp / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for off in range(0, big, 8 * MiB):
            os.pwrite(fd, rnd.randbytes(8 * MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    write(mp / "big2", rnd.randbytes(4 * MiB), sync=True)
    ok(mp, "snapshot large")
    grown = disk_bytes(mp)
    assert grown - base > big * 0.9, (base, grown)
    fails(mp, "delete main", "EBUSY")
    ok(mp, "rollback before")
    assert not os.path.exists(mp / "big")
    r = ok(mp, "delete large")
    assert r["deleted"] == "large" and r["kind"] == "snapshot", r
    assert "large" not in names(ok(mp, "list"), "snapshots")
    assert not os.path.exists(mp / ".cowfs/snapshots/large")
    fails(mp, "rollback large", "ENOENT")
    fails(mp, "delete large", "ENOENT")
    r = cli("gc", mp, timeout=600)
    assert b"removed" in r.stdout, r.stdout
    _, freed1 = _objects(mp)
    assert freed1 - freed0 >= (big + 4 * MiB) // CHUNK, \
        f"only {freed1 - freed0} objects freed after deleting {(big >> 20) + 4} MiB of unique chunks"
    margin = max(8 * MiB, (grown - base) // 10)
    deadline = time.monotonic() + 20
    after = disk_bytes(mp)
    while after > base + margin and time.monotonic() < deadline:
        time.sleep(1)
        after = disk_bytes(mp)
    print(f"delete + gc: {base / MiB:.1f} MiB -> {grown / MiB:.1f} MiB -> {after / MiB:.1f} MiB")
    assert after <= base + margin, (
        f"store did not shrink back after delete + gc: {base / MiB:.1f} MiB before the "
        f"snapshot's changes, {grown / MiB:.1f} MiB with them, {after / MiB:.1f} MiB after "
        f"delete + gc ({freed1 - freed0} objects freed by the gc, but the disk space is not "
        f"returned)")


@pytest.mark.timeout(90)
def test_deleted_snapshot_with_open_handles(cowfs_mount):
    """Handles opened inside a snapshot view that is then deleted (and garbage-collected) must
    either keep reading the snapshot's data until closed (as unlinked files and pre-rollback
    handles do) or fail cleanly (ESTALE/ENOENT) - never EIO from freed data, never another
    tree's content."""
    mp = cowfs_mount.path
    data = random.Random(3).randbytes(300_000)
    write(mp / "uniq", data)
    os.mkdir(mp / "dsub")
    write(mp / "dsub/x", b"x")
    ok(mp, "snapshot held")
    snap_names = sorted(os.listdir(mp / ".cowfs/snapshots/held"))
    os.unlink(mp / "uniq")
    os.unlink(mp / "dsub/x")
    os.rmdir(mp / "dsub")
    write(mp / "live_only", b"live")
    fd = os.open(mp / ".cowfs/snapshots/held/uniq", os.O_RDONLY)
    dfd = os.open(mp / ".cowfs/snapshots/held", os.O_RDONLY | os.O_DIRECTORY)
    problems = []
    try:
        ok(mp, "delete held")
        cli("gc", mp, timeout=300)
        time.sleep(1)
        try:
            got = os.pread(fd, len(data) + 1, 0)
            if got != data:
                problems.append(f"read of the open file returned {len(got)} other bytes")
        except OSError as e:
            if e.errno not in (errno.ESTALE, errno.ENOENT):
                problems.append(f"read of the open file: {errno.errorcode.get(e.errno)}")
        try:
            listed = sorted(os.listdir(dfd))
            if listed != snap_names:
                problems.append(f"the open snapshot directory lists {listed} (snapshot had {snap_names})")
        except OSError as e:
            if e.errno not in (errno.ESTALE, errno.ENOENT):
                problems.append(f"listing the open snapshot directory: {errno.errorcode.get(e.errno)}")
    finally:
        os.close(fd)
        os.close(dfd)
    assert cowfs_mount.alive()
    assert read(mp / "live_only") == b"live"
    assert not problems, "; ".join(problems) + "\n" + "\n".join(
        ln for ln in cowfs_mount.log_tail(40).splitlines() if "ERROR" in ln)[-600:]


# ============================================================================================
# errors
# ============================================================================================

@pytest.mark.timeout(120)
def test_bad_commands_fail_cleanly(cowfs_mount):
    mp = cowfs_mount.path
    write(mp / "file", b"data")
    os.mkdir(mp / "dir")
    ok(mp, "snapshot snap")
    ok(mp, "branch br")
    cases = [
        ("frobnicate", "EINVAL"),
        ("", "EINVAL"),
        ("   ", "EINVAL"),
        ("snapshot", "EINVAL"),
        ("snapshot a b", "EINVAL"),
        ("branch", "EINVAL"),
        ("branch a b c", "EINVAL"),
        ("rollback", "EINVAL"),
        ("rollback a b", "EINVAL"),
        ("clone file", "EINVAL"),
        ("clone a b c", "EINVAL"),
        ("delete", "EINVAL"),
        ("list extra", "EINVAL"),
        ("diff", "EINVAL"),
        ("snapshot 'unterminated", "EINVAL"),
        # names
        ("snapshot .hidden", "EINVAL"),
        ("snapshot a/b", "EINVAL"),
        ("snapshot 'sp ace'", "EINVAL"),
        ("snapshot " + "n" * 129, "EINVAL"),
        ("snapshot é", "EINVAL"),
        ("snapshot ''", "EINVAL"),
        ("snapshot ..", "EINVAL"),
        ("branch .x", "EINVAL"),
        ("branch 'a*b'", "EINVAL"),
        # existing names (snapshots and branches share one namespace)
        ("snapshot snap", "EEXIST"),
        ("snapshot br", "EEXIST"),
        ("snapshot main", "EEXIST"),
        ("branch snap", "EEXIST"),
        ("branch main", "EEXIST"),
        # paths
        ("clone ../x y", "EINVAL"),
        ("clone file ../y", "EINVAL"),
        ("clone /etc/passwd y", "EINVAL"),
        ("clone file /tmp/y", "EINVAL"),
        ("clone dir/../../x y", "EINVAL"),
        ("clone . y", "EINVAL"),
        ("clone file .", "EINVAL"),
        ("clone file .cowfs/snapshots/snap/new", "EROFS"),
        ("clone file file", "EEXIST"),
        ("clone file dir", "EEXIST"),
        ("clone file .cowfs", {"EEXIST", "EINVAL"}),
        ("clone nosuch y", "ENOENT"),
        ("clone file nosuchdir/y", "ENOENT"),
        ("clone file file/y", "ENOTDIR"),
        # rollback / delete
        ("rollback br", "EINVAL"),
        ("rollback main", "EINVAL"),
        ("rollback nosuch", "ENOENT"),
        ("delete main", "EBUSY"),
        ("delete nosuch", "ENOENT"),
        ("delete .bad", "EINVAL"),
        ("diff nosuch", "ENOENT"),
    ]
    wrong = []
    for line, errname in cases:
        err, reply = ctl(mp, line)
        allowed = errname if isinstance(errname, set) else {errname}
        if reply["ok"] or reply.get("errno") not in allowed:
            wrong.append(f"{line[:40]!r}: expected {errname}, got {reply}")
        # the mount keeps working after every error
        assert read(mp / "file") == b"data"
    assert ok(mp, "snapshot " + "n" * 128)["snapshot"] == "n" * 128
    assert ok(mp, "snapshot a.b_c-D9")
    # lines over 4 KiB: in one write, and in pieces without a newline
    long_line = ("snapshot " + "x" * 5000 + "\n").encode()
    err, out = ctl_raw(mp, long_line)
    if err != errno.EINVAL:
        wrong.append(f"line of {len(long_line)} bytes: expected EINVAL, got "
                     f"{errno.errorcode.get(err, err)} {out[:200]!r}")

    def pieces():
        fd = os.open(mp / ".cowfs/ctl", os.O_RDWR)
        try:
            for _ in range(3):
                os.write(fd, b"y" * 2000)
            return 0
        except OSError as e:
            return e.errno
        finally:
            os.close(fd)
    e = call_with_timeout(pieces, timeout=CTL_TIMEOUT)
    if e != errno.EINVAL:
        wrong.append(f"6000 bytes without a newline in three writes: expected EINVAL, got "
                     f"{errno.errorcode.get(e, e)}")
    # a good line after a bad one on the same handle works
    def same_handle():
        fd = os.open(mp / ".cowfs/ctl", os.O_RDWR)
        try:
            try:
                os.write(fd, b"bogus\n")
            except OSError as e:
                assert e.errno == errno.EINVAL
            assert json.loads(os.read(fd, 65536))["errno"] == "EINVAL"
            os.write(fd, b"snapshot after_bogus\n")
            return json.loads(os.read(fd, 65536))
        finally:
            os.close(fd)
    assert call_with_timeout(same_handle, timeout=CTL_TIMEOUT)["ok"] is True
    # O_TRUNC is accepted (a shell's ">")
    def trunc():
        fd = os.open(mp / ".cowfs/ctl", os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"snapshot via_trunc\n")
        finally:
            os.close(fd)
    call_with_timeout(trunc, timeout=CTL_TIMEOUT)
    assert "via_trunc" in names(ok(mp, "list"), "snapshots")
    # CLI wrappers: non-zero exit and one line on stderr
    for args in (("snapshot", mp, "snap"), ("rollback", mp, "nosuch"), ("delete", mp, "main"),
                 ("clone", mp, "../x", "y"), ("branch", mp, ".x"), ("diff", mp, "nosuch")):
        r = cli(*args, check=False)
        lines = r.stderr.decode().strip().splitlines()
        if r.returncode == 0 or len(lines) != 1 or "Traceback" in r.stderr.decode():
            wrong.append(f"cowfs {' '.join(map(str, args))}: rc {r.returncode}, stderr {r.stderr!r}")
    assert not wrong, "\n".join(wrong)
    ok(mp, "list")
    write(mp / "still_writable", b"yes")
    assert cowfs_mount.alive()


NON_UTF8_CASES = {
    # id: (line, expected: a set of errno names, or "ok")
    "snapshot-ff": (b"snapshot \xff\xfe\n", {"EINVAL"}),
    "branch-ff": (b"branch \xff\n", {"EINVAL"}),
    "delete-ff": (b"delete \xff\n", {"EINVAL", "ENOENT"}),
    "rollback-ff": (b"rollback \xff\n", {"EINVAL", "ENOENT"}),
    "diff-ff": (b"diff \xff\n", {"EINVAL", "ENOENT"}),
    "branch-from-ff": (b"branch ok \xff\n", {"EINVAL", "ENOENT"}),
    "verb-ff": (b"\xff\n", {"EINVAL"}),
    "clone-src-c3": (b"clone \xc3 x\n", {"ENOENT"}),
    "nul": (b"snapshot a\x00b\n", {"EINVAL"}),
    "nul-clone": (b"clone file a\x00b\n", {"EINVAL"}),
    # file names are bytes: a non-UTF-8 clone target is a valid name
    "clone-dst-ff": (b"clone file \xff\n", "ok"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(NON_UTF8_CASES))
def test_non_utf8_and_nul_fail_cleanly(cowfs_mount, case):
    line, expected = NON_UTF8_CASES[case]
    mp = cowfs_mount.path
    write(mp / "file", b"data")
    try:
        err, out = ctl_raw(mp, line)
    except OSError as e:
        pytest.fail(f"ctl {line!r}: the control file broke: {e} (daemon alive: "
                    f"{cowfs_mount.alive()})\n{cowfs_mount.log_tail(12)}")
    assert cowfs_mount.alive(), f"ctl {line!r} killed the daemon\n{cowfs_mount.log_tail(12)}"
    try:
        reply = json.loads(out)
    except ValueError:
        pytest.fail(f"ctl {line!r}: the write failed with {errno.errorcode.get(err, err)} and the reply "
                    f"is not JSON: {out!r}")
    if expected == "ok":
        assert err == 0 and reply["ok"], (line, reply)
        assert read(os.path.join(os.fsencode(mp), b"\xff")) == b"data"
    else:
        assert err != 0, f"{line!r} succeeded: {out!r}"
        assert errno.errorcode.get(err) in expected, f"{line!r}: {errno.errorcode.get(err, err)} {out!r}"
        assert reply["ok"] is False and reply["errno"] == errno.errorcode[err], reply
    assert read(mp / "file") == b"data"
    ok(mp, "snapshot still_fine")


@pytest.mark.timeout(60)
def test_shell_echo_exit_status(cowfs_mount):
    mp = cowfs_mount.path
    r = sh("echo 'snapshot x' > .cowfs/ctl", cwd=mp)
    assert r.returncode == 0, r
    r = sh("echo 'snapshot x' > .cowfs/ctl", cwd=mp)       # dash: "I/O error" whatever errno
    assert r.returncode != 0, r
    r = sh("echo 'bogus' > .cowfs/ctl", cwd=mp)
    assert r.returncode != 0, r
    r = subprocess.run(["bash", "-c", "echo 'snapshot x' > .cowfs/ctl"], cwd=mp, capture_output=True,
                       timeout=60)
    assert r.returncode != 0 and b"File exists" in r.stderr, r
    r = subprocess.run(["bash", "-c", "echo 'bogus' > .cowfs/ctl"], cwd=mp, capture_output=True,
                       timeout=60)
    assert r.returncode != 0 and b"Invalid argument" in r.stderr, r
    r = sh("printf 'snapshot y\\n' > .cowfs/ctl && echo rollback x > .cowfs/ctl", cwd=mp)
    assert r.returncode == 0, r
    # write then read the reply on one descriptor from the shell
    r = sh("exec 3<>.cowfs/ctl; echo list >&3; cat <&3", cwd=mp)
    assert r.returncode == 0, r
    reply = json.loads(r.stdout)
    assert reply["ok"] and {"x", "y"} <= set(names(reply, "snapshots"))


@pytest.mark.timeout(120)
def test_ctl_sessions_are_private(cowfs_mount, tmp_path):
    mp = cowfs_mount.path
    write(mp / "f", b"f")

    def interleaved():
        a = os.open(mp / ".cowfs/ctl", os.O_RDWR)
        b = os.open(mp / ".cowfs/ctl", os.O_RDWR)
        try:
            os.write(a, b"snapshot from_a\n")
            try:
                os.write(b, b"snapshot from_a\n")
            except OSError as e:
                assert e.errno == errno.EEXIST
            os.write(b, b"list\n")
            ra = json.loads(os.read(a, 1 << 20))
            rb = json.loads(os.read(b, 1 << 20))
            return ra, rb
        finally:
            os.close(a)
            os.close(b)
    ra, rb = call_with_timeout(interleaved, timeout=CTL_TIMEOUT)
    assert ra == {**ra, "ok": True, "snapshot": "from_a"}, ra
    assert "snapshots" in rb and "from_a" in names(rb, "snapshots"), rb

    # two processes hammering the control file, each checking every reply is its own
    script = r"""
import json, os, sys
mp, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
bad = 0
fd = os.open(os.path.join(mp, ".cowfs/ctl"), os.O_RDWR)
for i in range(n):
    kind = i % 3
    if kind == 0:
        line = f"snapshot {tag}-{i}\n"
    elif kind == 1:
        line = f"diff {tag}-{i - 1}\n"
    else:
        line = f"snapshot {tag}-{i - 2}\n"     # EEXIST: its own name in the message
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
    r = json.loads(os.read(fd, 1 << 20))
    if kind == 0:
        good = r.get("ok") and r.get("snapshot") == f"{tag}-{i}"
    elif kind == 1:
        good = r.get("ok") and r.get("from") == f"{tag}-{i - 1}"
    else:
        good = (not r.get("ok")) and r.get("errno") == "EEXIST" and f"{tag}-{i - 2}" in r.get("error", "")
    if not good:
        bad += 1
        print("BAD", line.strip(), r, flush=True)
os.close(fd)
print("done", bad)
"""
    procs = [subprocess.Popen([os.sys.executable, "-c", script, str(mp), tag, "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tag in ("p1", "p2")]
    outs = []
    for p in procs:
        try:
            out, errout = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out.decode(), errout.decode()))
    for rc, out, errout in outs:
        assert rc == 0 and out.strip().endswith("done 0"), (rc, out[-2000:], errout[-2000:])
    snaps = names(ok(mp, "list"), "snapshots")
    assert sum(1 for n in snaps if n.startswith(("p1-", "p2-"))) == 100


# ============================================================================================
# permissions
# ============================================================================================

@pytest.mark.timeout(120)
def test_unprivileged_ctl_and_clone_permissions(mount_factory):
    m = mount_factory(options=["allow_other"])
    mp = m.path
    uid, gid = UNPRIV_UID, UNPRIV_GID
    w = Worker(uid=uid, gid=gid, on_timeout=m.abort)
    other = Worker(uid=uid - 1, gid=gid - 1, on_timeout=m.abort)
    try:
        ctl_path = str(mp / ".cowfs/ctl")
        # root owns the mount root: the control file is root's (0600)
        st = os.stat(ctl_path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), st
        assert w.call("os.open", ctl_path, os.O_RDWR) == ("err", errno.EACCES)
        assert w.call("os.open", ctl_path, os.O_WRONLY) == ("err", errno.EACCES)
        assert w.call("os.open", ctl_path, os.O_RDONLY) == ("err", errno.EACCES)
        assert w.ok("stat", str(mp / ".cowfs"))["mode"] & 0o777 == 0o555
        # the mount root handed over to the user: the control file follows its owner
        os.chown(mp, uid, gid)
        st = os.stat(ctl_path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o600), st
        assert other.call("os.open", ctl_path, os.O_RDWR) == ("err", errno.EACCES)

        # set-up, as root
        write(mp / "root_secret", b"secret", 0o600)
        os.mkdir(mp / "root_dir", 0o755)
        write(mp / "root_dir/readable", b"readable", 0o644)
        os.mkdir(mp / "root_closed", 0o700)
        write(mp / "root_closed/f", b"hidden", 0o644)
        os.mkdir(mp / "mixed", 0o755)
        write(mp / "mixed/ok", b"ok", 0o644)
        write(mp / "mixed/secret", b"no", 0o600)
        os.chown(mp / "mixed", uid, gid)
        os.chmod(mp / "mixed", 0o755)
        w.ok("os.mkdir", str(mp / "mine"), 0o755)
        w.ok("write_file", str(mp / "mine/own"), os.O_CREAT | os.O_WRONLY, 0o600, None, b"own")

        def uctl(line: str):
            fd = w.ok("os.open", ctl_path, os.O_RDWR)
            try:
                res = w.call("os.write", fd, line.encode() + b"\n")
                reply = json.loads(w.ok("os.read", fd, 1 << 20))
            finally:
                w.ok("os.close", fd)
            return res, reply

        expectations = [
            ("clone root_secret mine/x", "EACCES"),          # no read access to the source
            ("clone root_closed/f mine/x", "EACCES"),        # no search access on its directory
            ("clone root_closed mine/x", "EACCES"),          # cannot read the directory
            ("clone mixed mine/mixed", "EACCES"),            # one unreadable file inside
            ("clone root_dir/readable root_dir/copy", "EACCES"),  # no write access to the target dir
            ("clone mine/own root_dir/own", "EACCES"),
            ("clone mine/own root_closed/own", "EACCES"),
        ]
        wrong = []
        for line, errname in expectations:
            res, reply = uctl(line)
            if res != ("err", getattr(errno, errname)) or reply.get("errno") != errname:
                wrong.append(f"{line}: expected {errname}, got {res} {reply}")
        assert not wrong, "\n".join(wrong)
        assert not os.path.exists(mp / "mine/x") and not os.path.exists(mp / "root_dir/copy")
        assert not os.path.exists(mp / "mine/mixed"), "a refused directory clone left a partial copy"

        # allowed clones: new entries belong to the caller
        for line in ("clone root_dir/readable mine/readable", "clone root_dir mine/dircopy",
                     "clone mine/own own_at_root", "clone mixed/ok mine/ok"):
            res, reply = uctl(line)
            assert res[0] == "ok" and reply["ok"], (line, res, reply)
        for p in ("mine/readable", "mine/dircopy", "mine/dircopy/readable", "own_at_root", "mine/ok"):
            st = os.lstat(mp / p)
            assert (st.st_uid, st.st_gid) == (uid, gid), (p, st)
        assert read(mp / "mine/dircopy/readable") == b"readable"
        # the owner of the mount root may snapshot and roll back
        res, reply = uctl("snapshot user_snap")
        assert reply["ok"], reply
        w.ok("os.unlink", str(mp / "mine/own"))
        res, reply = uctl("rollback user_snap")
        assert reply["ok"], reply
        assert read(mp / "mine/own") == b"own"
        # snapshots stay read-only for the user too
        assert w.call("write_file", str(mp / ".cowfs/snapshots/user_snap/mine/own"),
                      os.O_WRONLY, 0o644, None, b"x") == ("err", errno.EROFS)
        assert w.call("os.unlink", str(mp / ".cowfs/snapshots/user_snap/mine/own")) == ("err", errno.EROFS)
        # clone from a snapshot checks permissions as in the live tree
        res, reply = uctl("clone .cowfs/snapshots/user_snap/root_secret mine/s")
        assert reply.get("errno") == "EACCES", reply
    finally:
        w.close()
        other.close()


@pytest.mark.timeout(120)
def test_snapshot_and_clone_sync_the_kernel_only_while_a_file_is_open_for_writing(cowfs_mount):
    """The syncfs before a snapshot or clone (a `sync -f` child: most of the command's time
    end to end) runs only while a handle that may write is open: a close, and the last
    release of an mmap, write the kernel's dirty pages and times back first.  The data is in
    the snapshot either way."""
    import mmap
    mp = cowfs_mount.path

    def syncs() -> dict:
        return json.loads((mp / ".cowfs/stats").read_text())["kernel_syncs"]

    (mp / "d").mkdir()
    s0 = syncs()
    with open(mp / "d/closed", "wb") as f:  # through the page cache, closed just before
        f.write(b"closed data" * 1000)
    ok(mp, "snapshot s1")
    fd = os.open(mp / "d/mapped", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8192)
    mm = mmap.mmap(fd, 8192)
    mm[:6] = b"mapped"
    os.close(fd)  # the mapping keeps the file open for writing: still a writer
    ok(mp, "snapshot s2")
    mm[6:12] = b"-later"
    mm.close()  # the last reference: released, its pages written back first
    deadline = time.monotonic() + 10  # the kernel sends RELEASE after the last close returns
    while syncs()["files_open_for_writing"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert syncs()["files_open_for_writing"] == 0
    ok(mp, "snapshot s3")
    ok(mp, "clone d d2")
    with open(mp / "d/open", "wb") as f:  # open for writing, its data still in the kernel
        f.write(b"still open")
        f.flush()  # to the kernel, which keeps it in its page cache
        ok(mp, "snapshot s4")
        after = syncs()
        assert read(mp / ".cowfs/snapshots/s4/d/open") == b"still open"
    assert after["run"] == s0["run"] + 2, (s0, after)  # s2 and s4
    assert after["skipped"] == s0["skipped"] + 3, (s0, after)  # s1, s3 and the clone
    snaps = mp / ".cowfs/snapshots"
    assert read(snaps / "s1/d/closed") == b"closed data" * 1000
    assert read(snaps / "s2/d/mapped")[:6] == b"mapped"
    assert read(snaps / "s3/d/mapped")[:12] == b"mapped-later"
    assert read(mp / "d2/mapped")[:12] == b"mapped-later" and read(mp / "d2/closed") == b"closed data" * 1000
    # The control file through a shell's ">" (O_TRUNC): the close reports no error (the
    # times the kernel kept for it were refused at the close, when no syncfs had sent them).
    for line in ("help", "snapshot s5"):
        r = sh(f"echo '{line}' > {mp}/.cowfs/ctl")
        assert r.returncode == 0, (line, r.stderr)
    assert "s5" in os.listdir(snaps)

