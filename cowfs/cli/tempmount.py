"""A branch mounted for the length of one command (`cowfs run`, `import`, `export`): the
mount that already serves it, else one made at a temporary directory and unmounted after.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from typing import Iterator

import click

from cowfs.cli.admin import branch_here
from cowfs.cli.errors import CliError
from cowfs.errors import MountError
from cowfs.daemon.mounts import cowfs_mounts
from cowfs.storedir import MARKER


def require_store(store: str) -> str:
    """store as an absolute path, if it is a store directory."""
    store = os.path.abspath(store)
    if not os.path.isfile(os.path.join(store, MARKER)):
        raise CliError(f"{store}: not a cowfs store (create one with 'cowfs init {store}')")
    return store


def find_branch_mount(store: str, branch: str) -> str | None:
    for e in cowfs_mounts():
        if e.store != store:
            continue
        try:
            if branch_here(e.mountpoint) == branch:
                return e.mountpoint
        except Exception:  # noqa: BLE001 - an unusable mount is not ours to use
            continue
    return None


def _unmount(mountpoint: str) -> None:
    """cowfs umount, retrying while a process that just left keeps it busy; lazy as a last resort."""
    from cowfs.daemon import mounts

    deadline = time.monotonic() + 15
    while True:
        try:
            mounts.umount(mountpoint, timeout=60)
            return
        except MountError as exc:
            if "busy" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                click.echo(f"cowfs: {mountpoint} is still busy; unmounting lazily", err=True)
                mounts.unmount(mountpoint, lazy=True)
                return
            time.sleep(0.2)


def unmount_temporary(mountpoint: str) -> None:
    """Unmount a temporary mount point of branch_mounted's and remove its directory (one a
    killed command left behind, whose daemon outlived it)."""
    try:
        _unmount(mountpoint)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)


_TEMPORARY = re.compile(r"cowfs-(?P<purpose>[a-z]+)-.+-(?P<pid>[0-9]+)-[a-z0-9_]+")   # mkdtemp's names


def left_by(mountpoint: str) -> tuple[str, int] | None:
    """(purpose, pid of the command) of a temporary mount point of branch_mounted's; None for
    any other path."""
    m = _TEMPORARY.fullmatch(os.path.basename(mountpoint))
    return None if m is None else (m["purpose"], int(m["pid"]))


@contextlib.contextmanager
def branch_mounted(store: str, branch: str, options: tuple[str, ...] = (), purpose: str = "run") -> Iterator[str]:
    """Yield the mount point of BRANCH of STORE, mounting it at a temporary directory if it
    is not mounted; unmount (and remove the directory) on the way out."""
    from cowfs.mount_helper import HelperError, mount as helper_mount, parse_args

    store = os.path.abspath(store)
    existing = find_branch_mount(store, branch)
    if existing is not None:
        yield existing
        return
    # The command's pid in the name: a mount a killed command left is known as its (left_by)
    mp = tempfile.mkdtemp(prefix=f"cowfs-{purpose}-{branch}-{os.getpid()}-")
    try:
        opts = ["-o", ",".join(options)] if options else []
        try:
            req = parse_args([store, mp, "-o", f"branch={branch}"] + opts)
            helper_mount(req)
        except (HelperError, MountError) as exc:
            raise CliError(str(exc)) from None
        try:
            yield mp
        finally:
            _unmount(mp)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mp)
