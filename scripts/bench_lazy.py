"""A lazy mount against a pull, on real engines (SeaweedFS + etcd on 127.0.0.1; the engines,
hosts, lazy mount and its figures are scripts/fleetlib.py's, as for bench_fleet.py): host a
pushes the Django source tree; host b pulls it (`cowfs pull` then a mount of the pulled
branch), host c lazily mounts it
(`cowfs mount origin:base MNT --store STORE`).  Measured: the time until each mount is ready,
then on the lazy mount the bytes fetched to read N files (their chunks and 256 KiB ahead)
against their size, a second read of them (nothing fetched), and `import django` with the
lazy mount on sys.path (django, django.utils.functional and .datastructures: no dependency needed).

    .venv/bin/python scripts/bench_lazy.py [--files N] [--json]
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
import benchlib  # noqa: E402
import fleetlib  # noqa: E402


def lazy_figures(mp: str) -> dict:
    got = fleetlib.lazy_stats(mp)
    if got is None:
        raise SystemExit(f"{mp} shows no lazy-mount figures")
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200, help="files read on the lazy mount (every k-th .py file)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tar, entries = benchlib.django_tar()
    out: dict = {"machine": benchlib.machine_info(), "django_entries": entries}
    base = tempfile.mkdtemp(prefix="cowfs-bench-lazy-")
    with fleetlib.fleet(base, "bench-lazy", fleetlib.Host) as fl:
        a, b, c = fl.host("a"), fl.host("b"), fl.host("c")
        src = a.mount("main")
        subprocess.run(["tar", "-xf", tar, "-C", src], check=True, timeout=600)
        a.run("snapshot", src, "base")
        pushed = a.json("push", src, "base", "origin")["pushed"]
        out["pushed"] = {k: pushed[k] for k in ("files", "bytes_uploaded") if k in pushed}

        t0 = time.monotonic()
        b.run("pull", "origin", "base", b.store, "--json")
        b.mount("base")
        out["pull_then_mount_s"] = round(time.monotonic() - t0, 3)

        mp, ready = c.lazy_mount("origin:base", "lazy")
        out["lazy_mount_ready_s"] = round(ready, 3)
        out["lazy_fetched_at_mount"] = lazy_figures(mp)["bytes_fetched"]
        # Where the time goes: the build's own figures (fetching the commit, indexes and trees,
        # then writing the tree), which it keeps in the store's lazy.json.
        build = fleetlib.lazy_build(os.path.join(c.dir, "store-lazy"))
        out["build"] = {k: build[k] for k in ("metadata_seconds", "build_seconds", "seconds", "files", "dirs",
                                              "trees", "indexes", "commits", "remote_chunks")}

        top = os.path.join(mp, os.listdir(mp)[0])
        py = sorted(os.path.join(d, n) for d, _ds, ns in os.walk(top) for n in ns if n.endswith(".py"))
        step = max(1, len(py) // args.files)
        chosen = py[::step][:args.files]
        t0 = time.monotonic()
        read = 0
        for p in chosen:
            with open(p, "rb") as f:
                read += len(f.read())
        first = lazy_figures(mp)
        out["read"] = {"files": len(chosen), "bytes_read": read, "seconds": round(time.monotonic() - t0, 3),
                       "bytes_fetched": first["bytes_fetched"], "bytes_transferred": first["bytes_transferred"],
                       "gets": first["gets"],
                       "fetched_per_read": round(first["bytes_fetched"] / read, 3),
                       "transferred_per_read": round(first["bytes_transferred"] / read, 3)}
        for p in chosen:
            with open(p, "rb") as f:
                f.read()
        out["second_read_fetched"] = lazy_figures(mp)["bytes_fetched"] - first["bytes_fetched"]
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import django, django.utils.functional, django.utils.datastructures"], check=True,
                       cwd="/", env=dict(os.environ, PYTHONPATH=top, PYTHONDONTWRITEBYTECODE="1"), timeout=300)
        after = lazy_figures(mp)
        out["import_django"] = {"seconds": round(time.monotonic() - t0, 3),
                                "bytes_fetched": after["bytes_fetched"] - first["bytes_fetched"],
                                "gets": after["gets"] - first["gets"]}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
