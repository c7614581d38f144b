"""The kernel's table of cowfs mounts, and ways to take a mount away.

Everything here reads /proc/self/mountinfo and never touches the mount itself: a stat of a
FUSE mount whose daemon hangs (stopped, or killed while one of its own threads waits in a
request to it, which keeps its /dev/fuse descriptor open) blocks forever.  Such a mount is
cleared by aborting its FUSE connection (fusectl's `abort` file), which fails every waiting
request with ENOTCONN, and a lazy unmount.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

from cowfs.errors import MountError

FUSECTL = "/sys/fs/fuse/connections"
_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    root: str  # what of the filesystem is mounted: "/", or "/.cowfs/by-view/N" for a branch's bind mount
    dev: str  # "major:minor"; for FUSE the minor names the connection in fusectl
    fstype: str
    source: str
    options: tuple[str, ...]  # per-mount and superblock options

    @property
    def store(self) -> str | None:
        """The store behind a cowfs mount (its fsname is cowfs:STORE)."""
        if self.fstype == "fuse.cowfs" and self.source.startswith("cowfs:"):
            return self.source[len("cowfs:"):]
        return None


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def pid_file(store: str) -> str:
    return os.path.join(store, "daemon.pid")


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def warmer_pid_file(store: str) -> str:
    """Holds the pid of the daemon's cold-start helper (cowfs.warming) while it runs."""
    return os.path.join(store, "warmer.pid")


def stop_warmer(store: str) -> None:
    """End the daemon's cold-start helper, if it runs: the daemon serves it until it is done
    (its private copy of the mount keeps the connection alive), and what it does is only
    speculative."""
    try:
        with open(warmer_pid_file(store)) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"warm_child.py" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def daemon_pid(store: str) -> int | None:
    """Pid of the live daemon serving this store, if any."""
    try:
        with open(pid_file(store)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _root(field: bytes) -> str:
    """A mount's root inside its filesystem.  The kernel appends "//deleted" when that dentry
    is unhashed, as a branch's bind-mount root `/.cowfs/by-view/N` is once anyone but the
    daemon looks the name up again (the daemon answers only its own threads); the mount is
    still there and still serves the branch."""
    root = _unescape(field)
    return root[: -len("//deleted")] if root.endswith("//deleted") else root


def mount_table() -> list[MountEntry]:
    """Every mount this process sees, in mount order (a later entry covers an earlier one)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, rf = left.split(), right.split()
            if len(fields) < 5 or len(rf) < 2:
                continue
            opts = fields[5].split(b",") + (rf[2].split(b",") if len(rf) > 2 else [])
            out.append(MountEntry(_unescape(fields[4]), _root(fields[3]), fields[2].decode(),
                                  _unescape(rf[0]), _unescape(rf[1]), tuple(_unescape(o) for o in opts)))
    return out


def cowfs_mounts() -> list[MountEntry]:
    return [e for e in mount_table() if e.store is not None]


def entry_at(mountpoint: str) -> MountEntry | None:
    """The topmost mount at mountpoint (an absolute path), if any."""
    found = None
    for e in mount_table():
        if e.mountpoint == mountpoint:
            found = e
    return found


def mounted_store(mountpoint: str) -> str | None:
    """The store behind a cowfs mount point."""
    e = entry_at(os.path.abspath(mountpoint))
    return e.store if e is not None else None


def store_mounted(store: str) -> bool:
    return any(e.store == store for e in mount_table())


def connection_mounts(dev: str) -> list[MountEntry]:
    """Every mount of one FUSE connection: the daemon's mount and the bind mounts of branches."""
    return [e for e in mount_table() if e.dev == dev]


def fusermount() -> str:
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/bin", "/bin"]:
        p = os.path.join(d, "fusermount3")
        if os.access(p, os.X_OK):
            return p
    raise MountError("fusermount3 not found: install the Debian package fuse3")


def unmount_command(mountpoint: str, lazy: bool = False) -> list[str]:
    return [fusermount(), "-u"] + (["-z"] if lazy else []) + ["--", mountpoint]


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    try:
        r = subprocess.run(unmount_command(mountpoint, lazy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MountError(f"fusermount3 -u {mountpoint} did not return within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise MountError(r.stderr.strip() or f"fusermount3 -u {mountpoint} failed")


def abort_connection(dev: str) -> None:
    """Abort the kernel side of a FUSE connection: every request waiting on it fails, every
    later one gets ENOTCONN.  Mounts fusectl if it is not mounted.  Best effort: a connection
    already gone (the daemon's descriptor closed) has nothing to abort."""
    minor = dev.split(":")[1]
    if not os.path.isdir(os.path.join(FUSECTL, minor)) and not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, timeout=30)
    try:
        with open(os.path.join(FUSECTL, minor, "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


def clear_connection(dev: str) -> list[str]:
    """Abort a FUSE connection and lazily unmount all its mounts (branch bind mounts first);
    the mount points cleared."""
    abort_connection(dev)
    cleared = []
    for e in sorted(connection_mounts(dev), key=lambda e: e.root == "/"):
        try:
            unmount(e.mountpoint, lazy=True)
            cleared.append(e.mountpoint)
        except MountError:
            pass  # already gone (a bind mount that went with its parent)
    return cleared


def umount(mountpoint: str, timeout: float = 60.0, force: bool = False) -> str:
    """Unmount a cowfs mount point and wait for its daemon to exit; what was done, in words.

    A live daemon flushes everything first (the kernel writes its dirty pages back, the
    daemon commits and syncs).  A dead one has nothing left to flush: its connection is
    aborted and its mounts are cleared.  force ends a live daemon the same way, as a crash
    would: the store keeps a prefix of the operations, every fsynced one included."""
    mp = os.path.abspath(mountpoint)
    entry = entry_at(mp)
    if entry is None or entry.store is None:
        raise MountError(f"{mountpoint} is not a cowfs mount")
    store = entry.store
    if not os.access(store, os.X_OK):  # its daemon.pid is out of reach: do not take it for dead
        raise MountError(f"{mountpoint} is a mount of the store {store}, which is private to its owner: "
                         "only its owner or root can unmount it")
    pid = daemon_pid(store)
    if pid is None:
        cleared = clear_connection(entry.dev)
        return (f"the daemon of {store} had already died; cleared its mount(s) {', '.join(cleared)}; "
                "as after any crash, the store holds a prefix of the operations, all fsynced ones included")
    if force:
        cleared = clear_connection(entry.dev)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_exit(pid, timeout)
        return (f"aborted the FUSE connection of daemon pid {pid} and killed it; cleared {', '.join(cleared)}; "
                "as after a crash, the store holds a prefix of the operations, all fsynced ones included")
    stop_warmer(store)
    try:
        unmount(mp, timeout=timeout)
    except MountError as exc:
        raise MountError(f"{exc}; if the daemon (pid {pid}) hangs, `cowfs umount --force {mp}` aborts it") from None
    if store_mounted(store):
        return f"unmounted {mp}; the daemon goes on serving the other mounts of {store}"
    _wait_exit(pid, timeout)
    return f"unmounted {mp}; the daemon flushed {store} and exited"


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"daemon pid {pid} did not exit within {timeout:.0f} s after unmount (stopped or "
                             f"hung?); `kill -9 {pid}` ends it, and the store then holds a prefix of the "
                             "operations, all fsynced ones included, as after a crash")
        time.sleep(0.02)
