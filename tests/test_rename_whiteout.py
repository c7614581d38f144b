"""renameat2(RENAME_WHITEOUT): the kernel's own filesystem is the oracle.

The same sequence of renames runs in a directory of the filesystem under the test's temporary
directory (ext4 or tmpfs: whatever the kernel itself implements) and on the cowfs mount, as
root and as the unprivileged uid, and every result and the resulting tree (types, modes,
device numbers, owners, link counts) must be the same.  Then what only cowfs has: the
whiteout counts against the inode quota, survives a remount and leaves fsck clean; and an
overlayfs mount whose upper directory is on cowfs deletes a lower file with a whiteout.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, Worker, renameat2

from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem
from cowfs.store import ROOT_INO, Store, init_store


def _tree(root: str) -> dict:
    """What the kernel shows of root: per name its type and mode, device, owner, link count,
    and a regular file's content (directory sizes differ between filesystems: left out)."""
    st = os.lstat(root)
    out: dict = {".": (oct(st.st_mode), st.st_nlink)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = [oct(st.st_mode), st.st_rdev, st.st_uid, st.st_gid, st.st_nlink]
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    entry.append(f.read())
            out[os.path.relpath(p, root)] = tuple(entry)
    return out


STEPS = [
    # (source, target, flags): each runs after the previous ones
    ("f1", "g1", RENAME_WHITEOUT),                          # a file: a whiteout stays at f1
    ("f2", "g1", RENAME_WHITEOUT),                          # over an existing file
    ("f3", "g1", RENAME_WHITEOUT | RENAME_NOREPLACE),       # EEXIST, nothing changes
    ("f3", "g3", RENAME_WHITEOUT | RENAME_NOREPLACE),       # target absent: allowed
    ("f4", "g1", RENAME_WHITEOUT | RENAME_EXCHANGE),        # EINVAL (the kernel refuses)
    ("f4", "g4", 1 << 3),                                   # an unknown flag: EINVAL
    ("f4", "g4", RENAME_WHITEOUT | (1 << 3)),               # one known, one not: EINVAL
    ("d/sub", "moved", RENAME_WHITEOUT),                    # a directory, across parents
    ("f1", "again", RENAME_WHITEOUT),                       # a whiteout itself moves
    ("link1", "link2", RENAME_WHITEOUT),                    # two names of one inode: no-op
    ("nosuch", "x", RENAME_WHITEOUT),                       # ENOENT
    ("sg/f", "sg/g", RENAME_WHITEOUT),                      # setgid directory: its group
    ("f4", "d/f4", RENAME_WHITEOUT),                        # into a subdirectory
]


def _prepare(root: str) -> None:
    os.makedirs(os.path.join(root, "d/sub"))
    os.makedirs(os.path.join(root, "sg"))
    os.chown(os.path.join(root, "sg"), 0, UNPRIV_GID)
    os.chmod(os.path.join(root, "sg"), 0o2777)
    for n in ("f1", "f2", "f3", "f4", "g1", "link1", "sg/f"):
        with open(os.path.join(root, n), "wb") as f:
            f.write(n.encode())
    os.link(os.path.join(root, "link1"), os.path.join(root, "link2"))
    os.chmod(root, 0o777)


def _run(root: str, call) -> list:
    """Each step's result ("ok" or an errno name) and the tree after it."""
    seen = []
    for src, dst, flags in STEPS:
        r = call("renameat2", os.path.join(root, src), os.path.join(root, dst), flags)
        seen.append((src, dst, flags, "ok" if r[0] == "ok" else errno.errorcode[r[1]], _tree(root)))
    return seen


def _compare(ref: list, got: list) -> list[str]:
    problems = []
    for (src, dst, flags, r1, t1), (_, _, _, r2, t2) in zip(ref, got):
        what = f"renameat2({src!r}, {dst!r}, {flags:#x})"
        if r1 != r2:
            problems.append(f"{what}: the kernel's filesystem says {r1}, cowfs {r2}")
        for name in sorted(set(t1) | set(t2)):
            if t1.get(name) != t2.get(name):
                problems.append(f"after {what}: {name!r} is {t1.get(name)} there, {t2.get(name)} on cowfs")
    return problems


def _direct(op, *args):
    assert op == "renameat2"
    try:
        renameat2(*args)
    except OSError as e:
        return ("err", e.errno)
    return ("ok", None)


@pytest.mark.timeout(120)
def test_rename_whiteout_as_the_kernel_does(mount_factory, test_dir):
    m = mount_factory(options=["allow_other"])
    ref, mine = str(test_dir / "ref"), str(m.path / "t")
    problems = []
    for who in ("root", "unprivileged"):
        for root in (ref, mine):
            shutil.rmtree(root, ignore_errors=True)
            os.mkdir(root)
            _prepare(root)
        if who == "root":
            problems += [f"[root] {p}" for p in _compare(_run(ref, _direct), _run(mine, _direct))]
            continue
        w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID, on_timeout=m.abort)
        try:
            a, b = _run(ref, w.call), _run(mine, w.call)
        finally:
            w.close()
        problems += [f"[uid {UNPRIV_UID}] {p}" for p in _compare(a, b)]
    assert not problems, "\n".join(problems)
    # (the unprivileged run's tree) a 0/0 character device without permission bits at each old name
    for name in ("f1", "f2", "f3", "again", "sg/f"):
        st = os.lstat(os.path.join(mine, name))
        assert (stat.S_ISCHR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev) == (True, 0, 0), name


