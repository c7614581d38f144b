"""Differential POSIX test: random operation sequences run on a cowfs mount and on a plain
local directory (ext4); every return value / errno, the mtime/ctime changes of the touched
inodes and, periodically, the whole trees must agree (the machine: tests/posix_machine.py).

Two variants:

* ``test_differential_root``: operations run as root at the mount root.
* ``test_differential_unprivileged``: operations run by a worker process that dropped to an
  unprivileged uid/gid (``COWFS_TEST_UID``/``COWFS_TEST_GID``, default 65534) inside a
  directory it owns; the mount uses ``-o allow_other``.  The tree also holds root-owned entries
  (``r``: 0755 dir with a 0644 file, ``s``: sticky 1777 dir with a 0666 file) so permission
  checks (EACCES/EPERM) are exercised.

All operations run in worker processes with a timeout, so a hung daemon fails the test instead
of hanging it.  One mount per test function; the trees are emptied between examples, and in a
fraction of the examples the mount is remounted once (all metadata incl. inode numbers and
timestamps must survive).

The suite runs 60 examples per variant (posix_machine.SUITE_EXAMPLES); the long form
(``full``, scripts/test_slow.sh) ``COWFS_HYPOTHESIS_EXAMPLES`` (default 250).
``COWFS_HYPOTHESIS_STEPS``: steps per example (default 30).
"""
from __future__ import annotations

import os
import stat
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Worker
from posix_machine import EXAMPLES, STEPS, SUITE_EXAMPLES, Ctx, PosixMachine, show

TIMEOUT = max(300, int(EXAMPLES * 2.5) + 120)
SCALES = [SUITE_EXAMPLES, pytest.param(EXAMPLES, marks=pytest.mark.slow, id="full")]


def run_machine(ctx: Ctx, examples: int):
    machine = type(f"PosixMachine_{ctx.variant}", (PosixMachine,), {"ctx": ctx})
    t0 = time.monotonic()
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck), print_blob=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]))
    print(f"\n[{ctx.variant}] {ctx.examples} sequences, {ctx.steps} operations, "
          f"{ctx.remounts} remounts in {time.monotonic() - t0:.1f}s")
    if os.environ.get("COWFS_DIFF_STATS"):
        ops = sorted({op for op, _ in ctx.outcomes})
        for op in ops:
            print(f"  {op:16s} " + ", ".join(f"{k}={v}" for (o, k), v in
                                             sorted(ctx.outcomes.items()) if o == op))


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("examples", SCALES)
def test_differential_root(mount_factory, tmp_path, examples):
    mount = mount_factory()
    ref = tmp_path / "ref"
    ref.mkdir()
    worker = Worker(umask=0o022)
    try:
        ctx = Ctx("root", mount, ref, worker, worker, examples=examples)
        worker.on_timeout = mount.abort
        root_stat = worker.ok("stat", str(mount.path), True)
        os.chmod(ref, stat.S_IMODE(root_stat["mode"]))
        os.chown(ref, root_stat["uid"], root_stat["gid"])
        ctx.calibrate()
        run_machine(ctx, examples)
    finally:
        worker.close()


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("examples", SCALES)
def test_differential_unprivileged(mount_factory, test_dir, examples):
    mount = mount_factory(options=["allow_other"])
    ref = test_dir / "ref"
    ref.mkdir()
    admin = Worker(umask=0o022)
    worker = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID, umask=0o027)
    try:
        assert worker.ok("ids")[:4] == (UNPRIV_UID,) * 2 + (UNPRIV_GID,) * 2
        admin.on_timeout = worker.on_timeout = mount.abort
        ctx = Ctx("unpriv", mount, ref, worker, admin, sub="work", examples=examples)
        # The unprivileged user must be able to reach the mount (allow_other) at all.
        ctx.reset()
        r = worker.call("os.listdir", ctx.root("cowfs"))
        assert r[0] == "ok", (f"uid {UNPRIV_UID} cannot list a directory it owns on a mount "
                              f"made with -o allow_other: {show(r)}")
        ctx.calibrate()
        run_machine(ctx, examples)
    finally:
        worker.close()
        admin.close()
