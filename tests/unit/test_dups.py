"""The store keeper's duplicate elimination across databases (cowfs.chunks.dups), without a
daemon: databases and reference store in memory, packs in a memory blob store."""
from __future__ import annotations

import os

from cowfs.blob.memory import MemoryBlobStore
from cowfs.chunks import codec, dups, repack
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.liveness import CF_GC
from cowfs.chunks.packs import Packs
from cowfs.kv.base import Batch
from cowfs.kv.memory import MemoryKV


def _chunks(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        data = os.urandom(4096) if seed < 0 else bytes([seed, i]) * 2048
        out.append((codec.chunk_hash(data), codec.encode_chunk(data, 1)))
    return out


def _pack(packs: Packs, db: MemoryKV, chunks: list[tuple[bytes, bytes]], commit: bool = True) -> int:
    """One pack of the chunks, their P records committed in db (commit False: a pack put
    whose commit has not come yet)."""
    pack, exts = packs.write([v[1:] for _h, v in chunks], [(h, v[0], codec.chunk_sizes(v)[0]) for h, v in chunks])
    if commit:
        b = Batch()
        for (h, v), (off, length) in zip(chunks, exts):
            b.put(CF_OBJECTS, h, codec.encode_packed(v[0], pack, off, length, codec.chunk_sizes(v)[0]))
        db.write(b)
    return pack


def _keeper(refs, packs, dbs, condemned=()) -> dups.Keeper:
    return dups.Keeper(refs, packs, dbs, "db", set(condemned), set())


def _rewrite(db: MemoryKV, refs: MemoryKV, packs: Packs, condemned=()) -> int:
    """db's writer follows the published records (and says so: dups.mark_followed)."""
    gen = dups.generation(refs)
    recode = dups.plan(db, dups.records(refs), set(condemned), lambda p: packs.size(p) is not None)
    b = Batch()
    for h, raw in recode.items():
        b.put(CF_OBJECTS, h, raw)
    db.write(b)
    dups.mark_followed(refs, f"writer-{id(db)}", gen)
    return len(recode)


def _setup():
    refs = MemoryKV((CF_GC, dups.CF_DUP))
    packs = Packs(MemoryBlobStore())
    own, a, b = (MemoryKV((CF_OBJECTS,)) for _ in range(3))
    return refs, packs, [("db", own), ("home-a", a), ("home-b", b)]


def test_duplicates_are_published_rewritten_and_settled():
    refs, packs, dbs = _setup()
    (_, own), (_, a), (_, b) = dbs
    same = _chunks(5)
    p_own = _pack(packs, own, same[:3])
    _pack(packs, a, same)
    _pack(packs, b, same[3:] + _chunks(2, seed=9))  # two chunks only b has
    inline = _chunks(1, seed=7)
    a.write(_put(inline))  # an inline record is no copy in a pack
    _pack(packs, b, inline)
    fig = _keeper(refs, packs, dbs).run(packs.listing())
    assert (fig.packs_read, fig.found, fig.published, fig.open) == (4, 5, 5, 5)
    assert dups.generation(refs) == 1
    published = dict(dups.records(refs))
    for h, _v in same[:3]:  # the store's database's copy wins a tie
        assert codec.packed_extent(published[h])[0] == p_own  # type: ignore[index]
    assert inline[0][0] not in published
    # a second pass reads no pack again and publishes nothing new
    fig = _keeper(refs, packs, dbs).run(packs.listing())
    assert (fig.packs_read, fig.published, fig.settled, fig.open) == (0, 0, 0, 5)
    assert dups.generation(refs) == 1
    assert _rewrite(own, refs, packs) == 0
    assert _rewrite(a, refs, packs) == 3 and _rewrite(b, refs, packs) == 2  # a tie goes to the first by name
    assert _rewrite(a, refs, packs) == 0
    fig = _keeper(refs, packs, dbs).run(packs.listing())
    assert (fig.settled, fig.open) == (5, 0) and dups.records(refs) == []
    for h, _v in same:
        assert len({kv.get(CF_OBJECTS, h) for _n, kv in dbs} - {None}) == 1


def test_a_pass_reads_the_open_records_again_only_after_a_database_followed_or_a_while():
    """What a pass costs follows what changed: open records are looked up in every database
    again once a writer followed a generation (dups.mark_followed), when their place went, or
    RECHECK_EVERY after the last look; not on every pass while they wait."""
    refs, packs, dbs = _setup()
    (_, own), (_, a), (_, b) = dbs
    same = _chunks(4)
    _pack(packs, own, same)
    _pack(packs, a, same)
    t = 1000.0
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=t).published == 4
    fig = _keeper(refs, packs, dbs).run(packs.listing(), now=t + 1)
    assert (fig.rechecked, fig.open) == (0, 4)  # nobody followed: nothing read
    assert _rewrite(a, refs, packs) == 4
    fig = _keeper(refs, packs, dbs).run(packs.listing(), now=t + 2)
    assert (fig.rechecked, fig.settled, fig.open) == (4, 4, 0)
    # a database that drops its copy follows nothing: seen at the next look at every record
    _pack(packs, b, _chunks(2, seed=3))
    _pack(packs, own, _chunks(2, seed=3))
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=t + 3).open == 2
    b.write(_delete(_chunks(2, seed=3)))
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=t + 4).rechecked == 0
    fig = _keeper(refs, packs, dbs).run(packs.listing(), now=t + 3 + dups.RECHECK_EVERY)
    assert (fig.rechecked, fig.settled) == (2, 2)


