"""Crash consistency under a mixed workload: SIGKILL of the daemon at a random moment.

Each round runs tests/workload.py in a child process (creates, overwrites, in-place writes,
renames of files and directories, unlinks, fsync/fsyncdir, and snapshot / clone / delete /
rollback through .cowfs/ctl) in its own directory, kills the daemon with SIGKILL at a random
moment, clears the dead mount (lazy unmount), requires a clean ``cowfs fsck`` and mounts the
store again.  Then the tree must be exactly a state the durability rules allow: every
acknowledged operation is there (SIGKILL loses only what the daemon's memory held, and cowfs
commits every operation before acknowledging it; data at the latest on close/fsync), the one in
flight is either absent or complete (a data write may be partly done), renames and clones are
atomic, every fsynced file has its content, and every snapshot has exactly the content it had
when taken.  Earlier rounds' directories must not change.

COWFS_CRASH_ROUNDS sets the number of rounds (default 20); scripts/soak_crash.py runs hundreds.
"""
from __future__ import annotations

import os
import random
import time

import pytest

import workload

ROUNDS = int(os.environ.get("COWFS_CRASH_ROUNDS", "20"))


@pytest.mark.timeout(60 + 20 * ROUNDS)
def test_sigkill_during_mixed_workload(cowfs_mount, tmp_path):
    m = cowfs_mount
    rnd = random.Random(int(os.environ.get("COWFS_CRASH_SEED", "20261126")))
    previous: dict = {}
    stats = []
    for r in range(ROUNDS):
        stats.append(workload.sigkill_round(m, r, str(tmp_path), rnd, previous=previous, rollback=True))
    # The last state also survives a clean unmount and checks clean.
    m.stop()
    workload.fsck_clean(m.store)
    m.start()
    total = sum(s["ops"] for s in stats)
    in_flight = sum(1 for s in stats if s["ops"] > s["acked"])
    print(f"{ROUNDS} rounds, {total} operations, {in_flight} killed with an operation in flight; "
          f"last ops: {sorted({s['last'] for s in stats})}")
    assert total > ROUNDS * 3


def _ctl(mp, line: str) -> None:
    fd = os.open(os.path.join(str(mp), ".cowfs", "ctl"), os.O_RDWR)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_create_right_after_rollback_is_not_lost(cowfs_mount):
    """Found by the workload with rollbacks (scripts/soak_crash.py --rollback): after `rollback`
    returned, a file created in a directory whose name the kernel had cached landed in the
    detached pre-rollback tree (the root's names were invalidated asynchronously; 29 of 40 lost
    on a loaded machine).  Fixed by invalidating synchronously; this keeps it fixed.  Many names
    under the root widen the window (each is invalidated in turn)."""
    mp = cowfs_mount.path
    names = [f"d{j}" for j in range(1000)]
    for n in names:
        os.mkdir(mp / n)
    _ctl(mp, "snapshot base")
    lost = []
    for i in range(20):
        for n in names:
            os.stat(mp / n)  # the kernel caches every name
        _ctl(mp, "rollback base")
        (mp / names[-1] / f"f{i}").write_bytes(b"created after the rollback returned")
        time.sleep(0.01)
        if not (mp / names[-1] / f"f{i}").exists():
            lost.append(i)
    assert not lost, f"{len(lost)} of 20 files created right after `rollback` vanished: {lost}"
