"""cowfs import and export: a host directory tree into a branch, a snapshot out to a
directory or a tar stream.  The copying itself is cowfs.treecopy's; here: where from and
to, the branch mounted for the copy when it is not, progress, and what is said after.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from cowfs.cli import progress
from cowfs.cli.admin import foreign_hint, listing_of
from cowfs.cli.errors import CliError
from cowfs.cli.params import json_opt, target_arg
from cowfs.cli.tempmount import branch_mounted, require_store
from cowfs.cli.textfmt import human
from cowfs.treecopy import CopyStats, TreeCopier, scan


def _copy_tree(verb: str, src: str, dst: str, quiet: bool) -> tuple[CopyStats, float]:
    """Copy src into dst with a progress bar (verb: import or export); (figures, seconds)."""
    entries, total = scan(src)
    t0 = time.monotonic()
    with progress.bar(f"{verb}ing {entries} entries", total, quiet=quiet) as update:
        try:
            s = TreeCopier(update).copy(src, dst)
        except OSError as exc:
            raise CliError(f"{verb} failed: {exc}") from None
    return s, time.monotonic() - t0


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


def _report(verb: str, s: CopyStats, seconds: float, as_json: bool) -> None:
    """Warnings on stderr; the figures as JSON, or a summary on a terminal (verb: import
    or export)."""
    for w in s.warnings[:20]:
        click.echo(f"cowfs: warning: {w}", err=True)
    if verb == "import" and s.skipped_xattrs:
        click.echo(f"cowfs: warning: {s.skipped_xattrs} extended attributes were refused by cowfs (kept out)", err=True)
    if as_json:
        figures = {"files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "hardlinks": s.hardlinks,
                   "special": s.special, "bytes": s.bytes, "seconds": round(seconds, 3), "warnings": s.warnings,
                   "skipped_xattrs": s.skipped_xattrs}
        click.echo(json.dumps({"ok": True, f"{verb}ed": figures}))
    elif progress.shown():
        click.echo(_summary(f"{verb}ed", s, seconds), err=True)


@click.command(name="import")
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

    store = require_store(store)
    src = os.path.abspath(src_dir)
    with branch_mounted(store, branch, options, purpose="import") as mp:
        target = os.path.normpath(os.path.join(mp, dest.lstrip("/")))
        inside = target == mp or target.startswith(mp + "/")
        if not inside or target[len(mp):].split("/")[1:2] == [".cowfs"]:
            raise CliError(f"--to {dest}: must be a directory inside the branch (not in .cowfs)")
        if os.path.realpath(src) == os.path.realpath(mp) or os.path.realpath(src).startswith(os.path.realpath(mp) + "/"):
            raise CliError(f"{src_dir} is inside the branch itself")
        s, seconds = _copy_tree("import", src, target, quiet=as_json)
        if snapshot_after:
            try:
                api.Mount(path=Path(mp), store=Path(store), branch_name=branch, owned=False).snapshot(snapshot_after)
            except api.CowfsError as exc:
                raise CliError(f"snapshot {snapshot_after}: {exc}") from None
    _report("import", s, seconds, as_json)


def _tar_out(src: str, total: int, quiet: bool, seek: bool) -> None:
    """GNU tar of src to stdout, passed through us so that a terminal sees its progress.
    seek: tar finds holes with SEEK_DATA/SEEK_HOLE; a daemon without them (cowfs.fuse_ext)
    reports every file as data, so tar must then look for runs of zeros itself."""
    tar = shutil.which("tar")
    if tar is None:
        raise CliError("GNU tar is needed for export to -")
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
        raise CliError("the reader of the tar stream went away") from None
    code = proc.wait()
    reader.join()
    if code != 0:
        raise CliError(f"tar failed: {b''.join(errors).decode(errors='replace').strip()}")


def _export(mount: str, snapshot: str, dest: str, as_json: bool) -> None:
    from cowfs import api

    src = os.path.join(mount, ".cowfs", "snapshots", snapshot)
    if dest == "-":
        if sys.stdout.isatty():
            raise CliError("refusing to write a tar stream to a terminal; redirect stdout or give a directory")
        entries, nbytes = scan(src)
        seek = api.stats(mount).get("fuse_ext", {}).get("installed", False)
        _tar_out(src, nbytes + 1536 * entries + 10240, quiet=as_json, seek=seek)  # + a header and a pax record each
        return
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise CliError(f"{dest} exists and is not an empty directory")
    s, seconds = _copy_tree("export", src, dest, quiet=as_json)
    _report("export", s, seconds, as_json)


@click.command()
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
    listing, where, mount = listing_of(target)
    snaps = {s["name"]: s for s in listing["snapshots"]}
    if snapshot not in snaps:
        if any(b["name"] == snapshot for b in listing["branches"]):
            raise CliError(f"{snapshot} is a branch; take a snapshot of it first (cowfs snapshot MOUNT NAME)")
        if mount is None:
            raise CliError(f"no snapshot named {snapshot!r} in the store {where}")
        hint = foreign_hint(mount, [snapshot])
        raise CliError(f"no snapshot named {snapshot!r} in the lineage of {mount}" + (f"; {hint}" if hint else ""))
    if mount is not None:
        _export(mount, snapshot, dest, as_json)
        return
    branch = snaps[snapshot].get("parent")
    if branch is None:
        raise CliError(f"snapshot {snapshot!r} belongs to no branch; export it through a mount whose lineage holds it")
    with branch_mounted(where, branch, purpose="export") as mp:
        _export(mp, snapshot, dest, as_json)


COMMANDS = (import_, export)
