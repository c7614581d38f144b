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

A *clone* (`Clone`, made by the `clone` command of a directory) is the same idea made at
once, without enumerating the tree: "the tree under copy directory `top_y` reads as the tree
under `top_x` of the frozen layer `layer`, for every view that has layer `seen` (the head the
clone was written in) in its ancestry".  Its copy inodes get numbers lazily, the first time
a reader translates an original's number (`CloneMap`): from a space of their own
(`COPY_INO_BASE` and up), persisted as two keys per number before any record can name it.
The clone's top has a real record; records, entries, xattrs and the names of hard-linked
files of its other copies read through the clone until written.  A clone holds no reference
to data: it keeps its layer alive as a top for garbage collection (the whole layer, as a
snapshot would), so the originals' versions and their references stay while it lives.
Resolution may take several steps (a clone of a clone), never through the same clone twice.
"""
from __future__ import annotations

import bisect
import json
import threading
from array import array
from dataclasses import dataclass, field
from typing import Iterator

import zstandard

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import CF_META
from cowfs.meta.lineage import Ancestry

PREFIX = b"share/"
CLONE_PREFIX = b"clone/"  # + top_y(8) -> the clone (JSON)
MAP_PREFIX = b"cmap/"  # + top_y(8) + x(8) -> y(8): an original's copy in one clone
INO_PREFIX = b"cino/"  # + y(8) -> top_y(8) + x(8): what a copy inode reads as
COUNTER = b"counter/copyino"
# Copy inodes of clones are numbered from here (ordinary inode numbers stay below: the FUSE
# layer's inode numbers hold 36 bits of store inode number, cowfs.fuse.inodes).
COPY_INO_BASE = 1 << 35


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
    def seen(self) -> int:
        """The layer whose descendants see the copies (for a range: the layer it reads from)."""
        return self.layer

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


@dataclass
class Clone:
    """A directory clone made at once: copy top_y's tree reads as top_x's of view(layer), for
    every view with `seen` in its ancestry."""

    top_y: int
    top_x: int
    layer: int  # frozen: the originals as they were when the clone was made
    seen: int  # the layer the clone's top was written in
    ctime: int  # every copy's ctime (the clone's time)
    uid: int = -1  # every copy's owner (-1: the originals'): a clone by an unprivileged user
    gid: int = -1
    measured: bool = False  # the copies' usage is in the usage records of the views that see them
    usage: tuple[int, int, int] = (0, 0, 0)  # (logical, inodes, allocated) of the copies, once measured

    @property
    def key(self) -> bytes:
        return CLONE_PREFIX + self.top_y.to_bytes(8, "big")

    def pack(self) -> bytes:
        return json.dumps({"top_y": self.top_y, "top_x": self.top_x, "layer": self.layer, "seen": self.seen,
                           "ctime": self.ctime, "uid": self.uid, "gid": self.gid, "measured": self.measured,
                           "usage": list(self.usage)}).encode()

    @classmethod
    def unpack(cls, value: bytes) -> "Clone":
        d = json.loads(value)
        d["usage"] = tuple(d["usage"])
        return cls(**d)


class CloneMap:
    """Copy inode numbers of clones, given on first use and persisted at once (a small
    write, not synced: it is in the log before any commit that could name the number), so
    that a number is the same for every reader, thread and view, across restarts.  Safe to
    call from worker threads."""

    CACHE = 1 << 16

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._lock = threading.Lock()
        raw = kv.get(CF_META, COUNTER)
        self._next = int.from_bytes(raw, "big") if raw else COPY_INO_BASE
        self._fwd: dict[tuple[int, int], int] = {}
        self._back: dict[int, tuple[int, int]] = {}

    def _remember(self, top: int, x: int, y: int) -> None:
        if len(self._fwd) >= self.CACHE:
            self._fwd.clear()
            self._back.clear()
        self._fwd[(top, x)] = y
        self._back[y] = (top, x)

    def _stored(self, top: int, x: int) -> int | None:
        y = self._fwd.get((top, x))
        if y is None:
            raw = self.kv.get(CF_META, MAP_PREFIX + top.to_bytes(8, "big") + x.to_bytes(8, "big"))
            if raw is not None:
                y = int.from_bytes(raw, "big")
                self._remember(top, x, y)
        return y

    def copies(self, c: Clone, xs: list[int]) -> list[int]:
        """The copy inode of each original in xs (numbers given to those that had none)."""
        out: list[int] = []
        missing: list[int] = []
        for x in xs:
            y = c.top_y if x == c.top_x else self._stored(c.top_y, x)
            out.append(-1 if y is None else y)
            if y is None:
                missing.append(len(out) - 1)
        if not missing:
            return out
        with self._lock:
            batch, given, mem = Batch(), {}, []
            for i in missing:
                x = xs[i]
                y = given.get(x) or self._stored(c.top_y, x)
                if y is None:
                    y = given[x] = self._next
                    self._next += 1
                    top8, x8, y8 = c.top_y.to_bytes(8, "big"), x.to_bytes(8, "big"), y.to_bytes(8, "big")
                    batch.put(CF_META, MAP_PREFIX + top8 + x8, y8)
                    batch.put(CF_META, INO_PREFIX + y8, top8 + x8)
                    mem.append((x, y))
                out[i] = y
            if mem:
                batch.put(CF_META, COUNTER, self._next.to_bytes(8, "big"))
                try:
                    self.kv.write(batch)
                except BaseException:
                    self._next -= len(mem)
                    raise
                for x, y in mem:
                    self._remember(c.top_y, x, y)
        return out

    def origin(self, y: int) -> tuple[int, int] | None:
        """(clone top, original) of copy inode y, if it was given."""
        hit = self._back.get(y)
        if hit is None:
            raw = self.kv.get(CF_META, INO_PREFIX + y.to_bytes(8, "big"))
            if raw is None:
                return None
            hit = (int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big"))
            self._remember(hit[0], hit[1], y)
        return hit

    def given(self, c: Clone) -> Iterator[tuple[int, int]]:
        """(original, copy inode) of every number given for c."""
        prefix = MAP_PREFIX + c.top_y.to_bytes(8, "big")
        for key, value in self.kv.scan(CF_META, prefix, prefix):
            yield int.from_bytes(key[len(prefix):], "big"), int.from_bytes(value, "big")

    def forget(self, c: Clone, batch: Batch) -> None:
        """Delete c's numbers (in batch; the caches are cleared by `forgotten`)."""
        for x, y in list(self.given(c)):
            batch.delete(CF_META, MAP_PREFIX + c.top_y.to_bytes(8, "big") + x.to_bytes(8, "big"))
            batch.delete(CF_META, INO_PREFIX + y.to_bytes(8, "big"))

    def forgotten(self) -> None:
        with self._lock:
            self._fwd.clear()
            self._back.clear()


