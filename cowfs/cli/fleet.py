"""The fleet's commands: `cowfs remote add|list|remove|show|check|delete|gc|hold`, `cowfs push`, `cowfs pull`.

A push reads a snapshot through its mount (MOUNT/.cowfs/snapshots/NAME); a pull writes into a
new branch of a store through a mount of it (the one that serves it, or a temporary one, as
`cowfs import` does).  The work is cowfs.fleet's; here: arguments, the branch made for a pull,
progress, and one line for every failure (an engine down after the retries included).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
from typing import TYPE_CHECKING, Any, Callable, Iterator

import click

from cowfs import api, faults
from cowfs.cli import admin, progress, targets
from cowfs.cli.errors import CliError
from cowfs.cli.params import json_opt
from cowfs.cli.report import remote_gc_line
from cowfs.cli.tempmount import branch_mounted, require_store
from cowfs.cli.textfmt import human
from cowfs.errors import MountError

if TYPE_CHECKING:
    from cowfs.daemon.config import MountConfig
    from cowfs.store import Store

_REF = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def _ref_name(name: str, what: str) -> str:
    if not _REF.fullmatch(name):
        raise CliError(f"bad {what} name {name!r}: letters, digits, '.', '_', '-', at most 128, not starting with '.'")
    return name


@contextlib.contextmanager
def _fleet_errors(what: str) -> Iterator[None]:
    """Whatever the fleet, the engines or their clients raise, as one line."""
    from cowfs.blob.base import BlobError
    from cowfs.fleet import FleetError, RefConflict
    from cowfs.remote import EngineUnavailable, MissingDependency, one_line

    try:
        yield
    except RefConflict as e:
        raise CliError(f"{what}: conflict: {e}") from None
    except (FleetError, EngineUnavailable, MissingDependency, BlobError) as e:
        raise CliError(f"{what}: {one_line(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("cowfs.kv"):      # KVReplyError, BatchTooLarge, ScanExpired
            raise CliError(f"{what}: {one_line(e)}") from None
        raise


def _open(name: str) -> Any:
    from cowfs.fleet import config
    from cowfs.fleet.remote import Remote

    return Remote(config.get(name))


# --- cowfs remote ------------------------------------------------------------------------------

@click.group()
def remote() -> None:
    """The remotes snapshots are pushed to and pulled from: S3-compatible object storage for
    the data, etcd for the references.  Kept per user in $XDG_CONFIG_HOME/cowfs/remotes.json
    (default ~/.config/cowfs); credentials are never stored there: boto3 reads them from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and ~/.aws/."""


@remote.command(name="add")
@click.argument("name")
@click.argument("url")
@click.option("--refs", required=True, metavar="http://HOST:PORT[,...]", help="The etcd endpoints of the references.")
@click.option("--endpoint", metavar="URL", help="The S3 endpoint (SeaweedFS, Ceph; default: AWS_ENDPOINT_URL_S3, else AWS).")
def remote_add(name: str, url: str, refs: str, endpoint: str | None) -> None:
    """Add the remote NAME: objects at URL (s3://BUCKET/PREFIX), references in etcd at --refs."""
    from cowfs.fleet import config

    with _fleet_errors("remote add"):
        r = config.add(name, url, refs, endpoint)
    click.echo(f"added remote {r.name}: {r.url} (references in etcd at {r.refs})")


@remote.command(name="list")
@json_opt
def remote_list(as_json: bool) -> None:
    """The remotes of this user."""
    from cowfs.fleet import config

    with _fleet_errors("remote list"):
        remotes = config.load()
    if as_json:
        click.echo(json.dumps({"ok": True, "remotes": [
            {"name": r.name, "url": r.url, "refs": r.refs, "endpoint": r.endpoint} for r in remotes.values()]}))
        return
    for r in remotes.values():
        extra = f" (S3 endpoint {r.endpoint})" if r.endpoint else ""
        click.echo(f"{r.name}\t{r.url}\t{r.refs}{extra}")


@remote.command(name="remove")
@click.argument("name")
def remote_remove(name: str) -> None:
    """Forget the remote NAME (nothing on the remote is touched)."""
    from cowfs.fleet import config

    with _fleet_errors("remote remove"):
        r = config.remove(name)
    click.echo(f"removed remote {r.name} ({r.url})")


@remote.command(name="check")
@click.argument("name")
@click.option("--verify", is_flag=True, help="Also fetch every chunk and check its hash.")
@json_opt
def remote_check(name: str, verify: bool, as_json: bool) -> None:
    """Check that every reference of the remote NAME names objects that exist: commits, trees,
    chunks, packs (with --verify, that every chunk hashes right).  One line per problem on
    stdout and exit status 1 if there is any."""
    from cowfs.fleet.check import check

    with _fleet_errors(f"remote check {name}"), _open(name) as r:
        problems, figures = check(r, verify)
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, **figures}))
    else:
        for p in problems:
            click.echo(p)
        if progress.shown():
            click.echo(f"{figures['references']} references, {figures['commits']} commits, {figures['trees']} trees, "
                       f"{figures['chunks']} chunks in {figures['packs']} packs: "
                       f"{len(problems) or 'no'} problems", err=True)
    if problems:
        raise SystemExit(1)


