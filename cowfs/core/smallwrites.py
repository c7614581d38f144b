"""The small-write log: an fsync of a few dirty pages makes them durable as log records
instead of re-encoding their chunks.

Without it, every fsync committed each dirty 64 KiB chunk as a new chunk object (a copy of
the stored chunk read back, hashed, compressed, a new tree path, reference counts): ~1 ms of
daemon CPU and ~80 KiB of WAL per fsync'd 4 KiB page (docs/benchmarks.md, issue 24).  Now,
when what is dirty and not yet logged is small (`FSYNC_LOG_MAX`), fsync writes one record per
dirty file into the `meta` family (keys `wlog/<seq>`): the file's branch head layer, inode
number, size, mode, owner and times, and the exact bytes of its dirty buffers in the pages
written since its last record.  The record is committed like any batch and made durable by
the same WAL sync.  The data stays in the dirty buffers (reads are served from them as
before) and the file stays dirty; a fold (see below for when) commits it as chunks and
deletes its records in the same batch.

Why the records are always valid where they are replayed: every commit that changes a
file's tree or attributes, or a branch's head layer, is a mutation or runs under
`Filesystem.exclusive`, so it first flushes all dirty nodes, and every logged node is dirty:
the first such commit after a record folds (and deletes) it.  So a record in the store always
describes writes newer than every other committed change to its file, over the tree its
inode record names, and the layer it names is still its branch's head (garbage collection
moves records between layers without a flush, but keeps their content and the heads' ids).  After a crash, `replay` (at `Filesystem` construction, before anything reads the
store through a filesystem) writes each record's bytes into the node's buffers again, in
order, sets the size and attributes it names, and commits them with the deletion of the
records: what fsync acknowledged is back (tests/test_small_writes.py).

When the log is folded (`fold_due`, issue 24): not by the 1 s timer, which commits only
writes no record holds (`log_only` nodes are skipped: what they hold is committed already,
as records), as records themselves when small (`Flusher.commit_waiting`), but once the log
holds `LOG_FOLD` bytes, once no record was written for `FOLD_IDLE` seconds, once its oldest
record is `FOLD_AGE` seconds old, or when the dirty buffers take half of `DIRTY_LIMIT`
(`Flusher.background_flusher`); and, as before, by a release, any metadata operation, and an
fsync past `LOG_LIMIT`.  So a file whose pages are fsync'd again and again (a database's
header, random pages of a file small against the log) has each of its chunks re-encoded
once per fold instead of once a second, and the fold runs from the background task, not
from the requests of the writer it would stall (fsyncs during its encoding are logged
without waiting: `Flusher.fsync`).  A partial flush (the timer's, when what waits is too
large to log) deletes the records of the nodes it commits, and only those.
"""
from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, Iterable

from cowfs.chunks.tree import CHUNK
from cowfs.core.node import PAGE, Node, Sparse
from cowfs.errors import FSError
from cowfs.kv.base import Batch
from cowfs.meta import writelog

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.view import View

log = logging.getLogger(__name__)

FSYNC_LOG_MAX = 256 << 10  # unlogged bytes one fsync may log; beyond, it flushes as before
LOG_LIMIT = 8 << 20  # bytes logged since the last fold; beyond, an fsync folds instead
LOG_FOLD = LOG_LIMIT // 2  # bytes logged that make the background task fold (before the fsync must)
FOLD_IDLE = 2.0  # seconds without a new record after which the log is folded
FOLD_AGE = 30.0  # seconds a record waits at most to be folded


