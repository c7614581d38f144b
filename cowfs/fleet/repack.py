"""Repacking of partly dead packs on the remote, by `cowfs remote gc` (cowfs.fleet.gc).

A pack stays whole while any of its blobs is reachable, so once most snapshots that used it
are deleted most of its bytes can be garbage for good.  The gc finds the packs whose live
bytes (stored bytes of reachable blobs, by that pack's own index) are below a share of the
pack's size (`--repack-below`, default REPACK_BELOW) and that would free at least
REPACK_MIN_DEAD bytes (a fork's push makes packs of a few KB: each would cost a forward that
every reader reads, for little), and:

1. copies their live blobs, as stored (encoding kept; each checked against its id first),
   into new packs in the push's format (chunks first, trees after, sealed at PACK_TARGET;
   pack id = BLAKE3 of its bytes, so a rerun after a kill makes the same packs) and puts
   each pack, then its index;
2. then publishes, per old pack, a **forward**: the new packs holding its live blobs.  The
   forwards of the whole remote are one immutable object `forwards/<id>` (JSON, id = BLAKE3
   of it), put first, then named by the etcd key `gc/forwards`, set by compare-and-set under
   the gc's lease (`publish`): readers see all of a gc's forwards or none, with one etcd read
   (and a GET once per host per new object), whatever the number of packs repacked;
3. then condemns the old pack's index and data, which a later gc deletes after the grace
   period if the pack is still *superseded*: every blob of it that is reachable then is in
   the packs its forwards lead to (cowfs.fleet.gc).  A forward stays while a reachable
   commit names its pack (directly or through other forwards); then the gc drops it, after
   the grace period too.

Readers (cowfs.fleet.remote) replace a forwarded pack by the packs its forwards lead to when
they load a commit's indexes, and a fetch that finds a pack gone follows its forwards, so a
commit that names an old pack (commits are immutable) and a lazy mount whose chunk records
name it keep working once it is deleted.  Why no push can be left naming a blob only the
deleted pack held: docs/architecture.md, "Repacking".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cowfs import faults
from cowfs.fleet import FleetError
from cowfs.fleet.objects import PACK_TARGET, Loc, PackBuilder, decode_blob, encode_forwards
from cowfs.fleet.remote import Remote

REPACK_BELOW = 0.5          # a pack whose live bytes are under this share of its size is repacked,
REPACK_MIN_DEAD = 1 << 20   # if it frees at least this: a forward costs every reader, a tiny pack frees little
_GAP = 256 << 10            # live blobs of an old pack closer than this are read in one ranged GET
_RUN_MAX = 16 << 20


@dataclass
class Plan:
    """What one gc repacks: per old pack, the live blobs to copy (by offset)."""
    copy: dict[str, list[tuple[bytes, Loc]]] = field(default_factory=dict)
    old_bytes: int = 0          # size of the packs repacked: freed once they are deleted
    live_bytes: int = 0         # stored bytes copied


def plan(by_pack: dict[str, dict[bytes, Loc]], live: dict[str, list[bytes]], sizes: dict[str, int],
         uncovered: dict[str, list[bytes]], below: float) -> Plan:
    """The packs to repack: those (not forwarded yet) whose live share is under `below` and
    that would free REPACK_MIN_DEAD bytes at least, and the
    forwarded ones with reachable blobs their forwards' packs lack (`uncovered`: cannot happen
    unless a forward was lost; copied again rather than left for a deletion to lose)."""
    p = Plan()
    for pack in sorted(live):
        want = uncovered.get(pack)
        if want is None:
            if pack not in sizes or not live[pack]:
                continue
            live_bytes = sum(by_pack[pack][h].length for h in live[pack])
            if live_bytes >= below * sizes[pack] or sizes[pack] - live_bytes < REPACK_MIN_DEAD:
                continue
            want = live[pack]
        if want:
            p.copy[pack] = sorted(((h, by_pack[pack][h]) for h in want), key=lambda x: x[1].offset)
            p.old_bytes += sizes.get(pack, 0)
            p.live_bytes += sum(loc.length for _h, loc in p.copy[pack])
    return p


def repack(remote: Remote, p: Plan, lost: Callable[[], bool]) -> dict[str, list[str]]:
    """Copy the plan's blobs into new packs and put them (pack, then index); old pack -> the
    new packs holding its blobs (its forward, to publish).  lost(): the gc's lease is gone
    (stop before writing anything more)."""
    builder = PackBuilder()
    gen = 0                                    # the builder's number: its pack id once sealed
    placed: dict[bytes, int] = {}             # blob -> the builder it went into
    sources: dict[str, set[int]] = {}
    sealed: dict[int, str] = {}

    def seal() -> None:
        nonlocal builder, gen
        if not builder.entries:
            return
        if lost():
            raise FleetError("the gc's lease on the remote expired (etcd unreachable?): stopped repacking")
        pack, data, index, _hashes = builder.seal()
        remote.blobs.put("data/" + pack, data)        # write-once: a rerun's same pack is skipped
        remote.blobs.put("index/" + pack, index)
        sealed[gen] = pack
        builder, gen = PackBuilder(), gen + 1

    for old, blobs in p.copy.items():
        todo = [(h, loc) for h, loc in blobs if h not in placed]
        sources[old] = {placed[h] for h, _loc in blobs if h in placed}
        for run in _runs(todo):
            start = run[0][1].offset
            data = remote.blobs.get("data/" + old, start, run[-1][1].offset + run[-1][1].length - start)
            for h, loc in run:
                stored = data[loc.offset - start:loc.offset - start + loc.length]
                decode_blob(loc, stored, h)           # never copy a damaged blob
                builder.add(h, loc.kind, loc.enc, stored, loc.raw)
                placed[h] = gen
                sources[old].add(gen)
                if builder.size >= PACK_TARGET:
                    seal()
    seal()
    faults.point("fleet_repack_packed")
    return {old: sorted({sealed[g] for g in sources[old]}) for old in p.copy}


def publish(remote: Remote, moved: dict[str, list[str]], fence: tuple) -> str | None:
    """Make `moved` the remote's forwards: put its object, then point gc/forwards at it by
    compare-and-set from the one this gc read (and while its lease holds); its id (None
    when there are none: the key is removed)."""
    from cowfs.kv.base import Batch, Conflict

    batch = Batch()
    fid = None
    if moved:
        fid, data = encode_forwards(moved)
        remote.blobs.put("forwards/" + fid, data)
        batch.put("gc", b"forwards", fid.encode())
    else:
        batch.delete("gc", b"forwards")
    old = remote.forwards_id
    try:
        remote.refs.write(batch, [fence, ("gc", b"forwards", None if old is None else old.encode())])
    except Conflict:
        raise FleetError("the remote's forwards or the gc's lease changed under this gc (its lease expired?): "
                         "stopped; run it again") from None
    remote.forwards_id = fid
    faults.point("fleet_repack_moved")
    return fid


def _runs(blobs: list[tuple[bytes, Loc]]) -> list[list[tuple[bytes, Loc]]]:
    """Blobs (by offset) in ranged GETs: neighbours closer than _GAP together, up to _RUN_MAX."""
    runs: list[list[tuple[bytes, Loc]]] = []
    cur: list[tuple[bytes, Loc]] = []
    for h, loc in blobs:
        if cur and (loc.offset - (cur[-1][1].offset + cur[-1][1].length) > _GAP
                    or loc.offset + loc.length - cur[0][1].offset > _RUN_MAX):
            runs.append(cur)
            cur = []
        cur.append((h, loc))
    if cur:
        runs.append(cur)
    return runs
