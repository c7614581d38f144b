"""How a `cowfs` command fails: one message on stderr and an exit status, never a traceback
without `cowfs --debug` (or COWFS_DEBUG=1).

A command (or what it calls) raises CliError with the message for the user; the group
(cowfs.cli.main.CowfsGroup) prints it and exits with its code.  Anything else that escapes
a command is described by describe() in one line.
"""
from __future__ import annotations

import errno
import os

EXIT_CODES = """\b
Exit status: 0 success; 1 failure (the message on stderr says why); 2 bad usage.
fsck has its own codes (cowfs help exit-codes); run passes its command's on."""


class CliError(Exception):
    """A command failed; str() is the one message for the user, code the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def describe(exc: BaseException) -> str:
    """One line for an exception nothing else caught."""
    from cowfs import api
    from cowfs.errors import MountError, StoreError
    from cowfs.daemon.mounts import user_name

    if isinstance(exc, (CliError, MountError, StoreError, api.CowfsError)):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            text += f" (as {user_name(os.geteuid())})"
        return text
    return f"internal error: {type(exc).__name__}: {exc}"
