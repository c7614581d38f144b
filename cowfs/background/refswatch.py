"""One watcher of the store's reference store (STORE/refs.sqlite) for the daemon's tasks that
act on what other processes write there: the gc acknowledgements (`acknowledge_rounds`: a
round another process condemned) and the dup rewrites (`rewrite_dups`: the keeper's new
generation of dup records).  They looked every second each, in a worker thread; now they
look when the file changes, and an idle daemon's watcher never wakes.

How a change is seen: inotify on the store directory (one instance per daemon), filtered on
the reference store's files (`refs.sqlite`, its `-wal` log, which every commit appends to).
The event comes when a writer writes its log frames, before its commit is synced and
visible to reads, so the watcher counts the change at once and again AGAIN seconds after the
last event (each a look of the tasks): a commit whose sync outlasts the first look is seen by
a later one.  It never takes SQLite's lock to wait for the writers: a daemon stopped while
holding it (SIGSTOP, a frozen cgroup) would stall every process of the store.  A
daemon that cannot have an inotify instance (`fs.inotify.max_user_instances`, 128 per user
by default, is used up: hundreds of daemons of one user) looks at the two files' size and
mtime every FALLBACK_EVERY seconds on the loop instead (no thread unless they changed), and
says so in its log once.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct

import trio

from cowfs import faults
from cowfs.kv import sqlite
from cowfs.kv.sqlite import SQLiteKV
from cowfs.libc import libc

log = logging.getLogger(__name__)

FALLBACK_EVERY = 1.0  # seconds between two looks at the files' size and mtime without inotify
AGAIN = (0.05, 0.5, 2.0, 8.0)  # seconds after the last change: looks again (see above)
IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class RefsWatch:
    """Counts the changes of the reference store `refs` (`changes`); `changed` waits for one."""

    def __init__(self, refs: SQLiteKV) -> None:
        self.path = os.path.abspath(refs.path)  # the process may change directory after
        self.dir, self.name = os.path.split(self.path)
        self.changes = 0
        self.inotify = True  # False: the stat fallback (no inotify instance to be had)
        self._event = trio.Event()

    async def changed(self, seen: int | None) -> int:
        """The change count once it differs from seen (None: at once).  A task reads it
        before its look, so a change during the look makes it look again."""
        while self.changes == seen:
            await self._event.wait()
        return self.changes

    def _count(self) -> None:
        self.changes += 1
        self._event.set()
        self._event = trio.Event()

    def _open(self) -> int | None:
        """An inotify instance watching the store directory, or None if none can be had."""
        try:
            faults.point("refs_inotify")
        except OSError:
            return None
        fd = libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSYS):
                return None
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc().inotify_add_watch(fd, os.fsencode(self.dir), IN_MODIFY | IN_CREATE | IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            if err == errno.ENOSPC:  # fs.inotify.max_user_watches used up
                return None
            raise OSError(err, f"inotify_add_watch {self.dir}: {os.strerror(err)}")
        return fd

    def _ours(self, buf: bytes) -> bool:
        """Whether the events in buf name the reference store's files (or were lost)."""
        prefix = os.fsencode(self.name)
        ours = False
        off = 0
        while off < len(buf):
            _wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
            name = buf[off + _EVENT.size:off + _EVENT.size + n].rstrip(b"\0")
            off += _EVENT.size + n
            if mask & IN_IGNORED:
                raise OSError(errno.ENOENT, f"{self.dir}: no longer watched (removed?)")
            ours |= bool(mask & IN_Q_OVERFLOW) or name.startswith(prefix)
        return ours

    async def run(self) -> None:
        """The daemon's task `refs_watch`: count every change of the reference store, from
        its (re)start on (one counted at once: what changed before the watch was set)."""
        fd = self._open()
        if fd is None:
            if self.inotify:
                log.warning("no inotify instance for %s (fs.inotify.max_user_instances or max_user_watches "
                            "used up): looking at it every %.0f s", self.dir, FALLBACK_EVERY)
            self.inotify = False
            await self._poll()
            return
        self.inotify = True
        try:
            self._count()
            last, again = trio.current_time(), list(AGAIN)
            while True:
                ours = False
                with trio.move_on_at(last + again[0] if again else float("inf")):
                    await trio.lowlevel.wait_readable(fd)
                    while True:
                        try:
                            buf = os.read(fd, 65536)
                        except BlockingIOError:
                            break
                        ours |= self._ours(buf)
                    if not ours:
                        continue
                if ours:
                    last, again = trio.current_time(), list(AGAIN)
                else:  # the time of the next look after the last change
                    again.pop(0)
                self._count()
        finally:
            os.close(fd)

    async def _poll(self) -> None:
        stamp = sqlite.stamp(self.path)
        self._count()
        again = 0  # looks still to make after the last change (one a second)
        while True:
            await trio.sleep(FALLBACK_EVERY)
            now = sqlite.stamp(self.path)
            if now != stamp:
                stamp, again = now, len(AGAIN)
                self._count()
            elif again:
                again -= 1
                self._count()
