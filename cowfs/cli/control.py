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


class _Streamed:
    """Output of a reply read as it arrives (list, diff): with --json its text is copied to
    stdout as it comes (the daemon's JSON, valid whole), held back only until the first item
    shows the command succeeded (a refusal is printed by _show, with any hint added);
    otherwise each item goes to `line` at once."""

    def __init__(self, as_json: bool, line: Any = None) -> None:
        self.as_json = as_json
        self.line = line
        self.held: list[bytes] | None = []  # text before the first item; None once flowing

    def raw(self, data: bytes) -> None:
        if not self.as_json:
            return
        if self.held is None:
            sys.stdout.buffer.write(data)
        else:
            self.held.append(data)

    def item(self, key: str, value: Any) -> None:
        if self.as_json:
            if self.held is not None:
                sys.stdout.buffer.write(b"".join(self.held))
                self.held = None
        elif self.line is not None:
            self.line(key, value)

    def done(self, head: dict[str, Any]) -> None:
        """After the reply: what was held back, if it was a success (a refusal: _show)."""
        if self.as_json and self.held is not None and head.get("ok"):
            sys.stdout.buffer.write(b"".join(self.held))
            self.held = None
        sys.stdout.flush()


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
@click.option("--own-daemon", is_flag=True,
              help="Give the branch a home database of its own: `cowfs mount STORE MNT --branch NAME` then "
                   "serves it by a daemon of its own, beside the store's.")
@ctl_opts
def branch(mount: str, name: str, source: str | None, own_daemon: bool, as_json: bool, timeout: float) -> None:
    """Create a writable branch NAME from the mounted branch's current state (or --from)."""
    mount = _mount(mount)
    if source is None:
        admin.syncfs(mount, timeout)
    words = ["branch-home" if own_daemon else "branch", name] + ([source] if source else [])
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
    rows: dict[str, list[dict[str, Any]]] = {"snapshots": [], "branches": []}
    out = _Streamed(as_json, lambda key, row: rows.setdefault(key, []).append(row))
    reply = admin.store_wide(target, {"cmd": "list"}, item=out.item, raw=out.raw)
    if reply is None:
        with progress.waiting("list", quiet=as_json):
            reply = admin.control_streamed(_mount(target), "list", item=out.item, raw=out.raw, timeout=timeout)
    out.done(reply)
    if not reply.get("ok"):
        _show(reply, as_json)
    if as_json:
        return
    for line in report.list_lines({**reply, **rows}):  # a table: its columns need every row
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
    def line(_key: str, change: dict[str, Any]) -> None:  # printed as it arrives
        if nul:
            sys.stdout.buffer.write(report.diff_nul([change]))
        else:
            click.echo(report.diff_lines([change])[0])

    out = _Streamed(as_json, line)
    req = {"cmd": "diff", "a": a, "b": b}
    reply = admin.store_wide(target, req, item=out.item, raw=out.raw) if b is not None else None
    if reply is None:
        mount = _mount(target)
        if b is None:
            admin.syncfs(mount, timeout)
        # no progress line: changes are printed as they arrive
        reply = admin.control_streamed(mount, "diff", a, *([b] if b else []), item=out.item, raw=out.raw,
                                       timeout=timeout)
        admin.hint_foreign(mount, reply, [a] + ([b] if b else []))
    out.done(reply)
    if not reply.get("ok"):
        _show(reply, as_json)


COMMANDS = (snapshot, branch, rollback, clone, delete, list_, diff)
