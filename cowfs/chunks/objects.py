"""The content-addressed object store (chunks and tree nodes): reads through the chunk
cache and the packs, and the commit-side bookkeeping around reference counting
(chunks.refs does the counting itself).

Objects live in the objects family: small ones inline, the chunks of large flushes in packs
(chunks.packs) behind a pointer.  Whatever a commit changes is staged by `apply` and made
current by `settle` once the batch is written, or forgotten by `abort` if it is not.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from cowfs.cache import ChunkCache
from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS, CF_REFS, CF_SPACE, SPACE_KEY
from cowfs.chunks.packs import MissingPack, Packs, merge_extents
from cowfs.chunks.refs import MissingObject, Ref, RefApply, RefTxn, parse_ref, tree_sizes
from cowfs.chunks.space import Space
from cowfs.kv.base import KV, Batch


class Fetcher(Protocol):
    """Fetches the chunks of a lazy mount that are still on the remote (F objects, see
    chunks.codec): cowfs.fleet.lazy.RemoteFetcher, set by the daemon of a store that has them."""

    def fetch_one(self, h: bytes, raw: bytes) -> bytes:
        """The content of F object h (its record raw), checked against h, blocking until it
        is fetched; codec.RemoteChunk if it cannot be."""


RUN_READ_AHEAD = 16 << 20  # bytes of a pack read ahead after a run read (ObjectStore.read_run)
RUN_SEGMENTS = 4  # a run read serves chunks from at most this many contiguous pack ranges
PART_MAX = 16 << 10  # reads of a cold raw packed chunk up to this size read only their range
SIZES_MAX = 1 << 15  # remembered content sizes (~5 MiB), see ObjectStore.remember_size
WHOLE_LEAVES_MAX = 1 << 12  # remembered verdicts of ObjectStore.chunk_size (~0.5 MiB)


def _raw_extent(raw: bytes | None) -> tuple[int, int, int] | None:
    """(pack, offset, length) of a raw chunk's bytes in its pack, what a read may take
    straight from the pack; None for a missing object or any other kind."""
    if raw is None or raw[0] != codec.KIND_PACKED or codec.packed_kind(raw) != codec.KIND_RAW:
        return None
    return codec.packed_extent(raw)


class ObjectStore:
    """Reads objects through the chunk cache (L1 decoded, L2 lz4 pages); writes via RefTxn.

    Two KVs (docs/design-many-processes.md, "Step 6"): `kv`, the view that loads read
    through (a fork's home and its frozen ancestors' databases, an `OverlayKV`), and `home`,
    the one database whose objects, counts, queue and accounting this store keeps and
    writes (`stored`, `ref`, `exists` and every count read of `apply`).  A store of one
    database passes only `kv` (home is kv).  A hash with no object record at home that a
    commit does not create is *foreign*: the home counts it like any other, without
    expanding what is below it (chunks.refs.RefApply).  `below`: the lineage's other
    databases (the view's members below the home), whose refs records give a foreign
    object's size without walking its tree."""

    def __init__(self, kv: KV, cache: ChunkCache, packs: Packs, home: KV | None = None,
                 below: Sequence[KV] = ()) -> None:
        self.kv = kv
        self.home = kv if home is None else home
        self.below = below
        self.split = self.home is not kv  # a fork's home: foreign hashes may be counted
        self.cache = cache
        self.packs = packs
        raw = self.home.get(CF_SPACE, SPACE_KEY)
        # None: a store from before the accounting (the caller runs chunks.upgrade.rebuild).
        self.space: Space | None = Space.unpack(raw) if raw is not None else None
        self._staged: Space | None = None
        self._drop: list[int] = []  # packs to delete once the batch is written (nothing points there)
        self._sizes: dict[bytes, int] = {}
        self._whole_leaves: dict[bytes, bool] = {}  # tree node -> every chunk under it is CHUNK long
        # Set by the daemon of a store with chunks still on a remote (a lazy mount): without
        # it, reading one fails (codec.RemoteChunk), as in fsck and the offline commands.
        self.fetcher: Fetcher | None = None

    # -- reads ---------------------------------------------------------------------------
    def resolve(self, raw: bytes) -> bytes:
        """The encoding an object value stands for (a P pointer's payload comes from its pack)."""
        ext = codec.packed_extent(raw)
        if ext is None:
            return raw
        return bytes((codec.packed_kind(raw),)) + self.packs.read(*ext)

    def read_run(self, hashes: list[bytes], need: int) -> bytes | None:
        """The content of consecutive chunks read straight from their packs, when they are
        raw packed chunks lying in at most RUN_SEGMENTS contiguous ranges (a file streamed
        in: one range per flush that wrote it): at least `need` bytes, every chunk but the
        last whole, one ranged read per range.  None when they are not (the caller reads
        chunk by chunk).

        Streaming reads take this path without the per-chunk decode, hash check and cache
        insert (fsck verifies every chunk; the kernel's page cache and read-ahead on the pack
        do the caching).  On the event loop only: no commit can run between the pointer
        lookups and the reads, and a pack is deleted only after the commit that moved every
        pointer away from it."""
        segments: list[list[int]] = []  # [pack, offset, length]
        pos = 0
        for n, h in enumerate(hashes, 1):
            ext = _raw_extent(self.kv.get(CF_OBJECTS, h))
            if ext is None:
                return None
            pack, off, length = ext
            last = segments[-1] if segments else None
            if last is not None and last[0] == pack and last[1] + last[2] == off:
                last[2] += length
            elif len(segments) == RUN_SEGMENTS:
                return None
            else:
                segments.append([pack, off, length])
            pos += length
            if length != codec.CHUNK and n < len(hashes):
                return None
        if not segments or pos < need:
            return None
        parts = []
        for pack, off, length in segments:
            take = min(length, need)
            parts.append(self.packs.read(pack, off, take))
            need -= take
            if not need:
                break
        # Chunks streamed in together lie together: have the next requests' bytes read ahead.
        pack, off, length = segments[-1]
        self.packs.read_ahead(pack, off + length, RUN_READ_AHEAD)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def remote_records(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, record) of every chunk still on a lazy mount's remote (F): one scan of the
        object records, for a lazy mount's pack map (cowfs.core.lazy)."""
        for h, raw in self.kv.scan(CF_OBJECTS, b""):
            if raw[0] == codec.KIND_REMOTE:
                yield h, raw

    def remote_left(self) -> bool:
        """Whether a read must look for chunks still on a lazy mount's remote: a fetcher is
        set and the accounting counts F objects.  Once every one is fetched or freed (the count
        is exact, and only a lazy build makes F objects), reads skip the look-ups."""
        return self.fetcher is not None and self.space is not None and self.space.remote_chunks > 0

    def remote_record(self, h: bytes) -> bytes | None:
        """Object h's record if it is a chunk still on a lazy mount's remote (F), else None."""
        raw = self.kv.get(CF_OBJECTS, h)
        return raw if raw is not None and raw[0] == codec.KIND_REMOTE else None

    def stored(self, h: bytes) -> bytes | None:
        """Object h's encoding (pointers resolved) if the home stores it, else None: dedup's
        "do we have h" never answers with a chunk of another database, which may be freed
        (docs/design-many-processes.md, "Dedup, exact, and who does it")."""
        raw = self.home.get(CF_OBJECTS, h)
        return None if raw is None else self.resolve(raw)

    def load(self, h: bytes, raw: bytes | None = None, fetch: bool = True) -> bytes:
        """Load and decode chunk h from the store, bypassing the cache (raw: its object
        record, if the caller has just read it).  Thread-safe: the readahead and prefetch
        workers call it from threads, with fetch False: a chunk still on a lazy mount's
        remote is then codec.RemoteChunk (cowfs.core.lazy fetches ahead of reads itself)."""
        if raw is None:
            raw = self.kv.get(CF_OBJECTS, h)
        if raw is None:
            raise MissingObject(f"chunk {h.hex()} is missing")
        if not fetch and raw[0] == codec.KIND_REMOTE:
            raise codec.RemoteChunk(f"chunk {h.hex()} is still on the remote")
        try:
            return self._decode(raw, h)
        except (codec.CorruptObject, OSError):
            # A thread can read a pointer just before a commit moves the chunk (a repack, a
            # re-encoding) and its old pack is deleted: read the record again before calling
            # it damaged.
            again = self.kv.get(CF_OBJECTS, h)
            if again is None or again == raw:
                raise
            return self._decode(again, h)

    def _decode(self, raw: bytes, h: bytes) -> bytes:
        if raw[0] == codec.KIND_REMOTE:
            if self.fetcher is None:
                raise codec.RemoteChunk(f"chunk {h.hex()} is on the remote of a lazy mount, and this process "
                                        "does not fetch")
            return self.fetcher.fetch_one(h, raw)
        ext = codec.packed_extent(raw)
        if ext is None:
            return codec.decode_chunk(raw, h, self.peek_chunk)
        return codec.decode_payload(codec.packed_kind(raw), self.packs.read(*ext), h)

    def read_ahead(self, hashes: list[bytes]) -> None:
        """Have the pack ranges of these chunks read ahead, where the blob store can (packs
        on the local disk are read without kernel read-around, see blob.local)."""
        extents = []
        for h in hashes:
            raw = self.kv.get(CF_OBJECTS, h)
            if raw is not None and raw[0] == codec.KIND_PACKED:
                extents.append(codec.packed_extent(raw))
        for pack, off, length in merge_extents(extents):  # type: ignore[arg-type]
            self.packs.read_ahead(pack, off, length)

    def pack(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """Write whole encodings (R/Z values, without their kind byte) as one new pack,
        durably; return their P pointers.  Runs in the flush thread; the caller puts the
        pack's id in txn.staged."""
        pack, exts = self.packs.write([memoryview(v)[1:] for _h, v in items],
                                      [(h, v[0], codec.chunk_sizes(v)[0]) for h, v in items])
        return [codec.encode_packed(v[0], pack, off, length, codec.chunk_sizes(v)[0])
                for (_h, v), (off, length) in zip(items, exts)]

    def discard_staged(self, txn: RefTxn) -> None:
        """The commit of txn did not happen (or stores nothing): its packs hold nothing
        anything points at."""
        for pack in txn.staged:
            self.packs.delete(pack)
        txn.staged = []

    def peek_chunk(self, h: bytes) -> bytes:
        """Chunk h from L1 if there, without touching its order, else from the store, never
        inserted (thread-safe): a delta's base (always stored whole: one hop), a flush's merge of
        a sparse buffer (core.node.Sparse)."""
        data = self.cache.l1.peek(h)
        return data if data is not None else self.load(h)

    def _loaded(self, h: bytes, raw: bytes | None = None) -> bytes:
        data = self.load(h, raw)
        self.cache.put(h, data)
        return data

    def chunk(self, h: bytes) -> bytes:
        data = self.cache.get(h)
        return data if data is not None else self._loaded(h)

    def read(self, h: bytes, a: int, b: int) -> bytes | memoryview:
        """Bytes [a, b) of chunk h for a file read (fewer if the chunk ends before b).

        A read of at most PART_MAX bytes of a raw chunk in a pack that is not in the cache
        (a cold random read) reads only its range from the pack, not the whole chunk, its
        hash check and a cache insert (~4x the time): as for run reads (`read_run`), the
        hash is not checked on this path (fsck verifies every chunk), and the kernel's page
        cache keeps what was read.  Other kinds are decoded from the record read for that
        check.  On the event loop only: no commit moves the pointer between the lookup and
        the read."""
        got = self.cache.read(h, a, b)
        if got is not None:
            return got
        if b - a > PART_MAX:
            return memoryview(self._loaded(h))[a:b]
        raw = self.kv.get(CF_OBJECTS, h)
        ext = _raw_extent(raw)
        if ext is None:
            return memoryview(self._loaded(h, raw))[a:b]
        pack, off, length = ext
        b = min(b, length)
        return self.packs.read(pack, off + a, b - a, small=True) if a < b else b""

    def load_node(self, h: bytes) -> bytes:
        """Load, decode and verify tree node h, bypassing the cache (thread-safe)."""
        raw = self.kv.get(CF_OBJECTS, h)
        if raw is None:
            raise MissingObject(f"tree node {h.hex()} is missing")
        data = codec.decode_node(raw)
        if codec.node_hash(data) != h:
            raise codec.CorruptObject(f"tree node {h.hex()} does not match its hash")
        return data

    def peek_node(self, h: bytes) -> bytes:
        """node() for worker threads: uses L1 without touching its order, never inserts."""
        data = self.cache.peek_node(h)
        return data if data is not None else self.load_node(h)

    def node(self, h: bytes) -> bytes:
        data = self.cache.node(h)
        if data is None:
            data = self.load_node(h)
            self.cache.put_node(h, data)
        return data

    def ref(self, h: bytes) -> Ref:
        return parse_ref(self.home.get(CF_REFS, h))

    def exists(self, h: bytes) -> bool:
        return self.home.get(CF_REFS, h) is not None

    def foreign_size(self, h: bytes) -> int:
        """Content bytes under foreign object h (no record at home; see the class), remembered:
        from the refs record of the database below that counts it (an ancestor layer's record
        references it), else summed from the objects through the view (a walk of every chunk
        record under it: 5-16 us each, 0.09-0.27 s for the 16,384 of a 1 GiB file); MissingObject if the view has
        no h either, or if the home has its record (then it is no foreign object but one the
        home lost count of)."""
        n = self._sizes.get(h)
        if n is None:
            if self.home.get(CF_OBJECTS, h) is not None:
                raise MissingObject(f"reference to unknown object {h.hex()}")
            for kv in self.below:
                r = parse_ref(kv.get(CF_REFS, h))
                if r.count and r.size >= 0:
                    n = r.size
                    break
            else:
                if self.kv.get(CF_OBJECTS, h) is None:
                    raise MissingObject(f"reference to unknown object {h.hex()}")
                n = tree_sizes(self.kv, [h])[h]
            self.remember_size(h, n)
        return n

    # -- commits -------------------------------------------------------------------------
    def apply(self, txn: RefTxn, batch: Batch) -> tuple[int, int]:
        """Fold txn into batch (chunks.refs.RefApply); return (objects created, objects
        freed).  The new accounting is staged until `settle`; a staged pack that no stored
        object points into is deleted once the batch is written."""
        run = RefApply(self, txn, batch)
        counts = run.run()
        if txn.staged:
            kept = run.kept_packs()
            self._drop.extend(p for p in txn.staged if p not in kept)
        self._staged = run.space
        return counts

    def settle(self) -> None:
        """The batch of the last apply is written: its accounting is now the store's, and
        the packs it left unreferenced can go."""
        if self._staged is not None:
            self.space, self._staged = self._staged, None
        if self._drop:
            drop, self._drop = self._drop, []
            for pack in drop:
                self.packs.delete(pack)

    def abort(self, txn: RefTxn | None) -> None:
        """The batch of the last apply was not written: forget what it staged."""
        self._staged = None
        self._drop = []
        if txn is not None:
            self.discard_staged(txn)

    def content_size(self, h: bytes | None, txn: RefTxn | None = None) -> int:
        """Content bytes under object h (a chunk's length, a node's sum over its slots): the
        bytes a file whose tree root is h has allocated.  txn: one being committed, whose new
        roots are not in the refs family yet."""
        if h is None:
            return 0
        if txn is not None:
            n = txn.root_sizes.get(h)
            if n is not None:
                return n
        n = self._sizes.get(h)
        if n is None:
            r = self.ref(h)
            if self.split and not r.count:  # a file of an ancestor layer the home does not count
                try:
                    return self.foreign_size(h)
                except MissingObject:
                    return 0  # as for an unknown object in a store of one database
            n = max(r.size, 0)
            self.remember_size(h, n)
        return n

    def chunk_size(self, h: bytes | None, leaf: bytes | None) -> int:
        """Content bytes of chunk h (0 for a hole) whose slot is in tree node `leaf` (None: a
        depth-0 tree): CHUNK without a refs read when the leaf's content size is CHUNK times
        the chunks it holds (no chunk is longer, so none is shorter), else content_size(h).
        A write into a cold chunk of a big file needs its length (the allocation it adds)
        and would otherwise read the refs record of every chunk it touches, ~5-20 µs each
        (docs/benchmarks.md, issue 24).  A node's content never changes for its hash, so
        the verdict is kept per leaf (FIFO-bounded)."""
        if h is None:
            return 0
        n = self._sizes.get(h)
        if n is not None:
            return n
        if leaf is not None:
            whole = self._whole_leaves.get(leaf)
            if whole is None:
                chunks = len(codec.node_children(self.node(leaf)))
                whole = chunks > 0 and self.content_size(leaf) == chunks * codec.CHUNK
                if len(self._whole_leaves) >= WHOLE_LEAVES_MAX:
                    del self._whole_leaves[next(iter(self._whole_leaves))]
                self._whole_leaves[leaf] = whole
            if whole:
                return codec.CHUNK
        return self.content_size(h)

    def known_size(self, h: bytes) -> int | None:
        """h's content size if remembered (see remember_size)."""
        return self._sizes.get(h)

    def remember_size(self, h: bytes, size: int) -> None:
        """Content sizes never change for a hash: keep recent ones so a new node's size is a
        sum of cached figures, not hundreds of refs reads (FIFO-bounded)."""
        if size < 0:
            return
        sizes = self._sizes
        if len(sizes) >= SIZES_MAX:
            del sizes[next(iter(sizes))]
        sizes[h] = size

    def forget_size(self, h: bytes) -> None:
        self._sizes.pop(h, None)


__all__ = ["ObjectStore", "MissingObject", "MissingPack", "RefTxn"]
