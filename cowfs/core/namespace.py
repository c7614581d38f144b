"""Namespace operations: make (mknod, mkdir, symlink, create), unlink and rmdir, link, and
rename (renameat2's NOREPLACE, EXCHANGE and WHITEOUT), each one mutation, with the index of
the names of hard-linked files (cowfs.meta.links) kept in the same batch."""
from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, Iterable

from cowfs.core.node import Node
from cowfs.core.nodes import check_name
from cowfs.errors import FSError
from cowfs.meta import links
from cowfs.meta.records import dirent_ino
from cowfs.meta.versioned import CF_DIRENTS, name_key

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation

# renameat2 flags (linux/fs.h): the kernel filters unknown ones and the EXCHANGE combinations
# itself, but FUSE carries the raw value, so the core checks them again.
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT


class Namespace:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs

    async def make(self, parent: Node, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                   target: bytes = b"", groups: Iterable[int] = ()) -> Node:
        """mknod, mkdir, symlink and create: a new inode linked under parent."""
        fs = self.fs
        check_name(name)
        async with fs.txn.mutate(parent.view) as m:
            if not parent.attrs.is_dir:
                raise FSError(errno.ENOTDIR)
            if parent.attrs.nlink == 0:
                raise FSError(errno.ENOENT)
            if fs.nodes.child_ino(parent, name) is not None:
                raise FSError(errno.EEXIST)
            parent.view.check_quota(more_inodes=1)
            if fs.store.space_low(0, metadata=True):
                raise FSError(errno.ENOSPC, "the store's disk is (nearly) full")
            node = fs.nodes.new(m, parent, mode, uid, gid, rdev, target, groups)
            if stat.S_ISDIR(mode):
                parent.attrs.nlink += 1
            m.link(parent, name, node)
            m.touch(parent)
            m.save(node)
            m.save(parent)
        return node

    async def unlink(self, parent: Node, name: bytes, want_dir: bool) -> None:
        fs = self.fs
        check_name(name)
        async with fs.txn.mutate(parent.view) as m:
            ino = fs.nodes.child_ino(parent, name)
            if ino is None:
                raise FSError(errno.ENOENT)
            node = fs.nodes.node(parent.view, ino)
            self._check_replaceable(node, want_dir)
            m.unlink(parent, name)
            m.touch(parent)
            self._unnamed(m, node, parent, name)
            m.save(parent)
            if node.attrs.nlink <= 0:
                fs.orphans.release_inode(m, node)
            else:
                m.save(node)

    # -- the names of hard-linked files (cowfs.meta.links) ----------------------------------
    def _names_of(self, node: Node) -> list[tuple[int, bytes]]:
        """node's names as committed: its record's (parent, name) and its index keys, each
        checked against the entry (a store from before format 6 may have kept a stale one)."""
        fs = self.fs
        a, lv = node.attrs, node.view.lv
        out = links.names_of(fs.store.meta, node.ino, lv)
        if a.parent and (a.parent, a.name) not in out:
            found = fs.store.meta.get(CF_DIRENTS, name_key(a.parent, a.name), lv)
            if found and found[1] and dirent_ino(found[1]) == node.ino:
                out.append((a.parent, a.name))
        return out

    def more_names(self, m: "Mutation", node: Node, parent: Node, name: bytes) -> None:
        """node, not a directory, gets the name (parent, name) (its link count counts it
        already): index it, and when the count just became 2, the name it had."""
        a = node.attrs
        if a.is_dir or a.nlink < 2:
            return
        if a.nlink == 2:
            for first in self._names_of(node):
                m.index_name(node, *first)
        m.index_name(node, parent.ino, name)

    def _name_gone(self, m: "Mutation", node: Node, parent: int, name: bytes) -> None:
        """node, not a directory, lost the name (parent, name) and its link count is already
        lowered.  Down to one name: the record says which, and the index forgets the inode."""
        if node.attrs.nlink < 1:
            return
        m.unindex_name(node, parent, name)
        if node.attrs.nlink > 1:
            return
        left = [n for n in self._names_of(node) if n != (parent, name)]
        if left:
            node.attrs.parent, node.attrs.name = left[0]
        for p, n in links.names(self.fs.store.meta, node.ino, node.view.lv):
            if (p, n) != (parent, name):
                m.unindex_name(node, p, n)

    def _check_replaceable(self, node: Node, as_dir: bool) -> None:
        """node may lose its name to rmdir (as_dir), unlink, or a rename of a directory
        (as_dir) or of anything else over it: the errno POSIX gives when it may not."""
        if as_dir:
            if not node.attrs.is_dir:
                raise FSError(errno.ENOTDIR)
            if not self.fs.nodes.dir_empty(node):
                raise FSError(errno.ENOTEMPTY)
        elif node.attrs.is_dir:
            raise FSError(errno.EISDIR)

    def _unnamed(self, m: "Mutation", node: Node, parent: Node, name: bytes) -> None:
        """node lost its name in parent (unlink, rmdir, replaced by a rename): its link
        count, and its parent's for a directory, the index of names, its ctime."""
        if node.attrs.is_dir:
            parent.attrs.nlink -= 1
            node.attrs.nlink = 0
        else:
            node.attrs.nlink -= 1
            self._name_gone(m, node, parent.ino, name)
        m.touch(node, mtime=False)

    async def link(self, node: Node, parent: Node, name: bytes) -> None:
        fs = self.fs
        check_name(name)
        if node.view is not parent.view:
            raise FSError(errno.EROFS if not parent.view.writable else errno.EXDEV)
        async with fs.txn.mutate(parent.view) as m:
            if node.attrs.is_dir:
                raise FSError(errno.EPERM)
            if node.attrs.nlink == 0:
                raise FSError(errno.ENOENT)
            if fs.nodes.child_ino(parent, name) is not None:
                raise FSError(errno.EEXIST)
            node.attrs.nlink += 1
            self.more_names(m, node, parent, name)
            m.link(parent, name, node)
            m.touch(parent)
            m.touch(node, mtime=False)
            m.save(node)
            m.save(parent)

    async def rename(self, op: Node, oname: bytes, np: Node, nname: bytes, flags: int,
                     uid: int = 0, gid: int = 0) -> None:
        """rename and renameat2.  RENAME_WHITEOUT (overlayfs's upper directories use it) puts
        a whiteout at the old name in the same commit: a character device 0/0 with no
        permission bits, owned by the caller (uid, gid), as the kernel's own filesystems do."""
        fs = self.fs
        check_name(oname)
        check_name(nname)
        if flags & ~RENAME_FLAGS:
            raise FSError(errno.EINVAL, f"unknown rename flags {flags & ~RENAME_FLAGS:#x}")
        noreplace = bool(flags & RENAME_NOREPLACE)
        exchange = bool(flags & RENAME_EXCHANGE)
        whiteout = bool(flags & RENAME_WHITEOUT)
        if exchange and (noreplace or whiteout):
            raise FSError(errno.EINVAL)
        if not op.view.writable or not np.view.writable:
            raise FSError(errno.EROFS)
        if np.view is not op.view:  # another branch's tree: another filesystem, as far as rename goes
            raise FSError(errno.EXDEV)
        wo: Node | None = None
        async with fs.txn.mutate(op.view) as m:
            sino = fs.nodes.child_ino(op, oname)
            if sino is None:
                raise FSError(errno.ENOENT)
            src = fs.nodes.node(op.view, sino)
            dino = fs.nodes.child_ino(np, nname)
            dst = fs.nodes.node(np.view, dino) if dino is not None else None
            if dst is not None and noreplace:
                raise FSError(errno.EEXIST)
            if exchange:
                if dst is None:
                    raise FSError(errno.ENOENT)
                for n, old, new in ((src, (op.ino, oname), (np.ino, nname)), (dst, (np.ino, nname), (op.ino, oname))):
                    if n.attrs.nlink > 1 and not n.attrs.is_dir:
                        m.unindex_name(n, *old)
                        m.index_name(n, *new)
                m.link(np, nname, src)
                m.link(op, oname, dst)
                if op is not np and src.attrs.is_dir != dst.attrs.is_dir:
                    d = 1 if src.attrs.is_dir else -1
                    op.attrs.nlink -= d
                    np.attrs.nlink += d
                m.touch(src, dst, mtime=False)
                m.touch(op, np)
                for n in {id(x): x for x in (src, dst, op, np)}.values():
                    m.save(n)
                return
            if dst is src:
                return
            if dst is not None:
                self._check_replaceable(dst, src.attrs.is_dir)
            if whiteout:
                op.view.check_quota(more_inodes=1)
                if fs.store.space_low(0, metadata=True):
                    raise FSError(errno.ENOSPC, "the store's disk is (nearly) full")
                wo = fs.nodes.new(m, op, stat.S_IFCHR, uid, gid)
                m.link(op, oname, wo)  # replaces the old entry in the same batch
                m.save(wo)
            else:
                m.unlink(op, oname)
            if src.attrs.nlink > 1 and not src.attrs.is_dir:
                m.unindex_name(src, op.ino, oname)
                m.index_name(src, np.ino, nname)
            m.link(np, nname, src)
            if dst is not None:
                self._unnamed(m, dst, np, nname)
            if src.attrs.is_dir and op is not np:
                op.attrs.nlink -= 1
                np.attrs.nlink += 1
            m.touch(src, mtime=False)
            m.touch(op, np)
            m.save(src)
            m.save(op)
            if np is not op:
                m.save(np)
            if dst is not None:
                if dst.attrs.nlink <= 0:
                    fs.orphans.release_inode(m, dst)
                else:
                    m.save(dst)
        if wo is not None:
            fs.nodes.evict_if_unused(wo)  # the kernel learns of it by a lookup, if ever
