"""Homes: the databases of branches served by a daemon of their own (format 12;
docs/design-many-processes.md, "Step 6").

A home is `STORE/homes/<id>/` (private, 0700), `<id>` a random 64-bit number in 16 hex digits
(never the branch's name: a name can be reused while gc still empties the old home), holding
`db/`, a RocksDB with the store's families.  The catalog says which layers live in a home
(`home/<layer>`, cowfs.meta.layers.Catalog.member) and which home a branch writes (its
record's `home`).  A home is made durable and registered as a liveness member (so a pack gc
marks its pointers) *before* the one compare-and-set that publishes its branch names it, so a
crash in between leaves a home that nothing names: harmless (an empty database), counted by
fsck as unnamed and removed by `fsck --repair` (`unnamed`, `remove`).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time

from cowfs import private
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.liveness import Liveness
from cowfs.kv.base import Batch, StoreLockedError
from cowfs.kv.rocks import RocksKV
from cowfs.meta.layers import save_format
from cowfs.store import FAMILIES, FORMAT_VERSION
from cowfs.storedir import DB_DIR, HOMES_DIR, home_db, home_dir

HOME_ID = re.compile(r"[0-9a-f]{16}\Z")
# An unnamed home younger than this may be one whose branch is being published (its maker is
# between the home's creation and the compare-and-set): left alone.
UNNAMED_GRACE = 600.0


def member_name(home: str) -> str:
    """The home's liveness member record (cowfs.chunks.liveness.Liveness.members)."""
    return f"home-{home}"


def new_id() -> str:
    """A new home's id, 64 random bits, for a caller that names it in the catalog batch that
    publishes it before the home is made (`create_home(..., home=)`)."""
    return secrets.token_hex(8)


def create_home(store: str, live: Liveness, records: Batch | None = None, home: str | None = None) -> str:
    """Make a new home in store, durable, and register it as a liveness member of live (the
    store's reference store); returns its id (home, or a new one).  records: what the home's
    database must hold before its branch is published (the new head's usage record), written
    with the `format` key in one synced batch: the database is opened, written and synced
    once.  The caller then publishes the branch (`Catalog.new_layer(..., home=id)` and a
    `Branch` whose `home` is id, in one batch).  Blocking: in a worker thread of a daemon."""
    home = new_id() if home is None else home
    where = home_dir(store, home)
    private.hold_umask()  # RocksDB creates its files from its own threads
    try:
        private.make_dir(os.path.join(store, HOMES_DIR))
        os.mkdir(where, private.DIR_MODE)  # a collision of 64 random bits fails here
        db = RocksKV(os.path.join(where, DB_DIR), FAMILIES, blob_families=(CF_OBJECTS,))
        try:
            b = Batch()
            save_format(b, FORMAT_VERSION)
            if records is not None:
                b.ops += records.ops
            db.write(b)
            db.sync()
        finally:
            db.close()
        private.fsync_dir(where)
        private.fsync_dir(os.path.join(store, HOMES_DIR))
        private.fsync_dir(store)
    finally:
        private.release_umask()
    live.add_member(member_name(home), home_db(home))
    return home


def listed(store: str) -> list[str]:
    """The entries of STORE/homes (a home's id each, unless something else put one there)."""
    try:
        return sorted(os.listdir(os.path.join(store, HOMES_DIR)))
    except FileNotFoundError:
        return []


def unnamed(store: str, named: set[str], now: float | None = None) -> tuple[list[str], list[str]]:
    """The homes in store that named (the homes the catalog names) lacks: (removable: older
    than UNNAMED_GRACE, young: maybe being published)."""
    now = time.time() if now is None else now
    old, young = [], []
    for home in listed(store):
        if HOME_ID.match(home) and home not in named:
            try:
                age = now - os.stat(home_dir(store, home)).st_mtime
            except FileNotFoundError:
                continue
            (old if age >= UNNAMED_GRACE else young).append(home)
    return old, young


def remove(store: str, live: Liveness, home: str) -> bool:
    """Delete an unnamed home: its member record first (a pack gc then no longer marks from it),
    then the directory.  False, and nothing done, if a process holds its database."""
    where = home_dir(store, home)
    try:
        RocksKV(os.path.join(where, DB_DIR), FAMILIES, blob_families=(CF_OBJECTS,)).close()
    except StoreLockedError:
        return False
    except Exception:  # noqa: BLE001 - a database a crash left half removed: removed all the same
        pass
    live.remove_member(member_name(home))
    shutil.rmtree(where)
    private.fsync_dir(os.path.join(store, HOMES_DIR))
    return True
