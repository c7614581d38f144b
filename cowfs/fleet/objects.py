"""The remote's object formats.  Every object is immutable and named by a hash of its bytes,
so an upload can always be repeated and two hosts pushing the same content write the same
names (stored once for the whole fleet).

Layout under the remote's bucket and prefix:

    data/<pack id>     a pack: blob payloads back to back (each zstd-compressed, or raw when
                       compression does not pay), its chunks first, then its trees; pack id
                       = BLAKE3 of the pack's bytes
    index/<pack id>    the pack's index (uploaded after its pack): for each blob its hash,
                       type, encoding, offset, stored and raw length
    commit/<commit id> a commit (JSON): the root tree, the parent commit, where it came from,
                       and `packs`: every pack that holds a chunk or tree of its tree (one
                       pack per blob, so a pull or a lazy mount reads those indexes only, not
                       all of `index/`; commits pushed before it existed lack it: readers
                       then read every index), `warm` when the pushing store had learned
                       its cold start, `model` when it had learned a prefetch model; commit
                       id = BLAKE3 of its bytes
    warm/<warm id>     a cold start (JSON): the chunk ids the source store's mounts read first,
                       in that order (cowfs.cache.learned's model mapped through the tree), for
                       a lazy mount to fetch ahead; warm id = BLAKE3 of its bytes
    model/<model id>   the learned prefetch model as paths (cowfs.fleet.model); BLAKE3 named
    forwards/<id>      the forwards of the packs a gc repacked (JSON: pack -> the packs that
                       hold its live blobs now); the current one is named by the etcd key
                       gc/forwards (cowfs.fleet.repack); id = BLAKE3 of its bytes

Blobs are of two types.  A chunk ('c') is 64 KiB of file content at a fixed offset, hashed
exactly as cowfs hashes its own chunks (cowfs.chunks.codec: BLAKE3 of the bytes, CHUNK
bytes), so a chunk id here is the local store's id of the same content.  A tree ('t') is
one directory: its entries with their metadata, a file's entry listing its chunk ids (None
for a hole: all-zero chunks are never stored), a directory's entry naming its tree, so an
unchanged subtree keeps its id and is neither uploaded nor fetched again (git's and
restic's Merkle tree).  A tree's id is BLAKE3 of a domain prefix and its canonical JSON.
"""
from __future__ import annotations

import json
import struct
import threading
from typing import Any, NamedTuple

import blake3
import zstandard

from cowfs.chunks.codec import CHUNK, HASH_LEN, chunk_hash
from cowfs.fleet import FleetError

CHUNK_SIZE = CHUNK
TYPE_CHUNK = b"c"
TYPE_TREE = b"t"
ENC_RAW = b"R"
ENC_ZSTD = b"Z"
PACK_TARGET = 16 << 20      # a pack is sealed once its payloads reach this many bytes
_TREE_DOMAIN = b"cowfs-fleet-tree\x00"
_INDEX_MAGIC = b"cowfs-fleet-index-1\n"
_ENTRY = struct.Struct("<32sccQII")   # hash, type, encoding, offset, stored length, raw length
_ZSTD_LEVEL = 3
_tls = threading.local()      # a decompressor per thread: a new one costs ~8 us a blob, 15x the work of a tree's


class CorruptObject(FleetError):
    """An object of the remote does not decode, or does not hash to its name."""


def hexid(h: bytes) -> str:
    return h.hex()


def tree_hash(data: bytes) -> bytes:
    return blake3.blake3(_TREE_DOMAIN + data).digest()


def blob_hash(kind: bytes, raw: bytes) -> bytes:
    return chunk_hash(raw) if kind == TYPE_CHUNK else tree_hash(raw)


def encode_blob(raw: bytes) -> tuple[bytes, bytes]:
    """(encoding, stored bytes): zstd when it saves at least 1/16, else raw."""
    z = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    if len(z) < len(raw) - len(raw) // 16:
        return ENC_ZSTD, z
    return ENC_RAW, raw


def decode_blob(loc: "Loc", stored: bytes, h: bytes) -> bytes:
    """The raw bytes of a stored blob, checked against its hash (CorruptObject if not)."""
    what = "chunk" if loc.kind == TYPE_CHUNK else "tree"
    if len(stored) != loc.length:
        raise CorruptObject(f"{what} {h.hex()}: {len(stored)} bytes in pack {loc.pack}, "
                            f"expected {loc.length}")
    try:
        raw = (_decompressor().decompress(stored, max_output_size=max(loc.raw, 1))
               if loc.enc == ENC_ZSTD else stored)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"{what} {h.hex()} in pack {loc.pack}: {e}") from None
    if len(raw) != loc.raw or blob_hash(loc.kind, raw) != h:
        raise CorruptObject(f"{what} {h.hex()} in pack {loc.pack}: its content does not "
                            "hash to its id")
    return raw


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


class Loc(NamedTuple):
    """Where a blob is: pack id (hex), type, encoding, offset, stored and raw length.  A named
    tuple (made in half the time of a frozen dataclass): a lazy mount decodes one per entry of the
    indexes it reads (33,000 for issue 23's sandbox) before it is ready."""
    pack: str
    kind: bytes
    enc: bytes
    offset: int
    length: int
    raw: int


def encode_index(entries: list[tuple[bytes, Loc]]) -> bytes:
    return _INDEX_MAGIC + b"".join(_ENTRY.pack(h, loc.kind, loc.enc, loc.offset, loc.length, loc.raw)
                                   for h, loc in entries)


