"""Shared subtrees: a copied directory tree that reads its records from the original.

`cp -a` of a tree stores every file's data once (chunks are content-addressed), but each
copied inode still costs an inode record, a directory entry and their changelog keys:
about 65 bytes per inode on disk, whose 32-byte content hashes do not compress.  When the
background sharer (cowfs.background.sharing) finds that a tree Y is an exact copy of a tree X, it
deletes Y's inode records and entries and writes one *range* instead: "copy inode y reads
as source inode x, seen from layer P", for every pair, where P is a frozen layer (the
branch head of the time, frozen as a snapshot's would be) that keeps X as it was.  Y keeps
its inode numbers and its own ctimes and atimes (stored in the range), so nothing
observable changes.

A range is a virtual layer below all real ones, for the keys of its copy inodes (inode
records and directory entries; xattrs stay ordinary keys): any real version of such a key
in a view's ancestry wins over it, so writes into the copy land as ordinary records and
deletes as tombstones, and a view without P in its ancestry never sees the range.  Sources
are never themselves copies (resolution is one step), and a copy inode is never a source.
"""
from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field
from typing import Iterator

import zstandard

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import CF_META

PREFIX = b"share/"


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        v = (v << 1) ^ (v >> 63) if v < 0 else v << 1  # zigzag
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _unvarints(data: bytes) -> list[int]:
    out, v, shift = [], 0, 0
    for byte in data:
        v |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        out.append((v >> 1) ^ -(v & 1))
        v, shift = 0, 0
    return out


@dataclass
class Range:
    """Copy inodes [y0, y0+n) read as [x0, x0+n) of view(layer), for each run (y0, x0, n)."""

    layer: int
    runs: list[tuple[int, int, int]]  # sorted by y0
    ctimes: list[int]  # one per copy inode, in run order
    atimes: list[int] = field(default_factory=list)  # the same, or empty: the originals' atimes
    _xruns: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    _offsets: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # 8 bytes a time (a list of ints costs ~36): a store may hold millions of copy inodes.
        self.ctimes = array("q", self.ctimes)  # type: ignore[assignment]
        self.atimes = array("q", self.atimes)  # type: ignore[assignment]
        self.runs.sort()
        self._xruns = sorted((x0, y0, n) for y0, x0, n in self.runs)
        total, self._offsets = 0, []
        for _y0, _x0, n in self.runs:
            self._offsets.append(total)
            total += n
        if total != len(self.ctimes) or (self.atimes and total != len(self.atimes)):
            raise ValueError(f"range of {total} inodes has {len(self.ctimes)} ctimes, {len(self.atimes)} atimes")

    @property
    def key(self) -> bytes:
        return PREFIX + self.layer.to_bytes(8, "big") + self.runs[0][0].to_bytes(8, "big")

    @property
    def size(self) -> int:
        return len(self.ctimes)

    def _find(self, runs: list[tuple[int, int, int]], ino: int) -> int | None:
        i = bisect.bisect_right(runs, (ino, 1 << 64, 0)) - 1
        return i if i >= 0 and runs[i][0] <= ino < runs[i][0] + runs[i][2] else None

    def x_of(self, y: int) -> int | None:
        i = self._find(self.runs, y)
        return None if i is None else self.runs[i][1] + y - self.runs[i][0]

    def y_of(self, x: int) -> int | None:
        i = self._find(self._xruns, x)
        return None if i is None else self._xruns[i][1] + x - self._xruns[i][0]

    def times(self, y: int) -> tuple[int | None, int]:
        """(atime, or None for the original's; ctime) of copy inode y."""
        i = self._find(self.runs, y)
        assert i is not None
        k = self._offsets[i] + y - self.runs[i][0]
        return (self.atimes[k] if self.atimes else None), self.ctimes[k]

    def pairs(self) -> Iterator[tuple[int, int]]:
        for y0, x0, n in self.runs:
            for k in range(n):
                yield y0 + k, x0 + k

    def pack(self) -> bytes:
        """Varints (runs as gaps, times as differences from the previous one), zstd'd."""
        flat: list[int] = [len(self.runs), 1 if self.atimes else 0]
        prev_y = prev_x = 0
        for y0, x0, n in self.runs:
            flat += [y0 - prev_y, x0 - prev_x, n]
            prev_y, prev_x = y0 + n, x0 + n
        for times in (self.ctimes, self.atimes):
            prev = 0
            for t in times:
                flat.append(t - prev)
                prev = t
        return zstandard.ZstdCompressor(level=19).compress(_varints(flat))

    @classmethod
    def unpack(cls, layer: int, value: bytes) -> "Range":
        flat = _unvarints(zstandard.ZstdDecompressor().decompress(value))
        nruns, has_atimes, pos = flat[0], flat[1], 2
        runs, prev_y, prev_x = [], 0, 0
        for _ in range(nruns):
            y0, x0, n = prev_y + flat[pos], prev_x + flat[pos + 1], flat[pos + 2]
            runs.append((y0, x0, n))
            prev_y, prev_x, pos = y0 + n, x0 + n, pos + 3
        total = sum(n for _y, _x, n in runs)
        ctimes, atimes = _sums(flat[pos:pos + total]), _sums(flat[pos + total:]) if has_atimes else []
        return cls(layer, runs, ctimes, atimes)


