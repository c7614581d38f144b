"""`diff A [B]`: the paths added, removed, modified or renamed from A to B, from the keys that
changed between the two sides (the changelog of the layers on one side's ancestry but not
the other's), never a walk of the trees: its cost is proportional to what changed.

Each side names every path of a changed inode (docs/architecture.md, "Hard links and diff"):
the changed entries that name it, its record's (parent, name) and, for a hard-linked file,
the index of its names (cowfs.meta.links).  "modified" means content, size, mode, owner,
mtime, symlink target or xattrs differ, not ctime, atime or the link count (as `diff -r`).
"""
from __future__ import annotations

import errno
import stat
import time
from typing import Any, Iterable

from cowfs.commands.authz import Owners, absent
from cowfs.errors import FSError
from cowfs.commands.reply import Rows
from cowfs.core.filesystem import Filesystem, join_path
from cowfs.core.txn import Mutation
from cowfs.core.view import View
from cowfs.meta import links
from cowfs.meta.layers import Branch, Snapshot
from cowfs.meta.records import Attrs, dirent_ino
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, ino_key, key_ino, key_name, name_key
from cowfs.store import ROOT_INO

# Diffs up to this many changed keys (and layers between the sides) run on the event loop;
# larger ones in a worker thread on frozen layers.
INLINE_KEYS = 4096
INLINE_LAYERS = 256
# In a worker thread, the diff lets go of the GIL every so many keys for a moment: the event
# loop would otherwise wait up to the interpreter's switch interval (5 ms) at each of the
# several wake-ups a request takes (a stat + open + read in another branch: 16 ms median,
# 80 ms p99 on a loaded 2-core machine without it).
YIELD_EVERY = 128


def _yield_gil() -> None:
    time.sleep(0.0001)


def _between(la: LayerView, lb: LayerView) -> set[int]:
    """The layers on one side's ancestry but not the other's: where the changes are (O(depth):
    140 ms for two sides a million layers deep)."""
    return set(la.ancestors) ^ set(lb.ancestors)  # type: ignore[call-overload]


