"""Branches with daemons of their own, on real mounts (docs/design-many-processes.md, "Step 6"):
`cowfs branch MNT NEW --own-daemon` gives NEW a home database (STORE/homes/<id>/), and
`cowfs mount STORE MP --branch NEW` serves it by a daemon of its own beside the store's.
Two daemons of one store write at once, each sees only its own writes and both read the
shared base; a daemon killed -9 while both write leaves the other serving, and a remount
takes its branch over; a snapshot in a branch's own daemon is the branch point of a third;
gc deletes the home of a deleted branch; a repack of the base waits for the branch daemon, which
reads on; kill -9 around the publication of a branch with its own home; fsck of the store and of
every home is clean after each, with every byte compared.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

import mounting
from cowfs import homes
from cowfs.fsck import Fsck
from cowfs.store import Store
from mounting import ok, read, run_cowfs, wait_until, write

BASE = {f"base/f{i}.bin": os.urandom(200_000 + i * 7_001) for i in range(6)}
BASE["base/small.txt"] = b"the base\n"


def _with_base(mount_factory):
    """The store's daemon with the base tree written and synced."""
    m = mount_factory()
    for rel, data in BASE.items():
        (m.path / rel).parent.mkdir(exist_ok=True)
        write(m.path / rel, data, sync=True)
    return m


def _own_branch(m, name: str, source: str | None = None) -> dict:
    args = ["branch", str(m.path), name, "--own-daemon", "--json"] + (["--from", source] if source else [])
    reply = json.loads(run_cowfs(*args).stdout)
    assert reply["ok"] and reply["home"], reply
    assert (Path(m.store) / "homes" / reply["home"] / "db").is_dir()
    return reply


def _fsck(store) -> None:
    """`cowfs fsck` of the unmounted store: its own database, the catalog, the homes, and each
    home's database over its lineage (its counts against its own records, foreign references
    resolved through the databases below), every byte read."""
    mounting.fsck(store)


def _writer(root: Path, prefix: str, count: int, errors: list, stop: threading.Event | None = None) -> list[str]:
    """Write count files (random bytes, each fsynced) named prefix-N under root; what was written."""
    done = []
    try:
        for i in range(count):
            if stop is not None and stop.is_set():
                break
            rel = f"{prefix}-{i}.bin"
            write(root / rel, os.urandom(50_000 + 997 * i), sync=True)
            done.append(rel)
    except OSError as e:
        errors.append(f"{prefix}: {e}")
    return done


