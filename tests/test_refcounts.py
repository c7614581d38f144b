"""Reference counting of ObjectStore.apply, in process: the node-pair shortcut (a new tree
node netted against the stored node it was made from, slot by changed slot) must leave the
store exactly as expanding every child does, and both must match a recount from the live
roots.  The mount-level check of the same code is
test_fsck.py::test_rewrites_in_a_two_level_tree_keep_counts_exact (fsck's full walk).
"""
from __future__ import annotations

import random

import pytest

from cowfs.chunks import codec
from cowfs.chunks.store import CF_OBJECTS, CF_REFS, RefTxn, parse_ref
from cowfs.chunks.tree import FANOUT, Root, TreeWriter, iter_chunks
from cowfs.kv.base import Batch
from cowfs.store import Store, init_store

POOL = [bytes([k]) * (100 + k) for k in range(1, 7)]  # few chunks: files share and repeat them
SIZES = (1, 2, 40, FANOUT, FANOUT + 1, 700, 1100)  # across the one- and two-level boundaries


def chunk(k: int) -> tuple[bytes, bytes]:
    return codec.chunk_hash(POOL[k]), codec.encode_chunk(POOL[k], 1)


class Model:
    """Files as (root, chunk count), changed by random batches of writes, clones, deletes."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.files: dict[int, tuple[Root | None, int]] = {}
        self.content: dict[int, dict[int, bytes]] = {}  # file -> chunk index -> hash
        self.pending_content: dict[int, dict[int, bytes]] = {}  # after the batch being applied
        self.next = 0

    def batch(self) -> list[tuple]:
        ops = []
        for _ in range(self.rnd.choice((1, 1, 2, 3))):
            live = list(self.files)
            kind = self.rnd.random()
            if not live or kind < 0.5:
                f = self.rnd.choice(live) if live and self.rnd.random() < 0.8 else None
                n = self.rnd.choice(SIZES) if f is None or self.rnd.random() < 0.2 else None
                changes = [(self.rnd.randrange(FANOUT * 3), self.rnd.randrange(-1, len(POOL)))
                           for _ in range(self.rnd.choice((1, 1, 2, 5, 40)))]
                ops.append(("write", f, n, changes))
            elif kind < 0.75:
                ops.append(("clone", self.rnd.choice(live)))
            else:
                ops.append(("delete", self.rnd.choice(live)))
        return ops

    def apply(self, st: Store, ops: list[tuple], pairs: bool) -> dict[int, tuple[Root | None, int]]:
        """Run ops as one transaction on st; return the files afterwards (st is not the model's)."""
        files = dict(self.files)
        content = {f: dict(c) for f, c in self.content.items()}
        nxt = self.next
        txn = RefTxn()
        for op in ops:
            if op[0] == "write":
                _, f, n, changes = op
                if f is None or f not in files:
                    f, root, size = nxt, None, 0
                    content[f] = {}
                    nxt += 1
                else:
                    root, size = files[f]
                n = n if n is not None else max(size, 1)
                ch: dict[int, bytes | None] = {}
                for idx, k in changes:
                    idx %= n
                    if k < 0:
                        ch[idx] = None
                        content[f].pop(idx, None)
                    else:
                        h, value = chunk(k)
                        txn.add_object(h, value, [])
                        ch[idx] = content[f][idx] = h
                content[f] = {i: h for i, h in content[f].items() if i < n}
                new = TreeWriter(st.objects.node, txn).update(root, ch, n)
                if new != root:
                    txn.incref(new.hash if new else None)
                    txn.decref(root.hash if root else None)
                files[f] = (new, n)
            elif op[0] == "clone" and op[1] in files:
                root, size = files[op[1]]
                txn.incref(root.hash if root else None)
                files[nxt] = (root, size)
                content[nxt] = dict(content[op[1]])
                nxt += 1
            elif op[0] == "delete" and op[1] in files:
                root, _ = files.pop(op[1])
                del content[op[1]]
                txn.decref(root.hash if root else None)
        if not pairs:
            txn.pairs.clear()
        st.commit(Batch(), txn)
        for f, (root, _n) in files.items():
            assert dict(iter_chunks(root, st.objects.node)) == content[f], f"file {f} reads wrong chunks"
        self.pending_content = content
        return files

    def adopt(self, files: dict[int, tuple[Root | None, int]]) -> None:
        self.files = files
        self.content = self.pending_content
        self.next = max(self.next, max(files, default=-1) + 1)


def dump(st: Store) -> tuple[list, list, bytes]:
    return (list(st.kv.scan(CF_REFS, b"")), list(st.kv.scan(CF_OBJECTS, b"")), st.objects.space.pack())


def recount(st: Store, files: dict[int, tuple[Root | None, int]]) -> dict[bytes, tuple[int, int]]:
    """(count, roots) of every object, from the live roots: one reference per file root, one
    per slot of every distinct live node."""
    want: dict[bytes, list[int]] = {}
    seen: set[bytes] = set()

    def visit(h: bytes, level: int) -> None:
        if level == 0 or h in seen:
            return
        seen.add(h)
        for c in codec.node_children(st.objects.node(h)):
            want.setdefault(c, [0, 0])[0] += 1
            visit(c, level - 1)

    for root, _n in files.values():
        if root is not None:
            w = want.setdefault(root.hash, [0, 0])
            w[0] += 1
            w[1] += 1
            visit(root.hash, root.depth)
    return {h: (c, r) for h, (c, r) in want.items()}


@pytest.mark.parametrize("seed", range(10))
def test_node_pairs_count_exactly_as_expanding_every_child(tmp_path, seed):
    stores = []
    for name in ("paired", "expanded"):
        init_store(str(tmp_path / name))
        stores.append(Store(str(tmp_path / name), cache_l1=1 << 20, cache_l2=1 << 20))
    paired, expanded = stores
    model = Model(random.Random(seed))
    try:
        for step in range(50):
            ops = model.batch()
            files = model.apply(paired, ops, pairs=True)
            assert model.apply(expanded, ops, pairs=False) == files
            model.adopt(files)
            assert dump(paired) == dump(expanded), f"seed {seed}, step {step}: {ops}"
        got = {h: (r.count, r.roots) for h, r in ((h, parse_ref(v)) for h, v in paired.kv.scan(CF_REFS, b""))}
        assert got == recount(paired, model.files)
        assert {h for h, _ in paired.kv.scan(CF_OBJECTS, b"")} == set(got)
    finally:
        for st in stores:
            st.close()


def test_a_pair_whose_old_node_stays_keeps_its_children(tmp_path):
    """The old node is shared (a clone holds it): the new node's group of "+1 to each child"
    must be expanded, and nothing either node holds may be freed."""
    init_store(str(tmp_path / "s"))
    st = Store(str(tmp_path / "s"))
    try:
        txn = RefTxn()
        h0, v0 = chunk(0)
        h1, v1 = chunk(1)
        txn.add_object(h0, v0, [])
        a = TreeWriter(st.objects.node, txn).update(None, {i: h0 for i in range(600)}, 600)
        txn.incref(a.hash)
        txn.incref(a.hash)  # the clone
        st.commit(Batch(), txn)
        txn = RefTxn()
        txn.add_object(h1, v1, [])
        b = TreeWriter(st.objects.node, txn).update(a, {3: h1, 599: h1}, 600)
        assert txn.pairs, "the writer did not record where the new nodes came from"
        txn.incref(b.hash)
        txn.decref(a.hash)
        st.commit(Batch(), txn)
        got = {h: (parse_ref(v).count, parse_ref(v).roots) for h, v in st.kv.scan(CF_REFS, b"")}
        assert got == recount(st, {0: (a, 600), 1: (b, 600)})
    finally:
        st.close()
