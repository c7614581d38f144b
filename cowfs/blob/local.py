"""A BlobStore in a directory of the local disk: one file per object.

Publishing: an object is written to a temporary file in its final directory, fsync'd, then
linked under its name (link(2) fails when the name exists: a publish never replaces
anything, so two writers of one name cannot both win) and the directory fsync'd.  A crash
therefore leaves either no object or the whole one, never a prefix of it; the temporaries
it may leave ('.tmp-*', invisible to get and list) are removed when a store is opened an
hour or more after they were last written (a live writer's temporary is younger).

Layout: name "a/b/c" is the file ROOT/a~/b~/c.  Directories carry a '~' (not a name
character) so that "a" and "a/b" can both exist, as on object storage.  Modes are 0700 and
0600 whatever the umask: objects hold sandbox data.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from typing import Iterator

from cowfs.blob.base import (BlobConflict, BlobEntry, BlobError, BlobNotFound, BlobStore,
                             check_name, check_range)

TEMP_PREFIX = ".tmp-"
DIR_SUFFIX = "~"
STALE_TEMP_SECONDS = 3600.0
_COMPARE_STEP = 1 << 20


class LocalBlobStore(BlobStore):
    def __init__(self, root: str, create: bool = True,
                 stale_temp_seconds: float = STALE_TEMP_SECONDS) -> None:
        self.root = os.path.abspath(root)
        if create:
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            except FileExistsError:
                pass  # not a directory: said below
        if not os.path.isdir(self.root):
            raise BlobError(f"blob store {self.root}: not a directory")
        self._sweep_temps(stale_temp_seconds)

    def _path(self, name: str) -> str:
        *dirs, last = check_name(name).split("/")
        return os.path.join(self.root, *(d + DIR_SUFFIX for d in dirs), last)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        view = memoryview(data).cast("B")
        if self._matches(name, path, view):
            return
        directory = os.path.dirname(path)
        self._make_dirs(directory)
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if self._matches(name, path, view):  # a concurrent put of the same bytes
                        return
                    # deleted again since the link failed: link once more
            _fsync_dir(directory)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _matches(self, name: str, path: str, data: memoryview) -> bool:
        """True if the object exists with exactly data; False if absent; BlobConflict if it
        exists with other bytes."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size != len(data):
                raise BlobConflict(f"{name}: exists with other content ({size} bytes, put of "
                                   f"{len(data)})")
            for pos in range(0, size, _COMPARE_STEP):
                part = data[pos:pos + _COMPARE_STEP]
                if os.pread(fd, len(part), pos) != part:
                    raise BlobConflict(f"{name}: exists with other content (differs from "
                                       f"byte {pos} on)")
            return True
        finally:
            os.close(fd)

    def _make_dirs(self, directory: str) -> None:
        """Create the missing directories down to directory, each made durable in its parent."""
        rel = os.path.relpath(directory, self.root)
        if rel == ".":
            return
        current = self.root
        for part in rel.split(os.sep):
            parent, current = current, os.path.join(current, part)
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                continue
            _fsync_dir(parent)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFound(name) from None
        try:
            end = os.fstat(fd).st_size
            if length is not None:
                end = min(end, offset + length)
            parts = []
            pos = offset
            while pos < end:
                part = os.pread(fd, end - pos, pos)
                if not part:
                    break
                parts.append(part)
                pos += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise BlobNotFound(name) from None

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(path))

    def list(self, prefix: str = "") -> Iterator[BlobEntry]:
        return self._walk(self.root, "", prefix)

    def _walk(self, directory: str, under: str, prefix: str) -> Iterator[BlobEntry]:
        """Objects of directory (whose names all begin with `under`) in name order: siblings
        sort by their key, a directory's key being its name plus '/', which puts each
        subtree exactly where its names fall among its siblings."""
        entries: list[tuple[str, bool, str]] = []
        try:
            scan = os.scandir(directory)
        except FileNotFoundError:
            return
        with scan:
            for e in scan:
                if e.name.startswith("."):
                    continue
                if e.name.endswith(DIR_SUFFIX):
                    if e.is_dir(follow_symlinks=False):
                        entries.append((under + e.name[:-1] + "/", True, e.path))
                elif e.is_file(follow_symlinks=False):
                    entries.append((under + e.name, False, e.path))
        entries.sort()
        for key, is_dir, path in entries:
            if is_dir:
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(path, key, prefix)
            elif key.startswith(prefix):
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    continue  # deleted since the scan
                yield BlobEntry(key, size)

    def _sweep_temps(self, older_than: float) -> None:
        limit = time.time() - older_than
        for directory, _dirs, files in os.walk(self.root):
            for f in files:
                if not f.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(directory, f)
                try:
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                        os.unlink(path)
                except FileNotFoundError:
                    pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem without directory fsync
            raise
    finally:
        os.close(fd)
