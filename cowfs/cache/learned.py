"""Learned prefetch: a first-order Markov model over one branch's file opens.

For each file (inode number; a fork keeps its parent's inode numbers) the model counts which
file was opened next, and remembers which chunks of each file were read.  When a file is
opened, the model follows the most likely successor while its transition probability is at
least THRESHOLD, up to DEPTH files ahead, and those files' chunks are prefetched.

The model is persisted per branch under meta key ``prefetch/<branch>`` (zlib'd JSON), written
SAVE_INTERVAL seconds after it changed (the saver sleeps while nothing is learned) and at
unmount, in a batch of its own: no file system operation reads that key, so losing the last
seconds of learning on a crash costs only predictions.  A branch without a model of its own starts from its parent branch's.

The model also keeps a branch's *cold start*: the directories clients touched (listed, or
looked a name up in) in the first WARM_WINDOW seconds (-o warm_window) of a mount, in first-touch
order.  At the next mount's first touch, cowfs.background.warming lists them from a helper
process so that the kernel caches their entries before the clients ask (what `git status` or `import django` need first).
A directory stays in the list until MAX_MISSED mounts in a row went without touching it.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from collections import OrderedDict

import trio

from cowfs.kv.base import KV, Batch
from cowfs.meta import layers
from cowfs.meta.layers import Catalog

log = logging.getLogger(__name__)

THRESHOLD = 0.5
DEPTH = 64
MAX_FILES = 20_000  # files with recorded successors / chunks: ~0.3 KiB each, ~6 MiB at most
MAX_NEXT = 8  # successors kept per file
MAX_CHUNKS = 64  # chunks 0-63 (the first 4 MiB) of a file are recorded
RECENT = 4096  # files prefetched recently: not asked for again
FOLLOW = 8  # an open this close to the head of the last prediction continues it
SAVE_INTERVAL = 10.0
WARM_WINDOW = 30.0  # seconds after a mount's first touch that count as its cold start
MAX_WARM = 8192  # directories in a cold-start list
MAX_MISSED = 4  # mounts in a row without a touch that drop a directory from the list


class OpenModel:
    def __init__(self) -> None:
        self.next: dict[int, dict[int, int]] = {}
        self.chunks: dict[int, int] = {}  # ino -> bitmask of chunk indices read (< MAX_CHUNKS)
        self.last: int | None = None
        self.dirty = False
        self.recent: OrderedDict[int, None] = OrderedDict()
        self._ahead: list[int] = []  # the files predicted to follow the last open, in order
        # Cold start: directory -> earlier mounts in a row that did not touch it (in order), as
        # loaded; and this mount's first touches, in order, since session_t0.
        self.startup: dict[int, int] = {}
        self.session: dict[int, None] = {}
        self.session_t0: float | None = None
        self.session_closed = False  # past WARM_WINDOW or MAX_WARM: touches cost one test

    def opened(self, ino: int) -> None:
        prev, self.last = self.last, ino
        if prev is None or prev == ino:
            return
        succ = self.next.get(prev)
        if succ is None:
            if len(self.next) >= MAX_FILES:
                return
            succ = self.next[prev] = {}
        succ[ino] = succ.get(ino, 0) + 1
        if len(succ) > MAX_NEXT:
            del succ[min((k for k in succ if k != ino), key=succ.__getitem__)]
        self.dirty = True

    def read(self, ino: int, first: int, last: int) -> None:
        if first >= MAX_CHUNKS:
            return
        old = self.chunks.get(ino)
        if old is None and len(self.chunks) >= MAX_FILES:
            return
        last = min(last, MAX_CHUNKS - 1)
        new = (old or 0) | (((1 << (last - first + 1)) - 1) << first)
        if new != old:
            self.chunks[ino] = new
            self.dirty = True

    def touched(self, ino: int, now: float | None = None, window: float = WARM_WINDOW) -> None:
        """A client touched directory ino (listed it, or looked a name up in it): part of this
        mount's cold start if no more than window seconds after its first touch.  On every
        LOOKUP: the clock is read only for a directory new to this mount's cold start."""
        if self.session_closed or ino in self.session:
            return
        if now is None:
            now = time.monotonic()
        if self.session_t0 is None:
            self.session_t0 = now
        elif now - self.session_t0 > window or len(self.session) >= MAX_WARM:
            self.session_closed = True
            return
        self.session[ino] = None
        self.dirty = True

    def cold_start(self) -> dict[int, int]:
        """The list to save: this mount's touches first, then the loaded list's other
        directories with one more miss each (dropped at MAX_MISSED).

        Touches the warming answered from the kernel's cache never reach the daemon, so a
        directory only looked up in (not listed) can drop out after MAX_MISSED warmed mounts
        and come back after the next cold one; a listing always reaches it (OPENDIR)."""
        out = dict.fromkeys(self.session, 0)
        for ino, missed in self.startup.items():
            if len(out) >= MAX_WARM:
                break
            if ino not in out and missed + 1 < MAX_MISSED:
                out[ino] = missed + 1
        return out

    def chunks_of(self, ino: int) -> list[int]:
        bits = self.chunks.get(ino, 0)
        return [i for i in range(bits.bit_length()) if bits >> i & 1]

    def _successor(self, cur: int) -> int | None:
        """cur's most frequent successor, if at least THRESHOLD of cur's transitions go to it."""
        succ = self.next.get(cur)
        if not succ:
            return None
        nxt, count = max(succ.items(), key=lambda kv: kv[1])
        return nxt if count >= THRESHOLD * sum(succ.values()) else None

    def _extend(self, ahead: list[int], ino: int) -> None:
        """Follow likely successors from the end of ahead (or from ino) until DEPTH files are
        predicted, a file repeats or no successor is likely enough."""
        seen = set(ahead)
        seen.add(ino)
        cur = ahead[-1] if ahead else ino
        while len(ahead) < DEPTH:
            nxt = self._successor(cur)
            if nxt is None or nxt in seen:
                return
            ahead.append(nxt)
            seen.add(nxt)
            cur = nxt

    def to_prefetch(self, ino: int) -> list[int]:
        """Files (with recorded chunks) to prefetch now that ino is open; each file once per RECENT.

        An open that follows the prediction made at an earlier open (ino is among the next
        FOLLOW predicted files) advances that prediction and extends it at its far end, so it
        costs O(1) instead of a walk of DEPTH files (measured: 92 us per open for a
        9,000-file sequence, the cost of a whole FUSE request); any other open starts afresh."""
        ahead = self._ahead
        try:
            k = ahead.index(ino, 0, FOLLOW)
        except ValueError:
            ahead.clear()
            self._extend(ahead, ino)
            fresh = [ino, *ahead]
        else:
            del ahead[: k + 1]
            known = len(ahead)
            self._extend(ahead, ino)
            fresh = ahead[known:]
        out = []
        for f in fresh:
            if f in self.recent:
                self.recent.move_to_end(f)
                continue
            self.recent[f] = None
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
            if f in self.chunks:
                out.append(f)
        return out

    def dumps(self) -> bytes:
        doc = {"next": {str(k): [[n, c] for n, c in v.items()] for k, v in self.next.items()},
               "chunks": {str(k): v for k, v in self.chunks.items()},
               "startup": [[k, v] for k, v in self.cold_start().items()]}
        return zlib.compress(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def loads(cls, raw: bytes) -> "OpenModel":
        doc = json.loads(zlib.decompress(raw))
        m = cls()
        m.next = {int(k): {n: c for n, c in v} for k, v in doc["next"].items()}
        m.chunks = {int(k): int(v) for k, v in doc["chunks"].items()}
        m.startup = {int(k): int(v) for k, v in doc.get("startup", [])}  # absent before the cold-start list
        return m


class Learner:
    """The models of the branches this daemon serves, loaded on first use."""

    def __init__(self, kv: KV, catalog: Catalog, learn: bool) -> None:
        self.kv = kv
        self.catalog = catalog
        self.learn = learn
        self.warm_window = WARM_WINDOW  # the daemon's -o warm_window
        self.models: dict[str, OpenModel] = {}
        # Set by whatever it learns (on the loop): the saver sleeps until then, not on a timer.
        self.learned = trio.Event()

    def model(self, branch: str) -> OpenModel:
        m = self.models.get(branch)
        if m is None:
            m = self.models[branch] = self._load(branch)
        return m

    def _load(self, branch: str) -> OpenModel:
        name: str | None = branch
        seen = set()
        while name is not None and name not in seen:
            seen.add(name)
            raw = layers.load_model(self.kv, name)
            if raw is not None:
                try:
                    m = OpenModel.loads(raw)
                except (ValueError, TypeError, KeyError, AttributeError, zlib.error) as exc:
                    # Only predictions are lost: the model is rebuilt and rewritten.
                    log.warning("prefetch model of branch %s is unreadable (%s): starting afresh", name, exc)
                    m = OpenModel()
                    m.dirty = True
                    return m
                m.dirty = name != branch  # a fork's inherited model becomes its own
                return m
            b = self.catalog.branches.get(name)
            name = b.parent_branch if b is not None else None
        return OpenModel()

    def opened(self, branch: str, ino: int) -> list[int]:
        m = self.model(branch)
        if self.learn:
            m.opened(ino)
            self.learned.set()
        return m.to_prefetch(ino)

    def read(self, branch: str, ino: int, first: int, last: int) -> None:
        if self.learn:
            self.model(branch).read(ino, first, last)
            self.learned.set()

    def chunks_of(self, branch: str, ino: int) -> list[int]:
        return self.model(branch).chunks_of(ino)

    def touched(self, branch: str, ino: int) -> None:
        if self.learn:
            self.model(branch).touched(ino, window=self.warm_window)
            self.learned.set()

    def cold_start(self, branch: str) -> list[int]:
        """The directories of the branch's last cold starts, in the order they were touched."""
        return list(self.model(branch).startup)

    def describe(self, branch: str) -> dict[str, int]:
        m = self.model(branch)
        return {"files": len(m.chunks), "transitions": sum(sum(s.values()) for s in m.next.values()),
                "cold_start_dirs": len(m.cold_start())}

    def forget(self, branch: str, batch: Batch) -> None:
        """A deleted branch's model goes with it (in the deleting batch)."""
        self.models.pop(branch, None)
        layers.drop_model(batch, branch)

    def batch(self) -> Batch | None:
        """The changed models, serialized, in one batch (None: nothing to write)."""
        if not self.learn:
            return None
        out = Batch()
        for name, m in self.models.items():
            if m.dirty and name in self.catalog.branches:
                layers.save_model(out, name, m.dumps())
                m.dirty = False
        return out if len(out) else None
