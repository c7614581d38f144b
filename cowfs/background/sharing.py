"""The background sharer: finds directory trees that are exact copies of other trees and
makes them share the original's records (cowfs.meta.shared has the model).

A pass, when the mount is quiet and enough inodes were created since the last one:
  1. in a thread, without the lock, a walk of the branch computes a fingerprint of every
     directory's subtree (names, types, modes, owners, sizes, mtimes, contents, link
     counts; not inode numbers, ctimes or atimes) and groups equal ones: hints only;
  2. under `Filesystem.lock`, the branch head is frozen (committed on its own, like a
     snapshot's freeze) so that the originals stay as they are in a layer nothing writes;
  3. for each copy, largest first, under the lock and with no checkpoint until the commit:
     the copy and its original are compared record by record as stored (the copy's keys must
     all be in one frozen layer, the original must own its records), and one batch deletes
     the copy's inode records and entries and writes the range, which takes over their
     references to the data.  Nothing observable changes: inode numbers, attributes and times stay.
Garbage collection (`run_gc`) and a pass never overlap (`Filesystem.maintenance`).
"""
from __future__ import annotations

import errno
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import blake3
import trio

from cowfs import faults
from cowfs.errors import FSError
from cowfs.core.filesystem import Filesystem
from cowfs.core.view import View
from cowfs.kv.base import Batch
from cowfs.meta.records import Attrs, dirent_ino
from cowfs.meta.shared import Range, runs_of
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, LayerView, Versioned, ino_key, name_key
from cowfs.store import ROOT_INO

log = logging.getLogger(__name__)

MIN_INODES = 16  # smaller copies are not worth a range (it costs a key and a pin)
MAX_INODES = 100_000  # a verification blocks the loop ~20 us per inode: larger copies share by parts
MIN_NEW = 64  # inodes created since the last pass before another walk
POLL = 1.0
_FILE = struct.Struct("<IIIIQQqB")


@dataclass
class _Tree:
    """What the walk learned of one directory."""

    fp: bytes
    inodes: int
    parent: int
    shared: bool  # some inode of it reads through a range already


@dataclass
class Walk:
    """A walk's result: every directory of the branch by inode number."""

    dirs: dict[int, _Tree] = field(default_factory=dict)


