#!/usr/bin/env python3
"""lazyfs: a passthrough FUSE filesystem that loses unsynced data on command (after LazyFS).

    python tests/lazyfs.py BACKING MOUNTPOINT [--report FILE]

Mirrors the directory BACKING at MOUNTPOINT, except that file data written through the mount
is held in memory, like a kernel page cache that never writes back by itself, until fsync(2)
or fdatasync(2) on that file writes it to BACKING (pwrite, then fsync of the backing file).
Reads see the held data.  SIGUSR1 simulates a power cut: every byte not yet synced is
discarded, and from then on every write, fsync and namespace change fails with EIO (the
machine is "off"); the figures are written as JSON to --report FILE.  What is in BACKING then
is what the disk would hold after the cut.  Unmounting ends the process (held data is not
written either: only fsync makes data durable here).

What is modelled, and what is not (keep both in mind when reading a test's verdict):
  * file contents and file size growth are volatile until fsync/fdatasync of the file;
  * namespace and metadata changes (create, mkdir, rename, unlink, link, truncate, chmod) go to
    BACKING at once, as if every one were journaled synchronously: a power cut never undoes a
    rename or an unlink, so this cannot catch a missing directory fsync;
  * data is lost in whole: no torn writes or reordering inside what was synced, no
    sync_file_range (RocksDB as cowfs configures it does not call it: checked with strace);
  * no writeback cache and attribute timeouts of 0, so the kernel never holds data of its own.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import sys

import pyfuse3
import trio

PAGE = 4096


class Held:
    """Unsynced data of one inode: whole pages, and the size the file has with them."""

    __slots__ = ("pages", "size", "fd")

    def __init__(self, fd: int, size: int) -> None:
        self.pages: dict[int, bytearray] = {}
        self.size = size
        self.fd = os.dup(fd)  # to write the data back even after the last close


class LazyFS(pyfuse3.Operations):
    def __init__(self, backing: str, report: str | None) -> None:
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: os.fsencode(os.path.abspath(backing))}
        self.root_ino = os.lstat(backing).st_ino
        self.held: dict[int, Held] = {}
        self.fds: dict[int, tuple[int, int]] = {}  # fh -> (inode, backing fd)
        self.report = report
        self.crashed = False
        self.stats = {"writes": 0, "bytes_written": 0, "fsyncs": 0, "bytes_synced": 0}

    # -- inodes and paths --------------------------------------------------------------------
    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino + 1

    def _path(self, ino: int, name: bytes = b"") -> bytes:
        try:
            p = self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        return os.path.join(p, name) if name else p

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        ino = self._ino(st)
        self.paths[ino] = path
        return self._attrs(ino, st)

    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        for a in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, a, getattr(st, a))
        h = self.held.get(ino)
        if h is not None:
            e.st_size = h.size
        e.st_ino = ino
        e.st_blksize = PAGE
        e.st_blocks = (e.st_size + 511) // 512
        e.attr_timeout = e.entry_timeout = 0
        return e

    def _alive(self) -> None:
        if self.crashed:
            raise pyfuse3.FUSEError(errno.EIO)

    # -- the power cut -----------------------------------------------------------------------
    def power_cut(self) -> dict:
        lost = sum(len(p) for h in self.held.values() for p in h.pages.values())
        files = len(self.held)
        for h in self.held.values():
            os.close(h.fd)
        self.held.clear()
        self.crashed = True
        out = dict(self.stats, lost_bytes=lost, lost_files=files)
        if self.report:
            tmp = self.report + ".tmp"
            with open(tmp, "w") as f:
                json.dump(out, f)
            os.rename(tmp, self.report)
        return out

    def _persist(self, ino: int, datasync: bool) -> None:
        h = self.held.pop(ino, None)
        if h is None:
            return
        try:
            for i in sorted(h.pages):
                data = h.pages[i][: max(0, min(PAGE, h.size - i * PAGE))]
                os.pwrite(h.fd, data, i * PAGE)
                self.stats["bytes_synced"] += len(data)
            (os.fdatasync if datasync else os.fsync)(h.fd)
        finally:
            os.close(h.fd)

    # -- namespace (passed through at once) --------------------------------------------------
    async def lookup(self, parent_inode, name, ctx):
        try:
            return self._entry(self._path(parent_inode, name))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def getattr(self, inode, ctx):
        h = self.held.get(inode)
        st = os.fstat(h.fd) if h is not None else os.lstat(self._path(inode))
        return self._attrs(inode, st)

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._alive()
        path = self._path(inode)
        if fields.update_size:
            self._truncate(inode, path if fh is None else self.fds[fh][1], attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return await self.getattr(inode, ctx)

    def _truncate(self, inode: int, target, size: int) -> None:
        os.truncate(target, size)
        h = self.held.get(inode)
        if h is not None:
            h.size = size
            for i in [i for i in h.pages if i * PAGE >= size]:
                del h.pages[i]
            last = size // PAGE
            if last in h.pages:
                cut = size - last * PAGE
                h.pages[last][cut:] = bytes(PAGE - cut)

    async def readlink(self, inode, ctx):
        return os.readlink(self._path(inode))

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._alive()
        path = self._path(parent_inode, name)
        os.mkdir(path, mode)
        return self._entry(path)

    async def symlink(self, parent_inode, name, target, ctx):
        self._alive()
        path = self._path(parent_inode, name)
        os.symlink(target, path)
        return self._entry(path)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._alive()
        path = self._path(parent_inode, name)
        os.mknod(path, mode, rdev)
        return self._entry(path)

    async def unlink(self, parent_inode, name, ctx):
        self._alive()
        os.unlink(self._path(parent_inode, name))

    async def rmdir(self, parent_inode, name, ctx):
        self._alive()
        os.rmdir(self._path(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._alive()
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._path(parent_inode_old, name_old), self._path(parent_inode_new, name_new)
        os.rename(old, new)
        for ino, p in list(self.paths.items()):  # the moved entry, and what is below it
            if p == old or p.startswith(old + b"/"):
                self.paths[ino] = new + p[len(old):]

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._alive()
        path = self._path(new_parent_inode, new_name)
        os.link(self._path(inode), path)
        return self._entry(path)

    async def statfs(self, ctx):
        sv = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for a in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(s, a, getattr(sv, a))
        s.f_namemax = sv.f_namemax
        return s

    # -- directories -------------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for i in range(start_id, len(names)):
            try:
                e = self._entry(os.path.join(path, os.fsencode(names[i])))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), e, i + 1):
                break

    async def fsyncdir(self, fh, datasync):
        self._alive()
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- files -------------------------------------------------------------------------------
    def _opened(self, inode: int, fd: int) -> pyfuse3.FileInfo:
        fh = fd  # backing fds are unique while open
        self.fds[fh] = (inode, fd)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    async def open(self, inode, flags, ctx):
        if flags & os.O_TRUNC:
            self._alive()
        # O_APPEND: the kernel gives every write its offset; O_TRUNC: done below, held data too.
        fd = os.open(self._path(inode), os.O_RDWR)
        if flags & os.O_TRUNC:
            self._truncate(inode, fd, 0)
        return self._opened(inode, fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._alive()
        path = self._path(parent_inode, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL), mode)
        e = self._entry(path)
        return self._opened(e.st_ino, fd), e

    async def read(self, fh, off, size):
        ino, fd = self.fds[fh]
        h = self.held.get(ino)
        if h is None:
            return os.pread(fd, size, off)
        end = min(off + size, h.size)
        out = bytearray()
        pos = off
        while pos < end:
            i, o = divmod(pos, PAGE)
            page = h.pages.get(i)
            if page is None:
                page = os.pread(fd, PAGE, i * PAGE).ljust(PAGE, b"\0")
            n = min(PAGE - o, end - pos)
            out += page[o:o + n]
            pos += n
        return bytes(out)

    async def write(self, fh, off, buf):
        self._alive()
        ino, fd = self.fds[fh]
        h = self.held.get(ino)
        if h is None:
            h = self.held[ino] = Held(fd, os.fstat(fd).st_size)
        pos, end = off, off + len(buf)
        while pos < end:
            i, o = divmod(pos, PAGE)
            page = h.pages.get(i)
            if page is None:
                base = os.pread(fd, PAGE, i * PAGE) if i * PAGE < os.fstat(fd).st_size else b""
                # bytes past the held size are zero (a file shrunk and grown again)
                base = base[: max(0, h.size - i * PAGE)]
                page = h.pages[i] = bytearray(base.ljust(PAGE, b"\0"))
            n = min(PAGE - o, end - pos)
            page[o:o + n] = buf[pos - off:pos - off + n]
            pos += n
        h.size = max(h.size, end)
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(buf)
        return len(buf)

    async def fsync(self, fh, datasync):
        self._alive()
        ino, _fd = self.fds[fh]
        self.stats["fsyncs"] += 1
        self._persist(ino, datasync)

    async def flush(self, fh):
        pass  # close(2) makes nothing durable

    async def release(self, fh):
        _ino, fd = self.fds.pop(fh)
        os.close(fd)


def _errnos(cls):
    """Every handler: an OSError from the backing directory becomes the same errno for the caller."""
    def wrap(fn):
        async def handler(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        handler.__name__ = fn.__name__
        return handler
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and callable(fn) and getattr(fn, "__code__", None) and \
                fn.__code__.co_flags & 0x80:  # CO_COROUTINE
            setattr(cls, name, wrap(fn))
    return cls


_errnos(LazyFS)


async def _serve(fs: LazyFS) -> None:
    async with trio.open_nursery() as nursery:
        async def cuts() -> None:
            # A trio task, never in the middle of a request: the cut is atomic.
            with trio.open_signal_receiver(signal.SIGUSR1) as signals:
                async for _ in signals:
                    print("lazyfs: power cut:", json.dumps(fs.power_cut()), flush=True)
        nursery.start_soon(cuts)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--report", help="where to write the figures of a power cut (JSON)")
    a = ap.parse_args(argv)
    fs = LazyFS(a.backing, a.report)
    opts = set(pyfuse3.default_options) | {"fsname=lazyfs", "allow_other"}
    pyfuse3.init(fs, a.mountpoint, opts)
    print(f"lazyfs: serving {a.backing} at {a.mountpoint} (pid {os.getpid()})", flush=True)
    try:
        trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
