#!/usr/bin/env python3
"""Benchmark of the cowfs read cache (issue #5): L1/L2 hit cost, 4 KiB pread through the mount,
and a cold-start replay scored for readahead and learned prefetch.

    .venv/bin/python scripts/bench_cache.py            # full run (~6-8 min)
    .venv/bin/python scripts/bench_cache.py --quick    # fewer samples and rounds (~3 min)
    .venv/bin/python scripts/bench_cache.py --json     # last line: one JSON object

Parts:
  micro    in-process ChunkCache at a 256 MiB L1 filled with 64 KiB chunks of real source text:
           4 KiB reads that hit L1, 4 KiB reads that hit L2 (a 256 MiB L2 behind a 1 MiB L1), and
           4 KiB reads that miss both (RocksDB get + zstd decode + L2 packing), p10/p50/p90/p99.
  pread    4 KiB preads at random offsets of a 32 MiB file through a real mount, with O_DIRECT
           (so the kernel page cache never answers), after touching every chunk twice: L1 hits,
           L2 hits (mounted with cache_l1=1M: reused chunks go to L2) and store reads
           (cache_l1=1M,cache_l2=0; the store's files are in the OS page cache).
  memory   peak daemon RSS (sampled every 50 ms) with cache_l1=64M,cache_l2=64M during a
           streaming read of a 4 GiB file (1 GiB with --quick) and a walk that opens and reads
           every file of a 100,000-file tree (20,000; 1,000 files cloned into 100 directories).
  replay   a cold start on the mount: `import django; django.setup()` plus more imports
           (Django 5.1.4 untarred into the mount, asgiref and sqlparse pip-installed into it) and
           `git status` in the Django tree (a git repo inside the mount).  One run learns (prefetch
           on), then ROUNDS pairs of scored runs alternate prefetch on (learning off: the model is
           what the learning run left) and prefetch off.  Before every scored run: remount (all
           cowfs caches empty), drop the kernel's caches, then warm Python's and git's own files by
           running the same workload on a copy of the tree on the local disk, so what differs is
           the mount.  precision = prefetched chunks later read / prefetched chunks; recall = chunk
           reads served by prefetched chunks / chunk reads (readahead and learned separately and
           together); speedup = median wall time off / median wall time on.  Cold-start warming
           (cowfs.background.warming) is scored apart: directories its helper listed, how many of them the
           workload listed afterwards, and how many the workload listed.  Each round also times
           prefetch on without warming (warm=0: chunk prefetch alone, chunks_only_speedup) and
           prefetch off with the store's files read back into the OS page cache: how much of
           the cold run is waiting for the store's disk at all (speedup_bound).

Needs root and /dev/fuse; every mount is unmounted at the end, even after an error.
"""
from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import random
import shutil
import statistics
import sys
import tarfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

sys.path.insert(0, benchlib.REPO)
from cowfs.cache.tiers import ChunkCache  # noqa: E402
from cowfs.chunks.tree import CHUNK  # noqa: E402

PAGE = 4096
IMPORT_SCRIPT = """
import django
from django.conf import settings
settings.configure(INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.admin",
                                   "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles"],
                   DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}})
django.setup()
import django.test, django.contrib.admin.sites, django.db.models, django.forms, django.template.defaulttags
"""


def dist(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]
    return {"p10": q(0.10), "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "n": len(s)}


def show(name: str, d: dict[str, float], unit: str = "ns") -> None:
    benchlib.log(f"  {name:<28} p10 {d['p10']:>9.0f}  p50 {d['p50']:>9.0f}  p90 {d['p90']:>9.0f}  "
                 f"p99 {d['p99']:>9.0f} {unit}  (n={d['n']})")


@functools.lru_cache(maxsize=None)
def django_tar() -> str:
    """The Django 5.1.4 sdist as a .tar, downloaded into benchlib.DJANGO_CACHE on first use."""
    return benchlib.django_tar()[0]


def source_text(limit: int) -> bytes:
    """Real file content for the cache to hold: Django's .py files, concatenated."""
    out, n = [], 0
    with tarfile.open(django_tar()) as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".py"):
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                out.append(data)
                n += len(data)
                if n >= limit:
                    break
    text = b"".join(out)
    while len(text) < limit:
        text += text
    return text[:limit]


