#!/usr/bin/env python3
"""Issue 22's benchmark: forks of one store working at once (docs/benchmarks.md "Parallel forks").

Every figure is taken on forks made the way a user makes them: `cowfs init`, `cowfs mount STORE BASE`,
`cowfs branch BASE fN`, `cowfs mount STORE MNT --branch fN`. It measures whatever serves those mounts:
today one daemon for every branch of a store (later branches attached as bind mounts), after issue 22
one daemon per branch; the JSON names the daemons that served each run (`daemons`), so a recorded run
says which mode it measured.

Measures (goals from the issue):
  untar        untar of Django 5.1.4 into 1 fork alone, 2 forks at once, 8 forks at once, each fork
               timed alone (per-fork time); then (1 and 2 forks) `git init && git add -A && git
               commit` in each at once; 2 separate stores at once as the reference the issue quotes
               goals: 2 forks / 1 alone <= 1.0x (untar and git); 8 forks per-fork / 2 forks <= 4.3x
  branch       `cowfs branch` + `cowfs mount --branch` of a new fork, end to end (goal <= 0.5 s), and
               the daemon's own time for the branch
  idle         RSS of the daemon(s) serving an idle store with a base and 2 forks mounted (goal: a fork
               daemon <= 60 MiB plus its cache limits)
  same_data    8 forks each writing the same 256 MiB of random data at once (dd conv=fsync), then
               `cowfs dedup --wait` and `cowfs gc`: store growth / 256 MiB (goal <= 1.05); with
               --own-daemon `cowfs gc STORE` is run again until the store keeper's duplicates are
               rewritten by every fork's daemon and their copies deleted (cowfs.chunks.dups)

--own-daemon: every fork is made with `cowfs branch BASE fN --own-daemon` (a home database of its
own, docs/design-many-processes.md "Step 6"), so its mount is served by a daemon of its own beside
the store's; the JSON's `own_daemon` says which kind a run measured.

--cpu-groups (untar section): each fork's daemon and the commands run in that fork share a CPU
scheduling group (a cgroup of the cpu controller) of their own, as an orchestrator places a sandbox
whose cgroup holds its fork's daemon.  The kernel then picks a group before a task: a fork's tar and
its daemon hand the CPU to each other, and the pairs take turns as groups (every ~0.1 ms on this
kernel, whatever the slice), which costs less CPU than every task of every fork taking turns one by
one (docs/benchmarks.md "A daemon per fork: where the 8-fork time goes", "The 8-fork row and the
scheduler").
A daemon serving several forks (no --own-daemon) stays where it is; the JSON's `cpu_groups` and
each round's `grouped_daemons` say what was placed.

Usage (root, from the repository; stores under /var/tmp/cowfs-bench-forks, removed afterwards):
  .venv/bin/python scripts/bench_forks.py                 # everything, 3 rounds (8 forks: 1 round)
  .venv/bin/python scripts/bench_forks.py --json          # the same, one JSON object as the last line
  .venv/bin/python scripts/bench_forks.py --quick         # 2,000 Django entries, 32 MiB, 1 round
  .venv/bin/python scripts/bench_forks.py --only untar,branch
  .venv/bin/python scripts/bench_forks.py --own-daemon --only untar,branch,idle
  .venv/bin/python scripts/bench_forks.py --own-daemon --cpu-groups --only untar --many 8
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

COWFS = os.path.join(bl.VENV_BIN, "cowfs")
WORK = os.environ.get("COWFS_BENCH_FORKS_DIR", "/var/tmp/cowfs-bench-forks")
MiB = 1 << 20
GIT_ENV = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_AUTHOR_NAME="bench",
               GIT_AUTHOR_EMAIL="bench@example.invalid", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.invalid", GIT_CONFIG_COUNT="1",
               GIT_CONFIG_KEY_0="safe.directory", GIT_CONFIG_VALUE_0="*")  # tar as root keeps the tar's owners
GIT_CMD = "git init -q -b main && git -c gc.auto=0 add -A && git -c gc.auto=0 commit -q -m base"
OWN_DAEMON: list[str] = []  # ["--own-daemon"]: forks get daemons of their own (main's --own-daemon)
CPU_GROUPS: list[bool] = []  # [True]: --cpu-groups


def cowfs(*args: str, timeout: float = 600) -> str:
    return bl.run([COWFS, *args], timeout=timeout).stdout


class Forks:
    """A store with its base branch mounted and n forks of it, each mounted at its own directory
    (or, with separate=True, n stores with one mount each: the issue's reference)."""

    def __init__(self, name: str, n: int, separate: bool = False) -> None:
        self.dir = os.path.join(WORK, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.mounts: list[str] = []  # every mount, unmounted in reverse order
        self.stores: list[str] = []
        self.forks: list[str] = []
        try:
            if separate:
                for i in range(n):
                    self.forks.append(self._new_store(f"s{i}"))
            else:
                self.base = self._new_store("s")
                for i in range(n):
                    self.forks.append(self.add_fork(f"f{i}"))
        except BaseException:
            self.close()
            raise

    def _new_store(self, name: str) -> str:
        store, mnt = os.path.join(self.dir, name), os.path.join(self.dir, f"{name}-mnt")
        os.mkdir(mnt)
        cowfs("init", store)
        cowfs("mount", store, mnt)
        self.stores.append(store)
        self.mounts.append(mnt)
        return mnt

    def add_fork(self, name: str) -> str:
        mnt = os.path.join(self.dir, f"{name}-mnt")
        os.mkdir(mnt)
        cowfs("branch", self.base, name, *OWN_DAEMON)
        cowfs("mount", self.stores[0], mnt, "--branch", name)
        self.mounts.append(mnt)
        return mnt

    def daemons(self) -> dict[int, list[str]]:
        """Daemon pid -> the mount points of ours it serves (from `cowfs status --json`)."""
        out: dict[int, list[str]] = {}
        for st in json.loads(cowfs("status", "--json"))["stores"]:
            if os.path.realpath(st["store"]) in {os.path.realpath(s) for s in self.stores}:
                out.setdefault(st["daemon_pid"], []).extend(m["mountpoint"] for m in st["mounts"])
        return out

    def stats(self, store: str) -> dict:
        return json.loads(cowfs("stats", store, "--json"))

    def close(self) -> None:
        for mnt in reversed(self.mounts):
            if bl.is_mounted(mnt):
                subprocess.run([COWFS, "umount", mnt], capture_output=True, timeout=300)
        self.mounts.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_controller() -> str | None:
    """Where the cgroup hierarchy with the cpu controller is mounted (v1 `cpu`, or v2 with cpu
    enabled for the root's children), else None."""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, where, kind, opts = line.split()[:4]
            if kind == "cgroup" and "cpu" in opts.split(","):
                return where
            if kind == "cgroup2":
                try:
                    with open(os.path.join(where, "cgroup.subtree_control")) as ctl:
                        if "cpu" in ctl.read().split():
                            return where
                except OSError:
                    pass
    return None


class CpuGroups:
    """CPU scheduling groups made for one round, each holding a fork's daemon and the commands
    run in the fork (--cpu-groups), emptied and removed at close."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.made: list[str] = []

    def make(self, name: str, pid: int | None) -> str:
        """A new group, with the daemon pid (all its threads) in it when given."""
        path = os.path.join(self.root, f"cowfs-bench-forks-{os.getpid()}-{name}")
        os.mkdir(path)
        self.made.append(path)
        if pid is not None:
            self.add(path, pid)
        return path

    @staticmethod
    def holds(path: str, pid: int | None) -> bool:
        """Whether pid is in the group (the daemon put there is still in it)."""
        with open(os.path.join(path, "cgroup.procs")) as f:
            return pid is not None and str(pid) in f.read().split()

    @staticmethod
    def add(path: str, pid: int) -> None:
        """Move process pid, every thread of it, into the group (cgroup.procs, not tasks: a
        daemon's RocksDB and worker threads go with it)."""
        with open(os.path.join(path, "cgroup.procs"), "w") as out:
            out.write(str(pid))

    def close(self) -> None:
        """Back to the root group with whatever still runs (a daemon that did not exit), then
        the groups removed."""
        for path in self.made:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    left = f.read().split()
            except FileNotFoundError:
                continue
            for pid in left:
                try:
                    self.add(self.root, int(pid))
                except OSError:
                    pass  # exited meanwhile
            try:
                os.rmdir(path)
            except OSError as exc:
                bl.log(f"cgroup {path} left behind: {exc}")
        self.made.clear()


def at_once(cmds: list[tuple[list[str], str]], env: dict | None = None,
            groups: list[str] | None = None) -> list[float]:
    """Start every (argv, cwd) at the same moment (the i-th in cgroup groups[i] when given:
    it enters it before exec, so none of its work runs outside); each one's own elapsed seconds."""
    def entering(i: int) -> Callable[[], None] | None:
        return (lambda: CpuGroups.add(groups[i], os.getpid())) if groups else None
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=entering(i))
             for i, (argv, cwd) in enumerate(cmds)]
    done: dict[int, float] = {}
    try:
        while len(done) < len(procs):
            for i, p in enumerate(procs):
                if i not in done and p.poll() is not None:
                    done[i] = time.perf_counter() - t0
                    if p.returncode:
                        raise RuntimeError(f"{' '.join(cmds[i][0])} in {cmds[i][1]}: rc {p.returncode}: "
                                           f"{p.stderr.read().decode(errors='replace')[-1500:]}")
            if time.perf_counter() - t0 > 1800:
                raise RuntimeError("a command ran over 30 minutes")
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [done[i] for i in range(len(procs))]


def untar_round(n: int, tar: str, separate: bool = False, git: bool = True) -> dict:
    name = f"untar{n}{'s' if separate else ''}"
    f = Forks(name, n, separate)
    groups = CpuGroups(cpu_controller() or "") if CPU_GROUPS else None
    try:
        daemons = f.daemons()
        placed: list[str] | None = None
        alone: dict[str, int] = {}
        if groups is not None:
            alone = {mps[0]: pid for pid, mps in daemons.items() if len(mps) == 1}  # serves that mount only
            placed = [groups.make(f"{name}-{i}", alone.get(m)) for i, m in enumerate(f.forks)]

        def cpu() -> float:
            return sum(bl.proc_cpu_s(pid) or 0.0 for pid in daemons)
        cpu0, ru0 = cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        untar = at_once([(["tar", "-xf", tar, "-C", m], m) for m in f.forks], groups=placed)
        cpu1, ru1 = cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        top = [os.path.join(m, os.listdir(m)[0]) for m in f.forks]
        commit = at_once([(["sh", "-c", GIT_CMD], t) for t in top], env=GIT_ENV, groups=placed) if git else []
        return {"untar_s": untar, "git_s": commit, "daemons": len(daemons), "untar_daemon_cpu_s": cpu1 - cpu0,
                # the tars' own CPU (every child reaped meanwhile is one of them)
                "untar_tar_cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                "git_daemon_cpu_s": cpu() - cpu1,
                "grouped_daemons": 0 if groups is None else sum(groups.holds(g, alone.get(m))
                                                                for g, m in zip(placed or [], f.forks))}
    finally:
        f.close()
        if groups is not None:
            groups.close()


def measure_untar(tar: str, rounds: int, many: int) -> dict:
    res: dict = {}
    for key, n, rr, sep in (("1_forks", 1, rounds, False), ("2_forks", 2, rounds, False),
                            ("2_separate_stores", 2, rounds, True), ("many_forks", many, 1, False)):
        runs = []
        for r in range(rr):
            runs.append(untar_round(n, tar, sep, git=n <= 2))  # the issue asks git of 1 and 2 forks
            bl.log(f"  untar {key} round {r + 1}: untar per fork {[round(x, 2) for x in runs[-1]['untar_s']]} s, "
                   f"git {[round(x, 2) for x in runs[-1]['git_s']]} s, {runs[-1]['daemons']} daemon(s) "
                   f"({runs[-1]['grouped_daemons']} in CPU groups), "
                   f"load {os.getloadavg()[0]:.1f}")
        res[key] = {"untar_per_fork_s": statistics.median(statistics.mean(x["untar_s"]) for x in runs),
                    "untar_all_s": statistics.median(max(x["untar_s"]) for x in runs),
                    "git_per_fork_s": statistics.median(statistics.mean(x["git_s"]) for x in runs) if n <= 2 else None,
                    "forks": n, "daemons": runs[0]["daemons"],
                    "untar_daemon_cpu_s": statistics.median(x["untar_daemon_cpu_s"] for x in runs),
                    "untar_tar_cpu_s": statistics.median(x["untar_tar_cpu_s"] for x in runs),
                    "git_daemon_cpu_s": statistics.median(x["git_daemon_cpu_s"] for x in runs),
                    "rounds": runs}
    return res


def measure_branch(rounds: int) -> dict:
    f = Forks("branch", 0)
    try:
        e2e, daemon_ms = [], []
        for k in range(max(rounds, 5)):
            mnt = os.path.join(f.dir, f"b{k}-mnt")
            os.mkdir(mnt)
            t0 = time.perf_counter()
            daemon_ms.append(json.loads(cowfs("branch", f.base, f"b{k}", "--json", *OWN_DAEMON))["daemon_ms"])
            cowfs("mount", f.stores[0], mnt, "--branch", f"b{k}")
            e2e.append(time.perf_counter() - t0)
            f.mounts.append(mnt)
        return {"branch_mount_s": statistics.median(e2e), "branch_mount_all_s": e2e,
                "branch_daemon_ms": statistics.median(daemon_ms), "daemons": len(f.daemons())}
    finally:
        f.close()


def measure_idle() -> dict:
    f = Forks("idle", 2)
    try:
        time.sleep(3)
        daemons = f.daemons()
        rss = {pid: (bl.proc_status_kb(pid, "VmRSS") or 0) / 1024 for pid in daemons}
        return {"daemons": len(daemons), "rss_mib": sorted(rss.values()),
                "mounts_per_daemon": sorted(len(v) for v in daemons.values())}
    finally:
        f.close()


def measure_same_data(n: int, size: int) -> dict:
    os.makedirs(WORK, exist_ok=True)
    data = os.path.join(WORK, f"same-{size // MiB}M.bin")
    rnd = random.Random(22)
    with open(data, "wb") as out:
        for _ in range(size // MiB):
            out.write(rnd.randbytes(MiB))
    try:
        f = Forks("same", n)
        try:
            store = f.stores[0]
            before = f.stats(store)
            t = at_once([(["dd", f"if={data}", f"of={os.path.join(m, 'data.bin')}", "bs=1M", "conv=fsync",
                           "status=none"], m) for m in f.forks])
            written = f.stats(store)
            cowfs("dedup", store, "--wait", timeout=1800)
            settled = f.stats(store)
            t0 = time.perf_counter()
            runs = [json.loads(cowfs("gc", store, "--json", timeout=1800))]
            if OWN_DAEMON:
                # The store keeper (the first run) publishes one place per chunk packed by several
                # daemons; each fork's daemon rewrites its records within a second or two and
                # collects its own packs (repacking what the rewrites left mostly dead), a later run
                # condemns the dead copies and, once every daemon acknowledged, deletes them: run
                # again until two runs in a row find nothing open, waiting, condemned or deleted.
                def quiet(r: dict) -> bool:
                    return not any(r.get(k) for k in ("dup_open", "dup_published", "packs_waiting",
                                                      "packs_condemned", "packs_deleted", "packs_repacked"))
                deadline = time.monotonic() + 600
                while not (len(runs) >= 2 and quiet(runs[-1]) and quiet(runs[-2])) and time.monotonic() < deadline:
                    time.sleep(1.5)
                    runs.append(json.loads(cowfs("gc", store, "--json", timeout=1800)))
            gc_s = time.perf_counter() - t0
            collected = f.stats(store)

            def grown(s: dict, k: str) -> float:
                return (s[k] - before[k]) / size
            return {"forks": n, "size_mib": size // MiB, "write_s": t, "daemons": len(f.daemons()),
                    "chunk_growth_written": grown(written, "chunk_bytes"),
                    "stored_growth_written": grown(written, "stored_bytes"),
                    "stored_growth_after_dedup": grown(settled, "stored_bytes"),
                    "stored_growth_after_gc": grown(collected, "stored_bytes"),
                    "chunk_growth_after_gc": grown(collected, "chunk_bytes"),
                    "gc_runs": len(runs), "gc_s": gc_s,
                    "keeper_scan_s": sum(r.get("dup_seconds", 0.0) for r in runs),
                    "dup_published": sum(r.get("dup_published", 0) for r in runs),
                    "packs_deleted": sum(r.get("packs_deleted", 0) for r in runs)}
        finally:
            f.close()
    finally:
        os.unlink(data)


SECTIONS = ("untar", "branch", "idle", "same_data")


def goals(r: dict) -> list[tuple[str, str, str, bool | None]]:
    out: list[tuple[str, str, str, bool | None]] = []
    u = r.get("untar")
    if u:
        one, two, sep, many = u["1_forks"], u["2_forks"], u["2_separate_stores"], u["many_forks"]
        ratio = two["untar_per_fork_s"] / one["untar_per_fork_s"]
        out.append(("untar: 2 forks at once / 1 alone (per fork)", f"{ratio:.2f}x ({two['untar_per_fork_s']:.1f} s / "
                    f"{one['untar_per_fork_s']:.1f} s; 2 separate stores {sep['untar_per_fork_s']:.1f} s)",
                    "<= 1.0x", ratio <= 1.0))
        ratio = two["git_per_fork_s"] / one["git_per_fork_s"]
        out.append(("git add -A && commit: 2 forks / 1 alone", f"{ratio:.2f}x ({two['git_per_fork_s']:.1f} s / "
                    f"{one['git_per_fork_s']:.1f} s)", "<= 1.0x", ratio <= 1.0))
        ratio = many["untar_per_fork_s"] / two["untar_per_fork_s"]

        def cpu(x: dict) -> float:  # per fork: its daemon's share of the daemons' CPU (the base's included) and its tar's
            return (x["untar_daemon_cpu_s"] + x["untar_tar_cpu_s"]) / x["forks"]
        out.append((f"untar: {many['forks']} forks per-fork / 2 forks", f"{ratio:.2f}x "
                    f"({many['untar_per_fork_s']:.1f} s; CPU per fork, daemons and tar, {cpu(many):.1f} s against "
                    f"{cpu(two):.1f} s)", "<= 4.3x", ratio <= 4.3))
        out.append(("daemons serving 1 / 2 / many forks (+ base)",
                    f"{one['daemons']} / {two['daemons']} / {many['daemons']}", "one per branch", None))
    b = r.get("branch")
    if b:
        out.append(("cowfs branch + cowfs mount, end to end", f"{b['branch_mount_s']:.3f} s (branch in the daemon "
                    f"{b['branch_daemon_ms']:.2f} ms)", "<= 0.5 s", b["branch_mount_s"] <= 0.5))
    i = r.get("idle")
    if i:
        out.append(("idle RSS of the daemon(s), base + 2 forks", f"{', '.join(f'{x:.0f}' for x in i['rss_mib'])} MiB "
                    f"({i['daemons']} daemon(s))", "<= 60 MiB + caches (caches empty when idle)",
                    max(i["rss_mib"]) <= 60))
    s = r.get("same_data")
    if s:
        out.append((f"{s['forks']} forks writing the same {s['size_mib']} MiB: store growth / size",
                    f"{s['stored_growth_after_gc']:.3f}x after dedup + gc ({s['stored_growth_written']:.3f}x "
                    f"as written; {s['gc_runs']} gc runs, {s['gc_s']:.1f} s)", "<= 1.05x",
                    s["stored_growth_after_gc"] <= 1.05))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="2,000 Django entries, 32 MiB, 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many", type=int, default=8, help="forks of the 'many forks' runs (default 8)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="some of " + ",".join(SECTIONS))
    ap.add_argument("--own-daemon", action="store_true", help="forks made with `cowfs branch --own-daemon`: "
                                                                 "each served by a daemon of its own")
    ap.add_argument("--cpu-groups", action="store_true", help="untar: each fork's daemon and commands in a CPU "
                                                                 "scheduling group (cgroup) of their own")
    args = ap.parse_args()
    if args.own_daemon:
        OWN_DAEMON.append("--own-daemon")
    if args.cpu_groups:
        if cpu_controller() is None:
            sys.exit("bench_forks.py: --cpu-groups needs the cgroup cpu controller (v1 `cpu`, or v2 with cpu in "
                     "the root's cgroup.subtree_control)")
        CPU_GROUPS.append(True)
    if os.geteuid() != 0:
        sys.exit("bench_forks.py: run as root (mounts of other branches of a served store are bind mounts today)")
    # A kill (or ^C of a run started in the background, where SIGINT is ignored) still unmounts
    # everything: the handler turns it into SystemExit, and every Forks is closed in a finally.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    only = set(args.only.split(","))
    if only - set(SECTIONS) or args.many < 2:
        sys.exit(f"bench_forks.py: --only takes {','.join(SECTIONS)} (got {args.only}); --many at least 2")
    rounds = 1 if args.quick else args.rounds
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_start": os.getloadavg(),
            "machine": bl.machine_info(), "command": " ".join(sys.argv), "own_daemon": args.own_daemon,
            "cpu_groups": args.cpu_groups,
            "cowfs": bl.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=bl.REPO).stdout.strip()}
    r: dict = {}
    t0 = time.time()
    try:
        if "untar" in only:
            tar, entries = bl.django_tar(limit=2000 if args.quick else None)
            meta["django_entries"] = entries
            r["untar"] = measure_untar(tar, rounds, args.many)
        if "branch" in only:
            r["branch"] = measure_branch(rounds)
        if "idle" in only:
            r["idle"] = measure_idle()
        if "same_data" in only:
            r["same_data"] = measure_same_data(args.many, (32 if args.quick else 256) * MiB)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    meta["total_s"] = round(time.time() - t0, 1)
    meta["load_end"] = os.getloadavg()
    rows = goals(r)
    print(f"# bench_forks: {meta['started']}; cowfs {meta['cowfs']}; load at start "
          f"{' '.join(f'{x:.2f}' for x in meta['load_start'])}, at end {' '.join(f'{x:.2f}' for x in meta['load_end'])}; "
          f"total {meta['total_s']} s")
    print("| measure | figure | goal | met |\n|---|---|---|---|")
    for name, fig, goal, met in rows:
        print(f"| {name} | {fig} | {goal} | {'-' if met is None else ('yes' if met else 'no')} |")
    if args.json:
        print(json.dumps({"meta": meta, "results": r, "goals": [list(x) for x in rows]}))


if __name__ == "__main__":
    main()
