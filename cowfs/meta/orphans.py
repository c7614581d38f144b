"""The `orphans` family: inodes unlinked while a handle was still open on them, by layer.

A key is the branch head layer (8 bytes) then the inode key; the value is empty.  The core
(cowfs.core.orphans) adds one when the last name of an open inode goes and deletes it with
the inode; the next daemon to serve a branch removes those a stopped daemon left; fsck
checks them.  Only this module knows the key layout.
"""
from __future__ import annotations

from cowfs.kv.base import KV, Batch
from cowfs.meta.versioned import ino_key

CF_ORPHANS = "orphans"


def _key(layer: int, ino: int) -> bytes:
    return layer.to_bytes(8, "big") + ino_key(ino)


def add(batch: Batch, layer: int, ino: int) -> None:
    batch.put(CF_ORPHANS, _key(layer, ino), b"")


def remove(batch: Batch, layer: int, ino: int) -> None:
    batch.delete(CF_ORPHANS, _key(layer, ino))


def of_layer(kv: KV, layer: int) -> list[int]:
    """The orphaned inodes recorded under layer."""
    prefix = layer.to_bytes(8, "big")
    return [int.from_bytes(k[8:16], "big") for k, _ in kv.scan(CF_ORPHANS, prefix, prefix)]


def every(kv: KV) -> set[int]:
    """Every orphaned inode recorded, whatever its layer."""
    return {int.from_bytes(k[8:16], "big") for k, _ in kv.scan(CF_ORPHANS, b"")}
