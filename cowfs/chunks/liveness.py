"""Liveness of packs across every database of a store, and the two-step pack collection that
stays safe with a second writer (docs/design-many-processes.md, "Garbage collection").

Packs are shared, immutable objects; the pointers into them live in databases, one today
(the store's `db`), one per branch daemon later, each listed as a *member* in the reference
store.  A pack no pointer of any member names is garbage, but a writer that is running may be
about to name it (it read a pointer or a pack index before the gc looked), so a gc never
deletes what it has just found unmarked.  It *condemns* it instead (Duplicacy's fossil
collection), with one compare-and-set on `gc/condemned` in the reference store, which records
the round: its time and the writers alive then.  A later sweep deletes a condemned pack only if
a fresh mark still finds it unmarked and every writer alive at its condemnation has since
acknowledged the round or is gone; a condemned pack that is marked again is pardoned.

Writers (family `writer`): every process that opens a database of the store for writing
registers `writer/<id>` (its pid, the process's start time and the boot id: a record whose
process is gone is stale, a reused pid does not revive it) and removes it when it closes.
Acknowledging round g (`acked` >= g) means: the writer has loaded the condemned packs of g
(it makes no new pointer into one: it stores its own copy instead) and has durably committed
every pointer it decided on before.  The process that runs the gc acknowledges its own round in
the same compare-and-set: it listed the packs under the lock a flush holds from its pack put to
its commit, and its database's new pointers only ever name packs written after that.  It does
not when it owes an earlier round (another process's, which its own listing may have preceded):
`acked` is a high-water mark, so that waits for its acknowledgement task.  A daemon
listed in a round another process condemned finds it with `owed` and acknowledges it with `ack`
once it has taken its flush lock and synced (cowfs.background.gc.acknowledge_rounds).

Everything here is by compare-and-set on the reference store (cowfs.kv.sqlite locally, etcd in
the fleet); a process killed at any point leaves either the old or the new value.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS
from cowfs.kv.base import KV, Batch, Conflict

CF_GC = "gc"
CF_WRITER = "writer"
CF_MEMBER = "member"
REF_FAMILIES = (CF_GC, CF_WRITER, CF_MEMBER)
CONDEMNED = b"condemned"
CAS_TRIES = 64  # compare-and-set retries against other writers before giving up


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None: no
    such process, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def process_alive(pid: int, start: int, boot: str, this_boot: str) -> bool:
    """Whether the process a record names still runs: the same boot, and the pid's process
    started when the record says (a reused pid has another start time).  The one staleness
    rule of every record of a process in the reference store (writers here, the branches a
    daemon serves: cowfs.meta.serving)."""
    return boot == this_boot and _start_ticks(pid) == start


def this_process() -> tuple[int, int]:
    """(pid, start time) of the calling process, as records of it store them."""
    pid = os.getpid()
    start = _start_ticks(pid)
    assert start is not None
    return pid, start


@dataclass(frozen=True)
class WriterRecord:
    pid: int
    start: int
    boot: str
    db: str  # the member it writes ("db": the store's database; "" none of its own)
    opened: float
    acked: int = 0

    def alive(self, boot: str) -> bool:
        return process_alive(self.pid, self.start, self.boot, boot)

    def pack(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def unpack(raw: bytes) -> "WriterRecord":
        d = json.loads(raw)
        return WriterRecord(int(d["pid"]), int(d["start"]), str(d["boot"]), str(d["db"]), float(d["opened"]),
                            int(d.get("acked", 0)))


@dataclass
class Condemned:
    """The value of `gc/condemned`: the packs condemned, each with the round that did it."""

    gen: int = 0  # the last round
    rounds: dict[int, tuple[float, list[str]]] = field(default_factory=dict)  # round -> (time, writers)
    packs: dict[int, int] = field(default_factory=dict)  # pack -> round

    def pack(self) -> bytes:
        return json.dumps({"gen": self.gen,
                           "rounds": {str(g): [t, w] for g, (t, w) in sorted(self.rounds.items())},
                           "packs": {f"{p:016x}": g for p, g in sorted(self.packs.items())}},
                          sort_keys=True).encode()

    @staticmethod
    def unpack(raw: bytes | None) -> "Condemned":
        if raw is None:
            return Condemned()
        try:
            d = json.loads(raw)
            c = Condemned(int(d["gen"]), {int(g): (float(t), [str(x) for x in w]) for g, (t, w) in d["rounds"].items()},
                          {int(p, 16): int(g) for p, g in d["packs"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise codec.CorruptObject(f"the reference gc/condemned is damaged: {exc}") from None
        for p, g in c.packs.items():
            if g not in c.rounds:
                raise codec.CorruptObject(f"the reference gc/condemned names pack {p:016x} in round {g}, "
                                          "which it does not record")
        return c

    def _drop_empty_rounds(self) -> None:
        used = set(self.packs.values())
        self.rounds = {g: r for g, r in self.rounds.items() if g in used}


class Liveness:
    """The writers of a store and its condemned packs, in its reference store (refs)."""

    def __init__(self, refs: KV) -> None:
        self.refs = refs
        self.me: str | None = None  # this process's writer id, once registered
        self._pid = 0
        self.boot = boot_id()

    # -- writers -------------------------------------------------------------------------
    def register(self, db: str) -> str:
        """Record this process as a writer (of member db); returns its id.  Only the rounds
        condemned from now on list it, so it starts having acknowledged none."""
        pid, start = this_process()
        while True:
            wid = f"{secrets.randbits(64):016x}"
            rec = WriterRecord(pid, start, self.boot, db, time.time())
            b = Batch()
            b.put(CF_WRITER, wid.encode(), rec.pack())
            try:
                self.refs.write(b, [(CF_WRITER, wid.encode(), None)])
            except Conflict:  # the id is taken: draw another
                continue
            self.me, self._pid = wid, pid
            return wid

    def unregister(self) -> None:
        """Remove this process's record (not in a forked child: the record is its parent's)."""
        if self.me is not None and self._pid == os.getpid():
            b = Batch()
            b.delete(CF_WRITER, self.me.encode())
            self.refs.write(b)
            self.me = None

    def writers(self) -> dict[str, WriterRecord]:
        return {k.decode(): WriterRecord.unpack(v) for k, v in self.refs.scan(CF_WRITER, b"")}

    def alive(self) -> dict[str, WriterRecord]:
        return {w: r for w, r in self.writers().items() if r.alive(self.boot)}

    def prune(self) -> int:
        """Remove the records of writers whose process is gone (killed -9, power loss)."""
        stale = [(w, r) for w, r in self.writers().items() if not r.alive(self.boot)]
        if not stale:
            return 0
        b = Batch()
        for w, _r in stale:
            b.delete(CF_WRITER, w.encode())
        try:
            self.refs.write(b, [(CF_WRITER, w.encode(), r.pack()) for w, r in stale])
        except Conflict:
            return 0  # another process pruned or changed them: the next gc looks again
        return len(stale)

    def ack(self, gen: int) -> None:
        """This writer acknowledges round gen: call only after loading its condemned packs and
        a durable commit of every pointer decided before."""
        assert self.me is not None
        key = self.me.encode()
        for _ in range(CAS_TRIES):
            raw = self.refs.get(CF_WRITER, key)
            if raw is None:
                raise RuntimeError(f"writer {self.me} is not registered in the reference store")
            rec = WriterRecord.unpack(raw)
            if rec.acked >= gen:
                return
            b = Batch()
            b.put(CF_WRITER, key, WriterRecord(**{**rec.__dict__, "acked": gen}).pack())
            try:
                self.refs.write(b, [(CF_WRITER, key, raw)])
                return
            except Conflict:
                continue
        raise RuntimeError("could not record the acknowledgement: the reference store kept changing")

    def owed(self) -> int | None:
        """The newest round that lists this writer and that it has not acknowledged (None:
        none).  One read of the reference store, two while something is condemned."""
        if self.me is None:
            return None
        c = self.condemned()
        if not c.rounds:
            return None
        raw = self.refs.get(CF_WRITER, self.me.encode())
        acked = WriterRecord.unpack(raw).acked if raw is not None else 0
        owed = [g for g, (_t, ws) in c.rounds.items() if g > acked and self.me in ws]
        return max(owed) if owed else None

    # -- members -------------------------------------------------------------------------
    def members(self) -> dict[str, str]:
        """Databases besides the store's own whose pointers a gc marks: name -> path relative
        to the store directory."""
        out = {}
        for k, v in self.refs.scan(CF_MEMBER, b""):
            try:
                out[k.decode()] = str(json.loads(v)["db"])
            except (ValueError, KeyError, TypeError) as exc:
                name = k.decode(errors="replace")
                raise codec.CorruptObject(f"the reference member/{name} is damaged: {exc}") from None
        return out

    def add_member(self, name: str, db: str) -> None:
        """Register a database (path relative to the store) whose pointers every gc marks."""
        if not name or "/" in name or os.path.isabs(db) or ".." in db.split("/"):
            raise ValueError(f"member {name!r} at {db!r}: a plain name and a path inside the store")
        b = Batch()
        b.put(CF_MEMBER, name.encode(), json.dumps({"db": db}).encode())
        self.refs.write(b, [(CF_MEMBER, name.encode(), None)])

    def remove_member(self, name: str) -> None:
        """Unregister a member database (its directory is about to go: cowfs.homes.remove)."""
        b = Batch()
        b.delete(CF_MEMBER, name.encode())
        self.refs.write(b)

    # -- condemned packs -----------------------------------------------------------------
    def condemned(self) -> Condemned:
        return Condemned.unpack(self.refs.get(CF_GC, CONDEMNED))

    def _update(self, change, guard: Callable[[], list[tuple[str, bytes, bytes | None]]] | None = None) -> Condemned:
        """change(Condemned) in place, by compare-and-set; guard(): read at each try before
        change, the further values the change holds under (expected unchanged)."""
        for _ in range(CAS_TRIES):
            extra = guard() if guard is not None else []
            raw = self.refs.get(CF_GC, CONDEMNED)
            c = Condemned.unpack(raw)
            gen = c.gen
            change(c)
            c._drop_empty_rounds()
            b = Batch()
            b.put(CF_GC, CONDEMNED, c.pack())
            expect = [(CF_GC, CONDEMNED, raw), *extra]
            if self.me is not None and c.gen > gen and c.gen in c.rounds:
                # the runner acknowledges the round it made in the same step (module
                # docstring), unless it owes an earlier one: `acked` is a high-water mark
                mine = self.refs.get(CF_WRITER, self.me.encode())
                if mine is not None:
                    rec = WriterRecord.unpack(mine)
                    if not any(rec.acked < g < c.gen and self.me in ws for g, (_t, ws) in c.rounds.items()):
                        b.put(CF_WRITER, self.me.encode(), WriterRecord(**{**rec.__dict__, "acked": c.gen}).pack())
                        expect.append((CF_WRITER, self.me.encode(), mine))
            try:
                self.refs.write(b, expect)
                return c
            except Conflict:
                continue
        raise RuntimeError("could not update gc/condemned: the reference store kept changing")

    def condemn(self, garbage: Iterable[int], marked: Iterable[int] = (),
                spare: Callable[[], tuple[set[int], list[tuple[str, bytes, bytes | None]]]] | None = None
                ) -> tuple[int, int]:
        """One round: condemn the garbage packs not condemned yet, pardon the condemned packs
        that are marked again.  spare(): read at each try, packs not to condemn and the values
        that holds under, expected unchanged by the same compare-and-set (the store keeper's:
        packs a dup record names, rewrites may be heading there: chunks.dups.spared).  Returns
        (packs newly condemned, packs pardoned)."""
        garbage, marked = set(garbage), set(marked)
        out = [0, 0]
        spared: set[int] = set()

        def guard() -> list[tuple[str, bytes, bytes | None]]:
            if spare is None:
                return []
            packs, expect = spare()
            spared.clear()
            spared.update(packs)
            return expect

        def change(c: Condemned) -> None:
            new = garbage - c.packs.keys() - spared
            pardoned = marked & c.packs.keys()
            for p in pardoned:
                del c.packs[p]
            if new:
                c.gen += 1
                c.rounds[c.gen] = (time.time(), sorted(self.alive()))
                for p in new:
                    c.packs[p] = c.gen
            out[:] = [len(new), len(pardoned)]
        self._update(change, guard)
        return out[0], out[1]

    def due(self, c: Condemned) -> set[int]:
        """Condemned packs whose round every writer alive at it has acknowledged since, or
        left: what a sweep may delete if a fresh mark still finds them unmarked."""
        writers = self.alive()
        ready = {g for g, (_t, ws) in c.rounds.items()
                 if all(w not in writers or writers[w].acked >= g for w in ws)}
        return {p for p, g in c.packs.items() if g in ready}

    def reset_condemned(self) -> None:
        """Drop a damaged condemned list (fsck --repair): safe, since the next gc condemns
        again whatever is still garbage; only the wait for acknowledgements starts over."""
        b = Batch()
        b.delete(CF_GC, CONDEMNED)
        self.refs.write(b)

    def forget(self, packs: Iterable[int]) -> None:
        """Drop packs from the condemned list (deleted, or pardoned)."""
        packs = set(packs)
        if packs:
            self._update(lambda c: [c.packs.pop(p, None) for p in packs])


def mark(kvs: Iterable[KV], into: dict[int, int] | None = None) -> dict[int, int]:
    """Live bytes per pack named by a pointer of any of these databases (blocking: a scan of
    every pointer of each; call in a thread)."""
    live: dict[int, int] = {} if into is None else into
    for kv in kvs:
        for _h, raw in kv.scan(CF_OBJECTS, b""):
            ext = codec.packed_extent(raw)
            if ext is not None:
                live[ext[0]] = live.get(ext[0], 0) + ext[2]
    return live
