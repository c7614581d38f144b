"""A view: one branch (writable) or snapshot (read-only) served by the daemon."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cowfs.meta.versioned import LayerView

if TYPE_CHECKING:
    from cowfs.fs.node import Node


@dataclass(eq=False)
class View:
    vid: int
    name: str
    kind: str  # "branch" or "snapshot"
    lv: LayerView
    nodes: dict[int, "Node"] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        return self.kind == "branch"
