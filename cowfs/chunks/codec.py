"""How one object is hashed and laid out on disk.

An object value is one kind byte followed by its payload:
  b"R" raw chunk bytes (compression did not pay),
  b"Z" a zstd frame of the chunk,
  b"N" a tree node: concatenated 32-byte child hashes (incompressible, stored raw),
  b"D" a delta chunk: base hash(32) + raw size(u32) + size of its plain encoding(u32) + a
       zstd frame that decodes only with the base chunk's content as dictionary
       (cowfs.chunks.delta).  A base is always a whole (R or Z) chunk: one hop at most.
  b"P" a pointer to a whole (R or Z) chunk in a pack (cowfs.chunks.packs): its kind(1) +
       pack id(u64) + offset(u64) + length(u32) + raw size(u32); the pack holds the payload
       without the kind byte, so consecutive raw chunks are one contiguous run of content.
       Accounting counts the encoding's length (payload + kind byte), as if it were inline.
       (Stores of format 5 and older had a u32 pack number: chunks.upgrade converts them.)
  b"F" a chunk not fetched yet from the remote a lazy mount was made from (cowfs.fleet.lazy):
       source(u8, the store's lazy.json lists the remotes) + the remote's encoding(1, b"R" or
       b"Z") + raw size(u32) + offset(u64) + stored length(u32) + pack id(32): where a ranged
       GET finds it.  A read fetches it, checks it against its hash and re-encodes it as an
       R or Z object (`RefTxn.recode`).  It stores no content here: accounting counts its raw
       size as unique bytes, and 0 bytes of encoding.
Chunks are addressed by BLAKE3 of their content; nodes by BLAKE3 of a domain-separated
encoding so a node can never collide with a chunk of the same bytes.
"""
from __future__ import annotations

import struct
import threading
from typing import Callable, NamedTuple

import blake3
import zstandard

from cowfs.chunks import delta

HASH_LEN = 32
CHUNK = 64 * 1024  # files are cut into chunks of this size at fixed offsets
ZERO_HASH = bytes(HASH_LEN)

KIND_RAW = 0x52  # "R"
KIND_ZSTD = 0x5A  # "Z"
KIND_NODE = 0x4E  # "N"
KIND_DELTA = 0x44  # "D"
KIND_PACKED = 0x50  # "P"
KIND_REMOTE = 0x46  # "F"
WHOLE = (KIND_RAW, KIND_ZSTD, KIND_PACKED)
_PACKED = struct.Struct("<BBQQII")
PACKED_LEN = _PACKED.size  # bytes of a P record
_REMOTE = struct.Struct("<BBcIQI32s")
_DELTA_HEAD = 1 + HASH_LEN + 8

_NODE_DOMAIN = b"cowfs-tree-node\x00"
_tls = threading.local()


class CorruptObject(Exception):
    """Stored bytes that do not decode, or decode to content that does not match the hash."""


class RemoteChunk(CorruptObject):
    """A chunk of a lazy mount that is not fetched yet could not be fetched (no fetcher in
    this process, the remote unreachable, or its bytes damaged): the read fails with EIO."""


