"""The Python API for orchestrators: stores, mounts, snapshots, branches, rollback, clones.

    import cowfs

    cowfs.init_store("/var/lib/cowfs/agent1")
    with cowfs.mount("/var/lib/cowfs/agent1", "/srv/sandbox/agent1") as sb:
        sb.snapshot("before")
        ...                                   # the agent works in sb.path
        if broken:
            sb.rollback("before")

A :class:`Mount` talks to its daemon only through the mount's control file ``.cowfs/ctl``
(one command line in, one JSON reply out), as a process inside the sandbox would; failures
raise a :class:`CowfsError` subclass chosen by the reply's errno (:class:`AlreadyExists`
for EEXIST, :class:`NotFound` for ENOENT, ...).  Mounting and unmounting run the ``cowfs``
command in a subprocess (it forks the daemon), so this module never imports pyfuse3 or
trio, and a multi-threaded orchestrator never forks itself.

See docs/python-api.md for a worked example (fork a sandbox into N attempts, keep the best).
"""
from __future__ import annotations

import errno as _errno
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar, Union

from cowfs.daemon import mounts as _mounts
from cowfs.libc import libc
from cowfs.commands import protocol

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

CONTROL_TIMEOUT = 600.0
"""Seconds a control-file command (or the syncfs before it) may take before NotResponding."""

__all__ = [
    "CowfsError", "AlreadyExists", "SnapshotExists", "NotFound", "InvalidArgument", "Busy", "ReadOnly",
    "QuotaExceeded", "PermissionDenied", "MountError", "NotMounted", "NotResponding", "StoreError",
    "Ref", "Listing", "Change", "Mount", "init_store", "mount", "open_mount",
]


