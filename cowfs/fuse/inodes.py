"""The inode numbers the kernel sees, and the nodes behind them.

  real inodes     (slot << 48) | (epoch % 4096 << 36) | inode       slot 1..65535
  view roots      1 << 47 | view id          (the mounted branch's root is FUSE's ROOT_INODE)
  control nodes   1 << 46 | view id << 3 | kind   (.cowfs and what is in it, cowfs.fuse.controlfs)

Snapshot, branch and view ids are 64-bit counters in the store and never reused, so a store
cannot run out of them; only the kernel's 64-bit inode numbers are short.  Roots and control
nodes carry the view id itself (up to 2^47 and 2^43 views: stable, unique, never recycled).
Every other inode carries a *slot*: a 16-bit number this mount gives a view while the kernel
holds any of its inodes besides its root (`NodeTable.inner_held`, detached pre-rollback
trees of the view included), and takes back for another view only once the kernel has
forgotten all of them.  A view prefers slot 1 + (view id - 1) % slots, so below 65,536
views every view keeps the slot it had (and `st_ino` is the same across remounts); beyond
that, inode numbers are unique among the inodes the kernel holds at once and stable while
it holds them, which is what `find`, `du`, `tar` and hard-link detection need during a walk.
When slots run short the daemon asks the kernel to drop idle snapshot views
(`Reclaimer`); a request that finds every slot taken by inodes the kernel holds fails with
ENFILE (logged).  A branch's epoch changes only on rollback, so the restored tree never
shares kernel inodes (or page cache) with the pre-rollback one that open handles still use.
docs/architecture.md, "Inode numbers and identifiers that never run out".
"""
from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from typing import Callable

import pyfuse3
import trio

from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import EPOCHS, View
from cowfs.errors import FSError
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)

SLOT_SHIFT = 48
EPOCH_SHIFT = 36
INO_MASK = (1 << EPOCH_SHIFT) - 1
SLOTS = (1 << 16) - 1  # slot 0 holds the roots, the control nodes and FUSE's ROOT_INODE
ROOT_BIT = 1 << 47
CTL_BIT = 1 << 46
CTL_KIND_BITS = 3
MAX_ROOT_VID = ROOT_BIT - 1
MAX_CTL_VID = (CTL_BIT >> CTL_KIND_BITS) - 1
SLOT_WAIT = 5.0  # seconds a request waits for the kernel to forget idle views when slots are short


# Control node kinds: .cowfs, ctl, stats, snapshots/, by-view/ (cowfs.fuse.controlfs).
K_DIR, K_CTL, K_STATS, K_SNAPS, K_BYVIEW = 1, 2, 3, 4, 5


def is_control(fino: int) -> bool:
    """Whether fino names a node of a `.cowfs` control namespace."""
    return fino >> 46 == 1


def control_ino(vid: int, kind: int) -> int:
    if vid > MAX_CTL_VID:
        raise FSError(errno.EOVERFLOW, f"view id {vid} is beyond what control inode numbers hold")
    return CTL_BIT | (vid << CTL_KIND_BITS) | kind


def control_parts(fino: int) -> tuple[int, int]:
    """(view id, kind) of a control node's number."""
    return (fino & (CTL_BIT - 1)) >> CTL_KIND_BITS, fino & ((1 << CTL_KIND_BITS) - 1)


def root_ino(vid: int) -> int:
    if vid > MAX_ROOT_VID:
        raise FSError(errno.EOVERFLOW, f"view id {vid} is beyond what root inode numbers hold")
    return ROOT_BIT | vid


def _inner_ino(slot: int, view: View, ino: int) -> int:
    """The number of inode ino (not the root) of view, which has the slot."""
    return (slot << SLOT_SHIFT) | ((view.epoch % EPOCHS) << EPOCH_SHIFT) | ino


class SlotsFull(FSError):
    def __init__(self, held: int) -> None:
        super().__init__(errno.ENFILE, f"all {held} inode-number slots belong to views whose inodes the "
                                       "kernel holds (see docs/architecture.md, \"Inode numbers and identifiers that never run out\")")


