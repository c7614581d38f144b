"""A branch's own view over several databases (docs/design-many-processes.md, "Step 6"):
`Store(path, home=id)` writes its home alone and reads the lineage's other databases below it
(read-only, one block cache); gc works on its own database's layers only, never merges or drops
a layer with a child in another database, and deletes a home whose branch is gone whole."""
from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest

from cowfs import homes
from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS, CF_REFS
from cowfs.chunks.refs import RefTxn
from cowfs.chunks.tree import FANOUT, TreeWriter
from cowfs.fsck import Fsck
from cowfs.kv.base import Batch
from cowfs.kv.rocks import RocksKV
from cowfs.meta import gc
from cowfs.meta.layers import Branch, Snapshot, Usage
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_INODES, Versioned, ino_key
from cowfs.store import FAMILIES, Store, init_store
from cowfs.storedir import DB_DIR, home_db, home_dir

INO = 77
FILE = 5  # a file with content, written by main below the branch point
BASE = Attrs(0o100644, 0, 0, 1, 0, 1, 0, 0, 0).pack()  # sizes tell the versions apart
FORK = Attrs(0o100644, 0, 0, 1, 0, 2, 0, 0, 0).pack()


def _commit(st: Store, batch: Batch) -> None:
    st.kv.write(batch)
    st.kv.sync()


def _seeded(st: Store, home: str, head: int, usage: Usage) -> None:
    """The home of that id made, holding the new head's usage record, before the catalog
    names it (as `cowfs branch --own-daemon` makes it: cowfs.commands.branching)."""
    records = Batch()
    st.catalog.save_usage(head, usage, records)
    homes.create_home(st.path, st.liveness, records, home)


def _forked(path: str, name: str = "fork", from_snapshot: str | None = None) -> tuple[str, Branch]:
    """A branch of main whose head lives in a new home, made by the store's process as `cowfs
    branch --own-daemon` does; main wrote ino INO first.  from_snapshot: the branch is made
    from a snapshot of that name whose layer (in the store's database, holding ino INO + 1)
    has the branch's head as its only child.  Returns (home, branch)."""
    st = Store(path)
    try:
        cat = st.catalog
        main = cat.branches["main"]
        b = Batch()
        Versioned.put(b, CF_INODES, ino_key(INO), main.head, BASE)
        frozen = main.head
        main.head = cat.new_layer(frozen, b)
        cat.save_branch(main, b)
        if from_snapshot:
            frozen = cat.new_layer(frozen, b)
            Versioned.put(b, CF_INODES, ino_key(INO + 1), frozen, BASE)
            cat.save_snapshot(Snapshot(from_snapshot, frozen, cat.new_view(b), "main"), b)
        _commit(st, b)
        home = homes.new_id()
        b = Batch()
        head = cat.new_layer(frozen, b, home=home)
        branch = Branch(name, head, cat.new_view(b), parent="main", parent_branch="main", home=home)
        cat.save_branch(branch, b)
        _seeded(st, home, head, Usage(0, 1, 0))
        _commit(st, b)
        return home, branch
    finally:
        st.close()


