"""The store-wide space accounting, kept exact by the commits that change it (chunks.refs)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from cowfs.chunks import codec


@dataclass
class Space:
    """Store-wide figures, kept exact by the commits that change them.

    Identities: logical = unique + dedup saved; unique = chunk_bytes + compression saved +
    delta saved + remote_bytes, with compression saved = unique - remote_bytes - plain_bytes
    and delta saved = plain_bytes - chunk_bytes (plain_bytes: what the chunks would take
    encoded whole; remote_bytes: the raw content of F objects, a lazy mount's chunks still on
    its remote, which take no encoding here and so save nothing by compression).
    """

    chunks: int = 0
    delta_chunks: int = 0
    unique_bytes: int = 0  # raw content of distinct chunks
    plain_bytes: int = 0  # their whole (R/Z) encodings
    chunk_bytes: int = 0  # their stored encodings (deltas included)
    logical_bytes: int = 0  # raw content times references from files
    nodes: int = 0
    node_bytes: int = 0
    queue: int = 0  # entries in CF_PENDING
    # F objects: chunks of a lazy mount still on its remote (store format 8); at 0 its reads
    # skip looking for them (ObjectStore.remote_left)
    remote_chunks: int = 0
    remote_bytes: int = 0  # their raw content (store format 9)

    def pack(self) -> bytes:
        # Every commit that changes a count packs this: struct over the instance dict, not
        # dataclasses.astuple (a deep copy, ~10% of the daemon's busy time in rm -rf).
        return _SPACE.pack(*self.__dict__.values())

    def copy(self) -> "Space":
        # Every commit copies the figures: copy.copy (the pickle protocol) costs five times as much.
        return Space(*self.__dict__.values())

    @classmethod
    def unpack(cls, raw: bytes) -> "Space":
        return cls(*(int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)))

    def add_object(self, value: bytes, sign: int) -> None:
        """Count (sign 1) or uncount (sign -1) one stored object."""
        if value[0] == codec.KIND_NODE:
            self.nodes += sign
            self.node_bytes += sign * len(value)
            return
        raw, plain = codec.chunk_sizes(value)
        self.chunks += sign
        if value[0] == codec.KIND_REMOTE:
            self.remote_chunks += sign
            self.remote_bytes += sign * raw
        self.delta_chunks += sign * (value[0] == codec.KIND_DELTA)
        self.unique_bytes += sign * raw
        self.plain_bytes += sign * plain
        self.chunk_bytes += sign * codec.stored_len(value)

    def figures(self) -> dict[str, int]:
        return {
            "logical_bytes": self.logical_bytes,
            "unique_bytes": self.unique_bytes,
            "chunk_bytes": self.chunk_bytes,
            "dedup_saved_bytes": self.logical_bytes - self.unique_bytes,
            "delta_saved_bytes": self.plain_bytes - self.chunk_bytes,
            "compression_saved_bytes": self.unique_bytes - self.remote_bytes - self.plain_bytes,
            "chunks": self.chunks,
            "delta_chunks": self.delta_chunks,
            "whole_chunks": self.chunks - self.delta_chunks,
            "tree_nodes": self.nodes,
            "tree_node_bytes": self.node_bytes,
            "background_queue": self.queue,
            "remote_chunks": self.remote_chunks,
            "remote_bytes": self.remote_bytes,
        }


_SPACE = struct.Struct("<" + "q" * len(fields(Space)))

