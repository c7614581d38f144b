"""Packed inode records.

One record per (inode, layer) holds all attributes plus the root of the file's chunk tree
(or a symlink's target).  An empty value is a tombstone: the inode was deleted in that layer.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from cowfs.chunks.tree import Root

_FMT = struct.Struct("<IIIIQQqqqB")  # mode uid gid nlink rdev size atime mtime ctime depth
NO_ROOT = 0xFF


@dataclass(slots=True)
class Attrs:
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    root: Root | None = None
    target: bytes = b""  # symlink target

    def pack(self) -> bytes:
        depth = NO_ROOT if self.root is None else self.root.depth
        head = _FMT.pack(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size,
                         self.atime_ns, self.mtime_ns, self.ctime_ns, depth)
        if self.root is not None:
            return head + self.root.hash
        return head + self.target

    @classmethod
    def unpack(cls, value: bytes) -> "Attrs":
        mode, uid, gid, nlink, rdev, size, at, mt, ct, depth = _FMT.unpack_from(value)
        rest = value[_FMT.size :]
        if depth != NO_ROOT:
            return cls(mode, uid, gid, nlink, rdev, size, at, mt, ct, Root(depth, rest[:32]))
        return cls(mode, uid, gid, nlink, rdev, size, at, mt, ct, None, rest)

    def copy(self) -> "Attrs":
        return Attrs(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size,
                     self.atime_ns, self.mtime_ns, self.ctime_ns, self.root, self.target)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


TOMBSTONE = b""
