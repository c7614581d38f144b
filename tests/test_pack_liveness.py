"""Pack gc by mark, condemn and sweep over every database of a store (cowfs/chunks/liveness.py;
docs/design-many-processes.md "Garbage collection", build order step 4).

Real mounts: `cowfs gc` condemns the packs nothing points at and deletes them only once every
writer alive at their condemnation has acknowledged it or is gone (a second writer is a real
process holding a writer record in STORE/refs.sqlite through the same code a daemon uses); a
gc run by another process, without the daemon's lock, waits for the daemon's acknowledgement,
which comes only once a flush it caught between pack put and commit has committed, and then
pardons that pack; a database registered as a member keeps the packs it points into, and fsck checks its pointers;
fsck finds a due condemned pack that a pointer names, and --repair pardons it; a kill -9 of
the daemon after the condemnation or in the middle of the sweep leaves the store fsck-clean
with every byte, and the next gc finishes.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

import mounting
import workload
from cowfs.chunks.packs import pack_id

MiB = 1 << 20

WRITER = r"""
import sys
from cowfs.chunks.liveness import Liveness, REF_FAMILIES
from cowfs.kv.sqlite import SQLiteKV
lv = Liveness(SQLiteKV(sys.argv[1], REF_FAMILIES))
print(lv.register(""), flush=True)
for line in sys.stdin:
    if line.startswith("ack"):
        lv.ack(lv.condemned().gen)
        print("acked", flush=True)
"""


def _line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The helper process's next line ("" once it ended); OpTimeout if it gives none in time
    (the caller's finally kills it, which ends the read)."""
    return mounting.call_with_timeout(proc.stdout.readline, timeout=timeout, what=f"a line of {proc.args[:2]}")


def packs(store) -> set[str]:
    return {n for n in os.listdir(os.path.join(store, "packs")) if pack_id(n) is not None}


def gc(mp, *args) -> dict:
    return mounting.cowfs_json("gc", mp, *args)


