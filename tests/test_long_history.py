"""Stores with a long history (issue 20), on real mounts: what a request costs must not grow
with the number of snapshots and branches the store holds.

* A getattr of `.cowfs/snapshots` (every path walk through it makes one: its attributes are
  never cached) costs the same in a store of 4,001 snapshots as in one of 41; its mtime
  still changes when a snapshot comes or goes, and only then, so that the kernel's cached
  listing is dropped exactly when it may be stale.
* A mount reads none of the catalog's snapshot records (meta.named.Records): a store of
  1,500 snapshots mounts with one record read (its branch), reads its snapshots right as
  each is first looked up, lists them all right (their views sharing their ancestries' layer
  sets), takes and deletes snapshots, collects garbage, and mounts lazily again.
* `cowfs fsck` costs O(snapshots): each inode-record version is applied once in a walk of
  the layer tree, not scanned again for every view (2,000 snapshots took 27 s, 4x the
  time of 1,000), and each view's ancestry blocks are made once for all views.
* Listing `snapshots/` costs O(snapshots): the listing is taken once when reading starts,
  each page makes only its own entries (every page made them all: 100,000 snapshots took
  484 s to list), and 12,000 snapshots list in about 4x the time of 3,000, not 16x.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

import mounting
import workload
from cowfs.fsck import Fsck
from cowfs.kv.rocks import RocksKV
from cowfs.meta import layers
from cowfs.store import Store

sys.path.insert(0, str(mounting.REPO / "scripts"))
import bulkstore  # noqa: E402


def _stat_seconds(path, times: int) -> float:
    """Seconds per os.stat of path, the best of three runs of `times` stats."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(times):
            os.stat(path)
        best = min(best, (time.perf_counter() - t0) / times)
    return best


@pytest.mark.timeout(300)
def test_snapshots_directory_getattr_does_not_grow_with_the_snapshots(mount_factory, tmp_path):
    small = bulkstore.fan(str(tmp_path / "small"), 20)  # 41 snapshots
    big = bulkstore.fan(str(tmp_path / "big"), 2000)  # 4,001 snapshots, 2,000 branches
    ms = mount_factory(store=tmp_path / "small", name="small")
    mb = mount_factory(store=tmp_path / "big", name="big")
    sdir, bdir = ms.path / ".cowfs" / "snapshots", mb.path / ".cowfs" / "snapshots"
    # Alternately, so that the machine's load hits both alike.  Listing the owned names at
    # every getattr made the big store's ~5 ms here with 10,001 snapshots, against ~0.1 ms.
    per_small, per_big = [], []
    for _ in range(3):
        per_small.append(_stat_seconds(sdir, 100))
        per_big.append(_stat_seconds(bdir, 100))
    s, b = min(per_small), min(per_big)
    assert b <= 3 * s + 0.0005, f"stat of snapshots/: {b * 1e3:.3f} ms with 4,001 snapshots, {s * 1e3:.3f} ms with 41"
    # Reads through it stay right: a sample of the big store's snapshots.
    for name in big.snapshots[1::200]:
        assert os.readlink(bdir / name / "d" / "link") == name
    assert sorted(os.listdir(sdir)) == sorted(small.snapshots)

    # The mtime stands still while nothing changes, and moves when a snapshot comes or goes,
    # and the listing follows.
    m1 = os.stat(sdir).st_mtime_ns
    assert os.stat(sdir).st_mtime_ns == m1
    assert len(os.listdir(sdir)) == len(small.snapshots)
    workload.ctl(ms.path, "snapshot extra")
    m2 = os.stat(sdir).st_mtime_ns
    assert m2 > m1 and "extra" in os.listdir(sdir)
    assert os.stat(sdir).st_mtime_ns == m2
    workload.ctl(ms.path, f"delete {small.snapshots[3]}")
    m3 = os.stat(sdir).st_mtime_ns
    assert m3 > m2 and small.snapshots[3] not in os.listdir(sdir)
    assert len(os.listdir(sdir)) == len(small.snapshots)


def _catalog_figures(mp) -> dict:
    memory = json.loads((mp / ".cowfs" / "stats").read_text())["memory"]
    return {k: v for k, v in memory.items() if k.startswith("catalog_")}


