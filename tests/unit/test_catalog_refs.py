"""The catalog over two stores (cowfs.kv.split.SplitKV): home records durable before the
compare-and-set that publishes a change, ids drawn by compare-and-set, a name another
process took refused, unpublished layers found, and the format-11 move of the catalog
(cowfs.chunks.upgrade.move_catalog) safe to repeat."""
from __future__ import annotations

import pytest

from cowfs.chunks.upgrade import move_catalog
from cowfs.kv.base import Batch, Conflict
from cowfs.kv.memory import MemoryKV
from cowfs.kv.split import SplitKV, Unpublished
from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.gc import unpublished
from cowfs.meta.layers import CF_CATALOG, CF_META, LAYER_BLOCK, Branch, Catalog, Snapshot, Usage, usage_key
from cowfs.meta.versioned import CF_CHANGES
from cowfs.store import FAMILIES


class Recording(MemoryKV):
    """A MemoryKV that logs its writes and syncs into a shared list."""

    def __init__(self, name: str, families, log: list[str]) -> None:
        super().__init__(families)
        self.name, self.log = name, log

    def write(self, batch, expect=()):
        super().write(batch, expect)
        self.log.append(f"{self.name}.write")

    def sync(self):
        self.log.append(f"{self.name}.sync")


def two(tmp_path, log=None):
    home = Recording("home", FAMILIES, log) if log is not None else MemoryKV(FAMILIES)
    refs = SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,))
    return home, refs, SplitKV(home, refs, (CF_CATALOG,))


def test_a_change_is_published_after_its_home_records_are_durable(tmp_path):
    log: list[str] = []
    home, refs, kv = two(tmp_path, log)
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    cat.save_branch(Branch("main", root, cat.new_view(b)), b)
    Catalog.save_usage(root, Usage(0, 1, 0), b)
    log.clear()
    kv.write(b)
    assert log == ["home.write", "home.sync"]  # then the reference store, last
    assert refs.get(CF_CATALOG, b"branch/main") is not None and home.get(CF_META, usage_key(root)) is not None
    assert CF_CATALOG not in FAMILIES, "the home database has no catalog family"
    b = Batch()
    b.put(CF_META, b"x", b"1")
    log.clear()
    kv.write(b)
    assert log == ["home.write"], "a batch without catalog changes is not synced"


def test_a_name_taken_by_another_process_fails_the_change_and_leaves_it_unpublished(tmp_path):
    home, refs, kv = two(tmp_path)
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    cat.save_branch(Branch("main", root, cat.new_view(b)), b)
    kv.write(b)
    assert "s" not in cat.snapshots and len(cat.snapshots) == 0  # read whole: the name looks free
    other = SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,))  # another process's handle
    ob = Batch()
    ob.put(CF_CATALOG, b"snap/s", b'{"name": "s", "layer": 1, "view": 1, "branch": null}')
    other.write(ob)
    b = Batch()
    head = cat.new_layer(root, b)
    cat.branches["main"].head = head
    cat.save_branch(cat.branches["main"], b)
    cat.save_snapshot(Snapshot("s", root, cat.new_view(b), "main"), b)
    Catalog.save_usage(head, Usage(0, 1, 0), b)
    with pytest.raises(Unpublished) as exc:
        kv.write(b)
    assert isinstance(exc.value.cause, Conflict) and exc.value.cause.key == b"snap/s"
    assert home.get(CF_META, usage_key(head)) is not None, "the home part stands"
    cat.reload()
    assert cat.branches["main"].head == root and head not in cat.parents
    assert unpublished(home, cat) == {head}
    assert cat.snapshots["s"].layer == 1, "the other's record stands"


def test_ids_are_drawn_in_blocks_that_two_processes_never_share(tmp_path):
    _, _, kv1 = two(tmp_path)
    home2 = MemoryKV(FAMILIES)
    kv2 = SplitKV(home2, SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,)), (CF_CATALOG,))
    a, b = Catalog(kv1), Catalog(kv2)
    ba, bb = Batch(), Batch()
    root = a.new_layer(0, ba)
    kv1.write(ba)
    b.reload()
    ids_b = [b.new_layer(root, bb) for _ in range(3)]
    ids_a = [a.new_layer(root, ba) for _ in range(3)]
    assert not set(ids_a) & set(ids_b)
    assert ids_a == [root + 1, root + 2, root + 3] and ids_b[0] == root + LAYER_BLOCK
    # A child of a layer drawn past this process's block gets an id past its parent.
    child = a.new_layer(ids_b[-1], Batch())
    assert child > ids_b[-1]
    assert a.draw(b"ino", 4096, 10) >= 10