class RemoteLoc(NamedTuple):
    """Where an F object's content is on the remote (see the module's docstring)."""
    source: int
    enc: bytes
    raw: int
    offset: int
    length: int
    pack: bytes


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def node_hash(node: bytes) -> bytes:
    return blake3.blake3(_NODE_DOMAIN + node).digest()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # One compressor per thread and level: they are not thread-safe, and reuse saves setup time.
    key = f"c{level}"
    c = getattr(_tls, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        setattr(_tls, key, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


def _incompressible(data: bytes | bytearray) -> bool:
    """Two 2 KiB samples (start and middle) that zstd level 1 cannot shrink by 1/16: random
    or already compressed data, stored raw without compressing all of it (~0.6 ms per MiB)."""
    n = len(data)
    if n < 16 * 1024:
        return False
    mid = n // 2
    sample = bytes(data[:2048]) + bytes(data[mid : mid + 2048])
    return len(_compressor(1).compress(sample)) > len(sample) - len(sample) // 16


def encode_chunk(data: bytes | bytearray, level: int) -> bytes:
    """Compress when it saves at least 1/32 of the size; else store raw."""
    if _incompressible(data):
        return bytes((KIND_RAW,)) + bytes(data)
    frame = _compressor(level).compress(data)
    if len(frame) + (len(data) >> 5) < len(data):
        return bytes((KIND_ZSTD,)) + frame
    return bytes((KIND_RAW,)) + bytes(data)


def encode_delta(data: bytes, base_hash: bytes, comp: zstandard.ZstdCompressor, plain_len: int) -> bytes:
    """A D object of data against a base (comp: `delta.compressor(base)`); plain_len is the
    size of data's whole encoding."""
    head = base_hash + len(data).to_bytes(4, "little") + plain_len.to_bytes(4, "little")
    return bytes((KIND_DELTA,)) + head + comp.compress(data)


def delta_base(value: bytes) -> bytes | None:
    """The base hash a D object depends on (None for other kinds)."""
    return value[1 : 1 + HASH_LEN] if value[0] == KIND_DELTA else None


def encode_packed(kind: int, pack: int, off: int, length: int, raw_size: int) -> bytes:
    return _PACKED.pack(KIND_PACKED, kind, pack, off, length, raw_size)


def packed_extent(value: bytes) -> tuple[int, int, int] | None:
    """(pack, offset, length) of a P object's payload (None for other kinds)."""
    if value[0] != KIND_PACKED:
        return None
    _p, _k, pack, off, length, _r = _PACKED.unpack(value)
    return pack, off, length


def encode_remote(loc: RemoteLoc) -> bytes:
    return _REMOTE.pack(KIND_REMOTE, loc.source, loc.enc, loc.raw, loc.offset, loc.length, loc.pack)


def _fields(layout: struct.Struct, value: bytes, what: str) -> tuple:
    """value unpacked by layout; CorruptObject if it is not that long (a truncated record)."""
    try:
        return layout.unpack(value)
    except struct.error:
        raise CorruptObject(f"{what} record of {len(value)} bytes does not decode") from None


def remote_loc(value: bytes) -> RemoteLoc | None:
    """Where an F object's content is on the remote (None for other kinds)."""
    if value[0] != KIND_REMOTE:
        return None
    _k, source, enc, raw, off, length, pack = _fields(_REMOTE, value, "a remote chunk's")
    return RemoteLoc(source, enc, raw, off, length, pack)


def packed_kind(value: bytes) -> int:
    return value[1]


def stored_len(value: bytes) -> int:
    """Bytes the object's encoding takes (a P object's payload lives in its pack)."""
    if value[0] == KIND_REMOTE:
        return 0
    return _PACKED.unpack(value)[4] + 1 if value[0] == KIND_PACKED else len(value)


def chunk_sizes(value: bytes) -> tuple[int, int]:
    """(raw content size, size of the whole, non-delta encoding) of a chunk object, without decoding."""
    kind = value[0]
    if kind == KIND_PACKED:
        _p, _k, _pack, _off, length, raw = _fields(_PACKED, value, "a packed chunk's")
        return raw, length + 1
    if kind == KIND_REMOTE:
        return _fields(_REMOTE, value, "a remote chunk's")[3], 0
    if kind == KIND_RAW:
        return len(value) - 1, len(value)
    if kind == KIND_ZSTD:
        size = zstandard.frame_content_size(value[1:])
        if size < 0:
            raise CorruptObject("zstd frame without content size")
        return size, len(value)
    if kind == KIND_DELTA:
        h = value[1 + HASH_LEN : _DELTA_HEAD]
        return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")
    raise CorruptObject(f"object kind {kind:#x} is not a chunk")


def decode_payload(kind: int, payload: bytes, expect_hash: bytes | None = None) -> bytes:
    """Content of a whole chunk given its kind and payload (an inline value without its kind
    byte, or a packed chunk's bytes)."""
    if kind == KIND_RAW:
        data = payload
    elif kind == KIND_ZSTD:
        try:
            data = _decompressor().decompress(payload)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"zstd frame does not decode: {exc}") from exc
    else:
        raise CorruptObject(f"object kind {kind:#x} is not a whole chunk")
    if expect_hash is not None and chunk_hash(data) != expect_hash:
        raise CorruptObject("chunk content does not match its hash")
    return data


def decode_chunk(value: bytes, expect_hash: bytes | None = None,
                 load_base: Callable[[bytes], bytes] | None = None) -> bytes:
    """Content of a chunk object; a D object needs load_base(hash) -> the base's content."""
    kind = value[0]
    if kind == KIND_REMOTE:
        raise RemoteChunk("the chunk is not fetched from the remote yet")
    if kind in (KIND_RAW, KIND_ZSTD):
        return decode_payload(kind, value[1:], expect_hash)
    if kind == KIND_DELTA and load_base is not None:
        size = chunk_sizes(value)[0]
        try:
            data = delta.decompress(value[_DELTA_HEAD:], load_base(value[1 : 1 + HASH_LEN]), size)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"delta frame does not decode: {exc}") from exc
    else:
        raise CorruptObject(f"object kind {kind:#x} is not a chunk")
    if expect_hash is not None and chunk_hash(data) != expect_hash:
        raise CorruptObject("chunk content does not match its hash")
    return data


def encode_node(node: bytes) -> bytes:
    return bytes((KIND_NODE,)) + node


def decode_node(value: bytes) -> bytes:
    if not value or value[0] != KIND_NODE:
        raise CorruptObject("object is not a tree node")
    return value[1:]


def node_children(node: bytes) -> list[bytes]:
    """Non-hole child hashes, with multiplicity (a node may list one chunk twice)."""
    return [h for i in range(0, len(node), HASH_LEN) if (h := node[i : i + HASH_LEN]) != ZERO_HASH]


def node_diff(new: bytes, old: bytes, limit: int) -> tuple[list[bytes], list[bytes]] | None:
    """(children gained, children lost) going from node body old to new, with multiplicity,
    or None if more than `limit` slots differ.  Bisects with slice comparisons (memcmp), so
    one changed slot of 512 costs ~4 us where listing the children costs ~30 us."""
    plus: list[bytes] = []
    minus: list[bytes] = []
    n = min(len(new), len(old))
    changed = 0
    stack = [(0, n)] if n else []
    while stack:
        lo, hi = stack.pop()
        if new[lo:hi] == old[lo:hi]:
            continue
        if hi - lo > HASH_LEN:
            mid = lo + (hi - lo) // HASH_LEN // 2 * HASH_LEN
            stack.append((mid, hi))
            stack.append((lo, mid))
            continue
        changed += 1
        if changed > limit:
            return None
        if new[lo:hi] != ZERO_HASH:
            plus.append(new[lo:hi])
        if old[lo:hi] != ZERO_HASH:
            minus.append(old[lo:hi])
    if (len(new) - n) // HASH_LEN + (len(old) - n) // HASH_LEN + changed > limit:
        return None
    plus += node_children(new[n:])
    minus += node_children(old[n:])
    return plus, minus


def slot_count(node: bytes, h: bytes) -> int:
    """How many slots of node body `node` hold h (a C-level search, no list of children)."""
    count = 0
    i = node.find(h)
    while i >= 0:
        if i % HASH_LEN == 0:
            count += 1
        i = node.find(h, i + 1)
    return count
