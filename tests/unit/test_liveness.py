"""cowfs.chunks.liveness on a real reference store (SQLite file shared by processes): the
rules that decide when a condemned pack may go, and the compare-and-set that keeps
concurrent gc runs and writers from losing each other's changes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cowfs.chunks import codec
from cowfs.chunks.liveness import CF_WRITER, Condemned, Liveness, REF_FAMILIES, WriterRecord, mark
from cowfs.chunks.families import CF_OBJECTS
from cowfs.kv.base import Batch
from cowfs.kv.memory import MemoryKV
from cowfs.kv.sqlite import SQLiteKV


def _open(path) -> Liveness:
    return Liveness(SQLiteKV(str(path), REF_FAMILIES))


def test_a_round_is_due_once_every_writer_alive_at_it_acknowledged_or_left(tmp_path):
    me = _open(tmp_path / "refs.sqlite")
    other = _open(tmp_path / "refs.sqlite")
    me.register("db")
    other.register("")
    assert me.condemn([1, 2]) == (2, 0)
    c = me.condemned()
    assert c.gen == 1 and set(c.rounds[1][1]) == {me.me, other.me} and c.packs == {1: 1, 2: 1}
    assert me.due(c) == set(), "the other writer has not acknowledged"
    assert me.writers()[me.me].acked == 1, "the condemning process acknowledged its own round"
    other.ack(1)
    assert me.due(me.condemned()) == {1, 2}
    # A later round waits for the other writer again; its leaving lets it go.
    me.condemn([3])
    c = me.condemned()
    assert me.due(c) == {1, 2}
    other.unregister()
    assert me.due(c) == {1, 2, 3}
    # Pardon and forget; empty rounds go with their last pack.
    me.condemn([], marked=[1])
    me.forget([2, 3])
    c = me.condemned()
    assert c.packs == {} and c.rounds == {}


def test_a_record_whose_process_is_gone_is_stale_even_if_its_pid_is_reused(tmp_path):
    lv = _open(tmp_path / "refs.sqlite")
    lv.register("db")
    mine = lv.writers()[lv.me]
    b = Batch()  # this very pid, started at another time: a reused pid
    b.put(CF_WRITER, b"reused", WriterRecord(os.getpid(), mine.start + 1, mine.boot, "", 0.0).pack())
    b.put(CF_WRITER, b"rebooted", WriterRecord(os.getpid(), mine.start, "another-boot", "", 0.0).pack())
    lv.refs.write(b)
    assert set(lv.alive()) == {lv.me}
    lv.condemn([7])
    assert lv.condemned().rounds[1][1] == [lv.me]
    assert lv.prune() == 2 and set(lv.writers()) == {lv.me}


CONDEMN_MANY = """
import sys
from cowfs.chunks.liveness import Liveness, REF_FAMILIES
from cowfs.kv.sqlite import SQLiteKV
lv = Liveness(SQLiteKV(sys.argv[1], REF_FAMILIES))
lv.register("")
for i in range(int(sys.argv[2]), int(sys.argv[2]) + 40):
    lv.condemn([i])
