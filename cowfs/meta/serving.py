"""Who serves which branch: one `serve/<branch>` record per served branch in the store's
reference store (docs/design-many-processes.md, build step 5), so that a branch is served by
one mount at a time whichever process serves it, and `cowfs status` can tell who serves what
without asking any daemon.

A daemon takes the record of each branch it serves, by compare-and-set, before the branch is
mounted (its own mount, or one it attaches), and removes it once the branch is no longer
mounted.  The record names the process (its writer id in the reference store, pid, process
start time, boot id) and the mount point.  A record whose process is gone (killed -9, power
loss) is stale and counts as free, by the same rule as the writer records of
cowfs.chunks.liveness (`process_alive`): the next mount of the branch takes it over with one
compare-and-set against the stale value, so two processes racing for it cannot both win.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from cowfs.chunks import codec
from cowfs.chunks.liveness import CAS_TRIES, boot_id, process_alive, this_process
from cowfs.kv.base import KV, Batch, Conflict

CF_SERVE = "serve"
REF_FAMILIES = (CF_SERVE,)


@dataclass(frozen=True)
class ServeRecord:
    writer: str  # the serving process's writer id (cowfs.chunks.liveness), "" if it has none
    pid: int
    start: int
    boot: str
    mountpoint: str
    since: float
    # the home database (its id) of the branch's own daemon; "": the store's daemon, which
    # holds STORE/db (docs/design-many-processes.md, "Step 6")
    home: str = ""

    def alive(self, boot: str) -> bool:
        return process_alive(self.pid, self.start, self.boot, boot)

    def pack(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def unpack(branch: str, raw: bytes) -> "ServeRecord":
        try:
            d = json.loads(raw)
            return ServeRecord(str(d["writer"]), int(d["pid"]), int(d["start"]), str(d["boot"]),
                               str(d["mountpoint"]), float(d["since"]), str(d.get("home", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise codec.CorruptObject(f"the reference serve/{branch} is damaged: {exc}") from None

    def describe(self) -> str:
        return f"pid {self.pid} at {self.mountpoint}"


class BranchServed(Exception):
    """The branch is served by a live process (one line naming it)."""

    def __init__(self, branch: str, holder: ServeRecord) -> None:
        super().__init__(f"branch {branch!r} is already served by {holder.describe()} (a branch is served by one "
                         "mount at a time: use that one, or mount another branch)")
        self.holder = holder


class Serving:
    """The serve records of one store (refs: its reference store), and those this process
    holds; home: the home database this process serves from ("" for the store's own)."""

    def __init__(self, refs: KV, writer: str | None = None, boot: str | None = None, home: str = "") -> None:
        self.refs = refs
        self.writer = writer or ""
        self.boot = boot or boot_id()
        self.home = home
        self.held: dict[str, bytes] = {}  # branch -> the record this process wrote
        self._lock = threading.Lock()  # takes and releases run in worker threads

    def all(self) -> dict[str, ServeRecord | codec.CorruptObject]:
        """Every record, by branch (a damaged one as the error that says so)."""
        out: dict[str, ServeRecord | codec.CorruptObject] = {}
        for k, v in self.refs.scan(CF_SERVE, b""):
            branch = k.decode(errors="replace")
            try:
                out[branch] = ServeRecord.unpack(branch, v)
            except codec.CorruptObject as exc:
                out[branch] = exc
        return out

    def take(self, branch: str, mountpoint: str, own_is_free: bool = False) -> None:
        """Record this process as serving branch at mountpoint.  BranchServed if a live
        process holds it (this one too, unless own_is_free: the caller knows from its mount
        table that it no longer serves the branch there).  A stale or damaged record is taken
        over, by compare-and-set against what was read."""
        with self._lock:
            self._take(branch, mountpoint, own_is_free)

    def _take(self, branch: str, mountpoint: str, own_is_free: bool) -> None:
        key = branch.encode()
        pid, start = this_process()
        for _ in range(CAS_TRIES):
            raw = self.refs.get(CF_SERVE, key)
            if raw is not None:
                try:
                    rec = ServeRecord.unpack(branch, raw)
                except codec.CorruptObject:
                    rec = None
                if rec is not None and rec.alive(self.boot) and not (own_is_free and rec.pid == pid
                                                                     and rec.start == start):
                    raise BranchServed(branch, rec)
            mine = ServeRecord(self.writer, pid, start, self.boot, mountpoint, time.time(), self.home).pack()
            b = Batch()
            b.put(CF_SERVE, key, mine)
            try:
                self.refs.write(b, [(CF_SERVE, key, raw)])
            except Conflict:
                continue  # another process changed it meanwhile: look again
            self.held[branch] = mine
            return
        raise RuntimeError(f"could not record serve/{branch}: the reference store kept changing")

    def check(self, branch: str) -> None:
        """BranchServed if a live process other than this one serves branch."""
        raw = self.refs.get(CF_SERVE, branch.encode())
        if raw is None:
            return
        try:
            rec = ServeRecord.unpack(branch, raw)
        except codec.CorruptObject:
            return  # taken over by the next take
        if rec.alive(self.boot) and (rec.pid, rec.start) != this_process():
            raise BranchServed(branch, rec)

    def release(self, branch: str, mine: bytes | None = None) -> None:
        """Remove the record of a branch this process no longer serves: the one it holds, or
        only if that is still `mine` (a take since then stands).  Left alone if another
        process has taken it over since (only a stale record can be)."""
        with self._lock:
            held = self.held.get(branch)
            if held is None or (mine is not None and held != mine):
                return
            del self.held[branch]
            b = Batch()
            b.delete(CF_SERVE, branch.encode())
            try:
                self.refs.write(b, [(CF_SERVE, branch.encode(), held)])
            except Conflict:
                pass

    def at(self, mountpoint: str) -> tuple[str, ServeRecord] | None:
        """The branch served at mountpoint and its record, if a live process serves one there."""
        for branch, rec in self.all().items():
            if isinstance(rec, ServeRecord) and rec.mountpoint == mountpoint and rec.alive(self.boot):
                return branch, rec
        return None

    def release_all(self) -> None:
        for branch in list(self.held):
            self.release(branch)

    def prune(self, known: set[str] | None = None) -> list[str]:
        """Remove stale and damaged records, and (known given) live ones naming a branch that
        does not exist; the branches whose record went (fsck --repair)."""
        out = []
        for k, raw in list(self.refs.scan(CF_SERVE, b"")):
            branch = k.decode(errors="replace")
            try:
                rec = ServeRecord.unpack(branch, raw)
                if rec.alive(self.boot) and (known is None or branch in known):
                    continue
            except codec.CorruptObject:
                pass
            b = Batch()
            b.delete(CF_SERVE, k)
            try:
                self.refs.write(b, [(CF_SERVE, k, raw)])
            except Conflict:
                continue  # taken over meanwhile
            out.append(branch)
        return out
