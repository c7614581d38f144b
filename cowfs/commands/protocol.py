"""The control file's language: its commands (one table for the daemon, `help` and the CLI's
help text) and how a command line carries words.

A line is words as a POSIX shell splits them (blanks between words; '...', "..." and
backslash quoting), plus bash's $'...' so that any byte can travel on one line: `\\n`, `\\t`,
`\\r`, `\\\\`, `\\'`, `\\"`, `\\xHH` and `\\OOO` (octal) inside $'...' stand for their bytes.
`quote` writes words so that `split` gives them back exactly, newlines and bytes that are
not UTF-8 included (those travel as lone surrogates U+DC80..U+DCFF, Python's
"surrogateescape", and so in JSON as "\\udcXX").
"""
from __future__ import annotations

import re
from dataclasses import dataclass


# The control namespace at the root of every branch's mount (served by cowfs.fuse): command
# paths may go through `.cowfs/snapshots/NAME/` into a snapshot.
CONTROL_DIR = b".cowfs"
SNAPSHOTS_DIR = b"snapshots"


@dataclass(frozen=True)
class Command:
    usage: str
    least: int
    most: int
    help: str


COMMANDS: dict[str, Command] = {
    "snapshot": Command("snapshot NAME", 1, 1, "take the read-only snapshot NAME of this branch (O(1))"),
    "branch": Command("branch NAME [FROM]", 1, 2, "make the writable branch NAME from this branch's current "
                      "state, or from its snapshot FROM"),
    "branch-home": Command("branch-home NAME [FROM]", 1, 2, "make the writable branch NAME as `branch` does, with "
                           "a home database of its own: mounted, it is served by a daemon of its own"),
    "rollback": Command("rollback SNAPSHOT", 1, 1, "return this branch exactly to snapshot SNAPSHOT"),
    "clone": Command("clone SRC DST", 2, 2, "copy SRC (a file or a whole tree) to DST in O(1), sharing data; paths are "
                     "relative to the mount root, and SRC may be inside .cowfs/snapshots/NAME/"),
    "delete": Command("delete NAME", 1, 1, "delete snapshot NAME, or branch NAME if it is not mounted"),
    "list": Command("list", 0, 0, "the snapshots and branches this mount may see"),
    "diff": Command("diff A [B]", 1, 2, "paths added, removed, modified or renamed from A to B (default: this "
                    "branch as it is now)"),
    "coldstart": Command("coldstart SNAPSHOT", 1, 1, "the files this branch's learned cold start reads (the "
                         "learned model's files in the directories its mounts touch first), in first-read order, "
                         "as paths in snapshot SNAPSHOT with the chunk numbers read, and the whole learned prefetch model as paths "
                         "(what a push sends with it)"),
    "help": Command("help", 0, 0, "these commands"),
}


def help_reply() -> dict[str, object]:
    """The reply to `help`: every command with its usage and what it does."""
    return {"commands": [{"name": name, "usage": c.usage, "help": c.help} for name, c in COMMANDS.items()]}


_SAFE = re.compile(r"[A-Za-z0-9@%+=:,./_-]+")
_BLANKS = " \t\r"
_NAMED = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11, "e": 27, "\\": 92, "'": 39, '"': 34, "?": 63}


def quote(word: str) -> str:
    """One word for a control line: as is when plain, in '...' when printable ASCII, else in
    $'...' with escapes (a line then stays one line of ASCII)."""
    if _SAFE.fullmatch(word):
        return word
    raw = word.encode("utf-8", "surrogateescape")
    if all(32 <= b < 127 for b in raw):
        return "'" + word.replace("'", "'\\''") + "'"
    out = []
    for b in raw:
        if b in (39, 92):
            out.append("\\" + chr(b))
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "$'" + "".join(out) + "'"


def join(words: list[str] | tuple[str, ...]) -> str:
    return " ".join(quote(w) for w in words)


def _ansi_c(text: str, i: int) -> tuple[str, int]:
    """The word part of $'...' starting after its opening quote; (text, index after it)."""
    buf = bytearray()
    n = len(text)
    while True:
        if i >= n:
            raise ValueError("no closing quotation")
        c = text[i]
        if c == "'":
            return buf.decode("utf-8", "surrogateescape"), i + 1
        if c != "\\":
            buf += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError("no closing quotation")
        e = text[i + 1]
        if e in _NAMED:
            buf.append(_NAMED[e])
            i += 2
        elif e == "x":
            m = re.match(r"[0-9A-Fa-f]{1,2}", text[i + 2:i + 4])
            if not m:
                raise ValueError("\\x needs one or two hex digits")
            buf.append(int(m.group(0), 16))
            i += 2 + len(m.group(0))
        elif e in "01234567":
            m = re.match(r"[0-7]{1,3}", text[i + 1:i + 4])
            assert m is not None
            buf.append(int(m.group(0), 8) & 0xFF)
            i += 1 + len(m.group(0))
        else:  # as bash: an unknown escape stays as it is
            buf += ("\\" + e).encode("utf-8", "surrogateescape")
            i += 2


def split(text: str) -> list[str]:
    """The words of a control line (ValueError: unbalanced quotes, a trailing backslash)."""
    words: list[str] = []
    cur: str | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _BLANKS:
            if cur is not None:
                words.append(cur)
                cur = None
            i += 1
            continue
        cur = cur or ""
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("no escaped character after the last backslash")
            cur += text[i + 1]
            i += 2
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ValueError("no closing quotation")
            cur += text[i + 1:j]
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("no closing quotation")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '$`"\\':
                    cur += text[i + 1]
                    i += 2
                    continue
                cur += c
                i += 1
        elif c == "$" and text[i + 1:i + 2] == "'":
            part, i = _ansi_c(text, i + 2)
            cur += part
        else:
            cur += c
            i += 1
    if cur is not None:
        words.append(cur)
    return words
