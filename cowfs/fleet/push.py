"""Push: a snapshot, read through its mount with plain POSIX calls, into the remote's packs,
trees and a commit; then one compare-and-set of the references that name it.

Order (what makes an interrupted push harmless and resumable):
1. read the pack indexes of the parent commit's packs (what the remote has of the tree this
   one was made from: chunk and tree ids; with no parent, those of the commit the local branch
   was pulled from or last pushed as), or every pack index of the remote when there is none
   or it names no packs (a first push: whatever the remote has is found);
2. walk the snapshot depth-first in name order; a file's chunk ids come from the stat cache
   when its stat is unchanged and the remote has them all, else from reading it; every chunk
   and tree the remote lacks goes into a pack;
3. each sealed pack is uploaded, then its index (write-once names: an object already there
   is skipped, a repeated upload of the same bytes is a no-op);
4. the commit object, naming its packs: for each chunk and tree of the tree, the pack it was
   put in or found in; 5. the references, by compare-and-set.
Until 5 nothing names the new objects: a push killed anywhere before leaves the references as
they were, and the packs it completed (with their indexes) are found by the next push that
reads every index (a first push), which uploads only the rest; a fork's push (one with a
parent) does not see them and uploads its few new blobs again.
"""
from __future__ import annotations

import base64
import os
import socket
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from cowfs.chunks.codec import chunk_hash
from cowfs.fleet.model import encode_model
from cowfs.fleet.objects import (CHUNK_SIZE, PACK_TARGET, TYPE_CHUNK, TYPE_TREE, PackBuilder,
                                 encode_blob, encode_commit, encode_tree, encode_warm, tree_hash)
from cowfs.fleet.remote import Remote
from cowfs.fleet.state import State, pack_chunks, unpack_chunks

_READ = 1 << 20
_ZERO = bytes(CHUNK_SIZE)


