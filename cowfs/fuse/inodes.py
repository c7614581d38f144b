"""The inode numbers the kernel sees, and the nodes behind them.

  real inodes     (view id << 48) | (epoch % 4096 << 36) | inode   (the mounted branch's
                  root is FUSE's ROOT_INODE; other views' roots use epoch 0)
  control nodes   (owner view id << 8) | kind   (view-id field 0: .cowfs and what is in it,
                  cowfs.fuse.controlfs)

View ids are never reused and a branch's epoch changes only on rollback, so st_ino is the
same across remounts and the restored tree never shares kernel inodes (or page cache) with
the pre-rollback one that open handles still use.
"""
from __future__ import annotations

import errno

import pyfuse3

from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import EPOCHS
from cowfs.errors import FSError
from cowfs.store import ROOT_INO

VIEW_SHIFT = 48
EPOCH_SHIFT = 36
INO_MASK = (1 << EPOCH_SHIFT) - 1


def is_control(fino: int) -> bool:
    """Whether fino names a node of a `.cowfs` control namespace."""
    return fino >> VIEW_SHIFT == 0 and fino != pyfuse3.ROOT_INODE


def control_ino(vid: int, kind: int) -> int:
    return (vid << 8) | kind


def control_parts(fino: int) -> tuple[int, int]:
    """(view id, kind) of a control node's number."""
    return fino >> 8, fino & 0xFF


class Inodes:
    """Kernel inode numbers to nodes and back, for the views of one Filesystem."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    def fuse_ino(self, node: Node) -> int:
        view = node.view
        if node.ino == ROOT_INO:
            return pyfuse3.ROOT_INODE if view is self.fs.primary else (view.vid << VIEW_SHIFT) | ROOT_INO
        return (view.vid << VIEW_SHIFT) | ((view.epoch % EPOCHS) << EPOCH_SHIFT) | node.ino

    def node(self, fino: int, unlinked_ok: bool = False) -> Node:
        """The node behind a kernel inode number.  unlinked_ok: also one whose last name is
        gone while the kernel still holds it (fstat of an open FIFO, socket or directory)."""
        fs = self.fs
        if fino == pyfuse3.ROOT_INODE:
            return fs.node(fs.primary, ROOT_INO)
        vid = fino >> VIEW_SHIFT
        view = fs.views.get(vid)
        if view is None:
            raise FSError(errno.ESTALE)
        ino = fino & INO_MASK
        epoch = (fino >> EPOCH_SHIFT) & (EPOCHS - 1)
        if ino != ROOT_INO and epoch != view.epoch % EPOCHS:
            old = fs.views.detached.get((vid, epoch))
            node = old.nodes.get(ino) if old is not None else None
            if node is None:
                raise FSError(errno.ESTALE)
            if node.deleted and not unlinked_ok:  # unlinked before the rollback, only the kernel knows it
                raise FSError(errno.ENOENT)
            return node
        return fs.node(view, ino, unlinked_ok)

    def live(self, fino: int) -> Node:
        """The node behind fino, for a lookup, open or change through it: not one of a tree a
        rollback replaced.  Open handles keep working in such a tree, but a name resolved in
        it would put new files where no path reaches them.  Walks reach it from a directory
        fd or a current directory inside the old tree; should a path walk from the mount
        root ever meet a dentry of it, ESTALE makes the kernel redo the walk with
        LOOKUP_REVAL, which revalidates each dentry and lands in the restored tree."""
        node = self.node(fino)
        if node.view.kind == "detached":
            raise FSError(errno.ESTALE)
        return node

    def held(self, fino: int) -> Node | None:
        """The node in memory behind a kernel inode number, whatever its state: deleted, in
        a detached tree, in a retired view.  None if there is none (nothing to forget)."""
        fs = self.fs
        if fino == pyfuse3.ROOT_INODE:
            return fs.primary.nodes.get(ROOT_INO)
        vid, ino = fino >> VIEW_SHIFT, fino & INO_MASK
        epoch = (fino >> EPOCH_SHIFT) & (EPOCHS - 1)
        view = fs.views.get(vid)
        if view is None or (ino != ROOT_INO and epoch != view.epoch % EPOCHS):
            view = fs.views.detached.get((vid, epoch))
        return view.nodes.get(ino) if view is not None else None