def test_a_pack_a_dup_record_names_is_not_condemned_by_a_mark_taken_before_a_rewrite_into_it():
    """The false fsck report of a condemned pack, due, that a pointer names: the store's copy
    dropped after the keeper published its place, a fork's rewrite planned (the condemned list
    read) before a gc's condemnation and committed after its mark.  The condemnation spares a
    pack a dup record names (dups.spared, under the generation), so no due condemned pack is
    marked; once the record is gone the pack is condemned as usual."""
    from cowfs.chunks.liveness import CF_MEMBER, CF_WRITER, Liveness, mark
    refs = MemoryKV((CF_GC, CF_WRITER, CF_MEMBER, dups.CF_DUP))
    packs = Packs(MemoryBlobStore())
    own, a = MemoryKV((CF_OBJECTS,)), MemoryKV((CF_OBJECTS,))
    dbs = [("db", own), ("home-a", a)]
    live = Liveness(refs)
    same = _chunks(3)
    p_own = _pack(packs, own, same)
    _pack(packs, a, same)
    _keeper(refs, packs, dbs).run(packs.listing())
    own.write(_delete(same))  # the store's copy dropped: p_own has no pointer left
    recode = dups.plan(a, dups.records(refs), set(live.condemned().packs), lambda p: packs.size(p) is not None)
    assert len(recode) == 3  # planned into p_own, not condemned yet
    marked = mark([own, a])  # a gc's mark before the rewrite: p_own unmarked
    assert not marked.get(p_own)
    live.condemn([p for p in packs.listing() if not marked.get(p)], marked, lambda: dups.spared(refs))
    b = Batch()
    for h, raw in recode.items():
        b.put(CF_OBJECTS, h, raw)
    a.write(b)  # the rewrite commits
    dups.mark_followed(refs, "home-a", dups.generation(refs))
    c = live.condemned()
    assert not {p for p in live.due(c) if mark([own, a]).get(p)}, "a due condemned pack a pointer names"
    assert p_own not in c.packs
    # a's old copies are garbage for the next round; the record settles; then p_own's turn
    assert _keeper(refs, packs, dbs).run(packs.listing()).settled == 3
    a.write(_delete(same))
    live.condemn([p_own], (), lambda: dups.spared(refs))
    assert p_own in live.condemned().packs


def _put(chunks: list[tuple[bytes, bytes]]) -> Batch:
    b = Batch()
    for h, v in chunks:
        b.put(CF_OBJECTS, h, v)
    return b


