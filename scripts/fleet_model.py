#!/usr/bin/env python3
"""docs/scaling.md's check: the S3 and etcd requests of each fleet operation, counted on the wire
of a real run, beside what the model's formulas predict from the remote's state.

Real engines on 127.0.0.1 (SeaweedFS `weed server -s3` and one etcd member, started by
scripts/fleetlib.py as for scripts/bench_fleet.py), real stores and mounts, the `cowfs` CLI of
this checkout; each "host" is a store with its own XDG_CONFIG_HOME / XDG_CACHE_HOME (its own pack
index cache and push state).  The counting: fleetlib's `sitecustomize` (`fleetlib.counting`),
put on PYTHONPATH for the measured commands only, counts every S3 request sent (retries
included) and every etcd gateway call; all processes of a command are summed.

Run (root, from the repository; everything under /var/tmp/cowfs-fleet-model, removed afterwards):
  .venv/bin/python scripts/fleet_model.py --hosts 8
  .venv/bin/python scripts/fleet_model.py --hosts 4 --tree django
The synthetic tree: 36 directories (root, 5, 30 under them) holding 300 text files of 1-8 KiB
and two 10 MiB files of random bytes (20 MiB incompressible: two packs).  A fork changes one
file in each of 10 directories.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fleetlib  # noqa: E402

BASE = "/var/tmp/cowfs-fleet-model"
PREFIX = "fleet"
PUSH_TTL = 20.0        # cowfs.fleet.remote.PUSH_TTL: a push's lease, renewed every TTL/3


class Host(fleetlib.Host):
    def cowfs(self, *args: str, count: bool = False) -> tuple[str, Counter, Counter]:
        """stdout, and with count: S3 and etcd requests and bytes by kind, summed over the
        command's processes (not the counter's "fuse read": a pull of a fork reads its base
        through a mount)."""
        d = os.path.join(BASE, "counts")
        stdout = self.run(*args, env=fleetlib.counting(self.env, d) if count else self.env)
        got = {k: v for k, v in fleetlib.counts(d).items() if k.startswith(("S3 ", "etcd "))} if count else {}
        return stdout, Counter({k: v[0] for k, v in got.items()}), Counter({k: v[1] for k, v in got.items()})

    def cached_indexes(self) -> set[str]:
        """The packs whose index this host's cache holds."""
        d = os.path.join(self.dir, "cache", "cowfs", "fleet")
        return {f for x in (os.listdir(d) if os.path.isdir(d) else []) if os.path.isdir(os.path.join(d, x, "index"))
                for f in os.listdir(os.path.join(d, x, "index")) if not f.startswith(".")}


def make_tree(root: str, seed: int = 1) -> None:
    rnd = random.Random(seed)
    words = ["fork", "base", "sandbox", "chunk", "pack", "index", "tree", "commit", "etcd", "lease"]
    for d in range(5):
        for e in range(6):
            p = os.path.join(root, f"d{d}", f"e{e}")
            os.makedirs(p)
            for f in range(10):
                with open(os.path.join(p, f"f{f}.txt"), "w") as fh:
                    fh.write(" ".join(rnd.choice(words) for _ in range(rnd.randrange(200, 1600))))
    for i in range(2):
        with open(os.path.join(root, f"big{i}.bin"), "wb") as fh:
            fh.write(rnd.randbytes(10 << 20))


def change(root: str, n: int, tag: str, suffix: str) -> None:
    """Append a line to the first file ending in suffix of each of the first n directories
    (in sorted walk order) that have one: n files in n directories."""
    done = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        if "/.cowfs" in dirpath:
            continue
        names = sorted(f for f in filenames if f.endswith(suffix))
        if names and done < n:
            with open(os.path.join(dirpath, names[0]), "a") as fh:
                fh.write(f"\n# changed by {tag}\n")
            done += 1


# --- the model (docs/scaling.md "Requests per operation") ---------------------------------------

# The objects a commit names besides its packs, written once by id (push.py `Pusher.put`), read
# by gc's mark and collected when no reached commit names them: warm/<id> (the learned cold
# start, 485a009) and model/<id> (the learned prefetch model, ddaab49).
SIDE = ("warm", "model")


