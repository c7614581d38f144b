"""Garbage collection: metadata versions no live view can see (cowfs.meta.gc decides which),
their references to data, and the pack bytes nothing points at any more (chunks.repack).

The daemon runs a pass after each rollback and delete (`Filesystem.schedule_gc`); `cowfs gc`
runs one, collects the packs (condemns those nothing points at and deletes them once
every writer has acknowledged that: chunks.liveness; repacks those mostly dead) and
compacts the database.  A pass plans under the lock and
commits chunk by chunk, taking the lock for each (docs/architecture.md, "Concurrency
invariants"); it never overlaps a pass of the sharer (`Filesystem.maintenance`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from cowfs import faults
from cowfs.background.refswatch import RefsWatch
from cowfs.chunks import dups
from cowfs.chunks.codec import CorruptObject
from cowfs.chunks.repack import REPACK_BELOW
from cowfs.core.filesystem import Filesystem
from cowfs.meta import gc

log = logging.getLogger(__name__)

SETTLE = 0.5  # seconds a burst of deletes gets to settle into one pass
# Seconds a change of the reference store gets before the dup rewrites look: the keeper's pass
# publishes its records, then rewrites its own database and sweeps; looked at at once, a
# daemon killed between two slices of its rewrites found nothing left to do at its remount
# (tests/test_keeper.py), as the once-a-second look never did.
REWRITE_SETTLE = 1.0
REWRITE_SLICE = 512  # dup records planned and committed per hold of the lock (a few ms)
KEEP_IDLE_MAX = 300.0  # the longest wait of a schedule whose passes change nothing
KEEPER_WAIT = dups.LEASE_TTL + 5  # seconds `cowfs gc` waits for another keeper's lease (a dead holder's expires)


async def run_gc(fs: Filesystem, progress: Callable[[int], None] | None = None, forks: bool = True) -> int:
    """One garbage-collection pass (cowfs.meta.gc), a batch at a time, each planned and
    committed under the lock with no checkpoint in between (a merge may move keys into a
    branch head that is being written), yielding to other work between batches;
    progress(versions removed so far) after each.  forks: also every fork of the layer
    tree (`cowfs gc`), not only the queue (the daemon's pass after a delete)."""
    removed = 0
    store = fs.store
    reshaped = False
    async with fs.maintenance:
        async with fs.exclusive():
            gc.drop_dead_shared(store.meta, store.catalog, fs.live_tops(), store.commit, store.home)
        # Unpublished layers (cowfs.meta.gc.unpublished) are looked for by `cowfs gc` and by
        # the first pass of a daemon whose store's last writer died.  A branch's own daemon
        # works on its home's layers only (cowfs.meta.gc, "Several databases").
        collector = gc.Collector(store.meta, store.catalog, forks, stray=forks or store.stray, home=store.home,
                                 own=store.home_kv)
        store.stray = False
        try:
            while True:
                await fs.txn.acquire_lock()
                try:
                    c = collector.next(fs.live_tops())
                    if c is None:
                        break
                    store.commit(c.batch, c.txn)
                    for src, dst, inos in c.moved:
                        fs.views.records_moved(src, dst, inos)
                finally:
                    fs.lock.release()
                reshaped |= c.reshaped
                removed += c.removed
                if progress is not None:
                    progress(removed)
                await trio.sleep(0)
            if forks and store.home is None:  # `cowfs gc` in the store's process: homes whose branch is gone
                async with fs.lock:
                    dropped = await store.in_thread(store.drop_dead_homes)
                reshaped |= bool(dropped)
                if dropped:
                    log.info("deleted %d homes no branch writes any more: %s", len(dropped), ", ".join(dropped))
        finally:
            if reshaped:
                fs.views.layers_reshaped()
    return removed


async def sweep_packs(fs: Filesystem, below: float | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Give back the space of dead pack bytes (chunks.repack, chunks.liveness): condemn the
    packs nothing points at, repack those whose live share is under `below` (condemning the
    old ones), then sweep: delete the condemned packs that are due and still unmarked.  The
    run's own rounds are due at once when this process is the only writer alive (it
    acknowledges them as it condemns); a round another writer has not acknowledged waits for
    a later run.  below: None for REPACK_BELOW.  Returns figures of the pass; progress(packs
    done) after each group."""
    store = fs.store
    below = REPACK_BELOW if below is None else below
    async with fs.maintenance:
        async with fs.lock:  # no flush has a pack put but not committed
            listed = await store.in_thread(store.packs.listing)
        survey = await store.in_thread(store.survey_packs, listed)
        garbage = survey.garbage()
        condemned, pardoned = await store.in_thread(store.condemn_packs, garbage, survey.marked())
        out = {"packs": len(listed), "packs_condemned": condemned, "packs_repacked": 0,
               "pack_bytes_copied": 0, "pack_bytes_dead": survey.dead_bytes()}
        for group in survey.groups(below):
            c = await store.in_thread(store.copy_packs, group)
            async with fs.lock:
                moved = store.commit_moves(c)
            await store.sync()  # the moves are durable before their old packs are condemned
            out["packs_condemned"] += await store.in_thread(store.retire_packs, c, moved, survey.foreign)
            out["packs_repacked"] += len(c.old)
            out["pack_bytes_copied"] += c.copied
            if progress is not None:
                progress(out["packs_repacked"])
        swept = await store.in_thread(store.sweep_packs)
        out.update(swept, packs_pardoned=swept["packs_pardoned"] + pardoned)
    return out


async def collect_when_wanted(fs: Filesystem) -> None:
    """The daemon's collector: a pass whenever one is owed (`Filesystem.schedule_gc`)."""
    while True:
        await fs.gc_wanted.wait()
        fs.gc_wanted = trio.Event()
        await trio.sleep(SETTLE)
        try:
            faults.point("gc")
            n = await run_gc(fs, forks=False)
        except Exception:
            fs.gc_wanted.set()  # the pass is still owed: the supervisor restarts us
            raise
        log.info("garbage collection removed %d metadata versions", n)


async def acknowledge_rounds(fs: Filesystem, watch: RefsWatch) -> None:
    """Acknowledge the gc rounds that list this daemon (chunks.liveness), as a gc run by
    another process (the store keeper) needs before it deletes: once the lock is taken, no
    flush is between its pack put and its commit (a flush holds the lock from one to the
    other), and the sync after it makes every pointer committed so far durable; every later
    pointer names a pack written later, never a condemned one.  A branch's own daemon first
    reopens the databases below its view (`Store.refresh_below`): a repack of the store's
    database moved pointers its reads of the base would otherwise still follow into the
    condemned packs.  Looks at start and at each change of the reference store (watch), where
    a round is condemned, instead of every second."""
    store = fs.store
    damaged = False
    seen: int | None = None
    while True:
        seen = await watch.changed(seen)
        try:
            gen = await store.in_thread(store.liveness.owed)
        except CorruptObject as exc:
            if not damaged:
                log.error("%s (cowfs fsck --repair drops it)", exc)
            damaged = True
            continue
        damaged = False
        if gen is None:
            continue
        async with fs.lock:
            pass
        if store.below:  # a branch's own view: its reads of the lineage below see moved pointers
            await store.in_thread(store.refresh_below, python=False)
        await store.sync()
        await store.in_thread(store.liveness.ack, gen)
        log.info("acknowledged gc round %d", gen)


async def _rewrite(fs: Filesystem, found: list[tuple[bytes, bytes]], gen: int | None) -> int:
    """This daemon's records of the published duplicates pointed at their published places
    (Store.rewrite_dups), a slice per hold of the lock; returns how many.  Then, if it knows
    the generation `found` was read at (or after), says it followed it (dups.mark_followed):
    the keeper's next pass looks the open records up again."""
    done = 0
    for i in range(0, len(found), REWRITE_SLICE):
        async with fs.lock:
            n = fs.store.rewrite_dups(found[i:i + REWRITE_SLICE])
            if n:
                faults.point("dup_rewritten")
        done += n
        await trio.sleep(0)
    if gen is not None and found:
        await fs.store.in_thread(dups.mark_followed, fs.store.refs, fs.store.member, gen)
    return done


async def keep_dups(fs: Filesystem, wait: float = 0.0) -> dict[str, float]:
    """The store keeper's pass (chunks.dups), run before a pack sweep by `cowfs gc` (any
    process of the store) and by every daemon's schedule (`keep_on_schedule`), one at a time
    across processes (`dups.KeeperLease`, renewed while the pass runs; `wait`: seconds to wait
    for another keeper's lease, else `dup_busy` and no pass): scan, settle and publish the
    dup records, then rewrite this process's own database and the homes no daemon holds,
    synced, so the sweep that follows finds their old copies dead.  Homes served by a daemon
    of their own are rewritten by it (`rewrite_dups`); their old copies go in a later sweep."""
    store = fs.store
    lease = dups.KeeperLease(store.refs)
    deadline = trio.current_time() + wait
    while not await store.in_thread(lease.take):
        if trio.current_time() >= deadline:
            return {"dup_busy": 1}
        await trio.sleep(min(1.0, lease.ttl / 10))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_renew, fs, lease)
            async with fs.maintenance:
                figures = await store.in_thread(store.keep_dups)
                gen = await store.in_thread(dups.generation, store.refs)
                found = await store.in_thread(dups.records, store.refs)
                done = await _rewrite(fs, found, gen)
                await store.sync()
                async with fs.lock:  # no acknowledgement of a round passes until these are synced
                    done += await store.in_thread(store.rewrite_idle_homes, found, gen)
                repacked = await store.in_thread(store.repack_idle_homes)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.in_thread(lease.release)
    log.info("store keeper: %d pack indexes read, %d duplicates found, %d records rewritten here, %d left open",
             figures.packs_read, figures.found, done, figures.open)
    return {**figures.as_dict(), "dup_rewritten": done, "dup_idle_repacked": repacked}