def _ranges(node: Node) -> list[tuple[int, bytes | memoryview]]:
    """(file offset, bytes) of node's buffers in its unlogged pages, adjacent pages merged;
    each range ends where its chunk's buffer does (a page past a buffer's end is not data).
    Of a sparse buffer, only the written bytes: the rest of its pages is the stored chunk,
    which its replay writes over again."""
    out: list[tuple[int, bytes | memoryview]] = []
    pages = sorted(node.unlogged or ())
    k = 0
    while k < len(pages):
        p = pages[k]
        i = p * PAGE // CHUNK
        buf = node.dirty.get(i)
        q = p + 1
        while k + 1 < len(pages) and pages[k + 1] == q and q * PAGE // CHUNK == i:
            k += 1
            q += 1
        k += 1
        if buf is None:
            continue  # zeros written over a hole: nothing buffered, the size says it
        a, b = p * PAGE - i * CHUNK, min(q * PAGE - i * CHUNK, len(buf))
        if type(buf) is Sparse:
            out.extend((i * CHUNK + s, bytes(buf.data[s:e])) for s, e in buf.written(a, b))
        elif a < b:
            out.append((i * CHUNK + a, bytes(buf[a:b])))
    return out


def _unlimited(_growth: int) -> None:
    """A replayed write's charge: fsync acknowledged it, so no quota refuses it now."""


def _record(node: Node) -> writelog.Record:
    a = node.attrs
    return writelog.Record(node.view.lv.top, node.ino, a.size, a.mode, a.uid, a.gid, a.atime_ns,
                           a.mtime_ns, a.ctime_ns, _ranges(node))