@pytest.mark.timeout(120)
def test_rename_whiteout_counts_persists_and_fscks_clean(mount_factory):
    m = mount_factory(options=["quota_inodes=4"])
    mp = m.path
    for n in ("a", "b"):
        with open(mp / n, "wb") as f:
            f.write(n.encode())
    os.mkdir(mp / "d")   # 4 inodes with the root: the quota is reached
    with pytest.raises(OSError) as e:
        renameat2(mp / "a", mp / "d/a", RENAME_WHITEOUT)
    assert e.value.errno == errno.EDQUOT, e.value
    assert sorted(os.listdir(mp)) == ["a", "b", "d"] and os.listdir(mp / "d") == []
    os.unlink(mp / "b")
    renameat2(mp / "a", mp / "d/a", RENAME_WHITEOUT)    # the whiteout takes b's place in the quota
    with pytest.raises(OSError) as e:
        os.mkdir(mp / "e")
    assert e.value.errno == errno.EDQUOT, e.value
    m.remount()
    st = os.lstat(mp / "a")
    assert (stat.S_ISCHR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev) == (True, 0, 0)
    assert (mp / "d/a").read_bytes() == b"a"
    m.stop()
    r = mounting.run_cowfs("fsck", m.store, check=False, timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


async def test_core_refuses_unknown_rename_flags(tmp_path):
    """The kernel filters renameat2's flags before FUSE, but FUSE_RENAME2 carries any value:
    the core refuses what it does not implement instead of ignoring it (in process)."""
    init_store(str(tmp_path / "s"))
    store = Store(str(tmp_path / "s"))
    try:
        fs = Filesystem(store, "main")
        root = fs.node(fs.primary, ROOT_INO)
        await fs.make(root, b"a", stat.S_IFREG | 0o644, 0, 0)
        for flags in (1 << 3, 1 << 31, RENAME_WHITEOUT | RENAME_EXCHANGE, RENAME_NOREPLACE | RENAME_EXCHANGE):
            with pytest.raises(FSError) as e:
                await fs.rename(root, b"a", root, b"b", flags)
            assert e.value.errno == errno.EINVAL, flags
        assert fs.child_ino(root, b"a") is not None and fs.child_ino(root, b"b") is None
    finally:
        store.close()


def _overlay_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            if "overlay" in f.read():
                return True
    except OSError:
        return False
    return subprocess.run(["modprobe", "overlay"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")
def test_overlayfs_upper_dir_on_cowfs(cowfs_mount, test_dir):
    """A container runtime inside a sandbox: overlayfs with its upper and work directories on
    cowfs.  The kernel mounts it only if the upper filesystem has RENAME_WHITEOUT (before,
    "overlayfs: upper fs does not support RENAME_WHITEOUT ... missing required features"), and
    deleting lower files through it leaves whiteouts in the upper directory."""
    if not _overlay_supported():
        pytest.skip("no overlayfs in this kernel")
    lower, merged = test_dir / "lower", test_dir / "merged"
    up, work = cowfs_mount.path / "upper", cowfs_mount.path / "work"
    for d in (lower, lower / "ldir", merged, up, work):
        d.mkdir()
    (lower / "gone").write_bytes(b"lower")
    (lower / "kept").write_bytes(b"kept")
    (lower / "ldir/x").write_bytes(b"x")
    opts = f"lowerdir={lower},upperdir={up},workdir={work}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, (f"overlayfs refused cowfs as its upper filesystem: {r.stderr.decode()}"
                               + subprocess.run(["dmesg"], capture_output=True, timeout=30).stdout.decode()[-600:])
    try:
        os.unlink(merged / "gone")
        shutil.rmtree(merged / "ldir")
        (merged / "new").write_bytes(b"new")
        assert sorted(os.listdir(merged)) == ["kept", "new"]
    finally:
        r = subprocess.run(["umount", str(merged)], capture_output=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, timeout=60)
    for name in ("gone", "ldir"):
        st = os.lstat(up / name)
        assert (stat.S_ISCHR(st.st_mode), st.st_rdev) == (True, 0), f"upper/{name} is no whiteout: {oct(st.st_mode)}"
    assert (up / "new").read_bytes() == b"new"
    # mounted again, the whiteouts still hide the lower files
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True, timeout=60)
    try:
        assert sorted(os.listdir(merged)) == ["kept", "new"]
    finally:
        subprocess.run(["umount", "-l", str(merged)], capture_output=True, timeout=60)
