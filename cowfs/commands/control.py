"""The control-file protocol: one command line in, one JSON object out (a long list in it,
of `list` or `diff`, made as it is read: cowfs.commands.reply).

The commands and how words are quoted on a line are in cowfs.commands.protocol.  Names that are not
UTF-8 travel in JSON losslessly: each byte that does not decode becomes a lone surrogate
U+DC80..U+DCFF (Python's "surrogateescape"), which JSON writes as "\\udcXX".
"""
from __future__ import annotations

import errno
from typing import Any, Awaitable, Callable

from cowfs.commands import protocol
from cowfs.errors import FSError
from cowfs.commands.authz import Caller, Mounted
from cowfs.commands.branching import Branching
from cowfs.core.view import View

MAX_LINE = 4096
KNOWN = ", ".join(c.usage for c in protocol.COMMANDS.values())

RollbackHook = Callable[[View, list[bytes]], Awaitable[None]]


class Control:
    def __init__(self, branching: Branching, on_rollback: RollbackHook,
                 mounted: Callable[[], Mounted]) -> None:
        self.br = branching
        self.on_rollback = on_rollback
        self.mounted = mounted

    async def run_line(self, view: View, line: bytes, who: Caller) -> tuple[dict[str, Any], int]:
        """Run one command; return (JSON reply, errno or 0). Never raises for bad input."""
        try:
            result = await self._run(view, line, who)
            return {"ok": True, **result}, 0
        except FSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            return {"ok": False, "errno": name, "error": str(exc)}, exc.errno

    async def _run(self, view: View, line: bytes, who: Caller) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            raise FSError(errno.EINVAL, f"command line longer than {MAX_LINE} bytes")
        text = line.decode("utf-8", "surrogateescape")
        if "\0" in text:
            raise FSError(errno.EINVAL, "command line contains a NUL byte")
        try:
            words = protocol.split(text)
        except ValueError as exc:
            raise FSError(errno.EINVAL, f"cannot parse command line: {exc}") from None
        if not words:
            raise FSError(errno.EINVAL, f"empty command; known: {KNOWN}")
        verb, args = words[0], words[1:]
        cmd = protocol.COMMANDS.get(verb)
        if cmd is None:
            raise FSError(errno.EINVAL, f"unknown command {verb!r}; known: {KNOWN} (`help` describes them)")
        if not cmd.least <= len(args) <= cmd.most:
            raise FSError(errno.EINVAL, f"usage: {cmd.usage}")
        if verb == "help":
            return protocol.help_reply()
        br = self.br
        if verb == "snapshot":
            return await br.snapshot(view, args[0], who)
        if verb in ("branch", "branch-home"):
            return await br.branch(view, args[0], args[1] if len(args) > 1 else None, who, verb == "branch-home")
        if verb == "rollback":
            result, old_names = await br.rollback(view, args[0], who)
            await self.on_rollback(view, old_names)
            return result
        if verb == "clone":
            return await br.clone(view, args[0], args[1], who)
        if verb == "delete":
            return await br.delete(view, args[0], who, self.mounted)
        if verb == "list":
            return br.listing(view, self.mounted())
        if verb == "coldstart":
            return await br.cold_start(view, args[0])
        return await br.diff(view, args[0], args[1] if len(args) > 1 else None)
