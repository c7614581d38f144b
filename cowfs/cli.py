"""The `cowfs` command.  Every failure is one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import grp
import json
import os
import sys
import time
from typing import Any

import click

from cowfs import admin, api
from cowfs.errors import MountError, StoreError
from cowfs.mounts import mounted_store


def _fail(msg: str) -> None:
    click.echo(f"cowfs: {msg}", err=True)
    sys.exit(1)


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


# Mount points are plain strings, not click.Path: its stat would hang on a hung mount.
mount_arg = click.argument("mount")
target_arg = click.argument("target")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cowfs: copy-on-write sandbox filesystems with snapshots, branches and O(1) clones."""


@main.command()
@click.argument("store", type=click.Path())
def init(store: str) -> None:
    """Create a new, empty store directory STORE (with one branch, 'main')."""
    from cowfs.store import init_store

    try:
        init_store(store)
    except StoreError as exc:
        _fail(str(exc))
    click.echo(f"created store {os.path.abspath(store)} (branch main)")


@main.command()
@click.argument("store", type=click.Path())
@click.argument("mountpoint", metavar="MOUNTPOINT")  # not click.Path: its stat would hang on a hung mount
@click.option("--branch", default="main", show_default=True, help="Branch to mount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); exit when unmounted.")
@click.option("-o", "options", multiple=True, metavar="OPTION",
              help="Mount option: allow_other, suid, dev, cache_l1=SIZE (alias cache_size), cache_l2=SIZE, "
                   "prefetch=0|1, prefetch_learn=0|1, dir_cache=0|1, quota_bytes=SIZE, quota_inodes=N, ctl_group=GID, "
                   "dedup=on|off (background delta encoding and sharing), dedup_cpu=SHARE (its CPU cap, 0-1, "
                   "default 0.25), share=on|off (copied trees share their originals' records) "
                   "(repeatable, or comma-separated).")
@click.option("--debug", is_flag=True, help="Log every operation.")
def mount(store: str, mountpoint: str, branch: str, foreground: bool, options: tuple[str, ...], debug: bool) -> None:
    """Mount branch BRANCH of STORE at MOUNTPOINT; returns once the mount is ready."""
    from cowfs import daemon

    flat = [o.strip() for opt in options for o in opt.split(",") if o.strip()]
    cfg = daemon.MountConfig(store, mountpoint, branch, debug=debug)
    for o in flat:
        key, _, value = o.partition("=")
        try:
            if daemon.set_cache_option(cfg, key, value, _parse_size):
                continue
            if key == "quota_bytes":
                cfg.quota_bytes = _parse_size(value)
            elif key == "quota_inodes":
                cfg.quota_inodes = int(value)
            elif key == "ctl_group":
                cfg.ctl_group = int(value) if value.isdigit() else grp.getgrnam(value).gr_gid
            elif o in ("allow_other", "suid", "dev", "nosuid", "nodev"):
                cfg.options.append(o)
            else:
                _fail(f"unknown mount option {o!r} (known: allow_other, suid, dev, {daemon.CACHE_OPTIONS}, "
                      "cache_size=SIZE, quota_bytes=SIZE, quota_inodes=N, ctl_group=GROUP)")
        except (ValueError, KeyError):
            _fail(f"bad value in -o {o}")
    try:
        code = daemon.mount(cfg, foreground)
    except MountError as exc:
        _fail(str(exc))
    if code:
        sys.exit(code)
    if not foreground:
        click.echo(f"mounted branch {branch} of {cfg.store} at {cfg.mountpoint}")
        click.echo(f"unmount with: cowfs umount {cfg.mountpoint}")


@main.command()
@click.argument("mountpoint", metavar="MOUNTPOINT")  # not click.Path: its stat would hang on a hung mount
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.option("--force", is_flag=True,
              help="For a daemon that hangs: abort its FUSE connection (every mount of its store) and kill it. "
                   "As in a crash, writes not yet fsynced may be lost.")
def umount(mountpoint: str, timeout: float, force: bool) -> None:
    """Flush everything, unmount MOUNTPOINT and wait for its daemon to exit.

    The mount of a daemon that died (killed, crashed) is cleared, even when processes
    hang in it: its FUSE connection is aborted."""
    from cowfs import mounts

    try:
        click.echo(mounts.umount(mountpoint, timeout, force))
    except MountError as exc:
        _fail(str(exc))


def _resolve_store(target: str) -> str:
    return mounted_store(target) or os.path.abspath(target)