# -- micro --------------------------------------------------------------------------------------
def micro(samples: int) -> dict[str, object]:
    from cowfs.cache.l2 import pack
    from cowfs.chunks import codec

    benchlib.log("micro: in-process ChunkCache, 4 KiB reads")
    l1_bytes = 256 << 20
    n_chunks = l1_bytes // (CHUNK + 512)  # what fits with the per-entry overhead
    text = source_text(8 << 20)
    chunks = []
    for i in range(n_chunks):  # distinct chunks (distinct hashes) from rotated real text
        off = (i * 4099) % (len(text) - CHUNK)
        chunks.append(text[off : off + CHUNK - 8] + i.to_bytes(8, "little"))
    hashes = [codec.chunk_hash(c) for c in chunks]
    rnd = random.Random(5)

    def timed(cache: ChunkCache, pool: list[bytes]) -> list[int]:
        out = []
        read, clock = cache.read, time.perf_counter_ns
        for _ in range(samples):
            h = pool[rnd.randrange(len(pool))]
            a = rnd.randrange(CHUNK // PAGE) * PAGE
            t0 = clock()
            read(h, a, a + PAGE)
            out.append(clock() - t0)
        return out

    c1 = ChunkCache(l1_bytes, 0)
    for h, c in zip(hashes, chunks):
        c1.put(h, c)
    assert c1.l1.evictions == 0 and len(c1.l1) == n_chunks
    l1 = dist(timed(c1, hashes))
    show(f"L1 hit ({len(c1.l1)} chunks)", l1)
    del c1

    l2_pool = hashes[:2048]
    c2 = ChunkCache(1 << 20, 256 << 20)
    for h, c in zip(l2_pool, chunks):  # read again while in L1: reused, so evicted into L2
        c2.put(h, c)
        c2.read(h, 0, PAGE)
    packed = [p for p in map(c2.l2.peek, l2_pool) if p is not None]
    l2_pool = [h for h in l2_pool if h in c2.l2]
    ratio = sum(p.size for p in packed) / sum(p.nbytes() for p in packed)
    zratio = sum(len(c) for c in chunks[:256]) / sum(len(codec.encode_chunk(c, 3)) for c in chunks[:256])
    l2 = dist(timed(c2, l2_pool))
    show("L2 hit (page decode)", l2)
    benchlib.log(f"  L2 ratio {ratio:.2f}x (4 KiB lz4 pages) vs {zratio:.2f}x (stored 64 KiB zstd frames)")
    frames = [codec.encode_chunk(c, 3) for c in chunks[:256]]
    zs = []
    for _ in range(min(samples, 3000)):
        f = frames[rnd.randrange(len(frames))]
        t0 = time.perf_counter_ns()
        codec.decode_chunk(f)
        zs.append(time.perf_counter_ns() - t0)
    zd = dist(zs)
    show("(decode a stored zstd chunk)", zd)
    return {"l1_hit_ns": l1, "l2_hit_ns": l2, "l2_ratio": round(ratio, 3), "stored_zstd_ratio": round(zratio, 3),
            "zstd_chunk_decode_ns": zd}


# -- pread through the mount --------------------------------------------------------------------
def pread_part(base: str, samples: int) -> dict[str, object]:
    benchlib.log("pread: 4 KiB O_DIRECT preads through the mount")
    size = 32 << 20
    text = source_text(size)
    out: dict[str, object] = {}
    modes = [("l1_hit", []), ("l2_hit", ["cache_l1=1M"]), ("store_read", ["cache_l1=1M", "cache_l2=0"])]
    t = benchlib.CowfsTarget(os.path.join(base, "pread"))
    t.setup()
    try:
        for name, opts in modes:
            t.mount_opts = opts + ["prefetch=0"]
            t.mount()
            path = os.path.join(t.path, "f")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(text)
                t.unmount()
                t.mount()
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, PAGE)
            rnd = random.Random(7)
            for off in range(0, size, CHUNK):  # use every chunk twice: L1 holds it, or L2 once evicted
                os.preadv(fd, [buf], off)
                os.preadv(fd, [buf], off + PAGE)
            ns = []
            for _ in range(samples):
                off = rnd.randrange(size // PAGE) * PAGE
                t0 = time.perf_counter_ns()
                os.preadv(fd, [buf], off)
                ns.append(time.perf_counter_ns() - t0)
            os.close(fd)
            st = t.stats() or {}
            c = st.get("cache", {})
            d = dist(ns)
            show(f"{name} {','.join(opts) or 'defaults'}", d)
            benchlib.log(f"    L1 hits {c.get('l1', {}).get('hits')} misses {c.get('l1', {}).get('misses')}; "
                         f"L2 hits {c.get('l2', {}).get('hits')} misses {c.get('l2', {}).get('misses')}")
            out[name + "_ns"] = d
            t.unmount()
    finally:
        t.teardown()
    return out


# -- bounded memory ---------------------------------------------------------------------------
class RssSampler:
    """Peak VmRSS of the daemon, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, benchlib.proc_status_kb(self.pid, "VmRSS") or 0)
            time.sleep(0.05)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join(5)


def memory_part(base: str, stream_gib: int, walk_files: int) -> dict[str, object]:
    """Daemon RSS against the configured cache sizes during a streaming read and a tree walk."""
    l1, l2 = 64 << 20, 64 << 20
    benchlib.log(f"memory: cache_l1=64M,cache_l2=64M; {stream_gib} GiB streaming read, {walk_files}-file walk")
    t = benchlib.CowfsTarget(os.path.join(base, "memory"))
    t.setup()
    out: dict[str, object] = {"cache_bytes": l1 + l2}
    try:
        t.mount_opts = ["cache_l1=64M", "cache_l2=64M"]
        t.mount()
        big = os.path.join(t.path, "big")
        benchlib.run(["dd", "if=/dev/urandom", f"of={big}", "bs=4M", f"count={stream_gib * 256}"], timeout=1800)
        per_dir = 1000
        os.makedirs(os.path.join(t.path, "tree", "d0"))
        for i in range(per_dir):
            with open(os.path.join(t.path, "tree", "d0", f"f{i}"), "wb") as f:
                f.write(b"%d\n" % i * 50)
        for d in range(1, walk_files // per_dir):  # O(1) clones: the same files under new inodes
            with open(os.path.join(t.path, ".cowfs", "ctl"), "wb", buffering=0) as f:
                f.write(f"clone tree/d0 tree/d{d}\n".encode())
        t.unmount()
        t.mount()
        base_rss = benchlib.proc_status_kb(t.pid, "VmRSS") or 0
        with RssSampler(t.pid) as s:
            t0 = time.perf_counter()
            benchlib.run(["dd", f"if={big}", "of=/dev/null", "bs=1M"], timeout=1800)
            stream_s = time.perf_counter() - t0
        stream_peak = s.peak
        with RssSampler(t.pid) as s:
            t0 = time.perf_counter()
            n = 0
            for root, _dirs, files in os.walk(os.path.join(t.path, "tree")):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        f.read()
                    n += 1
            walk_s = time.perf_counter() - t0
        walk_peak = s.peak
        st = t.stats() or {}
        c = st.get("cache", {})
        out.update({"baseline_rss_kb": base_rss, "stream_peak_rss_kb": stream_peak, "stream_s": round(stream_s, 2),
                    "walk_files": n, "walk_peak_rss_kb": walk_peak, "walk_s": round(walk_s, 2),
                    "l1_bytes": c.get("l1", {}).get("bytes"), "l2_bytes": c.get("l2", {}).get("bytes")})
        for what, peak in (("stream", stream_peak), ("walk", walk_peak)):
            over = peak * 1024 - (l1 + l2)
            benchlib.log(f"  {what}: peak RSS {peak / 1024:.0f} MiB = caches {(l1 + l2) >> 20} MiB + {over / 2**20:.0f} MiB "
                         f"(RSS right after mount: {base_rss / 1024:.0f} MiB)")
        benchlib.log(f"  stream {stream_gib} GiB in {stream_s:.1f} s; walk of {n} files in {walk_s:.1f} s")
        t.unmount()
    finally:
        t.teardown()
    return out


# -- cold-start replay --------------------------------------------------------------------------
class Replay:
    def __init__(self, base: str) -> None:
        self.base = base
        self.target = benchlib.CowfsTarget(os.path.join(base, "replay"))
        self.local = os.path.join(base, "local")
        self.script = os.path.join(base, "imp.py")

    def tree(self, root: str) -> str:
        return os.path.join(root, "Django-5.1.4")

    def workload(self, root: str) -> float:
        env = dict(os.environ, PYTHONPATH=f"{self.tree(root)}:{os.path.join(root, 'site')}")
        t0 = time.perf_counter()
        benchlib.run([sys.executable, self.script], env=env, timeout=300)
        benchlib.run(["git", "-c", "safe.directory=*", "-C", self.tree(root), "status", "--porcelain"], timeout=300)
        return time.perf_counter() - t0

    def setup(self) -> None:
        benchlib.log("replay: setting up Django 5.1.4 (+ asgiref, sqlparse, a git repo) in the mount")
        self.target.setup()
        with open(self.script, "w") as f:
            f.write(IMPORT_SCRIPT)
        os.makedirs(self.local, exist_ok=True)
        benchlib.run(["tar", "xf", django_tar(), "--no-same-owner", "-C", self.local], timeout=600)
        benchlib.run([sys.executable, "-m", "pip", "install", "-q", "--target", os.path.join(self.local, "site"),
                      "asgiref", "sqlparse"], timeout=600)
        git = ["git", "-c", "safe.directory=*", "-C", self.tree(self.local)]
        benchlib.run(git + ["init", "-q"], timeout=60)
        benchlib.run(git + ["add", "-A"], timeout=600)
        benchlib.run(git + ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "tree"], timeout=600)
        self.workload(self.local)  # compiles .pyc files and refreshes the git index
        t = self.target
        t.mount_opts = ["prefetch=0", "prefetch_learn=0"]
        t.mount()
        benchlib.run(["cp", "-a", os.path.join(self.local, "Django-5.1.4"), os.path.join(self.local, "site"),
                      t.path], timeout=900)
        self.workload(t.path)  # git refreshes its index stat data for the new inodes
        t.unmount()

    def run(self, opts: list[str], warm_store: bool = False) -> tuple[float, dict]:
        """One timed workload after a remount and a drop of the kernel's caches; warm_store reads
        the store's files back into the OS page cache first (a bound: no store read waits for
        the disk, which is all that prefetch can hide)."""
        t = self.target
        t.mount_opts = opts
        t.mount()
        benchlib.drop_caches()
        if warm_store:
            benchlib.run(f"cat {t.store}/db/* > /dev/null", shell=True, timeout=300)
        self.workload(self.local)  # Python's and git's own files back in the page cache
        secs = self.workload(t.path)
        st = t.stats() or {}
        t.unmount()
        return secs, {**st.get("cache", {}), "warm": st.get("warm", {})}


def replay_part(base: str, rounds: int) -> dict[str, object]:
    r = Replay(base)
    try:
        r.setup()
        secs, c = r.run(["prefetch=1", "prefetch_learn=1"])
        benchlib.log(f"  learning run: {secs:.2f} s")
        on, off, chunks_only, bound, stats, warm = [], [], [], [], [], []
        for i in range(rounds):
            order = [True, False] if i % 2 == 0 else [False, True]
            for pf in order:
                secs, c = r.run(["prefetch=1", "prefetch_learn=0"] if pf else ["prefetch=0"])
                (on if pf else off).append(secs)
                if pf:
                    stats.append(c["prefetch"])
                    warm.append(c["warm"])
                benchlib.log(f"  round {i + 1} prefetch {'on ' if pf else 'off'}: {secs:.2f} s"
                             + (f"  {json.dumps(c['prefetch'])}  warm {json.dumps(c['warm'])}" if pf else ""))
            chunks_only.append(r.run(["prefetch=1", "prefetch_learn=0", "warm=0"])[0])
            benchlib.log(f"  round {i + 1} prefetch on, no cold-start warming (warm=0): {chunks_only[-1]:.2f} s")
            bound.append(r.run(["prefetch=0"], warm_store=True)[0])
            benchlib.log(f"  round {i + 1} prefetch off, store files in the page cache: {bound[-1]:.2f} s")
    finally:
        r.target.teardown()
    ra = [sum(s["readahead"][k] for s in stats) for k in ("prefetched", "used", "served_reads")]
    le = [sum(s["learned"][k] for s in stats) for k in ("prefetched", "used", "served_reads")]
    reads = sum(s["chunk_reads"] for s in stats)
    pre = ra[0] + le[0]
    res = {
        "on_s": on, "off_s": off, "chunks_only_s": chunks_only, "store_warm_s": bound,
        "warm": {k: sum(w.get(k, 0) for w in warm) for k in ("dirs_warmed", "dirs_used", "dirs_listed")},
        "chunks_only_speedup": round(statistics.median(off) / statistics.median(chunks_only), 3),
        "speedup_bound": round(statistics.median(off) / statistics.median(bound), 3),
        "readahead": {"prefetched": ra[0], "used": ra[1], "served_reads": ra[2],
                      "precision": round(ra[1] / ra[0], 4) if ra[0] else None,
                      "recall": round(ra[2] / reads, 4) if reads else None},
        "learned": {"prefetched": le[0], "used": le[1], "served_reads": le[2],
                    "precision": round(le[1] / le[0], 4) if le[0] else None,
                    "recall": round(le[2] / reads, 4) if reads else None},
        "chunk_reads": reads,
        "prefetch_precision": round((ra[1] + le[1]) / pre, 4) if pre else 0.0,
        "prefetch_recall": round((ra[2] + le[2]) / reads, 4) if reads else 0.0,
        "cold_replay_speedup": round(statistics.median(off) / statistics.median(on), 3),
    }
    benchlib.log(f"  readahead: {res['readahead']}")
    benchlib.log(f"  learned:   {res['learned']}")
    w = res["warm"]
    benchlib.log(f"  cold-start warming: {w['dirs_warmed']} directories listed ahead, {w['dirs_used']} of them "
                 f"listed by the workload afterwards, of {w['dirs_listed']} it listed; "
                 f"chunk prefetch alone (warm=0): {res['chunks_only_speedup']}x")
    benchlib.log(f"  precision {res['prefetch_precision']}  recall {res['prefetch_recall']}  "
                 f"median on {statistics.median(on):.2f} s  off {statistics.median(off):.2f} s  "
                 f"speedup {res['cold_replay_speedup']}x")
    benchlib.log(f"  bound: with the store's files in the page cache (no disk wait at all) "
                 f"{statistics.median(bound):.2f} s: {res['speedup_bound']}x")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--base", default="/var/tmp/cowfs-bench-cache")
    ap.add_argument("--parts", default="micro,pread,memory,replay")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if os.path.exists(args.base):
        shutil.rmtree(args.base)
    os.makedirs(args.base)
    res: dict[str, object] = {"quick": args.quick}
    try:
        if "micro" in parts:
            res["micro"] = micro(20_000 if args.quick else 200_000)
        if "pread" in parts:
            res["pread"] = pread_part(args.base, 2_000 if args.quick else 20_000)
        if "memory" in parts:
            res["memory"] = memory_part(args.base, 1 if args.quick else 4, 20_000 if args.quick else 100_000)
        if "replay" in parts:
            res["replay"] = replay_part(args.base, 3 if args.quick else 5)
    finally:
        shutil.rmtree(args.base, ignore_errors=True)
    m, rp = res.get("micro", {}), res.get("replay", {})
    summary = {
        "l1_hit_median_ns": m["l1_hit_ns"]["p50"] if m else None,  # type: ignore[index]
        "l2_hit_median_ns": m["l2_hit_ns"]["p50"] if m else None,  # type: ignore[index]
        "prefetch_precision": rp.get("prefetch_precision") if rp else None,  # type: ignore[union-attr]
        "prefetch_recall": rp.get("prefetch_recall") if rp else None,  # type: ignore[union-attr]
        "cold_replay_speedup": rp.get("cold_replay_speedup") if rp else None,  # type: ignore[union-attr]
    }
    goals = [("L1 hit median < 1 µs", summary["l1_hit_median_ns"], lambda v: v < 1000),
             ("L2 hit median < 10 µs", summary["l2_hit_median_ns"], lambda v: v < 10_000),
             ("prefetch precision >= 0.75", summary["prefetch_precision"], lambda v: v >= 0.75),
             ("prefetch recall >= 0.5", summary["prefetch_recall"], lambda v: v >= 0.5),
             ("cold replay >= 1.3x faster", summary["cold_replay_speedup"], lambda v: v >= 1.3)]
    for name, v, ok in goals:
        if v is not None:
            benchlib.log(f"{'PASS' if ok(v) else 'MISS'}  {name}: {v}")
    if args.json:
        print(json.dumps({**summary, "details": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
