"""The FUSE layer: translate pyfuse3 requests to Filesystem calls and back. Nothing else.

Inode numbers the kernel sees:
  real inodes     (view id << 48) | (epoch % 4096 << 36) | inode   (the mounted branch's
                  root is FUSE's ROOT_INODE; other views' roots use epoch 0)
  control nodes   (owner view id << 8) | kind   (view-id field 0: .cowfs and what is in it)
View ids are never reused and a branch's epoch changes only on rollback, so st_ino is the
same across remounts and the restored tree never shares kernel inodes (or page cache) with
the pre-rollback one that open handles still use.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections import Counter
from typing import Any, Callable, Sequence

import pyfuse3
import trio

from cowfs.cache.readahead import Readahead
from cowfs.chunks.tree import CHUNK
from cowfs.commands.control import Control, encode
from cowfs.errors import FSError
from cowfs.commands.authz import Mounted
from cowfs.commands.authz import Caller
from cowfs.commands.branching import Branching
from cowfs.commands.protocol import CONTROL_DIR
from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import EPOCHS, View
from cowfs.store import ROOT_INO
from cowfs.background.warming import Warmer

log = logging.getLogger(__name__)
trace = logging.getLogger("cowfs.requests")

VIEW_SHIFT = 48
EPOCH_SHIFT = 36
INO_MASK = (1 << EPOCH_SHIFT) - 1
ATTR_TIMEOUT = 60.0  # the daemon is the only writer; content changed behind the kernel is invalidated

# Control nodes (kinds); ".cowfs/by-view/VID" is resolvable by the daemon's own threads only
# (it is how the daemon bind-mounts further branches).  Like .cowfs itself in the mount root,
# what .cowfs holds is found by name and never listed: so `rm -rf .cowfs` (or find, du, tar
# given it) stops at one refusal instead of walking every snapshot, thousands of EROFS lines.
K_DIR, K_CTL, K_STATS, K_SNAPS, K_BYVIEW = 1, 2, 3, 4, 5
CONTROL_NAMES = {b"ctl": K_CTL, b"stats": K_STATS, b"snapshots": K_SNAPS, b"by-view": K_BYVIEW}


class _Session:
    """One open handle of .cowfs/ctl or .cowfs/stats: its caller and its own reply."""

    __slots__ = ("view", "who", "kind", "reply", "cursor")

    def __init__(self, view: View, who: Caller, kind: int, reply: bytes = b"") -> None:
        self.view = view
        self.who = who
        self.kind = kind
        self.reply = reply
        # Reads follow their own cursor, reset by each new reply: the file position has
        # moved past what the caller wrote, yet the reply must be readable from its start.
        self.cursor = 0

    def read(self, off: int, size: int) -> bytes:
        if off == 0:
            self.cursor = 0
        data = self.reply[self.cursor : self.cursor + size]
        self.cursor += len(data)
        return data

    def set_reply(self, reply: bytes) -> None:
        self.reply = reply
        self.cursor = 0


class _Dir:
    __slots__ = ("node", "control", "entries", "warming")

    def __init__(self, node: Node | None, control: int = 0, warming: bool = False) -> None:
        self.node = node
        self.control = control  # a control directory's inode number instead of a node
        self.entries: list[tuple[bytes, int]] | None = None
        self.warming = warming  # opened by the warming helper (counted in Warmer.requests)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, fs: Filesystem, stats: Callable[[View], dict[str, Any]] | None = None,
                 mounted: Callable[[], Mounted] | None = None, ctl_group: int | None = None,
                 cache_absent: bool = True, warm: Warmer | None = None,
                 view_root: Callable[[View], str | None] | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.view_root = view_root or (lambda view: None)  # where a view is mounted, for our own calls
        self.warm = warm  # learns cold starts from lookups and listings, and warms them
        self.ctl_group = ctl_group
        self.branching = Branching(fs, ctl_group)
        self.branching.set_invalidate_dir(self._invalidate_dir)
        fs.writers_sync = self._writeback_writers
        self.control = Control(self.branching, self._after_rollback, mounted or (lambda: {}))
        self.stats = stats or (lambda view: {})
        self.requests: Counter[str] = Counter()
        self._files: dict[int, Node] = {}
        self._streams: dict[int, Readahead] = {}  # per open handle: its read pattern
        self._dirs: dict[int, _Dir] = {}
        self._sessions: dict[int, _Session] = {}
        self._write_fhs: set[int] = set()
        self._cached_fhs: set[int] = set()  # write handles through the page cache (not direct_io)
        self._writers: Counter[Node] = Counter()  # open handles that may write, per node
        self._next_fh = 1
        # The reply to a LOOKUP of an absent name: cached as absent (None: ENOENT, not cached).
        self._negative: pyfuse3.EntryAttributes | None = None
        if cache_absent:
            self._negative = pyfuse3.EntryAttributes()
            self._negative.st_ino = 0
            self._negative.entry_timeout = ATTR_TIMEOUT

    # -- inode numbers ---------------------------------------------------------------------
    def fuse_ino(self, node: Node) -> int:
        view = node.view
        if node.ino == ROOT_INO:
            return pyfuse3.ROOT_INODE if view is self.fs.primary else (view.vid << VIEW_SHIFT) | ROOT_INO
        return (view.vid << VIEW_SHIFT) | ((view.epoch % EPOCHS) << EPOCH_SHIFT) | node.ino

    def _node(self, fino: int, unlinked_ok: bool = False) -> Node:
        """The node behind a kernel inode number.  unlinked_ok: also one whose last name is
        gone while the kernel still holds it (fstat of an open FIFO, socket or directory)."""
        if fino == pyfuse3.ROOT_INODE:
            return self.fs.node(self.fs.primary, ROOT_INO)
        vid = fino >> VIEW_SHIFT
        view = self.fs.views.get(vid)
        if view is None:
            raise FSError(errno.ESTALE)
        ino = fino & INO_MASK
        epoch = (fino >> EPOCH_SHIFT) & (EPOCHS - 1)
        if ino != ROOT_INO and epoch != view.epoch % EPOCHS:
            old = self.fs.detached.get((vid, epoch))
            node = old.nodes.get(ino) if old is not None else None
            if node is None:
                raise FSError(errno.ESTALE)
            if node.deleted and not unlinked_ok:  # unlinked before the rollback, only the kernel knows it
                raise FSError(errno.ENOENT)
            return node
        return self.fs.node(view, ino, unlinked_ok)

    @staticmethod
    def _is_control(fino: int) -> bool:
        return fino >> VIEW_SHIFT == 0 and fino != pyfuse3.ROOT_INODE

    def _control_view(self, fino: int) -> View:
        view = self.fs.views.get(fino >> 8)
        if view is None or view.kind != "branch":
            raise pyfuse3.FUSEError(errno.ESTALE)
        return view

    def _is_branch_root(self, node: Node) -> bool:
        return node.ino == ROOT_INO and node.view.kind == "branch"

    def _reserved(self, parent: Node, name: bytes) -> bool:
        return name == CONTROL_DIR and self._is_branch_root(parent)

    def _control_entry(self, fino: int) -> pyfuse3.EntryAttributes:
        view = self._control_view(fino)
        root = self.fs.node(view, ROOT_INO).attrs
        kind = fino & 0xFF
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
        return e

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attrs
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.fuse_ino(node)
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = max(a.nlink, 0)
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = CHUNK
        e.st_blocks = self.fs.blocks(node)
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        self.fs.looked_up(node)
        return self._entry(node)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- the control namespace -------------------------------------------------------------
    def _control_lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view = self._control_view(parent)
        kind = parent & 0xFF
        if kind == K_DIR and name in CONTROL_NAMES:
            return self._control_entry((view.vid << 8) | CONTROL_NAMES[name])
        if kind == K_SNAPS:
            snap = self.fs.store.catalog.snapshots.get(name.decode("utf-8", "surrogateescape"))
            if snap is not None and self.branching.owns_snapshot(view, snap):
                root = self.fs.node(self.fs.snapshot_view(snap), ROOT_INO)
                e = self._looked_up(root)
                e.entry_timeout = 0  # snapshots come and go: never cache the name
                return e
        if kind == K_BYVIEW and os.path.exists(f"/proc/self/task/{ctx.pid}"):
            # Only the daemon's own threads: other sandboxes' branches stay invisible.
            try:
                target = self.fs.views.get(int(name))
            except ValueError:
                target = None
            if target is not None and target.kind == "branch":
                e = self._looked_up(self.fs.node(target, ROOT_INO))
                e.entry_timeout = 0  # revalidated at each use: only the daemon resolves it
                return e
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _control_listing(self, fino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes, Node | None]]:
        view = self._control_view(fino)
        kind = fino & 0xFF
        if kind == K_SNAPS:
            out = []
            for snap in self.branching.owned_snapshots(view):
                root = self.fs.node(self.fs.snapshot_view(snap), ROOT_INO)
                out.append((snap.name.encode("utf-8", "surrogateescape"), self._entry(root), root))
            return out
        return []

    async def _after_rollback(self, view: View, old_names: list[bytes]) -> None:
        """Make the kernel forget the root's names before and after (the new ones may be
        cached as absent), its listing and its attributes.  Every other directory of the
        restored tree has a new kernel inode number."""
        root = self.fs.node(view, ROOT_INO)
        names = set(old_names).union(n for n, _ in self.fs.list_dir(root))
        await self._invalidate_dir(root, sorted(names))

    async def _invalidate_dir(self, node: Node, names: list[bytes]) -> None:
        # Synchronous invalidations, in a thread (the kernel may call back into us): when
        # the command that changed the directory returns, nothing stale is left.
        fino = self.fuse_ino(node)

        def invalidate() -> None:
            self._inval_entries(fino, names)
            self._inval_inode(fino)

        await trio.to_thread.run_sync(invalidate)

    @staticmethod
    def _inval_entries(parent: int, names: list[bytes]) -> None:
        for name in names:
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("invalidate_entry(%d, %r): %s", parent, name, exc)

    @staticmethod
    def _inval_inode(fino: int) -> None:
        """Attributes and cached pages: for a directory, the listing the kernel caches
        (cowfs.dircache), which must not outlive a change made behind its back."""
        try:
            pyfuse3.invalidate_inode(fino, attr_only=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("invalidate_inode(%d): %s", fino, exc)

    async def _control_write(self, fh: int, buf: bytes) -> int:
        """Run the lines of one write.  A write must end with a newline: a fragment kept for
        later would be dropped with success when the handle closes (the kernel sends us no
        FLUSH, so close(2) cannot report an error), so it is refused before any line runs."""
        sess = self._sessions[fh]
        if sess.kind != K_CTL:
            raise pyfuse3.FUSEError(errno.EBADF)
        if not buf.endswith(b"\n"):
            sess.set_reply(encode({"ok": False, "errno": "EINVAL",
                                   "error": "a write to the control file must end with a newline "
                                            "(whole command lines only; nothing of it ran)"}))
            raise pyfuse3.FUSEError(errno.EINVAL)
        for line in buf.split(b"\n")[:-1]:
            reply, err = await self.control.run_line(sess.view, line, sess.who)
            sess.set_reply(encode(reply))
            if err:
                raise pyfuse3.FUSEError(err)
        return len(buf)

    # -- metadata --------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        if self._is_control(parent_inode):
            return self._control_lookup(parent_inode, name, ctx)
        parent = self._live(parent_inode)
        if self._reserved(parent, name):
            return self._control_entry((parent.view.vid << 8) | K_DIR)
        if self.warm is not None:
            self.warm.touch(parent, ctx.pid)
        try:
            return self._looked_up(self.fs.lookup(parent, name))
        except FSError as exc:
            if exc.errno != errno.ENOENT or self._negative is None:
                raise
            # Cached as absent for ATTR_TIMEOUT (a compiler probing include paths, a shell
            # probing PATH): names appear behind the kernel's back only by clone and
            # rollback, which invalidate them (_invalidate_dir).
            return self._negative

    def _held(self, fino: int) -> Node | None:
        """The node in memory behind a kernel inode number, whatever its state: deleted, in
        a detached tree, in a retired view.  None if there is none (nothing to forget)."""
        if fino == pyfuse3.ROOT_INODE:
            return self.fs.primary.nodes.get(ROOT_INO)
        vid, ino = fino >> VIEW_SHIFT, fino & INO_MASK
        epoch = (fino >> EPOCH_SHIFT) & (EPOCHS - 1)
        view = self.fs.views.get(vid)
        if view is None or (ino != ROOT_INO and epoch != view.epoch % EPOCHS):
            view = self.fs.detached.get((vid, epoch))
        return view.nodes.get(ino) if view is not None else None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        for fino, n in inode_list:
            if self._is_control(fino):
                continue
            node = self._held(fino)
            if node is not None:
                self.fs.forget(node, n)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        if self._is_control(inode):
            return self._control_entry(inode)
        return self._entry(self._node(inode, unlinked_ok=True))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["setattr"] += 1
        if self._is_control(inode):
            if fields.update_size and inode & 0xFF == K_CTL:
                return self._control_entry(inode)  # O_TRUNC from a shell's ">": nothing to cut
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._node(inode, unlinked_ok=True)
        await self.fs.setattr(
            node,
            # our own truncate (_sync_kernel_view) keeps a cut file's cut; a user's ends it
            user=node.cap is None or not fields.update_size or not os.path.exists(f"/proc/self/task/{ctx.pid}"),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["readlink"] += 1
        if self._is_control(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        node = self._node(inode)
        if not stat.S_ISLNK(node.attrs.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.attrs.target

    def _live(self, fino: int) -> Node:
        """The node behind fino, for a lookup, open or change through it: not one of a tree a
        rollback replaced.  Open handles keep working in such a tree, but a name resolved in
        it would put new files where no path reaches them.  Walks reach it from a directory
        fd or a current directory inside the old tree; should a path walk from the mount
        root ever meet a dentry of it, ESTALE makes the kernel redo the walk with
        LOOKUP_REVAL, which revalidates each dentry and lands in the restored tree."""
        node = self._node(fino)
        if node.view.kind == "detached":
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _parent(self, fino: int, name: bytes, reserved_errno: int) -> Node:
        """The parent of a namespace change; changes to .cowfs (or inside it) fail."""
        if self._is_control(fino):
            raise pyfuse3.FUSEError(errno.EPERM)
        parent = self._live(fino)
        if self._reserved(parent, name):
            raise pyfuse3.FUSEError(reserved_errno)
        return parent

    async def _make(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                    rdev: int = 0, target: bytes = b"") -> Node:
        parent = self._parent(parent_inode, name, errno.EEXIST)
        groups: set[int] = set()
        if mode & stat.S_ISGID and ctx.uid != 0:
            groups = pyfuse3.get_sup_groups(ctx.pid)
        return await self.fs.make(parent, name, mode, ctx.uid, ctx.gid, rdev, target, groups)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mknod"] += 1
        node = await self._make(parent_inode, name, mode & ~ctx.umask, ctx, rdev)
        return self._looked_up(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mkdir"] += 1
        node = await self._make(parent_inode, name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)
        return self._looked_up(node)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["symlink"] += 1
        node = await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target)
        return self._looked_up(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["unlink"] += 1
        await self.fs.unlink(self._parent(parent_inode, name, errno.EPERM), name, want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rmdir"] += 1
        await self.fs.unlink(self._parent(parent_inode, name, errno.EPERM), name, want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rename"] += 1
        op = self._parent(parent_inode_old, name_old, errno.EPERM)
        np = self._parent(parent_inode_new, name_new, errno.EPERM)
        if self._writers:
            await self._writeback(op, name_old)
            if flags & pyfuse3.RENAME_EXCHANGE:
                await self._writeback(np, name_new)
        await self.fs.rename(op, name_old, np, name_new, flags, ctx.uid, ctx.gid)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["link"] += 1
        if self._is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._live(inode)
        await self.fs.link(node, self._parent(new_parent_inode, new_name, errno.EEXIST), new_name)
        return self._looked_up(node)

    # -- files -----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if self._is_control(inode):
            return await self._control_open(inode, flags, ctx)
        node = self._live(inode)
        if flags & (os.O_WRONLY | os.O_RDWR) and not node.view.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and (node.attrs.size or (ctx.uid and node.attrs.mode & (stat.S_ISUID | stat.S_ISGID))):
            await self.fs.setattr(node, size=0, kill_suid=ctx.uid != 0)
        return self._opened(node, bool(flags & (os.O_WRONLY | os.O_RDWR)))

    async def _control_open(self, fino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        kind = fino & 0xFF
        if kind not in (K_CTL, K_STATS):
            raise pyfuse3.FUSEError(errno.EISDIR)
        view = self._control_view(fino)
        who = Caller(ctx.uid, ctx.gid, frozenset(pyfuse3.get_sup_groups(ctx.pid)) if ctx.uid else frozenset())
        reply = b""
        if kind == K_STATS:
            # The figures cover every acknowledged write, also one whose commit at the
            # release after its close is still running.
            await self.fs.flush()
            reply = (json.dumps(self.stats(view), ensure_ascii=True) + "\n").encode()
        fh = self._new_fh()
        self._sessions[fh] = _Session(view, who, kind, reply)
        # direct_io: every write reaches us at once, whatever the writeback cache does.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    def _opened(self, node: Node, writing: bool) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = node
        self._streams[fh] = Readahead()
        self.fs.opened(node)
        # Writers bypass the page cache under a byte quota, or when the store's disk is
        # nearly full: the kernel acknowledges a cached write before we see it, so refusing
        # it at writeback loses acknowledged data and reports EDQUOT/ENOSPC late (at fsync
        # or close); a direct write(2) fails itself, in order.  (The price: such a handle
        # cannot be mmap'ed MAP_SHARED, see docs/architecture.md, "Quotas".)
        direct = writing and (node.view.quota_bytes > 0 or self.fs.space_tight())
        if writing:
            self._writers[node] += 1
            self._write_fhs.add(fh)
            if not direct:
                self._cached_fhs.add(fh)
                node.cached_writers += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    async def kernel_syncer(self) -> None:
        """Bring the kernel's view of a file back to ours after a write it acknowledged was
        refused (Filesystem._refuse), while writers still have it open; the last release
        does it once more."""
        fs = self.fs
        while True:
            await fs.kernel_sync_wanted.wait()
            fs.kernel_sync_wanted = trio.Event()
            while fs.kernel_unsynced:
                await self._sync_kernel_view(fs.kernel_unsynced.pop())
            await trio.sleep(0.05)  # a writer that goes on writing into a full disk: in rounds

    async def _sync_kernel_view(self, node: Node) -> None:
        """Make the kernel's size and pages of node ours.  With the writeback cache the kernel
        trusts its own size over any attributes we send, so the one way to set it is a
        truncate through the mount: the kernel takes the size from our SETATTR reply and
        drops its pages beyond; then the remaining pages (refused overwrites) are
        invalidated.  The path is walked one name at a time without following symlinks and
        the inode checked, so a rename meanwhile cannot make us truncate another file; a
        file without a name gets the invalidation only."""
        fino = self.fuse_ino(node)
        root = self.view_root(node.view) if node.view.kind == "branch" and node.attrs.nlink > 0 else None
        # The path from the records in a database job (pure reads), the kernel calls in a
        # thread of their own: they wait for requests that may commit.
        rel = await self.fs.store.in_thread(self.fs.path_of, node.view.lv, node.ino, {}) if root else None

        def run() -> None:
            if root is not None and rel:
                try:
                    fd = _open_beneath(root, rel)
                    try:
                        st = os.fstat(fd)
                        if st.st_ino == fino and stat.S_ISREG(st.st_mode):
                            os.truncate(f"/proc/self/fd/{fd}", node.attrs.size if node.cap is None else node.cap)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("inode %d: the kernel's size could not be set back: %s", node.ino, exc)
            _pull_pages(fino)

        await trio.to_thread.run_sync(run)

    async def _writeback_writers(self) -> None:
        """Pull the kernel's dirty pages of every file open for writing (invalidate_inode
        writes them back to us first, synchronously)."""
        finos = [self.fuse_ino(n) for n in self._writers if n.attrs.is_reg and not n.deleted]
        if finos:
            await trio.to_thread.run_sync(lambda: [_pull_pages(f) for f in finos])

    async def _writeback(self, parent: Node, name: bytes) -> None:
        """Before publishing a file still open for writing (rename, link), make the kernel
        send us the dirty pages it holds for it, so the data commits no later than the name.
        (A closed file's pages were sent at close.)  Costs that file's page cache."""
        ino = self.fs.child_ino(parent, name)
        node = parent.view.nodes.get(ino) if ino is not None else None
        if node is not None and self._writers[node] > 0 and node.attrs.is_reg:
            fino = self.fuse_ino(node)
            await trio.to_thread.run_sync(lambda: pyfuse3.invalidate_inode(fino, attr_only=False))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.requests["create"] += 1
        node = await self._make(parent_inode, name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        return self._opened(node, True), self._looked_up(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        sess = self._sessions.get(fh)
        if sess is not None:
            return sess.read(off, size)
        return self.fs.read(self._files[fh], off, size, self._streams[fh])  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests["write"] += 1
        if fh in self._sessions:
            return await self._control_write(fh, buf)
        return await self.fs.write(self._files[fh], off, buf)

    async def flush(self, fh: int) -> None:
        """FLUSH, sent at every close: declined.  ENOSYS makes the kernel stop sending it for
        this mount (close still writes the file's dirty pages back to us and waits for them,
        and reports their errors); release commits instead.  One request fewer per close, as
        fuse-overlayfs, which has no FLUSH either; the durability rules hold (rule 2 in
        docs/architecture.md).  This first one commits like a release."""
        self.requests["flush"] += 1
        node = self._files.get(fh)
        if node is not None:
            await self._commit_closed(node)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def _commit_closed(self, node: Node) -> None:
        # Also when another task's flush holds this file's data, like fsync.
        if node.attrs.nlink > 0 and (node in self.fs.dirty_nodes or node.flushing):
            await self.fs.flush()

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        if self._sessions.pop(fh, None) is not None:
            return
        node = self._files.pop(fh)
        del self._streams[fh]
        try:
            if fh in self._write_fhs:
                self._write_fhs.discard(fh)
                self._writers[node] -= 1
                if self._writers[node] <= 0:
                    del self._writers[node]
                if fh in self._cached_fhs:
                    self._cached_fhs.discard(fh)
                    node.cached_writers -= 1
                # A failed commit (the disk full under RocksDB) leaves the data dirty, to be
                # retried; the handle is gone all the same.
                await self._commit_closed(node)
        finally:
            if node.cached_writers <= 0 and (node.cap is not None or node in self.fs.kernel_unsynced):
                # The last writer that could have data refused behind its back is gone (the
                # close reported the error): the kernel's view becomes ours, and the cut ends.
                self.fs.kernel_unsynced.discard(node)
                await self._sync_kernel_view(node)
                node.cap = None
            await self.fs.released(node)

    async def lseek(self, fino: int, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (cowfs.fuse_ext; the kernel answers the other whences)."""
        self.requests["lseek"] += 1
        node = self._files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESPIPE if fh in self._sessions else errno.EBADF)
        if self._writers[node] > 0:
            # The kernel asks without writing back first: pages written but not yet sent
            # to us would read as holes.
            await trio.to_thread.run_sync(_pull_pages, self.fuse_ino(node))
        return self.fs.seek(node, off, whence)

    async def fallocate(self, fino: int, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) (cowfs.fuse_ext); the kernel has checked the handle is writable."""
        self.requests["fallocate"] += 1
        node = self._files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP if fh in self._sessions else errno.EBADF)
        await self.fs.fallocate(node, mode, off, length)

    def statfs_of(self, fino: int) -> dict[str, int]:
        """STATFS with its inode (cowfs.fuse_ext): the figures of the branch it is in (a
        snapshot's: the disk's)."""
        self.requests["statfs"] += 1
        try:
            view = self._control_view(fino) if self._is_control(fino) else self._node(fino, unlinked_ok=True).view
        except (FSError, pyfuse3.FUSEError):
            view = self.fs.primary
        return self.statvfs(view)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests["fsync"] += 1
        if fh in self._sessions:
            return
        await self.fs.fsync()

    # -- directories -----------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.requests["opendir"] += 1
        if self._is_control(inode):
            fh = self._new_fh()
            self._dirs[fh] = _Dir(None, inode)
            return fh
        node = self._live(inode)
        if not node.attrs.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        warming = self.warm is not None and self.warm.opened_dir(node, ctx.pid)
        fh = self._new_fh()
        self._dirs[fh] = _Dir(node, warming=warming)
        self.fs.opened_dir(node)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.requests["readdir"] += 1
        d = self._dirs[fh]
        if d.warming:
            self.warm.requests += 1  # type: ignore[union-attr]
        if d.node is None:
            listing = self._control_listing(d.control)
            for i in range(start_id, len(listing)):
                name, entry, node = listing[i]
                if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                    break
                if node is not None:
                    self.fs.looked_up(node)
            return
        if start_id == 0 or d.entries is None:
            # Offsets index a listing taken when reading starts (again), so they stay valid
            # while entries are added or removed, and each page costs O(entries in it).
            d.entries = self.fs.list_dir(d.node)
        entries = d.entries
        fs, view = self.fs, d.node.view
        # Offsets 0 and 1 are "." and ".." (the kernel takes no lookup reference for them).
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self._entry(d.node), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = d.node
            if d.node.ino != ROOT_INO and d.node.attrs.parent:
                try:
                    parent = fs.node(view, d.node.attrs.parent)
                except FSError:
                    parent = d.node
            entry = self._entry(parent)
            if parent is not d.node:
                fs.evict_if_unused(parent)
            if not pyfuse3.readdir_reply(token, b"..", entry, 2):
                return
            start_id = 2
        for i in range(start_id - 2, len(entries)):
            name, ino = entries[i]
            try:
                child = fs.node(view, ino)
            except FSError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._entry(child), i + 3):
                fs.evict_if_unused(child)  # not sent: the kernel holds no reference to it
                break
            fs.looked_up(child)

    async def releasedir(self, fh: int) -> None:
        self.requests["releasedir"] += 1
        d = self._dirs.pop(fh)
        if d.warming:
            self.warm.requests += 1  # type: ignore[union-attr]
        if d.node is not None:
            await self.fs.released_dir(d.node)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.requests["fsyncdir"] += 1
        if self._dirs[fh].node is None:
            return
        await self.fs.fsync()

    # -- xattrs, statfs, access ------------------------------------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["setxattr"] += 1
        if self._is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.fs.setxattr(self._node(inode), name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["getxattr"] += 1
        if self._is_control(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return self.fs.getxattr(self._node(inode), name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.requests["listxattr"] += 1
        if self._is_control(inode):
            return []
        return self.fs.listxattr(self._node(inode))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["removexattr"] += 1
        if self._is_control(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.fs.removexattr(self._node(inode), name)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """pyfuse3 does not pass the inode on, so this answers for the first branch mounted;
        cowfs.fuse_ext answers STATFS of every branch's mount with that branch's figures."""
        self.requests["statfs"] += 1
        f = self.statvfs(self.fs.primary)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(s, name, f[name])
        return s

    def statvfs(self, view: View) -> dict[str, int]:
        """What `df` shows for a branch: the store's disk, or, under a quota, the quota as
        the size and the branch's allocated bytes (inodes) as what is used."""
        host = self.fs.statfs()
        bsize = host.f_frsize
        blocks, bfree, bavail = host.f_blocks, host.f_bfree, host.f_bavail
        if view.quota_bytes:
            blocks = view.quota_bytes // bsize
            left = max(0, view.quota_bytes - view.allocated) // bsize
            bfree, bavail = min(left, bfree), min(left, bavail)
        files = 1 << 32
        ffree = max(0, files - self.fs.store.inodes_used())
        if view.quota_inodes:
            files = view.quota_inodes
            ffree = min(ffree, max(0, view.quota_inodes - view.usage_inodes))
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": blocks, "f_bfree": bfree, "f_bavail": bavail,
                "f_files": files, "f_ffree": ffree, "f_favail": ffree, "f_namemax": 255}

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.requests["access"] += 1
        return True  # default_permissions: the kernel has checked already


