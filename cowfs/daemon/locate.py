"""Which daemon is behind a mount or a branch: the store's own (its files in STORE: daemon.pid,
daemon.sock, daemon.log), or the daemon of a branch with a home database of its own (the same
files in STORE/homes/<id>/; docs/design-many-processes.md, "Step 6").

Found through the store's reference store, without asking any daemon: a branch's record names
its home (`branch/<name>`, field `home`), and the serve record of a mount point names the home
its daemon serves from (cowfs.meta.serving).  Reads SQLite only (no RocksDB, pyfuse3 or trio):
the CLI's side of `cowfs mount`, `umount`, `status` and the commands that talk to a daemon.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.layers import CF_CATALOG
from cowfs.storedir import REFS_FILE, home_dir

if TYPE_CHECKING:
    from cowfs.meta.serving import ServeRecord


def _refs(store: str, families: tuple[str, ...]) -> SQLiteKV | None:
    """The store's reference store, None when there is none or the caller may not read it."""
    path = os.path.join(store, REFS_FILE)
    if not os.access(store, os.R_OK | os.X_OK) or not os.path.isfile(path):
        return None
    return SQLiteKV(path, families)


def branch_home(store: str, branch: str) -> str | None:
    """The home database (its id) of branch, None for a branch of the store's database (or
    one that does not exist: the daemon that opens the store says so)."""
    refs = _refs(store, (CF_CATALOG,))
    if refs is None:
        return None
    try:
        raw = refs.get(CF_CATALOG, b"branch/" + branch.encode())
    finally:
        refs.close()
    if raw is None:
        return None
    try:
        home = json.loads(raw).get("home")
    except (ValueError, AttributeError):
        return None
    return str(home) if home else None


def record_at(store: str, mountpoint: str) -> tuple[str, ServeRecord] | None:
    """The branch served at mountpoint and its serve record: a live one if there is one,
    else the newest stale one (the daemon that died there)."""
    # the serve records' module (liveness, the codec, hmac): not for `cowfs mount`'s branch_home,
    # ~10 ms of CPU of every mount's start-up
    from cowfs.meta.serving import CF_SERVE, ServeRecord, Serving

    refs = _refs(store, (CF_CATALOG, CF_SERVE))
    if refs is None:
        return None
    try:
        serving = Serving(refs)
        found = [(b, r) for b, r in serving.all().items() if isinstance(r, ServeRecord) and r.mountpoint == mountpoint]
        if not found:
            return None
        return max(found, key=lambda br: (br[1].alive(serving.boot), br[1].since))
    finally:
        refs.close()


def daemon_dir(store: str, mountpoint: str | None = None) -> str:
    """Where the files of the daemon serving mountpoint are (without a mount point, or one
    the serve records do not place in a home: the store's own daemon's, STORE)."""
    if mountpoint is None:
        return store
    found = record_at(store, mountpoint)
    if found is None or not found[1].home:
        return store
    return home_dir(store, found[1].home)
