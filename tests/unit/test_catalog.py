"""meta.layers.Catalog: the layer tree, branches, snapshots, counters and usage, written
through batches and read back by a new Catalog on the same KV."""
from __future__ import annotations

from cowfs.kv.base import Batch
from cowfs.meta.layers import CF_META, MAX_U64, Branch, Catalog, Snapshot, Usage, layer_suffix, suffix_layer

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
    assert again.next_layer == other + 1


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
    assert views == [1, 2, 3] and again.new_view(Batch()) == 4


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
    assert [k for k, _ in kv.scan(CF_META, b"layer/", b"layer/")] == [b"layer/" + root.to_bytes(8, "big")]
