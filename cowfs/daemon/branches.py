"""The branches a daemon serves beyond its first: attached as bind mounts of its one FUSE
connection (docs/architecture.md, "Process model"), each recorded in the store's reference
store while it is mounted (cowfs.meta.serving: `serve/<branch>`), as the first one is.

A branch is served by one mount at a time, whichever process serves it: a request to serve
one that a live process serves (this daemon at another mount point, or another process of
the store) is refused with one line naming that process's pid and mount point.  The records
of branches no longer mounted (`cowfs umount` of a bind mount, which the daemon only sees in
the mount table) are removed within KEEP_INTERVAL seconds by `keep_records`, which looks only
while the daemon holds records of two or more branches.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from cowfs import faults
from cowfs.errors import FSError, MountError
from cowfs.fleet import FleetError
from cowfs.libc import libc
from cowfs.meta.serving import BranchServed

if TYPE_CHECKING:
    from cowfs.daemon.server import Daemon

log = logging.getLogger("cowfs.daemon")
MS_BIND = 4096
KEEP_INTERVAL = 1.0  # seconds between two looks at which of the branches held are still mounted


def bind(source: str, target: str) -> None:
    faults.point("attach_bind")
    if libc().mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise MountError(f"bind mount of {source} on {target} failed: {os.strerror(err)}")


def served_here(d: "Daemon", branch: str) -> str | None:
    """Why branch cannot be served again by this daemon (it serves it already), or None."""
    where = d.branch_mounts().get(branch)
    if not where:
        return None
    return (f"branch {branch!r} is already served by pid {os.getpid()} at {', '.join(where)} (a branch is "
            "served by one mount at a time: use that one, or mount another branch)")


async def attach(d: "Daemon", branch: str, mountpoint: str, quota_bytes: int | None = None,
                 quota_inodes: int | None = None, hold_ttl: int = 30) -> dict[str, Any]:
    """Serve another branch of the daemon's store at mountpoint (a bind mount of its root)."""
    serving = d.store.serving
    refusal = served_here(d, branch)
    if refusal is None:
        try:  # served by another process: said first, whoever asks
            await trio.to_thread.run_sync(serving.check, branch)
        except BranchServed as exc:
            refusal = str(exc)
    if refusal is not None:
        return {"ok": False, "error": refusal}
    if os.geteuid() != 0:
        return {"ok": False, "error": "a second mount of one store needs root (it is a bind mount)"}
    # Mounted from now on: a delete while the branch is prepared and bind-mounted (it is
    # not in the mount table yet) must refuse it.
    d.attaching[branch] = mountpoint
    ok = False
    try:
        try:  # our own record of it counts as free: the branch is not mounted here (above)
            await trio.to_thread.run_sync(serving.take, branch, mountpoint, True)
        except BranchServed as exc:
            return {"ok": False, "error": str(exc)}
        try:  # the remote branches it follows, held (given back by _keep_holds if the attach fails)
            await trio.to_thread.run_sync(d.holds.take, branch, 0 if "ro" in d.cfg.options else hold_ttl)
        except FleetError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            view = await d.fs.attach_branch(branch)
        except FSError as exc:
            return {"ok": False, "error": str(exc)}
        if quota_bytes is not None or quota_inodes is not None:
            d.fs.set_quota(view, quota_bytes, quota_inodes)
        mps = d.mounts()
        if not mps:
            return {"ok": False, "error": "the daemon has no mount left"}
        source = f"{mps[0][0]}/.cowfs/by-view/{view.vid}"
        try:
            await trio.to_thread.run_sync(bind, source, mountpoint)
        except MountError as exc:
            return {"ok": False, "error": str(exc)}
        ok = True
    finally:
        del d.attaching[branch]
        if not ok and branch not in d.branch_mounts():
            await trio.to_thread.run_sync(serving.release, branch)
        d.attached.set()  # `keep_records` looks at the records held from now on
    log.info("attached branch %s at %s", branch, mountpoint)
    return {"ok": True, "branch": branch, "mountpoint": mountpoint}


async def keep_records(d: "Daemon") -> None:
    """Remove the serve records of branches no longer mounted (a bind mount unmounted).  What
    to remove is decided on the event loop, where attaches take records: each is removed
    only if it is still the record taken then (an attach of the branch since then stands).
    It looks every KEEP_INTERVAL seconds only while records of two or more branches are
    held: the kernel says nothing when a bind mount goes.  With one (a daemon that attached
    nothing, as every branch's own daemon), that branch's mount is the connection's last,
    whose end ends the daemon, and `Store.close` gives the record back: asleep until an
    attach (`Daemon.attached`)."""
    serving = d.store.serving
    while True:
        if len(serving.held) <= 1:
            d.attached = trio.Event()  # no checkpoint since the look: an attach sets this one
            await d.attached.wait()
        await trio.sleep(KEEP_INTERVAL)
        if not d.dev or not serving.held:
            continue
        mounted = d.mounted_branches()
        for branch, mine in [(b, v) for b, v in serving.held.items() if b not in mounted]:
            await trio.to_thread.run_sync(serving.release, branch, mine)
            log.info("no longer serving branch %s", branch)
