"""Operator commands on the `cowfs` group: status, log, run, import, export.

    cowfs status [--json]                      mounted stores: mount points, branches, daemons, cache/queues
    cowfs log MOUNT [--json]                   snapshot/branch history as a graph (like git log --graph)
    cowfs run STORE [--branch B] [--snapshot-before NAME] -- COMMAND...
    cowfs import STORE SRC_DIR [--branch B] [--to PATH]
    cowfs export MOUNT SNAPSHOT DEST|-

Registered by the one import at the bottom of cowfs/cli.py.  Long-running commands show a
progress bar only when stderr is a terminal; in scripts they are quiet.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from cowfs import progress
from cowfs.cli import _fail, _mount, json_opt, main, target_arg
from cowfs.errors import MountError
from cowfs.mounts import MountEntry, cowfs_mounts
from cowfs.textfmt import count, duration, human

PROBE_TIMEOUT = 5.0


# -- small helpers ----------------------------------------------------------------------------------
def _branch_here(mountpoint: str) -> str | None:
    from cowfs import api

    reply = api.control(mountpoint, "list", timeout=PROBE_TIMEOUT)
    for b in reply["branches"]:
        if b.get("mounted_here"):
            return str(b["name"])
    return None


def _daemon_stats(store: str, mountpoint: str | None) -> dict[str, Any]:
    """The daemon's figures: admin socket (root), else the mount's world-readable .cowfs/stats."""
    from cowfs import admin, api

    try:
        return admin.request(store, {"cmd": "stats"}, timeout=PROBE_TIMEOUT)  # type: ignore[no-any-return]
    except (OSError, ValueError) as first:
        if mountpoint is None:
            raise
        try:
            return api.stats(mountpoint, PROBE_TIMEOUT)
        except (OSError, ValueError, api.NotResponding):
            raise first from None


# -- mounting a branch for the length of a command ----------------------------------------------------
def find_branch_mount(store: str, branch: str) -> str | None:
    for e in cowfs_mounts():
        if e.store != store:
            continue
        try:
            if _branch_here(e.mountpoint) == branch:
                return e.mountpoint
        except Exception:  # noqa: BLE001 - an unusable mount is not ours to use
            continue
    return None


def _unmount(mountpoint: str, quiet: bool = False) -> None:
    """cowfs umount, retrying while a process that just left keeps it busy; lazy as a last resort."""
    from cowfs import mounts

    deadline = time.monotonic() + 15
    while True:
        try:
            mounts.umount(mountpoint, timeout=60)
            return
        except MountError as exc:
            if "busy" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                if not quiet:
                    click.echo(f"cowfs: {mountpoint} is still busy; unmounting lazily", err=True)
                mounts.unmount(mountpoint, lazy=True)
                return
            time.sleep(0.2)


@contextlib.contextmanager
def branch_mounted(store: str, branch: str, options: tuple[str, ...] = (), purpose: str = "run") -> Iterator[tuple[str, bool]]:
    """Yield (mount point, mounted by us) for BRANCH of STORE, mounting it at a temporary
    directory if it is not mounted; unmount (and remove the directory) on the way out."""
    from cowfs.mount_helper import HelperError, mount as helper_mount, parse_args

    store = os.path.abspath(store)
    existing = find_branch_mount(store, branch)
    if existing is not None:
        yield existing, False
        return
    mp = tempfile.mkdtemp(prefix=f"cowfs-{purpose}-{branch}-")
    try:
        opts = ["-o", ",".join(options)] if options else []
        try:
            req = parse_args([store, mp, "-o", f"branch={branch}"] + opts)
            helper_mount(req)
        except (HelperError, MountError) as exc:
            _fail(str(exc))
        try:
            yield mp, True
        finally:
            _unmount(mp)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mp)


# -- cowfs status -------------------------------------------------------------------------------------
def gather_status(only: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per mounted store (restricted to stores named, or stores behind mount points
    named, in ONLY).  Mounts are probed in parallel, each with a time limit."""
    from concurrent.futures import ThreadPoolExecutor

    from cowfs import api
    from cowfs.mounts import daemon_pid

    wanted = None
    if only:
        wanted = set()
        from cowfs.targets import place

        for t in only:
            found = place(t)  # any path inside a mount stands for its store
            wanted.add(found.store if found is not None else os.path.abspath(t))
    stores: dict[str, list[MountEntry]] = {}
    for e in cowfs_mounts():
        if wanted is None or e.store in wanted:
            stores.setdefault(e.store, []).append(e)

    def probe_mount(e: MountEntry, alive: bool) -> dict[str, Any]:
        m: dict[str, Any] = {"mountpoint": e.mountpoint, "bind": e.root != "/",
                             "options": [o for o in e.options if o in ("ro", "allow_other", "suid", "dev", "noexec")]}
        if not alive:
            m["branch"] = None
            m["error"] = "daemon gone (stale mount: cowfs umount it)"
            return m
        try:
            m["branch"] = _branch_here(e.mountpoint)
        except api.NotResponding as exc:
            m["branch"] = None
            m["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            m["branch"] = None
            m["error"] = str(exc) or type(exc).__name__
        return m

    def probe_store(store: str, entries: list[MountEntry]) -> dict[str, Any]:
        pid = daemon_pid(store)
        # A store private to another user (cowfs.private) hides its daemon's pid: its mounts answer.
        alive = pid is not None or not os.access(store, os.X_OK)
        rec: dict[str, Any] = {"store": store, "daemon_pid": pid, "alive": alive}
        rec["mounts"] = [probe_mount(e, alive)
                         for e in sorted(entries, key=lambda e: (e.root != "/", e.mountpoint))]
        if alive:
            first = next((m["mountpoint"] for m in rec["mounts"] if not m["bind"]), None)
            try:
                stats = _daemon_stats(store, first)
                rec["stats"] = stats
                if rec["mounts"] and not rec["mounts"][0]["bind"] and rec["mounts"][0]["branch"] is None:
                    rec["mounts"][0]["branch"] = stats.get("branch")
            except Exception as exc:  # noqa: BLE001
                rec["stats_error"] = str(exc) or type(exc).__name__
        return rec

    if not stores:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(stores))) as pool:
        return list(pool.map(lambda item: probe_store(*item), sorted(stores.items())))


