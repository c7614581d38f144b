"""Maintenance on a store that no daemon serves: what `cowfs gc`, `cowfs dedup --wait` and
`cowfs stats` do to an unmounted store, in the calling process.

The store's RocksDB lock keeps a daemon from starting meanwhile (its mount fails with "in
use"), as a daemon's lock keeps these from running on a mounted store.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from cowfs.commands.reply import plain
from cowfs.errors import StoreError
from cowfs.store import Store

Progress = Callable[[str, int, "int | None"], None]


def _first_branch(store: Store) -> str:
    """A branch to anchor the filesystem on (main if there is one)."""
    names = sorted(store.catalog.branches, key=lambda n: (n != "main", n))
    if not names:
        raise StoreError(f"{store.path} has no branch")
    return names[0]


def gc(path: str, progress: Progress | None = None, repack_below: float | None = None) -> dict[str, Any]:
    """Garbage collection, pack repacking and compaction, as the daemon's `gc` does them."""
    import trio

    from cowfs.background.gc import KEEPER_WAIT, keep_dups, run_gc, sweep_packs
    from cowfs.chunks.repack import REPACK_BELOW
    from cowfs.core.filesystem import Filesystem

    report = progress or (lambda stage, done, total: None)
    store = Store(os.path.abspath(path))
    try:
        async def work() -> dict[str, Any]:
            fs = Filesystem(store, _first_branch(store))
            removed = await run_gc(fs, lambda n: report("metadata versions removed", n, None))
            report("store keeper", 0, None)
            kept = await keep_dups(fs, wait=KEEPER_WAIT)
            report("repacking", 0, None)
            packs = await sweep_packs(fs, REPACK_BELOW if repack_below is None else repack_below,
                                      lambda n: report("repacking", n, None))
            report("compacting", 0, None)
            await store.in_thread(store.compact, python=False)
            return {"ok": True, "store": store.path, "daemon": False, "versions_removed": removed,
                    **kept, **packs, "disk_bytes": store.disk_usage()}

        return trio.run(work)
    finally:
        store.close()


def dedup(path: str, wait: bool, timeout: float, progress: Progress | None = None) -> dict[str, Any]:
    """The background work's figures; with wait, do all of it now (delta encoding of the
    queue at full speed, then sharing of copied trees) and return once done."""
    import trio

    from cowfs.background.dedup import DedupWorker
    from cowfs.core.filesystem import Filesystem
    from cowfs.background.sharing import Sharer

    report = progress or (lambda stage, done, total: None)
    store = Store(os.path.abspath(path))
    try:
        async def work() -> dict[str, Any]:
            fs = Filesystem(store, _first_branch(store))
            worker = DedupWorker(fs, cpu_share=1.0)
            sharer = Sharer(fs, True, lambda: True)
            if wait:
                queue = store.objects.space.queue
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker.run)
                    with trio.move_on_after(timeout) as scope:
                        while store.objects.space.queue > 0:
                            report("delta encoding", queue - store.objects.space.queue, queue)
                            await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
                if scope.cancelled_caught:
                    raise StoreError(f"the background queue of {store.path} did not empty within {timeout:g} s "
                                     f"({store.objects.space.queue} chunks left)")
                report("sharing copied trees", 0, None)
                await sharer.settle()
            return {"ok": True, "store": store.path, "daemon": False, **store.space(), "dedup": worker.figures(),
                    "shared": sharer.figures()}

        return trio.run(work)
    finally:
        store.close()


def stats(path: str) -> dict[str, Any]:
    """The space figures of an unmounted store."""
    store = Store(os.path.abspath(path))
    try:
        return {"ok": True, "store": store.path, "daemon": False, **store.space(),
                "disk_bytes": store.disk_usage(), "shared": store.meta.shared.figures()}
    finally:
        store.close()


def is_store(path: str) -> bool:
    """Whether path looks like a store (True also when we may not look: opening it then says
    whose it is)."""
    from cowfs.storedir import MARKER

    try:
        os.stat(os.path.join(path, MARKER))
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def _administered(path: str) -> Store:
    """The store opened for store-wide administration: root's or its owner's alone, whatever
    its file modes say (docs/architecture.md, "Authorization")."""
    path = os.path.abspath(path)
    try:
        owner = os.stat(path).st_uid
    except PermissionError as exc:
        raise StoreError(f"{path}: {exc.strerror}: a store is private to its owner and root") from None
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None
    if os.geteuid() not in (0, owner):
        raise StoreError(f"{path}: only root or the owner of the store may administer it")
    try:
        return Store(path)
    except OSError as exc:  # files of another user's (root's) in a store its owner may not open
        raise StoreError(f"{path}: cannot open the store: {exc.strerror}") from None


def listing(path: str) -> dict[str, Any]:
    """Every snapshot and branch of an unmounted store (none is mounted)."""
    from cowfs.commands.authz import Owners
    from cowfs.meta.layers import Branch, Usage

    store = _administered(path)
    try:
        def usage(item: Any) -> Usage:
            layer = item.head if isinstance(item, Branch) else item.layer
            found = store.catalog.usage(layer)  # recorded at every change; else counted
            return found if found is not None else store.count_usage(
                store.catalog.layer_view(layer))

        return plain({"ok": True, "daemon": False, **Owners(store.catalog).listing(None, usage, {})})
    finally:
        store.close()


def delete(path: str, name: str) -> dict[str, Any]:
    """Delete any snapshot or branch of an unmounted store, as the daemon's administrator
    delete does (a branch's snapshots and forks pass to its parent; its learned model goes),
    then collect the garbage it leaves; durable on return.  A refusal is a reply with its
    errno (ENOENT, EINVAL), as the daemon gives it."""
    import errno

    from cowfs.errors import FSError
    from cowfs.commands.authz import Owners
    from cowfs.kv.base import Batch
    from cowfs.meta import gc
    from cowfs.meta.layers import drop_model

    store = _administered(path)
    try:
        try:
            kind = Owners(store.catalog).check_delete(None, name, {})  # we hold the store: nothing is mounted
        except FSError as exc:
            return {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": str(exc)}
        batch = Batch()
        store.catalog.remove(name, batch)
        if kind == "branch":
            drop_model(batch, name)
        store.commit(batch)
        tops = store.catalog.leaves()
        gc.drop_dead_shared(store.meta, store.catalog, tops, store.commit)
        removed = gc.collect_now(store.meta, store.catalog, tops, store.commit, forks=False)
        store.kv.sync()
        return {"ok": True, "daemon": False, "deleted": name, "kind": kind, "versions_removed": removed}
    finally:
        store.close()


def diff(path: str, a: str, b: str) -> dict[str, Any]:
    """What changed from snapshot or branch A to B of an unmounted store, as the daemon's
    store-wide diff says it.  A refusal (no such name) is a reply with its errno."""
    import errno

    import trio

    from cowfs.errors import FSError
    from cowfs.commands.branching import Branching
    from cowfs.core.filesystem import Filesystem

    store = _administered(path)
    try:
        async def work() -> dict[str, Any]:
            br = Branching(Filesystem(store, _first_branch(store)))
            return plain({"ok": True, "daemon": False, **await br.diff(None, a, b)})

        try:
            return trio.run(work)
        except FSError as exc:
            return {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": str(exc)}
    finally:
        store.close()
