"""chunks.tree: copy-on-write chunk trees of depth 0, 1 and 2, holes, growth and truncation;
updates rewrite only the nodes on the changed paths; random updates read as a dict model
and give the same root as building the content from scratch."""
from __future__ import annotations

import random

import pytest

from cowfs.chunks import codec
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.tree import FANOUT, Root, TreeWriter, capacity, depth_for, extent, iter_chunks, lookup

C = [codec.chunk_hash(b"chunk %d" % k) for k in range(8)]


class Nodes:
    """Committed tree nodes (hash -> body), the way ObjectStore.node serves them."""

    def __init__(self) -> None:
        self.body: dict[bytes, bytes] = {}

    def load(self, h: bytes) -> bytes:
        return self.body[h]

    def update(self, root: Root | None, changes: dict[int, bytes | None], n: int) -> tuple[Root | None, RefTxn]:
        txn = RefTxn()
        new = TreeWriter(self.load, txn).update(root, changes, n)
        for h, (value, children) in txn.new.items():
            assert value[0] == codec.KIND_NODE and codec.node_hash(value[1:]) == h
            assert children == codec.node_children(value[1:])
            self.body[h] = value[1:]
        return new, txn

    def read(self, root: Root | None) -> dict[int, bytes]:
        return dict(iter_chunks(root, self.load))


def test_depth_for_and_capacity():
    assert [depth_for(n) for n in (1, 2, FANOUT, FANOUT + 1, FANOUT**2, FANOUT**2 + 1)] == [1, 1, 1, 2, 2, 3]
    assert capacity(0) == 1 and capacity(2) == FANOUT**2


def test_empty_and_single_chunk_files_have_no_node():
    t = Nodes()
    assert t.update(None, {}, 0)[0] is None and t.read(None) == {} and lookup(None, 0, t.load) is None
    root, txn = t.update(None, {0: C[1]}, 1)
    assert root == Root(0, C[1]) and not txn.new
    assert lookup(root, 0, t.load) == C[1] and lookup(root, 1, t.load) is None
    assert t.update(None, {0: None}, 1)[0] is None  # a one-chunk hole is no tree at all
    assert t.update(root, {}, 0)[0] is None


def test_one_level_tree_with_holes():
    t = Nodes()
    root, txn = t.update(None, {0: C[0], 2: C[2]}, 5)
    assert root.depth == 1 and len(txn.new) == 1
    assert len(t.body[root.hash]) == 3 * codec.HASH_LEN  # trailing holes take no slots
    assert [lookup(root, i, t.load) for i in range(6)] == [C[0], None, C[2], None, None, None]
    assert t.read(root) == {0: C[0], 2: C[2]}
    assert lookup(root, FANOUT, t.load) is None  # beyond what the depth can hold
    assert t.update(root, {0: None, 2: None}, 5)[0] is None  # all holes: no tree


def test_two_level_tree_rewrites_only_the_changed_path():
    t = Nodes()
    n = 2 * FANOUT + 10
    root, _ = t.update(None, {i: C[i % 3] for i in range(n)}, n)
    assert root.depth == 2
    assert lookup(root, FANOUT, t.load) == C[FANOUT % 3] and lookup(root, n - 1, t.load) == C[(n - 1) % 3]
    stored = set(t.body)
    new, txn = t.update(root, {FANOUT + 7: C[7]}, n)
    # New: the leaf node on the path and the root.  (The last leaf node, which straddles the
    # file's end, is made again unchanged, so txn.new lists it too; apply finds it stored.)
    assert len(set(txn.new) - stored) == 2
    old_slots = codec.node_children(t.body[root.hash])
    new_slots = codec.node_children(t.body[new.hash])
    assert [a == b for a, b in zip(old_slots, new_slots)] == [True, False, True]  # siblings shared
    assert txn.pairs == {new.hash: root.hash, new_slots[1]: old_slots[1]}
    assert lookup(new, FANOUT + 7, t.load) == C[7] and lookup(root, FANOUT + 7, t.load) == C[(FANOUT + 7) % 3]
    # The new tree references each of its new nodes' children once per slot, the old root untouched.
    assert txn.new[new.hash][1] == new_slots


def test_growth_lifts_and_truncation_descends():
    t = Nodes()
    root, _ = t.update(None, {0: C[0]}, 1)
    grown, _ = t.update(root, {FANOUT + 1: C[1]}, FANOUT + 2)
    assert grown.depth == 2 and t.read(grown) == {0: C[0], FANOUT + 1: C[1]}
    cut, txn = t.update(grown, {}, 3)
    assert cut.depth == 1 and t.read(cut) == {0: C[0]}
    assert t.update(grown, {}, 1)[0] == Root(0, C[0])
    hole_first, _ = t.update(grown, {0: None}, FANOUT + 2)
    assert t.update(hole_first, {}, 1)[0] is None
    assert t.update(hole_first, {}, FANOUT)[0] is None  # only holes left below the cut


