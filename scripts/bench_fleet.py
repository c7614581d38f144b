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

Not measured yet (not built): lazy mounts, leases, fleet gc, a 3-member etcd cluster losing a member.

Usage (root, from the repository; everything under /var/tmp/cowfs-bench-fleet, removed afterwards):
  .venv/bin/python scripts/bench_fleet.py               # 5 fleet hosts
  .venv/bin/python scripts/bench_fleet.py --hosts 20 --json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import fleetlib  # noqa: E402

BASE = "/var/tmp/cowfs-bench-fleet"


class Host(fleetlib.Host):
    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json").strip().splitlines()[-1])


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


def remote_bytes(fl: fleetlib.Fleet[Host]) -> tuple[int, int]:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=5, help="fleet hosts pushing forks of the base (issue: 20)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cowfs", default=fleetlib.COWFS, help="the cowfs CLI of every host (default: this checkout's)")
    args = ap.parse_args()
    fleetlib.COWFS = args.cowfs
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE)
    tar, entries = benchlib.django_tar()
    out: dict = {"machine": benchlib.machine_info(), "django_entries": entries}
    with fleetlib.fleet(BASE, "fleet", Host) as fleet:
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
