"""Several KVs read as one: how a branch's daemon will read its lineage when its head lives in
a private database and its frozen layers elsewhere (docs/design-many-processes.md, "Reading").

Metadata keys carry their layer (`~layer` suffix), and each layer lives in exactly one
member, so for the layer-versioned families the members' key sets are disjoint and the
union read in key order is exactly the one database of today: `Versioned`'s one seek for
the newest visible version works unchanged over it.  Families named `through` are read
through every member (the first member's value wins where a key is in several); a family
given in `through_keys` only its keys that begin with one of the prefixes named there (a
fork reads its ancestors' `usage/` and `share/` records of `meta`, never their gc queue or
prefetch model: docs/design-many-processes.md, "Step 6"); every other family and key is the
top member's alone (what only the branch's own database holds).
Writes, their compare-and-set checks, `sync` and `close` go to the top member only: the
members below are frozen (opened read-only, or immutable layer objects).  A member that is a
RocksDB opened read-only beside its writer refreshes itself when the writer's compaction
deleted a blob file it reads (cowfs.kv.rocks.REFRESH_TRIES): a member's read never fails for
that.
"""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Mapping, Sequence

from cowfs.kv.base import KV, Batch, Expect


class OverlayKV(KV):
    def __init__(self, top: KV, below: Sequence[KV], through: Iterable[str],
                 through_keys: Mapping[str, Iterable[bytes]] | None = None) -> None:
        """top: the writable member; below: frozen members, nearest first; through: the
        families read through all of them; through_keys: family -> the key prefixes of it
        read through them (the family's other keys are the top's alone)."""
        self.top = top
        self.below = list(below)
        self.through = frozenset(through)
        self.through_keys = {cf: tuple(ps) for cf, ps in (through_keys or {}).items() if cf not in self.through}
        if any(not p for ps in self.through_keys.values() for p in ps):
            raise ValueError("an empty key prefix in through_keys: name the family in through instead")

    def _through(self, cf: str, key: bytes) -> bool:
        return cf in self.through or (cf in self.through_keys and key.startswith(self.through_keys[cf]))

    def get(self, cf: str, key: bytes) -> bytes | None:
        value = self.top.get(cf, key)
        if value is not None or not self._through(cf, key):
            return value
        for kv in self.below:
            value = kv.get(cf, key)
            if value is not None:
                return value
        return None

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        inside = start.startswith(prefix)  # else the keys from start up to the prefix count too
        if cf in self.through or (inside and cf in self.through_keys and prefix.startswith(self.through_keys[cf])):
            return self._merged(cf, start, prefix, [self.top, *self.below])
        crossing = [p for p in self.through_keys.get(cf, ()) if p.startswith(prefix) or not inside]
        if not crossing:  # no key of the range is read through
            return self.top.scan(cf, start, prefix)
        # The range holds through-prefixes and other keys: the members below contribute only
        # the former.
        below = [_Only(kv, crossing) for kv in self.below]
        return self._merged(cf, start, prefix, [self.top, *below])

    @staticmethod
    def _merged(cf: str, start: bytes, prefix: bytes, members: Sequence[KV | _Only]) -> Iterator[tuple[bytes, bytes]]:
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


class _Only:
    """A member's scans restricted to the keys that begin with one of prefixes."""

    def __init__(self, kv: KV, prefixes: list[bytes]) -> None:
        self.kv = kv
        # Each prefix's keys are one contiguous range; a prefix inside another's range adds
        # nothing, and the rest are disjoint ranges in key order.
        self.prefixes = [p for p in sorted(prefixes) if not any(p != q and p.startswith(q) for q in prefixes)]

    def scan(self, cf: str, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        for p in self.prefixes:
            if start > p and not start.startswith(p):
                continue  # every key of p's range sorts before start
            yield from self.kv.scan(cf, max(start, p), p)
