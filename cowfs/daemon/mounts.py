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
import threading
import time
from dataclasses import dataclass

from cowfs.errors import MountError
from cowfs.storedir import daemon_pid, pid_alive, warmer_pid_file

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
    mount_id: int = 0  # mountinfo's first field: what /proc/PID/fdinfo/FD's mnt_id refers to

    @property
    def owner_uid(self) -> int | None:
        """The user who made a FUSE mount (its user_id= option): fusermount3 lets only that
        user (and root) unmount it."""
        for o in self.options:
            if o.startswith("user_id="):
                return int(o[len("user_id="):])
        return None

    @property
    def store(self) -> str | None:
        """The store behind a cowfs mount (its fsname is cowfs:STORE)."""
        if self.fstype == "fuse.cowfs" and self.source.startswith("cowfs:"):
            return self.source[len("cowfs:"):]
        return None


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def stop_warmer(where: str) -> None:
    """End the daemon's cold-start helper, if it runs: the daemon serves it until it is done
    (its private copy of the mount keeps the connection alive), and what it does is only
    speculative."""
    try:
        with open(warmer_pid_file(where)) as f:
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
                                  _unescape(rf[0]), _unescape(rf[1]), tuple(_unescape(o) for o in opts),
                                  int(fields[0])))
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


@dataclass
class Holder:
    """A process that keeps a mount busy, and how (as `fuser -vm` reports it)."""
    pid: int
    uid: int
    command: str
    uses: list[str]

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command}, uid {self.uid}): {'; '.join(self.uses)}"