@remote.command(name="show")
@click.argument("name")
@json_opt
def remote_show(name: str, as_json: bool) -> None:
    """The snapshots and branches of the remote NAME: the commit each names, the host and
    the time it was pushed from."""
    import datetime

    rows = []
    with _fleet_errors(f"remote show {name}"), _open(name) as r:
        for family in ("snap", "branch"):
            for ref, cid in r.list_refs(family):
                doc = r.commit(cid)
                rows.append({"kind": "snapshot" if family == "snap" else "branch", "name": ref, "commit": cid,
                             "host": doc.get("host"), "created": doc.get("created_ns", 0) / 1e9,
                             "parent": doc.get("parent")})
    if as_json:
        click.echo(json.dumps({"ok": True, "refs": rows}))
        return
    for row in rows:
        when = datetime.datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{row['kind']:<8}  {row['name']}  {row['commit'][:12]}  {when}  {row['host']}")


@remote.command(name="hold", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("branch")
@click.option("--ttl", default=30, show_default=True, type=click.IntRange(2, 3600),
              help="Seconds the hold outlives this process if it dies (renewed every ttl/3 while it runs).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def remote_hold(name: str, branch: str, ttl: int, command: tuple[str, ...]) -> None:
    """Run COMMAND holding the branch BRANCH of the remote NAME: while it runs, only pushes
    from within it move the branch (`cowfs push ... --branch BRANCH`); another host's hold,
    push or writable mount of a branch following it is refused, naming this one.  (A writable
    mount of a branch that follows BRANCH holds it itself: -o hold_ttl.)  A holder that dies keeps the branch --ttl seconds, then
    anyone may take it.  Exit status: the command's.

        cowfs remote hold origin dev -- agent-runner /srv/sandbox/dev
    """
    from cowfs.cli.run import _wait
    from cowfs.fleet.remote import HOLD_ENV

    _ref_name(branch, "branch")
    with _fleet_errors(f"remote hold {branch}"), _open(name) as r, r.holding(branch, ttl) as lease:
        env = dict(os.environ, **{HOLD_ENV: json.dumps({"remote": r.key, "branch": branch,
                                                        "value": lease.fence[2].hex()})})
        try:
            proc = subprocess.Popen(list(command), env=env)
        except OSError as e:
            raise CliError(f"{command[0]}: {e.strerror}") from None
        rc = _wait(proc)
        if lease.lost.is_set():
            click.echo(f"cowfs: the hold of branch {branch} on {name} was lost while the command ran (etcd "
                       f"unreachable?); pushes after that were refused", err=True)
    raise SystemExit(rc)


@remote.command(name="delete")
@click.argument("name")
@click.argument("ref")
@click.option("--branch", "is_branch", is_flag=True, help="REF is a branch of the remote, not a snapshot.")
def remote_delete(name: str, ref: str, is_branch: bool) -> None:
    """Delete the snapshot (or with --branch, the branch) REF of the remote NAME: the name
    only; what no other name reaches goes at a later `cowfs remote gc`."""
    with _fleet_errors(f"remote delete {ref}"), _open(name) as r:
        cid = r.delete_ref("branch" if is_branch else "snap", ref)
    click.echo(f"deleted {'branch' if is_branch else 'snapshot'} {ref} of {name} (it named commit {cid[:12]})")


@remote.command(name="gc")
@click.argument("name")
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds an object must stay unreachable (since a gc first found it so) before it is deleted.")
@click.option("--repack-below", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Repack the packs whose live bytes are under this share of their size (0: never).")
@click.option("--dry-run", is_flag=True, help="Say what would be condemned, deleted and repacked; change nothing.")
@json_opt
def remote_gc(name: str, grace: float, repack_below: float, dry_run: bool, as_json: bool) -> None:
    """Remove the objects of the remote NAME that no reference reaches (deleted by a run at
    least --grace seconds after one found them so) and repack its mostly dead packs.  Never
    beside a push; deletes nothing if `cowfs remote check` finds a problem."""
    from cowfs.fleet.gc import gc

    faults.load(os.environ.get(faults.ENV))     # a test hook (cowfs.faults): where a test kills the gc
    with _fleet_errors(f"remote gc {name}"), _open(name) as r:
        f = gc(r, grace, dry_run, repack_below)
    click.echo(json.dumps({"ok": True, **f}) if as_json else remote_gc_line(name, f))


# --- cowfs push ----------------------------------------------------------------------------------

@click.command()
@click.argument("mount")
@click.argument("snapshot")
@click.argument("remote_name", metavar="REMOTE")
@click.option("--as", "as_name", metavar="NAME", help="The snapshot's name on the remote (default: SNAPSHOT).")
@click.option("--branch", "remote_branch", metavar="B",
              help="Also move the remote's branch B to this snapshot, only if it is still where this branch last "
                   "saw it (pulled or pushed); a conflict otherwise, never an overwrite.")
@json_opt
def push(mount: str, snapshot: str, remote_name: str, as_name: str | None, remote_branch: str | None,
         as_json: bool) -> None:
    """Push snapshot SNAPSHOT of the branch mounted at MOUNT to the remote REMOTE.

    Uploads only what the remote lacks (chunks packed with an index, one object per changed
    directory, a commit), then sets the remote's snapshot reference by compare-and-set.  An
    interrupted push changes no reference; pushing again uploads only what is missing.
    """
    from cowfs.daemon.mounts import daemon_pid
    from cowfs.fleet.holds import holder_name
    from cowfs.fleet.push import push as do_push
    from cowfs.fleet.state import State
    from cowfs.treecopy import scan

    place = targets.mount_of(mount)
    ref = _ref_name(as_name or snapshot, "snapshot")
    if remote_branch is not None:
        _ref_name(remote_branch, "branch")
    listing, _where, _mp = admin.listing_of(place.mountpoint)
    if snapshot not in {s["name"] for s in listing["snapshots"]}:
        raise CliError(f"no snapshot named {snapshot!r} in the lineage of {place.mountpoint} "
                       f"(take one with cowfs snapshot {place.mountpoint} {snapshot})")
    branch = next((b["name"] for b in listing["branches"] if b.get("mounted_here")), "")
    root = os.path.join(place.mountpoint, ".cowfs", "snapshots", snapshot)
    # what this branch learned its mounts read first, sent with the snapshot (a lazy mount fetches it ahead)
    try:
        learned = api.control(place.mountpoint, "coldstart", snapshot)
        warm, model, no_warm = learned["files"], learned.get("model"), None
    except api.CowfsError as e:        # e.g. no access to the control file: the push goes on without it
        warm, model, no_warm = [], None, f"no learned cold start or prefetch model sent with the snapshot: {e}"
    _entries, total = scan(root)
    state = State()
    try:
        with _fleet_errors(f"push of {snapshot} to {remote_name}"), _open(remote_name) as r, \
                progress.bar(f"pushing {snapshot}", total, quiet=as_json) as update:
            s = do_push(r, state, place.store, branch, snapshot, root, ref, remote_branch, update, warm,
                        holder_name(daemon_pid(place.store) or 0, place.store, branch), model)
            if no_warm:
                s.warnings.append(no_warm)
    finally:
        state.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "pushed": s.as_dict()}))
        return
    for w in s.warnings:
        click.echo(f"warning: {w}", err=True)
    if progress.shown():
        click.echo(f"pushed {snapshot} to {remote_name} as {ref}{f' (branch {remote_branch})' if remote_branch else ''}: "
                   f"{s.objects_uploaded} objects, {human(s.bytes_uploaded)} uploaded "
                   f"({s.chunks_new} new chunks and trees, {s.chunks_skipped + s.trees_skipped} already there), "
                   f"commit {s.commit[:12]}, in {s.seconds:.1f} s", err=True)


