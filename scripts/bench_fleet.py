#!/usr/bin/env python3
"""Issue 23's benchmark, its first rows: what pushes and pulls move (docs/benchmarks.md "The fleet").

Real engines on 127.0.0.1 (SeaweedFS `weed server -s3`, one etcd member: tests/engines.py), real
stores and mounts, the `cowfs` CLI of this checkout, each "host" with its own configuration and
cache directories.

Rows:
  base_push    Django 5.1.4 (the sdist untarred into a store: 6,809 files, 3,234 directories, 44 MB) snapshotted
               and pushed: objects and bytes uploaded, seconds
  fork_push    10 of its files changed, snapshotted, pushed again from the same store
               goal: uploads <= 1 MiB + the changed bytes
  fork_pull    a second host pulls the base, then the fork: what the fork's pull fetched
  fleet        N further hosts (stores) each pull the base, change 10 files of their own and push
               their fork: the remote's bytes afterwards / after the base alone
               goal (20 hosts): <= 1.1x one base + the forks' changes

--lazy: the lazy-mount rows (a sandbox: the Django tree, a git repository of it, a venv with
Django installed offline from a local wheelhouse, data files to 1 GiB with at least 600 MiB;
--quick: 32 MiB of data and Django alone in the venv, ~180 MiB in all):
  learn        with --learn only: host a mounts the sandbox again (a cold start) and runs the
               workload before the snapshot, so its store learns the cold start the push sends
               with it (a lazy mount then fetches those chunks ahead, issue 23)
  push         host a pushes it
  pull         host b pulls it whole (what a host without lazy mounts does)
  cold_local   host b mounts its pulled copy cold (page cache dropped, new daemon) and runs the
               workload: `git status` in the repository + `import django` with the venv's Python
  lazy         host c (nothing cached) runs `cowfs mount origin:sandbox MNT --store S`: seconds until ready
               (goal <= 2 s), the workload's seconds / cold_local's (goal <= 3x), the bytes of S3
               GETs of data/ during the workload (counted on the wire by a sitecustomize in its
               processes, the daemon's included) / the bytes it read (the FUSE READs its daemon
               served, counted by the same sitecustomize; goal <= 1.3; cold_local's are counted
               the same way, and its page cache after the workload, fincore, reported beside)

Not measured here: leases, fleet gc, a 3-member etcd cluster losing a member (tests/test_fleet.py).

Usage (root, from the repository; everything under /var/tmp/cowfs-bench-fleet, removed afterwards):
  .venv/bin/python scripts/bench_fleet.py               # 5 fleet hosts
  .venv/bin/python scripts/bench_fleet.py --hosts 20 --json
  .venv/bin/python scripts/bench_fleet.py --lazy --quick
  .venv/bin/python scripts/bench_fleet.py --lazy --json
  .venv/bin/python scripts/bench_fleet.py --lazy --learn --json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import fleetlib  # noqa: E402

BASE = "/var/tmp/cowfs-bench-fleet"


def change_files(root: str, n: int, tag: str) -> int:
    """Append a line to the first n .py files (sorted); the bytes of the files changed."""
    changed = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        if "/.cowfs" in dirpath:
            continue
        for f in sorted(filenames):
            if f.endswith(".py") and changed < n:
                p = os.path.join(dirpath, f)
                with open(p, "a") as fh:
                    fh.write(f"# changed by {tag}\n")
                changed += 1
    return changed


def remote_bytes(fl: fleetlib.Fleet[fleetlib.Host]) -> tuple[int, int]:
    c = fl.remote_objects()
    return sum(c.values()) - c["bytes"], c["bytes"]


def changed_bytes(root: str, n: int) -> int:
    total = 0
    done = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(".py") and done < n:
                total += os.path.getsize(os.path.join(dirpath, f))
                done += 1
    return total


# --- the lazy-mount rows ---------------------------------------------------------------------------

WHEELS = ("django==5.1.4", "numpy", "pytest", "rich", "requests")   # the venv (--quick: Django alone)

def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def find_wheelhouse(wanted: tuple[str, ...]) -> str | None:
    """A directory of wheels holding Django 5.1.4 (bench_agent.py's wheelhouse, $PIP_FIND_LINKS,
    /opt/wheels): pip installs offline from it."""
    dirs = sorted(glob.glob("/var/tmp/cowfs-bench-agent-cache/wheelhouse-*")) + \
        [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d] + ["/opt/wheels", "/opt/pypi/files"]
    for d in dirs:
        if glob.glob(os.path.join(d, "[Dd]jango-5.1.4-*.whl")):
            return d
    return None


def download_wheelhouse(wanted: tuple[str, ...]) -> str | None:
    """No wheelhouse on this machine: `pip download` one from PyPI, once, into
    /var/tmp/cowfs-bench-fleet-cache (kept for later runs); None when offline."""
    d = os.path.join("/var/tmp/cowfs-bench-fleet-cache", "wheelhouse-" + "-".join(w.split("==")[0] for w in wanted))
    if glob.glob(os.path.join(d, "[Dd]jango-5.1.4-*.whl")):
        return d
    print(f"# downloading the venv's wheels into {d} (once): pip download {' '.join(wanted)}", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", d, *wanted],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"# pip download failed (offline?): {r.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return d


def dir_bytes(root: str) -> tuple[int, int]:
    """(files, bytes) of the regular files under root."""
    n = b = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                n += 1
                b += st.st_size
    return n, b


def build_sandbox(root: str, tar: str, total_mib: int, min_data_mib: int, quick: bool) -> dict:
    """The issue's sandbox under root: django/ (the sdist), repo/ (a git repository of it: its
    files added in 4 commits, 2 more changing files, packed by git gc as a clone's would be),
    venv/ (python -m venv, Django and, but with quick, numpy, pytest, rich, requests installed
    offline from a local wheelhouse), data/ (files of random bytes: at least min_data_mib, and
    enough to bring the sandbox to total_mib)."""
    t0 = time.monotonic()
    parts: dict = {}
    os.makedirs(os.path.join(root, "django"))
    benchlib.run(["tar", "-xf", tar, "-C", os.path.join(root, "django"), "--strip-components=1"], timeout=1800)
    repo = os.path.join(root, "repo")
    os.makedirs(repo)
    benchlib.run(["tar", "-xf", tar, "-C", repo, "--strip-components=1"], timeout=1800)
    git = ["git", "-C", repo, "-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
           "-c", "gc.auto=0", "-c", "init.defaultBranch=main"]
    benchlib.run(git + ["init", "-q"], timeout=300)
    groups = [["docs"], ["django"], ["tests"], ["."]]
    for i, g in enumerate(groups):
        benchlib.run(git + ["add", "-A", "--", *g], timeout=1800)
        benchlib.run(git + ["commit", "-q", "-m", f"import part {i + 1}"], timeout=1800)
    for i in range(2):
        changed = change_files(repo, 5, f"commit {i}")
        benchlib.run(git + ["commit", "-q", "-am", f"change {changed} files"], timeout=600)
    benchlib.run(git + ["gc", "-q"], timeout=1800)
    parts["git_commits"] = len(groups) + 2
    venv = os.path.join(root, "venv")
    benchlib.run([sys.executable, "-m", "venv", venv], timeout=1800)
    wheels = WHEELS[:1] if quick else WHEELS
    wh = find_wheelhouse(wheels) or download_wheelhouse(wheels)
    if wh is not None:
        benchlib.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--no-index", "--find-links", wh,
                      "--no-cache-dir", *wheels], timeout=1800)
        parts["venv_from"] = f"wheels in {wh}: {' '.join(wheels)}"
    else:       # offline and no wheel: Django's package copied from its sdist tree (building it
        # needs the `wheel` package, which a fresh venv lacks), without its dependencies
        site = glob.glob(os.path.join(venv, "lib", "python*", "site-packages"))[0]
        shutil.copytree(os.path.join(root, "django", "django"), os.path.join(site, "django"))
        parts["venv_from"] = "Django's package copied from its sdist tree (offline, no wheelhouse), no dependencies"
    for name in ("django", "repo", "venv"):
        parts[name] = dir_bytes(os.path.join(root, name))
    rest = sum(b for _n, b in (parts[k] for k in ("django", "repo", "venv")))
    data_mib = max(min_data_mib, -(-(total_mib * 2**20 - rest) // 2**20))
    data = os.path.join(root, "data")
    os.makedirs(data)
    rnd = random.Random(23)
    left, i = data_mib << 20, 0
    while left > 0:
        n = min(left, 64 << 20)
        with open(os.path.join(data, f"part-{i:03d}.bin"), "wb") as f:
            for off in range(0, n, 4 << 20):
                f.write(rnd.randbytes(min(4 << 20, n - off)))
        left -= n
        i += 1
    parts["data"] = dir_bytes(data)
    parts["total"] = [sum(parts[k][0] for k in ("django", "repo", "venv", "data")),
                      sum(parts[k][1] for k in ("django", "repo", "venv", "data"))]
    parts["build_s"] = round(time.monotonic() - t0, 1)
    return parts


def workload(mp: str) -> float:
    """The issue's first commands in the sandbox: `git status` in the repository, then `import
    django` with the venv's Python; seconds."""
    t0 = time.monotonic()
    benchlib.run(["git", "-C", os.path.join(mp, "repo"), "status", "--porcelain"], timeout=1800)
    benchlib.run([os.path.join(mp, "venv", "bin", "python"), "-c", "import django"], timeout=1800)
    return time.monotonic() - t0


def fuse_read(counts: str) -> int:
    """The bytes the FUSE READ requests of a mount's daemon returned so far (its files' page
    cache misses, read-ahead included): counted by fleetlib's counter in the daemon."""
    time.sleep(0.25)             # the counter writes its FUSE reads every 0.1 s
    return fleetlib.counts(counts).get("fuse read", [0, 0])[1]


def resident_bytes(mp: str) -> int:
    """Bytes of the mount's files in the page cache (fincore): after a workload that started
    with the cache dropped, what it read through FUSE (kernel readahead included), unless
    something on the machine dropped the page cache meanwhile (another benchmark's
    drop_caches: 0 B, 6.1 MB, 34.0 MB in runs of this script): reported, not used."""
    files = []
    for dirpath, dirs, names in os.walk(mp):
        if dirpath == mp and ".cowfs" in dirs:
            dirs.remove(".cowfs")
        files += [os.path.join(dirpath, f) for f in names if stat.S_ISREG(os.lstat(os.path.join(dirpath, f)).st_mode)]
    total = 0
    for i in range(0, len(files), 500):
        r = benchlib.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files[i:i + 500]],
                         timeout=600)
        total += sum(int(x) for x in r.stdout.split())
    return total


def lazy_rows(args: argparse.Namespace) -> dict:
    """The lazy-mount rows: the sandbox built and pushed from host a; host b pulls it (the
    pull-based figures) and runs the workload on a cold mount of its pulled copy (the local
    baseline); host c (nothing cached) mounts it lazily from the remote and runs the same."""
    quick = args.quick
    total_mib, min_data = (0, 32) if quick else (1024, 600)
    tar, _entries = benchlib.django_tar()
    out: dict = {"machine": benchlib.machine_info(), "quick": quick}
    with fleetlib.fleet(args.dir, "fleet", fleetlib.Host) as fleet:
        a = fleet.host("a")
        mp = a.mount("main")
        out["load_before"] = load()
        out["sandbox"] = build_sandbox(mp, tar, total_mib, min_data, quick)
        benchlib.log(f"sandbox: {out['sandbox']}")
        if args.learn:
            a.umount_all()
            benchlib.drop_caches()
            mp = a.mount("main")
            out["learn"] = {"workload_s": round(workload(mp), 3), "load": load()}
            benchlib.log(f"learn: {out['learn']}")
        a.run("snapshot", mp, "sandbox")
        t0 = time.monotonic()
        out["push"] = a.json("push", mp, "sandbox", "origin")["pushed"]
        out["push"]["wall_s"] = round(time.monotonic() - t0, 2)
        out["push"]["load"] = load()
        out["push"]["remote_bytes"] = remote_bytes(fleet)[1]
        benchlib.log(f"push: {out['push']}")
        a.umount_all()

        # Pull-based: host b gets the whole sandbox, then runs the workload on a cold mount.
        b = fleet.host("b")
        t0 = time.monotonic()
        out["pull"] = b.json("pull", "origin", "sandbox", b.store)["pulled"]
        out["pull"]["wall_s"] = round(time.monotonic() - t0, 2)
        out["pull"]["load"] = load()
        benchlib.log(f"pull: {out['pull']}")
        cold = os.path.join(b.dir, "mnt-cold")
        os.makedirs(cold)
        counts = os.path.join(b.dir, "counts")
        benchlib.drop_caches()
        t0 = time.monotonic()
        b.run("mount", b.store, cold, "--branch", "sandbox", env=fleetlib.counting(b.env, counts))
        b.mounted.append(cold)
        mount_s = time.monotonic() - t0
        out["cold_local"] = {"mount_s": round(mount_s, 3), "load": load()}
        before = fuse_read(counts)
        out["cold_local"]["workload_s"] = round(workload(cold), 3)
        out["cold_local"]["read_bytes"] = fuse_read(counts) - before
        out["cold_local"]["page_cache_bytes"] = resident_bytes(cold)
        out["cold_local"]["load_after"] = load()
        b.umount_all()
        benchlib.log(f"cold local mount: {out['cold_local']}")

        out["lazy"] = lazy_mount(fleet, out, "c")
        for i, size in enumerate(args.lazy_near):
            out[f"lazy_near={size}"] = lazy_mount(fleet, out, f"c{i + 1}", "-o", f"lazy_near={size}")
    return out


def lazy_mount(fleet: fleetlib.Fleet, out: dict, host: str, *options: str) -> dict:
    """Host `host`: `cowfs mount origin:sandbox MNT [options]` (nothing of the sandbox local), the
    workload on it, the S3 bytes its processes fetched (counted on the wire)."""
    c = fleet.host(host)
    counts = os.path.join(c.dir, "counts")
    env = fleetlib.counting(c.env, counts)
    benchlib.drop_caches()
    try:
        mp, ready = c.lazy_mount("origin:sandbox", "lazy", *options, env=env)
    except SystemExit as e:
        return {"available": False, "error": str(e)[-500:]}
    os.listdir(mp)
    row: dict = {"available": True, "ready_s": round(ready, 3), "load": load()}
    read_before = fuse_read(counts)
    row["ready_fetch"] = fleetlib.counts(counts)
    before = row["ready_fetch"].get("S3 GET data", [0, 0])
    try:
        row["workload_s"] = round(workload(mp), 3)
    except RuntimeError as e:          # reported, not hidden: the row then has no goals
        row["workload_error"] = str(e)
        unmount(c, mp)
        benchlib.log(f"lazy mount: {row}")
        return row
    row["read_bytes"] = fuse_read(counts) - read_before
    after = fleetlib.counts(counts).get("S3 GET data", [0, 0])
    row["daemon_lazy_stats"] = fleetlib.lazy_stats(mp)
    row["load_after"] = load()
    row["fetched_gets"], row["fetched_bytes"] = after[0] - before[0], after[1] - before[1]
    row["s3_total"] = fleetlib.counts(counts)
    cold = out["cold_local"]
    # Bytes read: what the workload read through this mount (its daemon's FUSE READs), not the
    # page cache's contents afterwards (emptied by any drop_caches on the machine; a lazy mount
    # also drops its files' pages as it stores what it fetched).
    read = row["read_bytes"]
    row["goals"] = {
        "ready_le_2s": {"value": row["ready_s"], "met": row["ready_s"] <= 2.0},
        "workload_ratio_le_3": {"value": round(row["workload_s"] / cold["workload_s"], 2),
                                "met": row["workload_s"] <= 3 * cold["workload_s"]},
        "fetched_over_read_le_1_3": {"value": round(row["fetched_bytes"] / read, 3) if read else None,
                                     "met": bool(read) and row["fetched_bytes"] <= 1.3 * read,
                                     "raw_value": round((row["daemon_lazy_stats"] or {}).get("bytes_fetched", 0) / read, 3)
                                     if read else None}}
    unmount(c, mp)
    benchlib.log(f"lazy mount: {row}")
    return row


def unmount(h: fleetlib.Host, mp: str) -> None:
    """`cowfs umount`, then umount(8) if the mount is still there (a failed run must not leave it)."""
    h.umount_all()
    if benchlib.is_mounted(mp):
        subprocess.run(["umount", mp], capture_output=True, timeout=300)


def print_lazy(out: dict) -> None:
    sb, p, cl, lz = out["sandbox"], out["pull"], out["cold_local"], out["lazy"]
    print(f"sandbox: {sb['total'][0]} files, {sb['total'][1] / 2**20:.0f} MiB (data {sb['data'][1] / 2**20:.0f} MiB), "
          f"built in {sb['build_s']} s")
    print(f"push: {out['push']['bytes_uploaded'] / 2**20:.1f} MiB uploaded in {out['push']['wall_s']} s "
          f"(load {out['push']['load']})")
    print(f"pull onto host b: {p['bytes_fetched'] / 2**20:.1f} MiB raw fetched, {p['files_written']} files, "
          f"{p['wall_s']} s (load {p['load']})")
    print(f"cold local mount on b: workload (git status + import django) {cl['workload_s']} s, "
          f"{cl['read_bytes'] / 2**20:.1f} MiB read through FUSE ({cl.get('page_cache_bytes', 0) / 2**20:.1f} MiB in "
          f"the page cache afterwards) (load {cl['load']})")
    if not lz.get("available"):
        print(f"lazy mount: not available ({lz.get('error')})")
        return
    if "workload_error" in lz:
        print(f"lazy mount on host c: ready in {lz['ready_s']} s; the workload failed: {lz['workload_error']}")
        return
    g = lz["goals"]
    print(f"lazy mount on host c: ready in {lz['ready_s']} s (goal <= 2: {'met' if g['ready_le_2s']['met'] else 'MISSED'}); "
          f"workload {lz['workload_s']} s = {g['workload_ratio_le_3']['value']}x the cold local mount "
          f"(goal <= 3: {'met' if g['workload_ratio_le_3']['met'] else 'MISSED'}); fetched "
          f"{lz['fetched_bytes'] / 2**20:.1f} MiB for {lz['read_bytes'] / 2**20:.1f} MiB read = "
          f"{g['fetched_over_read_le_1_3']['value']} (goal <= 1.3: "
          f"{'met' if g['fetched_over_read_le_1_3']['met'] else 'MISSED'}) (load {lz['load']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=5, help="fleet hosts pushing forks of the base (issue: 20)")
    ap.add_argument("--lazy", action="store_true",
                    help="the lazy-mount rows instead: a 1 GiB sandbox pushed, pulled, mounted cold and lazily")
    ap.add_argument("--quick", action="store_true", help="with --lazy: a smaller sandbox (32 MiB of data, "
                    "the venv with Django only: ~180 MiB)")
    ap.add_argument("--learn", action="store_true", help="with --lazy: host a runs the workload on a cold mount "
                    "before the push, which then sends the cold start its store learned")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=BASE, help=f"the benchmark's directory, removed before and after (default {BASE}): "
                    "runs at once need one each")
    ap.add_argument("--lazy-near", action="append", default=[], metavar="SIZE",
                    help="with --lazy: one more lazy mount (a host of its own) with -o lazy_near=SIZE, its row "
                         "lazy_near=SIZE (repeatable: the same sandbox, pushed once)")
    ap.add_argument("--cowfs", default=fleetlib.COWFS, help="the cowfs CLI of every host (default: this checkout's)")
    args = ap.parse_args()
    fleetlib.COWFS = args.cowfs
    if args.quick and not args.lazy:
        ap.error("--quick goes with --lazy")
    if args.learn and not args.lazy:
        ap.error("--learn goes with --lazy")
    base = args.dir
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    if args.lazy:
        out = lazy_rows(args)
        print(json.dumps(out)) if args.json else print_lazy(out)
        return
    tar, entries = benchlib.django_tar()
    out: dict = {"machine": benchlib.machine_info(), "django_entries": entries}
    with fleetlib.fleet(base, "fleet", fleetlib.Host) as fleet:
        a = fleet.host("a")
        mp = a.mount("main")
        benchlib.run(["tar", "-xf", tar, "-C", mp], timeout=1800)
        a.run("snapshot", mp, "base")
        t0 = time.monotonic()
        out["base_push"] = a.json("push", mp, "base", "origin")["pushed"]
        out["base_push"]["wall_s"] = round(time.monotonic() - t0, 2)
        out["base_push"]["remote_objects"], out["base_push"]["remote_bytes"] = remote_bytes(fleet)
        base_bytes = out["base_push"]["remote_bytes"]
        benchlib.log(f"base: {out['base_push']}")

        n = change_files(mp, 10, "a")
        changed = changed_bytes(mp, 10)
        a.run("snapshot", mp, "fork")
        out["fork_push"] = a.json("push", mp, "fork", "origin")["pushed"]
        out["fork_push"]["changed_files"] = n
        out["fork_push"]["changed_bytes"] = changed
        out["fork_push"]["goal_bytes"] = (1 << 20) + changed
        out["fork_push"]["met"] = out["fork_push"]["bytes_uploaded"] <= (1 << 20) + changed
        benchlib.log(f"fork: {out['fork_push']}")

        b = fleet.host("b")
        t0 = time.monotonic()
        out["base_pull"] = b.json("pull", "origin", "base", b.store)["pulled"]
        out["base_pull"]["wall_s"] = round(time.monotonic() - t0, 2)
        out["fork_pull"] = b.json("pull", "origin", "fork", b.store)["pulled"]
        benchlib.log(f"pulls: {out['base_pull']} {out['fork_pull']}")

        fork_changes = 0
        pushes = []
        for i in range(args.hosts):
            h = b if i == 0 else fleet.host(f"f{i}")
            if h is not b:
                h.json("pull", "origin", "base", h.store)
            fm = h.mount("base")
            change_files(fm, 10, f"host {i}")
            fork_changes += changed_bytes(fm, 10)
            h.run("snapshot", fm, f"fork-{i}")
            pushes.append(h.json("push", fm, f"fork-{i}", "origin")["pushed"])
            h.umount_all()
        count, total = remote_bytes(fleet)
        out["fleet"] = {"hosts": args.hosts, "remote_objects": count, "remote_bytes": total,
                        "base_bytes": base_bytes, "forks_changed_bytes": fork_changes,
                        "ratio_to_base": round(total / base_bytes, 3),
                        "goal_bytes": int(1.1 * base_bytes) + fork_changes,
                        "met": total <= 1.1 * base_bytes + fork_changes,
                        "uploaded_per_fork": [p["bytes_uploaded"] for p in pushes],
                        # a host's first push after its pull: files read again, and its time
                        "files_read_per_fork": [p["files_read"] for p in pushes],
                        "push_s_per_fork": [p["seconds"] for p in pushes]}
        benchlib.log(f"fleet: {out['fleet']}")
        check = a.json("remote", "check", "origin")
        out["check_ok"] = check["ok"]
    if args.json:
        print(json.dumps(out))
    else:
        bp, fp = out["base_push"], out["fork_push"]
        print(f"base push: {bp['files']} files, {bp['objects_uploaded']} objects, {bp['bytes_uploaded']} bytes "
              f"uploaded in {bp['wall_s']} s")
        print(f"fork push (10 files, {fp['changed_bytes']} bytes changed): {fp['objects_uploaded']} objects, "
              f"{fp['bytes_uploaded']} bytes uploaded (goal <= {fp['goal_bytes']}: {'met' if fp['met'] else 'MISSED'})")
        print(f"fork pull after the base: {out['fork_pull']['chunks_fetched']} chunks, "
              f"{out['fork_pull']['bytes_fetched']} bytes fetched")
        fl = out["fleet"]
        print(f"{fl['hosts']} hosts pushing forks: remote {fl['remote_bytes']} bytes = {fl['ratio_to_base']}x the base "
              f"(goal <= {fl['goal_bytes']}: {'met' if fl['met'] else 'MISSED'})")
        print(f"each host's push of its fork after pulling the base: files read {fl['files_read_per_fork']} "
              f"of {bp['files']}, seconds {fl['push_s_per_fork']}")


if __name__ == "__main__":
    main()
