"""Usage and quotas: what each view counts (logical bytes, inodes, allocated bytes), what each
node contributes, and the quotas that check against them (docs/architecture.md, "Allocated
bytes" and "Quotas").

A view's allocated bytes are kept as committed (`View.alloc_bytes`, persisted in its usage
record in the batch of every change) plus what buffered writes add until their commit
(`View.alloc_pending`, memory only); a node's as `Node.alloc` (its chunks as they are now)
and `Node.stored_alloc` (its committed tree's).  All of it changes on the trio thread only.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from cowfs.chunks import tree
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.kv.base import Batch
from cowfs.meta.layers import Usage

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation


class Accounting:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs

    # -- views -------------------------------------------------------------------------------
    def load(self, view: View) -> None:
        """The committed usage of a view (what buffered writes add is kept in alloc_pending)."""
        store = self.fs.store
        usage = store.catalog.usage(view.lv.top)
        if usage is None:  # never recorded (a snapshot's first view): count once
            usage = store.count_usage(view.lv)
        view.usage_bytes, view.usage_inodes, view.alloc_bytes = usage

    def set_quota(self, view: View, quota_bytes: int | None, quota_inodes: int | None) -> None:
        """Persist a branch's quotas (None: leave as is, 0: none)."""
        store = self.fs.store
        b = store.catalog.branches[view.name]
        if quota_bytes is not None:
            b.quota_bytes = view.quota_bytes = quota_bytes
        if quota_inodes is not None:
            b.quota_inodes = view.quota_inodes = quota_inodes
        batch = Batch()
        store.catalog.save_branch(b, batch)
        store.commit(batch)

    # -- nodes -------------------------------------------------------------------------------
    @staticmethod
    def account(node: Node, present: bool) -> None:
        """Bring node's contribution to its view's usage (inodes, logical bytes) up to date."""
        view = node.view
        size = node.attrs.size if present and node.attrs.is_reg else 0
        if present != node.counted:
            view.usage_inodes += 1 if present else -1
            node.counted = present
        view.usage_bytes += size - node.counted_bytes
        node.counted_bytes = size

    @staticmethod
    def buffered(node: Node, old_alloc: int) -> None:
        """A write changed node's buffers: what they allocate is pending until the commit."""
        node.view.alloc_pending += node.alloc - old_alloc  # type: ignore[operator]

    @staticmethod
    def grew(node: Node, old_size: int) -> None:
        """A write grew node from old_size: logical bytes count what writes acknowledged."""
        if node.attrs.size > old_size:
            node.view.usage_bytes += node.attrs.size - old_size
            node.counted_bytes += node.attrs.size - old_size

    def allocated(self, node: Node) -> int:
        """node.alloc, loaded on first use: its committed tree's content size (one refs read)."""
        if node.alloc is None:
            objects = self.fs.store.objects
            committed = node.stored_root if node.stored_layer is not None else None
            node.stored_alloc = objects.content_size(committed.hash) if committed is not None else 0
            # A node made by clone has a tree before it has a record: it is pending until its commit.
            node.alloc = objects.content_size(node.attrs.root.hash) if node.attrs.root is not None else 0
            node.view.alloc_pending += node.alloc - node.stored_alloc
        return node.alloc

    def blocks(self, node: Node) -> int:
        """st_blocks: a regular file's allocated bytes in 512-byte units (holes do not count)."""
        if node.attrs.is_reg:
            return (self.allocated(node) + 511) // 512
        return (node.attrs.size + 511) // 512

    @staticmethod
    def settle_alloc(node: Node) -> None:
        """A node without buffers has allocated what its committed tree holds."""
        node.view.alloc_pending -= node.alloc - node.stored_alloc  # type: ignore[operator]
        node.alloc = node.stored_alloc

    def recount(self, node: Node, buffers: dict[int, bytes | bytearray | memoryview]) -> None:
        """node.alloc after its buffers changed outside a write: the committed tree's plus what
        each buffer changes in its chunk."""
        if node.alloc is None:
            return
        objects = self.fs.store.objects
        alloc = node.stored_alloc + sum(  # type: ignore[operator]
            len(b) - objects.chunk_size(*tree.lookup_leaf(node.attrs.root, i, objects.node))
            for i, b in buffers.items())
        node.view.alloc_pending += alloc - node.alloc
        node.alloc = alloc

    def after_flush(self, node: Node) -> None:
        """A flush of node committed: no buffers left, or only what was written meanwhile."""
        if node.alloc is not None:
            if not node.dirty:
                self.settle_alloc(node)
            else:  # written again meanwhile: the committed tree plus what the buffers change
                self.recount(node, node.dirty)

    @staticmethod
    def forget_alloc(node: Node) -> None:
        """node never existed (the mutation that made it failed): it allocates nothing."""
        if node.alloc is not None:
            node.view.alloc_pending -= node.alloc - node.stored_alloc  # type: ignore[operator]
            node.alloc = node.stored_alloc = 0

    # -- at commit ---------------------------------------------------------------------------
    def settle(self, m: "Mutation", settled: list[tuple[Node, int]]) -> None:
        """Store.commit's before_write hook: the reference changes are in the batch, so the
        new trees' sizes are known.  Each saved file's committed allocation becomes its new
        root's content size (into settled); a reservation (m.charge) is checked against the
        byte quota and the disk; the views' usage records go in the batch."""
        store = self.fs.store
        objects = store.objects
        grown: dict[View, int] = {}
        for node in {id(n): n for n in m.saved}.values():
            root = None if node.deleted or node.stored_root is None else node.stored_root.hash
            new = objects.content_size(root, m.txn) if node.attrs.is_reg else 0
            settled.append((node, new))
            grown[node.view] = grown.get(node.view, 0) + new - node.stored_alloc  # type: ignore[operator]
            if m.charge and new > node.alloc:  # type: ignore[operator]
                node.view.check_quota(more_bytes=new - node.alloc)  # type: ignore[operator]
                if store.space_low(new - node.alloc):  # type: ignore[operator]
                    raise FSError(errno.ENOSPC, "the store's disk has no room for the reservation")
        for view in m.views | grown.keys():
            if view.kind == "branch":
                store.catalog.save_usage(view.lv.top, Usage(view.usage_bytes, view.usage_inodes,
                                                            view.alloc_bytes + grown.get(view, 0)), m.batch)

    def committed(self, settled: list[tuple[Node, int]]) -> None:
        """The batch `settle` saw is written: the committed allocations are the new ones."""
        for node, new in settled:
            d = new - node.stored_alloc  # type: ignore[operator]
            node.stored_alloc = new
            node.view.alloc_bytes += d
            node.view.alloc_pending -= d
            if not node.dirty and not node.flushing:
                self.settle_alloc(node)
