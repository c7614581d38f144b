"""The daemon's FUSE stack (trio, pyfuse3) imported without two look-ups those packages make
at import time and the daemon can answer more cheaply: part of every mount's start-up.

- pyfuse3 asks `importlib.metadata.version("pyfuse3")` for its `__version__`: that imports
  importlib.metadata (email, zipfile, csv, pathlib, ...) and scans sys.path for
  distributions, ~15 ms of CPU.  Here it is answered from the name of the package's
  `.dist-info` directory, the same version string.
- trio asks `ctypes.util.find_library("pthread")` (to name its worker threads), which runs
  `ldconfig -p` in a child process, ~5 ms.  With glibc, pthread_setname_np is in libc.so.6
  (and libpthread.so.0 forwards to it), so that is the answer.

Both stand in only while trio and pyfuse3 are first imported (a package that asks
importlib.metadata for anything else gets the real module); afterwards importlib.metadata
and find_library are the real ones for everyone.  The daemon's imports took 152 -> 124 ms of
CPU with this (median of 6, load ~10; docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes.util
import importlib
import os
import sys
import types

_METADATA = "importlib.metadata"


class _PackageNotFoundError(ModuleNotFoundError):
    """importlib.metadata.PackageNotFoundError's stand-in (the same base class)."""


def _version(name: str) -> str:
    """A distribution's version from its `NAME-VERSION.dist-info` directory on sys.path
    (NAME with `_` for `-`, as installers write it)."""
    prefix = f"{name.replace('-', '_')}-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            if n.startswith(prefix) and n.endswith(".dist-info"):
                return n[len(prefix):-len(".dist-info")]
    raise _PackageNotFoundError(name)


def _real(attr: str) -> object:
    """Any other name of importlib.metadata: from the real module, imported now (not for the
    import system's own questions, `__path__` and the like)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    sys.modules.pop(_METADATA, None)
    return getattr(importlib.import_module(_METADATA), attr)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def import_fuse_stack() -> None:
    """Import trio and pyfuse3 (once per process) with the stand-ins above in place."""
    if "pyfuse3" in sys.modules:
        return
    metadata = None
    if _METADATA not in sys.modules:
        metadata = types.ModuleType(_METADATA)
        metadata.version = _version  # type: ignore[attr-defined]
        metadata.PackageNotFoundError = _PackageNotFoundError  # type: ignore[attr-defined]
        metadata.__getattr__ = _real  # type: ignore[attr-defined]
        sys.modules[_METADATA] = metadata
    find_library = ctypes.util.find_library
    if _glibc():
        def find(name: str) -> str | None:
            return "libc.so.6" if name == "pthread" else find_library(name)
        ctypes.util.find_library = find
    try:
        import trio  # noqa: F401
        import pyfuse3  # noqa: F401
    finally:
        ctypes.util.find_library = find_library
        if metadata is not None and sys.modules.get(_METADATA) is metadata:
            del sys.modules[_METADATA]
