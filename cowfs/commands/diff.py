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
from typing import Any, Iterable

from cowfs.commands.authz import Owners, absent
from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem, join_path
from cowfs.core.view import View
from cowfs.meta import links
from cowfs.meta.layers import Branch, Snapshot
from cowfs.meta.records import Attrs, dirent_ino
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, ino_key, key_ino, key_name, name_key
from cowfs.store import ROOT_INO


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

        The inodes to look at are those whose record, entries or xattrs changed between the
        sides; each side names every path of such an inode (`_paths`), so a hard link's
        unchanged names show on both sides, a change of a hard-linked file is reported at
        each of its paths, and only real changes are reported.  "modified": content, size,
        mode, owner, mtime, symlink target or xattrs differ (not ctime, atime, link count).
        """
        if b is None or view is None:  # a live tree: include what the kernel and we still buffer
            await self.fs.sync_kernel()
            await self.fs.flush()
        la, lb = self.side(view, a), self.side(view, b)
        meta = self.fs.store.meta
        inos: set[int] = set()
        xinos: set[int] = set()
        entries: dict[int, set[tuple[int, bytes]]] = {}
        for layer in set(la.ancestors) ^ set(lb.ancestors):  # type: ignore[call-overload]
            for cf, base in meta.changed(layer):
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
        changes: list[dict[str, Any]] = []
        for ino in sorted(inos | entries.keys()):
            if ino == ROOT_INO:
                continue
            ra, rb = meta.get(CF_INODES, ino_key(ino), la), meta.get(CF_INODES, ino_key(ino), lb)
            va, vb = (ra[1] if ra else b""), (rb[1] if rb else b"")
            if not va and not vb:
                continue
            aa, ab = (Attrs.unpack(va) if va else None), (Attrs.unpack(vb) if vb else None)
            cand = entries.get(ino, set())
            na = self._paths(la, ino, aa, cand, ca) if aa else set()
            nb = self._paths(lb, ino, ab, cand, cb) if ab else set()
            kind = _kind((ab or aa).mode)  # type: ignore[union-attr]
            if aa is None or ab is None:
                change, paths = ("added", nb) if aa is None else ("removed", na)
                changes += [{"change": change, "path": p, "type": kind} for p in sorted(paths)]
                continue
            if na != nb:
                if len(na) == 1 and len(nb) == 1:
                    changes.append({"change": "renamed", "path": next(iter(nb)), "from": next(iter(na)),
                                    "type": kind})
                else:
                    changes += [{"change": "added", "path": p, "type": kind} for p in sorted(nb - na)]
                    changes += [{"change": "removed", "path": p, "type": kind} for p in sorted(na - nb)]
            same = (aa.root, aa.size, aa.mode, aa.uid, aa.gid, aa.mtime_ns, aa.target) == \
                   (ab.root, ab.size, ab.mode, ab.uid, ab.gid, ab.mtime_ns, ab.target)
            if same and ino in xinos:
                same = dict(meta.scan_names(CF_XATTRS, ino, la)) == dict(meta.scan_names(CF_XATTRS, ino, lb))
            if not same:
                changes += [{"change": "modified", "path": p, "type": kind} for p in sorted(nb)]
        changes.sort(key=lambda c: (c["path"], c["change"]))
        return {"from": a, "to": b if b is not None else "(live)", "changes": changes}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "special"
