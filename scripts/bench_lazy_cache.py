"""A lazy mount's reads with its store as a bounded cache of the remote (-o remote_cache_bytes),
on real engines (SeaweedFS + etcd on 127.0.0.1, scripts/fleetlib.py): host a pushes MIB MiB
of incompressible files; host b mounts the snapshot lazily once per limit and reads every file
twice, sequentially, in 1 MiB O_DIRECT reads (past the page cache: the daemon serves every
byte).  Per limit: each pass's time and MB/s, the bytes fetched, the cache's figures and the
store's packs on disk at the end.  "none" mounts without the option (for a cowfs that has
none: --cowfs /work/main/.venv/bin/cowfs measures the code before cache packs).

    .venv/bin/python scripts/bench_lazy_cache.py [--mib 128] [--limits none,0,32M] [--cowfs PATH] [--options O] [--json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import fleetlib  # noqa: E402

FILE = 16 << 20
READ = 1 << 20


def read_all(mp: str, names: list[str]) -> float:
    """Seconds to read every file through O_DIRECT, 1 MiB at a time."""
    buf = mmap.mmap(-1, READ)
    t0 = time.monotonic()
    for name in names:
        fd = os.open(os.path.join(mp, name), os.O_RDONLY | os.O_DIRECT)
        try:
            off = 0
            while n := os.preadv(fd, [buf], off):
                off += n
        finally:
            os.close(fd)
    return time.monotonic() - t0


def du(path: str) -> int:
    return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=128, help="MiB pushed (16 MiB files)")
    ap.add_argument("--limits", default="none,0,32M", help="remote_cache_bytes values, comma-separated")
    ap.add_argument("--cowfs", default=fleetlib.COWFS, help="the cowfs command of the hosts")
    ap.add_argument("--options", default="", help="more -o options of every lazy mount (e.g. prefetch=0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fleetlib.COWFS = args.cowfs
    out: dict = {"machine": benchlib.machine_info(), "mib": args.mib, "cowfs": args.cowfs, "runs": {}}
    base = tempfile.mkdtemp(prefix="cowfs-bench-lazy-cache-")
    with fleetlib.fleet(base, "bench-lazy-cache", fleetlib.Host) as fl:
        a, b = fl.host("a"), fl.host("b")
        src = a.mount("main")
        names = [f"f{i:02d}" for i in range(max(1, (args.mib << 20) // FILE))]
        for name in names:
            with open(os.path.join(src, name), "wb") as f:
                f.write(os.urandom(FILE))
        a.run("snapshot", src, "base")
        a.json("push", src, "base", "origin")
        for i, limit in enumerate(args.limits.split(",")):
            opts = (() if limit == "none" else ("-o", f"remote_cache_bytes={limit}")) + \
                (("-o", args.options) if args.options else ())
            mp, _ready = b.lazy_mount("origin:base", f"l{i}", *opts)
            first = read_all(mp, names)
            after_first = (fleetlib.lazy_stats(mp) or {}).get("bytes_fetched")
            second = read_all(mp, names)
            lazy = fleetlib.lazy_stats(mp) or {}
            store = os.path.join(b.dir, f"store-l{i}")
            mb = len(names) * FILE / 1e6
            out["runs"][limit] = {"first_s": round(first, 2), "first_MBps": round(mb / first, 1),
                                  "second_s": round(second, 2), "second_MBps": round(mb / second, 1),
                                  "bytes_fetched_first": after_first,
                                  "bytes_fetched": lazy.get("bytes_fetched"), "gets": lazy.get("gets"),
                                  "cache": lazy.get("cache"), "packs_du": du(os.path.join(store, "packs")),
                                  "warming_bytes": (lazy.get("warming") or {}).get("bytes"),
                                  "prefetch_bytes": (lazy.get("prefetch") or {}).get("bytes")}
            b.umount_all()
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for limit, r in out["runs"].items():
            print(f"{limit:>6}: first {r['first_MBps']} MB/s, second {r['second_MBps']} MB/s, "
                  f"fetched {r['bytes_fetched']}, packs on disk {r['packs_du']}")


if __name__ == "__main__":
    main()
