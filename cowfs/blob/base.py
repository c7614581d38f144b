"""The blob interface: immutable, write-once objects under caller-chosen (typically
content-addressed) names, with only what object storage offers.

put (write-once: the same bytes again is a no-op, other bytes are a conflict), ranged get,
delete, ordered paged listing, size.  No append, no rewrite in place, no hole punching, no
rename of a visible object: whatever cowfs keeps in a BlobStore can move to S3 unchanged.
An object is visible whole or not at all: a reader or a crash never sees part of one.

Backends: cowfs.blob.memory (tests), cowfs.blob.local (a directory on the local disk),
cowfs.blob.s3 (a bucket and prefix on S3-compatible object storage).
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Iterator, NamedTuple, Sequence

# A name is '/'-separated segments of [A-Za-z0-9._=-], none empty or starting with '.':
# the same string is a valid S3 key and a safe relative path ('.'-prefixed files are the
# local backend's temporaries, invisible as objects).
_SEGMENT = r"[A-Za-z0-9_=-][A-Za-z0-9._=-]*"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
MAX_NAME = 512


class BlobError(Exception):
    """A blob operation failed for a reason the message gives."""


class BlobNotFound(BlobError):
    """No object of that name."""


class BlobConflict(BlobError):
    """A put named an object that exists with other content (objects are write-once)."""


class BlobEntry(NamedTuple):
    name: str
    size: int


def check_name(name: str) -> str:
    """name, if it is a valid object name; else ValueError saying what is wrong."""
    if not isinstance(name, str):
        raise TypeError(f"a blob name is a str, not {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise ValueError(f"blob name of {len(name)} characters (at most {MAX_NAME})")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"bad blob name {name!r}: '/'-separated segments of letters, digits and ._=- "
            "(not empty, not starting with '.')")
    return name


def check_range(offset: int, length: int | None) -> None:
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"bad range: offset {offset}, length {length}")


class BlobStore(ABC):
    """Write-once named objects.  Methods are blocking (call them in a thread from trio) and
    safe to call from several threads at once."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store data under name, atomically: visible whole once put returns, never in part.
        Putting the same bytes again is a no-op (so an interrupted upload can simply be
        redone); other bytes under an existing name raise BlobConflict and change nothing."""

    def put_parts(self, name: str, parts: Sequence[bytes | memoryview]) -> None:
        """put(name, the parts back to back): the same write-once object, for callers that
        hold their data in pieces (a backend may write them without joining them first)."""
        self.put(name, b"".join(parts))

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes [offset, offset + length) of the object (to its end when length is
        None); fewer when the object ends first, b"" from its end on.  BlobNotFound if absent."""

    @abstractmethod
    def size(self, name: str) -> int:
        """The object's length in bytes; BlobNotFound if absent."""

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except BlobNotFound:
            return False
        return True

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; no error if it is absent (deletes may be repeated)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobEntry]:
        """Every object whose name begins with prefix, once each, fetched page by page as the
        iteration goes (never one unbounded reply).  The order is the backend's: by name in
        memory, on the local disk and on AWS S3, but SeaweedFS lists directory by directory
        ("a/b" before "a-b"), so callers must not depend on it (and a listing cannot resume
        "after a name": a caller that needs that keeps the iterator).  Objects put or
        deleted during the iteration may or may not show."""

    def close(self) -> None:
        """Release connections or handles; the store is not used afterwards."""
