"""The small key-value interface the rest of cowfs is written against.

Everything above this module sees named column families of raw bytes, ordered iteration,
atomic multi-family batches and an explicit durability barrier.  A second backend (for
example a networked service for branch heads) implements the same class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator


class StoreLockedError(Exception):
    """The database is opened read-write by another process."""


class Batch:
    """An ordered list of puts and deletes that a backend applies atomically."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[str, bytes, bytes | None]] = []

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.ops.append((cf, key, value))

    def delete(self, cf: str, key: bytes) -> None:
        self.ops.append((cf, key, None))

    def __len__(self) -> int:
        return len(self.ops)


class KV(ABC):
    """Ordered byte-string maps ("column families") with atomic batches."""

    @abstractmethod
    def get(self, cf: str, key: bytes) -> bytes | None: ...

    @abstractmethod
    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) from the first key >= start while keys begin with prefix."""

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Apply the batch atomically; durable against process death, not yet power loss."""

    @abstractmethod
    def sync(self) -> None:
        """Return once every earlier write survives a power loss (blocking: call in a thread)."""

    @abstractmethod
    def unflushed_bytes(self) -> int:
        """Bytes accepted but not yet in the backend's final files (memtables)."""

    @abstractmethod
    def recover(self) -> None:
        """Resume writing after an I/O error (for example a full disk that has space again).
        May replace the backend's handles: no other thread may use this KV meanwhile."""

    @abstractmethod
    def compact(self) -> None:
        """Reclaim the space of deleted keys now (blocking: call in a thread)."""

    @abstractmethod
    def disk_usage(self) -> tuple[int, int]:
        """(bytes the backend occupies on disk without its write-ahead log, bytes of the log)."""

    @abstractmethod
    def close(self) -> None: ...
