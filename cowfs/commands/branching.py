"""The control file's commands: snapshot, branch, rollback, delete and list here; clone
(cowfs.commands.clone) and diff (cowfs.commands.diff) through the same facade.

Each command is O(1) in the size of the tree except clone of a directory (O(entries copied))
and diff (O(keys changed between the two sides)); see docs/architecture.md for the layer
model.  Commands act for the branch mounted where they are given and reach only what it
owns (cowfs.commands.authz; docs/architecture.md, "Authorization").
"""
from __future__ import annotations

import errno
import logging
import time
from typing import Any, Awaitable, Callable

import trio

from cowfs import homes
from cowfs.commands.authz import Caller, Mounted, Owners, absent
from cowfs.commands.clone import Cloner, InvalidateDir
from cowfs.commands.diff import Differ
from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem
from cowfs.core.view import View
from cowfs.kv.base import Batch
from cowfs.meta.layers import Branch, Snapshot, Usage
from cowfs.meta.serving import BranchServed
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)


class Branching:
    """The commands, for the branch mounted where they are given (a view) or, for delete
    and list, for the store's administrator (view None); what each may reach is decided
    by cowfs.commands.authz."""

    def __init__(self, fs: Filesystem, admin_group: int | None = None) -> None:
        self.fs = fs
        self.cat = fs.store.catalog
        self.owners = Owners(self.cat)
        self.admin_group = admin_group  # members may snapshot/branch/rollback/delete too
        self.cloner = Cloner(fs, self.owners)
        self.differ = Differ(fs, self.owners)
        # The FUSE layer's: make the kernel drop snapshots' names (cowfs.fuse.kernel).
        self.drop_snapshots: Callable[[list[str]], Awaitable[None]] | None = None

    def set_invalidate_dir(self, hook: InvalidateDir) -> None:
        """The FUSE layer's: make the kernel forget what it caches of a directory a clone changed."""
        self.cloner.invalidate_dir = hook

    # -- what a mount may reach ------------------------------------------------------------
    def _branch(self, view: View) -> Branch:
        b = self.cat.branches.get(view.name)
        if b is None or view.kind != "branch":
            raise FSError(errno.EROFS, "this view is not a branch")
        return b

    def owns_snapshot(self, view: View, s: Snapshot) -> bool:
        return self.owners.owns_snapshot(view.name, s)

    def owned_snapshots(self, view: View) -> list[Snapshot]:
        return self.owners.snapshots(view.name)

    def _require_owner(self, view: View, who: Caller) -> None:
        root = self.fs.node(view, ROOT_INO)
        if who.uid in (0, root.attrs.uid):
            return
        if self.admin_group is not None and (who.gid == self.admin_group or self.admin_group in who.groups):
            return
        group = (f"members of gid {self.admin_group} (-o ctl_group)" if self.admin_group is not None
                 else "members of a group named with -o ctl_group= (this mount names none)")
        raise FSError(errno.EPERM, f"only the owner of the mount root (uid {root.attrs.uid}), root and {group} "
                                   "may do this")

    def _usage(self, layer: int) -> Usage:
        usage = self.cat.usage(layer)
        if usage is None:
            usage = self.fs.store.count_usage(self.cat.layer_view(layer))
        return usage

    def _usage_of(self, item: Snapshot | Branch) -> Usage:
        """A branch served here counts its live usage; anything else its recorded one (none
        for what was deleted, and its layer collected, while a listing was being read)."""
        if isinstance(item, Branch):
            view = self.fs.views.get(item.view)
            if view is not None and view.kind == "branch" and not view.retired:
                return Usage(view.usage_bytes, view.usage_inodes, view.allocated)
            layer = item.head
        else:
            layer = item.layer
        if layer not in self.cat.parents:
            return Usage(0, 0, 0)
        return self._usage(layer)

    # -- commands --------------------------------------------------------------------------
    async def snapshot(self, view: View, name: str, who: Caller) -> dict[str, Any]:
        self._require_owner(view, who)
        await self.fs.sync_kernel()
        t0 = time.perf_counter()
        # A branch made read-only by a lost hold (cowfs.core.fence) still snapshots: its tree
        # stays as it is, and the snapshot is what its user pushes under a name of their own.
        async with self.fs.mutate(view, fenced_ok=True) as m:
            self.owners.name_free(view.name, name)
            b = self._branch(view)
            layer = self.fs.freeze_head(m, view)
            self.cat.save_snapshot(Snapshot(name, layer, self.cat.new_view(m.batch), b.name), m.batch)
        return {"snapshot": name, "branch": b.name, "layer": layer,
                "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def branch(self, view: View, name: str, source: str | None, who: Caller,
                     own_daemon: bool = False) -> dict[str, Any]:
        """From the mounted branch's current state or from a snapshot it owns.  own_daemon:
        the branch gets a home database of its own (docs/design-many-processes.md, "Step 6"),
        made and durable before the catalog names it; this daemon's database, where its branch
        point is, is flushed before the reply, so that the new daemon's read-only open of it
        replays almost no WAL."""
        self._require_owner(view, who)
        store = self.fs.store
        if own_daemon and store.objects.fetcher is not None:
            raise FSError(errno.EINVAL, "a lazy mount's store serves all its branches from its own daemon: "
                                        "--own-daemon is not available there")
        if not own_daemon and store.home is not None:
            # Its head would be a layer of the store's database (no home) over this home's:
            # a database no daemon of that branch could read below it, written here.
            raise FSError(errno.EINVAL, f"branch {view.name!r} is served by a daemon of its own: a branch made "
                                        "from it has a daemon of its own too (branch-home, `cowfs branch "
                                        "--own-daemon`)")
        current = source is None or source == view.name
        if current:
            await self.fs.sync_kernel()
        t0 = time.perf_counter()
        if not own_daemon:
            return await self._branch_in(view, name, source, current, t0, None)
        self.owners.name_free(view.name, name)  # refused before a home is made for it
        # Made before the mutation, outside Filesystem.lock: other mutations and flushes of
        # this daemon do not wait for it (issue 22: in-daemon branch cost unchanged).
        home = await store.in_thread(homes.make, store.path, store.liveness)
        try:
            reply = await self._branch_in(view, name, source, current, t0, home)
        except BaseException:
            named = home.id in self.cat.homes.values()  # a compare-and-set that landed after all
            with trio.CancelScope(shield=True):
                await store.in_thread(home.close if named else home.discard)
            raise
        await store.in_thread(home.close)
        t1 = time.perf_counter()
        await store.in_thread(store.engine.flush, python=False)
        return {**reply, "home": home.id, "flush_ms": round((time.perf_counter() - t1) * 1000, 3)}

    async def _branch_in(self, view: View, name: str, source: str | None, current: bool, t0: float,
                         home: homes.NewHome | None) -> dict[str, Any]:
        """branch's mutation: the new branch's head in this database, or in home (made
        before, open): the head's usage record written there and synced in a worker thread
        before the publication, the mutation holding the lock meanwhile (a few ms)."""
        async with self.fs.mutate(view, fenced_ok=True, awaits=home is not None) as m:  # the new branch is written
            self.owners.name_free(view.name, name)
            src_branch = self._branch(view)
            parent_branch = view.name
            if current:
                parent_layer = self.fs.freeze_head(m, view)
                parent_name = view.name
                usage = Usage(view.usage_bytes, view.usage_inodes, view.alloc_bytes)
            else:
                assert source is not None
                found = self.owners.owned(view.name, source)
                if isinstance(found, Branch):
                    raise FSError(errno.EINVAL, f"branch from another branch ({source!r}) is done through its "
                                                "own mount, or from one of its snapshots")
                if found is None:
                    raise absent(source)
                owner = self.cat.branches.get(found.branch) if found.branch is not None else None
                assert owner is not None, "an owned snapshot belongs to a live branch"
                parent_layer = found.layer
                parent_name = source
                self.cat.keep(source, m.batch)  # published only while the snapshot stands
                usage = self._usage(found.layer)
                src_branch, parent_branch = owner, owner.name
            home_id = None if home is None else home.id
            head = self.cat.new_layer(parent_layer, m.batch, home=home_id)
            self.cat.save_branch(Branch(name, head, self.cat.new_view(m.batch), parent=parent_name,
                                        parent_branch=parent_branch, quota_bytes=src_branch.quota_bytes,
                                        quota_inodes=src_branch.quota_inodes, home=home_id),
                                 m.batch)
            if home is None:
                self.cat.save_usage(head, usage, m.batch)
            else:  # the layer's records live in its home: durable there, before the publication
                records = Batch()
                self.cat.save_usage(head, usage, records)
                try:
                    await self.fs.store.in_thread(home.seal, records)
                except BaseException:
                    self.fs.txn.abandon(m)
                    raise
        return {"branch": name, "from": parent_name, "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def rollback(self, view: View, name: str, who: Caller) -> tuple[dict[str, Any], list[bytes]]:
        """Only to a snapshot of the mounted branch itself.  Return the result and the root's
        old names, whose kernel dentries must be invalidated."""
        self._require_owner(view, who)
        t0 = time.perf_counter()
        async with self.fs.mutate(view) as m:
            s = self.owners.snapshot(view.name, name)
            if s.branch != view.name:
                raise FSError(errno.EINVAL, f"snapshot {name!r} belongs to branch {s.branch!r}: a branch rolls back "
                                            f"only to its own snapshots (make a branch from {name!r} instead)")
            b = self._branch(view)
            old_names = [n for n, _ in self.fs.list_dir(self.fs.node(view, ROOT_INO))]
            self.cat.enqueue(b.head, m.batch)  # the old head: no one writes it any more
            b.head = self.cat.new_layer(s.layer, m.batch, home=b.home)
            b.epoch += 1
            self.cat.save_branch(b, m.batch)
            new_lv = self.cat.layer_view(b.head)
            usage = self._usage(s.layer)
            self.cat.save_usage(b.head, usage, m.batch)
        self.fs.detach(view, new_lv, b.epoch)
        # Logged so that what a process saw can be matched with the epoch in its inode numbers.
        log.info("branch %s rolled back to snapshot %s: layer %d, epoch %d", b.name, name, b.head, b.epoch)
        view.usage_bytes, view.usage_inodes, view.alloc_bytes = usage
        self.fs.schedule_gc()
        return ({"rollback": name, "branch": b.name, "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)},
                old_names)

    async def delete(self, view: View | None, name: str, who: Caller | None,
                     mounted: Callable[[], Mounted]) -> dict[str, Any]:
        """Through a mount (view): what its branch owns, never a mounted branch.  view None:
        the store's administrator (the admin socket checked who it is): any snapshot, any
        branch that is not mounted.  The mounts are read inside the mutation, where nothing
        else runs until the commit."""
        if view is not None:
            assert who is not None
            self._require_owner(view, who)
        # The scope of a catalog-only change: no node of the view is touched.
        async with self.fs.mutate(view or self.fs.primary, fenced_ok=True) as m:
            kind = self.owners.check_delete(view.name if view is not None else None, name, mounted())
            if kind == "branch":
                try:  # served by another process (a daemon of its own: design step 6)
                    self.fs.store.serving.check(name)
                except BranchServed as exc:
                    raise FSError(errno.EBUSY, f"branch {name!r} is mounted: {exc}") from None
            self.cat.remove(name, m.batch)
            learner = self.fs.prefetch.learner
            if kind == "branch" and learner is not None:
                learner.forget(name, m.batch)
        self.fs.drop_views(name)
        self.fs.schedule_gc()
        if kind == "snapshot" and self.drop_snapshots is not None and any(v.name == name for v in self.fs.views):
            # The kernel still holds the deleted snapshot's view (its name under .cowfs/snapshots
            # stays in its cache until dropped): make it forget it, so the view goes and the
            # next garbage-collection pass compacts its layer.  After the commit, outside the
            # lock: the kernel sends its FORGETs meanwhile.
            await self.drop_snapshots([name])
        log.info("%s %s deleted %s", kind, name,
                 f"through the mount of {view.name}" if view is not None else "by the administrator")
        return {"deleted": name, "kind": kind}

    def listing(self, view: View | None, mounted: Mounted) -> dict[str, Any]:
        return self.owners.listing(view.name if view is not None else None, self._usage_of, mounted)

    async def clone(self, view: View, src: str, dst: str, who: Caller) -> dict[str, Any]:
        return await self.cloner.clone(view, src, dst, who)

    async def diff(self, view: View | None, a: str, b: str | None) -> dict[str, Any]:
        return await self.differ.diff(view, a, b)

    async def cold_start(self, view: View, snapshot: str) -> dict[str, Any]:
        """What this branch learned its mounts read first (cowfs.cache.learned), for a push
        of its snapshot (cowfs.fleet.push): the model's files, in the order they were first
        read, that lie in the directories of its cold-start list, as their paths in the
        snapshot (inode numbers mean nothing on another store) with the chunk numbers read.
        A file the snapshot does not hold is left out; no model: no files.  `model`: the
        whole prefetch model as paths in the snapshot (pushed as `model/<id>`, cowfs.fleet.model)."""
        if view.kind != "branch":
            raise FSError(errno.EROFS, "this view is not a branch")
        found = self.owners.owned(view.name, snapshot)
        if not isinstance(found, Snapshot):
            raise absent(snapshot)
        learner = self.fs.prefetch.learner
        if learner is None:
            return {"snapshot": snapshot, "dirs": 0, "files": [], "model": {"files": [], "next": []}}
        m = learner.model(view.name)
        dirs = list(m.cold_start())
        files = [(ino, m.chunks_of(ino)) for ino in m.chunks]
        bits, nxt = dict(m.chunks), {a: dict(s) for a, s in m.next.items()}
        lv = self.cat.layer_view(found.layer)

        def paths() -> tuple[list[list[Any]], dict[str, Any]]:   # pure KV reads of a frozen layer: in a thread
            cache: dict[int, str | None] = {}
            where = {p for p in (self.fs.path_of(lv, d, cache) for d in dirs) if p is not None}
            out: list[list[Any]] = []
            for ino, chunks in files:
                p = self.fs.path_of(lv, ino, cache)
                if p and chunks and p.rpartition("/")[0] in where:
                    out.append([p, chunks])
            # The whole model as paths (cowfs.fleet.model): its files (chunk bitmask) and transitions.
            index: dict[int, int | None] = {}
            model: list[list[Any]] = []
            for ino in [*bits, *(i for a, s in nxt.items() for i in (a, *s))]:
                if ino not in index:
                    p = self.fs.path_of(lv, ino, cache)
                    index[ino] = len(model) if p else None
                    if p:
                        model.append([p, bits.get(ino, 0)])
            trans = [[index[a], [[index[b], c] for b, c in s.items() if index.get(b) is not None]]
                     for a, s in nxt.items() if index.get(a) is not None]
            return out, {"files": model, "next": [t for t in trans if t[1]]}

        async with self.fs.maintenance:     # the snapshot's layer stays while the thread reads it
            out, model = await self.fs.store.in_thread(paths)
            return {"snapshot": snapshot, "dirs": len(dirs), "files": out, "model": model}