@main.command()
@target_arg
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(target: str, as_json: bool) -> None:
    """Figures of a store, or of the store behind a mount point TARGET.

    Without a daemon, the store's space figures are read from the store itself.
    """
    from cowfs.mounts import daemon_pid
    from cowfs.store import Store

    store = _resolve_store(target)
    if mounted_store(target) is not None and not os.access(store, os.R_OK | os.X_OK):
        # A store is private to its owner (cowfs.private): others see what the mount shows them.
        try:
            data = api.stats(target)
        except (api.CowfsError, OSError, ValueError) as exc:
            _fail(f"{target}: {exc}")
    elif daemon_pid(store) is None:  # not served (a socket left by a killed daemon does not count)
        try:
            st = Store(store)
        except StoreError as exc:
            _fail(str(exc))
        try:
            data: dict[str, Any] = {"ok": True, "store": store, **st.space(), "shared": st.meta.shared.figures()}
        finally:
            st.close()
    else:
        try:
            data = admin.request(store, {"cmd": "stats"})
        except OSError as exc:
            _fail(f"cannot reach the daemon of {store}: {exc}")
    if as_json:
        click.echo(json.dumps(data))
        return
    cache = data.pop("cache", {})
    for k, v in data.items():
        click.echo(f"{k:>18}: {v}")
    for level in ("l1", "l2"):
        c = cache.get(level, {})
        click.echo(f"{'cache ' + level:>18}: {c.get('bytes', 0)} of {c.get('max_bytes', 0)} bytes, "
                   f"{c.get('entries', 0)} entries, hit rate {c.get('hit_rate', 0)}, hits {c.get('hits', 0)}, "
                   f"misses {c.get('misses', 0)}, evictions {c.get('evictions', 0)}")
    pf = cache.get("prefetch", {})
    for source in ("readahead", "learned"):
        p = pf.get(source, {})
        click.echo(f"{source:>18}: {p.get('prefetched', 0)} chunks prefetched, {p.get('used', 0)} of them read "
                   f"(precision {p.get('precision', 0)}), {p.get('served_reads', 0)} reads served")
    click.echo(f"{'prefetch recall':>18}: {pf.get('recall', 0)} of {pf.get('chunk_reads', 0)} chunk reads")


# -- control-file wrappers: they work from inside a sandbox that only has the mount -------
def _ctl(mount: str, timeout: float, *words: str) -> dict[str, Any]:
    """Write one command line to MOUNT/.cowfs/ctl and return the daemon's JSON reply."""
    try:
        return api.control_reply(mount, *words, timeout=timeout)
    except api.CowfsError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _syncfs(mount: str, timeout: float) -> None:
    """Push data still dirty in the kernel's page cache to the daemon first."""
    try:
        api.syncfs(mount, timeout)
    except api.CowfsError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{mount}: {exc.strerror}")


def _show(reply: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(reply))
    if not reply.get("ok"):
        if not as_json:
            click.echo(f"cowfs: {reply.get('error')} ({reply.get('errno')})", err=True)
        sys.exit(1)
    if not as_json and text:
        click.echo(text)


def ctl_opts(fn: Any) -> Any:
    """--json and --timeout of the control-file commands."""
    fn = click.option("--timeout", default=api.CONTROL_TIMEOUT, show_default=True, type=float,
                      help="Seconds to wait for the daemon's answer (a hung mount fails instead of hanging).")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print the daemon's JSON reply.")(fn)


