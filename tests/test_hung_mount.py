"""A mount whose daemon hangs or died without releasing its FUSE connection is cleared by
`cowfs umount` (and by `cowfs mount` over it) without touching it, releases the processes
waiting in it, and loses nothing acknowledged.

The dead-but-held case is the one a fresh-clone CI run met: a daemon SIGKILLed while one of
its own threads waited in a request to its own mount stays a zombie with /dev/fuse open, so
the kernel never aborts the connection and every access to the mount blocks.  Here another
process holds a duplicate of the daemon's /dev/fuse descriptor (pidfd_getfd), which leaves
the connection in exactly that state after the SIGKILL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import mounting

HOLDER = r"""
import ctypes, os, sys, time
pid = int(sys.argv[1])
fds = [int(n) for n in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{n}") == "/dev/fuse"]
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
for fd in fds:
    if libc.syscall(438, pidfd, fd, 0) < 0:  # pidfd_getfd
        sys.exit(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
print(len(fds), flush=True)
time.sleep(3600)
"""


def daemon_pid(store) -> int:
    with open(os.path.join(store, "daemon.pid")) as f:
        return int(f.read())


def write_synced(path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _waits_in_fuse(pid: int) -> bool:
    """The kernel shows pid asleep waiting for a FUSE request's answer."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "request_wait_answer"
    except OSError:
        return False


def blocked_stat(path) -> subprocess.Popen:
    """A process that looks a name up in the mount; asserts that it hangs there: still running
    after 1 s, or sooner seen waiting in the lookup's FUSE request (/proc/PID/wchan) and still
    there 0.2 s later."""
    p = subprocess.Popen(["stat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not _waits_in_fuse(p.pid):
        time.sleep(0.02)
    if time.monotonic() < deadline:
        time.sleep(0.2)
        if not _waits_in_fuse(p.pid):
            p.kill()  # not left behind, blocked somewhere else in the mount
            p.wait(timeout=30)
            raise AssertionError("the lookup did not stay in its FUSE request: the test's premise does not hold")
    assert p.poll() is None, "the lookup did not hang: the test's premise does not hold"
    return p


class Scenario:
    """A background-mounted store with one fsynced file; cleans everything up on exit."""

    def __init__(self, tmp_path, test_dir) -> None:
        self.store = mounting.init_store(tmp_path / "store")
        self.mp = test_dir / "mnt"
        self.mp.mkdir()
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Scenario":
        mounting.run_cowfs("mount", self.store, self.mp, timeout=60)
        self.pid = daemon_pid(self.store)
        mounting.call_with_timeout(write_synced, self.mp / "kept", b"fsynced before the hang", timeout=20)
        return self

    def hold_and_kill(self) -> None:
        """Leave the connection open with nobody serving it: the zombie-daemon state."""
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(self.pid)], stdout=subprocess.PIPE, text=True)
        self.procs.append(holder)
        assert holder.stdout.readline().strip() == "1", "could not duplicate the daemon's /dev/fuse descriptor"
        os.kill(self.pid, signal.SIGKILL)
        assert mounting.wait_pid_gone(self.pid, 10)

    def released(self, p: subprocess.Popen) -> int:
        try:
            return p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("a process waiting in the mount was not released")

    def check_remount(self) -> None:
        assert not mounting.is_mounted(self.mp)
        mounting.run_cowfs("mount", self.store, self.mp, timeout=60)
        got = mounting.call_with_timeout(lambda: (self.mp / "kept").read_bytes(), timeout=20)
        assert got == b"fsynced before the hang"
        mounting.run_cowfs("umount", self.mp, timeout=90)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)
        if mounting.is_mounted(self.mp):
            mounting.abort_fuse_connection(self.mp)
            mounting.lazy_unmount(self.mp)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, AttributeError):
            pass


@pytest.mark.timeout(120)
def test_umount_clears_the_hung_mount_of_a_dead_daemon(tmp_path, test_dir):
    with Scenario(tmp_path, test_dir) as s:
        s.hold_and_kill()
        waiting = blocked_stat(s.mp / "never-looked-up")
        s.procs.append(waiting)
        r = mounting.run_cowfs("umount", s.mp, timeout=30)
        assert b"had already died" in r.stdout, r.stdout
        assert s.released(waiting) != 0  # its lookup failed (ENOTCONN), it did not hang
        s.check_remount()


