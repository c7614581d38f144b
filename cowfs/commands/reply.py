"""Replies that may be long (`list` of a million snapshots, `diff` of a million paths), made
as the reader reads them.

A reply is one JSON object on one line, as always; a long list in it is a `Rows` (its items
made on demand from compact data), and `pieces` encodes the object a few hundred items at a
time, so neither the control file nor the admin socket ever holds the whole text: a read
takes what it asks for from the next pieces (cowfs.fuse.controlfs.Session), the socket sends
piece by piece.  The text is exactly `json.dumps(obj, ensure_ascii=True)` of the same object
with its lists made whole (`plain`), so any JSON reader reads it; cowfs.commands.stream reads
it incrementally.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

PIECE_ITEMS = 256  # items encoded at a time


class Rows:
    """A reply's long list: `count` items, made one at a time by `make` from `source` (so the
    reply holds compact data, never a million dicts at once)."""

    __slots__ = ("source", "make", "count")

    def __init__(self, source: Iterable[Any], make: Callable[[Any], Any], count: int) -> None:
        self.source = source
        self.make = make
        self.count = count

    def __iter__(self) -> Iterator[Any]:
        for item in self.source:
            yield self.make(item)

    def __len__(self) -> int:
        return self.count


def plain(obj: Any) -> Any:
    """obj with every Rows made a list (for replies read in this process: offline, tests)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, Rows):
        return list(obj)
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True)


def pieces(obj: dict[str, Any]) -> Iterator[bytes]:
    """The reply's line (`json.dumps(plain(obj), ensure_ascii=True) + "\\n"`), in pieces:
    each Rows a few hundred items at a time."""
    if not any(isinstance(v, Rows) for v in obj.values()):
        yield (_dumps(obj) + "\n").encode()
        return
    out = ["{"]
    for i, (key, value) in enumerate(obj.items()):
        out.append(("" if i == 0 else ", ") + _dumps(key) + ": ")
        if not isinstance(value, Rows):
            out.append(_dumps(value))
            continue
        out.append("[")
        n = 0
        for item in value:
            out.append(("" if n == 0 else ", ") + _dumps(item))
            n += 1
            if n % PIECE_ITEMS == 0:
                yield "".join(out).encode()
                out = []
        out.append("]")
    out.append("}\n")
    yield "".join(out).encode()


class Reader:
    """A reply read by offset: the pieces made as far as reads reach, each dropped once read
    past (reads of a control-file session only go forward, or restart at 0)."""

    def __init__(self, obj: dict[str, Any] | bytes) -> None:
        self._obj = obj
        self._restart()

    def _restart(self) -> None:
        obj = self._obj
        self._pieces: Iterator[bytes] = iter([obj]) if isinstance(obj, bytes) else pieces(obj)
        self._buf = b""
        self._start = 0  # offset of _buf's first byte in the reply

    def read(self, off: int, size: int) -> bytes:
        if off < self._start:
            self._restart()
        while self._start + len(self._buf) < off + size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            if off >= self._start + len(self._buf):  # nothing buffered is wanted any more
                self._start += len(self._buf)
                self._buf = piece
            else:
                self._buf += piece
        lo = off - self._start
        data = self._buf[lo:lo + size]
        # what is before this read is never read again (unless from 0, which remakes it)
        self._buf = self._buf[lo:]
        self._start = off
        return data


class _Text:
    """The reply's text as it arrives (ASCII: replies are written with ensure_ascii)."""

    WS = " \t\r\n"

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read
        self.s = ""
        self.i = 0
        self.eof = False
        self.dec = json.JSONDecoder()

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.read(1 << 16)
        if not data:
            self.eof = True
            return False
        self.s = self.s[self.i:] + data.decode("ascii")
        self.i = 0
        return True

    def peek(self) -> str:
        while True:
            while self.i < len(self.s) and self.s[self.i] in self.WS:
                self.i += 1
            if self.i < len(self.s):
                return self.s[self.i]
            if not self.more():
                raise ValueError("the reply ends early")

    def take(self, ch: str) -> None:
        if self.peek() != ch:
            raise ValueError(f"expected {ch!r} at {self.s[self.i:self.i + 40]!r}")
        self.i += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                v, end = self.dec.raw_decode(self.s, self.i)
            except ValueError:
                if self.more():
                    continue
                raise
            if end == len(self.s) and self.more():  # a number may go on in the next read
                continue
            self.i = end
            return v


def read_streamed(read: Callable[[int], bytes], item: Callable[[str, Any], None]) -> dict[str, Any]:
    """Read one reply object from read(n) (b"" at its end) as it arrives: item(key, value) for
    each item of a list at its top level, as soon as it is read; returns the other keys, each
    list as its number of items.  Memory: one item at a time, whatever the reply's length."""
    t = _Text(read)
    t.take("{")
    out: dict[str, Any] = {}
    if t.peek() == "}":
        t.i += 1
        return out
    while True:
        key = t.value()
        t.take(":")
        if t.peek() == "[":
            t.i += 1
            n = 0
            if t.peek() == "]":
                t.i += 1
            else:
                while True:
                    item(key, t.value())
                    n += 1
                    c = t.peek()
                    t.i += 1
                    if c == "]":
                        break
                    if c != ",":
                        raise ValueError(f"expected ',' or ']' in {key!r}")
            out[key] = n
        else:
            out[key] = t.value()
        c = t.peek()
        t.i += 1
        if c == "}":
            return out
        if c != ",":
            raise ValueError("expected ',' or '}'")
