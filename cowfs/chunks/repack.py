"""Garbage collection of packs: delete the packs nothing points at, and copy the live
encodings of mostly-dead packs into new packs (repacking), so that the space of freed
packed chunks comes back without any operation object storage lacks.

A pass (driven by background.gc.sweep_packs, under Filesystem.maintenance):
  1. `Packs.listing()` under Filesystem.lock: every pack a flush ever put has its commit
     done or abandoned at that moment (a flush holds the lock from its pack put to its
     commit);
  2. `survey` (a thread, no lock): one scan of the pointers, which starts after the
     listing, gives each pack's live bytes (Store.survey_packs adds the member databases'
     pointers: chunks.liveness).  A listed pack with none is garbage for good: new
     pointers only ever name new packs (a flush's, a repack's), never an existing one; so
     it is condemned at once (chunks.liveness: deleted by the sweep that ends the pass once
     every writer has acknowledged the condemnation).  Listed packs whose live share is
     below the threshold, and that no member points into, are candidates, grouped into new
     packs of up to REPACK_TARGET live bytes;
  3. per group, `copy` (a thread, no lock): the group's live encodings (from a second
     scan, which names the pointers) are read and put as one new pack;
  4. `moves` under Filesystem.lock, with no checkpoint up to the commit: each pointer
     that still holds the value the copy saw is rewritten to the new pack (a chunk freed,
     re-encoded or moved meanwhile is left alone, its copy dead in the new pack); the
     batch is committed and synced;
  5. the group's old packs are condemned: no pointer names them any more (the commit moved
     every one the scan saw, and none can appear), and the commit is durable, so no crash
     can bring back a pointer into them.  A new pack that received no pointer too.  An old
     pack another database points into (the place of a duplicate the store keeper chose,
     chunks.dups) is not: its moved chunks' new places are published as dup records, the
     other databases follow them, and a later gc finds the old pack unmarked.
A crash anywhere leaves packs nothing points at (a put not committed, an old pack not yet
condemned or deleted), which the next pass condemns and deletes; never a pointer to bytes
that are not there.

Names are random ids, never derived from the content: a content-derived name could be put
again, identically, by a flush between the listing and the delete of a dead pack of the
same bytes, and the delete would then remove live data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cowfs import faults
from cowfs.chunks import codec, remotecache
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.packs import Packs
from cowfs.kv.base import KV, Batch

REPACK_BELOW = 0.5  # packs whose live bytes are under this share of their size are repacked
# the same for a pack the store keeper's rewrites left partly dead (Survey.left): the place of a
# duplicate that won in a pack that lost others, which other databases point into, is dead
# for good unless its owner repacks it (chunks.dups), so a smaller dead share is worth a copy
LEFT_BELOW = 0.95
REPACK_TARGET = 64 << 20  # live bytes gathered into one new pack
READ_GAP = 64 << 10  # live ranges of an old pack closer than this are read as one


@dataclass
class Survey:
    """What one scan of the pointers says about the listed packs."""

    sizes: dict[int, int]  # listed pack -> size
    live: dict[int, int] = field(default_factory=dict)  # pack -> this database's live bytes (unlisted ones too)
    theirs: dict[int, int] = field(default_factory=dict)  # pack -> the other databases' live bytes
    # packs another database points into or a dup record names: a repack moves this
    # database's pointers out and publishes the new places (chunks.dups.follow_moves), so the
    # others follow; it never condemns them (a later gc finds them unmarked)
    foreign: set[int] = field(default_factory=set)
    # a lazy mount's cache packs (chunks.remotecache): evicted whole, never repacked (a copy
    # would make fetched chunks local for good, out of the cache's bound)
    cached: set[int] = field(default_factory=set)
    left: set[int] = field(default_factory=set)  # packs dup rewrites moved this database's pointers out of

    def used(self, p: int) -> int:
        """Live bytes of pack p in any database."""
        return self.live.get(p, 0) + self.theirs.get(p, 0)

    def marked(self) -> list[int]:
        return sorted(p for p in self.live.keys() | self.theirs.keys() if self.used(p))

    def garbage(self) -> list[int]:
        return sorted(p for p in self.sizes if not self.used(p))

    def groups(self, below: float, target: int = REPACK_TARGET) -> list[list[int]]:
        """Candidate packs (this database's live share below `below`, LEFT_BELOW for one the
        keeper's rewrites left partly dead, but some live), in groups whose live bytes fit one
        new pack; the emptiest first."""
        cands = sorted((self.live[p] / max(size, 1), p) for p, size in self.sizes.items()
                       if self.live.get(p) and self.live[p] < (max(below, LEFT_BELOW) if p in self.left else below) * size
                       and p not in self.cached)
        groups: list[list[int]] = []
        total = 0
        for _share, p in cands:
            if not groups or total + self.live[p] > target:
                groups.append([])
                total = 0
            groups[-1].append(p)
            total += self.live[p]
        return groups

    def dead_bytes(self) -> int:
        return sum(size - min(self.used(p), size) for p, size in self.sizes.items())


def survey(kv: KV, sizes: dict[int, int]) -> Survey:
    """Live bytes per pack, from a scan of every pointer (blocking: call in a thread)."""
    s = Survey(dict(sizes), cached=remotecache.cache_packs(kv))
    for _h, raw in kv.scan(CF_OBJECTS, b""):
        ext = codec.packed_extent(raw)
        if ext is not None:
            s.live[ext[0]] = s.live.get(ext[0], 0) + ext[2]
    return s


@dataclass
class Copy:
    """A group's live encodings, put as one new pack: the moves to commit."""

    old: list[int]  # the group's packs
    new: int | None  # the new pack (None: nothing was live any more)
    moves: list[tuple[bytes, bytes, bytes]]  # (hash, pointer the copy saw, pointer into the new pack)
    copied: int = 0  # bytes copied


def copy(kv: KV, packs: Packs, group: list[int]) -> Copy:
    """Read the live encodings of the group's packs and put them as one new pack, in their
    old order (a run of a file streamed in stays a run).  Blocking: call in a thread."""
    members = set(group)
    found: list[tuple[int, int, int, bytes, bytes]] = []  # (pack, offset, length, hash, pointer)
    for h, raw in kv.scan(CF_OBJECTS, b""):
        ext = codec.packed_extent(raw)
        if ext is not None and ext[0] in members:
            found.append((ext[0], ext[1], ext[2], h, raw))
    found.sort()
    parts: list[bytes] = []
    i = 0
    while i < len(found):  # read nearby live ranges of one pack with one get
        pack, start = found[i][0], found[i][1]
        j, end = i, found[i][1] + found[i][2]
        while j + 1 < len(found) and found[j + 1][0] == pack and found[j + 1][1] <= end + READ_GAP:
            j += 1
            end = max(end, found[j][1] + found[j][2])
        data = packs.read(pack, start, end - start)
        for k in range(i, j + 1):
            _p, off, length, _h, _raw = found[k]
            parts.append(data[off - start : off - start + length])
        i = j + 1
    if not parts:
        return Copy(group, None, [])
    new, exts = packs.write(parts, [(h, codec.packed_kind(raw), codec.chunk_sizes(raw)[0])
                                    for _p, _off, _len, h, raw in found])
    moves = []
    for (_p, _off, length, h, raw), (off, _n) in zip(found, exts):
        moves.append((h, raw, codec.encode_packed(codec.packed_kind(raw), new, off, length,
                                                  codec.chunk_sizes(raw)[0])))
    faults.point("repack_copied")
    return Copy(group, new, moves, sum(len(p) for p in parts))


def moves(kv: KV, c: Copy, batch: Batch) -> int:
    """Put into batch the moves whose pointer is still what the copy saw; return how many.
    Call under Filesystem.lock with no checkpoint until the batch is committed."""
    n = 0
    for h, old, new in c.moves:
        if kv.get(CF_OBJECTS, h) == old:
            batch.put(CF_OBJECTS, h, new)
            n += 1
    return n
