"""cowfs stats, gc, dedup and fsck: a store's figures and upkeep, through its daemon when it
is mounted, else on the store itself (cowfs.offline), with progress on a terminal.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, Iterator

import click

from cowfs import api
from cowfs.daemon import admin
from cowfs.cli import progress, report, targets
from cowfs.cli.admin import admin_call, served
from cowfs.cli.errors import CliError
from cowfs.cli.params import json_opt, target_arg
from cowfs.errors import StoreError
from cowfs.daemon.mounts import daemon_pid

FSCK_CLEAN, FSCK_REPAIRED, FSCK_LEFT, FSCK_NOT_CHECKED = 0, 1, 4, 8
FSCK_CODES = (
    (FSCK_CLEAN, "no problems"),
    (FSCK_REPAIRED, "problems were found and all of them repaired (--repair)"),
    (2, "bad usage"),
    (FSCK_LEFT, "problems are left: found without --repair, or not repairable"),
    (FSCK_NOT_CHECKED, "could not check: no such store, the store is mounted (in use by its daemon), "
                       "or it may not be read by this user"),
)


# -- what the commands do ---------------------------------------------------------------------------
def store_stats(target: str) -> dict[str, Any]:
    """The daemon's figures (admin channel, else the mount's .cowfs/stats), or the store's own
    space figures when no daemon serves it."""
    from cowfs import offline

    mp = targets.mountpoint_of(target)
    daemon = targets.daemon_of(target)  # the store's daemon, or the mounted branch's own
    if not served(target, daemon):
        try:
            return offline.stats(targets.store_dir(target))
        except StoreError as exc:
            raise CliError(str(exc)) from None
    try:
        return admin_call(daemon, {"cmd": "stats"}, timeout=30)
    except CliError:
        if mp is None:
            raise
        try:
            return api.stats(mp, timeout=30)
        except (api.CowfsError, OSError, ValueError):
            pass
        raise


def _poll_progress(daemon: str, label: str, stop: threading.Event, quiet: bool, queue_from: int | None) -> None:
    """Ask the daemon on a second connection how far a gc or dedup --wait is, for the bar."""
    with progress.stages(label, quiet=quiet) as show:
        while not stop.wait(0.3):
            try:
                p = admin.request(daemon, {"cmd": "progress"}, timeout=5)
            except (OSError, ValueError):
                return
            if queue_from is not None:
                show("delta encoding", max(0, queue_from - int(p.get("background_queue") or 0)), queue_from)
            elif p.get("gc"):
                show(p["gc"]["stage"], int(p["gc"]["done"]), None)


def _with_progress(daemon: str, label: str, req: dict[str, Any], timeout: float, quiet: bool,
                   queue_from: int | None = None) -> dict[str, Any]:
    """req to the daemon whose files are in `daemon` (cowfs.cli.targets.daemon_of), its
    progress shown meanwhile."""
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(daemon, label, stop, quiet, queue_from), daemon=True)
    if progress.shown(quiet):
        poller.start()
    try:
        return admin_call(daemon, req, timeout)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join()


def run_gc(target: str, quiet: bool = False, repack_below: float | None = None) -> dict[str, Any]:
    from cowfs import offline

    daemon = targets.daemon_of(target)
    if served(target, daemon):
        req: dict[str, Any] = {"cmd": "gc"}
        if repack_below is not None:
            req["repack_below"] = repack_below
        return _with_progress(daemon, "gc", req, 3600, quiet)
    with progress.stages("gc", quiet=quiet) as show:
        try:
            return offline.gc(targets.store_dir(target), show, repack_below)
        except StoreError as exc:
            raise CliError(str(exc)) from None


def run_dedup(target: str, wait: bool, timeout: float, quiet: bool = False) -> dict[str, Any]:
    from cowfs import offline

    daemon = targets.daemon_of(target)
    if served(target, daemon):
        req = {"cmd": "dedup", "wait": wait, "timeout": timeout}
        if not wait:
            return admin_call(daemon, req, 60)
        queue = int(admin_call(daemon, {"cmd": "dedup"}, 60).get("background_queue") or 0)
        return _with_progress(daemon, "dedup", req, timeout + 30, quiet, queue_from=queue)
    with progress.stages("dedup", quiet=quiet) as show:
        try:
            return offline.dedup(targets.store_dir(target), wait, timeout, show)
        except StoreError as exc:
            raise CliError(str(exc)) from None


def run_fsck(path: str, repair: bool, verify_data: bool, quiet: bool = False) -> tuple[int, dict[str, Any]]:
    """(exit status, report) of a check of the store's database and of every home's (its
    problems prefixed with the home, its counts added); CliError (code FSCK_NOT_CHECKED) when
    the store could not be checked."""
    from cowfs import homes
    from cowfs.fsck import Fsck
    from cowfs.store import Store
    from cowfs.storedir import home_dir

    store = os.path.abspath(path)

    def served_from() -> Iterator[str]:
        """The store's daemon, then the branches' own.  A user who may not list STORE/homes
        (0700) gets the reason from the store's open below (in use: "not checked")."""
        yield store
        try:
            listed = homes.listed(store)
        except PermissionError:
            return
        yield from (home_dir(store, h) for h in listed)

    for where in served_from():
        pid = daemon_pid(where)
        if pid is not None:
            raise CliError(f"{store} is mounted (in use by daemon pid {pid}), so it was not checked: unmount it "
                           "first (cowfs umount MOUNTPOINT)", FSCK_NOT_CHECKED)

    def opened(home: str | None = None) -> Store:
        try:
            return Store(store, home=home)
        except StoreError as exc:
            hint = "; unmount it first (cowfs umount MOUNTPOINT)" if "in use" in str(exc) else ""
            raise CliError(f"{exc}{hint}; not checked", FSCK_NOT_CHECKED) from None

    st = opened()
    done: dict[str, int] = {}
    space = st.objects.space
    totals = {"objects": space.chunks + space.nodes, "verify": space.chunks + space.nodes}
    with progress.stages("fsck", quiet=quiet) as show:
        def step(stage: str, n: int) -> None:
            done[stage] = done.get(stage, 0) + n
            show(stage, done[stage], totals.get(stage))

        try:
            result = Fsck(st, repair=repair, progress=step, verify_data=verify_data).run()
            named = sorted(h for h in set(st.catalog.homes.values()) if os.path.isdir(home_dir(store, h)))
        finally:
            st.close()
        for home in named:  # each home's database over its lineage (docs/design-many-processes.md, "Step 6")
            hs = opened(home)
            try:
                part = Fsck(hs, repair=repair, progress=step, verify_data=verify_data, whole_store=False).run()
            finally:
                hs.close()
            result.problems += [f"home {home}: {p}" for p in part.problems]
            result.repaired += [f"home {home}: {p}" for p in part.repaired]
            result.unrepairable += [f"home {home}: {p}" for p in part.unrepairable]
            result.counts.update(part.counts)
    left = bool(result.problems) and (not repair or bool(result.unrepairable))
    code = FSCK_CLEAN if not result.problems else (FSCK_LEFT if left else FSCK_REPAIRED)
    return code, {"store": store, "clean": result.clean, "problems": result.problems, "repaired": result.repaired,
                  "unrepairable": result.unrepairable, "counts": dict(result.counts), "exit_code": code}


