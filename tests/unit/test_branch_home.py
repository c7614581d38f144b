"""`branch --own-daemon` in process (cowfs.commands.branching, no mount): the new branch's home
is made in one open and one sync of its database, in a worker thread, inside the branch's
mutation and before its compare-and-set; the mutation holds the filesystem lock meanwhile, so
other tasks run and other mutations wait; a home that cannot be made leaves the catalog and
the branch's view as they were."""
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
from cowfs.store import FAMILIES, ROOT_INO, Store, init_store
from cowfs.storedir import home_db

ROOT = Caller(0, 0)


@pytest.fixture
def fs(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    store = Store(path, cache_l1=1 << 20, cache_l2=1 << 20)
    yield Filesystem(store, "main")
    store.close()


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


async def test_while_the_home_is_made_other_tasks_run_and_mutations_wait(fs, monkeypatch):
    node = await _file(fs, b"f", b"x" * 5000)
    gate, entered = threading.Event(), threading.Event()
    create = homes.create_home

    def held(*args):
        entered.set()
        gate.wait(30)
        return create(*args)

    monkeypatch.setattr(homes, "create_home", held)
    made = trio.Event()

    async def mutation() -> None:
        await _file(fs, b"g", b"made while the home was")
        made.set()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(Branching(fs).branch, fs.primary, "fork", None, ROOT, True)
            with trio.fail_after(10):
                while not entered.is_set():
                    await trio.sleep(0.01)
            await fs.write(node, 0, b"y" * 100)  # acknowledged meanwhile: dirty, for a later flush
            n.start_soon(mutation)
            await trio.sleep(0.3)  # the loop runs: this task and the writes
            assert not made.is_set(), "a mutation ran between the branch's changes and its commit"
            gate.set()
        assert made.is_set() and "fork" in fs.store.catalog.branches
    finally:
        gate.set()
    await _fsck_clean(fs)


async def test_a_home_that_cannot_be_made_leaves_the_catalog_and_the_view_as_they_were(fs, monkeypatch):
    await _file(fs, b"f", b"x" * 5000)
    await fs.flush()
    cat = fs.store.catalog
    head = cat.branches["main"].head

    def fails(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(homes, "create_home", fails)
    with pytest.raises(OSError):
        await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    assert "fork" not in cat.branches and cat.branches["main"].head == head
    assert fs.primary.lv.top == head
    monkeypatch.undo()
    reply = await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    assert cat.branches["fork"].home == reply["home"]
    with pytest.raises(FSError):  # the name is taken now
        await Branching(fs).branch(fs.primary, "fork", None, ROOT, own_daemon=True)
    await _fsck_clean(fs)
