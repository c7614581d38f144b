"""Small-write log records (cowfs.core.smallwrites) in the `meta` family.

A key is `wlog/` then a sequence number (8 bytes, big-endian: keys sort in the order the
records were written); the value is a `Record`: the branch head layer and inode number of a
file, its size, mode, owner and times, then byte ranges (offset, length, the bytes).  A
record owns no reference: the tree it applies to is the one the inode's record names.
Only this module knows the layout.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cowfs.kv.base import KV, Batch
from cowfs.meta.layers import CF_META

PREFIX = b"wlog/"
_HEAD = struct.Struct("<QQQIIIqqqI")  # layer, ino, size, mode, uid, gid, atime, mtime, ctime, ranges
_RANGE = struct.Struct("<QI")  # file offset, length (the bytes follow)


class DamagedRecord(ValueError):
    """A log record that does not parse."""


@dataclass
class Record:
    layer: int
    ino: int
    size: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    ranges: list[tuple[int, bytes | memoryview]] = field(default_factory=list)

    def pack(self) -> bytes:
        parts = [_HEAD.pack(self.layer, self.ino, self.size, self.mode, self.uid, self.gid,
                            self.atime_ns, self.mtime_ns, self.ctime_ns, len(self.ranges))]
        for off, data in self.ranges:
            parts.append(_RANGE.pack(off, len(data)))
            parts.append(data)  # type: ignore[arg-type]
        return b"".join(parts)

    @classmethod
    def unpack(cls, value: bytes) -> "Record":
        try:
            head = _HEAD.unpack_from(value)
            mv = memoryview(value)
            pos = _HEAD.size
            ranges: list[tuple[int, bytes | memoryview]] = []
            for _ in range(head[-1]):
                off, n = _RANGE.unpack_from(value, pos)
                pos += _RANGE.size
                if pos + n > len(value):
                    raise DamagedRecord("a range runs past the record's end")
                ranges.append((off, mv[pos : pos + n]))
                pos += n
        except struct.error as exc:
            raise DamagedRecord(str(exc)) from exc
        if pos != len(value):
            raise DamagedRecord("bytes after the last range")
        return cls(*head[:-1], ranges)  # type: ignore[arg-type]


def _key(seq: int) -> bytes:
    return PREFIX + seq.to_bytes(8, "big")


def put(batch: Batch, seq: int, record: Record) -> None:
    batch.put(CF_META, _key(seq), record.pack())


def delete(batch: Batch, seq: int) -> None:
    batch.delete(CF_META, _key(seq))


def every(kv: KV) -> list[tuple[int, bytes]]:
    """(sequence number, raw record) of every record, in order (parse with Record.unpack)."""
    return [(int.from_bytes(k[len(PREFIX):], "big"), v) for k, v in kv.scan(CF_META, PREFIX, PREFIX)]
