"""What the CLI's commands do, apart from parsing arguments and printing: finding the store
behind a target, talking to its daemon or opening it offline, and saying clearly what was
refused and who may do it.  Raises CliError (the message for the user); never exits.
"""
from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

from cowfs import admin, api, progress
from cowfs.errors import MountError, StoreError
from cowfs.mounts import daemon_pid, user_name


class CliError(Exception):
    """A command failed; str() is the one message for the user."""


FSCK_CLEAN, FSCK_REPAIRED, FSCK_LEFT, FSCK_NOT_CHECKED = 0, 1, 4, 8
FSCK_CODES = (
    (FSCK_CLEAN, "no problems"),
    (FSCK_REPAIRED, "problems were found and all of them repaired (--repair)"),
    (2, "bad usage"),
    (FSCK_LEFT, "problems are left: found without --repair, or not repairable"),
    (FSCK_NOT_CHECKED, "could not check: no such store, the store is mounted (in use by its daemon), "
                       "or it may not be read by this user"),
)


def describe(exc: BaseException) -> str:
    """One line for an exception nothing else caught."""
    if isinstance(exc, (CliError, MountError, StoreError, api.CowfsError)):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            text += f" (as {user_name(os.geteuid())})"
        return text
    return f"internal error: {type(exc).__name__}: {exc}"


def store_of(target: str) -> str:
    """The store behind the mount holding target (any path inside it), or the target itself
    (a store directory)."""
    from cowfs.targets import place

    found = place(target)
    return found.store if found is not None else os.path.abspath(target)


def _mountpoint(target: str) -> str | None:
    from cowfs.targets import place

    found = place(target)
    return found.mountpoint if found is not None else None


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


