"""The fleet on Ceph RADOS Gateway: the optional slower job (scripts/test_ceph.sh installs Ceph
and runs these; marked ``ceph``, left out of the suite's command).  The S3-dependent core of
tests/test_fleet.py against a one-host Ceph cluster that the ``ceph_rgw`` fixture creates (one
monitor, one OSD, radosgw on 127.0.0.1) and the session's etcd: a push and its pull give the
same tree and a fork's push and pull move only its changes, a lazy mount fetches each chunk on
its first read, a push killed midway leaves the remote consistent and resumes.
"""
from __future__ import annotations

import os

import pytest

import mounting
from mounting import fetched, lazy_mounted, same_tree, snap

pytestmark = pytest.mark.ceph


def test_push_then_pull_through_rgw_gives_the_same_tree(fleet, mount_factory, ceph_rgw, engine_prefix):
    a, b = fleet("a", s3=ceph_rgw), fleet("b", s3=ceph_rgw)
    src = mount_factory()
    mounting.make_full_tree(src.path, small_files=40, sparse_size=24 << 20)
    pushed = snap(src, "base")
    first = a.json("push", src.path, "base", "origin")["pushed"]
    assert first["objects_uploaded"] >= 3 and first["files_read"] == first["files"] - 1 > 40
    keys = ceph_rgw.client().list_objects_v2(Bucket=ceph_rgw.BUCKET, Prefix=engine_prefix)
    assert keys["KeyCount"] >= first["objects_uploaded"], "the objects are not on the gateway"

    store_b = mounting.init_store(b.base / "store")
    pulled = b.json("pull", "origin", "base", store_b)["pulled"]
    assert pulled["branch"] == "base" and pulled["chunks_fetched"] > 0 and pulled["base"] is None
    dst = mount_factory(store=store_b, branch="base")
    same_tree(pushed, dst.path)
    dst.stop()   # the store's daemon: the next mount of it (--foreground) starts another

    # A fork that changed 10 files: its push uploads those, its pull fetches those.
    for i in range(10):
        (src.path / "dir" / f"small-{i + 10:03d}").write_bytes(os.urandom(5000))
    fork = snap(src, "fork")
    second = a.json("push", src.path, "fork", "origin")["pushed"]
    assert second["files_read"] == 10 and second["chunks_new"] == 10, second
    assert second["bytes_uploaded"] < 50_000 + (1 << 20), second
    again = b.json("pull", "origin", "fork", store_b, "--into", "fork-b")["pulled"]
    assert again["base"] == pulled["snapshot"] and again["chunks_fetched"] == 10, again
    same_tree(fork, mount_factory(store=store_b, branch="fork-b").path)
    assert a.json("remote", "check", "origin", "--verify")["ok"]


def test_a_lazy_mount_through_rgw_fetches_each_chunk_on_its_first_read(fleet, mount_factory, ceph_rgw):
    a, b = fleet("a", s3=ceph_rgw), fleet("b", s3=ceph_rgw)
    src = mount_factory()
    mounting.make_full_tree(src.path, small_files=40, sparse_size=24 << 20)
    big = (src.path / "big").read_bytes()
    pushed = snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", b.base / "mnt"
    # lazy_near=0: a read fetches its own file's chunks only
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0"):
        assert fetched(mp)["bytes_fetched"] == 0, "the mount fetched data before any read"
        assert (mp / "big").read_bytes() == big
        f = fetched(mp)   # 48 random chunks and the 100-byte tail; its 1 MiB hole is not stored
        assert f["bytes_fetched"] == (3 << 20) + 100 and f["chunks_fetched"] == 49, f
        assert (mp / "big").read_bytes() == big
        assert fetched(mp)["bytes_fetched"] == (3 << 20) + 100, "the second read fetched again"
        same_tree(pushed, mp, names=("pushed", "lazy"))
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    assert not report["counts"].get("remote_chunks"), "every chunk was read: none is still remote"


def test_a_push_through_rgw_killed_midway_leaves_the_remote_consistent_and_resumes(
        fleet, mount_factory, ceph_rgw, engine_prefix):
    mounting.check_a_killed_push_resumes(fleet("a", s3=ceph_rgw), fleet("b", s3=ceph_rgw), ceph_rgw,
                                         engine_prefix, mount_factory)