SIZES = (1, 2, 3, FANOUT - 1, FANOUT, FANOUT + 1, 2 * FANOUT + 5, 3 * FANOUT)


@pytest.mark.parametrize("seed", range(8))
def test_random_updates_read_as_the_model_and_are_canonical(seed):
    rnd = random.Random(seed)
    t = Nodes()
    root, n, model = None, 0, {}
    for _ in range(25):
        new_n = rnd.choice(SIZES) if rnd.random() < 0.3 else max(n, 1)
        changes: dict[int, bytes | None] = {}
        for _ in range(rnd.choice((1, 2, 10, 60))):
            i = rnd.randrange(new_n)
            changes[i] = rnd.choice(C + [None])
        root, _ = t.update(root, changes, new_n)
        model = {i: h for i, h in model.items() if i < new_n}
        for i, h in changes.items():
            if h is None:
                model.pop(i, None)
            else:
                model[i] = h
        n = new_n
        assert t.read(root) == model
        for i in rnd.sample(range(n), min(n, 20)) + [n, n + FANOUT]:
            assert lookup(root, i, t.load) == model.get(i)
        if root is not None:
            assert root.depth == (0 if n == 1 else depth_for(n))
        # The same content built at once gives the same root: equal files share their tree.
        assert Nodes().update(None, dict(model), n)[0] == root


def test_iter_chunks_from_an_index_and_extent():
    t = Nodes()
    model = {0: C[0], 5: C[1], FANOUT + 3: C[2], 2 * FANOUT: C[3]}
    root, _ = t.update(None, model, 3 * FANOUT)
    for start in (0, 1, 5, 6, FANOUT, FANOUT + 4, 2 * FANOUT, 2 * FANOUT + 1):
        assert list(iter_chunks(root, t.load, start)) == sorted((i, h) for i, h in model.items() if i >= start)
    assert extent(root, t.load) == 2 * FANOUT + 1 and extent(None, t.load) == 0
    assert extent(Root(0, C[0]), t.load) == 1 and list(iter_chunks(Root(0, C[0]), t.load, 1)) == []


class Sizes:
    """Content sizes as refs records keep them: a chunk's is its length, a node's the sum."""

    def __init__(self, t: Nodes, lengths: dict[bytes, int]) -> None:
        self.t, self.lengths = t, lengths

    def __call__(self, h: bytes) -> int:
        if h in self.lengths:
            return self.lengths[h]
        return sum(self(c) for c in codec.node_children(self.t.body[h]))


@pytest.mark.parametrize("seed", range(8))
def test_fill_sets_ranges_like_the_model(seed):
    """fill(value) over [first, last): every chunk (or, only_holes, every hole) takes value,
    whole subtrees at once; with only_holes, the stored chunks shorter than a chunk are named."""
    rnd = random.Random(100 + seed)
    t = Nodes()
    short_chunk = codec.chunk_hash(b"short")
    lengths = {h: codec.CHUNK for h in C} | {short_chunk: 100}
    size_of = Sizes(t, lengths)
    n = rnd.choice((3, FANOUT + 9, 2 * FANOUT + 5))
    model = {i: rnd.choice(C + [short_chunk]) for i in rnd.sample(range(n), n // 3)}
    root, _ = t.update(None, model, n)
    fill = C[7]
    for _ in range(6):
        first = rnd.randrange(n + FANOUT)
        last = first + rnd.choice((1, 2, FANOUT, FANOUT * 3 + 7, rnd.randrange(1, 3 * FANOUT)))
        value = rnd.choice((None, fill))
        only_holes = value is not None and rnd.random() < 0.5
        txn = RefTxn()
        new, short = TreeWriter(t.load, txn).fill(root, first, last, value, only_holes, size_of)
        for h, (body, children) in txn.new.items():
            t.body[h] = body[1:]
        want_short = sorted(i for i, h in model.items() if first <= i < last and h == short_chunk) if only_holes else []
        for i in range(first, last):
            if value is None:
                model.pop(i, None)
            elif not only_holes or i not in model:
                model[i] = value
        assert t.read(new) == model and sorted(short) == want_short
        assert extent(new, t.load) == (max(model) + 1 if model else 0)
        # a subtree's worth of fill takes a few nodes, not one per chunk
        assert len(txn.new) <= 4 * (new.depth if new else 1) + 4
        root = new