class Slots:
    """Slot <-> view id for this mount.  A slot whose view has no inner inode held by the
    kernel is *idle*: it stays with its view (the same numbers if the view is used again)
    until another view needs it, oldest idle first."""

    def __init__(self, limit: int, held: Callable[[int], int]) -> None:
        if not 1 <= limit <= SLOTS:
            raise ValueError(f"slots must be 1..{SLOTS}")
        self.limit = limit
        self.held = held  # a view id's held inner inodes (NodeTable.inner_held)
        self.of_vid: dict[int, int] = {}
        self.vid_of: dict[int, int] = {}
        self.free = set(range(1, limit + 1))
        self.idle: OrderedDict[int, None] = OrderedDict()  # view ids with an idle slot, oldest first
        self.recycled = 0
        self.refused = 0
        self.changed = trio.Event()  # set when a slot frees or goes idle

    def preferred(self, vid: int) -> int:
        return 1 + (vid - 1) % self.limit

    def went(self, vid: int, busy: bool) -> None:
        """NodeTable.on_inner: the kernel now holds inner inodes of view vid, or none."""
        if busy:
            self.idle.pop(vid, None)
        elif vid in self.of_vid:
            self.idle[vid] = None
            self.changed.set()

    def available(self) -> int:
        """Slots a view could take now: free and idle ones."""
        return len(self.free) + len(self.idle)

    def get(self, vid: int) -> int:
        """The view's slot, given now if it has none; SlotsFull if every slot is held."""
        slot = self.of_vid.get(vid)
        if slot is not None:
            return slot
        want = self.preferred(vid)
        if want in self.free:
            self.free.discard(want)
            slot = want
        elif self.vid_of.get(want) in self.idle:
            slot = self._take(self.vid_of[want])
        elif self.free:
            slot = self.free.pop()
        elif self.idle:
            slot = self._take(next(iter(self.idle)))
        else:
            self.refused += 1
            raise SlotsFull(self.limit)
        self.of_vid[vid] = slot
        self.vid_of[slot] = vid
        if self.held(vid) <= 0:
            self.idle[vid] = None  # given for a number the kernel may not keep (a listing's "..")
        return slot

    def _take(self, old: int) -> int:
        """Recycle the idle slot of view id old (the kernel holds no inner inode of it)."""
        del self.idle[old]
        slot = self.of_vid.pop(old)
        del self.vid_of[slot]
        self.recycled += 1
        return slot

    def to_drop(self, want: int, droppable: Callable[[int], bool]) -> list[int]:
        """Up to want view ids whose slot the kernel holds and that droppable accepts, least
        recently given (or asked to drop) first; each goes to the back of that order, so
        views the kernel keeps (something in use in them) do not hide the others."""
        out = [vid for vid in self.of_vid if vid not in self.idle and droppable(vid)][:want]
        for vid in out:
            self.of_vid[vid] = self.of_vid.pop(vid)
        return out

    def figures(self) -> dict[str, int]:
        return {"limit": self.limit, "given": len(self.of_vid), "idle": len(self.idle),
                "recycled": self.recycled, "refused": self.refused}


