"""The KV interface on every backend (RocksKV in a temporary directory, MemoryKV, EtcdKV on a
real etcd): ordered scans, atomic multi-family batches, and the compare-and-set of
`write(batch, expect)`."""
from __future__ import annotations

import sys
import threading

import pytest

from cowfs.kv.base import KV, Batch, Conflict, LocalEngine
from cowfs.kv.memory import MemoryKV
from cowfs.kv.rocks import RocksKV

FAMS = ("a", "b")


@pytest.fixture(params=["memory", "rocks", "etcd"])
def kv(request, tmp_path):
    if request.param == "memory":
        db = MemoryKV(FAMS)
    elif request.param == "rocks":
        db = RocksKV(str(tmp_path / "db"), FAMS)
    else:
        from cowfs.kv.etcd import EtcdKV
        prefix = request.getfixturevalue("engine_prefix").encode() + b"/"
        db = EtcdKV(request.getfixturevalue("etcd").endpoint, FAMS, prefix, page_size=2)
    yield db
    if request.param == "rocks" or not db.closed:
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


def test_memory_kv_refuses_use_after_close():
    db = MemoryKV(FAMS)
    db.close()
    with pytest.raises(ValueError, match="closed"):
        db.get("a", b"x")
    with pytest.raises(ValueError, match="closed"):
        put(db, ("a", b"x", b"1"))
