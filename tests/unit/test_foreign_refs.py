"""Foreign references (docs/design-many-processes.md, "Step 6": "Reference counts: per database,
exactly these families"), over two real RocksDB databases without a daemon: a base database
whose layer wrote files, and a fork's home over it (`OverlayKV` of the home and the base
opened read-only, objects read through).  The fork chmods, renames, partially rewrites,
reflinks and deletes base files: the home counts exactly the references of its own records
(what fsck recounts), expands nothing of the base's objects, stores none of them, and the
base database does not change by one key."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from cowfs.blob.memory import MemoryBlobStore
from cowfs.cache import ChunkCache
from cowfs.chunks import codec, objects, refs, upgrade
from cowfs.chunks.families import CF_OBJECTS, CF_REFS
from cowfs.chunks.objects import ObjectStore
from cowfs.chunks.packs import Packs
from cowfs.chunks.refs import MissingObject, RefTxn, parse_ref, scan_space, tree_sizes
from cowfs.chunks.tree import Root, TreeWriter, iter_chunks
from cowfs.fsck import Fsck
from cowfs.kv.base import KV, Batch
from cowfs.kv.overlay import OverlayKV
from cowfs.kv.rocks import RocksKV
from cowfs.meta.layers import layer_suffix
from cowfs.meta.versioned import CF_INODES, ino_key
from cowfs.store import FAMILIES

from unit.helpers import record

BASE_LAYER, FORK_LAYER = 1, 2
SIZES = {1: 1, 2: 40, 3: 513, 4: 700, 5: 3}  # ino -> chunks: depth 1 and 2 trees


def data(k: int) -> bytes:
    """Chunk content k: small (inline records), every file repeating some of its chunks."""
    return b"%d." % k * (60 + k % 7)


def open_db(path: Path, read_only: bool = False) -> RocksKV:
    return RocksKV(str(path), FAMILIES, blob_families=(CF_OBJECTS,), read_only=read_only)


def everything(kv: KV) -> dict[str, list[tuple[bytes, bytes]]]:
    return {cf: list(kv.scan(cf, b"")) for cf in FAMILIES}


class Db:
    """One database's object store, committed as cowfs.store.Store.commit does; its layer's
    inode records (root per inode) beside, for fsck's recount."""

    def __init__(self, kv: KV, home: KV, packs: Packs, layer: int, below: list[KV] | None = None) -> None:
        self.kv, self.home, self.layer = kv, home, layer
        self.objects = ObjectStore(kv, ChunkCache(1 << 20, 1 << 20), packs, home=home, below=below or [])
        self.objects.space = upgrade.rebuild(home, {})  # an empty database's accounting
        self.roots: dict[int, Root] = {}  # inode -> its root in this layer's record

    def commit(self, txn: RefTxn, records: dict[int, Root | None]) -> None:
        """records: inode -> its new root in this layer (None: its version here deleted)."""
        batch = Batch()
        for ino, root in records.items():
            key = ino_key(ino) + layer_suffix(self.layer)
            if root is None:
                batch.delete(CF_INODES, key)
                self.roots.pop(ino, None)
            else:
                batch.put(CF_INODES, key, record(root=root))
                self.roots[ino] = root
        try:
            self.objects.apply(txn, batch)
            self.kv.write(batch)
        except BaseException:
            self.objects.abort(txn)
            raise
        self.objects.settle()

    def fsck(self) -> Fsck:
        """fsck's reference and accounting checks of this database (its own records only)."""
        store = SimpleNamespace(kv=self.kv, objects=self.objects, packs=self.objects.packs,
                                catalog=SimpleNamespace(parents={}),
                                meta=SimpleNamespace(shared=SimpleNamespace(ranges={})))
        f = Fsck(store)  # type: ignore[arg-type]
        f.check_references()
        f.check_space()
        return f


def write_file(db: Db, txn: RefTxn, root: Root | None, n: int, changes: dict[int, int],
               pairs: bool = True) -> Root | None:
    """The file's new root after the chunk changes (index -> content k); pairs False: the
    new nodes are counted child by child instead of netted against the nodes they came from."""
    for k in changes.values():
        h = codec.chunk_hash(data(k))
        txn.add_object(h, codec.encode_chunk(data(k), 1), [])
    ch = {i: codec.chunk_hash(data(k)) for i, k in changes.items()}
    new = TreeWriter(db.objects.node, txn).update(root, ch, n)
    if not pairs:
        txn.pairs.clear()
    return new


