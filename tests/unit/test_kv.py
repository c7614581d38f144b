"""The KV interface on every backend (RocksKV in a temporary directory, MemoryKV, SQLiteKV,
EtcdKV on a real etcd): ordered scans, atomic multi-family batches, and the compare-and-set of
`write(batch, expect)`; SQLiteKV also across processes (the local reference store of several
daemons of one store)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from cowfs.kv.base import KV, Batch, Conflict, LocalEngine
from cowfs.kv.memory import MemoryKV
from cowfs.kv.overlay import OverlayKV
from cowfs.kv.rocks import RocksKV
from cowfs.kv.sqlite import SQLiteKV

FAMS = ("a", "b")


@pytest.fixture(params=["memory", "rocks", "sqlite", "overlay", "etcd"])
def kv(request, tmp_path):
    if request.param == "memory":
        db = MemoryKV(FAMS)
    elif request.param == "overlay":  # over an empty frozen member: every scan is a merge
        db = OverlayKV(MemoryKV(FAMS), [MemoryKV(FAMS)], through=FAMS)
    elif request.param == "rocks":
        db = RocksKV(str(tmp_path / "db"), FAMS)
    elif request.param == "sqlite":
        db = SQLiteKV(str(tmp_path / "refs.sqlite"), FAMS, page_size=2)  # scans cross pages
    else:
        from cowfs.kv.etcd import EtcdKV
        prefix = request.getfixturevalue("engine_prefix").encode() + b"/"
        db = EtcdKV(request.getfixturevalue("etcd").endpoint, FAMS, prefix, page_size=2)
    yield db
    if request.param in ("rocks", "sqlite", "overlay") or not db.closed:
        db.close()


def put(kv: KV, *items: tuple[str, bytes, bytes | None], expect=()) -> None:
    b = Batch()
    for cf, key, value in items:
        if value is None:
            b.delete(cf, key)
        else:
            b.put(cf, key, value)
    kv.write(b, expect)


def everything(kv: KV) -> dict[str, list[tuple[bytes, bytes]]]:
    return {cf: list(kv.scan(cf, b"")) for cf in FAMS}


def test_the_interface_is_the_small_one(kv):
    """A remote engine implements get, scan, write, sync and close; nothing RocksDB-specific."""
    assert KV.__abstractmethods__ == {"get", "scan", "write", "sync", "close"}
    assert isinstance(kv, LocalEngine) == isinstance(kv, RocksKV)


def test_scan_is_ordered_from_start_within_prefix(kv):
    put(kv, *[("a", k, k.upper()) for k in (b"b2", b"a", b"b", b"b1", b"c", b"b\xff", b"ba")])
    assert [k for k, _ in kv.scan("a", b"")] == [b"a", b"b", b"b1", b"b2", b"ba", b"b\xff", b"c"]
    assert list(kv.scan("a", b"b1", b"b")) == [(b"b1", b"B1"), (b"b2", b"B2"), (b"ba", b"BA"),
                                              (b"b\xff", b"B\xff")]
    assert list(kv.scan("a", b"b1x", b"b1")) == []
    assert list(kv.scan("a", b"b\xff", b"b\xff")) == [(b"b\xff", b"B\xff")]  # no key above it
    assert list(kv.scan("a", b"c", b"c")) == [(b"c", b"C")] and list(kv.scan("a", b"b", b"a")) == []
    assert list(kv.scan("a", b"d")) == []
    assert list(kv.scan("b", b"")) == []


def test_a_batch_spans_families_and_its_last_operation_on_a_key_wins(kv):
    put(kv, ("a", b"k", b"1"), ("b", b"k", b"2"), ("a", b"gone", b"x"))
    put(kv, ("a", b"gone", None), ("a", b"k", None), ("a", b"k", b"3"), ("b", b"k", b"4"), ("b", b"k", None))
    assert kv.get("a", b"k") == b"3" and kv.get("b", b"k") is None and kv.get("a", b"gone") is None
    assert everything(kv) == {"a": [(b"k", b"3")], "b": []}


def test_an_empty_value_is_present(kv):
    put(kv, ("a", b"t", b""))
    assert kv.get("a", b"t") == b"" and list(kv.scan("a", b"")) == [(b"t", b"")]


def test_a_scan_sees_the_family_as_of_its_first_step(kv):
    put(kv, *[("a", bytes([k]), b"old") for k in range(5)])
    it = kv.scan("a", b"")
    assert next(it) == (b"\x00", b"old")
    put(kv, ("a", b"\x01", b"new"), ("a", b"\x02", None), ("a", b"\x03\x00", b"added"))
    assert list(it) == [(bytes([k]), b"old") for k in range(1, 5)]
    assert [v for _k, v in kv.scan("a", b"")] == [b"old", b"new", b"old", b"added", b"old"]
    # the same within a prefix
    put(kv, *[("b", b"p" + bytes([k]), b"old") for k in range(5)], ("b", b"q", b"after"))
    it = kv.scan("b", b"p", b"p")
    assert next(it) == (b"p\x00", b"old")
    put(kv, ("b", b"p\x01", b"new"), ("b", b"p\x02", None), ("b", b"p\x03\x00", b"added"))
    assert list(it) == [(b"p" + bytes([k]), b"old") for k in range(1, 5)]


def test_cas_applies_the_batch_when_every_expectation_holds(kv):
    put(kv, ("a", b"x", b"1"), ("b", b"empty", b""))
    put(kv, ("a", b"x", b"2"), ("b", b"y", b"new"), ("b", b"empty", None),
        expect=[("a", b"x", b"1"), ("b", b"y", None), ("b", b"empty", b"")])
    assert everything(kv) == {"a": [(b"x", b"2")], "b": [(b"y", b"new")]}


@pytest.mark.parametrize("bad", [
    ("a", b"x", b"0"),      # another value
    ("a", b"x", None),      # present, expected absent
    ("b", b"y", b"1"),      # absent, expected present
    ("b", b"empty", None),  # an empty value is not an absent key
    ("a", b"missing", b""),  # nor is an absent key an empty value
])
def test_cas_that_fails_raises_conflict_and_writes_nothing(kv, bad):
    put(kv, ("a", b"x", b"1"), ("b", b"empty", b""))
    before = everything(kv)
    with pytest.raises(Conflict) as e:
        put(kv, ("a", b"x", b"2"), ("b", b"y", b"new"), ("b", b"empty", None), ("a", b"z", b"z"),
            expect=[("a", b"x", b"1"), ("b", b"empty", b""), bad])
    assert (e.value.cf, e.value.key, e.value.expected) == bad
    assert e.value.found == kv.get(bad[0], bad[1])
    assert everything(kv) == before


def test_cas_naming_an_unknown_family_writes_nothing(kv):
    put(kv, ("a", b"x", b"1"))
    with pytest.raises(KeyError):
        put(kv, ("a", b"x", b"2"), expect=[("nope", b"x", None)])
    assert kv.get("a", b"x") == b"1"


def test_cas_is_atomic_against_writers_in_other_threads(kv):
    """Read-modify-write loops in threads: each increment is a CAS on the value it read, so
    none is lost (a check and its write with another write in between would lose one)."""
    threads = 4
    rounds = 25 if type(kv).__name__ == "EtcdKV" else 1000  # etcd: a network round trip each
    put(kv, ("a", b"n", (0).to_bytes(8, "big")))
    conflicts = [0] * threads

    def worker(i: int) -> None:
        done = 0
        while done < rounds:
            old = kv.get("a", b"n")
            new = (int.from_bytes(old, "big") + 1).to_bytes(8, "big")
            try:
                put(kv, ("a", b"n", new), ("b", b"%d-%d" % (i, done), old), expect=[("a", b"n", old)])
            except Conflict:
                conflicts[i] += 1
                continue
            done += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside a check-and-write too
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in ts)
    assert int.from_bytes(kv.get("a", b"n"), "big") == threads * rounds
    # Every increment recorded the value it replaced: all distinct, none lost.
    seen = sorted(int.from_bytes(v, "big") for _k, v in kv.scan("b", b""))
    assert seen == list(range(threads * rounds))


def test_rocks_cas_is_durable_and_checked_after_a_reopen(tmp_path):
    db = RocksKV(str(tmp_path / "db"), FAMS)
    try:
        put(db, ("a", b"x", b"1"), expect=[("a", b"x", None)])
        db.sync()
        db.recover()  # closes and reopens the database: the check reads the new handles
        with pytest.raises(Conflict):
            put(db, ("a", b"x", b"3"), expect=[("a", b"x", b"2")])
        put(db, ("a", b"x", b"2"), expect=[("a", b"x", b"1")])
    finally:
        db.close()
    db = RocksKV(str(tmp_path / "db"), FAMS)
    try:
        assert db.get("a", b"x") == b"2"
    finally:
        db.close()


@pytest.mark.parametrize("blob", [False, True])
def test_rocks_tables_carry_a_bloom_filter_for_point_reads(tmp_path, blob):
    """Every table has a whole-key filter (what spares a point read, such as a cold file
    read's chunk pointer, the data blocks of the overlapping L0 tables that do not hold its
    key: docs/architecture.md, "Read cache"), in a blob family as well."""
    db = RocksKV(str(tmp_path / "db"), FAMS, blob_families=("b",) if blob else ())
    try:
        b = Batch()
        for i in range(1000):
            b.put("b", i.to_bytes(4, "big") * 8, b"x" * 20)
        db.write(b)
        db.compact()
        props = db._cf["b"].property_value("rocksdb.aggregated-table-properties")
    finally:
        db.close()
    assert "# entries for filter=1000;" in props, props
    assert "filter block size=0;" not in props, props


def test_memory_kv_refuses_use_after_close():
    db = MemoryKV(FAMS)
    db.close()
    with pytest.raises(ValueError, match="closed"):
        db.get("a", b"x")
    with pytest.raises(ValueError, match="closed"):
        put(db, ("a", b"x", b"1"))


# --- SQLiteKV across processes -----------------------------------------------------------------

CHILD = r"""
import json, os, sys
from cowfs.kv.base import Batch, Conflict
from cowfs.kv.sqlite import SQLiteKV
path, who, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = SQLiteKV(path, ("a", "b"))
if who == "hold":  # take the write lock, write, and wait to be killed before committing
    db._conn.execute("BEGIN IMMEDIATE")
    db._conn.execute("INSERT INTO kv VALUES ('a', x'6c6f7374', x'31')")
    print("holding", flush=True)
    sys.stdin.read()