# -- exceptions ---------------------------------------------------------------------------------
class CowfsError(Exception):
    """A cowfs operation failed.  ``errno`` (an int, or None) and ``reply`` (the daemon's JSON
    reply, or None) say how."""

    errnos: tuple[int, ...] = ()

    def __init__(self, message: str, errno: int | None = None, reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.reply = reply


class AlreadyExists(CowfsError):
    """EEXIST: a snapshot or branch of that name exists, or a clone target exists."""
    errnos = (_errno.EEXIST,)


SnapshotExists = AlreadyExists


class NotFound(CowfsError):
    """ENOENT: no such snapshot, branch or path."""
    errnos = (_errno.ENOENT,)


class InvalidArgument(CowfsError):
    """EINVAL: a bad name, a snapshot given where a branch is needed, a malformed command."""
    errnos = (_errno.EINVAL,)


class Busy(CowfsError):
    """EBUSY: e.g. deleting a branch that is mounted."""
    errnos = (_errno.EBUSY,)


class ReadOnly(CowfsError):
    """EROFS: a write into a snapshot, or a branch command on a snapshot view."""
    errnos = (_errno.EROFS,)


class QuotaExceeded(CowfsError):
    """EDQUOT (or ENOSPC): the branch's byte or inode quota would be exceeded."""
    errnos = (_errno.EDQUOT, _errno.ENOSPC)


class PermissionDenied(CowfsError):
    """EPERM/EACCES: only the owner of the mount root (or root, or -o ctl_group) may do this."""
    errnos = (_errno.EPERM, _errno.EACCES)


class MountError(CowfsError):
    """Mounting or unmounting failed (the message is cowfs's one-line reason)."""


class NotMounted(CowfsError):
    """The path is not a cowfs mount (no control file)."""


class NotResponding(CowfsError):
    """ETIMEDOUT: the mount did not answer in time (a hung daemon: ``cowfs umount --force``)."""
    errnos = (_errno.ETIMEDOUT,)


class StoreError(CowfsError):
    """The store cannot be created or used."""


_BY_ERRNO: dict[int, type[CowfsError]] = {
    e: cls for cls in (AlreadyExists, NotFound, InvalidArgument, Busy, ReadOnly, QuotaExceeded, PermissionDenied)
    for e in cls.errnos
}


def error_for(err: int | None, message: str, reply: dict[str, Any] | None = None) -> CowfsError:
    """The exception for an errno value (CowfsError itself for errnos without a subclass)."""
    cls = _BY_ERRNO.get(err or 0, CowfsError)
    return cls(message, err, reply)


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """A snapshot or branch, as ``list`` reports it."""
    name: str
    kind: str                     # "snapshot" or "branch"
    parent: str | None            # snapshot: the branch it was taken on; branch: what it was made from
    created: float                # Unix time
    logical_bytes: int            # the sizes of its files (holes included)
    inodes: int
    mounted_here: bool = False    # branch: it is the branch of the mount that was asked
    quota_bytes: int | None = None
    quota_inodes: int | None = None
    allocated_bytes: int = 0      # what its files' data takes (holes excluded): what quota_bytes charges


@dataclass(frozen=True)
class Listing:
    snapshots: list[Ref]
    branches: list[Ref]

    def names(self) -> list[str]:
        return [r.name for r in self.snapshots + self.branches]

    def __contains__(self, name: object) -> bool:
        return name in self.names()


@dataclass(frozen=True)
class Change:
    change: str                   # "added", "removed", "modified" or "renamed"
    path: str
    type: str | None = None       # "file", "dir", "symlink", ...
    from_path: str | None = None  # renamed: the old path


def _ref(row: dict[str, Any]) -> Ref:
    return Ref(name=row["name"], kind=row["kind"], parent=row.get("parent"), created=row["created"],
               logical_bytes=row.get("logical_bytes", 0), inodes=row.get("inodes", 0),
               mounted_here=bool(row.get("mounted_here", False)), quota_bytes=row.get("quota_bytes"),
               quota_inodes=row.get("quota_inodes"), allocated_bytes=row.get("allocated_bytes", 0))


# -- helpers ------------------------------------------------------------------------------------
def _cowfs_cmd() -> list[str]:
    return [sys.executable, "-m", "cowfs"]


def _run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # The child must import this very cowfs, even when it was found through sys.path tricks.
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.run(_cowfs_cmd() + args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise MountError(f"`cowfs {shlex.join(args)}` did not finish within {timeout:.0f} s") from None


def _cli_message(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
    msg = lines[-1] if lines else f"exit status {r.returncode}"
    return msg[len("cowfs: "):] if msg.startswith("cowfs: ") else msg


def bounded(mountpoint: PathLike, what: str, timeout: float | None, fn: Callable[[], T]) -> T:
    """fn() in a thread of its own, waited for at most timeout seconds.

    A request to a hung FUSE daemon blocks the calling thread in the kernel, where no signal
    but SIGKILL reaches it; the caller gets NotResponding instead, and the abandoned thread
    ends when the mount is aborted (``cowfs umount --force``) or the process exits."""
    if timeout is None:
        return fn()
    out: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # handed to the caller below
            out.append((False, exc))

    t = threading.Thread(target=run, name=f"cowfs {what}", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise NotResponding(f"{mountpoint}: no answer to {what} within {timeout:g} s; if its daemon hangs, "
                            f"`cowfs umount --force {mountpoint}` ends it", _errno.ETIMEDOUT)
    ok, value = out[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def syncfs(mountpoint: PathLike, timeout: float | None = CONTROL_TIMEOUT) -> None:
    """Make the kernel hand its dirty pages for this mount to the daemon (so a snapshot,
    clone or diff that follows sees every write made before)."""
    def run() -> None:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            libc().syncfs(fd)
        finally:
            os.close(fd)

    bounded(mountpoint, "syncfs", timeout, run)


def control_reply(mountpoint: PathLike, *words: str, timeout: float | None = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Run one control-file command at a mount; return the daemon's JSON reply, whether the
    command succeeded or not (CowfsError only when there is no reply: no mount, no access,
    NotResponding after timeout seconds)."""
    return bounded(mountpoint, f"`{words[0] if words else ''}`", timeout, lambda: _exchange(mountpoint, words))


def control_streamed(mountpoint: PathLike, *words: str, item: Callable[[str, Any], None],
                     raw: Callable[[bytes], None] | None = None,
                     timeout: float | None = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Like control_reply, for a reply that may be long (`list`, `diff`): item(key, value) is
    called for each item of its lists as it is read, raw(bytes) with the reply's text as it
    comes; returns the other keys (each list as its length).  Never holds the whole reply."""
    return bounded(mountpoint, f"`{words[0] if words else ''}`", timeout,
                   lambda: _exchange(mountpoint, words, item, raw))


def _exchange(mountpoint: PathLike, words: tuple[str, ...], item: Callable[[str, Any], None] | None = None,
              raw: Callable[[bytes], None] | None = None) -> dict[str, Any]:
    from cowfs.commands.reply import read_streamed

    path = os.path.join(os.fspath(mountpoint), ".cowfs", "ctl")
    line = protocol.join(words) + "\n"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise NotMounted(f"{mountpoint} is not a cowfs mount (no .cowfs/ctl)", _errno.ENOENT) from None
    except PermissionError as exc:
        raise error_for(exc.errno, refused(mountpoint)) from None
    except OSError as exc:
        raise error_for(exc.errno, f"{mountpoint}: cannot open the control file: {exc.strerror}") from None
    write_error: OSError | None = None
    try:
        try:
            os.write(fd, line.encode("utf-8", "surrogateescape"))
        except OSError as exc:
            write_error = exc      # the reply says why
        if item is not None:
            def read(n: int) -> bytes:
                data = os.read(fd, max(n, 1 << 20))
                if raw is not None and data:
                    raw(data)
                return data
            try:
                return read_streamed(read, item)
            except ValueError:
                if write_error is not None:
                    raise error_for(write_error.errno, f"{words[0]}: {write_error.strerror}") from None
                raise CowfsError("unreadable reply from the control file") from None
        chunks = []
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except ValueError:
        if write_error is not None:
            raise error_for(write_error.errno, f"{words[0]}: {write_error.strerror}") from None
        raise CowfsError(f"unreadable reply from the control file: {raw[:200]!r}") from None


def refused(mountpoint: PathLike) -> str:
    """Why opening MOUNT/.cowfs/ctl was refused, and who may use it."""
    from cowfs.daemon.mounts import user_name

    mp = os.fspath(mountpoint)
    try:
        st = os.stat(os.path.join(mp, ".cowfs", "ctl"))
    except PermissionError:
        return (f"{mp}: permission denied: this mount was made without -o allow_other, so only the user who "
                "mounted it may use it")
    except OSError as exc:
        return f"{mp}: cannot open the control file: {exc.strerror}"
    owner = "root" if st.st_uid == 0 else f"{user_name(st.st_uid)}, the owner of the mount root, and for root"
    if st.st_uid == 0:
        owner += " (the owner of the mount root)"
    if st.st_mode & 0o060:
        import grp

        try:
            group = f"group {grp.getgrgid(st.st_gid).gr_name} (gid {st.st_gid})"
        except KeyError:
            group = f"gid {st.st_gid}"
        also = f"members of {group}, named with -o ctl_group="
    else:
        also = "members of a group named with -o ctl_group= (this mount names none)"
    return f"{mp}: permission denied: .cowfs/ctl is for {owner}, and for {also}"


def stats(mountpoint: PathLike, timeout: float | None = CONTROL_TIMEOUT) -> dict[str, Any]:
    """The daemon's figures, as the mount's world-readable ``.cowfs/stats`` shows them."""
    def read() -> dict[str, Any]:
        with open(os.path.join(os.fspath(mountpoint), ".cowfs", "stats"), "rb") as f:
            return json.loads(f.read())  # type: ignore[no-any-return]

    return bounded(mountpoint, "stats", timeout, read)


def control(mountpoint: PathLike, *words: str, timeout: float | None = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Run one control-file command at a mount; return the JSON reply or raise CowfsError."""
    reply = control_reply(mountpoint, *words, timeout=timeout)
    if not reply.get("ok"):
        name = reply.get("errno")
        err = getattr(_errno, name, None) if isinstance(name, str) else None
        raise error_for(err, str(reply.get("error") or name or "failed"), reply)
    return reply


# -- the API ------------------------------------------------------------------------------------
def init_store(path: PathLike) -> Path:
    """Create a new, empty store directory (with one branch, ``main``); return its path."""
    from cowfs.errors import StoreError as _StoreError
    from cowfs.store import init_store as _init

    p = Path(path).absolute()
    try:
        _init(str(p))
    except _StoreError as exc:
        raise StoreError(str(exc)) from None
    return p


@dataclass
class Mount:
    """A mounted branch.  ``path`` is the mount point; ``branch_name`` the branch mounted there.

    Used as a context manager, a Mount made by :func:`mount` is unmounted on exit.
    """
    path: Path
    store: Path
    branch_name: str
    owned: bool = True            # made by mount(): the context manager unmounts it
    timeout: float | None = CONTROL_TIMEOUT  # per control-file command, then NotResponding
    _umounted: bool = field(default=False, repr=False)

    @property
    def mountpoint(self) -> Path:
        return self.path

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.umount()

    def is_mounted(self) -> bool:
        return _mounts.mounted_store(str(self.path)) is not None

    def umount(self, timeout: float = 60.0) -> None:
        """Flush, unmount and (if no other branch of the store is mounted) wait for the daemon.

        As ``cowfs umount`` does it (cowfs.daemon.mounts, which imports neither pyfuse3 nor trio):
        ``fusermount3 -u`` (the kernel writes its dirty pages back first), then wait until the
        daemon has committed, synced and exited.  A dead daemon's mount is cleared.
        """
        mp = str(self.path)
        deadline = time.monotonic() + timeout
        while not self._umounted and _mounts.mounted_store(mp) is not None:
            try:
                _mounts.umount(mp, timeout=max(1.0, deadline - time.monotonic()))
            except _mounts.MountError as exc:
                busy = "busy" in str(exc).lower()
                # a process that just left the sandbox may keep it busy for a moment
                if not busy or time.monotonic() > deadline:
                    raise MountError(f"umount {mp}: {exc}", _errno.EBUSY if busy else None) from None
                time.sleep(0.1)
                continue
            break
        self._umounted = True

    def attach(self, branch: str, mountpoint: PathLike, mkdir: bool = True) -> "Mount":
        """Mount another branch of the same store (served by the same daemon; needs root)."""
        return mount(self.store, mountpoint, branch=branch, mkdir=mkdir)

    # -- control-file commands ---------------------------------------------------------------
    def control(self, *words: str) -> dict[str, Any]:
        """Run a raw control-file command; return the daemon's JSON reply."""
        return control(self.path, *words, timeout=self.timeout)

    def snapshot(self, name: str) -> dict[str, Any]:
        """Freeze the branch's current state as the read-only snapshot NAME (O(1))."""
        syncfs(self.path, self.timeout)
        return self.control("snapshot", name)

    def branch(self, name: str, source: str | None = None) -> dict[str, Any]:
        """Create branch NAME from this branch's current state, or from snapshot SOURCE."""
        if source is None:
            syncfs(self.path, self.timeout)
        return self.control("branch", name, *([source] if source else []))

    def rollback(self, name: str) -> dict[str, Any]:
        """Return this branch exactly to snapshot NAME (open files keep the old contents)."""
        return self.control("rollback", name)

    def clone(self, src: str, dst: str) -> dict[str, Any]:
        """Copy SRC (a file or a whole tree) to DST in O(1), sharing data (paths relative to the mount root;
        SRC may be ``.cowfs/snapshots/NAME/...``)."""
        syncfs(self.path, self.timeout)
        return self.control("clone", src, dst)

    def delete(self, name: str) -> dict[str, Any]:
        """Delete snapshot NAME, or branch NAME if it is not mounted anywhere."""
        return self.control("delete", name)

    def list(self) -> Listing:
        """Snapshots and branches of this mount's lineage, oldest first."""
        reply = self.control("list")
        return Listing([_ref(r) for r in reply["snapshots"]], [_ref(r) for r in reply["branches"]])

    def diff(self, a: str, b: str | None = None) -> list[Change]:
        """Paths changed from snapshot/branch A to B (default: this branch's live state)."""
        if b is None:
            syncfs(self.path, self.timeout)
        reply = self.control("diff", a, *([b] if b else []))
        return [Change(c["change"], c["path"], c.get("type"), c.get("from")) for c in reply["changes"]]

    def stats(self) -> dict[str, Any]:
        """The daemon's figures (usage, quota, cache, requests ...) from ``.cowfs/stats``."""
        return stats(self.path, self.timeout)

    def snapshot_path(self, name: str) -> Path:
        """Where snapshot NAME is readable (read-only) inside this mount."""
        return self.path / ".cowfs" / "snapshots" / name


def mount(store: PathLike, mountpoint: PathLike, branch: str = "main", options: Iterable[str] = (),
          mkdir: bool = True, timeout: float = 60.0) -> Mount:
    """Mount BRANCH of STORE at MOUNTPOINT and return once it is usable.

    ``options`` are ``cowfs mount -o`` options (``allow_other``, ``quota_bytes=1G`` ...).  A
    second branch of a store that is already mounted is served by the same daemon (a bind
    mount, root only).  ``mkdir`` creates a missing mount point.
    """
    store_p, mp = Path(store).absolute(), Path(mountpoint).absolute()
    if mkdir:
        mp.mkdir(parents=True, exist_ok=True)
    args = ["mount", str(store_p), str(mp), "--branch", branch]
    for o in options:
        args += ["-o", o]
    r = _run_cli(args, timeout)
    if r.returncode != 0:
        raise MountError(_cli_message(r))
    return Mount(path=mp, store=store_p, branch_name=branch, owned=True)


def open_mount(mountpoint: PathLike) -> Mount:
    """A Mount for an existing cowfs mount (not unmounted by the context manager)."""
    mp = Path(mountpoint).absolute()
    store = _mounts.mounted_store(str(mp))
    if store is None:
        raise NotMounted(f"{mp} is not a cowfs mount")
    listing = control(mp, "list")
    here = [b["name"] for b in listing["branches"] if b.get("mounted_here")]
    return Mount(path=mp, store=Path(store), branch_name=here[0] if here else "", owned=False)
