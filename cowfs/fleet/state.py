"""What this machine remembers about its pushes and pulls, in one SQLite file per user
($XDG_CACHE_HOME/cowfs/fleet/state.sqlite; WAL, so several pushes at once may share it):

- stat cache: (store, path in the snapshot) -> size, mtime_ns, ctime_ns, chunk ids.  No inode
  number: a snapshot's inode numbers carry the snapshot in their high bits, so the same file
  has another number in every snapshot (a content change moves mtime and ctime anyway).
  A push finds an unchanged file's chunk ids here instead of reading it again (restic's
  parent-snapshot idea); a file whose stat changed, or whose chunks the remote lacks, is read.
- synced: (store, local snapshot) -> (remote, commit): that snapshot holds exactly that
  commit's tree, so a later pull into the store can branch from it and fetch only what differs.
- bases: (store, local branch, remote, remote branch) -> the remote branch's commit this local
  branch was last pulled from or pushed to: the compare-and-set expectation of its next push.
- origins: (store, local branch) -> (remote, commit) it was last synced with: a new commit's
  parent, which lets a pull elsewhere find a base it already has.
- ties: (store, local branch) -> the remote branches it follows (pulled with --branch or pushed
  with --branch): the ones a mount of it holds (fleet/holds.py), with the remote's name, URL and
  etcd endpoints, so the daemon reaches etcd without the user's remote configuration.
- pulls: (store, local branch) -> (remote, commit, pid) of a pull that made the branch and has
  not finished writing it: a pull killed midway (kill -9) leaves it, and the same pull run
  again writes that half-written branch whole instead of refusing it as an existing branch.

Losing the file costs re-reading files and a conflict on the next branch push (then pull
and push again), never an overwrite.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cowfs.chunks.codec import HASH_LEN
from cowfs.fleet.config import RemoteConfig, cache_dir

_NONE = bytes(HASH_LEN)  # a hole (an all-zero chunk) in a packed chunk list


def pack_chunks(chunks: list[bytes | None]) -> bytes:
    """A file's chunk ids as the stat cache stores them (None: a hole)."""
    return b"".join(_NONE if h is None else h for h in chunks)


def unpack_chunks(packed: bytes) -> list[bytes | None]:
    return [None if packed[i:i + HASH_LEN] == _NONE else packed[i:i + HASH_LEN]
            for i in range(0, len(packed), HASH_LEN)]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stat (store TEXT, path BLOB, size INTEGER, mtime INTEGER, ctime INTEGER,
    chunks BLOB, PRIMARY KEY (store, path));
CREATE TABLE IF NOT EXISTS synced (store TEXT, snapshot TEXT, remote TEXT, commit_id TEXT,
    PRIMARY KEY (store, snapshot, remote));
CREATE TABLE IF NOT EXISTS bases (store TEXT, branch TEXT, remote TEXT, remote_branch TEXT, commit_id TEXT,
    PRIMARY KEY (store, branch, remote, remote_branch));
CREATE TABLE IF NOT EXISTS origins (store TEXT, branch TEXT, remote TEXT, commit_id TEXT,
    PRIMARY KEY (store, branch, remote));
CREATE TABLE IF NOT EXISTS ties (store TEXT, branch TEXT, url TEXT, remote_branch TEXT, name TEXT, refs TEXT,
    PRIMARY KEY (store, branch, url, remote_branch));
CREATE TABLE IF NOT EXISTS pulls (store TEXT, branch TEXT, remote TEXT, commit_id TEXT, pid INTEGER,
    PRIMARY KEY (store, branch));