# -- the commands -----------------------------------------------------------------------------------
@click.command()
@target_arg
@json_opt
def stats(target: str, as_json: bool) -> None:
    """Figures of a store, or of the store behind the mount holding TARGET.

    Served by its daemon when the store is mounted (for a user who may not talk to the
    daemon, from the mount's .cowfs/stats), else read from the store itself.
    """
    data = store_stats(target)
    if as_json:
        click.echo(json.dumps(data))
        return
    for line in report.stats_lines(data):
        click.echo(line)


@click.command()
@target_arg
@click.option("--repack-below", type=click.FloatRange(0.0, 1.0), default=None, metavar="SHARE",
              help="Repack packs whose live bytes are under this share of their size "
                   "(default 0.5; 0: only delete packs nothing uses; 1: repack every pack with dead bytes).")
@json_opt
def gc(target: str, repack_below: float | None, as_json: bool) -> None:
    """Collect garbage now in the store TARGET (or the store behind the mount holding TARGET):
    old metadata versions, then the packs (the space of deleted large files comes back
    here), then the database's own space.

    Through its daemon when the store is mounted (root or the store's owner), else on the
    store itself.  Shows progress on a terminal.
    """
    data = run_gc(target, quiet=as_json, repack_below=repack_below)
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(report.gc_line(data))


@click.command()
@target_arg
@click.option("--wait", is_flag=True, help="Return once the background queue is empty and copied trees are shared.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait at most.")
@json_opt
def dedup(target: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Background work on the store TARGET (or the store behind the mount holding TARGET):
    delta encoding of chunks and sharing of copied trees' records; figures, or wait for both.

    Through its daemon when the store is mounted (root or the store's owner); with --wait
    on an unmounted store, the work is done here and now.
    """
    data = run_dedup(target, wait, timeout, quiet=as_json)
    if as_json:
        click.echo(json.dumps(data))
    else:
        for line in report.dedup_lines(data):
            click.echo(line)


@click.command(epilog="\b\nExit status (as fsck(8)):\n" + "\n".join(f"  {c}  {t}" for c, t in FSCK_CODES))
@click.argument("store", type=click.Path())
@click.option("--repair", is_flag=True, help="Fix what can be fixed without losing data.")
@click.option("--no-verify-data", is_flag=True, help="Skip decoding and hashing every stored chunk.")
@json_opt
def fsck(store: str, repair: bool, no_verify_data: bool, as_json: bool) -> None:
    """Check STORE for consistency (and --repair it).

    The store must not be mounted: its daemon would change it under the check (exit
    status 8, "could not check").  Shows progress on a terminal.
    """
    try:
        code, data = run_fsck(store, repair, not no_verify_data, quiet=as_json)
    except CliError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "exit_code": FSCK_NOT_CHECKED}))
        raise CliError(str(exc), FSCK_NOT_CHECKED) from None
    if as_json:
        click.echo(json.dumps(data))
    else:
        for line in report.fsck_lines(data):
            click.echo(line)
    sys.exit(code)


COMMANDS = (stats, gc, dedup, fsck)
