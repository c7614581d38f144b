"""A view: one branch (writable) or snapshot (read-only) served by the daemon."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cowfs.meta.versioned import LayerView

if TYPE_CHECKING:
    from cowfs.fs.node import Node

EPOCHS = 1 << 12  # rollback epochs are told apart modulo this in inode numbers


@dataclass(eq=False)
class View:
    vid: int
    name: str
    kind: str  # "branch" or "snapshot"
    lv: LayerView
    epoch: int = 0  # a branch's rollback count: part of the inode numbers the kernel sees
    nodes: dict[int, "Node"] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        # "detached": the pre-rollback tree, still reachable through open handles only; its
        # writes go to a layer no branch sees any more (like writes to an unlinked file).
        return self.kind in ("branch", "detached")
