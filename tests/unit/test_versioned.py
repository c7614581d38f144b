"""meta.versioned.Versioned on MemoryKV: one version per layer, the nearest ancestor's wins,
tombstones, listings merged across layers, has_older, the changelog; then the same against
a brute-force model over random layer trees."""
from __future__ import annotations

import random

import pytest

from cowfs.kv.base import Batch
from cowfs.meta.layers import layer_suffix
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_XATTRS, Versioned, ino_key, name_key

from unit.helpers import Meta, visible


def put(m: Meta, cf: str, base: bytes, layer: int, value: bytes) -> None:
    b = Batch()
    Versioned.put(b, cf, base, layer, value)
    m.kv.write(b)


def delete(m: Meta, cf: str, base: bytes, top: int) -> None:
    b = Batch()
    m.meta.delete(b, cf, base, m.view(top))
    m.kv.write(b)


def names(m: Meta, ino: int, top: int, start: bytes = b"") -> list[tuple[bytes, bytes]]:
    return list(m.meta.scan_names(CF_DIRENTS, ino, m.view(top), start))


@pytest.fixture
def tree():
    """root <- snap <- head, and snap <- side (a second branch of the snapshot)."""
    m = Meta()
    root = m.layer()
    snap = m.layer(root)
    return m, root, snap, m.layer(snap), m.layer(snap)


def test_each_view_reads_its_nearest_version(tree):
    m, root, snap, head, side = tree
    k = ino_key(5)
    put(m, CF_INODES, k, root, b"r")
    put(m, CF_INODES, k, head, b"h")
    assert m.meta.get(CF_INODES, k, m.view(root)) == (root, b"r")  # a one-layer view: point read
    assert m.meta.get(CF_INODES, k, m.view(snap)) == (root, b"r")
    assert m.meta.get(CF_INODES, k, m.view(head)) == (head, b"h")
    assert m.meta.get(CF_INODES, k, m.view(side)) == (root, b"r")  # a sibling's version is skipped
    assert m.meta.versions(CF_INODES, k) == [(head, b"h"), (root, b"r")]
    assert m.meta.get(CF_INODES, ino_key(6), m.view(head)) is None


def test_delete_leaves_a_tombstone_only_over_an_older_version(tree):
    m, root, snap, head, side = tree
    a, b = name_key(1, b"a"), name_key(1, b"b")
    put(m, CF_DIRENTS, a, snap, b"A")
    put(m, CF_DIRENTS, b, head, b"B")
    assert m.meta.has_older(CF_DIRENTS, a, m.view(head)) and not m.meta.has_older(CF_DIRENTS, b, m.view(head))
    delete(m, CF_DIRENTS, a, head)
    delete(m, CF_DIRENTS, b, head)
    assert m.meta.get(CF_DIRENTS, a, m.view(head)) == (head, b"")  # the tombstone hides snap's A
    assert m.meta.get(CF_DIRENTS, a, m.view(side)) == (snap, b"A")
    assert m.meta.versions(CF_DIRENTS, b) == []  # nothing older to hide: the version is just removed
    assert set(m.meta.changed(head)) == {(CF_DIRENTS, a)}
    assert names(m, 1, head) == [] and names(m, 1, side) == [(b"a", b"A")]


def test_has_older_ignores_versions_of_other_branches(tree):
    m, root, snap, head, side = tree
    k = name_key(1, b"x")
    put(m, CF_DIRENTS, k, side, b"S")
    put(m, CF_DIRENTS, k, head, b"H")
    assert not m.meta.has_older(CF_DIRENTS, k, m.view(head))
    put(m, CF_DIRENTS, k, root, b"R")
    assert m.meta.has_older(CF_DIRENTS, k, m.view(head))


