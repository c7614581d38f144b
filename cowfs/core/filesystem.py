"""POSIX semantics over the store: the filesystem core the FUSE layer calls.

Concurrency (see docs/architecture.md): everything runs on one trio event loop.  Mutations
hold `self.lock`, flush all acknowledged dirty data first, then validate, change memory and
build one batch with no checkpoint in between, and commit it synchronously; so committed
state is always a prefix of the acknowledged operations.  Reads and writes into dirty
buffers take no lock.  Only hashing/compression of large flushes and WAL syncs run in
threads, on immutable inputs.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Iterable, NamedTuple, NoReturn

import trio

from cowfs import faults
from cowfs.cache.learned import SAVE_INTERVAL, Learner
from cowfs.cache.prefetch import LEARNED, READAHEAD, Fetcher
from cowfs.cache.readahead import Readahead
from cowfs.chunks import codec, tree
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.tree import CHUNK, RESERVED, TreeWriter
from cowfs.errors import FSError
from cowfs.core.node import Node
from cowfs.core.view import EPOCHS, View
from cowfs.kv.base import Batch
from cowfs.meta import links
from cowfs.meta.layers import Usage
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, ino_key, name_key
from cowfs.store import CF_ORPHANS, ROOT_INO, Store

log = logging.getLogger(__name__)

NAME_MAX = 255
MAX_FILE_SIZE = (1 << 63) - 1
DIRTY_LIMIT = 64 << 20  # acknowledged-but-unflushed bytes before writers wait for a flush
DIRTY_AGE = 1.0  # seconds before the background flusher commits dirty data
# Dirty bytes that wake the background flusher at once: a streaming writer's next chunks
# are copied in while the previous ones are hashed, compressed and committed.
EARLY_FLUSH_BYTES = 8 << 20
KERNEL_DIRTY = 64 << 20  # the kernel's dirty limit for a mount, until read from sysfs
_ZEROS = bytes(CHUNK)
THREAD_FLUSH_BYTES = 512 << 10  # flushes larger than this hash/compress in a worker thread
# Flushes of at least this much write their chunk encodings (those of PACK_MIN_VALUE bytes or
# more) as one new pack, durable before the commit, in the thread, and commit only pointers
# (chunks/packs.py).  Smaller flushes (small files, fsync'd rewrites) stay inline: a pack put
# costs an fsync of the pack and of its directory.
PACK_FLUSH_BYTES = 4 << 20
PACK_MIN_VALUE = 8 << 10
XATTR_SIZE_MAX = 65536
SEEK_DATA, SEEK_HOLE = 3, 4  # Linux lseek whence values
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# renameat2 flags (linux/fs.h): the kernel filters unknown ones and the EXCHANGE combinations
# itself, but FUSE carries the raw value, so the core checks them again.
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT


CLOCK_REALTIME_COARSE = 5  # Linux; not exported by Python's time module


def now_ns() -> int:
    """The kernel's file-time clock: FUSE stamps written files with the coarse realtime clock
    (in writeback mode the kernel owns their mtime), so ours must not run ahead of it, or a
    later write could carry an earlier time than an earlier chmod."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def disk_cost(nbytes: int) -> int:
    """Disk bytes a flush of nbytes of new data takes at most: once in a pack file when the
    flush is large enough for one, else twice (RocksDB's WAL, then a blob file)."""
    return nbytes if nbytes >= PACK_FLUSH_BYTES else 2 * nbytes


def _dirent(ino: int, mode: int) -> bytes:
    return ino.to_bytes(8, "big") + bytes((stat.S_IFMT(mode) >> 12,))


def _check_xattr_name(name: bytes) -> None:
    if not name.startswith(XATTR_NAMESPACES):  # system.* (ACLs included) and unknown ones
        raise FSError(errno.EOPNOTSUPP)
    if name in XATTR_NAMESPACES:  # "user." names nothing (ext4: EINVAL)
        raise FSError(errno.EINVAL)
    if len(name) > 255:
        raise FSError(errno.ERANGE)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG)


class _Taken(NamedTuple):
    """A node's dirty chunks taken by a flush, with the size and the attributes (see
    `_stamp`) the file had then: a SETATTR deferred while the flush encodes follows later
    writes, and goes with them in the next flush."""
    node: Node
    chunks: dict[int, bytes | bytearray]
    size: int
    stamp: tuple[int, int, int, int, int, int]


def _stamp(a: Attrs) -> tuple[int, int, int, int, int, int]:
    """The attributes a deferred SETATTR may change: mode, uid, gid, atime, mtime, ctime."""
    return a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns


def _restamp(a: Attrs, stamp: tuple[int, int, int, int, int, int]) -> None:
    a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns = stamp


def account(node: Node, present: bool) -> None:
    """Bring node's contribution to its view's usage (inodes, logical bytes) up to date."""
    view = node.view
    size = node.attrs.size if present and node.attrs.is_reg else 0
    if present != node.counted:
        view.usage_inodes += 1 if present else -1
        node.counted = present
    view.usage_bytes += size - node.counted_bytes
    node.counted_bytes = size


class Mutation:
    """One atomic change: a batch, its reference deltas and the nodes it saved."""

    __slots__ = ("fs", "batch", "txn", "saved", "views", "now", "charge")

    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self.batch = Batch()
        self.txn = RefTxn()
        self.saved: list[Node] = []
        self.views: set[View] = set()  # views whose usage changed: their head's usage is rewritten
        self.now = now_ns()
        # Check the byte quota at commit against what the new trees allocate (fallocate:
        # known only once the reference changes are applied).
        self.charge = False

    def account(self, node: Node) -> None:
        """Count node's in-memory size (its dirty data included) in its view's usage."""
        self._account(node, not node.deleted)

    def _account(self, node: Node, present: bool) -> None:
        account(node, present)
        self.views.add(node.view)

    def save(self, node: Node) -> None:
        """Write node's current attributes as its version in the view's head layer."""
        self.fs.allocated(node)  # what is committed for it now: the commit settles the change
        head = node.view.lv.top
        if node.stored_layer == head and node.stored_root is not None:
            self.txn.decref(node.stored_root.hash)
        if node.deleted:  # its data may be freed already: never resurrect the record
            raise FSError(errno.ENOENT)
        if node.attrs.root is not None:
            self.txn.incref(node.attrs.root.hash)
        self.fs.store.meta.put(self.batch, CF_INODES, ino_key(node.ino), head, node.attrs.pack())
        node.stored_layer = head
        node.stored_root = node.attrs.root
        self.saved.append(node)
        self._account(node, True)

    def drop(self, node: Node) -> None:
        """Delete node's record, xattrs and its reference to the data."""
        fs = self.fs
        fs.allocated(node)
        lv = node.view.lv
        if node.stored_layer == lv.top and node.stored_root is not None:
            self.txn.decref(node.stored_root.hash)
        fs.store.meta.delete(self.batch, CF_INODES, ino_key(node.ino), lv)
        for name, _ in list(fs.store.meta.scan_names(CF_XATTRS, node.ino, lv)):
            fs.store.meta.delete(self.batch, CF_XATTRS, name_key(node.ino, name), lv)
        node.stored_layer = None
        node.stored_root = None
        node.deleted = True
        self.saved.append(node)
        self._account(node, False)

    def link(self, parent: Node, name: bytes, child: Node) -> None:
        self.fs.store.meta.put(self.batch, CF_DIRENTS, name_key(parent.ino, name), parent.view.lv.top,
                               _dirent(child.ino, child.attrs.mode))
        child.attrs.parent = parent.ino
        child.attrs.name = name

    def unlink(self, parent: Node, name: bytes) -> None:
        self.fs.store.meta.delete(self.batch, CF_DIRENTS, name_key(parent.ino, name), parent.view.lv)

    def index_name(self, node: Node, parent: int, name: bytes) -> None:
        """Record (parent, name) as a name of hard-linked node (cowfs.meta.links)."""
        self.fs.store.meta.put(self.batch, CF_LINKS, links.key(node.ino, parent, name), node.view.lv.top,
                               links.PRESENT)

    def unindex_name(self, node: Node, parent: int, name: bytes) -> None:
        self.fs.store.meta.delete(self.batch, CF_LINKS, links.key(node.ino, parent, name), node.view.lv)

    def touch(self, *nodes: Node, mtime: bool = True) -> None:
        for n in nodes:
            n.attrs.ctime_ns = self.now
            if mtime:
                n.attrs.mtime_ns = self.now


def _held(node: Node) -> bool:
    return node.lookups > 0 or node.opens > 0


