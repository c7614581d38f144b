"""FUSE requests that pyfuse3 does not hand on: LSEEK, FALLOCATE, and STATFS's inode.

pyfuse3 (3.3-3.5) registers no `lseek` and no `fallocate` handler with libfuse, so the
kernel gets ENOSYS for them and falls back for good: SEEK_DATA/SEEK_HOLE see every file as
all data (so `cp`, `tar --sparse` and `cowfs export` copy holes as zeros) and fallocate(2)
fails with EOPNOTSUPP.  Its `statfs` handler drops the inode, so a daemon serving several
branches cannot tell which one `df` asks about.

libfuse keeps its own copy of the operations table in `struct fuse_session`
(`fuse_session_new` copies the table it is given), and every request points at its session
(`struct fuse_req` starts with `struct fuse_session *se`).  So at the first request pyfuse3
hands to Python with its `fuse_req` (the first GETATTR, LOOKUP, OPEN, CREATE, OPENDIR or
STATFS: always before any LSEEK or FALLOCATE, which need an open file), `Extensions`
reads the session from the request, checks its layout, and writes three ctypes callbacks
into the session's table: `lseek`, `fallocate` and `statfs`.  libfuse then calls them from
`fuse_session_process_buf`, i.e. on the trio thread inside pyfuse3's session loop: the
STATFS callback replies at once (`fuse_reply_statfs`); LSEEK and FALLOCATE start a trio task
in the daemon's nursery, which awaits the handler and replies with `fuse_reply_lseek` or
`fuse_reply_err`.  Exactly one reply per request, always (an error is EIO, a cancellation
at unmount EINTR); a reply the kernel refuses is logged by cowfs.fuse.replies, as pyfuse3's
own are.  After installing, the wrappers put pyfuse3's own coroutines back, so
no request pays for this afterwards.

The layout is libfuse 3.14's `lib/fuse_i.h`, checked against the installed library's
machine code (fuse_session_destroy reads `se->op.destroy` at offset 48, `se->fd` at 12):

    struct fuse_session { char *mountpoint; volatile int exited; int fd;
                          struct fuse_custom_io *io; struct mount_opts *mo; int debug;
                          int deny_others; struct fuse_lowlevel_ops op; ... }

(the brief's version without `io` is libfuse 3.11's).  Before writing anything, `install`
requires: 64-bit pointers; libfuse's `fuse_version()` is 314; the session pointer's `fd`
agrees with libfuse's own `fuse_session_fd()` and is open on /dev/fuse; its `mountpoint`
is ours; and the 44 slots of its operations table are null or not exactly where pyfuse3
3.5 puts its handlers (lseek, fallocate and the other 9 it leaves out are null).  Any
mismatch changes nothing: the daemon logs why, `.cowfs/stats` shows
`fuse_ext.installed: false` with the reason, and requests are served as pyfuse3 alone
would (the kernel's fallbacks above; STATFS answers for the first branch).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Any, Awaitable, Callable

import pyfuse3
import trio

from cowfs.fuse import replies as fuse_replies

log = logging.getLogger(__name__)

LIBFUSE_VERSION = 314
# struct fuse_lowlevel_ops (fuse_lowlevel.h, 3.14): 44 function pointers, in this order.
OPS = ("init", "destroy", "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
       "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release", "fsync", "opendir",
       "readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr", "removexattr",
       "access", "create", "getlk", "setlk", "bmap", "ioctl", "poll", "write_buf", "retrieve_reply",
       "forget_multi", "flock", "fallocate", "readdirplus", "copy_file_range", "lseek")
# What pyfuse3 3.5 registers (internal.pxi, init_fuse_ops): every other slot is null.
PYFUSE3_OPS = frozenset(("init", "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
                         "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release", "fsync",
                         "opendir", "readdirplus", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr",
                         "listxattr", "removexattr", "access", "create", "forget_multi", "write_buf", "poll"))
# pyfuse3's module-level coroutines that receive a request container, looked up at every request.
ENTRY_POINTS = ("fuse_getattr_async", "fuse_lookup_async", "fuse_open_async", "fuse_create_async",
                "fuse_opendir_async", "fuse_statfs_async")


class _Session(ctypes.Structure):
    """The head of libfuse 3.14's `struct fuse_session` (lib/fuse_i.h)."""

    _fields_ = [
        ("mountpoint", ctypes.c_char_p),
        ("exited", ctypes.c_int),
        ("fd", ctypes.c_int),
        ("io", ctypes.c_void_p),
        ("mo", ctypes.c_void_p),
        ("debug", ctypes.c_int),
        ("deny_others", ctypes.c_int),
        ("op", ctypes.c_void_p * len(OPS)),
    ]


class _FileInfo(ctypes.Structure):
    """The head of `struct fuse_file_info` up to `fh` (see cowfs.fuse.dircache)."""

    _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint32), ("padding2", ctypes.c_uint32),
                ("fh", ctypes.c_uint64)]


