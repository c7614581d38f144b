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
just before it was deleted has that long to fetch its objects.  A pack with some reachable
blobs is kept whole (repacking is not built): its unreachable bytes are reported.
"""
from __future__ import annotations

import time
from typing import Any

from cowfs.fleet import FleetError
from cowfs.fleet.check import mark
from cowfs.fleet.remote import Remote, release, this_holder

GC_TTL = 30
_BATCH = 100


def gc(remote: Remote, grace: float, dry_run: bool = False) -> dict[str, Any]:
    from cowfs.kv.base import Batch
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
        m = mark(remote)
        if m.problems:
            raise FleetError(f"the remote {remote.cfg.name} has {len(m.problems)} problems (first: {m.problems[0]}): "
                             f"gc deletes nothing until cowfs remote check {remote.cfg.name} passes")
        reachable = m.trees | set(m.chunks)
        live: set[str] = set()
        dead_bytes_in_live = 0
        per_pack: dict[str, list[tuple[bytes, int]]] = {}
        for h, loc in remote.index.items():
            per_pack.setdefault(loc.pack, []).append((h, loc.length))
        for pack, blobs in per_pack.items():
            if any(h in reachable for h, _n in blobs):
                live.add(pack)
                dead_bytes_in_live += sum(n for h, n in blobs if h not in reachable)
        garbage: dict[str, int] = {}
        for pack in set(per_pack) | set(m.sizes):
            if pack not in live:
                if pack in per_pack:
                    garbage["index/" + pack] = 0
                if pack in m.sizes:
                    garbage["data/" + pack] = m.sizes[pack]
        for e in remote.blobs.list("commit/"):
            if e.name[len("commit/"):] not in m.commits:
                garbage[e.name] = e.size
        for kind, named in (("warm/", m.warm), ("model/", m.model)):
            for e in remote.blobs.list(kind):
                if e.name[len(kind):] not in named:
                    garbage[e.name] = e.size
        now = time.time()
        condemned = {k.decode(): float(v) for k, v in remote.refs.scan("condemned", b"")}
        delete = sorted((n for n in garbage if n in condemned and now - condemned[n] >= grace),
                        key=lambda n: not n.startswith("index/"))     # an index before its pack
        condemn = [n for n in garbage if n not in condemned]
        pardon = [n for n in condemned if n not in garbage]           # reachable again, or gone
        figures = {"live_packs": len(live), "garbage_objects": len(garbage),
                   "garbage_bytes": sum(garbage.values()), "condemned": len(condemn), "deleted": 0,
                   "deleted_bytes": 0, "waiting": len(garbage) - len(condemn) - len(delete),
                   "unreachable_bytes_in_live_packs": dead_bytes_in_live, "dry_run": dry_run}
        if dry_run:
            figures["deleted"] = len(delete)
            figures["deleted_bytes"] = sum(garbage[n] for n in delete)
            return figures
        for i in range(0, len(condemn), _BATCH):
            batch = Batch()
            for n in condemn[i:i + _BATCH]:
                batch.put("condemned", n.encode(), repr(now).encode())
            remote.refs.write(batch, [lease.fence])
        for n in delete:
            if lease.lost.is_set():
                raise FleetError("the gc's lease on the remote expired (etcd unreachable?): stopped deleting")
            remote.blobs.delete(n)
            figures["deleted"] += 1
            figures["deleted_bytes"] += garbage[n]
        gone = delete + pardon
        for i in range(0, len(gone), _BATCH):
            batch = Batch()
            for n in gone[i:i + _BATCH]:
                batch.delete("condemned", n.encode())
            remote.refs.write(batch, [lease.fence])
        return figures
    finally:
        release(lease)
