"""`clone SRC DST`: copy a file or a directory tree in O(1) per entry, sharing its data.

A file's clone copies its inode record (the tree root included) and adds one reference to
the root; a directory's clone copies the records of every entry under it, keeping hard
links inside the tree.  Paths are relative to the mount root; SRC may go through
`.cowfs/snapshots/NAME/` into a snapshot the branch owns.  Checks are those `cp` would
meet: search permission on the way, read permission on what is copied, write permission on
the target's directory.  Trees are walked with explicit stacks, never by recursion, so any
depth clones (a tree 3,000 levels deep overflowed Python's recursion limit).
"""
from __future__ import annotations

import errno
import posixpath
import stat
import time
from typing import Any, Awaitable, Callable, Iterator

from cowfs.commands.authz import Caller, Owners, may
from cowfs.commands.protocol import CONTROL_DIR, SNAPSHOTS_DIR
from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem, Mutation
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.store import ROOT_INO

# Make the kernel drop what it caches of a directory (its attributes and listing) and of
# some of its names (dentries, negative ones too): set by the FUSE layer.
InvalidateDir = Callable[[Node, list[bytes]], Awaitable[None]]


async def no_invalidation(node: Node, names: list[bytes]) -> None:
    return None


class Cloner:
    def __init__(self, fs: Filesystem, owners: Owners) -> None:
        self.fs = fs
        self.owners = owners
        self.invalidate_dir: InvalidateDir = no_invalidation

    def resolve(self, view: View, path: str, who: Caller) -> tuple[Node, Node | None, bytes]:
        """(parent node, node or None, last name) of a path relative to the mount root.

        The path may go through .cowfs/snapshots/NAME/ into a snapshot the branch owns;
        it may not escape the mount, and symlinks are not followed.
        """
        norm = posixpath.normpath(path)
        if not path or path.startswith("/") or norm == ".." or norm.startswith("../"):
            raise FSError(errno.EINVAL, f"path {path!r} must be relative to the mount root and stay inside it")
        parts = [p.encode("utf-8", "surrogateescape") for p in norm.split("/") if p not in ("", ".")]
        if not parts:
            raise FSError(errno.EINVAL, "the mount root itself cannot be cloned or replaced")
        node = self.fs.node(view, ROOT_INO)
        if parts[0] == CONTROL_DIR:
            if len(parts) < 4 or parts[1] != SNAPSHOTS_DIR:
                raise FSError(errno.EINVAL, "inside .cowfs only snapshots/NAME/PATH can be named")
            snap = self.owners.snapshot(view.name, parts[2].decode("utf-8", "surrogateescape"))
            node = self.fs.node(self.fs.snapshot_view(snap), ROOT_INO)
            parts = parts[3:]
        for p in parts[:-1]:
            if not may(node.attrs, who, 1):
                raise FSError(errno.EACCES, f"no search permission on a directory of {path!r}")
            prev, node = node, self.fs.lookup(node, p)
            self.fs.evict_if_unused(prev)  # a node only this walk loaded goes again
            if not node.attrs.is_dir:
                raise FSError(errno.ENOTDIR, f"a component of {path!r} is not a directory")
        if not may(node.attrs, who, 1):
            raise FSError(errno.EACCES, f"no search permission on a directory of {path!r}")
        ino = self.fs.child_ino(node, parts[-1])
        child = self.fs.node(node.view, ino) if ino is not None else None
        return node, child, parts[-1]

    async def clone(self, view: View, src: str, dst: str, who: Caller) -> dict[str, Any]:
        await self.fs.sync_kernel()
        t0 = time.perf_counter()
        async with self.fs.mutate(view) as m:
            _, snode, _ = self.resolve(view, src, who)
            if snode is None:
                raise FSError(errno.ENOENT, f"clone source {src!r} does not exist")
            dparent, dnode, dname = self.resolve(view, dst, who)
            if not dparent.view.writable:
                raise FSError(errno.EROFS, f"clone target {dst!r} is inside a read-only snapshot")
            if dparent.view is not view:
                raise FSError(errno.EINVAL, f"clone target {dst!r} must be in the mounted branch")
            if dnode is not None:
                raise FSError(errno.EEXIST, f"clone target {dst!r} already exists")
            if dparent.ino == ROOT_INO and dname == CONTROL_DIR:
                raise FSError(errno.EEXIST, ".cowfs is reserved")
            if not may(dparent.attrs, who, 3):
                raise FSError(errno.EACCES, f"no write permission in the directory of {dst!r}")
            if snode.attrs.is_dir and (snode.view is view and self._is_ancestor(snode, dparent)):
                raise FSError(errno.EINVAL, "cannot clone a directory into itself")
            if view.quota_bytes or view.quota_inodes:
                view.check_quota(*self._measure(snode))
            count = self._copy_tree(m, snode, dparent, dname, who)
            m.touch(dparent)
            if snode.attrs.is_dir:
                dparent.attrs.nlink += 1
            m.save(dparent)
        for n in (snode, dparent):
            self.fs.evict_if_unused(n)
        await self.invalidate_dir(dparent, [dname])  # a new name, nlink and times, behind the kernel
        return {"cloned": src, "to": dst, "entries": count,
                "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)}

    def _measure(self, src: Node) -> tuple[int, int]:
        """(allocated bytes, inodes) a clone of src adds.  The stack holds the inode numbers
        of directories still to list, so no more than one node at a time stays loaded."""
        if not src.attrs.is_dir:
            return (self.fs.allocated(src) if src.attrs.is_reg else 0), 1
        total, count = 0, 1
        fs, view = self.fs, src.view
        pending: list[int] = []
        directory: Node | None = src
        while directory is not None:
            for _name, cino in fs.list_dir(directory):
                child = fs.node(view, cino)
                count += 1
                if child.attrs.is_dir:
                    pending.append(cino)
                elif child.attrs.is_reg:
                    total += fs.allocated(child)
                fs.evict_if_unused(child)
            if directory is not src:
                fs.evict_if_unused(directory)
            directory = fs.node(view, pending.pop()) if pending else None
        return total, count

    def _is_ancestor(self, a: Node, b: Node) -> bool:
        node = b
        while True:
            if node.ino == a.ino:
                return True
            if node.ino == ROOT_INO or not node.attrs.parent:
                return False
            node = self.fs.node(node.view, node.attrs.parent)

    def _copy_tree(self, m: Mutation, top: Node, parent: Node, name: bytes, who: Caller) -> int:
        """Copy top's record (sharing its data tree) under parent/name, and every entry under
        it; return the entries copied.  Depth first, one stack frame per directory being
        copied: (source directory, its copy, the entries left to copy)."""
        fs = self.fs
        copies: dict[int, Node] = {}  # source inode with several names -> its copy
        stack: list[tuple[Node, Node, Iterator[tuple[bytes, int]]]] = []
        count = 0

        def copy(src: Node, parent: Node, name: bytes) -> None:
            nonlocal count
            count += 1
            if not may(src.attrs, who, 4 | (1 if src.attrs.is_dir else 0)):
                raise FSError(errno.EACCES, f"no read permission on {name.decode(errors='replace')!r}")
            if src.ino in copies:  # a second hard link inside the copied tree
                node = copies[src.ino]
                node.attrs.nlink += 1
                fs.more_names(m, node, parent, name, new=True)
                m.link(parent, name, node)
                m.save(node)
                return
            attrs = src.attrs.copy()
            attrs.nlink = 2 if attrs.is_dir else 1
            attrs.ctime_ns = m.now
            if who.uid != 0:
                attrs.uid, attrs.gid = who.uid, who.gid
                attrs.mode &= ~(stat.S_ISUID | stat.S_ISGID) if not attrs.is_dir else ~0
            node = fs.new_copy(parent, attrs)
            m.link(parent, name, node)
            fs.copy_xattrs(m, src, node)
            if attrs.is_dir:
                stack.append((src, node, iter(fs.list_dir(src))))
                return
            if src.attrs.nlink > 1:
                copies[src.ino] = node
            m.save(node)
            fs.evict_if_unused(node)

        copy(top, parent, name)
        while stack:
            src, node, entries = stack[-1]
            entry = next(entries, None)
            if entry is not None:
                child = fs.node(src.view, entry[1])
                copy(child, node, entry[0])
                if not child.attrs.is_dir:
                    fs.evict_if_unused(child)
                continue
            stack.pop()  # every entry of this directory is copied: its record is complete
            m.save(node)
            fs.evict_if_unused(node)
            if stack:
                stack[-1][1].attrs.nlink += 1  # a subdirectory's ".."
                fs.evict_if_unused(src)
        return count