def join_path(parent: str, name: bytes) -> str:
    """A view-relative path ("" is the root) and a name: the child's path."""
    n = name.decode("utf-8", "surrogateescape")
    return f"{parent}/{n}" if parent else n


class _Scope:
    """The context of one mutation.

    When the lock is free and nothing is dirty, the mutation runs from here to its commit
    without a single checkpoint, so it needs no lock (and skips two scheduler round trips);
    otherwise it takes the lock and first commits the dirty data acknowledged before it.
    """

    __slots__ = ("fs", "view", "m", "locked")

    def __init__(self, fs: "Filesystem", view: View) -> None:
        self.fs = fs
        self.view = view
        self.locked = False

    async def __aenter__(self) -> Mutation:
        fs = self.fs
        if not self.view.writable:
            raise FSError(errno.EROFS)
        if fs.lock.locked() or fs.dirty_nodes:
            await fs.acquire_lock()
            self.locked = True
            try:
                await fs._flush_locked()
            except BaseException:
                fs.lock.release()
                raise
        self.m = Mutation(fs)
        return self.m

    async def __aexit__(self, etype: object, exc: object, tb: object) -> bool:
        try:
            if etype is None:
                self.fs._commit(self.m)
        finally:
            if self.locked:
                self.fs.lock.release()
        return False