class SharedTrees:
    """Every range of the store, indexed by copy inode.  `ranges` and `_index` are replaced,
    never changed in place (only on the event loop, after the commit that wrote the change),
    so a thread that reads records meanwhile sees one consistent table."""

    def __init__(self, ranges: list[Range] | None = None, clones: list[Clone] | None = None,
                 kv: KV | None = None) -> None:
        self.ranges: dict[bytes, Range] = {}
        self._index: tuple[list[int], list[tuple[int, int, Range]]] = ([], [])
        for r in ranges or ():
            self.ranges[r.key] = r
        self._reindex()
        self.clones: dict[int, Clone] = {c.top_y: c for c in clones or ()}  # by copy top
        self.map = CloneMap(kv) if kv is not None else None

    @classmethod
    def load(cls, kv: KV) -> "SharedTrees":
        return cls([Range.unpack(int.from_bytes(k[len(PREFIX):len(PREFIX) + 8], "big"), v)
                    for k, v in kv.scan(CF_META, PREFIX, PREFIX)],
                   [Clone.unpack(v) for _k, v in kv.scan(CF_META, CLONE_PREFIX, CLONE_PREFIX)], kv)

    def _reindex(self) -> None:
        spans = sorted((y0, y0 + n, r) for r in self.ranges.values() for y0, _x0, n in r.runs)
        self._index = ([s[0] for s in spans], spans)

    def __bool__(self) -> bool:
        return bool(self.ranges) or bool(self.clones)

    def figures(self) -> dict[str, int]:
        """Ranges, copy inodes that read through them, and clones."""
        return {"ranges": len(self.ranges), "inodes": sum(r.size for r in self.ranges.values()),
                "clones": len(self.clones)}

    def find(self, y: int) -> tuple[Range | Clone, int] | None:
        """(range or clone, source inode) of copy inode y, whatever views see it."""
        clones = self.clones
        if clones:
            c = clones.get(y)
            if c is not None:
                return c, c.top_x
            if y >= COPY_INO_BASE and self.map is not None:
                o = self.map.origin(y)
                c = clones.get(o[0]) if o is not None else None
                if c is not None:
                    return c, o[1]  # type: ignore[index]
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

    def visible(self, ancestors: Ancestry) -> list[Range]:
        return [r for r in self.ranges.values() if r.layer in ancestors]

    def visible_clones(self, ancestors: Ancestry) -> list[Clone]:
        return [c for c in self.clones.values() if c.seen in ancestors]

    def add_clone(self, c: Clone, batch: Batch) -> None:
        batch.put(CF_META, c.key, c.pack())

    def remove_clone(self, c: Clone, batch: Batch) -> None:
        """Delete c and its copy numbers (in batch; then `clones_committed`)."""
        batch.delete(CF_META, c.key)
        if self.map is not None:
            self.map.forget(c, batch)

    def clones_committed(self, added: list[Clone] = (), removed: list[Clone] = ()) -> None:  # type: ignore[assignment]
        clones = dict(self.clones)
        for c in removed:
            clones.pop(c.top_y, None)
        for c in added:
            clones[c.top_y] = c
        self.clones = clones
        if removed and self.map is not None:
            self.map.forgotten()