@pytest.mark.timeout(120)
def test_umount_clears_every_branch_mount_of_a_dead_daemon(tmp_path, test_dir):
    """All mounts of a store share the daemon's one FUSE connection: when it is dead, the
    umount of one clears the bind mounts of the other branches too."""
    with Scenario(tmp_path, test_dir) as s:
        err, reply = mounting.ctl_exchange(s.mp, b"branch other\n")
        assert err == 0, reply
        mp2 = test_dir / "mnt2"
        mp2.mkdir()
        try:
            mounting.run_cowfs("mount", s.store, mp2, "--branch", "other", timeout=60)
            s.hold_and_kill()
            r = mounting.run_cowfs("umount", s.mp, timeout=30)
            assert str(mp2).encode() in r.stdout, r.stdout
            assert not mounting.is_mounted(mp2) and not mounting.is_mounted(s.mp)
        finally:
            if mounting.is_mounted(mp2):
                mounting.lazy_unmount(mp2)
        s.check_remount()


@pytest.mark.timeout(120)
def test_mount_over_the_hung_mount_of_a_dead_daemon(tmp_path, test_dir):
    """`cowfs mount` reads the mount table before touching the mount point: it clears the
    dead daemon's mount instead of hanging in a stat of it."""
    with Scenario(tmp_path, test_dir) as s:
        s.hold_and_kill()
        waiting = blocked_stat(s.mp / "never-looked-up")
        s.procs.append(waiting)
        mounting.run_cowfs("mount", s.store, s.mp, timeout=60)
        s.pid = daemon_pid(s.store)
        assert s.released(waiting) != 0
        got = mounting.call_with_timeout(lambda: (s.mp / "kept").read_bytes(), timeout=20)
        assert got == b"fsynced before the hang"
        mounting.run_cowfs("umount", s.mp, timeout=90)


@pytest.mark.timeout(120)
def test_umount_force_ends_a_hung_daemon(tmp_path, test_dir):
    """A stopped daemon: plain `cowfs umount` of the busy mount fails and names --force;
    --force aborts the connection, kills the daemon and keeps what was acknowledged."""
    with Scenario(tmp_path, test_dir) as s:
        os.kill(s.pid, signal.SIGSTOP)
        waiting = blocked_stat(s.mp / "never-looked-up")
        s.procs.append(waiting)
        r = mounting.run_cowfs("umount", "--timeout", "2", s.mp, timeout=30, check=False)
        assert r.returncode != 0 and b"--force" in r.stderr, r.stderr
        r = mounting.run_cowfs("status", s.mp, timeout=60)  # answers, and says what to do
        assert b"umount --force" in r.stdout, r.stdout
        assert mounting.is_mounted(s.mp)
        r = mounting.run_cowfs("umount", "--force", s.mp, timeout=30)
        assert b"killed it" in r.stdout, r.stdout
        assert s.released(waiting) != 0
        assert mounting.wait_pid_gone(s.pid, 10), "the daemon still runs after --force"
        s.check_remount()


@pytest.mark.timeout(120)
def test_control_commands_time_out_on_a_hung_daemon(tmp_path, test_dir):
    """A control-file command (CLI or Python API) to a stopped daemon fails after its timeout
    with a message naming `umount --force`, instead of hanging; once the daemon resumes, the
    mount works (what was asked may then still happen: the answer was never seen)."""
    from cowfs import api

    with Scenario(tmp_path, test_dir) as s:
        os.kill(s.pid, signal.SIGSTOP)
        try:
            for cmd in (("snapshot", s.mp, "s1"), ("list", s.mp), ("diff", s.mp, "s1")):
                t = time.monotonic()
                r = mounting.run_cowfs(*cmd, "--timeout", "1", timeout=30, check=False)
                assert r.returncode == 1 and b"no answer" in r.stderr and b"umount --force" in r.stderr, r.stderr
                assert time.monotonic() - t < 15
            m = api.Mount(path=s.mp, store=s.store, branch_name="main", owned=False, timeout=1)
            with pytest.raises(api.NotResponding, match="umount --force"):
                m.list()
            with pytest.raises(api.NotResponding):
                m.stats()
        finally:
            os.kill(s.pid, signal.SIGCONT)
        r = mounting.run_cowfs("snapshot", s.mp, "after", "--timeout", "30", timeout=60)
        assert b"snapshot after taken" in r.stdout
        mounting.run_cowfs("umount", s.mp, timeout=90)
        assert mounting.wait_pid_gone(s.pid, 30)
        s.check_remount()