@pytest.mark.timeout(300)
def test_a_mount_parses_snapshot_records_only_as_they_are_used(mount_factory, tmp_path):
    store = tmp_path / "store"
    built = bulkstore.chain(str(store), 1500)  # 3,000: fsck alone took 62 s at load 7 (quadratic then)
    m = mount_factory(store=store)
    snaps = m.path / ".cowfs" / "snapshots"
    assert _catalog_figures(m.path) == {"catalog_records_read": 1, "catalog_records_parsed": 1}  # main
    for name in ("s0", "s1499", "s700"):
        assert os.readlink(snaps / name / "d" / "link") == name
    assert _catalog_figures(m.path) == {"catalog_records_read": 4, "catalog_records_parsed": 4}
    assert not os.path.exists(snaps / "s1500")
    # A listing walks them all: every name, each reading what it froze.  Each listed
    # snapshot's view holds its ancestry: shared blocks of the line (meta.lineage.Block),
    # where a set per view held 4.5 million layer ids with 3,000 snapshots (1.1 million with
    # 1,500; and 100,000 snapshots ran the machine out of memory); 3 MiB now.
    rss = json.loads((m.path / ".cowfs" / "stats").read_text())["rss_bytes"]
    assert sorted(os.listdir(snaps)) == sorted(built.snapshots)
    grown = json.loads((m.path / ".cowfs" / "stats").read_text())["rss_bytes"] - rss
    assert grown < 20 << 20, f"listing 1,500 snapshots took {grown >> 20} MiB"
    assert _catalog_figures(m.path) == {"catalog_records_read": 1501, "catalog_records_parsed": 1501}
    for name in built.snapshots[::97]:
        assert os.readlink(snaps / name / "d" / "link") == name
    # Changes on top, then garbage collection after deletes of interior snapshots.
    (m.path / "d" / "new").write_bytes(b"new")
    workload.ctl(m.path, "snapshot after")
    for name in built.snapshots[1:1499:5]:  # 300 interior deletes
        workload.ctl(m.path, f"delete {name}")
    gone = set(built.snapshots[1:1499:5])
    r = mounting.run_cowfs("gc", m.store, "--json", timeout=120)
    assert json.loads(r.stdout)["ok"]
    left = [n for n in built.snapshots if n not in gone]
    assert (snaps / "after" / "d" / "new").read_bytes() == b"new"

    m.remount()
    assert _catalog_figures(m.path) == {"catalog_records_read": 1, "catalog_records_parsed": 1}
    assert os.readlink(snaps / "s1499" / "d" / "link") == "s1499"
    assert not os.path.exists(snaps / built.snapshots[1])
    assert sorted(os.listdir(snaps)) == sorted(left + ["after"])
    for name in left[::50]:
        assert os.readlink(snaps / name / "d" / "link") == name
    m.stop()
    workload.fsck_clean(m.store)


def _listed(path) -> tuple[list[str], float]:
    """The names in path and the seconds the listing took (the first after the mount: the
    kernel keeps a listing, and answers the next ones itself)."""
    t0 = time.perf_counter()
    names = os.listdir(path)
    return names, time.perf_counter() - t0


@pytest.mark.timeout(600)
def test_listing_snapshots_is_linear_in_their_number(mount_factory, tmp_path):
    small = bulkstore.chain(str(tmp_path / "small"), 3000)  # 5,000 and 20,000: twice the time
    big = bulkstore.chain(str(tmp_path / "big"), 12000)
    ms = mount_factory(store=tmp_path / "small", name="small")
    mb = mount_factory(store=tmp_path / "big", name="big")
    sdir, bdir = ms.path / ".cowfs" / "snapshots", mb.path / ".cowfs" / "snapshots"
    names, s = _listed(sdir)
    assert sorted(names) == sorted(small.snapshots)
    names, b = _listed(bdir)
    assert sorted(names) == sorted(big.snapshots)
    assert b < 8 * s, f"12,000 snapshots listed in {b:.2f} s, 3,000 in {s:.2f} s"


def _fsck_work(path: str, monkeypatch) -> int:
    """Rows that a clean fsck of the store reads by scans plus layer ids it puts in the
    ancestry blocks of views: the work that grows with the history, counted, not timed."""
    work = 0
    scan = RocksKV.scan

    def counted_scan(self, *args, **kwargs):
        nonlocal work
        for row in scan(self, *args, **kwargs):
            work += 1
            yield row

    class CountedBlock(layers.Block):
        def __new__(cls, members):
            nonlocal work
            work += len(members)
            return super().__new__(cls, members)

    with monkeypatch.context() as m:
        m.setattr(RocksKV, "scan", counted_scan)
        m.setattr(layers, "Block", CountedBlock)
        store = Store(path)
        try:
            report = Fsck(store).run()
        finally:
            store.close()
    assert report.clean, report.problems
    return work


@pytest.mark.timeout(300)
def test_fsck_is_linear_in_the_snapshots(tmp_path, monkeypatch):
    small = _fsck_work(bulkstore.chain(str(tmp_path / "small"), 300).path, monkeypatch)
    big = _fsck_work(bulkstore.chain(str(tmp_path / "big"), 1200).path, monkeypatch)
    # A scan of every version per view, or ancestry blocks made again for each view, made
    # this ratio ~16 (quadratic); linear work gives ~4.
    assert big < 5 * small, f"fsck did {big:,} units of work with 1,200 snapshots, {small:,} with 300"
