"""Reference counting of ObjectStore.apply (RefTxn), on MemoryKV: the node-pair shortcut (a
new tree node netted against the stored node it was made from, slot by changed slot) must
leave the store exactly as expanding every child does, both must match a recount from the
live roots, and the space accounting must match a recount from the records.  The
mount-level check of the same code is
test_fsck.py::test_rewrites_in_a_two_level_tree_keep_counts_exact (fsck's full walk).
"""
from __future__ import annotations

import random

import pytest

from cowfs.chunks import codec, refs
from cowfs.chunks.families import CF_OBJECTS, CF_PENDING, CF_REFS
from cowfs.chunks.refs import MissingObject, RefTxn, scan_space
from cowfs.chunks.tree import FANOUT, Root, TreeWriter, iter_chunks
from cowfs.kv.base import Batch

from unit.helpers import POOL, Objects, chunk, recount

SIZES = (1, 2, 40, FANOUT, FANOUT + 1, 700, 1100)  # across the one- and two-level boundaries


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

    def apply(self, st: Objects, ops: list[tuple], pairs: bool) -> dict[int, tuple[Root | None, int]]:
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


def dump(st: Objects) -> tuple[list, list, list, bytes]:
    return (list(st.kv.scan(CF_REFS, b"")), list(st.kv.scan(CF_OBJECTS, b"")),
            list(st.kv.scan(CF_PENDING, b"")), st.objects.space.pack())


@pytest.mark.parametrize("seed", range(10))
def test_node_pairs_count_exactly_as_expanding_every_child(tmp_path, seed):
    _pairs_count_as_expanding(tmp_path, seed)


@pytest.mark.parametrize("seed", range(4))
def test_counted_slots_of_paired_nodes_count_as_searching_them(tmp_path, monkeypatch, seed):
    """`RefApply._slots_of` counts a paired node's slots once it has been searched often (a
    fold of many chunks): from the first search here, with the same results."""
    asked = []
    real = refs.RefApply._slots_of

    def slots_of(self, y, h):
        asked.append(y in self.slot_index)
        return real(self, y, h)

    monkeypatch.setattr(refs, "INDEX_AFTER", 1)
    monkeypatch.setattr(refs.RefApply, "_slots_of", slots_of)
    _pairs_count_as_expanding(tmp_path, seed)
    assert any(asked), "no count of slots was used"


def _pairs_count_as_expanding(tmp_path, seed) -> None:
    stores = [Objects(tmp_path / name) for name in ("paired", "expanded")]
    paired, expanded = stores
    model = Model(random.Random(seed))
    try:
        for step in range(50):
            ops = model.batch()
            files = model.apply(paired, ops, pairs=True)
            assert model.apply(expanded, ops, pairs=False) == files
            model.adopt(files)
            assert dump(paired) == dump(expanded), f"seed {seed}, step {step}: {ops}"
            assert paired.objects.space == scan_space(paired.kv), f"seed {seed}, step {step}: {ops}"
            assert paired.refs() == recount(model.files, paired.objects.node), f"seed {seed}, step {step}"
        assert paired.stored() == set(paired.refs())
    finally:
        for st in stores:
            st.close()


def test_a_pair_whose_old_node_stays_keeps_its_children(tmp_path):
    """The old node is shared (a clone holds it): the new node's group of "+1 to each child"
    must be expanded, and nothing either node holds may be freed."""
    st = Objects(tmp_path / "s")
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
        assert st.refs() == recount({0: (a, 600), 1: (b, 600)}, st.objects.node)
    finally:
        st.close()


