"""The FUSE adapter: pyfuse3 requests to core calls and back (request -> call -> reply,
FSError -> errno).  Nothing else: inode numbers are cowfs.fuse.inodes', the `.cowfs`
namespace and control sessions cowfs.fuse.controlfs', the handle tables cowfs.fuse.handles'
and what we make the kernel forget or send us cowfs.fuse.kernel's; the node lifecycle
(lookups, opens, eviction) is the core's (`Filesystem.looked_up / forget / opened /
released`).

Over 500 lines: one short handler for each of the ~35 FUSE requests pyfuse3 dispatches to this
class, each request -> call -> reply; they share only the helpers here, and splitting the
class would spread one request table over several files.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyfuse3

from cowfs.background.warming import Warmer
from cowfs.chunks.tree import CHUNK
from cowfs.commands.authz import Mounted
from cowfs.commands.branching import Branching
from cowfs.commands.control import Control
from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.fuse.controlfs import ControlFS
from cowfs.fuse.ext import Extensions
from cowfs.fuse.handles import Handles
from cowfs.fuse.inodes import SLOTS, Inodes, is_control
from cowfs.fuse.kernel import Kernel
from cowfs.fuse.listings import DOT_NEXT, DOTDOT_NEXT, Kept, Listing
from cowfs.store import ROOT_INO

if TYPE_CHECKING:
    from cowfs.meta.layers import Snapshot  # a listing's items: no run-time import below commands

log = logging.getLogger(__name__)
trace = logging.getLogger("cowfs.requests")

ATTR_TIMEOUT = 60.0  # the daemon is the only writer; content changed behind the kernel is invalidated


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, fs: Filesystem, stats: Callable[[View], dict[str, Any]] | None = None,
                 mounted: Callable[[], Mounted] | None = None, ctl_group: int | None = None,
                 cache_absent: bool = True, warm: Warmer | None = None,
                 view_root: Callable[[View], str | None] | None = None, slots: int = SLOTS) -> None:
        super().__init__()
        self.fs = fs
        self.warm = warm  # learns cold starts from lookups and listings, and warms them
        self.inodes = Inodes(fs, slots)
        self.handles = Handles()
        self.kernel = Kernel(fs, self.inodes, self.handles, view_root or (lambda view: None))
        self.branching = Branching(fs, ctl_group)
        self.branching.set_invalidate_dir(self.kernel.invalidate_dir)
        self.branching.drop_snapshots = self.kernel.drop_snapshots
        fs.writers_sync = self.kernel.writeback_writers
        control = Control(self.branching, self.kernel.after_rollback, mounted or (lambda: {}))
        self.ctlfs = ControlFS(fs, self.branching, control, self.handles, self._entry, self._looked_up,
                               stats or (lambda view: {}), ctl_group)
        self.requests: Counter[str] = Counter()
        # Set by the daemon when cowfs.fuse.ext passes READDIR's inode as its handle: then
        # OPENDIR is declined (see opendir), and listings in progress are kept here by the
        # directory's inode (cowfs.fuse.listings).
        self.dirs_by_inode: Extensions | None = None
        self._listings: Kept[tuple[bytes, int]] = Kept()
        self._control_listings: Kept[Snapshot] = Kept()  # `snapshots/`, also with OPENDIR
        # The reply to a LOOKUP of an absent name: cached as absent (None: ENOENT, not cached).
        self._negative: pyfuse3.EntryAttributes | None = None
        if cache_absent:
            self._negative = pyfuse3.EntryAttributes()
            self._negative.st_ino = 0
            self._negative.entry_timeout = ATTR_TIMEOUT

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attrs
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.inodes.fuse_ino(node)
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = max(a.nlink, 0)
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = CHUNK
        e.st_blocks = self.fs.blocks(node)
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        self.fs.looked_up(node)
        return self._entry(node)

    # -- metadata --------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        if is_control(parent_inode):
            return self.ctlfs.lookup(parent_inode, name, ctx)
        parent = self.inodes.live(parent_inode)
        if self.ctlfs.reserved(parent, name):
            return self.ctlfs.dir_entry(parent.view)
        if self.warm is not None:
            self.warm.touch(parent, ctx.pid)
        await self.inodes.ready(parent.view)
        try:
            return self._looked_up(self.fs.lookup(parent, name))
        except FSError as exc:
            if exc.errno != errno.ENOENT or self._negative is None:
                raise
            # Cached as absent for ATTR_TIMEOUT (a compiler probing include paths, a shell
            # probing PATH): names appear behind the kernel's back only by clone and
            # rollback, which invalidate them (Kernel.invalidate_dir).
            return self._negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        for fino, n in inode_list:
            if is_control(fino):
                continue
            node = self.inodes.held(fino)
            if node is not None:
                self.fs.forget(node, n)
                if node.lookups <= 0 and self._listings and node.attrs.is_dir:
                    # No READDIR can continue its listing (a reader holds the inode): `rm -rf`
                    # starts reading each directory twice and leaves one listing at its first page.
                    self._listings.drop(fino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        if is_control(inode):
            return self.ctlfs.entry(inode)
        return self._entry(self.inodes.node(inode, unlinked_ok=True))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["setattr"] += 1
        if is_control(inode):
            if self.ctlfs.truncatable(inode) and not (fields.update_mode or fields.update_uid or fields.update_gid):
                # O_TRUNC from a shell's ">": nothing to cut; and the times the kernel keeps
                # for a file written through it and sends back at its close (or at a syncfs):
                # the control file's times are its root's.  Refused, they failed the close.
                return self.ctlfs.entry(inode)
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.inodes.node(inode, unlinked_ok=True)
        # Kernel.sync_view's own truncate (of a file cut by refused writes, or on a branch its
        # lost hold made read-only): the /proc look only then, not at every truncate.
        ours = (fields.update_size and (node.cap is not None or self.fs.fences.closed(node.view))
                and os.path.exists(f"/proc/self/task/{ctx.pid}"))
        await self.fs.setattr(
            node,
            # our own truncate keeps a cut file's cut (a user's ends it), also on a fenced branch
            user=node.cap is None or not ours, fenced_ok=ours,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["readlink"] += 1
        if is_control(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        node = self.inodes.node(inode)
        if not stat.S_ISLNK(node.attrs.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.attrs.target

    def _parent(self, fino: int, name: bytes, reserved_errno: int) -> Node:
        """The parent of a namespace change; changes to .cowfs (or inside it) fail."""
        if is_control(fino):
            raise pyfuse3.FUSEError(errno.EPERM)
        parent = self.inodes.live(fino)
        if self.ctlfs.reserved(parent, name):
            raise pyfuse3.FUSEError(reserved_errno)
        return parent

    async def _make(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                    rdev: int = 0, target: bytes = b"") -> Node:
        parent = self._parent(parent_inode, name, errno.EEXIST)
        await self.inodes.ready(parent.view)
        groups: set[int] = set()
        if mode & stat.S_ISGID and ctx.uid != 0:
            groups = pyfuse3.get_sup_groups(ctx.pid)
        return await self.fs.make(parent, name, mode, ctx.uid, ctx.gid, rdev, target, groups)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mknod"] += 1
        node = await self._make(parent_inode, name, mode & ~ctx.umask, ctx, rdev)
        return self._looked_up(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mkdir"] += 1
        node = await self._make(parent_inode, name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)
        return self._looked_up(node)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["symlink"] += 1
        node = await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target)
        return self._looked_up(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["unlink"] += 1
        await self.fs.unlink(self._parent(parent_inode, name, errno.EPERM), name, want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rmdir"] += 1
        await self.fs.unlink(self._parent(parent_inode, name, errno.EPERM), name, want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rename"] += 1
        op = self._parent(parent_inode_old, name_old, errno.EPERM)
        np = self._parent(parent_inode_new, name_new, errno.EPERM)
        if self.handles.writers:
            await self.kernel.writeback(op, name_old)
            if flags & pyfuse3.RENAME_EXCHANGE:
                await self.kernel.writeback(np, name_new)
        await self.fs.rename(op, name_old, np, name_new, flags, ctx.uid, ctx.gid)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["link"] += 1
        if is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.inodes.live(inode)
        await self.inodes.ready(node.view)
        await self.fs.link(node, self._parent(new_parent_inode, new_name, errno.EEXIST), new_name)
        return self._looked_up(node)

    # -- files -----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if is_control(inode):
            return await self.ctlfs.open(inode, ctx)
        node = self.inodes.live(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            if not node.view.writable:
                raise pyfuse3.FUSEError(errno.EROFS)
            self.fs.fences.check(node.view)  # a branch whose remote hold was lost
        if flags & os.O_TRUNC and (node.attrs.size or (ctx.uid and node.attrs.mode & (stat.S_ISUID | stat.S_ISGID))):
            await self.fs.setattr(node, size=0, kill_suid=ctx.uid != 0)
        return self._opened(node, bool(flags & (os.O_WRONLY | os.O_RDWR)))

    def _opened(self, node: Node, writing: bool) -> pyfuse3.FileInfo:
        self.fs.opened(node)
        # Writers bypass the page cache near a byte quota, or when the store's disk is
        # nearly full: the kernel acknowledges a cached write before we see it, so refusing
        # it at writeback loses acknowledged data and reports EDQUOT/ENOSPC late (at fsync
        # or close); a direct write(2) fails itself, in order.  (The price: such a handle
        # cannot be mmap'ed MAP_SHARED, see docs/architecture.md, "Quotas".)
        direct = writing and (self.fs.quota_tight(node.view) or self.fs.space_tight())
        fh = self.handles.open_file(node, writing, cached=writing and not direct)
        if writing:
            self.fs.writer_opened(node, cached=not direct)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.requests["create"] += 1
        node = await self._make(parent_inode, name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        return self._opened(node, True), self._looked_up(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        sess = self.handles.sessions.get(fh)
        if sess is not None:
            return sess.read(off, size)
        node = self.handles.files[fh]
        if self.fs.store.objects.remote_left():  # a lazy mount: fetch what the read needs first
            await self.fs.lazy.ensure(node, off, size)
        return self.fs.read(node, off, size, self.handles.streams[fh])  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests["write"] += 1
        sess = self.handles.sessions.get(fh)
        if sess is not None:
            return await self.ctlfs.write(sess, buf)
        return await self.fs.write(self.handles.files[fh], off, buf)

    async def flush(self, fh: int) -> None:
        """FLUSH, sent at every close: declined.  ENOSYS makes the kernel stop sending it for
        this mount (close still writes the file's dirty pages back to us and waits for them,
        and reports their errors); release commits instead.  One request fewer per close, as
        fuse-overlayfs, which has no FLUSH either; the durability rules hold (rule 2 in
        docs/architecture.md).  This first one commits like a release."""
        self.requests["flush"] += 1
        node = self.handles.files.get(fh)
        if node is not None:
            await self._commit_closed(node)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def _commit_closed(self, node: Node) -> None:
        # Also when another task's flush holds this file's data, like fsync.
        if node.attrs.nlink > 0 and self.fs.flusher.holds(node):
            await self.fs.flush()

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        if self.handles.sessions.pop(fh, None) is not None:
            return
        node, writing, cached = self.handles.close_file(fh)
        try:
            if writing:
                self.fs.writer_closed(node, cached)
                # A failed commit (the disk full under RocksDB) leaves the data dirty, to be
                # retried; the handle is gone all the same.
                await self._commit_closed(node)
        finally:
            if self.fs.kernel_view_owed(node):
                # The last writer that could have data refused behind its back is gone (the
                # close reported the error): the kernel's view becomes ours, and the cut ends.
                await self.kernel.sync_view(node)
                self.fs.end_cut(node)
            await self.fs.released(node)

    async def lseek(self, fino: int, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (cowfs.fuse.ext; the kernel answers the other whences)."""
        self.requests["lseek"] += 1
        node = self.handles.files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESPIPE if fh in self.handles.sessions else errno.EBADF)
        if self.handles.writers[node] > 0:
            # The kernel asks without writing back first: pages written but not yet sent
            # to us would read as holes.
            await self.kernel.pull(node)
        return self.fs.seek(node, off, whence)

    async def fallocate(self, fino: int, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) (cowfs.fuse.ext); the kernel has checked the handle is writable."""
        self.requests["fallocate"] += 1
        node = self.handles.files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP if fh in self.handles.sessions else errno.EBADF)
        await self.fs.fallocate(node, mode, off, length)

    def statfs_of(self, fino: int) -> dict[str, int]:
        """STATFS with its inode (cowfs.fuse.ext): the figures of the branch it is in (a
        snapshot's: the disk's)."""
        self.requests["statfs"] += 1
        try:
            view = self.ctlfs.view(fino) if is_control(fino) else self.inodes.node(fino, unlinked_ok=True).view
        except (FSError, pyfuse3.FUSEError):
            view = self.fs.primary
        return self.statvfs(view)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests["fsync"] += 1
        if fh in self.handles.sessions:
            return
        await self.fs.fsync()

    # -- directories -----------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Declined when READDIR comes with its inode (cowfs.fuse.ext): ENOSYS makes the
        kernel stop sending OPENDIR and RELEASEDIR for this mount (two requests fewer per
        listing, as `compileall`, `rm -r`, `git status` list every directory), and open every
        directory with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, the flags cowfs.fuse.dircache
        sets: the kernel keeps the listing, which it drops when the directory changes through
        the mount, when its mtime changes (checked at each listing's start: libfuse asks for
        FUSE_AUTO_INVAL_DATA), and when the daemon invalidates it (Kernel.invalidate_dir)."""
        self.requests["opendir"] += 1
        if self.dirs_by_inode is not None and self.dirs_by_inode.by_inode:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if is_control(inode):
            return self.handles.open_dir(None, inode)
        node = self.inodes.live(inode)
        if not node.attrs.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        warming = self.warm is not None and self.warm.opened_dir(node, ctx.pid)
        fh = self.handles.open_dir(node, warming=warming)
        self.fs.opened_dir(node)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.requests["readdir"] += 1
        if self.dirs_by_inode is not None and self.dirs_by_inode.by_inode:
            self._readdir_of_inode(fh, start_id, token)
            return
        d = self.handles.dirs[fh]
        if d.warming:
            self.warm.requests += 1  # type: ignore[union-attr]
        if d.node is None:
            self._control_listing(d.control, start_id, token)
            return
        await self.inodes.ready(d.node.view)
        if start_id == 0 or d.entries is None:
            # Taken when reading starts (again), or when the kernel continues through this
            # handle a listing it cached (name cookies resume it exactly, cowfs.fuse.listings).
            d.entries = self._dir_listing(d.node)
        self._reply_listing(d.node, d.entries, start_id, token)

    def _readdir_of_inode(self, fino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """READDIR without OPENDIR: fino is the directory's inode.  A listing is taken when
        reading starts at offset 0 and kept for the pages after it (cowfs.fuse.listings);
        dropped at the end (the empty reply), when the kernel forgets the directory (see
        forget) or when MAX_LISTINGS directories were read since; a page whose listing is
        gone takes a new one and resumes after its offset's name."""
        pid = self.dirs_by_inode.readdir_pids.pop(fino, 0)  # type: ignore[union-attr]
        if is_control(fino):
            self._control_listing(fino, start_id, token)
            return
        node = self.inodes.node(fino, unlinked_ok=True)
        if not node.attrs.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self.warm is not None:
            if start_id == 0:
                self.warm.opened_dir(node, pid)
            elif pid and pid == self.warm.pid:
                self.warm.requests += 1
        entries = self._listings.get(fino, start_id, lambda: self._dir_listing(node))
        if self._reply_listing(node, entries, start_id, token):
            self._listings.drop(fino)

    def _dir_listing(self, node: Node) -> Listing[tuple[bytes, int]]:
        """node's entries in cookie order, which the offsets READDIR gives resume in."""
        return Listing(self.fs.list_dir(node), _name_of_entry)

    def _control_listing(self, fino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """A control directory's listing, kept as a directory's is (`_readdir_of_inode`):
        made once when reading starts, not at each page (100,000 snapshots took 484 s to
        list, ~200 pages each making every entry)."""
        snaps = self._control_listings.get(fino, start_id,
                                           lambda: Listing(self.ctlfs.listing(fino), self.ctlfs.listed_name))
        for i in range(snaps.after(start_id), len(snaps.items)):
            found = self.ctlfs.listed(snaps.items[i])
            if found is None:
                continue  # deleted since the listing was taken
            name, entry, node = found
            if not pyfuse3.readdir_reply(token, name, entry, snaps.cookies[i]):
                return
            self.fs.looked_up(node)
        self._control_listings.drop(fino)

    def _reply_listing(self, dnode: Node, entries: Listing[tuple[bytes, int]], start_id: int,
                       token: pyfuse3.ReaddirToken) -> bool:
        """Reply with dnode's entries after offset start_id (0: from ".", DOT_NEXT: from
        "..", else those with greater cookies), each with its offset; True if nothing was
        left to send."""
        fs, view = self.fs, dnode.view
        sent = False
        # "." and ".." come first (the kernel takes no lookup reference for them).
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self._entry(dnode), DOT_NEXT):
                return False
            start_id, sent = DOT_NEXT, True
        if start_id == DOT_NEXT:
            parent = dnode
            if dnode.ino != ROOT_INO and dnode.attrs.parent:
                try:
                    parent = fs.node(view, dnode.attrs.parent)
                except FSError:
                    parent = dnode
            entry = self._entry(parent)
            if parent is not dnode:
                fs.evict_if_unused(parent)
            if not pyfuse3.readdir_reply(token, b"..", entry, DOTDOT_NEXT):
                return False
            start_id, sent = DOTDOT_NEXT, True
        items, cookies = entries.items, entries.cookies
        for i in range(entries.after(start_id), len(items)):
            name, ino = items[i]
            try:
                child = fs.node(view, ino)
            except FSError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._entry(child), cookies[i]):
                fs.evict_if_unused(child)  # not sent: the kernel holds no reference to it
                return False
            sent = True
            fs.looked_up(child)
        return not sent

    async def releasedir(self, fh: int) -> None:
        self.requests["releasedir"] += 1
        d = self.handles.dirs.pop(fh)
        if d.warming:
            self.warm.requests += 1  # type: ignore[union-attr]
        if d.node is not None:
            await self.fs.released_dir(d.node)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.requests["fsyncdir"] += 1
        d = self.handles.dirs.get(fh)  # none without OPENDIR: a commit of everything, as for any directory
        if d is not None and d.node is None:
            return
        await self.fs.fsync()

    # -- xattrs, statfs, access ------------------------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["setxattr"] += 1
        if is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.fs.setxattr(self.inodes.node(inode), name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["getxattr"] += 1
        if is_control(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        value = self.fs.xattr(self.inodes.node(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.requests["listxattr"] += 1
        if is_control(inode):
            return []
        return self.fs.listxattr(self.inodes.node(inode))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["removexattr"] += 1
        if is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.fs.removexattr(self.inodes.node(inode), name)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """pyfuse3 does not pass the inode on, so this answers for the first branch mounted;
        cowfs.fuse.ext answers STATFS of every branch's mount with that branch's figures."""
        self.requests["statfs"] += 1
        f = self.statvfs(self.fs.primary)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(s, name, f[name])
        return s

    def statvfs(self, view: View) -> dict[str, int]:
        """What `df` shows for a branch: the store's disk, or, under a quota, the quota as
        the size and the branch's allocated bytes (inodes) as what is used."""
        host = self.fs.statfs()
        bsize = host.f_frsize
        blocks, bfree, bavail = host.f_blocks, host.f_bfree, host.f_bavail
        if view.quota_bytes:
            blocks = view.quota_bytes // bsize
            left = max(0, view.quota_bytes - view.allocated) // bsize
            bfree, bavail = min(left, bfree), min(left, bavail)
        files = 1 << 32
        ffree = max(0, files - self.fs.store.inodes_used())
        if view.quota_inodes:
            files = view.quota_inodes
            ffree = min(ffree, max(0, view.quota_inodes - view.usage_inodes))
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": blocks, "f_bfree": bfree, "f_bavail": bavail,
                "f_files": files, "f_ffree": ffree, "f_favail": ffree, "f_namemax": 255}

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.requests["access"] += 1
        return True  # default_permissions: the kernel has checked already


def _name_of_entry(entry: tuple[bytes, int]) -> bytes:
    return entry[0]


def _show(arg: Any) -> Any:
    if isinstance(arg, (bytes, memoryview)) and len(arg) > 64:
        return f"<{len(arg)} bytes>"
    if isinstance(arg, pyfuse3.RequestContext):
        return f"uid={arg.uid},pid={arg.pid}"
    if isinstance(arg, (pyfuse3.ReaddirToken, pyfuse3.EntryAttributes, pyfuse3.SetattrFields)):
        return type(arg).__name__
    return arg


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any unexpected exception into EIO for the caller: pyfuse3 would end the whole
    session (every sandbox on this daemon) on an exception that is not a FUSEError."""

    name = fn.__name__

    async def handler(self: Operations, *args: Any) -> Any:
        if trace.isEnabledFor(logging.DEBUG):  # --debug: one line per request
            trace.debug("%s%r", name, tuple(_show(a) for a in args))
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


for _name in ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink", "unlink",
              "rmdir", "rename", "link", "open", "create", "read", "write", "flush", "release", "fsync",
              "opendir", "readdir", "releasedir", "fsyncdir", "setxattr", "getxattr", "listxattr",
              "removexattr", "statfs", "access", "lseek", "fallocate"):
    setattr(Operations, _name, _guarded(getattr(Operations, _name)))
