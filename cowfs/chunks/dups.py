"""Duplicate chunks across the databases of one store, and their elimination by the store
keeper (docs/design-many-processes.md, "Writing, dedup and the store keeper" and step 7).

Within one database dedup is exact (its `objects` family answers "do we have H").  Across
databases it cannot be at write time: a branch's own daemon never points at a chunk another
database wrote after its branch point (ObjectStore.stored reads the home only), so two
daemons that write the same new data both pack it.  The keeper (the process holding the lease
`gc/lease/keeper`, KeeperLease: any daemon's schedule, or a `cowfs gc`) finds such chunks
afterwards:

  1. *scan*: the indexes at the end of the packs it has not settled yet (`ScanState`: the
     packs of earlier passes are not read again), and for each hash listed there, its
     record in every database of the store (one point read each).  A hash with packed (P)
     records naming two or more different places is a duplicate.  Only P records take
     part: an inline or delta record is small or depends on a base of its own database.
  2. *publish*: `dup/<hash>` -> the P record every database is to hold, one compare-and-set
     on the reference store with the new scan state and a bumped generation (`gc/dupgen`).
     The record chosen is the one most databases already hold (the fewest rewrites); on a
     tie the store's database's (the base: its packs are the oldest), then the database
     first by name, the same for every chunk, so a loser's copies fill whole packs, which
     pack gc deletes.  "The oldest
     copy" of the design is approximated so: a BlobStore lists names and sizes, no times.
     The pack a record names must be there and not condemned, and the chunk at its place is
     read and checked against its hash before it is published (a pack index is a hint).
  3. *rewrite*: each database's own writer points its record at the published place
     (`plan`, committed as a re-encoding, `RefTxn.recode`: the accounting follows), on its
     own background pass after the generation moved (cowfs.background.gc.rewrite_dups);
     one writer per database stays true.  A database no process holds, the keeper rewrites
     itself.  Its old copy is then a dead range: a daemon that rewrote collects its own packs
     at once (a repack moves its own database's pointers only), and the store's next gc
     condemns the packs left wholly dead.  A pack left partly dead that others point into (a
     place that won, in a pack that lost other chunks: three databases, one keeping some
     chunks inline) is repacked by its owner all the same: `follow_moves` publishes the new
     places so the others follow, and the old pack dies whole.
  4. *settle*: a record every database now holds (or none still holds another copy of) is
     deleted by a later pass; one whose pack went away or is condemned is chosen again.  A
     pass looks the open records up again only after a database followed a generation
     (`mark_followed`), when their place became unusable, or RECHECK_EVERY after its last look
     at all of them, so its database reads follow what changed (each open record is still
     read from the reference store and its pack looked at).

Safety against pack gc (chunks.liveness): a rewrite reads the condemned list under the
writer's filesystem lock and refuses a place in a condemned or missing pack, and commits in
the same hold.  A pack condemned after that read cannot be swept before the rewrite is
durable: the sweep waits for this writer's acknowledgement, which takes the same lock and
syncs first, and the sweep's second mark then sees the new pointer and pardons the pack.  No
gc condemns a pack a dup record names (`spared`, in the compare-and-set of the condemnation,
under the generation every publication bumps), and a publication expects the condemned list
it chose under, so a mark taken before a rewrite never condemns the place it heads for (which
fsck would report once the round is due, before the sweep's pardon).  A
repack of a pack others point into or a dup record names publishes its new places and never
condemns it (Store.retire_packs): a later gc finds it unmarked.  A crash
at any point leaves either record or pointer as it was: a P record naming another
database's pack is kept alive by the mark over every member, and a dup record is a hint
that no rewrite follows into a missing pack.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.liveness import CF_GC, CAS_TRIES, CONDEMNED, Condemned
from cowfs.chunks.packs import Packs
from cowfs.kv.base import KV, Batch, Conflict

CF_DUP = "dup"  # chunk hash -> the P record every database is to hold for it
SCAN_STATE = b"dupscan"  # in CF_GC: ScanState of the keeper's last pass
GEN = b"dupgen"  # in CF_GC: bumped by every publication that adds or changes a dup record
FOLLOWED = b"dupfollowed/"  # in CF_GC, + member name: the generation that database's writer applied
CHECKED = b"dupchecked"  # in CF_GC: the followed generations and time of the last look at every record
RECHECK_EVERY = 600.0  # seconds between two looks at every open record when no database followed
# A pack whose index lists a hash no database points into it for may be a flush between its
# pack put and its commit: read again by later passes until it is this old (seconds).
PENDING_GRACE = 600.0
_STATE = struct.Struct(">Qd")  # pack id, first seen (0.0: settled)


LEASE = b"lease/keeper"  # in CF_GC: which process keeps now (KeeperLease)
LEASE_TTL = 30.0  # seconds a keeper's lease outlives its last renewal (a holder killed -9 blocks others this long)


class KeeperLease:
    """`gc/lease/keeper`: one keeper at a time across the processes of a store (any daemon of
    it may run the schedule, `cowfs gc` too).  Taken by compare-and-set when absent or expired,
    renewed while the pass runs, dropped after it; a holder killed -9 leaves it to expire.  Only
    an economy: every keeper write is a compare-and-set of its own, so a holder that stalled
    past its expiry while another took over loses nothing (the loser reads again)."""

    def __init__(self, refs: KV, ttl: float = LEASE_TTL) -> None:
        self.refs = refs
        self.ttl = ttl
        self.owner = f"{secrets.randbits(64):016x}"  # this holding, so a restarted pid is no owner

    def holder(self) -> dict | None:
        """The record while a process keeps: owner, pid, host, expires (None: nobody keeps)."""
        raw = self.refs.get(CF_GC, LEASE)
        rec = None if raw is None else _lease_record(raw)
        return rec if rec and rec.get("owner") else None

    def last_pass(self) -> float:
        """When the last pass of any process ended (0: none recorded)."""
        raw = self.refs.get(CF_GC, LEASE)
        return float(_lease_record(raw).get("done", 0)) if raw is not None else 0.0

    def _put(self, raw: bytes | None, now: float) -> bool:
        b = Batch()
        b.put(CF_GC, LEASE, json.dumps({"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                                        "expires": now + self.ttl}).encode())
        try:
            self.refs.write(b, [(CF_GC, LEASE, raw)])
            return True
        except Conflict:
            return False

    def take(self, now: float | None = None) -> bool:
        """Take the lease if nobody holds it, it expired, or it is ours; False: another keeps."""
        now = time.time() if now is None else now
        raw = self.refs.get(CF_GC, LEASE)
        if raw is not None:
            rec = _lease_record(raw)
            if rec.get("owner") != self.owner and float(rec.get("expires", 0)) > now:
                return False
        return self._put(raw, now)

    def renew(self) -> bool:
        """Push the expiry on while ours; False: it expired and another took it over."""
        raw = self.refs.get(CF_GC, LEASE)
        if raw is None or _lease_record(raw).get("owner") != self.owner:
            return False
        return self._put(raw, time.time())

    def release(self) -> None:
        """Drop the lease, leaving when this pass ended (`last_pass`): the other daemons'
        schedules need not look again soon at what only waits."""
        raw = self.refs.get(CF_GC, LEASE)
        if raw is not None and _lease_record(raw).get("owner") == self.owner:
            b = Batch()
            b.put(CF_GC, LEASE, json.dumps({"owner": None, "expires": 0, "done": time.time()}).encode())
            try:
                self.refs.write(b, [(CF_GC, LEASE, raw)])
            except Conflict:
                pass  # taken over meanwhile: no longer ours to drop


def _lease_record(raw: bytes) -> dict:
    """A lease record parsed; a damaged one is empty (taken over as if expired)."""
    try:
        rec = json.loads(raw)
        float(rec.get("expires", 0))
        float(rec.get("done", 0))
        return dict(rec)
    except (ValueError, TypeError, AttributeError):
        return {}


@dataclass
class ScanState:
    """The packs the keeper has read: settled (never read again) or pending since a time."""

    packs: dict[int, float] = field(default_factory=dict)

    def pack(self) -> bytes:
        return b"".join(_STATE.pack(p, t) for p, t in sorted(self.packs.items()))

    @staticmethod
    def unpack(raw: bytes | None) -> "ScanState":
        if raw is None:
            return ScanState()
        if len(raw) % _STATE.size:
            raise codec.CorruptObject(f"the reference gc/dupscan is damaged ({len(raw)} bytes)")
        return ScanState({p: t for p, t in _STATE.iter_unpack(raw)})

    def to_read(self, listed: Iterable[int], now: float) -> list[int]:
        """Listed packs not settled: new ones, and pending ones within their grace."""
        return sorted(p for p in listed if (t := self.packs.get(p)) is None or (t and now - t < PENDING_GRACE))


def read_followed(refs: KV) -> dict[str, int]:
    """Database (member name) -> the generation whose records its writer has applied."""
    return {k[len(FOLLOWED):].decode(): int(v) for k, v in refs.scan(CF_GC, FOLLOWED, FOLLOWED) if v.isdigit()}


def mark_followed(refs: KV, member: str, gen: int) -> None:
    """A database's writer has applied every dup record of generation gen (read before the
    records): the keeper's next pass looks the open records up again.  One writer per
    database, so no compare-and-set."""
    b = Batch()
    b.put(CF_GC, FOLLOWED + member.encode(), str(gen).encode())
    refs.write(b)


def _checked(raw: bytes | None) -> dict:
    try:
        got = json.loads(raw) if raw else {}
        return got if isinstance(got, dict) else {}
    except ValueError:
        return {}  # damaged: the next pass looks at every record


def generation(refs: KV) -> int:
    raw = refs.get(CF_GC, GEN)
    return int(raw) if raw else 0


def records(refs: KV) -> list[tuple[bytes, bytes]]:
    """Every published dup record (hash, P record)."""
    return list(refs.scan(CF_DUP, b""))


def record_packs(refs: KV) -> set[int]:
    """The packs dup records name: a repack of one publishes the new places and leaves it to a
    later gc (rewrites may be heading there)."""
    out = set()
    for _h, raw in refs.scan(CF_DUP, b""):
        if valid_record(raw):
            out.add(codec.packed_extent(raw)[0])  # type: ignore[index]
    return out


def spared(refs: KV) -> tuple[set[int], list[tuple[str, bytes, bytes | None]]]:
    """The packs a gc does not condemn while a dup record names them (a rewrite may be heading
    there, past a mark taken before it), and what that holds under: the generation, which every
    publication of a place bumps (liveness.Liveness.condemn's `spare`)."""
    gen_raw = refs.get(CF_GC, GEN)
    return record_packs(refs), [(CF_GC, GEN, gen_raw)]


def valid_record(raw: bytes) -> bool:
    """A dup record is a whole P record (fsck's check, and the rewrites')."""
    try:
        return len(raw) == codec.PACKED_LEN and raw[0] == codec.KIND_PACKED and codec.packed_kind(raw) in (codec.KIND_RAW, codec.KIND_ZSTD) \
            and codec.chunk_sizes(raw)[0] >= 0
    except (IndexError, codec.CorruptObject):
        return False


def packed_records(h: bytes, dbs: Sequence[tuple[str, KV]]) -> dict[str, bytes]:
    """The P records of h in each database that has one (database name -> record)."""
    out = {}
    for name, kv in dbs:
        raw = kv.get(CF_OBJECTS, h)
        if raw is not None and raw[0] == codec.KIND_PACKED:
            out[name] = raw
    return out


def follow_moves(refs: KV, moved: Sequence[tuple[bytes, bytes]], old: set[int]) -> int:
    """A repack moved this database's pointers (hash, new P record) out of packs `old` that
    other databases point into (places of duplicates chosen earlier) or a dup record names:
    publish each new place as the chunk's dup record, unless one names a place outside `old`
    already (the keeper chose another copy: this database's rewrite follows it), so the other
    databases follow too and the old packs die whole; no gc repacks what it does not own.  One
    compare-and-set with a bumped generation; returns how many records."""
    for _ in range(CAS_TRIES):
        gen_raw = refs.get(CF_GC, GEN)
        batch, expect = Batch(), [(CF_GC, GEN, gen_raw)]
        for h, new in moved:
            cur = refs.get(CF_DUP, h)
            if cur is not None and valid_record(cur) and codec.packed_extent(cur)[0] not in old:  # type: ignore[index]
                continue
            batch.put(CF_DUP, h, new)
            expect.append((CF_DUP, h, cur))
        if len(expect) == 1:
            return 0
        batch.put(CF_GC, GEN, str((int(gen_raw) if gen_raw else 0) + 1).encode())
        try:
            refs.write(batch, expect)
            return len(expect) - 1
        except Conflict:  # the keeper published meanwhile: look again
            continue
    raise RuntimeError("could not publish the repacked places: the reference store kept changing")


def plan(home: KV, found: Iterable[tuple[bytes, bytes]], condemned: set[int],
         exists: Callable[[int], bool]) -> dict[bytes, bytes]:
    """The re-encodings (hash -> published P record) that point this database's records at the
    published places: only where it holds a P record elsewhere for the same content size,
    and the published pack is there and not condemned (read by the caller under the lock it
    commits in)."""
    out = {}
    for h, want in found:
        if not valid_record(want):
            continue
        have = home.get(CF_OBJECTS, h)
        if have is None or have[0] != codec.KIND_PACKED or have == want:
            continue
        if codec.chunk_sizes(have)[0] != codec.chunk_sizes(want)[0]:
            continue
        pack = codec.packed_extent(want)[0]  # type: ignore[index]
        if pack in condemned or not exists(pack):
            continue
        out[h] = want
    return out


@dataclass
class Figures:
    """What one keeper pass did."""

    packs_read: int = 0  # pack indexes read
    hashes: int = 0  # distinct hashes looked up in every database
    found: int = 0  # duplicates found in those packs
    published: int = 0  # dup records added or changed
    settled: int = 0  # dup records deleted (every database holds the published place, or no copy is left)
    rechecked: int = 0  # published records looked up in every database again
    open: int = 0  # dup records left, waiting for rewrites
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f"dup_{k}": v for k, v in self.__dict__.items()}


