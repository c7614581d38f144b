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


def run(m: Meta, live: set[int], chunk: int = 2000) -> tuple[int, Counter]:
    """collect, committing each batch as the daemon does; (versions removed, decrefs)."""
    removed, decrefs = 0, Counter()
    for batch, txn, n in gc.collect(m.meta, m.catalog, live, chunk):
        m.kv.write(batch)
        removed += n
        for h, d in txn.delta.items():
            assert d <= 0, "collection only drops references"
            decrefs[h] -= d
    return removed, decrefs


def test_plan_names_dead_layers_children_first_and_the_tops_below_interior_ones():
    m = Meta()
    root = m.layer()
    snap = m.layer(root)
    head = m.layer(snap)
    other = m.layer(snap)
    old_head = m.layer(root)  # a rollback's old head: nobody sees from it
    old_child = m.layer(old_head)
    dead, interior = gc.plan(m.catalog, {head, other})
    assert dead == [old_child, old_head]
    assert interior == {root: {head, other}, snap: {head, other}}
    dead, interior = gc.plan(m.catalog, {snap, head})  # a snapshot layer that is a top is not interior
    assert dead == [old_child, old_head, other] and interior == {root: {snap, head}}


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


@pytest.mark.parametrize("seed", range(40))
def test_collect_removes_exactly_the_versions_no_live_top_sees(seed):
    rnd = random.Random(seed)
    m, layers, model = model_store(rnd)
    live = set(rnd.sample(layers, rnd.randrange(0, len(layers) + 1)))
    before = {top: {k: visible(v, m.catalog.ancestry(top)) for k, v in model.items()} for top in live}
    seen = {(k, found[0]) for top in live for k, found in before[top].items() if found is not None}
    kept_layers = {l for top in live for l in m.catalog.ancestry(top)}

    removed, decrefs = run(m, live, chunk=rnd.choice((1, 3, 2000)))

    after = {(cf, base, l) for (cf, base) in model for l, _v in m.meta.versions(cf, base)}
    assert after == {(cf, base, l) for (cf, base), l in seen}
    assert removed == sum(len(v) for v in model.values()) - len(after)
    for top in live:  # every live view reads what it read before
        assert {k: m.meta.get(k[0], k[1], m.view(top)) for k in model} == before[top]
    logged = {(k[:8], k[8:9], k[9:]) for k, _ in m.kv.scan(CF_CHANGES, b"")}
    assert logged == {(l.to_bytes(8, "big"), TAGS[cf], base) for cf, base, l in after}
    dropped_roots = Counter(
        Attrs.unpack(v).root.hash for (cf, base), versions in model.items() if cf == CF_INODES
        for l, v in versions.items() if v and ((cf, base), l) not in seen and Attrs.unpack(v).root)
    assert decrefs == dropped_roots
    assert set(m.catalog.parents) == kept_layers == set(Catalog(m.kv).parents)
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
    assert m.meta.versions(CF_DIRENTS, name_key(11, b"n")) == [(p, dirent(12))]  # head still sees it


def test_a_range_no_live_top_sees_is_dead(copied):
    m, base, p, head, r = copied
    side = m.layer(base)
    dead, batch, txn = gc.dead_ranges(m.meta, m.catalog, {side})
    assert dead == [r] and txn.delta == {HASHES[0]: -1}
    dead, _batch, _txn = gc.dead_ranges(m.meta, m.catalog, {side, head})
    assert dead == []
