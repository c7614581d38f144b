#!/usr/bin/env python3
"""Core filesystem benchmark: a plain directory, fuse-overlayfs, a bare pyfuse3 passthrough and cowfs,
side by side, in one run on one machine.

    sudo .venv/bin/python scripts/bench_core.py            # full run (~15 min)
    sudo .venv/bin/python scripts/bench_core.py --quick    # ~2-3 min
    ... --targets plain,overlay,passthrough                # without cowfs
    ... --json                                             # one JSON object as the last line
    ... --baseline-cowfs /other/checkout/.venv/bin/cowfs   # also target cowfs_base: that build, same run

Needs root (drop_caches, mounts), /dev/fuse, fuse3, fuse-overlayfs, git, tar, grep.

Workloads (sizes scale with flags; --quick picks small ones). Every figure is the median of its rounds
(--seq-rounds for the sequential/random I/O workloads, --rounds for files/tree/git); rounds interleave the
targets, in an order that rotates from round to round:
  seq write    write SIZE of incompressible data (os.urandom once, the same bytes for every target)
               in 1 MiB writes, then fsync                                            -> MiB/s
  write amp    bytes written to the block device holding the work directory, from the start of the
               write until the data is on disk (fsync, unmount, sync), divided by SIZE: the delta of
               sectors written in /sys/dev/block/MAJ:MIN/stat. It includes the store's own files
               (RocksDB WAL, SSTs, compaction), the ext4 journal and metadata. By default the work
               directory is an ext4 on a loop device (direct I/O) backed by a sparse file on the root
               disk (--loop-gib), so the counter sees this benchmark only; with --loop-gib 0 the root
               disk's counter is used, which also counts whatever else writes to that disk.
  cold read    unmount + remount + drop_caches, read the file sequentially, 1 MiB reads -> MiB/s
               (every byte is compared with what was written)
  warm read    read it again right away                                               -> MiB/s
  rand read    unmount + remount + drop_caches, 4 KiB preads at seeded random offsets -> IOPS, p50, p99
               (`--workloads randread`: this one alone, after an untimed write of the file)
  rand write   4 KiB pwrite + fsync at seeded random offsets of the same file         -> IOPS, p50, p99
               (`--workloads randwrite`: this one alone, after an untimed write of the file
               and a remount with dropped caches, as in seq where it follows the cold reads)
  files        create (open O_CREAT|O_EXCL + close), stat, unlink N empty files in one directory;
               each phase timed; median of ROUNDS                                     -> s
  tree         untar the Django sdist (pre-decompressed .tar), `grep -r` a string that does not occur
               (reads every file), `rm -rf`; each phase timed; median of ROUNDS        -> s
  git          untar (untimed), `git init -q && git add -A && git commit -q -m x`; median -> s

FUSE requests per operation: "daemon" counts come from the filesystem itself (cowfs: `cowfs stats
--json`'s "requests", minus the requests the stats call itself causes; passthrough: its --counters
dump on SIGUSR1). "kernel" counts come from the fuse:fuse_request_send tracepoint filtered on the
mount's connection (works for fuse-overlayfs too; n/a where tracefs or the tracepoint is missing).
An operation is: a MiB for sequential I/O, an I/O for random I/O, a file for `files`, a tar entry
(file or directory) for `tree` and `git`. For cowfs and passthrough the daemon's peak resident memory
(VmHWM, max over the daemon processes of the run) is printed too.

Ratios are the figure divided by the same figure on the plain directory / on fuse-overlayfs in the same
run: for times lower is better, for MiB/s and IOPS higher is better. Goals compare cowfs with
fuse-overlayfs and print PASS/MISS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

MiB = 1 << 20
GREP_PATTERN = "cowfs-bench-no-such-string-4242"

# key: (workload, metric, unit, better, what one "op" is)
METRICS = {
    "seq_write": ("seq write+fsync", "throughput", "MiB/s", "higher", "MiB"),
    "write_amp": ("seq write+fsync", "write amplification", "x", "lower", None),
    "seq_read_cold": ("seq read, cold", "throughput", "MiB/s", "higher", "MiB"),
    "seq_read_warm": ("seq re-read, warm", "throughput", "MiB/s", "higher", "MiB"),
    "rand_read": ("4 KiB random read, cold", "IOPS", "IOPS", "higher", "I/O"),
    "rand_read_p50": ("4 KiB random read, cold", "p50 latency", "us", "lower", None),
    "rand_read_p99": ("4 KiB random read, cold", "p99 latency", "us", "lower", None),
    "rand_write": ("4 KiB random write+fsync", "IOPS", "IOPS", "higher", "I/O"),
    "rand_write_p50": ("4 KiB random write+fsync", "p50 latency", "us", "lower", None),
    "rand_write_p99": ("4 KiB random write+fsync", "p99 latency", "us", "lower", None),
    "files_create": ("files", "create", "s", "lower", "file"),
    "files_stat": ("files", "stat", "s", "lower", "file"),
    "files_unlink": ("files", "unlink", "s", "lower", "file"),
    "files_total": ("files", "create+stat+unlink", "s", "lower", "file"),
    "tree_untar": ("Django tree", "untar", "s", "lower", "entry"),
    "tree_grep": ("Django tree", "grep -r", "s", "lower", "entry"),
    "tree_rm": ("Django tree", "rm -rf", "s", "lower", "entry"),
    "tree_total": ("Django tree", "untar+grep+rm", "s", "lower", "entry"),
    "git": ("Django tree", "git init+add+commit", "s", "lower", "entry"),
    "peak_rss": ("daemon", "peak RSS (VmHWM)", "MiB", "lower", None),
}

# (metric, comparison, threshold): cowfs / fuse-overlayfs
GOALS = [
    ("files_total", "<=", 1.0),
    ("tree_total", "<=", 1.0),
    ("git", "<=", 1.0),
    ("seq_write", ">=", 0.7),
    ("seq_read_cold", ">=", 0.8),
]

def workloads_of(metric: str) -> tuple[str, ...]:
    """The workloads (as named in --workloads) that measure a metric."""
    if metric.startswith("rand_read"):
        return ("seq", "randread")
    if metric.startswith("rand_write"):
        return ("seq", "randwrite")
    return ("seq",) if metric.startswith(("seq_", "write_amp", "rand_")) else (metric.split("_")[0],)


def write_file(fn: str, data: memoryview) -> None:
    """data written to fn in 1 MiB write()s, then fsync."""
    fd = os.open(fn, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(data):
            off += os.write(fd, data[off:off + MiB])
        os.fsync(fd)
    finally:
        os.close(fd)


TARGET_LABEL = {"plain": "plain dir", "overlay": "fuse-overlayfs", "passthrough": "passthrough",
                "cowfs": "cowfs", "cowfs_base": "cowfs (baseline)"}


# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, targets, tracer, disk):
        self.args = args
        self.targets = targets
        self.tracer = tracer
        self.disk = disk
        self.overhead: dict[str, Counter] = {}
        # results[metric][target] = list of per-round records
        self.results: dict[str, dict[str, list[dict]]] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.notes: list[str] = []

    # -- measurement ------------------------------------------------------------------------
    def calibrate(self, t: bl.Target) -> None:
        """Requests caused by reading the daemon's counters themselves (cowfs stats may go through
        the mount); subtracted from every phase."""
        if not t.fuse:
            return
        a = t.daemon_requests()
        b = t.daemon_requests()
        c = t.daemon_requests()
        if a is None or c is None:
            self.overhead[t.name] = Counter()
            return
        self.overhead[t.name] = bl.counter_delta(c, b) or Counter()

    def record(self, metric, t, value, **extra) -> dict:
        rec = {"value": value, **extra}
        self.results.setdefault(metric, {}).setdefault(t.name, []).append(rec)
        return rec

    class Phase:
        def __init__(self, bench, t, metric, ops):
            self.b, self.t, self.metric, self.ops = bench, t, metric, ops

        def __enter__(self):
            t = self.t
            self.d0 = t.daemon_requests() if t.fuse else None
            if t.fuse and self.b.tracer:
                self.b.tracer.start(t.path)
            self.cpu0 = bl.proc_cpu_s(t.pid)
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, et, ev, tb):
            self.elapsed = time.perf_counter() - self.t0
            t = self.t
            cpu1 = bl.proc_cpu_s(t.pid)
            k = self.b.tracer.stop() if (t.fuse and self.b.tracer) else None
            if et is not None:
                return False
            d1 = t.daemon_requests() if t.fuse else None
            self.info = {
                "ops": self.ops,
                "daemon_req": dict(bl.counter_delta(d1, self.d0, self.b.overhead.get(t.name)) or {})
                if d1 is not None and self.d0 is not None else None,
                "kernel_req": dict(k[0]) if k else None,
                "kernel_complete": k[1] if k else None,
                "daemon_cpu_s": round(cpu1 - self.cpu0, 3) if cpu1 is not None and self.cpu0 is not None
                else None,
            }
            return False

    def phase(self, t, metric, ops):
        return Bench.Phase(self, t, metric, ops)

    def guarded(self, t, what, fn, *a):
        """Run one workload on one target. A hang is cut short by a watchdog that aborts the FUSE
        connection after --hang-timeout s; an error is recorded, the target is unmounted and mounted
        afresh, and the run goes on."""
        fired = threading.Event()
        done = threading.Event()

        def watchdog():
            if not done.wait(self.args.hang_timeout) and t.fuse:
                fired.set()
                bl.log(f"!! {what} on {t.name}: no progress after {self.args.hang_timeout} s; "
                       f"aborting the FUSE connection of {t.mp}")
                bl.abort_fuse(t.mp)

        wd = threading.Thread(target=watchdog, daemon=True)
        wd.start()
        try:
            fn(t, *a)
            return True
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).strip()[:600]}"
            if fired.is_set():
                msg = f"hung for {self.args.hang_timeout} s, FUSE connection aborted; then {msg}"
            self.errors[(what, t.name)] = msg
            bl.log(f"!! {what} on {t.name} failed: {msg}")
            if self.args.verbose:
                traceback.print_exc()
            if t.fuse:
                try:
                    t.teardown()
                    t.mount()
                    self.calibrate(t)
                except Exception as e2:  # noqa: BLE001
                    bl.log(f"!! remounting {t.name} failed: {e2}")
            return False
        finally:
            done.set()
            wd.join()

    # -- workloads --------------------------------------------------------------------------
    def seq_and_random(self, t: bl.Target, data: bytes) -> None:
        a = self.args
        size = len(data)
        mv = memoryview(data)
        fn = os.path.join(t.path, "seq.bin")
        bl.log(f"[{t.name}] seq write {size // MiB} MiB")
        disk0 = self.disk.bytes_written()
        with self.phase(t, "seq_write", size / MiB) as ph:
            write_file(fn, mv)
        self.record("seq_write", t, size / MiB / ph.elapsed, seconds=ph.elapsed, **ph.info)
        t0 = time.perf_counter()
        t.settle()
        settle_s = time.perf_counter() - t0
        disk1 = self.disk.bytes_written()
        if disk0 is not None:
            self.record("write_amp", t, (disk1 - disk0) / size, disk_bytes=disk1 - disk0,
                        settle_s=round(settle_s, 2))
        bl.drop_caches()
        t.mount()
        fn = os.path.join(t.path, "seq.bin")

        buf = bytearray(MiB)
        bv = memoryview(buf)
        for metric in ("seq_read_cold", "seq_read_warm"):
            bl.log(f"[{t.name}] {metric}")
            with self.phase(t, metric, size / MiB) as ph:
                fd = os.open(fn, os.O_RDONLY)
                bad = None
                try:
                    off = 0
                    while True:
                        n = os.readv(fd, [bv])
                        if n == 0:
                            break
                        if bad is None and bv[:n] != mv[off:off + n]:
                            bad = off
                        off += n
                finally:
                    os.close(fd)
            if off != size or bad is not None:
                raise RuntimeError(f"read back {off} bytes of {size}, first mismatch at {bad}")
            self.record(metric, t, size / MiB / ph.elapsed, seconds=ph.elapsed, **ph.info)

        self._random_reads(t, size)
        self._random_writes(t, mv)
        os.unlink(os.path.join(t.path, "seq.bin"))
        t.record_rss()

    def random_reads_only(self, t: bl.Target, data: bytes) -> None:
        """The "randread" workload: the file written (not timed), then `_random_reads`."""
        fn = os.path.join(t.path, "seq.bin")
        bl.log(f"[{t.name}] write {len(data) // MiB} MiB (not timed)")
        write_file(fn, memoryview(data))
        self._random_reads(t, len(data))
        os.unlink(os.path.join(t.path, "seq.bin"))
        t.record_rss()

    def random_writes_only(self, t: bl.Target, data: bytes) -> None:
        """The "randwrite" workload: the file written and the mount made cold (not timed),
        then `_random_writes`, so the store holds the file as seq leaves it before them."""
        fn = os.path.join(t.path, "seq.bin")
        bl.log(f"[{t.name}] write {len(data) // MiB} MiB (not timed)")
        write_file(fn, memoryview(data))
        t.cold()
        self._random_writes(t, memoryview(data))
        os.unlink(os.path.join(t.path, "seq.bin"))
        t.record_rss()

    def _random_writes(self, t: bl.Target, mv: memoryview) -> None:
        """4 KiB pwrite + fsync at seeded random offsets of seq.bin."""
        fn = os.path.join(t.path, "seq.bin")
        offs = bl.random_offsets(len(mv), self.args.rand_writes, seed=43)
        bl.log(f"[{t.name}] random write+fsync x{len(offs)}")
        fd = os.open(fn, os.O_RDWR)
        try:
            with self.phase(t, "rand_write", len(offs)) as ph:
                lat = bl.timed_pwrites_fsync(fd, offs, mv)
        finally:
            os.close(fd)
        self._record_lat("rand_write", t, lat, ph)

    def _random_reads(self, t: bl.Target, size: int) -> None:
        """4 KiB random reads of seq.bin, cold-ish: fresh mount, empty page cache."""
        t.cold()
        fn = os.path.join(t.path, "seq.bin")
        offs = bl.random_offsets(size, self.args.rand_reads, seed=42)
        bl.log(f"[{t.name}] random read x{len(offs)}")
        fd = os.open(fn, os.O_RDONLY)
        try:
            with self.phase(t, "rand_read", len(offs)) as ph:
                lat = bl.timed_preads(fd, offs)
        finally:
            os.close(fd)
        self._record_lat("rand_read", t, lat, ph)

    def _record_lat(self, metric, t, lat_ns, ph):
        self.record(metric, t, len(lat_ns) / ph.elapsed, seconds=ph.elapsed, **ph.info)
        self.record(metric + "_p50", t, bl.percentile_us(lat_ns, 0.5))
        self.record(metric + "_p99", t, bl.percentile_us(lat_ns, 0.99))

    def files(self, t: bl.Target, rnd: int) -> None:
        n = self.args.files
        d = os.path.join(t.path, f"files{rnd}")
        os.mkdir(d)
        names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
        bl.log(f"[{t.name}] files x{n} round {rnd}")
        recs = {}
        with self.phase(t, "files_create", n) as ph:
            for p in names:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        recs["files_create"] = ph
        with self.phase(t, "files_stat", n) as ph:
            for p in names:
                os.stat(p)
        recs["files_stat"] = ph
        with self.phase(t, "files_unlink", n) as ph:
            for p in names:
                os.unlink(p)
        recs["files_unlink"] = ph
        os.rmdir(d)
        self._record_phases(t, recs, "files_total", n)
        t.record_rss()

    def _record_phases(self, t, phases: dict, total_metric: str, ops: int) -> None:
        total = 0.0
        dreq, kreq, cpu = Counter(), Counter(), 0.0
        have_d = have_k = have_cpu = True
        complete = True
        for metric, ph in phases.items():
            self.record(metric, t, ph.elapsed, **ph.info)
            total += ph.elapsed
            if ph.info["daemon_req"] is None:
                have_d = False
            else:
                dreq.update(ph.info["daemon_req"])
            if ph.info["kernel_req"] is None:
                have_k = False
            else:
                kreq.update(ph.info["kernel_req"])
                complete = complete and ph.info["kernel_complete"]
            if ph.info["daemon_cpu_s"] is None:
                have_cpu = False
            else:
                cpu += ph.info["daemon_cpu_s"]
        self.record(total_metric, t, total, ops=ops, daemon_req=dict(dreq) if have_d else None,
                    kernel_req=dict(kreq) if have_k else None, kernel_complete=complete if have_k else None,
                    daemon_cpu_s=round(cpu, 3) if have_cpu else None)

    def tree(self, t: bl.Target, rnd: int, tar: str, entries: int) -> None:
        d = os.path.join(t.path, f"tree{rnd}")
        os.mkdir(d)
        bl.log(f"[{t.name}] untar/grep/rm round {rnd}")
        recs = {}
        to = self.args.cmd_timeout
        with self.phase(t, "tree_untar", entries) as ph:
            bl.run(["tar", "xf", tar, "-C", d], timeout=to)
        recs["tree_untar"] = ph
        with self.phase(t, "tree_grep", entries) as ph:
            bl.run(["grep", "-r", "-l", GREP_PATTERN, d], timeout=to, ok_codes=(1,))
        recs["tree_grep"] = ph
        with self.phase(t, "tree_rm", entries) as ph:
            bl.run(["rm", "-rf", d], timeout=to)
        recs["tree_rm"] = ph
        if os.path.exists(d):
            raise RuntimeError(f"{d} still exists after rm -rf")
        self._record_phases(t, recs, "tree_total", entries)
        t.record_rss()

    def git(self, t: bl.Target, rnd: int, tar: str, entries: int, env: dict) -> None:
        d = os.path.join(t.path, f"git{rnd}")
        os.mkdir(d)
        to = self.args.cmd_timeout
        bl.log(f"[{t.name}] git round {rnd}")
        bl.run(["tar", "xf", tar, "-C", d], timeout=to)
        with self.phase(t, "git", entries) as ph:
            bl.run(["sh", "-c", "git init -q && git add -A && git commit -q -m x"], cwd=d, env=env,
                   timeout=to)
        self.record("git", t, ph.elapsed, **ph.info)
        bl.run(["rm", "-rf", d], timeout=to)
        t.record_rss()


# ---------------------------------------------------------------------------------------------
# setup helpers

def fmt_num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def summarize(bench: Bench, target_names: list[str]) -> dict:
    """metric -> target -> summary (median over rounds; counts from the median round)."""
    out = {}
    for metric, per_t in bench.results.items():
        for tn, recs in per_t.items():
            vals = [r["value"] for r in recs]
            med = statistics.median(vals)
            rep = min(recs, key=lambda r: abs(r["value"] - med))
            s = {"value": med, "rounds": vals}
            for k in ("ops", "daemon_req", "kernel_req", "kernel_complete", "daemon_cpu_s", "disk_bytes"):
                if k in rep:
                    s[k] = rep[k]
            out.setdefault(metric, {})[tn] = s
    for t in bench.targets:
        if t.peak_rss_kb:
            out.setdefault("peak_rss", {})[t.name] = {"value": t.peak_rss_kb / 1024, "rounds": []}
    return out


def per_op(req: dict | None, ops) -> float | None:
    if req is None or not ops:
        return None
    return sum(req.values()) / ops


def top_ops(req: dict | None, ops, n=4) -> str:
    if not req or not ops:
        return ""
    items = sorted(req.items(), key=lambda kv: -kv[1])[:n]
    return " ".join(f"{k} {v / ops:.2g}" for k, v in items)


def render(summary: dict, bench: Bench, target_names: list[str]) -> tuple[str, list[dict]]:
    lines = []
    hdr = ("| workload | metric | target | value | unit | rounds min–max | × plain | × fuse-overlayfs "
           "| req/op daemon | req/op kernel | top requests per op | daemon CPU s |")
    lines.append(hdr)
    lines.append("|" + "|".join(["---"] * 12) + "|")
    for metric, (wl, mname, unit, better, opname) in METRICS.items():
        per_t = summary.get(metric, {})
        if not per_t and not any((metric, tn) in bench.errors for tn in target_names):
            continue
        base = per_t.get("plain", {}).get("value")
        ovl = per_t.get("overlay", {}).get("value")
        for tn in target_names:
            s = per_t.get(tn)
            err = next((bench.errors[w, tn] for w in workloads_of(metric) if (w, tn) in bench.errors), None)
            if s is None:
                if metric == "peak_rss" and tn in ("plain",):
                    continue
                if metric == "peak_rss" and tn == "overlay":
                    continue
                val = "ERROR" if err else "n/a"
                lines.append(f"| {wl} | {mname} | {TARGET_LABEL[tn]} | {val} | {unit} | | | | | | | |")
                continue
            v = s["value"]
            rp = f"{v / base:.2f}" if base else ""
            ro = f"{v / ovl:.2f}" if ovl else ""
            ops = s.get("ops")
            dq = per_op(s.get("daemon_req"), ops)
            kq = per_op(s.get("kernel_req"), ops)
            fuse = tn != "plain"
            dq_s = (fmt_num(dq) if dq is not None else ("n/a" if fuse and tn != "overlay" else "")) if opname else ""
            kq_s = (fmt_num(kq) + ("" if s.get("kernel_complete", True) else " (lost events)")
                    if kq is not None else ("n/a" if fuse else "")) if opname else ""
            top = top_ops(s.get("daemon_req") or s.get("kernel_req"), ops) if opname and fuse else ""
            cpu = s.get("daemon_cpu_s")
            rounds = s.get("rounds") or []
            spread = f"{fmt_num(min(rounds))}–{fmt_num(max(rounds))}" if len(rounds) > 1 else ""
            lines.append(f"| {wl} | {mname} | {TARGET_LABEL[tn]} | {fmt_num(v)} | {unit} | {spread} | {rp} | {ro} | "
                         f"{dq_s} | {kq_s} | {top} | {fmt_num(cpu) if cpu is not None else ''} |")
    goals = []
    for metric, cmp, thr in GOALS:
        per_t = summary.get(metric, {})
        c = per_t.get("cowfs", {}).get("value")
        o = per_t.get("overlay", {}).get("value")
        wl, mname, unit, better, _ = METRICS[metric]
        if c is None or not o:
            status, ratio = "n/a", None
        else:
            ratio = c / o
            ok = ratio <= thr if cmp == "<=" else ratio >= thr
            status = "PASS" if ok else "MISS"
        goals.append({"metric": metric, "what": f"{wl}: {mname} ({unit})", "goal": f"{cmp} {thr}",
                      "ratio": ratio, "status": status})
    return "\n".join(lines), goals


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cowfs core benchmark (see the module docstring)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: --size-mib 512 --files 5000 --rounds 1 --seq-rounds 1 "
                         "--rand-reads 1000 --rand-writes 300 (explicit flags win)")
    ap.add_argument("--size-mib", type=int, help="sequential file size, MiB (1024)")
    ap.add_argument("--files", type=int, help="files for create/stat/unlink (10000)")
    ap.add_argument("--rounds", type=int, help="rounds for files/tree/git, the median is printed (3)")
    ap.add_argument("--seq-rounds", type=int, help="rounds of the sequential + random I/O workload (3)")
    ap.add_argument("--tree-limit", type=int, help="use only the first N entries of the Django tar (all)")
    ap.add_argument("--rand-reads", type=int, help="4 KiB random reads (5000)")
    ap.add_argument("--rand-writes", type=int, help="4 KiB random writes, each followed by fsync (2000)")
    ap.add_argument("--targets", default="plain,overlay,passthrough,cowfs")
    ap.add_argument("--workloads", default="seq,files,tree,git",
                    help="of seq,files,tree,git; or randread / randwrite: only the cold 4 KiB random "
                         "reads / the 4 KiB random write + fsync of seq (the file written, not timed; "
                         "--seq-rounds rounds; ignored with seq)")
    ap.add_argument("--workdir", default="/var/tmp/cowfs-bench",
                    help="scratch directory (removed and recreated); must be on the disk to measure")
    ap.add_argument("--loop-gib", type=int, default=12,
                    help="put the work directory on an ext4 on a loop device (direct I/O) of this many "
                         "GiB, backed by a sparse file next to it on the same disk, so that the "
                         "sectors-written counter sees only this benchmark; 0: use the disk directly")
    ap.add_argument("--cache", default="/var/tmp/cowfs-test-cache", help="where the Django sdist is kept")
    ap.add_argument("--cowfs", default=None, help="cowfs executable (.venv/bin/cowfs)")
    ap.add_argument("--baseline-cowfs", default=None,
                    help="a second cowfs executable (another checkout's venv), benchmarked in the same run as "
                         "target cowfs_base, interleaved with the others: before/after within one run")
    ap.add_argument("-o", "--cowfs-option", action="append", default=[], help="passed to cowfs mount -o")
    ap.add_argument("--cmd-timeout", type=int, default=1200, help="timeout of each tar/grep/rm/git call, s")
    ap.add_argument("--hang-timeout", type=int, default=600,
                    help="abort a FUSE target's connection when one workload round on it takes longer, s")
    ap.add_argument("--no-trace", action="store_true", help="do not count requests with the kernel tracepoint")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)

    quick = dict(size_mib=512, files=5000, rounds=1, seq_rounds=1, tree_limit=None, rand_reads=1000,
                 rand_writes=300)
    full = dict(size_mib=1024, files=10000, rounds=3, seq_rounds=3, tree_limit=None, rand_reads=5000,
                rand_writes=2000)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)

    if os.geteuid() != 0:
        ap.error("needs root (mounts, /proc/sys/vm/drop_caches)")
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    workloads = {w.strip() for w in a.workloads.split(",")}
    notes = []
    if a.baseline_cowfs and "cowfs_base" not in names:
        names.append("cowfs_base")
    for n, exe in (("cowfs", a.cowfs), ("cowfs_base", a.baseline_cowfs)):
        if n in names:
            ok, why = bl.CowfsTarget.available(exe) if n == "cowfs" or exe else (False, "no --baseline-cowfs")
            if not ok:
                notes.append(f"{n} skipped: {why}")
                names.remove(n)

    info = bl.machine_info()
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    cmdline = "scripts/bench_core.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# bench_core: {info['date']}; {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, "
          f"kernel {info['kernel']}, Python {info['python']}")
    print(f"# command: {cmdline.strip()}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"# sizes: seq {a.size_mib} MiB x{a.seq_rounds} rounds, files {a.files}, rounds {a.rounds}, "
          f"rand reads {a.rand_reads}, "
          f"rand writes {a.rand_writes}, Django tree {'first ' + str(a.tree_limit) if a.tree_limit else 'all'} "
          f"entries; targets {','.join(names)}", flush=True)

    if os.path.exists(a.workdir):
        for n in ("plain", "overlay", "passthrough", "cowfs", "cowfs_base"):  # leftovers of an interrupted run
            mp = os.path.join(a.workdir, n, "mnt")
            if bl.is_mounted(mp):
                bl.run(["fusermount3", "-uz", mp], timeout=30, check=False)
        if bl.is_mounted(a.workdir):
            bl.run(["umount", "-l", a.workdir], timeout=60, check=False)
        bl.run(["rm", "-rf", a.workdir], timeout=600)
    os.makedirs(a.workdir)
    loop = None
    if a.loop_gib:
        loop = bl.LoopScratch(a.workdir.rstrip("/") + ".img", a.workdir, a.loop_gib)
        try:
            loop.setup()
        except Exception:
            loop.teardown()
            raise
    disk = bl.DiskCounter(a.workdir)
    if not disk.ok:
        notes.append(f"no block device stat for {a.workdir}: write amplification n/a")
    print(f"# work dir {a.workdir}: " + (f"ext4 on {loop.dev} (loop, direct I/O, {a.loop_gib} GiB sparse "
          f"file on the same disk)" if loop else f"directly on /dev/{disk.name}") +
          f"; write amplification from /sys/block/{disk.name}/stat", flush=True)
    tar, entries = (None, 0)
    if workloads & {"tree", "git"}:
        tar, entries = bl.django_tar(a.cache, a.tree_limit)
    home = os.path.join(a.workdir, "home")
    os.makedirs(home)
    # no background `git gc --auto` (the tree has more loose objects than gc.auto's 6700): it would
    # race the rm -rf and run into the next measurement
    genv = dict(os.environ, HOME=home, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_COUNT="2",
                GIT_CONFIG_KEY_0="gc.auto", GIT_CONFIG_VALUE_0="0",
                GIT_CONFIG_KEY_1="maintenance.auto", GIT_CONFIG_VALUE_1="false", GIT_AUTHOR_NAME="bench",
                GIT_AUTHOR_EMAIL="bench@example.invalid", GIT_COMMITTER_NAME="bench",
                GIT_COMMITTER_EMAIL="bench@example.invalid")

    tracer = None
    if not a.no_trace:
        tracer = bl.FuseTracer()
        if not tracer.available:
            notes.append(f"kernel request counts n/a: {tracer.error}")
            tracer = None

    targets = []
    for n in names:
        kw = {}
        if n in ("cowfs", "cowfs_base"):
            kw = {"cowfs_bin": a.cowfs if n == "cowfs" else a.baseline_cowfs, "mount_opts": a.cowfs_option}
        targets.append(bl.make_target(n, a.workdir, **kw))
    bench = Bench(a, targets, tracer, disk)
    t_start = time.monotonic()
    try:
        for t in targets:
            t.setup()
            t.mount()
            bench.calibrate(t)
        # Rounds interleave the targets, and the order rotates from round to round, so that slow
        # drifts of the machine (other tenants, the disk's cache) do not favour one target.
        def order(rnd):
            k = rnd % len(targets)
            return targets[k:] + targets[:k]

        if workloads & {"seq", "randread", "randwrite"}:
            bl.log(f"generating {a.size_mib} MiB of random data")
            data = os.urandom(a.size_mib * MiB)
            for rnd in range(a.seq_rounds):
                for t in order(rnd):
                    if "seq" in workloads:
                        bench.guarded(t, "seq", bench.seq_and_random, data)
                        continue
                    if "randread" in workloads:
                        bench.guarded(t, "randread", bench.random_reads_only, data)
                    if "randwrite" in workloads:
                        bench.guarded(t, "randwrite", bench.random_writes_only, data)
            del data
        for rnd in range(a.rounds):
            for t in order(rnd):
                if "files" in workloads:
                    bench.guarded(t, "files", bench.files, rnd)
                if "tree" in workloads:
                    bench.guarded(t, "tree", bench.tree, rnd, tar, entries)
                if "git" in workloads:
                    bench.guarded(t, "git", bench.git, rnd, tar, entries, genv)
        for t in targets:
            t.record_rss()
            if t.name in ("cowfs", "cowfs_base") and t.stats_missing:
                notes.append(t.stats_missing)
    finally:
        for t in targets:
            t.teardown()
        if tracer:
            tracer.close()
        left = [ln for ln in open("/proc/self/mounts") if a.workdir + "/" in ln]
        if left:
            bl.log(f"!! still mounted: {left}")
        elif loop:
            loop.teardown()
            os.rmdir(a.workdir)
        else:
            bl.run(["rm", "-rf", a.workdir], timeout=600, check=False)

    elapsed = time.monotonic() - t_start
    summary = summarize(bench, names)
    table, goals = render(summary, bench, names)
    print()
    print(table)
    print()
    print("Goals (cowfs / fuse-overlayfs, same run):")
    for g in goals:
        r = f"{g['ratio']:.2f}" if g["ratio"] is not None else "n/a"
        print(f"  {g['status']:4}  {g['what']}: {r} (goal {g['goal']})")
    for (w, tn), e in bench.errors.items():
        print(f"ERROR {w} on {tn}: {e}")
    for n in notes + bench.notes:
        print(f"note: {n}")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"# total time {elapsed:.0f} s; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in info['loadavg_end'])}")
    if a.json:
        out = {"machine": info, "command": cmdline.strip(),
               "config": {k: getattr(a, k) for k in ("size_mib", "files", "rounds", "seq_rounds", "tree_limit",
                                                    "rand_reads", "rand_writes", "targets", "workloads")},
               "tree_entries": entries, "disk": disk.name, "results": summary, "goals": goals,
               "errors": {f"{w}/{tn}": e for (w, tn), e in bench.errors.items()},
               "notes": notes + bench.notes, "elapsed_s": round(elapsed, 1)}
        print(json.dumps(out, sort_keys=True))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