class Filesystem:
    def __init__(self, store: Store, branch: str = "main", compression_level: int = 3,
                 prefetch: bool = False, learn: bool = False) -> None:
        self.store = store
        self.level = compression_level
        self.lock = trio.Lock()
        # Held by garbage collection and the sharer's passes: they never interleave.
        self.maintenance = trio.Lock()
        self.views: dict[int, View] = {}
        b = store.catalog.branches.get(branch)
        if b is None:
            raise FSError(errno.ENOENT, f"no branch named {branch!r}")
        # Pre-rollback trees still referenced by open handles, by (view id, epoch % EPOCHS).
        self.detached: dict[tuple[int, int], View] = {}
        self.dirty_nodes: dict[Node, float] = {}  # node -> time it first became dirty
        self.flush_running = False  # a flush holds taken chunks (under the lock, maybe in a thread)
        self.dirty_bytes = 0
        self.flushing_bytes = 0  # what the flush in progress took
        # Acknowledged but not committed: the store counts it against its free space.
        store.held = lambda: disk_cost(self.dirty_bytes + self.flushing_bytes)
        # What the kernel may hold acknowledged (dirty pages) before we see it: its dirty
        # limit for this mount (the daemon reads it from sysfs once mounted).
        self.kernel_dirty = KERNEL_DIRTY
        # Nodes whose kernel view (size, pages) ran ahead of ours after a refused write;
        # the FUSE layer brings it back (Operations.kernel_syncer).
        self.kernel_unsynced: set[Node] = set()
        self.kernel_sync_wanted = trio.Event()
        self.flush_count = 0
        self.gc_wanted = trio.Event()
        self.flush_wanted = trio.Event()
        # Set by the daemon: makes the kernel write its dirty pages back to us (syncfs).
        self.kernel_sync: Callable[[], Awaitable[None]] | None = None
        # Set by the FUSE layer: pull the dirty pages of files open for writing.
        self.writers_sync: Callable[[], Awaitable[None]] | None = None
        # Background chunk loading (readahead, learned prefetch); run by the daemon's nursery.
        self.fetcher = Fetcher(store.objects, store.in_thread) if prefetch else None
        self.learner = Learner(store.kv, store.catalog, learn) if prefetch or learn else None
        self._reserved: bytes | None = None  # the encoding of the reserved (all-zero) chunk
        self.primary = self.branch_view(b.name)
        # Before any task or thread exists, nothing can race this commit; other branches'
        # orphans go under the lock (attach_branch).
        m = Mutation(self)
        if self._orphans(self.primary, m):
            self._commit(m)

    def _add_view(self, vid: int, name: str, kind: str, top: int, epoch: int = 0) -> View:
        lv = LayerView(top, frozenset(self.store.catalog.ancestry(top)))
        view = View(vid, name, kind, lv, epoch)
        self.views[vid] = view
        return view

    def branch_view(self, name: str) -> View:
        """The view of a branch (created once).  Its orphans of a previous daemon are not
        removed here: see attach_branch."""
        b = self.store.catalog.branches.get(name)
        if b is None:
            raise FSError(errno.ENOENT, f"no branch named {name!r}")
        view = self.views.get(b.view)
        if view is None:
            view = self._add_view(b.view, b.name, "branch", b.head, b.epoch)
            view.quota_bytes, view.quota_inodes = b.quota_bytes, b.quota_inodes
            self.load_usage(view)
        return view

    async def attach_branch(self, name: str) -> View:
        """The view of a branch about to be served, its orphans of a previous daemon removed
        first, as an ordinary mutation: under the lock whenever a flush holds it (a threaded
        flush has judged chunks present that freeing an orphan could otherwise take away
        before its commit)."""
        b = self.store.catalog.branches.get(name)
        fresh = b is not None and b.view not in self.views
        view = self.branch_view(name)
        if fresh:
            async with self.mutate(view) as m:
                self._orphans(view, m)
        return view

    def set_quota(self, view: View, quota_bytes: int | None, quota_inodes: int | None) -> None:
        """Persist a branch's quotas (None: leave as is, 0: none)."""
        b = self.store.catalog.branches[view.name]
        if quota_bytes is not None:
            b.quota_bytes = view.quota_bytes = quota_bytes
        if quota_inodes is not None:
            b.quota_inodes = view.quota_inodes = quota_inodes
        batch = Batch()
        self.store.catalog.save_branch(b, batch)
        self.store.commit(batch)

    def load_usage(self, view: View) -> None:
        """The committed usage of a view (what buffered writes add is kept in alloc_pending)."""
        usage = self.store.catalog.usage(view.lv.top)
        if usage is None:  # never recorded (a snapshot's first view): count once
            usage = self.store.count_usage(view.lv)
        view.usage_bytes, view.usage_inodes, view.alloc_bytes = usage

    def snapshot_view(self, snap: "object") -> View:
        view = self.views.get(snap.view)  # type: ignore[attr-defined]
        if view is None:
            view = self._add_view(snap.view, snap.name, "snapshot", snap.layer)  # type: ignore[attr-defined]
        return view

    def drop_views(self, name: str) -> None:
        """A snapshot or branch was deleted.  Its view stays (and garbage collection spares
        its layer) while the kernel still holds inodes of it, as for unlinked files; then it
        goes and its inode numbers become stale."""
        for vid, v in list(self.views.items()):
            if v.name == name and v.kind != "detached" and v is not self.primary:
                v.retired = True
                if v.held <= 0:
                    del self.views[vid]

    def live_tops(self) -> set[int]:
        """Layers someone can still read from: the catalog's, and views the kernel still uses."""
        return (self.store.catalog.leaves() | {v.lv.top for v in self.detached.values()}
                | {v.lv.top for v in self.views.values()})

    def detach(self, view: View, new_lv: LayerView, epoch: int) -> None:
        """After a rollback: move the cached tree aside (open handles keep it), restore the root."""
        old = View(view.vid, view.name, "detached", view.lv, view.epoch)
        old.alloc_pending, view.alloc_pending = view.alloc_pending, 0  # it goes with the nodes
        # Writes through handles opened before go on counting against the branch's quota
        # (from what the branch had), as they did.
        old.quota_bytes, old.quota_inodes = view.quota_bytes, view.quota_inodes
        old.usage_bytes, old.usage_inodes, old.alloc_bytes = view.usage_bytes, view.usage_inodes, view.alloc_bytes
        root = view.nodes.pop(ROOT_INO, None)
        for ino, node in view.nodes.items():
            node.view = old
            if _held(node):
                old.held += 1
            elif node not in self.dirty_nodes and not node.flushing:
                continue  # nothing needs it: it goes now, not kept with the old tree
            old.nodes[ino] = node
        view.nodes = {}
        view.held = 1 if root is not None and _held(root) else 0
        view.lv = new_lv
        view.epoch = epoch
        if root is not None:
            found = self.store.meta.get(CF_INODES, ino_key(ROOT_INO), new_lv)
            assert found is not None and found[1], "every layer sees the root directory"
            root.attrs = Attrs.unpack(found[1])
            root.stored_layer = found[0]
            root.stored_root = root.attrs.root
            view.nodes[ROOT_INO] = root
        if old.nodes:
            self.detached[(old.vid, old.epoch % EPOCHS)] = old

    def freeze_head(self, m: Mutation, view: View) -> int:
        """Freeze the branch head (return it) and move the branch to a fresh child layer:
        for a snapshot, a branch, or the sharer (whose ranges read from frozen layers)."""
        b = self.store.catalog.branches.get(view.name)
        if b is None or view.kind != "branch":
            raise FSError(errno.EROFS, "this view is not a branch")
        frozen = b.head
        b.head = self.store.catalog.new_layer(frozen, m.batch)
        self.store.catalog.save_branch(b, m.batch)
        view.lv = LayerView(b.head, view.lv.ancestors | {b.head})
        m.views.add(view)  # the new head starts with the frozen layer's usage
        return frozen

    def schedule_gc(self) -> None:
        self.gc_wanted.set()

    async def sync_kernel(self) -> None:
        """Have the kernel send us every write it has acknowledged (before a snapshot, clone
        or diff of the live tree): syncfs on the mount, then, since syncfs has been seen to
        return before a file still open for writing was written back, each such file."""
        if self.kernel_sync is not None:
            await self.kernel_sync()
        if self.writers_sync is not None:
            await self.writers_sync()

    # -- node table ------------------------------------------------------------------------
    def path_of(self, lv: LayerView, ino: int, cache: dict[int, str | None]) -> str | None:
        """Path of inode ino in the layer view ("" for the root; None if it has no name there),
        from the (parent, name) each inode record keeps; cache memoizes the ancestors.  Pure KV
        reads: safe in a thread.  Walks up without recursion (any depth), and a parent chain
        that loops (a damaged store) has no path."""
        chain: list[tuple[int, bytes]] = []  # (inode, its name) from ino upwards
        seen: set[int] = set()
        cur = ino
        while True:
            if cur == ROOT_INO:
                path: str | None = ""
                break
            if cur in cache:
                path = cache[cur]
                break
            found = self.store.meta.get(CF_INODES, ino_key(cur), lv)
            if not found or not found[1] or cur in seen:
                path = None
                chain.append((cur, b""))
                break
            seen.add(cur)
            a = Attrs.unpack(found[1])
            chain.append((cur, a.name))
            if not a.parent:
                path = None
                break
            cur = a.parent
        for node_ino, name in reversed(chain):
            path = join_path(path, name) if path is not None and name else None
            cache[node_ino] = path
        return path

    def node(self, view: View, ino: int, unlinked_ok: bool = False) -> Node:
        """Node ino of view; unlinked_ok: also a dropped one still in memory (its last attributes)."""
        n = view.nodes.get(ino)
        if n is not None and (not n.deleted or unlinked_ok):
            return n
        if n is not None:
            raise FSError(errno.ENOENT)
        found = self.store.meta.get(CF_INODES, ino_key(ino), view.lv)
        if found is None or not found[1]:
            raise FSError(errno.ENOENT)
        n = Node(view, ino, Attrs.unpack(found[1]), found[0])
        view.nodes[ino] = n
        return n

    def new_copy(self, parent: Node, attrs: Attrs) -> Node:
        """A new inode in parent's view with attrs (a clone's copy of another), kept in the
        node table: the caller's mutation saves it."""
        node = Node(parent.view, self.store.alloc_ino(), attrs, None)
        parent.view.nodes[node.ino] = node
        return node

    # -- the node lifecycle ------------------------------------------------------------------
    # A Node stays in memory while the kernel holds its inode number (`lookups`: the entries
    # we replied with, less what FORGET gave back), while handles are open on it (`opens`),
    # while its data is dirty or flushing, and as its view's root; nothing else keeps it.
    # Every change of `lookups` and `opens` goes through the methods below, which keep each
    # view's count of held nodes (`View.held`): a detached tree or a retired view goes with
    # its last held node, at no scan.  (When the FUSE layer changed the counts itself, its
    # FORGET looked nodes up as live ones: a deleted node was never forgotten, and every
    # `rm -rf` leaked its nodes.)
    def _refs(self, node: Node, lookups: int = 0, opens: int = 0) -> None:
        was = _held(node)
        node.lookups += lookups
        node.opens += opens
        now = _held(node)
        if was != now:
            node.view.held += 1 if now else -1

    def looked_up(self, node: Node) -> None:
        """The kernel got node in an entry reply (LOOKUP, CREATE, MKDIR, LINK, READDIRPLUS...)."""
        self._refs(node, lookups=1)

    def forget(self, node: Node, n: int) -> None:
        """FORGET: the kernel gives back n of its references."""
        self._refs(node, lookups=-n)
        self._maybe_evict(node)

    def _maybe_evict(self, node: Node) -> None:
        """Drop node from memory if nothing needs it, and its view if that was its last held
        node and the view is a detached tree or retired (a view's root stays with the view).
        Not while a flush holds its data: a second Node for the inode, loaded from the store
        meanwhile, would not know the flush's commit (its stale root would be released
        twice, the new one never).  The flush calls us again when it is done."""
        if _held(node) or node in self.dirty_nodes or node.flushing:
            return
        view = node.view
        if node.ino != ROOT_INO and view.nodes.get(node.ino) is node:
            del view.nodes[node.ino]
        if view.kind == "detached":
            if not view.nodes:
                self.detached.pop((view.vid, view.epoch % EPOCHS), None)
                self.schedule_gc()
        elif view.retired and view.held <= 0:
            if self.views.pop(view.vid, None) is not None:
                self.schedule_gc()

    evict_if_unused = _maybe_evict

    def memory_figures(self) -> dict[str, int]:
        """In-memory nodes (the part of the daemon's memory that follows the kernel's inode
        cache) and the views that hold them."""
        views = list(self.views.values()) + list(self.detached.values())
        return {"nodes": sum(len(v.nodes) for v in views), "held": sum(v.held for v in views),
                "views": len(self.views), "detached_views": len(self.detached)}

    def child_ino(self, parent: Node, name: bytes) -> int | None:
        found = self.store.meta.get(CF_DIRENTS, name_key(parent.ino, name), parent.view.lv)
        if found is None or not found[1]:
            return None
        return int.from_bytes(found[1][:8], "big")

    def lookup(self, parent: Node, name: bytes) -> Node:
        _check_name(name)
        if not parent.attrs.is_dir:
            raise FSError(errno.ENOTDIR)
        ino = self.child_ino(parent, name)
        if ino is None:
            raise FSError(errno.ENOENT)
        return self.node(parent.view, ino)

    def list_dir(self, node: Node) -> list[tuple[bytes, int]]:
        if not node.attrs.is_dir:
            raise FSError(errno.ENOTDIR)
        return [(name, int.from_bytes(v[:8], "big"))
                for name, v in self.store.meta.scan_names(CF_DIRENTS, node.ino, node.view.lv)]

    def _dir_empty(self, node: Node) -> bool:
        for _ in self.store.meta.scan_names(CF_DIRENTS, node.ino, node.view.lv):
            return False
        return True

    # -- mutations -------------------------------------------------------------------------
    def mutate(self, view: View) -> "_Scope":
        """`async with fs.mutate(view) as m:` validate, change, and commit on exit."""
        return _Scope(self, view)

    def _commit(self, m: Mutation) -> None:
        settled: list[tuple[Node, int]] = []

        def settle() -> None:
            """The reference changes are in the batch: the new trees' sizes are known.  Each
            saved file's committed allocation becomes its new root's content size; the
            views' usage records go in the batch with it."""
            objects = self.store.objects
            grown: dict[View, int] = {}
            for node in {id(n): n for n in m.saved}.values():
                root = None if node.deleted or node.stored_root is None else node.stored_root.hash
                new = objects.content_size(root, m.txn) if node.attrs.is_reg else 0
                settled.append((node, new))
                grown[node.view] = grown.get(node.view, 0) + new - node.stored_alloc  # type: ignore[operator]
                if m.charge and new > node.alloc:  # type: ignore[operator]
                    node.view.check_quota(more_bytes=new - node.alloc)  # type: ignore[operator]
                    if self.store.space_low(new - node.alloc):  # type: ignore[operator]
                        raise FSError(errno.ENOSPC, "the store's disk has no room for the reservation")
            for view in m.views | grown.keys():
                if view.kind == "branch":
                    self.store.catalog.save_usage(view.lv.top, Usage(view.usage_bytes, view.usage_inodes,
                                                                     view.alloc_bytes + grown.get(view, 0)), m.batch)

        try:
            self.store.commit(m.batch, m.txn, settle)
        except FSError:  # refused by settle (a quota): nothing was written
            self._revert(m)
            raise
        except Exception as exc:
            error = str(exc)
        else:
            for node, new in settled:
                d = new - node.stored_alloc  # type: ignore[operator]
                node.stored_alloc = new
                node.view.alloc_bytes += d
                node.view.alloc_pending -= d
                if not node.dirty and not node.flushing:
                    self._settle_alloc(node)
            return
        # Outside the except block: the traceback (and the iterators its frames hold, which
        # keep the database open) is gone before the store reopens.
        log.error("commit failed: %s", error)
        self._revert(m)
        self.store.recover()
        raise FSError(errno.ENOSPC if "space" in error.lower() else errno.EIO, error)

    def allocated(self, node: Node) -> int:
        """node.alloc, loaded on first use: its committed tree's content size (one refs read)."""
        if node.alloc is None:
            objects = self.store.objects
            committed = node.stored_root if node.stored_layer is not None else None
            node.stored_alloc = objects.content_size(committed.hash) if committed is not None else 0
            # A node made by clone has a tree before it has a record: it is pending until its commit.
            node.alloc = objects.content_size(node.attrs.root.hash) if node.attrs.root is not None else 0
            node.view.alloc_pending += node.alloc - node.stored_alloc
        return node.alloc

    @staticmethod
    def _settle_alloc(node: Node) -> None:
        """A node without buffers has allocated what its committed tree holds."""
        node.view.alloc_pending -= node.alloc - node.stored_alloc  # type: ignore[operator]
        node.alloc = node.stored_alloc

    def blocks(self, node: Node) -> int:
        """st_blocks: a regular file's allocated bytes in 512-byte units (holes do not count)."""
        if node.attrs.is_reg:
            return (self.allocated(node) + 511) // 512
        return (node.attrs.size + 511) // 512

    def _revert(self, m: Mutation) -> None:
        """Memory ran ahead of a commit that failed: return the touched nodes to what is stored.

        Node objects stay the same (open handles point at them); their attributes and tree
        roots are reloaded, except that a node's size still covers its dirty buffers (the
        caller puts unflushed data back into them).
        """
        for node in {id(n): n for n in m.saved}.values():
            found = self.store.meta.get(CF_INODES, ino_key(node.ino), node.view.lv)
            if found is None or not found[1]:
                node.deleted = True  # created by the failed mutation: it never existed
                node.stored_layer = node.stored_root = None
                node.counted, node.counted_bytes = False, 0
                if node.alloc is not None:
                    node.view.alloc_pending -= node.alloc - node.stored_alloc  # type: ignore[operator]
                    node.alloc = node.stored_alloc = 0
                node.view.nodes.pop(node.ino, None)
                continue
            size = node.attrs.size
            node.attrs = Attrs.unpack(found[1])
            node.stored_layer, node.stored_root = found[0], node.attrs.root
            node.deleted = False
            # What the reloaded usage counts for it (a flush adds its buffers' growth later).
            node.counted, node.counted_bytes = True, node.attrs.size if node.attrs.is_reg else 0
            if node.dirty or node.flushing:
                node.attrs.size = max(node.attrs.size, size)
            node.view.nodes.setdefault(node.ino, node)
        for view in m.views:
            if view.kind == "branch":
                self.load_usage(view)

    def _new_node(self, m: Mutation, parent: Node, mode: int, uid: int, gid: int, rdev: int = 0,
                  target: bytes = b"", groups: Iterable[int] = ()) -> Node:
        pa = parent.attrs
        caller_gid = gid
        if pa.mode & stat.S_ISGID:
            gid = pa.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        # As inode_init_owner(): a non-root caller outside the file's group loses S_ISGID.
        if (mode & stat.S_ISGID and not stat.S_ISDIR(mode) and uid != 0
                and gid != caller_gid and gid not in groups):
            mode &= ~stat.S_ISGID
        ino = self.store.alloc_ino()
        nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs = Attrs(mode, uid, gid, nlink, rdev, len(target), m.now, m.now, m.now, None, target)
        attrs.parent = parent.ino
        node = Node(parent.view, ino, attrs, None)
        parent.view.nodes[ino] = node
        return node

    async def make(self, parent: Node, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                   target: bytes = b"", groups: Iterable[int] = ()) -> Node:
        """mknod, mkdir, symlink and create: a new inode linked under parent."""
        _check_name(name)
        async with self.mutate(parent.view) as m:
            if not parent.attrs.is_dir:
                raise FSError(errno.ENOTDIR)
            if parent.attrs.nlink == 0:
                raise FSError(errno.ENOENT)
            if self.child_ino(parent, name) is not None:
                raise FSError(errno.EEXIST)
            parent.view.check_quota(more_inodes=1)
            if self.store.space_low(0, metadata=True):
                raise FSError(errno.ENOSPC, "the store's disk is (nearly) full")
            node = self._new_node(m, parent, mode, uid, gid, rdev, target, groups)
            if stat.S_ISDIR(mode):
                parent.attrs.nlink += 1
            m.link(parent, name, node)
            m.touch(parent)
            m.save(node)
            m.save(parent)
        return node

    def _release_inode(self, m: Mutation, node: Node) -> None:
        """The last name went: drop the inode now, or when its last handle closes."""
        if node.opens > 0:
            m.batch.put(CF_ORPHANS, self._orphan_key(node), b"")
            m.save(node)
        else:
            self._discard_dirty(node)
            m.drop(node)

    def _orphan_key(self, node: Node) -> bytes:
        return node.view.lv.top.to_bytes(8, "big") + ino_key(node.ino)

    def _discard_dirty(self, node: Node) -> None:
        if node in self.dirty_nodes:
            del self.dirty_nodes[node]
            self.dirty_bytes -= len(node.dirty) * CHUNK
        node.dirty.clear()

    async def unlink(self, parent: Node, name: bytes, want_dir: bool) -> None:
        _check_name(name)
        async with self.mutate(parent.view) as m:
            ino = self.child_ino(parent, name)
            if ino is None:
                raise FSError(errno.ENOENT)
            node = self.node(parent.view, ino)
            if want_dir:
                if not node.attrs.is_dir:
                    raise FSError(errno.ENOTDIR)
                if not self._dir_empty(node):
                    raise FSError(errno.ENOTEMPTY)
            elif node.attrs.is_dir:
                raise FSError(errno.EISDIR)
            m.unlink(parent, name)
            m.touch(parent)
            if node.attrs.is_dir:
                parent.attrs.nlink -= 1
                node.attrs.nlink = 0
            else:
                node.attrs.nlink -= 1
                self._name_gone(m, node, parent.ino, name)
            m.touch(node, mtime=False)
            m.save(parent)
            if node.attrs.nlink <= 0:
                self._release_inode(m, node)
            else:
                m.save(node)

    # -- the names of hard-linked files (cowfs.meta.links) ------------------------------------
    def _names_of(self, node: Node) -> list[tuple[int, bytes]]:
        """node's names as committed: its record's (parent, name) and its index keys, each
        checked against the entry (a store from before format 6 may have kept a stale one)."""
        a, lv = node.attrs, node.view.lv
        out = links.names_of(self.store.meta, node.ino, lv)
        if a.parent and (a.parent, a.name) not in out:
            found = self.store.meta.get(CF_DIRENTS, name_key(a.parent, a.name), lv)
            if found and found[1] and int.from_bytes(found[1][:8], "big") == node.ino:
                out.append((a.parent, a.name))
        return out

    def more_names(self, m: Mutation, node: Node, parent: Node, name: bytes, new: bool = False) -> None:
        """node, not a directory, gets the name (parent, name) (its link count counts it
        already): index it, and when the count just became 2, the name it had (new: that
        name was made in this mutation, so the record's (parent, name) is it)."""
        a = node.attrs
        if a.is_dir or a.nlink < 2:
            return
        if a.nlink == 2:
            for first in ([(a.parent, a.name)] if new else self._names_of(node)):
                m.index_name(node, *first)
        m.index_name(node, parent.ino, name)

    def _name_gone(self, m: Mutation, node: Node, parent: int, name: bytes) -> None:
        """node, not a directory, lost the name (parent, name) and its link count is already
        lowered.  Down to one name: the record says which, and the index forgets the inode."""
        if node.attrs.nlink < 1:
            return
        m.unindex_name(node, parent, name)
        if node.attrs.nlink > 1:
            return
        left = [n for n in self._names_of(node) if n != (parent, name)]
        if left:
            node.attrs.parent, node.attrs.name = left[0]
        for p, n in links.names(self.store.meta, node.ino, node.view.lv):
            if (p, n) != (parent, name):
                m.unindex_name(node, p, n)

    async def link(self, node: Node, parent: Node, name: bytes) -> None:
        _check_name(name)
        if node.view is not parent.view:
            raise FSError(errno.EROFS if not parent.view.writable else errno.EXDEV)
        async with self.mutate(parent.view) as m:
            if node.attrs.is_dir:
                raise FSError(errno.EPERM)
            if node.attrs.nlink == 0:
                raise FSError(errno.ENOENT)
            if self.child_ino(parent, name) is not None:
                raise FSError(errno.EEXIST)
            node.attrs.nlink += 1
            self.more_names(m, node, parent, name)
            m.link(parent, name, node)
            m.touch(parent)
            m.touch(node, mtime=False)
            m.save(node)
            m.save(parent)

    async def rename(self, op: Node, oname: bytes, np: Node, nname: bytes, flags: int,
                     uid: int = 0, gid: int = 0) -> None:
        """rename and renameat2.  RENAME_WHITEOUT (overlayfs's upper directories use it) puts
        a whiteout at the old name in the same commit: a character device 0/0 with no
        permission bits, owned by the caller (uid, gid), as the kernel's own filesystems do."""
        _check_name(oname)
        _check_name(nname)
        if flags & ~RENAME_FLAGS:
            raise FSError(errno.EINVAL, f"unknown rename flags {flags & ~RENAME_FLAGS:#x}")
        noreplace = bool(flags & RENAME_NOREPLACE)
        exchange = bool(flags & RENAME_EXCHANGE)
        whiteout = bool(flags & RENAME_WHITEOUT)
        if exchange and (noreplace or whiteout):
            raise FSError(errno.EINVAL)
        if not op.view.writable or not np.view.writable:
            raise FSError(errno.EROFS)
        if np.view is not op.view:  # another branch's tree: another filesystem, as far as rename goes
            raise FSError(errno.EXDEV)
        wo: Node | None = None
        async with self.mutate(op.view) as m:
            sino = self.child_ino(op, oname)
            if sino is None:
                raise FSError(errno.ENOENT)
            src = self.node(op.view, sino)
            dino = self.child_ino(np, nname)
            dst = self.node(np.view, dino) if dino is not None else None
            if dst is not None and noreplace:
                raise FSError(errno.EEXIST)
            if exchange:
                if dst is None:
                    raise FSError(errno.ENOENT)
                for n, old, new in ((src, (op.ino, oname), (np.ino, nname)), (dst, (np.ino, nname), (op.ino, oname))):
                    if n.attrs.nlink > 1 and not n.attrs.is_dir:
                        m.unindex_name(n, *old)
                        m.index_name(n, *new)
                m.link(np, nname, src)
                m.link(op, oname, dst)
                if op is not np and src.attrs.is_dir != dst.attrs.is_dir:
                    d = 1 if src.attrs.is_dir else -1
                    op.attrs.nlink -= d
                    np.attrs.nlink += d
                m.touch(src, dst, mtime=False)
                m.touch(op, np)
                for n in {id(x): x for x in (src, dst, op, np)}.values():
                    m.save(n)
                return
            if dst is src:
                return
            if dst is not None:
                if src.attrs.is_dir:
                    if not dst.attrs.is_dir:
                        raise FSError(errno.ENOTDIR)
                    if not self._dir_empty(dst):
                        raise FSError(errno.ENOTEMPTY)
                elif dst.attrs.is_dir:
                    raise FSError(errno.EISDIR)
            if whiteout:
                op.view.check_quota(more_inodes=1)
                if self.store.space_low(0, metadata=True):
                    raise FSError(errno.ENOSPC, "the store's disk is (nearly) full")
                wo = self._new_node(m, op, stat.S_IFCHR, uid, gid)
                m.link(op, oname, wo)  # replaces the old entry in the same batch
                m.save(wo)
            else:
                m.unlink(op, oname)
            if src.attrs.nlink > 1 and not src.attrs.is_dir:
                m.unindex_name(src, op.ino, oname)
                m.index_name(src, np.ino, nname)
            m.link(np, nname, src)
            if dst is not None:
                if dst.attrs.is_dir:
                    np.attrs.nlink -= 1
                    dst.attrs.nlink = 0
                else:
                    dst.attrs.nlink -= 1
                    self._name_gone(m, dst, np.ino, nname)
                m.touch(dst, mtime=False)
            if src.attrs.is_dir and op is not np:
                op.attrs.nlink -= 1
                np.attrs.nlink += 1
            m.touch(src, mtime=False)
            m.touch(op, np)
            m.save(src)
            m.save(op)
            if np is not op:
                m.save(np)
            if dst is not None:
                if dst.attrs.nlink <= 0:
                    self._release_inode(m, dst)
                else:
                    m.save(dst)
        if wo is not None:
            self._maybe_evict(wo)  # the kernel learns of it by a lookup, if ever

    async def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, ctime_ns: int | None = None,
                      kill_suid: bool = False, user: bool = True) -> None:
        """chmod, chown, truncate, utimens.  kill_suid: clear set-user-ID (and set-group-ID
        with group-exec) as the kernel does for a truncating open by a non-root caller,
        which FUSE's atomic O_TRUNC leaves to the filesystem.  A truncate by a user (not
        the daemon itself) ends the cut of a file whose acknowledged writes were refused:
        the kernel takes the size we reply and drops its pages, so the views agree."""
        if size is None and node in self.dirty_nodes and node.view.writable:
            # A file with data waiting to be committed: in writeback mode that is the kernel
            # passing on the times of a file it is still writing, or a chmod/chown right after
            # the data (tar, cp -a: the kernel writes the pages back first).  The change goes
            # with the data, in the node's next flush (any later operation commits all dirty
            # data first, so the prefix rule holds), instead of a commit of its own after a
            # flush of everything dirty: three commits fewer per file tar extracts.
            a = node.attrs
            self._set_attrs(a, mode, uid, gid, atime_ns, mtime_ns, kill_suid)
            a.ctime_ns = ctime_ns if ctime_ns is not None else now_ns()
            return
        async with self.mutate(node.view) as m:
            a = node.attrs
            same_size = size is not None and size == a.size
            if size is not None:
                if a.is_dir:
                    raise FSError(errno.EISDIR)
                if size > MAX_FILE_SIZE or size < 0:
                    raise FSError(errno.EFBIG)
                if size != a.size:  # allocates nothing: no quota to check
                    shrink = size < a.size
                    node.truncate_buffers(size, self.store.objects)
                    self._flush_node_into(m, node, self._encode(node.dirty), size, cut=shrink)
                    node.dirty.clear()
                    a.mtime_ns = m.now
            self._set_attrs(a, mode, uid, gid, atime_ns, mtime_ns, kill_suid)
            if ctime_ns is not None:
                a.ctime_ns = ctime_ns
            elif not (a.is_reg and same_size and mode is None and uid is None and gid is None
                      and atime_ns is None and mtime_ns is None):
                # A truncate to the current size changes nothing; the kernel (which owns a
                # written file's times) does not show a new ctime for it either.
                a.ctime_ns = m.now
            if not node.deleted:  # else an unlinked FIFO or socket still open: nothing stored
                m.save(node)
        if size is not None and user and node.cap is not None:
            node.cap = None
            self.kernel_unsynced.discard(node)

    @staticmethod
    def _set_attrs(a: Attrs, mode: int | None, uid: int | None, gid: int | None, atime_ns: int | None,
                   mtime_ns: int | None, kill_suid: bool) -> None:
        if kill_suid and a.is_reg:
            a.mode &= ~stat.S_ISUID
            if a.mode & stat.S_IXGRP:
                a.mode &= ~stat.S_ISGID
        if mode is not None:
            a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(mode)
        if uid is not None:
            a.uid = uid
        if gid is not None:
            a.gid = gid
        if atime_ns is not None:
            a.atime_ns = atime_ns
        if mtime_ns is not None:
            a.mtime_ns = mtime_ns

    # -- xattrs ----------------------------------------------------------------------------
    def getxattr(self, node: Node, name: bytes) -> bytes:
        _check_xattr_name(name)
        found = self.store.meta.get(CF_XATTRS, name_key(node.ino, name), node.view.lv)
        if found is None or not found[1]:
            raise FSError(errno.ENODATA)
        return found[1][1:]  # leading byte keeps empty values distinct from tombstones

    def listxattr(self, node: Node) -> list[bytes]:
        return [name for name, _ in self.store.meta.scan_names(CF_XATTRS, node.ino, node.view.lv)]

    def copy_xattrs(self, m: Mutation, src: Node, dst: Node) -> None:
        """Give dst (a clone's copy) src's xattrs, in m."""
        for name, value in self.store.meta.scan_names(CF_XATTRS, src.ino, src.view.lv):
            self.store.meta.put(m.batch, CF_XATTRS, name_key(dst.ino, name), dst.view.lv.top, value)

    async def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        _check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FSError(errno.E2BIG)
        async with self.mutate(node.view) as m:
            self.store.meta.put(m.batch, CF_XATTRS, name_key(node.ino, name), node.view.lv.top, b"v" + value)
            m.touch(node, mtime=False)
            m.save(node)

    async def removexattr(self, node: Node, name: bytes) -> None:
        async with self.mutate(node.view) as m:
            self.getxattr(node, name)
            self.store.meta.delete(m.batch, CF_XATTRS, name_key(node.ino, name), node.view.lv)
            m.touch(node, mtime=False)
            m.save(node)

    # -- data ------------------------------------------------------------------------------
    def read(self, node: Node, off: int, size: int, stream: Readahead | None = None) -> bytes | memoryview:
        """Serve a read; tell the learned model and the handle's readahead about it."""
        objects = self.store.objects
        try:
            data = node.read_run(off, size, objects)
            run = data is not None
            if data is None:
                data = node.read(off, size, objects)
            if len(data) and self.learner is not None and node.view.kind == "branch":
                self.learner.read(node.view.name, node.ino, off // CHUNK, (off + len(data) - 1) // CHUNK)
            # A run read from a pack reads the pack ahead itself (ObjectStore.read_run).
            if stream is not None and not run:
                want = stream.observe(off, size, node.attrs.size)
                if want:
                    hashes = [h for i in want if (h := node.stored_hash(i, objects)) is not None]
                    objects.read_ahead(hashes)  # packed ones: the kernel starts reading them now
                    if self.fetcher is not None:
                        self.fetcher.want(hashes, READAHEAD)
        except codec.CorruptObject as exc:
            log.error("read of inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc
        return data

    async def write(self, node: Node, off: int, data: bytes) -> int:
        if not node.view.writable:
            raise FSError(errno.EROFS)
        end = off + len(data)
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)
        if node.cap is not None and end > node.cap:
            self._refuse(node, off, end, node.cap_errno, "beyond what an earlier refused write left")
        if self.store.space_low(len(data)) and not await self._room_after_flush(len(data)):
            self._refuse(node, off, end, errno.ENOSPC, "the store's disk is (nearly) full")
        view = node.view
        before = self.allocated(node)

        def charge(growth: int) -> None:
            view.check_quota(more_bytes=growth)

        size = node.attrs.size
        refused: FSError | None = None
        try:
            new = node.write(off, data, self.store.objects, charge)
        except codec.CorruptObject as exc:
            log.error("write of inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc
        except FSError as exc:  # the quota (charge), before any buffer changed
            refused = exc
        finally:
            view.alloc_pending += node.alloc - before  # type: ignore[operator]
        if refused is not None:
            self._refuse(node, off, end, refused.errno, str(refused))
        if node.attrs.size > size:  # logical bytes: the file size
            view.usage_bytes += node.attrs.size - size
            node.counted_bytes += node.attrs.size - size
        if new:
            self.dirty_bytes += new * CHUNK
        if new or node.attrs.size > size:  # zeros over holes buffer nothing, but the size must commit
            self.dirty_nodes.setdefault(node, time.monotonic())
        if self.dirty_bytes > DIRTY_LIMIT:
            try:
                await self.flush()
            except FSError as exc:
                # This write is in the dirty buffers: it succeeded.  The flush is retried, and
                # fsync reports it if it keeps failing.
                log.error("flush at the dirty limit failed: %s", exc)
        elif self.dirty_bytes > EARLY_FLUSH_BYTES:
            self.flush_wanted.set()
        return len(data)

    def seek(self, node: Node, off: int, whence: int) -> int:
        """lseek(SEEK_DATA / SEEK_HOLE): the first data (or hole) at or after off, in chunk
        lengths (a chunk's data runs from its start to its length; reserved chunks and EOF
        are holes).  ENXIO at or beyond EOF, and when no data follows."""
        size = node.attrs.size
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise FSError(errno.EINVAL)
        if off < 0 or off >= size:
            raise FSError(errno.ENXIO)
        try:
            chunks = node.data_chunks(off // CHUNK, self.store.objects)
            if whence == SEEK_DATA:
                for i, length in chunks:
                    if off < i * CHUNK + length:
                        return max(off, i * CHUNK)
                raise FSError(errno.ENXIO)
            pos = off
            for i, length in chunks:
                if i * CHUNK > pos:
                    break
                pos = max(pos, i * CHUNK + length)
                if length < CHUNK:
                    break
            return min(pos, size)
        except codec.CorruptObject as exc:
            log.error("seek in inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc

    async def fallocate(self, node: Node, mode: int, off: int, length: int) -> None:
        """fallocate(2): mode 0 and KEEP_SIZE reserve (holes in the range become reserved
        chunks: zeros that count as allocated, so the byte quota is charged now and later
        writes there are not; reservations beyond EOF stay until a truncate cuts them);
        PUNCH_HOLE frees whole chunks and zeroes partial ones; ZERO_RANGE zeroes, keeping
        the range allocated (whole chunks become reserved).  Other modes: EOPNOTSUPP."""
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or (
                mode & FALLOC_FL_PUNCH_HOLE and (mode & FALLOC_FL_ZERO_RANGE or not mode & FALLOC_FL_KEEP_SIZE)):
            raise FSError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise FSError(errno.EINVAL)
        if off + length > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)
        if not node.attrs.is_reg:
            raise FSError(errno.ENODEV)
        end = off + length
        objects = self.store.objects
        async with self.mutate(node.view) as m:
            if node.deleted:
                raise FSError(errno.ENOENT)
            self.allocated(node)
            writer = TreeWriter(objects.node, m.txn)
            root, size = node.attrs.root, node.attrs.size
            encoded: dict[int, tuple[bytes, bytes | None] | None] = {}
            first, last = -(-off // CHUNK), end // CHUNK  # the chunks the range covers whole
            edges = sorted({j for j in (off // CHUNK, (end - 1) // CHUNK) if not first <= j < last})
            try:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    root, _ = writer.fill(root, first, last, None, False, objects.content_size)
                elif mode & FALLOC_FL_ZERO_RANGE:
                    root, _ = writer.fill(root, first, last, RESERVED, False, objects.content_size)
                else:
                    root, short = writer.fill(root, off // CHUNK, -(-end // CHUNK), RESERVED, True,
                                              objects.content_size)
                    for j in short:  # data that ends early: lengthened with zeros over the range
                        data = node.chunk(j, objects)
                        need = min(CHUNK, end - j * CHUNK)
                        if data is not None and len(data) < need:
                            node.dirty[j] = bytearray(data) + bytes(need - len(data))
                    edges = []
                for j in edges:  # chunks the range covers in part
                    if tree.lookup(node.attrs.root, j, objects.node) == RESERVED:
                        continue  # reserved zeros stay reserved
                    data = node.chunk(j, objects)
                    a, b = max(off, j * CHUNK) - j * CHUNK, min(end, (j + 1) * CHUNK) - j * CHUNK
                    buf = bytearray(data) if data is not None else bytearray()
                    if mode & FALLOC_FL_PUNCH_HOLE:
                        b = min(b, len(buf))
                    elif len(buf) < b:
                        buf.extend(bytes(b - len(buf)))
                    if a >= b:
                        continue
                    buf[a:b] = bytes(b - a)
                    if mode & FALLOC_FL_ZERO_RANGE and buf == bytes(len(buf)):
                        encoded[j] = (RESERVED, None)  # zeroed, and still allocated
                    else:
                        node.dirty[j] = buf  # all zeros after a punch: a hole once encoded
            except codec.CorruptObject as exc:
                node.dirty.clear()
                log.error("fallocate of inode %d: %s", node.ino, exc)
                raise FSError(errno.EIO) from exc
            if not mode & FALLOC_FL_PUNCH_HOLE:
                m.txn.add_object(RESERVED, self._reserved_value(), [])
                if not mode & FALLOC_FL_KEEP_SIZE:
                    size = max(size, end)
            node.attrs.root = root
            encoded.update(self._encode(node.dirty))
            node.dirty.clear()
            m.touch(node)  # as file_modified() does in the kernel
            self._flush_node_into(m, node, encoded, size)
            node.attrs.size = size
            m.charge = True

    def _reserved_value(self) -> bytes:
        if self._reserved is None:
            self._reserved = codec.encode_chunk(bytes(CHUNK), self.level)
        return self._reserved

    def _recount_alloc(self, node: Node) -> None:
        """node.alloc after its buffers changed outside a write: the committed tree's plus what
        each buffer (dirty over flushing) changes in its chunk."""
        if node.alloc is None:
            return
        objects = self.store.objects
        alloc = node.stored_alloc + sum(  # type: ignore[operator]
            len(b) - objects.content_size(tree.lookup(node.attrs.root, i, objects.node))
            for i, b in {**node.flushing, **node.dirty}.items())
        node.view.alloc_pending += alloc - node.alloc
        node.alloc = alloc

    async def _room_after_flush(self, pending: int) -> bool:
        """Whether there is room once what is held is committed: the estimate counts held
        data at its most (twice, as if inline), and a file streamed into packs takes once."""
        if not (self.dirty_nodes or self.flush_running):
            return False
        try:
            await self.flush()
        except FSError:
            return False
        self.store.look()
        return not self.store.space_low(pending)

    def _refuse(self, node: Node, off: int, end: int, err: int, why: str) -> NoReturn:
        """Fail a write.  Through direct_io the writer gets the error and nothing else
        changes; but a write the kernel's page cache acknowledged is lost now.  Where it
        overwrote bytes the committed file holds, those stay; where it leaves a gap
        (`Node.gap_in`), the file is cut
        back to a prefix there (data after a gap is no prefix of what was written, even when
        the kernel wrote it back first), and further writes beyond are refused.  Either way
        the kernel's view (size, pages) is brought back to ours (`kernel_unsynced`): a
        truncate to the cut, which also cuts what is committed beyond it."""
        if node.cached_writers > 0 and node.attrs.is_reg:
            if node.cap is None or off < node.cap:
                found = self.store.meta.get(CF_INODES, ino_key(node.ino), node.view.lv)
                stored = Attrs.unpack(found[1]) if found is not None and found[1] else None
                committed = stored.size if stored is not None else 0
                gap = node.gap_in(off, end, stored.root if stored is not None else None, committed,
                                  self.store.objects)
                if gap is not None and (node.cap is None or gap < node.cap):  # else old bytes stay
                    node.cap, node.cap_errno = gap, err
                    before = len(node.dirty)
                    node.cut(gap, max(gap, committed))
                    self.dirty_bytes -= (before - len(node.dirty)) * CHUNK
                    if not node.dirty:
                        self.dirty_nodes.pop(node, None)
                    account(node, not node.deleted)  # the view's next commit writes its usage
                    self._recount_alloc(node)
                    log.warning("inode %d: a write the page cache acknowledged was refused (%s, at %d); "
                                "the file is cut to %d bytes", node.ino, errno.errorcode.get(err, err), off, gap)
            self.kernel_unsynced.add(node)
            self.kernel_sync_wanted.set()
        raise FSError(err, why)

    async def flush(self) -> None:
        """Commit every acknowledged write (not yet durable: see sync).

        Acknowledged writes are dirty, or flushing in another task's flush, which holds the
        lock while it encodes in a thread: that flush must be waited for too, or an fsync
        could return (and a sync cover nothing) before the data it covers is committed."""
        if self.dirty_nodes or self.flush_running:
            await self.acquire_lock()
            try:
                await self._flush_locked()
            finally:
                self.lock.release()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock with every acknowledged write committed: for work that reads the
        store as committed and must not race a commit (garbage collection, the sharer)."""
        await self.acquire_lock()
        try:
            await self._flush_locked()
            yield
        finally:
            self.lock.release()

    async def acquire_lock(self) -> None:
        """Take `lock`; a free one without a checkpoint (trio's acquire always yields), so a
        small flush or mutation runs to its commit without a pass of the scheduler."""
        if self.lock.locked():
            await self.lock.acquire()
        else:
            self.lock.acquire_nowait()

    async def fsync(self) -> None:
        await self.flush()
        await self.store.sync()

    def _encode(self, chunks: dict[int, bytes | bytearray]) -> dict[int, tuple[bytes, bytes | None] | None]:
        """Hash and (for chunks new to the store) compress; None marks an all-zero chunk (hole)."""
        out: dict[int, tuple[bytes, bytes | None] | None] = {}
        objects = self.store.objects
        for i, data in chunks.items():
            # Comparing with a zero chunk stops at the first nonzero byte (count(0) reads all);
            # a memoryview compares slowly (~50 us), so only one that starts with a zero byte
            # is copied and compared.
            if not len(data) or (not data[0] and (data if type(data) is bytearray else bytes(data))
                                 == _ZEROS[: len(data)]):
                out[i] = None
                continue
            h = codec.chunk_hash(data)
            out[i] = (h, None if objects.exists(h) else codec.encode_chunk(data, self.level))
        return out

    def _encode_all(self, work: list[_Taken],
                    pack: bool) -> tuple[list[dict[int, tuple[bytes, bytes | None] | None]], list[int]]:
        """_encode every node's chunks; with pack, move the large new encodings to a new pack
        (in this thread: the write and fsync release the GIL).  Returns the encodings and
        the packs written, which the commit keeps if it stores a pointer into them, else deletes."""
        encoded = [self._encode(t.chunks) for t in work]
        faults.point("flush_encode")  # a test hook: chunks already judged stored or new
        if not pack:
            return encoded, []
        items: dict[bytes, bytes] = {}
        for enc in encoded:
            for e in enc.values():
                if e is not None and e[1] is not None and len(e[1]) >= PACK_MIN_VALUE:
                    items.setdefault(e[0], e[1])
        if not items:
            return encoded, []
        pointers = dict(zip(items, self.store.objects.pack(list(items.items()))))
        for enc in encoded:
            for i, e in enc.items():
                if e is not None and e[0] in pointers:
                    enc[i] = (e[0], pointers[e[0]])
        return encoded, sorted({codec.packed_extent(p)[0] for p in pointers.values()})  # type: ignore[index]

    def _flush_node_into(self, m: Mutation, node: Node, encoded: dict[int, tuple[bytes, bytes | None] | None],
                         size: int, stamp: tuple[int, int, int, int, int, int] | None = None,
                         cut: bool = False) -> None:
        """Turn encoded chunks into a new tree for node and save it in m, with the size (and
        the `_stamp` attributes) the file had when these chunks were taken.  The tree keeps
        chunks reserved beyond EOF (fallocate with KEEP_SIZE) unless `cut` (a truncate
        that shrinks the file gives them back, as ext4's does)."""
        writer = TreeWriter(self.store.objects.node, m.txn)
        changes: dict[int, bytes | None] = {}
        for i, enc in encoded.items():
            if enc is None:
                # Zeros written over reserved space: it stays reserved (allocated zeros).
                if tree.lookup(node.attrs.root, i, writer.load_node) != RESERVED:
                    changes[i] = None
                continue
            h, value = enc
            # value is None for chunks the store already had when encoded: nothing can free
            # them since, as frees only happen in commits and we hold the lock.
            if value is not None:
                m.txn.add_object(h, value, [])
            changes[i] = h
        n_chunks = (size + CHUNK - 1) // CHUNK
        if not cut:
            n_chunks = max(n_chunks, tree.extent(node.attrs.root, writer.load_node))
        new_root = writer.update(node.attrs.root, changes, n_chunks)
        a = node.attrs
        size_now, stamp_now = a.size, _stamp(a)
        a.root = new_root
        a.size = size
        if stamp is not None:
            _restamp(a, stamp)
        m.save(node)
        a.size = size_now
        _restamp(a, stamp_now)
        # Usage keeps counting what writes acknowledged since these chunks were taken (the
        # record's size is older): counting only the record let a writer streaming during a
        # threaded flush pass the byte quota by what it wrote meanwhile.
        m.account(node)

    async def _flush_locked(self) -> None:
        """Commit all dirty data (caller holds the lock). Large flushes encode in a thread."""
        while self.dirty_nodes:
            nodes = list(self.dirty_nodes)
            self.dirty_nodes.clear()
            self.flush_running = True
            self.dirty_bytes = 0
            work = []
            total = 0
            for node in nodes:
                # Hand the buffers over without copying: later writes start new buffers
                # (copying from these), so nothing mutates a buffer once it is flushing.
                node.flushing = node.dirty
                node.dirty = {}
                total += len(node.flushing) * CHUNK
                work.append(_Taken(node, node.flushing, node.attrs.size, _stamp(node.attrs)))
            self.flushing_bytes = total
            m = Mutation(self)
            try:
                if total > THREAD_FLUSH_BYTES:
                    try:
                        encoded, m.txn.staged = await self.store.in_thread(
                            lambda: self._encode_all(work, total >= PACK_FLUSH_BYTES))
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        raise FSError(errno.ENOSPC, f"pack put failed: {exc}") from exc  # a full disk
                else:
                    encoded = [self._encode(t.chunks) for t in work]
                for t, enc in zip(work, encoded):
                    if not t.node.deleted:
                        size = t.size
                        if t.node.cap is not None and size > t.node.cap:
                            size, enc = self._cut_taken(t, enc)
                        self._flush_node_into(m, t.node, enc, size, t.stamp)
                # The attributes of deferred SETATTRs, which a failed commit's revert would
                # take back to what is stored: they were acknowledged, so they stay.
                stamps = [_stamp(t.node.attrs) for t in work]
                try:
                    self._commit(m)
                except BaseException:
                    for t, st in zip(work, stamps):
                        _restamp(t.node.attrs, st)
                    raise
            except BaseException:
                # Nothing was committed: put the data back under any newer writes.
                self.store.objects.discard_staged(m.txn)
                for node, ch, *_ in work:
                    for i, data in ch.items():
                        node.dirty.setdefault(i, bytearray(data))
                    node.flushing = {}
                    if node.dirty:
                        self.dirty_nodes.setdefault(node, time.monotonic())
                        self.dirty_bytes += len(node.dirty) * CHUNK
                raise
            finally:
                self.flush_running = False
                self.flushing_bytes = 0
            self.store.spent(disk_cost(total))
            objects = self.store.objects
            for node in nodes:
                node.flushing = {}
                if node.alloc is not None:
                    if not node.dirty:
                        self._settle_alloc(node)
                    else:  # written again meanwhile: the committed tree plus what the buffers change
                        alloc = node.stored_alloc + sum(  # type: ignore[operator]
                            len(b) - objects.content_size(tree.lookup(node.attrs.root, i, objects.node))
                            for i, b in node.dirty.items())
                        node.view.alloc_pending += alloc - node.alloc
                        node.alloc = alloc
                self._maybe_evict(node)
            self.flush_count += 1

    def _cut_taken(self, t: _Taken, enc: dict[int, tuple[bytes, bytes | None] | None]
                   ) -> tuple[int, dict[int, tuple[bytes, bytes | None] | None]]:
        """Chunks a flush took before a refused write cut their file (`_refuse`): keep what
        lies below the cut, the chunk across it trimmed (no stored chunk holds bytes beyond
        EOF).  A packed encoding left out stays dead in its pack until `cowfs gc` repacks it (a
        pack the commit stores nothing from is deleted by the commit: `ObjectStore.apply`)."""
        cap = t.node.cap
        assert cap is not None
        keep = {i: e for i, e in enc.items() if i * CHUNK < cap}
        i, rem = divmod(cap, CHUNK)
        data = t.chunks.get(i) if rem else None
        if data is not None and len(data) > rem:
            keep.update(self._encode({i: bytes(data[:rem])}))
        return cap, keep

    async def background_flusher(self) -> None:
        """Commit dirty data that has waited DIRTY_AGE seconds, or once EARLY_FLUSH_BYTES pile up."""
        while True:
            with trio.move_on_after(DIRTY_AGE / 2):
                await self.flush_wanted.wait()
            early = self.flush_wanted.is_set()
            if early:
                self.flush_wanted = trio.Event()
            if self.dirty_nodes and (early or time.monotonic() - min(self.dirty_nodes.values()) >= DIRTY_AGE):
                try:
                    await self.flush()
                except FSError as exc:
                    log.error("background flush failed: %s", exc)

    # -- open files ------------------------------------------------------------------------
    def opened(self, node: Node) -> None:
        self._refs(node, opens=1)
        if self.learner is not None and node.view.kind == "branch" and node.attrs.is_reg:
            files = self.learner.opened(node.view.name, node.ino)
            if self.fetcher is not None and files:
                name, lv = node.view.name, node.view.lv
                self.fetcher.want([self._resolver(lv, ino, self.learner.chunks_of(name, ino)) for ino in files],
                                  LEARNED)

    def _resolver(self, lv: LayerView, ino: int, indices: list[int]) -> Callable[[], list[bytes]]:
        """A job for a prefetch thread: the committed chunk hashes of file ino (pure KV reads;
        a stale answer costs a useless fetch, never a wrong read: reads go by hash)."""
        objects = self.store.objects

        def resolve() -> list[bytes]:
            found = self.store.meta.get(CF_INODES, ino_key(ino), lv)
            if found is None or not found[1]:
                return []
            attrs = Attrs.unpack(found[1])
            if attrs.parent:  # the coming LOOKUP reads this entry: its block is then in memory
                self.store.meta.get(CF_DIRENTS, name_key(attrs.parent, attrs.name), lv)
            out = []
            for i in indices:
                if i * CHUNK >= attrs.size:
                    break
                h = tree.lookup(attrs.root, i, objects.peek_node)
                if h is not None:
                    out.append(h)
            return out
        return resolve

    async def save_model_loop(self) -> None:
        """Write the learned models every SAVE_INTERVAL s, when they changed."""
        while True:
            await trio.sleep(SAVE_INTERVAL)
            faults.point("model_save")
            self.save_model()

    def save_model(self) -> None:
        """One small batch of its own on the loop thread (a few KiB: ~0.1 ms), so it never races
        the store's commits or its disk-full handling; a failure costs only learning."""
        batch = self.learner.batch() if self.learner is not None else None
        if batch is not None:
            try:
                self.store.write(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: writes matter more
                log.warning("prefetch model not saved: %s", exc)

    def opened_dir(self, node: Node) -> None:
        self._refs(node, opens=1)

    async def released_dir(self, node: Node) -> None:
        """RELEASEDIR.  A directory removed while open (rmdir may overtake the RELEASEDIR of
        a closed handle) is an orphan until now, as a file is until its last RELEASE.  A live
        directory's node stays until the kernel forgets it."""
        if node.attrs.nlink <= 0:
            await self.released(node)
        else:
            self._refs(node, opens=-1)

    async def released(self, node: Node) -> None:
        self._refs(node, opens=-1)
        if node.opens <= 0 and node.attrs.nlink <= 0 and not node.deleted and node.view.writable:
            async with self.mutate(node.view) as m:
                m.batch.delete(CF_ORPHANS, self._orphan_key(node))
                self._discard_dirty(node)
                m.drop(node)
        self._maybe_evict(node)

    def _orphans(self, view: View, m: Mutation) -> int:
        """Put into m the deletion of view's inodes left unlinked-but-open when the daemon last
        stopped; how many.  The caller commits m with nothing racing it (see attach_branch)."""
        prefix = view.lv.top.to_bytes(8, "big")
        keys = [k for k, _ in self.store.kv.scan(CF_ORPHANS, prefix, prefix)]
        for k in keys:
            ino = int.from_bytes(k[8:16], "big")
            m.batch.delete(CF_ORPHANS, k)
            try:
                node = self.node(view, ino)
            except FSError:
                continue
            if node.attrs.nlink <= 0:
                m.drop(node)
                del view.nodes[ino]
        if keys:
            log.info("branch %s: removing %d inodes left open-but-unlinked by the previous daemon", view.name,
                     len(keys))
        return len(keys)

    # -- writers through the kernel's page cache, and the kernel's view after a refusal ------
    def writer_opened(self, node: Node, cached: bool) -> None:
        """A handle that may write was opened; cached: through the kernel's page cache, whose
        acknowledged writes a refusal loses (`_refuse` cuts the file then)."""
        if cached:
            node.cached_writers += 1

    def writer_closed(self, node: Node, cached: bool) -> None:
        if cached:
            node.cached_writers -= 1

    def kernel_view_owed(self, node: Node) -> bool:
        """Whether the kernel's view of node (size, pages) must be brought back to ours now:
        a refused write left it ahead, and the last writer through the page cache is gone
        (its close reported the error).  It is then taken off the list of `wait_unsynced`;
        the caller syncs the kernel's view and then calls `end_cut`."""
        if node.cached_writers > 0 or (node.cap is None and node not in self.kernel_unsynced):
            return False
        self.kernel_unsynced.discard(node)
        return True

    @staticmethod
    def end_cut(node: Node) -> None:
        """The kernel's view of node is ours again: writes beyond the cut are no longer refused."""
        node.cap = None

    async def wait_unsynced(self) -> list[Node]:
        """Wait until refused writes left the kernel's view of files ahead of ours (while
        writers still have them open); take those files."""
        await self.kernel_sync_wanted.wait()
        self.kernel_sync_wanted = trio.Event()
        nodes = list(self.kernel_unsynced)
        self.kernel_unsynced.clear()
        return nodes

    def space_tight(self) -> bool:
        """Whether the store's free space (above its reserve) is within what the kernel and
        the daemon may hold acknowledged but unwritten (their dirty limits, counted twice as
        inline data is: WAL, then blob file).  Then writers get direct_io: a write the page
        cache acknowledged could no longer be stored for sure, and a direct write(2) fails
        with ENOSPC itself, in order."""
        return self.store.headroom() < 2 * (self.kernel_dirty + DIRTY_LIMIT)

    # -- statfs ----------------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)
