#!/usr/bin/env python3
"""The core's CPU cost per operation without FUSE: several builds of cowfs side by side.

    scripts/bench_core_calls.py OLD/.venv/bin/python NEW/.venv/bin/python [--files 5000] [--reps 6]
        [--workloads files,smallwrites] [--pages 2000] [--mib 64]

Each python (a checkout's venv) runs the same workloads in a process of its own, through
`Filesystem` on a real store (RocksDB in a temporary directory under /var/tmp).  files: FILES
files made, written (100 bytes), chmod'ed (a deferred SETATTR) and flushed; looked up,
st_blocks computed and read, three times; unlinked.  smallwrites (issue 24's random write +
fsync without FUSE): a file of MIB MiB of random data committed, the store reopened (no
chunk, node or size cached in the process), then PAGES 4 KiB writes at seeded random page
offsets, each followed by an fsync (a small-write log record and a WAL sync), and a flush
every 200 writes (what the daemon's 1 s timer folded at ~200-300 such writes a second), or,
in a build whose flusher has `due` (issue 24's fold policy: cowfs.core.smallwrites), the
flushes and folds that policy asks for after each fsync; then a last flush.
CPU seconds (time.process_time: every thread of the process, the fold's encoding and the
WAL syncs included) per phase; the builds run
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

SMALLWRITES = r'''
import json, os, random, stat, sys, tempfile, time
import trio
from cowfs.core.filesystem import Filesystem
from cowfs.store import ROOT_INO, Store, init_store

PAGES, MIB = int(sys.argv[1]), int(sys.argv[2])

async def main():
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        init_store(d + "/s")
        store = Store(d + "/s", cache_l1=16 << 20, cache_l2=16 << 20)
        fs = Filesystem(store, "main")
        node = await fs.make(fs.node(fs.primary, ROOT_INO), b"f", stat.S_IFREG | 0o644, 0, 0)
        for i in range(MIB):
            await fs.write(node, i << 20, os.urandom(1 << 20))
        await fs.flush()
        store.close()
        store = Store(d + "/s", cache_l1=16 << 20, cache_l2=16 << 20)
        fs = Filesystem(store, "main")
        node = fs.lookup(fs.node(fs.primary, ROOT_INO), b"f")
        rnd = random.Random(24)
        offs = [rnd.randrange(MIB << 8) << 12 for _ in range(PAGES)]
        page = os.urandom(4096)
        due = getattr(fs.flusher, "due", None)  # the background task's policy, where a build has it
        folds = 0
        t = time.process_time()
        for k, off in enumerate(offs):
            await fs.write(node, off, page)
            await fs.fsync()
            if due is not None:
                nodes = due(False)
                if nodes is None:
                    folds += 1
                    await fs.flusher.fold()
                elif nodes:
                    await fs.flusher.commit_waiting(nodes)
            elif k % 200 == 199:
                folds += 1
                await fs.flush()
        await fs.flush()
        out = {"4K write+fsync": time.process_time() - t, "folds before the last": folds}
        store.close()
        print(json.dumps(out))

trio.run(main)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pythons", nargs="+", help="the python of each build's venv; ratios are to the first")
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--workloads", default="files", help="comma-separated: files, smallwrites (default files)")
    ap.add_argument("--pages", type=int, default=2000, help="smallwrites: 4 KiB writes + fsync")
    ap.add_argument("--mib", type=int, default=64, help="smallwrites: the file's size")
    a = ap.parse_args()
    scripts = {"files": (WORKLOAD, [str(a.files)], f"{a.files} files"),
               "smallwrites": (SMALLWRITES, [str(a.pages), str(a.mib)], f"{a.pages} pages of a {a.mib} MiB file")}
    chosen = [scripts[w] for w in a.workloads.split(",")]
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in a.pythons}
    sizes = {}
    for _ in range(a.reps):
        for p in a.pythons:
            out: dict[str, float] = {}
            for script, args, size in chosen:
                r = subprocess.run([p, "-c", script, *args], capture_output=True, text=True, timeout=600,
                                   check=True, cwd="/")
                got = json.loads(r.stdout.strip().splitlines()[-1])
                out.update(got)
                sizes.update(dict.fromkeys(got, size))
            runs[p].append(out)
    first = a.pythons[0]
    for phase in runs[first][0]:
        base = statistics.median(r[phase] for r in runs[first])
        unit = "count" if phase.startswith("folds") else "CPU s"
        print(f"{phase} ({sizes[phase]}, {unit}, median of {a.reps}; min-max; ratio to the first):")
        for p in a.pythons:
            vals = [r[phase] for r in runs[p]]
            med = statistics.median(vals)
            print(f"  {p}: {med:.3f} ({min(vals):.3f}-{max(vals):.3f}) x{med / base if base else 0:.3f}")


if __name__ == "__main__":
    main()
