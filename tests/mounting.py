"""Real-mount test harness for cowfs.

* :class:`Mount` runs ``cowfs mount --foreground STORE MP`` as a child process, waits until the
  mount is ready and always tears it down (``fusermount3 -u``, then ``-uz`` and SIGKILL as a last
  resort).  A watchdog can abort a hung daemon (SIGABRT first, so that ``PYTHONFAULTHANDLER``
  dumps its thread stacks into the daemon log) which unblocks any process stuck in a FUSE call.
* :class:`Worker` is a child process that executes filesystem operations sent over a pipe,
  optionally after dropping to another uid/gid.  Every call has a timeout, so a hung FUSE daemon
  can never hang the test process itself.
* :func:`snapshot` / :func:`compare_snapshots` capture and compare whole trees.
* :class:`MachineTurns`: the lock by which the tests of a pytest-xdist run share the machine
  (tests/conftest.py).
* The fleet's hosts (:class:`Host`: a store's user configuration, cache and AWS environment,
  running the CLI) and what the fleet tests share (``same_tree``, ``snap``, ``lazy_mounted``).

The module has no pytest dependency; it is also the worker's entry point
(``python mounting.py --worker``).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import pickle
import pty
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
KiB = 1 << 10
MiB = 1 << 20
READY_TIMEOUT = 20.0
CTL_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
HIDDEN = ".cowfs"

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

class MountError(AssertionError):
    """The cowfs daemon did not start / stop as the CLI contract says."""


class OpTimeout(AssertionError):
    """A filesystem operation did not return in time (the FUSE daemon is presumably hung)."""


def cowfs_command() -> list[str]:
    """The command that runs the cowfs CLI (``$COWFS_BIN`` overrides it)."""
    env = os.environ.get("COWFS_BIN")
    if env:
        return shlex.split(env)
    cand = REPO / ".venv" / "bin" / "cowfs"
    if cand.exists():
        return [str(cand)]
    found = shutil.which("cowfs")
    if found:
        return [found]
    raise MountError("cowfs CLI not found: run `bash scripts/setup.sh` or set COWFS_BIN")


def run_cowfs(*args, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = cowfs_command() + [str(a) for a in args]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise MountError(f"`{shlex.join(cmd)}` did not finish within {timeout}s\n"
                         f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
    if check and r.returncode != 0:
        raise MountError(f"`{shlex.join(cmd)}` exited with {r.returncode}\n"
                         f"stdout:\n{r.stdout.decode(errors='replace')}\n"
                         f"stderr:\n{r.stderr.decode(errors='replace')}")
    return r


def run_cowfs_as(uid: int, gid: int, *args, groups=(), cwd="/", text: bool = False, timeout: float = 60,
                 check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """This checkout's CLI run by uid/gid with only the supplementary groups given, as a
    fresh process of that user (it imports everything itself, as a real user's would).

    The venv's interpreter may live where that user cannot reach it (pyenv under /root), so
    the system Python 3 runs it, with this checkout and the venv's packages on its path
    (same ABI)."""
    py = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    path = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    cmd = [py, "-m", "cowfs"] + [str(a) for a in args]
    what = f"`cowfs {shlex.join(map(str, args))}` as uid {uid}"
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=text, timeout=timeout, cwd=cwd,
                           env=env, user=uid, group=gid, extra_groups=list(groups))
    except subprocess.TimeoutExpired as e:
        raise MountError(f"{what} did not finish within {timeout}s\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
    if check and r.returncode != 0:
        out, err = (r.stdout, r.stderr) if text else (r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))
        raise MountError(f"{what} exited with {r.returncode}\nstdout:\n{out}\nstderr:\n{err}")
    return r


_template_lock = threading.Lock()
_template: Path | None = None


def _store_template() -> Path:
    """One store made by `cowfs init` for this test process (removed at its exit)."""
    global _template
    with _template_lock:
        if _template is None:
            base = Path(tempfile.mkdtemp(prefix="cowfs-store-template-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
            run_cowfs("init", base / "store")
            _template = base / "store"
        return _template


def init_store(store: os.PathLike) -> Path:
    """A new empty store at store: a copy of the process's one `cowfs init` (running the
    CLI for each of the suite's few hundred stores cost 0.5-1.5 s each).  The copy is byte
    for byte what `cowfs init` makes (modes included) but for the times it records: the root
    directory's and the marker's are the template's.  An existing path goes to `cowfs init`
    itself (which refuses a non-empty one)."""
    store = Path(store)
    if os.path.lexists(store):
        run_cowfs("init", store)
    else:
        shutil.copytree(_store_template(), store, symlinks=True)
    return store


def ctl_exchange(mp, line: bytes) -> tuple[int, bytes]:
    """Open MP/.cowfs/ctl, write ``line`` as is and read the reply to its end: (errno of the
    write, 0 if it succeeded; the reply).  The tests' control-file helpers all go through it."""
    fd = os.open(os.path.join(str(mp), ".cowfs", "ctl"), os.O_RDWR)
    try:
        err = 0
        try:
            n = os.write(fd, line)
            assert n == len(line), f"short write to ctl: {n} of {len(line)}"
        except OSError as e:
            err = e.errno
        out = b""
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            out += b
        return err, out
    finally:
        os.close(fd)


def run_as(uid: int | None, gid: int | None, argv, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run a command (as uid/gid with no supplementary groups, through setpriv(1), if uid
    is given) with a timeout; output captured as text."""
    prefix = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
                                     "--clear-groups", "--"]
    try:
        return subprocess.run(prefix + [str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, cwd="/", **kw)
    except subprocess.TimeoutExpired as e:
        raise OpTimeout(f"`{shlex.join(prefix + [str(a) for a in argv])}` did not finish within {timeout}s "
                        f"(FUSE daemon hung?)\nstderr: {e.stderr!r}") from None


def run_on_tty(args: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run with stderr (and stdout) on a pseudo-terminal; return (status, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), out.decode(errors="replace")


@contextlib.contextmanager
def tmpfs(size_mb: int, prefix: str = "cowfs-tmpfs-"):
    """A tmpfs of size_mb MiB mounted on a fresh directory under /tmp (a short path: a
    store's admin socket lives in it); unmounted and removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(d)])
        if not os.path.ismount(d):
            os.rmdir(d)


def call_with_timeout(fn, *args, timeout: float = 30, what: str | None = None, **kw):
    """Run ``fn(*args, **kw)`` in a daemon thread; raise OpTimeout if it does not return in time.

    A thread stuck in a FUSE request is released once the connection is aborted (daemon killed).
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"timeout:{what or fn.__name__}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OpTimeout(f"{what or getattr(fn, '__name__', fn)}{args!r} did not return within "
                        f"{timeout}s (FUSE daemon hung?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Steps:
    """The steps of a test that stops daemons, each under a time limit of its own: a step
    still running at its limit fails the test at once, naming the step and how long it ran,
    instead of hanging until a mount's watchdog (one such wait took 400 s in CI).  A thread
    blocked in the kernel cannot be interrupted, so each step runs in one (call_with_timeout)
    and, before the failure, ``release`` ends whatever the step may wait for (SIGKILL the
    daemons, abort their FUSE connections): the step's thread can then return, and the
    test's teardown does not block in it too.  ``times``: each step's seconds, in order."""

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        self.release = release
        self.times: dict[str, float] = {}

    def __call__(self, what: str, limit: float, fn, *args, **kw):
        t0 = time.monotonic()
        try:
            return call_with_timeout(fn, *args, timeout=limit, what=what, **kw)
        except OpTimeout:
            if self.release is not None:
                self.release()
            raise OpTimeout(f"step '{what}' still running after {limit:.0f} s (the steps before it: "
                            f"{self.summary()}); the daemons were killed and their connections "
                            f"aborted") from None
        finally:
            self.times[what] = time.monotonic() - t0

    def summary(self) -> str:
        """Each step done and its time, e.g. "cut 0.01 s, kill 0.20 s"."""
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.times.items()) or "none"


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_entries() -> list[dict]:
    """Parse /proc/self/mountinfo (never touches the mounted filesystems themselves)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf = left.split()
            rf = right.split()
            out.append({
                "dev": lf[2], "mountpoint": _unescape(lf[4]), "mount_options": lf[5].split(","),
                "fstype": rf[0], "source": _unescape(rf[1]) if len(rf) > 1 else "",
                "super_options": rf[2].split(",") if len(rf) > 2 else [],
            })
    return out


def fuse_mounts_under(prefix: str) -> list[dict]:
    prefix = os.path.abspath(prefix).rstrip("/") + "/"
    return [e for e in mount_entries()
            if e["fstype"].startswith("fuse") and (e["mountpoint"] + "/").startswith(prefix)]


def mount_entry(path) -> dict | None:
    path = os.path.abspath(path)
    found = None
    for e in mount_entries():
        if e["mountpoint"] == path:
            found = e          # the last one is the top of the stack
    return found


def is_mounted(path) -> bool:
    e = mount_entry(path)
    return e is not None and e["fstype"].startswith("fuse")


def run_bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """argv run to its end within timeout (output captured), else OpTimeout naming it.
    subprocess.run's timeout kills the child and then waits for it without a bound: a child
    that SIGKILL cannot end (a fusermount3 in uninterruptible sleep) hung the caller."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            raise OpTimeout(f"`{shlex.join(argv)}` (pid {proc.pid}) still running {timeout:.0f} s "
                            f"after it started and 5 s after SIGKILL: {wait_state(proc.pid)}") from None
        raise OpTimeout(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s "
                        f"(killed): {err.decode(errors='replace').strip()}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def wait_state(pid: int) -> str:
    """Where pid waits in the kernel (its state and wchan): what a timeout names."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            return f"state {state} in {f.read() or '-'}"
    except OSError:
        return "gone"


def lazy_unmount(path, timeout: float = 30) -> None:
    run_bounded(["fusermount3", "-uz", str(path)], timeout)


def fuse_connection(path) -> str | None:
    """The FUSE connection (its number in /sys/fs/fuse/connections) mounted at path, if any."""
    e = mount_entry(path)
    return e["dev"].split(":")[1] if e is not None else None


def abort_connection(conn: str | None) -> bool:
    """Abort the kernel side of FUSE connection conn (releases every blocked request)."""
    if conn is None:
        return False
    try:
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def abort_fuse_connection(path) -> bool:
    """Abort the kernel side of the FUSE connection mounted at path."""
    return abort_connection(fuse_connection(path))


def pids_mentioning(path) -> list[int]:
    """Processes whose command line mentions ``path`` (to find a backgrounded daemon)."""
    want = os.fsencode(os.path.abspath(path))
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args and any(b"cowfs" in a for a in args):
            pids.append(int(d))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pidfd(proc: subprocess.Popen) -> int | None:
    """A pidfd of proc (readable once it exits), or None: it is reaped, or the kernel has none."""
    try:
        return os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        return None


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout), woken by the child's exit (a pidfd) rather than by Popen.wait's
    polling, whose sleeps grow to 50 ms: 0-50 ms after each daemon's exit, ~20 ms on
    average, over a thousand unmounts a run."""
    fd = _pidfd(proc)
    if fd is not None:
        try:
            waiter = select.poll()  # not select(): a test may hold over 1,024 descriptors
            waiter.register(fd, select.POLLIN)
            waiter.poll(max(0, int(timeout * 1000)))
        finally:
            os.close(fd)
    return proc.wait(timeout=0 if fd is not None else timeout)


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


# --------------------------------------------------------------------------------------------
# control file, CLI and data helpers the test modules share
# --------------------------------------------------------------------------------------------

def ctl_raw(mp, line: bytes, timeout: float = CTL_TIMEOUT) -> tuple[int, bytes]:
    """Open MP/.cowfs/ctl, write ``line`` (as is), read the reply: (errno of the write, reply)."""
    return call_with_timeout(ctl_exchange, mp, line, timeout=timeout, what=f"ctl {line[:80]!r}")


def ctl(mp, line, timeout: float = CTL_TIMEOUT) -> tuple[int, dict]:
    """One command (str: a newline is added; bytes: sent as is): (errno, parsed JSON reply).

    Checks the protocol invariants on the way: the reply is one JSON object ending in a
    newline, and the write fails exactly when the reply says ok: false, with its errno."""
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogateescape")
        if not line.endswith(b"\n"):
            line += b"\n"
    err, out = ctl_raw(mp, line, timeout)
    assert out.endswith(b"\n") and out.count(b"\n") == 1, f"reply to {line!r} is not one line: {out!r}"
    reply = json.loads(out)
    assert isinstance(reply, dict) and "ok" in reply, reply
    if reply["ok"]:
        assert err == 0, f"{line!r}: reply ok but the write failed with {errno.errorcode.get(err)}"
    else:
        assert err != 0, f"{line!r}: reply {reply} but the write succeeded"
        assert reply.get("errno") == errno.errorcode.get(err), \
            f"{line!r}: write failed with {errno.errorcode.get(err)} but the reply says {reply}"
        assert reply.get("error"), f"{line!r}: failure without a message: {reply}"
    return err, reply


def ok(mp, line, timeout: float = CTL_TIMEOUT) -> dict:
    err, reply = ctl(mp, line, timeout)
    assert err == 0 and reply["ok"], f"{line!r} failed: {reply}"
    return reply


def fails(mp, line, errname: str, timeout: float = CTL_TIMEOUT) -> dict:
    err, reply = ctl(mp, line, timeout)
    assert not reply["ok"], f"{line!r} should fail with {errname} but succeeded: {reply}"
    assert reply["errno"] == errname, f"{line!r}: expected {errname}, got {reply}"
    return reply


def names(reply: dict, key: str) -> dict:
    """The rows of a `list` reply's snapshots or branches, by name."""
    return {r["name"]: r for r in reply[key]}


def _served_json(target, args: list[str], run, timeout: float) -> dict:
    """`cowfs ARGS --json` (args name the target as the command's first argument).  Of a
    store its daemon serves: run(target), the command's own code, in this process: it asks
    the daemon as the command does, without the command's start-up (0.2-0.4 s a call on a
    quiet machine, 1 s under load; the suite asks for figures hundreds of times, often
    polling), and its reply goes through JSON as the command's does.  Of any other target
    (a store opened by the command itself): the command."""
    from cowfs.cli import admin, targets
    from cowfs.cli.errors import CliError

    t = str(target)
    if admin.served(t, targets.store_of(t)):
        try:
            return json.loads(json.dumps(run(t)))
        except CliError as e:
            raise MountError(f"`cowfs {shlex.join(args)} --json` fails: {e}") from None
    return json.loads(run_cowfs(*args, "--json", timeout=timeout).stdout)


def stats(target) -> dict:
    """``cowfs stats --json`` of a mount (or a store)."""
    from cowfs.cli import maintenance

    return _served_json(target, ["stats", str(target)], maintenance.store_stats, 60)


def disk_bytes(mp, settle: float = 0.3, timeout: float = 20.0) -> int:
    """The store's disk usage (``cowfs stats --json`` disk_bytes), once it stops moving
    (RocksDB flushes memtables in the background)."""
    deadline = time.monotonic() + timeout
    prev = stats(mp)["disk_bytes"]
    while time.monotonic() < deadline:
        time.sleep(settle)
        cur = stats(mp)["disk_bytes"]
        if cur == prev:
            return cur
        prev = cur
    return prev


def settle(mp) -> dict:
    """``cowfs dedup --wait``: the background queue emptied and copied trees shared."""
    from cowfs.cli import maintenance

    return _served_json(mp, ["dedup", str(mp), "--wait", "--timeout", "120"],
                        lambda t: maintenance.run_dedup(t, True, 120.0, quiet=True), 180)


def fsck_json(store, timeout: float = 300) -> tuple[int, dict]:
    """``cowfs fsck STORE --json`` of an unmounted store: (exit status, report).  The
    command's own code (cowfs.cli.maintenance.run_fsck, data verified) run in this process,
    in a thread with a timeout: the command's start-up cost 0.2-0.4 s a check on a quiet
    machine (1 s under load), and the suite checks stores a few hundred times; the report
    goes through JSON as the command prints it.  A store fsck cannot check (mounted, not a
    store) is a MountError, as the command's exit status 8 was."""
    from cowfs.cli import maintenance
    from cowfs.cli.errors import CliError

    try:
        code, report = call_with_timeout(maintenance.run_fsck, str(store), False, True, True,
                                         timeout=timeout, what=f"fsck {store}")
    except CliError as e:
        raise MountError(f"`cowfs fsck {store}` could not check it: {e}") from None
    return code, json.loads(json.dumps(report))


def fsck(store) -> dict:
    """``cowfs fsck --json`` of an unmounted store, which must be clean."""
    _, report = fsck_json(store)
    assert report["clean"], report["problems"][:20]
    return report


def du(path) -> int:
    """Bytes `path` takes on the disk (du -s -B1)."""
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, check=True,
                              text=True).stdout.split()[0])