@main.command()
@click.argument("targets", nargs=-1, metavar="[TARGET]...")  # not click.Path (see cli.mount_arg)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(targets: tuple[str, ...], as_json: bool) -> None:
    """Mounted stores: mount points, branches, daemon pids, cache and queue figures.

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
        st = rec.get("stats") or {}
        if rec["alive"]:
            head = f"daemon pid {rec['daemon_pid']}" if rec["daemon_pid"] else "daemon of another user"
            if st:
                head += f", up {duration(st.get('uptime_s', 0))}, rss {human(st.get('rss_bytes', 0))}"
        else:
            head = click.style("no daemon", fg="red")
        click.echo(f"{click.style(rec['store'], bold=True)}  ({head})")
        width = max(len(m["mountpoint"]) for m in rec["mounts"])
        for m in rec["mounts"]:
            branch = m["branch"] or "?"
            notes = (["bind"] if m["bind"] else []) + m["options"]
            line = f"  {m['mountpoint']:<{width}}  {click.style(branch, fg='green')}"
            if notes:
                line += f"  ({', '.join(notes)})"
            if m.get("error"):
                line += "  " + click.style(m["error"], fg="red")
            click.echo(line)
        if st:
            for level, c in (st.get("cache") or {}).items():
                if level in ("l1", "l2"):
                    click.echo(f"  {'cache ' + level:<7} {human(c.get('bytes', 0))} of {human(c.get('max_bytes', 0))}, "
                               f"{c.get('entries', 0)} entries, {100.0 * c.get('hit_rate', 0):.1f}% hits, "
                               f"{c.get('evictions', 0)} evictions")
            unsynced = max(0, st.get("commits", 0) - st.get("syncs_done", 0))
            click.echo(f"  queues  {human(st.get('dirty_bytes', 0))} dirty, {st.get('commits', 0)} commits "
                       f"({unsynced} since the last disk sync), {st.get('flushes', 0)} flushes, "
                       f"{sum((st.get('requests') or {}).values())} requests")
            quota = ""
            if st.get("quota_bytes") or st.get("quota_inodes"):
                quota = (f" (quota {human(st['quota_bytes']) if st.get('quota_bytes') else '-'}, "
                         f"{st.get('quota_inodes') or '-'} inodes)")
            click.echo(f"  usage   {human(st.get('usage_bytes', 0))} logical, "
                       f"{human(st.get('usage_allocated_bytes', 0))} allocated, {st.get('usage_inodes', 0)} inodes{quota}; "
                       f"store on disk {human(st.get('disk_bytes', 0))}")
        elif rec.get("stats_error"):
            click.echo("  " + click.style(f"figures unavailable: {rec['stats_error']}", fg="yellow"))


# -- cowfs log ----------------------------------------------------------------------------------------
@dataclass
class Node:
    id: str
    kind: str                      # "branch" (a live head), "snapshot" or "fork" (a branch made from a branch)
    name: str
    line: str                      # the branch whose history it is on
    time: float
    parent: str | None = None      # id of the node this state came from
    row: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def build_history(listing: dict[str, Any]) -> list[Node]:
    """Nodes of the snapshot/branch history, newest first, children before parents."""
    snaps = {s["name"]: s for s in listing["snapshots"]}
    branches = {b["name"]: b for b in listing["branches"]}
    nodes: dict[str, Node] = {}
    for s in snaps.values():
        nodes["s:" + s["name"]] = Node("s:" + s["name"], "snapshot", s["name"], s.get("parent") or "?", s["created"],
                                       row=s)
    for b in branches.values():
        p = b.get("parent")
        if p is not None and p in branches:
            nodes["f:" + b["name"]] = Node("f:" + b["name"], "fork", b["name"], p, b["created"], row=b)
    # Events on each line, in time order: snapshots taken on it and forks made from it.
    lines: dict[str, list[Node]] = {}
    for n in nodes.values():
        lines.setdefault(n.line, []).append(n)
    for evs in lines.values():
        evs.sort(key=lambda n: (n.time, n.kind != "fork"))

    def origin(line: str) -> tuple[str | None, str]:
        b = branches.get(line)
        if b is None:
            return None, ""                 # deleted, or outside this mount's lineage
        p = b.get("parent")
        if p is None:
            return None, ""
        if p in snaps:
            return "s:" + p, ""
        if p in branches:
            return "f:" + line, ""
        return None, f"{p} not listed"

    for line, evs in lines.items():
        prev, note = origin(line)
        for n in evs:
            n.parent = prev
            if prev is None and note:
                n.note = note
            prev = n.id
    for b in branches.values():
        evs = lines.get(b["name"], [])
        parent, note = (evs[-1].id, "") if evs else origin(b["name"])
        t = max([b["created"]] + [n.time for n in evs])
        nodes["b:" + b["name"]] = Node("b:" + b["name"], "branch", b["name"], b["name"], t, parent, b, note)

    # Topological order (children first), newest first among the ready ones.
    pending_children: dict[str, int] = {nid: 0 for nid in nodes}
    for n in nodes.values():
        if n.parent in pending_children:
            pending_children[n.parent] += 1
    rank = {"branch": 2, "fork": 1, "snapshot": 0}
    ready = [n for n in nodes.values() if pending_children[n.id] == 0]
    order: list[Node] = []
    while ready:
        ready.sort(key=lambda n: (n.time, rank[n.kind], n.name))
        n = ready.pop()
        order.append(n)
        if n.parent in pending_children:
            pending_children[n.parent] -= 1
            if pending_children[n.parent] == 0:
                ready.append(nodes[n.parent])
    return order


def _transition(cols: list[str | None], new: list[str | None], targets: list[int]) -> list[str]:
    """Lines drawing columns cols[i] moving left to position targets[i] (one step per line)."""
    pos = list(range(len(cols)))
    lines = []
    while any(p > t for p, t in zip(pos, targets)):
        width = 2 * max(len(cols), 1)
        chars = [" "] * width
        for i, (p, t) in enumerate(zip(pos, targets)):
            if cols[i] is None:
                continue
            if p > t:
                chars[2 * p - 1] = "/"
                pos[i] = p - 1
            elif chars[2 * p] == " ":
                chars[2 * p] = "|"
        lines.append("".join(chars).rstrip())
    return lines


def _compact(cols: list[str | None], merge: str | None = None) -> tuple[list[str | None], list[str]]:
    """Drop holes, and join every column waiting for MERGE into its first one; return the new
    columns and the lines drawing the moves (always to the left)."""
    new: list[str | None] = []
    targets = []
    first_merge = None
    for i, c in enumerate(cols):
        if c is None:
            targets.append(i)               # holes draw nothing and never move
        elif c == merge and first_merge is not None:
            targets.append(first_merge)
        else:
            if c == merge:
                first_merge = len(new)
            targets.append(len(new))
            new.append(c)
    return new, _transition(cols, new, targets)


def render_graph(order: list[Node], mark: Callable[[Node], str]) -> list[tuple[str, Node | None]]:
    """git-log-style graph rows: (graph text, node) for node rows, (graph text, None) for joins."""
    cols: list[str | None] = []
    rows: list[tuple[str, Node | None]] = []
    for n in order:
        if n.id not in cols:
            cols.append(n.id)
        if cols.count(n.id) > 1:
            cols, lines = _compact(cols, merge=n.id)
            rows += [(ln, None) for ln in lines]
        col = cols.index(n.id)
        graph = " ".join(mark(n) if i == col else ("|" if c is not None else " ") for i, c in enumerate(cols))
        rows.append((graph.rstrip(), n))
        cols[col] = n.parent
        if n.parent is None:
            if col == len(cols) - 1:
                cols.pop()
                while cols and cols[-1] is None:
                    cols.pop()
            else:
                cols, lines = _compact(cols)
                rows += [(ln, None) for ln in lines]
    return rows


def _when(t: float, same_day: bool) -> str:
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", time.localtime(t))


def _listing(target: str) -> tuple[dict[str, Any], str, str | None]:
    """(listing, where, mount point) for a mount's lineage (any path inside it) or a whole
    store (root or its owner: through its daemon when mounted, else offline)."""
    from cowfs import api
    from cowfs.cli import _store_wide

    whole = _store_wide(target, {"cmd": "list"})
    if whole is not None:
        if not whole.get("ok"):
            _fail(str(whole.get("error")))
        return whole, os.path.abspath(target), None
    mount = _mount(target)
    try:
        return api.control(mount, "list"), mount, mount
    except api.CowfsError as exc:
        _fail(str(exc))


def _mounted(row: dict[str, Any]) -> bool:
    return bool(row.get("mounted_here") or row.get("mounted_at"))


@main.command()
@target_arg
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON (nodes in display order).")
def log(target: str, as_json: bool) -> None:
    """The snapshot/branch history of the lineage mounted at TARGET (any path inside a
    mount), or of a whole store (TARGET a store directory; root or its owner), as a graph.

    \b
    @ the branch mounted at TARGET    o another branch (its live state)
      (of a store: a mounted branch)
    * a snapshot                      . where a branch was made from a branch
    Newest first; each line of the graph is one branch.
    """
    listing, where, mount = _listing(target)
    order = build_history(listing)
    if as_json:
        click.echo(json.dumps({"mount" if mount else "store": where, "nodes": [
            {"id": n.id, "kind": n.kind, "name": n.name, "branch": n.line, "parent": n.parent, "time": n.time,
             "created": n.row.get("created"), "logical_bytes": n.row.get("logical_bytes"),
             "inodes": n.row.get("inodes"), "mounted_here": bool(n.row.get("mounted_here")) if n.kind == "branch" else None,
             "mounted_at": n.row.get("mounted_at") if n.kind == "branch" else None,
             "note": n.note or None} for n in order]}))
        return
    if not order:
        click.echo("no history")
        return

    def mark(n: Node) -> str:
        if n.kind == "branch":
            return "@" if _mounted(n.row) else "o"
        return "*" if n.kind == "snapshot" else "."

    rows = render_graph(order, mark)
    gw = max(len(g) for g, _ in rows)
    days = {time.strftime("%Y-%m-%d", time.localtime(n.row.get("created", n.time))) for n in order}
    same_day = len(days) == 1 and days == {time.strftime("%Y-%m-%d")}
    nw = max(len(n.name) for n in order if n.kind != "fork")
    for graph, n in rows:
        if n is None:
            click.echo(graph)
            continue
        pad = " " * (gw - len(graph) + 2)
        if n.kind == "fork":
            click.echo(f"{graph}{pad}" + click.style(f"(branch {n.name} made from {n.line})", dim=True))
            continue
        created = _when(n.row["created"], same_day)
        size = f"{human(n.row.get('logical_bytes')):>10}  {count(n.row.get('inodes')):>7} inodes"
        if n.kind == "branch":
            name = click.style(f"{n.name:<{nw}}", fg="green", bold=True)
            extra = []
            if n.row.get("mounted_here"):
                extra.append("mounted here")
            if n.row.get("mounted_at"):
                extra.append(f"mounted at {', '.join(n.row['mounted_at'])}")
            if n.row.get("parent"):
                extra.append(f"from {n.row['parent']}")
            if n.note:
                extra.append(n.note)
            click.echo(f"{graph}{pad}{name}  branch    {created}  {size}  {', '.join(extra)}".rstrip())
        else:
            name = click.style(f"{n.name:<{nw}}", fg="yellow")
            extra = [f"on {n.line}"] + ([n.note] if n.note else [])
            click.echo(f"{graph}{pad}{name}  snapshot  {created}  {size}  {', '.join(extra)}".rstrip())


# -- cowfs run ----------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("store", type=click.Path())
@click.option("--branch", default="main", show_default=True, help="Branch to work in.")
@click.option("--snapshot-before", metavar="NAME", help="Take snapshot NAME of the branch before running.")
@click.option("-o", "options", multiple=True, metavar="OPTION",
              help="Mount options if the branch has to be mounted (as for cowfs mount).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(store: str, branch: str, snapshot_before: str | None, options: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Run COMMAND with branch BRANCH of STORE as its working directory.

    The branch is mounted at a temporary directory if it is not mounted yet, and unmounted
    afterwards; COMMAND's exit status is passed through (128+N if killed by signal N).
    COMMAND sees COWFS_STORE, COWFS_BRANCH and COWFS_MOUNT.  Put `--` before COMMAND:

        cowfs run /var/lib/cowfs/agent1 --snapshot-before pre-test -- make test
    """
    from cowfs import api

    store = os.path.abspath(store)
    if not os.path.isfile(os.path.join(store, "cowfs-store.json")):
        _fail(f"{store}: not a cowfs store (create one with 'cowfs init {store}')")
    with branch_mounted(store, branch, options, purpose="run") as (mp, _ours):
        if snapshot_before:
            try:
                api.Mount(path=Path(mp), store=Path(store), branch_name=branch, owned=False).snapshot(snapshot_before)
            except api.CowfsError as exc:
                _fail(f"snapshot {snapshot_before}: {exc}")
        env = dict(os.environ, COWFS_STORE=store, COWFS_BRANCH=branch, COWFS_MOUNT=mp, PWD=mp)
        try:
            proc = subprocess.Popen(list(command), cwd=mp, env=env)
        except FileNotFoundError:
            click.echo(f"cowfs: {command[0]}: command not found", err=True)
            code = 127
        except PermissionError:
            click.echo(f"cowfs: {command[0]}: permission denied", err=True)
            code = 126
        else:
            # The terminal's ^C/^\ reach the command (same process group); we wait for it.
            # SIGTERM/SIGHUP sent to us are passed on, so that the mount is released after.
            old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)}
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, lambda signum, _frame: proc.send_signal(signum))
            try:
                rc = proc.wait()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
            code = rc if rc >= 0 else 128 - rc
    sys.exit(code)


