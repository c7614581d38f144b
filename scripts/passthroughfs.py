#!/usr/bin/env python3
"""A bare, minimal pyfuse3 + trio passthrough filesystem: the "naive Python filesystem" baseline.

    python scripts/passthroughfs.py SRC MOUNTPOINT [--counters FILE] [--timeout 1.0]

Mirrors the directory SRC at MOUNTPOINT. Every request is answered with the plain system call on the
corresponding path under SRC; there is no cache of its own beyond the inode -> path table that a
path-based FUSE filesystem needs. Entry and attribute timeouts default to 1 s (what a careful naive
implementation would pick), no writeback cache, no keep_cache, pyfuse3's default options
(default_permissions, so the kernel checks permissions).

Request counters: every FUSE request that reaches the daemon is counted per operation (pyfuse3's
method names: lookup, getattr, write, ...). With --counters FILE they are written as JSON to FILE on
exit and whenever the process gets SIGUSR1 (written to FILE.tmp then renamed; "dumps" counts the
dumps so a reader can wait for a fresh one). SIGINT / SIGTERM unmount and exit; so does
`fusermount3 -u MOUNTPOINT`.

It is deliberately the simplest honest implementation: not tuned, not crippled.
"""
from __future__ import annotations

import argparse
import errno
import functools
import inspect
import json
import os
import resource
import signal
import stat
import sys
from collections import Counter

import pyfuse3
import trio
from pyfuse3 import FUSEError

ROOT = pyfuse3.ROOT_INODE