class Statvfs(ctypes.Structure):
    """glibc's 64-bit `struct statvfs`."""

    _fields_ = [(name, ctypes.c_ulong) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                    "f_files", "f_ffree", "f_favail", "f_fsid", "f_flag",
                                                    "f_namemax")] + [("spare", ctypes.c_int * 6)]


_LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                          ctypes.POINTER(_FileInfo))
_FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64, ctypes.POINTER(_FileInfo))
_STATFS = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)
# readdirplus(req, ino, size, off, fi): ours, and pyfuse3's (called with the GIL held, as
# libfuse calls it: PYFUNCTYPE does not release it around the call).
_READDIRPLUS = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                                ctypes.POINTER(_FileInfo))
_READDIRPLUS_PY = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64,
                                    ctypes.POINTER(_FileInfo))


class _Ctx(ctypes.Structure):
    """libfuse's `struct fuse_ctx` (what fuse_req_ctx returns)."""

    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


def _libfuse() -> ctypes.CDLL | None:
    """The libfuse3 this process has loaded (pyfuse3's), or None."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libfuse3.so" in line}
    if len(paths) != 1:
        return None
    lib = ctypes.CDLL(paths.pop())
    lib.fuse_version.restype = ctypes.c_int
    lib.fuse_session_fd.restype = ctypes.c_int
    lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
    lib.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.fuse_reply_statfs.argtypes = [ctypes.c_void_p, ctypes.POINTER(Statvfs)]
    lib.fuse_req_ctx.argtypes = [ctypes.c_void_p]
    lib.fuse_req_ctx.restype = ctypes.POINTER(_Ctx)
    for reply in (lib.fuse_reply_err, lib.fuse_reply_lseek, lib.fuse_reply_statfs):
        reply.restype = ctypes.c_int  # 0, or -errno when the kernel refuses the reply
    return lib


def check_session(lib: Any, se: int, mountpoint: bytes) -> str | None:
    """Why the session at address se does not have the layout this module writes to (None:
    it does)."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return "not a 64-bit process"
    version = lib.fuse_version()
    if version != LIBFUSE_VERSION:
        return f"libfuse version {version}, the layout known here is {LIBFUSE_VERSION}'s"
    if not se:
        return "the request has no session"
    s = _Session.from_address(se)
    if lib.fuse_session_fd(se) != s.fd:
        return f"fuse_session_fd() is {lib.fuse_session_fd(se)}, the layout reads {s.fd}"
    try:
        target = os.readlink(f"/proc/self/fd/{s.fd}")
    except OSError:
        target = ""
    if target != "/dev/fuse":
        return f"the session's fd {s.fd} is not /dev/fuse ({target!r})"
    if s.mountpoint != mountpoint:
        return "the session's mount point is not ours"  # (no paths: the sandbox sees the reason)
    set_ops = {name for name, p in zip(OPS, s.op) if p}
    if set_ops != PYFUSE3_OPS:
        return (f"the operations table is not pyfuse3's: {sorted(set_ops - PYFUSE3_OPS)} set, "
                f"{sorted(PYFUSE3_OPS - set_ops)} missing")
    return None


