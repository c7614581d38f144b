"""A BlobStore in a directory of the local disk: one file per object.

Publishing: an object is written to a temporary file in its final directory, fsync'd, then
linked under its name (link(2) fails when the name exists: a publish never replaces
anything, so two writers of one name cannot both win) and the directory fsync'd.  A crash
therefore leaves either no object or the whole one, never a prefix of it; the temporaries
it may leave ('.tmp-*', invisible to get and list) are removed when a store is opened an
hour or more after they were last written (a live writer's temporary is younger).

Large objects (1 MiB and more) are written with O_DIRECT through a reused aligned buffer
where the filesystem allows it (buffered, with their pages dropped after the fsync, where
it does not).  Ranged gets ask the kernel for no read-around; three local-only capabilities
that object storage has no use for sit beside the interface: `read_ahead` (posix_fadvise
WILLNEED, for streaming readers), `pread_kept` (small ranged reads through descriptors kept
open) and `disk_usage` (allocated blocks).

Layout: name "a/b/c" is the file ROOT/a~/b~/c.  Directories carry a '~' (not a name
character) so that "a" and "a/b" can both exist, as on object storage.  Modes are 0700 and
0600 whatever the umask: objects hold sandbox data.
"""
from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from typing import Iterator, Sequence

from cowfs import private
from cowfs.blob.base import (BlobConflict, BlobEntry, BlobError, BlobNotFound, BlobStore,
                             check_name, check_range)

