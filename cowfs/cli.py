"""The `cowfs` command.  Every failure is one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from cowfs import admin
from cowfs.daemon import MountConfig, MountError, mounted_store
from cowfs.errors import StoreError


def _fail(msg: str) -> None:
    click.echo(f"cowfs: {msg}", err=True)
    sys.exit(1)


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


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
@click.argument("mountpoint", type=click.Path())
@click.option("--branch", default="main", show_default=True, help="Branch to mount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); exit when unmounted.")
@click.option("-o", "options", multiple=True, metavar="OPTION",
              help="Mount option: allow_other, suid, dev, cache_size=SIZE (repeatable, or comma-separated).")
@click.option("--debug", is_flag=True, help="Log every operation.")
def mount(store: str, mountpoint: str, branch: str, foreground: bool, options: tuple[str, ...], debug: bool) -> None:
    """Mount branch BRANCH of STORE at MOUNTPOINT; returns once the mount is ready."""
    from cowfs import daemon

    flat = [o.strip() for opt in options for o in opt.split(",") if o.strip()]
    cfg = MountConfig(store, mountpoint, branch, debug=debug)
    for o in flat:
        if o.startswith("cache_size="):
            try:
                cfg.cache_bytes = _parse_size(o.split("=", 1)[1])
            except ValueError:
                _fail(f"bad cache_size in -o {o}")
        elif o in ("allow_other", "suid", "dev", "nosuid", "nodev", "ro"):
            cfg.options.append(o)
        else:
            _fail(f"unknown mount option {o!r} (known: allow_other, suid, dev, cache_size=SIZE)")
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
@click.argument("mountpoint", type=click.Path())
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def umount(mountpoint: str, timeout: float) -> None:
    """Flush everything, unmount MOUNTPOINT and wait for its daemon to exit."""
    from cowfs import daemon

    try:
        daemon.umount(mountpoint, timeout)
    except MountError as exc:
        _fail(str(exc))


def _resolve_store(target: str) -> str:
    store = mounted_store(target) if os.path.ismount(target) else None
    return store or os.path.abspath(target)


@main.command()
@click.argument("target", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(target: str, as_json: bool) -> None:
    """Figures of a store, or of the store behind a mount point TARGET."""
    store = _resolve_store(target)
    if not os.path.exists(admin.socket_path(store)):
        _fail(f"{target}: no running daemon serves this store (mount it first)")
    try:
        data: dict[str, Any] = admin.request(store, {"cmd": "stats"})
    except OSError as exc:
        _fail(f"cannot reach the daemon of {store}: {exc}")
    if as_json:
        click.echo(json.dumps(data))
        return
    for k, v in data.items():
        click.echo(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
