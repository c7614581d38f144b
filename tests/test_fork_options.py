"""Mount options of a fork: the daemon's options hold for every branch it serves, so a mount
of another branch of a served store may repeat them (accepted) but not change them (refused,
naming the option and the value in force).  Both through `cowfs mount` and mount.fuse.cowfs.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Worker, run_cowfs

CTL_GID = 4242


class Forks:
    def __init__(self, base) -> None:
        self.base = base
        self.mps: list = []

    def mount(self, store, branch: str, *opts: str, check: bool = True, helper: bool = False):
        mp = self.base / f"fork-{branch}"
        mp.mkdir(exist_ok=True)
        self.mps.append(mp)
        if helper:  # mount(8)'s helper, from this checkout
            cmd = [sys.executable, "-m", "cowfs.mount_helper", str(store), str(mp), "-o",
                   ",".join((f"branch={branch}",) + opts)]
            r = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
            assert not check or r.returncode == 0, r
            return mp if check else r
        args = ["mount", store, mp, "--branch", branch] + [a for o in opts for a in ("-o", o)]
        r = run_cowfs(*args, check=check)
        return mp if check else r

    def close(self) -> None:
        for mp in reversed(self.mps):
            if mounting.is_mounted(mp):
                run_cowfs("umount", mp, check=False)
            if mounting.is_mounted(mp):
                mounting.lazy_unmount(mp)


@pytest.fixture
def forks(test_dir):
    f = Forks(test_dir)
    yield f
    f.close()


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    err = r.stderr.decode()
    assert r.returncode != 0, f"accepted: {r}"
    for w in words:
        assert w in err, f"{w!r} not in the refusal: {err}"
    return err


@pytest.mark.timeout(180)
def test_same_options_accepted_different_ones_refused_by_name(mount_factory, forks):
    m = mount_factory(options=["allow_other", f"ctl_group={CTL_GID}", "cache_l1=64M", "dedup=off"])
    for b in ("f1", "f2", "f3", "f4", "f5", "f6", "f7"):
        run_cowfs("branch", m.path, b)
    # The options in force, repeated (all, or some of them), are accepted.
    f1 = forks.mount(m.store, "f1", "allow_other")
    f2 = forks.mount(m.store, "f2", "allow_other", f"ctl_group={CTL_GID}", "cache_l1=64M", "nosuid",
                     "dedup=off", "quota_inodes=100")
    f3 = forks.mount(m.store, "f3", "allow_other,cache_size=64M", helper=True)
    (f1 / "x").write_bytes(b"forked")
    os.chmod(f1 / "x", 0o644)
    w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID)
    try:  # allow_other does hold for the fork
        assert w.call("read_file", str(f1 / "x")) == ("ok", b"forked")
        assert w.call("os.listdir", str(f2))[0] == "ok" and w.call("os.listdir", str(f3))[0] == "ok"
    finally:
        w.close()
    # A different value is refused, naming the option asked and the value in force.
    refused(forks.mount(m.store, "f4", f"ctl_group={CTL_GID + 1}", check=False),
            f"ctl_group={CTL_GID + 1}", f"in force: ctl_group={CTL_GID}")
    refused(forks.mount(m.store, "f5", "cache_l1=128M", check=False),
            f"cache_l1={128 << 20}", f"in force: cache_l1={64 << 20}")
    refused(forks.mount(m.store, "f6", "allow_other", "suid", check=False), "-o suid", "in force: nosuid")
    r = forks.mount(m.store, "f7", "branch=f7,dedup=on", check=False, helper=True)
    assert r.returncode == 32 and b"dedup=on" in r.stderr and b"in force: dedup=off" in r.stderr, r
    for b in ("f4", "f5", "f6", "f7"):
        assert not mounting.is_mounted(forks.base / f"fork-{b}")


@pytest.mark.timeout(180)
def test_allow_other_asked_of_a_daemon_without_it_is_refused(mount_factory, forks):
    m = mount_factory()  # no allow_other: no other user may enter any of its branches
    run_cowfs("branch", m.path, "b")
    err = refused(forks.mount(m.store, "b", "allow_other", check=False),
                  "-o allow_other", "in force: no allow_other")
    assert str(m.store) in err
    assert not mounting.is_mounted(forks.base / "fork-b")
    fb = forks.mount(m.store, "b", "nosuid,nodev")  # the defaults, spelled out
    w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID)
    try:
        assert w.call("os.listdir", str(fb)) == ("err", errno.EACCES)
    finally:
        w.close()
