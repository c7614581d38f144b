"""The catalog in the reference store (store format 11; docs/design-many-processes.md "Step
5b"): a catalog change writes its home records, makes them durable, then publishes them by
one compare-and-set in refs.sqlite.  A kill -9 of the daemon on either side of that
compare-and-set leaves an fsck-clean store whose catalog is the one before or the one after,
and a layer published by nobody, which gc removes.  A format-9 or -10 store (made by the code
of OLD_FORMATS) is upgraded at its first open, also after an upgrade cut short, and a
format-11 store to 12 (homes) by its marker alone; a name taken by another process through
the reference store is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sqlite3

import pytest

import mounting
import workload

# Commits of main whose code writes store format 9 and 10 (the catalog in RocksDB's meta).
OLD_FORMATS = {9: "671288b0dd59a8cbe274fe0ecb14ee7267e2c500", 10: "c346dbc8ef0b7fdd047c11870fab9e378a15d998"}
FORMAT_11 = "e74f5538cbeb455e2b3b3f745610b38b05e8e74b"  # main before format 12 (homes)


def catalog(store) -> dict[str, dict]:
    """The reference store's catalog: {"branch": {name: record}, "snap": {...}, "layer": {id: parent}}."""
    con = sqlite3.connect(f"file:{os.path.join(store, 'refs.sqlite')}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT key, value FROM kv WHERE cf='catalog'").fetchall()
    finally:
        con.close()
    out: dict[str, dict] = {"branch": {}, "snap": {}, "layer": {}}
    for key, value in rows:
        kind, _, name = bytes(key).partition(b"/")
        if kind in (b"branch", b"snap"):
            out[kind.decode()][name.decode()] = json.loads(value)
        elif kind == b"layer":
            out["layer"][int.from_bytes(name, "big")] = int.from_bytes(value, "big")
    return out


def _prepared(mount_factory):
    """A store with main holding a and b, snapshot s0 taken between them; unmounted."""
    m = mount_factory()
    mounting.write(m.path / "a", b"a" * 5000, sync=True)
    workload.ctl(m.path, "snapshot s0")
    mounting.write(m.path / "b", b"b" * 7000, sync=True)
    m.stop()
    return m