"""


def test_concurrent_gc_runs_lose_no_condemnation(tmp_path):
    """Three processes condemn 40 packs each, one round per pack, at once."""
    path = str(tmp_path / "refs.sqlite")
    procs = [subprocess.Popen([sys.executable, "-c", CONDEMN_MANY, path, str(k * 1000)]) for k in range(3)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    c = _open(path).condemned()
    assert set(c.packs) == {k * 1000 + i for k in range(3) for i in range(40)}
    assert c.gen == 120 and set(c.packs.values()) == set(range(1, 121))


def test_a_damaged_list_is_an_error_that_names_it():
    with pytest.raises(codec.CorruptObject, match="gc/condemned is damaged"):
        Condemned.unpack(b"{not json")
    with pytest.raises(codec.CorruptObject, match="which it does not record"):
        Condemned.unpack(b'{"gen": 1, "rounds": {}, "packs": {"0000000000000001": 1}}')


def test_members_are_plain_names_and_paths_inside_the_store(tmp_path):
    lv = _open(tmp_path / "refs.sqlite")
    lv.add_member("t", "heads/t/db")
    assert lv.members() == {"t": "heads/t/db"}
    for name, db in (("a/b", "x"), ("u", "/abs"), ("v", "../out"), ("", "x")):
        with pytest.raises(ValueError):
            lv.add_member(name, db)


def test_mark_sums_the_pointers_of_every_database():
    a, b = MemoryKV([CF_OBJECTS]), MemoryKV([CF_OBJECTS])
    for kv, h, pack, n in ((a, b"1" * 32, 5, 100), (b, b"2" * 32, 5, 50), (b, b"3" * 32, 6, 10)):
        batch = Batch()
        batch.put(CF_OBJECTS, h, codec.encode_packed(codec.KIND_RAW, pack, 0, n, n))
        kv.write(batch)
    assert mark([a, b]) == {5: 150, 6: 10}


def test_a_store_whose_writer_record_cannot_be_written_leaves_nothing_open(tmp_path, monkeypatch):
    """A Store open that fails at the writer's registration is a StoreError that closes what it
    opened, the reference store included: no handle of refs.sqlite stays in this process."""
    from cowfs.errors import StoreError
    from cowfs.store import Store, init_store

    store = str(tmp_path / "s")
    init_store(store)

    def refuse(self, db: str) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(Liveness, "register", refuse)
    with pytest.raises(StoreError, match="cannot open the reference store refs.sqlite: disk full"):
        Store(store)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in held if "refs.sqlite" in p], held
    monkeypatch.undo()
    Store(store).close()  # the database's lock was released too


def test_a_gc_acknowledges_only_its_own_round_and_never_one_it_still_owes(tmp_path):
    """The condemning process acknowledges the round it makes (it listed under the lock a flush
    holds from pack put to commit), but an acknowledgement is a high-water mark: with an
    earlier round of another process still owed, acknowledging its own would acknowledge that
    one too, which only the lock-and-sync of its acknowledgement task may do
    (background/gc.py:acknowledge_rounds).  Pardons and forgets acknowledge nothing."""
    daemon = _open(tmp_path / "refs.sqlite")
    keeper = _open(tmp_path / "refs.sqlite")  # a gc in another process
    daemon.register("db")
    keeper.register("")
    keeper.condemn([5])  # round 1: the daemon may have a flush between its put into 5 and its commit
    keeper.condemn([], marked=[9])  # a pardon of nothing condemned: no round, no acknowledgement
    daemon.forget([77])  # forgets no pack of round 1: still owed
    assert daemon.writers()[daemon.me].acked == 0 and daemon.owed() == 1
    daemon.condemn([6])  # round 2, its own
    c = daemon.condemned()
    assert daemon.writers()[daemon.me].acked == 0, "round 1 acknowledged with the daemon's own round"
    assert daemon.due(c) == set() and daemon.owed() == 2
    daemon.ack(2)  # what acknowledge_rounds does after the lock and a sync
    assert daemon.due(daemon.condemned()) == {5}, "round 2 waits for the keeper too"
    daemon.condemn([7])  # nothing owed: its own round acknowledged at once
    assert daemon.writers()[daemon.me].acked == 3 and daemon.owed() is None


def test_a_reference_store_that_fails_to_close_still_lets_the_database_close(tmp_path, monkeypatch):
    """Store.close closes the database (its lock released: the store opens again) even when the
    reference store's close fails; the failure is still raised."""
    from cowfs.store import Store, init_store

    store = str(tmp_path / "s")
    init_store(store)
    st = Store(store)
    real = SQLiteKV.close

    def failing(self) -> None:
        real(self)
        raise OSError("refs close failed")

    monkeypatch.setattr(SQLiteKV, "close", failing)
    with pytest.raises(OSError, match="refs close failed"):
        st.close()
    monkeypatch.undo()
    Store(store).close()