def content(objects: ObjectStore, root: Root | None) -> dict[int, bytes]:
    return {i: objects.load(h) for i, h in iter_chunks(root, objects.node)}


def recount(home: KV, view: KV, roots: list[Root]) -> dict[bytes, tuple[int, int]]:
    """(count, roots) the home must hold: one per record root, one per slot of each distinct
    node the home stores; what it does not store is foreign, not walked, and must be below."""
    want: Counter[bytes] = Counter(r.hash for r in roots)
    from_roots = Counter(want)
    seen: set[bytes] = set()
    todo = list(want)
    while todo:
        h = todo.pop()
        if h in seen:
            continue
        seen.add(h)
        raw = home.get(CF_OBJECTS, h)
        if raw is None:
            assert view.get(CF_OBJECTS, h) is not None, f"{h.hex()} is nowhere"
            continue
        if raw[0] == codec.KIND_NODE:
            for c in codec.node_children(raw[1:]):
                want[c] += 1
                todo.append(c)
    return {h: (n, from_roots[h]) for h, n in want.items()}


class Lineage(NamedTuple):
    below: RocksKV  # the base database, opened read-only as the fork's lower member
    base: ObjectStore  # a reader of it alone
    files: dict[int, Root]  # inode -> its root in the base's layer
    fork: Db
    written: dict[str, list[tuple[bytes, bytes]]]  # every key of the base as its writer left it


@pytest.fixture
def lineage(tmp_path, request):
    """The base's layer wrote SIZES' files and was closed; the fork's home is a new database
    over it.  Parameter "walk": the fork's object store is not told the database below, and
    sums foreign sizes from the objects (else from the base's refs records)."""
    packs = Packs(MemoryBlobStore())
    base_kv = open_db(tmp_path / "base")
    base = Db(base_kv, base_kv, packs, BASE_LAYER)
    rnd = random.Random(5)
    txn = RefTxn()
    files = {}
    for ino, n in SIZES.items():
        files[ino] = write_file(base, txn, None, n, {i: rnd.randrange(400) for i in range(n)})
        txn.incref(files[ino].hash)
    base.commit(txn, files)
    assert base.fsck().report.clean
    base_kv.close()
    below = open_db(tmp_path / "base", read_only=True)
    written = everything(below)
    home = open_db(tmp_path / "home")
    sizes_below = None if getattr(request, "param", "refs") == "walk" else [below]
    fork = Db(OverlayKV(home, [below], through=[CF_OBJECTS]), home, packs, FORK_LAYER, sizes_below)
    yield Lineage(below, ObjectStore(below, ChunkCache(1 << 20, 1 << 20), packs), files, fork, written)
    home.close()
    below.close()
    packs.close()


def check(fork: Db) -> Fsck:
    """The home's counts, sizes and accounting are exact, and fsck says so."""
    home, view = fork.home, fork.kv
    stored = {h: parse_ref(v) for h, v in home.scan(CF_REFS, b"")}
    assert {h: (r.count, r.roots) for h, r in stored.items()} == recount(home, view, list(fork.roots.values()))
    sizes = tree_sizes(view, list(stored))
    assert {h: r.size for h, r in stored.items()} == {h: sizes[h] for h in stored}
    assert all(r.pins == 0 for r in stored.values())
    assert scan_space(home) == fork.objects.space
    assert {h for h, _ in home.scan(CF_OBJECTS, b"")} <= set(stored), "the home stores an object it does not count"
    f = fork.fsck()
    assert f.report.clean, f.report.problems
    return f


