"""Fault injection: a TEST HOOK that makes chosen points of the daemon's work fail or stall.

The tests need a daemon whose background work meets an I/O error (or is held in a thread)
at a place they choose, on a real mount.  The daemon reads the environment variable
COWFS_FAULTS once at start (`load`), and so does `cowfs remote gc`; nothing else does, and
without it (in production) every `point()` returns after one test of an empty dict.  Syntax:
comma-separated POINT:ACTION[:TIMES[:SKIP]]; ACTION is `eio` (raise OSError(EIO), as a
failing disk would), `sleepS` (wait S seconds: only at points that run in a worker thread) or
`kill` (the process sends itself SIGKILL there: a crash at exactly that point); TIMES is how
many hits act (default 1; `*` for all of them), SKIP how many hits pass before (default 0).
Example: COWFS_FAULTS=pack_put:eio:2,warm_paths:eio

Points (where each sits, and which background task meets it):
  pack_put       Packs.write, before a flush's pack is put, in its encoding thread (the
                 flusher, or whoever flushes)
  pack_written   Packs.write, once the pack is put (durable, not yet committed), same thread
  repack_copied  chunks.repack.copy, once a repack's new pack is put, before its pointers
                 are committed (a `cowfs gc` thread)
  repack_moved   Store.retire_packs, once a repack's moves are committed and durable, before
                 its old packs are condemned (a `cowfs gc` thread)
  packs_condemned  Store.condemn_packs, once a round of condemned packs is recorded in the
                 reference store, before anything is deleted (a `cowfs gc` thread)
  packs_swept    Store.sweep_packs, once the due condemned packs are deleted, before they
                 leave the condemned list (a `cowfs gc` thread)
  flush_encode   Flusher.encode_all, the same thread, once every chunk is hashed and
                 judged already stored or new (before any pack append)
  prefetch_load  Fetcher._load, a prefetch thread
  dedup_plan     DedupWorker._plan, the background worker's planning thread
  share_walk     Sharer.walk, the sharer's thread
  clone_walk     Store.measure_clone: a directory clone's walk of its original (the clone
                 command's thread for an unprivileged caller or a quota, else the clone
                 measurer's)
  gc             the garbage-collection loop, before a pass, on the event loop (eio only)
  model_save     the learned-model saver's loop, on the event loop (eio only)
  warm_paths     Warmer._paths, the warming helper's path resolution thread
  lazy_warming   LazyWarming._warm, before each batch of a lazy mount's pushed cold start is
                 fetched, on the event loop (eio only: the warming stops as on a remote down)
  dup_rewritten  cowfs.background.gc._rewrite, once a slice of a daemon's rewrites of its
                 records to the store keeper's published places is committed (not synced; a
                 slice that rewrote none passes by),
                 on the event loop under the lock (kill: a crash between two slices)
  commit         Store.commit, on the event loop, as the batch is written (eio only): a failed
                 write, after which the store reopens the database (Store.recover)
  attach_bind    daemon.branches.bind, the thread that bind-mounts a fork (sleep: an attach in progress)
  fleet_repack_packed  cowfs.fleet.repack.repack (`cowfs remote gc`, which loads this hook
                 too), once the new packs and their indexes are put, before the forwards
  fleet_repack_moved   cowfs.fleet.repack.publish, once the forwards are published (etcd
                 gc/forwards set), before the old packs are condemned
  catalog_publish   SplitKV.write, once a catalog change's home records are durable, before
                 the compare-and-set that publishes it in the reference store (a change
                 with home records: snapshot, branch, rollback, delete, a gc merge's end)
  catalog_published SplitKV.write, just after that compare-and-set (both on the event loop
                 in a daemon: eio or kill)
  timer_flush    Flusher.background_flusher, before the flush of data older than 1 s or past
                 8 MiB, on the event loop (eio only: that flush is skipped, so what fsync put
                 in the small-write log stays there until a release or an operation folds it)
  refs_inotify   RefsWatch.run, before its inotify instance is made, on the event loop (eio
                 only: as if none could be had, the daemon looks at refs.sqlite every second)
  log_fold       Flusher.background_flusher, before it folds the small-write log (its records
                 idle, old or large enough, or the dirty buffers half the limit), on the event
                 loop (eio only: that fold is skipped; the timer's flushes of unlogged data go on)
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

ENV = "COWFS_FAULTS"
POINTS = frozenset({"pack_put", "pack_written", "repack_copied", "repack_moved", "packs_condemned", "packs_swept",
                    "flush_encode", "prefetch_load", "dedup_plan", "share_walk", "clone_walk", "gc", "model_save",
                    "warm_paths", "commit", "attach_bind", "timer_flush", "lazy_warming",
                    "fleet_repack_packed", "fleet_repack_moved", "log_fold", "catalog_publish", "catalog_published",
                    "dup_rewritten", "refs_inotify"})
LOOP_POINTS = frozenset({"gc", "model_save", "commit", "timer_flush", "lazy_warming", "log_fold", "catalog_publish",
                         "catalog_published", "dup_rewritten", "refs_inotify"})  # on the event loop: a sleep would stall every request

_lock = threading.Lock()
_armed: dict[str, list] = {}  # point -> [action, seconds, hits left (-1: every hit), hits to pass first]


def load(spec: str | None) -> None:
    """Arm the faults spec names (ValueError: a malformed spec or an unknown point)."""
    _armed.clear()
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        parts = item.strip().split(":")
        if len(parts) not in (2, 3, 4) or parts[0] not in POINTS:
            raise ValueError(f"{ENV}: bad fault {item!r} (POINT:eio|kill|sleepS[:TIMES[:SKIP]], points: "
                             f"{', '.join(sorted(POINTS))})")
        name, action = parts[0], parts[1]
        times = -1 if len(parts) >= 3 and parts[2] == "*" else int(parts[2]) if len(parts) >= 3 else 1
        skip = int(parts[3]) if len(parts) == 4 else 0
        if action in ("eio", "kill"):
            _armed[name] = [action, 0.0, times, skip]
        elif action.startswith("sleep") and name not in LOOP_POINTS:
            _armed[name] = ["sleep", float(action[5:]), times, skip]
        else:
            raise ValueError(f"{ENV}: bad action in {item!r} (eio, kill, or sleepS at a thread's point)")
    if _armed:
        log.warning("test hook %s armed: %s", ENV, spec)


def point(name: str) -> None:
    """Act on the fault armed at this point, if any."""
    if not _armed:
        return
    with _lock:
        fault = _armed.get(name)
        if fault is None or fault[2] == 0:
            return
        if fault[3] > 0:
            fault[3] -= 1
            return
        if fault[2] > 0:
            fault[2] -= 1
        action, seconds = fault[0], fault[1]
    log.warning("injected fault at %s: %s", name, action if action != "sleep" else f"sleep {seconds} s")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "eio":
        raise OSError(errno.EIO, f"injected fault at {name} ({ENV})")
    time.sleep(seconds)