def decode_index(pack: str, data: bytes) -> dict[bytes, Loc]:
    if not data.startswith(_INDEX_MAGIC) or (len(data) - len(_INDEX_MAGIC)) % _ENTRY.size:
        raise CorruptObject(f"index/{pack}: not a pack index")
    out = {}
    for h, kind, enc, offset, length, raw in _ENTRY.iter_unpack(memoryview(data)[len(_INDEX_MAGIC):]):
        if kind not in (TYPE_CHUNK, TYPE_TREE) or enc not in (ENC_RAW, ENC_ZSTD):
            raise CorruptObject(f"index/{pack}: bad entry for {h.hex()}")
        out[h] = Loc(pack, kind, enc, offset, length, raw)
    return out


class PackBuilder:
    """Blobs collected into one pack (not thread-safe: the caller serializes adds).  Sealed,
    the pack holds its chunks first, in the order added, then its trees: a reader of the
    trees (a pull fetches them level by level before any chunk, a lazy mount before it is
    ready) reads them from one region of the pack, not from between the chunks."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, bytes, bytes, bytes, int]] = []
        self.trees: list[tuple[bytes, bytes, bytes, bytes, int]] = []
        self.size = 0

    @property
    def entries(self) -> list[tuple[bytes, bytes, bytes, bytes, int]]:
        return self.chunks + self.trees

    def add(self, h: bytes, kind: bytes, enc: bytes, stored: bytes, raw_len: int) -> None:
        """A blob encoded by encode_blob (outside the caller's lock: compression is the cost)."""
        (self.trees if kind == TYPE_TREE else self.chunks).append((h, kind, enc, stored, raw_len))
        self.size += len(stored)

    def seal(self) -> tuple[str, bytes, bytes, list[bytes]]:
        """(pack id, pack bytes, index bytes, the hashes it holds)."""
        blobs = self.entries
        data = b"".join(stored for _h, _k, _e, stored, _r in blobs)
        pack = blake3.blake3(data).hexdigest()
        locs, off = [], 0
        for h, k, e, stored, r in blobs:
            locs.append((h, Loc(pack, k, e, off, len(stored), r)))
            off += len(stored)
        return pack, data, encode_index(locs), [h for h, *_ in blobs]


# --- trees ------------------------------------------------------------------------------------

def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """One directory's entries (sorted by name) as canonical JSON."""
    return json.dumps({"v": 1, "entries": entries}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def decode_tree(h: bytes, raw: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(raw)
        entries = doc["entries"]
        if doc.get("v") != 1 or not isinstance(entries, list):
            raise ValueError("unknown version")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptObject(f"tree {h.hex()}: {e}") from None
    return entries


def entry_chunks(entry: dict[str, Any]) -> list[bytes | None]:
    return [None if c is None else bytes.fromhex(c) for c in entry.get("chunks", [])]


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


# --- commits ----------------------------------------------------------------------------------

def encode_commit(doc: dict[str, Any]) -> tuple[str, bytes]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(data).hexdigest(), data


def decode_commit(cid: str, data: bytes) -> dict[str, Any]:
    if blake3.blake3(data).hexdigest() != cid:
        raise CorruptObject(f"commit/{cid}: its content does not hash to its name")
    try:
        doc = json.loads(data)
        bytes.fromhex(doc["tree"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptObject(f"commit/{cid}: {e}") from None
    if len(bytes.fromhex(doc["tree"])) != HASH_LEN:
        raise CorruptObject(f"commit/{cid}: bad tree id")
    for kind in ("warm", "model"):
        if doc.get(kind) is not None and not _is_hexid(doc[kind]):
            raise CorruptObject(f"commit/{cid}: bad {kind} id")
    packs = doc.get("packs")
    if packs is not None and not (isinstance(packs, list) and all(_is_hexid(p) for p in packs)):
        raise CorruptObject(f"commit/{cid}: bad pack list")
    return doc


def _is_hexid(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 2 * HASH_LEN and all(c in "0123456789abcdef" for c in v)


# --- forwards of repacked packs ---------------------------------------------------------------

def encode_forwards(moved: dict[str, list[str]]) -> tuple[str, bytes]:
    data = json.dumps({"v": 1, "moved": {p: sorted(qs) for p, qs in sorted(moved.items())}},
                      separators=(",", ":")).encode()
    return blake3.blake3(data).hexdigest(), data


def decode_forwards(fid: str, data: bytes) -> dict[str, list[str]]:
    if blake3.blake3(data).hexdigest() != fid:
        raise CorruptObject(f"forwards/{fid}: its content does not hash to its name")
    try:
        doc = json.loads(data)
        moved = doc["moved"]
        if doc.get("v") != 1 or not all(_is_hexid(p) and qs and all(_is_hexid(q) for q in qs)
                                        for p, qs in moved.items()):
            raise ValueError("not a map of pack ids")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptObject(f"forwards/{fid}: {e}") from None
    return moved


# --- cold starts ------------------------------------------------------------------------------

def encode_warm(chunks: list[bytes], files: int) -> tuple[str, bytes]:
    """(warm id, bytes) of a cold start: chunk ids in the order to fetch, from `files` files."""
    data = json.dumps({"v": 1, "files": files, "chunks": [h.hex() for h in chunks]},
                      separators=(",", ":")).encode()
    return blake3.blake3(data).hexdigest(), data


def decode_warm(wid: str, data: bytes) -> list[bytes]:
    """The chunk ids of the cold start warm/wid, checked against its name."""
    if blake3.blake3(data).hexdigest() != wid:
        raise CorruptObject(f"warm/{wid}: its content does not hash to its name")
    try:
        doc = json.loads(data)
        chunks = doc["chunks"]
        if doc.get("v") != 1 or not all(_is_hexid(c) for c in chunks):
            raise ValueError("not a list of chunk ids")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptObject(f"warm/{wid}: {e}") from None
    return [bytes.fromhex(c) for c in chunks]
