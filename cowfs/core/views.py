"""The view registry: the branches and snapshots this filesystem serves (each a `View` over a
layer of the catalog), the pre-rollback trees open handles still use (detached views), and
the views of deleted snapshots and branches the kernel still holds (retired).

A detached or retired view goes with its last held node (`NodeTable` tells `release`);
until then garbage collection spares its layer (`live_tops`).
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Iterator

from cowfs.core.view import EPOCHS, View
from cowfs.errors import FSError
from cowfs.meta.layers import Snapshot
from cowfs.meta.lineage import Ancestry, Lineage
from cowfs.meta.versioned import LayerView

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation


def _extended(ancestors: Ancestry, layer: int) -> Lineage:
    """ancestors and layer: O(1) for a Lineage (a snapshot costs the same after a million)."""
    return ancestors.plus(layer) if isinstance(ancestors, Lineage) else Lineage.of(ancestors).plus(layer)


class Views:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self._live: dict[int, View] = {}  # by view id: branches, snapshots, retired ones
        # Pre-rollback trees still referenced by open handles, by (view id, epoch % EPOCHS).
        self.detached: dict[tuple[int, int], View] = {}

    def get(self, vid: int) -> View | None:
        return self._live.get(vid)

    def __iter__(self) -> Iterator[View]:
        return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)

    def _add(self, vid: int, name: str, kind: str, top: int, epoch: int = 0) -> View:
        lv = self.fs.store.catalog.layer_view(top)
        view = View(vid, name, kind, lv, epoch)
        self._live[vid] = view
        return view

    def branch_view(self, name: str) -> View:
        """The view of a branch (created once).  Its orphans of a previous daemon are not
        removed here: see attach_branch."""
        b = self.fs.store.catalog.branches.get(name)
        if b is None:
            raise FSError(errno.ENOENT, f"no branch named {name!r}")
        view = self._live.get(b.view)
        if view is None:
            view = self._add(b.view, b.name, "branch", b.head, b.epoch)
            view.quota_bytes, view.quota_inodes = b.quota_bytes, b.quota_inodes
            self.fs.usage.load(view)
        return view

    async def attach_branch(self, name: str) -> View:
        """The view of a branch about to be served, its orphans of a previous daemon removed
        first, as an ordinary mutation: under the lock whenever a flush holds it (a threaded
        flush has judged chunks present that freeing an orphan could otherwise take away
        before its commit)."""
        b = self.fs.store.catalog.branches.get(name)
        fresh = b is not None and b.view not in self._live
        view = self.branch_view(name)
        if fresh:
            async with self.fs.txn.mutate(view, fenced_ok=True) as m:
                self.fs.orphans.remove_left(view, m)
        return view

    def snapshot_view(self, snap: Snapshot) -> View:
        view = self._live.get(snap.view)
        if view is None:
            view = self._add(snap.view, snap.name, "snapshot", snap.layer)
        return view

    def drop(self, name: str) -> None:
        """A snapshot or branch was deleted.  Its view stays (and garbage collection spares
        its layer) while the kernel still holds inodes of it, as for unlinked files; then it
        goes and its inode numbers become stale."""
        for vid, v in list(self._live.items()):
            if v.name == name and v.kind != "detached" and v is not self.fs.primary:
                v.retired = True
                if v.held <= 0:
                    del self._live[vid]

    def release(self, view: View) -> None:
        """The last node of a detached or retired view went: so does the view (and garbage
        collection may take its layer)."""
        if view.kind == "detached":
            if not view.nodes and self.detached.pop((view.vid, view.epoch % EPOCHS), None) is not None:
                self.fs.schedule_gc()
        elif view.retired and view.held <= 0:
            if self._live.pop(view.vid, None) is not None:
                self.fs.schedule_gc()

    def live_tops(self) -> set[int]:
        """Layers someone can still read from: the catalog's, and views the kernel still uses."""
        return (self.fs.store.catalog.leaves() | {v.lv.top for v in self.detached.values()}
                | {v.lv.top for v in self._live.values()})

    def detach(self, view: View, new_lv: LayerView, epoch: int) -> None:
        """After a rollback: move the cached tree aside (open handles keep it), restore the root."""
        old = View(view.vid, view.name, "detached", view.lv, view.epoch)
        old.alloc_pending, view.alloc_pending = view.alloc_pending, 0  # it goes with the nodes
        # Writes through handles opened before go on counting against the branch's quota
        # (from what the branch had), as they did.
        old.quota_bytes, old.quota_inodes = view.quota_bytes, view.quota_inodes
        old.usage_bytes, old.usage_inodes, old.alloc_bytes = view.usage_bytes, view.usage_inodes, view.alloc_bytes
        self.fs.nodes.move_tree(view, old, new_lv)
        view.lv = new_lv
        view.epoch = epoch
        if old.nodes:
            self.detached[(old.vid, old.epoch % EPOCHS)] = old

    def freeze_head(self, m: "Mutation", view: View) -> int:
        """Freeze the branch head (return it) and move the branch to a fresh child layer:
        for a snapshot, a branch, or the sharer (whose ranges read from frozen layers)."""
        catalog = self.fs.store.catalog
        b = catalog.branches.get(view.name)
        if b is None or view.kind != "branch":
            raise FSError(errno.EROFS, "this view is not a branch")
        frozen = b.head
        b.head = catalog.new_layer(frozen, m.batch, home=b.home)  # a fork's head stays in its home
        catalog.save_branch(b, m.batch)
        view.lv = LayerView(b.head, _extended(view.lv.ancestors, b.head))
        m.views.add(view)  # the new head starts with the frozen layer's usage
        return frozen

    def records_moved(self, src: int, dst: int, inos: list[int]) -> None:
        """Garbage collection merged layer src into dst, moving these inodes' records: nodes
        in memory whose record was src's now have it in dst, in every view (each sees dst
        too: src was no top and dst its only child).  Not only views whose top is dst: a
        later merge may carry the record on into another view's head (A into S, then S into
        the head), where a save overwrites it and must release its reference; a node left
        saying A released nothing, and the first data's count stayed one too high."""
        for view in [*self._live.values(), *self.detached.values()]:
            for ino in inos:
                node = view.nodes.get(ino)
                if node is not None and node.stored_layer == src:
                    node.stored_layer = dst

    def layers_reshaped(self) -> None:
        """Layers went (merged or dead): views' ancestries are made again from the catalog,
        so they do not keep layers that are no more (they would only cost memory: a layer
        that went holds no key, and its id is never reused)."""
        cat = self.fs.store.catalog
        for view in [*self._live.values(), *self.detached.values()]:
            if view.lv.top in cat.parents:
                view.lv = cat.layer_view(view.lv.top)
        self.fs.store.meta.forget_views()

    def figures(self) -> dict[str, int]:
        return {"views": len(self._live), "detached_views": len(self.detached)}

    def all(self) -> list[View]:
        """Every view, detached ones included."""
        return list(self._live.values()) + list(self.detached.values())