def _run_writers(*jobs) -> list[str]:
    errors: list[str] = []
    threads = [threading.Thread(target=_writer, args=(*job, errors)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_two_daemons_of_one_store_write_at_once_isolated_and_both_read_the_base(mount_factory, tmp_path):
    m = _with_base(mount_factory)
    reply = _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    assert f.pid != m.pid and mounting.pid_alive(m.pid)
    home = Path(m.store) / "homes" / reply["home"]
    assert int((home / "daemon.pid").read_text()) == f.pid and (home / "daemon.log").exists()

    # both read the shared base, as written
    for rel, data in BASE.items():
        assert read(f.path / rel) == data and read(m.path / rel) == data

    assert _run_writers((m.path, "main", 20), (f.path, "feat", 20)) == []
    # the fork changes base files: appends, rewrites, deletes, renames; main keeps them
    with open(f.path / "base/f0.bin", "ab") as fh:
        fh.write(b"appended in feat")
    write(f.path / "base/f1.bin", b"rewritten in feat", sync=True)
    os.unlink(f.path / "base/f2.bin")
    os.rename(f.path / "base/f3.bin", f.path / "base/moved.bin")
    os.chmod(f.path / "base/f4.bin", 0o600)

    main_tree, feat_tree = mounting.file_tree(m.path), mounting.file_tree(f.path)
    assert not any(k.startswith("feat-") for k in main_tree) and not any(k.startswith("main-") for k in feat_tree)
    assert len([k for k in main_tree if k.startswith("main-")]) == 20
    assert len([k for k in feat_tree if k.startswith("feat-")]) == 20
    assert {k: v for k, v in main_tree.items() if k.startswith("base/")} == BASE
    assert feat_tree["base/f0.bin"] == BASE["base/f0.bin"] + b"appended in feat"
    assert feat_tree["base/f1.bin"] == b"rewritten in feat" and "base/f2.bin" not in feat_tree
    assert feat_tree["base/moved.bin"] == BASE["base/f3.bin"] and feat_tree["base/f5.bin"] == BASE["base/f5.bin"]

    # cowfs status: one entry per daemon, the fork's with its home; stats through the fork's own socket
    recs = json.loads(run_cowfs("status", str(m.store), "--json").stdout)["stores"]
    by_pid = {r["daemon_pid"]: r for r in recs}
    assert set(by_pid) == {m.pid, f.pid}, recs
    assert by_pid[f.pid]["home"] == reply["home"] and by_pid[m.pid]["home"] is None
    assert [s["branch"] for s in by_pid[f.pid]["serving"]] == ["feat"]
    st = mounting.stats(f.path)
    assert st["daemon_pid"] == f.pid and st["branch"] == "feat" and st["home"] == reply["home"]

    # a second mount of the branch is refused, naming its daemon
    (tmp_path / "again").mkdir()
    r = run_cowfs("mount", m.store, tmp_path / "again", "--branch", "feat", check=False)
    assert r.returncode == 1 and "already served" in r.stderr.decode() and str(f.pid) in r.stderr.decode(), r

    f.stop()
    m.stop()
    _fsck(m.store)
    f.start()
    m.start()
    assert mounting.file_tree(m.path) == main_tree and mounting.file_tree(f.path) == feat_tree


def test_kill9_of_a_branch_daemon_while_both_write(mount_factory):
    m = _with_base(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    stop = threading.Event()
    errors: list[str] = []
    done: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda p=p, root=root: done.setdefault(p, _writer(root, p, 400, errors, stop)))
               for p, root in (("main", m.path), ("feat", f.path))]
    for t in threads:
        t.start()
    wait_until(lambda: len(list(f.path.glob("feat-*"))) >= 5, "the fork's writer to get going", timeout=60)
    f.proc.send_signal(signal.SIGKILL)
    f.proc.wait(30)
    wait_until(lambda: not threads[1].is_alive(), "the fork's writer to fail", timeout=60)
    # the store's daemon serves on: its writer still writes, and the base reads as it was
    wait_until(lambda: len(list(m.path.glob("main-*"))) >= 10, "main's writer to go on", timeout=60)
    stop.set()
    threads[0].join(120)
    assert not [e for e in errors if e.startswith("main")], errors
    assert read(m.path / "base/f1.bin") == BASE["base/f1.bin"]
    run_cowfs("umount", f.path)  # the dead daemon's mount cleared
    f.start()  # its serve and writer records are stale: taken over
    fork = mounting.file_tree(f.path)
    written = done["feat"]
    assert all(fork.get(rel) is not None for rel in written[:-1])  # every fsynced file but a last one cut short
    assert {k: v for k, v in fork.items() if k.startswith("base/")} == BASE
    write(f.path / "after.bin", b"after the crash", sync=True)
    f.stop()
    m.stop()
    _fsck(m.store)


def test_kill9_of_the_store_daemon_while_a_branch_daemon_writes(mount_factory):
    m = _with_base(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(30)
    assert _run_writers((f.path, "feat", 30)) == []
    for rel, data in BASE.items():  # its base reads go on: the store's database, read-only
        assert read(f.path / rel) == data
    run_cowfs("umount", m.path)
    f.stop()
    _fsck(m.store)
    m.start()
    assert mounting.file_tree(m.path) == BASE


def test_a_snapshot_in_a_branch_daemon_is_the_branch_point_of_a_third(mount_factory):
    m = _with_base(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    write(f.path / "in-feat.txt", b"feat's", sync=True)
    ok(f.path, "snapshot s1")
    write(f.path / "after-s1.txt", b"later", sync=True)
    _own_branch(f, "feat2", source="s1")
    g = mount_factory(store=m.store, init=False, branch="feat2", name="feat2")
    assert len({m.pid, f.pid, g.pid}) == 3
    tree = mounting.file_tree(g.path)
    assert tree == {**BASE, "in-feat.txt": b"feat's"}
    write(g.path / "in-feat2.txt", b"feat2's", sync=True)
    assert not (f.path / "in-feat2.txt").exists() and not (m.path / "in-feat.txt").exists()
    g.stop()
    f.stop()
    m.stop()
    _fsck(m.store)
    f.start()
    g.start()
    assert read(g.path / "in-feat2.txt") == b"feat2's" and read(f.path / "after-s1.txt") == b"later"


def test_gc_deletes_the_home_of_a_deleted_branch(mount_factory):
    m = _with_base(mount_factory)
    reply = _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    assert _run_writers((f.path, "feat", 10)) == []
    f.stop()
    home = Path(m.store) / "homes" / reply["home"]
    run_cowfs("delete", str(m.store), "feat")
    assert home.is_dir()  # until a gc
    run_cowfs("gc", str(m.store))
    assert not home.exists()
    m.stop()
    _fsck(m.store)
    m.start()
    assert mounting.file_tree(m.path) == BASE


def _half_dead(mount_factory) -> tuple[mounting.Mount, bytes]:
    """The store's daemon with file keep (8 MiB) whose second half was rewritten: the packs of
    its first write are half dead, so `cowfs gc --repack-below 1` moves its first half."""
    m = mount_factory(options=("dedup=off",))
    rnd = random.Random(7)
    keep = bytearray(rnd.randbytes(8 << 20))
    write(m.path / "keep", bytes(keep), sync=True)  # its own packs
    keep[4 << 20:] = rnd.randbytes(4 << 20)
    with open(m.path / "keep", "r+b") as fh:
        fh.seek(4 << 20)
        fh.write(keep[4 << 20:])
        os.fsync(fh.fileno())
    return m, bytes(keep)


def test_a_repack_of_the_store_database_waits_for_a_branch_daemon_that_then_reads_on(mount_factory):
    """The base's packs repacked by `cowfs gc` of the store's daemon: the old packs are deleted
    only once the branch daemon has acknowledged the round, and it does so after reopening
    the store's database below its view, so its reads of base data it never read before
    follow the moved pointers (without that reopen they fail on the deleted packs)."""
    m, keep = _half_dead(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    with open(f.path / "keep", "rb") as fh:  # its tree node read (and its blob file opened) now,
        fh.seek(6 << 20)  # with data of the half no repack moves: what is left to read after
        assert fh.read(4096) == keep[6 << 20:(6 << 20) + 4096]  # the gc are the moved pointers
    os.kill(f.proc.pid, signal.SIGSTOP)  # so that it cannot acknowledge the round at once
    try:
        first = mounting.cowfs_json("gc", str(m.store), "--repack-below", "1")
    finally:
        os.kill(f.proc.pid, signal.SIGCONT)
    assert first["packs_repacked"] >= 1 and first["packs_deleted"] == 0, json.dumps(first)  # the branch daemon owes its ack
    deadline = time.monotonic() + 60
    while True:
        r = mounting.cowfs_json("gc", str(m.store), "--repack-below", "1")
        if r["packs_deleted"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r["packs_deleted"] >= 1, r
    assert read(f.path / "keep") == keep  # its first half never read by the branch daemon before
    assert read(m.path / "keep") == keep
    f.stop()
    m.stop()
    _fsck(m.store)


@pytest.mark.parametrize("point", ["catalog_publish", "catalog_published"])
def test_kill9_around_the_publish_of_a_branch_with_its_own_home(mount_factory, point):
    """Killed just before the compare-and-set that names the new branch, its home is left
    unnamed (fsck counts it, clean; gc removes it once old) and the catalog is as before;
    killed just after, the branch is there, its own daemon serves it, and fsck is clean."""
    m = _with_base(mount_factory)
    m.stop()
    m.env = {"COWFS_FAULTS": f"{point}:kill"}
    m.start()
    mounting.died(m, "branch", "feat", "--own-daemon")
    m.env = {}
    listed = homes.listed(str(m.store))
    assert len(listed) == 1, listed  # made and registered before the publication
    report = mounting.fsck(m.store)
    assert report["counts"]["unnamed_homes"] == (1 if point == "catalog_publish" else 0), report["counts"]
    m.start()
    branches = {b["name"] for b in ok(m.path, "list")["branches"]}
    if point == "catalog_publish":
        assert branches == {"main"}
        old = time.time() - homes.UNNAMED_GRACE - 1
        os.utime(Path(m.store) / "homes" / listed[0], (old, old))
        run_cowfs("gc", str(m.store))
        assert homes.listed(str(m.store)) == []
    else:
        assert branches == {"main", "feat"}
        f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
        assert mounting.file_tree(f.path) == BASE
        write(f.path / "new.txt", b"after the crash", sync=True)
        f.stop()
    m.stop()
    _fsck(m.store)


def test_a_branch_daemon_killed_before_its_acknowledgement_holds_no_round_up(mount_factory):
    """A round that waits for a branch daemon's acknowledgement is due once that daemon is
    killed -9 (its writer record is stale); the remount reads the base through the moved
    pointers."""
    m, keep = _half_dead(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat")
    f.proc.send_signal(signal.SIGSTOP)  # alive, and acknowledging nothing
    try:
        first = mounting.cowfs_json("gc", str(m.store), "--repack-below", "1")
        assert first["packs_repacked"] >= 1 and first["packs_waiting"] >= 1, first
        time.sleep(2)
        again = mounting.cowfs_json("gc", str(m.store))
        assert again["packs_deleted"] == 0 and again["packs_waiting"] >= 1, again
    finally:
        f.proc.send_signal(signal.SIGKILL)
    f.proc.wait(30)
    r = mounting.cowfs_json("gc", str(m.store))
    assert r["packs_deleted"] >= 1 and r["packs_waiting"] == 0, r
    run_cowfs("umount", f.path)
    f.start()
    assert read(f.path / "keep") == keep
    f.stop()
    m.stop()
    _fsck(m.store)


@pytest.mark.parametrize("point", ["catalog_publish", "catalog_published"])
def test_kill9_around_the_publish_of_a_snapshot_in_a_branch_daemon(mount_factory, point):
    """A snapshot taken in a branch's own daemon, killed on either side of its compare-and-set:
    the catalog is as before or has the snapshot; the home's records of a layer left unnamed
    are counted by its fsck and removed by its next gc; every file reads as written."""
    m = _with_base(mount_factory)
    _own_branch(m, "feat")
    f = mount_factory(store=m.store, init=False, branch="feat", name="feat", env={"COWFS_FAULTS": f"{point}:kill"})
    write(f.path / "mine.txt", b"the fork's", sync=True)
    mounting.died(f, "snapshot", "s1")
    f.env = {}
    m.stop()
    (home,) = homes.listed(str(m.store))
    st = Store(str(m.store), home=home)
    try:
        report = Fsck(st).run()
        assert report.clean, report.problems
        assert ("s1" in st.catalog.snapshots) == (point == "catalog_published")
        assert report.counts["unpublished_layers"] == (1 if point == "catalog_publish" else 0), report.counts
    finally:
        st.close()
    m.start()
    f.start()
    assert mounting.file_tree(f.path) == {**BASE, "mine.txt": b"the fork's"}
    run_cowfs("gc", str(f.path))  # its own daemon's gc: the unnamed layer's records go
    f.stop()
    m.stop()
    st = Store(str(m.store), home=home)
    try:
        assert Fsck(st).run().counts["unpublished_layers"] == 0
    finally:
        st.close()
    _fsck(m.store)
