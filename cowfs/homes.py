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
    """A new home's id, 64 random bits (`make`; or a caller's that names it in a catalog batch
    before the home is made: `create_home(..., home=)`)."""
    return secrets.token_hex(8)


class NewHome:
    """A home being made (`make`): its directory durable, its database open holding the
    `format` key (written, not yet synced), a liveness member.  `seal` writes the records that
    must be there before the branch is published and syncs the database, once; then `close`,
    or `discard` if the branch was not published."""

    def __init__(self, store: str, live: Liveness, home: str, db: RocksKV) -> None:
        self.store = store
        self.live = live
        self.id = home
        self.db = db

    def seal(self, records: Batch) -> None:
        """records (the new head's usage) and the `format` key durable: the one sync, which
        comes before the compare-and-set that names the home.  Blocking."""
        self.db.write(records)
        self.db.sync()

    def close(self) -> None:
        self.db.close()

    def discard(self) -> None:
        """Closed and removed (member record, directory): its branch was not published, so
        nothing names it.  Blocking."""
        self.close()
        remove(self.store, self.live, self.id)


def make(store: str, live: Liveness, home: str | None = None) -> NewHome:
    """Make a new home in store (home, or a new id), durable, and register it as a liveness
    member of live (the store's reference store), its database left open for `NewHome.seal`.
    The caller then publishes the branch (`Catalog.new_layer(..., home=id)` and a `Branch`
    whose `home` is id, in one batch).  Blocking: in a worker thread of a daemon, before the
    branch's mutation (it needs nothing the mutation decides, so no lock is held meanwhile)."""
    home = new_id() if home is None else home
    where = home_dir(store, home)
    private.hold_umask()  # RocksDB creates its files from its own threads
    try:
        private.make_dir(os.path.join(store, HOMES_DIR))
        os.mkdir(where, private.DIR_MODE)  # a collision of 64 random bits fails here
        db = RocksKV(os.path.join(where, DB_DIR), FAMILIES, blob_families=(CF_OBJECTS,))
    finally:
        private.release_umask()
    try:
        b = Batch()
        save_format(b, FORMAT_VERSION)
        db.write(b)
        private.fsync_dir(where)
        private.fsync_dir(os.path.join(store, HOMES_DIR))
        private.fsync_dir(store)
        live.add_member(member_name(home), home_db(home))
    except BaseException:
        db.close()
        raise
    return NewHome(store, live, home, db)


def create_home(store: str, live: Liveness, records: Batch | None = None, home: str | None = None) -> str:
    """`make`, `seal` with records and `close` at once; returns the home's id.  Blocking."""
    made = make(store, live, home)
    try:
        made.seal(Batch() if records is None else records)
    finally:
        made.close()
    return made.id


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
