"""The names of hard-linked files: an index of the entries of every non-directory inode
with more than one name, so that `diff` names every path of a changed inode without a walk.

An inode record keeps the (parent, name) of the last link made to it: exact for a file with
one name, one of the names of a hard-linked one.  For a non-directory inode whose link count
is above 1, each of its names (parent, name) has a key `ino + parent + name` in the
layer-versioned family `links`, written in the batch that makes the name and deleted in the
batch that removes it (cowfs.core.filesystem: link, unlink, rename, clone).  When the count
falls back to 1, the record's (parent, name) is set to the one name left and the inode's keys
are deleted, so files that are never hard-linked cost nothing here.  Readers check every name
against the directory entry before using it: keys that name an entry that is gone (written
for stores upgraded from format 5 or older, see `rebuild`) are skipped, never reported.
"""
from __future__ import annotations

from typing import Iterator

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import suffix_layer
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, CF_LINKS, LayerView, Versioned

PRESENT = b"l"  # a key's value: never empty (an empty value is a tombstone)


def key(ino: int, parent: int, name: bytes) -> bytes:
    """The base key of one name of ino (the layer suffix follows)."""
    return ino.to_bytes(8, "big") + parent.to_bytes(8, "big") + name + b"\0"


def names(meta: Versioned, ino: int, lv: LayerView) -> Iterator[tuple[int, bytes]]:
    """(parent, name) of every key of ino that lv sees, unchecked."""
    for rest, _value in meta.scan_names(CF_LINKS, ino, lv):
        yield int.from_bytes(rest[:8], "big"), rest[8:]


def names_of(meta: Versioned, ino: int, lv: LayerView) -> list[tuple[int, bytes]]:
    """(parent, name) of the entries that name ino in lv, among its keys (checked)."""
    out = []
    for parent, name in names(meta, ino, lv):
        found = meta.get(CF_DIRENTS, parent.to_bytes(8, "big") + name + b"\0", lv)
        if found and found[1] and int.from_bytes(found[1][:8], "big") == ino:
            out.append((parent, name))
    return out


def rebuild(kv: KV, batch: Batch) -> int:
    """The upgrade to store format 6: a key for every version of a directory entry that
    names a non-directory inode which had more than one name in some version, in that
    entry's layer (so every view that sees the entry sees its key).  Two sequential scans;
    a superset of what the invariant needs, which readers narrow by checking the entries.
    Returns the keys written."""
    linked = set()
    for k, value in kv.scan(CF_INODES, b""):
        if value:
            a = Attrs.unpack(value)
            if a.nlink > 1 and not a.is_dir:
                linked.add(int.from_bytes(k[:8], "big"))
    n = 0
    for k, value in kv.scan(CF_DIRENTS, b""):
        if not value:
            continue
        child = int.from_bytes(value[:8], "big")
        if child in linked:
            Versioned.put(batch, CF_LINKS, key(child, int.from_bytes(k[:8], "big"), k[8:-9]),
                          suffix_layer(k[-8:]), PRESENT)
            n += 1
    return n
