"""Transactions: a Mutation gathers one atomic change (a batch, its reference deltas, the
nodes it saved); `Transactions` owns the filesystem lock, runs a mutation to its commit and
takes memory back to what is stored when a commit fails.

Concurrency (docs/architecture.md, "Concurrency invariants"): a mutation first commits every
acknowledged write (all dirty data), then validates, changes memory and builds its batch
with no checkpoint, and commits synchronously, so committed state is always a prefix of the
acknowledged operations.  When the lock is free and nothing is dirty it needs no lock at all
(`Scope`): it runs from its start to its commit without a checkpoint.
"""
from __future__ import annotations

import errno
import logging
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from cowfs.chunks.refs import RefTxn
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.kv.base import Batch, Conflict
from cowfs.kv.split import Unpublished
from cowfs.meta import links
from cowfs.meta.records import Attrs, dirent
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, ino_key, name_key

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

CLOCK_REALTIME_COARSE = 5  # Linux; not exported by Python's time module


def now_ns() -> int:
    """The kernel's file-time clock: FUSE stamps written files with the coarse realtime clock
    (in writeback mode the kernel owns their mtime), so ours must not run ahead of it, or a
    later write could carry an earlier time than an earlier chmod."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


class Mutation:
    """One atomic change: a batch, its reference deltas and the nodes it saved."""

    __slots__ = ("fs", "batch", "txn", "saved", "views", "now", "charge")

    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self.batch = Batch()
        self.txn = RefTxn()
        self.saved: list[Node] = []
        self.views: set[View] = set()  # views whose usage changed: their head's usage is rewritten
        self.now = now_ns()
        # Check the byte quota at commit against what the new trees allocate (fallocate:
        # known only once the reference changes are applied).
        self.charge = False

    def account(self, node: Node) -> None:
        """Count node's in-memory size (its dirty data included) in its view's usage."""
        self._account(node, not node.deleted)

    def _account(self, node: Node, present: bool) -> None:
        self.fs.usage.account(node, present)
        self.views.add(node.view)

    def save(self, node: Node) -> None:
        """Write node's current attributes as its version in the view's head layer."""
        self.fs.usage.allocated(node)  # what is committed for it now: the commit settles the change
        head = node.view.lv.top
        if node.stored_layer == head and node.stored_root is not None:
            self.txn.decref(node.stored_root.hash)
        if node.deleted:  # its data may be freed already: never resurrect the record
            raise FSError(errno.ENOENT)
        if node.attrs.root is not None:
            self.txn.incref(node.attrs.root.hash)
        self.fs.store.meta.put(self.batch, CF_INODES, ino_key(node.ino), head, node.attrs.pack())
        node.stored_layer = head
        node.stored_root = node.attrs.root
        self.saved.append(node)
        self._account(node, True)

    def drop(self, node: Node) -> None:
        """Delete node's record, xattrs and its reference to the data."""
        fs = self.fs
        fs.usage.allocated(node)
        lv = node.view.lv
        if node.stored_layer == lv.top and node.stored_root is not None:
            self.txn.decref(node.stored_root.hash)
        fs.store.meta.delete(self.batch, CF_INODES, ino_key(node.ino), lv)
        for name, _ in list(fs.store.meta.scan_names(CF_XATTRS, node.ino, lv)):
            fs.store.meta.delete(self.batch, CF_XATTRS, name_key(node.ino, name), lv)
        node.stored_layer = None
        node.stored_root = None
        node.deleted = True
        self.saved.append(node)
        self._account(node, False)

    def link(self, parent: Node, name: bytes, child: Node) -> None:
        self.fs.store.meta.put(self.batch, CF_DIRENTS, name_key(parent.ino, name), parent.view.lv.top,
                               dirent(child.ino, child.attrs.mode))
        child.attrs.parent = parent.ino
        child.attrs.name = name

    def unlink(self, parent: Node, name: bytes) -> None:
        self.fs.store.meta.delete(self.batch, CF_DIRENTS, name_key(parent.ino, name), parent.view.lv)

    def index_name(self, node: Node, parent: int, name: bytes) -> None:
        """Record (parent, name) as a name of hard-linked node (cowfs.meta.links)."""
        self.fs.store.meta.put(self.batch, CF_LINKS, links.key(node.ino, parent, name), node.view.lv.top,
                               links.PRESENT)

    def unindex_name(self, node: Node, parent: int, name: bytes) -> None:
        self.fs.store.meta.delete(self.batch, CF_LINKS, links.key(node.ino, parent, name), node.view.lv)

    def touch(self, *nodes: Node, mtime: bool = True) -> None:
        for n in nodes:
            n.attrs.ctime_ns = self.now
            if mtime:
                n.attrs.mtime_ns = self.now


class Scope:
    """The context of one mutation.

    When the lock is free and nothing is dirty, the mutation runs from here to its commit
    without a single checkpoint, so it needs no lock (and skips two scheduler round trips);
    otherwise, or when its body awaits (`awaits`), it takes the lock and first commits the
    dirty data acknowledged before it.
    """

    __slots__ = ("fs", "view", "m", "locked", "fenced_ok", "awaits")

    def __init__(self, fs: "Filesystem", view: View, fenced_ok: bool, awaits: bool) -> None:
        self.fs = fs
        self.view = view
        self.locked = False
        self.fenced_ok = fenced_ok
        self.awaits = awaits

    async def __aenter__(self) -> Mutation:
        fs = self.fs
        if not self.view.writable:
            raise FSError(errno.EROFS)
        if not self.fenced_ok:
            fs.fences.check(self.view)
        txn = fs.txn
        if self.awaits or txn.lock.locked() or fs.flusher.dirty_nodes:
            await txn.acquire_lock()
            self.locked = True
            try:
                await fs.flusher.flush_locked()
            except BaseException:
                txn.lock.release()
                raise
        self.m = Mutation(fs)
        return self.m

    async def __aexit__(self, etype: object, exc: object, tb: object) -> bool:
        try:
            if etype is None:
                self.fs.txn.commit(self.m)
        finally:
            if self.locked:
                self.fs.txn.lock.release()
        return False