print("ready", flush=True)
sys.stdin.readline()  # all start at once
done = conflicts = 0
while done < rounds:
    old = db.get("a", b"n")
    b = Batch()
    b.put("a", b"n", (int.from_bytes(old, "big") + 1).to_bytes(8, "big"))
    b.put("b", old, who.encode())  # the value this increment replaced, and who made it
    try:
        db.write(b, expect=[("a", b"n", old)])
    except Conflict:
        conflicts += 1
        continue
    done += 1
db.close()
print(json.dumps({"conflicts": conflicts}))
"""


def test_sqlite_cas_is_atomic_across_processes(tmp_path):
    """Four processes increment one key by compare-and-set: no increment is lost and each
    replaced a different value (several daemons changing one reference)."""
    path = str(tmp_path / "refs.sqlite")
    db = SQLiteKV(path, FAMS)
    put(db, ("a", b"n", (0).to_bytes(8, "big")))
    procs, rounds = 4, 150
    ps = [subprocess.Popen([sys.executable, "-c", CHILD, path, f"p{i}", str(rounds)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True) for i in range(procs)]
    assert [p.stdout.readline().strip() for p in ps] == ["ready"] * procs
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0] for p in ps]
    assert [p.returncode for p in ps] == [0] * procs
    conflicts = sum(json.loads(o)["conflicts"] for o in outs)
    assert int.from_bytes(db.get("a", b"n"), "big") == procs * rounds
    replaced = [(int.from_bytes(k, "big"), v) for k, v in db.scan("b", b"")]
    assert [k for k, _v in replaced] == list(range(procs * rounds))
    assert {v for _k, v in replaced} == {f"p{i}".encode() for i in range(procs)}  # all took part
    assert conflicts > 0  # they did race
    db.close()


def test_sqlite_a_writer_killed_holding_the_lock_leaves_nothing_and_blocks_no_one(tmp_path):
    """kill -9 of a process in the middle of a write: its batch is not there, and the next
    writer gets the lock at once (the lock is the kernel's, gone with the process)."""
    path = str(tmp_path / "refs.sqlite")
    db = SQLiteKV(path, FAMS)
    put(db, ("a", b"n", (0).to_bytes(8, "big")))
    p = subprocess.Popen([sys.executable, "-c", CHILD, path, "hold", "0"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    t0 = time.monotonic()
    put(db, ("a", b"n", (1).to_bytes(8, "big")), expect=[("a", b"n", (0).to_bytes(8, "big"))])
    assert time.monotonic() - t0 < 2  # not the 10 s busy timeout
    assert db.get("a", b"lost") is None
    db.close()
    db = SQLiteKV(path, FAMS)
    assert list(db.scan("a", b"")) == [(b"n", (1).to_bytes(8, "big"))]
    db.close()


def test_sqlite_store_is_private_and_refuses_a_foreign_file(tmp_path):
    path = str(tmp_path / "refs.sqlite")
    old = os.umask(0)
    try:
        db = SQLiteKV(path, FAMS)
        put(db, ("a", b"x", b"1"))
        db.sync()
        files = [f for f in os.listdir(tmp_path) if f.startswith("refs.sqlite")]
        assert {"refs.sqlite", "refs.sqlite-wal", "refs.sqlite-shm"} <= set(files)
        assert {f: stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in files} == {f: 0o600 for f in files}
        db.close()
    finally:
        os.umask(old)
    bad = tmp_path / "not-sqlite"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a cowfs reference store"):
        SQLiteKV(str(bad), FAMS)
    db = SQLiteKV(path, FAMS)
    db.close()
    with pytest.raises(ValueError, match="closed"):
        db.get("a", b"x")
    with pytest.raises(ValueError, match="closed"):
        put(db, ("a", b"x", b"2"))


def test_rocks_read_only_beside_the_writer(tmp_path):
    """A frozen member of an OverlayKV: a second handle opened read-only while the writer has the
    database open reads what was written before it opened, and refuses writes."""
    db = RocksKV(str(tmp_path / "db"), FAMS)
    try:
        put(db, ("a", b"x", b"1"), ("b", b"y", b"2"))
        ro = RocksKV(str(tmp_path / "db"), FAMS, read_only=True)
        try:
            assert ro.get("a", b"x") == b"1" and list(ro.scan("b", b"")) == [(b"y", b"2")]
            with pytest.raises(Exception, match="read only"):
                put(ro, ("a", b"x", b"changed"))
            assert db.get("a", b"x") == b"1"
        finally:
            ro.close()
        put(db, ("a", b"x", b"3"))  # the writer is unaffected by the reader's close
        assert db.get("a", b"x") == b"3"
    finally:
        db.close()


CHURN = r"""
import sys
from cowfs.kv.base import Batch
from cowfs.kv.rocks import RocksKV
db = RocksKV(sys.argv[1], ("a", "b"))
print("ready", flush=True)
n = 0
while True:  # a writer that flushes every 40 batches: table and WAL files come and go
    b = Batch()
    for _ in range(50):
        b.put("a", n.to_bytes(8, "big"), b"x" * 100)
        n += 1
    db.write(b)
    if n % 2000 == 0:
        db._cf["a"].flush()
"""


def test_rocks_read_only_open_beside_a_flushing_writer(tmp_path):
    """A read-only open while the writer flushes and compacts in another process (how gc opens
    a member database beside its daemon, and a fork daemon its base) succeeds every time: the
    files a try found gone are deleted by the writer, and the next try reads its new version."""
    path = str(tmp_path / "db")
    writer = subprocess.Popen([sys.executable, "-c", CHURN, path], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        # A number of opens, not a time: at load 5 an open can take 0.4 s (9 in 4 s were seen).
        opened, end = 0, time.monotonic() + 60
        while opened < 20 and time.monotonic() < end:
            ro = RocksKV(path, FAMS, read_only=True)
            try:
                assert ro.get("a", (0).to_bytes(8, "big")) in (None, b"x" * 100)
            finally:
                ro.close()
            opened += 1
        assert writer.poll() is None and opened >= 20
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_rocks_members_share_one_block_cache(tmp_path):
    """A database opened with another's `block_cache` reads into that cache, not a cache of its
    own: the members a daemon opens beside its home stay within one BLOCK_CACHE."""
    db = RocksKV(str(tmp_path / "db"), FAMS)
    other = RocksKV(str(tmp_path / "other"), FAMS)
    try:
        b = Batch()
        for i in range(20000):
            b.put("a", i.to_bytes(4, "big"), os.urandom(100))
        other.write(b)
        other._cf["a"].flush()
        other.close()
        ro = RocksKV(str(tmp_path / "other"), FAMS, read_only=True, cache=db.block_cache)
        try:
            assert ro.block_cache is db.block_cache
            before = db.memory()["block_cache_bytes"]
            assert sum(1 for _ in ro.scan("a", b"")) == 20000
            assert db.memory()["block_cache_bytes"] > before + (1 << 20)
            assert ro.memory()["block_cache_bytes"] == db.memory()["block_cache_bytes"]
        finally:
            ro.close()
    finally:
        db.close()


COMPACT_BLOBS = r"""
import sys
from cowfs.kv.base import Batch
from cowfs.kv.rocks import RocksKV
db = RocksKV(sys.argv[1], ("a", "b"), blob_families=("b",))
for k, v in db.scan("b", b""):  # the same values again: every old blob file becomes garbage
    b = Batch()
    b.put("b", k, v)
    db.write(b)
db.compact()  # blob gc: the live values move to new blob files, the old ones are deleted
db.close()
"""


def _blob_database(path: str, values: dict[bytes, bytes]) -> None:
    """values in the blob family `b`, in four blob files (one per flush)."""
    db = RocksKV(path, FAMS, blob_families=("b",))
    try:
        items = sorted(values.items())
        for i in range(4):
            b = Batch()
            for k, v in items[i::4]:
                b.put("b", k, v)
            db.write(b)
            db._cf["b"].flush()
    finally:
        db.close()
    assert sum(1 for n in os.listdir(path) if n.endswith(".blob")) == 4


@pytest.mark.parametrize("how", ["get", "scan", "overlay", "scan-across-a-refresh"])
def test_a_read_only_member_reads_on_after_its_writer_drops_its_blob_files(tmp_path, how):
    """A read-only open reads a blob file lazily, and its writer's blob gc (in another process)
    deletes the files it has not opened yet ("IO error: No such file or directory: while stat
    a file for size: ...blob"): the member reopens and reads the value again from where the
    writer moved it (a fork reading an inline chunk of its base, pack gc's mark of a member).
    A scan begun before another read's reopen goes on (its open stays usable until it is done)."""
    path = str(tmp_path / "db")
    values = {i.to_bytes(4, "big"): os.urandom(4096) for i in range(2000)}
    _blob_database(path, values)
    ro = RocksKV(path, FAMS, blob_families=("b",), read_only=True)
    try:
        first = min(values)
        assert ro.get("b", first) == values[first]  # one blob file opened before the writer's gc
        begun = ro.scan("b", b"")
        assert next(begun) == (first, values[first])
        subprocess.run([sys.executable, "-c", COMPACT_BLOBS, path], check=True, timeout=120)
        if how == "scan-across-a-refresh":
            assert all(ro.get("b", k) == v for k, v in values.items())  # reopens the member
            assert dict([(first, values[first]), *begun]) == values
        elif how == "get":
            assert all(ro.get("b", k) == v for k, v in values.items())
        elif how == "scan":
            assert dict(ro.scan("b", b"")) == values
        else:
            over = OverlayKV(MemoryKV(FAMS), [ro], through=FAMS)
            assert all(over.get("b", k) == v for k, v in values.items())
            assert dict(over.scan("b", b"")) == values
    finally:
        ro.close()


ROTATED = r"""
import os, sys
from cowfs.kv.base import Batch
from cowfs.kv.rocks import RocksKV

kv = RocksKV(sys.argv[1], ("a", "b"))


def logs():
    return {f: os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1]) if f.endswith(".log")}


def put(i, value):
    b = Batch()
    b.put("a", i.to_bytes(8, "big"), value)
    kv.write(b)
    kv.sync()


kv.rotate_wal(1 << 20)
before = logs()
print(sorted(before.values()), flush=True)
for r in range(3):
    for i in range(300):
        put(i, bytes([r]) * 3000)
    if r == 0:
        print(logs() == before, flush=True)  # 900 KB written in place: no log grew
    kv.rotate_wal()
for i in range(100):
    put(i, b"last" * 750)
os._exit(0)  # no close: the reopen recovers from the logs
"""


def test_rotate_wal_writes_in_place_into_recycled_logs_and_recovery_ignores_their_old_records(tmp_path):
    """RocksKV.rotate_wal: after a fill, the log in use is a recycled one at least that large,
    so synced writes overwrite it without growing it; after logs are reused again and again and
    the process dies without closing, the reopen reads the last value of every key (the old
    records left in a reused log's tail are not replayed)."""
    path = str(tmp_path / "db")
    out = subprocess.run([sys.executable, "-c", ROTATED, path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    sizes, in_place = out.stdout.split("\n")[:2]
    assert min(json.loads(sizes)) >= 1 << 20, sizes  # the two filled logs
    assert in_place == "True"
    kv = RocksKV(path, ("a", "b"))
    try:
        for i in range(300):
            assert kv.get("a", i.to_bytes(8, "big")) == (b"last" * 750 if i < 100 else bytes([2]) * 3000), i
        assert sum(1 for _ in kv.scan("a", b"")) == 300
    finally:
        kv.close()


def test_compact_leaves_the_logs_kept_for_reuse_small(tmp_path):
    """RocksKV.compact (what `cowfs gc` runs): the write-ahead logs RocksDB keeps for reuse keep
    the size of what was last written to them, so a compaction that left them took back none
    of a store's recent writes (bench_branching's delete + gc row: +30% instead of +1%);
    after it the logs hold next to nothing, and every key reads as written."""
    kv = RocksKV(str(tmp_path / "db"), FAMS)
    try:
        for i in range(64):
            b = Batch()
            b.put("a", i.to_bytes(8, "big"), bytes([i]) * (48 << 10))
            kv.write(b)
        kv.sync()
        kv.flush()  # every family flushed: the log is obsolete, and kept for reuse
        assert kv.disk_usage()[1] >= 3 << 20
        kv.compact()
        assert kv.disk_usage()[1] < 256 << 10
        for i in range(64):
            assert kv.get("a", i.to_bytes(8, "big")) == bytes([i]) * (48 << 10)
    finally:
        kv.close()