class Extensions:
    """Installs and serves the LSEEK, FALLOCATE and STATFS callbacks (see the module doc).

    lseek(fuse inode, fh, offset, whence) -> offset and fallocate(fuse inode, fh, mode,
    offset, length) are coroutines that raise pyfuse3.FUSEError; statfs(fuse inode) returns
    the fields of a Statvfs."""

    def __init__(self, mountpoint: str, lseek: Callable[[int, int, int, int], Awaitable[int]],
                 fallocate: Callable[[int, int, int, int, int], Awaitable[None]],
                 statfs: Callable[[int], dict[str, int]], readdir_by_inode: bool = False) -> None:
        self.mountpoint = os.fsencode(mountpoint)
        self._lseek = lseek
        self._fallocate = fallocate
        self._statfs = statfs
        # Wanted: READDIR hands pyfuse3 its inode as the handle (cowfs.fuse.ops declines
        # OPENDIR then, see Operations.opendir); and which process sent it, by inode.
        self.readdir_by_inode = readdir_by_inode
        self.readdir_pids: dict[int, int] = {}
        self._readdirplus: Any = None  # pyfuse3's own handler
        self.nursery: trio.Nursery | None = None  # set by the daemon before serving
        self.installed = False
        self.reason = "no request seen yet"
        self._lib: Any = None
        self._callbacks: list[Any] = []  # kept alive: libfuse holds their addresses
        self._originals: dict[str, Any] = {}

    def figures(self) -> dict[str, Any]:
        return {"installed": self.installed, "reason": None if self.installed else self.reason,
                "readdir_by_inode": self.by_inode}

    @property
    def by_inode(self) -> bool:
        """Whether READDIR comes with its inode as the handle (then OPENDIR is declined)."""
        return self.installed and self.readdir_by_inode

    def arm(self) -> None:
        """Wrap pyfuse3's entry points so that the first request installs the callbacks."""
        from cowfs.fuse import dircache

        if not dircache.layout_matches():
            self.reason = f"pyfuse3 {getattr(pyfuse3, '__version__', '?')}: unknown request layout"
            log.warning("FUSE extensions not installed: %s", self.reason)
            return
        for name in ENTRY_POINTS:
            original = getattr(pyfuse3, name, None)
            if original is None:
                self.reason = f"pyfuse3 has no {name}"
                log.warning("FUSE extensions not installed: %s", self.reason)
                self._restore()
                return
            self._originals[name] = original
            setattr(pyfuse3, name, self._first(original))

    def _first(self, original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        from cowfs.fuse.dircache import _Container

        async def first_request(c: Any, *args: Any) -> None:
            if self._originals:
                self._restore()
                self.install(_Container.from_address(id(c)).req)
            await original(c, *args)

        return first_request

    def _restore(self) -> None:
        for name, original in self._originals.items():
            setattr(pyfuse3, name, original)
        self._originals = {}

    def install(self, req: int) -> bool:
        """Write the callbacks into the session of request req, if its layout checks out."""
        try:
            self._lib = lib = _libfuse()
            if lib is None:
                self.reason = "libfuse3 is not loaded exactly once"
            else:
                se = ctypes.c_void_p.from_address(req).value or 0
                why = check_session(lib, se, self.mountpoint)
                if why is not None:
                    self.reason = why
                else:
                    ops = _Session.from_address(se).op
                    callbacks = {"lseek": _LSEEK(self._on_lseek), "fallocate": _FALLOCATE(self._on_fallocate),
                                 "statfs": _STATFS(self._on_statfs)}
                    if self.readdir_by_inode:
                        self._readdirplus = _READDIRPLUS_PY(ops[OPS.index("readdirplus")])
                        callbacks["readdirplus"] = _READDIRPLUS(self._on_readdirplus)
                    self._callbacks = list(callbacks.values())
                    for name, cb in callbacks.items():
                        ops[OPS.index(name)] = ctypes.cast(cb, ctypes.c_void_p).value
                    self.installed = True
        except (OSError, AttributeError, ValueError) as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
        if not self.installed:
            self.readdir_by_inode = False
        if self.installed:
            log.info("FUSE extensions installed: lseek (SEEK_DATA/SEEK_HOLE), fallocate, statfs per branch%s",
                     ", READDIR by inode (no OPENDIR)" if self.readdir_by_inode else "")
        else:
            log.warning("FUSE extensions not installed (%s): SEEK_DATA/SEEK_HOLE see files as all data, "
                        "fallocate fails with EOPNOTSUPP, df shows the first branch", self.reason)
        return self.installed

    # -- the callbacks (called by libfuse on the trio thread; they must never raise) ---------
    def _on_lseek(self, req: int, ino: int, off: int, whence: int, fi: Any) -> None:
        self._spawn(req, self._lseek, ino, fi.contents.fh, off, whence)

    def _on_fallocate(self, req: int, ino: int, mode: int, off: int, length: int, fi: Any) -> None:
        self._spawn(req, self._fallocate, ino, fi.contents.fh, mode, off, length)

    def _on_readdirplus(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        """READDIRPLUS without an OPENDIR before it (its handle is 0): pyfuse3 hands its
        handler only the handle, so the handle becomes the inode."""
        try:
            fi.contents.fh = ino
            self.readdir_pids[ino] = self._lib.fuse_req_ctx(req).contents.pid
        except BaseException:  # noqa: BLE001 - pyfuse3 answers the request in any case
            log.exception("readdirplus: the inode could not be passed on")
        self._readdirplus(req, ino, size, off, fi)

    def _on_statfs(self, req: int, ino: int) -> None:
        try:
            st = Statvfs(**self._statfs(ino))
        except BaseException:  # noqa: BLE001 - a reply is owed whatever happened
            log.exception("statfs failed")
            self._reply_err("statfs", req, errno.EIO)
            return
        self._check("statfs", self._lib.fuse_reply_statfs(req, ctypes.byref(st)))

    @staticmethod
    def _check(what: str, ret: int) -> None:
        if ret < 0:  # the kernel refused the reply (see cowfs.fuse.replies)
            fuse_replies.failed(what, -ret)

    def _reply_err(self, what: str, req: int, err: int) -> None:
        self._check(what, self._lib.fuse_reply_err(req, err))

    def _spawn(self, req: int, handler: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            if self.nursery is None:
                raise RuntimeError("no nursery to serve the request in")
            self.nursery.start_soon(self._serve, req, handler, args)
        except BaseException:  # noqa: BLE001
            log.exception("%s could not be started", handler.__name__)
            self._reply_err(handler.__name__, req, errno.EIO)

    async def _serve(self, req: int, handler: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        err = errno.EIO
        name = handler.__name__
        try:
            result = await handler(*args)
        except pyfuse3.FUSEError as exc:
            err = exc.errno
        except trio.Cancelled:
            self._reply_err(name, req, errno.EINTR)
            raise
        except Exception:
            log.exception("%s failed", name)
        else:
            if handler is self._lseek:
                self._check(name, self._lib.fuse_reply_lseek(req, result))
            else:
                self._reply_err(name, req, 0)
            return
        self._reply_err(name, req, err)