class Transactions:
    """The filesystem lock and the commit of mutations.  `lock` is held by every mutation
    that must flush first and by every flush, from the flush of dirty data through
    validation to the commit; `maintenance` by garbage collection and the sharer's passes,
    so that they never interleave."""

    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self.lock = trio.Lock()
        self.maintenance = trio.Lock()

    async def acquire_lock(self) -> None:
        """Take `lock`; a free one without a checkpoint (trio's acquire always yields), so a
        small flush or mutation runs to its commit without a pass of the scheduler."""
        if self.lock.locked():
            await self.lock.acquire()
        else:
            self.lock.acquire_nowait()

    def mutate(self, view: View, fenced_ok: bool = False, awaits: bool = False) -> Scope:
        """`async with fs.mutate(view) as m:` validate, change, and commit on exit.  A branch
        made read-only by its fence (cowfs.core.fence) refuses it with EROFS unless fenced_ok:
        work that leaves the branch's tree as it is (orphans, snapshots, the sharer).  awaits:
        the body waits (for a worker thread) between its changes and its commit, so the scope
        always holds the lock: no other mutation or flush runs in between (data written
        meanwhile stays dirty for the next flush, as during a flush's threaded work); a body
        that fails after changing memory calls `abandon`."""
        return Scope(self.fs, view, fenced_ok, awaits)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock with every acknowledged write committed: for work that reads the
        store as committed and must not race a commit (garbage collection, the sharer)."""
        await self.acquire_lock()
        try:
            await self.fs.flusher.flush_locked()
            yield
        finally:
            self.lock.release()

    def commit(self, m: Mutation) -> None:
        """Write m's batch (its reference changes applied, its views' usage records added);
        on failure, memory goes back to what is stored and the error is an FSError."""
        fs = self.fs
        settled: list[tuple[Node, int]] = []
        try:
            fs.store.commit(m.batch, m.txn, lambda: fs.usage.settle(m, settled))
        except FSError:  # refused by settle (a quota): nothing was written
            self.revert(m)
            raise
        except Unpublished as exc:
            self.unpublished(m, exc)
        except Exception as exc:
            error = str(exc)
        else:
            fs.usage.committed(settled)
            return
        # Outside the except block: the traceback (and the iterators its frames hold, which
        # keep the database open) is gone before the store reopens.
        self.revert(m)
        raise self.failed("commit", error)

    def unpublished(self, m: Mutation, exc: Unpublished) -> None:
        """The catalog change of m was refused by the reference store (its home records are
        written, in layers nobody names: garbage for gc): the catalog and the branches' views
        go back to what the reference store holds, the touched nodes to what they read there.
        EEXIST when another process changed a record first (a name taken meanwhile), else EIO."""
        fs = self.fs
        self.abandon(m)
        log.error("catalog change not published: %s", exc)
        fs.store.stray = True  # the next gc pass removes what it wrote
        fs.schedule_gc()
        if isinstance(exc.cause, Conflict):
            key = exc.cause.key.decode(errors="replace")
            raise FSError(errno.EEXIST, f"{key} was changed by another process meanwhile (nothing was done)")
        raise FSError(errno.EIO, str(exc))

    def abandon(self, m: Mutation) -> None:
        """m is not committed: the catalog and the branches' views go back to what the
        reference store holds, the touched nodes to what is stored."""
        fs = self.fs
        cat = fs.store.catalog
        cat.reload()
        for view in fs.views.all():
            b = cat.branches.get(view.name)
            if view.kind == "branch" and b is not None and view.lv.top != b.head:
                view.lv = cat.layer_view(b.head)
        fs.store.meta.forget_views()
        self.revert(m)

    def failed(self, what: str, error: str) -> FSError:
        """A write of the store failed with error (called outside the except block, as
        above): the store reopened, and the error a request gets (ENOSPC for a full disk)."""
        log.error("%s failed: %s", what, error)
        self.fs.store.recover()
        return FSError(errno.ENOSPC if "space" in error.lower() else errno.EIO, error)

    def revert(self, m: Mutation) -> None:
        """Memory ran ahead of a commit that failed: return the touched nodes to what is stored.

        Node objects stay the same (open handles point at them); their attributes and tree
        roots are reloaded, except that a node's size still covers its dirty buffers (the
        caller puts unflushed data back into them).
        """
        fs = self.fs
        for node in {id(n): n for n in m.saved}.values():
            found = fs.store.meta.get(CF_INODES, ino_key(node.ino), node.view.lv)
            if found is None or not found[1]:
                node.deleted = True  # created by the failed mutation: it never existed
                node.stored_layer = node.stored_root = None
                node.counted, node.counted_bytes = False, 0
                fs.usage.forget_alloc(node)
                fs.nodes.remove(node)
                continue
            size = node.attrs.size
            node.attrs = Attrs.unpack(found[1])
            node.stored_layer, node.stored_root = found[0], node.attrs.root
            node.deleted = False
            # What the reloaded usage counts for it (a flush adds its buffers' growth later).
            node.counted, node.counted_bytes = True, node.attrs.size if node.attrs.is_reg else 0
            if node.dirty or node.flushing:
                node.attrs.size = max(node.attrs.size, size)
            fs.nodes.keep(node)
        for view in m.views:
            if view.kind == "branch":
                fs.usage.load(view)
