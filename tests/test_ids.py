"""Identifiers that never run out (issue 20), on real mounts.

* A store past 65,536 snapshots + branches (scripts/bulkstore.fan: 66,001 of them) mounts,
  and a wide sample of its snapshots (the newest, whose view ids are beyond 16 bits,
  included) and several of its newest branches read right, with inode numbers unique.
* Slot recycling: with a small test-only slot table (-o view_slots=N), browsing many more
  snapshots than there are slots reads every one right, st_ino stays unique among the
  inodes held at once and stable while held, and only when every slot is held by inodes in
  use does a lookup fail, with ENFILE.
* A deleted snapshot the kernel still holds is dropped from the kernel's cache at the delete,
  so its view goes and garbage collection compacts its layer.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time

import pytest

import mounting
import workload
from cowfs import api

sys.path.insert(0, str(mounting.REPO / "scripts"))
import bulkstore  # noqa: E402


def _views(store) -> dict[str, int]:
    """Snapshot and branch names to view ids, read offline."""
    from cowfs.store import Store
    st = Store(str(store))
    try:
        cat = st.catalog
        return {**{s.name: s.view for s in cat.snapshots.values()}, **{b.name: b.view for b in cat.branches.values()}}
    finally:
        st.close()


def _snapshot_reads_right(mp, name: str) -> os.stat_result:
    """d/link of snapshot name names it, and d/f3 holds its content; d/link's stat."""
    d = os.path.join(mp, ".cowfs", "snapshots", name, "d")
    assert os.readlink(os.path.join(d, "link")) == name, name
    with open(os.path.join(d, "f3"), "rb") as f:
        assert f.read() == bulkstore.file_content(3), name
    return os.lstat(os.path.join(d, "link"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_store_past_65536_snapshots_and_branches_mounts_and_reads(mount_factory, forks, tmp_path, unpriv_ids):
    store = tmp_path / "store"
    built = bulkstore.fan(str(store), 33_000)
    assert len(built.snapshots) + len(built.branches) == 66_001  # besides main
    vids = _views(store)
    newest = [n for n in built.snapshots if vids[n] > 65_535]  # view ids past 16 bits
    assert len(newest) > 200
    m = mount_factory(store=store, options=["allow_other"])
    # every snapshot past 16 bits, and one in 256 of the others (the full sweep is
    # bench_scale's ids row)
    sample = built.snapshots[: -len(newest) : 256] + newest
    inos: dict[int, str] = {}
    for name in sample:
        st = _snapshot_reads_right(m.path, name)
        assert st.st_ino not in inos, f"{name} and {inos.get(st.st_ino)}: one st_ino"
        inos[st.st_ino] = name
    assert len(sample) > 300
    # As the sandbox user too (the snapshots are the branch's: its owner may read them).
    names = " ".join(newest[-5:])
    r = mounting.run_as(*unpriv_ids, ["sh", "-c", f"cd {m.path}/.cowfs/snapshots && for n in {names}; do readlink $n/d/link; done"])
    assert r.returncode == 0 and r.stdout.split() == newest[-5:], r.stderr
    # The newest branches (view ids past 16 bits), mounted beside main: they read right,
    # take writes, and their files' numbers are their own.
    seen: set[int] = set(inos)
    for br in built.branches[-3:]:
        assert vids[br] > 65_535
        fp = forks.mount(store, br)
        k = br[1:]
        assert os.readlink(fp / "d" / "link") == f"s{k}"
        assert (fp / "d" / "f0").read_bytes() == bulkstore.file_content(0)
        (fp / "new").write_bytes(br.encode())
        assert (fp / "new").read_bytes() == br.encode()
        for p in (fp / "d" / "link", fp / "d" / "f0", fp / "new"):
            ino = os.lstat(p).st_ino
            assert ino not in seen, p
            seen.add(ino)
    workload.ctl(m.path, "snapshot after")
    assert (m.path / ".cowfs" / "snapshots" / "after" / "d" / "f1").read_bytes() == bulkstore.file_content(1)


def _stats(mp) -> dict:
    return json.loads((mp / ".cowfs" / "stats").read_text())


@pytest.mark.timeout(300)
def test_slots_recycle_when_more_views_are_browsed_than_there_are_slots(mount_factory, tmp_path):
    store = tmp_path / "store"
    built = bulkstore.fan(str(store), 30)  # 61 snapshots
    m = mount_factory(store=store, options=["view_slots=4"])
    snaps = built.snapshots
    for _round in range(2):
        for name in snaps:
            _snapshot_reads_right(m.path, name)
    slots = _stats(m.path)["inode_slots"]
    assert slots["limit"] == 4 and slots["given"] <= 4 and slots["recycled"] >= len(snaps), slots
    assert slots["refused"] == 0, slots

    # Files held open in three snapshots: their numbers are unique and stay while held,
    # whatever is browsed meanwhile (one slot is left for all the others).
    held = snaps[5:8]
    fds = {n: os.open(m.path / ".cowfs" / "snapshots" / n / "d" / "f2", os.O_RDONLY) for n in held}
    try:
        before = {n: os.fstat(fd).st_ino for n, fd in fds.items()}
        assert len(set(before.values())) == 3
        for name in snaps:
            _snapshot_reads_right(m.path, name)
        for n, fd in fds.items():
            assert os.fstat(fd).st_ino == before[n], n
            assert os.pread(fd, 100, 0) == bulkstore.file_content(2), n
            # and by name, while held: the same number
            assert os.stat(m.path / ".cowfs" / "snapshots" / n / "d" / "f2").st_ino == before[n]
        # A fourth view in use takes the last slot: a fifth can have none, and says so.
        fourth = os.open(m.path / ".cowfs" / "snapshots" / snaps[20] / "d" / "f2", os.O_RDONLY)
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as exc:
                os.readlink(m.path / ".cowfs" / "snapshots" / snaps[30] / "d" / "link")
            assert exc.value.errno == errno.ENFILE, exc.value
            assert time.monotonic() - t0 < 30
            assert "inode-number slots are held" in m.log_text()
        finally:
            os.close(fourth)
        # One closed: the kernel is asked to drop that snapshot, and the fifth reads.
        assert _snapshot_reads_right(m.path, snaps[30])
        inos = {os.fstat(fd).st_ino for fd in fds.values()}
        assert len(inos) == 3 and inos == set(before.values())
    finally:
        for fd in fds.values():
            os.close(fd)
    slots = _stats(m.path)["inode_slots"]
    assert slots["refused"] >= 1, slots


@pytest.mark.timeout(300)
def test_a_deleted_snapshot_the_kernel_held_is_compacted_at_the_next_gc(cowfs_mount):
    m = cowfs_mount
    names = []
    for s in range(4):
        (m.path / "f").write_bytes(f"v{s}".encode())
        workload.ctl(m.path, f"snapshot s{s}")
        names.append(f"s{s}")
    for s, name in enumerate(names):  # the kernel now holds each snapshot's root and f
        assert (m.path / ".cowfs" / "snapshots" / name / "f").read_bytes() == f"v{s}".encode()
    views = _stats(m.path)["memory"]["views"]
    held = os.open(m.path / ".cowfs" / "snapshots" / "s2" / "f", os.O_RDONLY)  # in use: stays while open
    try:
        for name in ("s1", "s2"):
            api.control(m.path, "delete", name)
        # s1's view goes as soon as the kernel has forgotten it (no unmount, no memory pressure)
        mounting.wait_until(lambda: _stats(m.path)["memory"]["views"] == views - 1,
                            "the deleted snapshot s1's view to go", timeout=20)
        assert os.pread(held, 10, 0) == b"v2"  # the open file of a deleted snapshot still reads
    finally:
        os.close(held)
    # s2's once its last file is closed
    mounting.wait_until(lambda: _stats(m.path)["memory"]["views"] == views - 2,
                        "the deleted snapshot s2's view to go", timeout=20)
    with pytest.raises(FileNotFoundError):
        (m.path / ".cowfs" / "snapshots" / "s1" / "f").read_bytes()
    r = mounting.run_cowfs("gc", m.store, "--json")
    assert json.loads(r.stdout)["ok"]
    for s in (0, 3):
        assert (m.path / ".cowfs" / "snapshots" / f"s{s}" / "f").read_bytes() == f"v{s}".encode()
    m.stop()
    from cowfs.store import Store
    st = Store(str(m.store))
    try:
        cat = st.catalog
        anc = set(cat.ancestry(cat.branches["main"].head))
        live = [s.name for s in cat.snapshots.values() if s.layer in anc]
        assert sorted(live) == ["s0", "s3"] and len(anc) <= 3, (live, len(anc))
    finally:
        st.close()
    workload.fsck_clean(m.store)
