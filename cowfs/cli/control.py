"""The branching commands: snapshot, branch, rollback, clone, delete, list, diff.

Each is one command line written to the mount's control file (.cowfs/ctl), so they work
from inside a sandbox that only has the mount; delete, list and diff also take a store
directory (store-wide, root or the store's owner: cowfs.cli.admin.store_wide).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from cowfs import api
from cowfs.cli import admin, progress, report, targets
from cowfs.cli.errors import CliError
from cowfs.cli.params import complete_names, mount_arg, target_arg
from cowfs.cli.textfmt import quote_path


def ctl_opts(fn: Any) -> Any:
    """--json and --timeout of the control-file commands."""
    fn = click.option("--timeout", default=api.CONTROL_TIMEOUT, show_default=True, type=float,
                      help="Seconds to wait for the daemon's answer (a hung mount fails instead of hanging).")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print the daemon's JSON reply.")(fn)


def _mount(path: str) -> str:
    """The mount point of the cowfs mount holding path (any path inside it, relative to the
    current directory)."""
    return targets.mount_of(path).mountpoint


def _ctl(mount: str, timeout: float, *words: str, label: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Write one command line to MOUNT/.cowfs/ctl and return the daemon's JSON reply."""
    with progress.waiting(label or words[0], quiet=quiet):
        return admin.control(mount, *words, timeout=timeout)


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


@click.command()
@mount_arg
@click.argument("name")
@ctl_opts
def snapshot(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Take an immutable snapshot NAME of the branch mounted at MOUNT (any path inside it)."""
    mount = _mount(mount)
    admin.syncfs(mount, timeout)
    _show(_ctl(mount, timeout, "snapshot", name), as_json, f"snapshot {name} taken")


@click.command()
@mount_arg
@click.argument("name")
@click.option("--from", "source", help="Snapshot (or the mounted branch) to start from.",
              shell_complete=complete_names)
@ctl_opts
def branch(mount: str, name: str, source: str | None, as_json: bool, timeout: float) -> None:
    """Create a writable branch NAME from the mounted branch's current state (or --from)."""
    mount = _mount(mount)
    if source is None:
        admin.syncfs(mount, timeout)
    words = ["branch", name] + ([source] if source else [])
    reply = _ctl(mount, timeout, *words)
    admin.hint_foreign(mount, reply, [source] if source else [])
    _show(reply, as_json, f"branch {name} created")


@click.command()
@mount_arg
@click.argument("name", shell_complete=complete_names)
@ctl_opts
def rollback(mount: str, name: str, as_json: bool, timeout: float) -> None:
    """Return the branch mounted at MOUNT exactly to snapshot NAME."""
    mount = _mount(mount)
    reply = _ctl(mount, timeout, "rollback", name, quiet=as_json)
    admin.hint_foreign(mount, reply, [name])
    _show(reply, as_json, f"rolled back to {name}")


@click.command()
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
    place = targets.mount_of(mount)
    words = ("clone", targets.in_mount(place, src), targets.in_mount(place, dst))
    admin.syncfs(place.mountpoint, timeout)
    reply = _ctl(place.mountpoint, timeout, *words, label=f"cloning {quote_path(src)}", quiet=as_json)
    _show(reply, as_json, f"cloned {quote_path(src)} to {quote_path(dst)}")


@click.command()
@target_arg
@click.argument("name", shell_complete=complete_names)
@ctl_opts
def delete(target: str, name: str, as_json: bool, timeout: float) -> None:
    """Delete snapshot NAME, or branch NAME if it is not mounted.

    TARGET inside a mount: what the branch mounted there owns (its snapshots, the branches
    made from it and theirs).  TARGET a store directory: any snapshot or unmounted branch,
    for root or the store's owner (through its daemon when it is mounted)."""
    reply = admin.store_wide(target, {"cmd": "delete", "name": name})
    if reply is None:
        mount = _mount(target)
        reply = _ctl(mount, timeout, "delete", name)
        admin.hint_foreign(mount, reply, [name])
    _show(reply, as_json, f"deleted {name}")


@click.command(name="list")
@target_arg
@ctl_opts
def list_(target: str, as_json: bool, timeout: float) -> None:
    """Snapshots and branches the branch mounted at TARGET owns (any path inside the mount),
    or all of a store's (TARGET a store directory; root or its owner), with where each
    branch is mounted."""
    reply = admin.store_wide(target, {"cmd": "list"})
    if reply is None:
        reply = _ctl(_mount(target), timeout, "list")
    _show(reply, as_json)
    if not as_json:
        for line in report.list_lines(reply):
            click.echo(line)


@click.command()
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
    if b is None and targets.place(target) is None and targets.is_store(target):
        raise CliError(f"{target} is a store: name both sides, A and B (a mount's diff defaults B to its branch)",
                       code=2)
    reply = admin.store_wide(target, {"cmd": "diff", "a": a, "b": b}) if b is not None else None
    if reply is None:
        mount = _mount(target)
        if b is None:
            admin.syncfs(mount, timeout)
        reply = _ctl(mount, timeout, "diff", a, *([b] if b else []), quiet=as_json or nul)
        admin.hint_foreign(mount, reply, [a] + ([b] if b else []))
    _show(reply, as_json)
    if as_json:
        return
    if nul:
        sys.stdout.buffer.write(report.diff_nul(reply["changes"]))
        return
    for line in report.diff_lines(reply["changes"]):
        click.echo(line)


COMMANDS = (snapshot, branch, rollback, clone, delete, list_, diff)
