"""The branch a `cowfs pull` writes into (cowfs.cli.fleet): listed and made through the
store's mounts, dropped when the pull fails, and, when a pull was killed midway (kill -9: no
clean-up ran), recognised and written whole by the same pull run again.

Store-wide steps run in child processes (a process that opened the store's RocksDB offline
cannot fork a daemon afterwards).  A pull killed midway leaves its branch half written, a row
in the fleet state (cowfs.fleet.state, "pulls") and the temporary mount it wrote through (its
daemon outlives the command); the branch's root carries the mark PULLING until the pull ends,
so that a branch made anew under that name is never taken for the half-written one.  A
pull killed while it makes its branch leaves the temporary mount of the branch it branches
from: the next pull in the store ends it (`clear_killed_pulls_mounts`).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

import click

from cowfs import api
from cowfs.cli.errors import CliError
from cowfs.cli.tempmount import branch_mounted, find_branch_mount, left_by, unmount_temporary


def store_listing(store: str) -> dict[str, Any]:
    """`cowfs list STORE --json`, in a child process: offline, the listing opens the store's
    RocksDB, and a process that did cannot fork a daemon afterwards (RocksDB's background
    threads do not survive the fork: the daemon's first flush would wait forever)."""
    r = subprocess.run([sys.executable, "-m", "cowfs", "list", store, "--json"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    try:
        reply = json.loads(r.stdout)
    except ValueError:
        raise CliError(r.stderr.strip().removeprefix("cowfs: ") or f"cowfs list {store} failed") from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error")))
    return reply


def drop_branch(store: str, branch: str) -> bool:
    """Delete the branch a failed pull made (half written), so that the same pull can be run
    again; store-wide, in a child process (see store_listing).  If that fails, it says so
    (False: the branch stays, and the same pull run again writes it whole)."""
    r = subprocess.run([sys.executable, "-m", "cowfs", "delete", store, branch], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        click.echo(f"cowfs: the half-pulled branch {branch} remains in {store} ({r.stderr.strip()}); "
                   f"cowfs delete {store} {branch} removes it, or the same pull run again writes it whole", err=True)
    return r.returncode == 0


def clear_killed_pulls_mounts(store: str) -> None:
    """End the temporary mounts of the store that pulls killed midway left (their daemons
    outlive a kill -9 of the command): the mount of the branch a pull branched from, left
    when it was killed while making its branch, would otherwise stay for good (the next
    pull's branching finds it mounted and uses it as is).  One that cannot be unmounted now
    (busy: another command uses it) is left for a later pull."""
    from cowfs.daemon import mounts
    from cowfs.errors import MountError

    for e in mounts.cowfs_mounts():
        left = left_by(e.mountpoint)
        if e.store != store or left is None or left[0] != "pull" or _pull_runs(left[1]):
            continue
        try:
            mounts.umount(e.mountpoint, timeout=60)
        except MountError:
            continue
        with contextlib.suppress(OSError):
            os.rmdir(e.mountpoint)


def take_over_killed_pull(store: str, branch: str, killed: tuple[str, str, int], wanted: tuple[str, str]) -> None:
    """The branch was made by a pull that did not finish (state.pulling: killed): refuse if
    that pull still runs or pulled another commit; else end the temporary mount it left (its
    daemon outlives a kill -9 of the command), so that this pull mounts it afresh."""
    remote, cid, pid = killed
    if _pull_runs(pid):
        raise CliError(f"branch {branch} of {store} is being pulled by pid {pid}; wait for it, or pull into "
                       "another branch with --into NAME")
    if (remote, cid) != wanted:
        raise CliError(f"branch {branch} of {store} was left half written by a pull of commit {cid[:12]} of "
                       f"{remote} killed midway: cowfs delete {store} {branch}, or pull into another branch "
                       "with --into NAME")
    mp = find_branch_mount(store, branch)
    if mp is not None and os.path.basename(mp).startswith(f"cowfs-pull-{branch}-"):
        unmount_temporary(mp)


PULLING = "user.cowfs.pulling"   # on a branch's root while a pull writes it: the commit


def mark_pulling(mp: str, store: str, branch: str, cid: str, again: bool) -> bool:
    """Mark the root of the branch mounted at mp as being written by the pull of cid (the
    tree's own xattrs replace it at the end, and the pull removes it before its snapshot);
    again (a pull killed midway is run again): check the mark instead, so that a branch made
    anew under that name since is never taken for the half-written one.  True: the branch is
    this pull's (a failure drops it)."""
    if again:
        try:
            mark = os.getxattr(mp, PULLING)
        except OSError:
            mark = b""
        if mark != cid.encode():
            raise CliError(f"branch {branch} of {store} has no mark of the pull killed midway that made it (made "
                           f"anew since, or that pull was killed before it wrote there): it is left as it is; "
                           f"cowfs delete {store} {branch} if it is that pull's, or pull into another branch with "
                           "--into NAME")
        click.echo(f"cowfs: branch {branch} of {store} was left half written by a pull killed midway: "
                   "pulling it again", err=True)
        return True
    with contextlib.suppress(OSError):    # no mark (a read-only root for this user): no resume
        os.setxattr(mp, PULLING, cid.encode())
    return True


def _pull_runs(pid: int) -> bool:
    """Whether the process pid is alive and a `cowfs pull` (a pid reused since is not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"pull" in argv and any(b"cowfs" in a for a in argv)


def find_base(r: Any, state: Any, store: str, cid: str, snaps: dict[str, Any]) -> tuple[str, str] | None:
    """(commit, local snapshot) of the nearest ancestor of cid (itself included) that a snapshot
    of the store holds, or None."""
    from cowfs.fleet import FleetError

    synced = state.synced(store, r.key)
    todo: str | None = cid
    for _ in range(1000):
        if todo is None:
            return None
        if todo in synced and synced[todo] in snaps:
            return todo, synced[todo]
        try:
            todo = r.commit(todo).get("parent")
        except FleetError:      # an ancestor the remote lost: no base, the pull writes everything
            return None
    return None


def make_branch(store: str, into: str, base_snap: str | None, snaps: dict[str, Any], branches: list[str]) -> None:
    """Create branch `into`: from the base snapshot (through a mount of the branch it belongs
    to), else from a branch's current state (the pull then rewrites all of it)."""
    owner = snaps[base_snap].get("parent") if base_snap else None
    if owner is None:
        owner = "main" if "main" in branches else branches[0]
    # hold_ttl=0: this mount only branches from a snapshot; a remote branch it follows may be held elsewhere
    with branch_mounted(store, owner, ("hold_ttl=0",), purpose="pull") as mp:
        try:
            api.control(mp, "branch", into, *([base_snap] if base_snap else []))
        except api.CowfsError as e:
            raise CliError(f"branch {into}: {e}") from None
