"""A cowfs store: one directory holding a RocksDB database and the daemon's files.

Store ties the layers together: the key-value backend, the object store (chunks and tree
nodes with reference counts), the versioned metadata and the branch catalog; it is the only
place that commits batches and makes them durable (group commit).

Over 500 lines: besides opening the engines and committing, it still counts usage (a view's
at first use, a directory clone's: count_usage, measure_clone, clone_measured), a concern
of its own that is to move out of the store next to the other accounting.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import trio

from cowfs import faults, private, threads
from cowfs.cache import ChunkCache
from cowfs.blob.base import BlobStore
from cowfs.blob.local import LocalBlobStore
from cowfs.chunks import codec, dups, liveness, remotecache, repack, upgrade
from cowfs.chunks.families import CF_OBJECTS, FAMILIES as OBJECT_FAMILIES
from cowfs.chunks.objects import ObjectStore, RefTxn
from cowfs.chunks.packs import Packs
from cowfs.errors import StoreError
from cowfs.kv.base import KV, Batch, LocalEngine, StoreLockedError
from cowfs.kv.overlay import OverlayKV
from cowfs.kv.rocks import RocksKV
from cowfs.kv.split import SplitKV, Unpublished
from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.layers import CF_CATALOG, CF_META, Branch, Catalog, Usage, suffix_layer
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Clone, SharedTrees
from cowfs.meta import links, serving
from cowfs.meta.orphans import CF_ORPHANS
from cowfs.meta.versioned import CF_CHANGES, CF_DIRENTS, CF_INODES, CF_LINKS, CF_XATTRS, LayerView, Versioned, ino_key
from cowfs.storedir import DB_DIR, MARKER, PACK_DIR, REFS_FILE, daemon_pid, home_db, home_dir

log = logging.getLogger(__name__)
# 2: delta objects, 24-byte reference records, the pending/similar/space families.  A
# format-1 store is upgraded when first opened (chunks.upgrade.rebuild); older cowfs refuse 2.
# 3: pack files (STORE/packs) and P objects pointing into them; a format-2 store needs no
# rewrite (it has no P objects yet), only the new number, so that older cowfs refuse it.
# 4: shared copies (cowfs.meta.shared): inode records and entries may be missing where a
# range stands for them; a format-3 store needs no rewrite, but older cowfs must refuse 4.
# 5: usage records hold allocated bytes too (24 bytes: logical, inodes, allocated); a
# format-4 store's records are counted once when it is first opened (Store._count_allocated).
# 6: the index of hard-linked files' names (family `links`, cowfs.meta.links), which older
# cowfs would not keep up to date; built from a scan of records and entries when a store of
# an older format is first opened.
# 7: packs are immutable objects of a BlobStore named by a u64 id (P pointers 26 bytes);
# a format-3..6 store's pack files are renamed and its pointers rewritten at first open
# (chunks.upgrade.convert_packs); their punched holes are dead ranges for repacking.
# 8: the space accounting counts F objects (a lazy mount's chunks still on the remote: its
# reads skip the look-up once there are none); counted once at a format-7 store's first open.
# 9: it counts their raw bytes too (remote_bytes: compression saves none of them); counted
# once, with the F objects, at a format-7 or -8 store's first open.
# 10: the family `fetched` (a lazy mount's fetched chunks in cache packs, evictable:
# chunks.remotecache), which an older cowfs cannot open the database with; created empty.
# 11: the catalog (branches, snapshots, layers, counters) lives in the reference store
# (refs.sqlite, family `catalog`), where any process of the store changes it by compare-and-set
# (docs/design-many-processes.md, "Step 5b"); moved at an older store's first open
# (chunks.upgrade.move_catalog).
# 12: the store may hold homes (cowfs.homes: databases of branches served by daemons of their
# own) and the catalog `home/<layer>` records naming them, which an older cowfs would not see
# (it would merge or drop layers whose children live in a home); a format-11 store needs only
# the new number.
FORMAT_VERSION = 12
UPGRADABLE = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
CATALOG_MOVED = 11  # the format from which the catalog is in the reference store
FAMILIES = (CF_META, CF_INODES, CF_DIRENTS, CF_XATTRS, CF_LINKS, CF_CHANGES, CF_ORPHANS) + OBJECT_FAMILIES
ROOT_INO = 1
INO_BLOCK = 4096
REF_FAMILIES = liveness.REF_FAMILIES + serving.REF_FAMILIES + (CF_CATALOG, dups.CF_DUP)  # of the reference store
# What a branch's own daemon reads through the members below its home (its lineage's other
# databases): the layer-versioned families, and the objects to load what they name (counting
# and "do we have H" read the home alone, `home_kv`); of `meta` only the usage and shared-copy
# records of the ancestors (docs/design-many-processes.md, "Step 6").
THROUGH = (CF_INODES, CF_DIRENTS, CF_XATTRS, CF_LINKS, CF_CHANGES, CF_OBJECTS)
THROUGH_KEYS = {CF_META: (b"usage/", b"share/")}
PACE_STEPS = 256  # entries a clone's measuring walk takes between two calls of its pace (~1-3 ms)
T = TypeVar("T")
SLOW_SYNC_NS = 10_000_000  # a WAL sync this slow sends the next one to a thread (`Store.sync`)
# Store.wal_keeper: after WAL_SYNCS syncs since the last rotation (an fsync-heavy writer),
# the WAL is rotated to a recycled log, once WAL_ROTATE bytes were written to it (at once the
# first time, after filling two logs of WAL_ROTATE bytes): RocksKV.rotate_wal.
WAL_SYNCS = 64
WAL_ROTATE = 4 << 20
HOME_OPEN_WAIT = 2.0  # seconds a home's open waits for a holder that is no daemon (`Store._open_database`)


def _never() -> bool:
    return False


def _small_disk(path: str) -> bool:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize < (4 << 30)


def init_store(path: str) -> None:
    """Create an empty store with branch 'main' whose root directory is owned by the caller.

    The store is private to the caller (0700, files 0600) whatever the umask: see cowfs.private."""
    if os.path.exists(os.path.join(path, MARKER)):
        raise StoreError(f"{path} is already a cowfs store")
    if os.path.exists(path) and os.listdir(path):
        raise StoreError(f"{path} exists and is not empty")
    private.hold_umask()
    try:
        private.make_dir(path)
        rocks = RocksKV(os.path.join(path, DB_DIR), FAMILIES, blob_families=(CF_OBJECTS,))
        try:
            refs = SQLiteKV(os.path.join(path, REFS_FILE), REF_FAMILIES)
        except BaseException:
            rocks.close()
            raise
        kv = SplitKV(rocks, refs, (CF_CATALOG,))
        try:
            batch = Batch()
            batch.put(CF_META, b"format", str(FORMAT_VERSION).encode())
            cat = Catalog(kv)
            layer = cat.new_layer(0, batch)
            cat.save_branch(Branch("main", layer, cat.new_view(batch)), batch)
            now = time.time_ns()
            root = Attrs(0o40755, os.getuid(), os.getgid(), 2, 0, 0, now, now, now)
            Versioned.put(batch, CF_INODES, ino_key(ROOT_INO), layer, root.pack())
            cat.save_usage(layer, Usage(0, 1, 0), batch)
            cat.mark_walked(batch)  # no history yet: the first gc pass has no old layers to look at
            batch.put(CF_CATALOG, b"counter/ino", (ROOT_INO + 1).to_bytes(8, "big"))
            kv.write(batch)  # the home records, durable, then the catalog's
            kv.sync()
        finally:
            kv.close()
        _write_marker(path, time.time())
    finally:
        private.release_umask()


def _write_marker(path: str, created: float) -> None:
    """Write the marker atomically (temporary file, fsync, rename, fsync of the directory)."""
    tmp = os.path.join(path, MARKER + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, private.FILE_MODE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, private.FILE_MODE)
        json.dump({"format": FORMAT_VERSION, "created": created}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # the marker's name is durable too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _packs_of(kv: KV, hashes: Iterable[bytes]) -> set[int]:
    """The packs that hold kv's packed chunks among hashes (what a rewrite moves them out of)."""
    return {codec.packed_extent(raw)[0] for h in hashes  # type: ignore[index]
            if (raw := kv.get(CF_OBJECTS, h)) is not None and raw[0] == codec.KIND_PACKED}