def test_a_dedup_hit_only_counts_and_the_last_reference_frees_the_tree(tmp_path):
    st = Objects(tmp_path / "s")
    try:
        h0, v0 = chunk(0)
        h1, v1 = chunk(1)

        def file_txn() -> tuple[RefTxn, Root]:
            txn = RefTxn()
            txn.add_object(h0, v0, [])
            txn.add_object(h1, v1, [])
            root = TreeWriter(st.objects.node, txn).update(None, {0: h0, 1: h1, 2: h0}, 3)
            txn.incref(root.hash)
            return txn, root

        txn, a = file_txn()
        assert st.commit(Batch(), txn) == (3, 0)  # the node and both chunks
        stored = dict(st.kv.scan(CF_OBJECTS, b""))
        txn, b = file_txn()
        assert b == a and st.commit(Batch(), txn) == (0, 0)  # the same content: nothing stored again
        assert dict(st.kv.scan(CF_OBJECTS, b"")) == stored
        assert st.refs() == {a.hash: (2, 2), h0: (2, 0), h1: (1, 0)}
        assert st.objects.space.logical_bytes == 2 * (2 * len(POOL[0]) + len(POOL[1]))
        for expect_freed, refs in ((0, {a.hash: (1, 1), h0: (2, 0), h1: (1, 0)}), (3, {})):
            txn = RefTxn()
            txn.decref(a.hash)
            assert st.commit(Batch(), txn) == (0, expect_freed)
            assert st.refs() == refs and st.objects.space == scan_space(st.kv)
        assert st.stored() == set() and list(st.kv.scan(CF_PENDING, b"")) == []
    finally:
        st.close()


def test_a_count_below_zero_or_an_unknown_reference_is_refused_and_writes_nothing(tmp_path):
    st = Objects(tmp_path / "s")
    try:
        h0, v0 = chunk(0)
        txn = RefTxn()
        txn.add_object(h0, v0, [])
        txn.incref(h0)
        st.commit(Batch(), txn)
        before = dump(st)
        txn = RefTxn()
        txn.decref(h0, 2)
        b = Batch()
        b.put(CF_OBJECTS, b"unrelated", b"x")
        with pytest.raises(codec.CorruptObject, match="below zero"):
            st.commit(b, txn)
        assert dump(st) == before and st.objects.space == scan_space(st.kv)
        txn = RefTxn()
        txn.incref(chunk(1)[0])  # never added: not in the store
        with pytest.raises(MissingObject, match="unknown object"):
            st.commit(Batch(), txn)
        assert dump(st) == before
    finally:
        st.close()


def test_a_fold_of_chunks_spread_over_every_leaf_of_a_big_file_pairs_every_new_node(monkeypatch):
    """A fold of 256 random chunks of a 16,384-chunk file (1 GiB) rewrites all 32 leaves,
    ~8 slots each: every new node is netted against the one it was made from, so no leaf's
    512 children are listed (with 8 pairs of at most 16 slots, 24 leaves were)."""
    applied = []
    real = refs.RefApply.run

    def run(self):
        applied.append(self)
        return real(self)

    monkeypatch.setattr(refs.RefApply, "run", run)
    st = Objects()
    n, rnd = 16 * FANOUT * 2, random.Random(24)

    def fresh(i: int) -> tuple[bytes, bytes]:
        data = i.to_bytes(8, "big") * 8
        return codec.chunk_hash(data), codec.encode_chunk(data, 1)

    try:
        txn, changes = RefTxn(), {}
        for i in range(n):
            h, v = fresh(i)
            txn.add_object(h, v, [])
            changes[i] = h
        root = TreeWriter(st.objects.node, txn).update(None, changes, n)
        txn.incref(root.hash)
        st.commit(Batch(), txn)
        txn, changes = RefTxn(), {}
        for k in range(256):
            h, v = fresh(n + k)
            txn.add_object(h, v, [])
            changes[rnd.randrange(n)] = h
        new = TreeWriter(st.objects.node, txn).update(root, changes, n)
        txn.incref(new.hash)
        txn.decref(root.hash)
        st.commit(Batch(), txn)
        ra = applied[-1]
        nodes = [h for h in ra.created if txn.new[h][0][0] == codec.KIND_NODE]
        assert len(nodes) == 33  # 32 leaves and the root
        assert set(nodes) <= set(ra.made_from), f"{len(nodes) - len(set(nodes) & set(ra.made_from))} listed"
        assert len(ra.freed) == len(changes) + 33  # the chunks replaced, the old nodes: nothing else
        assert dict(iter_chunks(new, st.objects.node)) == {**{i: fresh(i)[0] for i in range(n)}, **changes}
    finally:
        st.close()


