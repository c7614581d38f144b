"""The store daemon's zygote (cowfs.daemon.zygote), on real mounts made the way `cowfs mount`
makes them (not --foreground): it forks the daemons of branches with homes of their own, each
named by its own command line; it ends with the store's daemon, killed or unmounted, leaving no
process and no socket; without it (killed, or a caller unlike it) `cowfs mount` forks the
daemon itself, and every branch keeps serving."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

import mounting
from cowfs.daemon import zygote

COWFS = mounting.cowfs_command()


def cowfs(*args: object, check: bool = True, preexec=None, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(COWFS + [str(a) for a in args], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd="/", preexec_fn=preexec,
                       env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise AssertionError(f"cowfs {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def stats(mp: Path) -> dict:
    return json.loads(cowfs("stats", mp, "--json").stdout)


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while mounting.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Store:
    """A store mounted by `cowfs mount` (its daemon in the background) and branches with homes."""

    def __init__(self, d: Path) -> None:
        self.dir, self.store, self.mp = d, d / "s", d / "s-mnt"
        self.mp.mkdir()
        cowfs("init", self.store)
        cowfs("mount", self.store, self.mp)
        self.mounts = [self.mp]
        self.sock = Path(zygote.path(str(self.store)))  # STORE/zygote.sock, or in /run/cowfs for a long path

    def branch(self, name: str) -> Path:
        cowfs("branch", self.mp, name, "--own-daemon")
        return self.dir / f"{name}-mnt"

    def mount(self, name: str, **kw) -> subprocess.CompletedProcess:
        mp = self.dir / f"{name}-mnt"
        mp.mkdir(exist_ok=True)
        r = cowfs("mount", self.store, mp, "--branch", name, **kw)
        if r.returncode == 0:
            self.mounts.append(mp)
        return r

    def close(self) -> None:
        for mp in reversed(self.mounts):
            if mounting.is_mounted(mp) and cowfs("umount", mp, check=False).returncode != 0:
                cowfs("umount", "--force", mp, check=False)


@pytest.fixture
def store(test_dir):
    s = Store(test_dir)
    yield s
    s.close()


def _write_read(mp: Path, name: str) -> None:
    (mp / name).write_bytes(name.encode() * 1000)
    assert (mp / name).read_bytes() == name.encode() * 1000


@pytest.mark.timeout(180)
def test_the_zygote_forks_a_branch_daemon_and_ends_with_the_store_daemon(store):
    z = stats(store.mp)["zygote"]["pid"]
    assert z and mounting.pid_alive(z) and store.sock.exists()
    mp = store.branch("b1")
    store.mount("b1")
    st = stats(mp)
    assert st["zygote"]["forked_by"] == z and st["branch"] == "b1"
    pid = st["daemon_pid"]
    # its command line is its own: found by its mount point, not by the store's
    assert mounting.pids_mentioning(mp) == [pid]
    assert pid not in mounting.pids_mentioning(store.mp)
    _write_read(mp, "b1")
    _write_read(store.mp, "main")
    cowfs("umount", mp)
    assert gone(pid)
    store_pid = stats(store.mp)["daemon_pid"]
    cowfs("umount", store.mp)
    assert gone(store_pid) and gone(z), "the zygote outlived its store daemon"
    assert not store.sock.exists()
    assert not [p for p in mounting.pids_mentioning(store.store) if mounting.pid_alive(p)]


@pytest.mark.timeout(180)
def test_a_store_daemon_killed_takes_its_zygote_along_and_branches_serve_on(store):
    z = stats(store.mp)["zygote"]["pid"]
    b1, b2 = store.branch("b1"), store.branch("b2")
    store.mount("b1")
    store_pid = stats(store.mp)["daemon_pid"]
    os.kill(store_pid, signal.SIGKILL)
    cowfs("umount", store.mp)  # clears the dead daemon's mount
    assert gone(z), "the zygote outlived its store daemon (killed -9)"
    assert not store.sock.exists()
    _write_read(b1, "still")  # the zygote's daemon serves on
    store.mount("b2")  # no zygote: `cowfs mount` forks the daemon itself
    assert stats(b2)["zygote"]["forked_by"] is None
    _write_read(b2, "forked")


@pytest.mark.timeout(180)
def test_a_killed_zygote_leaves_mounts_to_fork_their_daemons(store):
    z = stats(store.mp)["zygote"]["pid"]
    b1 = store.branch("b1")
    os.kill(z, signal.SIGKILL)
    assert gone(z)
    assert store.sock.exists()  # its socket stays, refusing connections
    store.mount("b1")
    assert stats(b1)["zygote"]["forked_by"] is None
    _write_read(b1, "b1")
    _write_read(store.mp, "main")  # the store's daemon is unaffected
    cowfs("umount", store.mp)
    assert not store.sock.exists()  # removed by the store's daemon at its exit


@pytest.mark.timeout(180)
def test_a_caller_unlike_the_zygote_forks_its_own_daemon_and_the_request_carries_the_environment(store):
    b1 = store.branch("b1")
    store.branch("b2")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def fewer_files() -> None:  # a child of this caller would have other limits than the zygote's
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))

    store.mount("b1", preexec=fewer_files)
    assert stats(b1)["zygote"]["forked_by"] is None
    # The zygote's daemon runs in the caller's environment: a bad fault hook is refused by it
    r = store.mount("b2", check=False, env={"COWFS_FAULTS": "no-such-point:eio"})
    assert r.returncode != 0 and "no-such-point" in r.stderr, r
    r = store.mount("b2")
    assert stats(store.dir / "b2-mnt")["zygote"]["forked_by"] == stats(store.mp)["zygote"]["pid"]
