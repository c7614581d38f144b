"""`cowfs remote gc`: remove the objects no reference reaches, after a grace period, never
while a push is in flight.

Exclusion (etcd, linearizable): a push holds `lock/push/<id>` under a lease for its whole
length and reads `lock/gc` after taking it; a gc takes `lock/gc` under a lease and then lists
`lock/push/`.  Each writes its own key before reading the other's, so of a push and a gc that
overlap at least one sees the other: the push fails at once ("a fleet gc is running"), or the
gc ("pushes in flight"), and nothing was deleted.  A push whose lease lapsed (etcd unreachable
for longer than its TTL) has its final compare-and-set fenced by that lease: it sets nothing.

Mark, condemn, sweep: the mark is `check.mark` (from every reference: its commit, trees and
chunks; not the commit's parent, a hint that may go); a gc refuses to delete anything when the mark found problems (run `cowfs
remote check`).  Garbage: a pack none of whose blobs is reachable (its index, then its data),
a pack without an index (a push killed between the two), a commit no reference reaches, a
warm object (learned cold start) or model object (prefetch model) no reached commit names.  A
gc run condemns new garbage (`condemned/<object>` = the time) and deletes what an earlier run
condemned at least `grace` seconds before and is still garbage: a pull that read a reference
just before it was deleted has that long to fetch its objects.

A pack with some reachable blobs is kept whole unless its live share is under `repack_below`:
then its live blobs are copied into new packs and it gets a forward (cowfs.fleet.repack) and
is condemned.  A forwarded pack is garbage once it is *superseded*: every blob of it reachable
now is in the packs its forwards lead to (always, unless a forward was lost: such a pack is
kept and its uncovered blobs copied again).  A forward is garbage once no reachable commit
names its pack, directly or through other forwards: condemned as `moved/<pack>` and dropped
from the forwards after the grace period; a forwards object no longer current is garbage.

Order of a run (a kill -9 anywhere leaves the remote consistent; docs/architecture.md
"Repacking"): condemn the new garbage; delete what is due; repack; publish the forwards
(the repack's added, the due ones dropped); clear the records of what is gone; condemn the
repacked packs.
"""
from __future__ import annotations

import time
from typing import Any

from cowfs.fleet import FleetError
from cowfs.fleet.check import mark
from cowfs.fleet.remote import Remote, release, this_holder
from cowfs.fleet.repack import REPACK_BELOW, plan, publish, repack

GC_TTL = 30
_BATCH = 100


def gc(remote: Remote, grace: float, dry_run: bool = False, repack_below: float = REPACK_BELOW) -> dict[str, Any]:
    from cowfs.kv.etcd import LeaseHeld, lease_holder

    try:
        lease = remote.refs.acquire("lock", b"gc", this_holder(), GC_TTL)
    except LeaseHeld as e:
        raise FleetError(f"a fleet gc is running on the remote {remote.cfg.name} already ({e.holder})") from None
    lease.start_keepalive()
    try:
        pushes = [lease_holder(v) for _k, v in remote.refs.scan("lock", b"push/", b"push/")]
        if pushes:
            raise FleetError(f"{len(pushes)} pushes in flight on the remote {remote.cfg.name} ({', '.join(pushes)}): "
                             "gc not run; run it again once they end")
        remote.by_pack = {}
        m = mark(remote)
        if m.problems:
            raise FleetError(f"the remote {remote.cfg.name} has {len(m.problems)} problems (first: {m.problems[0]}): "
                             f"gc deletes nothing until cowfs remote check {remote.cfg.name} passes")
        return _collect(remote, m, lease, grace, dry_run, repack_below)
    finally:
        release(lease)


