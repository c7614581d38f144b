"""A flush that encodes in a thread holds acknowledged data outside `dirty_nodes` for a while;
everything that promises committed data must wait for it, and nothing may forget the node.

In process (no mount): the encode thread is held at a gate, so the race is deterministic.
Found by reading the code after `test_soak_with_rollbacks` once ended with a leaked root
reference (fsck: "reference count 1, expected 0" on a 10-byte file's chunk); before the fix
fsync returned here while the data it covered was still being encoded.
"""
from __future__ import annotations

import os
import stat
import threading

import pyfuse3
import pytest
import trio

from cowfs.core.filesystem import Filesystem
from cowfs.fuse.ops import Operations
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_INODES, ino_key
from cowfs.store import ROOT_INO, Store, init_store


class Held:
    """A filesystem whose next threaded encode waits at a gate."""

    def __init__(self, path: str) -> None:
        init_store(path)
        self.store = Store(path, cache_l1=1 << 20, cache_l2=1 << 20)
        self.fs = Filesystem(self.store, "main")
        self.gate = threading.Event()
        self.entered = threading.Event()
        encode_all = self.fs.flusher.encode_all

        def held(*args):
            self.entered.set()
            self.gate.wait(30)
            return encode_all(*args)

        self.fs.flusher.encode_all = held  # type: ignore[method-assign]

    async def dirty_file(self, name: bytes, size: int = 1 << 20):
        root = self.fs.node(self.fs.primary, ROOT_INO)
        node = await self.fs.make(root, name, stat.S_IFREG | 0o644, 0, 0)
        await self.fs.write(node, 0, os.urandom(size))  # over THREAD_FLUSH_BYTES: encoded in a thread
        return node

    async def flush_started(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.fs.flush)
        with trio.fail_after(10):
            while not self.entered.is_set():
                await trio.sleep(0.01)

    def committed(self, node) -> Attrs:
        """node's record as stored."""
        found = self.store.meta.get(CF_INODES, ino_key(node.ino), self.fs.primary.lv)
        return Attrs.unpack(found[1])


async def test_fsync_waits_for_a_flush_in_progress(tmp_path):
    h = Held(str(tmp_path / "s"))
    try:
        node = await h.dirty_file(b"f")
        synced = trio.Event()

        async def fsync() -> None:
            await h.fs.fsync()
            synced.set()

        async with trio.open_nursery() as n:
            await h.flush_started(n)
            n.start_soon(fsync)
            await trio.sleep(0.3)
            assert not synced.is_set(), "fsync returned while the flush holding its data was still encoding"
            assert h.committed(node).root is None
            h.gate.set()
        assert synced.is_set() and h.committed(node).root is not None
    finally:
        h.gate.set()
        h.store.close()


async def test_a_flushing_node_is_not_forgotten(tmp_path):
    """A node the kernel forgets while its data is being flushed stays the inode's one Node
    until the flush has committed; then it goes."""
    h = Held(str(tmp_path / "s"))
    try:
        node = await h.dirty_file(b"f")
        view = h.fs.primary
        async with trio.open_nursery() as n:
            await h.flush_started(n)
            assert node.lookups <= 0 and node.opens <= 0
            h.fs.forget(node, 0)
            assert view.nodes.get(node.ino) is node, "evicted while its data was flushing"
            h.gate.set()
        assert node.ino not in view.nodes, "not evicted once the flush was done"
        again = h.fs.node(view, node.ino)
        assert again.attrs.root == h.committed(node).root is not None
    finally:
        h.gate.set()
        h.store.close()


async def test_attributes_deferred_during_a_flush_go_with_the_later_data(tmp_path):
    """A SETATTR (times, chmod, chown) of a file with dirty data is kept in memory until
    that data's flush.  If it arrives while an earlier flush of the file is encoding, it
    follows the newer writes: that earlier commit must not carry it (the store would hold an
    operation without the writes acknowledged before it)."""
    h = Held(str(tmp_path / "s"))
    try:
        node = await h.dirty_file(b"f")

        seen: list[tuple[int, int]] = []  # (committed size, mtime) after each commit
        commit = h.fs.txn.commit

        def watched(m) -> None:
            commit(m)
            a = h.committed(node)
            seen.append((a.size, a.mtime_ns, stat.S_IMODE(a.mode), a.uid))

        h.fs.txn.commit = watched  # type: ignore[method-assign]
        before = node.attrs.mtime_ns
        late = before + 123_456_789
        commits = h.store.write_seq
        async with trio.open_nursery() as n:
            await h.flush_started(n)
            await h.fs.write(node, 1 << 20, b"later data")  # dirty again, behind the flush
            await h.fs.setattr(node, mtime_ns=late)  # deferred: node has dirty data
            await h.fs.setattr(node, mode=0o600, uid=1234)  # deferred too (tar: chown, chmod)
            assert node.attrs.mtime_ns == late and stat.S_IMODE(node.attrs.mode) == 0o600
            h.gate.set()
        # The flush commits the first megabyte, then (still dirty) the later data: the
        # SETATTRs have no commit of their own.
        assert seen == [(1 << 20, before, 0o644, 0), ((1 << 20) + 10, late, 0o600, 1234)], seen
        assert h.store.write_seq - commits == 2
        a = h.committed(node)
        assert (a.mtime_ns, stat.S_IMODE(a.mode), a.uid) == (late, 0o600, 1234)
    finally:
        h.gate.set()
        h.store.close()


async def test_deferred_attributes_survive_a_failed_flush(tmp_path):
    """A chmod deferred with a file's dirty data was acknowledged: a flush whose commit fails
    (a full disk) puts the data back, and must keep the chmod too, not revert it to the
    stored record."""
    h = Held(str(tmp_path / "s"))
    try:
        node = await h.dirty_file(b"f", size=4)  # small: encoded on the loop, not held
        await h.fs.setattr(node, mode=0o600)  # deferred
        write = h.store.kv.write

        def full(batch) -> None:
            raise OSError("IO error: No space left on device")

        h.store.kv.write = full  # type: ignore[method-assign]
        with pytest.raises(Exception):
            await h.fs.flush()
        h.store.kv.write = write  # type: ignore[method-assign]
        assert stat.S_IMODE(node.attrs.mode) == 0o600 and node in h.fs.flusher.dirty_nodes
        await h.fs.flush()
        assert stat.S_IMODE(h.committed(node).mode) == 0o600
    finally:
        h.gate.set()
        h.store.close()


async def test_release_whose_commit_fails_lets_the_handle_go_and_keeps_the_data(tmp_path):
    """The release after a close commits the file's data; if that commit fails (a full disk),
    the data stays dirty for a later commit and the handle is let go all the same."""
    h = Held(str(tmp_path / "s"))
    try:
        ops = Operations(h.fs)
        node = await h.dirty_file(b"f", size=4)
        fh = ops._opened(node, True).fh
        assert node.opens == 1
        write = h.store.kv.write

        def full(batch) -> None:
            raise OSError("IO error: No space left on device")

        h.store.kv.write = full  # type: ignore[method-assign]
        with pytest.raises(pyfuse3.FUSEError):
            await ops.release(fh)
        h.store.kv.write = write  # type: ignore[method-assign]
        assert node.opens == 0 and node in h.fs.flusher.dirty_nodes
        await h.fs.flush()
        assert h.committed(node).size == 4
    finally:
        h.gate.set()
        h.store.close()
