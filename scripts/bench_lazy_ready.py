"""Lazy-mount ready time of two (or more) versions of cowfs, alternated in one session: the
Django tree pushed once (SeaweedFS + etcd on 127.0.0.1, as scripts/bench_lazy.py), then per
round and per version a fresh host (its own index cache) runs
`python -m cowfs mount origin:base MNT --store STORE`, timed until it returns (the mount is
ready), then unmounts.  A version is a directory holding a `cowfs/` package (e.g.
`git archive COMMIT cowfs | tar -x -C DIR`), put first on PYTHONPATH for the CLI and so for
the daemon it forks; compile it first (`python -m compileall -q DIR/cowfs`), as an install does.
`--sandbox`: issue 23's 1 GiB sandbox instead (scripts/bench_fleet.py's: Django, a git
repository of it, a venv, 600+ MiB of data; 32,226 entries), built and pushed first (~3 min).

    .venv/bin/python scripts/bench_lazy_ready.py [--rounds N] [--sandbox] DIR [DIR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fleet  # noqa: E402
import benchlib  # noqa: E402
import fleetlib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sandbox", action="store_true", help="issue 23's 1 GiB sandbox instead of the Django tree")
    ap.add_argument("versions", nargs="+", metavar="DIR", help="a directory holding a cowfs/ package")
    args = ap.parse_args()
    tar, _entries = benchlib.django_tar()
    out: dict = {"machine": benchlib.machine_info(), "sandbox": None, "ready_s": {v: [] for v in args.versions},
                 "load": {v: [] for v in args.versions},
                 "build_metadata_s": {v: [] for v in args.versions}, "build_writing_s": {v: [] for v in args.versions},
           "build_s": {v: [] for v in args.versions}}
    base = tempfile.mkdtemp(prefix="cowfs-bench-ready-")
    with fleetlib.fleet(base, "bench-ready", fleetlib.Host) as fl:
        a = fl.host("a")
        src = a.mount("main")
        if args.sandbox:
            out["sandbox"] = bench_fleet.build_sandbox(src, tar, 1024, 600, False)
        else:
            subprocess.run(["tar", "-xf", tar, "-C", src], check=True, timeout=600)
        a.run("snapshot", src, "base")
        a.run("push", src, "base", "origin")
        n = 0
        for _ in range(args.rounds):
            for v in args.versions:
                n += 1
                h = fl.host(f"h{n}")
                env = dict(h.env, PYTHONPATH=os.path.abspath(v))
                store, mp = os.path.join(h.dir, "lazy"), os.path.join(h.dir, "mnt")
                os.makedirs(mp)
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "cowfs", "mount", "origin:base", mp, "--store", store],
                                   env=env, cwd="/", capture_output=True, text=True, timeout=600)
                dt = time.monotonic() - t0
                if r.returncode:
                    raise SystemExit(f"{v}: {r.stderr.strip()}")
                subprocess.run([sys.executable, "-m", "cowfs", "umount", mp], env=env, cwd="/",
                               capture_output=True, timeout=300)
                b = fleetlib.lazy_build(store)
                out["build_metadata_s"][v].append(b["metadata_seconds"])
                out["build_writing_s"][v].append(b["build_seconds"])
                out["build_s"][v].append(b["seconds"])      # ready_s less this: the CLI, fork, the daemon's start
                out["ready_s"][v].append(round(dt, 3))
                out["load"][v].append(round(load, 1))
                benchlib.log(f"{v}: ready in {dt:.2f} s (load {load:.1f})")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
