"""`branch --own-daemon` in process (cowfs.commands.branching, no mount): the new branch's home
is made with one open and one sync of its database, in worker threads: made before the
branch's mutation, outside the filesystem lock (other mutations and flushes do not wait for
it), and sealed with the head's usage record inside the mutation, before its compare-and-set
(other mutations wait for that alone); a home that cannot be made or sealed leaves the
catalog and the branch's view as they were, and no home behind."""
from __future__ import annotations

import os
import stat
import threading

import pytest
import trio

from cowfs import homes
from cowfs.chunks.families import CF_OBJECTS
from cowfs.commands.authz import Caller
from cowfs.commands.branching import Branching
from cowfs.core.filesystem import Filesystem
from cowfs.errors import FSError
from cowfs.fsck import Fsck
from cowfs.kv.rocks import RocksKV
from cowfs.meta.layers import CF_META, usage_key
from cowfs.store import FAMILIES, ROOT_INO
from cowfs.storedir import home_db

ROOT = Caller(0, 0)


async def _file(fs: Filesystem, name: bytes, data: bytes):
    node = await fs.make(fs.node(fs.primary, ROOT_INO), name, stat.S_IFREG | 0o644, 0, 0)
    await fs.write(node, 0, data)
    return node


async def _fsck_clean(fs: Filesystem) -> None:
    """Everything written committed, then fsck of the store and of its homes: clean."""
    await fs.flush()
    report = Fsck(fs.store).run()
    assert report.clean, report.problems


async def test_a_branch_home_is_opened_and_synced_once_in_a_worker_thread(fs, monkeypatch):
    await _file(fs, b"f", b"x" * 5000)
    calls: list[tuple[str, str]] = []  # (what, thread) of the home databases
    init, sync = RocksKV.__init__, RocksKV.sync

    def counted_init(self, path, *args, **kw):
        if f"{os.sep}homes{os.sep}" in path:
            calls.append(("open", threading.current_thread().name))
        init(self, path, *args, **kw)

    def counted_sync(self):
        if f"{os.sep}homes{os.sep}" in self.path:
            calls.append(("sync", threading.current_thread().name))
        sync(self)

    monkeypatch.setattr(RocksKV, "__init__", counted_init)
    monkeypatch.setattr(RocksKV, "sync", counted_sync)
    reply = await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    loop = threading.current_thread().name
    assert [what for what, _ in calls] == ["open", "sync"], calls
    assert all(thread != loop for _, thread in calls), calls
    monkeypatch.undo()
    cat = fs.store.catalog
    fork = cat.branches["fork"]
    assert fork.home == reply["home"] and cat.member(fork.head) == reply["home"]
    db = RocksKV(os.path.join(fs.store.path, home_db(reply["home"])), FAMILIES, blob_families=(CF_OBJECTS,),
                 read_only=True)
    try:
        assert db.get(CF_META, usage_key(fork.head)) is not None, "the head's usage, in its home"
    finally:
        db.close()
    await _fsck_clean(fs)


def _hold(entered: threading.Event, gate: threading.Event, fn):
    """fn, made to signal entered and then wait for gate (at most 30 s) in its thread."""
    def held(*args, **kw):
        entered.set()
        gate.wait(30)
        return fn(*args, **kw)
    return held


async def _entered(event: threading.Event) -> None:
    with trio.fail_after(10):
        while not event.is_set():
            await trio.sleep(0.01)