class Differ:
    def __init__(self, fs: Filesystem, owners: Owners) -> None:
        self.fs = fs
        self.owners = owners

    def side(self, view: View | None, name: str | None) -> LayerView:
        """A side of a diff: the live view (name None or the view's branch), or a snapshot or
        branch the caller owns (view None: the store's administrator owns all)."""
        if view is not None and (name is None or name == view.name):
            return view.lv
        if name is None:
            raise FSError(errno.EINVAL, "a store-wide diff needs two names: A and B")
        found = self.owners.owned(view.name if view is not None else None, name)
        if isinstance(found, Snapshot):
            return self.fs.store.catalog.layer_view(found.layer)
        if isinstance(found, Branch):
            return self.fs.store.catalog.layer_view(found.head)
        raise absent(name)

    def _resolve(self, lv: LayerView, ino: int, cand: Iterable[tuple[int, bytes]],
                 cache: dict[int, str | None]) -> set[str]:
        """Paths, among the candidate (parent, name) entries, that name ino in this view."""
        meta = self.fs.store.meta
        out = set()
        for parent, name in cand:
            found = meta.get(CF_DIRENTS, name_key(parent, name), lv)
            if found and found[1] and dirent_ino(found[1]) == ino:
                ppath = self.fs.path_of(lv, parent, cache)
                if ppath is not None:
                    out.add(join_path(ppath, name))
        return out

    def _paths(self, lv: LayerView, ino: int, a: Attrs, cand: set[tuple[int, bytes]],
               cache: dict[int, str | None]) -> set[str]:
        """Every path of ino in this view: the changed entries that name it, its record's
        (parent, name) and, for a file with more than one name (or whose record names an
        entry that is gone: a store from before format 6), the index of its names."""
        found = self._resolve(lv, ino, cand | {(a.parent, a.name)}, cache)
        if a.is_dir:
            return found
        ppath = self.fs.path_of(lv, a.parent, cache) if a.parent else None
        if a.nlink > 1 or ppath is None or join_path(ppath, a.name) not in found:
            found |= self._resolve(lv, ino, links.names(self.fs.store.meta, ino, lv), cache)
        return found

    async def diff(self, view: View | None, a: str, b: str | None) -> dict[str, Any]:
        """Paths added, removed, modified or renamed from A to B, from the changed keys only.

        A diff of a few thousand changed keys runs on the event loop without a checkpoint
        (one consistent state); a larger one (or one whose sides differ by a directory clone,
        which expands into its whole tree) runs in a worker thread on frozen layers, so the
        request loop keeps serving every branch meanwhile: see `_frozen_sides`.  The reply's
        changes are made as it is read (cowfs.commands.reply)."""
        if b is None or view is None:  # a live tree: include what the kernel and we still buffer
            await self.fs.sync_kernel()
            await self.fs.flush()
        la, lb = self.side(view, a), self.side(view, b)
        layers = _between(la, lb)
        if self._small(layers):
            changes = self.changes(la, lb, layers)
        else:
            store = self.fs.store
            # Garbage collection (and the sharer) wait until the thread is done: the versions
            # it reads stay, and no range or clone is removed under it.
            async with self.fs.maintenance:
                la, lb = await self._frozen_sides(view, a, b)
                changes = await store.in_thread(self.changes, la, lb)
        return {"from": a, "to": b if b is not None else "(live)",
                "changes": Rows(changes, _row, len(changes))}

    def _small(self, layers: set[int]) -> bool:
        """Whether the diff over these layers (`_between` its sides) is cheap enough for the
        event loop: at most INLINE_KEYS changed keys over at most INLINE_LAYERS layers, and
        no clone or range to expand."""
        if len(layers) > INLINE_LAYERS:
            return False
        shared = self.fs.store.meta.shared
        if any(c.seen in layers for c in shared.clones.values()) or any(r.layer in layers for r in shared.ranges.values()):
            return False
        n = 0
        for layer in layers:
            for _ in self.fs.store.meta.changed(layer, shared=False):
                n += 1
                if n > INLINE_KEYS:
                    return False
        return True

    async def _frozen_sides(self, view: View | None, a: str, b: str | None) -> tuple[LayerView, LayerView]:
        """The two sides again, as layers no one writes any more: a branch side's head is
        frozen (as a snapshot freezes it, the branch moving to a fresh child layer) unless
        it holds no change, when its parent sees the same.  In one mutation: every
        acknowledged write is in, and nothing runs between the resolution and the freeze."""
        fs = self.fs
        cat = fs.store.catalog
        out = []
        async with fs.mutate(view or fs.primary, fenced_ok=True) as m:  # freezes heads: changes no tree
            for name in (a, b):
                lv = self.side(view, name)
                branch = None
                if view is not None and (name is None or name == view.name):
                    branch = cat.branches.get(view.name)
                elif name in cat.branches:
                    branch = cat.branches[name]
                if branch is not None and branch.head == lv.top:
                    lv = self._freeze(m, branch)
                out.append(lv)
        return out[0], out[1]

    def _freeze(self, m: Mutation, branch: Branch) -> LayerView:
        fs = self.fs
        cat = fs.store.catalog
        head = branch.head
        if next(iter(fs.store.meta.changed(head, shared=False)), None) is None:
            frozen = cat.parents[head]  # an empty head reads as its parent, which no one writes
            if frozen:
                return cat.layer_view(frozen)
        served = [v for v in fs.views if v.kind == "branch" and v.name == branch.name]
        if served:
            frozen = fs.freeze_head(m, served[0])
        else:  # a branch no one serves here: its catalog entry and usage record only
            usage = cat.usage(head)
            branch.head = cat.new_layer(head, m.batch)
            cat.save_branch(branch, m.batch)
            if usage is not None:
                cat.save_usage(branch.head, usage, m.batch)
            frozen = head
        return cat.layer_view(frozen)

    def changes(self, la: LayerView, lb: LayerView, layers: set[int] | None = None) -> list[Change]:
        """The changes from la to lb, sorted by path: pure KV reads, safe in a worker thread
        on frozen layers (the views' ancestries are read once, by the caller).  layers:
        `_between(la, lb)` when the caller has it already.

        The inodes to look at are those whose record, entries or xattrs changed between the
        sides; each side names every path of such an inode (`_paths`), so a hard link's
        unchanged names show on both sides, a change of a hard-linked file is reported at
        each of its paths, and only real changes are reported.  "modified": content, size,
        mode, owner, mtime, symlink target or xattrs differ (not ctime, atime, link count)."""
        meta = self.fs.store.meta
        inos: set[int] = set()
        xinos: set[int] = set()
        entries: dict[int, set[tuple[int, bytes]]] = {}
        steps = 0
        for layer in layers if layers is not None else _between(la, lb):
            for cf, base in meta.changed(layer):
                steps += 1
                if steps % YIELD_EVERY == 0:
                    _yield_gil()
                if cf == CF_LINKS:  # a name's key changes with its entry, which is here too
                    continue
                if cf != CF_DIRENTS:
                    inos.add(key_ino(base))
                    if cf == CF_XATTRS:
                        xinos.add(key_ino(base))
                    continue
                for lv in (la, lb):
                    found = meta.get(CF_DIRENTS, base, lv)
                    if found and found[1]:
                        child = dirent_ino(found[1])
                        entries.setdefault(child, set()).add((key_ino(base), key_name(base)))
        ca: dict[int, str | None] = {}
        cb: dict[int, str | None] = {}
        changes: list[Change] = []
        for ino in sorted(inos | entries.keys()):
            steps += 1
            if steps % YIELD_EVERY == 0:
                _yield_gil()
            if ino == ROOT_INO:
                continue
            ra, rb = meta.get(CF_INODES, ino_key(ino), la), meta.get(CF_INODES, ino_key(ino), lb)
            va, vb = (ra[1] if ra else b""), (rb[1] if rb else b"")
            if not va and not vb:
                continue
            aa, ab = (Attrs.unpack(va) if va else None), (Attrs.unpack(vb) if vb else None)
            cand = entries.pop(ino, set())
            na = self._paths(la, ino, aa, cand, ca) if aa else set()
            nb = self._paths(lb, ino, ab, cand, cb) if ab else set()
            kind = _kind((ab or aa).mode)  # type: ignore[union-attr]
            if aa is None or ab is None:
                change, paths = ("added", nb) if aa is None else ("removed", na)
                changes += [(p, change, kind, None) for p in paths]
                continue
            if na != nb:
                if len(na) == 1 and len(nb) == 1:
                    changes.append((next(iter(nb)), "renamed", kind, next(iter(na))))
                else:
                    changes += [(p, "added", kind, None) for p in nb - na]
                    changes += [(p, "removed", kind, None) for p in na - nb]
            same = (aa.root, aa.size, aa.mode, aa.uid, aa.gid, aa.mtime_ns, aa.target) == \
                   (ab.root, ab.size, ab.mode, ab.uid, ab.gid, ab.mtime_ns, ab.target)
            if same and ino in xinos:
                same = dict(meta.scan_names(CF_XATTRS, ino, la)) == dict(meta.scan_names(CF_XATTRS, ino, lb))
            if not same:
                changes += [(p, "modified", kind, None) for p in nb]
        changes.sort(key=lambda c: (c[0], c[1]))
        return changes


# (path, change, type, from): compact while a reply waits to be read; a row of the reply each.
Change = tuple[str, str, str, "str | None"]


def _row(c: Change) -> dict[str, Any]:
    path, change, kind, came_from = c
    if came_from is None:
        return {"change": change, "path": path, "type": kind}
    return {"change": change, "path": path, "from": came_from, "type": kind}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "special"
