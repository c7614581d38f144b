"""A branch writable on one host at a time (issue 23): the holds a daemon takes of the remote
branches its mounted branches follow, and the read-only turn of a branch whose hold is lost.

A local branch follows a remote branch once it was pulled from it with `--branch` or pushed
to it with `--branch` (the machine's state: `ties`).  A writable mount of such a branch holds
`lock/branch/B` of the remote (the key `cowfs remote hold` takes) under an etcd lease of
`-o hold_ttl` seconds, renewed every ttl/3 by the lease's thread (every second after a failed
renewal), and gives it back when the branch is unmounted.  A mount of a branch whose remote
branch another holder has is refused with one line naming it (host, pid, which mount, the
seconds its lease has left); once that lease expires (its holder died) or is given back
(unmounted), the mount succeeds.

The rule that keeps two hosts from writing one branch (docs/architecture.md, "A mount whose
hold is lost turns read-only"): etcd cannot expire the lease, so no other host can take the
branch, before `Lease.renewed + ttl` (renewed: this process's monotonic time just before the
request etcd last answered).  The branch's fence (cowfs.core.fence) is kept at `renewed + ttl
- margin(ttl)`: past it, write-type requests fail with EROFS, whether or not any thread
noticed.  The keeper (`tick`, every 3 s) then gives the lapsed lease up and takes the hold
again: got, the branch is writable again (a host that held it meanwhile and gave it back
moved the remote branch only by pushes, which this mount's next push meets as a conflict);
held by another host, the branch stays read-only until it is unmounted (`taken`: that host
writes it now).

etcd unreachable at mount time (the fault rule: local data keeps serving): the mount goes
ahead writable without the hold (`waiting`), says so in its log and in `cowfs stats`, and the
keeper takes the hold as soon as etcd answers, or turns the branch read-only if another
holder has it.  An outage shorter than the lease's TTL minus the margin changes nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cowfs.core.fence import Fences
from cowfs.fleet import FleetError
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.remote import FAMILIES, hold_key, refs_prefix
from cowfs.fleet.state import Tie, state_file, ties_of
from cowfs.kv import sqlite

log = logging.getLogger("cowfs.fleet.holds")
TICK = 3.0      # seconds between two passes of the keeper (new ties, lost holds, unmounted branches)
# While no hold is kept (no mounted branch follows a remote branch), a pass runs only when the
# machine state's files changed (a tie is made there) and at least every TIE_LOOK seconds.
TIE_LOOK = 30.0


def ties_stamp() -> tuple[tuple[int, int, int], ...]:
    """The machine state's files (SQLite and its log) as they stand."""
    return sqlite.stamp(state_file())


def holder_name(pid: int, store: str, branch: str) -> str:
    """How the daemon pid of store names itself as the holder for its mount of branch: what a
    refused host is shown, and what a push from that mount recognises as its own hold."""
    return f"{socket.gethostname()} pid {pid} (a mount of branch {branch} of {store})"


def margin(ttl: int) -> float:
    """How long before its lease could expire a holder stops writing: covers a request that
    passed the check and commits a moment later, and the two clocks' rates; short beside
    the TTL, so a failed renewal is tried again (every second) for most of the lease."""
    return max(0.5, ttl / 10)


def _clock(mono: float) -> float:
    """The wall-clock time of a monotonic instant (for logs and figures)."""
    return time.time() - (time.monotonic() - mono)


def _when(mono: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_clock(mono)))


@dataclass
class Hold:
    tie: Tie
    lease: Any = None       # kv.etcd.Lease while held
    # held | waiting (not taken since the mount: etcd not reached yet; writable) | lost (this
    # mount's lease lapsed: read-only until taken again) | taken (by `holder`: read-only)
    state: str = "waiting"
    note: str = ""
    holder: str = ""
    stopped: float | None = None   # monotonic time from which this mount no longer writes the branch
    gate: threading.Lock = field(default_factory=threading.Lock)  # state against the lease's thread

    def key(self) -> tuple[str, str]:
        return (self.tie.url, self.tie.remote_branch)

    def figures(self) -> dict[str, Any]:
        out = {"remote": self.tie.remote, "url": self.tie.url, "branch": self.tie.remote_branch,
               "state": self.state, "detail": self.note}
        stopped, lease = self.stopped, self.lease
        if lease is not None:
            out["renewed_s_ago"] = round(time.monotonic() - lease.renewed, 3)
            if time.monotonic() >= lease.renewed + lease.ttl - margin(lease.ttl):  # before the keeper sees it
                out["state"], stopped = "lost", lease.renewed + lease.ttl - margin(lease.ttl)
        if stopped is not None:
            out["lost_at"] = round(_clock(stopped), 3)
        if self.holder:
            out["holder"] = self.holder
        return out


