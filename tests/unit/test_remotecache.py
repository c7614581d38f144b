"""chunks.remotecache: a lazy mount's fetched chunks in cache packs, evicted by whole pack back to
their F records, with the accounting exact; a delta's base is kept (its pack repacked), a chunk
fetched again into another pack is left to that pack, and pack gc never repacks cache packs.
(The eviction on a real lazy mount: tests/test_fleet_cache.py.)"""
from __future__ import annotations

import os

from cowfs.chunks import codec, delta, remotecache, repack
from cowfs.chunks.families import CF_FETCHED, CF_OBJECTS
from cowfs.chunks.refs import RefTxn, scan_space
from cowfs.kv.base import Batch

from unit.helpers import Objects

CHUNK = codec.CHUNK


def _remote(st: Objects, n: int) -> list[tuple[bytes, bytes, bytes]]:
    """n chunks as a lazy build leaves them (F records, one file reference each): (content, id, F record)."""
    out = []
    txn = RefTxn()
    for i in range(n):
        data = os.urandom(CHUNK)
        h = codec.chunk_hash(data)
        f = codec.encode_remote(codec.RemoteLoc(0, b"R", CHUNK, i * (CHUNK + 1), CHUNK + 1, bytes(32)))
        txn.add_object(h, f, [])
        txn.incref(h)
        out.append((data, h, f))
    st.commit(Batch(), txn)
    return out


def _fetch(st: Objects, cache: remotecache.RemoteCache, chunks: list[tuple[bytes, bytes, bytes]]) -> int:
    """What a lazy read's fetch commits (core.lazy.LazyReads._store): one cache pack, the F
    records re-encoded as pointers into it, their `fetched` entries."""
    pointers = st.objects.pack([(h, codec.encode_chunk(d, 1)) for d, h, _f in chunks])
    pack = codec.packed_extent(pointers[0])[0]
    txn, batch = RefTxn(), Batch()
    txn.staged = [pack]
    for (_d, h, _f), p in zip(chunks, pointers):
        txn.recode[h] = p
    cache.record(batch, pack, 1, [(h, f) for _d, h, f in chunks])
    st.commit(batch, txn)
    cache.added(pack, st.objects.packs.size(pack), [h for _d, h, _f in chunks])
    return pack


def test_eviction_turns_a_cache_pack_back_into_f_records_keeps_delta_bases_and_counts_exactly():
    st = Objects()
    chunks = _remote(st, 6)
    cache = remotecache.RemoteCache(limit=1)
    first = _fetch(st, cache, chunks[:3])
    second = _fetch(st, cache, chunks[3:])
    assert st.objects.packs.size(first), "the commit of the fetch deleted its own cache pack"
    assert st.objects.space.remote_chunks == 0 and remotecache.cache_packs(st.kv) == {first, second}
    cache.touch(chunks[0][1])  # the first pack read again: the second is now the least recently used
    assert cache.victims() == [second], "the most recently used pack is never a victim"
    # chunks[4] becomes a delta's base (pinned): its pointer stays, the pack is only partly evicted.
    near = bytearray(chunks[4][0])
    near[:100] = bytes(100)
    hn = codec.chunk_hash(bytes(near))
    txn = RefTxn()
    txn.add_object(hn, codec.encode_chunk(bytes(near), 1), [])
    txn.incref(hn)
    st.commit(Batch(), txn)
    txn = RefTxn()
    txn.recode[hn] = codec.encode_delta(bytes(near), chunks[4][1], delta.compressor(chunks[4][0]), CHUNK + 1)
    st.commit(Batch(), txn)
    batch, txn = Batch(), RefTxn()
    flip = cache.flip(st.kv, second, batch, txn)
    st.commit(batch, txn)
    cache.dropped(second, flip)
    assert sorted(flip.evicted) == sorted([chunks[3][1], chunks[5][1]]) and flip.kept == 1
    for _d, h, f in (chunks[3], chunks[5]):
        assert st.kv.get(CF_OBJECTS, h) == f and st.kv.get(CF_FETCHED, h) is None
    assert codec.packed_extent(st.kv.get(CF_OBJECTS, chunks[4][1]))[0] == second
    assert st.objects.space.remote_chunks == 2 and st.objects.space == scan_space(st.kv)
    assert cache.packs_evicted == 1 and cache.chunks_evicted == 2 and cache.bytes_evicted == 2 * CHUNK
    # Fetched again, into a new pack: counted as a refetch; an eviction of a pack that listed
    # a chunk before leaves that chunk (and its new entry) alone.
    third = _fetch(st, cache, [chunks[3]])
    assert cache.refetches == 1
    stale = remotecache.RemoteCache(0)
    stale.added(second, 1, [chunks[3][1]])
    batch, txn = Batch(), RefTxn()
    assert stale.flip(st.kv, second, batch, txn).evicted == [] and not txn.recode
    assert remotecache.parse(st.kv.get(CF_FETCHED, chunks[3][1]))[0] == third
    # A restart finds the same cache (entries whose chunk left their pack are dropped).
    again = remotecache.RemoteCache(0)
    assert again.load(st.kv, st.objects.packs) == 0
    assert set(again.packs) == {first, third} and again.bytes == cache.bytes
    # Pack gc never repacks a cache pack, however dead.
    survey = repack.survey(st.kv, st.objects.packs.encoding_sizes(st.objects.packs.listing()))
    assert first in survey.cached and not any(first in g for g in survey.groups(below=1.0))
    st.close()