def write_file(path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return data


def condemned(store) -> dict:
    from cowfs.chunks.liveness import Liveness, REF_FAMILIES
    from cowfs.kv.sqlite import SQLiteKV

    kv = SQLiteKV(os.path.join(store, "refs.sqlite"), REF_FAMILIES)
    try:
        c = Liveness(kv).condemned()
        return {"gen": c.gen, "packs": {f"{p:016x}.pack" for p in c.packs}, "rounds": c.rounds}
    finally:
        kv.close()


@pytest.mark.timeout(300)
def test_a_writer_alive_at_condemnation_holds_the_sweep_until_it_acknowledges_or_dies(mount_factory):
    m = mount_factory(options=("dedup=off",))
    keep = write_file(m.path / "keep", 8 * MiB, 1)
    before = packs(m.store)
    gone = write_file(m.path / "gone", 16 * MiB, 2)
    garbage = packs(m.store) - before
    assert garbage, "the 16 MiB file is packed"
    os.unlink(m.path / "gone")
    mounting.syncfs(m.path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.store / "refs.sqlite")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wid = _line(writer).strip()
        assert len(wid) == 16, wid
        r = gc(m.path)
        assert r["packs_condemned"] == len(garbage) and r["packs_deleted"] == 0, r
        assert r["packs_waiting"] == len(garbage), r
        assert garbage <= packs(m.store), "nothing deleted while the other writer has not acknowledged"
        c = condemned(m.store)
        assert c["packs"] == garbage
        (t, writers), = c["rounds"].values()
        assert wid in writers and len(writers) == 2 and time.time() - t < 120, c  # the daemon and the helper
        # Another run condemns nothing new and still waits, and says so.
        r = gc(m.path)
        assert (r["packs_condemned"], r["packs_deleted"], r["packs_waiting"]) == (0, 0, len(garbage)), r
        line = mounting.run_cowfs("gc", m.path, timeout=300).stdout
        line = line if isinstance(line, str) else line.decode()
        assert f"{len(garbage)} condemned waiting for other writers" in line, line
        writer.stdin.write("ack\n")
        writer.stdin.flush()
        assert _line(writer).strip() == "acked"
        r = gc(m.path)
        assert r["packs_deleted"] == len(garbage) and r["packs_waiting"] == 0, r
        assert not garbage & packs(m.store)
        assert condemned(m.store)["packs"] == set()
        # A writer that dies without acknowledging: gone, so the sweep goes on.
        before = packs(m.store)
        write_file(m.path / "gone2", 16 * MiB, 3)
        garbage = packs(m.store) - before
        os.unlink(m.path / "gone2")
        mounting.syncfs(m.path)
        r = gc(m.path)
        assert r["packs_condemned"] == len(garbage) and r["packs_deleted"] == 0, r
        writer.kill()
        writer.wait(timeout=30)
        r = gc(m.path)
        assert r["packs_deleted"] == len(garbage), r
        assert not garbage & packs(m.store)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert (m.path / "keep").read_bytes() == keep
    assert gone  # written and deleted: its bytes were garbage
    m.stop()
    report = workload.fsck_clean(m.store)
    assert report["counts"].get("condemned_packs", 0) == 0, report["counts"]


def _member_from_store(store, rel: str) -> int:
    """Create a RocksDB database at STORE/rel holding a copy of every packed pointer of the
    store's database (what a branch daemon's home database that read the same chunks would
    hold) and register it as a member; returns the pointers copied."""
    from cowfs.chunks import codec
    from cowfs.chunks.families import CF_OBJECTS
    from cowfs.chunks.liveness import Liveness, REF_FAMILIES
    from cowfs.kv.base import Batch
    from cowfs.kv.rocks import RocksKV
    from cowfs.kv.sqlite import SQLiteKV
    from cowfs.store import FAMILIES

    src = RocksKV(os.path.join(store, "db"), FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
    os.makedirs(os.path.join(store, os.path.dirname(rel)), mode=0o700)
    dst = RocksKV(os.path.join(store, rel), FAMILIES, blob_families=(CF_OBJECTS,))
    refs = SQLiteKV(os.path.join(store, "refs.sqlite"), REF_FAMILIES)
    try:
        b = Batch()
        for h, raw in src.scan(CF_OBJECTS, b""):
            if codec.packed_extent(raw) is not None:
                b.put(CF_OBJECTS, h, raw)
        dst.write(b)
        dst.sync()
        Liveness(refs).add_member("t", rel)
        return len(b)
    finally:
        src.close()
        dst.close()
        refs.close()


@pytest.mark.timeout(300)
def test_a_member_database_keeps_its_packs_and_fsck_checks_it(mount_factory):
    m = mount_factory(options=("dedup=off",))
    data = write_file(m.path / "shared", 16 * MiB, 4)
    theirs = packs(m.store)
    assert theirs
    m.stop()
    assert _member_from_store(m.store, "heads/t/db") >= 100
    workload.fsck_clean(m.store)
    m.start()
    os.unlink(m.path / "shared")  # the store's database no longer points into them; the member does
    mounting.syncfs(m.path)
    r = gc(m.path, "--repack-below", "1")
    assert r["packs_condemned"] == 0 and r["packs_deleted"] == 0 and r["packs_repacked"] == 0, r
    assert theirs <= packs(m.store)
    m.stop()
    workload.fsck_clean(m.store)
    # A pack the member points into, gone: fsck names the member.
    victim = sorted(theirs)[0]
    os.rename(m.store / "packs" / victim, m.store / victim)
    res = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode != 0 and any("member t" in p and victim in p for p in report["problems"]), report
    os.rename(m.store / victim, m.store / "packs" / victim)
    workload.fsck_clean(m.store)
    # The member unregistered: its packs are garbage, condemned and (no other writer) swept.
    import sqlite3
    db = sqlite3.connect(m.store / "refs.sqlite")
    db.execute("DELETE FROM kv WHERE cf='member'")
    db.commit()
    db.close()
    m.start()
    r = gc(m.path)
    assert r["packs_condemned"] == len(theirs) and r["packs_deleted"] == len(theirs), r
    assert not theirs & packs(m.store)
    assert data  # written, then unlinked: nothing of the store names it
    m.stop()
    workload.fsck_clean(m.store)


@pytest.mark.timeout(300)
def test_fsck_finds_a_due_condemned_pack_that_a_pointer_names_and_repair_pardons_it(mount_factory):
    m = mount_factory(options=("dedup=off",))
    data = write_file(m.path / "live", 16 * MiB, 5)
    live = packs(m.store)
    m.stop()
    from cowfs.chunks.liveness import Condemned
    import sqlite3
    c = Condemned(1, {1: (time.time(), [])}, {pack_id(n): 1 for n in live})  # a round no writer saw
    db = sqlite3.connect(m.store / "refs.sqlite")
    db.execute("INSERT OR REPLACE INTO kv VALUES ('gc', ?, ?)", (b"condemned", c.pack()))
    db.commit()
    db.close()
    res = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode != 0, report
    assert sum("is condemned" in p for p in report["problems"]) == len(live), report["problems"]
    res = mounting.run_cowfs("fsck", m.store, "--repair", "--json", check=False, timeout=300)
    assert any("pardoned" in r for r in json.loads(res.stdout)["repaired"]), res.stdout
    workload.fsck_clean(m.store)
    assert condemned(m.store)["packs"] == set()
    m.start()
    assert gc(m.path)["packs_deleted"] == 0
    assert (m.path / "live").read_bytes() == data
    m.stop()
    # A damaged list: gc refuses to touch packs and says why; fsck names it, --repair drops it.
    db = sqlite3.connect(m.store / "refs.sqlite")
    db.execute("INSERT OR REPLACE INTO kv VALUES ('gc', ?, ?)", (b"condemned", b"{not json"))
    db.commit()
    db.close()
    m.start()
    res = mounting.run_cowfs("gc", m.path, check=False, timeout=300)
    assert res.returncode != 0 and b"gc/condemned is damaged" in res.stdout + res.stderr, res
    m.stop()
    res = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=300)
    assert res.returncode != 0 and any("gc/condemned is damaged" in p for p in json.loads(res.stdout)["problems"])
    mounting.run_cowfs("fsck", m.store, "--repair", "--json", check=False, timeout=300)
    workload.fsck_clean(m.store)
    m.start()
    assert gc(m.path)["packs_deleted"] == 0
    assert (m.path / "live").read_bytes() == data
    m.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["packs_condemned", "packs_swept"])
