"""Shared copies (issue #4): a `cp -a` copy of a tree comes to share its original's records.

Sharing must change nothing a process can observe (inode numbers, every attribute, ctime
included, contents, listings), survive remounts and fsck, keep copy and original apart
once either is written (checked against a plain directory doing the same operations), and
give everything back when the copies go.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import mounting
from mounting import fsck, settle, snapshot_tree, stats

KiB = 1 << 10


def copies(src, root, names) -> None:
    """`cp -a src root/name` for each name (cp -a keeps mtimes and atimes, as sharing needs)."""
    for name in names:
        subprocess.run(["cp", "-a", str(src), os.path.join(root, name)], check=True, timeout=120)


def make_tree(root, rnd: random.Random, dirs: int = 6, files: int = 8) -> None:
    """Nested directories of source-like files, an empty file, symlinks."""
    for d in range(dirs):
        sub = root / f"pkg{d}" / ("inner" if d % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (sub / f"m{f}.py").write_bytes(b"".join(b"line %d of %d/%d\n" % (i, d, f)
                                                    for i in range(rnd.randint(0, 400))))
        os.symlink(f"m0.py", sub / "link")
        (sub / "empty").touch()
        os.chmod(sub / "m1.py", 0o600)
    (root / "big.bin").write_bytes(rnd.randbytes(300 * KiB))
    # atimes ahead of every ctime: reading the tree (cp -a does) leaves them alone under
    # relatime, so every copy carries the same atimes.
    future = time.time_ns() + 3600 * 10**9
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + [""]:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(future, os.lstat(p).st_mtime_ns), follow_symlinks=False)


@pytest.mark.timeout(240)
def test_copies_share_records_and_nothing_observable_changes(mount_factory, tmp_path):
    m = mount_factory()
    src = tmp_path / "src"
    make_tree(src, random.Random(1))
    mounting.run_cowfs("snapshot", m.path, "empty")
    copies(src, m.path, ["c0"])
    settle(m.path)
    copies(src, m.path, ["c1", "c2", "c3"])
    # Atimes are kept per copy (like ctimes): a copy whose files were read still shares.
    for dirpath, _dirs, files in os.walk(m.path / "c2"):
        for f in files:
            p = os.path.join(dirpath, f)
            os.utime(p, ns=(1_500_000_000_000_000_000 + len(f), os.lstat(p).st_mtime_ns), follow_symlinks=False)
    before = {i: snapshot_tree(m.path / f"c{i}") for i in (1, 2, 3)}
    settled = settle(m.path)
    assert settled["shared"]["copies_shared"] == 3, settled["shared"]
    s = stats(m.path)
    assert s["shared"]["ranges"] == 3 and s["shared"]["inodes"] >= 3 * 60, s["shared"]
    after = {i: snapshot_tree(m.path / f"c{i}") for i in (1, 2, 3)}
    assert after == before
    # diff names every copied path as added, shared or not.
    diff = json.loads(mounting.run_cowfs("diff", m.path, "empty", "--json").stdout)
    added = {c["path"] for c in diff["changes"] if c["change"] == "added"}
    for i in (1, 2, 3):
        assert {f"c{i}/{p}" for p in before[i] if p != "."} <= added
    m.stop()
    report = fsck(m.store)
    assert report["counts"]["shared_inodes"] >= 3 * 60
    m2 = mount_factory(store=m.store, init=False, name="again")
    assert {i: snapshot_tree(m2.path / f"c{i}") for i in (1, 2, 3)} == before
    m2.stop()


OPS = ["write", "append", "truncate", "create", "unlink", "rename", "mkdir", "rmdir", "chmod", "utime", "symlink",
       "link"]


def _apply(rnd: random.Random, roots: list, op: str, step: int) -> None:
    """One random operation, the same on every root (the mount's tree and the plain one)."""
    rel_files = sorted(os.path.relpath(os.path.join(d, f), roots[0])
                       for d, _s, fs in os.walk(roots[0]) for f in fs)
    rel_dirs = sorted(os.path.relpath(d, roots[0]) for d, _s, _f in os.walk(roots[0]))
    regular = [f for f in rel_files if not os.path.islink(os.path.join(roots[0], f))]
    if not regular:
        op = "create"
    f = rnd.choice(regular) if regular else ""
    d = rnd.choice(rel_dirs)
    data = rnd.randbytes(rnd.randint(0, 3000))
    empty = not os.listdir(os.path.join(roots[0], d))
    for root in roots:
        if op == "write":
            with open(os.path.join(root, f), "r+b") as fh:
                fh.seek(random.Random(step).randint(0, 500))
                fh.write(data)
        elif op == "append":
            with open(os.path.join(root, f), "ab") as fh:
                fh.write(data)
        elif op == "truncate":
            os.truncate(os.path.join(root, f), len(data))
        elif op == "create":
            with open(os.path.join(root, d, f"new{step}"), "wb") as fh:
                fh.write(data)
        elif op == "unlink":
            os.unlink(os.path.join(root, f))
        elif op == "rename":
            os.rename(os.path.join(root, f), os.path.join(root, d, f"moved{step}"))
        elif op == "mkdir":
            os.mkdir(os.path.join(root, d, f"dir{step}"))
        elif op == "rmdir":
            if d in (".", "orig", "copy"):
                pass
            elif empty:
                os.rmdir(os.path.join(root, d))
            else:
                shutil.rmtree(os.path.join(root, d))
        elif op == "chmod":
            os.chmod(os.path.join(root, f), 0o640)
        elif op == "utime":
            os.utime(os.path.join(root, f), ns=(1_600_000_000_000_000_000 + step, 1_600_000_000_000_000_000 + step))
        elif op == "symlink":
            os.symlink(f"target{step}", os.path.join(root, d, f"sl{step}"))
        elif op == "link":
            os.link(os.path.join(root, f), os.path.join(root, d, f"hl{step}"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_copy_and_original_stay_apart_like_a_plain_directory(mount_factory, tmp_path, seed):
    """After sharing, random operations on the copy and on the original (renames and hard
    links across the two included), mirrored on plain directories; a snapshot taken before
    them still shows the old trees; then a remount."""
    rnd = random.Random(seed)
    m = mount_factory()
    src = tmp_path / "src"
    make_tree(src, rnd)
    plain = tmp_path / "plain"
    plain.mkdir()
    copies(src, m.path, ["orig", "copy"])
    copies(src, plain, ["orig", "copy"])
    assert settle(m.path)["shared"]["copies_shared"] == 1
    mounting.run_cowfs("snapshot", m.path, "before")
    old = {n: snapshot_tree(plain / n, False, True) for n in ("orig", "copy")}
    assert {n: snapshot_tree(m.path / n, full=False) for n in ("orig", "copy")} == \
        {n: snapshot_tree(m.path / "orig", full=False) for n in ("orig", "copy")}
    for step in range(100):
        _apply(rnd, [m.path, plain], rnd.choice(OPS), step)
    assert snapshot_tree(m.path, False, True) == snapshot_tree(plain, False, True)
    for n in ("orig", "copy"):
        assert snapshot_tree(m.path / ".cowfs" / "snapshots" / "before" / n, False, True) == old[n], n
    m.stop()
    fsck(m.store)
    m2 = mount_factory(store=m.store, init=False, name="again")
    assert snapshot_tree(m2.path, False, True) == snapshot_tree(plain, False, True)
    m2.stop()


@pytest.mark.timeout(300)
def test_originals_stay_for_their_copies_and_everything_goes_with_them(mount_factory, tmp_path):
    """Deleting the original keeps the copies whole (through gc); deleting the copies too
    frees the ranges, their tombstones and the data; rollback and branches see the right trees."""
    m = mount_factory()
    src = tmp_path / "src"
    make_tree(src, random.Random(3), dirs=10)
    copies(src, m.path, ["orig", "c1", "c2"])
    mounting.run_cowfs("snapshot", m.path, "unshared")
    settle(m.path)
    assert stats(m.path)["shared"]["ranges"] == 2
    mounting.run_cowfs("gc", m.path, timeout=300)
    full = stats(m.path)
    want = snapshot_tree(m.path / "orig", full=False)
    assert snapshot_tree(src, False, True) == snapshot_tree(m.path / "orig", False, True)
    shutil.rmtree(m.path / "orig")
    mounting.run_cowfs("gc", m.path, timeout=300)
    assert snapshot_tree(m.path / "c1", full=False) == want
    # A branch made now sees the copies; rolling back to a snapshot taken before sharing too.
    mounting.run_cowfs("branch", m.path, "side")
    mounting.run_cowfs("rollback", m.path, "unshared")
    for name in ("orig", "c1", "c2"):
        assert snapshot_tree(m.path / name, full=False) == want, name
    mounting.run_cowfs("delete", m.path, "unshared")
    mounting.run_cowfs("delete", m.path, "side")
    m.stop()  # the kernel's inodes of the tree before the rollback keep its layer alive till then
    m = mount_factory(store=m.store, init=False, name="again")
    for name in ("orig", "c1", "c2"):
        shutil.rmtree(m.path / name)
    mounting.run_cowfs("gc", m.path, timeout=300)
    empty = stats(m.path)
    assert empty["shared"]["ranges"] == 0, empty["shared"]
    assert empty["logical_bytes"] == 0 and empty["chunks"] == 0, empty
    deadline = time.monotonic() + 10  # the last RELEASE(DIR)s come asynchronously
    while stats(m.path)["usage_inodes"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats(m.path)["usage_inodes"] == 1
    assert full["logical_bytes"] > 0
    m.stop()
    report = fsck(m.store)
    assert report["counts"]["inodes"] == 1 and not report["counts"].get("shared_inodes")


@pytest.mark.timeout(300)
def test_kill9_while_sharing_loses_nothing_and_the_work_resumes(mount_factory, tmp_path):
    src = tmp_path / "src"
    make_tree(src, random.Random(4), dirs=12, files=10)
    m = mount_factory(options=("dedup=off",))
    copies(src, m.path, [f"c{i}" for i in range(10)])
    want = snapshot_tree(m.path / "c0", full=False)
    m.stop()
    for delay in (0.0, 0.05, 0.15, 0.3):
        m.options = ["dedup=on"]
        m.start()
        waiter = subprocess.Popen(mounting.cowfs_command() + ["dedup", str(m.path), "--wait"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.killpg(m.pid, signal.SIGKILL)
        m.proc.wait(timeout=30)
        m.exit_codes.append(m.proc.returncode)
        waiter.wait(timeout=60)
        subprocess.run(["fusermount3", "-u", str(m.path)], timeout=30)
        if m.mounted():
            mounting.lazy_unmount(m.path)
        fsck(m.store)
    m.options = ["dedup=on"]
    m.start()
    assert settle(m.path)["shared"]["ranges"] == 9
    for i in range(10):
        assert snapshot_tree(m.path / f"c{i}", full=False) == want, i
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(120)
def test_the_daemon_shares_copies_on_its_own_when_the_mount_is_quiet(mount_factory, tmp_path):
    src = tmp_path / "src"
    make_tree(src, random.Random(5))
    m = mount_factory()
    copies(src, m.path, ["c0", "c1", "c2"])
    deadline = time.monotonic() + 60
    while stats(m.path)["shared"]["ranges"] < 2:  # admin requests do not count as activity
        assert time.monotonic() < deadline, stats(m.path)["shared"]
        time.sleep(0.2)
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(120)
def test_share_off_keeps_copies_records_of_their_own(mount_factory, tmp_path):
    src = tmp_path / "src"
    make_tree(src, random.Random(6))
    m = mount_factory(options=("share=off",))
    copies(src, m.path, ["c0", "c1"])
    assert settle(m.path)["shared"]["ranges"] == 0
    m.stop()
    m.options = []
    m.start()
    assert settle(m.path)["shared"]["ranges"] == 1
    m.stop()
    fsck(m.store)