@main.command()
@mount_arg
@click.argument("name")
@ctl_opts
def snapshot(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Take an immutable snapshot NAME of the branch mounted at MOUNT."""
    _syncfs(mount, timeout)
    _show(_ctl(mount, timeout, "snapshot", name), as_json, f"snapshot {name} taken")


@main.command()
@mount_arg
@click.argument("name")
@click.option("--from", "source", help="Snapshot (or the mounted branch) to start from.")
@ctl_opts
def branch(mount: str, name: str, source: str | None, as_json: bool, timeout: float) -> None:
    """Create a writable branch NAME from the mounted branch's current state (or --from)."""
    if source is None:
        _syncfs(mount, timeout)
    words = ["branch", name] + ([source] if source else [])
    _show(_ctl(mount, timeout, *words), as_json, f"branch {name} created")


@main.command()
@mount_arg
@click.argument("name")
@ctl_opts
def rollback(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Return the branch mounted at MOUNT exactly to snapshot NAME."""
    _show(_ctl(mount, timeout, "rollback", name), as_json, f"rolled back to {name}")


@main.command()
@mount_arg
@click.argument("src")
@click.argument("dst")
@ctl_opts
def clone(mount: str, src: str, dst: str, as_json: bool, timeout: float) -> None:
    """Copy SRC to DST inside MOUNT in O(1), sharing data (paths relative to MOUNT)."""
    _syncfs(mount, timeout)
    _show(_ctl(mount, timeout, "clone", src, dst), as_json, f"cloned {src} to {dst}")


@main.command()
@mount_arg
@click.argument("name")
@ctl_opts
def delete(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Delete snapshot NAME, or branch NAME if it is not mounted."""
    _show(_ctl(mount, timeout, "delete", name), as_json, f"deleted {name}")


@main.command(name="list")
@mount_arg
@ctl_opts
def list_(mount: str, as_json: bool, timeout: float) -> None:
    """Snapshots and branches of the lineage mounted at MOUNT."""
    reply = _ctl(mount, timeout, "list")
    _show(reply, as_json)
    if not as_json:
        rows = reply["snapshots"] + reply["branches"]
        click.echo(f"{'NAME':<24} {'KIND':<9} {'PARENT':<20} {'CREATED':<20} {'LOGICAL':>12}")
        for r in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
            click.echo(f"{r['name']:<24} {r['kind']:<9} {str(r['parent'] or '-'):<20} {created:<20} "
                       f"{r['logical_bytes']:>12}")


@main.command()
@mount_arg
@click.argument("a")
@click.argument("b", required=False)
@ctl_opts
def diff(mount: str, a: str, b: str | None, as_json: bool, timeout: float) -> None:
    """Paths added, removed, modified or renamed from snapshot/branch A to B (default: live)."""
    if b is None:
        _syncfs(mount, timeout)
    reply = _ctl(mount, timeout, "diff", a, *([b] if b else []))
    _show(reply, as_json)
    if not as_json:
        marks = {"added": "+", "removed": "-", "modified": "M", "renamed": "R"}
        for c in reply["changes"]:
            extra = f" (from {c['from']})" if c.get("from") is not None else ""
            click.echo(f"{marks[c['change']]}\t{c['path']}{extra}")


@main.command()
@target_arg
def gc(target: str) -> None:
    """Collect garbage now in the store (or the store behind mount point TARGET)."""
    store = _resolve_store(target)
    if not os.path.exists(admin.socket_path(store)):
        _fail(f"{target}: no running daemon serves this store (mount it first)")
    reply = admin.request(store, {"cmd": "gc"}, timeout=600)
    if not reply.get("ok"):
        _fail(str(reply.get("error")))
    click.echo(f"removed {reply['versions_removed']} metadata versions")


@main.command()
@target_arg
@click.option("--wait", is_flag=True, help="Return once the background queue is empty and copied trees are shared.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait at most.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def dedup(target: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Background work on the store (or the store behind mount point TARGET): delta encoding
    of chunks and sharing of copied trees' records; figures, or wait for both."""
    store = _resolve_store(target)
    if not os.path.exists(admin.socket_path(store)):
        _fail(f"{target}: no running daemon serves this store (mount it first)")
    reply = admin.request(store, {"cmd": "dedup", "wait": wait, "timeout": timeout}, timeout=timeout + 30)
    if as_json:
        click.echo(json.dumps(reply))
    if not reply.get("ok"):
        _fail(str(reply.get("error")))
    if not as_json:
        shared = reply.get("shared", {})
        click.echo(f"queue {reply['background_queue']} chunks; {reply['delta_chunks']} of {reply['chunks']} "
                   f"chunks are deltas, saving {reply['delta_saved_bytes']} bytes; {shared.get('inodes', 0)} "
                   f"inodes of copied trees share their originals' records ({shared.get('ranges', 0)} ranges)")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--repair", is_flag=True, help="Fix what can be fixed without losing data.")
@click.option("--no-verify-data", is_flag=True, help="Skip decoding and hashing every stored chunk.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def fsck(store: str, repair: bool, no_verify_data: bool, as_json: bool) -> None:
    """Check STORE for consistency (exit 0 clean, 1 all problems repaired, 4 problems left).

    The store must not be mounted: its daemon would change it under the check.
    """
    from cowfs.fsck import Fsck
    from cowfs.store import Store

    try:
        st = Store(store)
    except StoreError as exc:
        _fail(f"{exc}; unmount it first (cowfs umount)" if "in use" in str(exc) else str(exc))
    tty = sys.stderr.isatty() and not as_json
    done: dict[str, int] = {}

    def progress(stage: str, n: int) -> None:
        done[stage] = done.get(stage, 0) + n
        if tty and done[stage] % 500 == 0:
            click.echo(f"\rfsck: {stage}: {done[stage]}", err=True, nl=False)

    try:
        report = Fsck(st, repair=repair, progress=progress, verify_data=not no_verify_data).run()
    finally:
        st.close()
    if tty:
        click.echo("\r" + " " * 40 + "\r", err=True, nl=False)
    left = bool(report.problems) and (not repair or bool(report.unrepairable))
    code = 0 if not report.problems else (4 if left else 1)
    if as_json:
        click.echo(json.dumps({"clean": report.clean, "problems": report.problems, "repaired": report.repaired,
                               "unrepairable": report.unrepairable, "counts": dict(report.counts),
                               "exit_code": code}))
    else:
        for p in report.problems:
            click.echo(f"problem: {p}")
        for r in report.repaired:
            click.echo(f"repaired: {r}")
        for u in report.unrepairable:
            click.echo(f"cannot repair: {u}")
        c = report.counts
        click.echo(f"{st.path}: {c['inodes']} inodes in all views, {c['entries']} entries, "
                   f"{c['objects']} objects checked: "
                   + ("clean" if report.clean else f"{len(report.problems)} problems"))
    sys.exit(code)


from cowfs import cli_ops  # noqa: E402,F401  (status, log, run, import, export)

if __name__ == "__main__":
    main()