def test_the_accounting_counts_remote_chunks_as_they_are_made_fetched_and_freed(tmp_path):
    """A lazy mount's reads look for F objects only while the accounting counts some
    (ObjectStore.remote_left): the count follows creation, re-encoding and freeing exactly."""
    st = Objects(tmp_path / "s")
    try:
        chunks = [chunk(k) for k in range(3)]
        remote = {h: codec.encode_remote(codec.RemoteLoc(0, b"R", len(POOL[k]), k << 20, len(v) - 1, bytes(32)))
                  for k, (h, v) in enumerate(chunks)}
        txn = RefTxn()
        for h, _v in chunks:
            txn.add_object(h, remote[h], [])
        root = TreeWriter(st.objects.node, txn).update(None, {i: h for i, (h, _v) in enumerate(chunks)}, 3)
        txn.incref(root.hash)
        st.commit(Batch(), txn)
        assert st.objects.space.remote_chunks == 3 and st.objects.space == scan_space(st.kv)
        f = st.objects.space.figures()
        assert f["remote_bytes"] == sum(len(POOL[k]) for k in range(3)) == f["unique_bytes"], f
        assert f["compression_saved_bytes"] == 0, "chunks on the remote are no bytes saved by compression"
        assert not st.objects.remote_left(), "no fetcher: nothing to look for"
        st.objects.fetcher = object()  # type: ignore[assignment]
        assert st.objects.remote_left()
        txn = RefTxn()  # two fetched: re-encoded as local chunks
        txn.recode = {h: v for h, v in chunks[:2]}
        st.commit(Batch(), txn)
        assert st.objects.space.remote_chunks == 1 and st.objects.space == scan_space(st.kv)
        assert st.objects.space.remote_bytes == len(POOL[2])
        assert st.objects.remote_left()
        txn = RefTxn()  # the file gone: the last F object freed with it
        txn.decref(root.hash)
        st.commit(Batch(), txn)
        assert st.objects.space.remote_chunks == 0 and st.objects.space == scan_space(st.kv)
        assert st.objects.space.remote_bytes == 0
        assert not st.objects.remote_left()
    finally:
        st.close()


@pytest.mark.parametrize("fmt,missing", [(7, 2), (8, 1)])
def test_an_older_store_gets_its_remote_chunks_and_bytes_counted_at_first_open(tmp_path, fmt, missing):
    """Format 7 kept no count of F objects, format 8 no count of their bytes (its space record
    is `missing` fields shorter): the first open by this cowfs counts them, so a lazy mount of
    an older store still fetches ahead, and its figures keep those bytes out of compression's."""
    import json

    from cowfs.chunks.families import CF_SPACE, SPACE_KEY
    from cowfs.meta.layers import CF_META
    from cowfs.store import FORMAT_VERSION, Store, init_store

    path = tmp_path / "store"
    init_store(str(path))
    st = Store(str(path))
    h, v = chunk(0)
    txn = RefTxn()
    txn.add_object(h, codec.encode_remote(codec.RemoteLoc(0, b"R", len(POOL[0]), 0, len(v) - 1, bytes(32))), [])
    txn.incref(h)
    st.commit(Batch(), txn)
    assert st.objects.space.remote_chunks == 1 and st.objects.space.remote_bytes == len(POOL[0])
    b = Batch()  # what the older format left: the record without the counts, the old number
    b.put(CF_SPACE, SPACE_KEY, st.objects.space.pack()[:-8 * missing])
    b.put(CF_META, b"format", str(fmt).encode())
    st.kv.write(b)
    st.close()
    marker = path / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": fmt}))
    st = Store(str(path))
    try:
        space = st.objects.space
        assert space.remote_chunks == 1 and space.remote_bytes == len(POOL[0]) and space == scan_space(st.kv)
        assert space.figures()["compression_saved_bytes"] == 0, "a chunk on the remote saved nothing here"
    finally:
        st.close()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION == 12


