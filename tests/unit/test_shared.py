"""meta.shared on MemoryKV: ranges translate inode numbers both ways and keep copies' own
times; Versioned resolves copies through their range (records, entries, listings merged
with the copy's own versions), only in views that have the range's layer."""
from __future__ import annotations

import random

import pytest

from cowfs.chunks.tree import Root
from cowfs.kv.base import Batch
from cowfs.meta.records import Attrs
from cowfs.meta.shared import Range, SharedTrees, runs_of
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, Versioned, ino_key, name_key

from unit.helpers import Meta, dirent, record, share

R11 = Root(0, bytes(range(32)))


def test_runs_of_cuts_where_either_side_jumps():
    assert runs_of([(10, 20), (11, 21), (12, 22), (13, 30), (14, 31), (20, 32)]) == [
        (10, 20, 3), (13, 30, 2), (20, 32, 1)]
    assert runs_of([]) == []


def test_a_range_translates_both_ways_and_keeps_times():
    r = Range(7, [(50, 5, 2), (20, 30, 3)], [1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert r.runs == [(20, 30, 3), (50, 5, 2)]  # sorted by copy inode; times follow run order
    assert [r.x_of(y) for y in (19, 20, 22, 23, 50, 51, 52)] == [None, 30, 32, None, 5, 6, None]
    assert [r.y_of(x) for x in (4, 5, 6, 7, 29, 30, 32, 33)] == [None, 50, 51, None, None, 20, 22, None]
    assert list(r.pairs()) == [(20, 30), (21, 31), (22, 32), (50, 5), (51, 6)]
    assert r.times(22) == (30, 3) and r.times(51) == (50, 5)
    assert Range(7, [(20, 30, 1)], [9]).times(20) == (None, 9)  # no atimes: the original's
    assert r.size == 5 and r.key.endswith((20).to_bytes(8, "big"))


def test_a_range_refuses_times_that_do_not_match_its_inodes():
    with pytest.raises(ValueError, match="3 inodes has 2 ctimes"):
        Range(1, [(1, 2, 3)], [1, 2])
    with pytest.raises(ValueError, match="1 atimes"):
        Range(1, [(1, 2, 3)], [1, 2, 3], [4])


@pytest.mark.parametrize("seed", range(5))
def test_pack_round_trips(seed):
    rnd = random.Random(seed)
    runs, y, x = [], rnd.randrange(1, 1 << 40), rnd.randrange(1, 1 << 40)
    for _ in range(rnd.randrange(1, 30)):
        n = rnd.randrange(1, 200)
        runs.append((y, x, n))
        y += n + rnd.randrange(0, 5)
        x = rnd.randrange(1, 1 << 40)  # sources may go backwards
    total = sum(n for *_, n in runs)
    ctimes = [rnd.randrange(-(1 << 62), 1 << 62) for _ in range(total)]
    atimes = [rnd.randrange(0, 1 << 62) for _ in range(total)] if seed % 2 else []
    r = Range(rnd.randrange(1, 1 << 30), runs, ctimes, atimes)
    back = Range.unpack(r.layer, r.pack())
    assert (back.runs, list(back.ctimes), list(back.atimes)) == (r.runs, ctimes, atimes)


def test_shared_trees_find_sources_and_replace_their_table():
    a = Range(3, [(100, 10, 5)], [0] * 5)
    b = Range(4, [(200, 10, 2), (105, 50, 1)], [0] * 3)
    t = SharedTrees([a])
    old = t.ranges
    t.committed(added=[b])
    assert old == {a.key: a} and t.ranges is not old  # replaced, never changed in place
    assert t.find(99) is None and t.find(100) == (a, 10) and t.find(104) == (a, 14)
    assert t.find(105) == (b, 50) and t.find(106) is None and t.find(201) == (b, 11)
    assert t.sources()[10] == {3, 4} and t.sources()[50] == {4}
    assert t.visible(frozenset({4, 9})) == [b]
    assert t.figures() == {"ranges": 2, "inodes": 8, "clones": 0}
    t.committed(removed=[a])
    assert t.find(100) is None and t.find(105) == (b, 50)


def test_ranges_load_from_the_kv():
    m = Meta()
    p = m.layer()
    r = share(m, p, [(20, 10), (21, 11), (30, 40)], [5, 6, 7], [8, 9, 10])
    loaded = SharedTrees.load(m.kv)
    assert list(loaded.ranges) == [r.key]
    got = loaded.ranges[r.key]
    assert (got.layer, got.runs, list(got.ctimes), list(got.atimes)) == (p, r.runs, [5, 6, 7], [8, 9, 10])


@pytest.fixture
def copied():
    """base <- P (frozen: holds tree 10/{a: 11, b: 12}) <- head; base <- side (no P).
    Copy 20/{a: 21, b: 22} reads as 10/{a: 11, b: 12} of P."""
    m = Meta()
    base = m.layer()
    p = m.layer(base)
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(10), p, record(0o40755, parent=1, name=b"x", ctime=1000))
    Versioned.put(b, CF_INODES, ino_key(11), p, record(parent=10, name=b"a", root=R11, ctime=1001, atime=77))
    Versioned.put(b, CF_INODES, ino_key(12), p, record(parent=10, name=b"b", ctime=1002))
    Versioned.put(b, CF_DIRENTS, name_key(10, b"a"), p, dirent(11))
    Versioned.put(b, CF_DIRENTS, name_key(10, b"b"), p, dirent(12))
    m.kv.write(b)
    r = share(m, p, [(20, 10), (21, 11), (22, 12)], [2000, 2001, 2002])
    return m, base, p, m.layer(p), m.layer(base), r


def attrs(m: Meta, ino: int, top: int) -> tuple[int, Attrs] | None:
    found = m.meta.get(CF_INODES, ino_key(ino), m.view(top))
    return None if found is None or not found[1] else (found[0], Attrs.unpack(found[1]))


def test_a_copy_reads_its_original_with_its_own_times_and_numbers(copied):
    m, base, p, head, side, r = copied
    layer, a = attrs(m, 21, head)
    assert layer == p and a.root == R11 and a.name == b"a"
    assert a.parent == 20  # the original's parent, translated into the copy
    assert a.ctime_ns == 2001 and a.atime_ns == 77  # its own ctime; no atimes: the original's
    assert attrs(m, 20, head)[1].parent == 1  # a parent outside the range stays
    assert m.meta.get(CF_DIRENTS, name_key(20, b"a"), m.view(head)) == (p, dirent(21))
    assert list(m.meta.scan_names(CF_DIRENTS, 20, m.view(head))) == [(b"a", dirent(21)), (b"b", dirent(22))]
    assert m.meta.has_older(CF_INODES, ino_key(21), m.view(head))
    assert m.meta.range_roots(r) == [R11.hash]


def test_atimes_of_a_range_override_the_originals():
    m = Meta()
    p = m.layer()
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(11), p, record(atime=77))
    m.kv.write(b)
    share(m, p, [(21, 11)], [2001], [555])
    assert attrs(m, 21, m.layer(p))[1].atime_ns == 555


