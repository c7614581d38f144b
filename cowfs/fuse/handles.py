"""The FUSE handles the kernel holds: open files (with their read pattern), open directories
and control-file sessions, by handle number, and which handles may write.

Which node is open is told to the core (`Filesystem.opened` / `released`), which owns the
node lifecycle; these tables only map handle numbers to what they stand for.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from cowfs.cache.readahead import Readahead
from cowfs.core.node import Node

if TYPE_CHECKING:
    from cowfs.fuse.controlfs import Session
    from cowfs.fuse.listings import Listing


class DirHandle:
    __slots__ = ("node", "control", "entries", "warming")

    def __init__(self, node: Node | None, control: int = 0, warming: bool = False) -> None:
        self.node = node
        self.control = control  # a control directory's inode number instead of a node
        self.entries: Listing[tuple[bytes, int]] | None = None  # taken when reading starts
        self.warming = warming  # opened by the warming helper (counted in Warmer.requests)


class Handles:
    def __init__(self) -> None:
        self.files: dict[int, Node] = {}
        self.streams: dict[int, Readahead] = {}  # per open file: its read pattern
        self.dirs: dict[int, DirHandle] = {}
        self.sessions: dict[int, "Session"] = {}
        self._write_fhs: set[int] = set()
        self._cached_fhs: set[int] = set()  # write handles through the page cache (not direct_io)
        self.writers: Counter[Node] = Counter()  # open handles that may write, per node
        self._next_fh = 1

    def new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open_file(self, node: Node, writing: bool, cached: bool) -> int:
        """A handle of node; cached: a writer through the kernel's page cache (not direct_io)."""
        fh = self.new_fh()
        self.files[fh] = node
        self.streams[fh] = Readahead()
        if writing:
            self.writers[node] += 1
            self._write_fhs.add(fh)
            if cached:
                self._cached_fhs.add(fh)
        return fh

    def close_file(self, fh: int) -> tuple[Node, bool, bool]:
        """(node, whether the handle could write, whether through the page cache) of a handle
        the kernel released."""
        node = self.files.pop(fh)
        del self.streams[fh]
        if fh not in self._write_fhs:
            return node, False, False
        self._write_fhs.discard(fh)
        self.writers[node] -= 1
        if self.writers[node] <= 0:
            del self.writers[node]
        cached = fh in self._cached_fhs
        self._cached_fhs.discard(fh)
        return node, True, cached

    def open_dir(self, node: Node | None, control: int = 0, warming: bool = False) -> int:
        fh = self.new_fh()
        self.dirs[fh] = DirHandle(node, control, warming)
        return fh
