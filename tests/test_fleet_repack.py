"""`cowfs remote gc` repacks partly dead packs (cowfs/fleet/repack.py) on real SeaweedFS and
etcd: the remote's bytes drop to the live bytes, every remaining snapshot pulls and
lazy-mounts with every byte (a lazy mount built before the repack, reading while it runs and
after the old packs are deleted, included), a push after it works, and a gc killed -9 in the
middle of a repack leaves the remote consistent and is completed by the next run.  The CI
test is one pass over all of it; the long forms (slow) take each part further."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import mounting
from mounting import Host, lazy_mounted, push_files, same_tree, snap

FILE = 256 << 10        # 20 files of 256 KiB: one 5 MiB pack


def _objects(seaweedfs, prefix: str) -> dict[str, int]:
    s3 = seaweedfs.client()
    out: dict[str, int] = {}
    args = {"Bucket": seaweedfs.BUCKET, "Prefix": prefix + "/"}
    while True:
        page = s3.list_objects_v2(**args)
        out.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return out
        args["ContinuationToken"] = page["NextContinuationToken"]


def _data_bytes(seaweedfs, prefix: str) -> int:
    return sum(n for k, n in _objects(seaweedfs, prefix).items() if k.startswith("data/"))


def _held(p) -> None:
    """Until the gc p (run with a COWFS_FAULTS sleep) is held at its fault point."""
    for line in iter(p.stderr.readline, b""):
        if b"injected fault at" in line:
            return
    raise AssertionError(f"the gc ended before its fault point: {p.communicate(timeout=30)}")


def _partly_dead(a: Host, m) -> tuple[Path, Path, int]:
    """Push base (20 files, one pack), fork1 (5 of them kept, one new), fork2 (a new file) and
    fork3 (fork1 + a small file), then delete base and fork2: the base's pack is 1/4 live.
    (fork1's and fork3's snapshot directories, the live file bytes.)"""
    push_files(a, m, {f"f{i:02}": os.urandom(FILE) for i in range(20)})
    for i in range(20):
        if i % 5:
            (m.path / f"f{i:02}").unlink()
    (m.path / "g1").write_bytes(os.urandom(FILE))
    fork1 = snap(m, "fork1")
    a.json("push", m.path, "fork1", "origin")
    (m.path / "g2").write_bytes(os.urandom(4 * FILE))
    snap(m, "fork2")
    a.json("push", m.path, "fork2", "origin")
    (m.path / "g2").unlink()
    (m.path / "g3").write_bytes(os.urandom(1000))
    fork3 = snap(m, "fork3")
    a.json("push", m.path, "fork3", "origin")
    a.cowfs("remote", "delete", "origin", "base")
    a.cowfs("remote", "delete", "origin", "fork2")
    return fork1, fork3, 5 * FILE + 1000


def _set_forwards(etcd, seaweedfs, prefix: str, fid: bytes | None) -> None:
    """Point the remote's etcd key gc/forwards at fid (None: remove it), as no gc would."""
    from cowfs.kv.base import Batch
    from cowfs.kv.etcd import EtcdKV

    kv = EtcdKV(etcd.endpoint, ("gc",), f"cowfs-fleet/{seaweedfs.BUCKET}/{prefix}/".encode())
    try:
        batch = Batch()
        if fid is None:
            batch.delete("gc", b"forwards")
        else:
            batch.put("gc", b"forwards", fid)
        kv.write(batch, [])
    finally:
        kv.close()


def _drop_gc_lock(etcd, seaweedfs, prefix: str) -> None:
    """The lock of a gc killed -9 expires with its lease (30 s); the test removes it instead."""
    from cowfs.kv.base import Batch
    from cowfs.kv.etcd import EtcdKV

    kv = EtcdKV(etcd.endpoint, ("lock",), f"cowfs-fleet/{seaweedfs.BUCKET}/{prefix}/".encode())
    try:
        batch = Batch()
        batch.delete("lock", b"gc")
        kv.write(batch, [])
    finally:
        kv.close()