@pytest.mark.parametrize("lineage", ["refs", "walk"], indirect=True)
@pytest.mark.parametrize("pairs", [True, False], ids=["paired", "expanded"])
def test_a_forks_home_counts_base_files_it_changes_exactly(lineage, pairs, monkeypatch):
    """Paired: a rewritten node is netted against the base's node it was made from (a pending
    "+1 to each child" of a foreign node); expanded: counted slot by slot."""
    below, base, r, fork, written = lineage
    paired_with = []
    real = refs.RefApply.pair_of

    def pair_of(self, h, value):
        got = real(self, h, value)
        if got is not None:
            paired_with.append(got[0])
        return got

    monkeypatch.setattr(refs.RefApply, "pair_of", pair_of)
    want = {ino: content(base, root) for ino, root in r.items()}
    assert fork.objects.stored(r[1].hash) is None, "dedup's lookup reads the home only"
    assert fork.objects.load(r[1].hash) == base.load(r[1].hash), "loads read through"
    for ino, root in r.items():  # a base file's allocation, seen from the fork before it counts it
        assert fork.objects.content_size(root.hash) == sum(map(len, want[ino].values()))

    # chmod 1, rename 2 (a new version of each in the fork's layer, same root), reflink 3 as 6.
    txn = RefTxn()
    for h in (r[1].hash, r[2].hash, r[3].hash):
        txn.incref(h)
    fork.commit(txn, {1: r[1], 2: r[2], 6: r[3]})
    f = check(fork)
    assert f.report.counts["foreign_objects"] == 3
    assert not list(fork.home.scan(CF_OBJECTS, b"")), "nothing below a foreign reference is expanded or stored"

    # Partial rewrites: one chunk of each leaf of 4, then again (the fork's own version replaced),
    # and of the clone 6; a chunk the base has (stored again: no dedup across databases yet).
    txn = RefTxn()
    r4 = write_file(fork, txn, r[4], SIZES[4], {5: 1000, 600: 1001, 601: 7}, pairs)
    txn.incref(r4.hash)
    fork.commit(txn, {4: r4})
    check(fork)
    txn = RefTxn()
    r4b = write_file(fork, txn, r4, SIZES[4], {5: 1002, 6: 1003}, pairs)
    txn.incref(r4b.hash)
    txn.decref(r4.hash)
    fork.commit(txn, {4: r4b})
    check(fork)
    txn = RefTxn()
    r6 = write_file(fork, txn, r[3], SIZES[3], {512: 1004, 0: 1005}, pairs)
    txn.incref(r6.hash)
    txn.decref(r[3].hash)
    fork.commit(txn, {6: r6})
    f = check(fork)
    assert f.report.counts["foreign_objects"] > 3
    assert (r[4].hash in paired_with and r[3].hash in paired_with) == pairs
    assert content(fork.objects, r4b) == {**want[4], 5: data(1002), 6: data(1003), 600: data(1001), 601: data(7)}
    assert content(fork.objects, r6) == {**want[3], 512: data(1004), 0: data(1005)}
    assert fork.objects.content_size(r4b.hash) == sum(map(len, content(fork.objects, r4b).values()))

    # Deletes: the chmodded and the renamed file, the clone, the rewritten file; 5 (untouched in
    # the fork) gets a deletion record only.  The home ends empty, the base as it was.
    for ino, root in ((1, r[1]), (2, r[2]), (6, r6), (4, r4b)):
        txn = RefTxn()
        txn.decref(root.hash)
        fork.commit(txn, {ino: None})
        check(fork)
    assert not list(fork.home.scan(CF_REFS, b"")) and not list(fork.home.scan(CF_OBJECTS, b""))
    assert fork.objects.space == scan_space(fork.home) and fork.objects.space.logical_bytes == 0
    assert everything(below) == written
    assert {ino: content(fork.objects, root) for ino, root in r.items()} == want


def test_a_foreign_count_that_reaches_zero_deletes_nothing_below(lineage):
    """A free of a foreign node neither expands its children into negative home counts nor
    deletes an object record; a decrement past what the home counted is refused."""
    below, _base, files, fork, written = lineage
    root = files[4]
    txn = RefTxn()
    txn.incref(root.hash, 2)
    fork.commit(txn, {4: root, 7: root})
    check(fork)
    txn = RefTxn()
    txn.decref(root.hash, 2)
    batch = Batch()
    assert fork.objects.apply(txn, batch) == (0, 1)
    fork.objects.abort(None)
    assert [(cf, key) for cf, key, value in batch.ops if value is None] == [(CF_REFS, root.hash)]
    txn = RefTxn()
    txn.decref(root.hash, 2)
    fork.commit(txn, {4: None, 7: None})
    check(fork)
    txn = RefTxn()
    txn.decref(root.hash)
    with pytest.raises(codec.CorruptObject):
        fork.commit(txn, {})
    assert everything(below) == written


