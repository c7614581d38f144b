"""Several KVs read as one: how a branch's daemon will read its lineage when its head lives in
a private database and its frozen layers elsewhere (docs/design-many-processes.md, "Reading").

Metadata keys carry their layer (`~layer` suffix), and each layer lives in exactly one
member, so for the layer-versioned families the members' key sets are disjoint and the
union read in key order is exactly the one database of today: `Versioned`'s one seek for
the newest visible version works unchanged over it.  Families named `through` are read
through every member (the first member's value wins where a key is in several); every
other family is the top member's alone (what only the branch's own database holds).
Writes, their compare-and-set checks, `sync` and `close` go to the top member only: the
members below are frozen (opened read-only, or immutable layer objects).
"""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Sequence

from cowfs.kv.base import KV, Batch, Expect


class OverlayKV(KV):
    def __init__(self, top: KV, below: Sequence[KV], through: Iterable[str]) -> None:
        """top: the writable member; below: frozen members, nearest first; through: the
        families read through all of them."""
        self.top = top
        self.below = list(below)
        self.through = frozenset(through)

    def _members(self, cf: str) -> list[KV]:
        return [self.top, *self.below] if cf in self.through else [self.top]

    def get(self, cf: str, key: bytes) -> bytes | None:
        for kv in self._members(cf):
            value = kv.get(cf, key)
            if value is not None:
                return value
        return None

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        members = self._members(cf)
        if len(members) == 1:
            return members[0].scan(cf, start, prefix)
        return self._merged(cf, start, prefix, members)

    @staticmethod
    def _merged(cf: str, start: bytes, prefix: bytes, members: list[KV]) -> Iterator[tuple[bytes, bytes]]:
        # Every member's scan starts at the first step (each sees its member as of then).  The
        # members scan without the prefix and the union stops at its first key outside it, as
        # one database's scan would.  A member whose first key is outside the prefix while the
        # union's is inside has nothing in it (the prefix's keys are one contiguous range), so
        # the usual case, one member holding the range (a lookup of base data, or of what the
        # head just wrote), is read straight through, without a merge.
        n = len(prefix)
        firsts: list[tuple[bytes, int, bytes, Iterator[tuple[bytes, bytes]]]] = []
        for rank, kv in enumerate(members):
            it = iter(kv.scan(cf, start))
            for key, value in it:
                firsts.append((key, rank, value, it))
                break
        if not firsts or min(firsts)[0][:n] != prefix:  # (key, rank) is unique: the iterators are never compared
            return
        live = [f for f in firsts if f[0][:n] == prefix]
        if len(live) == 1:
            key, _rank, value, it = live[0]
            yield key, value
            for key, value in it:
                if key[:n] != prefix:
                    return
                yield key, value
            return
        # (key, rank) orders equal keys by member, so the first member's comes first and the
        # others' copies of that key are skipped.
        last = None
        for key, _rank, value in heapq.merge(*(_ranked(k, r, v, it) for k, r, v, it in live)):
            if key[:n] != prefix:
                return
            if key != last:
                last = key
                yield key, value

    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        self.top.write(batch, expect)

    def sync(self) -> None:
        self.top.sync()

    def close(self) -> None:
        """Closes the top member; the members below belong to whoever opened them."""
        self.top.close()


def _ranked(key: bytes, rank: int, value: bytes,
            rest: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, int, bytes]]:
    """A member's scan whose first item was already taken, as (key, rank, value)."""
    yield key, rank, value
    for key, value in rest:
        yield key, rank, value
