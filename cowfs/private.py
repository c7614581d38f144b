"""A store's files are its owner's alone.

The database holds every sandbox's file contents in the clear (a WAL is a log of the values
written), so no other local user may read anything under a store directory: the directory
is 0700 and every file in it 0600, whatever the umask of whoever created the store.
RocksDB creates files from its own threads for as long as a database is open (WAL, SST and
blob files, MANIFEST, info logs), with modes masked by the process umask only, so every
process that has a store open keeps the umask at UMASK: the daemon for its whole life, and
`Store` (offline commands: fsck, stats ...) and `init_store` while they hold the store.
Files cowfs writes itself are created with explicit modes (`write_file`), and opening a
store tightens whatever an older cowfs or an operator left looser (`tighten`).
"""
from __future__ import annotations

import errno
import os
import stat
import threading

UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700

_lock = threading.Lock()
_holders = 0
_saved = 0


def hold_umask() -> None:
    """Set the process umask to UMASK until the matching release_umask (nested holds count)."""
    global _holders, _saved
    with _lock:
        old = os.umask(UMASK)
        if _holders == 0:
            _saved = old
        _holders += 1


def release_umask() -> None:
    """Give back the umask the first hold found, once the last holder is done."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            os.umask(_saved)


def write_file(path: str, text: str) -> None:
    """Write a small file (a pid file) readable by its owner only, even if it existed looser."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def make_dir(path: str) -> None:
    """Create path (and missing parents) if needed; path itself ends up DIR_MODE."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)


def fsync_dir(path: str) -> None:
    """Make the names in directory path durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem without directory fsync
            raise
    finally:
        os.close(fd)


def tighten(root: str) -> list[str]:
    """Take group and other permissions off root and everything below it (symlinks are left
    alone: their modes mean nothing); return the paths changed, relative to root."""
    changed = []

    def fix(p: str) -> None:
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
                return
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077)
        except FileNotFoundError:
            return  # RocksDB deletes obsolete files while we look
        changed.append(os.path.relpath(p, root))

    fix(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            fix(os.path.join(dirpath, name))
    return changed
