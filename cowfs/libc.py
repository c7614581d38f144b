"""The process's own C library, opened once.

`ctypes.util.find_library("c")` runs `ldconfig -p` (a subprocess, ~10 ms); `CDLL(None)` is
the libc already loaded into the process, which is what every caller wants: system calls
Python's os module lacks (syncfs, unshare, mount, prctl, mallopt).  Opened with errno saved,
so a caller can read `ctypes.get_errno()` after a failed call.
"""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