def test_a_view_without_the_ranges_layer_does_not_see_it(copied):
    m, base, p, head, side, r = copied
    assert attrs(m, 21, side) is None
    assert list(m.meta.scan_names(CF_DIRENTS, 20, m.view(side))) == []
    assert not m.meta.has_older(CF_INODES, ino_key(21), m.view(side))


def test_a_copys_own_versions_win_and_merge_into_its_listing(copied):
    m, base, p, head, side, r = copied
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(22), head, record(parent=20, name=b"b", ctime=9))
    m.meta.delete(b, CF_DIRENTS, name_key(20, b"a"), m.view(head))  # over the range: a tombstone
    Versioned.put(b, CF_DIRENTS, name_key(20, b"b"), head, dirent(99))
    Versioned.put(b, CF_DIRENTS, name_key(20, b"0"), head, dirent(98))
    Versioned.put(b, CF_DIRENTS, name_key(20, b"c"), head, dirent(97))
    m.kv.write(b)
    assert m.meta.get(CF_DIRENTS, name_key(20, b"a"), m.view(head)) == (head, b"")
    assert attrs(m, 22, head) == (head, Attrs.unpack(record(parent=20, name=b"b", ctime=9)))
    assert list(m.meta.scan_names(CF_DIRENTS, 20, m.view(head))) == [
        (b"0", dirent(98)), (b"b", dirent(99)), (b"c", dirent(97))]
    assert list(m.meta.scan_names(CF_DIRENTS, 20, m.view(head), start=b"b")) == [
        (b"b", dirent(99)), (b"c", dirent(97))]
    assert list(m.meta.scan_names(CF_DIRENTS, 10, m.view(head))) == [(b"a", dirent(11)), (b"b", dirent(12))]


def test_a_copy_keeps_reading_the_original_as_its_frozen_layer_saw_it(copied):
    m, base, p, head, side, r = copied
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(11), head, record(parent=10, name=b"a", ctime=5))
    m.meta.delete(b, CF_INODES, ino_key(12), m.view(head))
    m.meta.delete(b, CF_DIRENTS, name_key(10, b"b"), m.view(head))
    m.kv.write(b)
    assert attrs(m, 21, head)[1].root == R11
    assert attrs(m, 22, head)[1].ctime_ns == 2002
    assert [n for n, _ in m.meta.scan_names(CF_DIRENTS, 20, m.view(head))] == [b"a", b"b"]


def test_a_tombstoned_original_reads_as_no_copy():
    m = Meta()
    base = m.layer()
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(11), base, record())
    m.kv.write(b)
    p = m.layer(base)
    b = Batch()
    m.meta.delete(b, CF_INODES, ino_key(11), m.view(p))
    m.kv.write(b)
    share(m, p, [(21, 11)], [1])
    assert m.meta.get(CF_INODES, ino_key(11), m.view(p)) == (p, b"")
    assert attrs(m, 21, m.layer(p)) is None


def test_the_ranges_layer_lists_its_copies_as_changed(copied):
    m, base, p, head, side, r = copied
    own = {(CF_INODES, ino_key(i)) for i in (10, 11, 12)} | {(CF_DIRENTS, name_key(10, n)) for n in (b"a", b"b")}
    copies = {(CF_INODES, ino_key(i)) for i in (20, 21, 22)} | {(CF_DIRENTS, name_key(20, n)) for n in (b"a", b"b")}
    assert set(m.meta.changed(p, shared=False)) == own
    assert set(m.meta.changed(p)) == own | copies
    assert set(m.meta.changed(head)) == set()