@dataclass
class PushStats:
    files: int = 0
    dirs: int = 0
    other: int = 0                      # symlinks, special files
    files_read: int = 0                 # read through the mount
    files_cached: int = 0               # chunk ids from the stat cache, not read
    bytes_read: int = 0
    chunks_new: int = 0                 # chunks and trees the remote lacked
    chunks_skipped: int = 0             # the remote had them (or this push already had them)
    trees_new: int = 0
    trees_skipped: int = 0
    raw_bytes_new: int = 0              # content bytes of the new chunks and trees
    objects_uploaded: int = 0           # S3 objects put: packs, indexes, the commit
    objects_skipped: int = 0            # found on the remote already (a resumed push)
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    seconds: float = 0.0
    commit: str = ""
    tree: str = ""
    warm_files: int = 0                 # files of the learned cold start sent with it (warm/<id>)
    warm_chunks: int = 0
    model_files: int = 0                # files of the learned prefetch model sent with it (model/<id>)
    model_transitions: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def entry_meta(path: bytes, st: os.stat_result, name: bytes) -> dict[str, Any]:
    """The metadata every entry carries (name, type, mode, owner, times, xattrs)."""
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock"}.get(fmt)
    if kind is None:
        raise OSError(f"unknown file type {oct(fmt)}: {os.fsdecode(path)}")
    e: dict[str, Any] = {"name": os.fsdecode(name), "type": kind, "mode": stat.S_IMODE(st.st_mode),
                         "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns, "atime": st.st_atime_ns}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    xattrs = {}
    for n in sorted(names):
        try:
            xattrs[n] = base64.b64encode(os.getxattr(path, n, follow_symlinks=False)).decode()
        except OSError:
            continue
    if xattrs:
        e["xattrs"] = xattrs
    if kind == "symlink":
        e["target"] = os.fsdecode(os.readlink(path))
    elif kind in ("chr", "blk"):
        e["rdev"] = st.st_rdev
    elif kind == "file":
        e["size"] = st.st_size
    return e


class Pusher:
    """One push: reads a tree, fills packs, uploads them (a few at a time)."""

    def __init__(self, remote: Remote, state: State, store: str, progress: Callable[[int], None] = lambda n: None,
                 workers: int = 4) -> None:
        self.remote = remote
        self.state = state
        self.store = store
        self.progress = progress
        self.stats = PushStats()
        self._lock = threading.Lock()
        self._queued: set[bytes] = set()
        self._builder = PackBuilder()
        self._readers = ThreadPoolExecutor(workers, thread_name_prefix="push-read")
        self._uploaders = ThreadPoolExecutor(2, thread_name_prefix="push-upload")
        self._in_flight = threading.BoundedSemaphore(3)    # packs held in memory for upload
        self._uploads: list[Future[None]] = []
        self._links: dict[tuple[int, int], tuple[str, Future[list[bytes | None]]]] = {}
        self._cache_rows: list[tuple[str, bytes, int, int, int, bytes]] = []
        self.packs: set[str] = set()      # the packs holding the tree's blobs: the commit names them
        # The learned cold start's files (relative paths): their chunk ids, as the walk finds them
        self.warm_want: set[bytes] = set()
        self.warm_found: dict[bytes, list[bytes | None]] = {}

    # --- the walk ---------------------------------------------------------------------------

    def push_tree(self, root: str) -> tuple[bytes, dict[str, Any]]:
        """(root tree id, root entry) of the tree at root, every blob of it on the remote."""
        t0 = time.monotonic()
        try:
            rootb = os.fsencode(root)
            st = os.lstat(rootb)
            tree = self._dir(rootb, b"")
            entry = entry_meta(rootb, st, b"")
            entry["tree"] = tree.hex()
            self._seal()
            for f in self._uploads:
                f.result()
        finally:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._uploaders.shutdown(wait=True, cancel_futures=True)
            if self._cache_rows:
                self.state.remember_chunks(self._cache_rows)
        self.stats.seconds += time.monotonic() - t0
        self.stats.tree = tree.hex()
        return tree, entry

    def _dir(self, path: bytes, rel: bytes) -> bytes:
        entries: list[dict[str, Any]] = []
        files: list[tuple[dict[str, Any], Future[list[bytes | None]]]] = []
        for name in sorted(os.listdir(path)):
            p = path + b"/" + name
            r = rel + b"/" + name if rel else name
            try:
                st = os.lstat(p)
                e = entry_meta(p, st, name)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (pushing {os.fsdecode(p)})") from None
            entries.append(e)
            if e["type"] == "dir":
                e["tree"] = self._dir(p, r).hex()
                continue
            if e["type"] != "file":
                self.stats.other += 1
                continue
            self.stats.files += 1
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in self._links:
                    first, fut = self._links[key]
                    e["link"] = first
                    files.append((e, fut))
                    continue
                e["link"] = os.fsdecode(r)
            fut = self._readers.submit(self._file, p, r, st)
            if st.st_nlink > 1:
                self._links[(st.st_dev, st.st_ino)] = (os.fsdecode(r), fut)
            files.append((e, fut))
        for e, fut in files:
            chunks = fut.result()
            e["chunks"] = [None if h is None else h.hex() for h in chunks]
            if self.warm_want:
                r = rel + b"/" + os.fsencode(e["name"]) if rel else os.fsencode(e["name"])
                if r in self.warm_want:
                    self.warm_found[r] = chunks
        raw = encode_tree(entries)
        h = tree_hash(raw)
        self._add(h, TYPE_TREE, raw)
        self.stats.dirs += 1
        return h

    def _file(self, path: bytes, rel: bytes, st: os.stat_result) -> list[bytes | None]:
        try:
            return self._chunks(path, rel, st)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (pushing {os.fsdecode(path)})") from None

    def _chunks(self, path: bytes, rel: bytes, st: os.stat_result) -> list[bytes | None]:
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        packed = self.state.cached_chunks(self.store, rel, key)
        if packed is not None:
            cached = unpack_chunks(packed)
            with self._lock:
                have = all(h is None or h in self.remote.index or h in self._queued for h in cached)
                if have:
                    self._found(cached)
                    self.stats.files_cached += 1
                    self.stats.chunks_skipped += sum(h is not None for h in cached)
            if have:
                self.progress(st.st_size)
                return cached
        out: list[bytes | None] = []
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            off = 0
            while True:
                buf = os.pread(fd, _READ, off)
                if not buf:
                    break
                for i in range(0, len(buf), CHUNK_SIZE):
                    piece = buf[i:i + CHUNK_SIZE]
                    if piece == _ZERO[:len(piece)]:
                        out.append(None)
                    else:
                        h = chunk_hash(piece)
                        out.append(h)
                        self._add(h, TYPE_CHUNK, piece)
                off += len(buf)
                self.progress(len(buf))
        finally:
            os.close(fd)
        if off != st.st_size:
            raise OSError(0, f"read {off} bytes of a file of {st.st_size} (did it change?)")
        with self._lock:
            self.stats.files_read += 1
            self.stats.bytes_read += off
            self._cache_rows.append((self.store, rel, *key, pack_chunks(out)))
        return out

    # --- packs --------------------------------------------------------------------------------

    def _add(self, h: bytes, kind: bytes, raw: bytes) -> None:
        new = kind == TYPE_TREE
        with self._lock:
            if h in self.remote.index or h in self._queued:
                self._found([h])
                if new:
                    self.stats.trees_skipped += 1
                else:
                    self.stats.chunks_skipped += 1
                return
            self._queued.add(h)
        enc, stored = encode_blob(raw)
        with self._lock:
            self._builder.add(h, kind, enc, stored, len(raw))
            if new:
                self.stats.trees_new += 1
            else:
                self.stats.chunks_new += 1
            self.stats.raw_bytes_new += len(raw)
            full = self._builder.size >= PACK_TARGET
        if full:
            self._seal()

    def _found(self, hashes: list[bytes | None]) -> None:
        """Blobs the remote has (or this push's packs will): their packs are the commit's
        (under the lock; a blob queued but not sealed yet is in a pack of this push)."""
        for h in hashes:
            loc = self.remote.index.get(h) if h is not None else None
            if loc is not None:
                self.packs.add(loc.pack)

    def _seal(self) -> None:
        with self._lock:
            if not self._builder.entries:
                return
            builder, self._builder = self._builder, PackBuilder()
        pack, data, index, _hashes = builder.seal()
        with self._lock:
            self.packs.add(pack)
        for f in self._uploads:          # fail the push at the first failed upload
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        self._in_flight.acquire()
        self._uploads.append(self._uploaders.submit(self._upload, pack, data, index))

    def _upload(self, pack: str, data: bytes, index: bytes) -> None:
        try:
            self.put("data/" + pack, data)
            self.put("index/" + pack, index)
            with self._lock:
                self.remote.remember_index(pack, index)
        finally:
            self._in_flight.release()

    def put(self, name: str, data: bytes) -> None:
        """Upload a write-once object unless the remote has it (a resumed push)."""
        if self.remote.blobs.exists(name):
            with self._lock:
                self.stats.objects_skipped += 1
                self.stats.bytes_skipped += len(data)
            return
        self.remote.blobs.put(name, data)
        with self._lock:
            self.stats.objects_uploaded += 1
            self.stats.bytes_uploaded += len(data)


def make_commit(tree: bytes, root: dict[str, Any], parent: str | None, snapshot: str,
                branch: str | None, packs: set[str], warm: str | None = None,
                model: str | None = None) -> tuple[str, bytes]:
    doc = {"v": 1, "tree": tree.hex(), "root": root, "parent": parent, "snapshot": snapshot,
           "branch": branch, "host": socket.gethostname(), "created_ns": time.time_ns(), "packs": sorted(packs)}
    if warm is not None:
        doc["warm"] = warm
    if model is not None:
        doc["model"] = model
    return encode_commit(doc)


def warm_chunks(pusher: Pusher, files: list[tuple[str, list[int]]]) -> tuple[list[bytes], int]:
    """The learned cold start's chunk ids in its order (each once; holes and chunks past a
    file's end left out), and how many of its files the tree holds."""
    out: dict[bytes, None] = {}
    n = 0
    for path, numbers in files:
        chunks = pusher.warm_found.get(os.fsencode(path))
        if chunks is None:
            continue
        n += 1
        for i in numbers:
            if 0 <= i < len(chunks) and chunks[i] is not None:
                out[chunks[i]] = None     # type: ignore[index]
    return list(out), n


def read_parent(remote: Remote, parent: str | None, origin: str | None) -> str | None:
    """Read what the remote has for a push whose tree was made from commit `parent` (or, when
    the parent is unknown, from `origin`: the commit the local branch was pulled from or last
    pushed as): that commit's packs' indexes, or every index when there is none or it names
    none.  The parent, or None when the remote no longer has it (deleted and gc'd: a parent
    is only a hint)."""
    from cowfs.fleet import FleetError

    def read(cid: str | None) -> dict[str, Any] | None:
        try:
            return remote.commit(cid) if cid else None
        except FleetError:
            return None
    doc = read(parent)
    if doc is None:
        parent = None
        doc = read(origin)
    if doc is not None and doc.get("packs") is not None:
        try:
            remote.load_packs(doc["packs"])
            return parent
        except FleetError:      # a pack of it gc'd meanwhile: read everything
            pass
    remote.load_index()
    return parent


def push(remote: Remote, state: State, store: str, branch: str, snapshot: str, root: str, ref_name: str,
         remote_branch: str | None, progress: Callable[[int], None] = lambda n: None,
         warm: list[tuple[str, list[int]]] | None = None, mount_holder: str | None = None,
         model: dict[str, Any] | None = None) -> PushStats:
    """Push the tree at root (snapshot `snapshot` of local branch `branch` of store) as the
    remote's snapshot ref_name and, with remote_branch, move that remote branch to it: by
    compare-and-set from the commit this local branch last saw there (RefConflict if it moved).
    warm: the branch's learned cold start (the control file's `coldstart`: paths under root
    with chunk numbers), sent as the commit's warm object.
    mount_holder: how the daemon of the mount pushed from names itself as a holder
    (fleet/holds.py): its hold of remote_branch counts as this push's.  model: the branch's
    learned prefetch model as paths under root (`coldstart`'s `model`), sent as `model/<id>`.
    Registered as a push in flight for its whole length (no gc meanwhile)."""
    with remote.pushing() as lease:
        return _push(remote, state, store, branch, snapshot, root, ref_name, remote_branch, progress,
                     (lease.fence, mount_holder), warm or [], model)


def _push(remote: Remote, state: State, store: str, branch: str, snapshot: str, root: str, ref_name: str,
          remote_branch: str | None, progress: Callable[[int], None], fences: tuple[Any, str | None],
          warm: list[tuple[str, list[int]]], model: dict[str, Any] | None = None) -> PushStats:
    from cowfs.fleet import RefConflict

    fence, mount_holder = fences
    hold = remote.hold_fence(remote_branch, mount_holder) if remote_branch else None     # refused early if held
    base = state.base(store, branch, remote.key, remote_branch) if remote_branch else None
    origin = state.origin(store, branch, remote.key)
    parent = read_parent(remote, base if remote_branch else origin, origin)
    pusher = Pusher(remote, state, store, progress)
    pusher.warm_want = {os.fsencode(p) for p, _n in warm}
    tree, root_entry = pusher.push_tree(root)
    t0 = time.monotonic()
    wid = None
    chunks, pusher.stats.warm_files = warm_chunks(pusher, warm)
    if chunks:
        wid, wdata = encode_warm(chunks, pusher.stats.warm_files)
        pusher.put("warm/" + wid, wdata)
        pusher.stats.warm_chunks = len(chunks)
    mid = None
    if model and model.get("next") and any(bits for _p, bits in model["files"]):
        # (without transitions, or without a file whose reads it recorded, it predicts nothing)
        mid, mdata = encode_model(model["files"], model["next"])
        pusher.put("model/" + mid, mdata)
        pusher.stats.model_files = len(model["files"])
        pusher.stats.model_transitions = sum(c for _i, succ in model["next"] for _j, c in succ)
    cid, data = make_commit(tree, root_entry, parent, snapshot, remote_branch, pusher.packs, wid, mid)
    existing = remote.get_ref("snap", ref_name)
    if existing is not None and remote.commit(existing)["tree"] != tree.hex():
        raise RefConflict(f"the remote {remote.cfg.name} has a snapshot {ref_name} already, of other content "
                          f"(commit {existing}); push under another name with --as NAME")
    if existing is not None and not remote_branch:
        cid = existing                 # the same tree pushed before: nothing to change
    else:
        pusher.put("commit/" + cid, data)
        snap = None if existing is not None else ("snap", ref_name, cid, None)
        if remote_branch:
            remote.set_ref("branch", remote_branch, cid, base, also=snap, fences=(fence, hold))
        else:
            remote.set_ref("snap", ref_name, cid, None, fences=(fence,))
        state.set_origin(store, branch, remote.key, cid)
    if remote_branch:
        state.set_base(store, branch, remote.key, remote_branch, cid)
        state.set_tie(store, branch, remote.cfg, remote_branch)
    state.set_synced(store, snapshot, remote.key, existing or cid)
    pusher.stats.commit = cid
    pusher.stats.seconds += time.monotonic() - t0
    return pusher.stats
