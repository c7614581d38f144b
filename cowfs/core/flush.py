"""The flush pipeline: acknowledged writes wait in per-node dirty chunk buffers until a flush
hashes and compresses them (in a thread when large, into a pack when larger still) and
commits them as new chunk trees, one batch for every node taken.

A flush *moves* `node.dirty` to `node.flushing` (no copy): later writes start new buffers,
so nothing mutates a buffer once it is flushing; reads look in dirty, then flushing, then
the committed tree.  If the commit fails, the taken buffers go back under newer writes.
Acknowledged data is in `dirty_nodes` or in the flush in progress (`flush_running`), and
`flush()` waits for both (docs/architecture.md, "Concurrency invariants";
tests/test_flush_races.py).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING, Iterator, NamedTuple

import trio

from cowfs import faults
from cowfs.chunks import codec, tree
from cowfs.chunks.tree import CHUNK, RESERVED, TreeWriter
from cowfs.core.node import Node, Sparse
from cowfs.core.txn import Mutation
from cowfs.errors import FSError
from cowfs.meta.records import Attrs

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

DIRTY_LIMIT = 64 << 20  # acknowledged-but-unflushed bytes before writers wait for a flush
DIRTY_AGE = 1.0  # seconds before the background flusher commits dirty data
# Dirty bytes that wake the background flusher at once: a streaming writer's next chunks
# are copied in while the previous ones are hashed, compressed and committed.
EARLY_FLUSH_BYTES = 8 << 20
# Dirty bytes that make the background task fold the small-write log (cowfs.core.smallwrites:
# logged buffers stay in memory until a fold), before writers would wait at DIRTY_LIMIT.
FOLD_DIRTY_BYTES = DIRTY_LIMIT // 2
THREAD_FLUSH_BYTES = 512 << 10  # flushes larger than this hash/compress in a worker thread
# Flushes of at least this much write their chunk encodings (those of PACK_MIN_VALUE bytes or
# more) as one new pack, durable before the commit, in the thread, and commit only pointers
# (chunks/packs.py).  Smaller flushes (small files, fsync'd rewrites) stay inline: a pack put
# costs an fsync of the pack and of its directory.
PACK_FLUSH_BYTES = 4 << 20
PACK_MIN_VALUE = 8 << 10
_ZEROS = bytes(CHUNK)

Encoded = dict[int, "tuple[bytes, bytes | None] | None"]


def disk_cost(nbytes: int) -> int:
    """Disk bytes a flush of nbytes of new data takes at most: once in a pack file when the
    flush is large enough for one, else twice (RocksDB's WAL, then a blob file)."""
    return nbytes if nbytes >= PACK_FLUSH_BYTES else 2 * nbytes


class _Taken(NamedTuple):
    """A node's dirty chunks taken by a flush, with the size and the attributes (see
    `_stamp`) the file had then: a SETATTR deferred while the flush encodes follows later
    writes, and goes with them in the next flush."""
    node: Node
    chunks: dict[int, bytearray | memoryview | Sparse]
    size: int
    stamp: tuple[int, int, int, int, int, int]
    unlogged: set[int] | None  # its pages not in a log record (given back if the commit fails)
    unloggable: bool


def _stamp(a: Attrs) -> tuple[int, int, int, int, int, int]:
    """The attributes a deferred SETATTR may change: mode, uid, gid, atime, mtime, ctime."""
    return a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns


def _restamp(a: Attrs, stamp: tuple[int, int, int, int, int, int]) -> None:
    a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns = stamp


class Flusher:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self.dirty_nodes: dict[Node, float] = {}  # node -> time it first became dirty
        self.dirty_bytes = 0
        self.flush_running = False  # a flush holds taken chunks (under the lock, maybe in a thread)
        self.flushing_bytes = 0  # what the flush in progress took
        self.flush_count = 0
        self.flush_wanted = trio.Event()
        self.dirtied = trio.Event()  # set when a node becomes dirty while none was (`mark`)
        # dirty_bytes beyond which a write wakes the background task: EARLY_FLUSH_BYTES more
        # than what the last flush left (buffers only log records wait for; see smallwrites).
        self.early_at = EARLY_FLUSH_BYTES
        # Of the flush in progress: the log records its commit deletes, and whether all it
        # took is in log records (then fsyncs need not wait for it: `fsync`).
        self.taken_keys: list[int] = []
        self.covered = False

    def held_bytes(self) -> int:
        """Disk bytes acknowledged data not committed yet will take at most."""
        return disk_cost(self.dirty_bytes + self.flushing_bytes)

    def is_dirty(self, node: Node) -> bool:
        return node in self.dirty_nodes

    def holds(self, node: Node) -> bool:
        """Whether node's data is dirty or being flushed (then it stays in memory)."""
        return node in self.dirty_nodes or bool(node.flushing)

    def pending(self) -> bool:
        """Whether acknowledged writes wait to be committed (dirty, or in a flush)."""
        return bool(self.dirty_nodes) or self.flush_running

    def written(self, node: Node, new_chunks: int, grew: bool) -> bool:
        """A write buffered new_chunks more chunks of node (grew: its size grew): node is
        dirty.  Past EARLY_FLUSH_BYTES the background flusher is woken; past DIRTY_LIMIT
        the writer must wait for a flush (True: call `flush_at_limit`)."""
        if new_chunks:
            self.dirty_bytes += new_chunks * CHUNK
        if new_chunks or grew:  # zeros over holes buffer nothing, but the size must commit
            self.mark(node)
        if self.dirty_bytes > DIRTY_LIMIT:
            return True
        if self.dirty_bytes > self.early_at:
            self.flush_wanted.set()
        return False

    def mark(self, node: Node) -> None:
        """node is dirty (if not yet); the first dirty node wakes the background flusher."""
        if not self.dirty_nodes:
            self.dirtied.set()
        self.dirty_nodes.setdefault(node, time.monotonic())

    async def flush_at_limit(self) -> None:
        try:
            await self.flush()
        except FSError as exc:
            # The write is in the dirty buffers: it succeeded.  The flush is retried, and
            # fsync reports it if it keeps failing.
            log.error("flush at the dirty limit failed: %s", exc)

    def dropped(self, node: Node, before: int) -> None:
        """node's dirty buffers went from `before` chunks to what they are (a cut)."""
        self.dirty_bytes -= (before - len(node.dirty)) * CHUNK
        if not node.dirty and node.logged is None:  # a logged size stays to be committed
            self.dirty_nodes.pop(node, None)

    def discard(self, node: Node) -> None:
        """node's dirty data is of no use any more (its inode is dropped)."""
        if node in self.dirty_nodes:
            del self.dirty_nodes[node]
            self.dirty_bytes -= len(node.dirty) * CHUNK
        node.dirty.clear()

    async def flush(self, nodes: list[Node] | None = None) -> None:
        """Commit every acknowledged write (not yet durable: see sync); with nodes, only
        theirs (the timer's, which leaves the small-write log to its fold).

        Acknowledged writes are dirty, or flushing in another task's flush, which holds the
        lock while it encodes in a thread: that flush must be waited for too, or an fsync
        could return (and a sync cover nothing) before the data it covers is committed."""
        if self.dirty_nodes or self.flush_running:
            txn = self.fs.txn
            await txn.acquire_lock()
            try:
                await self.flush_locked(nodes)
            finally:
                txn.lock.release()

    async def fsync(self) -> None:
        """Make every acknowledged write durable: as small-write log records when little
        is unlogged (cowfs.core.smallwrites), else by a flush; then a WAL sync.

        While a flush that took only data its log records hold encodes in a thread (a
        fold; its task holds the lock), what it took is durable already, so the writes
        made since are logged without waiting for it: its commit deletes only the records
        it took (`SmallWrites.keys_of`), and a flush of every node takes the nodes logged
        meanwhile in its next round, before anything it runs for commits."""
        if self.flush_running and self.covered and (not self.dirty_nodes or self.fs.smallwrites.log_locked()):
            await self.fs.store.sync()
            return
        if self.dirty_nodes or self.flush_running:
            txn = self.fs.txn
            await txn.acquire_lock()
            try:
                if not self.fs.smallwrites.log_locked():
                    await self.flush_locked()
            finally:
                txn.lock.release()
        await self.fs.store.sync()

    def encode(self, chunks: dict[int, bytearray | memoryview | Sparse]) -> Encoded:
        """Hash and (for chunks new to the store) compress; None marks an all-zero chunk (hole).
        A sparse buffer is merged with its stored chunk here, so in a large flush's thread.
        One whose stored chunk is damaged cannot be merged: its chunk is left as stored
        (damaged, reading EIO, named by fsck), its writes dropped with an error line.  Raised,
        the error failed every flush of the mount (all mutations with it) and the small-write
        log's replay; the write itself no longer reads the chunk, so cannot fail instead."""
        out: Encoded = {}
        objects = self.fs.store.objects
        for i, data in chunks.items():
            if type(data) is Sparse:
                try:
                    data = data.merge(objects.peek_chunk(data.base))
                except codec.RemoteChunk:
                    raise  # a lazy mount's remote down: the flush is retried once it is back
                except codec.CorruptObject as exc:
                    log.error("writes into chunk %d (stored %s) dropped: the stored chunk is damaged (%s)",
                              i, data.base.hex(), exc)
                    continue
            # Comparing with a zero chunk stops at the first nonzero byte (count(0) reads all);
            # a memoryview compares slowly (~50 us), so only one that starts with a zero byte
            # is copied and compared.
            if not len(data) or (not data[0] and (data if type(data) is bytearray else bytes(data))
                                 == _ZEROS[: len(data)]):
                out[i] = None
                continue
            h = codec.chunk_hash(data)
            out[i] = (h, None if objects.exists(h) else codec.encode_chunk(data, self.fs.level))
        return out

    def encode_all(self, work: list[_Taken], pack: bool) -> tuple[list[Encoded], list[int]]:
        """Encode every node's chunks; with pack, move the large new encodings to a new pack
        (in this thread: the write and fsync release the GIL).  Returns the encodings and
        the packs written, which the commit keeps if it stores a pointer into them, else deletes."""
        encoded = [self.encode(t.chunks) for t in work]
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
        pointers = dict(zip(items, self.fs.store.objects.pack(list(items.items()))))
        for enc in encoded:
            for i, e in enc.items():
                if e is not None and e[0] in pointers:
                    enc[i] = (e[0], pointers[e[0]])
        return encoded, sorted({codec.packed_extent(p)[0] for p in pointers.values()})  # type: ignore[index]

    def flush_node_into(self, m: "Mutation", node: Node, encoded: Encoded,
                        size: int, stamp: tuple[int, int, int, int, int, int] | None = None,
                        cut: bool = False) -> None:
        """Turn encoded chunks into a new tree for node and save it in m, with the size (and
        the `_stamp` attributes) the file had when these chunks were taken.  The tree keeps
        chunks reserved beyond EOF (fallocate with KEEP_SIZE) unless `cut` (a truncate
        that shrinks the file gives them back, as ext4's does)."""
        writer = TreeWriter(self.fs.store.objects.node, m.txn)
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

    def _take(self, only: list[Node] | None = None) -> tuple[list[_Taken], int]:
        """Move every dirty node's buffers (with only, those of only's dirty nodes) to
        `flushing` (no copy: later writes start new buffers, copying from these, so nothing
        mutates a buffer once it is flushing)."""
        if only is None:
            nodes = list(self.dirty_nodes)
            self.dirty_nodes.clear()
        else:
            nodes = [n for n in only if self.dirty_nodes.pop(n, None) is not None]
        sw = self.fs.smallwrites
        self.taken_keys = sw.keys_of(None if only is None else set(nodes))
        self.covered = all(n.deleted or (sw.log_only(n) and n.cap is None) for n in nodes)
        self.flush_running = True
        work = []
        total = 0
        for node in nodes:
            node.flushing = node.dirty
            node.dirty = {}
            total += len(node.flushing) * CHUNK
            work.append(_Taken(node, node.flushing, node.attrs.size, _stamp(node.attrs), node.unlogged,
                               node.unloggable))
            node.unlogged, node.unloggable = None, False  # what is written from now on: the next record
        self.flushing_bytes = total
        self.dirty_bytes = max(0, self.dirty_bytes - total) if self.dirty_nodes else 0
        self.early_at = self.dirty_bytes + EARLY_FLUSH_BYTES
        return work, total

    def _commit(self, m: Mutation, work: list[_Taken], encoded: list[Encoded]) -> None:
        """Commit the taken chunks, and delete the small-write log records of their nodes
        as of the take (of a flush of every node, every record then: all of them describe
        data of dirty nodes, all taken here; cowfs.core.smallwrites)."""
        fs = self.fs
        for t, enc in zip(work, encoded):
            if not t.node.deleted:
                size = t.size
                if t.node.cap is not None and size > t.node.cap:
                    size, enc = self.cut_taken(t, enc)
                self.flush_node_into(m, t.node, enc, size, t.stamp)
        folded = self.taken_keys
        fs.smallwrites.delete_into(m.batch, folded)
        # The attributes of deferred SETATTRs, which a failed commit's revert would
        # take back to what is stored: they were acknowledged, so they stay.
        stamps = [_stamp(t.node.attrs) for t in work]
        try:
            fs.txn.commit(m)
        except BaseException:
            for t, st in zip(work, stamps):
                _restamp(t.node.attrs, st)
            raise
        fs.smallwrites.folded(folded, (t.node for t in work))

    def _put_back(self, m: Mutation, work: list[_Taken]) -> None:
        """Nothing was committed: put the data back under any newer writes."""
        self.fs.store.objects.discard_staged(m.txn)
        for t in work:
            node = t.node
            for i, data in t.chunks.items():
                # A Sparse is not changed while flushing (writes start new buffers): it goes back as it is.
                node.dirty.setdefault(i, data if type(data) is Sparse else bytearray(data))
            node.flushing = {}
            if t.unloggable or node.unloggable:
                node.unlogged, node.unloggable = None, True
            elif t.unlogged:
                node.unlogged = t.unlogged | (node.unlogged or set())
            if node.dirty or node.logged is not None:
                self.mark(node)
                self.dirty_bytes += len(node.dirty) * CHUNK

    def _done(self, work: list[_Taken], total: int) -> None:
        fs = self.fs
        fs.store.spent(disk_cost(total))
        for t in work:
            t.node.flushing = {}
            fs.usage.after_flush(t.node)
            fs.nodes.evict_if_unused(t.node)
        self.flush_count += 1

    @contextlib.contextmanager
    def _settled(self, m: Mutation, work: list[_Taken], total: int) -> Iterator[None]:
        """Around one flush's encoding and commit: what it took goes back to the dirty set if
        they fail, its figures are reset either way, and it is done only once committed."""
        try:
            yield
        except BaseException:
            self._put_back(m, work)
            raise
        finally:
            self.flush_running = self.covered = False
            self.flushing_bytes = 0
        self._done(work, total)

    async def flush_locked(self, only: list[Node] | None = None) -> None:
        """Commit all dirty data (with only, that of only's nodes, once; caller holds the
        lock). Large flushes encode in a thread."""
        fs = self.fs
        while self.dirty_nodes:
            work, total = self._take(only)
            if not work:
                return
            m = Mutation(fs)
            with self._settled(m, work, total):
                if total > THREAD_FLUSH_BYTES:
                    try:
                        encoded, m.txn.staged = await fs.store.in_thread(
                            lambda: self.encode_all(work, total >= PACK_FLUSH_BYTES))
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        raise FSError(errno.ENOSPC, f"pack put failed: {exc}") from exc  # a full disk
                else:
                    encoded = [self.encode(t.chunks) for t in work]
                self._commit(m, work, encoded)
            if only is not None:
                return

    def flush_inline(self) -> None:
        """flush_locked without a thread or a checkpoint: for the small-write log's replay,
        which runs before the event loop serves anything."""
        while self.dirty_nodes:
            work, total = self._take()
            m = Mutation(self.fs)
            with self._settled(m, work, total):
                self._commit(m, work, [self.encode(t.chunks) for t in work])

    def cut_taken(self, t: _Taken, enc: Encoded) -> tuple[int, Encoded]:
        """Chunks a flush took before a refused write cut their file (`DiskFull.refuse`):
        keep what lies below the cut, the chunk across it trimmed (no stored chunk holds
        bytes beyond EOF).  A packed encoding left out stays dead in its pack until `cowfs gc`
        repacks it (a pack the commit stores nothing from is deleted by the commit:
        `ObjectStore.apply`)."""
        cap = t.node.cap
        assert cap is not None
        keep = {i: e for i, e in enc.items() if i * CHUNK < cap}
        i, rem = divmod(cap, CHUNK)
        data = t.chunks.get(i) if rem else None
        if data is not None and len(data) > rem:
            if type(data) is Sparse:
                data = data.merge(self.fs.store.objects.peek_chunk(data.base))
            keep.update(self.encode({i: bytearray(data[:rem])}))
        return cap, keep

    async def commit_waiting(self, nodes: list[Node]) -> None:
        """The timer's commit of writes no log record holds: as log records when they are
        small (a commit like a flush's, and the log keeps its pages until its fold: a late
        SETATTR of a logged file's times, a shared mapping's pages), else a flush of nodes."""
        txn = self.fs.txn
        await txn.acquire_lock()
        try:
            if not self.fs.smallwrites.log_locked():
                await self.flush_locked(nodes)
            elif gone := [n for n in nodes if n.deleted]:  # no record is written for them
                await self.flush_locked(gone)
        finally:
            txn.lock.release()

    async def fold(self) -> None:
        """The background fold of the small-write log: what is not logged yet (a write whose
        fsync has not come) is logged first, so the flush took only logged data and fsyncs
        during its encoding need not wait for it (`fsync`); then one round over every dirty
        node, not the loop of `flush`, which would take again at once what they log."""
        txn = self.fs.txn
        await txn.acquire_lock()
        try:
            self.fs.smallwrites.log_locked()
            await self.flush_locked(list(self.dirty_nodes))
        finally:
            txn.lock.release()

    def due(self, early: bool) -> list[Node] | None:
        """What the background task commits now: None, every dirty node (the small-write
        log's fold is due: cowfs.core.smallwrites); else the nodes holding writes no log
        record holds, if one has waited DIRTY_AGE seconds or early (EARLY_FLUSH_BYTES more
        are dirty); [] nothing."""
        now = time.monotonic()
        sw = self.fs.smallwrites
        if sw.fold_due(now) or self.dirty_bytes >= FOLD_DIRTY_BYTES:
            return None
        waiting = [n for n in self.dirty_nodes if not sw.log_only(n)]
        if waiting and (early or now - min(self.dirty_nodes[n] for n in waiting) >= DIRTY_AGE):
            return waiting
        if early:  # only logged buffers: wake again EARLY_FLUSH_BYTES further
            self.early_at = self.dirty_bytes + EARLY_FLUSH_BYTES
        return []

    async def background_flusher(self) -> None:
        """Commit dirty data that has waited DIRTY_AGE seconds, or once EARLY_FLUSH_BYTES pile
        up; fold the small-write log when it is due (`due`).  Looks every DIRTY_AGE / 2 s while
        anything is dirty; while nothing is (no log record either: logged nodes are dirty),
        asleep until the first write (`mark`): an idle daemon's flusher never wakes."""
        while True:
            if not self.dirty_nodes:
                self.dirtied = trio.Event()  # no checkpoint since the look: `mark` sets this one
                await self.dirtied.wait()
            with trio.move_on_after(DIRTY_AGE / 2):
                await self.flush_wanted.wait()
            early = self.flush_wanted.is_set()
            if early:
                self.flush_wanted = trio.Event()
            if not self.dirty_nodes:
                continue
            nodes = self.due(early)
            if nodes == []:
                continue
            try:
                if nodes is None:
                    faults.point("log_fold")  # a test hook: this fold skipped
                faults.point("timer_flush")  # a test hook: this flush skipped
            except OSError as exc:
                log.info("timer flush skipped: %s", exc)
                continue
            try:
                await (self.fold() if nodes is None else self.commit_waiting(nodes))
            except FSError as exc:
                # A refusal (disk full, quota) is the writers' to see; any other error
                # (an OSError of a pack put) ends this task for its supervisor to count
                # and restart (cowfs.background.supervise).
                log.error("background flush failed: %s", exc)