# -- copying trees with their metadata ---------------------------------------------------------------
@dataclass
class CopyStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    special: int = 0
    bytes: int = 0
    skipped_xattrs: int = 0
    warnings: list[str] = field(default_factory=list)


def scan(src: str) -> tuple[int, int]:
    """(entries, bytes of regular files) below src, for the progress bar."""
    entries = nbytes = 0
    stack = [src]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        nbytes += e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    return entries, nbytes


HOLE_BLOCK = 64 << 10                 # cowfs's chunk size
ZERO_BLOCK = bytes(HOLE_BLOCK)
ZERO_CHUNK = bytes(1 << 20)


class TreeCopier:
    """Copy a tree with its metadata: modes, owners (when permitted), nanosecond times,
    xattrs, symlinks, hard links, FIFOs, device nodes and sockets, sparse files (holes are
    skipped with SEEK_DATA, and all-zero blocks are not written).

    Few round trips per file, since each costs a FUSE request: files are created with their
    final mode (umask 0 while copying), owners are set only where they differ from ours, and
    an existing target is only looked at when creating fails with EEXIST.  Directories are
    walked in order and created at once; regular files are copied by a few threads (a FUSE
    daemon serves several requests at a time); hard links and directory metadata are applied
    at the end, children before parents.
    """

    CHUNK = 1 << 20

    def __init__(self, progress: Callable[[int], None] | None = None, workers: int = 4) -> None:
        self._progress = progress or (lambda n: None)
        self.stats = CopyStats()
        self.links: dict[tuple[int, int], str] = {}
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.can_chown = self.euid == 0
        self.workers = workers
        self._lock = threading.Lock()
        self._dir_meta: list[tuple[str, str, os.stat_result]] = []
        self._later_links: list[tuple[str, str, os.stat_result]] = []
        self._futures: list[Any] = []
        self._pool: Any = None

    def progress(self, n: int) -> None:
        with self._lock:
            self._progress(n)

    def _count(self, attr: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, attr, getattr(self.stats, attr) + n)

    def copy(self, src: str, dst: str) -> CopyStats:
        from concurrent.futures import ThreadPoolExecutor

        st = os.lstat(src)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", src)
        old_umask = os.umask(0)
        try:
            os.makedirs(dst, mode=0o700, exist_ok=True)
            os.chmod(dst, 0o700)                  # fill it whatever its mode; set at the end
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                self._pool = pool
                try:
                    self._dir(src, dst, st)
                finally:
                    errors = [f.exception() for f in self._futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
            for s, d, est in self._later_links:
                self._create(d, lambda d=d, est=est: os.link(self.links[(est.st_dev, est.st_ino)], d,
                                                              follow_symlinks=False))
                self.stats.hardlinks += 1
                if stat.S_ISREG(est.st_mode):
                    self.progress(est.st_size)
            for s, d, est in self._dir_meta:      # post-order: children first
                self._meta(s, d, est, kind="dir")
        finally:
            os.umask(old_umask)
        return self.stats

    def _dir(self, src: str, dst: str, st: os.stat_result) -> None:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            s, d = e.path, os.path.join(dst, e.name)
            try:
                self._entry(s, d, e.stat(follow_symlinks=False))
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (copying {s})") from None
        self._dir_meta.append((src, dst, st))
        self.stats.dirs += 1

    @staticmethod
    def _remove(dst: str) -> None:
        if stat.S_ISDIR(os.lstat(dst).st_mode):
            shutil.rmtree(dst)
        else:
            os.unlink(dst)

    def _create(self, dst: str, make: Callable[[], Any]) -> Any:
        """make() the new entry; if something is in the way, remove it and try once more."""
        try:
            return make()
        except FileExistsError:
            self._remove(dst)
            return make()

    def _entry(self, src: str, dst: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            try:
                os.mkdir(dst, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(dst).st_mode):
                    self._remove(dst)
                    os.mkdir(dst, 0o700)
                else:
                    os.chmod(dst, 0o700)
            self._dir(src, dst, st)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            if key in self.links:
                self._later_links.append((src, dst, st))
                return
            self.links[key] = dst
        if stat.S_ISREG(mode):
            self._futures.append(self._pool.submit(self._regular, src, dst, st))
            return
        perm = stat.S_IMODE(mode) & 0o777
        if stat.S_ISLNK(mode):
            target = os.readlink(src)
            self._create(dst, lambda: os.symlink(target, dst))
            self.stats.symlinks += 1
            self._meta(src, dst, st, kind="link")
            return
        if stat.S_ISFIFO(mode):
            self._create(dst, lambda: os.mkfifo(dst, perm))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            self._create(dst, lambda: os.mknod(dst, stat.S_IFMT(mode) | perm, st.st_rdev))
        else:
            self.stats.warnings.append(f"skipped {src}: unknown file type")
            return
        self.stats.special += 1
        self._meta(src, dst, st, kind="special")

    def _regular(self, src: str, dst: str, st: os.stat_result) -> None:
        try:
            self._file(src, dst, st)
            self._meta(src, dst, st, kind="file")
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (copying {src})") from None
        self._count("files")

    def _file(self, src: str, dst: str, st: os.stat_result) -> None:
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fout = self._create(dst, lambda: os.open(dst, flags, stat.S_IMODE(st.st_mode) & 0o777))
            try:
                size = st.st_size
                ranges = self._data_ranges(fin, size)
                end_written = 0
                for start, end in ranges:
                    off = start
                    while off < end:
                        buf = os.pread(fin, min(self.CHUNK, end - off), off)
                        if not buf:
                            break
                        end_written = max(end_written, self._write_sparse(fout, buf, off))
                        off += len(buf)
                        self._count("bytes", len(buf))
                        self.progress(len(buf))
                if end_written != size:
                    os.ftruncate(fout, size)      # holes up to EOF
                skipped = size - sum(e - s for s, e in ranges)
                if skipped > 0:
                    self.progress(skipped)
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _write_sparse(self, fd: int, buf: bytes, off: int) -> int:
        """Write buf at off, leaving all-zero 64 KiB blocks as holes (sources such as FUSE
        filesystems report no holes to SEEK_DATA, yet their zeros need not be written).
        Returns the end offset of the last byte written (0 if none)."""
        if buf == (ZERO_CHUNK if len(buf) == self.CHUNK else bytes(len(buf))):
            return 0
        view = memoryview(buf)
        run_start = None
        last = 0
        for b in range(0, len(buf) + HOLE_BLOCK, HOLE_BLOCK):
            piece = view[b:b + HOLE_BLOCK]
            zero = not piece or piece == ZERO_BLOCK[:len(piece)]
            if not zero and run_start is None:
                run_start = b
            elif zero and run_start is not None:
                data = view[run_start:b]
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], off + run_start + written)
                last = off + run_start + len(data)
                run_start = None
        return last

    @staticmethod
    def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
        """[start, end) ranges holding data (the whole file if holes cannot be asked for)."""
        if size == 0:
            return []
        ranges = []
        off = 0
        try:
            while off < size:
                try:
                    start = os.lseek(fd, off, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:   # only a hole up to EOF
                        break
                    raise
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                ranges.append((start, end))
                off = end
        except OSError:
            return [(0, size)]
        return ranges

    def _meta(self, src: str, dst: str, st: os.stat_result, kind: str) -> None:
        """Owner (where it differs from ours), xattrs, set-id/sticky bits or a directory's
        mode, then times - last, since the others change ctime and writes change mtime."""
        chowned = False
        if self.can_chown and (st.st_uid, st.st_gid) != (self.euid, self.egid):
            try:
                os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                chowned = True
            except OSError as exc:
                with self._lock:
                    self.stats.warnings.append(f"owner of {dst}: {exc.strerror}")
        if kind != "link":
            self._xattrs(src, dst)
            mode = stat.S_IMODE(st.st_mode)
            # created with mode & 0o777; chown clears set-id bits: set the rest now
            if kind == "dir" or mode & 0o7000 or chowned:
                os.chmod(dst, mode)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _xattrs(self, src: str, dst: str) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            return
        for name in names:
            try:
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
            except OSError:
                self._count("skipped_xattrs")   # e.g. security.* or ACLs the target refuses


def _summary(verb: str, s: CopyStats, seconds: float) -> str:
    rate = s.bytes / seconds if seconds > 0 else 0
    parts = [f"{s.files} files", f"{s.dirs} directories"]
    if s.symlinks:
        parts.append(f"{s.symlinks} symlinks")
    if s.hardlinks:
        parts.append(f"{s.hardlinks} hard links")
    if s.special:
        parts.append(f"{s.special} special files")
    return f"{verb} {', '.join(parts)}, {human(s.bytes)} in {seconds:.1f} s ({human(rate)}/s)"


# -- cowfs import / export ----------------------------------------------------------------------------
def _copy_json(verb: str, s: CopyStats, seconds: float) -> str:
    return json.dumps({"ok": True, verb: {"files": s.files, "dirs": s.dirs, "symlinks": s.symlinks,
                                          "hardlinks": s.hardlinks, "special": s.special, "bytes": s.bytes,
                                          "seconds": round(seconds, 3), "warnings": s.warnings,
                                          "skipped_xattrs": s.skipped_xattrs}})


@main.command(name="import")
@click.argument("store", type=click.Path())
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--branch", default="main", show_default=True, help="Branch to load into.")
@click.option("--to", "dest", default="", metavar="PATH", help="Directory inside the branch (default: its root).")
@click.option("--snapshot", "snapshot_after", metavar="NAME", help="Take snapshot NAME once loaded.")
@click.option("-o", "options", multiple=True, metavar="OPTION", help="Mount options if the branch has to be mounted.")
@json_opt
def import_(store: str, src_dir: str, branch: str, dest: str, snapshot_after: str | None, options: tuple[str, ...],
            as_json: bool) -> None:
    """Bulk-load the directory tree SRC_DIR into branch BRANCH of STORE.

    Copies everything with its metadata (modes, owners when run as root, nanosecond times,
    xattrs, symlinks, hard links, special files, holes); files already there are replaced.
    The branch is mounted for the copy if it is not mounted.  A progress bar and a summary
    are shown on a terminal only; --json prints the figures.
    """
    from cowfs import api

    store = os.path.abspath(store)
    if not os.path.isfile(os.path.join(store, "cowfs-store.json")):
        _fail(f"{store}: not a cowfs store (create one with 'cowfs init {store}')")
    src = os.path.abspath(src_dir)
    entries, total = scan(src)
    with branch_mounted(store, branch, options, purpose="import") as (mp, _ours):
        target = os.path.normpath(os.path.join(mp, dest.lstrip("/")))
        inside = target == mp or target.startswith(mp + "/")
        if not inside or target[len(mp):].split("/")[1:2] == [".cowfs"]:
            _fail(f"--to {dest}: must be a directory inside the branch (not in .cowfs)")
        if os.path.realpath(src) == os.path.realpath(mp) or os.path.realpath(src).startswith(os.path.realpath(mp) + "/"):
            _fail(f"{src_dir} is inside the branch itself")
        t0 = time.monotonic()
        with progress.bar(f"importing {entries} entries", total, quiet=as_json) as update:
            copier = TreeCopier(update)
            try:
                s = copier.copy(src, target)
            except OSError as exc:
                _fail(f"import failed: {exc}")
        seconds = time.monotonic() - t0
        if snapshot_after:
            try:
                api.Mount(path=Path(mp), store=Path(store), branch_name=branch, owned=False).snapshot(snapshot_after)
            except api.CowfsError as exc:
                _fail(f"snapshot {snapshot_after}: {exc}")
    for w in s.warnings[:20]:
        click.echo(f"cowfs: warning: {w}", err=True)
    if s.skipped_xattrs:
        click.echo(f"cowfs: warning: {s.skipped_xattrs} extended attributes were refused by cowfs (kept out)", err=True)
    if as_json:
        click.echo(_copy_json("imported", s, seconds))
    elif progress.shown():
        click.echo(_summary("imported", s, seconds), err=True)


def _tar_out(src: str, total: int, quiet: bool, seek: bool) -> None:
    """GNU tar of src to stdout, passed through us so that a terminal sees its progress.
    seek: tar finds holes with SEEK_DATA/SEEK_HOLE; a daemon without them (cowfs.fuse_ext)
    reports every file as data, so tar must then look for runs of zeros itself."""
    tar = shutil.which("tar")
    if tar is None:
        _fail("GNU tar is needed for export to -")
    sys.stdout.flush()
    holes = f"--hole-detection={'seek' if seek else 'raw'}"
    proc = subprocess.Popen([tar, "--create", "--file=-", "--directory", src, "--format=posix", "--numeric-owner",
                             "--xattrs", "--xattrs-include=*", "--sparse", holes, "--one-file-system", "."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    out = sys.stdout.fileno()
    try:
        with progress.bar("exporting", total, quiet=quiet) as update:
            while True:
                data = proc.stdout.read1(1 << 20)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
                update(len(data))
    except BrokenPipeError:
        proc.kill()
        proc.wait()
        _fail("the reader of the tar stream went away")
    code = proc.wait()
    reader.join()
    if code != 0:
        _fail(f"tar failed: {b''.join(errors).decode(errors='replace').strip()}")


@main.command()
@target_arg
@click.argument("snapshot")
@click.argument("dest")
@json_opt
def export(target: str, snapshot: str, dest: str, as_json: bool) -> None:
    """Write snapshot SNAPSHOT to DEST: one of the lineage mounted at TARGET (any path inside
    a mount), or any of a store's (TARGET a store directory; root or its owner: its branch
    is mounted for the copy if it is not mounted).

    DEST is a directory (created; it must be empty if it exists), or `-` for a tar stream
    on stdout (GNU tar, POSIX format with xattrs, numeric owners, holes kept):

        cowfs export /srv/sandbox/agent1 before-upgrade - | zstd > before-upgrade.tar.zst

    A progress bar (and for a directory, a summary) is shown on a terminal only; --json
    prints the figures of a directory export.
    """
    from cowfs import cliutil

    listing, where, mount = _listing(target)
    snaps = {s["name"]: s for s in listing["snapshots"]}
    if snapshot not in snaps:
        if any(b["name"] == snapshot for b in listing["branches"]):
            _fail(f"{snapshot} is a branch; take a snapshot of it first (cowfs snapshot MOUNT NAME)")
        if mount is None:
            _fail(f"no snapshot named {snapshot!r} in the store {where}")
        hint = cliutil.foreign_hint(mount, [snapshot])
        _fail(f"no snapshot named {snapshot!r} in the lineage of {mount}" + (f"; {hint}" if hint else ""))
    if mount is not None:
        _export(mount, snapshot, dest, as_json)
        return
    branch = snaps[snapshot].get("parent")
    if branch is None:
        _fail(f"snapshot {snapshot!r} belongs to no branch; export it through a mount whose lineage holds it")
    with branch_mounted(where, branch, purpose="export") as (mp, _ours):
        _export(mp, snapshot, dest, as_json)


def _export(mount: str, snapshot: str, dest: str, as_json: bool) -> None:
    from cowfs import api

    src = os.path.join(mount, ".cowfs", "snapshots", snapshot)
    if dest == "-":
        if sys.stdout.isatty():
            _fail("refusing to write a tar stream to a terminal; redirect stdout or give a directory")
        entries, nbytes = scan(src)
        seek = api.stats(mount).get("fuse_ext", {}).get("installed", False)
        _tar_out(src, nbytes + 1536 * entries + 10240, quiet=as_json, seek=seek)  # + a header and a pax record each
        return
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        _fail(f"{dest} exists and is not an empty directory")
    entries, total = scan(src)
    t0 = time.monotonic()
    with progress.bar(f"exporting {entries} entries", total, quiet=as_json) as update:
        copier = TreeCopier(update)
        try:
            s = copier.copy(src, dest)
        except OSError as exc:
            _fail(f"export failed: {exc}")
    for w in s.warnings[:20]:
        click.echo(f"cowfs: warning: {w}", err=True)
    if as_json:
        click.echo(_copy_json("exported", s, time.monotonic() - t0))
    elif progress.shown():
        click.echo(_summary("exported", s, time.monotonic() - t0), err=True)