def _collect(remote: Remote, m: Any, lease: Any, grace: float, dry_run: bool, below: float) -> dict[str, Any]:
    from cowfs.kv.base import Batch

    reachable = m.trees | set(m.chunks)
    by_pack = remote.by_pack or {}
    moved = remote.forwards()
    live_blobs = {p: [h for h in blobs if h in reachable] for p, blobs in by_pack.items()}
    uncovered: dict[str, list[bytes]] = {}        # forwarded packs' reachable blobs their forwards lack
    for p in moved:
        if live_blobs.get(p):
            leaves = [by_pack.get(leaf, {}) for leaf in remote.leaves([p])]
            uncovered[p] = [h for h in live_blobs[p] if not any(h in idx for idx in leaves)]
    live = {p for p, hs in live_blobs.items() if hs and (p not in moved or uncovered[p])}
    dead_bytes_in_live = sum(loc.length for p in live for h, loc in by_pack[p].items() if h not in reachable)
    garbage: dict[str, int] = {}
    for pack in set(by_pack) | set(m.sizes):
        if pack not in live:
            if pack in by_pack:
                garbage["index/" + pack] = 0
            if pack in m.sizes:
                garbage["data/" + pack] = m.sizes[pack]
    named: set[str] = set()
    todo = list(m.named)
    while todo:                                   # the packs reachable commits name, and forwards on
        p = todo.pop()
        if p not in named:
            named.add(p)
            todo.extend(moved.get(p, ()))
    for p in moved:
        if p not in named:
            garbage["moved/" + p] = 0
    for e in remote.blobs.list("forwards/"):
        if e.name[len("forwards/"):] != remote.forwards_id:
            garbage[e.name] = e.size
    for e in remote.blobs.list("commit/"):
        if e.name[len("commit/"):] not in m.commits:
            garbage[e.name] = e.size
    for kind, ids in (("warm/", m.warm), ("model/", m.model)):
        for e in remote.blobs.list(kind):
            if e.name[len(kind):] not in ids:
                garbage[e.name] = e.size
    now = time.time()
    condemned = {k.decode(): float(v) for k, v in remote.refs.scan("condemned", b"")}
    delete = sorted((n for n in garbage if n in condemned and now - condemned[n] >= grace),
                    key=lambda n: not n.startswith("index/"))     # an index before its pack
    condemn = [n for n in garbage if n not in condemned]
    pardon = [n for n in condemned if n not in garbage]           # reachable again, or gone
    todo_repack = plan(by_pack, {p: live_blobs[p] for p in live}, m.sizes, uncovered, below) if below > 0 else None
    figures = {"live_packs": len(live), "garbage_objects": len(garbage),
               "garbage_bytes": sum(garbage.values()), "condemned": len(condemn), "deleted": 0,
               "deleted_bytes": 0, "waiting": len(garbage) - len(condemn) - len(delete),
               "unreachable_bytes_in_live_packs": dead_bytes_in_live, "dry_run": dry_run,
               "repack_below": below, "repacked_packs": len(todo_repack.copy) if todo_repack else 0,
               "repacked_bytes": todo_repack.old_bytes if todo_repack else 0,
               "repack_copied_bytes": todo_repack.live_bytes if todo_repack else 0, "repack_new_packs": 0}
    if dry_run:
        figures["deleted"] = len(delete)
        figures["deleted_bytes"] = sum(garbage[n] for n in delete)
        return figures

    def write(names: list[str], value: bytes | None) -> None:
        for i in range(0, len(names), _BATCH):
            batch = Batch()
            for n in names[i:i + _BATCH]:
                if value is None:
                    batch.delete("condemned", n.encode())
                else:
                    batch.put("condemned", n.encode(), value)
            remote.refs.write(batch, [lease.fence])
    write(condemn, repr(now).encode())
    forwards = {p: list(qs) for p, qs in moved.items()}
    for n in delete:
        if lease.lost.is_set():
            raise FleetError("the gc's lease on the remote expired (etcd unreachable?): stopped deleting")
        if n.startswith("moved/"):
            forwards.pop(n[len("moved/"):], None)      # dropped when the forwards are published
        else:
            remote.blobs.delete(n)
        figures["deleted"] += 1
        figures["deleted_bytes"] += garbage[n]
    added = repack(remote, todo_repack, lease.lost.is_set) if todo_repack and todo_repack.copy else {}
    for p, qs in added.items():
        forwards[p] = sorted(set(forwards.get(p, ())) | set(qs))
    figures["repack_new_packs"] = len({q for qs in added.values() for q in qs})
    if forwards != moved:
        publish(remote, forwards, lease.fence)
    figures["forwards"] = len(forwards)
    write(delete + pardon, None)
    # the old packs wait for the grace period from now: whoever read their indexes before
    # the forwards existed has that long to fetch from them
    write([f"{kind}/{p}" for p in added for kind in ("index", "data")], repr(time.time()).encode())
    return figures
