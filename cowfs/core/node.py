"""In-memory state of one inode as seen through one view, and its data path.

Data written by the kernel lands in per-chunk dirty buffers (`dirty`); a flush moves them to
`flushing` while they are hashed and compressed (possibly in a thread), then commits them as
a new chunk tree.  Reads look in dirty, then flushing, then the committed tree, so no read
ever misses data that a write already acknowledged.

A write into part of a stored chunk that is in no buffer does not read that chunk: its
buffer is a `Sparse` (the written bytes and where they are, over the stored chunk named by
its hash), merged with the stored chunk only when the whole chunk is needed - a read of
bytes it was not written, a truncate or fallocate of it, or the flush that encodes it (in
the flush's thread when the flush is large: `Flusher.encode`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from cowfs.chunks import tree
from cowfs.chunks.tree import CHUNK, RESERVED, Root
from cowfs.meta.records import Attrs

if TYPE_CHECKING:
    from cowfs.chunks.objects import ObjectStore
    from cowfs.core.view import View


_ZEROS = bytes(CHUNK)
PAGE = 4096  # the small-write log's unit (cowfs.core.smallwrites)
# Unlogged pages a node tracks; beyond, it stops (its next fsync flushes, as a large one would).
UNLOGGED_MAX = (256 << 10) // PAGE


class Sparse:
    """A dirty chunk written in part over stored chunk `base` (`base_len` bytes) that was not
    read: `data` holds the written bytes at their offsets (zeros elsewhere), `spans` the
    written [start, end) ranges, sorted, disjoint and not adjacent.  Its length is the
    chunk's as written: max(base_len, len(data)).  The stored chunk stays referenced by the
    committed tree until the flush that encodes this buffer commits (frees happen only in
    commits, and every commit that changes the file's tree flushes its buffers first)."""

    __slots__ = ("base", "base_len", "data", "spans")

    def __init__(self, base: bytes, base_len: int) -> None:
        self.base = base
        self.base_len = base_len
        self.data = bytearray()
        self.spans: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return max(self.base_len, len(self.data))

    def put(self, co: int, piece: memoryview) -> None:
        """Write piece at chunk offset co."""
        end = co + len(piece)
        if len(self.data) < co:
            self.data.extend(bytes(co - len(self.data)))
        self.data[co:end] = piece
        a, b = co, end
        kept = []
        for s, e in self.spans:
            if e < a or s > b:
                kept.append((s, e))
            else:
                a, b = min(a, s), max(b, e)
        kept.append((a, b))
        kept.sort()
        self.spans = kept

    def whole(self) -> bool:
        """Whether the writes cover every byte of the stored chunk (then `data` is the chunk)."""
        return len(self.spans) == 1 and self.spans[0][0] == 0 and self.spans[0][1] >= self.base_len

    def covered(self, a: int, b: int) -> bool:
        """Whether bytes [a, b) of the chunk (b clipped to its length) were all written."""
        b = min(b, len(self))
        return a >= b or any(s <= a and b <= e for s, e in self.spans)

    def trim(self, n: int) -> None:
        """Cut the chunk to n bytes (n < its length): the stored bytes beyond too."""
        self.base_len = min(self.base_len, n)
        del self.data[n:]
        self.spans = [(s, min(e, n)) for s, e in self.spans if s < n]

    def merge(self, stored: bytes | bytearray) -> bytearray:
        """The whole chunk: stored (the content of `base`) under the written bytes."""
        out = bytearray(memoryview(stored)[: self.base_len])
        if len(out) < len(self.data):
            out.extend(bytes(len(self.data) - len(out)))
        data = self.data
        for s, e in self.spans:
            out[s:e] = data[s:e]
        return out

    def written(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """The written ranges within [a, b)."""
        for s, e in self.spans:
            if s < b and e > a:
                yield max(s, a), min(e, b)


def _zeros(data: bytes | bytearray | memoryview, pos: int, n: int) -> bool:
    """Whether data[pos:pos+n] (n <= CHUNK) is all zeros: a C comparison that stops at the
    first nonzero byte, and for most data at the first byte."""
    if data[pos]:
        return False
    if type(data) is bytes:
        return data.startswith(_ZEROS if n == CHUNK else _ZEROS[:n], pos)
    return bytes(data[pos : pos + n]) == _ZEROS[:n]


class Node:
    __slots__ = ("view", "ino", "attrs", "stored_layer", "stored_root", "lookups", "opens",
                 "dirty", "flushing", "deleted", "counted", "counted_bytes", "alloc", "stored_alloc",
                 "cached_writers", "cap", "cap_errno", "unlogged", "unloggable", "logged", "__weakref__")

    def __init__(self, view: "View", ino: int, attrs: Attrs, stored_layer: int | None) -> None:
        self.view = view
        self.ino = ino
        self.attrs = attrs
        # Layer of the committed record this node mirrors, and the tree root that record
        # references: a save in the same layer moves that reference instead of adding one.
        self.stored_layer = stored_layer
        self.stored_root: Root | None = attrs.root
        self.lookups = 0
        self.opens = 0
        # Chunk buffers: bytearrays, read-only views of a write request's bytes for a chunk
        # written whole (never mutated: a partial write replaces the view by a copy), or
        # `Sparse` writes over a stored chunk not read (merged where the chunk is needed).
        self.dirty: dict[int, bytearray | memoryview | Sparse] = {}
        self.flushing: dict[int, bytearray | memoryview | Sparse] = {}
        self.deleted = False
        # What this inode contributes to its view's usage (inode count, logical bytes).
        self.counted = stored_layer is not None
        self.counted_bytes = attrs.size if self.counted and attrs.is_reg else 0
        # Allocated bytes: the lengths of the file's chunks as they are now (buffers
        # included; holes are 0), and as committed (stored_root's content size, what the
        # view's committed usage counts for it).  None until first needed
        # (Filesystem.allocated): a lookup must not cost a refs read for nothing.
        self.alloc: int | None = None
        self.stored_alloc: int | None = None
        # Open handles writing through the kernel's page cache (not direct_io): their writes
        # are acknowledged before we see them, so a refusal loses acknowledged data.
        self.cached_writers = 0
        # After such a loss: the size the file is cut back to (a prefix of what the kernel
        # acknowledged), refused beyond with cap_errno until the kernel's view agrees again.
        self.cap: int | None = None
        self.cap_errno = 0
        # The small-write log (cowfs.core.smallwrites): the pages written since the node's
        # last log record or flush (None: none; made at the first, as most nodes are never
        # written), whether they went past UNLOGGED_MAX (then no record: a flush), and
        # what its last record said of it (`log_mark`; None: no record since its last flush).
        self.unlogged: set[int] | None = None
        self.unloggable = False
        self.logged: tuple[int, ...] | None = None

    def log_mark(self) -> tuple[int, ...]:
        """What a log record says of the node besides its bytes: size, mode, owner, times."""
        a = self.attrs
        return a.size, a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, a.ctime_ns

    def logged_size(self) -> int | None:
        """The size its last log record made durable (None: no record since its last flush)."""
        return self.logged[0] if self.logged is not None else None

    # -- reads ---------------------------------------------------------------------------
    def _entry(self, i: int) -> bytearray | memoryview | Sparse | None:
        """Chunk i's buffer as it is (a Sparse one unmerged)."""
        data = self.dirty.get(i)
        return data if data is not None else self.flushing.get(i)

    def _buffer(self, i: int, objects: "ObjectStore") -> bytearray | memoryview | None:
        """Chunk i's buffer whole: a Sparse one is merged with its stored chunk (the merge
        replaces a dirty one; a flushing one is left to its flush, which encodes it)."""
        data = self.dirty.get(i)
        if data is not None:
            if type(data) is Sparse:
                data = self.dirty[i] = data.merge(objects.chunk(data.base))
            return data
        data = self.flushing.get(i)
        if type(data) is Sparse:
            return data.merge(objects.chunk(data.base))
        return data

    def stored_hash(self, i: int, objects: "ObjectStore") -> bytes | None:
        """Hash of committed chunk i if a read of it would come from the store (not from a
        write buffer, not a hole): what readahead may fetch."""
        if i in self.dirty or i in self.flushing:
            return None
        h = tree.lookup(self.attrs.root, i, objects.node)
        return None if h == RESERVED else h

    def chunk(self, index: int, objects: "ObjectStore") -> bytes | bytearray | None:
        """Current content of chunk `index` (may be shorter than CHUNK), or None for a hole."""
        data = self._buffer(index, objects)
        if data is not None:
            return data
        h = tree.lookup(self.attrs.root, index, objects.node)
        if h == RESERVED:
            return _ZEROS
        return None if h is None else objects.chunk(h)

    def data_chunks(self, first: int, objects: "ObjectStore") -> Iterator[tuple[int, int]]:
        """(index, data length) of the chunks from `first` to EOF that hold data, in order,
        for SEEK_DATA/SEEK_HOLE: buffers as they are (one of zeros is a hole: its flush makes
        it one), stored chunks but reserved ones; holes are skipped a subtree at a time."""
        end = (self.attrs.size + CHUNK - 1) // CHUNK
        buffered = sorted(i for i in self.dirty.keys() | self.flushing.keys() if i >= first)
        stored = tree.iter_chunks(self.attrs.root, objects.node, first)
        nxt = next(stored, None)
        k = 0
        while k < len(buffered) or nxt is not None:
            if nxt is None or (k < len(buffered) and buffered[k] <= nxt[0]):
                i = buffered[k]
                k += 1
                if nxt is not None and nxt[0] == i:
                    nxt = next(stored, None)
                data = self._buffer(i, objects)
                length = len(data) if data and not _zeros(data, 0, len(data)) else 0  # type: ignore[arg-type]
            else:
                i, h = nxt
                nxt = next(stored, None)
                length = 0 if h == RESERVED else objects.content_size(h)
            if i >= end:
                return
            if length:
                yield i, length

    def _read_chunk(self, i: int, a: int, b: int, objects: "ObjectStore") -> bytes | memoryview | None:
        """Bytes [a, b) of chunk i (fewer if it ends early), None for a hole.  Stored chunks
        are read through the page-granular cache API: an L2 hit decodes only these pages."""
        data = self._entry(i)
        if data is not None:
            if type(data) is Sparse:
                if data.covered(a, b):  # only written bytes: no need of the stored chunk
                    return bytes(data.data[a:min(b, len(data))])
                data = self._buffer(i, objects)
                assert data is not None
            # Dirty buffers are bytearrays that later writes resize: never export a view of them.
            return bytes(data[a:b])
        h = tree.lookup(self.attrs.root, i, objects.node)
        return None if h is None or h == RESERVED else objects.read(h, a, b)

    def read_run(self, off: int, size: int, objects: "ObjectStore") -> bytes | memoryview | None:
        """A read across two or more committed chunks that a pack holds back to back, served
        by one pread (ObjectStore.read_run); None when that does not apply."""
        end = min(off + size, self.attrs.size)
        first, last = off // CHUNK, (end - 1) // CHUNK
        if off >= end or last == first:
            return None
        hashes = []
        for i in range(first, last + 1):
            if i in self.dirty or i in self.flushing:
                return None
            h = tree.lookup(self.attrs.root, i, objects.node)
            if h is None:
                return None
            hashes.append(h)
        a = off - first * CHUNK
        data = objects.read_run(hashes, a + end - off)
        if data is None:
            return None
        return memoryview(data)[a:] if a else data

    def read(self, off: int, size: int, objects: "ObjectStore") -> bytes | memoryview:
        end = min(off + size, self.attrs.size)
        if off >= end:
            return b""
        first, last = off // CHUNK, (end - 1) // CHUNK
        parts: list[bytes | memoryview] = []
        for i in range(first, last + 1):
            base = i * CHUNK
            a = max(off, base) - base
            b = min(end, base + CHUNK) - base
            piece = self._read_chunk(i, a, b, objects)
            if piece is None:
                parts.append(bytes(b - a))
                continue
            if len(piece) < b - a:  # stored chunk ends before EOF: the rest reads as zeros
                piece = bytes(piece) + bytes(b - a - len(piece))
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writes --------------------------------------------------------------------------
    def chunk_len(self, i: int, objects: "ObjectStore") -> int:
        """Length of chunk i as it is now (what it has allocated; 0 for a hole)."""
        data = self._entry(i)
        if data is not None:
            return len(data)
        return objects.chunk_size(*tree.lookup_leaf(self.attrs.root, i, objects.node))

    def write(self, off: int, data: bytes, objects: "ObjectStore",
              charge: Callable[[int], None]) -> int:
        """Apply a write to the dirty buffers; return how many new dirty chunks it created.

        A write makes chunks longer, never shorter: charge(growth) is called first with the
        allocated bytes it adds (0 for a rewrite) and may raise to refuse it.  `alloc`
        follows each chunk as it changes.  The caller accounts the growth of the file size.
        """
        new_chunks = 0
        pos, total = 0, len(data)
        mv = memoryview(data)
        whole_ok = type(data) is bytes  # immutable: a whole chunk can be kept as a view of it
        plan = []
        growth = 0
        while pos < total:
            i, co = divmod(off + pos, CHUNK)
            n = min(CHUNK - co, total - pos)
            cur = self.chunk_len(i, objects)
            if cur or not _zeros(data, pos, n):  # zeros written over a hole change nothing
                growth += max(0, co + n - cur)
                plan.append((i, co, n, cur, pos))
            pos += n
        charge(growth)
        for i, co, n, cur, pos in plan:
            if not self.unloggable:
                if self.unlogged is None:
                    self.unlogged = set()
                start = i * CHUNK + co
                self.unlogged.update(range(start // PAGE, (start + n + PAGE - 1) // PAGE))
                if len(self.unlogged) > UNLOGGED_MAX:
                    self.unlogged, self.unloggable = None, True
            buf = self.dirty.get(i)
            if whole_ok and co == 0 and n == CHUNK:
                # A whole chunk (a streaming writer's case): keep a view of the request's
                # bytes instead of copying them; a later partial write copies it first.
                if buf is None:
                    new_chunks += 1
                self.dirty[i] = mv[pos : pos + n]
                self.alloc += CHUNK - cur  # type: ignore[operator]
                continue
            if buf is None:
                new_chunks += 1
                if co == 0 and (n == CHUNK or (i * CHUNK + n >= self.attrs.size and cur <= n)):
                    buf = bytearray()  # whole chunk, or everything up to EOF, is overwritten
                elif cur and i not in self.flushing and (h := tree.lookup(self.attrs.root, i, objects.node)) \
                        not in (None, RESERVED):
                    buf = Sparse(h, cur)  # the stored chunk is read when needed, not here
                else:
                    base = self.chunk(i, objects) if cur else None
                    buf = bytearray(base) if base is not None else bytearray()
                self.dirty[i] = buf
            if type(buf) is Sparse:
                buf.put(co, mv[pos : pos + n])
                if buf.whole():
                    self.dirty[i] = buf.data
                self.alloc += len(buf) - cur  # type: ignore[operator]
                continue
            if type(buf) is not bytearray:
                buf = self.dirty[i] = bytearray(buf)
            if len(buf) < co:
                buf.extend(bytes(co - len(buf)))
            buf[co : co + n] = mv[pos : pos + n]
            self.alloc += len(buf) - cur  # type: ignore[operator]
        if off + total > self.attrs.size:
            self.attrs.size = off + total
        # No time update here: with the writeback cache the kernel owns mtime/ctime of
        # written files (it stamps them at write(2) time) and sends them in a SETATTR when
        # it writes the inode back; data may reach us later than that.
        return new_chunks

    def cut(self, cap: int, size: int) -> None:
        """Forget uncommitted data at and beyond `cap` (a refused write left a gap there:
        what follows a gap is no prefix) and shrink to `size` (>= cap: committed bytes
        beyond the gap stay until a truncate cuts them).  A flush in progress is cut when
        it commits."""
        n_chunks = (cap + CHUNK - 1) // CHUNK
        for i in [i for i in self.dirty if i >= n_chunks]:
            del self.dirty[i]
        rem = cap % CHUNK
        buf = self.dirty.get(cap // CHUNK) if rem else None
        if type(buf) is Sparse:
            if len(buf) > rem:
                buf.trim(rem)
        elif buf is not None and len(buf) > rem:
            self.dirty[cap // CHUNK] = bytearray(buf[:rem])
        if self.attrs.size > size:
            self.attrs.size = size

    @staticmethod
    def gap_in(off: int, end: int, root: Root | None, committed: int, objects: "ObjectStore") -> int | None:
        """The first offset in [off, end) that the committed file (root, size `committed`)
        does not hold - a hole, or beyond its size - or None: where a refused write leaves a
        gap.  Write buffers do not count: a chunk written out of order is zero-filled below
        what was written, and those zeros are no data."""
        p = off
        while p < end:
            i = p // CHUNK
            h = tree.lookup(root, i, objects.node) if p < committed else None
            held = min(committed, i * CHUNK + objects.content_size(h)) if h is not None else p
            if held <= p:
                return p
            p = held
        return None

    def truncate_buffers(self, size: int, objects: "ObjectStore") -> None:
        """Cut dirty buffers to `size` and make the chunk straddling it dirty, trimmed.

        Keeps the invariant that no stored chunk holds bytes beyond EOF, so growing the
        file later reads zeros there.
        """
        n_chunks = (size + CHUNK - 1) // CHUNK
        for i in [i for i in self.dirty if i >= n_chunks]:
            del self.dirty[i]
        rem = size % CHUNK
        if rem and size < self.attrs.size:
            i = size // CHUNK
            data = self.chunk(i, objects)
            if data is not None and len(data) > rem:
                self.dirty[i] = bytearray(data[:rem])
        self.attrs.size = size