"""


def state_file() -> Path:
    return cache_dir() / "fleet" / "state.sqlite"


@dataclass(frozen=True)
class Tie:
    """A local branch following the branch `remote_branch` of a remote (its name, s3:// URL and
    etcd endpoints, as when the tie was made)."""
    remote: str
    url: str
    refs: str
    remote_branch: str


def ties_of(store: str, branch: str, path: Path | None = None) -> list[Tie]:
    """The remote branches the local branch follows; [] without a state file (a machine that
    never pushed nor pulled: nothing is created) or one from before ties were kept."""
    path = path or state_file()
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT name, url, refs, remote_branch FROM ties WHERE store=? AND branch=? "
                              "ORDER BY url, remote_branch", (store, branch)).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:      # no ties table yet
        return []
    return [Tie(*row) for row in rows]


class State:
    def __init__(self, path: Path | None = None) -> None:
        path = path or state_file()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # stat cache
    def cached_chunks(self, store: str, path: bytes, st_key: tuple[int, int, int]) -> bytes | None:
        """The packed chunk ids of the file, if its (size, mtime_ns, ctime_ns) are st_key."""
        row = self.db.execute("SELECT size, mtime, ctime, chunks FROM stat WHERE store=? AND path=?",
                              (store, path)).fetchone()
        return row[3] if row is not None and tuple(row[:3]) == st_key else None

    def remember_chunks(self, rows: list[tuple[str, bytes, int, int, int, bytes]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO stat VALUES (?,?,?,?,?,?)", rows)

    def forget_store(self, store: str) -> None:
        """The stat cache of a store that is no more (a lazy build that failed)."""
        with self.db:
            self.db.execute("DELETE FROM stat WHERE store=?", (store,))

    # snapshots and branches
    def set_synced(self, store: str, snapshot: str, remote: str, commit: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO synced VALUES (?,?,?,?)", (store, snapshot, remote, commit))

    def synced(self, store: str, remote: str) -> dict[str, str]:
        """commit -> local snapshot, for the store's snapshots known to hold a remote commit."""
        rows = self.db.execute("SELECT snapshot, commit_id FROM synced WHERE store=? AND remote=?",
                               (store, remote)).fetchall()
        return {c: s for s, c in rows}

    def base(self, store: str, branch: str, remote: str, remote_branch: str) -> str | None:
        row = self.db.execute("SELECT commit_id FROM bases WHERE store=? AND branch=? AND remote=? "
                              "AND remote_branch=?", (store, branch, remote, remote_branch)).fetchone()
        return row[0] if row else None

    def set_base(self, store: str, branch: str, remote: str, remote_branch: str, commit: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO bases VALUES (?,?,?,?,?)",
                            (store, branch, remote, remote_branch, commit))

    def origin(self, store: str, branch: str, remote: str) -> str | None:
        row = self.db.execute("SELECT commit_id FROM origins WHERE store=? AND branch=? AND remote=?",
                              (store, branch, remote)).fetchone()
        return row[0] if row else None

    def set_origin(self, store: str, branch: str, remote: str, commit: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO origins VALUES (?,?,?,?)", (store, branch, remote, commit))

    # pulls under way: a branch a pull made and has not finished writing
    def set_pulling(self, store: str, branch: str, remote: str, commit: str) -> None:
        """This process is about to make (or write again) the branch as the pull of commit:
        until done_pulling, the branch is half written."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO pulls VALUES (?,?,?,?,?)",
                            (store, branch, remote, commit, os.getpid()))

    def pulling(self, store: str, branch: str) -> tuple[str, str, int] | None:
        """(remote, commit, pid) of the pull that made the branch and did not finish, or None."""
        row = self.db.execute("SELECT remote, commit_id, pid FROM pulls WHERE store=? AND branch=?",
                              (store, branch)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def done_pulling(self, store: str, branch: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM pulls WHERE store=? AND branch=?", (store, branch))

    def set_tie(self, store: str, branch: str, remote: RemoteConfig, remote_branch: str) -> None:
        """The local branch follows remote_branch of remote from now on: its mounts hold it."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO ties VALUES (?,?,?,?,?,?)",
                            (store, branch, remote.url, remote_branch, remote.name, remote.refs))
