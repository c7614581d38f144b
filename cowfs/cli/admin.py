"""Talking to the daemon behind a target, and saying clearly what it refused and who may.

Two channels: a mount's control file (.cowfs/ctl, for whoever may use the mount: the
commands of one lineage), and the store's admin socket (STORE/daemon.sock, root and the
store's owner: store-wide commands).  A store no daemon serves is administered in this
process (cowfs.offline).  Everything here raises CliError with the message for the user.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable

from cowfs import api
from cowfs.daemon import admin
from cowfs.cli import targets
from cowfs.cli.errors import CliError
from cowfs.errors import StoreError
from cowfs.daemon.mounts import daemon_pid, user_name

PROBE_TIMEOUT = 5.0


# -- a mount's control file ---------------------------------------------------------------------
def control(mount: str, *words: str, timeout: float = api.CONTROL_TIMEOUT) -> dict[str, Any]:
    """The daemon's reply to one control-file command, refusals included (ok false, errno)."""
    try:
        return api.control_reply(mount, *words, timeout=timeout)
    except api.CowfsError as exc:
        raise CliError(str(exc)) from None


def control_streamed(mount: str, *words: str, item: Callable[[str, Any], None], raw: Callable[[bytes], None] | None,
                     timeout: float = api.CONTROL_TIMEOUT) -> dict[str, Any]:
    """control() for a long reply (list, diff): its lists' items to item() as they are read
    (cowfs.commands.reply.read_streamed), its text to raw()."""
    try:
        return api.control_streamed(mount, *words, item=item, raw=raw, timeout=timeout)
    except api.CowfsError as exc:
        raise CliError(str(exc)) from None


def syncfs(mount: str, timeout: float) -> None:
    """Push data still dirty in the kernel's page cache to the daemon first."""
    try:
        api.syncfs(mount, timeout)
    except api.CowfsError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{mount}: {exc.strerror}") from None


def branch_here(mountpoint: str) -> str | None:
    """The branch mounted at mountpoint (its control file says)."""
    reply = api.control(mountpoint, "list", timeout=PROBE_TIMEOUT)
    for b in reply["branches"]:
        if b.get("mounted_here"):
            return str(b["name"])
    return None


# -- the admin socket ---------------------------------------------------------------------------
def admin_refused(store: str) -> str:
    sock = admin.socket_path(store)
    uid: int | None = None
    for path in (sock, store):
        try:
            uid = os.stat(path).st_uid
            break
        except OSError:
            continue
    who = ("root" if uid == 0 else "root and the store's owner" if uid is None
           else f"root and {user_name(uid)}, the store's owner")
    return (f"{store}: permission denied: the daemon of this store answers only {who} (on its admin socket "
            f"{sock}); inside a mount, .cowfs/stats shows its figures")


Item = Callable[[str, Any], None]
Raw = Callable[[bytes], None]


def _request(store: str, req: dict[str, Any], timeout: float, item: Item | None = None,
             raw: Raw | None = None) -> dict[str, Any]:
    """One request on the admin socket (item: its reply streamed, see control_streamed);
    CliError saying who may, or why it failed.  A socket that nothing listens on (its daemon
    died) raises FileNotFoundError/ConnectionRefusedError."""
    try:
        if item is not None:
            return admin.request_streamed(store, req, item, raw, timeout=timeout)
        return admin.request(store, req, timeout=timeout)  # type: ignore[no-any-return]
    except PermissionError:
        raise CliError(admin_refused(store)) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise
    except socket.timeout:
        raise CliError(f"the daemon of {store} did not answer within {timeout:g} s; if it hangs, "
                       "`cowfs umount --force MOUNTPOINT` ends it") from None
    except OSError as exc:
        raise CliError(f"cannot reach the daemon of {store}: {exc.strerror or exc}") from None
    except ValueError:
        raise CliError(f"the daemon of {store} gave an unreadable answer") from None


def admin_call(store: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the daemon whose files are in store (a store directory, or a home's
    for a branch's own daemon: cowfs.cli.targets.daemon_of); its refusal is a CliError too."""
    try:
        reply = _request(store, req, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"{store}: no daemon answers (it has exited: a mount left by it is cleared by "
                       "cowfs umount)") from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "the daemon refused"))
    return reply


def served(target: str, store: str) -> bool:
    """Whether a daemon is to be asked: target is a mount (whose store this user may not be
    able to look into), or the store has a live daemon (a socket left by a killed daemon
    does not count)."""
    return targets.mountpoint_of(target) is not None or daemon_pid(store) is not None


