"""Attributes: setattr (chmod, chown, truncate, utimens) with the deferred-SETATTR rule, and
extended attributes.

The deferred SETATTR (docs/architecture.md, "Write path and durability rules", rule 2): a
change of mode, owner or times (not the size) of a file with data waiting to be committed
changes the node in memory only, and is committed with that data by the node's next flush;
since any later operation first commits all dirty data, the prefix rule holds, and tar or
`cp -a` save three commits per file.
"""
from __future__ import annotations

import errno
import stat
import time
from typing import TYPE_CHECKING

from cowfs.core.node import Node
from cowfs.core.txn import now_ns
from cowfs.errors import FSError
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_XATTRS, name_key

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation

MAX_FILE_SIZE = (1 << 63) - 1
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


def check_xattr_name(name: bytes) -> None:
    if not name.startswith(XATTR_NAMESPACES):  # system.* (ACLs included) and unknown ones
        raise FSError(errno.EOPNOTSUPP)
    if name in XATTR_NAMESPACES:  # "user." names nothing (ext4: EINVAL)
        raise FSError(errno.EINVAL)
    if len(name) > 255:
        raise FSError(errno.ERANGE)


def cut_time(current: int, now: int) -> int:
    """A file's mtime (or ctime) after we cut it (a truncating open: FUSE's atomic O_TRUNC
    leaves the times to us).  The current time may be the kernel's, sent at the last close,
    and the kernel's file clock runs ahead of our coarse one: since Linux 6.13 it is raised
    to the last fine-grained time any filesystem handed out (multigrain timestamps).  When
    that clock still reads the file's time, the kernel keeps it and sends none, so a stamp of
    ours (now) would make the file older, in a snapshot or once the kernel forgets it, than
    the live mount showed: keep the current time when it lies between our clock and the
    fine-grained one (a time set ahead by utime is not the kernel's clock: the kernel then
    stamps its own and sends it at close)."""
    return current if now < current <= time.time_ns() else now


class Attributes:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs

    async def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, ctime_ns: int | None = None,
                      kill_suid: bool = False, user: bool = True, fenced_ok: bool = False) -> None:
        """chmod, chown, truncate, utimens.  kill_suid: clear set-user-ID (and set-group-ID
        with group-exec) as the kernel does for a truncating open by a non-root caller,
        which FUSE's atomic O_TRUNC leaves to the filesystem.  A truncate by a user (not
        the daemon itself) ends the cut of a file whose acknowledged writes were refused:
        the kernel takes the size we reply and drops its pages, so the views agree.  fenced_ok:
        that truncate, which a branch made read-only by a lost hold still takes (cowfs.core.fence)."""
        fs = self.fs
        if not fenced_ok and node.view.writable:
            fs.fences.check(node.view)  # a lost hold (cowfs.core.fence)
        if size is None and fs.flusher.is_dirty(node) and node.view.writable:
            # A file with data waiting to be committed: in writeback mode that is the kernel
            # passing on the times of a file it is still writing, or a chmod/chown right after
            # the data (tar, cp -a: the kernel writes the pages back first).  The change goes
            # with the data, in the node's next flush (any later operation commits all dirty
            # data first, so the prefix rule holds), instead of a commit of its own after a
            # flush of everything dirty: three commits fewer per file tar extracts.
            a = node.attrs
            self._set_attrs(a, mode, uid, gid, atime_ns, mtime_ns, kill_suid)
            a.ctime_ns = ctime_ns if ctime_ns is not None else now_ns()
            return
        async with fs.txn.mutate(node.view, fenced_ok=fenced_ok) as m:
            a = node.attrs
            same_size = size is not None and size == a.size
            cut = False
            if size is not None:
                if a.is_dir:
                    raise FSError(errno.EISDIR)
                if size > MAX_FILE_SIZE or size < 0:
                    raise FSError(errno.EFBIG)
                if size != a.size:  # allocates nothing: no quota to check
                    shrink = size < a.size
                    node.truncate_buffers(size, fs.store.objects)
                    fs.flusher.flush_node_into(m, node, fs.flusher.encode(node.dirty), size, cut=shrink)
                    node.dirty.clear()
                    a.mtime_ns = cut_time(a.mtime_ns, m.now)
                    cut = True
            self._set_attrs(a, mode, uid, gid, atime_ns, mtime_ns, kill_suid)
            if ctime_ns is not None:
                a.ctime_ns = ctime_ns
            elif cut:
                a.ctime_ns = cut_time(a.ctime_ns, m.now)
            elif not (a.is_reg and same_size and mode is None and uid is None and gid is None
                      and atime_ns is None and mtime_ns is None):
                # A truncate to the current size changes nothing; the kernel (which owns a
                # written file's times) does not show a new ctime for it either.
                a.ctime_ns = m.now
            if not node.deleted:  # else an unlinked FIFO or socket still open: nothing stored
                m.save(node)
        if size is not None and user and node.cap is not None:
            fs.full.truncated(node)

    @staticmethod
    def _set_attrs(a: Attrs, mode: int | None, uid: int | None, gid: int | None, atime_ns: int | None,
                   mtime_ns: int | None, kill_suid: bool) -> None:
        if kill_suid and a.is_reg:
            a.mode &= ~stat.S_ISUID
            if a.mode & stat.S_IXGRP:
                a.mode &= ~stat.S_ISGID
        if mode is not None:
            a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(mode)
        if uid is not None:
            a.uid = uid
        if gid is not None:
            a.gid = gid
        if atime_ns is not None:
            a.atime_ns = atime_ns
        if mtime_ns is not None:
            a.mtime_ns = mtime_ns

    # -- xattrs ------------------------------------------------------------------------------
    def xattr(self, node: Node, name: bytes) -> bytes | None:
        """getxattr with None for an absent name: the kernel asks for `security.capability`
        at every write(2) to a file, and the answer is almost always "absent" (the FUSE
        adapter raises its ENODATA itself: one exception per request, not two)."""
        check_xattr_name(name)
        found = self.fs.store.meta.get(CF_XATTRS, name_key(node.ino, name), node.view.lv)
        if found is None or not found[1]:
            return None
        return found[1][1:]  # leading byte keeps empty values distinct from tombstones

    def listxattr(self, node: Node) -> list[bytes]:
        fs = self.fs
        return [name for name, _ in fs.store.meta.scan_names(CF_XATTRS, node.ino, node.view.lv)]

    def copy_xattrs(self, m: "Mutation", src: Node, dst: Node) -> None:
        """Give dst (a clone's copy) src's xattrs, in m."""
        fs = self.fs
        for name, value in fs.store.meta.scan_names(CF_XATTRS, src.ino, src.view.lv):
            fs.store.meta.put(m.batch, CF_XATTRS, name_key(dst.ino, name), dst.view.lv.top, value)

    async def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        fs = self.fs
        check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG)
        async with fs.txn.mutate(node.view) as m:
            fs.store.meta.put(m.batch, CF_XATTRS, name_key(node.ino, name), node.view.lv.top, b"v" + value)
            m.touch(node, mtime=False)
            m.save(node)

    async def removexattr(self, node: Node, name: bytes) -> None:
        fs = self.fs
        async with fs.txn.mutate(node.view) as m:
            if self.xattr(node, name) is None:
                raise FSError(errno.ENODATA)
            fs.store.meta.delete(m.batch, CF_XATTRS, name_key(node.ino, name), node.view.lv)
            m.touch(node, mtime=False)
            m.save(node)
