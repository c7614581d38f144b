"""A full disk (docs/architecture.md, "A full disk"; docs/reliability.md, "Disk full").

`Store.space_low` estimates the room left; a write it refuses first has the held data
committed.  When the room is within what the kernel and the daemon may hold acknowledged but
unwritten, writers get direct_io (`space_tight`), so write(2) fails with ENOSPC itself, in
order.  A write the kernel's page cache acknowledged and we refuse (`refuse`) leaves the file
a prefix of its writes: cut at the gap the refused range leaves (`Node.cap`), with the
kernel's view (size, pages) brought back to ours by the FUSE layer (`wait_unsynced`,
`kernel_view_owed`: cowfs.fuse.kernel).  This module owns that state: which nodes have
writers through the page cache, which kernel views are owed, and the kernel's dirty limit.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, NoReturn

import trio

from cowfs.core.flush import DIRTY_LIMIT
from cowfs.core.node import Node
from cowfs.errors import FSError
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_INODES, ino_key

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.view import View

log = logging.getLogger(__name__)

KERNEL_DIRTY = 64 << 20  # the kernel's dirty limit for a mount, until read from sysfs


class DiskFull:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        # What the kernel may hold acknowledged (dirty pages) before we see it: its dirty
        # limit for this mount (the daemon reads it from sysfs once mounted).
        self.kernel_dirty = KERNEL_DIRTY
        # Nodes whose kernel view (size, pages) ran ahead of ours after a refused write;
        # the FUSE layer brings it back (cowfs.fuse.kernel.Kernel.syncer).
        self.kernel_unsynced: set[Node] = set()
        self.kernel_sync_wanted = trio.Event()

    def space_tight(self) -> bool:
        """Whether the store's free space (above its reserve) is within what the kernel and
        the daemon may hold acknowledged but unwritten (their dirty limits, counted twice as
        inline data is: WAL, then blob file).  Then writers get direct_io: a write the page
        cache acknowledged could no longer be stored for sure, and a direct write(2) fails
        with ENOSPC itself, in order."""
        return self.fs.store.headroom() < 2 * (self.kernel_dirty + DIRTY_LIMIT)

    def quota_tight(self, view: "View") -> bool:
        """Whether view's byte quota is within what the kernel may hold acknowledged but not
        yet sent to us (twice its dirty limit, the margin space_tight keeps for the disk;
        the daemon's own dirty data is charged when it arrives).  Then writers get
        direct_io, so write(2) fails with EDQUOT itself, in order; further away they use
        the page cache (and SQLite's WAL its shared mapping), and one that reaches the quota
        anyway is refused at writeback as on a full disk (`refuse`: the file is cut where
        the refusal left a gap, the writer gets EDQUOT at fsync or close)."""
        return view.quota_bytes > 0 and view.quota_bytes - view.allocated < 2 * self.kernel_dirty

    async def room_after_flush(self, pending: int) -> bool:
        """Whether there is room once what is held is committed: the estimate counts held
        data at its most (twice, as if inline), and a file streamed into packs takes once."""
        fs = self.fs
        if not fs.flusher.pending():
            return False
        try:
            await fs.flusher.flush()
        except FSError:
            return False
        fs.store.look()
        return not fs.store.space_low(pending)

    def refuse(self, node: Node, off: int, end: int, err: int, why: str) -> NoReturn:
        """Fail a write.  Through direct_io the writer gets the error and nothing else
        changes; but a write the kernel's page cache acknowledged is lost now.  Where it
        overwrote bytes the committed file holds, those stay; where it leaves a gap
        (`Node.gap_in`), the file is cut back to a prefix there (data after a gap is no
        prefix of what was written, even when the kernel wrote it back first), and further
        writes beyond are refused.  Either way the kernel's view (size, pages) is brought
        back to ours (`kernel_unsynced`): a truncate to the cut, which also cuts what is
        committed beyond it."""
        fs = self.fs
        if node.cached_writers > 0 and node.attrs.is_reg:
            if node.cap is None or off < node.cap:
                found = fs.store.meta.get(CF_INODES, ino_key(node.ino), node.view.lv)
                stored = Attrs.unpack(found[1]) if found is not None and found[1] else None
                committed = stored.size if stored is not None else 0
                gap = node.gap_in(off, end, stored.root if stored is not None else None, committed,
                                  fs.store.objects)
                logged = node.logged_size()
                if gap is not None and logged is not None and gap < logged:
                    # Log records hold fsync'd bytes up to `logged` that are not committed yet
                    # (the flush before this failed): never cut below them.
                    gap = logged if end > logged else None
                if gap is not None and (node.cap is None or gap < node.cap):  # else old bytes stay
                    node.cap, node.cap_errno = gap, err
                    before = len(node.dirty)
                    node.cut(gap, max(gap, committed))
                    fs.flusher.dropped(node, before)
                    fs.usage.account(node, not node.deleted)  # the view's next commit writes its usage
                    fs.usage.recount(node, {**node.flushing, **node.dirty})
                    log.warning("inode %d: a write the page cache acknowledged was refused (%s, at %d); "
                                "the file is cut to %d bytes", node.ino, errno.errorcode.get(err, err), off, gap)
            self.kernel_unsynced.add(node)
            self.kernel_sync_wanted.set()
        raise FSError(err, why)

    # -- writers through the kernel's page cache, and the kernel's view after a refusal ------
    @staticmethod
    def writer_opened(node: Node, cached: bool) -> None:
        """A handle that may write was opened; cached: through the kernel's page cache, whose
        acknowledged writes a refusal loses (`refuse` cuts the file then)."""
        if cached:
            node.cached_writers += 1

    @staticmethod
    def writer_closed(node: Node, cached: bool) -> None:
        if cached:
            node.cached_writers -= 1

    def kernel_view_owed(self, node: Node) -> bool:
        """Whether the kernel's view of node (size, pages) must be brought back to ours now:
        a refused write left it ahead, and the last writer through the page cache is gone
        (its close reported the error).  It is then taken off the list of `wait_unsynced`;
        the caller syncs the kernel's view and then calls `end_cut`."""
        if node.cached_writers > 0 or (node.cap is None and node not in self.kernel_unsynced):
            return False
        self.kernel_unsynced.discard(node)
        return True

    @staticmethod
    def end_cut(node: Node) -> None:
        """The kernel's view of node is ours again: writes beyond the cut are no longer refused."""
        node.cap = None

    def truncated(self, node: Node) -> None:
        """A user truncated node: the kernel takes the size we reply and drops its pages, so
        its view is ours and the cut ends."""
        node.cap = None
        self.kernel_unsynced.discard(node)

    async def wait_unsynced(self) -> list[Node]:
        """Wait until refused writes left the kernel's view of files ahead of ours (while
        writers still have them open); take those files."""
        await self.kernel_sync_wanted.wait()
        self.kernel_sync_wanted = trio.Event()
        nodes = list(self.kernel_unsynced)
        self.kernel_unsynced.clear()
        return nodes