# -- store-wide delete, list and diff -----------------------------------------------------------
def fed(reply: dict[str, Any], item: Item | None, raw: Raw | None) -> dict[str, Any]:
    """A whole reply handed over as a streamed one would be (item per list item, raw text)."""
    if item is None:
        return reply
    if raw is not None:
        raw((json.dumps(reply, ensure_ascii=True) + "\n").encode())
    head = {}
    for key, value in reply.items():
        if isinstance(value, list):
            for x in value:
                item(key, x)
            head[key] = len(value)
        else:
            head[key] = value
    return head


def administer(target: str, req: dict[str, Any], item: Item | None = None, raw: Raw | None = None) -> dict[str, Any]:
    """The reply to a store-wide `delete`, `list` or `diff` (root or the store's owner): through the
    daemon when one serves the store (it checks the caller, SO_PEERCRED), else on the store
    itself.  A daemon is known by its socket: its pid file may be unreadable to the store's
    owner (it is root's).  Refusals of the command itself come back as replies (errno).
    item/raw: the reply streamed (see control_streamed)."""
    from cowfs import offline

    store = targets.store_dir(target)
    if daemon_pid(store) is not None or os.path.exists(admin.socket_path(store)):
        try:
            return _request(store, req, timeout=api.CONTROL_TIMEOUT, item=item, raw=raw)
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # a socket left by a daemon that died: nothing serves the store
    try:
        if req["cmd"] == "list":
            return fed(offline.listing(store), item, raw)
        if req["cmd"] == "diff":
            return fed(offline.diff(store, str(req["a"]), str(req["b"])), item, raw)
        return offline.delete(store, str(req["name"]))
    except StoreError as exc:
        raise CliError(str(exc)) from None


def store_wide(target: str, req: dict[str, Any], item: Item | None = None,
               raw: Raw | None = None) -> dict[str, Any] | None:
    """The reply to a store-wide command when TARGET is a store directory (None: a path in
    a mount, whose control file answers)."""
    if targets.place(target) is not None or not targets.is_store(target):
        return None
    return administer(target, req, item, raw)


def listing_of(target: str) -> tuple[dict[str, Any], str, str | None]:
    """(listing, where, mount point) for a mount's lineage (any path inside it) or a whole
    store (root or its owner: through its daemon when mounted, else offline)."""
    rows: dict[str, list[dict[str, Any]]] = {"snapshots": [], "branches": []}

    def item(key: str, row: dict[str, Any]) -> None:  # read as the reply arrives, never its whole text
        rows.setdefault(key, []).append(row)

    whole = store_wide(target, {"cmd": "list"}, item=item)
    if whole is not None:
        if not whole.get("ok"):
            raise CliError(str(whole.get("error")))
        return {**whole, **rows}, os.path.abspath(target), None
    mount = targets.mount_of(target).mountpoint
    head = control_streamed(mount, "list", item=item, raw=None)
    if not head.get("ok"):
        raise CliError(str(head.get("error")))
    return {**head, **rows}, mount, mount


def foreign_hint(mountpoint: str, names: list[str]) -> str | None:
    """For root or the store's owner: which of names the store has although the branch
    mounted at mountpoint does not own them ("it belongs to another lineage"); None for
    anyone else, or when the store has none of them."""
    found = targets.place(mountpoint)
    if found is None:
        return None
    try:
        owner = os.stat(found.store).st_uid
    except OSError:
        return None
    if os.geteuid() not in (0, owner):
        return None
    try:
        listing = administer(found.store, {"cmd": "list"})
    except CliError:
        return None
    where = {r["name"]: r for r in listing.get("snapshots", []) + listing.get("branches", [])}
    for name in names:
        row = where.get(name)
        if row is None:
            continue
        what = f"a snapshot of branch {row.get('parent')}" if row["kind"] == "snapshot" else "a branch"
        return (f"{name!r} exists in this store ({what}) but belongs to another lineage, which the branch "
                f"mounted at {found.mountpoint} does not own (cowfs list {found.store} shows the whole store)")
    return None


def hint_foreign(mount: str, reply: dict[str, Any], names: list[str]) -> None:
    """To the store's administrator only: a name a mount answered as absent that the store
    has, belongs to another lineage (through a mount, an unknown and a foreign name must
    look the same to a sandbox; root and the store's owner may see the whole store)."""
    if reply.get("ok") or reply.get("errno") != "ENOENT":
        return
    hint = foreign_hint(mount, names)
    if hint:
        reply["error"] = f"{reply.get('error')}; {hint}"