@dataclass
class BranchHolds:
    """The holds of one daemon (store), per local branch it mounts, and the fences (read-only
    limits) they keep on those branches."""
    store: str
    fences: Fences = field(default_factory=Fences)
    holds: dict[str, list[Hold]] = field(default_factory=dict)
    ttl: dict[str, int] = field(default_factory=dict)      # branch -> its mount's hold_ttl (0: holds none)
    _kvs: dict[tuple[str, str], Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _kv(self, tie: Tie) -> Any:
        from cowfs.kv.etcd import EtcdKV
        from cowfs.remote import Retry

        key = (tie.refs, tie.url)
        if key not in self._kvs:    # a short retry: a mount waits for it
            self._kvs[key] = EtcdKV(tie.refs, FAMILIES, refs_prefix(RemoteConfig(tie.remote, tie.url, tie.refs)),
                                    timeout=2.0, retry=Retry(attempts=2, first_delay=0.1, max_delay=0.1))
        return self._kvs[key]

    def _acquire(self, branch: str, h: Hold) -> None:
        """Take h's hold; LeaseHeld if someone has it, EngineUnavailable (etc.) if etcd is not reached.
        Held, the branch may be written until its lease's bound (less the margin), moved on at
        each renewal."""
        ttl = self.ttl[branch]
        lease = self._kv(h.tie).acquire("lock", hold_key(h.tie.remote_branch),
                                        holder_name(os.getpid(), self.store, branch), ttl)
        why = self._lapse_why(branch, h, ttl)

        def renewed(at: float) -> None:
            with h.gate:
                if h.lease is lease:
                    self.fences.limit(branch, h.key(), at + ttl - margin(ttl), why)
        with h.gate:
            h.lease, h.state, h.note, h.holder, h.stopped = lease, "held", "", "", None
            lease.on_renew = renewed
            self.fences.limit(branch, h.key(), lease.renewed + ttl - margin(ttl), why)
        lease.start_keepalive()

    def take(self, branch: str, ttl: int) -> None:
        """Hold what branch follows, for its mount (ttl 0: a mount that takes no hold).
        FleetError naming the holder if another has one of them (none is kept then)."""
        from cowfs.kv.etcd import LeaseHeld

        with self._lock:
            self.ttl[branch] = ttl
            self.holds[branch] = []
            if ttl == 0:
                return
            for tie in ties_of(self.store, branch):
                h = Hold(tie)
                try:
                    self._acquire(branch, h)
                except LeaseHeld as e:
                    self._release(branch)
                    raise FleetError(
                        f"branch {branch} of {self.store} follows branch {tie.remote_branch} of the remote "
                        f"{tie.remote}, which {e.holder} holds (its lease expires in {e.ttl} s unless renewed): "
                        "a branch is writable on one host at a time; mount it with -o ro to read it, or again "
                        "once that holder unmounts or its lease expires") from None
                except Exception as e:      # noqa: BLE001 - etcd not reached: mount without it (fault rule)
                    self._unreached(branch, h, e)
                self.holds[branch].append(h)

    def _unreached(self, branch: str, h: Hold, e: BaseException) -> None:
        from cowfs.remote import one_line

        if h.state == "waiting" and h.note == "":
            log.warning("branch %s: the hold of branch %s of the remote %s could not be taken (%s): writable "
                        "without it, taken once etcd answers (pushes of it are refused meanwhile)",
                        branch, h.tie.remote_branch, h.tie.remote, one_line(e))
        h.note = one_line(e)

    @staticmethod
    def _lapse_why(branch: str, h: Hold, ttl: int) -> str:
        return (f"branch {branch} is read-only: the hold of branch {h.tie.remote_branch} of the remote "
                f"{h.tie.remote} was not renewed within its {ttl} s lease (etcd unreachable, or this daemon "
                "stalled), so another host may hold it now")

    def _lapsed(self, branch: str, h: Hold) -> None:
        """h's lease was not renewed in time (or etcd says it expired): the branch is read-only
        from its bound on (the fence already says so); give the lease up."""
        from cowfs.fleet.remote import release

        lease = h.lease
        with h.gate:
            h.lease, h.state = None, "lost"
            # etcd may also have ended it early (a lease revoked by hand): read-only from now then
            h.stopped = min(lease.renewed + lease.ttl - margin(lease.ttl), time.monotonic())
            self.fences.limit(branch, h.key(), h.stopped, self._lapse_why(branch, h, lease.ttl))
        log.error("branch %s is read-only since %s: the hold of branch %s of the remote %s lapsed (not renewed "
                  "for %.1f s of its %d s lease: etcd unreachable, or this daemon stalled). Writes fail with EROFS, "
                  "reads go on, what was written before stays in this store; it becomes writable again if this "
                  "daemon takes the hold again before another host does. To keep its changes otherwise: "
                  "cowfs snapshot, then cowfs push MOUNT SNAPSHOT %s --as NEW-NAME (or --branch NEW-BRANCH)",
                  branch, _when(h.stopped), h.tie.remote_branch, h.tie.remote,
                  time.monotonic() - lease.renewed, lease.ttl, h.tie.remote)
        release(lease)   # stops its thread; revoked if etcd answers (the hold is then taken again at once)

    def _taken(self, branch: str, h: Hold, holder: str) -> None:
        """Another holder has the branch: read-only for the rest of this mount."""
        with h.gate:
            if h.stopped is None:
                h.stopped = time.monotonic()
            h.lease, h.state, h.note, h.holder = None, "taken", "", holder
            self.fences.limit(branch, h.key(), h.stopped,
                              f"branch {branch} is read-only: branch {h.tie.remote_branch} of the remote "
                              f"{h.tie.remote} is held by {holder} (seen at {_when(time.monotonic())})")
        log.error("branch %s is read-only (since %s): branch %s of the remote %s is held by %s. Writes fail with "
                  "EROFS until it is unmounted, reads go on, what was written before stays in this store: "
                  "cowfs snapshot, then cowfs push MOUNT SNAPSHOT %s --as NEW-NAME (or --branch NEW-BRANCH) "
                  "keeps it on the remote", branch, _when(h.stopped), h.tie.remote_branch, h.tie.remote, holder,
                  h.tie.remote)

    def tick(self, mounted: set[str]) -> None:
        """One pass of the keeper: give back the holds of branches no longer mounted, hold the
        remote branches mounted branches came to follow (a push --branch), give up lapsed
        leases, take again holds not taken or lost."""
        from cowfs.kv.etcd import LeaseHeld

        with self._lock:
            for branch in [b for b in self.holds if b not in mounted]:
                self._release(branch)
            for branch, holds in self.holds.items():
                if not self.ttl.get(branch):
                    continue
                have = {h.key() for h in holds}
                holds += [Hold(t) for t in ties_of(self.store, branch) if (t.url, t.remote_branch) not in have]
                for h in holds:
                    lease = h.lease
                    if lease is not None:
                        if not lease.lost.is_set() and time.monotonic() < lease.renewed + lease.ttl - margin(lease.ttl):
                            continue
                        self._lapsed(branch, h)
                    if h.state == "taken":
                        continue        # read-only for the rest of this mount: the hold is not taken again
                    was = h.state
                    try:
                        self._acquire(branch, h)
                        if was == "lost":
                            log.info("branch %s is writable again: holding branch %s of the remote %s once more "
                                     "(no other host took it)", branch, h.tie.remote_branch, h.tie.remote)
                        else:
                            log.info("branch %s: holding branch %s of the remote %s", branch, h.tie.remote_branch,
                                     h.tie.remote)
                    except LeaseHeld as e:
                        if e.holder == holder_name(os.getpid(), self.store, branch):
                            # our lapsed lease, not revoked (etcd was not reached): it expires in e.ttl s
                            h.note = f"this mount's lapsed lease expires in {e.ttl} s"
                            continue
                        self._taken(branch, h, e.holder)
                    except Exception as e:      # noqa: BLE001 - etcd still not reached: next pass
                        self._unreached(branch, h, e)

    def _release(self, branch: str) -> None:
        from cowfs.fleet.remote import release

        for h in self.holds.pop(branch, []):
            with h.gate:
                lease, h.lease = h.lease, None
            if lease is not None:
                release(lease)
                log.info("branch %s: gave back the hold of branch %s of the remote %s", branch,
                         h.tie.remote_branch, h.tie.remote)
        self.ttl.pop(branch, None)
        self.fences.lift(branch)

    def release_all(self) -> None:
        with self._lock:
            for branch in list(self.holds):
                self._release(branch)
            for kv in self._kvs.values():
                kv.close()
            self._kvs.clear()

    def keeping(self) -> bool:
        """Whether a hold is kept or wanted (a lease to watch, give back or take again)."""
        return any(self.holds.values())

    def figures(self, branch: str) -> list[dict[str, Any]]:
        return [h.figures() for h in self.holds.get(branch, [])]