OPS = {  # the command's name argument, and what the catalog says once it is done
    "snapshot": ("s1", lambda c: "s1" in c["snap"]),
    "branch": ("f1", lambda c: "f1" in c["branch"]),
    "rollback": ("s0", lambda c: c["branch"]["main"]["epoch"] == 1),
    "delete": ("s0", lambda c: "s0" not in c["snap"]),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", ["catalog_publish", pytest.param("catalog_published", marks=pytest.mark.slow)])
@pytest.mark.parametrize("op", list(OPS))
def test_kill9_around_the_publish_leaves_the_catalog_before_or_after(mount_factory, op, point):
    m = _prepared(mount_factory)
    before = catalog(m.store)
    name, done = OPS[op]
    assert not done(before)
    m.env = {"COWFS_FAULTS": f"{point}:kill"}
    m.start()
    mounting.died(m, op, name)
    after = catalog(m.store)
    if point == "catalog_publish":
        assert after == before, "a change cut off before its compare-and-set left the catalog as it was"
    else:
        assert done(after) and after != before
    report = workload.fsck_clean(m.store)
    strays = report["counts"]["unpublished_layers"]
    # The layers the change made: unpublished when cut off before its compare-and-set (a
    # delete makes none); none once published.
    made = {"snapshot": 1, "branch": 2, "rollback": 1, "delete": 0}[op]  # a branch of the live state: two
    assert strays == (made if point == "catalog_publish" else 0), report["counts"]
    m.env = {}
    m.start()
    names = sorted(os.listdir(m.path))
    rolled = op == "rollback" and point == "catalog_published"
    assert names == (["a"] if rolled else ["a", "b"]), names
    assert mounting.read(m.path / "a") == b"a" * 5000
    listing = mounting.ok(m.path, "list")
    snaps = {s["name"] for s in listing["snapshots"]}
    assert ("s0" in snaps) == (op != "delete" or point == "catalog_publish")
    assert ("s1" in snaps) == (op == "snapshot" and point == "catalog_published")
    r = mounting.run_cowfs("gc", m.store, "--json")
    assert json.loads(r.stdout)["ok"]
    m.stop()
    assert workload.fsck_clean(m.store)["counts"]["unpublished_layers"] == 0, "gc removes unpublished layers"


@pytest.mark.timeout(240)
def test_kill9_at_the_publish_of_a_gc_merge(mount_factory):
    """The last batch of a merge reparents the child and forgets the merged layer: killed
    before it is published, the merged layer stays named (emptied), and the next pass ends it."""
    m = mount_factory()
    mounting.write(m.path / "a", b"a" * 3000, sync=True)
    workload.ctl(m.path, "snapshot s0")
    mounting.write(m.path / "b", b"b" * 3000, sync=True)
    workload.ctl(m.path, "snapshot s1")
    m.stop()
    layers = set(catalog(m.store)["layer"])
    m.env = {"COWFS_FAULTS": "catalog_publish:kill:1:1"}  # the delete passes, the merge dies
    m.start()
    workload.ctl(m.path, "delete s0")
    rc = m.proc.wait(timeout=60)
    assert rc == -9, m.log_tail()
    m.exit_codes.append(rc)
    mounting.lazy_unmount(m.path)
    assert set(catalog(m.store)["layer"]) == layers, "the merge was not published"
    workload.fsck_clean(m.store)
    m.env = {}
    m.start()
    assert sorted(os.listdir(m.path)) == ["a", "b"]
    r = mounting.run_cowfs("gc", m.store, "--json")
    assert json.loads(r.stdout)["ok"]
    m.stop()
    assert len(catalog(m.store)["layer"]) < len(layers), "the next pass finished the merge"
    workload.fsck_clean(m.store)


def test_a_snapshot_name_taken_by_another_process_is_refused(mount_factory):
    """A name another process published in the reference store (what a second daemon will
    do) is refused by the compare-and-set even though this daemon's catalog has not seen it:
    the snapshot fails whole, and the other's record stands."""
    m = mount_factory()
    mounting.write(m.path / "a", b"x" * 100, sync=True)
    mounting.ok(m.path, "list")  # the catalog's records read (as a listing reads them all)
    rec = {"name": "taken", "layer": 1, "view": 1, "branch": None, "created": 1.0}
    con = sqlite3.connect(os.path.join(m.store, "refs.sqlite"))
    try:
        con.execute("INSERT INTO kv (cf, key, value) VALUES ('catalog', ?, ?)",
                    (b"snap/taken", json.dumps(rec).encode()))
        con.commit()
    finally:
        con.close()
    reply = mounting.fails(m.path, "snapshot taken", "EEXIST")
    assert "taken" in reply["error"]
    assert catalog(m.store)["snap"]["taken"] == rec
    mounting.ok(m.path, "snapshot other")  # the daemon goes on
    assert sorted(os.listdir(m.path)) == ["a"]
    r = mounting.run_cowfs("gc", m.store, "--json")  # what the refused snapshot wrote goes
    assert json.loads(r.stdout)["ok"]
    m.stop()
    assert workload.fsck_clean(m.store)["counts"]["unpublished_layers"] == 0


def _old_code(tmp_path, commit: str):
    """The cowfs package of commit, extracted under tmp_path/old (skip if not in the history)."""
    old = tmp_path / "old"
    old.mkdir()
    arch = subprocess.run(["git", "-C", str(mounting.REPO), "archive", commit, "cowfs"], capture_output=True)
    if arch.returncode != 0:
        pytest.skip(f"the code of {commit} is not in this checkout's history")
    subprocess.run(["tar", "x", "-C", str(old)], input=arch.stdout, check=True)
    return old


def _old_store(mount_factory, tmp_path, commit: str):
    """A store made by the code of commit and mounted by it (a, snapshot s0, b written):
    (store, the environment that runs that code, the mount)."""
    env = {"PYTHONPATH": str(_old_code(tmp_path, commit))}
    store = tmp_path / "store"
    subprocess.run(mounting.cowfs_command() + ["init", str(store)], env=dict(os.environ, **env),
                   check=True, capture_output=True)
    m = mount_factory(store=store, init=False, env=env)
    mounting.write(m.path / "a", b"a" * 4000, sync=True)
    mounting.ok(m.path, "snapshot s0")
    mounting.write(m.path / "b", b"b" * 4000, sync=True)
    return store, env, m


def _upgraded(mount_factory, store, env) -> None:
    """Branch f (from s0) reads s0, the store is fsck-clean, and the older code refuses it."""
    from cowfs.store import FORMAT_VERSION
    fb = mount_factory(store=store, init=False, branch="f")
    assert sorted(os.listdir(fb.path)) == ["a"]
    fb.stop()
    workload.fsck_clean(store)
    r = subprocess.run(mounting.cowfs_command() + ["fsck", str(store)], env=dict(os.environ, **env),
                       capture_output=True, text=True)
    assert r.returncode != 0 and f"format {FORMAT_VERSION}" in (r.stdout + r.stderr), r


@pytest.mark.parametrize("fmt", sorted(OLD_FORMATS))
def test_an_older_store_is_upgraded_also_after_an_upgrade_cut_short(mount_factory, tmp_path, fmt):
    """A store made and written by older code (main with files, a directory clone, snapshots,
    a branch from one, a deleted snapshot) is upgraded at its first open, also when its copy
    or its marker was cut short."""
    store, env, m = _old_store(mount_factory, tmp_path, OLD_FORMATS[fmt])
    (m.path / "d").mkdir()
    mounting.write(m.path / "d" / "f", b"f" * 100, sync=True)
    mounting.ok(m.path, "clone d d2")  # copy inodes: a counter of their own, which stays at home
    mounting.ok(m.path, "snapshot s1")
    mounting.ok(m.path, "snapshot gone")
    mounting.ok(m.path, "branch f s0")
    mounting.ok(m.path, "delete gone")
    m.stop()
    assert json.loads((store / "cowfs-store.json").read_text())["format"] == fmt
    assert catalog(store) == {"branch": {}, "snap": {}, "layer": {}}
    # An upgrade cut short between its copy and the batch that ends it: the reference store
    # holds a copy (here a wrong one), RocksDB still says 9; the next open copies again.
    con = sqlite3.connect(os.path.join(store, "refs.sqlite"))
    try:
        con.execute("INSERT INTO kv (cf, key, value) VALUES ('catalog', ?, ?)",
                    (b"snap/stale", json.dumps({"name": "stale", "layer": 1, "view": 1, "branch": None,
                                                "created": 0.0}).encode()))
        con.commit()
    finally:
        con.close()
    m.env = {}
    m.start()
    from cowfs.store import FORMAT_VERSION
    assert json.loads((store / "cowfs-store.json").read_text())["format"] == FORMAT_VERSION
    c = catalog(store)
    assert set(c["snap"]) == {"s0", "s1"} and set(c["branch"]) == {"main", "f"}
    assert sorted(os.listdir(m.path)) == ["a", "b", "d", "d2"]
    mounting.ok(m.path, "clone d d3")
    assert mounting.read(m.path / "d3" / "f") == mounting.read(m.path / "d2" / "f") == b"f" * 100
    listing = mounting.ok(m.path, "list")
    assert {s["name"] for s in listing["snapshots"]} == {"s0", "s1"}
    mounting.ok(m.path, "snapshot s2")  # the catalog goes on in the reference store
    m.stop()
    workload.fsck_clean(store)
    # Cut short after the batch, before the marker: RocksDB says 11, the marker the old one; the open
    # only writes the marker (the catalog, now only in the reference store, stays).
    marker = store / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": fmt}))
    m.start()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION
    assert set(catalog(store)["snap"]) == {"s0", "s1", "s2"}
    assert sorted(os.listdir(m.path)) == ["a", "b", "d", "d2", "d3"]
    m.stop()
    _upgraded(mount_factory, store, env)


def test_a_format_11_store_is_upgraded_by_its_marker_and_refused_by_older_code(mount_factory, tmp_path):
    """Format 12 (homes) changes no record of a format-11 store: its first open writes the
    marker; from then format-11 code refuses it (it would not see the homes' layers)."""
    store, env, m = _old_store(mount_factory, tmp_path, FORMAT_11)
    mounting.ok(m.path, "branch f s0")
    m.stop()
    assert json.loads((store / "cowfs-store.json").read_text())["format"] == 11
    before = catalog(store)
    m.env = {}
    m.start()
    from cowfs.store import FORMAT_VERSION
    assert json.loads((store / "cowfs-store.json").read_text())["format"] == FORMAT_VERSION == 12
    assert sorted(os.listdir(m.path)) == ["a", "b"]
    m.stop()
    assert catalog(store) == before, "no record changes"
    _upgraded(mount_factory, store, env)