def _sums(deltas: list[int]) -> list[int]:
    out, prev = [], 0
    for d in deltas:
        prev += d
        out.append(prev)
    return out


def runs_of(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Sorted (y, x) pairs as maximal runs (y0, x0, n) where both sides count up together."""
    runs: list[tuple[int, int, int]] = []
    for y, x in pairs:
        if runs and runs[-1][0] + runs[-1][2] == y and runs[-1][1] + runs[-1][2] == x:
            y0, x0, n = runs[-1]
            runs[-1] = (y0, x0, n + 1)
        else:
            runs.append((y, x, 1))
    return runs


class SharedTrees:
    """Every range of the store, indexed by copy inode.  `ranges` and `_index` are replaced,
    never changed in place (only on the event loop, after the commit that wrote the change),
    so a thread that reads records meanwhile sees one consistent table."""

    def __init__(self, ranges: list[Range] | None = None) -> None:
        self.ranges: dict[bytes, Range] = {}
        self._index: tuple[list[int], list[tuple[int, int, Range]]] = ([], [])
        for r in ranges or ():
            self.ranges[r.key] = r
        self._reindex()

    @classmethod
    def load(cls, kv: KV) -> "SharedTrees":
        return cls([Range.unpack(int.from_bytes(k[len(PREFIX):len(PREFIX) + 8], "big"), v)
                    for k, v in kv.scan(CF_META, PREFIX, PREFIX)])

    def _reindex(self) -> None:
        spans = sorted((y0, y0 + n, r) for r in self.ranges.values() for y0, _x0, n in r.runs)
        self._index = ([s[0] for s in spans], spans)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def figures(self) -> dict[str, int]:
        """Ranges, and copy inodes that read through them."""
        return {"ranges": len(self.ranges), "inodes": sum(r.size for r in self.ranges.values())}

    def find(self, y: int) -> tuple[Range, int] | None:
        """(range, source inode) of copy inode y, whatever views see the range."""
        starts, spans = self._index
        i = bisect.bisect_right(starts, y) - 1
        if i < 0 or y >= spans[i][1]:
            return None
        r = spans[i][2]
        x = r.x_of(y)
        return None if x is None else (r, x)

    def sources(self) -> dict[int, set[int]]:
        """Source inode -> the layers it is seen from by ranges (what garbage collection keeps)."""
        out: dict[int, set[int]] = {}
        for r in self.ranges.values():
            for _y, x in r.pairs():
                out.setdefault(x, set()).add(r.layer)
        return out

    def add(self, r: Range, batch: Batch) -> None:
        batch.put(CF_META, r.key, r.pack())

    def remove(self, r: Range, batch: Batch) -> None:
        batch.delete(CF_META, r.key)

    def committed(self, added: list[Range] = (), removed: list[Range] = ()) -> None:  # type: ignore[assignment]
        """Apply to memory what a committed batch did (add/remove only write the batch)."""
        ranges = dict(self.ranges)  # a new dict: threads iterating the old one are not disturbed
        for r in removed:
            ranges.pop(r.key, None)
        for r in added:
            ranges[r.key] = r
        self.ranges = ranges
        self._reindex()

    def visible(self, ancestors: frozenset[int]) -> list[Range]:
        return [r for r in self.ranges.values() if r.layer in ancestors]
