"""File data: reads (with the handle's readahead and the learned model told), writes into
dirty chunk buffers (quota and disk space checked first), SEEK_DATA / SEEK_HOLE, and
fallocate (reservations, punched holes, zeroed ranges).

Writes take no lock: they only touch `node.dirty`; a flush commits them later
(cowfs.core.flush).  Read handlers never await, so a read sees one consistent state.
Allocated bytes: docs/architecture.md, "Allocated bytes" and "Reserved chunks (fallocate)".
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, NoReturn

from cowfs.cache.prefetch import READAHEAD
from cowfs.cache.readahead import Readahead
from cowfs.chunks import codec, tree
from cowfs.chunks.tree import CHUNK, RESERVED, TreeWriter
from cowfs.core.attributes import MAX_FILE_SIZE
from cowfs.core.flush import Encoded
from cowfs.core.node import Node
from cowfs.errors import FSError

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)

SEEK_DATA, SEEK_HOLE = 3, 4  # Linux lseek whence values
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


class Data:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs
        self._reserved: bytes | None = None  # the encoding of the reserved (all-zero) chunk

    def read(self, node: Node, off: int, size: int, stream: Readahead | None = None) -> bytes | memoryview:
        """Serve a read; tell the learned model and the handle's readahead about it."""
        fs = self.fs
        objects = fs.store.objects
        try:
            data = node.read_run(off, size, objects)
            run = data is not None
            if data is None:
                data = node.read(off, size, objects)
            learner = fs.prefetch.learner
            if len(data) and learner is not None and node.view.kind == "branch":
                learner.read(node.view.name, node.ino, off // CHUNK, (off + len(data) - 1) // CHUNK)
            # A run read from a pack reads the pack ahead itself (ObjectStore.read_run).
            if stream is not None and not run:
                want = stream.observe(off, size, node.attrs.size)
                if want:
                    hashes = [h for i in want if (h := node.stored_hash(i, objects)) is not None]
                    objects.read_ahead(hashes)  # packed ones: the kernel starts reading them now
                    fs.prefetch.want(hashes, READAHEAD)
        except codec.CorruptObject as exc:
            log.error("read of inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc
        return data

    async def write(self, node: Node, off: int, data: bytes) -> int:
        fs = self.fs
        if not node.view.writable:
            raise FSError(errno.EROFS)
        end = off + len(data)
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG)
        try:
            fs.fences.check(node.view)
        except FSError as exc:  # a lost hold: refused as on a full disk, the kernel's view brought
            if node.cap is None and node.cached_writers > 0:    # back to ours at the last writer's close
                node.cap, node.cap_errno = node.attrs.size, errno.EROFS
            await self._refuse(node, off, end, errno.EROFS, str(exc))
        full = fs.full
        if node.cap is not None and end > node.cap:
            await self._refuse(node, off, end, node.cap_errno, "beyond what an earlier refused write left")
        if fs.store.space_low(len(data)) and not await full.room_after_flush(len(data)):
            await self._refuse(node, off, end, errno.ENOSPC, "the store's disk is (nearly) full")
        if fs.store.objects.remote_left():
            # A lazy mount: the chunks this write covers in part are fetched first.  If the
            # remote fails, the write is refused as on a full disk: one the page cache
            # acknowledged is lost, the file cut to a prefix, the kernel's view brought back.
            try:
                await fs.lazy.ensure(node, off, len(data), edges_only=True)
            except FSError as exc:
                await self._refuse(node, off, end, exc.errno, "a chunk it writes in part is still on the "
                                   "remote, which failed")
        view = node.view
        usage = fs.usage
        before = usage.allocated(node)

        def charge(growth: int) -> None:
            view.check_quota(more_bytes=growth)

        size = node.attrs.size
        refused: FSError | None = None
        try:
            new = node.write(off, data, fs.store.objects, charge)
        except codec.CorruptObject as exc:
            log.error("write of inode %d at %d: %s", node.ino, off, exc)
            raise FSError(errno.EIO) from exc
        except FSError as exc:  # the quota (charge), before any buffer changed
            refused = exc
        finally:
            usage.buffered(node, before)
        if refused is not None:
            await self._refuse(node, off, end, refused.errno, str(refused))
        usage.grew(node, size)
        if fs.flusher.written(node, new, node.attrs.size > size):
            await fs.flusher.flush_at_limit()
        return len(data)

    async def _refuse(self, node: Node, off: int, end: int, err: int, why: str) -> NoReturn:
        """DiskFull.refuse, once what fsync logged of node is committed: the cut it may make
        is judged against the committed file, which must hold every fsync'd byte
        (cowfs.core.smallwrites; if this flush fails, refuse keeps what was logged)."""
        if node.logged is not None:
            try:
                await self.fs.flusher.flush()
            except FSError as exc:
                log.error("flush before a refused write failed: %s", exc)
        self.fs.full.refuse(node, off, end, err, why)

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
            chunks = node.data_chunks(off // CHUNK, self.fs.store.objects)
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
        fs = self.fs
        objects = fs.store.objects
        async with fs.txn.mutate(node.view) as m:
            if node.deleted:
                raise FSError(errno.ENOENT)
            fs.usage.allocated(node)
            writer = TreeWriter(objects.node, m.txn)
            root, size = node.attrs.root, node.attrs.size
            encoded: Encoded = {}
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
            encoded.update(fs.flusher.encode(node.dirty))
            node.dirty.clear()
            m.touch(node)  # as file_modified() does in the kernel
            fs.flusher.flush_node_into(m, node, encoded, size)
            node.attrs.size = size
            m.charge = True

    def _reserved_value(self) -> bytes:
        if self._reserved is None:
            self._reserved = codec.encode_chunk(bytes(CHUNK), self.fs.level)
        return self._reserved
