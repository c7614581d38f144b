"""Snapshots, branches, rollback, clone, delete, list and diff (the control file's commands).

Each command is O(1) in the size of the tree except clone of a directory (O(entries copied))
and diff (O(keys changed between the two sides)); see docs/architecture.md for the layer
model.  Commands act for the branch mounted where they are given and reach only what it
owns (cowfs.fs.authz; docs/architecture.md, "Authorization").
"""
from __future__ import annotations

import errno
import logging
import posixpath
import stat
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable


from cowfs.errors import FSError
from cowfs.fs.authz import Mounted, Owners, absent
from cowfs.fs.filesystem import Filesystem, Mutation, join_path
from cowfs.fs.node import Node
from cowfs.fs.view import View
from cowfs.meta.layers import Branch, Snapshot, Usage
from cowfs.meta.records import Attrs
from cowfs.meta import links
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, ino_key, name_key
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)

CONTROL_DIR = b".cowfs"
SNAPSHOTS_DIR = b"snapshots"


@dataclass
class Caller:
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def may(attrs: Attrs, who: Caller, want: int) -> bool:
    """Mode-bit check (want: 4 read, 2 write, 1 exec/search), as the kernel does it."""
    if who.uid == 0:
        return not (want & 1) or stat.S_ISDIR(attrs.mode) or bool(attrs.mode & 0o111)
    if who.uid == attrs.uid:
        bits = (attrs.mode >> 6) & 7
    elif attrs.gid == who.gid or attrs.gid in who.groups:
        bits = (attrs.mode >> 3) & 7
    else:
        bits = attrs.mode & 7
    return bits & want == want


