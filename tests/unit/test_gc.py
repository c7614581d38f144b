"""meta.gc on MemoryKV: the plan (dead and interior layers), `collect` against a brute-force
model over random layer trees (a version stays exactly when some live top sees it), and the
ranges of shared copies (pinned originals, dead ranges)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from cowfs.chunks.tree import Root
from cowfs.kv.base import Batch
from cowfs.meta import gc
from cowfs.meta.layers import Catalog
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_CHANGES, CF_DIRENTS, CF_INODES, CF_XATTRS, TAGS, Versioned, ino_key, name_key

from unit.helpers import Meta, dirent, record, share, visible

HASHES = [bytes([k]) * 32 for k in range(1, 4)]


def run(m: Meta, live: set[int], chunk: int = 2000, forks: bool = True) -> tuple[int, Counter]:
    """A pass, committing each batch as the daemon does; (versions removed, decrefs)."""
    removed, decrefs = 0, Counter()
    col = gc.Collector(m.meta, m.catalog, forks)
    while (c := col.next(live, chunk)) is not None:
        m.kv.write(c.batch)
        removed += c.removed
        for h, d in c.txn.delta.items():
            assert d <= 0, "collection only drops references"
            decrefs[h] -= d
    m.meta.forget_views()
    return removed, decrefs


def walked(m: Meta) -> None:
    """Mark the store as one a pass has seen whole (only the queue is looked at then)."""
    b = Batch()
    m.catalog.mark_walked(b)
    m.kv.write(b)


def test_a_pass_removes_dead_layers_merges_single_children_and_keeps_forks():
    m = Meta()
    root = m.layer()
    snap = m.layer(root)
    head = m.layer(snap)
    other = m.layer(snap)
    old_head = m.layer(root)  # a rollback's old head: nobody sees from it
    old_child = m.layer(old_head)
    run(m, {head, other})
    # the dead line went; root, no top, with one child left, merged into snap (a fork)
    assert m.catalog.parents == {snap: 0, head: snap, other: snap}
    assert m.catalog.walked and not m.catalog.queued
    assert Catalog(m.kv).parents == m.catalog.parents


def test_deleting_a_snapshot_queues_it_and_the_pass_merges_it_into_its_child():
    m = Meta()
    walked(m)
    base = m.layer()
    s1, s2 = base, m.layer(base)
    head = m.layer(s2)
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(5), s1, record(ctime=1, root=Root(0, HASHES[0])))
    Versioned.put(b, CF_INODES, ino_key(6), s1, record(ctime=1))
    Versioned.put(b, CF_INODES, ino_key(5), s2, record(ctime=2, root=Root(0, HASHES[1])))
    Versioned.put(b, CF_DIRENTS, name_key(1, b"x"), s2, dirent(9))
    m.catalog.enqueue(s2, b)  # s2 deleted: {s1, head} are the tops
    m.kv.write(b)
    before = {k: m.meta.get(*k, m.view(head))[1] for k in [(CF_INODES, ino_key(5)), (CF_INODES, ino_key(6)),
                                                          (CF_DIRENTS, name_key(1, b"x"))]}
    removed, decrefs = run(m, {s1, head}, forks=False)
    assert m.catalog.parents == {s1: 0, head: s1} and not m.catalog.queued
    assert m.meta.versions(CF_INODES, ino_key(5)) == [(head, before[(CF_INODES, ino_key(5))]),
                                                      (s1, record(ctime=1, root=Root(0, HASHES[0])))]
    assert m.meta.versions(CF_DIRENTS, name_key(1, b"x")) == [(head, dirent(9))]
    assert {k: m.meta.get(*k, m.view(head))[1] for k in before} == before
    assert removed == 0 and decrefs == Counter()  # moved, not dropped
    assert {(k[:8], k[9:]) for k, _ in m.kv.scan(CF_CHANGES, b"")} == {
        (head.to_bytes(8, "big"), ino_key(5)), (head.to_bytes(8, "big"), name_key(1, b"x")),
        (s1.to_bytes(8, "big"), ino_key(5)), (s1.to_bytes(8, "big"), ino_key(6))}


def test_a_merge_drops_what_the_child_overwrote_with_its_reference():
    m = Meta()
    walked(m)
    s1 = m.layer()
    s2 = m.layer(s1)
    head = m.layer(s2)
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(5), s2, record(ctime=2, root=Root(0, HASHES[1])))
    Versioned.put(b, CF_INODES, ino_key(5), head, record(ctime=3))
    m.catalog.enqueue(s2, b)
    m.kv.write(b)
    removed, decrefs = run(m, {s1, head}, forks=False)
    assert removed == 1 and decrefs == Counter({HASHES[1]: 1})
    assert m.meta.versions(CF_INODES, ino_key(5)) == [(head, record(ctime=3))]


def test_a_merge_resumes_after_a_crash_between_its_batches():
    m = Meta()
    walked(m)
    s1 = m.layer()
    s2 = m.layer(s1)
    head = m.layer(s2)
    b = Batch()
    for i in range(10):
        Versioned.put(b, CF_INODES, ino_key(100 + i), s2, record(ctime=i))
    m.catalog.enqueue(s2, b)
    m.kv.write(b)
    col = gc.Collector(m.meta, m.catalog)
    m.kv.write(col.next({s1, head}, chunk=3).batch)  # one batch, then the daemon dies
    m2 = Meta(m.kv)
    assert s2 in m2.catalog.queued and m2.catalog.parents[head] == s2
    for i in range(10):  # every view reads what it read, half-way too
        assert m2.meta.get(CF_INODES, ino_key(100 + i), m2.view(head))[1] == record(ctime=i)
    run(m2, {s1, head}, chunk=3, forks=False)
    assert m2.catalog.parents == {s1: 0, head: s1}
    for i in range(10):
        assert m2.meta.versions(CF_INODES, ino_key(100 + i)) == [(head, record(ctime=i))]


def test_a_pass_is_linear_in_a_long_chain():
    """2,000 chained snapshots, every other one deleted: one pass, well under a second (the
    old plan built each top's ancestry set: quadratic, 1.28 s for 2,000)."""
    import time
    m = Meta()
    walked(m)
    b = Batch()
    layers = [m.catalog.new_layer(0, b)]
    for i in range(4000):
        layers.append(m.catalog.new_layer(layers[-1], b))
        Versioned.put(b, CF_INODES, ino_key(7), layers[-2], record(ctime=i))
    for l in layers[1:-1:2]:
        m.catalog.enqueue(l, b)
    m.kv.write(b)
    live = set(layers[0:-1:2]) | {layers[-1]}
    t0 = time.perf_counter()
    run(m, live, forks=True)
    assert time.perf_counter() - t0 < 5
    assert len(m.catalog.parents) == len(live)
    assert len(m.catalog.ancestry(layers[-1])) == len(live)


def model_store(rnd: random.Random) -> tuple[Meta, list[int], dict[tuple[str, bytes], dict[int, bytes]]]:
    """A random layer tree with random versions (records with and without tree roots,
    entries, xattrs, tombstones) and the same as a plain model."""
    m = Meta()
    layers = [m.layer()]
    for _ in range(rnd.randrange(2, 10)):
        layers.append(m.layer(rnd.choice(layers)))
    keys = [(CF_INODES, ino_key(i)) for i in range(1, 6)]
    keys += [(cf, name_key(1, n)) for cf in (CF_DIRENTS, CF_XATTRS) for n in (b"a", b"b", b"c")]
    model: dict[tuple[str, bytes], dict[int, bytes]] = {}
    for _ in range(rnd.randrange(10, 60)):
        cf, base = rnd.choice(keys)
        layer = rnd.choice(layers)
        versions = model.setdefault((cf, base), {})
        b = Batch()
        if rnd.random() < 0.75:
            if cf == CF_INODES:
                h = rnd.choice(HASHES + [None])
                value = record(ctime=rnd.randrange(100), root=Root(0, h) if h else None)
            else:
                value = dirent(rnd.randrange(100))
            Versioned.put(b, cf, base, layer, value)
            versions[layer] = value
        else:
            m.meta.delete(b, cf, base, m.view(layer))
            anc = m.catalog.ancestry(layer)
            if any(l in anc for l in versions if l < layer):
                versions[layer] = b""
            else:
                versions.pop(layer, None)
        m.kv.write(b)
    return m, layers, model


@pytest.mark.parametrize("seed", range(60))
def test_collect_keeps_what_live_tops_read_and_nothing_else(seed):
    rnd = random.Random(seed)
    m, layers, model = model_store(rnd)
    live = set(rnd.sample(layers, rnd.randrange(0, len(layers) + 1)))
    before = {top: {k: visible(v, m.catalog.ancestry(top)) for k, v in model.items()} for top in live}
    values_before = Counter(v for versions in model.values() for v in versions.values())
    if rnd.random() < 0.5:  # a store a pass saw before: only what was queued is looked at
        walked(m)
        for l in layers:
            if l not in live:
                b = Batch()
                m.catalog.enqueue(l, b)
                m.kv.write(b)

    removed, decrefs = run(m, live, chunk=rnd.choice((1, 3, 2000)))

    for top in live:  # every live view reads what it read before (maybe from another layer)
        got = {k: m.meta.get(k[0], k[1], m.view(top)) for k in model}
        assert {k: v and v[1] for k, v in got.items()} == {k: v and v[1] for k, v in before[top].items()}
    after = {(cf, base, l): v for (cf, base) in model for l, v in m.meta.versions(cf, base)}
    seen = {(k[0], k[1], found[0]) for top in live for k in model
            if (found := m.meta.get(k[0], k[1], m.view(top))) is not None}
    assert set(after) == seen  # no version that no live top sees
    # the tree: every layer left is a live top, or a fork of two or more
    for l in m.catalog.parents:
        assert l in live or len(m.catalog.children.get(l, ())) >= 2, (l, m.catalog.parents)
    # a top queued (its child went) stays queued while it is read from (here no catalog
    # entry names it: a view the kernel holds)
    assert set(m.catalog.parents) == set(Catalog(m.kv).parents) and m.catalog.queued <= live
    logged = {(k[:8], k[8:9], k[9:]) for k, _ in m.kv.scan(CF_CHANGES, b"")}
    assert logged == {(l.to_bytes(8, "big"), TAGS[cf], base) for cf, base, l in after}
    assert removed == sum(values_before.values()) - len(after)

    def roots(c: Counter) -> Counter:
        out = Counter()
        for v, n in c.items():
            if v and len(v) > 40:
                a = Attrs.unpack(v)
                if a.root is not None:
                    out[a.root.hash] += n
        return out
    inode_before = Counter(v for (cf, _b), versions in model.items() if cf == CF_INODES for v in versions.values())
    inode_after = Counter(v for (cf, _b, _l), v in after.items() if cf == CF_INODES)
    assert decrefs == roots(inode_before) - roots(inode_after)
    assert run(m, live) == (0, Counter())  # nothing left to collect


@pytest.fixture
def copied():
    """base <- P (frozen: x=11 with a tree root) <- head (the live top); copy 21 reads as 11 of P."""
    m = Meta()
    base = m.layer()
    p = m.layer(base)
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(11), p, record(root=Root(0, HASHES[0])))
    Versioned.put(b, CF_DIRENTS, name_key(11, b"n"), p, dirent(12))
    m.kv.write(b)
    r = share(m, p, [(21, 11)], [5])
    return m, base, p, m.layer(p), r


