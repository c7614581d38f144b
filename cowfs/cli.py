"""The `cowfs` command: click commands, thin over cowfs.cliutil, cowfs.report and the API.

Every failure is one clear message on stderr (what was refused and who may do it) and a
non-zero exit status; a traceback only with `cowfs --debug` (or COWFS_DEBUG=1).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, NoReturn

import click

from cowfs import __version__, api, cliutil, mount_options, progress, report
from cowfs.cliutil import CliError
from cowfs.errors import MountError, StoreError
from cowfs.textfmt import quote_path

EXIT_CODES = """\b
Exit status: 0 success; 1 failure (the message on stderr says why); 2 bad usage.
fsck has its own codes (cowfs help exit-codes); run passes its command's on."""


def _fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"cowfs: {msg}", err=True)
    sys.exit(code)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(os.environ.get("COWFS_DEBUG")) or bool(root is not None and (root.obj or {}).get("debug"))


class CowfsGroup(click.Group):
    """Turns whatever a command did not catch into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            sys.stderr.close()  # `cowfs ... | head`: the reader left; nothing to say
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - the point: no traceback without --debug
            if _debug():
                traceback.print_exc()
            else:
                click.echo(f"cowfs: {cliutil.describe(exc)} (cowfs --debug shows the traceback)", err=True)
            sys.exit(1)


def complete_mounts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Mount points of cowfs (then directories, as a shell would)."""
    from click.shell_completion import CompletionItem

    from cowfs.mounts import cowfs_mounts

    out = [CompletionItem(e.mountpoint) for e in cowfs_mounts() if e.mountpoint.startswith(incomplete)]
    return out + [CompletionItem(incomplete, type="dir")]


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Snapshot and branch names of the mount given before (what its branch owns), or of
    the store given before when its daemon serves it (completion never opens a store: that
    would hold its lock against a mount starting meanwhile)."""
    from click.shell_completion import CompletionItem

    from cowfs import admin, targets
    from cowfs.mounts import daemon_pid

    given = ctx.params.get("mount") or ctx.params.get("target")
    if not given:
        return []
    found = targets.place(given)
    try:
        if found is not None:
            listing = api.control(found.mountpoint, "list", timeout=3)
        elif daemon_pid(os.path.abspath(given)) is not None:
            listing = admin.request(os.path.abspath(given), {"cmd": "list"}, timeout=3)
        else:
            return []
    except Exception:  # noqa: BLE001 - completion offers nothing rather than fail
        return []
    names = [r["name"] for r in listing.get("snapshots", []) + listing.get("branches", [])]
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


# Mount points are plain strings, not click.Path: its stat would hang on a hung mount.
mount_arg = click.argument("mount", shell_complete=complete_mounts)
target_arg = click.argument("target", shell_complete=complete_mounts)


def json_opt(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object (raw numbers).")(fn)


@click.group(cls=CowfsGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, "--version", "-V", prog_name="cowfs", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show a traceback when a command fails unexpectedly (also COWFS_DEBUG=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """cowfs: copy-on-write sandbox filesystems with snapshots, branches and O(1) clones.

    MOUNT (and TARGET) is any path inside a cowfs mount, relative to the current directory;
    a TARGET may also be a store directory.

    `cowfs help TOPIC` explains a command or a topic (mount-options, control-file,
    exit-codes, completion); `cowfs help --man` prints all of it as a man page.
    """
    ctx.obj = {"debug": debug}


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


@main.command(epilog="\b\nMount options (-o NAME or -o NAME=VALUE, repeatable or comma-separated):\n"
              + "\n".join(mount_options.help_lines()))
@click.argument("store", type=click.Path())
@click.argument("mountpoint", metavar="MOUNTPOINT", shell_complete=complete_mounts)
@click.option("--branch", default="main", show_default=True, help="Branch to mount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); exit when unmounted.")
@click.option("-o", "options", multiple=True, metavar="OPTION", help="Mount option (listed below).")
@click.option("--debug", is_flag=True, help="The daemon logs every operation (STORE/daemon.log).")
def mount(store: str, mountpoint: str, branch: str, foreground: bool, options: tuple[str, ...], debug: bool) -> None:
    """Mount branch BRANCH of STORE at MOUNTPOINT; returns once the mount is ready."""
    from cowfs import daemon

    cfg = daemon.MountConfig(store, mountpoint, branch, debug=debug)
    for o in mount_options.split(options):
        try:
            mount_options.apply(cfg, o)
        except mount_options.OptionError as exc:
            _fail(str(exc))
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
@click.argument("mountpoint", metavar="MOUNTPOINT", shell_complete=complete_mounts)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.option("--force", is_flag=True,
              help="Only for a daemon that does not answer: abort its FUSE connection (every mount of its store) "
                   "and kill it (root only). As in a crash, writes not yet fsynced may be lost.")
def umount(mountpoint: str, timeout: float, force: bool) -> None:
    """Flush everything, unmount MOUNTPOINT and wait for its daemon to exit.

    A mount that processes still use is left alone, and they are named.  The mount of a
    daemon that died (killed, crashed) is cleared, even when processes hang in it: its
    FUSE connection is aborted.  Only root and the user who mounted it may unmount it.
    """
    from cowfs import mounts

    try:
        click.echo(mounts.umount(mountpoint, timeout, force))
    except MountError as exc:
        _fail(str(exc))


@main.command()
@target_arg
@json_opt
def stats(target: str, as_json: bool) -> None:
    """Figures of a store, or of the store behind the mount holding TARGET.

    Served by its daemon when the store is mounted (for a user who may not talk to the
    daemon, from the mount's .cowfs/stats), else read from the store itself.
    """
    try:
        data = cliutil.store_stats(target)
    except CliError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(data))
        return
    for line in report.stats_lines(data):
        click.echo(line)


# -- control-file wrappers: they work from inside a sandbox that only has the mount -------
def _mount(path: str) -> str:
    """The mount point of the cowfs mount holding path (any path inside it, relative to the
    current directory)."""
    from cowfs import targets

    try:
        return targets.mount_of(path).mountpoint
    except targets.TargetError as exc:
        _fail(str(exc))


def _in_mount(mount: str, path: str) -> str:
    """path (relative to the current directory inside the mount, else to its root) as the
    control file takes it: relative to the mount root."""
    from cowfs import targets

    try:
        return targets.in_mount(targets.mount_of(mount), path)
    except targets.TargetError as exc:
        _fail(str(exc))


def _ctl(mount: str, timeout: float, *words: str, label: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Write one command line to MOUNT/.cowfs/ctl and return the daemon's JSON reply."""
    try:
        with progress.waiting(label or words[0], quiet=quiet):
            return api.control_reply(mount, *words, timeout=timeout)
    except api.CowfsError as exc:
        _fail(str(exc))


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
            code = f" ({reply['errno']})" if reply.get("errno") else ""
            click.echo(f"cowfs: {reply.get('error')}{code}", err=True)
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
    """Take an immutable snapshot NAME of the branch mounted at MOUNT (any path inside it)."""
    mount = _mount(mount)
    _syncfs(mount, timeout)
    _show(_ctl(mount, timeout, "snapshot", name), as_json, f"snapshot {name} taken")


@main.command()
@mount_arg
@click.argument("name")
@click.option("--from", "source", help="Snapshot (or the mounted branch) to start from.",
              shell_complete=complete_names)
@ctl_opts
def branch(mount: str, name: str, source: str | None, as_json: bool, timeout: float) -> None:
    """Create a writable branch NAME from the mounted branch's current state (or --from)."""
    mount = _mount(mount)
    if source is None:
        _syncfs(mount, timeout)
    words = ["branch", name] + ([source] if source else [])
    reply = _ctl(mount, timeout, *words)
    _hint_foreign(mount, reply, [source] if source else [])
    _show(reply, as_json, f"branch {name} created")


@main.command()
@mount_arg
@click.argument("name", shell_complete=complete_names)
@ctl_opts
def rollback(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Return the branch mounted at MOUNT exactly to snapshot NAME."""
    mount = _mount(mount)
    reply = _ctl(mount, timeout, "rollback", name, quiet=as_json)
    _hint_foreign(mount, reply, [name])
    _show(reply, as_json, f"rolled back to {name}")


@main.command()
@mount_arg
@click.argument("src")
@click.argument("dst")
@ctl_opts
def clone(mount: str, src: str, dst: str, as_json: bool, timeout: float) -> None:
    """Copy SRC to DST inside MOUNT in O(1), sharing data.

    MOUNT is any path inside the mount.  SRC and DST are taken from the current directory
    when it is inside the mount (`cd MNT/repo && cowfs clone . README.md R2`), else from the
    mount root; SRC may be inside .cowfs/snapshots/NAME/ (a file or tree of a snapshot).
    """
    mount = _mount(mount)
    words = ("clone", _in_mount(mount, src), _in_mount(mount, dst))
    _syncfs(mount, timeout)
    reply = _ctl(mount, timeout, *words, label=f"cloning {quote_path(src)}", quiet=as_json)
    _show(reply, as_json, f"cloned {quote_path(src)} to {quote_path(dst)}")


def _place(target: str) -> Any:
    """The cowfs mount holding target (cowfs.targets.Place), or None."""
    from cowfs import targets

    return targets.place(target)


def _is_store(target: str) -> bool:
    """target is (or, unreadable to us, may be) a store directory."""
    from cowfs.offline import is_store

    return is_store(os.path.abspath(target))


def _hint_foreign(mount: str, reply: dict[str, Any], names: list[str]) -> None:
    """To the store's administrator only: a name a mount answered as absent that the store
    has, belongs to another lineage (through a mount, an unknown and a foreign name must
    look the same to a sandbox; root and the store's owner may see the whole store)."""
    if reply.get("ok") or reply.get("errno") != "ENOENT":
        return
    hint = cliutil.foreign_hint(mount, names)
    if hint:
        reply["error"] = f"{reply.get('error')}; {hint}"


def _store_wide(target: str, req: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to a store-wide command when TARGET is a store directory (None: a path in
    a mount, whose control file answers)."""
    if _place(target) is not None or not _is_store(target):
        return None
    try:
        return cliutil.administer(target, req)
    except CliError as exc:
        _fail(str(exc))


@main.command()
@target_arg
@click.argument("name", shell_complete=complete_names)
@ctl_opts
def delete(target: str, name: str, as_json: bool, timeout: float) -> None:
    """Delete snapshot NAME, or branch NAME if it is not mounted.

    TARGET inside a mount: what the branch mounted there owns (its snapshots, the branches
    made from it and theirs).  TARGET a store directory: any snapshot or unmounted branch,
    for root or the store's owner (through its daemon when it is mounted)."""
    reply = _store_wide(target, {"cmd": "delete", "name": name})
    if reply is None:
        mount = _mount(target)
        reply = _ctl(mount, timeout, "delete", name)
        _hint_foreign(mount, reply, [name])
    _show(reply, as_json, f"deleted {name}")


@main.command(name="list")
@target_arg
@ctl_opts
def list_(target: str, as_json: bool, timeout: float) -> None:
    """Snapshots and branches the branch mounted at TARGET owns (any path inside the mount),
    or all of a store's (TARGET a store directory; root or its owner), with where each
    branch is mounted."""
    reply = _store_wide(target, {"cmd": "list"})
    if reply is None:
        reply = _ctl(_mount(target), timeout, "list")
    _show(reply, as_json)
    if not as_json:
        for line in report.list_lines(reply):
            click.echo(line)


@main.command()
@target_arg
@click.argument("a", shell_complete=complete_names)
@click.argument("b", required=False, shell_complete=complete_names)
@click.option("-z", "nul", is_flag=True, help="Records end with NUL and paths are not quoted (for scripts).")
@ctl_opts
def diff(target: str, a: str, b: str | None, nul: bool, as_json: bool, timeout: float) -> None:
    """Paths added (+), removed (-), modified (M) or renamed (R) from snapshot/branch A to B.

    TARGET inside a mount: A and B are what the branch mounted there owns; B defaults to
    that branch as it is now.  TARGET a store directory: any two snapshots or branches of
    the store (root or its owner; through its daemon when it is mounted).

    Paths with unusual characters are quoted as git quotes them ("a\\nb"), except with -z
    (MARK NUL PATH NUL; a rename: R NUL FROM NUL PATH NUL) and --json.
    """
    if b is None and _place(target) is None and _is_store(target):
        _fail(f"{target} is a store: name both sides, A and B (a mount's diff defaults B to its branch)", code=2)
    reply = _store_wide(target, {"cmd": "diff", "a": a, "b": b}) if b is not None else None
    if reply is None:
        mount = _mount(target)
        if b is None:
            _syncfs(mount, timeout)
        reply = _ctl(mount, timeout, "diff", a, *([b] if b else []), quiet=as_json or nul)
        _hint_foreign(mount, reply, [a] + ([b] if b else []))
    _show(reply, as_json)
    if as_json:
        return
    if nul:
        sys.stdout.buffer.write(report.diff_nul(reply["changes"]))
        return
    for line in report.diff_lines(reply["changes"]):
        click.echo(line)


@main.command()
@target_arg
@json_opt
def gc(target: str, as_json: bool) -> None:
    """Collect garbage now in the store TARGET (or the store behind the mount holding TARGET).

    Through its daemon when the store is mounted (root or the store's owner), else on the
    store itself.  Shows progress on a terminal.
    """
    try:
        data = cliutil.gc(target, quiet=as_json)
    except CliError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(report.gc_line(data))


@main.command()
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
    try:
        data = cliutil.dedup(target, wait, timeout, quiet=as_json)
    except CliError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(data))
    else:
        for line in report.dedup_lines(data):
            click.echo(line)


@main.command(epilog="\b\nExit status (as fsck(8)):\n" + "\n".join(f"  {c}  {t}" for c, t in cliutil.FSCK_CODES))
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
        code, data = cliutil.fsck(store, repair, not no_verify_data, quiet=as_json)
    except CliError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "exit_code": cliutil.FSCK_NOT_CHECKED}))
        _fail(str(exc), cliutil.FSCK_NOT_CHECKED)
    if as_json:
        click.echo(json.dumps(data))
    else:
        for line in report.fsck_lines(data):
            click.echo(line)
    sys.exit(code)


from cowfs import cli_ops, help_cmd  # noqa: E402,F401  (status, log, run, import, export; help)

if __name__ == "__main__":
    main()
