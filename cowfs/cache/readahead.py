"""Per-handle access-pattern detection: which chunks a sequential or strided reader wants next.

The kernel's own readahead already turns sequential reads into 128 KiB-1 MiB requests; this
runs one level below it, so the chunks behind those requests are loaded and decoded in worker
threads while the kernel is still consuming earlier ones.  The window, counted in reads of the
current size, doubles while the pattern holds (1 to MAX_WINDOW reads, at most MAX_AHEAD bytes)
and collapses on the first read that breaks it.  It must reach past the next request: a 1 MiB
reader overtakes a fetch of just the next 2 chunks at once.
"""
from __future__ import annotations

from cowfs.chunks.tree import CHUNK

MAX_WINDOW = 16
MAX_AHEAD = 8 << 20  # bytes ahead of one reader


class Readahead:
    __slots__ = ("last_off", "last_end", "stride", "window", "ahead")

    def __init__(self) -> None:
        self.last_off = -1
        self.last_end = -1
        self.stride = 0
        self.window = 0
        self.ahead = -1  # highest chunk index already asked for (sequential mode)

    def observe(self, off: int, size: int, file_size: int) -> list[int]:
        """Record a read; return the chunk indices worth fetching now (maybe none)."""
        sequential = off == self.last_end
        stride = off - self.last_off
        strided = not sequential and stride > 0 and stride == self.stride
        if sequential or strided:
            self.window = min(max(self.window * 2, 1), MAX_WINDOW)
        else:
            self.window = 0
            self.ahead = -1
        self.stride = stride
        self.last_off, self.last_end = off, off + size
        if not self.window:
            return []
        n_chunks = (file_size + CHUNK - 1) // CHUNK
        step = max(size, CHUNK)
        if sequential:
            ahead = min(self.window * step, MAX_AHEAD)
            first = max((off + size) // CHUNK, self.ahead + 1)
            last = min((off + size + ahead - 1) // CHUNK, n_chunks - 1)
            if first > last:
                return []
            self.ahead = last
            return list(range(first, last + 1))
        want: list[int] = []
        for k in range(1, min(self.window, MAX_AHEAD // step) + 1):
            i = (off + k * stride) // CHUNK
            if i >= n_chunks:
                break
            if not want or want[-1] != i:
                want.append(i)
        return want