class Inodes:
    """Kernel inode numbers to nodes and back, for the views of one Filesystem."""

    def __init__(self, fs: Filesystem, slots: int = SLOTS) -> None:
        self.fs = fs
        self.slots = Slots(slots, lambda vid: fs.nodes.inner_held.get(vid, 0))
        fs.nodes.on_inner = self.slots.went
        self.short = trio.Event()  # slots are running short: the Reclaimer drops idle views
        self._warned = 0.0

    def _root(self, view: View) -> int:
        """The number of view's root."""
        return pyfuse3.ROOT_INODE if view is self.fs.primary else root_ino(view.vid)

    def fuse_ino(self, node: Node) -> int:
        """node's number, for a reply that gives it to the kernel (its view gets a slot)."""
        view = node.view
        if node.ino == ROOT_INO:
            return self._root(view)
        if node.ino > INO_MASK:
            raise FSError(errno.EOVERFLOW, f"inode {node.ino} is beyond what kernel inode numbers hold")
        try:
            slot = self.slots.get(view.vid)
        except SlotsFull:  # a reply that could not wait (Inodes.ready): the reclaimer starts
            self.short.set()
            self._refused()
            raise
        if self.slots.available() * 8 < self.slots.limit:
            self.short.set()
        return _inner_ino(slot, view, node.ino)

    def known(self, node: Node) -> int | None:
        """node's number if the kernel can hold it (for an invalidation), else None."""
        return self.known_ino(node.view, node.ino)

    def known_ino(self, view: View, ino: int) -> int | None:
        if ino == ROOT_INO:
            return self._root(view)
        slot = self.slots.of_vid.get(view.vid)
        return _inner_ino(slot, view, ino) if slot is not None else None

    async def ready(self, view: View) -> None:
        """Before a reply that may give the kernel inner inodes of view: when every slot is
        held, have idle snapshot views dropped and wait (up to SLOT_WAIT) for the kernel to
        forget one; ENFILE if none goes."""
        slots = self.slots
        if view.vid in slots.of_vid or slots.available():
            return
        if any(self.droppable(vid) for vid in slots.of_vid):
            self.short.set()
            with trio.move_on_after(SLOT_WAIT):
                while not slots.available():
                    if slots.changed.is_set():
                        slots.changed = trio.Event()
                    await slots.changed.wait()
        if not slots.available():
            slots.refused += 1
            self._refused()
            raise SlotsFull(slots.limit)

    def _refused(self) -> None:
        now = time.monotonic()
        if now - self._warned > 10:
            self._warned = now
            log.warning("all %d inode-number slots are held by views the kernel uses: a request was refused "
                        "with ENFILE (the kernel forgets views once nothing of them is in use)",
                        self.slots.limit)

    def _view_of(self, fino: int) -> tuple[View | None, int]:
        """(view, inode) behind a kernel inode number: the view live or, for a number of an
        earlier epoch, the detached pre-rollback tree; None if there is no such view."""
        fs = self.fs
        if fino == pyfuse3.ROOT_INODE:
            return fs.primary, ROOT_INO
        if fino >> SLOT_SHIFT == 0:
            return (fs.views.get(fino & MAX_ROOT_VID) if fino & ROOT_BIT else None), ROOT_INO
        vid = self.slots.vid_of.get(fino >> SLOT_SHIFT)
        if vid is None:
            return None, 0
        epoch = (fino >> EPOCH_SHIFT) & (EPOCHS - 1)
        view = fs.views.get(vid)
        if view is None or epoch != view.epoch % EPOCHS:
            view = fs.views.detached.get((vid, epoch))
        return view, fino & INO_MASK

    def node(self, fino: int, unlinked_ok: bool = False) -> Node:
        """The node behind a kernel inode number.  unlinked_ok: also one whose last name is
        gone while the kernel still holds it (fstat of an open FIFO, socket or directory)."""
        view, ino = self._view_of(fino)
        if view is None:
            raise FSError(errno.ESTALE)
        if view.kind != "detached":
            return self.fs.node(view, ino, unlinked_ok)
        node = view.nodes.get(ino)  # a detached tree is what memory holds of it
        if node is None:
            raise FSError(errno.ESTALE)
        if node.deleted and not unlinked_ok:  # unlinked before the rollback, only the kernel knows it
            raise FSError(errno.ENOENT)
        return node

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
        view, ino = self._view_of(fino)
        return view.nodes.get(ino) if view is not None else None

    def droppable(self, vid: int) -> bool:
        """Whether the kernel can be asked to drop view vid: a snapshot (its name goes, and
        is looked up again at the next use, as every use of a snapshot's name does)."""
        view = self.fs.views.get(vid)
        return view is not None and view.kind == "snapshot"

    def snapshot_entries(self, views: list[View]) -> list[tuple[int, bytes]]:
        """The entries (directory, name) through which the kernel may hold these snapshot
        views: their names under the `.cowfs/snapshots` of every branch this daemon serves,
        and the name of each inode of theirs it holds (dropping the name alone would leave
        the dentries below one in use when it was dropped cached once it is no longer)."""
        dirs = [control_ino(v.vid, K_SNAPS) for v in self.fs.views if v.kind == "branch"]
        out = []
        for view in views:
            name = view.name.encode("utf-8", "surrogateescape")
            out += [(d, name) for d in dirs]
            for node in list(view.nodes.values()):
                if node.lookups > 0 and node.ino != ROOT_INO and node.attrs.parent and node.attrs.name:
                    parent = self.known_ino(view, node.attrs.parent)
                    if parent is not None:
                        out.append((parent, node.attrs.name))
        return out