async def _renew(fs: Filesystem, lease: dups.KeeperLease) -> None:
    """Keep the keeper's lease while its pass runs (a third of its time to live apart)."""
    while True:
        await trio.sleep(lease.ttl / 3)
        if not await fs.store.in_thread(lease.renew):
            log.warning("the store keeper's lease expired during its pass and another process took it over")
            return


async def keep_on_schedule(fs: Filesystem, every: float) -> None:
    """Every daemon's side of the schedule (docs/architecture.md, "Many processes, one store"):
    every `every` seconds a cheap look (`Store.keeping_wanted`); when the store has more than
    one database and a pack the keeper never read appeared (or a dup record, a pack to read
    again or a condemned pack waits), a keeper pass
    (`keep_dups`, skipped while another process holds the lease) and a pack sweep of this
    process (`sweep_packs`: the losing copies condemned, the due ones deleted), so that
    dedup across daemons happens without anyone running `cowfs gc`.  A pass that changed
    nothing doubles the wait, up to KEEP_IDLE_MAX, until a new pack appears; a look within
    that wait (`every` for a new pack) of any daemon's last pass (`KeeperLease.last_pass`)
    runs none, so many daemons of one store make about one pass per wait between them."""
    store = fs.store
    lease = dups.KeeperLease(store.refs)  # read only, for the time of the last pass
    pause = every
    while True:
        await trio.sleep(pause)
        new, waiting = await store.in_thread(store.keeping_wanted)
        if not new and not waiting:
            pause = every
            continue
        if time.time() - await store.in_thread(lease.last_pass) < (every if new else pause):
            continue  # some daemon's pass looked lately: one per wait between them
        kept = await keep_dups(fs)
        if kept.get("dup_busy"):
            pause = every
            continue
        swept = await sweep_packs(fs)
        moved = (kept["dup_published"] or kept["dup_settled"] or kept["dup_rewritten"] or swept["packs_condemned"]
                 or swept["packs_deleted"] or swept["packs_repacked"] or swept["packs_pardoned"])
        pause = every if moved or new else min(pause * 2, KEEP_IDLE_MAX)


