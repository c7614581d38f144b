#!/usr/bin/env python3
"""Long form of tests/test_crash_workload.py: hundreds of SIGKILL rounds on one store.

    .venv/bin/python scripts/soak_crash.py [--rounds 300] [--seed N] [--max-delay 1.5] [--dir DIR]

Each round runs the logged mixed workload of tests/workload.py in a fresh directory of the
mount, SIGKILLs the daemon at a random moment, lazily unmounts, requires a clean
``cowfs fsck``, mounts again and checks that the tree is a state the durability rules allow
(see tests/workload.py).  Stops at the first failure and keeps the store, the daemon log and
the workload logs in DIR for inspection (DIR is removed after a clean run unless --keep).
Exit code 0: every round passed.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mounting  # noqa: E402
import workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--max-delay", type=float, default=1.5, help="longest wait before the kill (s)")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory after success")
    ap.add_argument("--debug", action="store_true", help="run the daemon with --debug (logs every request)")
    ap.add_argument("--rollback", action="store_true",
                    help="let the workload roll back to its snapshots too (off by default: see docs/reliability.md)")
    a = ap.parse_args()
    work = a.dir or tempfile.mkdtemp(prefix="cowfs-soak-crash-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    store, mp, logs = os.path.join(work, "store"), os.path.join(work, "mnt"), os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    mounting.init_store(store)
    m = mounting.Mount(store, mp, os.path.join(work, "daemon.log"), extra_args=["--debug"] if a.debug else [])
    rnd = random.Random(a.seed)
    print(f"soak_crash: seed {a.seed}, {a.rounds} rounds, work dir {work}", flush=True)
    t0 = time.monotonic()
    previous: dict = {}
    ops = acked = inflight = 0
    ok = False
    try:
        m.start()
        for r in range(a.rounds):
            s = workload.sigkill_round(m, r, logs, rnd, a.max_delay, previous=previous,
                                       rollback=a.rollback)
            ops += s["ops"]
            acked += s["acked"]
            inflight += s["ops"] > s["acked"]
            if (r + 1) % 10 == 0 or r + 1 == a.rounds:
                print(f"  round {r + 1}: {ops} operations so far ({acked} acknowledged), "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
        m.stop()
        workload.fsck_clean(store)
        ok = True
    except AssertionError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
    finally:
        m.force_cleanup()
    elapsed = time.monotonic() - t0
    if ok:
        print(f"soak_crash: {a.rounds} rounds passed in {elapsed:.0f} s: {ops} operations, "
              f"{inflight} kills with an operation in flight, fsck clean after every kill")
        if not a.keep and not a.dir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    print(f"soak_crash: failed after {elapsed:.0f} s; store, daemon.log and logs/ kept in {work}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