@contextlib.contextmanager
def _gc_held(a: Host, fault: str) -> Iterator[subprocess.Popen]:
    """A gc of host a's remote (`--json`) held at its fault point (COWFS_FAULTS `fault`, a
    sleep) when the body starts; killed -9 afterwards unless the body waited for its end."""
    a.env["COWFS_FAULTS"] = fault
    try:
        p = a.popen("remote", "gc", "origin", "--grace", "0", "--json")
    finally:
        del a.env["COWFS_FAULTS"]
    try:
        _held(p)
        yield p
    finally:
        if p.returncode is None:
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)


def _killed_at(a: Host, point: str) -> None:
    """Run a gc of host a's remote, killed -9 once at the fault point."""
    with _gc_held(a, f"{point}:sleep60"):
        pass


def test_a_repack_killed_midway_then_completed_leaves_the_live_bytes_and_every_snapshot_whole(
        fleet, mount_factory, seaweedfs, etcd, engine_prefix):
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    m = mount_factory()
    fork1, fork3, live = _partly_dead(a, m)
    assert _data_bytes(seaweedfs, engine_prefix) > 4 * live
    first = a.json("remote", "gc", "origin", "--grace", "0", "--repack-below", "0")     # condemns only
    assert first["repacked_packs"] == 0 and first["condemned"] == 4, first
    lazy_store, lazy_mp = b.base / "lazy", b.base / "mnt"
    with lazy_mounted(b, "origin:fork1", lazy_mp, lazy_store, "-o", "lazy_near=0"):   # records name the old pack
        assert (lazy_mp / "f00").read_bytes() == (fork1 / "f00").read_bytes()
        # A gc held once its forward is put, read from meanwhile, then killed -9 there.
        with _gc_held(a, "fleet_repack_moved:sleep60"):
            assert (lazy_mp / "f05").read_bytes() == (fork1 / "f05").read_bytes()
        checked = a.json("remote", "check", "origin", "--verify")
        assert checked["ok"] and checked["forwards"] == 1, checked
        r = a.cowfs("remote", "gc", "origin", check=False)
        assert r.returncode == 1 and "a fleet gc is running on the remote origin already" in r.stderr, r.stderr
        _drop_gc_lock(etcd, seaweedfs, engine_prefix)
        # (The killed run had deleted the condemned commits and pack before it repacked.)  The
        # next runs complete it: the superseded pack is condemned, then deleted.
        again = a.json("remote", "gc", "origin", "--grace", "0")
        assert again["repacked_packs"] == 0 and again["condemned"] == 2 and again["deleted"] == 0, again
        done = a.json("remote", "gc", "origin", "--grace", "0")
        assert done["deleted"] == 2 and done["garbage_objects"] == 2, done
        assert a.json("remote", "check", "origin", "--verify")["ok"]
        after = _data_bytes(seaweedfs, engine_prefix)
        assert live <= after < live + (16 << 10), (live, after)    # + the live commits' trees
        same_tree(fork1, lazy_mp, names=("pushed", "lazy"))        # fetched through the forward
        assert mounting.fetched(lazy_mp)["failures"] == 0
    store = mounting.init_store(c.base / "store")
    c.json("pull", "origin", "fork3", store)
    same_tree(fork3, mount_factory(store=store, branch="fork3").path)
    # A push after the repack finds its parent's blobs through the forward: only its change
    # goes up, and its commit names packs that exist.
    (m.path / "g4").write_bytes(b"after the repack")
    snap(m, "fork4")
    pushed = a.json("push", m.path, "fork4", "origin")["pushed"]
    assert pushed["chunks_new"] == 1 and pushed["files_read"] == 1, pushed
    commit = seaweedfs.client().get_object(Bucket=seaweedfs.BUCKET, Key=f"{engine_prefix}/commit/{pushed['commit']}")
    named = json.loads(commit["Body"].read())["packs"]
    assert {f"data/{p}" for p in named} <= set(_objects(seaweedfs, engine_prefix)), "it names a deleted pack"
    assert a.json("remote", "check", "origin", "--verify")["ok"]