def test_a_home_view_reads_its_lineage_below_and_writes_its_home_alone(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    home, branch = _forked(path)
    fork = Store(path, home=home)
    try:
        assert len(fork.below) == 1 and fork.below[0].block_cache is fork.engine.block_cache  # one budget
        lv = fork.catalog.layer_view(branch.head)
        assert fork.meta.get(CF_INODES, ino_key(INO), lv)[1] == BASE
        assert fork.catalog.usage(branch.head) == Usage(0, 1, 0)  # seeded in the home before publication
        b = Batch()
        Versioned.put(b, CF_INODES, ino_key(INO), branch.head, FORK)
        _commit(fork, b)
        assert fork.meta.get(CF_INODES, ino_key(INO), lv)[1] == FORK
        assert dict(fork.members()).keys() == {DB_DIR}  # its pack gc marks the store's db, not itself
        for _n, kv in fork.members():
            kv.close()
        with pytest.raises(Exception, match="in use"):
            Store(path, home=home)  # one writer per home (after HOME_OPEN_WAIT: no daemon's pid file)
    finally:
        fork.close()
    base = RocksKV(os.path.join(path, DB_DIR), FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
    try:  # the store's database never saw the fork's write
        assert [v for _k, v in base.scan(CF_INODES, ino_key(INO), ino_key(INO))] == [BASE]
    finally:
        base.close()


def test_gc_leaves_a_layer_with_a_child_elsewhere_and_deletes_a_gone_branchs_home(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    home, branch = _forked(path, from_snapshot="s")
    st = Store(path)
    try:
        cat = st.catalog
        s_layer = cat.snapshots["s"].layer
        b = Batch()
        cat.remove("s", b)  # its only child is the fork's head, in the home
        _commit(st, b)
        gc.collect_now(st.meta, cat, {cat.branches["main"].head}, st.commit)
        # neither merged into the home (a write into another process's database) nor dropped
        assert s_layer in cat.parents and s_layer in cat.queued
        assert [v for _k, v in st.kv.scan(CF_INODES, ino_key(INO + 1), ino_key(INO + 1))] == [BASE]
        fork = Store(path, home=home)
        try:  # the home's pass never touches the store's layers
            fcat = fork.catalog
            gc.collect_now(fork.meta, fcat, {branch.head}, fork.commit, home=home, own=fork.home_kv)
            assert s_layer in fcat.parents
        finally:
            fork.close()
        st.catalog.reload()
        cat = st.catalog
        assert st.drop_dead_homes() == []  # its branch still writes it
        b = Batch()
        cat.remove("fork", b)
        _commit(st, b)
        assert st.drop_dead_homes() == [home]
        assert not os.path.exists(home_dir(path, home)) and branch.head not in cat.parents
        assert st.liveness.members() == {}
        gc.collect_now(st.meta, cat, {cat.branches["main"].head}, st.commit)
        assert s_layer not in cat.parents  # its last child gone: dead
        assert list(st.kv.scan(CF_INODES, ino_key(INO + 1), ino_key(INO + 1))) == []
        lv = cat.layer_view(cat.branches["main"].head)
        assert st.meta.get(CF_INODES, ino_key(INO), lv)[1] == BASE
    finally:
        st.close()
    assert homes.listed(path) == []


def test_a_home_view_counts_the_base_files_it_changes_as_foreign(tmp_path):
    """The home's object store counts what the fork's own records reference (chunks.refs,
    foreign objects): a chmod and a partial rewrite of a file main wrote below the branch point,
    then its delete, each fsck-exact in the home, and the store's database unchanged."""
    path = str(tmp_path / "store")
    init_store(path)
    st = Store(path)
    try:
        txn, b = RefTxn(), Batch()
        chunks = {i: i.to_bytes(2, "big") * 150 for i in range(FANOUT + 3)}  # a two-level tree
        for data in chunks.values():
            txn.add_object(codec.chunk_hash(data), codec.encode_chunk(data, 1), [])
        root = TreeWriter(st.objects.node, txn).update(None, {i: codec.chunk_hash(d) for i, d in chunks.items()},
                                                       len(chunks))
        txn.incref(root.hash)
        file = Attrs(0o100644, 0, 0, 1, 0, 300 * len(chunks), 0, 0, 0, root)
        Versioned.put(b, CF_INODES, ino_key(FILE), st.catalog.branches["main"].head, file.pack())
        st.commit(b, txn)
    finally:
        st.close()
    home, branch = _forked(path)
    db = os.path.join(path, DB_DIR)
    before = _every_key(db)
    fork = Store(path, home=home)
    try:
        assert fork.objects.home is fork.home_kv and fork.objects.split

        def commit(version: Attrs | None, txn: RefTxn) -> None:
            b = Batch()
            Versioned.put(b, CF_INODES, ino_key(FILE), branch.head, version.pack() if version else b"")
            fork.commit(b, txn)
            f = Fsck(fork)
            f.check_references()
            f.check_space()
            assert f.report.clean, f.report.problems

        txn = RefTxn()
        txn.incref(root.hash)
        commit(replace(file, mode=0o100600), txn)  # chmod: a new version in the home, same root
        assert list(fork.home_kv.scan(CF_OBJECTS, b"")) == [], "nothing of the base stored again"
        assert fork.objects.ref(root.hash).size == 300 * len(chunks)
        txn = RefTxn()
        new = codec.chunk_hash(b"new" * 100)
        txn.add_object(new, codec.encode_chunk(b"new" * 100, 1), [])
        rewritten = TreeWriter(fork.objects.node, txn).update(root, {FANOUT + 1: new}, len(chunks))
        txn.incref(rewritten.hash)
        txn.decref(root.hash)
        commit(replace(file, mode=0o100600, root=rewritten), txn)
        txn = RefTxn()
        txn.decref(rewritten.hash)
        commit(None, txn)  # deleted in the fork
        assert list(fork.home_kv.scan(CF_REFS, b"")) == [] and list(fork.home_kv.scan(CF_OBJECTS, b"")) == []
    finally:
        fork.close()
    assert _every_key(db) == before


def _every_key(db: str) -> dict[str, list[tuple[bytes, bytes]]]:
    kv = RocksKV(db, FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
    try:
        return {cf: list(kv.scan(cf, b"")) for cf in FAMILIES}
    finally:
        kv.close()


def test_cowfs_fsck_checks_every_homes_database_too(tmp_path):
    """`cowfs fsck STORE` checks the store's database, then each home's over its lineage: a
    count in a home that none of its records makes is reported with the home's id."""
    from cowfs.chunks.families import CF_REFS
    from cowfs.chunks.refs import Ref
    from cowfs.cli.maintenance import FSCK_CLEAN, FSCK_LEFT, run_fsck

    path = str(tmp_path / "store")
    init_store(path)
    st = Store(path)
    try:  # a branch of main's root in a home, as `cowfs branch --own-daemon` makes it
        cat = st.catalog
        root = cat.branches["main"].head
        home = homes.new_id()
        b = Batch()
        head = cat.new_layer(root, b, home=home)
        cat.save_branch(Branch("fork", head, cat.new_view(b), parent="main", parent_branch="main", home=home), b)
        _seeded(st, home, head, cat.usage(root))
        _commit(st, b)
    finally:
        st.close()
    code, report = run_fsck(path, False, True, quiet=True)
    assert code == FSCK_CLEAN and report["clean"], report["problems"]
    db = RocksKV(os.path.join(path, "homes", home, "db"), FAMILIES, blob_families=(CF_OBJECTS,))
    try:
        b = Batch()
        b.put(CF_REFS, b"\x07" * 32, Ref(1, 0, 1, 10).pack())
        db.write(b)
        db.sync()
    finally:
        db.close()
    code, report = run_fsck(path, False, True, quiet=True)
    assert code == FSCK_LEFT and report["problems"], report
    assert all(p.startswith(f"home {home}: ") for p in report["problems"]), report["problems"]


def test_a_home_held_for_a_moment_by_no_daemon_opens_once_it_is_let_go(tmp_path):
    """The store keeper holds an idle home's database for its rewrite (tens of ms,
    cowfs.chunks.dups): a branch daemon opening that home meanwhile waits for it
    (Store._open_database) instead of failing as "in use"."""
    path = str(tmp_path / "s")
    init_store(path)
    home, _branch = _forked(path)
    held = RocksKV(os.path.join(path, home_db(home)), FAMILIES, blob_families=(CF_OBJECTS,))
    timer = threading.Timer(0.5, held.close)
    timer.start()
    try:
        Store(path, home=home).close()
    finally:
        timer.join()
