"""Orphans: inodes whose last name went while a handle was still open on them.  They keep
their record (nlink 0) and a key in the `orphans` family (cowfs.meta.orphans) until their
last handle closes; a daemon that stops in between leaves the key, and the next one to
serve the branch deletes them before serving it (docs/architecture.md, "POSIX notes")."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.meta import orphans as records

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation

log = logging.getLogger(__name__)


class Orphans:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs

    def release_inode(self, m: "Mutation", node: Node) -> None:
        """The last name of node went: drop the inode now, or when its last handle closes."""
        if node.opens > 0:
            records.add(m.batch, node.view.lv.top, node.ino)
            m.save(node)
        else:
            self.fs.flusher.discard(node)
            m.drop(node)

    async def last_closed(self, node: Node) -> None:
        """The last handle of node closed: an orphan goes now."""
        if node.opens <= 0 and node.attrs.nlink <= 0 and not node.deleted and node.view.writable:
            async with self.fs.txn.mutate(node.view, fenced_ok=True) as m:
                records.remove(m.batch, node.view.lv.top, node.ino)
                self.fs.flusher.discard(node)
                m.drop(node)

    def remove_left(self, view: View, m: "Mutation") -> int:
        """Put into m the deletion of view's inodes left unlinked-but-open when the daemon last
        stopped; how many.  The caller commits m with nothing racing it (see
        Views.attach_branch)."""
        top = view.lv.top
        inos = records.of_layer(self.fs.store.kv, top)
        for ino in inos:
            records.remove(m.batch, top, ino)
            try:
                node = self.fs.nodes.node(view, ino)
            except FSError:
                continue
            if node.attrs.nlink <= 0:
                m.drop(node)
                self.fs.nodes.remove(node)
        if inos:
            log.info("branch %s: removing %d inodes left open-but-unlinked by the previous daemon", view.name,
                     len(inos))
        return len(inos)
