"""Records of the catalog by name (branches, snapshots), read from the store and parsed
only as they are used: what lets a mount of a store with a long history skip reading it
(cowfs.meta.layers.Catalog)."""
from __future__ import annotations

import json
from collections.abc import ItemsView, MutableMapping, ValuesView
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar, cast

from cowfs.kv.base import KV

R = TypeVar("R")


class Records(MutableMapping[str, R], Generic[R]):
    """Branch or snapshot records by name, read from the store only when used, and each kept
    as its stored JSON until first used: opening a store with 100,000 snapshots reads none
    of them (their scan and parse were most of a mount's time at that size: ~0.07 s and
    ~0.5 s idle).  A lookup reads and parses one record (`kv.get`); a walk over all of them
    (iteration, len, values(), items(): listings, gc's leaves, fsck) scans the rest once
    and parses every one still unparsed in one json.loads of them all (~3x faster than one
    by one).  The records in memory are the truth (the store has them once the caller's
    batch commits): a record saved or removed here is never read back from the store over
    it.  Parsed records are the catalog's live objects, changed in place."""

    __slots__ = ("_make", "_scan", "_get", "_items", "_raw", "_gone", "_complete")

    def __init__(self, make: Callable[..., R], scan: Callable[[], Iterable[tuple[str, bytes]]],
                 get: Callable[[str], bytes | None]) -> None:
        self._make = make
        self._scan = scan  # every stored record: (name, bytes)
        self._get = get  # one stored record's bytes
        self._items: dict[str, R | bytes] = {}  # every record once complete, else those used
        self._raw = 0  # how many of _items are still bytes
        self._gone: set[str] = set()  # removed here before complete (maybe still stored)
        self._complete = False

    def _lookup(self, name: str) -> R | bytes | None:
        value = self._items.get(name)
        if value is not None or self._complete or name in self._gone:
            return value
        raw = self._get(name)
        if raw is not None:
            self._items[name] = raw
            self._raw += 1
        return raw

    def _parsed(self, name: str, value: R | bytes) -> R:
        if isinstance(value, bytes):
            value = self._make(**json.loads(value))
            self._items[name] = value
            self._raw -= 1
        return value

    def _all(self) -> dict[str, R | bytes]:
        if not self._complete:
            for name, raw in self._scan():
                if name not in self._items and name not in self._gone:
                    self._items[name] = raw
                    self._raw += 1
            self._gone.clear()
            self._complete = True
        return self._items

    def _parse_all(self) -> None:
        self._all()
        if not self._raw:
            return
        names = [n for n, v in self._items.items() if isinstance(v, bytes)]
        fields = json.loads(b"[" + b",".join(cast(bytes, self._items[n]) for n in names) + b"]")
        for n, f in zip(names, fields):
            self._items[n] = self._make(**f)
        self._raw = 0

    def __getitem__(self, name: str) -> R:
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return self._parsed(name, value)

    def get(self, name: str, default: Any = None) -> Any:
        value = self._lookup(name)
        return default if value is None else self._parsed(name, value)

    def __setitem__(self, name: str, record: R) -> None:
        if isinstance(self._items.get(name), bytes):
            self._raw -= 1
        self._items[name] = record
        self._gone.discard(name)

    def __delitem__(self, name: str) -> None:
        if self._lookup(name) is None:
            raise KeyError(name)
        if isinstance(self._items.pop(name), bytes):
            self._raw -= 1
        if not self._complete:
            self._gone.add(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def values(self) -> ValuesView[R]:
        self._parse_all()
        return cast(ValuesView[R], self._items.values())

    def items(self) -> ItemsView[str, R]:
        self._parse_all()
        return cast(ItemsView[str, R], self._items.items())

    def figures(self) -> tuple[int, int]:
        """(records read from the store so far, of which parsed), without reading more."""
        return len(self._items), len(self._items) - self._raw


def stored(kv: KV, cf: str, prefix: bytes) -> tuple[Callable[[], Iterator[tuple[str, bytes]]],
                                                      Callable[[str], bytes | None]]:
    """How `Records` reads the records under prefix: all of them, and one by name (a name
    that is no UTF-8, as a lookup may bring, matches none)."""
    n = len(prefix)

    def scan() -> Iterator[tuple[str, bytes]]:
        return ((k[n:].decode(), v) for k, v in kv.scan(cf, prefix, prefix))

    def get(name: str) -> bytes | None:
        return kv.get(cf, prefix + name.encode("utf-8", "surrogateescape"))

    return scan, get