def cowfs_json(*args, timeout: float = 300) -> dict:
    """`cowfs ARGS --json`, parsed (the command must succeed)."""
    return json.loads(run_cowfs(*args, "--json", timeout=timeout).stdout)


def write(path, data: bytes = b"", mode: int = 0o644, sync: bool = False) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# /proc/vmstat's counts of what the kernel took back: pages reclaimed (a directory's cached
# listing is a page of its page cache), slab objects scanned and inodes reclaimed (dentries,
# inodes), drop_caches runs.
_RECLAIM_COUNTERS = ("pgsteal_kswapd", "pgsteal_direct", "pgsteal_khugepaged", "pgsteal_proactive",
                     "slabs_scanned", "pginodesteal", "kswapd_inodesteal", "drop_pagecache", "drop_slab")


def kernel_reclaims() -> int:
    """The sum of _RECLAIM_COUNTERS so far: when it moved, the kernel may have dropped cached
    pages, dentries or inodes of any file system, a FUSE mount's as well."""
    total = 0
    with open("/proc/vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in _RECLAIM_COUNTERS:
                total += int(value)
    return total


def wait_until(cond, what: str, timeout: float = 10.0):
    """cond()'s first true value, polled until timeout (then an assertion naming what)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_log(m, text: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Wait until the daemon of Mount m logs text (proc: a command whose early end is a failure)."""
    deadline = time.monotonic() + timeout
    while text not in m.log_text():
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{m.log_tail()}"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} ended ({proc.returncode}) before the daemon logged "
                                 f"{text!r}: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Mount
# --------------------------------------------------------------------------------------------

_LIVE_MOUNTS: "set[Mount]" = set()


class Mount:
    """One cowfs mount run in the foreground as a child process.

    Attributes: ``path`` (mount point), ``store``, ``log_path``; methods ``start``, ``stop``,
    ``remount``, ``close`` (teardown, never raises), ``abort`` (hung daemon), ``log_text``.
    """

    def __init__(self, store, path, log_path, options=(), branch=None, extra_args=(),
                 ready_timeout=READY_TIMEOUT, env=None):
        self.store = Path(store)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = Path(os.path.realpath(path))   # resolved now, never while mounted
        self.log_path = Path(log_path)
        self.options = list(options)
        self.branch = branch
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.env = dict(env or {})  # for the daemon, e.g. COWFS_FAULTS (cowfs/faults.py)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self.problems: list[str] = []
        self._watchdog: threading.Timer | None = None
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = cowfs_command() + ["mount", str(self.store), str(self.path), "--foreground"]
        if self.branch:
            cmd += ["--branch", self.branch]
        for o in self.options:
            cmd += ["-o", o]
        return cmd + self.extra_args

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(lines[-n:])

    def describe(self) -> str:
        return (f"--- cowfs daemon log ({self.log_path}), last lines ---\n{self.log_tail()}\n"
                f"--- end of daemon log ---")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mounted(self) -> bool:
        return is_mounted(self.path)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Mount":
        if self.mounted():
            raise MountError(f"{self.path} is already a mount point")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {shlex.join(self.command())}\n".encode())
            log.flush()
            env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1", **self.env)
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env, cwd="/")
        _LIVE_MOUNTS.add(self)
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout
        self._wait_mounted(deadline)
        try:
            call_with_timeout(os.stat, self.path, what="stat(mount root)",
                              timeout=max(2.0, deadline - time.monotonic()))
        except OpTimeout:
            self.abort("stat of the fresh mount root hung", record=False)
            raise MountError(f"mount appeared but stat({self.path}) hangs\n{self.describe()}")
        except OSError as e:
            raise MountError(f"mount appeared but stat({self.path}) fails: {e}\n{self.describe()}")
        self.ready_seconds = time.monotonic() - t0
        return self

    def _wait_mounted(self, deadline: float) -> None:
        """Wait until the mount table has the mount, woken by its change (poll(2) on
        /proc/self/mountinfo says POLLPRI at every mount or unmount) or the daemon's exit
        (a pidfd) instead of looking every 20 ms; 0.1 s naps bound a missed wake-up."""
        waiter = select.poll()
        with open("/proc/self/mountinfo", "rb") as table:  # opened first: no change missed
            waiter.register(table.fileno(), select.POLLPRI)
            pidfd = _pidfd(self.proc)
            if pidfd is not None:
                waiter.register(pidfd, select.POLLIN)
            try:
                while not self.mounted():
                    rc = self.proc.poll()
                    if rc is not None:
                        self.exit_codes.append(rc)
                        raise MountError(f"`cowfs mount --foreground` exited with {rc} before "
                                         f"{self.path} was mounted\n{self.describe()}")
                    if time.monotonic() > deadline:
                        self.abort(f"mount not ready after {self.ready_timeout}s", record=False)
                        raise MountError(f"{self.path} was not mounted within {self.ready_timeout}s "
                                         f"of starting the daemon\n{self.describe()}")
                    waiter.poll(100)
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    def stop(self, method: str = "fusermount", timeout: float = STOP_TIMEOUT) -> int:
        """Clean unmount; returns the daemon exit code.  Raises MountError (after forcing the
        mount away) if the unmount fails or the daemon does not exit in time."""
        if self.proc is None:
            raise MountError("stop() without start()")
        deadline = time.monotonic() + timeout
        try:
            if method == "fusermount":
                busy_until = time.monotonic() + 5
                while True:     # EBUSY can happen briefly while the kernel releases files
                    r = subprocess.run(["fusermount3", "-u", str(self.path)],
                                       stdin=subprocess.DEVNULL, capture_output=True,
                                       timeout=max(1, deadline - time.monotonic()))
                    if r.returncode == 0 or not self.mounted():
                        break
                    last = r.stderr.decode(errors="replace").strip()
                    if "busy" not in last.lower():
                        raise MountError(f"`fusermount3 -u {self.path}` failed: {last}")
                    if time.monotonic() > busy_until:
                        raise MountError(f"`fusermount3 -u {self.path}` failed: {last} (a file "
                                         f"or directory on the mount is still open, or a "
                                         f"process has its cwd there)")
                    time.sleep(0.2)
            elif method == "cowfs":
                run_cowfs("umount", self.path, timeout=timeout)
            elif method == "sigterm":
                self.proc.send_signal(signal.SIGTERM)
            else:
                raise ValueError(method)
            try:
                rc = wait_exit(self.proc, max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise MountError(f"daemon (pid {self.proc.pid}) still running {timeout}s after "
                                 f"unmount via {method}") from None
            self.exit_codes.append(rc)
            if self.mounted():
                raise MountError(f"{self.path} still mounted after unmount via {method} "
                                 f"(daemon exit code {rc})")
            return rc
        except (MountError, subprocess.TimeoutExpired) as e:
            self.force_cleanup()
            raise MountError(f"{e}\n{self.describe()}") from None
        finally:
            if not self.alive() and not self.mounted():
                _LIVE_MOUNTS.discard(self)

    def remount(self, method: str = "fusermount") -> "Mount":
        rc = self.stop(method)
        if rc != 0:
            raise MountError(f"daemon exited with {rc} on a clean unmount (expected 0)\n"
                             f"{self.describe()}")
        return self.start()

    def force_cleanup(self) -> None:
        """Last resort: lazy unmount and SIGKILL.  Never raises."""
        try:
            if self.mounted():
                lazy_unmount(self.path)
        except Exception:
            pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            if self.mounted():
                lazy_unmount(self.path)
        except Exception:
            pass
        if not self.alive() and not self.mounted():
            _LIVE_MOUNTS.discard(self)

    def abort(self, reason: str, record: bool = True) -> None:
        """The daemon is presumed hung: SIGABRT it (faulthandler dumps its stacks into the log),
        then SIGKILL, abort the FUSE connection and lazily unmount.  Blocked callers get
        ENOTCONN and return."""
        with self._lock:
            if record:
                self.problems.append(reason)
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGABRT)
                    self.proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            abort_fuse_connection(self.path)
            self.force_cleanup()

    def arm_watchdog(self, seconds: float) -> None:
        self.disarm_watchdog()
        msg = (f"watchdog: the test was still running {seconds:.0f}s after it started; the daemon "
               f"was presumed hung and aborted with SIGABRT (its stacks are in the log)")
        self._watchdog = threading.Timer(seconds, self.abort, args=(msg,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def disarm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> list[str]:
        """Teardown: always unmounts.  Returns problems found (non-zero exit, hang...)."""
        self.disarm_watchdog()
        problems = list(self.problems)
        if self.proc is not None and not self.mounted() and self.proc.returncode is None:
            # nobody unmounted it, yet it is gone: the daemon quit (or is quitting) on its own
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is not None and not self.problems and \
                (not self.exit_codes or self.exit_codes[-1] != self.proc.returncode or
                 self.mounted()):
            problems.append(f"the daemon died during the test (exit code "
                            f"{self.proc.returncode}) - see its log")
            self.exit_codes.append(self.proc.returncode)
        elif self.proc is not None and (self.alive() or self.mounted()):
            try:
                rc = self.stop("fusermount")
                if rc != 0:
                    problems.append(f"daemon exited with code {rc} after a clean unmount "
                                    f"(expected 0)")
            except MountError as e:
                problems.append("teardown unmount failed: "
                                + str(e).split("\n--- cowfs daemon log")[0])
        self.force_cleanup()
        return problems


class Forks:
    """Further mounts of a store's branches (``cowfs mount STORE MP --branch NAME`` while the
    store is mounted: bind mounts served by the same daemon).  ``close()`` unmounts whatever
    is left (cleanly if possible, lazily otherwise)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.mps: list[Path] = []

    def path(self, name: str) -> Path:
        p = self.base / f"fork-{name}"
        p.mkdir(exist_ok=True)
        return Path(os.path.realpath(p))

    def mount(self, store, branch: str, name: str | None = None, check: bool = True):
        mp = self.path(name or branch)
        if mp not in self.mps:
            self.mps.append(mp)
        r = run_cowfs("mount", store, mp, "--branch", branch, timeout=60, check=check)
        return mp if check else r

    def umount(self, mp, check: bool = True):
        return run_cowfs("umount", mp, timeout=60, check=check)

    def close(self) -> list[str]:
        problems = []
        for mp in reversed(self.mps):
            if not is_mounted(mp):
                continue
            problems.append(f"fork mount {mp} was still mounted at teardown")
            for _ in range(10):
                r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True,
                                   timeout=30, stdin=subprocess.DEVNULL)
                if r.returncode == 0 or not is_mounted(mp):
                    break
                time.sleep(0.3)
            if is_mounted(mp):
                lazy_unmount(mp)
        return problems


def file_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root by its path relative to root, with its bytes (the control
    directory skipped): a branch's whole content, to compare with a model."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != HIDDEN]
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


# tests/lazyfs.py: a passthrough FUSE filesystem that drops unsynced data on a simulated power cut
LAZYFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lazyfs.py")


class Lazy:
    """One lazyfs process over a backing directory (restartable: the backing dir persists)."""

    def __init__(self, backing, mp, logfile):
        self.backing, self.mp, self.logfile = str(backing), str(mp), str(logfile)
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mp, exist_ok=True)
        self.report = self.logfile + ".cut.json"
        self.proc = None
        self.conn: str | None = None  # its FUSE connection, still abortable once lazily unmounted

    def start(self):
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, LAZYFS, self.backing, self.mp, "--report", self.report],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd="/")
        deadline = time.monotonic() + 20
        while not is_mounted(self.mp):
            assert self.proc.poll() is None, f"lazyfs exited with {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"lazyfs did not mount: {self.log()}"
            time.sleep(0.02)
        self.conn = fuse_connection(self.mp)

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()[-3000:]

    def cut(self) -> dict:
        """The power cut: unsynced data is gone, the "disk" accepts nothing more."""
        try:
            os.unlink(self.report)
        except FileNotFoundError:
            pass
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.report):
            assert time.monotonic() < deadline, f"lazyfs did not report the cut: {self.log()}"
            time.sleep(0.01)
        with open(self.report) as f:
            return json.load(f)

    def stop(self):
        """Unmount and wait for lazyfs's exit; killed (and its connection aborted) if it does
        not exit, and an OpTimeout naming what it waited for if even that does not end it."""
        if self.proc is None:
            return
        busy = ""
        if is_mounted(self.mp):
            r = run_bounded(["fusermount3", "-u", self.mp], 30)
            if r.returncode != 0:
                busy = r.stderr.decode(errors="replace").strip()
                lazy_unmount(self.mp)
        try:
            wait_exit(self.proc, 20)
        except subprocess.TimeoutExpired:
            state = wait_state(self.proc.pid)
            self.abort()
            try:
                wait_exit(self.proc, 10)
            except subprocess.TimeoutExpired:
                raise OpTimeout(f"lazyfs (pid {self.proc.pid}) still running 20 s after its unmount "
                                f"({busy or 'clean'}; {state}) and 10 s after SIGKILL and the abort "
                                f"of its connection: {wait_state(self.proc.pid)}") from None
            raise OpTimeout(f"lazyfs (pid {self.proc.pid}) did not exit within 20 s of its unmount "
                            f"({busy or 'clean'}; it was in {state}); killed") from None
        finally:
            if self.proc.poll() is not None:
                self.proc = None

    def abort(self) -> None:
        """SIGKILL lazyfs and abort its FUSE connection: every request waiting for it ends
        (EIO/ENOTCONN).  Neither waits nor forks: safe while anything else is stuck."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        abort_connection(self.conn)


def sync_tree(root: str) -> None:
    """fsync every file and directory below root (what a careful setup step would do)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def cleanup_all_mounts() -> list[str]:
    """Close every Mount still alive (session safety net)."""
    msgs = []
    for m in list(_LIVE_MOUNTS):
        msgs.append(f"leftover mount {m.path} (pid {m.pid}) force-closed")
        m.force_cleanup()
        _LIVE_MOUNTS.discard(m)
    return msgs


class MachineTurns:
    """A fair readers-writer lock between the worker processes of one pytest-xdist run.

    Each test holds ``room`` shared; a test marked ``exclusive`` holds it exclusive.  Both
    pass ``gate`` first, and an exclusive taker keeps ``gate`` until it has the room: a
    worker's next test then queues behind it instead of taking the room shared again and
    again (flock alone would let shared holders starve an exclusive waiter forever)."""

    def __init__(self, directory: Path) -> None:
        # O_CLOEXEC (Python's default): a daemon a test starts never inherits the lock.
        self._gate = os.open(directory / "cowfs-machine-gate.lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._room = os.open(directory / "cowfs-machine-room.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def turn(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------------------------

class WorkerError(AssertionError):
    pass


class Worker:
    """Child process that runs filesystem operations received over a pipe.

    ``call(op, *args)`` returns ``("ok", value)`` or ``("err", errno)``.  ``op`` is the name of
    a function in ``WORKER_OPS`` or ``"os.<name>"``.  If ``uid`` is given the worker drops to
    that uid/gid (and no supplementary groups) after importing everything it needs.
    """

    def __init__(self, uid: int | None = None, gid: int | None = None, groups=(),
                 umask: int = 0o022, default_timeout: float = 30.0, on_timeout=None):
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", "--umask", oct(umask)]
        if uid is not None:
            cmd += ["--uid", str(uid), "--gid", str(gid if gid is not None else uid),
                    "--groups", ",".join(str(g) for g in groups)]
        self.uid, self.gid = uid, gid
        self.default_timeout = default_timeout
        self.on_timeout = on_timeout
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd="/", start_new_session=True)
        r = self.call("ping", timeout=30)
        if r != ("ok", "pong"):
            raise WorkerError(f"worker did not start: {r!r}")

    def call(self, op: str, *args, timeout: float | None = None, **kwargs):
        if self.proc.poll() is not None:
            raise WorkerError(f"worker process is dead (exit code {self.proc.returncode})")
        timeout = self.default_timeout if timeout is None else timeout
        data = pickle.dumps((op, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(struct.pack("!Q", len(data)) + data)
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout

        def read_exact(n):
            buf = b""
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    msg = (f"operation {op}{args!r} did not return within {timeout}s "
                           f"(FUSE daemon hung?)")
                    if self.on_timeout is not None:
                        self.on_timeout(msg)
                    self.kill()
                    raise OpTimeout(msg)
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    raise WorkerError(f"worker died during {op}{args!r} "
                                      f"(exit code {self.proc.wait()})")
                buf += chunk
            return buf

        (n,) = struct.unpack("!Q", read_exact(8))
        res = pickle.loads(read_exact(n))
        if res[0] == "exc":
            raise WorkerError(f"worker raised in {op}{args!r}:\n{res[1]}")
        return res

    def ok(self, op: str, *args, **kwargs):
        """Like call() but raise OSError on failure and return the value."""
        r = self.call(op, *args, **kwargs)
        if r[0] == "err":
            raise OSError(r[1], f"{os.strerror(r[1])} [{op}{args!r}]")
        return r[1]

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


# ---- operations available in the worker (they run in the worker process) -------------------

def renameat2(src, dst, flags=0):
    r = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                        ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def syncfs(path) -> None:
    """syncfs(2) of the file system holding path: its dirty pages reach its daemon.  Not
    sync(2), which writes back every mount on the machine and so waits for any daemon a
    test running meanwhile (another pytest-xdist worker's) has stopped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(fd)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x08, 0x10


def fallocate(fd, mode, offset, length):
    """fallocate(2) with any mode (os.posix_fallocate has mode 0 only, and glibc emulates it)."""
    r = _libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def direct_pread(fd: int, off: int, n: int) -> bytes:
    """Up to n bytes at off (page multiples) through an O_DIRECT fd, into an aligned buffer:
    past the kernel's page cache, so the daemon serves every byte."""
    buf = mmap.mmap(-1, max(n, 4096))
    try:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        buf.close()


def direct_pwrite(fd: int, off: int, data: bytes) -> None:
    """data at off (page multiples) through an O_DIRECT fd, from an aligned buffer: the kernel
    reads no page first, the daemon sees the write as is."""
    buf = mmap.mmap(-1, len(data))
    try:
        buf[:] = data
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        buf.close()


def direct_read_all(path) -> bytes:
    """The whole file past the kernel's page cache: the daemon serves (and a lazy mount
    fetches) every byte."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return direct_pread(fd, 0, -(-os.fstat(fd).st_size // 4096) * 4096)
    finally:
        os.close(fd)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime, mtime, follow_symlinks=True, dir_fd=AT_FDCWD):
    """``atime``/``mtime``: ns integer, ``"now"`` or ``"omit"``."""
    def ts(v):
        if v == "now":
            return _Timespec(0, UTIME_NOW)
        if v == "omit":
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(v // 10**9, v % 10**9)
    arr = (_Timespec * 2)(ts(atime), ts(mtime))
    flags = 0 if follow_symlinks else AT_SYMLINK_NOFOLLOW
    r = _libc.utimensat(dir_fd, os.fsencode(path) if path is not None else None, arr, flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def futimens(fd, atime, mtime):
    def ts(v):
        if v == "now":
            return _Timespec(0, UTIME_NOW)
        if v == "omit":
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(v // 10**9, v % 10**9)
    arr = (_Timespec * 2)(ts(atime), ts(mtime))
    if _libc.futimens(fd, arr) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _w_open(path, flags, mode=0o666):
    """open(2), adding O_NONBLOCK for FIFOs so that opening one can never block."""
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            flags |= os.O_NONBLOCK
    except OSError:
        pass
    return os.open(path, flags, mode)


def _w_write_file(path, flags, mode, offset, data):
    fd = _w_open(path, flags, mode)
    try:
        if offset is None:
            return os.write(fd, data)
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _w_read_file(path, limit=1 << 24):
    fd = _w_open(path, os.O_RDONLY)
    try:
        out = []
        n = 0
        while n < limit:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            out.append(b)
            n += len(b)
        return b"".join(out)
    finally:
        os.close(fd)


def _w_read_fd_all(fd, offset=0, limit=1 << 24):
    out = []
    while True:
        b = os.pread(fd, 1 << 20, offset)
        if not b:
            return b"".join(out)
        out.append(b)
        offset += len(b)
        if offset > limit:
            return b"".join(out)


def norm_stat(st) -> dict:
    return {"ino": st.st_ino, "mode": st.st_mode, "nlink": st.st_nlink, "uid": st.st_uid,
            "gid": st.st_gid, "size": st.st_size, "rdev": st.st_rdev, "blocks": st.st_blocks,
            "atime": st.st_atime_ns, "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns,
            "blksize": st.st_blksize}


def _w_stat(path, follow=True):
    return norm_stat(os.stat(path) if follow else os.lstat(path))


def _w_fstat(fd):
    return norm_stat(os.fstat(fd))


def _errwrap(fn, *a, **k):
    try:
        return ("ok", fn(*a, **k))
    except OSError as e:
        return ("err", e.errno)


def _w_stamps(paths=(), fds=()):
    """(mtime, ctime) for lstat(path) / stat(parent) entries and fstat(fd)."""
    out = []
    for p, follow in paths:
        try:
            st = os.stat(p) if follow else os.lstat(p)
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stat.S_IFMT(st.st_mode)))
        except OSError as e:
            out.append(("err", e.errno))
    for fd in fds:
        try:
            st = os.fstat(fd)
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stat.S_IFMT(st.st_mode)))
        except OSError as e:
            out.append(("err", e.errno))
    return out


def _w_step(op, args, kwargs, watch_paths=(), watch_fds=(), min_age_ns=0):
    """Stamps before, the operation, stamps after - one round trip.

    With ``min_age_ns``, wait until the newest watched mtime/ctime is at least that old, so
    that a filesystem whose timestamps come from a coarse clock (e.g. FUSE with writeback
    cache: the kernel's jiffy clock) can show a change."""
    pre = _w_stamps(watch_paths, watch_fds)
    if min_age_ns:
        now = time.time_ns()
        newest = max([t for s in pre if s[0] != "err" for t in s[:2]
                      if now - 10**9 < t <= now + 10**9], default=None)
        if newest is not None and now - newest < min_age_ns:
            time.sleep((min_age_ns - max(0, now - newest)) / 1e9)
    fn = _resolve_op(op)
    res = _errwrap(fn, *args, **kwargs)
    post = _w_stamps(watch_paths, watch_fds)
    return pre, res, post


def make_full_tree(root: Path, small_files: int, sparse_size: int) -> None:
    """Every kind of entry and metadata a snapshot can hold, in the existing directory root:
    directories (one read-only, one sticky and empty), text, empty, big and sparse files (data
    at 0 and sparse_size - 4 MiB, a hole between), small_files small files, a hard link,
    symlinks (one dangling), a fifo, a device, xattrs (one binary), set-uid, owners, and
    distinct nanosecond times on every entry."""
    ns = 10**9
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "text").write_text("hello\n" * 1000)
    (root / "zero-length").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(100))
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(sparse_size - (4 << 20))
        f.write(b"middle")
        f.truncate(sparse_size)
    for i in range(small_files):
        (root / "dir" / f"small-{i:03d}").write_bytes(os.urandom(i * 37))
    (root / "dir" / "sub" / "deep").write_text("deep")
    os.link(root / "text", root / "dir" / "hardlink-to-text")
    os.symlink("../text", root / "dir" / "link")
    os.symlink("/nowhere", root / "dangling")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null-dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.setxattr(root / "text", "user.origin", b"test")
    os.setxattr(root / "dir", "user.dir", b"\x00binary\xff")
    os.chmod(root / "dir" / "small-001", 0o4755)
    os.chown(root / "dir" / "small-002", 1234, 5678)
    os.chown(root / "dir" / "link", 4321, 8765, follow_symlinks=False)
    os.chmod(root / "empty", 0o1777)
    for i, p in enumerate(sorted(root.rglob("*"))):
        os.utime(p, ns=(1_600_000_000 * ns + i, 1_500_000_000 * ns + i * 1001), follow_symlinks=False)
    os.chmod(root / "dir" / "sub", 0o555)                          # read-only dir: filled before its mode is set
    os.utime(root, ns=(1_600_000_000 * ns, 1_400_000_000 * ns))


def snapshot(root, content_limit=1 << 22, xattr_prefixes=("user.",), exclude_root=(HIDDEN,),
             read_contents=True):
    """Everything observable about the tree under ``root`` (not following symlinks).

    Returns {relpath: entry}; errors are recorded as ("err", errno) values, never raised.
    """
    out = {}

    def visit(rel):
        p = os.path.join(root, rel) if rel else root
        e = {}
        try:
            st = os.lstat(p)
        except OSError as ex:
            out[rel] = {"lstat": ("err", ex.errno)}
            return
        e.update(norm_stat(st))
        fmt = stat.S_IFMT(st.st_mode)
        e["type"] = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                     stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "chardev",
                     stat.S_IFBLK: "blockdev"}.get(fmt, oct(fmt))
        if fmt == stat.S_IFLNK:
            e["target"] = _errwrap(os.readlink, p)
        if fmt == stat.S_IFREG and read_contents:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    if st.st_size <= content_limit:
                        e["content"] = ("ok", _w_read_fd_all(fd))
                    else:
                        h = hashlib.sha256()
                        off = 0
                        while True:
                            b = os.pread(fd, 1 << 20, off)
                            if not b:
                                break
                            h.update(b)
                            off += len(b)
                        e["content"] = ("ok", ("sha256", h.hexdigest(), off))
                finally:
                    os.close(fd)
            except OSError as ex:
                e["content"] = ("err", ex.errno)
        if fmt in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            try:
                names = os.listxattr(p, follow_symlinks=False)
                xs = {}
                for n in sorted(names):
                    if n.startswith(tuple(xattr_prefixes)):
                        xs[n] = _errwrap(os.getxattr, p, n, follow_symlinks=False)
                e["xattrs"] = ("ok", xs)
            except OSError as ex:
                e["xattrs"] = ("err", ex.errno)
        out[rel] = e
        if fmt == stat.S_IFDIR:
            try:
                names = sorted(os.listdir(p))
            except OSError as ex:
                e["entries"] = ("err", ex.errno)
                return
            if not rel:
                names = [n for n in names if n not in exclude_root]
            e["entries"] = ("ok", names)
            for n in names:
                visit(os.path.join(rel, n) if rel else n)

    visit("")
    return out


def snapshot_tree(root, full: bool = True, loose: bool = False) -> dict[str, tuple]:
    """path -> everything lstat says (full: inode number, ctime and atime too; without them it
    compares a copy with its original) and the content; loose: not mtimes nor directory sizes
    (to compare with another filesystem)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [""] + sorted(dirnames + filenames):
            p = os.path.join(dirpath, name) if name else dirpath
            if name == "" and dirpath != str(root):
                continue
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            key = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink)
            if not loose:
                key += (st.st_size, st.st_mtime_ns)
            elif not stat.S_ISDIR(st.st_mode):
                key += (st.st_size,)
            if full:
                key += (st.st_ino, st.st_ctime_ns, st.st_atime_ns)
            if stat.S_ISLNK(st.st_mode):
                key += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    key += (f.read(),)
            elif stat.S_ISDIR(st.st_mode):
                key += (tuple(sorted(os.listdir(p))),)
            out[rel] = key
    return out


def _w_rm_contents(root, keep=()):
    """Remove everything below root (making directories writable/searchable first)."""
    def rm(p):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o700 != 0o700:
                os.chmod(p, 0o700)
            for n in os.listdir(p):
                rm(os.path.join(p, n))
            if mode & 0o700 != 0o700:
                # An fd may still refer to this directory (a model of a pre-rollback handle):
                # it must keep the mode it had, as the removed directory would.
                os.chmod(p, mode)
            os.rmdir(p)
        else:
            os.unlink(p)
    if stat.S_IMODE(os.lstat(root).st_mode) & 0o700 != 0o700:
        os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | 0o700)
    for n in os.listdir(root):
        if n not in keep:
            rm(os.path.join(root, n))
    return sorted(os.listdir(root))


def _w_list_paths(root, max_depth=3, exclude_root=(HIDDEN,)):
    """Relative paths of everything below root (lstat walk, no symlinks followed)."""
    out = []

    def walk(rel, depth):
        p = os.path.join(root, rel) if rel else root
        try:
            names = sorted(os.listdir(p))
        except OSError:
            return
        for n in names:
            if not rel and n in exclude_root:
                continue
            r = os.path.join(rel, n) if rel else n
            out.append(r)
            try:
                if depth < max_depth and stat.S_ISDIR(os.lstat(os.path.join(root, r)).st_mode):
                    walk(r, depth + 1)
            except OSError:
                pass
    walk("", 1)
    return out


def _w_close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _w_scandir_names(path):
    with os.scandir(path) as it:
        return [e.name for e in it]


WORKER_OPS = {
    "ping": lambda: "pong",
    "open": _w_open,
    "write_file": _w_write_file,
    "read_file": _w_read_file,
    "read_fd_all": _w_read_fd_all,
    "renameat2": renameat2,
    "fallocate": fallocate,
    "utimensat": utimensat,
    "futimens": futimens,
    "stat": _w_stat,
    "fstat": _w_fstat,
    "stamps": _w_stamps,
    "step": _w_step,
    "snapshot": snapshot,
    "rm_contents": _w_rm_contents,
    "close_all": _w_close_all,
    "list_paths": _w_list_paths,
    "scandir_names": _w_scandir_names,
    "ids": lambda: (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()),
    "ctl_exchange": ctl_exchange,
}


def _resolve_op(op):
    if op.startswith("os."):
        return getattr(os, op[3:])
    return WORKER_OPS[op]


def _worker_main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--uid", type=int)
    ap.add_argument("--gid", type=int)
    ap.add_argument("--groups", default="")
    ap.add_argument("--umask", default="0o022")
    a = ap.parse_args(argv)
    os.umask(int(a.umask, 8))
    if a.uid is not None:
        groups = [int(g) for g in a.groups.split(",") if g]
        os.setgroups(groups)
        os.setresgid(a.gid, a.gid, a.gid)
        os.setresuid(a.uid, a.uid, a.uid)
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    sys.stdout = sys.stderr

    def read_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = inp.read(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    while True:
        hdr = read_exact(8)
        if hdr is None:
            return 0
        (n,) = struct.unpack("!Q", hdr)
        op, args, kwargs = pickle.loads(read_exact(n))
        try:
            fn = _resolve_op(op)
            res = ("ok", fn(*args, **kwargs))
        except OSError as e:
            res = ("err", e.errno)
        except BaseException:  # noqa: BLE001 - reported to the caller
            res = ("exc", traceback.format_exc())
        data = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(struct.pack("!Q", len(data)) + data)
        out.flush()


# --------------------------------------------------------------------------------------------
# Snapshot comparison
# --------------------------------------------------------------------------------------------

def _link_groups(snap):
    by_ino = {}
    for rel, e in snap.items():
        if e.get("type") not in (None, "dir"):
            by_ino.setdefault(e["ino"], []).append(rel)
    return {rel: tuple(sorted(paths)) for paths in by_ino.values() for rel in paths}


def _fmt_bytes_diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        head = f"lengths {len(a)} vs {len(b)}"
    else:
        head = f"same length {len(a)}"
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return f"{head}; first difference at offset {i}: {a[i:i+16]!r} vs {b[i:i+16]!r}"
    return f"{head}; one is a prefix of the other"


DEFAULT_IGNORE = ("ino", "atime", "mtime", "ctime", "blocks", "blksize", "dir_size")


def compare_snapshots(a: dict, b: dict, names=("cowfs", "reference"), ignore=DEFAULT_IGNORE,
                      ignore_root=("nlink",)) -> list[str]:
    """Human-readable differences between two snapshots (empty list if equal).

    Inode numbers are compared as hard-link groups unless "ino" is not ignored, in which case
    the raw numbers are compared too.  Directory sizes are ignored unless "dir_size" is not
    in ``ignore``.
    """
    diffs = []
    na, nb = names
    la, lb = _link_groups(a), _link_groups(b)
    for rel in sorted(set(a) | set(b)):
        shown = "/" + rel if rel else "/ (root)"
        if rel not in a:
            diffs.append(f"{shown}: only in {nb}: {b[rel].get('type')}")
            continue
        if rel not in b:
            diffs.append(f"{shown}: only in {na}: {a[rel].get('type')}")
            continue
        ea, eb = a[rel], b[rel]
        keys = sorted(set(ea) | set(eb))
        for k in keys:
            if k in ignore:
                continue
            if k == "size" and "dir_size" in ignore and ea.get("type") == "dir":
                continue
            if not rel and k in ignore_root:
                continue
            va, vb = ea.get(k), eb.get(k)
            if va == vb:
                continue
            if k == "content" and va and vb and va[0] == vb[0] == "ok" and \
                    isinstance(va[1], bytes) and isinstance(vb[1], bytes):
                diffs.append(f"{shown}: content differs: {_fmt_bytes_diff(va[1], vb[1])}")
            elif k == "mode":
                diffs.append(f"{shown}: mode {na}={oct(va) if va is not None else None} "
                             f"{nb}={oct(vb) if vb is not None else None}")
            else:
                ra, rb = repr(va), repr(vb)
                if len(ra) > 300:
                    ra = ra[:300] + "..."
                if len(rb) > 300:
                    rb = rb[:300] + "..."
                diffs.append(f"{shown}: {k} {na}={ra} {nb}={rb}")
        if la.get(rel) != lb.get(rel):
            diffs.append(f"{shown}: hard-link group {na}={la.get(rel)} {nb}={lb.get(rel)}")
    return diffs


def gc_batches(store, stop_after: int | None = None, chunk: int = 500) -> int:
    """Run a garbage-collection pass (cowfs.meta.gc) offline on an unmounted store, committing
    each batch, and stop after `stop_after` of them (None: the whole pass), as a daemon
    killed between two batches would; the batches committed."""
    from cowfs.meta import gc
    from cowfs.store import Store

    st = Store(str(store))
    try:
        col = gc.Collector(st.meta, st.catalog, forks=True)
        n = 0
        while stop_after is None or n < stop_after:
            c = col.next(st.catalog.leaves(), chunk)
            if c is None:
                break
            st.commit(c.batch, c.txn)
            n += 1
        st.kv.sync()
        return n
    finally:
        st.close()


def gc_batches_of_copy(store, work) -> int:
    """The batches a whole GC pass of the unmounted store commits (gc_batches), counted on a
    copy in `work` that is removed after: the store stays as it was, to be crashed into."""
    scratch = Path(work) / "scratch"
    shutil.copytree(store, scratch, symlinks=True)
    try:
        return gc_batches(scratch)
    finally:
        shutil.rmtree(scratch)


def fsck_after_gc_stops(store, work, stops) -> dict[int, list]:
    """For each k of `stops`, a copy (in `work`) of the unmounted store whose GC pass stopped
    after k batches, as a daemon killed there leaves it, checked by fsck (fsck_json): the first
    three problems of each copy fsck does not find clean, by k."""
    problems = {}
    for k in stops:
        trial = Path(work) / f"after-{k}"
        shutil.copytree(store, trial, symlinks=True)
        gc_batches(trial, stop_after=k)
        _, rep = fsck_json(trial, 120)
        if not rep["clean"]:
            problems[k] = rep["problems"][:3]
        shutil.rmtree(trial)
    return problems


def sigkill(m: "Mount") -> None:
    """SIGKILL the daemon (its exit recorded as intended) and clear the dead mount: the store
    is left as the crash left it."""
    os.kill(m.proc.pid, signal.SIGKILL)
    m.exit_codes.append(m.proc.wait(timeout=10))
    lazy_unmount(m.path)


def died(m: "Mount", command: str, *args) -> None:
    """Run `cowfs COMMAND MOUNT ARGS...`, which the daemon dies in (an armed `kill` fault in
    COWFS_FAULTS): the command fails, the daemon's SIGKILL is recorded as intended, and the
    dead mount is cleared, so the store is left as the crash left it."""
    r = run_cowfs(command, m.path, *args, check=False)
    assert r.returncode != 0, f"{command} {args}: the daemon answered instead of dying: {r.stdout!r}"
    rc = m.proc.wait(timeout=30)
    assert rc == -signal.SIGKILL, f"the daemon exited {rc}, not by its SIGKILL fault: {m.log_tail()}"
    m.exit_codes.append(rc)
    lazy_unmount(m.path)


def close_after_kill(fd: int) -> None:
    """Close fd, opened on a mount whose daemon was then killed: the kernel sends the close's
    FLUSH to the dead connection and answers ENOTCONN, unless the daemon had declined FLUSH
    before it died (a close earlier on that connection), so either outcome is the kernel's."""
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


def sigkill_fsck_start(m: "Mount") -> None:
    """SIGKILL the daemon, clear the dead mount, require a clean fsck, mount again."""
    sigkill(m)
    code, report = fsck_json(m.store, 120)
    assert code == 0 and report["clean"], f"fsck after SIGKILL: {report['problems'][:20]}"
    m.start()


# --- the fleet: hosts of one remote (tests/test_fleet*.py) ---------------------------------

FLEET_IGNORE = ("ino", "ctime", "blocks", "blksize", "dir_size")


class Host:
    """One machine of the fleet: its environment (config, cache, AWS variables) and stores."""

    def __init__(self, name: str, base: Path, aws: dict[str, str | None]) -> None:
        self.name = name
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for k, v in aws.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env["XDG_CONFIG_HOME"] = str(base / "config")
        env["XDG_CACHE_HOME"] = str(base / "cache")
        self.env = env

    def cowfs(self, *args, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        r = run_cowfs(*args, check=False, timeout=timeout, env=self.env)
        r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        if check and r.returncode != 0:
            raise AssertionError(f"cowfs {' '.join(map(str, args))} on {self.name} exited {r.returncode}:\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def json(self, *args, timeout: float = 180) -> dict:
        r = self.cowfs(*args, "--json", timeout=timeout)
        return json.loads(r.stdout)

    def tty(self, *args) -> tuple[int, str]:
        """Run with stdout and stderr on a pseudo-terminal: (status, what it showed)."""
        env = [f"{k}={v}" for k, v in self.env.items() if k.startswith(("AWS_", "XDG_"))]
        return run_on_tty(["env", *env, *cowfs_command(), *map(str, args)], timeout=180)

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen(cowfs_command() + [str(a) for a in args], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def same_tree(a: Path, b: Path, names=("pushed", "pulled")) -> None:
    """The two trees are equal, contents and metadata (inode numbers and ctimes aside)."""
    diffs = compare_snapshots(snapshot(str(a)), snapshot(str(b)), names=names, ignore=FLEET_IGNORE)
    assert not diffs, "\n".join(diffs[:30])


def snap(m, name: str) -> Path:
    """Snapshot mount m as `name`; the snapshot's directory."""
    ok(m.path, f"snapshot {name}")
    return m.path / ".cowfs" / "snapshots" / name


def push_files(h: Host, m, files: dict[str, bytes], name: str = "base") -> Path:
    """Write files into mount m, snapshot it as `name` and push that by host h to its
    remote 'origin'; the snapshot's directory."""
    for fname, content in files.items():
        (m.path / fname).write_bytes(content)
    pushed = snap(m, name)
    h.json("push", m.path, name, "origin")
    return pushed


def big_tree(root: Path, files: int = 5, size: int = 8 << 20) -> None:
    """Incompressible files (40 MiB by default: a push of several packs, to kill midway)."""
    for i in range(files):
        (root / f"blob-{i}").write_bytes(os.urandom(size))


def wait_for_objects(s3, bucket: str, prefix: str, proc: subprocess.Popen, at_least: int = 1) -> None:
    """Until the bucket holds at_least objects under prefix (proc, a push, still running)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
        if got >= at_least:
            return
        assert proc.poll() is None, f"the push ended before it was interrupted: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} objects under {prefix} after 120 s")


def check_a_killed_push_resumes(a: Host, b: Host, s3, prefix: str, mount_factory) -> None:
    """A push of a 40 MiB tree by host a, killed -9 once its first pack index is on the S3
    engine s3: nothing is visible (b cannot pull it), what was uploaded is whole (`remote check`
    passes), the next push sends only what is missing, and b then pulls the same tree."""
    m = mount_factory()
    big_tree(m.path)                                      # 40 MiB: 3 packs
    pushed = snap(m, "big")
    p = a.popen("push", m.path, "big", "origin", "--json")
    try:
        wait_for_objects(s3.client(), s3.BUCKET, f"{prefix}/index/", p)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    r = b.cowfs("pull", "origin", "big", init_store(b.base / "s0"), check=False)
    assert r.returncode == 1 and "has no snapshot named 'big'" in r.stderr, r.stderr
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    resumed = a.json("push", m.path, "big", "origin")["pushed"]
    assert resumed["chunks_skipped"] >= 128, resumed      # a whole pack (16 MiB) was there already
    assert resumed["bytes_uploaded"] <= (40 << 20) - (16 << 20) + (1 << 20), resumed
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    store_b = init_store(b.base / "store")
    b.json("pull", "origin", "big", store_b)
    same_tree(pushed, mount_factory(store=store_b, branch="big").path)


@contextlib.contextmanager
def lazy_mounted(h: Host, source: str, mp: Path, store: Path, *options: str) -> Iterator[Path]:
    """A lazy mount by host h, always unmounted afterwards."""
    mp.mkdir(parents=True, exist_ok=True)
    h.cowfs("mount", source, mp, "--store", store, *options, timeout=300)
    try:
        yield mp
    finally:
        h.cowfs("umount", mp, check=False, timeout=120)
        if is_mounted(mp):
            lazy_unmount(mp)


def fetched(mp: Path) -> dict:
    """A lazy mount's fetch figures (its stats' "lazy")."""
    return json.loads((mp / ".cowfs" / "stats").read_text())["lazy"]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process pid stopped (SIGSTOP) for the block, always continued (SIGCONT) after it: a
    daemon or an engine that stalls.  Touch no mount of a stopped daemon meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# Every write-type request a sandbox makes, each on names of its own under a directory the
# caller prepared with `prepare_writes` (so that the kernel's permission checks pass for the
# uid that runs them): the errno name each one got ("ok" if it succeeded), and "read" / "list"
# (reads, which must keep working) with what they got: "content" (f's) and "listed" (d's names).
_WRITES_SCRIPT = r"""
import errno, json, os, sys
d = sys.argv[1]
out = {}
def p(*names): return os.path.join(d, *names)
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
attempt("open_write", lambda: os.close(os.open(p("f"), os.O_WRONLY)))
attempt("open_append", lambda: os.close(os.open(p("f"), os.O_WRONLY | os.O_APPEND)))
attempt("create", lambda: os.close(os.open(p("new"), os.O_WRONLY | os.O_CREAT, 0o644)))
attempt("mkdir", lambda: os.mkdir(p("newdir")))
attempt("mkfifo", lambda: os.mkfifo(p("fifo")))
attempt("symlink", lambda: os.symlink("f", p("sym")))
attempt("link", lambda: os.link(p("f"), p("hard")))
attempt("unlink", lambda: os.unlink(p("victim")))
attempt("rmdir", lambda: os.rmdir(p("empty")))
attempt("rename", lambda: os.rename(p("victim"), p("renamed")))
attempt("chmod", lambda: os.chmod(p("f"), 0o600))
attempt("utime", lambda: os.utime(p("f"), (1, 1)))
attempt("truncate", lambda: os.truncate(p("f"), 1))
attempt("setxattr", lambda: os.setxattr(p("f"), "user.new", b"1"))
attempt("removexattr", lambda: os.removexattr(p("f"), "user.x"))
def read():
    with open(p("f"), "rb") as f:
        out["content"] = f.read().decode()
attempt("read", read)
attempt("list", lambda: out.update(listed=sorted(os.listdir(d))))
out["mode"] = oct(os.stat(p("f")).st_mode)
print(json.dumps(out))
"""
WRITE_OPS = ("open_write", "open_append", "create", "mkdir", "mkfifo", "symlink", "link", "unlink", "rmdir",
             "rename", "chmod", "utime", "truncate", "setxattr", "removexattr")


def prepare_writes(d: Path, uid: int, gid: int, content: str) -> None:
    """The names `try_writes` works on, owned by uid: f (with content and an xattr), victim,
    the empty directory empty."""
    d.mkdir()
    (d / "f").write_text(content)
    os.setxattr(d / "f", "user.x", b"1")
    (d / "victim").write_text("victim")
    (d / "empty").mkdir()
    for q in (d, d / "f", d / "victim", d / "empty"):
        os.chown(q, uid, gid)


def try_writes(d: Path, uid: int | None, gid: int | None) -> dict:
    """Run every write-type request on d's names as uid (None: this process's, root): see
    _WRITES_SCRIPT."""
    r = run_as(uid, gid, [sys.executable, "-c", _WRITES_SCRIPT, str(d)], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker_main(sys.argv[1:]))
