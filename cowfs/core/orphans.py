"""Orphans: inodes whose last name went while a handle was still open on them.  They keep
their record (nlink 0) and a key in the `orphans` family until their last handle closes; a
daemon that stops in between leaves the key, and the next one to serve the branch deletes
them before serving it (docs/architecture.md, "POSIX notes")."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.errors import FSError
from cowfs.meta.versioned import ino_key
from cowfs.store import CF_ORPHANS

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.txn import Mutation

log = logging.getLogger(__name__)


def _key(node: Node) -> bytes:
    return node.view.lv.top.to_bytes(8, "big") + ino_key(node.ino)


class Orphans:
    def __init__(self, fs: "Filesystem") -> None:
        self.fs = fs

    def release_inode(self, m: "Mutation", node: Node) -> None:
        """The last name of node went: drop the inode now, or when its last handle closes."""
        if node.opens > 0:
            m.batch.put(CF_ORPHANS, _key(node), b"")
            m.save(node)
        else:
            self.fs.flusher.discard(node)
            m.drop(node)

    async def last_closed(self, node: Node) -> None:
        """The last handle of node closed: an orphan goes now."""
        if node.opens <= 0 and node.attrs.nlink <= 0 and not node.deleted and node.view.writable:
            async with self.fs.txn.mutate(node.view) as m:
                m.batch.delete(CF_ORPHANS, _key(node))
                self.fs.flusher.discard(node)
                m.drop(node)

    def remove_left(self, view: View, m: "Mutation") -> int:
        """Put into m the deletion of view's inodes left unlinked-but-open when the daemon last
        stopped; how many.  The caller commits m with nothing racing it (see
        Views.attach_branch)."""
        prefix = view.lv.top.to_bytes(8, "big")
        keys = [k for k, _ in self.fs.store.kv.scan(CF_ORPHANS, prefix, prefix)]
        for k in keys:
            ino = int.from_bytes(k[8:16], "big")
            m.batch.delete(CF_ORPHANS, k)
            try:
                node = self.fs.nodes.node(view, ino)
            except FSError:
                continue
            if node.attrs.nlink <= 0:
                m.drop(node)
                self.fs.nodes.remove(node)
        if keys:
            log.info("branch %s: removing %d inodes left open-but-unlinked by the previous daemon", view.name,
                     len(keys))
        return len(keys)