@pytest.mark.parametrize("seed", range(6))
def test_a_transaction_that_only_adds_counts_as_the_general_path(monkeypatch, seed):
    """`RefApply._run_adding` (transactions that only add references, their new objects known
    absent: a lazy mount's build) leaves the store exactly as the general path: files of one
    chunk (the root is the chunk) and of one- and two-level trees, chunks new, stored by an
    earlier commit, or brought again though stored, references to stored roots."""
    rnd = random.Random(seed)
    pool = [bytes([k % 251]) * (50 + k) for k in range(40)]
    taken: list[str] = []
    real = refs.RefApply._run_adding

    def adding(self):
        taken.append(path)
        return self._run_general() if path == "general" else real(self)

    monkeypatch.setattr(refs.RefApply, "_run_adding", adding)
    stores = {"adding": Objects(), "general": Objects()}
    files: dict[int, tuple[Root | None, int]] = {}
    adding_steps = 0
    try:
        for step in range(8):
            stored = stores["adding"].stored()
            plan = []
            for _ in range(rnd.choice((1, 5, 30))):
                if files and rnd.random() < 0.15:
                    plan.append(("again", rnd.choice(list(files))))
                else:
                    n = rnd.choice((1, 1, 1, 2, 40, FANOUT + 1, 1100))
                    plan.append(("file", [rnd.randrange(len(pool)) for _ in range(n)], rnd.random()))
            results = {}
            for path, st in stores.items():
                txn, made = RefTxn(), {}
                for i, op in enumerate(plan):
                    if op[0] == "again":     # another file of a stored root (a clone's)
                        txn.incref(files[op[1]][0].hash)
                        made[len(files) + i] = files[op[1]]
                        continue
                    ks, again = op[1], op[2]
                    for k in set(ks):
                        h, v = codec.chunk_hash(pool[k]), codec.encode_chunk(pool[k], 1)
                        if h not in stored or again < 0.3:
                            txn.add_object(h, v, [])
                    root = TreeWriter(st.objects.node, txn).update(
                        None, {j: codec.chunk_hash(pool[k]) for j, k in enumerate(ks)}, len(ks))
                    txn.incref(root.hash)
                    made[len(files) + i] = (root, len(ks))
                txn.absent = txn.new.keys() - stored
                taken.clear()
                counts = st.commit(Batch(), txn)
                # (nothing new, nothing absent: the general path, for both)
                assert taken == ([path] if txn.absent else []), "the adding path was not taken"
                adding_steps += bool(taken)
                results[path] = (counts, txn.root_sizes, made)
            assert results["adding"] == results["general"], f"seed {seed}, step {step}"
            files.update(results["adding"][2])
            a = stores["adding"]
            assert dump(a) == dump(stores["general"]), f"seed {seed}, step {step}"
            assert a.objects.space == scan_space(a.kv), f"seed {seed}, step {step}"
            assert a.refs() == recount(files, a.objects.node), f"seed {seed}, step {step}"
        assert adding_steps >= 8, adding_steps     # of 16 commits (8 steps, 2 stores)
        # A reference to an object the store lacks is refused, and nothing is written.
        before = dump(stores["adding"])
        txn = RefTxn()
        txn.incref(codec.chunk_hash(b"never stored"))
        txn.absent = {codec.chunk_hash(b"never stored either")}
        path = "adding"
        with pytest.raises(MissingObject):
            stores["adding"].commit(Batch(), txn)
        assert dump(stores["adding"]) == before
    finally:
        for st in stores.values():
            st.close()