def model_push(P: int, U: int, N: int, parent: bool, branch: bool, seconds: float,
               side: dict[str, tuple[int, int]]) -> Counter:
    """A push: P packs on the remote, N new packs; U indexes read that this host's cache lacks:
    with a parent (whose commit names its packs; or, with none, the commit the local branch
    was pulled from or last pushed as), of its packs, read after that commit (one GET) and
    without a LIST; without either, of every pack, after a LIST of index/.  side: per object
    the commit names besides its packs (warm/<id>: the learned cold start; model/<id>: the
    prefetch model), (sent, new): the push sends one (the commit names it), and it was not on
    the remote before; each goes through the pusher's put as a pack does (HEAD: "is it
    there", then, if not, the store's write-once HEAD and the PUT)."""
    c = Counter({"S3 LIST index": 0 if parent else max(1, math.ceil(P / 1000)), "S3 GET index": U,
                 "S3 GET commit": int(parent),
                 "S3 HEAD data": 2 * N, "S3 PUT data": N, "S3 HEAD index": 2 * N, "S3 PUT index": N,
                 "S3 HEAD commit": 2, "S3 PUT commit": 1,
                 "etcd lease/grant": 1, "etcd kv/txn": 2, "etcd kv/range": 3 + branch,     # + gc/forwards
                 "etcd lease/keepalive": int(seconds // (PUSH_TTL / 3)), "etcd lease/revoke": 1})
    for kind, (sent, new) in side.items():
        c[f"S3 HEAD {kind}"] += sent + new
        c[f"S3 PUT {kind}"] += new
    return c


def model_pull(U: int, walked: int, based: bool) -> Counter:
    """A pull's fixed part: each commit read once, the pulled one, `walked` parents read past
    it while looking for a local base, and the base (based: one other than the pulled one was
    found); U indexes this host's cache lacks of the packs the pulled commit and the base name
    (no LIST); the ranged GETs of trees and chunks (S3 GET data) depend on the layout and are
    reported as measured."""
    return Counter({"etcd kv/range": 2, "S3 GET commit": 1 + walked + based, "S3 GET index": U})     # the name, gc/forwards


def model_hold(seconds: float, ttl: float) -> Counter:
    return Counter({"etcd lease/grant": 1, "etcd kv/txn": 1, "etcd lease/keepalive": int(seconds // (ttl / 3)),
                    "etcd lease/revoke": 1})


def model_gc(P: int, U: int, C: int, refs: Counter, commits: int, dead_packs: int, dead_commits: int,
             sweep: bool, side: dict[str, tuple[int, int, int]]) -> Counter:
    """A gc: P packs (U of their indexes not in this host's cache), C commit objects, refs per
    family naming `commits` distinct commits; garbage: dead_packs packs (data + index) and
    dead_commits commits, condemned by a first run and deleted by a second (sweep) once the
    grace is over.  side: per kind of object a commit names besides its packs (warm, model),
    (on the remote, distinct ids the reached commits name, dead): listed, each named one read
    once (the mark checks it), the dead condemned and swept as the rest.  The tree GETs (S3
    GET data: every live tree is read) depend on the layout."""
    def pages(n: int, per: int) -> int:
        return max(1, math.ceil(n / per))
    garbage = 2 * dead_packs + dead_commits + sum(d for _o, _n, d in side.values())
    c = Counter({"S3 LIST index": pages(P, 1000), "S3 GET index": U, "S3 LIST data": pages(P, 1000),
                 "S3 LIST commit": pages(C, 1000), "S3 LIST forwards": 1,
                 "S3 GET commit": commits, "S3 DELETE data": dead_packs * sweep,
                 "S3 DELETE index": dead_packs * sweep, "S3 DELETE commit": dead_commits * sweep,
                 "etcd lease/grant": 1, "etcd lease/revoke": 1,
                 "etcd kv/range": 1 + pages(refs["snap"], 512) + pages(refs["branch"], 512) + 1 + 1,   # + gc/forwards
                 "etcd kv/txn": 1 + math.ceil(garbage / 100)})
    for kind, (objects, named, dead) in side.items():
        c[f"S3 LIST {kind}"] += pages(objects, 1000)
        c[f"S3 GET {kind}"] += named
        c[f"S3 DELETE {kind}"] += dead * sweep
    return c


def compare(name: str, n: Counter, b: Counter, model: Counter, free: tuple[str, ...] = (),
            slack: tuple[str, ...] = ("etcd lease/keepalive",)) -> dict:
    """Measured against modelled, kind by kind; `free` kinds are reported, not modelled;
    `slack` kinds (time-driven) may differ by one."""
    rows, ok = [], True
    for kind in sorted(set(n) | set(model)):
        m = None if kind in free else model.get(kind, 0)
        good = m is None or n[kind] == m or (kind in slack and abs(n[kind] - m) <= 1)
        ok &= good
        rows.append({"kind": kind, "measured": n[kind], "bytes": b[kind], "model": m, "ok": good})
    return {"op": name, "ok": ok, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=6, help="stores acting as hosts (>= 3)")
    ap.add_argument("--tree", choices=("synthetic", "django"), default="synthetic",
                    help="django: the Django 5.1.4 sdist untarred (scripts/benchlib.py), as bench_fleet.py")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.hosts < 3:
        ap.error("--hosts: at least 3")
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE)
    ops: list[dict] = []
    with fleetlib.fleet(BASE, PREFIX, Host) as fleet:
        s3 = fleet.sw.client()

        def commit(cid: str) -> dict:
            return json.loads(s3.get_object(Bucket=fleet.sw.BUCKET, Key=f"{PREFIX}/commit/{cid}")["Body"].read())

        def snap_doc(name: str) -> dict:
            """The commit of the remote's snapshot `name`."""
            return commit({r["name"]: r["commit"] for r in json.loads(a.cowfs("remote", "show", "origin", "--json")[0])
                           ["refs"] if r["kind"] == "snapshot"}[name])

        def packs(name: str) -> set[str]:
            """The packs the commit of the remote's snapshot `name` names."""
            return set(snap_doc(name)["packs"])

        def listed(kind: str) -> set[str]:
            """The ids of the remote's objects of a kind (data, index, commit, warm...)."""
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=fleet.sw.BUCKET, Prefix=f"{PREFIX}/{kind}/")
            return {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}

        def push(h: Host, mp: str, snap: str, parent: str | None, *extra: str) -> dict:
            """parent: the remote snapshot the pushed tree was made from (its packs' indexes are read)."""
            before, cached = fleet.remote_objects(), h.cached_indexes()
            read = packs(parent) if parent else None
            h.cowfs("snapshot", mp, snap)
            out, n, b = h.cowfs("push", mp, snap, "origin", "--json", *extra, count=True)
            s = json.loads(out.strip().splitlines()[-1])["pushed"]
            after = fleet.remote_objects()
            P, N = before["index"], after["data"] - before["data"]
            U = len(read - cached) if read is not None else P - len(cached)
            doc = snap_doc(snap)
            side = {k: (int(bool(doc.get(k))), after[k] - before[k]) for k in SIDE}
            said = ", ".join(f"{k} {'new' if new else 'sent, on the remote already' if sent else 'none'}"
                             for k, (sent, new) in side.items())
            op = compare(f"push {snap} from {h.name} (P={P}, U={U}, N={N}, {said}; {s['files_read']} files "
                         f"read, {s['bytes_uploaded']} B uploaded)", n, b,
                         model_push(P, U, N, parent is not None, bool(extra), s["seconds"], side))
            op.update(P=P, U=U, N=N, side=side, uploaded=s["bytes_uploaded"], packs=len(doc["packs"]))
            ops.append(op)
            return op

        def pull(h: Host, name: str, walked: int, base: str | None) -> dict:
            """base: the remote snapshot this host holds already that the pull diffs against."""
            P, cached = fleet.remote_objects()["index"], h.cached_indexes()
            read = packs(name) | (packs(base) if base else set())
            out, n, b = h.cowfs("pull", "origin", name, h.store, "--json", count=True)
            s = json.loads(out.strip().splitlines()[-1])["pulled"]
            U = len(read - cached)
            op = compare(f"pull {name} into {h.name} (P={P}, U={U}; {s['trees_fetched']} trees, "
                         f"{s['chunks_fetched']} chunks, {s['bytes_fetched']} B raw fetched)", n, b,
                         model_pull(U, walked, base is not None), free=("S3 GET data",))
            op.update(P=P, U=U, trees=s["trees_fetched"], chunks=s["chunks_fetched"], bytes_fetched=s["bytes_fetched"],
                      get_data_bytes=b["S3 GET data"])
            ops.append(op)
            return op

        a = fleet.host("a")
        mp = a.mount("main")
        suffix = ".txt"
        if args.tree == "django":
            import benchlib
            tar, _entries = benchlib.django_tar()
            subprocess.run(["tar", "-xf", tar, "-C", mp], check=True, timeout=1800)
            suffix = ".py"
        else:
            make_tree(mp)
        push(a, mp, "base", None)
        change(mp, 10, "a", suffix)
        push(a, mp, "fork", "base")                   # the same host: its index cache is warm
        b = fleet.host("b")
        pull(b, "base", 0, None)
        pull(b, "fork", 0, "base")                    # fork's parent is base, which b holds
        for i in range(args.hosts - 2):
            h = fleet.host(f"h{i}")
            pull(h, "base", 0, None)
            fm = h.mount("base")
            change(fm, 10, h.name, suffix)
            push(h, fm, f"fork-{h.name}", "base")
            h.umount_all()
        change(mp, 1, "a again", suffix)
        # a branch push: one range more (the branch's hold); its parent is the branch's last
        # commit seen by this host (none: never pushed to main), so it reads the indexes of the
        # commit this local branch was last pushed as (fork's)
        push(a, mp, "head", "fork", "--branch", "main")
        # a's writable mount of main now follows the remote branch main and holds it (cowfs/fleet/
        # holds.py): unmounted (the hold given back) so that `remote hold` can take it
        a.umount_all()
        t0 = time.monotonic()
        _out, n, bts = a.cowfs("remote", "hold", "origin", "main", "--ttl", "3", "--", "sleep", "4", count=True)
        ops.append(compare("hold of branch main, --ttl 3, for `sleep 4`", n, bts, model_hold(4.0, 3.0)))
        ops[-1]["wall_s"] = round(time.monotonic() - t0, 2)
        a.cowfs("remote", "delete", "origin", "fork-h0")
        shown = json.loads(a.cowfs("remote", "show", "origin", "--json")[0])["refs"]
        refs = Counter("snap" if r["kind"] == "snapshot" else "branch" for r in shown)
        reached = [commit(c) for c in {r["commit"] for r in shown}]
        commits = len(reached)
        for run in ("condemns", "deletes"):
            objs = fleet.remote_objects()
            U = len(listed("index") - a.cached_indexes())
            # side objects: those the reached commits name are read; the others (the deleted
            # fork's, unless another reached commit names the same) are garbage
            side = {}
            for k in SIDE:
                named = {d[k] for d in reached if d.get(k)}
                side[k] = (objs[k], len(named), len(listed(k) - named))
            out, n, bts = a.cowfs("remote", "gc", "origin", "--grace", "0", "--json", count=True)
            f = json.loads(out.strip().splitlines()[-1])
            # garbage: the deleted fork's own pack (data + index) and its commit, and side objects
            ops.append(compare(f"gc that {run} (P={objs['index']}, U={U}, C={objs['commit']}, {dict(refs)} refs naming "
                               f"{commits} commits, side objects (on the remote, named, dead) {side}; "
                               f"condemned {f['condemned']}, deleted {f['deleted']})", n, bts,
                               model_gc(objs["index"], U, objs["commit"], refs, commits, 1, 1, run == "deletes", side),
                               free=("S3 GET data",)))
        final = fleet.remote_objects()
    if args.json:
        print(json.dumps({"hosts": args.hosts, "ops": ops, "remote": dict(final)}))
        return
    for op in ops:
        print(f"{'OK      ' if op['ok'] else 'MISMATCH'} {op['op']}")
        for r in op["rows"]:
            m = "-" if r["model"] is None else r["model"]
            print(f"    {r['kind']:<22} measured {r['measured']:>4}  model {m!s:>4}  {r['bytes']:>10} B"
                  f"{'' if r['ok'] else '   <-- differs'}")
    print(f"remote afterwards: {dict(final)}")


if __name__ == "__main__":
    main()