def test_a_condemned_or_missing_place_is_never_rewritten_to_and_is_chosen_again():
    refs, packs, dbs = _setup()
    (_, own), (_, a), _b = dbs
    same = _chunks(3)
    p_own = _pack(packs, own, same)
    p_a = _pack(packs, a, same)
    _keeper(refs, packs, dbs).run(packs.listing())
    assert {codec.packed_extent(v)[0] for _h, v in dups.records(refs)} == {p_own}  # type: ignore[index]
    assert _rewrite(a, refs, packs, condemned={p_own}) == 0  # condemned meanwhile: a keeps its own
    # the store's copy dropped (its records freed) and its pack condemned: the keeper chooses a's
    own.write(_delete(same))
    fig = _keeper(refs, packs, dbs, condemned={p_own}).run(packs.listing())
    assert fig.settled == 3 and dups.records(refs) == []  # one copy left: nothing to do
    # a record naming a pack that is gone is not followed
    b = Batch()
    b.put(dups.CF_DUP, same[0][0], _place(p_own, same[0][1]))
    refs.write(b)
    packs.delete(p_own)
    assert _rewrite(a, refs, packs) == 0
    assert codec.packed_extent(a.get(CF_OBJECTS, same[0][0]))[0] == p_a  # type: ignore[index,arg-type]


def _delete(chunks: list[tuple[bytes, bytes]]) -> Batch:
    b = Batch()
    for h, _v in chunks:
        b.delete(CF_OBJECTS, h)
    return b


def _place(pack: int, value: bytes) -> bytes:
    return codec.encode_packed(value[0], pack, 0, len(value) - 1, codec.chunk_sizes(value)[0])


def test_a_pack_put_before_its_commit_is_read_again_until_its_grace_ends():
    refs, packs, dbs = _setup()
    (_, own), (_, a), _b = dbs
    same = _chunks(2)
    _pack(packs, own, same)
    late = _pack(packs, a, same, commit=False)  # put, its commit not come yet
    fig = _keeper(refs, packs, dbs).run(packs.listing(), now=1000.0)
    assert fig.found == 0
    state = dups.ScanState.unpack(refs.get(CF_GC, dups.SCAN_STATE))
    assert state.packs[late] == 1000.0  # pending
    # its commit comes: the next pass reads it again and finds the duplicates
    b = Batch()
    for (h, v), off in zip(same, (0, len(same[0][1]) - 1)):
        b.put(CF_OBJECTS, h, codec.encode_packed(v[0], late, off, len(v) - 1, codec.chunk_sizes(v)[0]))
    a.write(b)
    fig = _keeper(refs, packs, dbs).run(packs.listing(), now=1001.0)
    assert (fig.packs_read, fig.found) == (1, 2)
    assert dups.ScanState.unpack(refs.get(CF_GC, dups.SCAN_STATE)).packs[late] == 0.0
    # a pack whose entries nothing ever points into stops being read after the grace
    _pack(packs, a, _chunks(1, seed=5), commit=False)
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=2000.0).packs_read == 1
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=2000.0 + dups.PENDING_GRACE - 1).packs_read == 1
    assert _keeper(refs, packs, dbs).run(packs.listing(), now=2000.0 + dups.PENDING_GRACE + 1).packs_read == 0


def test_a_repacked_winning_place_is_published_and_the_others_follow_it():
    """A pack others point into (a place that won) repacked by its owner: the new places are
    published (dups.follow_moves) unless a record names a place elsewhere, and the keeper
    keeps them until every database follows, then settles them."""
    refs, packs, dbs = _setup()
    (_, own), (_, a), (_, b) = dbs
    same = _chunks(3)
    p_a = _pack(packs, a, same)
    _pack(packs, b, same)
    _keeper(refs, packs, dbs).run(packs.listing())  # a wins the tie (own holds none)
    assert _rewrite(b, refs, packs) == 3  # b points into a's pack now
    # a's owner repacks its pack: its pointers move to a new pack
    p_new = _pack(packs, a, same)
    moved = [(h, a.get(CF_OBJECTS, h)) for h, _v in same]
    elsewhere = _pack(packs, own, same[2:])  # the keeper chose another place for the third
    rec = Batch()
    rec.put(dups.CF_DUP, same[2][0], own.get(CF_OBJECTS, same[2][0]))
    refs.write(rec)
    gen = dups.generation(refs)
    assert dups.follow_moves(refs, moved, {p_a}) == 2
    assert dups.generation(refs) == gen + 1
    published = dict(dups.records(refs))
    assert [codec.packed_extent(published[h])[0] for h, _v in same] == [p_new, p_new, elsewhere]  # type: ignore[index]
    assert dups.follow_moves(refs, moved, {p_a}) == 0  # done: nothing left to publish
    fig = _keeper(refs, packs, dbs).run(packs.listing())
    assert fig.open == 3  # b still points into the old pack
    assert _rewrite(b, refs, packs) == 3 and _rewrite(a, refs, packs) == 1
    assert all(codec.packed_extent(b.get(CF_OBJECTS, h))[0] != p_a for h, _v in same)  # type: ignore[index,arg-type]
    assert _keeper(refs, packs, dbs).run(packs.listing()).settled == 3


