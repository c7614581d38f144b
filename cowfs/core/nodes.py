"""The node table and the node lifecycle: the one owner of which nodes are in memory.

A Node stays in memory while the kernel holds its inode number (`lookups`: the entries we
replied with, less what FORGET gave back), while handles are open on it (`opens`), while its
data is dirty or flushing, and as its view's root; nothing else keeps it.  Every change of
`lookups` and `opens` goes through this module, which keeps each view's count of held nodes
(`View.held`): a detached tree or a retired view goes with its last held node, at no scan.
(When the FUSE layer changed the counts itself, its FORGET looked nodes up as live ones: a
deleted node was never forgotten, and every `rm -rf` leaked its nodes; tests/test_memory.py.)

Lookups of names and paths (pure reads of entries and records) live here too.
"""
from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, Callable, Iterable

from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.meta.records import Attrs, dirent_ino
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, LayerView, ino_key, name_key
from cowfs.store import ROOT_INO

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation

NAME_MAX = 255


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG)


def join_path(parent: str, name: bytes) -> str:
    """A view-relative path ("" is the root) and a name: the child's path."""
    n = name.decode("utf-8", "surrogateescape")
    return f"{parent}/{n}" if parent else n


def _held(node: Node) -> bool:
    return node.lookups > 0 or node.opens > 0


