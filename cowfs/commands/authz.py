"""Who may see and change which snapshots and branches (docs/architecture.md, "Authorization").

A command given through a mount's control file acts for V, the branch mounted there; ``None``
stands for the store's administrator (root or the owner of the store directory, through the
daemon's admin socket or on an unmounted store), who owns everything.  V owns itself, the
branches made from it, directly or not (``Branch.parent_branch``), and the snapshots of
those (``Snapshot.branch``).  A name V does not own is answered exactly as a name that does
not exist, so a sandbox cannot probe another's snapshots and branches.

Pure catalog logic, no I/O: the daemon (``commands/branching.py``) and the CLI on an unmounted store
(``admin.py``) both decide through it.
"""
from __future__ import annotations

import errno
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cowfs.commands.reply import Rows
from cowfs.errors import FSError
from cowfs.meta.layers import Branch, Catalog, Snapshot, Usage
from cowfs.meta.records import Attrs

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# Where each mounted branch is mounted (mount points), as the daemon's mount table says.
Mounted = Mapping[str, list[str]]


@dataclass
class Caller:
    """Who gives a command through a mount's control file, as the kernel tells it."""

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


def check_name(name: str) -> None:
    if not name or not NAME_RE.fullmatch(name) or len(name) > 128:  # the pattern is ASCII-only
        raise FSError(errno.EINVAL, f"bad name {name!r}: use letters, digits, '.', '_', '-', "
                                    "at most 128 bytes, not starting with a dot")


def absent(name: str) -> FSError:
    """The one answer for a name that does not exist or that the caller does not own."""
    return FSError(errno.ENOENT, f"no snapshot or branch named {name!r}")


class Owners:
    def __init__(self, cat: Catalog) -> None:
        self.cat = cat

    def line(self, name: str) -> list[str]:
        """name, the branch it was made from, that one's, ... (its line of ancestors)."""
        line: list[str] = []
        cur: str | None = name
        while cur is not None and cur not in line:
            line.append(cur)
            b = self.cat.branches.get(cur)
            cur = b.parent_branch if b is not None else None
        return line

    def owns_branch(self, v: str | None, b: Branch) -> bool:
        return v is None or v in self.line(b.name)

    def owns_snapshot(self, v: str | None, s: Snapshot) -> bool:
        if v is None:
            return True
        b = self.cat.branches.get(s.branch) if s.branch is not None else None
        return b is not None and self.owns_branch(v, b)

    def owned(self, v: str | None, name: str) -> Snapshot | Branch | None:
        """The snapshot or branch called name, if v owns it (None: absent or not v's)."""
        s = self.cat.snapshots.get(name)
        if s is not None:
            return s if self.owns_snapshot(v, s) else None
        b = self.cat.branches.get(name)
        return b if b is not None and self.owns_branch(v, b) else None

    def snapshots(self, v: str | None) -> list[Snapshot]:
        return sorted((s for s in self.cat.snapshots.values() if self.owns_snapshot(v, s)),
                      key=lambda s: s.created)

    def branches(self, v: str | None) -> list[Branch]:
        return sorted((b for b in self.cat.branches.values() if self.owns_branch(v, b)),
                      key=lambda b: b.created)

    def snapshot(self, v: str | None, name: str) -> Snapshot:
        found = self.owned(v, name)
        if isinstance(found, Branch):
            raise FSError(errno.EINVAL, f"{name!r} is a branch, not a snapshot")
        if found is None:
            raise FSError(errno.ENOENT, f"no snapshot named {name!r}")
        return found

    def name_free(self, v: str | None, name: str) -> None:
        """Names are store-wide (catalog keys), so a name taken by what v does not own must
        be refused too: that answer tells only that the name is taken, not by what."""
        check_name(name)
        found = self.owned(v, name)
        if isinstance(found, Snapshot):
            raise FSError(errno.EEXIST, f"snapshot {name!r} already exists")
        if isinstance(found, Branch):
            raise FSError(errno.EEXIST, f"branch {name!r} already exists")
        if name in self.cat.snapshots or name in self.cat.branches:
            raise FSError(errno.EEXIST, f"the name {name!r} is taken in this store (names are store-wide)")

    def parent_of(self, v: str | None, b: Branch) -> str | None:
        """The snapshot or branch b was made from, as v may see it: shown when it was one of
        v's (the branch it came from is v's), even once deleted; None otherwise (a fork
        does not learn the name of the snapshot of main it was made from)."""
        came_from = self.cat.branches.get(b.parent_branch) if b.parent_branch is not None else None
        if v is None or (came_from is not None and self.owns_branch(v, came_from)):
            return b.parent
        return None

    def check_delete(self, v: str | None, name: str, mounted: Mounted) -> str:
        """The kind ("snapshot" or "branch") of what name is, if v may delete it now."""
        check_name(name)
        found = self.owned(v, name)
        if found is None:
            raise absent(name)
        if isinstance(found, Branch):
            where = sorted(mounted.get(name) or [])
            if name == v or where:
                at = f" at {', '.join(where)}" if v is None and where else ""
                raise FSError(errno.EBUSY, f"branch {name!r} is mounted{at}")
            return "branch"
        if v is not None and found.branch != v and found.branch in mounted:
            # Another sandbox's restore points do not vanish under it through this mount.
            raise FSError(errno.EBUSY, f"snapshot {name!r} belongs to branch {found.branch!r}, which is "
                                       "mounted: delete it through that mount")
        return "snapshot"

    def listing(self, v: str | None, usage: Callable[[Snapshot | Branch], Usage], mounted: Mounted) -> dict[str, Any]:
        """What v owns.  The administrator's listing (v None) also says where each branch
        is mounted; a sandbox's says only whether a branch is the one mounted there."""
        def figures(item: Snapshot | Branch) -> dict[str, int]:
            u = usage(item)
            return {"logical_bytes": u.logical, "allocated_bytes": u.allocated, "inodes": u.inodes}

        def snap_row(s: Snapshot) -> dict[str, Any]:
            return {"name": s.name, "kind": "snapshot", "parent": s.branch, "created": s.created, **figures(s)}

        def branch_row(b: Branch) -> dict[str, Any]:
            row = {"name": b.name, "kind": "branch", "parent": self.parent_of(v, b), "created": b.created,
                   **figures(b), "mounted_here": b.name == v,
                   "rollbacks": b.epoch, "quota_bytes": b.quota_bytes, "quota_inodes": b.quota_inodes}
            if v is None:
                row["mounted_at"] = sorted(mounted.get(b.name) or [])
            return row

        # Rows made as the reply is read (cowfs.commands.reply): a million snapshots are a
        # list of the catalog's own objects here, not a million dicts.
        snaps, branches = self.snapshots(v), self.branches(v)
        return {"snapshots": Rows(snaps, snap_row, len(snaps)), "branches": Rows(branches, branch_row, len(branches))}
