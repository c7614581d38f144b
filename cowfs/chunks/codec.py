"""How one object is hashed and laid out on disk.

An object value is one kind byte followed by its payload:
  b"R" raw chunk bytes (compression did not pay),
  b"Z" a zstd frame of the chunk,
  b"N" a tree node: concatenated 32-byte child hashes (incompressible, stored raw).
Chunks are addressed by BLAKE3 of their content; nodes by BLAKE3 of a domain-separated
encoding so a node can never collide with a chunk of the same bytes.
"""
from __future__ import annotations

import threading

import blake3
import zstandard

HASH_LEN = 32
ZERO_HASH = bytes(HASH_LEN)

KIND_RAW = 0x52  # "R"
KIND_ZSTD = 0x5A  # "Z"
KIND_NODE = 0x4E  # "N"

_NODE_DOMAIN = b"cowfs-tree-node\x00"
_tls = threading.local()


class CorruptObject(Exception):
    """Stored bytes that do not decode, or decode to content that does not match the hash."""


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


def encode_chunk(data: bytes | bytearray, level: int) -> bytes:
    """Compress when it saves at least 1/32 of the size; else store raw."""
    frame = _compressor(level).compress(data)
    if len(frame) + (len(data) >> 5) < len(data):
        return bytes((KIND_ZSTD,)) + frame
    return bytes((KIND_RAW,)) + bytes(data)


def decode_chunk(value: bytes, expect_hash: bytes | None = None) -> bytes:
    kind = value[0]
    if kind == KIND_RAW:
        data = value[1:]
    elif kind == KIND_ZSTD:
        try:
            data = _decompressor().decompress(value[1:])
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"zstd frame does not decode: {exc}") from exc
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
    out = []
    for i in range(0, len(node), HASH_LEN):
        h = node[i : i + HASH_LEN]
        if h != ZERO_HASH:
            out.append(h)
    return out
