"""An in-memory BlobStore, for tests of the code above the blob interface."""
from __future__ import annotations

import bisect
import threading
from typing import Iterator

from cowfs.blob.base import (BlobConflict, BlobEntry, BlobNotFound, BlobStore, check_name,
                             check_range)


class MemoryBlobStore(BlobStore):
    """A dict of immutable bytes under a lock; listing walks a snapshot of the sorted names
    page by page, as the remote backends do."""

    PAGE = 1000

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        check_name(name)
        data = bytes(data)
        with self._lock:
            old = self._objects.get(name)
            if old is None:
                self._objects[name] = data
            elif old != data:
                raise BlobConflict(f"{name}: exists with other content ({len(old)} bytes, "
                                   f"put of {len(data)})")

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        check_range(offset, length)
        data = self._objects.get(name)
        if data is None:
            raise BlobNotFound(name)
        return data[offset:] if length is None else data[offset:offset + length]

    def size(self, name: str) -> int:
        check_name(name)
        data = self._objects.get(name)
        if data is None:
            raise BlobNotFound(name)
        return len(data)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[BlobEntry]:
        after: str | None = None
        while True:
            with self._lock:
                names = sorted(self._objects)
                i = (bisect.bisect_left(names, prefix) if after is None
                     else bisect.bisect_right(names, after))
                page = [(n, len(self._objects[n])) for n in names[i:i + self.PAGE]]
            for name, size in page:
                if not name.startswith(prefix):
                    return
                yield BlobEntry(name, size)
            if len(page) < self.PAGE:
                return
            after = page[-1][0]