class Store:
    def __init__(self, path: str, cache_l1: int = 256 << 20, cache_l2: int = 256 << 20,
                 blobs: BlobStore | None = None, home: str | None = None) -> None:
        """Open the store at path; its packs live in blobs (default: a LocalBlobStore in
        STORE/packs), which the store closes with itself.  home: open the view of the branch
        whose home database that is (STORE/homes/<home>/db, written by this process) over
        the lineage's other databases, read-only (docs/design-many-processes.md, "Step 6")."""
        marker = os.path.join(path, MARKER)
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no such store directory (create one with 'cowfs init {path}')")
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise StoreError(f"{path}: permission denied: a store is private to its owner "
                             f"(uid {os.stat(path).st_uid}) and root")
        if not os.path.exists(marker):
            raise StoreError(f"{path} is not a cowfs store (no {MARKER})")
        try:
            info = json.load(open(marker))
            fmt = info["format"]
        except (ValueError, KeyError) as exc:
            raise StoreError(f"{marker} is damaged: {exc}") from exc
        if fmt != FORMAT_VERSION and fmt not in UPGRADABLE:
            raise StoreError(f"{path} has store format {fmt}; this cowfs reads format {FORMAT_VERSION}")
        self.home = home
        # packs this database's dup rewrites moved pointers out of since its last pack survey
        # (repacked while under repack.LEFT_BELOW live: Survey.left)
        self.dup_left: set[int] = set()
        self.idle_left: dict[str, set[int]] = {}  # the same for each idle home the keeper rewrote
        self.db = home_db(home) if home else DB_DIR  # this process's database, relative to path
        if home and (fmt != FORMAT_VERSION or not os.path.isdir(os.path.join(path, self.db))):
            raise StoreError(f"{path}: no home database {home} (homes/{home}) in this store")
        # Private while open: RocksDB creates files from its threads (cowfs.private).
        private.hold_umask()
        self._umask_held = True
        try:
            loose = private.tighten(path)
        except OSError as exc:
            log.warning("%s: could not make the store private to its owner: %s", path, exc)
        else:
            if loose:
                log.warning("%s: took group and other permissions off %d paths other users could reach "
                            "(%s); a store is private to its owner", path, len(loose), ", ".join(loose[:8])
                            + (", ..." if len(loose) > 8 else ""))
        try:
            rocks = self._open_database(path, home)
        except StoreLockedError as exc:
            self._release_umask()
            pid = daemon_pid(home_dir(path, home) if home else path)
            who = f" by daemon pid {pid}" if pid else ""
            raise StoreError(f"{path}{f' (home {home})' if home else ''} is in use{who}") from exc
        except Exception as exc:
            self._release_umask()
            raise StoreError(f"{path}: cannot open the database: {exc}") from exc
        self.kv: KV = rocks
        # The same object seen as the embedded engine it is: disk-space checks, recovery
        # from write errors, compaction (the layers above know only `kv`).
        self.engine: LocalEngine = rocks
        self.path = path
        self.cache = ChunkCache(cache_l1, cache_l2)
        try:
            if 3 <= fmt < 7:
                upgrade.convert_packs(self.kv, os.path.join(path, PACK_DIR))
            self.packs = Packs(blobs if blobs is not None else LocalBlobStore(os.path.join(path, PACK_DIR)))
        except Exception as exc:
            self.kv.close()
            self._release_umask()
            raise StoreError(f"{path}: cannot open the packs: {exc}") from exc
        refs: KV | None = None
        try:  # the reference store, and this process in it as the writer of the store's database
            self.refs = refs = SQLiteKV(os.path.join(path, REFS_FILE), REF_FAMILIES)
            self.liveness = liveness.Liveness(refs)
            # A writer of this database that died may have left unpublished layers
            # (cowfs.meta.gc.unpublished): the first gc pass looks for them.
            self.stray = self._writer_died()
            self.liveness.register(self.db)
            # the branches this process serves (a daemon takes them: cowfs.meta.serving)
            self.serving = serving.Serving(refs, self.liveness.me, self.liveness.boot, home or "")
        except Exception as exc:
            if refs is not None:
                refs.close()
            self.packs.close()
            self.kv.close()
            self._release_umask()
            raise StoreError(f"{path}: cannot open the reference store {REFS_FILE}: {exc}") from exc
        # The catalog's family goes to the reference store, the rest to the home database:
        # `home_kv` for what this process counts and looks up in its own database alone.
        self.home_kv: KV = SplitKV(rocks, refs, (CF_CATALOG,))
        self.kv = self.home_kv
        # A home's view reads the lineage's other databases below it (`_open_below`), nearest first.
        self.below: list[KV] = []
        if home:
            overlay = OverlayKV(rocks, (), THROUGH, THROUGH_KEYS)
            self.below = overlay.below  # filled once the catalog says which databases hold the lineage
            self.kv = SplitKV(overlay, refs, (CF_CATALOG,))
        if fmt < CATALOG_MOVED:
            moved = upgrade.move_catalog(rocks, refs, CF_META, CF_CATALOG, CATALOG_MOVED)
            if moved:
                log.info("%s: %d catalog records moved to the reference store", path, moved)
        self.catalog = Catalog(self.kv)
        if home:
            try:
                self._open_below(rocks, home)
            except BaseException:
                self.close()
                raise
        self.meta = Versioned(self.kv, SharedTrees.load(self.kv), self.catalog.layer_view)
        # A home's counts, queue and accounting are its own; loads read through (foreign references)
        self.objects = ObjectStore(self.kv, self.cache, self.packs, home=self.home_kv if home else None,
                                   below=self.below)
        if self.objects.space is None:  # a home's accounting starts with it, empty
            self.objects.space = upgrade.rebuild(rocks, {}) if home else upgrade.rebuild(self.kv, self._root_refs())
        if fmt < 5:
            self._count_allocated()
        if fmt != FORMAT_VERSION:
            b = Batch()
            if fmt < 9:
                upgrade.count_remote(self.kv, self.objects.space)
            if fmt < 6:
                log.info("%s: %d keys written for the names of hard-linked files", path, links.rebuild(self.kv, b))
            self.kv.write(b)
            self.kv.sync()
            _write_marker(path, info.get("created", time.time()))
            log.info("%s upgraded from store format %s to %d", path, fmt, FORMAT_VERSION)
        raw = self.kv.get(CF_CATALOG, b"counter/ino")
        self._next_ino = self._ino_hwm = int.from_bytes(raw, "big") if raw else ROOT_INO + 1
        self.write_seq = 0
        self.synced_seq = 0
        # Background tasks waiting for work a commit brings (chunks queued, inodes made),
        # looked at after every commit instead of on a timer.
        self.commits = threads.Conditions()
        self._sync_running: trio.Event | None = None
        # Whether a WAL sync may run on the event loop itself (`sync`): the daemon sets it to
        # its request loop's "nothing else is queued" (cowfs.fuse.loop.Waiter.idle).
        self.direct_sync_ok: Callable[[], bool] = _never
        self.direct_syncs = 0  # syncs made on the loop (stats)
        self.syncs_after_slow = 0  # syncs sent to a thread only because the last one was slow (stats)
        self._slow_sync = False  # the last sync took longer than SLOW_SYNC_NS
        self.wal_rotations = 0  # RocksKV.rotate_wal calls made by wal_keeper (stats)
        self._syncs_since_rotation = 0
        self._rotation_wanted = trio.Event()
        # Jobs in worker threads that may use the database handle (`in_thread`), and a reopen
        # waiting for them to end (`recover`); both changed on the event loop only.
        self.kv_users = 0
        self._reopen_wanted = False
        self._drained = trio.Event()
        self._reopen_error = ""  # why the last reopen could open the database read-only only
        self.objects_created = 0
        self.objects_freed = 0
        st = os.statvfs(path)
        size = st.f_blocks * st.f_frsize
        # Headroom for deletes and RocksDB's own flushes and compactions: a quarter of a
        # small disk, 256 MiB of a big one.
        self.reserve = min(256 << 20, max(4 << 20, size // 4))
        self._free = st.f_bavail * st.f_frsize
        self._free_at = time.monotonic()
        # Disk bytes that data acknowledged to writers but not committed yet will take.
        self.held: Callable[[], int] = lambda: 0

    def _open_database(self, path: str, home: str | None) -> RocksKV:
        """This process's database, for writing.  A home held by no daemon is held only for
        moments (the store keeper's rewrite of an idle home, a gc's look at a home: tens of ms),
        so its open is tried again for up to HOME_OPEN_WAIT seconds before it counts as in use."""
        deadline = time.monotonic() + HOME_OPEN_WAIT
        while True:
            try:
                return RocksKV(os.path.join(path, self.db), FAMILIES, blob_families=(CF_OBJECTS,),
                               small=_small_disk(path))
            except StoreLockedError:
                if not home or daemon_pid(home_dir(path, home)) is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def drop_dead_homes(self) -> list[str]:
        """Delete the homes no live branch writes and none of whose layers anything still
        reads (no snapshot or branch among them, no child in another database): their layers
        leave the catalog (one compare-and-set), then the home goes whole, its member record
        first (cowfs.homes.remove), unless a process holds its database; and the unnamed homes
        old enough not to be a branch being made (cowfs.homes.unnamed).  What its database
        counted goes with it: nothing outside it counted for it (docs/design-many-processes.md,
        "Step 6").  The store's process only; blocking: in a thread, under the filesystem's lock."""
        from cowfs import homes

        cat = self.catalog
        written = {b.home for b in cat.branches.values() if b.home}
        leaves = cat.leaves()
        dropped: list[str] = []
        for home in sorted(set(cat.homes.values()) - written - {self.home}):
            layers = {layer for layer, h in cat.homes.items() if h == home}
            if layers & leaves or any(k not in layers for l in layers for k in cat.children.get(l, ())):
                continue
            try:  # held while its layers leave the catalog: no process writes it meanwhile
                held = RocksKV(os.path.join(self.path, home_db(home)), FAMILIES, blob_families=(CF_OBJECTS,))
            except StoreLockedError:
                continue
            try:
                self._forget(layers)  # a crash after it leaves an unnamed home, removed by a later run
            finally:
                held.close()
            if homes.remove(self.path, self.liveness, home):
                dropped.append(home)
        old, _young = homes.unnamed(self.path, set(cat.homes.values()) | written)
        dropped += [home for home in old if homes.remove(self.path, self.liveness, home)]
        return dropped

    def _forget(self, layers: set[int]) -> None:
        """The layers of a home about to be deleted leave the catalog, published at once."""
        cat = self.catalog
        batch = Batch()
        above = {cat.parents[l] for l in layers} - layers
        for layer in sorted(layers, reverse=True):  # children first (ids grow from parent to child)
            cat.forget_layer(layer, batch)
        for parent in above:  # lost a child: ours may merge or die now
            if parent in cat.parents and cat.member(parent) == self.home:
                cat.enqueue(parent, batch)
        self.kv.write(batch)

    def _open_below(self, rocks: RocksKV, home: str) -> None:
        """Open the databases that hold the ancestor layers of home's branch, nearest first,
        read-only and sharing the home's block cache (one budget: an idle branch daemon
        stays small), as the members below its view.  A home whose branch was deleted and
        that gc has not dropped yet is opened over the lineage of any layer of it (every
        layer of a home descends from its first one, so all share the databases below it):
        fsck checks it as it checks a live one."""
        branch = next((b for b in self.catalog.branches.values() if b.home == home), None)
        mine = [layer for layer, h in self.catalog.homes.items() if h == home]
        if branch is None and not mine:
            raise StoreError(f"{self.path}: no branch has the home database {home}")
        seen = {home}
        for layer in self.catalog.ancestry(branch.head if branch is not None else min(mine)):
            member = self.catalog.member(layer)
            key = member or ""
            if key in seen:
                continue
            seen.add(key)
            where = os.path.join(self.path, home_db(member) if member else DB_DIR)
            self.below.append(RocksKV(where, FAMILIES, blob_families=(CF_OBJECTS,), read_only=True,
                                      cache=rocks.block_cache))

    def refresh_below(self) -> None:
        """Reopen the lineage's databases below a home's view (RocksKV.refresh), so that no
        read holds pointers a repack of theirs has moved since (before this process
        acknowledges a gc round).  Blocking: in a thread."""
        for kv in self.below:
            if isinstance(kv, RocksKV):
                kv.refresh()

    def _writer_died(self) -> bool:
        """Whether a writer record of this database names a process that is gone (or cannot
        be read): it may have left unpublished layers (cowfs.meta.gc.unpublished)."""
        try:
            return any(r.db == self.db and not r.alive(self.liveness.boot) for r in self.liveness.writers().values())
        except (ValueError, KeyError, TypeError):
            return True

    def _root_refs(self) -> dict[bytes, int]:
        """References from inode-record versions and shared-copy ranges to tree roots (a
        walk of every version)."""
        roots: dict[bytes, int] = {}
        for _key, value in self.kv.scan(CF_INODES, b""):
            if value:
                root = Attrs.unpack(value).root
                if root is not None:
                    roots[root.hash] = roots.get(root.hash, 0) + 1
        for r in self.meta.shared.ranges.values():
            for h in self.meta.range_roots(r):
                roots[h] = roots.get(h, 0) + 1
        return roots

    def count_usage(self, lv: LayerView, visible: Mapping[bytes, bytes] | None = None) -> Usage:
        """What a view sees (logical bytes, inodes, allocated bytes), by a walk of all inode
        records: for a view that never recorded its usage, and the format-5 upgrade.
        visible: the live records lv sees by inode key, when the caller has them (fsck
        makes them for every view in one pass: a scan per view is quadratic in views)."""
        logical = inodes = allocated = 0
        ranges = self.meta.shared.visible(lv.ancestors)  # copies reading through a range

        def count(a: Attrs) -> None:
            nonlocal logical, inodes, allocated
            inodes += 1
            if stat.S_ISREG(a.mode):
                logical += a.size
                allocated += self.objects.content_size(a.root.hash if a.root is not None else None)

        if visible is None:
            visible = self._visible_records(lv)
        for value in visible.values():
            count(Attrs.unpack(value))
        for r in ranges:
            for y, _x in r.pairs():
                if ino_key(y) not in visible:
                    found = self.meta.get(CF_INODES, ino_key(y), lv)
                    if found is not None and found[1]:
                        count(Attrs.unpack(found[1]))
        if self.meta.shared.visible_clones(lv.ancestors):
            for a in self._clone_copies(lv):
                count(a)
        return Usage(logical, inodes, allocated)

    def _visible_records(self, lv: LayerView) -> dict[bytes, bytes]:
        """The live inode records lv sees, by inode key: a scan of every version."""
        out: dict[bytes, bytes] = {}
        last = None
        for key, value in self.kv.scan(CF_INODES, b""):
            ino = key[:8]
            if ino == last or suffix_layer(key[8:]) not in lv.ancestors:
                continue
            last = ino
            if value:
                out[ino] = value
        return out

    def _clone_copies(self, lv: LayerView) -> Iterator[Attrs]:
        """Records of the copies of clones that lv sees and that have no version of their own
        (the scan of records counted the others): a walk of lv's tree, explicit stack."""
        meta = self.meta
        pending, linked = [ROOT_INO], set()
        while pending:
            d = pending.pop()
            for _name, v in meta.scan_names(CF_DIRENTS, d, lv):
                ino = int.from_bytes(v[:8], "big")
                is_dir = v[8:9] == bytes((stat.S_IFDIR >> 12,))
                if is_dir:
                    pending.append(ino)
                if meta.shared.find(ino) is None or meta._real(CF_INODES, ino_key(ino), lv) is not None:
                    continue
                found = meta.get(CF_INODES, ino_key(ino), lv)
                if found is None or not found[1]:
                    continue
                a = Attrs.unpack(found[1])
                if not is_dir and a.nlink > 1:
                    if ino in linked:
                        continue
                    linked.add(ino)
                yield a

    def measure_clone(self, c: Clone, check: Callable[[Attrs, bytes], None] | None = None,
                      stop: Callable[[], bool] | None = None,
                      pace: Callable[[], None] | None = None) -> Usage | None:
        """What the copies of clone c add to a view's usage (its top excluded): a walk of the
        original tree in c's frozen layer, safe in a thread; check(attrs, name) may raise to
        refuse an entry; None if stop() said so meanwhile; pace() is called every PACE_STEPS
        entries (a background walk sleeps there, so that it leaves the GIL to the requests)."""
        faults.point("clone_walk")
        meta = self.meta
        lv = meta.range_view(c)
        logical = inodes = allocated = steps = 0
        pending, linked = [c.top_x], set()
        while pending:
            d = pending.pop()
            for name, v in meta.scan_names(CF_DIRENTS, d, lv):
                steps += 1
                if stop is not None and steps % 1024 == 0 and stop():
                    return None
                if pace is not None and steps % PACE_STEPS == 0:
                    pace()
                x = int.from_bytes(v[:8], "big")
                found = meta.get(CF_INODES, ino_key(x), lv)
                if found is None or not found[1]:
                    continue
                a = Attrs.unpack(found[1])
                if check is not None:
                    check(a, name)
                if a.is_dir:
                    pending.append(x)
                elif a.nlink > 1:
                    if x in linked:
                        continue
                    linked.add(x)
                inodes += 1
                if stat.S_ISREG(a.mode):
                    logical += a.size
                    allocated += self.objects.content_size(a.root.hash if a.root is not None else None)
        return Usage(logical, inodes, allocated)

    def clone_measured(self, c: Clone, usage: Usage, batch: Batch) -> list[int]:
        """Record c's measured usage in batch: added to the usage record of every layer that
        descends from the one the clone was written in (the views that see its copies, whose
        records left them out).  Returns the layers whose record changed."""
        layers, pending = [], [c.seen]
        while pending:
            layer = pending.pop()
            pending += self.catalog.children.get(layer, ())
            old = self.catalog.usage(layer)
            if old is not None:
                layers.append(layer)
                self.catalog.save_usage(layer, Usage(*(a + b for a, b in zip(old, usage))), batch)
        c.measured, c.usage = True, tuple(usage)  # type: ignore[assignment]
        self.meta.shared.add_clone(c, batch)
        return layers

    def _count_allocated(self) -> None:
        """Format 4 to 5: give every recorded usage its allocated bytes (one walk per layer
        with a record; the usage is kept incrementally from then on)."""
        batch = Batch()
        for key, _value in self.kv.scan(CF_META, b"usage/", b"usage/"):
            layer = int.from_bytes(key[6:], "big")
            if layer not in self.catalog.parents:
                batch.delete(CF_META, key)
                continue
            lv = self.catalog.layer_view(layer)
            self.catalog.save_usage(layer, self.count_usage(lv), batch)
        if len(batch):
            self.kv.write(batch)
        log.info("%s: allocated bytes counted for %d recorded usages", self.path, len(batch))

    @property
    def next_ino(self) -> int:
        return self._next_ino

    def alloc_ino(self) -> int:
        """A never-used inode number (persisted in blocks, so a crash only skips numbers)."""
        if self._next_ino >= self._ino_hwm:
            self._before_write()
            self._next_ino = self.catalog.draw(b"ino", INO_BLOCK, self._next_ino)
            self._ino_hwm = self._next_ino + INO_BLOCK
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _free_now(self) -> int:
        """Free bytes on the store's disk (looked at every 0.25 s at most), less what
        memtables hold (in the WAL already, written once more when flushed) and what
        commits wrote since the last look (counted twice: WAL, then blob file)."""
        now = time.monotonic()
        if now - self._free_at > 0.25:
            st = os.statvfs(self.path)
            self._free = st.f_bavail * st.f_frsize - self.engine.unflushed_bytes()
            self._free_at = now
        return self._free

    def look(self) -> None:
        """Look at the disk again at the next question (a commit just changed it)."""
        self._free_at = 0.0

    def spent(self, nbytes: int) -> None:
        """A commit took nbytes of disk: count them until the next look at the disk."""
        self._free -= nbytes

    def headroom(self) -> int:
        """Bytes new data may still take before the reserve: free space less what data
        acknowledged but not committed yet will take (`held`, set by the filesystem)."""
        return self._free_now() - self.held() - self.reserve

    def space_low(self, pending: int, metadata: bool = False) -> bool:
        """Whether accepting `pending` more bytes would eat the headroom kept for deletes.

        RocksDB needs room to log and flush even a delete; when the disk fills under it, it
        stops writing altogether.  New data is refused (ENOSPC) while free space is below
        the reserve, new inodes only below half of it, deletes never.
        """
        if metadata:
            return self._free_now() - self.held() < self.reserve // 2
        return self.headroom() < 2 * pending

    async def in_thread(self, fn: Callable[..., T], *args: Any, python: bool = True) -> T:
        """fn(*args) in a worker thread that may use the database (python: it runs Python code,
        see cowfs.threads).  Every such job goes through here, so that a reopen (`recover`)
        never replaces the handle under one: none starts while a reopen waits."""
        while self._reopen_wanted:
            if self.kv_users:
                await self._drained.wait()
            else:
                self._reopen()
        self.kv_users += 1
        try:
            if python:
                return await threads.run_in_thread(fn, *args)
            return await threads.run_in_c_thread(fn, *args)
        finally:
            self.kv_users -= 1
            if not self.kv_users and self._reopen_wanted:
                self._drained.set()  # the reopen is done by whoever runs next (a job or a write)

    def recover(self) -> None:
        """After a failed write, get RocksDB out of its read-only error state by reopening it
        (best effort): at once, or, while worker threads may be using the handle, as soon as
        the last of them is done (before the next write or thread job)."""
        if self.kv_users:
            if not self._reopen_wanted:
                log.info("reopening the database once %d worker threads are done with it", self.kv_users)
            self._want_reopen()
            return
        self._reopen()

    def _want_reopen(self) -> None:
        if not self._reopen_wanted:
            self._reopen_wanted = True
            self._drained = trio.Event()

    def _reopen(self) -> None:
        self._reopen_wanted = False
        try:
            self.engine.recover()
            self._reopen_error = ""
        except Exception as exc:
            self._reopen_error = str(exc)
            log.error("store could not recover from a write error: %s", exc)
        self.look()

    def _before_write(self) -> None:
        """A reopen still owed (a failed write, or a reopen that could only open read-only)
        happens before the next write, if no thread uses the handle; a database still
        read-only refuses the write, saying why (a full disk: the caller answers ENOSPC)."""
        if self._reopen_wanted or self.engine.read_only:
            self.recover()
            if self.engine.read_only:
                raise OSError(errno.EIO, f"the database is read-only after a write error: {self._reopen_error}")

    def write(self, batch: Batch) -> None:
        """A batch without reference changes (the learned model, a counter), on the loop."""
        self._before_write()
        self.kv.write(batch)

    def space(self) -> dict[str, int]:
        """The space accounting (see chunks.space.Space) plus the bytes on disk, told apart:
        stored_bytes is what the store keeps (the database without its write-ahead log,
        plus the packs); wal_bytes the log, which RocksDB keeps until every column family with
        data in it has flushed (tens of MB that come and go, gone at unmount); unflushed_bytes
        the recent writes held in memtables, on disk only in the log until they are flushed."""
        db, wal = self.engine.disk_usage()
        return {**self.objects.space.figures(), "stored_bytes": db + self.packs.disk_usage(), "wal_bytes": wal,
                "unflushed_bytes": self.engine.unflushed_bytes()}

    def members(self) -> list[tuple[str, KV]]:
        """The other databases a pack gc marks from (liveness.Liveness.members, and for a
        home's process the store's database), each opened read-only beside its writer; the
        caller closes them."""
        out: list[tuple[str, KV]] = []
        cache = self.engine.block_cache if isinstance(self.engine, RocksKV) else None  # one budget for all
        listed = {n: r for n, r in self.liveness.members().items() if r != self.db}
        if self.home:
            listed[DB_DIR] = DB_DIR
        try:
            for name, rel in sorted(listed.items()):
                where = os.path.join(self.path, rel)
                if not os.path.isdir(where):
                    raise StoreError(f"member database {name} ({rel}) is not in the store")
                out.append((name, RocksKV(where, FAMILIES, blob_families=(CF_OBJECTS,), read_only=True,
                                          cache=cache)))
        except BaseException:
            for _name, kv in out:
                kv.close()
            raise
        return out

    def mark_packs(self) -> dict[int, int]:
        """Live bytes per pack named by a pointer of the store's database or of any member
        (blocking: call in a thread)."""
        members = self.members()
        try:
            return liveness.mark([self.home_kv] + [kv for _n, kv in members])
        finally:
            for _name, kv in members:
                kv.close()

    def survey_packs(self, listed: dict[int, int]) -> repack.Survey:
        """Live bytes of the listed packs (`Packs.listing`, taken while no flush had a pack
        in flight), from a mark that starts now: this database's pointers, and the members'
        (which a repack never moves: it moves this database's pointers only).  Blocking: in a
        thread."""
        members = self.members()
        try:
            s = repack.survey(self.home_kv, self.packs.encoding_sizes(listed))
            s.theirs = liveness.mark([kv for _n, kv in members])
            s.foreign = set(s.theirs) | dups.record_packs(self.refs)  # rewrites head for a dup record's pack
            s.left, self.dup_left = self.dup_left, set()
            return s
        finally:
            for _name, kv in members:
                kv.close()

    def keep_dups(self) -> dups.Figures:
        """One pass of the store keeper (chunks.dups): the packs not settled yet scanned for
        chunks packed in two places across this database and every member, the dup records
        settled and published; nothing at all for a store of one database (the first pass
        after its first home is made reads every pack index once).  Any process of the store
        (the one holding the keeper's lease): each database goes by its member name, the
        store's own (`db`) ranked first, so every keeper chooses alike.  Blocking: in a thread."""
        followed = dups.read_followed(self.refs)  # before the opens: a later follow is seen next pass
        members = self.members()
        try:
            if not members and next(self.refs.scan(dups.CF_DUP, b""), None) is None:
                return dups.Figures()  # one database: nothing is packed twice across databases
            dbs: list[tuple[str, KV]] = [(self.member, self.home_kv), *members]
            cached: set[int] = set()
            for _name, kv in dbs:
                cached |= remotecache.cache_packs(kv)
            keeper = dups.Keeper(self.refs, self.packs, dbs, DB_DIR, set(), cached, followed)
            return keeper.run(self.packs.listing())
        finally:
            for _name, kv in members:
                kv.close()

    @property
    def member(self) -> str:
        """This process's database by its member name (`db`: the store's own)."""
        from cowfs import homes

        return homes.member_name(self.home) if self.home else DB_DIR

    def keeping_wanted(self) -> tuple[bool, bool]:
        """The keeper's schedule's cheap look (a few reference reads and a pack listing, no
        database opened): (new, waiting).  new: the store has more than one database and a
        pack the keeper never read (`gc/dupscan`); waiting: a pack it reads again, a dup
        record waiting for rewrites or a condemned pack for its sweep.  Blocking: in a thread."""
        if not self.liveness.members():
            return False, False
        state = dups.ScanState.unpack(self.refs.get(dups.CF_GC, dups.SCAN_STATE))
        listed = self.packs.listing()
        new = any(p not in state.packs for p in listed)
        waiting = (bool(state.to_read(listed, time.time())) or next(self.refs.scan(dups.CF_DUP, b""), None) is not None
                   or bool(self.liveness.condemned().packs))
        return new, waiting

    def _dup_plan(self, home: KV, found: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        sizes: dict[int, bool] = {}

        def exists(pack: int) -> bool:
            if pack not in sizes:
                sizes[pack] = self.packs.size(pack) is not None
            return sizes[pack]
        return dups.plan(home, found, set(self.liveness.condemned().packs), exists)

    def rewrite_dups(self, found: list[tuple[bytes, bytes]]) -> int:
        """Point this database's P records of the published dup records (chunks.dups) at the
        published places, in one commit (re-encodings: the accounting follows); returns how
        many.  Under Filesystem.lock on the loop, which no acknowledgement of a gc round
        passes before the commit: the condemned list it reads stays true until then."""
        recode = self._dup_plan(self.home_kv, found)
        if recode:
            left = _packs_of(self.home_kv, recode)
            txn = RefTxn()
            txn.recode = recode
            self.commit(Batch(), txn)
            self.dup_left |= left
        return len(recode)

    def rewrite_idle_homes(self, found: list[tuple[bytes, bytes]], gen: int) -> int:
        """The keeper's rewrites (as `rewrite_dups`) of the homes no process holds (their
        database opens for writing), each committed and synced before it is closed, and
        marked as having followed generation gen (read before `found`); returns how many records.  The keeper's process, under Filesystem.lock (its acknowledgement of
        a round waits); blocking: in a thread."""
        if not found:
            return 0
        done = 0
        cache = self.engine.block_cache if isinstance(self.engine, RocksKV) else None
        for name, rel in sorted(self.liveness.members().items()):
            if rel == self.db or not os.path.isdir(os.path.join(self.path, rel)):
                continue
            try:
                kv = RocksKV(os.path.join(self.path, rel), FAMILIES, blob_families=(CF_OBJECTS,), cache=cache)
            except StoreLockedError:
                continue  # its daemon rewrites it (cowfs.background.gc.rewrite_dups)
            try:
                objects = ObjectStore(kv, ChunkCache(0, 0), self.packs)
                recode = self._dup_plan(kv, found) if objects.space is not None else {}
                if recode:
                    left = _packs_of(kv, recode)
                    txn, batch = RefTxn(), Batch()
                    txn.recode = recode
                    objects.apply(txn, batch)
                    kv.write(batch)
                    kv.sync()
                    objects.settle()
                    done += len(recode)
                    self.idle_left.setdefault(name, set()).update(left)
                dups.mark_followed(self.refs, name, gen)
            finally:
                kv.close()
        return done

    def repack_idle_homes(self) -> int:
        """Repack what the keeper's rewrites of idle homes (`rewrite_idle_homes`) left partly
        dead, as the home's own daemon does after its rewrites (`sweep_packs`): only those
        packs, below repack.LEFT_BELOW of the home's live bytes; the moves committed and synced,
        the new places of a pack others point into published (dups.follow_moves), the other old
        packs condemned.  A home whose daemon started meanwhile is left to it.  Returns packs
        repacked.  The keeper's process, not under the lock (nothing else writes the home);
        blocking: in a thread."""
        done = 0
        cache = self.engine.block_cache if isinstance(self.engine, RocksKV) else None
        todo, self.idle_left = self.idle_left, {}
        listed = self.packs.listing()
        for name, left in sorted(todo.items()):
            rel = self.liveness.members().get(name)
            sizes = self.packs.encoding_sizes({p: listed[p] for p in left if p in listed})
            if rel is None or not sizes:
                continue
            try:
                kv = RocksKV(os.path.join(self.path, rel), FAMILIES, blob_families=(CF_OBJECTS,), cache=cache)
            except StoreLockedError:
                continue  # its daemon came back: its own sweep collects them
            members = self.members()
            try:
                s = repack.survey(kv, sizes)
                s.theirs = liveness.mark([self.home_kv] + [m for n, m in members if n != name])
                s.foreign = set(s.theirs) | dups.record_packs(self.refs)
                s.left = set(sizes)
                for group in s.groups(repack.REPACK_BELOW):
                    c = repack.copy(kv, self.packs, group)
                    batch = Batch()
                    moved = repack.moves(kv, c, batch)
                    if moved:
                        kv.write(batch)
                        kv.sync()
                    self.retire_packs(c, moved, s.foreign, kv)
                    done += len(c.old)
            finally:
                for _n, m in members:
                    m.close()
                kv.close()
        return done

    def condemn_packs(self, packs: list[int], marked: Iterable[int] = ()) -> tuple[int, int]:
        """Condemn packs found unmarked, pardon condemned packs found marked (one round of
        liveness.Liveness.condemn); returns (condemned, pardoned).  Blocking: in a thread."""
        out = self.liveness.condemn(packs, marked, lambda: dups.spared(self.refs))
        faults.point("packs_condemned")
        return out

    def sweep_packs(self) -> dict[str, int]:
        """Delete the condemned packs that are due (every writer alive at their round has
        acknowledged it or is gone) and that a mark taken now still finds unmarked; pardon
        the due ones it finds marked.  Blocking: in a thread."""
        self.liveness.prune()
        c = self.liveness.condemned()
        due = self.liveness.due(c)
        out = {"packs_deleted": 0, "packs_pardoned": 0, "packs_waiting": len(c.packs) - len(due)}
        if not due:
            return out
        live = self.mark_packs()
        marked = {p for p in due if live.get(p)}
        gone = sorted(due - marked)
        for pack in gone:
            self.packs.delete(pack)
        faults.point("packs_swept")
        self.liveness.forget(set(gone) | marked)
        out.update(packs_deleted=len(gone), packs_pardoned=len(marked))
        return out

    def retire_packs(self, c: repack.Copy, moved: int, foreign: set[int] = frozenset(), home: KV | None = None) -> int:
        """After a repack's moves are committed and durable: its old packs are condemned, and
        its new pack too if nothing was moved there; not the old ones in `foreign` (other
        databases point into them or a dup record names them), whose moved chunks' new places
        are published instead (chunks.dups.follow_moves): the others follow, and a later gc
        finds them unmarked.  home: the database the moves were committed in (this process's,
        or an idle home's: `repack_idle_homes`).  Blocking: call in a thread."""
        faults.point("repack_moved")
        home = self.home_kv if home is None else home
        shared = set(c.old) & foreign
        if shared and moved:
            kept = [(h, new) for h, old, new in c.moves
                    if codec.packed_extent(old)[0] in shared and home.get(CF_OBJECTS, h) == new]  # type: ignore[index]
            dups.follow_moves(self.refs, kept, shared)
        return self.condemn_packs([p for p in c.old if p not in shared]
                                  + ([c.new] if c.new is not None and not moved else []))[0]

    def copy_packs(self, group: list[int]) -> repack.Copy:
        """The live encodings of a group of packs, put as one new pack (blocking: in a thread)."""
        return repack.copy(self.home_kv, self.packs, group)

    def commit_moves(self, c: repack.Copy) -> int:
        """Point what still points where the copy saw it at the new pack, in one commit;
        returns the pointers moved.  Under Filesystem.lock, on the loop."""
        batch = Batch()
        n = repack.moves(self.home_kv, c, batch)
        if n:
            self.commit(batch)
        return n

    def disk_usage(self) -> int:
        """Bytes the store's database (its write-ahead log included) and pack files occupy on disk."""
        return sum(self.engine.disk_usage()) + self.packs.disk_usage()

    def compact(self) -> None:
        """Reclaim the database space of deleted keys now (blocking: call in a thread)."""
        self.engine.compact()

    def inodes_used(self) -> int:
        """Inode numbers handed out so far (an upper bound on live inodes)."""
        return self._next_ino - 1

    def commit(self, batch: Batch, txn: RefTxn | None = None,
               before_write: Callable[[], None] | None = None) -> None:
        """Apply reference changes and write everything in one atomic batch.

        Synchronous on purpose: no trio checkpoint between reading reference counts and
        writing them, so the daemon's single event loop is the single writer.  before_write
        runs once the reference changes are in the batch (the new trees' sizes are known:
        `ObjectStore.content_size`), and may add to the batch or raise to abandon it.
        """
        if txn is not None and txn.staged and txn.empty():
            self.objects.discard_staged(txn)  # what was packed belonged to files deleted meanwhile
        try:
            self._before_write()
            if txn is not None and not txn.empty():
                c, f = self.objects.apply(txn, batch)
                self.objects_created += c
                self.objects_freed += f
            if before_write is not None:
                before_write()
            if len(batch):
                try:
                    faults.point("commit")  # a test hook: a write refused, as by a full disk
                    self.kv.write(batch)
                except Unpublished:
                    raise  # the home part is written: its references stand (below)
                except BaseException:
                    self._want_reopen()  # RocksDB is read-only after a failed write: reopen first
                    raise
        except Unpublished:
            if txn is not None:
                txn.staged = []
            self.objects.settle()
            self.write_seq += 1
            self.commits.changed()
            raise
        except BaseException:
            self.objects.abort(txn)
            raise
        if txn is not None:
            txn.staged = []  # written: the kept extents are referenced now
        if len(batch):
            self.objects.settle()
            self.write_seq += 1
            self.commits.changed()

    async def sync(self) -> None:
        """Return once every commit made before the call is durable; concurrent callers share one fsync.

        The WAL sync runs in a worker thread, so the loop serves other requests meanwhile and
        fsyncs arriving then share the next sync (group commit).  When nothing else waits to
        be served (`direct_sync_ok`: no request queued on /dev/fuse) and no sync is running,
        it runs on the loop instead: the hand-off to a thread and back (futex and GIL
        hand-overs, a wake-up through trio's wake-up socket, each possibly a cross-CPU
        wake-up) cost 0.3-3 ms of latency per fsync on this loaded 2-CPU machine, more than
        the sync itself (docs/benchmarks.md, issue 24).  A request that arrives meanwhile
        waits for that one sync; after a sync slower than SLOW_SYNC_NS (a busy disk) the
        next goes to a thread, so a slow disk never blocks the loop twice in a row."""
        target = self.write_seq
        while self.synced_seq < target:
            running = self._sync_running
            if running is not None:
                await running.wait()
                continue
            seq = self.write_seq
            t0 = time.perf_counter_ns()
            if not self._reopen_wanted and self.direct_sync_ok():
                if not self._slow_sync:
                    self.direct_syncs += 1
                    self.kv.sync()  # on the loop: no checkpoint, so no commit can come in between
                    self.synced_seq = max(self.synced_seq, seq)
                    self._synced(t0)
                    continue
                self.syncs_after_slow += 1
            ev = self._sync_running = trio.Event()
            try:
                await self.in_thread(self.kv.sync, python=False)
                self.synced_seq = max(self.synced_seq, seq)
                self._synced(t0)
            finally:
                self._sync_running = None
                ev.set()

    def _synced(self, t0: int) -> None:
        self._slow_sync = time.perf_counter_ns() - t0 > SLOW_SYNC_NS
        self._syncs_since_rotation += 1
        if self._syncs_since_rotation >= WAL_SYNCS and (not self.wal_rotations
                                                        or self.engine.wal_bytes >= WAL_ROTATE):
            self._rotation_wanted.set()

    async def wal_keeper(self) -> None:
        """Keep the WAL a recycled log while fsyncs come often (the daemon runs this task):
        its syncs then overwrite blocks in place instead of growing the file
        (`RocksKV.rotate_wal`).  The first rotation of the process fills two logs of
        WAL_ROTATE bytes to recycle at once; later ones switch to the log the previous
        rotation retired, so each log is about WAL_ROTATE bytes.  A writer that never
        fsyncs often gets no rotation: its memtables are flushed as RocksDB decides."""
        while True:
            await self._rotation_wanted.wait()
            fill = 0 if self.wal_rotations else WAL_ROTATE
            if not self.engine.read_only:
                try:
                    await self.in_thread(self.engine.rotate_wal, fill, python=False)
                    self.wal_rotations += 1
                except Exception as exc:  # noqa: BLE001 - the log in use stays: syncs append, as before
                    log.warning("%s: the write-ahead log was not rotated: %s", self.path, exc)
            self._syncs_since_rotation = 0
            self._rotation_wanted = trio.Event()

    def _release_umask(self) -> None:
        if self._umask_held:
            self._umask_held = False
            private.release_umask()

    def close(self) -> None:
        try:
            try:
                try:
                    self.serving.release_all()
                except Exception as exc:  # a record left behind is stale once this process exits
                    log.warning("%s: could not remove the serve records of this process: %s", self.path, exc)
                finally:
                    self.liveness.unregister()
            finally:
                try:
                    self.refs.close()
                finally:
                    try:
                        self.kv.close()
                    finally:
                        for kv in self.below:  # the lineage's other databases (a home's view)
                            kv.close()
        finally:
            self.packs.close()
            self._release_umask()