def admin_call(store: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the daemon serving store; CliError with who may, or why it failed."""
    try:
        reply = admin.request(store, req, timeout=timeout)
    except PermissionError:
        raise CliError(admin_refused(store)) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"{store}: no daemon answers (it has exited: a mount left by it is cleared by "
                       "cowfs umount)") from None
    except socket.timeout:
        raise CliError(f"the daemon of {store} did not answer within {timeout:g} s; if it hangs, "
                       "`cowfs umount --force MOUNTPOINT` ends it") from None
    except OSError as exc:
        raise CliError(f"cannot reach the daemon of {store}: {exc.strerror or exc}") from None
    except ValueError:
        raise CliError(f"the daemon of {store} gave an unreadable answer") from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "the daemon refused"))
    return reply


def _served(target: str, store: str) -> bool:
    """Whether a daemon is to be asked: target is a mount (whose store this user may not be
    able to look into), or the store has a live daemon (a socket left by a killed daemon
    does not count)."""
    return _mountpoint(target) is not None or daemon_pid(store) is not None


def _offline_store(target: str) -> str:
    from cowfs.offline import is_store

    store = os.path.abspath(target)
    if not is_store(store):
        raise CliError(f"{target} is neither a cowfs mount nor a store")
    return store


# -- store-wide delete, list and diff --------------------------------------------------------------
def administer(target: str, req: dict[str, Any]) -> dict[str, Any]:
    """The reply to a store-wide `delete`, `list` or `diff` (root or the store's owner): through the
    daemon when one serves the store (it checks the caller, SO_PEERCRED), else on the store
    itself.  A daemon is known by its socket: its pid file may be unreadable to the store's
    owner (it is root's).  Refusals of the command itself come back as replies (errno)."""
    from cowfs import offline

    store = _offline_store(target)
    if daemon_pid(store) is not None or os.path.exists(admin.socket_path(store)):
        try:
            return admin.request(store, req, timeout=120)
        except PermissionError:
            raise CliError(admin_refused(store)) from None
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # a socket left by a daemon that died: nothing serves the store
        except socket.timeout:
            raise CliError(f"the daemon of {store} did not answer within 120 s; if it hangs, "
                           "`cowfs umount --force MOUNTPOINT` ends it") from None
        except OSError as exc:
            raise CliError(f"cannot reach the daemon of {store}: {exc.strerror or exc}") from None
        except ValueError:
            raise CliError(f"the daemon of {store} gave an unreadable answer") from None
    try:
        if req["cmd"] == "list":
            return offline.listing(store)
        if req["cmd"] == "diff":
            return offline.diff(store, str(req["a"]), str(req["b"]))
        return offline.delete(store, str(req["name"]))
    except StoreError as exc:
        raise CliError(str(exc)) from None


def foreign_hint(mountpoint: str, names: list[str]) -> str | None:
    """For root or the store's owner: which of names the store has although the branch
    mounted at mountpoint does not own them ("it belongs to another lineage"); None for
    anyone else, or when the store has none of them."""
    from cowfs.targets import place

    found = place(mountpoint)
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


# -- stats -------------------------------------------------------------------------------------------
def store_stats(target: str) -> dict[str, Any]:
    """The daemon's figures (admin channel, else the mount's .cowfs/stats), or the store's own
    space figures when no daemon serves it."""
    from cowfs import offline

    mp = _mountpoint(target)
    store = store_of(target)
    if not _served(target, store):
        try:
            return offline.stats(_offline_store(target))
        except StoreError as exc:
            raise CliError(str(exc)) from None
    try:
        return admin_call(store, {"cmd": "stats"}, timeout=30)
    except CliError:
        if mp is None:
            raise
        try:
            return api.stats(mp, timeout=30)
        except (api.CowfsError, OSError, ValueError):
            pass
        raise


# -- gc and dedup ------------------------------------------------------------------------------------
def _poll_progress(store: str, label: str, stop: threading.Event, quiet: bool, queue_from: int | None) -> None:
    """Ask the daemon on a second connection how far a gc or dedup --wait is, for the bar."""
    with progress.stages(label, quiet=quiet) as report:
        while not stop.wait(0.3):
            try:
                p = admin.request(store, {"cmd": "progress"}, timeout=5)
            except (OSError, ValueError):
                return
            if queue_from is not None:
                report("delta encoding", max(0, queue_from - int(p.get("background_queue") or 0)), queue_from)
            elif p.get("gc"):
                report(p["gc"]["stage"], int(p["gc"]["done"]), None)


def _with_progress(store: str, label: str, req: dict[str, Any], timeout: float, quiet: bool,
                   queue_from: int | None = None) -> dict[str, Any]:
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(store, label, stop, quiet, queue_from), daemon=True)
    if progress.shown(quiet):
        poller.start()
    try:
        return admin_call(store, req, timeout)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join()


def gc(target: str, quiet: bool = False) -> dict[str, Any]:
    from cowfs import offline

    store = store_of(target)
    if _served(target, store):
        return _with_progress(store, "gc", {"cmd": "gc"}, 3600, quiet)
    with progress.stages("gc", quiet=quiet) as report:
        try:
            return offline.gc(_offline_store(target), report)
        except StoreError as exc:
            raise CliError(str(exc)) from None


def dedup(target: str, wait: bool, timeout: float, quiet: bool = False) -> dict[str, Any]:
    from cowfs import offline

    store = store_of(target)
    if _served(target, store):
        req = {"cmd": "dedup", "wait": wait, "timeout": timeout}
        if not wait:
            return admin_call(store, req, 60)
        queue = int(admin_call(store, {"cmd": "dedup"}, 60).get("background_queue") or 0)
        return _with_progress(store, "dedup", req, timeout + 30, quiet, queue_from=queue)
    with progress.stages("dedup", quiet=quiet) as report:
        try:
            return offline.dedup(_offline_store(target), wait, timeout, report)
        except StoreError as exc:
            raise CliError(str(exc)) from None


# -- fsck --------------------------------------------------------------------------------------------
def fsck(path: str, repair: bool, verify_data: bool, quiet: bool = False) -> tuple[int, dict[str, Any]]:
    """(exit status, report) of a check; CliError when the store could not be checked."""
    from cowfs.fsck import Fsck
    from cowfs.store import Store

    store = os.path.abspath(path)
    pid = daemon_pid(store)
    if pid is not None:
        raise CliError(f"{store} is mounted (in use by daemon pid {pid}), so it was not checked: unmount it "
                       "first (cowfs umount MOUNTPOINT)")
    try:
        st = Store(store)
    except StoreError as exc:
        hint = "; unmount it first (cowfs umount MOUNTPOINT)" if "in use" in str(exc) else ""
        raise CliError(f"{exc}{hint}; not checked") from None
    done: dict[str, int] = {}
    space = st.objects.space
    totals = {"objects": space.chunks + space.nodes, "verify": space.chunks + space.nodes}
    try:
        with progress.stages("fsck", quiet=quiet) as show:
            def step(stage: str, n: int) -> None:
                done[stage] = done.get(stage, 0) + n
                show(stage, done[stage], totals.get(stage))

            result = Fsck(st, repair=repair, progress=step, verify_data=verify_data).run()
    finally:
        st.close()
    left = bool(result.problems) and (not repair or bool(result.unrepairable))
    code = FSCK_CLEAN if not result.problems else (FSCK_LEFT if left else FSCK_REPAIRED)
    return code, {"store": store, "clean": result.clean, "problems": result.problems, "repaired": result.repaired,
                  "unrepairable": result.unrepairable, "counts": dict(result.counts), "exit_code": code}

