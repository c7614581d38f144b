"""Copying a directory tree with its metadata, as `cowfs import` and `cowfs export` do it.

Plain POSIX calls on two directories, no cowfs internals: the source and the target may each
be a cowfs mount or any other filesystem, so the same copier serves import (a host tree into
a branch), export (a snapshot out of a mount) and any later transfer between stores.  It
reports progress through a callable and raises OSError naming the entry it was copying.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class CopyStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    special: int = 0
    bytes: int = 0
    skipped_xattrs: int = 0
    warnings: list[str] = field(default_factory=list)


def scan(src: str) -> tuple[int, int]:
    """(entries, bytes of regular files) below src, for the progress bar."""
    entries = nbytes = 0
    stack = [src]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        nbytes += e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    return entries, nbytes


HOLE_BLOCK = 64 << 10                 # cowfs's chunk size
ZERO_BLOCK = bytes(HOLE_BLOCK)
ZERO_CHUNK = bytes(1 << 20)


class TreeCopier:
    """Copy a tree with its metadata: modes, owners (when permitted), nanosecond times,
    xattrs, symlinks, hard links, FIFOs, device nodes and sockets, sparse files (holes are
    skipped with SEEK_DATA, and all-zero blocks are not written).

    Few round trips per file, since each costs a FUSE request: files are created with their
    final mode (umask 0 while copying), owners are set only where they differ from ours, and
    an existing target is only looked at when creating fails with EEXIST.  Directories are
    walked in order and created at once; regular files are copied by a few threads (a FUSE
    daemon serves several requests at a time); hard links and directory metadata are applied
    at the end, children before parents.
    """

    CHUNK = 1 << 20

    def __init__(self, progress: Callable[[int], None] | None = None, workers: int = 4) -> None:
        self._progress = progress or (lambda n: None)
        self.stats = CopyStats()
        self.links: dict[tuple[int, int], str] = {}
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.can_chown = self.euid == 0
        self.workers = workers
        self._lock = threading.Lock()
        self._dir_meta: list[tuple[str, str, os.stat_result]] = []
        self._later_links: list[tuple[str, str, os.stat_result]] = []
        self._futures: list[Any] = []
        self._pool: Any = None

    def progress(self, n: int) -> None:
        with self._lock:
            self._progress(n)

    def _count(self, attr: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, attr, getattr(self.stats, attr) + n)

    def copy(self, src: str, dst: str) -> CopyStats:
        from concurrent.futures import ThreadPoolExecutor

        st = os.lstat(src)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", src)
        old_umask = os.umask(0)
        try:
            os.makedirs(dst, mode=0o700, exist_ok=True)
            os.chmod(dst, 0o700)                  # fill it whatever its mode; set at the end
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                self._pool = pool
                try:
                    self._dir(src, dst, st)
                finally:
                    errors = [f.exception() for f in self._futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
            for s, d, est in self._later_links:
                self._create(d, lambda d=d, est=est: os.link(self.links[(est.st_dev, est.st_ino)], d,
                                                              follow_symlinks=False))
                self.stats.hardlinks += 1
                if stat.S_ISREG(est.st_mode):
                    self.progress(est.st_size)
            for s, d, est in self._dir_meta:      # post-order: children first
                self._meta(s, d, est, kind="dir")
        finally:
            os.umask(old_umask)
        return self.stats

    def _dir(self, src: str, dst: str, st: os.stat_result) -> None:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            s, d = e.path, os.path.join(dst, e.name)
            try:
                self._entry(s, d, e.stat(follow_symlinks=False))
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (copying {s})") from None
        self._dir_meta.append((src, dst, st))
        self.stats.dirs += 1

    @staticmethod
    def _remove(dst: str) -> None:
        if stat.S_ISDIR(os.lstat(dst).st_mode):
            shutil.rmtree(dst)
        else:
            os.unlink(dst)

    def _create(self, dst: str, make: Callable[[], Any]) -> Any:
        """make() the new entry; if something is in the way, remove it and try once more."""
        try:
            return make()
        except FileExistsError:
            self._remove(dst)
            return make()

    def _entry(self, src: str, dst: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            try:
                os.mkdir(dst, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(dst).st_mode):
                    self._remove(dst)
                    os.mkdir(dst, 0o700)
                else:
                    os.chmod(dst, 0o700)
            self._dir(src, dst, st)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            if key in self.links:
                self._later_links.append((src, dst, st))
                return
            self.links[key] = dst
        if stat.S_ISREG(mode):
            self._futures.append(self._pool.submit(self._regular, src, dst, st))
            return
        perm = stat.S_IMODE(mode) & 0o777
        if stat.S_ISLNK(mode):
            target = os.readlink(src)
            self._create(dst, lambda: os.symlink(target, dst))
            self.stats.symlinks += 1
            self._meta(src, dst, st, kind="link")
            return
        if stat.S_ISFIFO(mode):
            self._create(dst, lambda: os.mkfifo(dst, perm))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            self._create(dst, lambda: os.mknod(dst, stat.S_IFMT(mode) | perm, st.st_rdev))
        else:
            self.stats.warnings.append(f"skipped {src}: unknown file type")
            return
        self.stats.special += 1
        self._meta(src, dst, st, kind="special")

    def _regular(self, src: str, dst: str, st: os.stat_result) -> None:
        try:
            self._file(src, dst, st)
            self._meta(src, dst, st, kind="file")
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (copying {src})") from None
        self._count("files")

    def _file(self, src: str, dst: str, st: os.stat_result) -> None:
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fout = self._create(dst, lambda: os.open(dst, flags, stat.S_IMODE(st.st_mode) & 0o777))
            try:
                size = st.st_size
                ranges = self._data_ranges(fin, size)
                end_written = 0
                for start, end in ranges:
                    off = start
                    while off < end:
                        buf = os.pread(fin, min(self.CHUNK, end - off), off)
                        if not buf:
                            break
                        end_written = max(end_written, self._write_sparse(fout, buf, off))
                        off += len(buf)
                        self._count("bytes", len(buf))
                        self.progress(len(buf))
                if end_written != size:
                    os.ftruncate(fout, size)      # holes up to EOF
                skipped = size - sum(e - s for s, e in ranges)
                if skipped > 0:
                    self.progress(skipped)
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _write_sparse(self, fd: int, buf: bytes, off: int) -> int:
        """Write buf at off, leaving all-zero 64 KiB blocks as holes (sources such as FUSE
        filesystems report no holes to SEEK_DATA, yet their zeros need not be written).
        Returns the end offset of the last byte written (0 if none)."""
        if buf == (ZERO_CHUNK if len(buf) == self.CHUNK else bytes(len(buf))):
            return 0
        view = memoryview(buf)
        run_start = None
        last = 0
        for b in range(0, len(buf) + HOLE_BLOCK, HOLE_BLOCK):
            piece = view[b:b + HOLE_BLOCK]
            zero = not piece or piece == ZERO_BLOCK[:len(piece)]
            if not zero and run_start is None:
                run_start = b
            elif zero and run_start is not None:
                data = view[run_start:b]
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], off + run_start + written)
                last = off + run_start + len(data)
                run_start = None
        return last

    @staticmethod
    def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
        """[start, end) ranges holding data (the whole file if holes cannot be asked for)."""
        if size == 0:
            return []
        ranges = []
        off = 0
        try:
            while off < size:
                try:
                    start = os.lseek(fd, off, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:   # only a hole up to EOF
                        break
                    raise
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                ranges.append((start, end))
                off = end
        except OSError:
            return [(0, size)]
        return ranges

    def _meta(self, src: str, dst: str, st: os.stat_result, kind: str) -> None:
        """Owner (where it differs from ours), xattrs, set-id/sticky bits or a directory's
        mode, then times - last, since the others change ctime and writes change mtime."""
        chowned = False
        if self.can_chown and (st.st_uid, st.st_gid) != (self.euid, self.egid):
            try:
                os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                chowned = True
            except OSError as exc:
                with self._lock:
                    self.stats.warnings.append(f"owner of {dst}: {exc.strerror}")
        if kind != "link":
            self._xattrs(src, dst)
            mode = stat.S_IMODE(st.st_mode)
            # created with mode & 0o777; chown clears set-id bits: set the rest now
            if kind == "dir" or mode & 0o7000 or chowned:
                os.chmod(dst, mode)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _xattrs(self, src: str, dst: str) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            return
        for name in names:
            try:
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
            except OSError:
                self._count("skipped_xattrs")   # e.g. security.* or ACLs the target refuses