# --- cowfs pull ----------------------------------------------------------------------------------

@click.command()
@click.argument("remote_name", metavar="REMOTE")
@click.argument("name")
@click.argument("store", type=click.Path())
@click.option("--branch", "is_branch", is_flag=True, help="NAME is a branch of the remote (its head), not a snapshot.")
@click.option("--into", metavar="B", help="The new branch of STORE (default: NAME).")
@click.option("--snapshot", "snap_name", metavar="S", help="The snapshot taken of it (default: B.<commit>).")
@json_opt
def pull(remote_name: str, name: str, store: str, is_branch: bool, into: str | None, snap_name: str | None,
         as_json: bool) -> None:
    """Pull the remote's snapshot NAME (with --branch: the head of its branch NAME) into STORE
    as the new branch B, and take its snapshot S.

    Every fetched object is checked against its hash.  When STORE has a snapshot that holds
    an ancestor of it (pulled or pushed before), B is made from that snapshot and only what
    differs is fetched and written; else everything is.  With --branch, a later
    `cowfs push MOUNT SNAP REMOTE --branch NAME` from B succeeds only if nobody moved the
    remote branch meanwhile.
    """
    from cowfs.cli.pullbranch import (PULLING, clear_killed_pulls_mounts, drop_branch, find_base, make_branch,
                                      mark_pulling, store_listing, take_over_killed_pull)
    from cowfs.fleet.pull import Puller
    from cowfs.fleet.state import State

    store = require_store(store)
    clear_killed_pulls_mounts(store)
    into = _ref_name(into or name, "branch")
    kind = "branch" if is_branch else "snap"
    listing = store_listing(store)
    snaps = {s["name"]: s for s in listing["snapshots"]}
    branches = [b["name"] for b in listing["branches"]]
    state = State()
    try:
        killed = state.pulling(store, into) if into in branches else None
        if into in snaps or (into in branches and killed is None):
            raise CliError(f"{store} has a {'branch' if into in branches else 'snapshot'} named {into!r} already; "
                           "pull into a new branch with --into NAME")
        with _fleet_errors(f"pull of {name} from {remote_name}"), _open(remote_name) as r:
            cid = r.get_ref(kind, name)
            if cid is None:
                have = ", ".join(n for n, _c in r.list_refs(kind)) or "none"
                raise CliError(f"the remote {remote_name} has no {'branch' if is_branch else 'snapshot'} named "
                               f"{name!r} (it has: {have})")
            snap = _ref_name(snap_name or f"{into}.{cid[:12]}", "snapshot")
            if snap in snaps or snap in branches:
                raise CliError(f"{store} has a snapshot or branch named {snap!r} already; choose another with --snapshot")
            commit = r.commit(cid)
            if killed is not None:
                take_over_killed_pull(store, into, killed, (r.key, cid))
                base = None                       # what the killed pull wrote is not trusted: all written
            else:
                base = find_base(r, state, store, cid, snaps)
            r.index_commit(commit)                # the packs of its tree (and of the base's: the
            if base:                              # old trees diffed against)
                r.index_commit(r.commit(base[0]))
            state.set_pulling(store, into, r.key, cid)
            if killed is None:
                make_branch(store, into, base[1] if base else None, snaps, branches)
            ours = killed is None                 # a branch this pull may drop if it fails
            try:
                base_root = r.commit(base[0])["root"] if base else None
                with branch_mounted(store, into, purpose="pull") as mp, \
                        progress.bar(f"pulling {name}", None, quiet=as_json) as update:
                    ours = mark_pulling(mp, store, into, cid, killed is not None)
                    puller = Puller(r, update)
                    s = puller.sync(mp, commit["root"], base_root, str(r.cache / "spool"))
                    with contextlib.suppress(OSError):
                        os.removexattr(mp, PULLING)
                    try:
                        api.control(mp, "snapshot", snap)
                    except api.CowfsError as e:
                        raise CliError(f"snapshot {snap}: {e}") from None
                    state.remember_chunks(puller.cache_rows(store, os.path.join(mp, ".cowfs", "snapshots", snap)))
            except BaseException:
                if ours and drop_branch(store, into):
                    state.done_pulling(store, into)
                raise
            s.commit = cid
            state.set_synced(store, snap, r.key, cid)
            state.set_origin(store, into, r.key, cid)
            if is_branch:
                state.set_base(store, into, r.key, name, cid)
                state.set_tie(store, into, r.cfg, name)
            state.done_pulling(store, into)
    finally:
        state.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "pulled": {**s.as_dict(), "branch": into, "snapshot": snap,
                                                      "base": base[1] if base else None}}))
    elif progress.shown():
        click.echo(f"pulled {name} from {remote_name} into branch {into} (snapshot {snap}"
                   f"{f', based on {base[1]}' if base else ''}): {s.chunks_fetched} chunks, "
                   f"{human(s.bytes_fetched)} fetched, {s.files_written} files written in {s.seconds:.1f} s", err=True)