def test_kill9_at_each_step_of_pack_gc(mount_factory, point):
    """The daemon is killed right after the condemnation (packs_condemned: nothing deleted yet)
    or after the sweep deleted the packs but before it took them off the list (packs_swept):
    fsck is clean, every byte reads back, and the next gc finishes (the dead daemon's writer
    record is stale: it holds nothing back)."""
    m = mount_factory(options=("dedup=off",), env={"COWFS_FAULTS": f"{point}:sleep60"})
    keep = write_file(m.path / "keep", 8 * MiB, 6)
    before = packs(m.store)
    write_file(m.path / "gone", 16 * MiB, 7)
    garbage = packs(m.store) - before
    os.unlink(m.path / "gone")
    mounting.syncfs(m.path)
    gc_run = subprocess.Popen(mounting.cowfs_command() + ["gc", str(m.path), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        mounting.wait_log(m, f"injected fault at {point}", gc_run)
    finally:
        workload.kill_daemon(m)
        gc_run.communicate(timeout=60)
    assert condemned(m.store)["packs"] == garbage, "the condemnation is durable"
    if point == "packs_condemned":
        assert garbage <= packs(m.store)
    else:
        assert not garbage & packs(m.store)
    report = workload.fsck_clean(m.store)
    assert report["counts"]["condemned_packs"] == len(garbage), report["counts"]
    m.env = {}
    m.start()
    assert (m.path / "keep").read_bytes() == keep
    r = gc(m.path)
    assert r["packs_deleted"] == len(garbage) and r["packs_waiting"] == 0, r
    assert not garbage & packs(m.store) and before <= packs(m.store)
    assert condemned(m.store)["packs"] == set()
    assert (m.path / "keep").read_bytes() == keep
    m.stop()
    workload.fsck_clean(m.store)


FOREIGN_GC = r"""
import json, os, sys
from cowfs.blob.local import LocalBlobStore
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.liveness import Liveness, REF_FAMILIES, mark
from cowfs.chunks.packs import Packs, pack_name
from cowfs.kv.rocks import RocksKV
from cowfs.kv.sqlite import SQLiteKV
from cowfs.store import FAMILIES
store = sys.argv[1]
lv = Liveness(SQLiteKV(os.path.join(store, "refs.sqlite"), REF_FAMILIES))
lv.register("")
packs = Packs(LocalBlobStore(os.path.join(store, "packs"), create=False))

def marked():  # the daemon's database, read-only beside it, as of now
    kv = RocksKV(os.path.join(store, "db"), FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
    try:
        return mark([kv])
    finally:
        kv.close()

for line in sys.stdin:
    if line.startswith("condemn"):  # no lock: the daemon's flushes run on
        listed = packs.listing()
        live = marked()
        garbage = [p for p in listed if not live.get(p)]
        lv.condemn(garbage, list(live))
        print(json.dumps({"condemned": [pack_name(p) for p in garbage], "gen": lv.condemned().gen}), flush=True)
    elif line.startswith("sweep"):
        c = lv.condemned()
        due = lv.due(c)
        live = marked() if due else {}
        gone = sorted(p for p in due if not live.get(p))
        for p in gone:
            packs.delete(p)
        lv.forget(due)
        print(json.dumps({"deleted": [pack_name(p) for p in gone],
                          "pardoned": [pack_name(p) for p in due if live.get(p)],
                          "waiting": len(c.packs) - len(due)}), flush=True)
"""


def _ask(proc: subprocess.Popen, line: str) -> dict:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    out = _line(proc)
    assert out, f"the gc process ended ({proc.poll()})"
    return json.loads(out)


def _sweep_until_due(gc_proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = _ask(gc_proc, "sweep")
        if r["deleted"] or r["pardoned"]:
            return r
        assert time.monotonic() < deadline, f"the daemon never acknowledged the round: {r}"
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_a_gc_in_another_process_waits_for_the_daemon_and_pardons_what_it_committed_meanwhile(mount_factory):
    """A gc run by another process (what the store keeper will be) lists and marks without the
    daemon's lock.  A flush held between its pack put and its commit: its pack is unmarked,
    so condemned; the daemon acknowledges the round only once that flush committed, and the
    sweep's second mark then finds the pack named: pardoned, the file whole.  Then garbage:
    condemned, acknowledged by the daemon at the change of refs.sqlite, deleted."""
    m = mount_factory(options=("dedup=off",), env={"COWFS_FAULTS": "pack_written:sleep6"})
    late = random.Random(8).randbytes(16 * MiB)
    gc_proc = subprocess.Popen([sys.executable, "-c", FOREIGN_GC, str(m.store)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    writer = subprocess.Popen([sys.executable, "-c",
                               "import os,sys\nwith open(sys.argv[1],'wb') as f:\n"
                               " f.write(sys.stdin.buffer.read()); os.fsync(f.fileno())",
                               str(m.path / "late")], stdin=subprocess.PIPE)
    try:
        writer.stdin.write(late)
        writer.stdin.close()
        mounting.wait_log(m, "injected fault at pack_written")
        held = packs(m.store)
        assert len(held) == 1, held
        r = _ask(gc_proc, "condemn")
        assert set(r["condemned"]) == held, r  # put, not committed: unmarked
        # While the flush is held the daemon cannot acknowledge: the sweep waits (a daemon
        # that acknowledged without its lock would let it delete the pack the flush commits).
        end, r = time.monotonic() + 3, {"pardoned": []}
        while time.monotonic() < end and not r["pardoned"]:
            r = _ask(gc_proc, "sweep")
            assert not r["deleted"], r
            time.sleep(0.2)
        assert writer.wait(timeout=120) == 0
        if not r["pardoned"]:
            r = _sweep_until_due(gc_proc)
        assert held <= set(r["pardoned"]) and not r["deleted"], r
        assert held <= packs(m.store)
        assert "acknowledged gc round" in m.log_text()
        assert (m.path / "late").read_bytes() == late
        # Garbage: deleted once the daemon has acknowledged.
        before = packs(m.store)
        write_file(m.path / "gone", 16 * MiB, 9)
        garbage = packs(m.store) - before
        os.unlink(m.path / "gone")
        mounting.syncfs(m.path)
        r = _ask(gc_proc, "condemn")
        assert set(r["condemned"]) == garbage, r
        r = _sweep_until_due(gc_proc)
        assert set(r["deleted"]) == garbage and not r["pardoned"], r
        assert not garbage & packs(m.store) and before <= packs(m.store)
    finally:
        writer.kill()
        writer.wait(timeout=30)
        gc_proc.kill()
        gc_proc.wait(timeout=30)
    assert (m.path / "late").read_bytes() == late
    m.stop()
    workload.fsck_clean(m.store)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("watch", ["inotify", "stat"])
def test_an_idle_daemon_acknowledges_a_gc_of_another_process_when_refs_change(mount_factory, watch):
    """The acknowledgement task sleeps until STORE/refs.sqlite changes (cowfs.background.refswatch):
    a round another process condemns wakes it, through inotify, or, without an inotify instance
    (the `refs_inotify` fault), through its look at the file's size and mtime every second; the
    other process's sweep then deletes the garbage."""
    env = {"COWFS_FAULTS": "refs_inotify:eio:*"} if watch == "stat" else None
    m = mount_factory(options=("dedup=off",), env=env)
    before = packs(m.store)
    write_file(m.path / "gone", 16 * MiB, 11)
    garbage = packs(m.store) - before
    assert garbage
    os.unlink(m.path / "gone")
    mounting.syncfs(m.path)
    time.sleep(2)  # idle: nothing but the watcher would wake the task
    gc_proc = subprocess.Popen([sys.executable, "-c", FOREIGN_GC, str(m.store)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        r = _ask(gc_proc, "condemn")
        assert set(r["condemned"]) == garbage, r
        t0 = time.monotonic()
        r = _sweep_until_due(gc_proc, timeout=30)
        took = time.monotonic() - t0
        assert set(r["deleted"]) == garbage and not r["pardoned"], r
    finally:
        gc_proc.kill()
        gc_proc.wait(timeout=30)
    log = m.log_text()
    assert "acknowledged gc round" in log
    assert ("no inotify instance" in log) == (watch == "stat"), log
    assert took < 20, took  # at once with inotify, within a second or two without; the rest is load
    assert not garbage & packs(m.store) and before <= packs(m.store)
    m.stop()
    workload.fsck_clean(m.store)
