"""meta.layers.Catalog: the layer tree, branches, snapshots, counters and usage, written
through batches and read back by a new Catalog on the same KV."""
from __future__ import annotations

import pytest

from cowfs.kv.base import Batch
from cowfs.meta.layers import (CF_CATALOG, CF_META, LAYER_BLOCK, MAX_U64, VIEW_BLOCK, OWNERS_SETTLED, Branch, Catalog, Snapshot, Usage, layer_suffix,
                               suffix_layer)

from unit.helpers import memory_kv


def test_layer_suffixes_sort_newest_first_and_round_trip():
    layers = [1, 2, 255, 256, 1 << 40, MAX_U64 - 1]
    assert sorted(layers, key=layer_suffix) == sorted(layers, reverse=True)
    assert [suffix_layer(layer_suffix(l)) for l in layers] == layers


def test_layers_ancestry_and_reload():
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    snap = cat.new_layer(root, b)
    head = cat.new_layer(snap, b)
    other = cat.new_layer(snap, b)
    kv.write(b)
    assert root < snap < head < other  # ids grow from parent to child
    assert cat.ancestry(head) == [head, snap, root]
    assert cat.ancestry(other) == [other, snap, root]
    again = Catalog(kv)
    assert again.parents == cat.parents == {root: 0, snap: root, head: snap, other: snap}
    # ids come in blocks from the counter: a new catalog skips the rest of the first one
    assert again.new_layer(other, Batch()) == other + 1 + (LAYER_BLOCK - 4)


def test_branches_snapshots_leaves_and_removal_persist():
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    head = cat.new_layer(root, b)
    side = cat.new_layer(root, b)
    cat.save_snapshot(Snapshot("s1", root, cat.new_view(b), "main", created=1.0), b)
    cat.save_branch(Branch("main", head, cat.new_view(b), created=2.0, quota_bytes=5), b)
    cat.save_branch(Branch("side", side, cat.new_view(b), created=3.0, parent="s1", parent_branch="main"), b)
    kv.write(b)
    assert cat.leaves() == {root, head, side}
    again = Catalog(kv)
    assert again.branches == cat.branches and again.snapshots == cat.snapshots
    assert again.branches["side"].parent_branch == "main" and again.branches["main"].quota_bytes == 5
    b = Batch()
    again.remove("side", b)
    again.remove("s1", b)
    again.remove("nothing", b)  # neither: nothing to write
    kv.write(b)
    assert len(b) == 4  # two catalog entries, and their layers queued for garbage collection
    assert Catalog(kv).queued == {side, root}
    third = Catalog(kv)
    assert set(third.branches) == {"main"} and third.snapshots == {} and third.leaves() == {head}


def test_view_ids_are_never_reused():
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    layer = cat.new_layer(0, b)
    views = [cat.new_view(b) for _ in range(3)]
    cat.save_branch(Branch("x", layer, views[-1]), b)
    kv.write(b)
    b = Batch()
    cat.remove("x", b)
    kv.write(b)
    again = Catalog(kv)
    assert views == [1, 2, 3] and again.new_view(Batch()) == 1 + VIEW_BLOCK  # the next block


def test_usage_and_forget_layer():
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    child = cat.new_layer(root, b)
    Catalog.save_usage(child, Usage(1 << 40, 7, 1 << 20), b)
    # Signed: a record falls below zero while deleted copies of an unmeasured clone are
    # counted and the clone's measure is not yet (cowfs.background.cloning).
    Catalog.save_usage(root, Usage(-5, -1, -3), b)
    kv.write(b)
    assert cat.usage(child) == (1 << 40, 7, 1 << 20) and cat.usage(root) == (-5, -1, -3)
    assert cat.usage(99) is None
    b = Batch()
    b.put(CF_META, b"usage/" + child.to_bytes(8, "big"), (5).to_bytes(8, "big") * 2)  # format 4: no allocated bytes
    kv.write(b)
    assert cat.usage(child) is None  # counted again (and rewritten) by whoever needs it
    b = Batch()
    cat.forget_layer(child, b)
    kv.write(b)
    assert cat.usage(child) is None and child not in cat.parents
    assert Catalog(kv).parents == {root: 0}
    assert [k for k, _ in kv.scan(CF_CATALOG, b"layer/", b"layer/")] == [b"layer/" + root.to_bytes(8, "big")]


def _history(kv, n: int) -> list[str]:
    """Branch main with n snapshots in one line, s0 .. s<n-1>, written to kv."""
    cat = Catalog(kv)
    b = Batch()
    head = cat.new_layer(0, b)
    main = Branch("main", head, cat.new_view(b))
    for i in range(n):
        frozen, main.head = main.head, cat.new_layer(main.head, b)
        cat.save_snapshot(Snapshot(f"s{i}", frozen, cat.new_view(b), "main", created=float(i)), b)
    cat.save_branch(main, b)
    kv.write(b)
    return [f"s{i}" for i in range(n)]


