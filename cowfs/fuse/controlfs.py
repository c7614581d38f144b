"""The `.cowfs` namespace at the root of every branch's mount, and control-file sessions.

`.cowfs` is found by name and never listed; it holds `ctl` (the control file: each open
handle is a session, each write whole command lines run by cowfs.commands.control, each
reply readable from its start), `stats` (the mount's figures as JSON), `snapshots/NAME/`
(each snapshot the branch owns, read-only, found by name and never listed either, so that
`rm -rf .cowfs` stops at one refusal) and `by-view/VID` (a branch's root, resolvable by the
daemon's own threads only: how the daemon bind-mounts further branches).
docs/architecture.md, "The control file".
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from typing import TYPE_CHECKING, Any, Callable

import pyfuse3

from cowfs.commands.authz import Caller
from cowfs.commands.branching import Branching
from cowfs.commands.control import Control
from cowfs.commands.reply import Reader
from cowfs.commands.protocol import CONTROL_DIR
from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.fuse.handles import Handles
from cowfs.fuse.inodes import K_BYVIEW, K_CTL, K_DIR, K_SNAPS, K_STATS, control_ino, control_parts
from cowfs.store import ROOT_INO

if TYPE_CHECKING:
    from cowfs.meta.layers import Snapshot  # a listing's items: no run-time import below commands

CONTROL_NAMES = {b"ctl": K_CTL, b"stats": K_STATS, b"snapshots": K_SNAPS, b"by-view": K_BYVIEW}

Entry = Callable[[Node], pyfuse3.EntryAttributes]


class Session:
    """One open handle of .cowfs/ctl or .cowfs/stats: its caller and its own reply, made as it
    is read (cowfs.commands.reply: a long listing or diff is never held whole as text)."""

    __slots__ = ("view", "who", "kind", "reply", "cursor")

    def __init__(self, view: View, who: Caller, kind: int, reply: bytes = b"") -> None:
        self.view = view
        self.who = who
        self.kind = kind
        self.reply = Reader(reply)
        # Reads follow their own cursor, reset by each new reply: the file position has
        # moved past what the caller wrote, yet the reply must be readable from its start.
        self.cursor = 0

    def read(self, off: int, size: int) -> bytes:
        if off == 0:
            self.cursor = 0
        data = self.reply.read(self.cursor, size)
        self.cursor += len(data)
        return data

    def set_reply(self, reply: dict[str, Any] | bytes) -> None:
        self.reply = Reader(reply)
        self.cursor = 0


class ControlFS:
    def __init__(self, fs: Filesystem, branching: Branching, control: Control, handles: Handles,
                 entry: Entry, looked_up: Entry, stats: Callable[[View], dict[str, Any]],
                 ctl_group: int | None) -> None:
        self.fs = fs
        self.branching = branching
        self.control = control
        self.handles = handles
        self.entry_of = entry  # a real node's attributes, and the same with a lookup counted
        self.looked_up = looked_up
        self.stats = stats
        self.ctl_group = ctl_group
        # view id -> (the catalog's change count, when `snapshots/` last changed as seen then)
        self._snapshots_seen: dict[int, tuple[int, int]] = {}

    def view(self, fino: int) -> View:
        view = self.fs.views.get(control_parts(fino)[0])
        if view is None or view.kind != "branch":
            raise pyfuse3.FUSEError(errno.ESTALE)
        return view

    @staticmethod
    def reserved(parent: Node, name: bytes) -> bool:
        """Whether name in parent is the control namespace (`.cowfs` in a branch's root)."""
        return name == CONTROL_DIR and parent.ino == ROOT_INO and parent.view.kind == "branch"

    def dir_entry(self, view: View) -> pyfuse3.EntryAttributes:
        """`.cowfs` itself, as a lookup in the branch's root finds it."""
        return self.entry(control_ino(view.vid, K_DIR))

    def entry(self, fino: int) -> pyfuse3.EntryAttributes:
        view = self.view(fino)
        root = self.fs.node(view, ROOT_INO).attrs
        kind = control_parts(fino)[1]
        e = pyfuse3.EntryAttributes()
        e.st_ino = fino
        e.entry_timeout = e.attr_timeout = 0
        e.st_mode = {K_DIR: stat.S_IFDIR | 0o555, K_SNAPS: stat.S_IFDIR | 0o555, K_BYVIEW: stat.S_IFDIR | 0o500,
                     K_CTL: stat.S_IFREG | 0o600, K_STATS: stat.S_IFREG | 0o444}[kind]
        e.st_nlink = 2 if stat.S_ISDIR(e.st_mode) else 1
        e.st_uid, e.st_gid = root.uid, root.gid
        if self.ctl_group is not None and kind == K_CTL:
            e.st_mode |= 0o060  # -o ctl_group=GID: that group may use the control file too
            e.st_gid = self.ctl_group
        e.st_blksize = 4096
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = root.ctime_ns
        if kind == K_SNAPS:
            e.st_mtime_ns = e.st_ctime_ns = self._snapshots_changed(view, root.ctime_ns)
        return e

    def _snapshots_changed(self, view: View, first: int) -> int:
        """When the daemon last saw `snapshots/`'s names change: its mtime.  The kernel keeps
        directory listings (without OPENDIR, every directory's: cowfs.fuse.ops) and drops one
        when a listing starts and the directory's mtime differs from when it was cached; the
        attributes here are never cached (timeout 0), so that check sees every change.  The
        catalog's change count stands for the names: O(1) at every getattr and path walk
        through `snapshots/` (listing the owned names each time cost ~1 ms per 1,000
        snapshots), at the price of a new mtime also when a change left this branch's names
        as they were (the next listing is then read again, never a stale one kept)."""
        changes = self.fs.store.catalog.changes
        seen = self._snapshots_seen.get(view.vid)
        if seen is None or seen[0] != changes:
            seen = (changes, first if seen is None else max(time.time_ns(), seen[1] + 1))
            self._snapshots_seen[view.vid] = seen
        return seen[1]

    @staticmethod
    def truncatable(fino: int) -> bool:
        """The control file takes O_TRUNC (a shell's ">"): there is nothing to cut."""
        return control_parts(fino)[1] == K_CTL

    def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view = self.view(parent)
        kind = control_parts(parent)[1]
        if kind == K_DIR and name in CONTROL_NAMES:
            return self.entry(control_ino(view.vid, CONTROL_NAMES[name]))
        if kind == K_SNAPS:
            snap = self.fs.store.catalog.snapshots.get(name.decode("utf-8", "surrogateescape"))
            if snap is not None and self.branching.owns_snapshot(view, snap):
                root = self.fs.node(self.fs.snapshot_view(snap), ROOT_INO)
                e = self.looked_up(root)
                e.entry_timeout = 0  # snapshots come and go: never cache the name
                return e
        if kind == K_BYVIEW and os.path.exists(f"/proc/self/task/{ctx.pid}"):
            # Only the daemon's own threads: other sandboxes' branches stay invisible.
            try:
                target = self.fs.views.get(int(name))
            except ValueError:
                target = None
            if target is not None and target.kind == "branch":
                e = self.looked_up(self.fs.node(target, ROOT_INO))
                e.entry_timeout = 0  # revalidated at each use: only the daemon resolves it
                return e
        raise pyfuse3.FUSEError(errno.ENOENT)

    def listing(self, fino: int) -> list[Snapshot]:
        """`snapshots/` lists the snapshots the branch owns; `.cowfs` itself lists nothing.
        Taken once per listing (O(snapshots)); each page makes its entries (`listed`)."""
        view = self.view(fino)
        if control_parts(fino)[1] != K_SNAPS:
            return []
        return self.branching.owned_snapshots(view)

    @staticmethod
    def listed_name(snap: Snapshot) -> bytes:
        """The name a snapshot is listed under."""
        return snap.name.encode("utf-8", "surrogateescape")

    def listed(self, snap: Snapshot) -> tuple[bytes, pyfuse3.EntryAttributes, Node] | None:
        """A listed snapshot's entry (None: deleted since the listing was taken)."""
        if self.fs.store.catalog.snapshots.get(snap.name) is not snap:
            return None
        root = self.fs.node(self.fs.snapshot_view(snap), ROOT_INO)
        return self.listed_name(snap), self.entry_of(root), root

    async def open(self, fino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        kind = control_parts(fino)[1]
        if kind not in (K_CTL, K_STATS):
            raise pyfuse3.FUSEError(errno.EISDIR)
        view = self.view(fino)
        who = Caller(ctx.uid, ctx.gid, frozenset(pyfuse3.get_sup_groups(ctx.pid)) if ctx.uid else frozenset())
        reply = b""
        if kind == K_STATS:
            # The figures cover every acknowledged write, also one whose commit at the
            # release after its close is still running.
            await self.fs.flush()
            reply = (json.dumps(self.stats(view), ensure_ascii=True) + "\n").encode()
        fh = self.handles.new_fh()
        self.handles.sessions[fh] = Session(view, who, kind, reply)
        # direct_io: every write reaches us at once, whatever the writeback cache does.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    async def write(self, sess: Session, buf: bytes) -> int:
        """Run the lines of one write.  A write must end with a newline: a fragment kept for
        later would be dropped with success when the handle closes (the kernel sends us no
        FLUSH, so close(2) cannot report an error), so it is refused before any line runs."""
        if sess.kind != K_CTL:
            raise pyfuse3.FUSEError(errno.EBADF)
        if not buf.endswith(b"\n"):
            sess.set_reply({"ok": False, "errno": "EINVAL",
                            "error": "a write to the control file must end with a newline "
                                     "(whole command lines only; nothing of it ran)"})
            raise pyfuse3.FUSEError(errno.EINVAL)
        for line in buf.split(b"\n")[:-1]:
            reply, err = await self.control.run_line(sess.view, line, sess.who)
            sess.set_reply(reply)
            if err:
                raise pyfuse3.FUSEError(err)
        return len(buf)
