"""OverlayKV: several KVs read as one (a branch head in its own database, its frozen layers in
others; docs/design-many-processes.md).  Merged scans equal one KV holding the union, the top
member wins, writes and their compare-and-set go to the top only; and the real metadata code
(Versioned) reads a layer tree split across databases exactly as it reads it from one."""
from __future__ import annotations

import random

import pytest

from cowfs.kv.base import Batch, Conflict
from cowfs.kv.memory import MemoryKV
from cowfs.kv.overlay import OverlayKV
from cowfs.meta.layers import CF_CATALOG, CF_META, Catalog, suffix_layer
from cowfs.meta.shared import SharedTrees
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_XATTRS, LayerView, Versioned, ino_key, name_key
from cowfs.store import FAMILIES

FAMS = ("a", "b")


def kv_with(items: dict[bytes, bytes], cf: str = "a") -> MemoryKV:
    kv = MemoryKV(FAMS)
    b = Batch()
    for k, v in items.items():
        b.put(cf, k, v)
    kv.write(b)
    return kv


def test_merged_scans_equal_one_kv_holding_the_union():
    rnd = random.Random(3)
    alphabet = [b"", b"\x00", b"a", b"ab", b"b", b"b\xff", b"\xff", b"\xff\xff"]
    for _ in range(200):
        members = [{rnd.choice(alphabet) + rnd.choice(alphabet): b"%d" % (2 - i) for _ in range(rnd.randrange(0, 6))}
                   for i in range(3)]
        union: dict[bytes, bytes] = {}
        for m in reversed(members):  # the first member's value wins
            union.update(m)
        one = kv_with(union)
        ov = OverlayKV(kv_with(members[0]), [kv_with(members[1]), kv_with(members[2])], through=["a"])
        for _ in range(10):
            start, prefix = rnd.choice(alphabet), rnd.choice(alphabet)
            assert list(ov.scan("a", start, prefix)) == list(one.scan("a", start, prefix)), (members, start, prefix)
        for k in union:
            assert ov.get("a", k) == union[k]
        assert ov.get("a", b"missing") is None


def test_a_family_not_read_through_is_the_top_members_alone():
    top, below = kv_with({b"x": b"top"}, cf="b"), kv_with({b"y": b"below", b"x": b"old"}, cf="b")
    ov = OverlayKV(top, [below], through=["a"])
    assert ov.get("b", b"y") is None and list(ov.scan("b", b"")) == [(b"x", b"top")]
    assert OverlayKV(top, [below], through=["b"]).get("b", b"y") == b"below"


def test_writes_and_their_checks_go_to_the_top_only():
    top, below = kv_with({b"k": b"1"}), kv_with({b"frozen": b"f", b"k": b"0"})
    ov = OverlayKV(top, [below], through=["a"])
    b = Batch()
    b.put("a", b"k", b"2")
    b.delete("a", b"frozen")  # deleting a frozen member's key is not possible: the top has none
    ov.write(b, expect=[("a", b"k", b"1")])
    assert list(top.scan("a", b"")) == [(b"k", b"2")]
    assert list(below.scan("a", b"")) == [(b"frozen", b"f"), (b"k", b"0")]
    with pytest.raises(Conflict):
        ov.write(Batch(), expect=[("a", b"frozen", b"f")])  # checked against the top
    it = ov.scan("a", b"")
    assert next(it) == (b"frozen", b"f")
    b = Batch()
    b.put("a", b"j", b"new")
    ov.write(b)
    assert list(it) == [(b"k", b"2")], "a scan sees the members as of its first step"
    ov.sync()
    ov.close()
    assert top.closed and not below.closed


VERSIONED = (CF_INODES, CF_DIRENTS, CF_XATTRS)


