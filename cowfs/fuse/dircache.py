"""Directory listings cached by the kernel (FOPEN_CACHE_DIR), which pyfuse3 does not expose.

Without it every `opendir` + `getdents` of a directory is a READDIRPLUS round trip through
the daemon, even when nothing changed: `rm -rf` re-reads every listing `grep -r` just read
(fuse-overlayfs, the C baseline, sets the flag).  With it the kernel keeps a directory's
listing in the directory's page cache and serves later listings itself; it drops the cache
when it changes the directory itself, when a listing starts and the directory's mtime or
change counter differs from when it was cached, and when the daemon invalidates the
directory's pages (`invalidate_inode(..., attr_only=False)`), which cowfs does for the
changes it makes behind the kernel's back (a clone into a directory, a rollback's root).

pyfuse3 (3.3-3.5) replies to OPENDIR with the `fuse_file_info` of its request container and
sets only `fh`.  Its C handler looks the coroutine `fuse_opendir_async` up in the module's
globals at every request, so a wrapper installed there can set the two flag bits in the
container's `fi` before pyfuse3's own coroutine replies.  The container is a Cython object
whose layout is fixed by pyfuse3's source and libfuse's header; `install()` checks that
layout against the object's real size and changes nothing when they disagree.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Awaitable, Callable

import pyfuse3

log = logging.getLogger(__name__)


class _FileInfo(ctypes.Structure):
    """libfuse 3.x `struct fuse_file_info` (fuse_common.h)."""

    _fields_ = [
        ("flags", ctypes.c_int),
        ("writepage", ctypes.c_uint, 1),
        ("direct_io", ctypes.c_uint, 1),
        ("keep_cache", ctypes.c_uint, 1),
        ("flush", ctypes.c_uint, 1),
        ("nonseekable", ctypes.c_uint, 1),
        ("flock_release", ctypes.c_uint, 1),
        ("cache_readdir", ctypes.c_uint, 1),
        ("noflush", ctypes.c_uint, 1),
        ("padding", ctypes.c_uint, 24),
        ("padding2", ctypes.c_uint, 32),
        ("fh", ctypes.c_uint64),
        ("lock_owner", ctypes.c_uint64),
        ("poll_events", ctypes.c_uint32),
    ]


class _Container(ctypes.Structure):
    """pyfuse3's `_Container` object (handlers.pxi) after its PyObject header."""

    _fields_ = [
        ("ob_refcnt", ctypes.c_ssize_t),
        ("ob_type", ctypes.c_void_p),
        ("rdev", ctypes.c_uint64),
        ("fi", _FileInfo),
        ("ino", ctypes.c_uint64),
        ("parent", ctypes.c_uint64),
        ("req", ctypes.c_void_p),
        ("flags", ctypes.c_int),
        ("mode", ctypes.c_uint32),
        ("off", ctypes.c_int64),
        ("size", ctypes.c_size_t),
        ("stat", ctypes.c_byte * 144),  # struct stat on x86-64 and aarch64
        ("fh", ctypes.c_uint64),
    ]


def layout_matches() -> bool:
    """Whether pyfuse3's container has the size this module's mirror of it has."""
    cls = getattr(pyfuse3, "_Container", None)
    return (cls is not None and callable(getattr(pyfuse3, "fuse_opendir_async", None))
            and ctypes.sizeof(ctypes.c_void_p) == 8 and cls.__basicsize__ == ctypes.sizeof(_Container))


def install(cacheable: Callable[[int], bool]) -> bool:
    """Once per process (the daemon's): reply to OPENDIR of every inode for which
    cacheable(inode) holds with FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE.  Returns False (and
    changes nothing) if pyfuse3's layout is not the one known here."""
    if not layout_matches():
        log.warning("pyfuse3 %s: unknown request layout; directory listings are not cached by the kernel",
                    getattr(pyfuse3, "__version__", "?"))
        return False
    original: Callable[[Any], Awaitable[None]] = pyfuse3.fuse_opendir_async

    async def fuse_opendir_async(c: Any) -> None:
        fields = _Container.from_address(id(c))
        if cacheable(fields.ino):
            fields.fi.cache_readdir = 1
            fields.fi.keep_cache = 1
        await original(c)

    pyfuse3.fuse_opendir_async = fuse_opendir_async  # type: ignore[attr-defined]
    return True
