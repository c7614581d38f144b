"""The filesystem core the FUSE layer and the commands call: a thin facade over the modules
that own its state, one owner per piece of state.

    txn         Transactions: the lock, mutations, commit and revert      cowfs.core.txn
    views       the view registry: branches, snapshots, detached, retired cowfs.core.views
    nodes       the node table and the node lifecycle (lookups, opens,    cowfs.core.nodes
                eviction), names and paths
    namespace   make, unlink, link, rename (whiteouts, hard-link names)   cowfs.core.namespace
    attributes  setattr (the deferred SETATTR rule), xattrs               cowfs.core.attributes
    data        read, write, seek, fallocate                              cowfs.core.data
    flusher     dirty buffers and the flush/pack pipeline                 cowfs.core.flush
    smallwrites the small-write log: fsync of a few pages, replay         cowfs.core.smallwrites
    usage       usage, allocated bytes and quotas                         cowfs.core.usage
    full        a full disk: refusals, cuts, the kernel's view            cowfs.core.diskfull
    fences      branches read-only while their remote hold is lost        cowfs.core.fence
    orphans     inodes unlinked while open                                cowfs.core.orphans
    prefetch    the learned model and the fetcher, as the core uses them  cowfs.core.prefetch

The operations below are those modules' methods, bound here (no call in between).

Concurrency (docs/architecture.md, "Concurrency invariants"): everything runs on one trio
event loop.  Mutations hold `lock`, flush all acknowledged dirty data first, then validate,
change memory and build one batch with no checkpoint in between, and commit it
synchronously; so committed state is always a prefix of the acknowledged operations.  Reads
and writes into dirty buffers take no lock.
"""
from __future__ import annotations

import errno
import os
from typing import Awaitable, Callable

import trio

from cowfs.core.attributes import Attributes
from cowfs.core.data import Data
from cowfs.core.diskfull import DiskFull
from cowfs.core.fence import Fences
from cowfs.core.flush import Flusher
from cowfs.core.lazy import LazyReads
from cowfs.core.namespace import Namespace
from cowfs.core.nodes import NodeTable, join_path
from cowfs.core.orphans import Orphans
from cowfs.core.prefetch import Prefetch
from cowfs.core.smallwrites import SmallWrites
from cowfs.core.txn import Mutation, Transactions
from cowfs.core.usage import Accounting
from cowfs.core.view import View
from cowfs.core.views import Views
from cowfs.errors import FSError
from cowfs.store import Store

__all__ = ["Filesystem", "Mutation", "join_path"]


class Filesystem:
    def __init__(self, store: Store, branch: str = "main", compression_level: int = 3,
                 prefetch: bool = False, learn: bool = False) -> None:
        self.store = store
        self.level = compression_level
        if branch not in store.catalog.branches:
            raise FSError(errno.ENOENT, f"no branch named {branch!r}")
        self.gc_wanted = trio.Event()  # a garbage-collection pass is owed (cowfs.background.gc)
        # Set by the daemon: makes the kernel write its dirty pages back to us (syncfs).
        self.kernel_sync: Callable[[], Awaitable[None]] | None = None
        # Set by the FUSE layer: pull the dirty pages of files open for writing.
        self.writers_sync: Callable[[], Awaitable[None]] | None = None

        self.txn = Transactions(self)
        self.usage = Accounting(self)
        self.views = Views(self)
        self.nodes = NodeTable(self)
        self.flusher = Flusher(self)
        self.smallwrites = SmallWrites(self)
        self.full = DiskFull(self)
        self.fences = Fences()
        self.orphans = Orphans(self)
        self.namespace = Namespace(self)
        self.attributes = Attributes(self)
        self.data = Data(self)
        self.lazy = LazyReads(self)  # chunks of a lazy mount fetched before reads need them
        self.prefetch = Prefetch(self, prefetch, learn)
        # Acknowledged but not committed: the store counts it against its free space.
        store.held = self.flusher.held_bytes

        txn, views, nodes, flusher, usage = self.txn, self.views, self.nodes, self.flusher, self.usage
        # transactions
        self.lock = txn.lock
        self.maintenance = txn.maintenance
        self.mutate = txn.mutate
        self.exclusive = txn.exclusive
        # views
        self.attach_branch = views.attach_branch
        self.snapshot_view = views.snapshot_view
        self.drop_views = views.drop
        self.live_tops = views.live_tops
        self.detach = views.detach
        self.freeze_head = views.freeze_head
        # nodes and their lifecycle
        self.node = nodes.node
        self.new_copy = nodes.new_copy
        self.looked_up = nodes.looked_up
        self.forget = nodes.forget
        self.opened = nodes.opened
        self.opened_dir = nodes.opened_dir
        self.released = nodes.released
        self.released_dir = nodes.released_dir
        self.evict_if_unused = nodes.evict_if_unused
        self.child_ino = nodes.child_ino
        self.lookup = nodes.lookup
        self.list_dir = nodes.list_dir
        self.path_of = nodes.path_of
        # namespace, attributes, data
        self.make = self.namespace.make
        self.unlink = self.namespace.unlink
        self.link = self.namespace.link
        self.rename = self.namespace.rename
        self.setattr = self.attributes.setattr
        self.xattr = self.attributes.xattr
        self.listxattr = self.attributes.listxattr
        self.setxattr = self.attributes.setxattr
        self.removexattr = self.attributes.removexattr
        self.copy_xattrs = self.attributes.copy_xattrs
        self.read = self.data.read
        self.write = self.data.write
        self.seek = self.data.seek
        self.fallocate = self.data.fallocate
        # flushes
        self.flush = flusher.flush
        self.fsync = flusher.fsync
        self.background_flusher = flusher.background_flusher
        # usage and quotas; a full disk
        self.allocated = usage.allocated
        self.blocks = usage.blocks
        self.set_quota = usage.set_quota
        self.space_tight = self.full.space_tight
        self.quota_tight = self.full.quota_tight
        self.writer_opened = self.full.writer_opened
        self.writer_closed = self.full.writer_closed
        self.kernel_view_owed = self.full.kernel_view_owed
        self.end_cut = self.full.end_cut
        self.wait_unsynced = self.full.wait_unsynced

        self.primary: View = views.branch_view(branch)
        # Before any task or thread exists, nothing can race these commits.  What fsync
        # logged before a crash is committed first (cowfs.core.smallwrites); then the
        # orphans of the first branch, and of those the replay attached; other branches'
        # orphans go under the lock (Views.attach_branch).
        attached = self.smallwrites.replay()
        m = Mutation(self)
        removed = False
        for view in {id(v): v for v in (self.primary, *attached)}.values():
            removed = self.orphans.remove_left(view, m) or removed
        if removed:
            txn.commit(m)
        if store.catalog.queued or not store.catalog.walked:
            self.gc_wanted.set()  # left by deletes of an unmounted store, or a pass cut short

    def schedule_gc(self) -> None:
        self.gc_wanted.set()

    async def sync_kernel(self) -> None:
        """Have the kernel send us every write it has acknowledged (before a snapshot, clone
        or diff of the live tree): syncfs on the mount, then, since syncfs has been seen to
        return before a file still open for writing was written back, each such file."""
        if self.kernel_sync is not None:
            await self.kernel_sync()
        if self.writers_sync is not None:
            await self.writers_sync()

    def memory_figures(self) -> dict[str, int]:
        """In-memory nodes (the part of the daemon's memory that follows the kernel's inode
        cache), the views that hold them, and the catalog's records (parsed at first use)."""
        return {**self.nodes.figures(), **self.views.figures(), **self.store.catalog.figures()}

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)