TEMP_PREFIX = ".tmp-"
DIR_SUFFIX = "~"
STALE_TEMP_SECONDS = 3600.0
_COMPARE_STEP = 1 << 20
DIRECT_MIN = 1 << 20  # objects of this size and more are written with O_DIRECT where possible
ALIGN = 4096  # direct writes: offsets and lengths are multiples of this
STAGE = 8 << 20  # bytes gathered in the aligned staging buffer per direct write
KEPT_MAX = 64  # descriptors pread_kept keeps open (a 1 GiB file written at once: ~64 packs)


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
        self._direct = True  # until the filesystem refuses O_DIRECT
        self._stage = mmap.mmap(-1, STAGE)  # aligned (mmap is page-aligned), reused by puts
        self._stage_lock = threading.Lock()
        self._kept: OrderedDict[str, int] = OrderedDict()  # pread_kept's descriptors, by name
        self._kept_lock = threading.Lock()

    def _path(self, name: str) -> str:
        *dirs, last = check_name(name).split("/")
        return os.path.join(self.root, *(d + DIR_SUFFIX for d in dirs), last)

    def put(self, name: str, data: bytes) -> None:
        self.put_parts(name, [data])

    def put_parts(self, name: str, parts: Sequence[bytes | memoryview]) -> None:
        path = self._path(name)
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        if self._matches(name, path, views, total):
            return
        directory = os.path.dirname(path)
        self._make_dirs(directory)
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                if not (total >= DIRECT_MIN and self._write_direct(tmp, views, total)):
                    _pwrite_parts(fd, views)
                    os.fsync(fd)
                    if total >= DIRECT_MIN:  # written once, read rarely: give the cache back
                        os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if self._matches(name, path, views, total):  # a concurrent put of the same bytes
                        return
                    # deleted again since the link failed: link once more
            private.fsync_dir(directory)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _write_direct(self, tmp: str, views: list[memoryview], total: int) -> bool:
        """Write the parts to tmp with O_DIRECT through an aligned staging buffer, then cut the
        padding off and fsync; False (nothing lasting done) where the filesystem takes no
        direct I/O.  Why: fresh page-cache pages cost a fault each on some VMs (buffered
        writes ran at ~0.4 GB/s where direct ones ran at 1.6 GB/s)."""
        if not self._direct:
            return False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self._direct = False
            return False
        mine = self._stage_lock.acquire(blocking=False)
        stage = self._stage if mine else mmap.mmap(-1, STAGE)
        try:
            fill = off = 0
            for v in views:
                while len(v):
                    n = min(len(v), STAGE - fill)
                    stage[fill : fill + n] = v[:n]
                    fill += n
                    v = v[n:]
                    if fill == STAGE:
                        _pwrite_all(fd, memoryview(stage)[:STAGE], off)
                        off += STAGE
                        fill = 0
            if fill:
                padded = (fill + ALIGN - 1) // ALIGN * ALIGN
                stage[fill:padded] = bytes(padded - fill)
                _pwrite_all(fd, memoryview(stage)[:padded], off)
            os.ftruncate(fd, total)
            os.fsync(fd)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False  # the filesystem takes no direct I/O after all
            return False
        finally:
            os.close(fd)
            if mine:
                self._stage_lock.release()
            else:
                stage.close()

    def _matches(self, name: str, path: str, views: list[memoryview], total: int) -> bool:
        """True if the object exists with exactly these bytes; False if absent; BlobConflict
        if it exists with other bytes."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size != total:
                raise BlobConflict(f"{name}: exists with other content ({size} bytes, put of "
                                   f"{total})")
            pos = 0
            for v in views:
                for start in range(0, len(v), _COMPARE_STEP):
                    part = v[start:start + _COMPARE_STEP]
                    if os.pread(fd, len(part), pos) != part:
                        raise BlobConflict(f"{name}: exists with other content (differs from "
                                           f"byte {pos} on)")
                    pos += len(part)
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
            private.fsync_dir(parent)

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
                # A ranged read wants its range: no kernel read-around (a 4 KiB read would
                # pull in far more); sequential readers ask for read-ahead (read_ahead).
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
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

    def pread_kept(self, name: str, offset: int, length: int) -> bytes:
        """Local only: bytes [offset, offset + length) of object name (fewer past its end),
        read through a descriptor kept open (at most KEPT_MAX, the least recently used
        closed first), with no kernel read-around.  A cold 4 KiB read is then one pread(2)
        where `get` makes five system calls (open, fstat, fadvise, pread, close): ~10-15%
        of a cold random read's daemon CPU (docs/benchmarks.md, issue 24).

        Only for objects that are never put again under their name with other bytes once
        deleted (packs: random ids, see cowfs.chunks.packs): a kept descriptor reads the file
        its name stood for when it was opened.  `delete` closes it first, so this process's
        deletes free the space at once; one deleted by another process stays allocated
        until its descriptor is evicted or the store closed.  The read runs under a lock, so
        a delete from another thread never closes a descriptor in use: for small reads only
        (the event loop's), not for long ones that would make it wait."""
        with self._kept_lock:
            kept = self._kept
            fd = kept.get(name)
            if fd is None:
                try:
                    fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise BlobNotFound(name) from None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                kept[name] = fd
                if len(kept) > KEPT_MAX:
                    os.close(kept.popitem(last=False)[1])
            else:
                kept.move_to_end(name)
            data = os.pread(fd, length, offset)
            if 0 < len(data) < length:  # a short read that is not the end: read on
                parts = [data]
                pos = offset + len(data)
                while pos < offset + length:
                    part = os.pread(fd, offset + length - pos, pos)
                    if not part:
                        break
                    parts.append(part)
                    pos += len(part)
                data = b"".join(parts)
            return data

    def _unkeep(self, name: str | None = None) -> None:
        """Close the kept descriptor of name (None: all of them)."""
        with self._kept_lock:
            if name is None:
                while self._kept:
                    os.close(self._kept.popitem()[1])
            else:
                fd = self._kept.pop(name, None)
                if fd is not None:
                    os.close(fd)

    def read_ahead(self, name: str, offset: int, length: int) -> None:
        """Local only: have the kernel start reading [offset, offset + length) of the object
        into the page cache (asynchronous), so a streaming reader's next gets find it there.
        No error if the object is gone."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def disk_usage(self) -> int:
        """Local only: bytes the directory's files take on the disk (allocated blocks)."""
        total = 0
        for directory, _dirs, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(directory, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise BlobNotFound(name) from None

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._unkeep(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        private.fsync_dir(os.path.dirname(path))

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

    def close(self) -> None:
        self._unkeep()
        with self._stage_lock:
            self._stage.close()

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


def _pwrite_all(fd: int, buf: memoryview, off: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, off)
        buf, off = buf[n:], off + n


def _pwrite_parts(fd: int, views: list[memoryview]) -> None:
    off = 0
    for v in views:
        _pwrite_all(fd, v, off)
        off += len(v)


