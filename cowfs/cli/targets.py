"""What a path given to the CLI names: a place inside a cowfs mount, or a store directory.

Paths are taken as a user means them: relative to the current directory, and any path
inside a mount stands for that mount.  Everything is decided from the mount table and the
path's text (os.path.abspath, no stat): a mount whose daemon hangs must not hang the CLI
before it can say so.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from cowfs.cli.errors import CliError
from cowfs.daemon.mounts import MountEntry, mount_table


class TargetError(CliError):
    """The path is not where the command needs it; the message says why."""


@dataclass(frozen=True)
class Place:
    path: str                 # absolute, as given (lexically normalised)
    mount: MountEntry         # the cowfs mount the path is in
    rel: str                  # the path relative to the mount root ("" for the root itself)

    @property
    def mountpoint(self) -> str:
        return self.mount.mountpoint

    @property
    def store(self) -> str:
        assert self.mount.store is not None
        return self.mount.store


def _inside(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def place(path: str) -> Place | None:
    """The cowfs mount holding path (the deepest mount that does, if it is cowfs's), or None."""
    ap = os.path.abspath(path)
    found: MountEntry | None = None
    for e in mount_table():  # later entries cover earlier ones at the same point
        if _inside(ap, e.mountpoint) and (found is None or len(e.mountpoint) >= len(found.mountpoint)):
            found = e
    if found is None or found.store is None:
        return None
    rel = posixpath.relpath(ap, found.mountpoint) if ap != found.mountpoint else ""
    return Place(ap, found, "" if rel == "." else rel)


def mount_of(path: str) -> Place:
    """The mount a command is about, from any path inside it."""
    p = place(path)
    if p is None:
        if is_store(path):
            raise TargetError(f"{path} is a store, not a mount: this command works inside a mount "
                              f"(mount it with cowfs mount {path} MOUNTPOINT)")
        raise TargetError(f"{path} is not inside a cowfs mount")
    return p


def store_of(target: str) -> str:
    """The store behind the mount holding target (any path inside it), or the target itself
    (a store directory)."""
    found = place(target)
    return found.store if found is not None else os.path.abspath(target)


def daemon_of(target: str) -> str:
    """Where the daemon behind target lives (its admin socket and pid file): for a path in
    a mount, the daemon serving that mount, the store's or a branch's own, as the store's
    serve records say (cowfs.daemon.locate); for a store directory, the store's daemon."""
    from cowfs.daemon.locate import daemon_dir

    found = place(target)
    if found is None:
        return os.path.abspath(target)
    return daemon_dir(found.store, found.mountpoint)


def mountpoint_of(target: str) -> str | None:
    """The mount point of the cowfs mount holding target, or None."""
    found = place(target)
    return found.mountpoint if found is not None else None


def is_store(target: str) -> bool:
    """target is (or, unreadable to us, may be) a store directory."""
    from cowfs.offline import is_store as looks_like_store

    return looks_like_store(os.path.abspath(target))


def store_dir(target: str) -> str:
    """target as a store directory, for a command that opens the store itself."""
    if not is_store(target):
        raise TargetError(f"{target} is neither a cowfs mount nor a store")
    return os.path.abspath(target)


def in_mount(mount: Place, path: str, cwd: str | None = None) -> str:
    """A path given with a command about `mount`, as the control file takes it (relative to the
    mount root): an absolute path must be inside that mount; a relative one is taken from the
    current directory when that is inside the same mount, else from the mount root (so that
    `cd MNT/repo && cowfs clone . README.md R2` copies MNT/repo/README.md, and scripts that run
    elsewhere keep naming paths from the root)."""
    cwd = cwd if cwd is not None else _cwd()
    if os.path.isabs(path):
        full = os.path.normpath(path)
    elif cwd is not None and _inside(cwd, mount.mountpoint):
        full = os.path.normpath(os.path.join(cwd, path))
    else:
        full = os.path.normpath(os.path.join(mount.mountpoint, path))
    if not _inside(full, mount.mountpoint):
        raise TargetError(f"{path} is outside the mount {mount.mountpoint}")
    rel = posixpath.relpath(full, mount.mountpoint)
    if rel == ".":
        raise TargetError(f"{path} is the mount root itself")
    return rel


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed, or gone with a rollback
        return os.environ.get("PWD")
