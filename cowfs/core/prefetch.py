"""What the core tells the read cache's helpers: reads and opens to the learned model
(cowfs.cache.learned), the chunks a handle's readahead or the model predicts to the fetcher
(cowfs.cache.prefetch), and the model's persistence.

The fetcher and the model are the cache layer's; this module owns the filesystem's use of
them: which ones it has (none, the model only, both), the resolvers a prefetch thread runs
(pure KV reads), and the model's saves (a small batch of its own on the loop thread).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import trio

from cowfs import faults
from cowfs.cache.learned import SAVE_INTERVAL, Learner
from cowfs.cache.prefetch import LEARNED, Fetcher
from cowfs.chunks import tree
from cowfs.chunks.tree import CHUNK
from cowfs.core.node import Node
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, LayerView, ino_key, name_key

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem

log = logging.getLogger(__name__)


class Prefetch:
    def __init__(self, fs: "Filesystem", prefetch: bool, learn: bool) -> None:
        self.fs = fs
        store = fs.store
        # Background chunk loading (readahead, learned prefetch); run by the daemon's nursery.
        self.fetcher = Fetcher(store.objects, store.in_thread) if prefetch else None
        self.learner = Learner(store.kv, store.catalog, learn) if prefetch or learn else None
        # A lazy mount's: the predicted files' jobs, whose chunks still on the remote it fetches
        # ahead (cowfs.background.lazy_warming.LazyPrefetch; the fetcher's threads never fetch).
        self.lazy_ahead: Callable[[list[Callable[[], list[bytes]]]], None] | None = None

    def stop_fetching(self) -> None:
        """The fetcher stopped for good (speculative work that failed): reads stop queueing
        work nobody takes."""
        self.fetcher = None

    def want(self, hashes: list[bytes], origin: str) -> None:
        if self.fetcher is not None:
            self.fetcher.want(hashes, origin)

    def opened(self, node: Node) -> None:
        """An open of a branch's file: the model learns it and predicts the files opened next,
        whose recorded chunks the fetcher loads."""
        learner = self.learner
        if learner is not None and node.view.kind == "branch" and node.attrs.is_reg:
            files = learner.opened(node.view.name, node.ino)
            if files and (self.fetcher is not None or self.lazy_ahead is not None):
                name, lv = node.view.name, node.view.lv
                jobs = [self._resolver(lv, ino, learner.chunks_of(name, ino)) for ino in files]
                if self.fetcher is not None:
                    self.fetcher.want(jobs, LEARNED)
                if self.lazy_ahead is not None:
                    self.lazy_ahead(jobs)

    def _resolver(self, lv: LayerView, ino: int, indices: list[int]) -> Callable[[], list[bytes]]:
        """A job for a prefetch thread: the committed chunk hashes of file ino (pure KV reads;
        a stale answer costs a useless fetch, never a wrong read: reads go by hash)."""
        store = self.fs.store
        objects = store.objects

        def resolve() -> list[bytes]:
            found = store.meta.get(CF_INODES, ino_key(ino), lv)
            if found is None or not found[1]:
                return []
            attrs = Attrs.unpack(found[1])
            if attrs.parent:  # the coming LOOKUP reads this entry: its block is then in memory
                store.meta.get(CF_DIRENTS, name_key(attrs.parent, attrs.name), lv)
            out = []
            for i in indices:
                if i * CHUNK >= attrs.size:
                    break
                h = tree.lookup(attrs.root, i, objects.peek_node)
                if h is not None:
                    out.append(h)
            return out
        return resolve

    async def save_model_loop(self) -> None:
        """Write the learned models SAVE_INTERVAL s after they changed, at most that often;
        asleep while nothing is learned (an idle mount: `Learner.learned`)."""
        learner = self.learner
        if learner is None:
            return
        while True:
            await learner.learned.wait()
            await trio.sleep(SAVE_INTERVAL)
            learner.learned = trio.Event()  # no checkpoint until the batch is taken: later learning waits for the next
            faults.point("model_save")
            self.save_model()

    def save_model(self) -> None:
        """One small batch of its own on the loop thread (a few KiB: ~0.1 ms), so it never races
        the store's commits or its disk-full handling; a failure costs only learning."""
        batch = self.learner.batch() if self.learner is not None else None
        if batch is not None:
            try:
                self.fs.store.write(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: writes matter more
                log.warning("prefetch model not saved: %s", exc)
