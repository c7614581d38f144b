#!/usr/bin/env python3
"""Load soak: concurrent processes of mixed I/O with snapshots and rollbacks, for a fixed time.

    .venv/bin/python scripts/soak.py [--seconds 150] [--procs 8] [--seed N] [--dir DIR]

Mounts a fresh store and runs PROCS worker processes for SECONDS.  Each worker works in its
own directory (creates, writes, appends, reads back and verifies, renames, unlinks, mkdir,
fsync, listing); one in four also takes snapshots, rolls the branch back to them, clones and
deletes snapshots through .cowfs/ctl.  A rollback changes every worker's files under its
feet, so some errors are expected and counted separately:

    ENOENT     a file or directory vanished (a rollback or the worker's own model being stale)
    EEXIST     a name came back (rollback) where the worker created one
    ENOTEMPTY  rmdir of a directory a rollback refilled
    ESTALE     a handle or cached inode of the pre-rollback tree
    ENOTDIR / EISDIR   a name changed type after a rollback
    EBUSY      delete of a snapshot that another worker is using as a rollback target
    EXDEV      a rename racing a rollback: its source resolved in the pre-rollback tree, its
               target in the restored one (cowfs refuses renames between views)

Anything else (EIO above all, a wrong byte read back from a file no rollback touched, a
daemon that dies, an ERROR line in the daemon's log) is an unexpected error; the run fails if
there is any.  At the end the
store is unmounted and must check clean with ``cowfs fsck``.  Printed: operations done per
kind, expected errors per errno, unexpected errors, and the daemon's peak memory (VmHWM)
and VmRSS over time.  Exit 0 when there were no unexpected errors.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import multiprocessing as mp_
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mounting  # noqa: E402

ROLLBACK_WEIGHT = float(os.environ.get("COWFS_SOAK_ROLLBACK_WEIGHT", "0.3"))
EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ESTALE, errno.ENOTDIR,
            errno.EISDIR, errno.EBUSY, errno.EXDEV}


def ctl(mount: str, line: str) -> None:
    fd = os.open(os.path.join(mount, ".cowfs", "ctl"), os.O_RDWR)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def worker(mount: str, k: int, seconds: float, seed: int, brancher: bool, q) -> None:
    rnd = random.Random(seed * 1000 + k)
    home = os.path.join(mount, f"w{k}")
    ops: collections.Counter = collections.Counter()
    expected: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    # What this worker last wrote, with the rollback counter when it started writing: a read
    # must give exactly that back unless a rollback (by anyone) started since.
    files: dict[str, tuple[bytes, int]] = {}
    deadline = time.monotonic() + seconds

    snaps: list[str] = []
    i = 0
    while time.monotonic() < deadline:
        i += 1
        kind = rnd.choices(["create", "append", "read", "rename", "unlink", "mkdir", "fsync", "list",
                            "snapshot", "rollback", "clone", "delete"],
                           [10, 5, 8, 3, 3, 1, 2, 2] + ([1, ROLLBACK_WEIGHT, 1, 0.5] if brancher else [0, 0, 0, 0]))[0]
        name = f"f{rnd.randrange(40)}"
        p = os.path.join(home, name)
        try:
            if kind == "create":
                os.makedirs(home, exist_ok=True)
                data = rnd.randbytes(rnd.choice([10, 4096, 70_000, 300_000]))
                # rollbacks is read once, before finished: equal means every rollback started
                # by then has finished; one that starts later shows at the read check.  (Read
                # twice, a rollback starting in between was taken for finished, and a write
                # it raced into the pre-rollback tree was reported as a stale read.)
                started_now = rollbacks.value
                gen = started_now if started_now == finished.value else -1  # -1: one in flight
                with open(p, "wb") as f:
                    f.write(data)
                    ino = os.fstat(f.fileno()).st_ino  # cowfs: view, rollback epoch and inode
                files[name] = (data, gen, ino)
            elif kind == "append":
                with open(p, "ab") as f:
                    more = rnd.randbytes(rnd.randrange(1, 9000))
                    f.write(more)
                if name in files:
                    files[name] = (files[name][0] + more, *files[name][1:])
            elif kind == "read":
                with open(p, "rb") as f:
                    got = f.read()
                    got_ino = os.fstat(f.fileno()).st_ino
                want = files.get(name)
                if want is not None and got != want[0]:
                    files.pop(name, None)
                    if rollbacks.value == want[1]:  # only a rollback may change what we wrote
                        # The inode numbers tell a write into another tree (a different
                        # rollback epoch in bits 36-47) from one lost in the same inode.
                        unexpected.append(f"w{k}: {name} read {len(got)} bytes, wrote {len(want[0])} "
                                          f"and no rollback started since (inode written {want[2]:#x}, "
                                          f"read {got_ino:#x}, at {time.time():.3f})")
            elif kind == "rename":
                dst = f"f{rnd.randrange(40)}"
                os.rename(p, os.path.join(home, dst))
                if name in files:
                    files[dst] = files.pop(name)
                else:
                    files.pop(dst, None)
            elif kind == "unlink":
                os.unlink(p)
                files.pop(name, None)
            elif kind == "mkdir":
                os.makedirs(os.path.join(home, f"d{rnd.randrange(5)}"), exist_ok=True)
            elif kind == "fsync":
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif kind == "list":
                for _ in os.scandir(home):
                    pass
            elif kind == "snapshot":
                s = f"s{k}-{i}"
                ctl(mount, f"snapshot {s}")
                snaps.append(s)
            elif kind == "rollback" and snaps:
                with rollbacks.get_lock():
                    rollbacks.value += 1
                try:
                    ctl(mount, f"rollback {rnd.choice(snaps)}")
                finally:
                    with finished.get_lock():
                        finished.value += 1
            elif kind == "clone":
                ctl(mount, f"clone w{k}/{name} w{k}/clone-{i}")
            elif kind == "delete" and snaps:
                ctl(mount, f"delete {snaps.pop(rnd.randrange(len(snaps)))}")
            else:
                continue
            ops[kind] += 1
        except OSError as e:
            if e.errno in EXPECTED:
                expected[errno.errorcode[e.errno]] += 1
                files.pop(name, None)
            else:
                unexpected.append(f"w{k}: {kind} {name}: {errno.errorcode.get(e.errno, e.errno)} {e}")
                if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    break
    q.put((dict(ops), dict(expected), unexpected))


def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def init_worker(started, done):
    global rollbacks, finished
    rollbacks, finished = started, done  # rollbacks started, and finished


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--branchers", type=int, default=2, help="how many of the processes also snapshot, "
                    "roll back, clone and delete (default 2)")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp, removed after a clean run)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    a = ap.parse_args()
    work = a.dir or tempfile.mkdtemp(prefix="cowfs-soak-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    store = os.path.join(work, "store")
    mounting.init_store(store)
    m = mounting.Mount(store, os.path.join(work, "mnt"), os.path.join(work, "daemon.log"))
    ctx = mp_.get_context("fork")
    init_worker(ctx.Value("i", 0), ctx.Value("i", 0))
    m.start()
    pid = m.proc.pid
    t0 = time.monotonic()
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(str(m.path), k, a.seconds, a.seed, k < a.branchers, q))
             for k in range(a.procs)]
    rss = []
    ok = False
    try:
        for p in procs:
            p.start()
        results = []
        while len(results) < len(procs):
            try:
                results.append(q.get(timeout=5))
            except Exception:  # noqa: BLE001 - queue.Empty: sample memory, check the daemon
                pass
            if m.alive():
                rss.append(status(pid)["VmRSS"])
            if time.monotonic() - t0 > a.seconds + 120:
                raise RuntimeError("workers did not finish in time")
        for p in procs:
            p.join(timeout=30)
        mem = status(pid) if m.alive() else {}
        alive = m.alive()
        m.stop()
        r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=600)
        fsck = json.loads(r.stdout)
        ops: collections.Counter = collections.Counter()
        expected: collections.Counter = collections.Counter()
        unexpected: list[str] = []
        for o, e, u in results:
            ops.update(o)
            expected.update(e)
            unexpected += u
        if not alive:
            unexpected.append("the daemon died")
        with open(os.path.join(work, "daemon.log"), errors="replace") as f:
            logged = [line.strip() for line in f if " ERROR " in line]
        if logged:
            unexpected.append(f"the daemon logged {len(logged)} errors, first: {logged[0][:300]}")
            kinds = collections.Counter(line.split(" ERROR ", 1)[1][:60] for line in logged)
            unexpected += [f"  daemon log: {n} x {k}..." for k, n in kinds.most_common(5)]
        if not fsck["clean"]:
            unexpected.append(f"fsck: {fsck['problems'][:5]}")
        elapsed = time.monotonic() - t0
        figures = {"unexpected": unexpected[:20], "seconds": round(elapsed, 1), "procs": a.procs, "operations": sum(ops.values()),
                   "ops_per_s": round(sum(ops.values()) / a.seconds), "by_kind": dict(ops),
                   "expected_errors": dict(expected), "unexpected_errors": len(unexpected),
                   "daemon_vmhwm_mib": round(mem.get("VmHWM", 0) / 2**20, 1),
                   "daemon_vmrss_mib_first_last_max": [round(x / 2**20, 1) for x in (rss[0], rss[-1], max(rss))] if rss else [],
                   "fsck_clean": fsck["clean"]}
        print(f"soak: {a.procs} processes, {a.seconds:.0f} s: {figures['operations']} operations "
              f"({figures['ops_per_s']}/s)")
        print(f"  by kind: {dict(sorted(ops.items()))}")
        print(f"  expected errors: {dict(sorted(expected.items()))}")
        print(f"  unexpected errors: {len(unexpected)}")
        for u in unexpected[:20]:
            print(f"    {u}")
        print(f"  daemon peak memory (VmHWM): {figures['daemon_vmhwm_mib']} MiB; VmRSS first/last/max "
              f"{figures['daemon_vmrss_mib_first_last_max']} MiB")
        print(f"  fsck after unmount: {'clean' if fsck['clean'] else fsck['problems'][:5]}")
        if a.json:
            print(json.dumps(figures))
        ok = not unexpected
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        m.force_cleanup()
    if ok and not a.dir:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"soak: kept {work} (store, daemon.log)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
