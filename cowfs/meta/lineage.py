"""A view's ancestry as sets of layer ids (cowfs.meta.layers.Catalog.layer_view makes them):
what a versioned read asks of it is "is layer L one of mine", in O(log n) set lookups, with
O(1) extension by one layer and blocks shared by every view of one line of descent."""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol


class Ancestry(Protocol):
    """The layers a view reads from: what `LayerView.ancestors` must answer."""

    def __contains__(self, layer: object) -> bool: ...

    def __len__(self) -> int: ...


class Lineage:
    """A layer's ancestry as a set that one more layer extends in O(1) (amortized; most
    extensions copy nothing), so a snapshot costs the same after a million others.  The
    set is kept as a few frozensets, each more than twice the size of the next: a new
    layer is a set of its own, merged into its neighbour while that is not more than twice
    its size (binary-counter merging), so there are at most log2(n) + 1 of them and a miss
    looks in each.  Never changed once made: views, threads and readers may share it."""

    __slots__ = ("levels", "size")

    def __init__(self, levels: tuple[frozenset[int], ...]) -> None:
        self.levels = levels  # largest (oldest layers) first
        self.size = sum(len(s) for s in levels)

    @classmethod
    def of(cls, layers: Iterable[int]) -> "Lineage":
        return cls((frozenset(layers),))

    def __contains__(self, layer: object) -> bool:
        for s in self.levels:
            if layer in s:
                return True
        return False

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        for s in self.levels:
            yield from s

    def plus(self, layer: int) -> "Lineage":
        levels = list(self.levels)
        last = frozenset((layer,))
        while levels and len(levels[-1]) <= 2 * len(last):
            last = levels.pop() | last
        levels.append(last)
        return Lineage(tuple(levels))


class Block(frozenset[int]):
    """`size` consecutive layers of one line of descent, from a layer (its end) up; `below`:
    the parent of the last (0: none).  A view's ancestry is made of the blocks that a
    binary split of its depth gives (`Catalog.layer_view`), each a function of its end alone,
    so every view on the same line shares them: listing 100,000 snapshots of one line holds
    O(n log n) layer ids in all, where a set per view held O(n^2) (and ran out of memory)."""

    __slots__ = ("below",)