async def rewrite_dups(fs: Filesystem, watch: RefsWatch) -> None:
    """Every daemon's side of the keeper: once the generation of dup records moves (and once
    at start), point this daemon's records of them at the published places (chunks.dups),
    then collect its packs (`sweep_packs`): a pack of its own that the rewrites left mostly
    dead is repacked by no other process (the store's gc never moves another database's
    pointers), e.g. one that also holds chunks another database keeps inline.  The
    generation is looked at when the reference store changes (watch: the keeper publishes
    there), not on a timer: in a store of one database, where it never moves, this costs
    nothing."""
    store = fs.store
    seen: int | None = None
    change: int | None = None
    while True:
        if change is not None:  # woken by a change, not the start
            await watch.changed(change)
            await trio.sleep(REWRITE_SETTLE)
        change = watch.changes  # what the look below covers
        try:
            gen = await store.in_thread(dups.generation, store.refs)
        except ValueError:
            gen = None
        if gen is None or gen != seen:
            found = await store.in_thread(dups.records, store.refs)
            done = await _rewrite(fs, found, gen)
            if done:
                log.info("pointed %d chunk records at the copies the store keeper chose", done)
                swept = await sweep_packs(fs)
                log.info("packs collected after the rewrites: %d repacked, %d condemned, %d deleted",
                         swept["packs_repacked"], swept["packs_condemned"], swept["packs_deleted"])
            seen = gen
