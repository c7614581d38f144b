#!/usr/bin/env python3
"""The core's CPU cost per operation without FUSE: several builds of cowfs side by side.

    scripts/bench_core_calls.py OLD/.venv/bin/python NEW/.venv/bin/python [--files 5000] [--reps 6]

Each python (a checkout's venv) runs the same workload in a process of its own, through
`Filesystem` on a real store (RocksDB in a temporary directory under /var/tmp): FILES files made,
written (100 bytes), chmod'ed (a deferred SETATTR) and flushed; looked up, st_blocks computed
and read, three times; unlinked.  CPU seconds (time.process_time) per phase; the builds run
interleaved, REPS times, and the medians and their ratios to the first build are printed.  CPU
time of one process on a loaded machine moves less than the wall times of a mount, so this
tells a change in the core's own cost apart from the machine's noise (bench_core.py measures
the whole path, the kernel and FUSE included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess

WORKLOAD = r'''
import json, stat, sys, tempfile, time
import trio
from cowfs.core.filesystem import Filesystem
from cowfs.store import ROOT_INO, Store, init_store

N = int(sys.argv[1])

async def main():
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        init_store(d + "/s")
        store = Store(d + "/s", cache_l1=16 << 20, cache_l2=16 << 20)
        fs = Filesystem(store, "main")
        root = fs.node(fs.primary, ROOT_INO)
        names = [b"f%06d" % i for i in range(N)]
        out = {}
        t = time.process_time()
        for n in names:
            node = await fs.make(root, n, stat.S_IFREG | 0o644, 0, 0)
            await fs.write(node, 0, b"x" * 100 + n)
            await fs.setattr(node, mode=0o600)
        await fs.flush()
        out["create+write+chmod"] = time.process_time() - t
        t = time.process_time()
        for _ in range(3):
            for n in names:
                node = fs.lookup(root, n)
                fs.blocks(node)
                bytes(fs.read(node, 0, 4096))
        out["lookup+blocks+read x3"] = time.process_time() - t
        t = time.process_time()
        for n in names:
            await fs.unlink(root, n, want_dir=False)
        out["unlink"] = time.process_time() - t
        store.close()
        print(json.dumps(out))

trio.run(main)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pythons", nargs="+", help="the python of each build's venv; ratios are to the first")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in a.pythons}
    for _ in range(a.reps):
        for p in a.pythons:
            r = subprocess.run([p, "-c", WORKLOAD, str(a.files)], capture_output=True, text=True, timeout=600,
                               check=True, cwd="/")
            runs[p].append(json.loads(r.stdout.strip().splitlines()[-1]))
    first = a.pythons[0]
    for phase in runs[first][0]:
        base = statistics.median(r[phase] for r in runs[first])
        print(f"{phase} ({a.files} files, CPU s, median of {a.reps}; min-max; ratio to the first):")
        for p in a.pythons:
            vals = [r[phase] for r in runs[p]]
            med = statistics.median(vals)
            print(f"  {p}: {med:.3f} ({min(vals):.3f}-{max(vals):.3f}) x{med / base:.3f}")


if __name__ == "__main__":
    main()
