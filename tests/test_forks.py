"""Forks: several branches of one store mounted at once (``cowfs mount STORE MP --branch B``
while the store is mounted: bind mounts served by the one daemon).

The first mount is the ``cowfs_mount`` fixture (a foreground daemon); forks come from the
``forks`` fixture (conftest.py), which unmounts whatever is left at teardown, before the
fixture's own mount goes.  Threads are joined with timeouts; the mount's watchdog aborts a hung
daemon (releasing every fork, since they share its FUSE connection).
"""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time

import pytest

import mounting
from mounting import MiB, disk_bytes, fails, names, ok, read, run_cowfs, stats, write

TREE_FILES = 20          # 20 x 1 MiB of random data ...
SMALL_FILES = 100        # ... plus small files: a ~20 MiB tree


def build_tree(root) -> dict[str, str]:
    """The shared starting tree; returns {relative path: sha256}."""
    rnd = random.Random(2024)
    sums = {}
    os.makedirs(os.path.join(root, "data"))
    os.makedirs(os.path.join(root, "small"))
    for i in range(TREE_FILES):
        rel = f"data/file{i:02d}"
        data = rnd.randbytes(MiB)
        write(os.path.join(root, rel), data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    for i in range(SMALL_FILES):
        rel = f"small/s{i}"
        data = f"small file {i}\n".encode() * 20
        write(os.path.join(root, rel), data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def tree_sums(root) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(read(p)).hexdigest()
    return out


def inodes(root) -> dict[str, int]:
    out = {"": os.stat(root).st_ino}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


def fork_changes(i: int) -> dict[str, bytes | None]:
    """What fork i writes (None: deleted): unique data, so nothing dedups across forks."""
    rnd = random.Random(1000 + i)
    ch: dict[str, bytes | None] = {
        f"fork{i}_new": rnd.randbytes(256 << 10),
        f"data/file{i:02d}": rnd.randbytes(MiB),            # rewritten
        f"data/file{10 + i:02d}": None,                     # deleted
        f"small/s{i}": f"fork {i} was here\n".encode(),
    }
    for k in range(20):
        ch[f"dir_of_{i}/n{k}"] = f"fork {i} file {k}\n".encode()
    return ch


def apply_changes(root, i: int) -> None:
    os.mkdir(os.path.join(root, f"dir_of_{i}"))
    for rel, data in fork_changes(i).items():
        p = os.path.join(root, rel)
        if data is None:
            os.unlink(p)
        else:
            write(p, data, sync=rel.startswith("data/"))
    ok(root, f"snapshot done-{i}")


def expected_sums(base: dict[str, str], i: int | None) -> dict[str, str]:
    out = dict(base)
    if i is not None:
        for rel, data in fork_changes(i).items():
            if data is None:
                out.pop(rel, None)
            else:
                out[rel] = hashlib.sha256(data).hexdigest()
    return out


def run_threads(fns, timeout: float) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in fns]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.1, deadline - time.monotonic()))
    stuck = [t for t in ts if t.is_alive()]
    assert not stuck, f"{len(stuck)} writer threads still running after {timeout}s (daemon hung?)"
    if errors:
        raise errors[0]


def daemon_pids(store) -> list[int]:
    return [p for p in mounting.pids_mentioning(store) if mounting.pid_alive(p)]