class Sharer:
    def __init__(self, fs: Filesystem, enabled: bool = True, quiet: Callable[[], bool] | None = None) -> None:
        self.fs = fs
        self.enabled = enabled
        self.quiet = quiet or (lambda: True)
        self._walked_ino = 0  # the inode counter at the last walk
        self._pause = 0.0  # seconds to wait after a walk: 10x its duration
        self._walked_at = 0.0
        self.passes = 0
        self.copies_shared = 0
        self.walk_s = 0.0
        self.share_s = 0.0  # longest verification + commit (the event loop waits that long)
        self._sources: set[int] = set()  # originals of every range (never shared as copies)
        self._interrupt = False  # set on the loop, read by the walk's thread
        self._failed: set[tuple[int, int, bytes]] = set()  # (copy, original, fingerprint) that did not verify

    def figures(self) -> dict[str, object]:
        return {**self.fs.store.meta.shared.figures(), "passes": self.passes,
                "copies_shared": self.copies_shared, "walk_s": round(self.walk_s, 3),
                "longest_share_s": round(self.share_s, 3)}

    # -- 1. in a thread: fingerprints ----------------------------------------------------------
    def walk(self, lv: LayerView, interruptible: bool = False) -> Walk | None:
        """Fingerprint every directory subtree visible in lv (pure KV reads: hints); None if
        interruptible and requests arrived meanwhile (the walk holds the GIL most of the time)."""
        faults.point("share_walk")
        meta = self.fs.store.meta
        shared = meta.shared
        out = Walk()
        # Post-order without recursion: a directory is finished when its children are.
        stack: list[tuple[int, int, list[tuple[bytes, int]] | None, Attrs]] = []
        found = meta.get(CF_INODES, ino_key(ROOT_INO), lv)
        if not found or not found[1]:
            return out
        stack.append((ROOT_INO, 0, None, Attrs.unpack(found[1])))
        files: dict[int, tuple[bytes, bool]] = {}
        steps = 0
        while stack:
            steps += 1
            if interruptible and steps % 512 == 0 and self._interrupt:
                return None
            ino, parent, entries, a = stack[-1]
            if entries is None:
                entries = [(n, dirent_ino(v)) for n, v in meta.scan_names(CF_DIRENTS, ino, lv)]
                stack[-1] = (ino, parent, entries, a)
                for name, child in entries:
                    if child in out.dirs or child in files:
                        continue
                    c = meta.get(CF_INODES, ino_key(child), lv)
                    if not c or not c[1]:
                        continue
                    ca = Attrs.unpack(c[1])
                    if ca.is_dir:
                        stack.append((child, ino, None, ca))
                    else:
                        files[child] = (_file_fp(ca), shared.find(child) is not None)
                continue
            stack.pop()
            h = blake3.blake3(_FILE.pack(a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.mtime_ns, 0))
            inodes, is_shared = 1, shared.find(ino) is not None
            for name, child in entries:
                sub = out.dirs.get(child)
                if sub is not None:
                    fp, n, s = sub.fp, sub.inodes, sub.shared
                elif child in files:
                    (fp, s), n = files[child], 1
                else:
                    fp, n, s = b"?", 1, True  # vanished while we looked: never share this
                h.update(len(name).to_bytes(2, "big") + name + fp)
                inodes += n
                is_shared = is_shared or s
            out.dirs[ino] = _Tree(h.digest(length=16), inodes, parent, is_shared)
        return out

    # -- 2./3. on the loop, under the lock -------------------------------------------------------
    def candidates(self, w: Walk) -> list[tuple[int, int]]:
        """(copy, original) pairs, largest first, no copy inside another, no original a copy."""
        groups: dict[bytes, list[int]] = {}
        for ino, t in w.dirs.items():
            if MIN_INODES <= t.inodes <= MAX_INODES and not t.shared and ino != ROOT_INO:
                groups.setdefault(t.fp, []).append(ino)
        pairs = []
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort()
            pairs += [(y, members[0]) for y in members[1:]]
        pairs.sort(key=lambda p: -w.dirs[p[0]].inodes)
        return pairs

    def _inside(self, w: Walk, ino: int, marked: set[int]) -> bool:
        while ino and ino != ROOT_INO:
            if ino in marked:
                return True
            t = w.dirs.get(ino)
            ino = t.parent if t is not None else 0
        return False

    async def run_pass(self, interruptible: bool = False) -> int:
        """One pass; returns the number of copies shared."""
        fs = self.fs
        view = fs.primary
        if not view.writable:
            return 0
        t0 = time.perf_counter()
        walked = fs.store.next_ino
        self._interrupt = False
        async with trio.open_nursery() as nursery:
            if interruptible:
                nursery.start_soon(self._watch)
            w = await fs.store.in_thread(lambda: self.walk(view.lv, interruptible))
            nursery.cancel_scope.cancel()
        self.walk_s = time.perf_counter() - t0
        self._pause, self._walked_at = 10 * self.walk_s, time.monotonic()
        if w is None:
            return 0  # requests came: again at the next quiet moment
        self._walked_ino = walked
        self.passes += 1
        pairs = [p for p in self.candidates(w) if (p[0], p[1], w.dirs[p[0]].fp) not in self._failed]
        if not pairs:
            return 0
        done = 0
        copies: set[int] = set()
        originals: set[int] = set()
        meta = fs.store.meta
        async with fs.maintenance:
            self._sources = set(fs.store.meta.shared.sources())
            if any((meta.only_version(CF_INODES, ino_key(y)) or (0,))[0] == view.lv.top for y, _x in pairs):
                # Copies' records in the head: freeze it, so that their originals stay put.
                async with fs.mutate(view, fenced_ok=True) as m:
                    fs.freeze_head(m, view)
            for y, x in pairs:
                if self._inside(w, y, copies) or self._inside(w, y, originals) or self._inside(w, x, copies):
                    continue
                async with fs.exclusive():
                    t1 = time.perf_counter()
                    ok = self._share(view, y, x)
                    self.share_s = max(self.share_s, time.perf_counter() - t1)
                if ok:
                    copies.add(y)
                    originals.add(x)
                    done += 1
                else:
                    self._failed.add((y, x, w.dirs[y].fp))
                await trio.sleep(0)
        return done

    def _share(self, view: View, top: int, src: int) -> bool:
        """Verify that tree `top` is a copy of tree `src` as stored, and share it (one commit)."""
        fs = self.fs
        meta = fs.store.meta
        shared = meta.shared
        found = meta.only_version(CF_INODES, ino_key(top))
        if found is None:
            return False
        layer = found[0]
        if layer == view.lv.top or layer not in view.lv.ancestors:
            return False  # not frozen (or not ours): the original could still change under it
        plv = fs.store.catalog.layer_view(layer)
        sources = self._sources
        xmap: dict[int, int] = {}  # original -> copy
        ys: set[int] = set()
        pairs: list[tuple[int, int, int, int, bool]] = []  # (copy, original, its ctime, atime, same atime)
        entries: list[bytes] = []  # the copy's entry keys, deleted if it verifies
        stack = [(top, src)]
        while stack:
            y, x = stack.pop()
            if y in ys or x in xmap:
                return False  # hard links: not shared
            xmap[x] = y
            ys.add(y)
            if y == top:
                ya = Attrs.unpack(found[1])
            else:
                yv = meta.only_version(CF_INODES, ino_key(y))
                if yv is None or yv[0] != layer:
                    return False
                ya = Attrs.unpack(yv[1])
            if shared.find(y) is not None or shared.find(x) is not None or y in sources:
                return False
            node = view.nodes.get(y)
            if node is not None and (node.dirty or node.flushing or node.deleted):
                return False
            xv = meta.get(CF_INODES, ino_key(x), plv)
            if xv is None or not xv[1]:
                return False
            xa = Attrs.unpack(xv[1])
            if not _same(ya, xa) or (y != top and (ya.name != xa.name or ya.parent != xmap.get(xa.parent))):
                return False
            if not ya.is_dir and ya.nlink != 1:
                return False
            pairs.append((y, x, ya.ctime_ns, ya.atime_ns, ya.atime_ns == xa.atime_ns))
            if not ya.is_dir:
                continue
            yents = list(meta.name_versions(CF_DIRENTS, y))
            xents = list(meta.scan_names(CF_DIRENTS, x, plv))
            if len(yents) != len(xents):
                return False
            for (yname, ylayer, yval), (xname, xval) in zip(yents, xents):
                if ylayer != layer or yname != xname or not yval or yval[8:] != xval[8:]:
                    return False
                stack.append((dirent_ino(yval), dirent_ino(xval)))
                entries.append(name_key(y, yname))
        pairs.sort()
        atimes = [] if all(p[4] for p in pairs) else [p[3] for p in pairs]
        r = Range(layer, runs_of([(p[0], p[1]) for p in pairs]), [p[2] for p in pairs], atimes)
        batch = Batch()
        for y, *_rest in pairs:
            if y != top:
                Versioned.remove(batch, CF_INODES, ino_key(y), layer)
        for base in entries:
            Versioned.remove(batch, CF_DIRENTS, base, layer)
        # The copies' references to their data pass to the range (it holds one per copy
        # inode with data, as their records did): no reference count changes.
        shared.add(r, batch)
        try:
            fs.store.commit(batch)
            error = ""
        except Exception as exc:  # noqa: BLE001 - a failed write (a full disk): nothing was applied
            error = str(exc) or type(exc).__name__
        if error:
            fs.store.recover()  # outside the except block: no frame of it holds a database iterator
            raise FSError(errno.EIO, f"sharing a copied tree failed: {error}")
        shared.committed(added=[r])
        self._sources.update(p[1] for p in pairs)
        self.copies_shared += 1
        log.info("shared a copy of %d inodes (inode %d reads as %d of layer %d, %d runs)",
                 r.size, top, src, layer, len(r.runs))
        return True

    # -- scheduling ------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """While a background walk runs: stop it (through a flag its thread polls) when
        requests arrive."""
        while True:
            await trio.sleep(0.05)
            if not self.quiet():
                self._interrupt = True
                return

    def due(self) -> bool:
        return (self._created()
                and time.monotonic() - self._walked_at >= self._pause)

    def _created(self) -> bool:
        return self.enabled and self.fs.store.next_ino - self._walked_ino >= MIN_NEW

    async def run(self) -> None:
        """A pass when one is due and the mount quiet, looked at every POLL seconds while
        MIN_NEW inodes were made since the last walk; before that, asleep until a commit
        makes them (`Store.commits`), so an idle daemon's sharer never wakes."""
        while True:
            await self.fs.store.commits.until(self._created)
            await trio.sleep(POLL)
            if self.due() and self.quiet():
                try:
                    await self.run_pass(interruptible=True)
                except FSError as exc:  # a commit failed (a full disk): nothing was half-applied; later
                    log.error("sharer pass failed: %s", exc)

    async def settle(self) -> int:
        """A pass now if anything was created since the last one (for `cowfs dedup --wait`)."""
        if not self.enabled or self.fs.store.next_ino == self._walked_ino:
            return 0
        return await self.run_pass()


def _file_fp(a: Attrs) -> bytes:
    h = blake3.blake3(_FILE.pack(a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.mtime_ns,
                                 a.root.depth if a.root is not None else 0xFF))
    if a.root is not None:
        h.update(a.root.hash)
    h.update(a.target)
    return h.digest(length=16)


def _same(a: Attrs, b: Attrs) -> bool:
    """Equal but for the times a range keeps per copy (ctime, atime) and where they are linked."""
    return (a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.mtime_ns, a.root, a.target) == \
           (b.mode, b.uid, b.gid, b.nlink, b.rdev, b.size, b.mtime_ns, b.root, b.target)
