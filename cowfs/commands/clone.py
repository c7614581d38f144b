"""`clone SRC DST`: copy a file or a directory tree in O(1), sharing its data and metadata.

A file's clone copies its inode record (the tree root included) and adds one reference to
the root.  A directory's clone writes its top's record and entry and one `Clone` record
(cowfs.meta.shared): the copies of everything under it read as the originals of a frozen
layer until written, keeping hard links inside the tree; the branch head is frozen first
(as by a snapshot) when the original is in the branch.  Paths are relative to the mount
root; SRC may go through `.cowfs/snapshots/NAME/` into a snapshot the branch owns.  Checks
are those `cp` would meet: search permission on the way, read permission on what is copied,
write permission on the target's directory.  Reading every entry (for an unprivileged caller,
who must be able to read what the copy will let them own, or for a branch with a quota, which
needs the copy's size before accepting it) is a walk of the frozen original in a worker
thread: the event loop never waits for it.  Otherwise the copies' usage is measured after the
clone, in the background (cowfs.background.cloning).
"""
from __future__ import annotations

import contextlib
import errno
import posixpath
import stat
import time
from typing import Any, Awaitable, Callable

from cowfs.commands.authz import Caller, Owners, may
from cowfs.commands.protocol import CONTROL_DIR, SNAPSHOTS_DIR
from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem, Mutation
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.meta.layers import Usage
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Clone
from cowfs.meta.versioned import CF_INODES, CF_XATTRS, ino_key, name_key
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
        # Set by the daemon: wake the task that measures clones' usage (cowfs.background.cloning).
        self.measure_wanted: Callable[[], None] = lambda: None

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

    def _checked(self, view: View, src: str, dst: str, who: Caller) -> tuple[Node, Node, bytes]:
        """(source node, target's parent, target name), every check passed."""
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
        if not may(snode.attrs, who, 4 | (1 if snode.attrs.is_dir else 0)):
            raise FSError(errno.EACCES, f"no read permission on {src!r}")
        if snode.attrs.is_dir and (snode.view is view and self._is_ancestor(snode, dparent)):
            raise FSError(errno.EINVAL, "cannot clone a directory into itself")
        return snode, dparent, dname

    async def clone(self, view: View, src: str, dst: str, who: Caller) -> dict[str, Any]:
        await self.fs.sync_kernel()
        t0 = time.perf_counter()
        walk = who.uid != 0 or bool(view.quota_bytes or view.quota_inodes)
        c: Clone | None = None
        # A directory's clone commits after the freeze of the original's layer, which is
        # published alone (a catalog change carries no other write into the layer it makes:
        # docs/architecture.md, "Branches and snapshots"), and a walked one awaits in
        # between: garbage collection must not merge that layer away meanwhile (it is no
        # snapshot's), so the clone holds `maintenance`, as diff does.
        _, source, _ = self.resolve(view, src, who)
        held = (self.fs.maintenance if walk or (source is not None and source.attrs.is_dir)
                else contextlib.nullcontext())
        try:
            async with held:
                async with self.fs.mutate(view) as m:
                    snode, dparent, dname = self._checked(view, src, dst, who)
                    top, is_dir = snode.ino, snode.attrs.is_dir
                    if not is_dir:
                        if view.quota_bytes or view.quota_inodes:
                            view.check_quota(self.fs.allocated(snode) if snode.attrs.is_reg else 0, 1)
                        self._copy_file(m, snode, dparent, dname, who)
                    elif snode.view.writable:  # the original as it is now: the branch head, frozen
                        layer = self.fs.freeze_head(m, view)
                    else:  # a snapshot's layer
                        layer = snode.view.lv.top
                        if not walk:
                            c = self._clone_dir(m, view, top, dparent, dname, who, layer, None)
                if is_dir and c is None:
                    usage = await self._walk(top, layer, who) if walk else None
                    async with self.fs.mutate(view) as m:
                        # The target is checked again (the tree may have changed meanwhile);
                        # the original is the frozen one (the walk read it).
                        _, dparent, dname = self._checked(view, src, dst, who)
                        if usage is not None:
                            view.check_quota(usage.allocated, usage.inodes + 1)
                        c = self._clone_dir(m, view, top, dparent, dname, who, layer, usage)
        except BaseException:
            if c is not None:  # its commit failed: the clone was never there
                self.fs.store.meta.shared.clones_committed(removed=[c])
            raise
        for n in (snode, dparent):
            self.fs.evict_if_unused(n)
        await self.invalidate_dir(dparent, [dname])  # a new name, nlink and times, behind the kernel
        if c is not None and not c.measured:
            self.measure_wanted()  # after the invalidation: its walk's thread competes for the GIL
        out: dict[str, Any] = {"cloned": src, "to": dst}
        if c is None:
            out["entries"] = 1
        elif c.measured:  # the tree was read (see the module's docstring): the copies it made
            out["inodes"] = 1 + c.usage[1]
        return {**out, "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def _walk(self, top: int, layer: int, who: Caller) -> Usage:
        """Read every entry of the frozen original (in a worker thread): what the copies add
        to the usage, and, for an unprivileged caller, that each can be read."""
        store = self.fs.store
        probe = Clone(0, top, layer, layer, 0)

        def check(a: Attrs, name: bytes) -> None:
            if not may(a, who, 4 | (1 if a.is_dir else 0)):
                raise FSError(errno.EACCES, f"no read permission on {name.decode(errors='replace')!r}")

        usage = await store.in_thread(store.measure_clone, probe, check if who.uid != 0 else None)
        assert usage is not None
        return usage

    def _clone_dir(self, m: Mutation, view: View, top: int, dparent: Node, dname: bytes, who: Caller,
                   layer: int, usage: Usage | None) -> Clone:
        """The copy's top (a record of its own, its xattrs) and the clone record for everything
        under it, from the original top as the frozen layer has it."""
        fs = self.fs
        meta = fs.store.meta
        shared = meta.shared
        lv = fs.store.catalog.layer_view(layer)
        found = meta.get(CF_INODES, ino_key(top), lv)
        if found is None or not found[1]:
            raise FSError(errno.ENOENT, "the clone's source is gone")
        attrs = Attrs.unpack(found[1])
        attrs.ctime_ns = m.now
        if who.uid != 0:
            attrs.uid, attrs.gid = who.uid, who.gid
        node = fs.new_copy(dparent, attrs)
        m.link(dparent, dname, node)
        for name, value in meta.scan_names(CF_XATTRS, top, lv):
            meta.put(m.batch, CF_XATTRS, name_key(node.ino, name), view.lv.top, value)
        m.save(node)
        c = Clone(node.ino, top, layer, view.lv.top, m.now, who.uid if who.uid != 0 else -1,
                  who.gid if who.uid != 0 else -1, usage is not None, tuple(usage) if usage is not None else (0, 0, 0))
        shared.add_clone(c, m.batch)
        if usage is not None:
            view.usage_bytes += usage.logical
            view.usage_inodes += usage.inodes
            view.alloc_bytes += usage.allocated
        m.touch(dparent)
        dparent.attrs.nlink += 1
        m.save(dparent)
        fs.evict_if_unused(node)
        # Known before the commit (nothing reads the new entry until then); `clone` forgets
        # it if the commit fails.
        shared.clones_committed(added=[c])
        return c

    def _copy_file(self, m: Mutation, src: Node, parent: Node, name: bytes, who: Caller) -> None:
        """Copy a file's record (sharing its data tree) under parent/name."""
        fs = self.fs
        attrs = src.attrs.copy()
        attrs.nlink = 1
        attrs.ctime_ns = m.now
        if who.uid != 0:
            attrs.uid, attrs.gid = who.uid, who.gid
            attrs.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        node = fs.new_copy(parent, attrs)
        m.link(parent, name, node)
        fs.copy_xattrs(m, src, node)
        m.save(node)
        m.touch(parent)
        m.save(parent)
        fs.evict_if_unused(node)

    def _is_ancestor(self, a: Node, b: Node) -> bool:
        node = b
        while True:
            if node.ino == a.ino:
                return True
            if node.ino == ROOT_INO or not node.attrs.parent:
                return False
            node = self.fs.node(node.view, node.attrs.parent)
