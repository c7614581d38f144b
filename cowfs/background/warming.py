"""Learned warming of the kernel's directory caches at a cold start (issue #5).

A cold start after a mount (`import django`, `git status`, a compiler probing include paths)
is bound by FUSE requests, not by loading content: every directory it lists and every name it
stats is a round trip through the daemon while the client waits.  The learned model
(cowfs.cache.learned) keeps, per branch, the directories clients touched in a mount's first
seconds.  At the first touch after the next mount, a helper process (cowfs/background/warm_child.py)
lists them in that order.  Its READDIRPLUS replies fill the kernel's dentry, attribute and
(FOPEN_CACHE_DIR, cowfs.fuse.dircache) listing caches, so the client's own lstats and listings are
answered by the kernel while the helper runs ahead of it on the other core.

The helper's requests are recognised by its pid (and its directory handles): they are
neither learned nor counted as a client's, and the dedup worker, which waits while clients
keep the mount busy, does not wait for them.  It works in a mount namespace of its own
(private propagation), so it never makes the users' mount busy: a plain `umount` succeeds
while it runs, and the daemon serves it until it exits.  That needs root; a daemon running as another user does not warm.  Its pid is in
STORE/warmer.pid while it runs, so that `cowfs umount` ends it at once instead of waiting for
it; the daemon also ends it before it unmounts itself.

Figures: the directories the helper listed (`dirs_warmed`), those a client listed afterwards
(`dirs_used`, the precision's numerator) and the directories clients listed (`dirs_listed`).  A client's lookups that the warming answered never reach the daemon,
so only listings can be scored.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import deque
from typing import Callable

import trio

from cowfs import faults, private
from cowfs.core.filesystem import Filesystem
from cowfs.core.node import Node
from cowfs.core.view import View
from cowfs.meta.versioned import LayerView
from cowfs.storedir import warmer_pid_file

log = logging.getLogger(__name__)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_child.py")
MAX_LISTED = 65536  # distinct directories listed by clients that are counted


class Warmer:
    def __init__(self, fs: Filesystem, root_path: Callable[[View], str | None], store: str,
                 enabled: bool) -> None:
        self.fs = fs
        self.learner = fs.prefetch.learner
        self.root_path = root_path  # where a view's root is in the daemon's mount namespace
        self.pid_path = warmer_pid_file(store)
        self.enabled = enabled and self.learner is not None and os.geteuid() == 0  # see the module doc
        self.pid = 0  # the helper's, while it runs
        # The helper's requests (background work: the dedup worker does not count them as
        # a busy mount).  LOOKUP and OPENDIR are counted here, READDIR and RELEASEDIR of the
        # handles opened_dir said were the helper's by the request handlers.
        self.requests = 0
        self._proc: trio.Process | None = None
        self._started: set[int] = set()  # views whose cold start began in this mount
        self._jobs: deque[tuple[View, list[int]]] = deque()
        self._event = trio.Event()
        self.runs = 0
        self.last_run_ms = 0.0
        self.warmed: set[tuple[int, int]] = set()  # (view id, inode) listed by the helper
        self.used: set[tuple[int, int]] = set()  # ... and by a client afterwards
        self.listed: set[tuple[int, int]] = set()  # listed by clients

    # -- on the request path (trio thread, no checkpoint) -------------------------------------
    def touch(self, node: Node, pid: int) -> None:
        """A client looked a name up in directory node (or lists it)."""
        view = node.view
        if pid and pid == self.pid:
            self.requests += 1
            return
        if view.kind != "branch":
            return
        if view.vid not in self._started:
            self._start(view)
        if self.learner is not None:
            self.learner.touched(view.name, node.ino)

    def opened_dir(self, node: Node, pid: int) -> bool:
        """A directory was opened; True if by the helper."""
        key = (node.view.vid, node.ino)
        if pid and pid == self.pid:
            self.requests += 1
            self.warmed.add(key)
            return True
        if key not in self.listed and len(self.listed) < MAX_LISTED:
            self.listed.add(key)
            if key in self.warmed:
                self.used.add(key)
        self.touch(node, pid)
        return False

    def _start(self, view: View) -> None:
        self._started.add(view.vid)
        if not self.enabled or self.learner is None:
            return
        inos = self.learner.cold_start(view.name)
        if inos:
            self._jobs.append((view, inos))
            self._event.set()

    # -- the background task -------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            while not self._jobs:
                await self._event.wait()
                self._event = trio.Event()
            view, inos = self._jobs.popleft()
            root = self.root_path(view)
            if root is None:
                continue
            t0 = time.perf_counter()
            paths = await self.fs.store.in_thread(self._paths, os.fsencode(root), view.lv, inos)
            if not paths:
                continue
            try:
                await self._list(view, root, paths, t0)
            except (OSError, trio.BrokenResourceError) as exc:  # the helper could not run or died
                log.warning("cold-start warming of branch %s stopped: %s", view.name, exc)

    async def _list(self, view: View, root: str, paths: list[bytes], t0: float) -> None:
        """Have the helper process list paths (in this order) under root."""
        proc = await trio.lowlevel.open_process([sys.executable, "-I", "-S", CHILD, root], stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        self._proc, self.pid = proc, proc.pid
        try:
            private.write_file(self.pid_path, f"{proc.pid}\n")
            assert proc.stdin is not None
            await proc.stdin.send_all(b"\0".join(paths) + b"\0")
            await proc.stdin.aclose()
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            self._proc, self.pid = None, 0
            try:
                os.unlink(self.pid_path)
            except FileNotFoundError:
                pass
        self.runs += 1
        self.last_run_ms = (time.perf_counter() - t0) * 1000
        log.info("cold start of branch %s: listed %d directories in %.0f ms (exit %s)",
                 view.name, len(paths), self.last_run_ms, proc.returncode)

    def _paths(self, root: bytes, lv: LayerView, inos: list[int]) -> list[bytes]:
        """Worker thread: the learned directories' paths in the mount (pure KV reads)."""
        faults.point("warm_paths")
        cache: dict[int, str | None] = {}
        out = []
        for ino in inos:
            p = self.fs.path_of(lv, ino, cache)
            if p is not None:
                out.append(root + b"/" + os.fsencode(p) if p else root)
        return out

    def disable(self) -> None:
        """No more warming in this mount (its task stopped after an error)."""
        self.enabled = False
        self._jobs.clear()

    def kill(self) -> None:
        """End the helper now (before an unmount: the daemon would serve it until it is done)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    def figures(self) -> dict[str, object]:
        return {"enabled": self.enabled, "running": self.pid != 0, "runs": self.runs,
                "last_run_ms": round(self.last_run_ms, 1), "dirs_warmed": len(self.warmed),
                "dirs_used": len(self.used), "dirs_listed": len(self.listed), "requests": self.requests}