async def test_while_the_home_is_made_other_mutations_and_flushes_do_not_wait(fs, monkeypatch):
    """The home's making (its database's open here, held as long as the test likes) is no
    part of the branch's mutation: a mutation and a flush meanwhile take the lock at once.
    (Made inside the mutation, as in 858861d, they waited for all of it.)"""
    node = await _file(fs, b"f", b"x" * 5000)
    gate, entered = threading.Event(), threading.Event()
    init = RocksKV.__init__

    def opened(self, path, *args, **kw):
        if f"{os.sep}homes{os.sep}" in path:
            entered.set()
            gate.wait(30)
        init(self, path, *args, **kw)

    monkeypatch.setattr(RocksKV, "__init__", opened)
    waits: list[float] = []
    async with trio.open_nursery() as n:
        n.start_soon(Branching(fs).branch, fs.primary, "fork", None, ROOT, True)
        try:
            await _entered(entered)
            for i in range(5):
                await fs.write(node, 0, b"%d" % i * 100)  # dirty: the mutation flushes it first
                t = trio.current_time()
                with trio.move_on_after(5) as late:
                    await _file(fs, b"g%d" % i, b"made while the home was")
                    await fs.write(node, 0, b"y" * 100)
                    await fs.flush()
                waits.append(trio.current_time() - t)
                if late.cancelled_caught:
                    break
        finally:
            gate.set()
    assert "fork" in fs.store.catalog.branches
    assert max(waits) < 1.0, f"a mutation and a flush waited {max(waits):.3f} s for the home's making"
    await _fsck_clean(fs)


async def test_while_the_home_is_sealed_other_tasks_run_and_mutations_wait(fs, monkeypatch):
    """The head's usage record depends on the mutation (the head's id, the usage frozen):
    written and synced in the home inside it, where no other mutation runs."""
    node = await _file(fs, b"f", b"x" * 5000)
    gate, entered = threading.Event(), threading.Event()
    monkeypatch.setattr(homes.NewHome, "seal", _hold(entered, gate, homes.NewHome.seal))
    made = trio.Event()

    async def mutation() -> None:
        await _file(fs, b"g", b"made while the home was sealed")
        made.set()

    async with trio.open_nursery() as n:
        n.start_soon(Branching(fs).branch, fs.primary, "fork", None, ROOT, True)
        try:
            await _entered(entered)
            await fs.write(node, 0, b"y" * 100)  # acknowledged meanwhile: dirty, for a later flush
            n.start_soon(mutation)
            await trio.sleep(0.3)  # the loop runs: this task and the writes
            assert not made.is_set(), "a mutation ran between the branch's changes and its commit"
        finally:
            gate.set()
    assert made.is_set() and "fork" in fs.store.catalog.branches
    await _fsck_clean(fs)


def _no_home(fs: Filesystem) -> None:
    """No home left behind, none a liveness member."""
    assert homes.listed(fs.store.path) == []
    assert not fs.store.liveness.members()


async def test_a_home_that_cannot_be_made_or_sealed_leaves_the_catalog_and_the_view_as_they_were(fs, monkeypatch):
    await _file(fs, b"f", b"x" * 5000)
    await fs.flush()
    cat = fs.store.catalog
    head = cat.branches["main"].head

    def fails(*args):
        raise OSError(28, "No space left on device")

    for where, what in ((homes, "make"), (homes.NewHome, "seal")):
        monkeypatch.setattr(where, what, fails)
        with pytest.raises(OSError):
            await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
        assert "fork" not in cat.branches and cat.branches["main"].head == head
        assert fs.primary.lv.top == head
        _no_home(fs)
        monkeypatch.undo()
    reply = await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    assert cat.branches["fork"].home == reply["home"]
    with pytest.raises(FSError):  # the name is taken now: refused before a home is made
        await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    assert homes.listed(fs.store.path) == [reply["home"]]
    await _fsck_clean(fs)


async def test_a_name_taken_while_the_home_was_made_leaves_no_home(fs, monkeypatch):
    """The name is checked again in the mutation: taken meanwhile (by a plain branch here),
    the branch is refused and the home it made is removed."""
    await _file(fs, b"f", b"x" * 5000)
    gate, entered = threading.Event(), threading.Event()
    monkeypatch.setattr(homes, "make", _hold(entered, gate, homes.make))
    branching = Branching(fs)

    async def own() -> None:
        with pytest.raises(FSError):
            await branching.branch(fs.primary, "fork", None, ROOT, own_daemon=True)

    async with trio.open_nursery() as n:
        n.start_soon(own)
        try:
            await _entered(entered)
            await branching.branch(fs.primary, "fork", None, ROOT)
        finally:
            gate.set()
    assert fs.store.catalog.branches["fork"].home is None
    _no_home(fs)
    await _fsck_clean(fs)