@pytest.mark.timeout(240)
def test_four_forks_concurrent_isolated_and_sharing_chunks(cowfs_mount, forks):
    mp, store = cowfs_mount.path, cowfs_mount.store
    empty = disk_bytes(mp)
    base = build_tree(mp)
    mounting.syncfs(mp)
    ok(mp, "snapshot base")
    for i in range(4):
        assert ok(mp, f"branch f{i} base")["from"] == "base"
    tree_disk = disk_bytes(mp) - empty
    tree_bytes = TREE_FILES * MiB
    assert tree_disk > tree_bytes * 0.9, tree_disk
    objects0 = stats(mp)["objects_created"]

    fps = [forks.mount(store, f"f{i}") for i in range(4)]
    for fp in fps:
        assert mounting.is_mounted(fp)
        assert tree_sums(fp) == base
    ok(fps[2], "snapshot start-2")  # a fork rolls back only to its own snapshots
    # a branch cannot be mounted twice; unknown branches are refused
    r = forks.mount(store, "f1", name="again", check=False)
    assert r.returncode != 0 and b"already served by pid" in r.stderr, r
    r = forks.mount(store, "nosuch", check=False)
    assert r.returncode != 0 and r.stderr.strip(), r
    # one file, five views: five inode numbers
    inos = [os.stat(p / "data/file00").st_ino for p in [mp] + fps]
    assert len(set(inos)) == 5, inos
    roots = [os.stat(p).st_ino for p in fps]
    assert len(set(roots)) == 4, roots

    run_threads([lambda i=i, fp=fp: apply_changes(fp, i) for i, fp in enumerate(fps)], timeout=120)

    for i, fp in enumerate(fps):
        got = tree_sums(fp)
        want = expected_sums(base, i)
        assert got == want, (f"fork f{i}: missing {sorted(set(want) - set(got))[:5]}, "
                             f"unexpected {sorted(set(got) - set(want))[:5]}, "
                             f"different {[k for k in want if k in got and got[k] != want[k]][:5]}")
        # a fork sees its own snapshots only: not main's base, not its siblings'
        snaps = set(names(ok(fp, "list"), "snapshots"))
        assert snaps == {f"done-{i}"} | ({"start-2"} if i == 2 else set()), (i, snaps)
        assert sorted(os.listdir(fp / ".cowfs/snapshots")) == sorted(snaps)
        fails(fp, "rollback base", "ENOENT")
    assert tree_sums(mp) == base, "the fork writes leaked into main"
    # main owns the forks made from it: it sees their snapshots, deletes neither them nor the forks
    assert set(names(ok(mp, "list"), "snapshots")) == {"base", "start-2"} | {f"done-{i}" for i in range(4)}
    fails(mp, "delete f1", "EBUSY")             # mounted as a fork
    fails(mp, "delete done-1", "EBUSY")         # a snapshot of a mounted fork
    fails(fps[1], "delete f1", "EBUSY")
    fails(fps[1], "delete f2", "ENOENT")        # a sibling

    # a rollback in one fork touches no other
    ok(fps[2], "rollback start-2")
    assert tree_sums(fps[2]) == base
    assert tree_sums(fps[3]) == expected_sums(base, 3) and tree_sums(mp) == base
    assert set(names(ok(fps[2], "list"), "snapshots")) == {"start-2", "done-2"}
    ok(fps[2], "rollback done-2")
    assert tree_sums(fps[2]) == expected_sums(base, 2)

    # chunks are shared: 4 forks cost one copy of the tree plus their changes
    changed_bytes = sum(len(d) for i in range(4) for d in fork_changes(i).values() if d)
    objects = stats(mp)["objects_created"] - objects0
    max_objects = sum(-(-len(d) // (64 << 10)) + 2 for i in range(4) for d in fork_changes(i).values() if d)
    assert objects <= max_objects, f"the forks created {objects} objects for {max_objects} changed chunks"
    total = disk_bytes(mp) - empty
    # (the write-ahead log holds the changes a second time until RocksDB flushes)
    limit = tree_disk + 2 * changed_bytes + 4 * MiB
    print(f"tree {tree_disk / MiB:.1f} MiB, changes {changed_bytes / MiB:.1f} MiB, "
          f"store with 4 forks {total / MiB:.1f} MiB, {objects} objects created")
    assert total <= limit, (f"store holds {total / MiB:.1f} MiB for 4 forks of a {tree_disk / MiB:.1f} MiB "
                            f"tree with {changed_bytes / MiB:.1f} MiB of changes")
    assert total < 2 * tree_disk


@pytest.mark.timeout(240)
def test_fork_umount_remount_and_daemon_lifetime(cowfs_mount, forks):
    mp, store = cowfs_mount.path, cowfs_mount.store
    base = build_tree(mp)
    ok(mp, "snapshot base")
    for i in range(3):
        ok(mp, f"branch f{i} base")
    fps = [forks.mount(store, f"f{i}") for i in range(3)]
    for i, fp in enumerate(fps):
        write(fp / f"mine{i}", f"fork {i}\n".encode())
        os.mkdir(fp / f"d{i}")
        write(fp / f"d{i}/x", b"x")
    ino_before = [inodes(fp) for fp in fps]
    ino_main = inodes(mp)
    daemon = cowfs_mount.pid

    # unmounting one fork leaves the others (and main) working
    forks.umount(fps[0])
    assert not mounting.is_mounted(fps[0])
    assert cowfs_mount.alive()
    for i, fp in enumerate(fps[1:], 1):
        assert read(fp / f"mine{i}") == f"fork {i}\n".encode()
        write(fp / f"after_umount_{i}", b"still writable")
        ok(fp, f"snapshot s-{i}")
    write(mp / "main_after", b"main too")

    # the same branch mounted again: its changes and its inode numbers are back
    forks.mount(store, "f0")
    assert read(fps[0] / "mine0") == b"fork 0\n"
    assert inodes(fps[0]) == ino_before[0], "inode numbers changed across a remount of the fork"

    # unmount main (the first mount): the forks stay, served by the same daemon
    run_cowfs("umount", mp, timeout=60)
    assert not mounting.is_mounted(mp)
    assert cowfs_mount.alive() and cowfs_mount.pid == daemon
    for i, fp in enumerate(fps):
        assert read(fp / f"mine{i}") == f"fork {i}\n".encode()
        write(fp / f"after_main_{i}", b"x")
    assert stats(fps[1])["daemon_pid"] == daemon
    # a branch can still be attached with main gone
    ok(fps[1], "branch late")
    late = forks.mount(store, "late")
    assert read(late / "mine1") == b"fork 1\n" and read(late / "after_main_1") == b"x"
    write(late / "late_file", b"late")

    # the daemon exits once the last mount goes
    for fp in fps + [late]:
        forks.umount(fp)
        if fp is not late:
            assert cowfs_mount.alive(), f"daemon exited with {late} still mounted"
    try:
        rc = cowfs_mount.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon is still running after the last `cowfs umount`")
    assert rc == 0, rc
    assert not mounting.fuse_mounts_under(str(fps[0].parent))
    assert not daemon_pids(store), daemon_pids(store)

    # everything again: inode numbers are stable across a full restart too
    cowfs_mount.start()
    now = inodes(mp)
    assert {k: now[k] for k in ino_main} == ino_main, "inode numbers of main changed across a restart"
    assert read(mp / "main_after") == b"main too"
    for i in range(3):
        forks.mount(store, f"f{i}")
    for i, fp in enumerate(fps):
        now = inodes(fp)
        assert {k: now[k] for k in ino_before[i]} == ino_before[i], f"fork f{i}: inode numbers changed"
        assert read(fp / f"mine{i}") == f"fork {i}\n".encode()
        assert tree_sums(fp)["data/file00"] == base["data/file00"]
    assert read(fps[1] / "after_umount_1") == b"still writable"
    # inode numbers differ between forks for the same path
    assert len({os.stat(fp / "data/file00").st_ino for fp in fps}) == 3
    for fp in fps:
        forks.umount(fp)
    assert cowfs_mount.alive()
    # an unmounted fork's branch can be deleted; then it cannot be mounted any more
    ok(mp, "delete f2")
    r = forks.mount(store, "f2", check=False)
    assert r.returncode != 0 and not mounting.is_mounted(fps[2]), r