def _counted(name, fn, counts):
    """Count the request and turn OSError into FUSEError (what the kernel expects)."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        counts[name] += 1
        try:
            return await fn(*args, **kwargs)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None

    return wrapper


class _Node:
    __slots__ = ("ino", "paths", "lookups", "fds")

    def __init__(self, ino: int, paths: set, lookups: int):
        self.ino, self.paths, self.lookups, self.fds = ino, paths, lookups, set()


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, src: str, timeout: float = 1.0):
        super().__init__()
        self.src = os.fsencode(os.path.abspath(src))
        self.timeout = timeout
        self.counts: Counter[str] = Counter()
        # FUSE node id -> _Node; the source's st_ino -> node id while some path of it is known.
        # Node ids are our own (not st_ino): once every known path of a file is gone, a new file
        # that reuses its st_ino gets a fresh node id, so the kernel never confuses the two.
        root_ino = os.lstat(self.src).st_ino
        self.nodes: dict[int, _Node] = {ROOT: _Node(root_ino, {self.src}, 1)}
        self.by_ino: dict[int, int] = {root_ino: ROOT}
        self.next_id = ROOT + 1
        self.fh_node: dict[int, int] = {}  # open file handle (fd) -> node id
        self.dirs: dict[int, list] = {}  # opendir handle -> listing (filled on first readdir)
        self.next_dh = 1
        # Wrap every request handler pyfuse3 may call (also the ones we leave to the base class).
        for name, fn in inspect.getmembers(pyfuse3.Operations, inspect.iscoroutinefunction):
            setattr(self, name, _counted(name, getattr(self, name), self.counts))

    # -- inode table -------------------------------------------------------------------------
    def _path(self, nid: int) -> bytes:
        node = self.nodes.get(nid)
        if node is None or not node.paths:
            raise FUSEError(errno.ENOENT)
        return next(iter(node.paths))

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _remember(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Register a path the kernel now knows (one more lookup reference)."""
        nid = self.by_ino.get(st.st_ino)
        if nid is None:
            nid = self.next_id
            self.next_id += 1
            self.nodes[nid] = _Node(st.st_ino, set(), 0)
            self.by_ino[st.st_ino] = nid
        node = self.nodes[nid]
        node.paths.add(path)
        node.lookups += 1
        return self._attr(st, nid)

    def _drop_path(self, path: bytes, st: os.stat_result) -> None:
        nid = self.by_ino.get(st.st_ino)
        if nid is None:
            return
        node = self.nodes[nid]
        node.paths.discard(path)
        if not node.paths:
            del self.by_ino[st.st_ino]

    def _unref(self, nid: int, nlookup: int = 0) -> None:
        """Drop lookup references; free the node once neither the kernel nor an open file needs it."""
        node = self.nodes.get(nid)
        if node is None or nid == ROOT:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and not node.fds:
            del self.nodes[nid]
            if self.by_ino.get(node.ino) == nid:
                del self.by_ino[node.ino]

    def _attr(self, st: os.stat_result, nid: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = nid
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat(self, nid: int) -> os.stat_result:
        node = self.nodes.get(nid)
        if node is not None and not node.paths and node.fds:  # unlinked but still open
            return os.fstat(next(iter(node.fds)))
        return os.lstat(self._path(nid))

    def _own(self, path: bytes, ctx) -> None:
        if ctx.uid != os.getuid() or ctx.gid != os.getgid():
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- requests ----------------------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx):
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            path = os.path.dirname(self._path(parent_inode)) if parent_inode != ROOT else self.src
            if len(path) < len(self.src):
                path = self.src
        else:
            path = self._child(parent_inode, name)
        return self._remember(path, os.lstat(path))

    async def forget(self, inode_list):
        for nid, nlookup in inode_list:
            self._unref(nid, nlookup)

    async def getattr(self, inode, ctx):
        return self._attr(self._stat(inode), inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fh is not None and not self.nodes[inode].paths:  # unlinked but open: only ftruncate
            if fields.update_size:
                os.ftruncate(fh, attr.st_size)
            return self._attr(os.fstat(fh), inode)
        path = self._path(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._attr(os.lstat(path), inode)

    async def readlink(self, inode, ctx):
        return os.readlink(self._path(inode))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.unlink(path)
        self._drop_path(path, st)

    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.rmdir(path)
        self._drop_path(path, st)

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._own(path, ctx)
        return self._remember(path, os.lstat(path))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        st = os.lstat(old)
        try:
            st_new = os.lstat(new)
        except FileNotFoundError:
            st_new = None
        if st_new is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EEXIST)
        os.rename(old, new)
        if st_new is not None:
            self._drop_path(new, st_new)
        nid = self.by_ino.get(st.st_ino)
        if nid is not None:
            paths = self.nodes[nid].paths
            paths.discard(old)
            paths.add(new)
        if stat.S_ISDIR(st.st_mode):  # re-home every known path below the moved directory
            prefix = old + b"/"
            for node in self.nodes.values():
                moved = [p for p in node.paths if p.startswith(prefix)]
                for p in moved:
                    node.paths.discard(p)
                    node.paths.add(new + p[len(old):])

    async def link(self, inode, new_parent_inode, new_name, ctx):
        new = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), new, follow_symlinks=False)
        return self._remember(new, os.lstat(new))

    def _opened(self, nid: int, fd: int) -> pyfuse3.FileInfo:
        self.nodes[nid].fds.add(fd)
        self.fh_node[fd] = nid
        return pyfuse3.FileInfo(fh=fd)

    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        return self._opened(inode, fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode & ~ctx.umask)
        try:
            self._own(path, ctx)
            attr = self._remember(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return self._opened(attr.st_ino, fd), attr

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        nid = self.fh_node.pop(fh, None)
        node = self.nodes.get(nid)
        if node is not None:
            node.fds.discard(fh)
            self._unref(nid)
        os.close(fh)

    async def fsync(self, fh, datasync):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    async def opendir(self, inode, ctx):
        path = self._path(inode)
        if not os.path.isdir(path):
            raise FUSEError(errno.ENOTDIR)
        dh = self.next_dh
        self.next_dh += 1
        self.dirs[dh] = [path, None]
        return dh

    async def readdir(self, fh, start_id, token):
        d = self.dirs[fh]
        if d[1] is None or start_id == 0:  # list once per opendir (and again on rewinddir)
            with os.scandir(d[0]) as it:
                d[1] = sorted((e.name, e.path) for e in it)
        entries = d[1]
        for i in range(start_id, len(entries)):
            name, path = entries[i]
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            attr = self._remember(path, st)  # readdirplus: the kernel takes a lookup reference...
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                self._unref(attr.st_ino, 1)  # ...unless the entry did not fit
                return

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        fd = os.open(self.dirs[fh][0], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx):
        s = os.statvfs(self.src)
        r = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_namemax"):
            setattr(r, f, getattr(s, f))
        return r


def dump_counters(fs: Passthrough, path: str | None, state: dict) -> None:
    if not path:
        return
    state["dumps"] += 1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    data = {"dumps": state["dumps"], "pid": os.getpid(), "requests": dict(fs.counts),
            "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def run(fs: Passthrough, counters: str | None, max_tasks: int) -> None:
    state = {"dumps": 0}

    async def signals(task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as sigs:
            task_status.started()
            async for sig in sigs:
                if sig == signal.SIGUSR1:
                    dump_counters(fs, counters, state)
                else:
                    pyfuse3.terminate()
                    return

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(signals)
            if max_tasks:
                await pyfuse3.main(max_tasks=max_tasks)
            else:
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        dump_counters(fs, counters, state)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("mountpoint")
    ap.add_argument("--counters", help="JSON file for per-operation request counts (on exit, SIGUSR1)")
    ap.add_argument("--timeout", type=float, default=1.0, help="entry/attr timeout in seconds (1)")
    ap.add_argument("--max-tasks", type=int, default=0, help="pyfuse3.main max_tasks (0: pyfuse3 default)")
    ap.add_argument("--debug", action="store_true", help="add the FUSE 'debug' option")
    args = ap.parse_args(argv)

    fs = Passthrough(args.src, args.timeout)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=passthroughfs")
    if args.debug:
        opts.add("debug")
    pyfuse3.init(fs, args.mountpoint, opts)
    ok = False
    try:
        trio.run(run, fs, args.counters, args.max_tasks)
        ok = True
    finally:
        pyfuse3.close(unmount=not ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
