"""One KV over two: the store's home database and its reference store, told apart by family.

The catalog (branches, snapshots, layers, counters) lives in the reference store, where any
process of the store can change it by compare-and-set; everything else a layer writes lives
in the home database (docs/design-many-processes.md, "Step 5b").  No commit spans the two, so
a batch holding both is written in the order that makes a crash harmless: the home part
first, made durable (`sync`), then the reference part as one compare-and-set.  A crash in
between leaves home records of layers the reference store does not name yet: unpublished
layers, invisible (every key carries its layer) and removed by gc.  Expectations of the
reference part travel with the batch (`Batch.expect`), set by the code that read them.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from cowfs import faults
from cowfs.kv.base import KV, Batch, Expect


class Unpublished(Exception):
    """A batch's home part is written (and durable), its reference part is not: `cause` (a
    `Conflict`, a busy or failing reference store) refused it.  What the home part wrote
    belongs to layers nobody names."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"not published in the reference store: {cause}")
        self.cause = cause


class SplitKV(KV):
    """home for every family but `routed`, which are refs'; sync and close act on both."""

    def __init__(self, home: KV, refs: KV, routed: tuple[str, ...]) -> None:
        self.home = home
        self.refs = refs
        self.routed = frozenset(routed)
        self.publishes = 0  # reference-store writes made through this KV (figures, tests)

    def _of(self, cf: str) -> KV:
        return self.refs if cf in self.routed else self.home

    def get(self, cf: str, key: bytes) -> bytes | None:
        return self._of(cf).get(cf, key)

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        return self._of(cf).scan(cf, start, prefix)

    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        """The home part (durable first when a reference part follows), then the reference
        part with its expectations (batch.expect and the routed ones of expect).  A failure
        of the reference part once the home part is written is `Unpublished`."""
        routed = self.routed
        home, refs = Batch(), Batch()
        for op in batch.ops:
            (refs if op[0] in routed else home).ops.append(op)
        conds = list(batch.expect) + [e for e in expect if e[0] in routed]
        home_expect = [e for e in expect if e[0] not in routed]
        if not refs.ops and not conds:
            self.home.write(home, home_expect)
            return
        if not (home.ops or home_expect):  # a counter drawn, a record alone: one step
            self.refs.write(refs, conds)
            self.publishes += 1
            return
        self.home.write(home, home_expect)
        self.home.sync()  # a name is never published over records a power cut could drop
        faults.point("catalog_publish")
        try:
            self.refs.write(refs, conds)
        except Exception as exc:
            raise Unpublished(exc) from exc
        self.publishes += 1
        faults.point("catalog_published")

    def sync(self) -> None:
        self.home.sync()

    def close(self) -> None:
        try:
            self.refs.close()
        finally:
            self.home.close()
