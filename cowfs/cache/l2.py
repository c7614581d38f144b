"""The L2 entry layout: a chunk as independently decodable 4 KiB lz4 blocks.

A stored chunk is one 64 KiB zstd frame: serving a 4 KiB page from it costs a 70-90 µs
decode.  Re-encoded as 16 lz4 blocks, one page decodes in ~1 µs (lz4.block with a known
size), and the whole chunk in ~16 µs.  The price is ratio: on Python source lz4 blocks of
4 KiB reach ~1.85x where the stored zstd frame reaches ~3.5x, so L2 holds about half as
many chunks per byte as a cache of stored frames would; it still holds ~1.85x more than L1.
Pages that do not compress are kept raw (flagged by a zero-length-saving check).
"""
from __future__ import annotations

import lz4.block

PAGE = 4096


class Packed:
    """One chunk's pages: `blob` holds them back to back, `ends[i]` is where page i ends;
    a page whose encoded length equals its plain length is stored raw."""

    __slots__ = ("blob", "ends", "size")

    def __init__(self, blob: bytes, ends: tuple[int, ...], size: int) -> None:
        self.blob = blob
        self.ends = ends
        self.size = size

    def nbytes(self) -> int:
        return len(self.blob) + 8 * len(self.ends)

    def page(self, i: int) -> bytes:
        start = self.ends[i - 1] if i else 0
        frame = self.blob[start : self.ends[i]]
        plain = min(PAGE, self.size - i * PAGE)
        return frame if len(frame) == plain else lz4.block.decompress(frame, uncompressed_size=plain)

    def read(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the chunk, decoding only the pages they touch."""
        first, last = a // PAGE, (b - 1) // PAGE
        if first == last:
            base = first * PAGE
            return self.page(first)[a - base : b - base]
        data = b"".join(self.page(i) for i in range(first, last + 1))
        return data[a - first * PAGE : b - first * PAGE]

    def whole(self) -> bytes:
        return self.read(0, self.size) if self.size else b""


def pack(data: bytes) -> Packed:
    frames = []
    ends = []
    pos = 0
    for off in range(0, len(data), PAGE):
        page = data[off : off + PAGE]
        frame = lz4.block.compress(page, store_size=False)
        if len(frame) >= len(page):
            frame = page
        frames.append(frame)
        pos += len(frame)
        ends.append(pos)
    return Packed(b"".join(frames), tuple(ends), len(data))