def lazy_prepare(source: str, store: str) -> tuple[str, "Callable[[MountConfig], Store] | None"]:
    """For `cowfs mount REMOTE:SNAPSHOT MNT --store STORE`: the store to mount, and the build
    that creates it from the snapshot's metadata (None when an earlier lazy mount of the same
    snapshot built it).  The daemon runs the build and serves the store it returns open
    (cowfs.daemon.process): no second interpreter, no reopen; a failed build removes what it
    made and raises MountError, one line."""
    from cowfs.fleet import config, lazy, lazybuild

    remote_name, sep, snapshot = source.partition(":")
    if not sep or not remote_name or not snapshot:
        raise CliError(f"a lazy mount takes REMOTE:SNAPSHOT (with --store), not {source!r}")
    _ref_name(snapshot, "snapshot")
    with _fleet_errors(f"lazy mount of {source}"):
        cfg = config.get(remote_name)
    store = os.path.abspath(store)
    built = lazy.source_of(store) if os.path.isdir(store) else None
    if built is not None:
        if built["snapshot"] != snapshot or built["remotes"][0]["url"] != cfg.url:
            raise CliError(f"{store} is the lazy mount of {built['remotes'][0]['name']}:{built['snapshot']}, "
                           f"not of {source}: choose another --store")
        return store, None
    with _fleet_errors(f"lazy mount of {source}"):
        if os.path.isdir(store) and lazybuild.clear_half_built(store) is not None:
            click.echo(f"cowfs: {store} was left half built by a lazy mount killed during its build: "
                       "building it again", err=True)
    if os.path.exists(store) and (not os.path.isdir(store) or os.listdir(store)):
        pull = (f"; to have the snapshot as a branch of this cowfs store, pull it (its data fetched now): cowfs "
                f"pull {remote_name} {snapshot} {store} --into BRANCH" if targets.is_store(store) else "")
        raise CliError(f"{store} exists and is not the store of a lazy mount: a lazy mount builds a new store "
                       f"(choose a path that does not exist, or an empty directory){pull}")
    existed = os.path.isdir(store)

    def build(mount_cfg: "MountConfig") -> "Store":
        try:
            # The daemon's own imports, made while the build's child fetches the metadata
            return lazybuild.build(store, cfg, snapshot, (mount_cfg.cache_l1, mount_cfg.cache_l2),
                                   meanwhile=lambda: importlib.import_module("cowfs.daemon.server"))[0]
        except Exception as e:      # noqa: BLE001 - one line; made by this command, half built: nothing to keep
            from cowfs.remote import one_line

            if os.path.isdir(store):
                lazybuild.remove_built(store, keep_dir=existed)
            raise MountError(f"lazy mount of {source}: {one_line(e)}") from None
    return store, build


def lazy_built(source: str, store: str) -> None:
    """What the build of a lazy mount made, from its lazy.json (when progress is shown)."""
    from cowfs.fleet import lazy

    b = (lazy.source_of(store) or {}).get("build")
    if b and progress.shown():
        click.echo(f"built the tree of {source} (commit {b['commit'][:12]}) in {store}: {b['files']} files, "
                   f"{b['dirs']} directories, {human(b['bytes'])} of data left on the remote "
                   f"({b['remote_chunks']} chunks), in {b['seconds']:.1f} s", err=True)


COMMANDS = (remote, push, pull)