def test_records_are_read_and_parsed_at_first_use_and_read_as_written():
    kv = memory_kv()
    names = _history(kv, 50)
    written = Catalog(kv)  # the reference: every record parsed by a walk
    want = {s.name: (s.layer, s.view, s.branch, s.created) for s in written.snapshots.values()}
    cat = Catalog(kv)
    assert cat.figures() == {"catalog_records_read": 0, "catalog_records_parsed": 0}  # none at open
    assert "s7" in cat.snapshots and "nope" not in cat.snapshots and 7 not in cat.snapshots
    assert cat.snapshots.get("\udcff") is None  # a name that is no UTF-8 matches none
    assert cat.figures() == {"catalog_records_read": 1, "catalog_records_parsed": 0}  # s7's bytes
    s7 = cat.snapshots["s7"]
    assert (s7.layer, s7.view, s7.branch, s7.created) == want["s7"]
    assert cat.snapshots.get("s8").name == "s8" and cat.snapshots.get("nope") is None
    assert cat.snapshots["s7"] is s7  # one object, kept
    assert cat.figures() == {"catalog_records_read": 2, "catalog_records_parsed": 2}
    # Changes before the set is complete: a save, a delete of a record never read, a
    # delete of a saved one; the store has them only once the batch commits.
    b = Batch()
    cat.save_snapshot(Snapshot("s9", 999, 999, None), b)
    cat.remove("s10", b)
    cat.save_snapshot(Snapshot("new", 998, 998, None), b)
    cat.remove("new", b)
    assert "s10" not in cat.snapshots and "new" not in cat.snapshots
    assert len(cat.snapshots) == 49  # a walk before the commit: the store still has s10
    kv.write(b)
    assert sorted(cat.snapshots) == sorted(set(names) - {"s10"})
    # A walk parses the rest at once; the records read as written.
    got = {s.name: (s.layer, s.view, s.branch, s.created) for s in cat.snapshots.values()}
    assert cat.figures()["catalog_records_parsed"] == 49  # and main, never used: not read
    del want["s10"]
    want["s9"] = (999, 999, None, got["s9"][3])
    assert got == want
    assert cat.snapshots == Catalog(kv).snapshots and cat.branches == Catalog(kv).branches
    assert cat.leaves() == Catalog(kv).leaves()
    assert dict(cat.snapshots.items())["s0"] is cat.snapshots["s0"]
    with pytest.raises(KeyError):
        cat.snapshots["s10"]
    with pytest.raises(KeyError):
        del Catalog(kv).snapshots["nope"]


def test_owners_are_settled_once_per_store():
    kv = memory_kv()
    _history(kv, 3)
    cat = Catalog(kv)
    assert kv.get(CF_CATALOG, OWNERS_SETTLED) is not None  # a new catalog: nothing to settle, marked
    # An older cowfs deleted branch "gone" without re-parenting, and this store was never settled.
    b = Batch()
    cat.save_snapshot(Snapshot("orphan", cat.snapshots["s1"].layer, cat.new_view(b), "gone"), b)
    cat.save_branch(Branch("fork", cat.new_layer(cat.snapshots["s1"].layer, b), cat.new_view(b),
                           parent="s1", parent_branch="gone"), b)
    b.delete(CF_CATALOG, OWNERS_SETTLED)
    kv.write(b)
    settled = Catalog(kv)
    assert settled.snapshots["orphan"].branch is None and settled.branches["fork"].parent_branch is None
    assert kv.get(CF_CATALOG, OWNERS_SETTLED) is not None
    again = Catalog(kv)  # settled for good: nothing read at open
    assert again.figures() == {"catalog_records_read": 0, "catalog_records_parsed": 0}
    assert again.snapshots["orphan"].branch is None and again.branches["fork"].parent_branch is None


def test_children_index_is_made_at_first_use_and_kept_up_to_date():
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    a = cat.new_layer(root, b)
    kv.write(b)
    fresh = Catalog(kv)
    b = Batch()
    c = fresh.new_layer(a, b)  # before the index exists
    assert fresh.children == {0: {root}, root: {a}, a: {c}}
    d = fresh.new_layer(a, b)  # after
    e = fresh.new_layer(d, b)
    fresh.reparent(e, a, b)  # d merged away, as garbage collection does
    fresh.forget_layer(d, b)
    fresh.reparent(c, root, b)
    kv.write(b)
    assert fresh.children == {0: {root}, root: {a, c}, a: {e}}
    assert Catalog(kv).children == fresh.children


def test_layer_views_are_their_ancestry_and_share_blocks_along_a_line():
    import random
    rnd = random.Random(7)
    kv = memory_kv()
    cat = Catalog(kv)
    b = Batch()
    layers = [cat.new_layer(0, b)]
    for _ in range(600):  # long lines, forks, forks of forks
        layers.append(cat.new_layer(rnd.choice(layers[-30:]) if rnd.random() < 0.9 else rnd.choice(layers), b))
    kv.write(b)
    held = {}
    for top in rnd.sample(layers, 300):
        lv = cat.layer_view(top)
        want = cat.ancestry(top)
        assert lv.top == top and sorted(lv.ancestors) == sorted(want) and len(lv.ancestors) == len(want)
        for x in rnd.sample(layers, 40):
            assert (x in lv.ancestors) == (x in want)
        held[top] = lv
    # A line of 1,000 layers: every view on it holds the same blocks, O(n log n) ids in all.
    b = Batch()
    line = [layers[-1]]
    for _ in range(1000):
        line.append(cat.new_layer(line[-1], b))
    kv.write(b)
    views = [cat.layer_view(t) for t in reversed(line)]
    blocks = {id(level): len(level) for v in views for level in v.ancestors.levels}
    depth = len(views[0].ancestors)
    assert sum(blocks.values()) < 2 * depth * 11  # ~n/2 log2 n, where a set per view is n^2/2
    # the root-most block, shared (views[1] and views[5] are 1,023 and 1,019 layers deep)
    assert len(views[1].ancestors) == 1023 and views[1].ancestors.levels[0] is views[5].ancestors.levels[0]
    # Reshaped (a layer merged into its child, as garbage collection does): made again.
    b = Batch()
    mid = line[500]
    cat.reparent(line[501], cat.parents[mid], b)
    cat.forget_layer(mid, b)
    kv.write(b)
    for top in (line[-1], line[501], line[499]):
        lv = cat.layer_view(top)
        assert sorted(lv.ancestors) == sorted(cat.ancestry(top)) and mid not in lv.ancestors
