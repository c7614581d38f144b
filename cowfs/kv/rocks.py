"""RocksDB backend through rocksdict, in raw-bytes mode, one column family per concern."""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Iterator, Sequence

import rocksdict as rd

from cowfs.kv.base import KV, Batch, Conflict, Expect, LocalEngine, StoreLockedError

log = logging.getLogger(__name__)


# RocksDB's share of the daemon's memory, bounded by two figures (docs/architecture.md,
# "Memory"): one block cache for every family, and one budget for all memtables together.
# Left to the defaults, each of the ~11 families had a block cache of its own (32 MiB) and
# memtables of up to 32 MiB (the chunk family up to 4 x 64 MiB), several hundred MiB that
# filled over hours of work and looked like a leak (`rm -rf` of 20,000 files ten times:
# memtables 38 -> 182 MiB).
BLOCK_CACHE = 32 << 20
MEMTABLE_BUDGET = 32 << 20


def _past(prefix: bytes) -> bytes | None:
    """The least key above every key that begins with prefix (None: there is none, or the
    prefix is empty)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


WAL_RECYCLE = 2  # obsolete write-ahead logs RocksDB keeps for reuse (`RocksKV.rotate_wal`)
_FILL_KEY = b"cowfs/wal-fill/"  # in the default family, which cowfs does not use otherwise


def _options(cache: rd.Cache, small: bool = False) -> rd.Options:
    opt = rd.Options(raw_mode=True)
    table = rd.BlockBasedOptions()
    table.set_block_cache(cache)
    # A whole-key bloom filter (10 bits a key, ~1% false positives, held with the index in
    # the table readers' memory): a point read skips the tables that do not hold its key, so
    # a chunk pointer's read (every cold file read, every freed chunk of a fold) reads the
    # data block of one table, not one per overlapping L0 table: 2-4 us a read instead of
    # 10-16 us once the blocks are cached (docs/benchmarks.md, issue 24, h65).
    table.set_bloom_filter(10, False)
    opt.set_block_based_table_factory(table)
    # Beyond the budget the largest memtable is flushed early (writers do not wait for it).
    opt.set_db_write_buffer_size((MEMTABLE_BUDGET // 4) if small else MEMTABLE_BUDGET)
    opt.create_if_missing(True)
    opt.create_missing_column_families(True)
    opt.set_max_background_jobs(2)
    # Point-in-time WAL recovery: after a crash the database is a prefix of the writes.
    opt.set_wal_recovery_mode(rd.DBRecoveryMode.point_in_time())
    opt.set_write_buffer_size((2 if small else 32) << 20)
    opt.set_max_total_wal_size((16 if small else 512) << 20)
    # Metadata (inode records, entries, changelog) compresses 3-5x: lz4 while it is young,
    # zstd once compacted to the last level.  Chunk payloads are zstd already and live in blob
    # files, which RocksDB does not compress (blob_compression_type stays none).
    opt.set_compression_type(rd.DBCompressionType.lz4())
    opt.set_bottommost_compression_type(rd.DBCompressionType.zstd())
    # RocksDB's info log is kept per open otherwise (a store mounted often piles them up), and
    # grows with every compaction: two of at most 256 KiB.
    opt.set_keep_log_file_num(2)
    # A write-ahead log that every family has flushed is kept for reuse (renamed, then
    # overwritten in place) instead of deleted: see RocksKV.rotate_wal.
    opt.set_recycle_log_file_num(WAL_RECYCLE)
    opt.set_max_log_file_size(256 << 10)
    return opt


# RocksDB opens a database's table files with max_file_opening_threads threads (default 16)
# per column family, threads it creates and joins at every open however few the files: 12
# families x 15 threads were 25-35 ms of a 50 ms open of a new store (load 3); one thread
# opens a few dozen files in a few milliseconds.  A database of many files keeps the default.
FEW_TABLE_FILES = 64
OPENING_THREADS = 16


# A read-only open reads the files the writer's current version names (MANIFEST, table and
# WAL files) one after the other, and a writer that flushes or compacts meanwhile deletes some
# of them: the open then fails with ENOENT ("No such file or directory", RocksDB's IO error or
# a Corruption wrapping it).  Measured with a writer flushing every 40 batches in another
# process: 90 of 311 and 151 of 281 opens failed in 8-10 s; with these tries 0 of 129
# (docs/design-many-processes.md, "Step 6").  Opening again reads the new version.
READ_ONLY_TRIES = 20


# A read-only open reads blob files lazily, at the first read of a value in each, and the
# writer's blob gc deletes them after a compaction: a read then fails with "IO error: No such
# file or directory: while stat a file for size: ...blob" (measured: the 1,500 of 2,000 values
# in the three blob files the reader had not opened yet; docs/design-many-processes.md, "A
# further hazard").  Table files do not vanish under a reader (max_open_files -1 opens them all
# at the open).  Reopening reads the writer's current version, where the values moved: a
# frozen member (a fork's base, pack gc's mark of a member) reads on.
REFRESH_TRIES = 5


def _vanished(exc: Exception) -> bool:
    """Whether a read-only open or read failed on a file its writer deleted meanwhile."""
    return "No such file or directory" in str(exc)


def _opening_threads(path: str) -> int:
    try:
        with os.scandir(path) as it:
            tables = sum(1 for e in it if e.name.endswith(".sst"))
    except FileNotFoundError:
        return 1  # created by this open
    return 1 if tables < FEW_TABLE_FILES else OPENING_THREADS


def _blob_options(cache: rd.Cache, small: bool = False) -> rd.Options:
    """Chunk payloads go to blob files so compactions do not rewrite them."""
    opt = _options(cache, small)
    opt.set_enable_blob_files(True)
    opt.set_min_blob_size(1024)
    opt.set_blob_file_size((8 if small else 256) << 20)
    opt.set_enable_blob_gc(True)
    # Large memtables, several of them, so a burst of chunk writes does not stall on
    # flushes (measured: 190 MB/s with defaults, ~500 MB/s with these on this machine kind).
    # On a small disk (< 4 GiB) they would not fit beside the data: small ones there.
    opt.set_write_buffer_size((4 if small else 64) << 20)
    opt.set_max_write_buffer_number(4)
    return opt


_OPENED_HERE = False  # see opened_in_this_process


def opened_in_this_process() -> bool:
    """Whether this process has opened a database.  RocksDB's background threads (one pool
    for the whole process, started at the first open and never stopped) do not survive
    fork(): a process forked after an open that opens a database again waits forever for
    its first flush.  cowfs.daemon.process starts its daemon afresh in that case."""
    return _OPENED_HERE


class RocksKV(KV, LocalEngine):
    """RocksDB, opened by one process (its LOCK file), and a LocalEngine.

    Compare-and-set: `write` holds `_write_lock` from the reads of the expected keys to the
    end of `db.write` of one WriteBatch, and every write takes it, so no write of this
    process lands between the check and the batch.  That is enough because RocksDB lets one
    process open the database for writing and every write of that process goes through
    here; readers need no lock (a WriteBatch is applied atomically, and iterators read a
    snapshot).  Several processes writing one store would need more than this lock: one
    process owning the database and serving the others' batches (the lock then lives in
    it), or RocksDB's TransactionDB (rocksdict does not expose it), or a distributed engine
    whose transactions do the check (see KV.write).
    """

    def __init__(self, path: str, families: tuple[str, ...], blob_families: tuple[str, ...] = (),
                 small: bool = False, read_only: bool = False, cache: rd.Cache | None = None) -> None:
        """read_only: open without the writer's lock (several processes may, beside one writer):
        a frozen member of an OverlayKV; writes are refused.  cache: another RocksKV's block
        cache (`block_cache`), shared instead of a cache of this one's own: the members a
        process opens beside its database stay within one BLOCK_CACHE."""
        self.path = path
        self._families = families
        self._blob_families = blob_families
        self._small = small
        self._wo = rd.WriteOptions()
        self._wo.sync = False
        # Writes come from the event loop; the lock makes a check-and-write atomic against
        # writes from any other thread as well, and keeps a reopen (recover) out of a write.
        self._write_lock = threading.Lock()
        self.wal_bytes = 0  # keys and values written since the last rotate_wal (about the WAL's growth)
        self._cache = cache if cache is not None else rd.Cache((BLOCK_CACHE // 4) if small else BLOCK_CACHE)
        # A database opened read-only is a frozen member: its reads reopen it when its writer
        # deleted a file they need (`_refresh`).  (`read_only` also becomes true for a writer
        # that could only reopen read-only after a write error: that one is not refreshed.)
        self._frozen = read_only
        self._refresh_lock = threading.Lock()  # one reopen at a time
        self._open(read_only)

    def _open(self, read_only: bool = False) -> None:
        small = self._small
        cache = self._cache
        cfs = {name: (_blob_options(cache, small) if name in self._blob_families else _options(cache, small))
               for name in self._families}
        access = rd.AccessType.read_only() if read_only else rd.AccessType.read_write()
        db_options = _options(cache, small)
        db_options.set_max_file_opening_threads(_opening_threads(self.path))
        tries = READ_ONLY_TRIES if read_only else 1
        for attempt in range(1, tries + 1):
            try:
                db = rd.Rdict(self.path, db_options, column_families=cfs, access_type=access)
                break
            except Exception as exc:  # rocksdict raises a plain Exception with RocksDB's status text
                if attempt < tries and _vanished(exc):
                    time.sleep(0.001 * attempt)
                    continue
                if "lock" in str(exc).lower():
                    raise StoreLockedError(str(exc)) from exc
                raise
        global _OPENED_HERE
        _OPENED_HERE = True
        self.read_only = read_only
        self.db = db
        self._cf = {name: db.get_column_family(name) for name in self._families}
        self._handles = {name: db.get_column_family_handle(name) for name in self._families}

    def _close(self) -> None:
        # Column-family handles keep the database (and its LOCK) alive until dropped; clear
        # the dicts in place, since a frame may still hold them.
        self._cf.clear()
        self._handles.clear()
        try:
            self.db.close()
        finally:
            del self.db
            gc.collect()

    @property
    def block_cache(self) -> rd.Cache:
        return self._cache

    def unflushed_bytes(self) -> int:
        total = 0
        for cf in self._cf.values():
            total += cf.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        return total

    def memory(self) -> dict[str, int]:
        total = {"memtable_bytes": self.unflushed_bytes(), "block_cache_bytes": self._cache.get_usage(),
                 "table_reader_bytes": 0}
        for cf in self._cf.values():
            total["table_reader_bytes"] += cf.property_int_value("rocksdb.estimate-table-readers-mem") or 0
        return total

    def recover(self) -> None:
        """RocksDB stays read-only after a write error; reopening clears that.  If it cannot
        reopen for writing (still no space), it reopens read-only so reads go on; the owner
        (cowfs.store.Store) calls this again before its next write.  No other thread may use
        the database meanwhile: the handles are closed and replaced (rocksdict has no call
        that resumes a database in place)."""
        with self._write_lock:
            try:
                self._close()
            except Exception:
                pass
            try:
                self._open()
            except Exception:
                self._open(read_only=True)
                raise

    def _refresh(self, seen: dict[str, rd.Rdict]) -> None:
        """Replace the open whose families are `seen` (a read on it found a file gone) by a new
        read-only open sharing the block cache, unless another read did already.  The old open
        is not closed here: its handles are dropped, and RocksDB closes it when the last read
        still holding them (in another thread) lets go: no read loses its handle."""
        with self._refresh_lock:
            if self._cf is not seen:
                return
            self._open(read_only=True)  # new handle dicts: `seen` is left as it is to its readers
        log.info("%s: reopened read-only, its writer deleted a file this open had not read yet", self.path)

    def refresh(self) -> None:
        """A frozen member reopened now (as `_refresh`: a new read-only open sharing the block
        cache, the old one closed by its last reader), so that its reads see what its writer
        wrote since: the pointers a repack of that database moved, before a branch daemon
        acknowledges the gc round that condemned their old packs (cowfs.background.gc)."""
        if self._frozen:
            self._refresh(self._cf)

    def get(self, cf: str, key: bytes) -> bytes | None:
        if not self._frozen:
            return self._cf[cf].get(key)
        for attempt in range(REFRESH_TRIES + 1):
            families = self._cf
            try:
                return families[cf].get(key)
            except Exception as exc:
                if attempt == REFRESH_TRIES or not _vanished(exc):
                    raise
            self._refresh(families)
        raise AssertionError("unreachable")

    def _frozen_scan(self, cf: str, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """A frozen member's scan: where a read finds a file gone, the member is reopened and
        the scan goes on after the last key it gave.  The iterator's status is checked at the
        end (an iterator that meets an error just stops)."""
        n = len(prefix)
        last: bytes | None = None
        for attempt in range(REFRESH_TRIES + 1):
            families = self._cf
            try:
                it = families[cf].iter()
                it.seek(start if last is None else last + b"\0")
                while it.valid():
                    key = it.key()
                    if key[:n] != prefix:
                        return
                    value = it.value()
                    last = key
                    yield key, value
                    it.next()
                it.status()
                return
            except Exception as exc:
                if attempt == REFRESH_TRIES or not _vanished(exc):
                    raise
            it = None
            self._refresh(families)

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        if self._frozen:
            yield from self._frozen_scan(cf, start, prefix)
            return
        end = _past(prefix) if start.startswith(prefix) else None
        if end is not None:
            # RocksDB stops at the bound and hands out (key, value) pairs itself: half the
            # time of the loop below (100,000 keys: ~0.05 s against ~0.09 s; a mount reads
            # every layer and snapshot key of the catalog).
            bounded = rd.ReadOptions()
            bounded.set_iterate_upper_bound(end)
            yield from self._cf[cf].items(from_key=start, read_opt=bounded)
            return
        it = self._cf[cf].iter()
        it.seek(start)
        n = len(prefix)
        while it.valid():
            key = it.key()
            if key[:n] != prefix:
                return
            yield key, it.value()
            it.next()

    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        with self._write_lock:
            for cf, key, value in expect:
                found = self._cf[cf].get(key)
                if found != value:
                    raise Conflict(cf, key, value, found)
            wb = rd.WriteBatch(raw_mode=True)
            handles = self._handles
            n = 0
            for cf, key, value in batch.ops:
                if value is None:
                    wb.delete(key, handles[cf])
                    n += len(key)
                else:
                    wb.put(key, value, handles[cf])
                    n += len(key) + len(value)
            self.db.write(wb, self._wo)
            self.wal_bytes += n

    def sync(self) -> None:
        self.db.flush_wal(True)

    def rotate_wal(self, fill: int = 0) -> None:
        """Make RocksDB start a new write-ahead log, a recycled one when it has one (blocking:
        call in a thread).

        Why: a WAL sync of an appended log must also commit the file's new size and blocks
        through ext4's journal; a log that RocksDB recycles (WAL_RECYCLE: an obsolete log
        renamed and overwritten from its start, its records marked with the log's number so
        that recovery stops at the old ones) is overwritten in place, and its fdatasync
        writes the data blocks alone: 0.4 ms against 2.7 ms at the median on this machine
        (docs/benchmarks.md, issue 24).  A log is obsolete once every family has flushed
        the memtables it holds data of, which, with families written rarely, takes until
        `max_total_wal_size`; so this flushes every family: the log is switched once (the
        flushes are requested under the write lock, so no write of ours lands between
        them and switches again), and the old logs become recyclable when those flushes end.
        fill: first fill two logs with this many bytes each (written and deleted), so that
        the log in use at once and the next one are recycled logs of that size (a fresh
        database or a fresh session has no obsolete log yet)."""
        families = [self.db, *self._cf.values()]
        piece = bytes(1 << 20)
        for _round in range(2 if fill else 0):
            # Two logs of `fill` bytes: the one in use after this call, and the next
            # rotation's (the log a switch leaves must not be empty, and would be tiny).
            for i in range(0, fill, len(piece)):
                with self._write_lock:  # in pieces: a write of the loop waits for one at most
                    self.db.put(_FILL_KEY + str(i).encode(), piece, self._wo)
            with self._write_lock:
                for i in range(0, fill, len(piece)):
                    self.db.delete(_FILL_KEY + str(i).encode(), self._wo)
                for cf in families:
                    cf.flush(False)
            for cf in families:
                cf.flush(True)  # done: the filled log is obsolete, hence recycled
        with self._write_lock:
            for cf in families:
                cf.flush(False)
            self.wal_bytes = 0

    def flush(self) -> None:
        """Every family's memtable written to table files (blocking), so that a read-only
        open beside this writer replays almost no WAL: ~5 ms instead of ~3.5 ms per MiB of
        it (docs/design-many-processes.md, "Step 6")."""
        for cf in self._cf.values():
            cf.flush(True)

    def compact(self) -> None:
        """Every family compacted to its last level (the space of deleted keys reclaimed), then
        the write-ahead logs kept for reuse made small (`shrink_wal`): what `cowfs gc` runs."""
        opts = rd.CompactOptions()
        opts.set_bottommost_level_compaction(rd.BottommostLevelCompaction.force())
        for name, cf in self._cf.items():
            blob = name in self._blob_families
            if blob:  # let this compaction rewrite every blob file, not only the oldest quarter
                cf.set_options({"blob_garbage_collection_age_cutoff": "1.0",
                                "blob_garbage_collection_force_threshold": "0.0"})
            try:
                cf.compact_range(None, None, opts)
            finally:
                if blob:
                    cf.set_options({"blob_garbage_collection_age_cutoff": "0.25",
                                    "blob_garbage_collection_force_threshold": "1.0"})
        self.shrink_wal()

    def shrink_wal(self) -> None:
        """Switch the log WAL_RECYCLE + 1 times, with one record in each, so that the logs
        RocksDB keeps for reuse and the one in use hold next to nothing (blocking: call in a
        thread).

        Why: a log kept for reuse (WAL_RECYCLE) keeps the size of what was last written to it
        (RocksDB truncates a log to what it wrote only when it closes it), so after a compaction
        a store still took up to WAL_RECYCLE logs of its latest writes: bench_branching's delete
        + gc row went 7.1 -> 73 -> 9.2 MiB (+30%, 1.0% before logs were recycled).  Each switch
        reuses the oldest kept log and closes the one it leaves, truncated to its one record;
        the logs are kept for reuse in the order they were left, so WAL_RECYCLE + 1 switches
        reach every kept log and the one in use."""
        families = [self.db, *self._cf.values()]
        for _round in range(WAL_RECYCLE + 1):
            with self._write_lock:  # an empty memtable does not switch the log: one record first
                self.db.put(_FILL_KEY, b"", self._wo)
                self.db.delete(_FILL_KEY, self._wo)
                for cf in families:
                    cf.flush(False)
            for cf in families:
                cf.flush(True)  # done: the log left is obsolete, hence closed and kept for reuse
        self.wal_bytes = 0

    def disk_usage(self) -> tuple[int, int]:
        """(bytes of the database without its write-ahead log, bytes of the log)."""
        total = wal = 0
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                try:
                    n = os.stat(os.path.join(root, f)).st_blocks * 512
                except FileNotFoundError:
                    continue
                if root == self.path and f.endswith(".log") and f[:-4].isdigit():
                    wal += n
                else:
                    total += n
        return total, wal

    def close(self) -> None:
        if not self.read_only:
            try:
                self.db.flush_wal(True)
            except Exception:
                pass  # a database in an error state: what is in the WAL is all there is
        self._close()