def test_fsck_of_a_home_reports_a_count_nothing_below_resolves(lineage):
    fork, files = lineage.fork, lineage.files
    txn = RefTxn()
    txn.incref(codec.chunk_hash(b"in no database"))
    with pytest.raises(MissingObject):
        fork.commit(txn, {})
    root = files[1]
    txn = RefTxn()
    txn.incref(root.hash)
    fork.commit(txn, {1: root})
    check(fork)
    lost = Root(root.depth, codec.chunk_hash(b"lost"))
    b = Batch()
    b.put(CF_INODES, ino_key(9) + layer_suffix(FORK_LAYER), record(root=lost))
    b.put(CF_REFS, lost.hash, parse_ref(fork.home.get(CF_REFS, root.hash)).pack())
    fork.home.write(b)
    problems = fork.fsck().report.problems
    assert any(lost.hash.hex() in p and "missing" in p for p in problems), problems


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_of_a_fork_keep_its_counts_exact(lineage, seed):
    """Batches of 1-3 random operations on the fork's records (a new version of a base file, a
    reflink of any file, a partial rewrite, a delete), pairs on or off per batch: after each,
    the home's counts, sizes and accounting are exact and every file reads as the model says."""
    below, _base, base_files, fork, written = lineage
    rnd = random.Random(seed)
    files: dict[int, Root] = {}  # the fork's records: inode -> root
    model: dict[int, dict[int, bytes]] = {}  # inode -> index -> content
    sizes: dict[int, int] = {}
    nxt = 100
    for step in range(40):
        txn, records = RefTxn(), {}
        for _ in range(rnd.choice((1, 1, 2, 3))):
            kind = rnd.random()
            if not files or kind < 0.25:  # a new version of a base file, or a reflink of one
                src = rnd.choice(list(base_files))
                ino = src if src not in files and rnd.random() < 0.5 else nxt
                nxt += 1
                root = base_files[src]
                model[ino], sizes[ino] = content(fork.objects, root), SIZES[src]
            elif kind < 0.4:  # a reflink of a fork file
                src = rnd.choice(list(files))
                ino, root = nxt, files[src]
                nxt += 1
                model[ino], sizes[ino] = dict(model[src]), sizes[src]
            elif kind < 0.8:  # a partial rewrite: new chunks, or chunks the base has
                ino = rnd.choice(list(files))
                changes = {rnd.randrange(sizes[ino]): rnd.choice((rnd.randrange(400), 2000 + step))
                           for _ in range(rnd.choice((1, 2, 5)))}
                root = write_file(fork, txn, files[ino], sizes[ino], changes, rnd.random() < 0.7)
                model[ino] = {**model[ino], **{i: data(k) for i, k in changes.items()}}
            else:
                ino = rnd.choice(list(files))
                txn.decref(files.pop(ino).hash)
                records[ino] = None
                continue
            if ino in files:
                txn.decref(files[ino].hash)  # the fork's own version of it is replaced
            txn.incref(root.hash)
            files[ino] = records[ino] = root
        fork.commit(txn, records)
        check(fork)
        for ino, root in files.items():
            assert content(fork.objects, root) == model[ino], (step, ino)
    assert everything(below) == written


def test_a_foreign_size_is_the_base_records_not_a_walk(lineage, monkeypatch):
    """The first count of a big base file in the fork reads its size from the base's refs
    record (one get) instead of every chunk record under it."""
    monkeypatch.setattr(objects, "tree_sizes", None)  # a walk would fail
    root = lineage.files[4]
    txn = RefTxn()
    txn.incref(root.hash)
    lineage.fork.commit(txn, {4: root})
    assert lineage.fork.objects.ref(root.hash).size == sum(map(len, content(lineage.base, root).values()))