def test_collect_keeps_originals_a_live_range_reads(copied):
    m, base, p, head, r = copied
    b = Batch()
    Versioned.put(b, CF_INODES, ino_key(11), head, record())  # the original changes after the copy
    m.meta.delete(b, CF_DIRENTS, name_key(11, b"n"), m.view(head))
    m.kv.write(b)
    dead, batch, txn = gc.dead_ranges(m.meta, m.catalog, {head})
    assert dead == [] and len(batch) == 0 and not txn.delta
    assert run(m, {head}) == (0, Counter())  # head shadows P's versions, but the range reads them
    assert Attrs.unpack(m.meta.get(CF_INODES, ino_key(21), m.view(head))[1]).root == Root(0, HASHES[0])
    assert [n for n, _ in m.meta.scan_names(CF_DIRENTS, 21, m.view(head))] == [b"n"]


def test_a_range_whose_copies_are_all_deleted_dies_with_its_tombstones(copied):
    m, base, p, head, r = copied
    b = Batch()
    m.meta.delete(b, CF_DIRENTS, name_key(21, b"n"), m.view(head))
    m.meta.delete(b, CF_INODES, ino_key(21), m.view(head))
    Versioned.put(b, CF_INODES, ino_key(11), head, record())
    m.kv.write(b)
    assert m.meta.versions(CF_INODES, ino_key(21)) == [(head, b"")]
    dead, batch, txn = gc.dead_ranges(m.meta, m.catalog, {head})
    assert dead == [r]
    assert txn.delta == {HASHES[0]: -1}  # the range's reference to its original's tree
    m.kv.write(batch)
    m.meta.shared.committed(removed=dead)
    assert m.meta.versions(CF_INODES, ino_key(21)) == []  # the tombstones only hid the range
    assert m.meta.versions(CF_DIRENTS, name_key(21, b"n")) == []
    assert m.meta.shared.ranges == {} and list(Meta(m.kv).meta.shared.ranges) == []
    removed, decrefs = run(m, {head})  # now the shadowed originals in P go too
    assert removed == 1 and decrefs == Counter({HASHES[0]: 1})
    assert m.meta.versions(CF_INODES, ino_key(11))[-1][0] == head
    # head still sees it: P, no longer read by a range, merged into head (its only child)
    assert m.meta.versions(CF_DIRENTS, name_key(11, b"n")) == [(head, dirent(12))]
    assert m.catalog.parents == {head: 0}  # and so did base


def test_a_range_no_live_top_sees_is_dead(copied):
    m, base, p, head, r = copied
    side = m.layer(base)
    dead, batch, txn = gc.dead_ranges(m.meta, m.catalog, {side})
    assert dead == [r] and txn.delta == {HASHES[0]: -1}
    dead, _batch, _txn = gc.dead_ranges(m.meta, m.catalog, {side, head})
    assert dead == []