class SmallWrites:
    """The log records this daemon wrote and not yet folded (`Flusher` deletes them with
    its next commit), and the fsync that writes them."""

    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        # The records in the store, by sequence number (in order): the node each is of (None:
        # a previous daemon's, replayed) and the data bytes it holds.
        self.pending: dict[int, tuple[Node | None, int]] = {}
        self.bytes = 0  # data bytes they hold
        self.first_at = 0.0  # time.monotonic() of the oldest pending record's write
        self.last_at = 0.0  # and of the newest's
        self.seq = 0  # the next record's
        self.records = 0  # written since the mount (stats)
        self.folds = 0  # flushes that deleted records

    def log_locked(self) -> bool:
        """Make every acknowledged write durable as log records, if it is small enough; the
        caller holds the lock, or a flush that took only logged data holds it while it
        encodes (`Flusher.fsync`), and syncs the WAL after.  False: it is not (too much
        unlogged data, a file with a refused write's cut): the caller flushes."""
        fs = self.fs
        nodes = [n for n in fs.flusher.dirty_nodes if not n.deleted]
        if not nodes:
            return False
        total = 0
        for n in nodes:
            if n.unloggable or n.cap is not None:
                return False
            total += len(n.unlogged or ()) * PAGE
        if total > FSYNC_LOG_MAX or self.bytes + total > LOG_LIMIT:
            return False
        batch = Batch()
        written: list[tuple[Node, int, int]] = []  # node, sequence number, data bytes
        nbytes = 0
        for n in nodes:
            if not n.unlogged and n.log_mark() == n.logged:
                continue  # nothing new since its last record
            record = _record(n)
            seq = self.seq + len(written)
            writelog.put(batch, seq, record)
            size = sum(len(d) for _o, d in record.ranges)
            written.append((n, seq, size))
            nbytes += size
        if not written:
            return True
        try:
            fs.store.commit(batch)
        except Exception as exc:  # noqa: BLE001 - as Transactions.commit: a failed write
            error = str(exc) or type(exc).__name__
        else:
            now = time.monotonic()
            if not self.pending:
                self.first_at = now
            self.last_at = now
            self.seq += len(written)
            self.records += len(written)
            self.bytes += nbytes
            dirty = fs.flusher.dirty_nodes
            for n, k, size in written:
                n.unlogged = None
                n.logged = n.log_mark()
                self.pending[k] = (n, size)
                # Nothing of it is uncommitted now: the timer's 1 s counts from here.
                dirty[n] = now
            return True
        raise fs.txn.failed("log commit", error)

    @staticmethod
    def log_only(node: Node) -> bool:
        """Whether every acknowledged write of node is in its log records (nothing written,
        no attribute changed since its last record): the timer leaves it to the fold."""
        return node.logged is not None and not node.unlogged and not node.unloggable and node.log_mark() == node.logged

    def fold_due(self, now: float) -> bool:
        """Whether the background task should fold the log now (see the module's docstring)."""
        return bool(self.pending) and (self.bytes >= LOG_FOLD or now - self.last_at >= FOLD_IDLE
                                       or now - self.first_at >= FOLD_AGE)

    def keys_of(self, nodes: set[Node] | None) -> list[int]:
        """The records of nodes (None: every record), as a flush takes them: its commit
        deletes these, not records an fsync writes while it encodes (those hold writes made
        after the take).  A previous daemon's records go with any flush (replay commits
        them at once)."""
        return [seq for seq, (n, _b) in self.pending.items() if nodes is None or n is None or n in nodes]

    @staticmethod
    def delete_into(batch: Batch, keys: list[int]) -> None:
        for seq in keys:
            writelog.delete(batch, seq)

    def folded(self, keys: list[int], nodes: Iterable[Node]) -> None:
        """The batch deleting keys is written: those records are gone, the nodes committed
        (a node with a record written since the take keeps what that record says)."""
        if keys:
            self.folds += 1
            for k in keys:
                self.bytes -= self.pending.pop(k)[1]
            if not self.pending:
                self.bytes = 0
        newer = {n for n, _b in self.pending.values()}
        for n in nodes:
            if n not in newer:
                n.logged = None

    def replay(self) -> list["View"]:
        """Commit the records a previous daemon left (it was killed, or the machine lost
        power, after an fsync logged them): their bytes are written into the nodes' buffers
        again in record order, with the size and attributes each names, and committed with
        the deletion of every record, before anything else runs.  Returns the branch views
        it attached (their orphans are still to be removed, as at `Views.attach_branch`)."""
        fs = self.fs
        store = fs.store
        found = writelog.every(store.kv)
        if not found:
            return []
        views: dict[str, "View"] = {}
        heads = {b.head: name for name, b in store.catalog.branches.items()}
        objects = store.objects
        dropped = 0
        for seq, value in found:
            self.pending[seq] = (None, 0)
            self.seq = seq + 1
            try:
                r = writelog.Record.unpack(value)
            except writelog.DamagedRecord as exc:
                raise FSError(errno.EIO, f"small-write log record {seq} is damaged: {exc}; `cowfs fsck --repair "
                                         f"{store.path}` deletes it (the writes it held are lost)") from exc
            name = heads.get(r.layer)
            if name is None:
                # Written through a view no branch shows any more: a pre-rollback tree, or a
                # branch deleted on the unmounted store after its daemon died.
                dropped += 1
                continue
            if name not in views:
                views[name] = fs.views.branch_view(name)
            try:
                node = fs.nodes.node(views[name], r.ino)
            except FSError:
                dropped += 1
                continue  # gone (an orphan removed at attach)
            # Accounted once per record, as one write: its ranges end within its size.
            usage = fs.usage
            before, a = usage.allocated(node), node.attrs
            old_size = a.size
            new = sum(node.write(off, bytes(data), objects, _unlimited) for off, data in r.ranges)
            usage.buffered(node, before)
            a.size, a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns = (
                r.size, r.mode, r.uid, r.gid, r.atime_ns, r.mtime_ns, r.ctime_ns)
            usage.grew(node, old_size)
            fs.flusher.written(node, new, False)
            fs.flusher.mark(node)  # attributes alone commit too
        if fs.flusher.dirty_nodes:
            fs.flusher.flush_inline()  # deletes every record, those dropped too
        else:
            # None applies: deleted alone, or they would stay (and be read at every start)
            # until some flush of dirty data.
            batch = Batch()
            keys = self.keys_of(None)
            self.delete_into(batch, keys)
            store.commit(batch)
            self.folded(keys, ())
        log.info("%d small-write log records of a previous daemon replayed", len(found))
        if dropped:
            log.info("%d of them dropped: their branch head or inode is gone", dropped)
        return list(views.values())