def test_a_repack_share_is_its_own_databases_and_a_pack_others_point_into_is_no_garbage():
    s = repack.Survey({1: 100, 2: 100, 3: 100}, {1: 25, 2: 60}, theirs={1: 50, 3: 10}, foreign={1, 3})
    assert s.groups(0.5) == [[1]]  # a quarter its own, whoever else points into it
    assert s.garbage() == [] and s.marked() == [1, 2, 3]
    assert s.dead_bytes() == 25 + 40 + 90
    s.left = {2}  # the keeper's rewrites moved pointers out of pack 2: repacked below 95% live
    assert s.groups(0.5) == [[1, 2]]


def test_a_damaged_place_is_not_published():
    refs, packs, dbs = _setup()
    (_, own), (_, a), _b = dbs
    same = _chunks(1)
    h, v = same[0]
    p_own = _pack(packs, own, same)
    _pack(packs, a, same)
    wrong = codec.encode_packed(v[0], p_own, 1, len(v) - 2, codec.chunk_sizes(v)[0])  # a place off by one
    b = Batch()
    b.put(CF_OBJECTS, h, wrong)
    own.write(b)
    fig = _keeper(refs, packs, dbs).run(packs.listing())
    assert fig.found == 1
    assert dups.records(refs)[0][1] == a.get(CF_OBJECTS, h)  # the checked copy


def test_fsck_checks_the_dup_records_and_repair_drops_the_damaged(tmp_path):
    """A dup record naming the chunk where its pack's index lists it is clean; one naming a pack
    that is gone is counted (stale), not a problem; a record that is no whole P record, or names
    a place whose bytes are another chunk, or a damaged scan state, is a problem that --repair
    removes.  The keeper of a store of one database reads nothing, and settles records left."""
    from cowfs.fsck import Fsck
    from cowfs.store import Store, init_store

    path = str(tmp_path / "s")
    init_store(path)
    st = Store(path)
    try:
        assert st.keep_dups() == dups.Figures()  # one database: the keeper reads nothing
        assert st.refs.get(CF_GC, dups.SCAN_STATE) is None
        (h, v), (h2, v2) = _chunks(2, seed=3)
        pack, exts = st.packs.write([v[1:], v2[1:]], [(h, v[0], codec.chunk_sizes(v)[0]),
                                                      (h2, v2[0], codec.chunk_sizes(v2)[0])])
        good = codec.encode_packed(v[0], pack, exts[0][0], exts[0][1], codec.chunk_sizes(v)[0])
        gone = codec.encode_packed(v[0], pack + 1, 0, exts[0][1], codec.chunk_sizes(v)[0])
        b = Batch()
        b.put(dups.CF_DUP, h, good)
        b.put(dups.CF_DUP, b"\x01" * 32, gone)
        st.refs.write(b)
        report = Fsck(st).run()
        assert report.clean, report.problems
        assert (report.counts["dup_records"], report.counts["dup_records_stale"]) == (2, 1)
        b = Batch()
        b.put(dups.CF_DUP, b"\x02" * 32, b"P" + bytes(5))  # no whole P record
        b.put(dups.CF_DUP, h2, good)  # h's bytes named as h2's
        b.put(CF_GC, dups.SCAN_STATE, b"123")  # not a whole number of entries
        st.refs.write(b)
        report = Fsck(st).run()
        assert len(report.problems) == 3, report.problems
        report = Fsck(st, repair=True).run()
        assert {h for h, _v in dups.records(st.refs)} == {h, b"\x01" * 32}
        assert st.refs.get(CF_GC, dups.SCAN_STATE) is None
        assert Fsck(st).run().clean
        fig = st.keep_dups()  # records left, one database: each has one copy at most, settled
        assert fig.settled == 2 and dups.records(st.refs) == []
    finally:
        st.close()