def _open_beneath(root: str, rel: str) -> int:
    """An O_PATH descriptor of root/rel, walked one name at a time without following a
    symlink (nor leaving root's filesystem)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dev = os.fstat(fd).st_dev
    try:
        for name in rel.split("/"):
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if os.fstat(fd).st_dev != dev:
                raise OSError(errno.EXDEV, f"{root}/{rel} leaves the mount")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pull_pages(fino: int) -> None:
    try:
        pyfuse3.invalidate_inode(fino, attr_only=False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("writeback of inode %d: %s", fino, exc)


def _show(arg: Any) -> Any:
    if isinstance(arg, (bytes, memoryview)) and len(arg) > 64:
        return f"<{len(arg)} bytes>"
    if isinstance(arg, pyfuse3.RequestContext):
        return f"uid={arg.uid},pid={arg.pid}"
    if isinstance(arg, (pyfuse3.ReaddirToken, pyfuse3.EntryAttributes, pyfuse3.SetattrFields)):
        return type(arg).__name__
    return arg


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any unexpected exception into EIO for the caller: pyfuse3 would end the whole
    session (every sandbox on this daemon) on an exception that is not a FUSEError."""

    name = fn.__name__

    async def handler(self: Operations, *args: Any) -> Any:
        if trace.isEnabledFor(logging.DEBUG):  # --debug: one line per request
            trace.debug("%s%r", name, tuple(_show(a) for a in args))
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


for _name in ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink", "unlink",
              "rmdir", "rename", "link", "open", "create", "read", "write", "flush", "release", "fsync",
              "opendir", "readdir", "releasedir", "fsyncdir", "setxattr", "getxattr", "listxattr",
              "removexattr", "statfs", "access", "lseek", "fallocate"):
    setattr(Operations, _name, _guarded(getattr(Operations, _name)))
