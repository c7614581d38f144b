"""ObjectStore and the pack layer on MemoryKV + MemoryBlobStore (no FUSE, no disk): packed
chunks read back chunk by chunk and as runs, frees only drop pointers, a commit that stores
nothing from a pack (or fails) deletes it, and repacking (chunks.repack) moves the live
encodings of mostly-dead packs, leaves alone pointers that changed meanwhile, and deletes
what nothing points at; every pack ends with an index of its encodings.
"""
from __future__ import annotations

import os

import pytest

from cowfs.cache import ChunkCache
from cowfs.chunks import codec, repack
from cowfs.chunks.families import CF_OBJECTS, CF_REFS
from cowfs.chunks.objects import ObjectStore
from cowfs.chunks.packs import ENTRY, FOOTER, BadIndex, IndexEntry, MissingPack, pack_id, pack_name
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.tree import FANOUT, Root, TreeWriter, lookup_leaf
from cowfs.kv.base import Batch

from unit.helpers import Objects

CHUNK = codec.CHUNK


def raw_chunks(n: int, seed: int = 0) -> list[tuple[bytes, bytes, bytes]]:
    """n random (incompressible: stored raw) full chunks: (content, hash, encoding)."""
    out = []
    for i in range(n):
        data = os.urandom(CHUNK)
        out.append((data, codec.chunk_hash(data), codec.encode_chunk(data, 1)))
    assert all(e[0] == codec.KIND_RAW for _d, _h, e in out)
    return out


