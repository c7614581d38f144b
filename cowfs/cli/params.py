"""Arguments and options several commands share, and shell completion of their values.

Mount points are plain strings, not click.Path: its stat would hang on a hung mount.
"""
from __future__ import annotations

import os
from typing import Any

import click


def complete_mounts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Mount points of cowfs (then directories, as a shell would)."""
    from click.shell_completion import CompletionItem

    from cowfs.daemon.mounts import cowfs_mounts

    out = [CompletionItem(e.mountpoint) for e in cowfs_mounts() if e.mountpoint.startswith(incomplete)]
    return out + [CompletionItem(incomplete, type="dir")]


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Snapshot and branch names of the mount given before (what its branch owns), or of
    the store given before when its daemon serves it (completion never opens a store: that
    would hold its lock against a mount starting meanwhile)."""
    from click.shell_completion import CompletionItem

    from cowfs import api
    from cowfs.daemon import admin
    from cowfs.cli import targets
    from cowfs.daemon.mounts import daemon_pid

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


mount_arg = click.argument("mount", shell_complete=complete_mounts)
target_arg = click.argument("target", shell_complete=complete_mounts)


def json_opt(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object (raw numbers).")(fn)
