"""Packs: immutable objects in a BlobStore that hold the encodings of streamed chunks.

Why not RocksDB blob files: a value put through RocksDB is written twice (WAL, then blob
file), `db.write` holds the GIL for the whole copy (60-100 ms per 64 MiB batch, during which
no FUSE request is served), and blob files are ordered by key, i.e. by hash, so a cold
sequential read becomes random reads.  Each large flush writes its new chunk encodings,
back to back in write order, as ONE new pack (`Packs.write`, from the flush thread), and
the objects family stores only a small pointer record (codec.KIND_PACKED: pack id, offset,
length).  Small flushes (small files, 4 KiB fsync'd rewrites) stay inline.

A pack is written once, whole (BlobStore.put: on the local disk a temporary file, fsync,
link, directory fsync), before the commit that stores its pointers, so a pointer never
reaches the WAL ahead of its bytes; it is never appended to, rewritten or punched, which
is what lets the same code run on object storage.  Freeing a packed chunk only drops its
pointer: its bytes stay, dead, until garbage collection repacks (chunks.repack): packs
whose live bytes fall below a threshold have their live encodings copied into new packs,
and packs nothing points at are deleted.

Names: "<id as 16 hex digits>.pack", the id a random 64-bit number drawn for each pack (a
put that meets an existing name draws again), never reused while anything may point at it:
so a pointer can only ever name the pack its bytes were written to (see chunks.repack for
why a name derived from the content would not do).
"""
from __future__ import annotations

import errno
import re
import secrets
from typing import Sequence

from cowfs import faults
from cowfs.blob.base import BlobConflict, BlobNotFound, BlobStore
from cowfs.chunks import codec

SUFFIX = ".pack"
_NAME = re.compile(r"^([0-9a-f]{16})\.pack$")


class MissingPack(codec.CorruptObject):
    """A pointer's pack, or the range it names, is not in the blob store (deleted by a repack
    after the pointer was read, or damage)."""


def pack_name(pack: int) -> str:
    return f"{pack:016x}{SUFFIX}"


def pack_id(name: str) -> int | None:
    """The id a blob name stands for, or None if it is not a pack's name."""
    m = _NAME.match(name)
    return int(m.group(1), 16) if m else None


class Packs:
    """The packs of one store, in its BlobStore.  Thread-safe (the blob store is): flushes
    write from their encoding thread, reads come from the event loop and worker threads."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        # Optional capabilities of a local blob store (cowfs.blob.local): the page cache can
        # read ahead for a streaming reader, and the bytes on disk are the allocated blocks.
        self._read_ahead = getattr(blobs, "read_ahead", None)
        self._disk_usage = getattr(blobs, "disk_usage", None)

    def write(self, values: Sequence[bytes | memoryview]) -> tuple[int, list[tuple[int, int]]]:
        """Store values back to back as one new pack, durably; return its id and each
        value's (offset, length) in it."""
        faults.point("pack_put")
        while True:
            pack = secrets.randbits(64)
            try:
                self.blobs.put_parts(pack_name(pack), values)
                break
            except BlobConflict:  # the id is taken: draw another
                continue
        faults.point("pack_written")
        out, pos = [], 0
        for v in values:
            out.append((pos, len(v)))
            pos += len(v)
        return pack, out

    def read(self, pack: int, off: int, length: int) -> bytes:
        try:
            data = self.blobs.get(pack_name(pack), off, length)
        except BlobNotFound:
            raise MissingPack(f"pack {pack_name(pack)} is missing") from None
        if len(data) != length:
            raise MissingPack(f"pack {pack_name(pack)} ends before {off}+{length}")
        return data

    def read_ahead(self, pack: int, off: int, length: int) -> None:
        """Have the bytes read ahead, where the blob store can (local disk); else nothing."""
        if self._read_ahead is not None:
            try:
                self._read_ahead(pack_name(pack), off, length)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ESPIPE):
                    raise

    def delete(self, pack: int) -> None:
        self.blobs.delete(pack_name(pack))

    def size(self, pack: int) -> int | None:
        try:
            return self.blobs.size(pack_name(pack))
        except BlobNotFound:
            return None

    def listing(self) -> dict[int, int]:
        """Every pack: id -> size in bytes (other objects of the blob store are not packs)."""
        out = {}
        for entry in self.blobs.list():
            pack = pack_id(entry.name)
            if pack is not None:
                out[pack] = entry.size
        return out

    def disk_usage(self) -> int:
        """Bytes the packs take where they are stored (a local store's allocated blocks)."""
        if self._disk_usage is not None:
            return self._disk_usage()
        return sum(self.listing().values())

    def close(self) -> None:
        self.blobs.close()


def merge_extents(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sorted, with adjacent extents of one pack joined."""
    out: list[tuple[int, int, int]] = []
    for pack, off, length in sorted(extents):
        if out and out[-1][0] == pack and out[-1][1] + out[-1][2] == off:
            out[-1] = (pack, out[-1][1], out[-1][2] + length)
        else:
            out.append((pack, off, length))
    return out
