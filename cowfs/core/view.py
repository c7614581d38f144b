"""A view: one branch (writable) or snapshot (read-only) served by the daemon."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cowfs.errors import FSError
from cowfs.meta.versioned import LayerView

if TYPE_CHECKING:
    from cowfs.core.node import Node

EPOCHS = 1 << 12  # rollback epochs are told apart modulo this in inode numbers


@dataclass(eq=False)
class View:
    vid: int
    name: str
    kind: str  # "branch" or "snapshot"
    lv: LayerView
    epoch: int = 0  # a branch's rollback count: part of the inode numbers the kernel sees
    nodes: dict[int, "Node"] = field(default_factory=dict)
    usage_bytes: int = 0  # logical bytes of regular files (their sizes: holes count)
    usage_inodes: int = 0
    # Allocated bytes of regular files (their stored chunks' lengths; holes do not count):
    # committed (persisted with the usage), and what buffered writes add or take back until
    # they are committed (Node.alloc - Node.stored_alloc, summed).  The byte quota charges both.
    alloc_bytes: int = 0
    alloc_pending: int = 0
    quota_bytes: int = 0  # 0: no quota
    quota_inodes: int = 0
    retired: bool = False  # its snapshot or branch was deleted; kept while the kernel uses it
    # Nodes the kernel holds (lookups) or that have open handles: kept by Filesystem's node
    # lifecycle methods, so a retired or detached view knows when it can go without a scan.
    held: int = 0

    @property
    def allocated(self) -> int:
        return self.alloc_bytes + self.alloc_pending

    def check_quota(self, more_bytes: int = 0, more_inodes: int = 0) -> None:
        """more_bytes: allocated bytes the operation adds."""
        if more_bytes > 0 and self.quota_bytes and self.allocated + more_bytes > self.quota_bytes:
            raise FSError(errno.EDQUOT, f"branch {self.name!r} would exceed its quota of {self.quota_bytes} bytes")
        if more_inodes > 0 and self.quota_inodes and self.usage_inodes + more_inodes > self.quota_inodes:
            raise FSError(errno.EDQUOT, f"branch {self.name!r} would exceed its quota of {self.quota_inodes} inodes")

    @property
    def writable(self) -> bool:
        # "detached": the pre-rollback tree, still reachable through open handles only; its
        # writes go to a layer no branch sees any more (like writes to an unlinked file).
        return self.kind in ("branch", "detached")
