#!/usr/bin/env python3
"""What idle daemons cost (docs/benchmarks.md "Idle daemons"): a store's daemon and N forks with
daemons of their own (`cowfs branch MNT fN --own-daemon`, `cowfs mount STORE MNTN --branch fN`),
all idle, for a window of S seconds.

Per daemon: its CPU (utime + stime of /proc/PID/stat, in seconds over the window), its wake-ups
(voluntary context switches of every thread, /proc/PID/task/TID/status: a thread that blocks
again after a timer or an event woke it) per second, and the same per thread (name and figures),
so a wake-up can be traced to the thread that makes it.  The store gets a few files first (its
daemon then has written, queued and flushed something); the window starts after --settle seconds.

Usage (root, from the repository; the store and mounts under --dir, removed afterwards):
  .venv/bin/python scripts/bench_idle.py --json
  .venv/bin/python scripts/bench_idle.py --cowfs /other/checkout/.venv/bin/cowfs   # another build
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def cowfs(binary: str, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=120)
    if check and r.returncode:
        raise SystemExit(f"cowfs {' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def _cpu(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def threads(pid: int) -> dict[int, tuple[str, float, int]]:
    """tid -> (name, CPU seconds, voluntary switches) of every live thread of pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # ended meanwhile
            continue
        vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        out[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")], _cpu(stat), vol)
    return out


def sample(pid: int) -> tuple[float, dict[int, tuple[str, float, int]]]:
    """The process's CPU (ended threads' included) and its threads' figures."""
    return _cpu(Path(f"/proc/{pid}/stat").read_text()), threads(pid)


def figures(before: tuple[float, dict[int, tuple[str, float, int]]],
            after: tuple[float, dict[int, tuple[str, float, int]]], seconds: float) -> dict[str, Any]:
    per = []
    for tid, (name, cpu, vol) in after[1].items():
        _n, cpu0, vol0 = before[1].get(tid, (name, 0.0, 0))
        if vol - vol0 or cpu - cpu0:
            per.append({"tid": tid, "name": name, "cpu_s": round(cpu - cpu0, 3), "wakeups": vol - vol0})
    wakeups = sum(t["wakeups"] for t in per)
    return {"cpu_s": round(after[0] - before[0], 3), "wakeups": wakeups,
            "wakeups_per_s": round(wakeups / seconds, 2),
            "threads": sorted(per, key=lambda t: -t["wakeups"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cowfs", default=str(REPO / ".venv" / "bin" / "cowfs"), help="the cowfs command to measure")
    ap.add_argument("--dir", default="/var/tmp/cowfs-bench-idle", help="where the store and mounts go")
    ap.add_argument("--forks", type=int, default=8)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between the setup and the window")
    ap.add_argument("--seconds", type=float, default=60.0, help="the window")
    ap.add_argument("--json", action="store_true", help="one JSON object as the last line")
    o = ap.parse_args()
    work = Path(o.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store, base = work / "store", work / "base"
    base.mkdir()
    cowfs(o.cowfs, "init", store)
    cowfs(o.cowfs, "mount", store, base)
    mounted = [base]
    try:
        for i in range(20):
            (base / f"f{i}").write_bytes(os.urandom(100_000))
        for i in range(o.forks):
            cowfs(o.cowfs, "branch", base, f"f{i}", "--own-daemon")
            mp = work / f"f{i}"
            mp.mkdir()
            cowfs(o.cowfs, "mount", store, mp, "--branch", f"f{i}")
            mounted.append(mp)
        pids = {"store": int((store / "daemon.pid").read_text())}
        for home in sorted((store / "homes").iterdir()):
            pids[f"fork {home.name}"] = int((home / "daemon.pid").read_text())
        time.sleep(o.settle)
        load = [Path("/proc/loadavg").read_text().split()[0]]
        before = {name: sample(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(o.seconds)
        after = {name: sample(pid) for name, pid in pids.items()}
        seconds = time.monotonic() - t0
        load.append(Path("/proc/loadavg").read_text().split()[0])
    finally:
        for mp in reversed(mounted):
            cowfs(o.cowfs, "umount", mp, check=False)
    daemons = {name: figures(before[name], after[name], seconds) for name in pids}
    forks = [d for name, d in daemons.items() if name != "store"]
    out = {"cowfs": o.cowfs, "forks": o.forks, "seconds": round(seconds, 1), "load_1min": load,
           "store_cpu_s": daemons["store"]["cpu_s"], "store_wakeups_per_s": daemons["store"]["wakeups_per_s"],
           "fork_cpu_s": sorted(d["cpu_s"] for d in forks),
           "fork_wakeups_per_s": sorted(d["wakeups_per_s"] for d in forks),
           "all_daemons_cpu_s": round(sum(d["cpu_s"] for d in daemons.values()), 3), "daemons": daemons}
    shutil.rmtree(work, ignore_errors=True)
    for name, d in daemons.items():
        print(f"{name}: {d['cpu_s']:.2f} s CPU in {seconds:.0f} s, {d['wakeups_per_s']:.2f} wake-ups/s", file=sys.stderr)
    print(f"load {load[0]} -> {load[1]}; all daemons {out['all_daemons_cpu_s']:.2f} s CPU", file=sys.stderr)
    if o.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