class Keeper:
    """One pass of the store keeper over the databases `dbs` (name -> KV, the store's own
    named `own`), the packs and the reference store `refs`; `cached`: packs a lazy mount's
    cache evicts whole (chunks.remotecache), never a published place; `condemned`: packs taken
    as condemned besides `gc/condemned`, which each try of `run` reads."""

    def __init__(self, refs: KV, packs: Packs, dbs: Sequence[tuple[str, KV]], own: str,
                 condemned: set[int], cached: set[int], followed: dict[str, int] | None = None) -> None:
        """followed: `followed(refs)` read before the databases were opened (None: read now),
        so that a database that followed after its open is looked at again next pass."""
        self.refs = refs
        self.followed = followed
        self.packs = packs
        self.dbs = dbs
        self.own = own
        self.also_condemned = set(condemned)  # besides the condemned list, read at each try
        self.condemned = self.also_condemned
        self.cached = cached
        # Ties go to one database for every chunk, the store's own first, then by name: the
        # other copies of data two databases wrote alike then fill whole packs, which a pack
        # gc deletes.
        self.rank = {name: i for i, name in enumerate(sorted(n for n, _kv in dbs if n != own))}
        self.rank[own] = -1
        self._sizes: dict[int, int | None] = {}

    def _usable(self, raw: bytes) -> bool:
        pack, off, length = codec.packed_extent(raw)  # type: ignore[misc]
        if pack in self.condemned or pack in self.cached:
            return False
        if pack not in self._sizes:
            self._sizes[pack] = self.packs.size(pack)
        size = self._sizes[pack]
        return size is not None and off + length <= size

    def _checked(self, h: bytes, raw: bytes) -> bool:
        """The chunk at raw's place decodes to content with hash h."""
        try:
            codec.decode_payload(codec.packed_kind(raw), self.packs.read(*codec.packed_extent(raw)), h)  # type: ignore[misc]
            return True
        except (codec.CorruptObject, OSError):
            return False

    def choose(self, h: bytes, held: dict[str, bytes], current: bytes | None = None) -> bytes | None:
        """The place every database is to hold for h (None: no duplicate, or no usable place)."""
        if len(set(held.values())) < 2:
            return None
        if current is not None and current in held.values() and self._usable(current):
            return current
        votes: dict[bytes, int] = {}
        first: dict[bytes, int] = {}  # place -> the rank of the first database holding it
        for name, raw in held.items():
            if valid_record(raw) and self._usable(raw):
                votes[raw] = votes.get(raw, 0) + 1
                first[raw] = min(first.get(raw, len(self.rank)), self.rank[name])
        ranked = sorted(votes, key=lambda r: (-votes[r], first[r], codec.packed_extent(r)))
        for raw in ranked:
            if self._checked(h, raw):
                return raw
        return None

    def run(self, listed: dict[int, int], now: float | None = None) -> Figures:
        """Scan the packs not settled, settle or re-choose the published records, publish."""
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        for _ in range(CAS_TRIES):
            fig = Figures()
            state_raw, gen_raw = self.refs.get(CF_GC, SCAN_STATE), self.refs.get(CF_GC, GEN)
            # a publication expects the condemned list it chose under: a pack condemned meanwhile
            # (its mark found it unmarked) is never published, a gc condemning after it spares it
            condemned_raw = self.refs.get(CF_GC, CONDEMNED)
            self.condemned = self.also_condemned | set(Condemned.unpack(condemned_raw).packs)
            state = ScanState.unpack(state_raw)
            published = dict(records(self.refs))
            batch = Batch()
            new_state = ScanState({p: t for p, t in state.packs.items() if p in listed})
            wanted: dict[bytes, bytes] = {}
            seen: dict[bytes, dict[str, bytes]] = {}  # hash -> its P records, looked up once a pass
            for pack in state.to_read(listed, now):
                try:
                    entries = self.packs.index(pack, listed[pack])
                except codec.CorruptObject:  # gone meanwhile, or damaged (fsck says which)
                    continue
                fig.packs_read += 1
                unresolved = False
                for e in entries or ():
                    held = seen.get(e.hash)
                    fresh = held is None
                    if held is None:
                        held = seen[e.hash] = packed_records(e.hash, self.dbs)
                    if not any(codec.packed_extent(r)[0] == pack for r in held.values()):  # type: ignore[index]
                        unresolved = True
                    if not fresh or e.hash in published:
                        continue
                    place = self.choose(e.hash, held)
                    if place is not None:
                        wanted[e.hash] = place
                first = state.packs.get(pack) or now
                new_state.packs[pack] = first if unresolved and now - first < PENDING_GRACE else 0.0
            fig.hashes, fig.found = len(seen), len(wanted)
            # A published record is looked up in every database again only when one of them
            # followed a generation since the last look (`mark_followed`), at least every
            # RECHECK_EVERY seconds (a database that dropped its copy follows nothing), or when
            # its place became unusable; else it waits, unread, for the rewrites.
            checked_raw = self.refs.get(CF_GC, CHECKED)
            followed = self.followed if self.followed is not None else read_followed(self.refs)
            checked = _checked(checked_raw)
            full = checked.get("followed") != followed or now - float(checked.get("at", 0)) >= RECHECK_EVERY
            dropped: list[bytes] = []
            for h, raw in published.items():
                if not full and valid_record(raw) and self._usable(raw):
                    continue
                fig.rechecked += 1
                held = packed_records(h, self.dbs)
                place = self.choose(h, held, raw) if valid_record(raw) else None
                if place is None:
                    batch.delete(CF_DUP, h)
                    dropped.append(h)
                elif place != raw:
                    wanted[h] = place
            fig.settled = len(dropped)
            for h, raw in wanted.items():
                batch.put(CF_DUP, h, raw)
            fig.published = len(wanted)
            fig.open = len(published) - fig.settled + sum(1 for h in wanted if h not in published)
            batch.put(CF_GC, SCAN_STATE, new_state.pack())
            expect = [(CF_GC, SCAN_STATE, state_raw), (CF_GC, GEN, gen_raw), (CF_GC, CHECKED, checked_raw)]
            if full:
                batch.put(CF_GC, CHECKED, json.dumps({"followed": followed, "at": now}, sort_keys=True).encode())
            if wanted:
                batch.put(CF_GC, GEN, str((int(gen_raw) if gen_raw else 0) + 1).encode())
                expect.append((CF_GC, CONDEMNED, condemned_raw))
            expect += [(CF_DUP, h, published.get(h)) for h in wanted.keys() | set(dropped)]
            try:
                self.refs.write(batch, expect)
            except Conflict:  # another keeper ran meanwhile: look again
                continue
            fig.seconds = time.perf_counter() - t0
            return fig
        raise RuntimeError("could not publish the dup records: the reference store kept changing")