def _under(path: str, mountpoint: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def holders(entry: MountEntry) -> tuple[list[Holder], int]:
    """The processes using one mount (current or root directory, executable, open files,
    mapped files) and how many processes could not be looked at (other users' processes,
    for anyone but root).  Reads /proc only: nothing here touches the mount itself, which
    may hang."""
    major, minor = (int(x) for x in entry.dev.split(":"))
    maps_dev = f"{major:02x}:{minor:02x}"
    found: list[Holder] = []
    hidden = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        base = f"/proc/{name}"
        uses: list[str] = []
        denied = False
        for link, what in (("cwd", "current directory"), ("root", "root directory"), ("exe", "executable")):
            try:
                if _under(os.readlink(f"{base}/{link}"), entry.mountpoint):
                    uses.append(what)
            except PermissionError:
                denied = True
            except OSError:
                pass
        try:
            fds = os.listdir(f"{base}/fd")
        except PermissionError:
            denied, fds = True, []
        except OSError:
            fds = []
        for fd in fds:
            try:
                with open(f"{base}/fdinfo/{fd}") as f:
                    info = f.read()
                mnt = next((int(ln.split()[1]) for ln in info.splitlines() if ln.startswith("mnt_id:")), None)
                if mnt == entry.mount_id:
                    uses.append(f"open file {os.readlink(f'{base}/fd/{fd}')}")
            except OSError:
                continue
        try:
            with open(f"{base}/maps") as f:
                mapped = sorted({ln.split(None, 5)[5].strip() for ln in f
                                 if ln.split(None, 5)[3:4] == [maps_dev] and len(ln.split(None, 5)) > 5})
            uses += [f"mapped file {m}" for m in mapped]
        except PermissionError:
            denied = True
        except OSError:
            pass
        if not uses:
            hidden += denied
            continue
        try:
            with open(f"{base}/comm") as f:
                command = f.read().strip()
            uid = os.stat(base).st_uid
        except OSError:
            continue  # gone meanwhile
        found.append(Holder(int(name), uid, command, uses))
    return sorted(found, key=lambda h: h.pid), hidden


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _answers(mountpoint: str, timeout: float = 3.0) -> bool | None:
    """Whether the daemon behind a mount answers a request within timeout seconds (a read
    of .cowfs/stats); None when we may not ask (no access to the mount).  The read runs in
    a thread of its own: a request to a hung daemon blocks its caller in the kernel, and
    the abandoned thread ends when the mount is aborted or the process exits."""
    out: list[bool | None] = []

    def read() -> None:
        try:
            with open(os.path.join(mountpoint, ".cowfs", "stats"), "rb") as f:
                f.read()
            out.append(True)
        except OSError:
            out.append(None)

    t = threading.Thread(target=read, name="cowfs stats", daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else False


def busy_message(entry: MountEntry, pid: int) -> str:
    """Why an unmount failed with EBUSY: who holds the mount, and --force only if the daemon
    does not answer."""
    mp = entry.mountpoint
    found, hidden = holders(entry)
    if found:
        lines = [f"{mp} is busy: in use by"] + [f"  {h.describe()}" for h in found]
        if hidden:
            lines.append(f"  (and maybe by some of the {hidden} processes of other users that uid {os.geteuid()} "
                         "cannot look at)")
        lines.append("let them finish or leave it, then unmount again")
    elif hidden:
        lines = [f"{mp} is busy, but no process that uid {os.geteuid()} may look at uses it ({hidden} processes of "
                 "other users could not be looked at: as root, cowfs umount names them)"]
    else:
        lines = [f"{mp} is busy, but no process uses it (a mount below it, or a process in another mount namespace?)"]
    answers = _answers(mp)
    if answers is False:
        lines.append(f"its daemon (pid {pid}) does not answer: `cowfs umount --force {mp}` aborts it (writes not "
                     "yet fsynced may be lost)")
    return "\n".join(lines)


def umount(mountpoint: str, timeout: float = 60.0, force: bool = False) -> str:
    """Unmount a cowfs mount point and wait for its daemon to exit; what was done, in words.

    A live daemon flushes everything first (the kernel writes its dirty pages back, the
    daemon commits and syncs).  A dead one has nothing left to flush: its connection is
    aborted and its mounts are cleared.  force ends a live daemon the same way, as a crash
    would: the store keeps a prefix of the operations, every fsynced one included.
    What the caller may not do (unmount another user's mount, kill another user's daemon)
    is refused up front with who may."""
    mp = os.path.abspath(mountpoint)
    entry = entry_at(mp)
    if entry is None or entry.store is None:
        raise MountError(f"{mountpoint} is not a cowfs mount")
    store = entry.store
    euid = os.geteuid()
    owner = entry.owner_uid
    if euid != 0 and owner is not None and owner != euid:
        raise MountError(f"{mp} was mounted by {user_name(owner)}: only that user or root may unmount it")
    try:
        os.stat(store)
    except FileNotFoundError:  # deleted while mounted: no pid file, nothing left to flush into
        unmount(mp, timeout=timeout)  # its daemon ends with its connection's last mount
        return (f"unmounted {mp}; its store {store} no longer exists (deleted while mounted), and what was "
                "written there went with it")
    except OSError:
        pass  # out of reach: os.access below says so
    if not os.access(store, os.X_OK):  # its daemon.pid is out of reach: do not take it for dead
        raise MountError(f"{mountpoint} is a mount of the store {store}, which is private to its owner: "
                         "only its owner or root can unmount it")
    from cowfs.daemon.locate import daemon_dir  # SQLite: only when unmounting

    where = daemon_dir(store, mp)  # the store's daemon, or the branch's own (cowfs.daemon.locate)
    pid = daemon_pid(where)
    if pid is None:
        cleared = clear_connection(entry.dev)
        return (f"the daemon of {store} had already died; cleared its mount(s) {', '.join(cleared)}; "
                "as after any crash, the store holds a prefix of the operations, all fsynced ones included")
    if force:
        if euid != 0:
            raise MountError(f"cowfs umount --force aborts the FUSE connection of daemon pid {pid} (run by "
                             f"{user_name(process_uid(pid))}) and kills it: only root may")
        cleared = clear_connection(entry.dev)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_exit(pid, timeout)
        return (f"aborted the FUSE connection of daemon pid {pid} and killed it; cleared {', '.join(cleared)}; "
                "as after a crash, the store holds a prefix of the operations, all fsynced ones included")
    stop_warmer(where)
    try:
        unmount(mp, timeout=timeout)
    except MountError as exc:
        if "busy" in str(exc).lower():
            raise MountError(busy_message(entry, pid)) from None
        if "did not return" in str(exc):
            raise MountError(f"{exc}; if its daemon (pid {pid}) hangs, `cowfs umount --force {mp}` aborts it") from None
        raise
    if connection_mounts(entry.dev):
        return f"unmounted {mp}; the daemon goes on serving the other mounts of {store}"
    _wait_exit(pid, timeout)
    return f"unmounted {mp}; the daemon flushed {store} and exited"


def user_name(uid: int | None) -> str:
    """"root (uid 0)", "nobody (uid 65534)", "uid 1234" (no such user), "an unknown user"."""
    if uid is None:
        return "an unknown user"
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"daemon pid {pid} did not exit within {timeout:.0f} s after unmount (stopped or "
                             f"hung?); `kill -9 {pid}` ends it, and the store then holds a prefix of the "
                             "operations, all fsynced ones included, as after a crash")
        time.sleep(0.02)