class Branching:
    """The commands, for the branch mounted where they are given (a view) or, for delete
    and list, for the store's administrator (view None); what each may reach is decided
    by cowfs.fs.authz."""

    def __init__(self, fs: Filesystem, admin_group: int | None = None) -> None:
        self.fs = fs
        self.cat = fs.store.catalog
        self.owners = Owners(self.cat)
        self.admin_group = admin_group  # members may snapshot/branch/rollback/delete too
        # Set by the FUSE layer: make the kernel drop what it caches of a directory (its
        # attributes and listing) and of some of its names (dentries, negative ones too).
        self.invalidate_dir: Callable[[Node, list[bytes]], Awaitable[None]] = _no_invalidation

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
            usage = self.fs.store.count_usage(LayerView(layer, frozenset(self.cat.ancestry(layer))))
        return usage

    def _usage_of(self, item: Snapshot | Branch) -> Usage:
        """A branch served here counts its live usage; anything else its recorded one."""
        if isinstance(item, Branch):
            view = self.fs.views.get(item.view)
            if view is not None and view.kind == "branch" and not view.retired:
                return Usage(view.usage_bytes, view.usage_inodes, view.allocated)
            return self._usage(item.head)
        return self._usage(item.layer)

    # -- commands --------------------------------------------------------------------------
    async def snapshot(self, view: View, name: str, who: Caller) -> dict[str, Any]:
        self._require_owner(view, who)
        await self.fs.sync_kernel()
        t0 = time.perf_counter()
        async with self.fs.mutate(view) as m:
            self.owners.name_free(view.name, name)
            b = self._branch(view)
            layer = self.fs.freeze_head(m, view)
            self.cat.save_snapshot(Snapshot(name, layer, self.cat.new_view(m.batch), b.name), m.batch)
        return {"snapshot": name, "branch": b.name, "layer": layer,
                "daemon_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def branch(self, view: View, name: str, source: str | None, who: Caller) -> dict[str, Any]:
        """From the mounted branch's current state or from a snapshot it owns."""
        self._require_owner(view, who)
        current = source is None or source == view.name
        if current:
            await self.fs.sync_kernel()
        t0 = time.perf_counter()
        async with self.fs.mutate(view) as m:
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
                usage = self._usage(found.layer)
                src_branch, parent_branch = owner, owner.name
            head = self.cat.new_layer(parent_layer, m.batch)
            self.cat.save_branch(Branch(name, head, self.cat.new_view(m.batch), parent=parent_name,
                                        parent_branch=parent_branch, quota_bytes=src_branch.quota_bytes,
                                        quota_inodes=src_branch.quota_inodes),
                                 m.batch)
            self.cat.save_usage(head, usage, m.batch)
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
            b.head = self.cat.new_layer(s.layer, m.batch)
            b.epoch += 1
            self.cat.save_branch(b, m.batch)
            new_lv = LayerView(b.head, frozenset(self.cat.ancestry(b.head)))
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
        async with self.fs.mutate(view or self.fs.primary) as m:
            kind = self.owners.check_delete(view.name if view is not None else None, name, mounted())
            self.cat.remove(name, m.batch)
            if kind == "branch" and self.fs.learner is not None:
                self.fs.learner.forget(name, m.batch)
        self.fs.drop_views(name)
        self.fs.schedule_gc()
        log.info("%s %s deleted %s", kind, name,
                 f"through the mount of {view.name}" if view is not None else "by the administrator")
        return {"deleted": name, "kind": kind}

    def listing(self, view: View | None, mounted: Mounted) -> dict[str, Any]:
        return self.owners.listing(view.name if view is not None else None, self._usage_of, mounted)

    # -- clone -----------------------------------------------------------------------------
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
            count = self._copy_tree(m, snode, dparent, dname, who, {})
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
        """(allocated bytes, inodes) a clone of src adds."""
        if not src.attrs.is_dir:
            return (self.fs.allocated(src) if src.attrs.is_reg else 0), 1
        total, count = 0, 1
        for _name, cino in self.fs.list_dir(src):
            child = self.fs.node(src.view, cino)
            b, n = self._measure(child)
            self.fs.evict_if_unused(child)
            total += b
            count += n
        return total, count

    def _is_ancestor(self, a: Node, b: Node) -> bool:
        node = b
        while True:
            if node.ino == a.ino:
                return True
            if node.ino == ROOT_INO or not node.attrs.parent:
                return False
            node = self.fs.node(node.view, node.attrs.parent)

    def _copy_tree(self, m: Mutation, src: Node, parent: Node, name: bytes, who: Caller,
                   copies: dict[int, Node]) -> int:
        """Copy src's record (sharing its data tree) under parent/name; recurse into directories."""
        if not may(src.attrs, who, 4 | (1 if src.attrs.is_dir else 0)):
            raise FSError(errno.EACCES, f"no read permission on {name.decode(errors='replace')!r}")
        if src.ino in copies:  # a second hard link inside the copied tree
            node = copies[src.ino]
            node.attrs.nlink += 1
            self.fs.more_names(m, node, parent, name, new=True)
            m.link(parent, name, node)
            m.save(node)
            return 1
        attrs = src.attrs.copy()
        attrs.nlink = 2 if attrs.is_dir else 1
        attrs.ctime_ns = m.now
        if who.uid != 0:
            attrs.uid, attrs.gid = who.uid, who.gid
            attrs.mode &= ~(stat.S_ISUID | stat.S_ISGID) if not attrs.is_dir else ~0
        node = Node(parent.view, self.fs.store.alloc_ino(), attrs, None)
        parent.view.nodes[node.ino] = node
        m.link(parent, name, node)
        for xname, value in self.fs.store.meta.scan_names(CF_XATTRS, src.ino, src.view.lv):
            self.fs.store.meta.put(m.batch, CF_XATTRS, name_key(node.ino, xname), parent.view.lv.top, value)
        count = 1
        if attrs.is_dir:
            for cname, cino in self.fs.list_dir(src):
                child = self.fs.node(src.view, cino)
                count += self._copy_tree(m, child, node, cname, who, copies)
                if child.attrs.is_dir:
                    node.attrs.nlink += 1
                self.fs.evict_if_unused(child)
        elif attrs.nlink and src.attrs.nlink > 1:
            copies[src.ino] = node
        m.save(node)
        self.fs.evict_if_unused(node)
        return count

    # -- diff ------------------------------------------------------------------------------
    def _side(self, view: View | None, name: str | None) -> LayerView:
        """A side of a diff: the live view (name None or the view's branch), or a snapshot or
        branch the caller owns (view None: the store's administrator owns all)."""
        if view is not None and (name is None or name == view.name):
            return view.lv
        if name is None:
            raise FSError(errno.EINVAL, "a store-wide diff needs two names: A and B")
        found = self.owners.owned(view.name if view is not None else None, name)
        if isinstance(found, Snapshot):
            return LayerView(found.layer, frozenset(self.cat.ancestry(found.layer)))
        if isinstance(found, Branch):
            return LayerView(found.head, frozenset(self.cat.ancestry(found.head)))
        raise absent(name)

    def _resolve(self, lv: LayerView, ino: int, cand: Iterable[tuple[int, bytes]],
                 cache: dict[int, str | None]) -> set[str]:
        """Paths, among the candidate (parent, name) entries, that name ino in this view."""
        meta = self.fs.store.meta
        out = set()
        for parent, name in cand:
            found = meta.get(CF_DIRENTS, name_key(parent, name), lv)
            if found and found[1] and int.from_bytes(found[1][:8], "big") == ino:
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
        la, lb = self._side(view, a), self._side(view, b)
        meta = self.fs.store.meta
        inos: set[int] = set()
        xinos: set[int] = set()
        entries: dict[int, set[tuple[int, bytes]]] = {}
        for layer in la.ancestors ^ lb.ancestors:
            for cf, base in meta.changed(layer):
                if cf == CF_LINKS:  # a name's key changes with its entry, which is here too
                    continue
                if cf != CF_DIRENTS:
                    inos.add(int.from_bytes(base[:8], "big"))
                    if cf == CF_XATTRS:
                        xinos.add(int.from_bytes(base[:8], "big"))
                    continue
                for lv in (la, lb):
                    found = meta.get(CF_DIRENTS, base, lv)
                    if found and found[1]:
                        child = int.from_bytes(found[1][:8], "big")
                        entries.setdefault(child, set()).add((int.from_bytes(base[:8], "big"), base[8:-1]))
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


async def _no_invalidation(node: Node, names: list[bytes]) -> None:
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "special"
