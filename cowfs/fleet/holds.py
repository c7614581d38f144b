"""A branch writable on one host at a time (issue 23): the holds a daemon takes of the remote
branches its mounted branches follow.

A local branch follows a remote branch once it was pulled from it with `--branch` or pushed
to it with `--branch` (the machine's state: `ties`).  A writable mount of such a branch holds
`lock/branch/B` of the remote (the key `cowfs remote hold` takes) under an etcd lease of
`-o hold_ttl` seconds, renewed every ttl/3 by the lease's thread, and gives it back when the
branch is unmounted.  A mount of a branch whose remote branch another holder has is refused
with one line naming it (host, pid, which mount, the seconds its lease has left); once that
lease expires (its holder died) or is given back (unmounted), the mount succeeds.

etcd unreachable (the fault rule: local data keeps serving): the mount goes ahead without the
hold, says so in its log and in `cowfs stats`, and the keeper (`tick`, every few seconds)
takes it as soon as etcd answers; a hold lost while mounted (etcd unreachable past the TTL) is
taken again the same way, or reported as taken by whoever has it now.  The mount stays
writable meanwhile; pushes of the branch are fenced by the hold (a push needs it), so two
hosts that both wrote during an outage meet the conflict rule at push, never an overwrite.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from cowfs.fleet import FleetError
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.remote import FAMILIES, hold_key, refs_prefix
from cowfs.fleet.state import Tie, ties_of

log = logging.getLogger("cowfs.fleet.holds")
TICK = 3.0      # seconds between two passes of the keeper (new ties, lost holds, unmounted branches)


def holder_name(pid: int, store: str, branch: str) -> str:
    """How the daemon pid of store names itself as the holder for its mount of branch: what a
    refused host is shown, and what a push from that mount recognises as its own hold."""
    return f"{socket.gethostname()} pid {pid} (a mount of branch {branch} of {store})"


@dataclass
class Hold:
    tie: Tie
    lease: Any = None       # kv.etcd.Lease while held
    state: str = "waiting"  # held | waiting (etcd not reached yet) | lost (lease expired) | taken (by `note`)
    note: str = ""

    def figures(self) -> dict[str, Any]:
        return {"remote": self.tie.remote, "url": self.tie.url, "branch": self.tie.remote_branch,
                "state": self.state if self.lease is None or not self.lease.lost.is_set() else "lost",
                "detail": self.note}


@dataclass
class BranchHolds:
    """The holds of one daemon (store), per local branch it mounts."""
    store: str
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
        """Take h's hold; LeaseHeld if someone has it, EngineUnavailable (etc.) if etcd is not reached."""
        h.lease = self._kv(h.tie).acquire("lock", hold_key(h.tie.remote_branch),
                                          holder_name(os.getpid(), self.store, branch), self.ttl[branch])
        h.lease.start_keepalive()
        h.state, h.note = "held", ""

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

        if h.state != "waiting" or h.note == "":
            log.warning("branch %s: the hold of branch %s of the remote %s could not be taken (%s): writable "
                        "without it, taken once etcd answers (pushes of it are refused meanwhile)",
                        branch, h.tie.remote_branch, h.tie.remote, one_line(e))
        h.lease, h.state, h.note = None, "waiting", one_line(e)

    def tick(self, mounted: set[str]) -> None:
        """One pass of the keeper: give back the holds of branches no longer mounted, hold the
        remote branches mounted branches came to follow (a push --branch), take again holds
        not taken or lost."""
        from cowfs.kv.etcd import LeaseHeld

        with self._lock:
            for branch in [b for b in self.holds if b not in mounted]:
                self._release(branch)
            for branch, holds in self.holds.items():
                if not self.ttl.get(branch):
                    continue
                have = {(h.tie.url, h.tie.remote_branch) for h in holds}
                holds += [Hold(t) for t in ties_of(self.store, branch) if (t.url, t.remote_branch) not in have]
                for h in holds:
                    if h.lease is not None and not h.lease.lost.is_set():
                        continue
                    if h.lease is not None and h.state == "held":
                        log.error("branch %s: the hold of branch %s of the remote %s was lost (etcd unreachable "
                                  "for longer than its lease)", branch, h.tie.remote_branch, h.tie.remote)
                        h.state = "lost"
                    try:
                        self._acquire(branch, h)
                        log.info("branch %s: holding branch %s of the remote %s", branch, h.tie.remote_branch,
                                 h.tie.remote)
                    except LeaseHeld as e:
                        if e.holder == holder_name(os.getpid(), self.store, branch):
                            # our lease from before etcd was lost, restored by etcd: it expires in e.ttl s
                            h.lease, h.state, h.note = None, "waiting", f"this mount's lost lease expires in {e.ttl} s"
                            continue
                        if h.state != "taken" or h.note != e.holder:
                            log.error("branch %s: branch %s of the remote %s is held by %s: this mount stays "
                                      "writable, but its pushes to that branch are refused", branch,
                                      h.tie.remote_branch, h.tie.remote, e.holder)
                        h.lease, h.state, h.note = None, "taken", e.holder
                    except Exception as e:      # noqa: BLE001 - etcd still not reached: next pass
                        self._unreached(branch, h, e)

    def _release(self, branch: str) -> None:
        from cowfs.fleet.remote import release

        for h in self.holds.pop(branch, []):
            if h.lease is not None:
                release(h.lease)
                log.info("branch %s: gave back the hold of branch %s of the remote %s", branch,
                         h.tie.remote_branch, h.tie.remote)
        self.ttl.pop(branch, None)

    def release_all(self) -> None:
        with self._lock:
            for branch in list(self.holds):
                self._release(branch)
            for kv in self._kvs.values():
                kv.close()
            self._kvs.clear()

    def figures(self, branch: str) -> list[dict[str, Any]]:
        return [h.figures() for h in self.holds.get(branch, [])]
