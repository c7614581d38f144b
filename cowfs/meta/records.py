"""Packed inode records.

One record per (inode, layer) holds all attributes plus the root of the file's chunk tree
(or a symlink's target).  An empty value is a tombstone: the inode was deleted in that layer.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from cowfs.chunks.tree import Root

# mode uid gid nlink rdev size atime mtime ctime depth parent name_len
_FMT = struct.Struct("<IIIIQQqqqBQH")
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
    # Where the inode was last linked (parent inode, name): exact for directories, one of
    # the names for hard-linked files.  Lets `diff` name paths without scanning the tree.
    parent: int = 0
    name: bytes = b""

    def pack(self) -> bytes:
        depth = NO_ROOT if self.root is None else self.root.depth
        head = _FMT.pack(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size,
                         self.atime_ns, self.mtime_ns, self.ctime_ns, depth, self.parent, len(self.name))
        root = self.root.hash if self.root is not None else b""
        return head + root + self.name + self.target

    @classmethod
    def unpack(cls, value: bytes) -> "Attrs":
        mode, uid, gid, nlink, rdev, size, at, mt, ct, depth, parent, nlen = _FMT.unpack_from(value)
        pos = _FMT.size
        root = None
        if depth != NO_ROOT:
            root = Root(depth, value[pos : pos + 32])
            pos += 32
        name = value[pos : pos + nlen]
        return cls(mode, uid, gid, nlink, rdev, size, at, mt, ct, root, value[pos + nlen :], parent, name)

    def copy(self) -> "Attrs":
        return Attrs(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size, self.atime_ns,
                     self.mtime_ns, self.ctime_ns, self.root, self.target, self.parent, self.name)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


TOMBSTONE = b""


def dirent(ino: int, mode: int) -> bytes:
    """A directory entry's value: the inode it names (8 bytes) and its file type (S_IFMT >> 12)."""
    return ino.to_bytes(8, "big") + bytes((stat.S_IFMT(mode) >> 12,))


def dirent_ino(value: bytes) -> int:
    """The inode a directory entry's value names."""
    return int.from_bytes(value[:8], "big")
