#!/usr/bin/env python3
"""What reading every pack index of a remote costs (`Remote.load_index`: a first push, `cowfs
remote check`, `cowfs remote gc`), per 1,000 packs, for docs/scaling.md's extrapolation.

Real engines on 127.0.0.1 (SeaweedFS and etcd, scripts/fleetlib.py); the remote holds PACKS
synthetic pack indexes of ENTRIES entries each (the model's fork push: 17 blobs, a 870-byte
index; the pack data is not needed to read indexes).  Measured in this process: a cold read
(an empty index cache: LIST `index/` + one GET per index, 4 at a time as `Remote._load` does),
a warm one (every index cached: the LIST, then the local files decoded), and the memory the
union index and the gc's per-pack indexes hold (tracemalloc).

Run (from the repository; everything under /var/tmp/cowfs-index-load, removed afterwards):
  .venv/bin/python scripts/bench_index_load.py --packs 3000 --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import fleetlib  # noqa: E402  (scripts/, on sys.path when run as a script)

from cowfs.fleet.config import RemoteConfig  # noqa: E402
from cowfs.fleet.objects import ENC_RAW, TYPE_CHUNK, Loc, encode_index  # noqa: E402
from cowfs.fleet.remote import Remote  # noqa: E402


def _index(i: int, entries: int) -> tuple[str, bytes]:
    pack = os.urandom(32).hex()
    locs = [(os.urandom(32), Loc(pack, TYPE_CHUNK, ENC_RAW, j * 2000, 2000, 2000)) for j in range(entries)]
    return pack, encode_index(locs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packs", type=int, default=3000)
    ap.add_argument("--entries", type=int, default=17)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    base = "/var/tmp/cowfs-index-load"
    with fleetlib.fleet(base, "index-load", fleetlib.Host) as f:
        os.environ.update({k: v for k, v in f.env.items() if k.startswith("AWS_")})
        cfg = RemoteConfig(name="origin", url=f"s3://{f.sw.BUCKET}/index-load", refs=f.etcd.endpoint)
        t0 = time.monotonic()
        with Remote(cfg) as r, ThreadPoolExecutor(8) as pool:
            made = [_index(i, a.entries) for i in range(a.packs)]
            list(pool.map(lambda pi: r.blobs.put("index/" + pi[0], pi[1]), made))
        put_s = time.monotonic() - t0
        index_bytes = sum(len(d) for _p, d in made)
        out = {"packs": a.packs, "entries_per_pack": a.entries, "index_bytes": index_bytes, "put_seconds": round(put_s, 2)}
        for run in ("cold", "warm"):
            os.environ["XDG_CACHE_HOME"] = os.path.join(base, "cache")     # cold: empty; warm: filled by cold
            with Remote(cfg) as r:
                r.by_pack = {}                                             # as the gc's mark keeps them
                tracemalloc.start()
                t0 = time.monotonic()
                n = r.load_index(everything=True)
                secs = time.monotonic() - t0
                mem = tracemalloc.get_traced_memory()[0]
                tracemalloc.stop()
                assert n == a.packs and len(r.index) == a.packs * a.entries, (n, len(r.index))
            out[run] = {"seconds": round(secs, 2), "seconds_per_1000_packs": round(secs * 1000 / a.packs, 2),
                        "lists": -(-a.packs // 1000), "gets": a.packs if run == "cold" else 0,
                        "memory_bytes_per_entry": round(mem / (a.packs * a.entries))}
        out["load"] = os.getloadavg()[0]
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
