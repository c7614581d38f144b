"""Reads and writes of layer-versioned keys (see cowfs.meta.layers for the model).

A stored key is `base + layer_suffix(layer)`; `base` is ino8 for inodes and
`ino8 + name + b"\\0"` for directory entries and xattrs (names never contain NUL, so all
versions of one name are adjacent and no other name shares the prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import layer_suffix, suffix_layer

CF_INODES = "inodes"
CF_DIRENTS = "dirents"
CF_XATTRS = "xattrs"
# layer(8) + family tag(1) + base key -> b"": every key written in a layer, so that diff and
# garbage collection cost time proportional to what changed, not to the whole store.
CF_CHANGES = "changes"
TAGS = {CF_INODES: b"i", CF_DIRENTS: b"d", CF_XATTRS: b"x"}
FAMILY = {v: k for k, v in TAGS.items()}


@dataclass(frozen=True, slots=True)
class LayerView:
    """What one branch or snapshot sees: its top layer and that layer's ancestry."""

    top: int
    ancestors: frozenset[int]


def ino_key(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def name_key(ino: int, name: bytes) -> bytes:
    return ino.to_bytes(8, "big") + name + b"\x00"


class Versioned:
    def __init__(self, kv: KV) -> None:
        self.kv = kv

    def get(self, cf: str, base: bytes, lv: LayerView) -> tuple[int, bytes] | None:
        """(layer, value) of the version lv sees (value may be a tombstone b""), or None."""
        if len(lv.ancestors) == 1:
            # A view with one layer (no snapshot yet): a point read is exact, and much
            # cheaper than an iterator seek.
            value = self.kv.get(cf, base + layer_suffix(lv.top))
            return None if value is None else (lv.top, value)
        for key, value in self.kv.scan(cf, base + layer_suffix(lv.top), base):
            layer = suffix_layer(key[-8:])
            if layer in lv.ancestors:
                return layer, value
        return None

    def has_older(self, cf: str, base: bytes, lv: LayerView) -> bool:
        """Whether an ancestor below the top layer holds a version (then deletes need a tombstone)."""
        if len(lv.ancestors) == 1:
            return False
        for key, value in self.kv.scan(cf, base + layer_suffix(lv.top - 1), base):
            if suffix_layer(key[-8:]) in lv.ancestors:
                return True
        return False

    @staticmethod
    def put(batch: Batch, cf: str, base: bytes, layer: int, value: bytes) -> None:
        batch.put(cf, base + layer_suffix(layer), value)
        batch.put(CF_CHANGES, layer.to_bytes(8, "big") + TAGS[cf] + base, b"")

    def delete(self, batch: Batch, cf: str, base: bytes, lv: LayerView) -> None:
        """Hide base from lv's top layer onwards."""
        if self.has_older(cf, base, lv):
            self.put(batch, cf, base, lv.top, b"")
        else:
            batch.delete(cf, base + layer_suffix(lv.top))
            batch.delete(CF_CHANGES, lv.top.to_bytes(8, "big") + TAGS[cf] + base)

    def changed(self, layer: int) -> Iterator[tuple[str, bytes]]:
        """(family, base key) of every key that has a version in layer."""
        prefix = layer.to_bytes(8, "big")
        for key, _ in self.kv.scan(CF_CHANGES, prefix, prefix):
            yield FAMILY[key[8:9]], key[9:]

    def versions(self, cf: str, base: bytes) -> list[tuple[int, bytes]]:
        """Every (layer, value) of base, newest layer first."""
        return [(suffix_layer(k[-8:]), v) for k, v in self.kv.scan(cf, base, base)]

    def scan_names(self, cf: str, ino: int, lv: LayerView, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(name, value) of every live name under ino visible in lv, in name order."""
        prefix = ino.to_bytes(8, "big")
        last = None
        for key, value in self.kv.scan(cf, prefix + start, prefix):
            name = key[8:-9]
            if name == last:
                continue
            if suffix_layer(key[-8:]) in lv.ancestors:
                last = name
                if value:
                    yield name, value
