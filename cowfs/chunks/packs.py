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

Every pack ends with its index (restic's layout): one entry per encoding in it (hash, kind,
offset, length, raw size), then a footer (entry count, the BLAKE3 of the entries, a magic).
It is written in the same put as the encodings, so it costs no extra object or fsync, and
it makes a pack self-describing: a process that does not hold the store's database (another
branch's daemon, a remote's reader: docs/design-many-processes.md) can learn what a pack
holds from the pack alone.  Entries are facts about the pack's bytes, not about liveness: a
repack's copy lists encodings whose pointer moved elsewhere meanwhile.  An entry is a hint
to whoever did not write it: before a pointer is made from one, the chunk it names is
checked against its hash.  Packs written before indexes existed (or by an older cowfs) have
no footer: `index` says None for them, and they get one when a repack copies them.
"""
from __future__ import annotations

import errno
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Sequence

from blake3 import blake3

from cowfs import faults
from cowfs.blob.base import BlobConflict, BlobNotFound, BlobStore
from cowfs.chunks import codec

SUFFIX = ".pack"
_NAME = re.compile(r"^([0-9a-f]{16})\.pack$")
ENTRY = struct.Struct(">32sBQII")  # hash, kind (R/Z/N/D), offset, length, raw size
FOOTER = struct.Struct(">I32s8s")  # entries, BLAKE3 of the entries, magic
MAGIC = b"cowfsIX1"


class MissingPack(codec.CorruptObject):
    """A pointer's pack, or the range it names, is not in the blob store (deleted by a repack
    after the pointer was read, or damage)."""


class BadIndex(codec.CorruptObject):
    """A pack's footer is there but its index does not check out (damage)."""


@dataclass(frozen=True)
class IndexEntry:
    hash: bytes
    kind: int
    offset: int
    length: int
    raw_size: int


def encode_index(entries: Sequence[IndexEntry]) -> bytes:
    """The index and footer that end a pack holding these encodings."""
    body = b"".join(ENTRY.pack(e.hash, e.kind, e.offset, e.length, e.raw_size) for e in entries)
    return body + FOOTER.pack(len(entries), blake3(body).digest(), MAGIC)


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
        self._pread_kept = getattr(blobs, "pread_kept", None)  # small reads: descriptors kept open
        self._disk_usage = getattr(blobs, "disk_usage", None)

    def write(self, values: Sequence[bytes | memoryview],
              keys: Sequence[tuple[bytes, int, int]]) -> tuple[int, list[tuple[int, int]]]:
        """Store values back to back as one new pack, durably, followed by their index
        (keys: each value's hash, kind and raw size); return its id and each value's
        (offset, length) in it."""
        faults.point("pack_put")
        out, pos = [], 0
        for v in values:
            out.append((pos, len(v)))
            pos += len(v)
        trailer = encode_index([IndexEntry(h, kind, off, length, raw)
                                for (h, kind, raw), (off, length) in zip(keys, out, strict=True)])
        while True:
            pack = secrets.randbits(64)
            try:
                self.blobs.put_parts(pack_name(pack), [*values, trailer])
                break
            except BlobConflict:  # the id is taken: draw another
                continue
        faults.point("pack_written")
        return pack, out

    def index(self, pack: int, size: int | None = None) -> list[IndexEntry] | None:
        """The entries of the pack's index (None: the pack predates indexes).  MissingPack if
        the pack is not there, BadIndex if its footer is there and its index is damaged."""
        name = pack_name(pack)
        try:
            size = self.blobs.size(name) if size is None else size
            foot = self.blobs.get(name, max(0, size - FOOTER.size), FOOTER.size) if size >= FOOTER.size else b""
            if len(foot) != FOOTER.size or foot[-len(MAGIC):] != MAGIC:
                return None
            count, digest, _magic = FOOTER.unpack(foot)
            start = size - FOOTER.size - count * ENTRY.size
            if start < 0:
                raise BadIndex(f"pack {name}: its index claims {count} entries, more than the pack holds")
            body = self.blobs.get(name, start, count * ENTRY.size) if count else b""
        except BlobNotFound:
            raise MissingPack(f"pack {name} is missing") from None
        if len(body) != count * ENTRY.size or blake3(body).digest() != digest:
            raise BadIndex(f"pack {name}: its index does not match its checksum")
        entries = [IndexEntry(*ENTRY.unpack_from(body, i * ENTRY.size)) for i in range(count)]
        if any(e.offset + e.length > start for e in entries):
            raise BadIndex(f"pack {name}: its index names bytes beyond the pack's encodings")
        return entries

    def encoding_sizes(self, listed: dict[int, int]) -> dict[int, int]:
        """Bytes of encodings per listed pack (`listing`'s sizes without the index at each
        end: the index is neither live nor dead data).  A pack gone or damaged meanwhile
        keeps its listed size."""
        out = {}
        for pack, size in listed.items():
            try:
                entries = self.index(pack, size)
            except codec.CorruptObject:
                entries = None
            out[pack] = size - (0 if entries is None else len(entries) * ENTRY.size + FOOTER.size)
        return out

    def read(self, pack: int, off: int, length: int, small: bool = False) -> bytes:
        """small: a read of a few KiB on the event loop (a cold random read), served through
        a descriptor kept open where the blob store keeps them (cowfs.blob.local)."""
        try:
            if small and self._pread_kept is not None:
                data = self._pread_kept(pack_name(pack), off, length)
            else:
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
