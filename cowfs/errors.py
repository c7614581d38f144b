"""Errors that cross layers: an errno for the kernel, a message for people."""
from __future__ import annotations

import errno as _errno


class FSError(Exception):
    """A filesystem operation failed with an errno (turned into a FUSE reply by the FUSE layer)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


class StoreError(Exception):
    """The store cannot be used: missing, not a store, wrong format, locked or damaged."""


class MountError(Exception):
    """The mount cannot be made or taken away; the message says why."""
