"""The `cowfs` command: the click group, the commands that make and end mounts (init,
mount, umount), and every other command from the module of its concern:

    control      snapshot, branch, rollback, clone, delete, list, diff
    maintenance  stats, gc, dedup, fsck
    status       status              history   log
    run          run                 transfer  import, export
    fleet        remote, push, pull
    help         help (and the man page)

Commands are thin: parse, call, print.  Every failure is one clear message on stderr (what
was refused and who may do it) and a non-zero exit status; a traceback only with
`cowfs --debug` (or COWFS_DEBUG=1).
"""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import traceback
from typing import Any

import click

from cowfs import __version__
from cowfs.daemon import options as mount_options
from cowfs.cli.errors import EXIT_CODES, CliError, describe
from cowfs.cli.params import complete_mounts
from cowfs.errors import MountError, StoreError

# The interpreter's exit collects garbage over the whole heap (click's and the commands'
# modules) of a process that is ending: frozen, that walk is skipped.  `cowfs mount`'s exit
# took 0.05-0.2 s at load 5 with it, 0.02 s without (part of a lazy mount's ready time).
atexit.register(gc.freeze)

# Every command but init, mount and umount, by the module (cowfs.cli.X) whose COMMANDS hold
# it: a module is imported when one of its commands runs or a listing asks for it, so a
# `cowfs mount` or `cowfs snapshot` does not load the fleet's, the fsck's or the history's
# modules (importing all of them took ~30 ms of each call's ~90 ms).
LAZY_COMMANDS = {
    **dict.fromkeys(("snapshot", "branch", "rollback", "clone", "delete", "list", "diff"), "control"),
    **dict.fromkeys(("stats", "gc", "dedup", "fsck"), "maintenance"),
    "status": "status", "log": "history", "run": "run",
    **dict.fromkeys(("import", "export"), "transfer"),
    **dict.fromkeys(("remote", "push", "pull"), "fleet"),
    "help": "help",
}


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(os.environ.get("COWFS_DEBUG")) or bool(root is not None and (root.obj or {}).get("debug"))


class CowfsGroup(click.Group):
    """Turns whatever a command did not catch into one line on stderr and an exit status;
    loads the commands of LAZY_COMMANDS when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY_COMMANDS:
            for command in importlib.import_module(f"cowfs.cli.{LAZY_COMMANDS[name]}").COMMANDS:
                self.add_command(command)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except CliError as exc:
            click.echo(f"cowfs: {exc}", err=True)
            sys.exit(exc.code)
        except BrokenPipeError:
            sys.stderr.close()  # `cowfs ... | head`: the reader left; nothing to say
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - the point: no traceback without --debug
            if _debug():
                traceback.print_exc()
            else:
                click.echo(f"cowfs: {describe(exc)} (cowfs --debug shows the traceback)", err=True)
            sys.exit(1)


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
        raise CliError(str(exc)) from None
    click.echo(f"created store {os.path.abspath(store)} (branch main)")


@main.command(epilog="\b\nMount options (-o NAME or -o NAME=VALUE, repeatable or comma-separated):\n"
              + "\n".join(mount_options.help_lines()))
@click.argument("store", metavar="STORE|REMOTE:SNAPSHOT", type=click.Path())
@click.argument("mountpoint", metavar="MOUNTPOINT", shell_complete=complete_mounts)
@click.option("--branch", default="main", show_default=True, help="Branch to mount.")
@click.option("--store", "lazy_store", type=click.Path(), metavar="STORE",
              help="Lazy mount: the first argument is REMOTE:SNAPSHOT, and STORE the new store its metadata "
                   "is built in (or the store an earlier lazy mount of it built: mounted again).")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); exit when unmounted.")
@click.option("-o", "options", multiple=True, metavar="OPTION", help="Mount option (listed below).")
@click.option("--debug", is_flag=True, help="The daemon logs every operation (STORE/daemon.log).")
def mount(store: str, mountpoint: str, branch: str, lazy_store: str | None, foreground: bool,
          options: tuple[str, ...], debug: bool) -> None:
    """Mount branch BRANCH of STORE at MOUNTPOINT; returns once the mount is ready.

    \b
    Lazy mount of a pushed snapshot (cowfs push):
      cowfs mount REMOTE:SNAPSHOT MOUNTPOINT --store STORE
    fetches the snapshot's commit and directory trees only, builds its whole tree in branch
    main of the new store STORE (files point at chunks still on the remote) and mounts it;
    each chunk is fetched on its first read (checked against its id, then stored in STORE),
    with the unfetched chunks stored near it in the remote's pack (its directory's other
    files: -o lazy_near), so the mount is ready before any data moves.  Writes go to STORE (copy-on-write).  Run
    it again on the same STORE to mount it again; `cowfs stats` shows what was fetched.  STORE keeps at most
    -o remote_cache_bytes of fetched data: past it, the least recently read is evicted (fetched again when read)."""
    from cowfs.daemon import process as daemon

    source, build = store, None
    if lazy_store is not None:
        from cowfs.cli import fleet as fleet_cli

        if branch != "main":
            raise CliError("a lazy mount mounts branch main of its store: make other branches from it")
        store, build = fleet_cli.lazy_prepare(source, lazy_store)
    cfg = daemon.MountConfig(store, mountpoint, branch, debug=debug)
    for o in mount_options.split(options):
        try:
            mount_options.apply(cfg, o)
        except mount_options.OptionError as exc:
            raise CliError(str(exc)) from None
    try:
        code = daemon.mount(cfg, foreground, build)
    except MountError as exc:
        raise CliError(str(exc)) from None
    if code:
        sys.exit(code)
    if not foreground:
        if build is not None:
            fleet_cli.lazy_built(source, cfg.store)
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
    from cowfs.daemon import mounts

    try:
        click.echo(mounts.umount(mountpoint, timeout, force))
    except MountError as exc:
        raise CliError(str(exc)) from None


if __name__ == "__main__":
    main()
