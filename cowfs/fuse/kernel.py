"""What we make the kernel forget or send us: invalidations of names, attributes and pages
changed behind its back (clone, rollback), dirty pages pulled before a name publishes a file
or a snapshot freezes it, and the kernel's view of a file set back to ours after a write it
had acknowledged was refused (docs/architecture.md, "A full disk").

Every call into the kernel on our own mount runs in a thread of its own, without
`Filesystem.lock`: the kernel answers it only after our request loop has served the
requests it causes (writebacks, lookups, a truncate), which may need the lock.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Callable

import pyfuse3
import trio

from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.fuse.handles import Handles
from cowfs.fuse.inodes import Inodes
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)


class Kernel:
    def __init__(self, fs: Filesystem, inodes: Inodes, handles: Handles,
                 view_root: Callable[[View], str | None]) -> None:
        self.fs = fs
        self.inodes = inodes
        self.handles = handles
        self.view_root = view_root  # where a view is mounted, for our own calls through the mount

    async def invalidate_dir(self, node: Node, names: list[bytes]) -> None:
        """Make the kernel forget node's attributes and listing and the given names (negative
        dentries too).  Synchronous, in a thread (the kernel may call back into us): when the
        command that changed the directory returns, nothing stale is left."""
        fino = self.inodes.known(node)
        if fino is None:
            return  # the kernel holds nothing of the directory's view: nothing to forget

        def invalidate() -> None:
            inval_entries(fino, names)
            inval_inode(fino)

        await trio.to_thread.run_sync(invalidate)

    async def after_rollback(self, view: View, old_names: list[bytes]) -> None:
        """Make the kernel forget the root's names before and after (the new ones may be
        cached as absent), its listing and its attributes.  Every other directory of the
        restored tree has a new kernel inode number."""
        root = self.fs.node(view, ROOT_INO)
        names = set(old_names).union(n for n, _ in self.fs.list_dir(root))
        await self.invalidate_dir(root, sorted(names))

    async def writeback_writers(self) -> None:
        """Pull the kernel's dirty pages of every file open for writing (invalidate_inode
        writes them back to us first, synchronously)."""
        finos = [f for n in self.handles.writers if n.attrs.is_reg and not n.deleted
                 if (f := self.inodes.known(n)) is not None]
        if finos:
            await trio.to_thread.run_sync(lambda: [pull_pages(f) for f in finos])

    async def writeback(self, parent: Node, name: bytes) -> None:
        """Before publishing a file still open for writing (rename, link), make the kernel
        send us the dirty pages it holds for it, so the data commits no later than the name.
        (A closed file's pages were sent at close.)  Costs that file's page cache."""
        ino = self.fs.child_ino(parent, name)
        node = parent.view.nodes.get(ino) if ino is not None else None
        if node is not None and self.handles.writers[node] > 0 and node.attrs.is_reg:
            await self.pull(node)

    async def pull(self, node: Node) -> None:
        """The kernel's dirty pages of node, written back to us now."""
        fino = self.inodes.known(node)
        if fino is not None:
            await trio.to_thread.run_sync(pull_pages, fino)

    async def drop_snapshots(self, names: list[str]) -> None:
        """Have the kernel drop these snapshots' views (Inodes.snapshot_entries), so it forgets
        their inodes but those in use, and the rest once they are no longer: a deleted
        snapshot's view goes, and garbage collection compacts its layer, once the kernel has
        forgotten it.  Call it outside `Filesystem.lock` (the kernel sends FORGETs meanwhile)."""
        views = [v for v in self.fs.views if v.kind == "snapshot" and v.name in names]
        entries = self.inodes.snapshot_entries(views)
        if entries:
            await trio.to_thread.run_sync(lambda: [inval_entries(d, [n]) for d, n in entries])

    async def slot_reclaimer(self) -> None:
        """When inode-number slots run short (cowfs.fuse.inodes), have the kernel drop the
        names of snapshot views that hold slots, least recently given first, a few at a
        time, until a quarter of the slots could be taken or every such view was asked
        once: the kernel forgets those not in use, and their slots go idle, for other
        views.  A request finding no slot waits for this."""
        inodes = self.inodes
        slots = inodes.slots
        while True:
            await inodes.short.wait()
            inodes.short = trio.Event()
            target = max(2, slots.limit // 4)
            asked: set[int] = set()
            while slots.available() < target:
                vids = slots.to_drop(target - slots.available(),
                                     lambda vid: vid not in asked and inodes.droppable(vid))
                if not vids:
                    break
                asked.update(vids)
                views = [v for vid in vids if (v := self.fs.views.get(vid)) is not None]
                log.debug("inode-number slots short (%d of %d free or idle): dropping %d snapshot views",
                          slots.available(), slots.limit, len(views))
                entries = inodes.snapshot_entries(views)
                await trio.to_thread.run_sync(lambda: [inval_entries(d, [n]) for d, n in entries])
                await trio.sleep(0.02)  # the FORGETs come; then look again

    async def syncer(self) -> None:
        """Bring the kernel's view of a file back to ours after a write it acknowledged was
        refused (cowfs.core.diskfull.DiskFull.refuse), while writers still have it open; the
        last release does it once more."""
        while True:
            for node in await self.fs.wait_unsynced():
                await self.sync_view(node)
            await trio.sleep(0.05)  # a writer that goes on writing into a full disk: in rounds

    async def sync_view(self, node: Node) -> None:
        """Make the kernel's size and pages of node ours.  With the writeback cache the kernel
        trusts its own size over any attributes we send, so the one way to set it is a
        truncate through the mount: the kernel takes the size from our SETATTR reply and
        drops its pages beyond; then the remaining pages (refused overwrites) are
        invalidated.  The path is walked one name at a time without following symlinks and
        the inode checked, so a rename meanwhile cannot make us truncate another file; a
        file without a name gets the invalidation only."""
        fino = self.inodes.known(node)
        if fino is None:
            return  # the kernel holds nothing of the file's view: it has no pages of it
        root = self.view_root(node.view) if node.view.kind == "branch" and node.attrs.nlink > 0 else None
        # The path from the records in a database job (pure reads), the kernel calls in a
        # thread of their own: they wait for requests that may commit.
        rel = await self.fs.store.in_thread(self.fs.path_of, node.view.lv, node.ino, {}) if root else None

        def run() -> None:
            if root is not None and rel:
                try:
                    fd = open_beneath(root, rel)
                    try:
                        st = os.fstat(fd)
                        if st.st_ino == fino and stat.S_ISREG(st.st_mode):
                            os.truncate(f"/proc/self/fd/{fd}", node.attrs.size if node.cap is None else node.cap)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("inode %d: the kernel's size could not be set back: %s", node.ino, exc)
            pull_pages(fino)

        await trio.to_thread.run_sync(run)


def inval_entries(parent: int, names: list[bytes]) -> None:
    for name in names:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("invalidate_entry(%d, %r): %s", parent, name, exc)


def inval_inode(fino: int) -> None:
    """Attributes and cached pages: for a directory, the listing the kernel caches
    (cowfs.fuse.dircache), which must not outlive a change made behind its back."""
    try:
        pyfuse3.invalidate_inode(fino, attr_only=False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidate_inode(%d): %s", fino, exc)


def pull_pages(fino: int) -> None:
    """Have the kernel write fino's dirty pages back to us and drop its pages."""
    try:
        pyfuse3.invalidate_inode(fino, attr_only=False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("writeback of inode %d: %s", fino, exc)


def open_beneath(root: str, rel: str) -> int:
    """An O_PATH descriptor of root/rel, walked one name at a time without following a
    symlink (nor leaving root's filesystem)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dev = os.fstat(fd).st_dev
    try:
        for name in rel.split("/"):
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if os.fstat(fd).st_dev != dev:
                raise OSError(errno.EXDEV, f"{root}/{rel} leaves the mount")
    except BaseException:
        os.close(fd)
        raise
    return fd
