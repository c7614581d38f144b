"""The daemon at work: one process per store owns the database and the FUSE session, serves
every branch mounted from the store (the first mount, and others attached as bind mounts),
runs the background work under supervision, answers the admin socket, and exits when its
last mount goes, after committing and syncing (docs/architecture.md, "Process model").
A branch with a home database of its own gets a daemon of its own that serves it alone
(cfg.home; its admin socket, pid file and log in STORE/homes/<id>/).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import time
from typing import Any, Callable

import pyfuse3
import trio

from cowfs import private
from cowfs.background.dedup import DedupWorker
from cowfs.background.gc import (KEEPER_WAIT, acknowledge_rounds, collect_when_wanted, keep_dups, keep_on_schedule,
                                 rewrite_dups, run_gc, sweep_packs)
from cowfs.background.cloning import Measurer
from cowfs.background.sharing import Sharer
from cowfs.background.refswatch import RefsWatch
from cowfs.background.supervise import Supervisor
from cowfs.background import lazy_cache
from cowfs.background.warming import Warmer
from cowfs.core.filesystem import Filesystem
from cowfs.core.view import View
from cowfs.daemon import admin, branches, mounts, notify, options as mount_options, tuning, zygote
from cowfs.daemon.config import MountConfig, fuse_options, options_in_force
from cowfs.storedir import pid_file
from cowfs.errors import FSError, MountError, StoreError
from cowfs.fleet import FleetError, holds as fleet_holds, lazy
from cowfs.fuse import dircache, ext as fuse_ext, loop as fuse_loop, replies as fuse_replies
from cowfs.fuse.inodes import is_control
from cowfs.fuse.ops import Operations
from cowfs.kv.sqlite import KVBusy
from cowfs.meta.serving import BranchServed
from cowfs.store import Store

log = logging.getLogger("cowfs.daemon")
KERNEL_SYNC_TIMEOUT = 30.0


class Daemon:
    def __init__(self, cfg: MountConfig, store: Store | None = None) -> None:
        """store: the one a lazy mount's build left open (cowfs.daemon.process), else opened here."""
        self.cfg = cfg
        self.store = store if store is not None else Store(cfg.store, cache_l1=cfg.cache_l1, cache_l2=cfg.cache_l2,
                                                           home=cfg.home)
        source = lazy.source_of(cfg.store)  # a lazy mount's store (its lazy.json): chunks on a remote
        if source is not None:
            self.store.objects.fetcher = lazy.RemoteFetcher.for_source(source)
        try:
            self.fs = Filesystem(self.store, cfg.branch, prefetch=cfg.prefetch, learn=cfg.prefetch_learn)
        except FSError as exc:
            self.store.close()
            raise StoreError(str(exc)) from None
        self.fs.lazy.near = cfg.lazy_near
        if self.fs.prefetch.learner is not None:
            self.fs.prefetch.learner.warm_window = cfg.warm_window
        if cfg.quota_bytes is not None or cfg.quota_inodes is not None:
            self.fs.set_quota(self.fs.primary, cfg.quota_bytes, cfg.quota_inodes)
        self.warmer = Warmer(self.fs, self._view_root, cfg.daemon_dir, cfg.prefetch and cfg.warm)
        # a lazy mount's cache of the remote (-o remote_cache_bytes), and its pushed cold start and
        # prefetch model's predictions fetched ahead of its workload (cowfs.background.lazy_cache)
        self.evictor, self.lazy_warming, self.lazy_prefetch = lazy_cache.lazy_tasks(
            self.fs, source, lazy.warm_chunks_of(source) if source is not None else [], cfg.remote_cache_bytes)
        self.fs.prefetch.lazy_ahead = self.lazy_prefetch.want if self.lazy_prefetch is not None else None
        self.ops = Operations(self.fs, stats=self.sandbox_stats, mounted=self.branch_mounts, ctl_group=cfg.ctl_group,
                              cache_absent=cfg.dir_cache, warm=self.warmer,
                              view_root=self._view_root, slots=cfg.view_slots)
        # The control directories' listings change behind the kernel (snapshots come and go).
        self.dir_cache = cfg.dir_cache and dircache.install(lambda fino: not is_control(fino))
        # LSEEK, FALLOCATE and STATFS's inode, which pyfuse3 does not hand on.
        # READDIR by inode, without OPENDIR/RELEASEDIR, when the kernel may cache listings.
        self.ext = fuse_ext.Extensions(cfg.mountpoint, self.ops.lseek, self.ops.fallocate, self.ops.statfs_of,
                                       readdir_by_inode=cfg.dir_cache)
        self.ops.dirs_by_inode = self.ext
        if cfg.fuse_ext:
            self.ext.arm()
        else:
            self.ext.reason = "turned off (-o fuse_ext=0)"
        self.fs.kernel_sync = self.kernel_sync
        self.kernel_syncs = self.kernel_syncs_skipped = 0  # syncfs children run, and not needed
        self.dedup = DedupWorker(self.fs, cfg.dedup_cpu, cfg.dedup, self.activity)
        # Copies of directory trees share their originals' records (-o share=off: not); off
        # with the background worker too, and like it, it waits for a quiet mount.
        self.sharer = Sharer(self.fs, cfg.dedup and cfg.share, self.dedup.quiet)
        # the usage of directory clones (cowfs.background.cloning), paced by the requests
        self.measurer = Measurer(self.fs, self.activity)
        self.ops.branching.cloner.measure_wanted = self.measurer.wake
        self.waiter = fuse_loop.install(cfg.spin_us) if cfg.spin_us else None
        if self.waiter is not None:
            self.store.direct_sync_ok = self.waiter.idle
        self.supervisor = Supervisor()
        self.started = time.time()
        self.gc_progress: dict[str, Any] | None = None  # while `cowfs gc` runs: its stage and count
        self._stopping = False
        self.dev = ""  # the FUSE connection's device number "major:minor", known once mounted
        self.attaching: dict[str, str] = {}  # branch -> mount point, while its bind mount is made
        self.attached = trio.Event()  # set by each attach, done or not (cowfs.daemon.branches.keep_records)
        self.holds = fleet_holds.BranchHolds(cfg.store, self.fs.fences)  # of the remote branches our branches follow
        self.refs_watch = RefsWatch(self.store.refs)  # wakes the gc acknowledgements and dup rewrites

    # -- our mounts ------------------------------------------------------------------------
    def _view_root(self, view: View) -> str | None:
        """Where a view's root is mounted in our namespace, for the cold-start helper (a
        process of its own: `.cowfs/by-view/N` answers only the daemon's threads)."""
        want = "/" if view is self.fs.primary else f"/.cowfs/by-view/{view.vid}"
        return next((mp for mp, root in self.mounts() if root == want), None)

    def mounts(self) -> list[tuple[str, str]]:
        """(mount point, root inside our filesystem) of every mount of our FUSE connection."""
        return [(e.mountpoint, e.root) for e in mounts.connection_mounts(self.dev)] if self.dev else []

    def branch_mounts(self) -> dict[str, list[str]]:
        """Where each mounted branch is mounted (mount points of our connection), a branch
        being attached included (its bind mount is not in the table yet)."""
        where: dict[str, list[str]] = {b: [mp] for b, mp in self.attaching.items()}
        for mp, root in self.mounts():
            view = None
            if root == "/":
                view = self.fs.primary
            elif root.startswith("/.cowfs/by-view/"):
                view = self.fs.views.get(int(root.rsplit("/", 1)[1]))
            if view is not None:
                where.setdefault(view.name, []).append(mp)
        return where

    def activity(self) -> int:
        """A count that grows with every foreground request (the warming's are not): what the
        background workers pace themselves by.  Also read from their threads: summing the
        counts is one C call under the GIL."""
        return sum(self.ops.requests.values()) - self.warmer.requests

    def mounted_branches(self) -> set[str]:
        return set(self.branch_mounts())

    async def kernel_sync(self) -> None:
        """Have the kernel write its dirty pages back to us: syncfs on the mount, from a child
        process (`sync -f`).  Not from a thread of ours: the open and the syncfs are requests
        to this daemon, and if it were SIGKILLed meanwhile that thread would wait for them
        forever, keeping the daemon's /dev/fuse descriptor open, so the kernel would never
        abort the connection and the mount would hang.  A child holds no such descriptor:
        the kernel aborts its requests when we die.  Its exit status does not matter (FUSE
        has no SYNCFS request and answers ENOENT; the writeback has happened by then).

        Skipped while no handle that may write is open on any of our mounts: the kernel
        holds dirty pages and times of a file only while it is open for writing (a close
        writes them back before it returns, fuse_flush; so does the last release of an
        mmap, fuse_release), as `Operations.rename` also relies on.  The child costs a fork
        and exec of `sync` (1.5 ms idle, 5-15 ms on a loaded machine): most of a snapshot's
        or a clone's time end to end when, as usual, the files written are closed."""
        if not self.ops.handles.writers:
            self.kernel_syncs_skipped += 1
            return
        mps = self.mounts()
        if not mps:
            return
        self.kernel_syncs += 1
        with trio.move_on_after(KERNEL_SYNC_TIMEOUT) as scope:
            await trio.run_process(["sync", "-f", mps[0][0]], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if scope.cancelled_caught:
            log.warning("syncfs on the mount did not finish within %.0f s", KERNEL_SYNC_TIMEOUT)

    async def attach(self, branch: str, mountpoint: str, quota_bytes: int | None = None,
                     quota_inodes: int | None = None, hold_ttl: int = 30) -> dict[str, Any]:
        """Serve another branch of this store at mountpoint (cowfs.daemon.branches)."""
        return await branches.attach(self, branch, mountpoint, quota_bytes, quota_inodes, hold_ttl)

    def sandbox_stats(self, view: View) -> dict[str, Any]:
        """What `.cowfs/stats` shows inside a mount (world-readable there): the figures of
        `stats` without anything about the host or the other sandboxes (the store's and the
        mount's paths, the daemon's pid, the branches mounted elsewhere)."""
        return self.stats(view, host=False)

    def stats(self, view: View | None = None, host: bool = True) -> dict[str, Any]:
        """Daemon-wide figures, and the usage and quotas of one branch (default: the first);
        host: with the host's side too (for the admin socket only, see sandbox_stats)."""
        fs, store = self.fs, self.store
        view = view or fs.primary
        learner = fs.prefetch.learner
        # Both from one read of /proc/self/status: VmHWM is at least VmRSS there, while
        # getrusage's ru_maxrss is only brought up to date when memory is given back.
        mem = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    mem[line[:5]] = int(line.split()[1]) * 1024
        where = ({"store": store.path, "home": self.cfg.home, "mountpoint": self.cfg.mountpoint,
                  "daemon_pid": os.getpid(),
                  "zygote": {"pid": zygote.started, "forked_by": zygote.forked_by},  # cowfs.daemon.zygote
                  "mounted_branches": sorted(self.mounted_branches()), "holds": self.holds.figures(view.name)}
                 if host else {})
        return {
            "ok": True,
            **where,
            "branch": view.name,
            "uptime_s": round(time.time() - self.started, 3),
            "rss_bytes": mem.get("VmRSS", 0),
            "peak_rss_bytes": mem.get("VmHWM", 0),
            "requests": dict(self.ops.requests),
            "kernel_dir_cache": self.dir_cache,
            "daemon_cpus": sorted(os.sched_getaffinity(0)),  # -o cpus=, else where it may run
            "fuse_ext": self.ext.figures(),
            "inode_slots": self.ops.inodes.slots.figures(),
            "usage_bytes": view.usage_bytes,  # logical: the sizes of its files, holes included
            "usage_allocated_bytes": view.allocated,  # what its files' data takes: the byte quota's measure
            "usage_inodes": view.usage_inodes,
            "quota_bytes": view.quota_bytes,
            "quota_inodes": view.quota_inodes,
            "read_only": {k: v for k, v in fs.fences.figures(view.name).items() if host or k != "why"},  # a lost hold
            "memory": {**fs.memory_figures(), **store.engine.memory()},
            "dirty_bytes": fs.flusher.dirty_bytes,
            **({"lazy": {**store.objects.fetcher.figures(),  # type: ignore[attr-defined]
                         "read_waits": fs.lazy.waits, "near_fetched": fs.lazy.near_fetched,
                         "checks": fs.lazy.checks, "cache": fs.lazy.cache.figures() if fs.lazy.cache else {},
                         **({"warming": self.lazy_warming.figures(), "prefetch": self.lazy_prefetch.figures()}
                            if self.lazy_warming is not None and self.lazy_prefetch is not None else {})}}
               if store.objects.fetcher is not None else {}),
            "flushes": fs.flusher.flush_count,
            # fsyncs made durable as small-write log records, and flushes that folded them
            "small_write_log": {"records": fs.smallwrites.records, "folds": fs.smallwrites.folds,
                                "pending_records": len(fs.smallwrites.pending),
                                "pending_bytes": fs.smallwrites.bytes},
            "commits": store.write_seq,
            "syncs_done": store.synced_seq,
            "direct_syncs": store.direct_syncs,  # WAL syncs made on the event loop (Store.sync)
            # ... and those the loop could have made but sent to a thread after a slow sync
            "syncs_after_slow": store.syncs_after_slow,
            "wal_rotations": store.wal_rotations,  # to a recycled WAL (Store.wal_keeper)
            "objects_created": store.objects_created,
            "objects_freed": store.objects_freed,
            "cache": store.cache.stats(),
            "prefetch_enabled": fs.prefetch.fetcher is not None,
            "prefetch_learning": learner is not None and learner.learn,
            "prefetch_model": (learner.describe(view.name) if learner is not None and view.kind == "branch"
                               else {"files": 0, "transitions": 0, "cold_start_dirs": 0}),
            "warm": self.warmer.figures(),
            "fuse_loop": self.waiter.figures() if self.waiter is not None else {"spin_us": 0},
            "disk_bytes": store.disk_usage(),
            **store.space(),
            "dedup": self.dedup.figures(),
            "shared": self.sharer.figures(),
            "clones": self.measurer.figures(),
            "kernel_syncs": {"run": self.kernel_syncs, "skipped": self.kernel_syncs_skipped,
                             "files_open_for_writing": len(self.ops.handles.writers)},
            "background": self.supervisor.figures(detail=host),
        }

    def _admin_refusal(self, uid: int, cmd: Any) -> str | None:
        """Who may use the admin socket, by the peer's uid (SO_PEERCRED): root, the daemon's
        user, and the owner of the store directory; attach (a bind mount made as root on a
        path the caller names) only the first two."""
        if uid in (0, os.geteuid()):
            return None
        try:
            owner = os.stat(self.cfg.store).st_uid
        except OSError:
            owner = None
        if uid == owner and cmd != "attach":
            return None
        if uid == owner:
            return "attaching a branch needs root"
        return "only root or the owner of the store may use its admin socket"

    async def handle_admin(self, req: dict[str, Any], uid: int) -> dict[str, Any]:
        cmd = req.get("cmd")
        refusal = self._admin_refusal(uid, cmd)
        if refusal is not None:
            log.warning("admin socket: refused %r from uid %d", cmd, uid)
            return {"ok": False, "errno": "EPERM", "error": refusal}
        if cmd == "delete":  # store-wide administration: anything not mounted
            name = req.get("name")
            if not isinstance(name, str):
                return {"ok": False, "errno": "EINVAL", "error": "delete needs the name of a snapshot or branch"}
            try:
                return {"ok": True, **await self.ops.branching.delete(None, name, None, self.branch_mounts)}
            except FSError as exc:
                return {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": str(exc)}
        if cmd == "list":
            return {"ok": True, **self.ops.branching.listing(None, self.branch_mounts())}
        if cmd == "diff":  # store-wide: any two snapshots or branches
            try:
                return {"ok": True, **await self.ops.branching.diff(None, str(req.get("a")), str(req.get("b")))}
            except FSError as exc:
                return {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": str(exc)}
        if cmd == "stats":
            await self.fs.flush()  # as the stats file does: every acknowledged write counted
            return self.stats()
        if cmd == "sync":
            await self.kernel_sync()
            await self.fs.fsync()
            return {"ok": True}
        if cmd == "options":
            return {"ok": True, "options": options_in_force(self.cfg)}
        if cmd == "attach":
            if self.cfg.home is not None:
                return {"ok": False, "error": f"daemon pid {os.getpid()} serves branch {self.cfg.branch!r} from its own "
                                             "home database alone: other branches are served by the store's daemon "
                                             "or their own"}
            return await self.attach(str(req.get("branch")), str(req.get("mountpoint")),
                                     req.get("quota_bytes"), req.get("quota_inodes"), int(req.get("hold_ttl", 30)))
        if cmd == "progress":  # asked on a second connection while a gc or dedup --wait runs
            return {"ok": True, "gc": self.gc_progress, "background_queue": self.store.objects.space.queue}
        if cmd == "gc":
            below = req.get("repack_below")
            if below is not None and (isinstance(below, bool) or not isinstance(below, (int, float))
                                      or not 0 <= below <= 1):
                return {"ok": False, "error": f"repack_below {below!r}: a share from 0 to 1"}

            def note(n: int, stage: str = "metadata versions removed") -> None:
                self.gc_progress = {"stage": stage, "done": n}

            try:
                note(0)
                removed = await run_gc(self.fs, note)
                note(0, "store keeper")
                kept = await keep_dups(self.fs, wait=KEEPER_WAIT)
                note(0, "repacking")
                packs = await sweep_packs(self.fs, None if below is None else float(below),
                                          lambda n: note(n, "repacking"))
                note(0, "compacting")
                await self.store.in_thread(self.store.compact, python=False)
            finally:
                self.gc_progress = None
            return {"ok": True, "store": self.store.path, "daemon": True, "versions_removed": removed,
                    **kept, **packs, "disk_bytes": self.store.disk_usage()}
        if cmd == "dedup":
            if req.get("wait"):
                if not self.dedup.enabled:
                    return {"ok": False, "error": "the background worker is off (-o dedup=off)"}
                await self.kernel_sync()  # everything written so far, page cache included
                await self.fs.flush()
                if not await self.dedup.settle(float(req.get("timeout") or 600)):
                    return {"ok": False, "error": "the background queue did not empty in time"}
                await self.sharer.settle()
                await self.measurer.measure_all()
            return {"ok": True, "store": self.store.path, "daemon": True, **self.store.space(),
                    "dedup": self.dedup.figures(), "shared": self.sharer.figures()}
        return {"ok": False, "error": f"unknown admin command {cmd!r}"}

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: flushing and unmounting", signum)
                await self.stop()

    async def stop(self) -> None:
        """Unmount as `umount` would: the kernel writes back its dirty pages to us first."""
        if self._stopping:
            return
        self._stopping = True
        self.warmer.kill()  # else the kernel keeps the connection (and us) until it is done
        try:
            await self.fs.flush()
        except FSError as exc:  # e.g. a full disk: unmount all the same (what is dirty is lost)
            log.error("flush before unmounting failed: %s", exc)
        # Bind mounts (other branches) first, the FUSE mount itself last.
        for mp, _root in sorted(self.mounts(), key=lambda m: m[1] == "/"):
            for lazy in (False, True):
                r = await trio.run_process(mounts.unmount_command(mp, lazy), check=False, capture_stderr=True)
                if r.returncode == 0:
                    break
                log.warning("fusermount3 -u%s %s: %s", "z" if lazy else "", mp, r.stderr.decode().strip())

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog only while the event loop answers FUSE work promptly.

        The ping runs in the same loop as the request handlers: a daemon stuck in a handler
        stops pinging and systemd restarts it instead of leaving sandboxes hanging.
        """
        interval = notify.watchdog_interval()
        if interval is None:
            return
        while True:
            notify.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _keep_holds(self) -> None:
        """The holds' keeper (cowfs.fleet.holds): a pass every TICK seconds while a hold is kept
        (a lapsed lease must be seen without any request: it stays periodic); while none is,
        only when the machine state changed (where a `push --branch` makes a branch follow
        one) and at least every TIE_LOOK seconds, without a thread or a mount-table read."""
        stamp, last = None, -fleet_holds.TIE_LOOK
        while True:
            if self.dev:  # our mounts known: a branch no longer among them gives its holds back
                now = fleet_holds.ties_stamp()
                if self.holds.keeping() or now != stamp or time.monotonic() - last >= fleet_holds.TIE_LOOK:
                    stamp, last = now, time.monotonic()
                    await trio.to_thread.run_sync(self.holds.tick, self.mounted_branches())
            await trio.sleep(fleet_holds.TICK)

    async def _tune_readahead(self) -> None:
        # The kernel sets the mount's readahead when it gets our INIT reply; a stat() that
        # returns proves INIT is done, so our setting sticks.
        await trio.to_thread.run_sync(os.stat, self.cfg.mountpoint)
        tuning.raise_readahead(self.cfg.mountpoint)

    async def main(self, ready: Callable[[str | None], None]) -> None:
        async with trio.open_nursery() as nursery:
            # Background work under supervision (cowfs.background.supervise): its errors never reach this
            # nursery, which pyfuse3's request loop shares.
            sup = self.supervisor
            sock, owner = admin.socket_path(self.cfg.daemon_dir), os.stat(self.cfg.store).st_uid
            await sup.serve(nursery, "admin", lambda task_status: admin.serve(sock, self.handle_admin, owner=owner,
                                                                              task_status=task_status))
            sup.start(nursery, "flusher", self.fs.background_flusher)
            sup.start(nursery, "wal_keeper", self.store.wal_keeper)
            sup.start(nursery, "kernel_syncer", self.ops.kernel.syncer)
            sup.start(nursery, "slot_reclaimer", self.ops.kernel.slot_reclaimer)
            sup.start(nursery, "signals", self._watch_signals)
            sup.start(nursery, "readahead_tuning", self._tune_readahead, speculative=True)
            sup.start(nursery, "gc", lambda: collect_when_wanted(self.fs))
            sup.start(nursery, "refs_watch", self.refs_watch.run)
            sup.start(nursery, "gc_acknowledgements", lambda: acknowledge_rounds(self.fs, self.refs_watch))
            sup.start(nursery, "dup_rewrites", lambda: rewrite_dups(self.fs, self.refs_watch))
            if self.cfg.keep_every:
                sup.start(nursery, "keeper", lambda: keep_on_schedule(self.fs, self.cfg.keep_every))
            sup.start(nursery, "dedup", self.dedup.run)
            sup.start(nursery, "sharer", self.sharer.run)
            sup.start(nursery, "clone_measurer", self.measurer.run)
            sup.start(nursery, "watchdog", self._watchdog)
            sup.start(nursery, "holds", self._keep_holds)
            sup.start(nursery, "serve_records", lambda: branches.keep_records(self))
            fetcher = self.fs.prefetch.fetcher
            if fetcher is not None:
                # The interpreter's switch interval stays at its default: lowering it to 1 ms so
                # that prefetch threads get the GIL sooner made creates 40% slower (bench_core
                # files: 2.28 s against 1.62 s) and still did not let readahead get ahead.
                sup.start(nursery, "prefetch", fetcher.run, speculative=True, on_stop=self.fs.prefetch.stop_fetching)
            sup.start(nursery, "model_saver", self.fs.prefetch.save_model_loop)
            sup.start(nursery, "warmer", self.warmer.run, speculative=True, on_stop=self.warmer.disable)
            if self.lazy_warming is not None and self.lazy_prefetch is not None and self.evictor is not None:
                sup.start(nursery, "lazy_cache", self.evictor.run)
                sup.start(nursery, "lazy_warming", self.lazy_warming.run, speculative=True, on_stop=self.lazy_warming.stop)
                sup.start(nursery, "lazy_prefetch", self.lazy_prefetch.run, speculative=True, on_stop=self.lazy_prefetch.stop)
            self.ext.nursery = nursery
            ready(None)
            notify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {self.cfg.mountpoint}")
            await pyfuse3.main(min_tasks=1, max_tasks=8)
            log.info("unmounted: committing and syncing")
            if self.lazy_warming is not None and self.lazy_prefetch is not None:
                self.lazy_warming.stop()
                self.lazy_prefetch.stop()
            if self.evictor is not None:
                await self.evictor.finish()  # an eviction under way deletes its packs before the exit
            notify.notify("STOPPING=1")
            self.measurer.stopping = True  # a clone's measuring walk would hold the exit up
            await self.fs.flush()
            self.fs.prefetch.save_model()
            await self.store.sync()
            nursery.cancel_scope.cancel()

    def run(self, ready: Callable[[str | None], None]) -> int:
        cfg = self.cfg
        if cfg.cpus is not None:
            tuning.pin_threads(mount_options.cpu_set(cfg.cpus))
        before = fuse_replies.fuse_fds()
        try:
            self.store.serving.take(cfg.branch, cfg.mountpoint)  # cowfs.meta.serving
            self.holds.take(cfg.branch, 0 if "ro" in cfg.options else cfg.hold_ttl)
            pyfuse3.init(self.ops, cfg.mountpoint, fuse_options(cfg))
        except (RuntimeError, FleetError, BranchServed, KVBusy) as exc:
            self.holds.release_all()
            self.store.close()  # gives the serve record back
            ready(f"cannot mount {cfg.mountpoint}: {exc}" if isinstance(exc, RuntimeError) else str(exc))
            return 1
        # A reply refused at unmount is logged as what it is (cowfs.fuse.replies).
        fuse_replies.install(before)
        private.write_file(pid_file(cfg.daemon_dir), f"{os.getpid()}\n")
        entry = mounts.entry_at(cfg.mountpoint)
        if entry is not None and entry.fstype == "fuse.cowfs":
            self.dev = entry.dev
            self.fs.full.kernel_dirty = tuning.kernel_dirty_limit(entry.dev) or self.fs.full.kernel_dirty
        log.info("serving %s branch %s at %s (pid %d%s)", cfg.store, cfg.branch, cfg.mountpoint, os.getpid(),
                 f", home {cfg.home}" if cfg.home else "")
        clean = False
        try:
            trio.run(self.main, ready)
            clean = True
        finally:
            # After a failure the mount is still there: take it away rather than leave it dead.
            pyfuse3.close(unmount=not clean)
            fuse_replies.uninstall()
            self.holds.release_all()
            zygote.forget(cfg.store)
            self.store.close()
            for p in (pid_file(cfg.daemon_dir), admin.socket_path(cfg.daemon_dir)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            log.info("daemon exiting")
        return 0
