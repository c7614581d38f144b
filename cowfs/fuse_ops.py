"""The FUSE layer: translate pyfuse3 requests to Filesystem calls and back. Nothing else.

Inode numbers: the kernel sees (view id << 44) | inode, so every branch and snapshot served
by one daemon has inode numbers of its own that stay the same across remounts; the root of
the mounted branch is FUSE's fixed ROOT_INODE (1).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from typing import Sequence

import pyfuse3

from cowfs.chunks.tree import CHUNK
from cowfs.errors import FSError
from cowfs.fs.filesystem import Filesystem
from cowfs.fs.node import Node
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)

VIEW_SHIFT = 44
INO_MASK = (1 << VIEW_SHIFT) - 1
ATTR_TIMEOUT = 60.0  # the daemon is the only writer; content changed behind the kernel is invalidated


class _Dir:
    __slots__ = ("node", "entries")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[tuple[bytes, int]] | None = None


def _err(exc: FSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.requests: Counter[str] = Counter()
        self._files: dict[int, Node] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1

    # -- inode numbers ---------------------------------------------------------------------
    def fuse_ino(self, node: Node) -> int:
        if node.ino == ROOT_INO and node.view is self.fs.primary:
            return pyfuse3.ROOT_INODE
        return (node.view.vid << VIEW_SHIFT) | node.ino

    def _node(self, fino: int) -> Node:
        try:
            if fino == pyfuse3.ROOT_INODE:
                return self.fs.node(self.fs.primary, ROOT_INO)
            view = self.fs.views.get(fino >> VIEW_SHIFT)
            if view is None:
                raise FSError(errno.ESTALE)
            return self.fs.node(view, fino & INO_MASK)
        except FSError as exc:
            raise _err(exc) from None

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attrs
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.fuse_ino(node)
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
        e.st_blocks = node.blocks()
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._entry(node)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- metadata --------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        parent = self._node(parent_inode)
        try:
            return self._looked_up(self.fs.lookup(parent, name))
        except FSError as exc:
            raise _err(exc) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        for fino, n in inode_list:
            try:
                node = self._node(fino)
            except pyfuse3.FUSEError:
                continue
            self.fs.forget(node, n)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        return self._entry(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["setattr"] += 1
        node = self._node(inode)
        try:
            await self.fs.setattr(
                node,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            )
        except FSError as exc:
            raise _err(exc) from None
        return self._entry(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["readlink"] += 1
        node = self._node(inode)
        if not stat.S_ISLNK(node.attrs.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.attrs.target

    async def _make(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                    rdev: int = 0, target: bytes = b"") -> Node:
        parent = self._node(parent_inode)
        groups: set[int] = set()
        if mode & stat.S_ISGID and ctx.uid != 0:
            groups = pyfuse3.get_sup_groups(ctx.pid)
        try:
            return await self.fs.make(parent, name, mode, ctx.uid, ctx.gid, rdev, target, groups)
        except FSError as exc:
            raise _err(exc) from None

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
        try:
            await self.fs.unlink(self._node(parent_inode), name, want_dir=False)
        except FSError as exc:
            raise _err(exc) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rmdir"] += 1
        try:
            await self.fs.unlink(self._node(parent_inode), name, want_dir=True)
        except FSError as exc:
            raise _err(exc) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rename"] += 1
        op, np = self._node(parent_inode_old), self._node(parent_inode_new)
        try:
            await self.fs.rename(op, name_old, np, name_new, flags)
        except FSError as exc:
            raise _err(exc) from None

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["link"] += 1
        node = self._node(inode)
        try:
            await self.fs.link(node, self._node(new_parent_inode), new_name)
        except FSError as exc:
            raise _err(exc) from None
        return self._looked_up(node)

    # -- files -----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR) and not node.view.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and node.attrs.size:
            try:
                await self.fs.setattr(node, size=0)
            except FSError as exc:
                raise _err(exc) from None
        return self._opened(node)

    def _opened(self, node: Node) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = node
        self.fs.opened(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.requests["create"] += 1
        node = await self._make(parent_inode, name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        return self._opened(node), self._looked_up(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        try:
            return self.fs.read(self._files[fh], off, size)  # type: ignore[return-value]
        except FSError as exc:
            raise _err(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests["write"] += 1
        try:
            return await self.fs.write(self._files[fh], off, buf)
        except FSError as exc:
            raise _err(exc) from None

    async def flush(self, fh: int) -> None:
        self.requests["flush"] += 1
        if self._files[fh] in self.fs.dirty_nodes:
            try:
                await self.fs.flush()
            except FSError as exc:
                raise _err(exc) from None

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        try:
            await self.fs.released(self._files.pop(fh))
        except FSError as exc:
            raise _err(exc) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests["fsync"] += 1
        try:
            await self.fs.fsync()
        except FSError as exc:
            raise _err(exc) from None

    # -- directories -----------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.requests["opendir"] += 1
        node = self._node(inode)
        if not node.attrs.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = _Dir(node)
        node.opens += 1
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.requests["readdir"] += 1
        d = self._dirs[fh]
        if start_id == 0 or d.entries is None:
            # Offsets index a listing taken when reading starts (again), so they stay valid
            # while entries are added or removed, and each page costs O(entries in it).
            try:
                d.entries = self.fs.list_dir(d.node)
            except FSError as exc:
                raise _err(exc) from None
        entries = d.entries
        fs, view = self.fs, d.node.view
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                child = fs.node(view, ino)
            except FSError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._entry(child), i + 1):
                break
            child.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.requests["releasedir"] += 1
        d = self._dirs.pop(fh)
        d.node.opens -= 1

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.requests["fsyncdir"] += 1
        try:
            await self.fs.fsync()
        except FSError as exc:
            raise _err(exc) from None

    # -- xattrs, statfs, access ------------------------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["setxattr"] += 1
        try:
            await self.fs.setxattr(self._node(inode), name, value)
        except FSError as exc:
            raise _err(exc) from None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["getxattr"] += 1
        try:
            return self.fs.getxattr(self._node(inode), name)
        except FSError as exc:
            raise _err(exc) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.requests["listxattr"] += 1
        return self.fs.listxattr(self._node(inode))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["removexattr"] += 1
        try:
            await self.fs.removexattr(self._node(inode), name)
        except FSError as exc:
            raise _err(exc) from None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.requests["statfs"] += 1
        host = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = host.f_frsize
        s.f_blocks = host.f_blocks
        s.f_bfree = host.f_bfree
        s.f_bavail = host.f_bavail
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = max(0, (1 << 32) - self.fs.store.inodes_used())
        s.f_namemax = 255
        return s

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.requests["access"] += 1
        return True  # default_permissions: the kernel has checked already
