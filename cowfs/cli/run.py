"""cowfs run: a command run with a branch as its working directory, the branch mounted for
its length if it is not mounted, and the command's exit status passed on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from cowfs.cli.errors import CliError
from cowfs.cli.tempmount import branch_mounted, require_store


def _wait(proc: subprocess.Popen[bytes]) -> int:
    """The command's exit status, as a shell gives it (128+N if signal N ended it).  The
    terminal's ^C/^\\ reach the command (same process group); we wait for it.  SIGTERM/SIGHUP
    sent to us are passed on, so that the mount is released after."""
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
    return rc if rc >= 0 else 128 - rc


def _daemon_cpus(mp: str) -> set[int] | None:
    """The CPUs the command should run on: those of a daemon pinned with -o cpus= (a
    request and its reply then wake no other CPU: docs/benchmarks.md, "CPU placement"),
    as far as this process may use them; None when the daemon is not pinned."""
    try:
        with open(os.path.join(mp, ".cowfs", "stats")) as f:
            daemon = set(json.load(f).get("daemon_cpus") or ())
    except (OSError, ValueError):
        return None
    mine = os.sched_getaffinity(0)
    cpus = daemon & mine
    return cpus if cpus and cpus != mine else None


@click.command(context_settings={"ignore_unknown_options": True})
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
    COMMAND sees COWFS_STORE, COWFS_BRANCH and COWFS_MOUNT.  If the daemon is pinned to
    some CPUs (-o cpus=LIST), COMMAND runs on them too.  Put `--` before COMMAND:

        cowfs run /var/lib/cowfs/agent1 --snapshot-before pre-test -- make test
    """
    from cowfs import api

    store = require_store(store)
    with branch_mounted(store, branch, options, purpose="run") as mp:
        if snapshot_before:
            try:
                api.Mount(path=Path(mp), store=Path(store), branch_name=branch, owned=False).snapshot(snapshot_before)
            except api.CowfsError as exc:
                raise CliError(f"snapshot {snapshot_before}: {exc}") from None
        env = dict(os.environ, COWFS_STORE=store, COWFS_BRANCH=branch, COWFS_MOUNT=mp, PWD=mp)
        cpus = _daemon_cpus(mp)
        try:
            proc = subprocess.Popen(list(command), cwd=mp, env=env,
                                    preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        except FileNotFoundError:
            click.echo(f"cowfs: {command[0]}: command not found", err=True)
            code = 127
        except PermissionError:
            click.echo(f"cowfs: {command[0]}: permission denied", err=True)
            code = 126
        else:
            code = _wait(proc)
    sys.exit(code)


COMMANDS = (run,)
