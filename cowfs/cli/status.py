"""cowfs status: every daemon of every mounted store, with its mount points, branches and figures.

Decided from the mount table (one FUSE connection per daemon: the store's daemon with its
bind mounts, and each branch's own daemon, docs/design-many-processes.md "Step 6"); each mount is probed through its control file and each
daemon asked for its figures, in parallel and each with a time limit, so that one hung
mount shows as an error on its line instead of hanging the command.  Who serves which
branch is read from each store's reference store (cowfs.meta.serving), by any process that
may read the store, without asking a daemon: a daemon that does not answer, or one killed
-9 (its records stale), shows there too.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from cowfs.cli.admin import PROBE_TIMEOUT, branch_here
from cowfs.cli.textfmt import duration, human, when
from cowfs.daemon.mounts import MountEntry, cowfs_mounts


def _daemon_stats(where: str, mountpoint: str | None) -> dict[str, Any]:
    """The figures of the daemon whose files are in where (the store's directory or a
    home's): its admin socket (root), else the mount's world-readable .cowfs/stats."""
    from cowfs import api
    from cowfs.daemon import admin

    try:
        return admin.request(where, {"cmd": "stats"}, timeout=PROBE_TIMEOUT)  # type: ignore[no-any-return]
    except (OSError, ValueError) as first:
        if mountpoint is None:
            raise
        try:
            return api.stats(mountpoint, PROBE_TIMEOUT)
        except (OSError, ValueError, api.NotResponding):
            raise first from None


def serve_records(store: str) -> list[dict[str, Any]] | None:
    """Who serves which branch of store, from its reference store (cowfs.meta.serving), so
    that any process that may read the store sees it without asking its daemons; None when
    the caller may not (another user's private store) or the store has no reference store."""
    from cowfs.kv.sqlite import SQLiteKV
    from cowfs.meta.serving import REF_FAMILIES, ServeRecord, Serving
    from cowfs.storedir import REFS_FILE

    path = os.path.join(store, REFS_FILE)
    if not os.access(store, os.R_OK | os.X_OK) or not os.path.isfile(path):
        return None
    refs = SQLiteKV(path, REF_FAMILIES)
    try:
        serving = Serving(refs)
        found = serving.all()
    finally:
        refs.close()
    out: list[dict[str, Any]] = []
    for branch, rec in sorted(found.items()):
        if isinstance(rec, ServeRecord):
            out.append({"branch": branch, "pid": rec.pid, "mountpoint": rec.mountpoint, "since": rec.since,
                        "alive": rec.alive(serving.boot), "home": rec.home or None})
        else:
            out.append({"branch": branch, "error": str(rec)})
    return out


def gather_status(only: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per daemon of a mounted store (restricted to stores named, or stores behind
    mount points named, in ONLY).  Mounts are probed in parallel, each with a time limit."""
    from concurrent.futures import ThreadPoolExecutor

    from cowfs import api
    from cowfs.cli.targets import store_of
    from cowfs.daemon.locate import daemon_dir
    from cowfs.daemon.mounts import daemon_pid

    wanted = None if not only else {store_of(t) for t in only}  # any path inside a mount stands for its store
    # One daemon per FUSE connection: its own mount and the bind mounts of branches it attached.
    daemons: dict[tuple[str, str], list[MountEntry]] = {}
    for e in cowfs_mounts():
        if wanted is None or e.store in wanted:
            daemons.setdefault((e.store, e.dev), []).append(e)

    def probe_mount(e: MountEntry, alive: bool) -> dict[str, Any]:
        m: dict[str, Any] = {"mountpoint": e.mountpoint, "bind": e.root != "/",
                             "options": [o for o in e.options if o in ("ro", "allow_other", "suid", "dev", "noexec")]}
        if not alive:
            m["branch"] = None
            m["error"] = "daemon gone (stale mount: cowfs umount it)"
            return m
        try:
            m["branch"] = branch_here(e.mountpoint)
        except api.NotResponding as exc:
            m["branch"] = None
            m["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            m["branch"] = None
            m["error"] = str(exc) or type(exc).__name__
        return m

    def probe_store(key: tuple[str, str], entries: list[MountEntry]) -> dict[str, Any]:
        store = key[0]
        entries = sorted(entries, key=lambda e: (e.root != "/", e.mountpoint))
        try:  # the store's daemon, or a branch's own (its files in its home)
            where = daemon_dir(store, entries[0].mountpoint)
        except Exception:  # noqa: BLE001 - an unreadable reference store: the store's daemon
            where = store
        home = os.path.basename(where) if where != store else None
        pid = daemon_pid(where)
        # A store private to another user (cowfs.private) hides its daemon's pid: its mounts answer.
        alive = pid is not None or not os.access(store, os.X_OK)
        rec: dict[str, Any] = {"store": store, "home": home, "daemon_pid": pid, "alive": alive}
        rec["mounts"] = [probe_mount(e, alive) for e in entries]
        try:
            found = serve_records(store)
            # this daemon's records: the store's daemon's have no home, a branch daemon's its own
            rec["serving"] = None if found is None else [r for r in found if r.get("home") == home]
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rec["serving_error"] = str(exc) or type(exc).__name__
        served = {r["mountpoint"]: r["branch"] for r in rec.get("serving") or () if r.get("alive")}
        for m in rec["mounts"]:  # what a mount that does not answer serves, as its record says
            if m["branch"] is None and m["mountpoint"] in served:
                m["branch"] = served[m["mountpoint"]]
        if alive:
            first = next((m["mountpoint"] for m in rec["mounts"] if not m["bind"]), None)
            try:
                stats = _daemon_stats(where, first)
                rec["stats"] = stats
                if rec["mounts"] and not rec["mounts"][0]["bind"] and rec["mounts"][0]["branch"] is None:
                    rec["mounts"][0]["branch"] = stats.get("branch")
            except Exception as exc:  # noqa: BLE001
                rec["stats_error"] = str(exc) or type(exc).__name__
        return rec

    if not daemons:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(daemons))) as pool:
        return list(pool.map(lambda item: probe_store(*item), sorted(daemons.items())))


def status_lines(rec: dict[str, Any]) -> list[str]:
    """One store's record as lines for a terminal (styled; click drops the styles elsewhere)."""
    out = []
    st = rec.get("stats") or {}
    if rec["alive"]:
        head = f"daemon pid {rec['daemon_pid']}" if rec["daemon_pid"] else "daemon of another user"
        if st:
            head += f", up {duration(st.get('uptime_s', 0))}, rss {human(st.get('rss_bytes', 0))}"
    else:
        head = click.style("no daemon", fg="red")
    if rec.get("home"):
        head += f"; the branch's own daemon, home {rec['home']}"
    out.append(f"{click.style(rec['store'], bold=True)}  ({head})")
    width = max(len(m["mountpoint"]) for m in rec["mounts"])
    for m in rec["mounts"]:
        branch = m["branch"] or "?"
        notes = (["bind"] if m["bind"] else []) + m["options"]
        line = f"  {m['mountpoint']:<{width}}  {click.style(branch, fg='green')}"
        if notes:
            line += f"  ({', '.join(notes)})"
        if m.get("error"):
            line += "  " + click.style(m["error"], fg="red")
        out.append(line)
    for r in rec.get("serving") or ():
        if "error" in r:
            out.append("  " + click.style(f"serving {r['branch']}: {r['error']}", fg="red"))
        elif r["alive"]:
            out.append(f"  serving {click.style(r['branch'], fg='green')} by pid {r['pid']} at {r['mountpoint']} "
                       f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['since']))}")
        else:
            out.append(f"  serving {r['branch']}: " + click.style(f"stale record of pid {r['pid']} (gone) at "
                                                                  f"{r['mountpoint']}", fg="yellow")
                       + f"; the next mount of {r['branch']} takes it")
    if rec.get("serving_error"):
        out.append("  " + click.style(f"serve records unavailable: {rec['serving_error']}", fg="yellow"))
    if st:
        for level, c in (st.get("cache") or {}).items():
            if level in ("l1", "l2"):
                out.append(f"  {'cache ' + level:<7} {human(c.get('bytes', 0))} of {human(c.get('max_bytes', 0))}, "
                           f"{c.get('entries', 0)} entries, {100.0 * c.get('hit_rate', 0):.1f}% hits, "
                           f"{c.get('evictions', 0)} evictions")
        unsynced = max(0, st.get("commits", 0) - st.get("syncs_done", 0))
        out.append(f"  queues  {human(st.get('dirty_bytes', 0))} dirty, {st.get('commits', 0)} commits "
                   f"({unsynced} since the last disk sync), {st.get('flushes', 0)} flushes, "
                   f"{sum((st.get('requests') or {}).values())} requests")
        quota = ""
        if st.get("quota_bytes") or st.get("quota_inodes"):
            quota = (f" (quota {human(st['quota_bytes']) if st.get('quota_bytes') else '-'}, "
                     f"{st.get('quota_inodes') or '-'} inodes)")
        out.append(f"  usage   {human(st.get('usage_bytes', 0))} logical, "
                   f"{human(st.get('usage_allocated_bytes', 0))} allocated, {st.get('usage_inodes', 0)} inodes{quota}; "
                   f"store on disk {human(st.get('disk_bytes', 0))}")
        out += _hold_lines(st)
    elif rec.get("stats_error"):
        out.append("  " + click.style(f"figures unavailable: {rec['stats_error']}", fg="yellow"))
    return out


def _hold_lines(st: dict[str, Any]) -> list[str]:
    """The remote branches the first branch holds (issue 23), and whether it is read-only
    because a hold was lost: since when, and who holds it now."""
    out = []
    for h in st.get("holds") or []:
        line = f"  hold    branch {h['branch']} of the remote {h['remote']}: {h['state']}"
        if h.get("lost_at"):
            line += f" since {when(h['lost_at'])}"
        if h.get("holder"):
            line += f", held by {h['holder']}"
        elif h.get("detail"):
            line += f" ({h['detail']})"
        out.append(line)
    ro = st.get("read_only") or {}
    if ro.get("read_only"):
        out.append("  " + click.style(f"read-only since {when(ro['since'])}: "
                                      f"{ro.get('why') or 'its remote hold was lost'}", fg="red"))
    return out


@click.command()
@click.argument("targets", nargs=-1, metavar="[TARGET]...")  # not click.Path (see cowfs.cli.params)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(targets: tuple[str, ...], as_json: bool) -> None:
    """Mounted stores, one entry per daemon: mount points, branches, daemon pids, cache and
    queue figures (a branch with its own daemon is an entry of its own, with its home).

    With TARGETs (stores, or paths inside mounts), only the stores they name.
    """
    stores = gather_status(list(targets) or None)
    if as_json:
        click.echo(json.dumps({"stores": stores}))
        return
    if not stores:
        click.echo("no cowfs mounts")
        return
    for i, rec in enumerate(stores):
        if i:
            click.echo()
        for line in status_lines(rec):
            click.echo(line)


COMMANDS = (status,)