def flush(st: Objects, chunks: list[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """What a large flush does: one pack for the encodings, then a commit of the pointers
    (each chunk referenced once, as a file root would)."""
    pointers = st.objects.pack([(h, e) for _d, h, e in chunks])
    txn = RefTxn()
    txn.staged = sorted({codec.packed_extent(p)[0] for p in pointers})
    for (_d, h, _e), p in zip(chunks, pointers):
        txn.add_object(h, p, [])
        txn.incref(h)
    st.commit(Batch(), txn)
    return pointers


def free(st: Objects, hashes: list[bytes]) -> None:
    txn = RefTxn()
    for h in hashes:
        txn.decref(h)
    st.commit(Batch(), txn)


def packs_of(st: Objects) -> dict[int, int]:
    """Bytes of encodings per pack (without the index at its end)."""
    return st.objects.packs.encoding_sizes(st.objects.packs.listing())


def test_a_flush_is_one_pack_read_back_by_chunk_and_by_run():
    st = Objects()
    chunks = raw_chunks(6)
    pointers = flush(st, chunks)
    assert len(packs_of(st)) == 1
    assert all(pack_id(n) is not None for n in (e.name for e in st.blobs.list()))
    offs = [codec.packed_extent(p)[1] for p in pointers]
    assert offs == [i * CHUNK for i in range(6)]  # back to back, in write order
    for data, h, _e in chunks:
        assert st.objects.load(h) == data
    hashes = [h for _d, h, _e in chunks]
    whole = b"".join(d for d, _h, _e in chunks)
    assert st.objects.read_run(hashes, len(whole)) == whole
    assert st.objects.read_run(hashes[1:4], 2 * CHUNK + 100) == whole[CHUNK:3 * CHUNK + 100]
    # A second flush is a second pack: a run across both is two ranged reads.
    more = raw_chunks(3)
    flush(st, more)
    assert len(packs_of(st)) == 2
    both = hashes + [h for _d, h, _e in more]
    assert st.objects.read_run(both, 9 * CHUNK) == whole + b"".join(d for d, _h, _e in more)
    st.close()


def test_run_reads_decline_what_is_not_a_raw_packed_run():
    st = Objects()
    chunks = raw_chunks(2)
    flush(st, chunks)
    text = b"compressible line\n" * 4000
    h = codec.chunk_hash(text)
    enc = codec.encode_chunk(text, 1)
    assert enc[0] == codec.KIND_ZSTD
    txn = RefTxn()
    txn.add_object(h, enc, [])  # inline
    txn.incref(h)
    st.commit(Batch(), txn)
    assert st.objects.read_run([chunks[0][1], h], CHUNK + 10) is None
    assert st.objects.read_run([chunks[0][1], chunks[1][1]], 2 * CHUNK + 1) is None  # more than there is
    st.close()


def test_a_small_cold_read_of_a_raw_packed_chunk_reads_only_its_range():
    """A read of at most 16 KiB of a raw packed chunk not in the cache reads its range
    from the pack and nothing else (no whole-chunk read, hash or cache insert); larger
    reads, and compressed chunks, are decoded whole and cached as before."""
    st = Objects()
    chunks = raw_chunks(2)
    flush(st, chunks)
    (data, h, _e), (data2, h2, _e2) = chunks
    gets = []
    real_get = st.blobs.get

    def get(name, offset=0, length=None):
        gets.append(length)
        return real_get(name, offset, length)

    st.blobs.get = get
    assert bytes(st.objects.read(h, 4096, 8192)) == data[4096:8192]
    assert bytes(st.objects.read(h, CHUNK - 100, CHUNK + 4000)) == data[CHUNK - 100:]  # past its end
    assert gets == [4096, 100] and not st.objects.cache.cached(h)
    assert bytes(st.objects.read(h2, 0, 32768)) == data2[:32768]
    assert gets[-1] == CHUNK and st.objects.cache.cached(h2)
    text = b"compressible line\n" * 4000
    ht = codec.chunk_hash(text)
    txn = RefTxn()
    txn.add_object(ht, codec.encode_chunk(text, 1), [])  # inline, zstd
    txn.incref(ht)
    st.commit(Batch(), txn)
    assert bytes(st.objects.read(ht, 100, 200)) == text[100:200] and st.objects.cache.cached(ht)
    st.close()


def test_small_cold_reads_follow_a_repack_and_decode_packed_compressed_and_delta_chunks():
    """The ranged read of a raw packed chunk reads where its pointer points now (after a
    repack moved it and deleted its old pack); a packed compressed chunk, and a chunk
    re-encoded as a delta, never take that path (their pack bytes are not the content):
    they decode whole, correctly."""
    from cowfs.chunks import delta

    st = Objects()
    chunks = raw_chunks(4)
    flush(st, chunks)
    free(st, [h for _d, h, _e in chunks[:3]])
    data, h, _e = chunks[3]
    old = codec.packed_extent(st.kv.get(CF_OBJECTS, h))[0]
    assert run_repack(st, below=1.0)["moved"] == 1
    assert codec.packed_extent(st.kv.get(CF_OBJECTS, h))[0] != old and st.objects.packs.size(old) is None
    assert bytes(st.objects.read(h, 8192, 12288)) == data[8192:12288] and not st.objects.cache.cached(h)
    # Re-encoded as a delta against a near copy (what the dedup worker commits).
    base = bytearray(data)
    base[100:300] = bytes(200)
    base = bytes(base)
    hb = codec.chunk_hash(base)
    txn = RefTxn()
    txn.add_object(hb, codec.encode_chunk(base, 1), [])
    txn.incref(hb)
    st.commit(Batch(), txn)
    txn = RefTxn()
    txn.recode[h] = codec.encode_delta(data, hb, delta.compressor(base), CHUNK + 1)
    st.commit(Batch(), txn)
    assert st.kv.get(CF_OBJECTS, h)[0] == codec.KIND_DELTA
    assert bytes(st.objects.read(h, 0, 4096)) == data[:4096] and st.objects.cache.cached(h)
    # A compressible chunk in a pack: zstd, decoded whole.
    text = b"compressible line\n" * 3640
    ht = codec.chunk_hash(text)
    flush(st, [(text, ht, codec.encode_chunk(text, 1))])
    raw = st.kv.get(CF_OBJECTS, ht)
    assert raw[0] == codec.KIND_PACKED and codec.packed_kind(raw) == codec.KIND_ZSTD
    assert bytes(st.objects.read(ht, 5000, 9000)) == text[5000:9000] and st.objects.cache.cached(ht)
    st.close()


def test_freeing_drops_the_pointer_and_leaves_the_pack():
    st = Objects()
    chunks = raw_chunks(4)
    flush(st, chunks)
    before = packs_of(st)
    free(st, [chunks[0][1], chunks[1][1]])
    assert packs_of(st) == before, "no hole punching, no rewrite: the pack stays as it is"
    assert st.kv.get(CF_OBJECTS, chunks[0][1]) is None
    assert st.objects.load(chunks[2][1]) == chunks[2][0]
    assert st.objects.space.chunks == 2 and st.objects.space.chunk_bytes == 2 * (CHUNK + 1)
    st.close()


def test_a_pack_nothing_is_stored_from_is_deleted():
    st = Objects()
    chunks = raw_chunks(2)
    flush(st, chunks)
    # The same chunks packed again (as by a flush of a file deleted meanwhile, whose commit
    # brings no reference): the commit stores nothing from the new pack, which goes.
    pointers = st.objects.pack([(h, e) for _d, h, e in chunks])
    txn = RefTxn()
    txn.staged = [codec.packed_extent(pointers[0])[0]]
    for (_d, h, _e), p in zip(chunks, pointers):
        txn.add_object(h, p, [])
        txn.incref(h)  # they exist: a dedup hit, the stored pointers stay
    assert len(packs_of(st)) == 2
    st.commit(Batch(), txn)
    assert len(packs_of(st)) == 1
    # A commit that fails deletes what it staged.
    pointers = st.objects.pack([(h, e) for _d, h, e in raw_chunks(1)])
    txn = RefTxn()
    txn.staged = [codec.packed_extent(pointers[0])[0]]
    txn.decref(chunks[0][1], 5)  # below zero: refused
    with pytest.raises(codec.CorruptObject):
        st.commit(Batch(), txn)
    assert len(packs_of(st)) == 1
    st.close()


def test_a_reader_of_a_moved_pointer_reads_again():
    st = Objects()
    chunks = raw_chunks(2)
    p = flush(st, chunks)
    h = chunks[0][1]
    # The pointer moves (a repack) and the old pack goes, between a thread's read of the
    # pointer and its read of the pack: load reads the record again.
    new, exts = st.objects.packs.write([chunks[0][2][1:]], [(h, codec.KIND_RAW, CHUNK)])
    moved = codec.encode_packed(codec.KIND_RAW, new, exts[0][0], exts[0][1], CHUNK)
    stale = st.kv.get(CF_OBJECTS, h)
    b = Batch()
    b.put(CF_OBJECTS, h, moved)
    st.kv.write(b)
    st.objects.packs.delete(codec.packed_extent(p[0])[0])
    with pytest.raises(MissingPack):
        st.objects.resolve(stale)
    assert st.objects.load(h) == chunks[0][0]
    st.close()


def run_repack(st: Objects, below: float = repack.REPACK_BELOW, target: int = repack.REPACK_TARGET,
               between=None) -> dict:
    """A gc pass as background.gc.sweep_packs drives it (without the locks: one thread)."""
    s = repack.survey(st.kv, packs_of(st))
    for p in s.garbage():
        st.objects.packs.delete(p)
    moved = 0
    groups = s.groups(below, target)
    for group in groups:
        c = repack.copy(st.kv, st.objects.packs, group)
        if between is not None:
            between(c)
        b = Batch()
        n = repack.moves(st.kv, c, b)
        if n:
            st.commit(b, RefTxn())
        for p in c.old + ([c.new] if c.new is not None and not n else []):
            st.objects.packs.delete(p)
        moved += n
    return {"garbage": len(s.garbage()), "groups": len(groups), "moved": moved}


def test_repack_moves_live_encodings_and_gives_the_space_back():
    st = Objects()
    a, b, c = raw_chunks(8), raw_chunks(8), raw_chunks(8)
    for part in (a, b, c):
        flush(st, part)
    free(st, [h for _d, h, _e in a[:6]])  # a's pack: 25% live -> repacked
    free(st, [h for _d, h, _e in b[:2]])  # b's pack: 75% live -> stays
    free(st, [h for _d, h, _e in c])  # c's pack: nothing live -> deleted
    space = st.objects.space
    got = run_repack(st)
    assert got == {"garbage": 1, "groups": 1, "moved": 2}, got
    sizes = sorted(packs_of(st).values())
    assert sizes == [2 * CHUNK, 8 * CHUNK], sizes  # a's live pair copied, b's pack as it was
    assert st.objects.space == space, "moving bytes changes no figure"
    for data, h, _e in a[6:] + b[2:]:
        assert st.objects.load(h) == data
    # The moved pair is still one run.
    assert st.objects.read_run([a[6][1], a[7][1]], 2 * CHUNK) == a[6][0] + a[7][0]
    # below=1: every pack with a dead byte is repacked (b's).
    assert run_repack(st, below=1.0)["moved"] == 6
    assert sorted(packs_of(st).values()) == [2 * CHUNK, 6 * CHUNK]
    st.close()


def test_repack_leaves_pointers_that_changed_meanwhile():
    st = Objects()
    a = raw_chunks(6)
    flush(st, a)
    free(st, [h for _d, h, _e in a[:4]])
    keep, gone = a[4], a[5]

    def meanwhile(c: repack.Copy) -> None:
        # Between the copy and the commit: one chunk freed, the other re-encoded inline.
        free(st, [gone[1]])
        txn = RefTxn()
        txn.recode[keep[1]] = keep[2]  # its R encoding, inline now
        st.commit(Batch(), txn)

    got = run_repack(st, between=meanwhile)
    assert got["moved"] == 0
    assert packs_of(st) == {}, "the new pack got no pointer and went with the old one"
    assert st.kv.get(CF_OBJECTS, keep[1]) == keep[2]
    assert st.objects.load(keep[1]) == keep[0]
    st.close()


def test_groups_fit_the_target_and_take_the_emptiest_first():
    s = repack.Survey({1: 100, 2: 100, 3: 100, 4: 100}, {1: 10, 2: 40, 3: 45, 4: 90})
    assert s.garbage() == []
    assert s.groups(0.5, target=50) == [[1, 2], [3]]
    assert s.groups(0.05, target=50) == []
    assert s.dead_bytes() == 90 + 60 + 55 + 10
    assert repack.Survey({7: 10}, {}).garbage() == [7]


def test_pack_names():
    assert pack_name(1) == "0000000000000001.pack"
    assert pack_id(pack_name(0xDEADBEEF12345678)) == 0xDEADBEEF12345678
    assert pack_id("00000001.pack") is None  # the old layout's names are not packs
    assert pack_id("other/object") is None


# -- the index at the end of every pack -----------------------------------------------------------
def index_of_pointers(pointers: list[tuple[bytes, bytes]]) -> list[IndexEntry]:
    """What a pack's index must say: (hash, pointer) -> the pointed encoding's entry."""
    out = []
    for h, p in pointers:
        _pack, off, length = codec.packed_extent(p)
        out.append(IndexEntry(h, codec.packed_kind(p), off, length, codec.chunk_sizes(p)[0]))
    return out


def test_a_pack_ends_with_the_index_of_its_encodings():
    st = Objects()
    chunks = raw_chunks(5)
    pointers = flush(st, chunks)
    pack = codec.packed_extent(pointers[0])[0]
    entries = st.objects.packs.index(pack)
    assert entries == index_of_pointers([(h, p) for (_d, h, _e), p in zip(chunks, pointers)])
    assert entries[-1].offset + entries[-1].length == 5 * CHUNK
    listed = st.objects.packs.listing()
    assert listed[pack] == 5 * CHUNK + 5 * ENTRY.size + FOOTER.size  # in the same object
    assert packs_of(st) == {pack: 5 * CHUNK}
    st.close()


def test_a_repacked_pack_has_the_index_of_its_copies():
    st = Objects()
    a = raw_chunks(8)
    flush(st, a)
    free(st, [h for _d, h, _e in a[:6]])
    assert run_repack(st)["moved"] == 2
    (new,) = st.objects.packs.listing()
    assert st.objects.packs.index(new) == index_of_pointers([(h, st.kv.get(CF_OBJECTS, h)) for _d, h, _e in a[6:]])
    st.close()


def test_a_pack_without_an_index_and_a_damaged_index():
    st = Objects()
    ps = st.objects.packs
    ps.blobs.put(pack_name(7), os.urandom(3 * CHUNK))  # written before indexes existed
    assert ps.index(7) is None
    assert ps.encoding_sizes(ps.listing()) == {7: 3 * CHUNK}
    ps.blobs.put(pack_name(8), b"")
    assert ps.index(8) is None
    chunks = raw_chunks(3)
    pointers = flush(st, chunks)
    pack = codec.packed_extent(pointers[0])[0]
    good = ps.blobs.get(pack_name(pack))
    entry_at = len(good) - FOOTER.size - 3 * ENTRY.size
    for bad in (good[:entry_at + 40] + bytes([good[entry_at + 40] ^ 1]) + good[entry_at + 41:],  # an offset
                good[:-FOOTER.size] + FOOTER.pack(10**6, bytes(32), b"cowfsIX1")):  # too many entries
        ps.blobs.delete(pack_name(pack))
        ps.blobs.put(pack_name(pack), bad)
        with pytest.raises(BadIndex):
            ps.index(pack)
        assert ps.encoding_sizes({pack: len(bad)}) == {pack: len(bad)}
    ps.blobs.delete(pack_name(pack))
    with pytest.raises(MissingPack):
        ps.index(pack)
    st.close()


def test_a_truncated_remote_or_packed_record_is_a_corrupt_object():
    """chunk_sizes reads an F or P record's sizes without decoding it: a truncated one is
    codec.CorruptObject (what fsck and the readers catch), not a struct.error."""
    remote = codec.encode_remote(codec.RemoteLoc(0, b"Z", 1000, 5, 300, bytes(32)))
    packed = codec.encode_packed(codec.KIND_ZSTD, 7, 0, 300, 1000)
    assert codec.chunk_sizes(remote) == (1000, 0) and codec.chunk_sizes(packed) == (1000, 301)
    for record in (remote, packed):
        for cut in (record[:-1], record[:2]):
            with pytest.raises(codec.CorruptObject, match="does not decode"):
                codec.chunk_sizes(cut)
    with pytest.raises(codec.CorruptObject, match="does not decode"):
        codec.remote_loc(remote[:-1])


def test_a_chunk_of_a_leaf_of_whole_chunks_is_sized_without_its_refs_record(monkeypatch):
    """ObjectStore.chunk_size: a chunk whose tree leaf holds only CHUNK-long chunks (its
    content size says so) is CHUNK long without a read of the chunk's refs record; in a leaf
    holding a shorter chunk every size is read, and right.  A depth-2 file: leaf 0 is whole,
    leaf 1 ends with a 100-byte chunk; a depth-0 file (no leaf) reads its record."""
    st = Objects()
    try:
        whole = [os.urandom(CHUNK) for _ in range(3)]
        short = b"s" * 100
        contents = [whole[i % 3] for i in range(FANOUT)] + [whole[0], whole[1], short]
        txn = RefTxn()
        for data in whole + [short]:
            txn.add_object(codec.chunk_hash(data), codec.encode_chunk(data, 1), [])
        root = TreeWriter(st.objects.node, txn).update(
            None, {i: codec.chunk_hash(d) for i, d in enumerate(contents)}, len(contents))
        txn.incref(root.hash)
        st.commit(Batch(), txn)
        assert root.depth == 2
        single = Root(0, codec.chunk_hash(short))
        cold = ObjectStore(st.kv, ChunkCache(1 << 20, 1 << 20), st.packs)  # nothing remembered
        chunk_hashes = {codec.chunk_hash(d) for d in whole + [short]}
        reads: list[bytes] = []
        get = st.kv.get
        monkeypatch.setattr(st.kv, "get", lambda cf, key: (reads.append(key) if cf == CF_REFS and key in chunk_hashes
                                                           else None) or get(cf, key))
        assert [cold.chunk_size(*lookup_leaf(root, i, cold.node)) for i in range(FANOUT)] == [CHUNK] * FANOUT
        assert reads == []
        assert [cold.chunk_size(*lookup_leaf(root, FANOUT + i, cold.node)) for i in range(4)] == [CHUNK, CHUNK, 100, 0]
        assert reads == [codec.chunk_hash(whole[0]), codec.chunk_hash(whole[1]), codec.chunk_hash(short)]
        assert cold.chunk_size(*lookup_leaf(single, 0, cold.node)) == 100
        assert lookup_leaf(single, 1, cold.node) == (None, None) and cold.chunk_size(None, None) == 0
    finally:
        st.close()