def test_scan_names_merges_layers_in_name_order(tree):
    m, root, snap, head, side = tree
    for name, layer, value in [(b"b", root, b"1"), (b"a", snap, b"2"), (b"ab", head, b"3"),
                               (b"b", head, b"4"), (b"c", side, b"5"), (b"a\x01", root, b"6")]:
        put(m, CF_DIRENTS, name_key(1, name), layer, value)
    put(m, CF_DIRENTS, name_key(2, b"a"), head, b"other directory")
    delete(m, CF_DIRENTS, name_key(1, b"a\x01"), head)
    assert names(m, 1, head) == [(b"a", b"2"), (b"ab", b"3"), (b"b", b"4")]
    assert names(m, 1, side) == [(b"a", b"2"), (b"a\x01", b"6"), (b"b", b"1"), (b"c", b"5")]
    assert names(m, 1, head, start=b"ab") == [(b"ab", b"3"), (b"b", b"4")]
    assert names(m, 1, root) == [(b"a\x01", b"6"), (b"b", b"1")]


def test_the_changelog_lists_what_a_layer_wrote_and_forgets_removals(tree):
    m, root, snap, head, side = tree
    put(m, CF_INODES, ino_key(3), head, b"i")
    put(m, CF_DIRENTS, name_key(3, b"n"), head, b"d")
    put(m, CF_XATTRS, name_key(3, b"user.x"), head, b"x")
    put(m, CF_INODES, ino_key(4), side, b"i")
    assert set(m.meta.changed(head)) == {(CF_INODES, ino_key(3)), (CF_DIRENTS, name_key(3, b"n")),
                                         (CF_XATTRS, name_key(3, b"user.x"))}
    b = Batch()
    Versioned.remove(b, CF_DIRENTS, name_key(3, b"n"), head)
    m.kv.write(b)
    assert (CF_DIRENTS, name_key(3, b"n")) not in set(m.meta.changed(head))
    assert m.kv.get(CF_DIRENTS, name_key(3, b"n") + layer_suffix(head)) is None
    assert list(m.meta.changed(root)) == []


@pytest.mark.parametrize("seed", range(12))
def test_random_layer_trees_read_as_the_brute_force_model(seed):
    """Random puts and deletes in random layers of a random tree; every view's reads, listings
    and has_older agree with 'the version of the nearest ancestor'."""
    rnd = random.Random(seed)
    m = Meta()
    layers = [m.layer()]
    for _ in range(rnd.randrange(3, 9)):
        layers.append(m.layer(rnd.choice(layers)))
    names_pool = [b"a", b"ab", b"a\x01", b"b", b"\xff"]
    keys = [(CF_INODES, ino_key(i)) for i in (1, 2, 3)]
    keys += [(cf, name_key(i, n)) for cf in (CF_DIRENTS, CF_XATTRS) for i in (1, 2) for n in names_pool]
    model: dict[tuple[str, bytes], dict[int, bytes]] = {}
    for _ in range(rnd.randrange(20, 80)):
        cf, base = rnd.choice(keys)
        layer = rnd.choice(layers)
        versions = model.setdefault((cf, base), {})
        if rnd.random() < 0.7:
            value = rnd.choice([b"v%d" % rnd.randrange(100), b"w"])
            put(m, cf, base, layer, value)
            versions[layer] = value
        else:
            anc = m.catalog.ancestry(layer)
            older = any(l in anc for l in versions if l < layer)
            assert m.meta.has_older(cf, base, m.view(layer)) == older
            delete(m, cf, base, layer)
            if older:
                versions[layer] = b""
            else:
                versions.pop(layer, None)
    for layer in layers:
        anc = m.catalog.ancestry(layer)
        lv = m.view(layer)
        for (cf, base), versions in model.items():
            assert m.meta.get(cf, base, lv) == visible(versions, anc), (layer, cf, base)
            assert m.meta.versions(cf, base) == sorted(versions.items(), reverse=True)
        for cf in (CF_DIRENTS, CF_XATTRS):
            for ino in (1, 2):
                want = []
                for n in sorted(names_pool):
                    seen = visible(model.get((cf, name_key(ino, n)), {}), anc)
                    if seen is not None and seen[1]:
                        want.append((n, seen[1]))
                assert list(m.meta.scan_names(cf, ino, lv)) == want, (layer, cf, ino)
        assert set(m.meta.changed(layer)) == {k for k, v in model.items() if layer in v}
