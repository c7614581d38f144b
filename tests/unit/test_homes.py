"""Homes (format 12, cowfs.homes): a home is made durable and registered as a liveness member
before the one compare-and-set that publishes its branch; the catalog says which database
holds each layer (`Catalog.member`); the upgrade 11 -> 12 writes the marker only; fsck checks
the homes the catalog names and counts (and with --repair removes) those it does not."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest

from cowfs import homes
from cowfs.chunks.families import CF_OBJECTS
from cowfs.fsck import Fsck
from cowfs.kv.base import Batch, Conflict
from cowfs.kv.rocks import RocksKV
from cowfs.meta.layers import CF_CATALOG, CF_META, HOME, Branch, usage_key
from cowfs.store import FAMILIES, FORMAT_VERSION, Store, init_store
from cowfs.storedir import home_db, home_dir


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    st = Store(path)
    yield st
    st.close()


def publish(st: Store, name: str, home: str) -> Branch:
    """A branch of main's head whose head lives in home (what `cowfs branch --own-daemon` does
    once the home is made)."""
    cat = st.catalog
    b = Batch()
    main = cat.branches["main"]
    head = cat.new_layer(main.head, b, home=home)
    new = Branch(name, head, cat.new_view(b), parent="main", parent_branch="main", home=home)
    cat.save_branch(new, b)
    st.kv.write(b)
    return new


def test_a_home_is_private_durable_and_a_member_before_anything_names_it(store):
    records = Batch()
    records.put(CF_META, usage_key(99), b"\0" * 24)
    home = homes.create_home(store.path, store.liveness, records)
    assert homes.HOME_ID.match(home)
    where = home_dir(store.path, home)
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(where)).st_mode) == 0o700
    assert store.liveness.members() == {f"home-{home}": home_db(home)}
    assert not store.catalog.homes, "nothing names it yet"
    db = RocksKV(os.path.join(store.path, home_db(home)), FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
    try:
        assert db.get(CF_META, b"format") == str(FORMAT_VERSION).encode()
        assert db.get(CF_META, usage_key(99)) == b"\0" * 24
    finally:
        db.close()
    assert homes.create_home(store.path, store.liveness) != home


def test_the_catalog_says_which_database_holds_each_layer(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    store = Store(path)
    try:
        home = homes.create_home(store.path, store.liveness)
        fork = publish(store, "fork", home)
        cat = store.catalog
        assert cat.member(fork.head) == home and cat.member(cat.branches["main"].head) is None
    finally:
        store.close()
    st = Store(path)  # what another process reads from the reference store
    try:
        cat = st.catalog
        assert cat.member(fork.head) == home and cat.branches["fork"].home == home
        assert cat.member(cat.branches["main"].head) is None and cat.branches["main"].home is None
        assert b'"home"' not in st.kv.get(CF_CATALOG, b"branch/main"), "absent for a branch of the store's db"
        assert st.kv.get(CF_CATALOG, HOME + fork.head.to_bytes(8, "big")) == home.encode()
        # A new head of the fork (its snapshot's freeze) stays in its home; a forgotten
        # layer takes its home record with it.
        b = Batch()
        head = cat.new_layer(fork.head, b, home=cat.branches["fork"].home)
        st.kv.write(b)
        assert cat.member(head) == home
        b = Batch()
        cat.forget_layer(head, b)
        st.kv.write(b)
        assert cat.member(head) is None and st.kv.get(CF_CATALOG, HOME + head.to_bytes(8, "big")) is None
        assert Fsck(st).run().clean
    finally:
        st.close()


def test_a_home_is_published_with_its_layer_or_not_at_all(store):
    """A name taken meanwhile refuses the whole compare-and-set: no layer, no home record."""
    home = homes.create_home(store.path, store.liveness)
    publish(store, "taken", home)
    other = homes.create_home(store.path, store.liveness)
    store.catalog.reload()
    del store.catalog.branches["taken"]  # this process does not see the name: the CAS must refuse it
    with pytest.raises(Conflict):  # a batch of the catalog alone: one compare-and-set
        publish(store, "taken", other)
    store.catalog.reload()
    assert set(store.catalog.homes.values()) == {home}
    report = Fsck(store).run()
    assert report.clean, report.problems
    assert report.counts["unnamed_homes"] == 1  # `other`: made, registered, never published


def test_fsck_counts_an_unnamed_home_and_repair_removes_it_once_old(store):
    home = homes.create_home(store.path, store.liveness)
    report = Fsck(store, repair=True).run()
    assert report.clean and report.counts["unnamed_homes"] == 1
    assert os.path.isdir(home_dir(store.path, home)), "young: perhaps being published"
    old = time.time() - homes.UNNAMED_GRACE - 1
    os.utime(home_dir(store.path, home), (old, old))
    report = Fsck(store, repair=True).run()
    assert f"removed home {home}, which no branch names" in report.repaired
    assert not os.path.exists(home_dir(store.path, home)) and store.liveness.members() == {}
    assert Fsck(store).run().counts["unnamed_homes"] == 0


def test_a_held_home_is_not_removed(store):
    home = homes.create_home(store.path, store.liveness)
    held = RocksKV(os.path.join(store.path, home_db(home)), FAMILIES, blob_families=(CF_OBJECTS,))
    try:
        assert not homes.remove(store.path, store.liveness, home)
        assert os.path.isdir(home_dir(store.path, home)) and store.liveness.members()
    finally:
        held.close()
    assert homes.remove(store.path, store.liveness, home)


def test_fsck_finds_a_named_home_missing_or_unregistered_and_a_branch_in_the_wrong_home(store):
    home = homes.create_home(store.path, store.liveness)
    fork = publish(store, "fork", home)
    assert Fsck(store).run().clean
    store.liveness.remove_member(homes.member_name(home))
    report = Fsck(store, repair=True).run()
    assert f"home {home} is not registered as a liveness member" in report.problems
    assert store.liveness.members() == {f"home-{home}": home_db(home)}
    assert Fsck(store).run().clean
    b = Batch()
    store.catalog.save_branch(Branch("wrong", fork.head, store.catalog.new_view(b), home=None), b)
    store.kv.write(b)
    report = Fsck(store).run()
    assert any(p.startswith("branch wrong: its record's home is None") for p in report.problems), report.problems
    store.liveness.remove_member(homes.member_name(home))
    os.rename(home_dir(store.path, home), home_dir(store.path, home) + ".gone")
    report = Fsck(store).run()
    assert f"home {home}, which holds layers, does not exist" in report.problems
    assert f"{home}.gone' in the homes directory is no home" in " ".join(report.problems)


def test_a_format_11_store_is_upgraded_by_its_marker_alone(tmp_path):
    path = str(tmp_path / "store")
    init_store(path)
    st = Store(path)
    b = Batch()
    b.put(CF_META, b"format", b"11")  # what a format-11 store's database says
    st.kv.write(b)
    main = st.catalog.branches["main"]
    st.close()
    marker = os.path.join(path, "cowfs-store.json")
    with open(marker) as f:
        info = json.load(f)
    with open(marker, "w") as f:
        json.dump({**info, "format": 11}, f)
    st = Store(path)
    try:
        assert st.catalog.branches["main"].head == main.head and st.catalog.branches["main"].view == main.view
        assert st.kv.get(CF_META, b"format") == b"11", "nothing but the marker changes"
    finally:
        st.close()
    with open(marker) as f:
        assert json.load(f)["format"] == FORMAT_VERSION == 12