class NodeTable:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        # By view id: held nodes other than the view's root, in the live tree and in detached
        # pre-rollback trees of the same view id alike.  Their kernel inode numbers carry the
        # view's slot (cowfs.fuse.inodes), which may go to another view once this is 0.
        self.inner_held: dict[int, int] = {}
        # Told (view id, busy) when a count leaves or reaches 0 (the FUSE layer: a view whose
        # count is 0 may give its slot to another view).
        self.on_inner: Callable[[int, bool], None] | None = None

    # -- in memory ---------------------------------------------------------------------------
    def node(self, view: View, ino: int, unlinked_ok: bool = False) -> Node:
        """Node ino of view; unlinked_ok: also a dropped one still in memory (its last attributes)."""
        n = view.nodes.get(ino)
        if n is not None and (not n.deleted or unlinked_ok):
            return n
        if n is not None:
            raise FSError(errno.ENOENT)
        found = self.fs.store.meta.get(CF_INODES, ino_key(ino), view.lv)
        if found is None or not found[1]:
            raise FSError(errno.ENOENT)
        n = Node(view, ino, Attrs.unpack(found[1]), found[0])
        view.nodes[ino] = n
        return n

    def new(self, m: "Mutation", parent: Node, mode: int, uid: int, gid: int, rdev: int = 0,
            target: bytes = b"", groups: Iterable[int] = ()) -> Node:
        """A new inode under parent (mknod, mkdir, symlink, create, a whiteout), owned as the
        kernel's inode_init_owner() would: a setgid directory passes its group on (and its
        setgid bit to subdirectories); the caller's mutation links and saves it."""
        pa = parent.attrs
        caller_gid = gid
        if pa.mode & stat.S_ISGID:
            gid = pa.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        # As inode_init_owner(): a non-root caller outside the file's group loses S_ISGID.
        if (mode & stat.S_ISGID and not stat.S_ISDIR(mode) and uid != 0
                and gid != caller_gid and gid not in groups):
            mode &= ~stat.S_ISGID
        nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs = Attrs(mode, uid, gid, nlink, rdev, len(target), m.now, m.now, m.now, None, target)
        attrs.parent = parent.ino
        return self.new_copy(parent, attrs)

    def new_copy(self, parent: Node, attrs: Attrs) -> Node:
        """A new inode in parent's view with attrs (a clone's copy of another), kept in the
        node table: the caller's mutation saves it."""
        node = Node(parent.view, self.fs.store.alloc_ino(), attrs, None)
        parent.view.nodes[node.ino] = node
        return node

    @staticmethod
    def remove(node: Node) -> None:
        """node never existed (the mutation that made it failed), or is gone for good."""
        if node.view.nodes.get(node.ino) is node:
            del node.view.nodes[node.ino]

    @staticmethod
    def keep(node: Node) -> None:
        """node stays the one in memory for its inode (a failed commit reloaded it)."""
        node.view.nodes.setdefault(node.ino, node)

    def move_tree(self, view: View, old: View, new_lv: LayerView) -> None:
        """A rollback: the nodes of view's tree go to old (the detached pre-rollback tree)
        when something still needs them, and view keeps its root, reloaded from new_lv."""
        root = view.nodes.pop(ROOT_INO, None)
        for ino, node in view.nodes.items():
            node.view = old
            if _held(node):
                old.held += 1
            elif not self.fs.flusher.holds(node):
                continue  # nothing needs it: it goes now, not kept with the old tree
            old.nodes[ino] = node
        view.nodes = {}
        view.held = 1 if root is not None and _held(root) else 0
        if root is not None:
            found = self.fs.store.meta.get(CF_INODES, ino_key(ROOT_INO), new_lv)
            assert found is not None and found[1], "every layer sees the root directory"
            root.attrs = Attrs.unpack(found[1])
            root.stored_layer = found[0]
            root.stored_root = root.attrs.root
            view.nodes[ROOT_INO] = root

    # -- the lifecycle -----------------------------------------------------------------------
    def _refs(self, node: Node, lookups: int = 0, opens: int = 0) -> None:
        was = _held(node)
        node.lookups += lookups
        node.opens += opens
        now = _held(node)
        if was != now:
            node.view.held += 1 if now else -1
            if node.ino != ROOT_INO:
                vid = node.view.vid
                left = self.inner_held.get(vid, 0) + (1 if now else -1)
                if left > 0:
                    self.inner_held[vid] = left
                else:
                    self.inner_held.pop(vid, None)
                if (left == 1 and now or left <= 0) and self.on_inner is not None:
                    self.on_inner(vid, left > 0)

    def looked_up(self, node: Node) -> None:
        """The kernel got node in an entry reply (LOOKUP, CREATE, MKDIR, LINK, READDIRPLUS...)."""
        self._refs(node, lookups=1)

    def forget(self, node: Node, n: int) -> None:
        """FORGET: the kernel gives back n of its references."""
        self._refs(node, lookups=-n)
        self.evict_if_unused(node)

    def opened(self, node: Node) -> None:
        """OPEN or CREATE of node (the learned model hears of it: cowfs.core.prefetch)."""
        self._refs(node, opens=1)
        self.fs.prefetch.opened(node)

    def opened_dir(self, node: Node) -> None:
        self._refs(node, opens=1)

    async def released(self, node: Node) -> None:
        """RELEASE: the last handle of an unlinked file takes the inode with it (cowfs.core.orphans)."""
        self._refs(node, opens=-1)
        await self.fs.orphans.last_closed(node)
        self.evict_if_unused(node)

    async def released_dir(self, node: Node) -> None:
        """RELEASEDIR.  A directory removed while open (rmdir may overtake the RELEASEDIR of
        a closed handle) is an orphan until now, as a file is until its last RELEASE.  A live
        directory's node stays until the kernel forgets it."""
        if node.attrs.nlink <= 0:
            await self.released(node)
        else:
            self._refs(node, opens=-1)

    def evict_if_unused(self, node: Node) -> None:
        """Drop node from memory if nothing needs it, and its view if that was its last held
        node and the view is a detached tree or retired (a view's root stays with the view).
        Not while a flush holds its data: a second Node for the inode, loaded from the store
        meanwhile, would not know the flush's commit (its stale root would be released
        twice, the new one never).  The flush calls us again when it is done."""
        if _held(node) or self.fs.flusher.holds(node):
            return
        view = node.view
        if node.ino != ROOT_INO and view.nodes.get(node.ino) is node:
            del view.nodes[node.ino]
        if view.kind == "detached" or view.retired:
            self.fs.views.release(view)

    def figures(self) -> dict[str, int]:
        """In-memory nodes (the part of the daemon's memory that follows the kernel's inode
        cache) and how many the kernel holds."""
        views = self.fs.views.all()
        return {"nodes": sum(len(v.nodes) for v in views), "held": sum(v.held for v in views)}

    # -- names and paths (pure reads) --------------------------------------------------------
    def child_ino(self, parent: Node, name: bytes) -> int | None:
        found = self.fs.store.meta.get(CF_DIRENTS, name_key(parent.ino, name), parent.view.lv)
        if found is None or not found[1]:
            return None
        return dirent_ino(found[1])

    def lookup(self, parent: Node, name: bytes) -> Node:
        check_name(name)
        if not parent.attrs.is_dir:
            raise FSError(errno.ENOTDIR)
        ino = self.child_ino(parent, name)
        if ino is None:
            raise FSError(errno.ENOENT)
        return self.node(parent.view, ino)

    def list_dir(self, node: Node) -> list[tuple[bytes, int]]:
        if not node.attrs.is_dir:
            raise FSError(errno.ENOTDIR)
        return [(name, dirent_ino(v))
                for name, v in self.fs.store.meta.scan_names(CF_DIRENTS, node.ino, node.view.lv)]

    def dir_empty(self, node: Node) -> bool:
        for _ in self.fs.store.meta.scan_names(CF_DIRENTS, node.ino, node.view.lv):
            return False
        return True

    def path_of(self, lv: LayerView, ino: int, cache: dict[int, str | None]) -> str | None:
        """Path of inode ino in the layer view ("" for the root; None if it has no name there),
        from the (parent, name) each inode record keeps; cache memoizes the ancestors.  Pure KV
        reads: safe in a thread.  Walks up without recursion (any depth), and a parent chain
        that loops (a damaged store) has no path."""
        meta = self.fs.store.meta
        chain: list[tuple[int, bytes]] = []  # (inode, its name) from ino upwards
        seen: set[int] = set()
        cur = ino
        while True:
            if cur == ROOT_INO:
                path: str | None = ""
                break
            if cur in cache:
                path = cache[cur]
                break
            found = meta.get(CF_INODES, ino_key(cur), lv)
            if not found or not found[1] or cur in seen:
                path = None
                chain.append((cur, b""))
                break
            seen.add(cur)
            a = Attrs.unpack(found[1])
            chain.append((cur, a.name))
            if not a.parent:
                path = None
                break
            cur = a.parent
        for node_ino, name in reversed(chain):
            path = join_path(path, name) if path is not None and name else None
            cache[node_ino] = path
        return path