@pytest.mark.parametrize("seed", range(12))
def test_versioned_reads_a_layer_tree_split_across_databases_as_from_one(seed):
    """Random writes in a random layer tree, in one database; then the same keys split: the
    layers of one branch's lineage below a cut stay in a 'shared' database, the rest go to a
    'home' one.  Every view reads (get, has_older, listings) the same through OverlayKV."""
    rnd = random.Random(seed)
    one = MemoryKV(FAMILIES + (CF_CATALOG,))
    cat = Catalog(one)
    layers: list[int] = []
    for _ in range(rnd.randrange(4, 10)):
        b = Batch()
        layers.append(cat.new_layer(rnd.choice(layers) if layers else 0, b))
        one.write(b)
    names_pool = [b"a", b"ab", b"a\x01", b"b", b"\xff"]
    keys = [(CF_INODES, ino_key(i)) for i in (1, 2, 3)]
    keys += [(cf, name_key(i, n)) for cf in (CF_DIRENTS, CF_XATTRS) for i in (1, 2) for n in names_pool]
    b = Batch()
    for _ in range(rnd.randrange(30, 90)):
        cf, base = rnd.choice(keys)
        Versioned.put(b, cf, base, rnd.choice(layers), rnd.choice([b"v%d" % rnd.randrange(100), b""]))
    one.write(b)
    home_layers = set(rnd.sample(layers, rnd.randrange(1, len(layers))))
    home, shared = MemoryKV(FAMILIES), MemoryKV(FAMILIES)
    for cf in FAMILIES:
        hb, sb = Batch(), Batch()
        for k, v in one.scan(cf, b""):
            in_home = cf in VERSIONED and suffix_layer(k[-8:]) in home_layers
            (hb if in_home else sb).put(cf, k, v)
        home.write(hb)
        shared.write(sb)
    plain = Versioned(one, SharedTrees.load(one), cat.ancestry)
    split = Versioned(OverlayKV(home, [shared], through=VERSIONED + (CF_META,)), SharedTrees.load(one), cat.ancestry)
    for layer in layers:
        lv = LayerView(layer, frozenset(cat.ancestry(layer)))
        for cf, base in keys:
            assert split.get(cf, base, lv) == plain.get(cf, base, lv), (layer, cf, base)
            assert split.has_older(cf, base, lv) == plain.has_older(cf, base, lv)
        for cf in (CF_DIRENTS, CF_XATTRS):
            for ino in (1, 2):
                for start in (b"", b"ab"):
                    assert list(split.scan_names(cf, ino, lv, start)) == list(plain.scan_names(cf, ino, lv, start))


def test_keys_read_through_by_prefix_equal_one_kv_holding_the_top_and_those_keys_below():
    """through_keys: of a family only the keys under the given prefixes are read through (a
    fork reads its ancestors' usage/ and share/ records of `meta`, not their gc queue); every
    get and scan equals one KV holding the top's keys and the members' keys under them."""
    rnd = random.Random(5)
    alphabet = [b"", b"\x00", b"a", b"ab", b"b", b"b\xff", b"\xff", b"\xff\xff"]
    for _ in range(300):
        through = sorted({rnd.choice(alphabet[1:]) + rnd.choice(alphabet) for _ in range(rnd.randrange(1, 3))})
        members = [{rnd.choice(alphabet) + rnd.choice(alphabet): b"%d" % (2 - i) for _ in range(rnd.randrange(0, 7))}
                   for i in range(3)]
        union: dict[bytes, bytes] = {}
        for i, m in reversed(list(enumerate(members))):  # the first member's value wins
            union.update({k: v for k, v in m.items() if i == 0 or k.startswith(tuple(through))})
        one = kv_with(union)
        ov = OverlayKV(kv_with(members[0]), [kv_with(members[1]), kv_with(members[2])], through=[],
                       through_keys={"a": through})
        for _ in range(12):
            start, prefix = rnd.choice(alphabet) + rnd.choice(alphabet), rnd.choice(alphabet) + rnd.choice(alphabet)
            assert list(ov.scan("a", start, prefix)) == list(one.scan("a", start, prefix)), \
                (members, through, start, prefix)
        for k in set().union(*members):
            assert ov.get("a", k) == union.get(k), (members, through, k)
    with pytest.raises(ValueError, match="empty key prefix"):
        OverlayKV(MemoryKV(FAMS), [], through=[], through_keys={"a": [b""]})
