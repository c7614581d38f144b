"""The store directory's file layout: the names of what a store directory holds, in one place.

    cowfs-store.json   the marker: format version and creation time (cowfs.store)
    db/                the KV engine's files (cowfs.kv.rocks)
    packs/             the local blob store of the packs (cowfs.blob.local)
    refs.sqlite        the reference store (cowfs.kv.sqlite): the writers of the store, the
                       member databases and the condemned packs (cowfs.chunks.liveness); its
                       -wal and -shm files beside it
    daemon.pid         the pid of the daemon serving the store, while it runs (cowfs.daemon)
    warmer.pid         the pid of the daemon's cold-start helper, while it runs
                       (cowfs.background.warming)
    daemon.sock        the daemon's admin socket (cowfs.daemon.admin; in /run/cowfs when the
                       store's path is too long for AF_UNIX)
    daemon.log         the daemon's log (cowfs.daemon.process)
    zygote.sock        the socket of the store daemon's zygote, which forks branches' own
                       daemons (cowfs.daemon.zygote; in /run/cowfs like daemon.sock)
    homes/<id>/        a branch's home database (db/) and its own daemon's daemon.pid,
                       daemon.sock and daemon.log (docs/design-many-processes.md, "Step 6")

Nothing else names these entries (tests/unit/test_layers.py).
"""
from __future__ import annotations

import os

MARKER = "cowfs-store.json"
DB_DIR = "db"
PACK_DIR = "packs"
REFS_FILE = "refs.sqlite"
SOCKET_NAME = "daemon.sock"
LOG_NAME = "daemon.log"
ZYGOTE_SOCKET = "zygote.sock"
HOMES_DIR = "homes"


def home_dir(store: str, home: str) -> str:
    """The directory of home database `home` (its id, 16 hex digits) of store: where its
    daemon's pid file, admin socket and log live, as the store's own daemon's live in STORE."""
    return os.path.join(store, HOMES_DIR, home)


def home_db(home: str) -> str:
    """Home database `home`'s path relative to the store (its writer and member records)."""
    return f"{HOMES_DIR}/{home}/{DB_DIR}"


def pid_file(store: str) -> str:
    return os.path.join(store, "daemon.pid")


def warmer_pid_file(store: str) -> str:
    """Holds the pid of the daemon's cold-start helper (cowfs.background.warming) while it runs."""
    return os.path.join(store, "warmer.pid")


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def daemon_pid(store: str) -> int | None:
    """Pid of the live daemon serving this store, if any."""
    try:
        with open(pid_file(store)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None