@pytest.mark.slow
def test_gc_repacks_partly_dead_packs_and_every_snapshot_still_reads(fleet, mount_factory, seaweedfs, etcd,
                                                                    engine_prefix):
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    m = mount_factory()
    fork1, fork3, live = _partly_dead(a, m)
    before = _data_bytes(seaweedfs, engine_prefix)
    assert before > 4 * live, before
    dry = a.json("remote", "gc", "origin", "--grace", "0", "--dry-run")
    assert dry["repacked_packs"] == 1 and dry["repack_copied_bytes"] >= 4 * FILE, dry
    assert "would repack 1 packs (5.0 MiB, 1.0 MiB live copied)" in a.cowfs("remote", "gc", "origin", "--dry-run").stdout
    # First run, repacking off: the two deleted commits and fork2's pack are condemned.
    first = a.json("remote", "gc", "origin", "--grace", "0", "--repack-below", "0")
    assert first["repacked_packs"] == 0 and first["condemned"] == 4 and first["deleted"] == 0, first
    lazy_store, lazy_mp = b.base / "lazy", b.base / "mnt"
    # A lazy mount built before the repack: its chunk records name the old pack.
    with lazy_mounted(b, "origin:fork1", lazy_mp, lazy_store, "-o", "lazy_near=0"):
        assert (lazy_mp / "f00").read_bytes() == (fork1 / "f00").read_bytes()
        # The gc held right after its new pack is put (before the forward): the lazy mount
        # reads from the old pack meanwhile.
        with _gc_held(a, "fleet_repack_packed:sleep3") as p:
            assert (lazy_mp / "f05").read_bytes() == (fork1 / "f05").read_bytes()
            out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        held = json.loads(out)
        assert held["deleted"] == 4 and held["repacked_packs"] == 1 and held["repack_new_packs"] == 1, held
        assert held["repack_copied_bytes"] == 4 * FILE, held
        checked = a.json("remote", "check", "origin", "--verify")
        assert checked["ok"] and checked["forwards"] == 1, checked
        # Next run: the old pack (superseded by the new one) is deleted; its forward stays
        # (fork1's and fork3's commits name the old pack).
        second = a.json("remote", "gc", "origin", "--grace", "0")
        assert second["deleted"] == 2 and second["repacked_packs"] == 0, second
        checked = a.json("remote", "check", "origin", "--verify")
        assert checked["ok"] and checked["forwards"] == 1, checked
        after = _data_bytes(seaweedfs, engine_prefix)
        # Bound: every remaining pack is live but for its trees of deleted commits; here
        # the live file bytes plus under 16 KiB of trees.
        assert live <= after < live + (16 << 10), (live, after, before)
        # The lazy mount reads the rest from the new pack: its records name the deleted one.
        same_tree(fork1, lazy_mp, names=("pushed", "lazy"))
        assert mounting.fetched(lazy_mp)["failures"] == 0
    # Every remaining snapshot pulls and lazy-mounts on a new host with every byte.
    for name, tree in (("fork1", fork1), ("fork3", fork3)):
        store = mounting.init_store(c.base / f"store-{name}")
        c.json("pull", "origin", name, store)
        same_tree(tree, mount_factory(store=store, branch=name).path)
    with lazy_mounted(c, "origin:fork3", c.base / "mnt3", c.base / "lazy3"):
        same_tree(fork3, c.base / "mnt3", names=("pushed", "lazy"))
    # A push after the repack reads its parent's packs through the forward: it uploads only
    # its change, and its commit names the new pack.
    (m.path / "g4").write_bytes(b"after the repack")
    fork4 = snap(m, "fork4")
    pushed = a.json("push", m.path, "fork4", "origin")["pushed"]
    assert pushed["chunks_new"] == 1 and pushed["files_read"] == 1, pushed
    commit = seaweedfs.client().get_object(Bucket=seaweedfs.BUCKET, Key=f"{engine_prefix}/commit/{pushed['commit']}")
    named = json.loads(commit["Body"].read())["packs"]
    assert {f"data/{p}" for p in named} <= set(_objects(seaweedfs, engine_prefix)), "it names a deleted pack"
    store = mounting.init_store(c.base / "store-fork4")
    c.json("pull", "origin", "fork4", store)
    same_tree(fork4, mount_factory(store=store, branch="fork4").path)
    again = a.json("remote", "gc", "origin", "--grace", "0")
    assert again["repacked_packs"] == 0 and again["garbage_objects"] == 0, again
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    # Once no reachable commit names the old pack, its forward goes after the grace period,
    # then the forwards object that held it; fork4 (naming the new pack) still pulls.
    for name in ("fork1", "fork3"):
        a.cowfs("remote", "delete", "origin", name)
    a.json("remote", "gc", "origin", "--grace", "0")
    dropped = a.json("remote", "gc", "origin", "--grace", "0")
    assert dropped["forwards"] == 0, dropped
    for _ in range(2):          # the object that held it: condemned, then deleted
        a.json("remote", "gc", "origin", "--grace", "0")
    assert not any(k.startswith("forwards/") for k in _objects(seaweedfs, engine_prefix))
    checked = a.json("remote", "check", "origin", "--verify")
    assert checked["ok"] and checked["forwards"] == 0, checked
    store = mounting.init_store(c.base / "store-fork4-again")
    c.json("pull", "origin", "fork4", store)
    same_tree(fork4, mount_factory(store=store, branch="fork4").path)
    # gc/forwards naming an object that is not there: check names it, a push fails in one line.
    _set_forwards(etcd, seaweedfs, engine_prefix, b"f" * 64)
    r = a.cowfs("remote", "check", "origin", check=False)
    assert r.returncode == 1 and f"the remote origin lacks forwards/{'f' * 64}" in r.stdout, r.stdout + r.stderr
    r = a.cowfs("push", m.path, "fork4", "origin", "--as", "fork4b", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"lacks forwards/{'f' * 64}" in r.stderr, r.stderr
    _set_forwards(etcd, seaweedfs, engine_prefix, None)
    assert a.json("remote", "check", "origin")["ok"]


@pytest.mark.slow
def test_a_gc_killed_mid_repack_leaves_the_remote_consistent_and_the_next_completes(
        fleet, mount_factory, seaweedfs, etcd, engine_prefix):
    a, c = fleet("a"), fleet("c")
    m = mount_factory()
    fork1, fork3, live = _partly_dead(a, m)
    for point, moved in (("fleet_repack_packed", 0), ("fleet_repack_moved", 1)):
        _killed_at(a, point)
        checked = a.json("remote", "check", "origin", "--verify")
        assert checked["ok"] and checked["forwards"] == moved, (point, checked)
        store = mounting.init_store(c.base / f"store-{point}")
        c.json("pull", "origin", "fork1", store)
        same_tree(fork1, mount_factory(store=store, branch="fork1").path)
        r = a.cowfs("remote", "gc", "origin", check=False)
        assert r.returncode == 1 and "a fleet gc is running on the remote origin already" in r.stderr, r.stderr
        _drop_gc_lock(etcd, seaweedfs, engine_prefix)
    # The next runs complete: the old pack goes, the remote holds the live bytes.
    a.json("remote", "gc", "origin", "--grace", "0")
    done = a.json("remote", "gc", "origin", "--grace", "0")
    assert done["repacked_packs"] == 0, done
    after = _data_bytes(seaweedfs, engine_prefix)
    assert live <= after < live + (16 << 10), (live, after)
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    with lazy_mounted(c, "origin:fork3", c.base / "mnt3", c.base / "lazy3"):
        same_tree(fork3, c.base / "mnt3", names=("pushed", "lazy"))