def test_unpublished_layers_are_found_in_every_home_record(tmp_path):
    home, _, kv = two(tmp_path)
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    kv.write(b)
    b = Batch()
    b.put(CF_CHANGES, (500).to_bytes(8, "big") + b"\x01key", b"")
    b.put(CF_META, usage_key(600), b"\0" * 24)
    b.put(CF_META, b"gcq/" + (700).to_bytes(8, "big"), b"")
    b.put(CF_META, usage_key(root), b"\0" * 24)
    home.write(b)
    assert unpublished(home, cat) == {500, 600, 700}


def test_the_catalog_moves_once_and_a_repeat_is_safe(tmp_path):
    home = MemoryKV(FAMILIES)
    refs = SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,))
    b = Batch()
    b.put(CF_META, b"format", b"9")
    b.put(CF_META, b"layer/" + (1).to_bytes(8, "big"), (0).to_bytes(8, "big"))
    b.put(CF_META, b"branch/main", b'{"name": "main", "head": 1, "view": 1}')
    b.put(CF_META, b"counter/layer", (2).to_bytes(8, "big"))
    b.put(CF_META, b"counter/copyino", (1 << 35).to_bytes(8, "big"))
    b.put(CF_META, b"catalog/owners-settled", b"")
    b.put(CF_META, b"gcq/" + (1).to_bytes(8, "big"), b"")
    home.write(b)
    junk = Batch()  # a copy cut short, or changed since by an older cowfs: replaced
    junk.put(CF_CATALOG, b"snap/stale", b"{}")
    refs.write(junk)
    assert move_catalog(home, refs, CF_META, CF_CATALOG, 11) == 3
    assert {k for k, _ in refs.scan(CF_CATALOG, b"")} == {b"layer/" + (1).to_bytes(8, "big"), b"branch/main",
                                                           b"counter/layer"}
    assert {k for k, _ in home.scan(CF_META, b"")} == {b"format", b"counter/copyino", b"gcq/" + (1).to_bytes(8, "big")}
    assert home.get(CF_META, b"format") == b"11"
    assert move_catalog(home, refs, CF_META, CF_CATALOG, 11) == 0  # done: nothing touched
    assert refs.get(CF_CATALOG, b"branch/main") is not None


def test_a_branch_from_a_snapshot_another_process_deleted_is_refused(tmp_path):
    _, refs, kv = two(tmp_path)
    cat = Catalog(kv)
    b = Batch()
    root = cat.new_layer(0, b)
    cat.save_snapshot(Snapshot("s", root, cat.new_view(b), None), b)
    kv.write(b)
    assert cat.snapshots["s"].layer == root
    other = SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,))
    ob = Batch()
    ob.delete(CF_CATALOG, b"snap/s")
    other.write(ob)
    b = Batch()
    cat.keep("s", b)
    head = cat.new_layer(root, b)
    cat.save_branch(Branch("f", head, cat.new_view(b), parent="s"), b)
    Catalog.save_usage(head, Usage(0, 1, 0), b)
    with pytest.raises(Unpublished):
        kv.write(b)
    assert refs.get(CF_CATALOG, b"branch/f") is None


def test_the_move_gives_a_store_without_a_layer_counter_one_past_its_layers(tmp_path):
    home = MemoryKV(FAMILIES)
    refs = SQLiteKV(str(tmp_path / "refs.sqlite"), (CF_CATALOG,))
    b = Batch()
    b.put(CF_META, b"format", b"6")
    for lid, parent in ((1, 0), (7, 1)):
        b.put(CF_META, b"layer/" + lid.to_bytes(8, "big"), parent.to_bytes(8, "big"))
    home.write(b)
    move_catalog(home, refs, CF_META, CF_CATALOG, 11)
    assert refs.get(CF_CATALOG, b"counter/layer") == (8).to_bytes(8, "big")
