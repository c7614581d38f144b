"""How the CLI writes figures and names for people: one style for every command.

Human output uses binary units in tables (`1.5 MiB`) and quotes file names as git does;
`--json` output has raw numbers and names as they are (see cowfs.protocol for how names
that are not UTF-8 travel in JSON).
"""
from __future__ import annotations

import os
import time

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(n: float | None) -> str:
    """Bytes in binary units: "0 B", "999 B", "1.5 KiB", "12.0 GiB"."""
    if n is None:
        return "-"
    v = float(n)
    for unit in UNITS:
        if abs(v) < 1024 or unit == UNITS[-1]:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


def count(n: int | None) -> str:
    """A count with thousands separators: 12,345."""
    return "-" if n is None else f"{n:,}"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(t: float, same_day: bool = False) -> str:
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(t))


_ESCAPES = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r", 34: '"', 92: "\\"}


def quote_path(name: str) -> str:
    """A path as `git` prints it (core.quotePath): as is when it is plain printable ASCII,
    else in double quotes with C escapes, and bytes >= 0x80 (UTF-8 or not) as octal."""
    raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
    if all(32 <= b < 127 and b not in (34, 92) for b in raw):
        return raw.decode("ascii")
    out = []
    for b in raw:
        if b in _ESCAPES:
            out.append("\\" + _ESCAPES[b])
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Columns padded to their widest cell; columns in `right` aligned right; no trailing blanks."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    for r in [headers] + rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return lines
