"""Pull: a commit's tree written into a directory (a branch of a store, mounted for it).

The directory holds either nothing known (every entry is written, whatever is there and not
in the tree is removed) or exactly an older commit's tree (a branch made from a local
snapshot that holds it): then subtrees whose id did not change are skipped whole, a file
whose entry changed is rewritten in place chunk by chunk where its chunk ids differ, and
only the chunks no unchanged place provides are fetched.  Every fetched chunk and tree is
checked against its id before anything is written from it.

Plan, then fetch, then write: the walk over both trees decides the operations and the
chunks they need; the chunks are fetched (ranged GETs, several at once) into a spool
directory of the local cache; the operations run in tree order, files by a few threads,
hard links and directory metadata last (children before parents).
"""
from __future__ import annotations

import base64
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

from cowfs.fleet.objects import CHUNK_SIZE, decode_tree, entry_chunks
from cowfs.fleet.remote import Remote
from cowfs.fleet.state import pack_chunks

Entry = dict[str, Any]


@dataclass
class PullStats:
    files_written: int = 0
    entries_kept: int = 0          # in unchanged subtrees or unchanged entries: not touched
    removed: int = 0
    meta_only: int = 0             # files whose content was in place: only metadata set
    trees_fetched: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0         # raw bytes of the chunks fetched
    bytes_downloaded: int = 0      # bytes of the ranged GETs of packs: trees and chunks as stored, range gaps
    chunks_reused: int = 0         # already in place in a file updated in place
    seconds: float = 0.0
    commit: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def _same(a: Entry | None, b: Entry | None) -> bool:
    return a is not None and b is not None and a == b


class Puller:
    def __init__(self, remote: Remote, progress: Callable[[int], None] = lambda n: None, workers: int = 4) -> None:
        self.remote = remote
        self.progress = progress
        self.workers = workers
        self.stats = PullStats()
        self.trees: dict[bytes, list[Entry]] = {}
        self.can_chown = os.geteuid() == 0
        # the plan
        self._ops: list[tuple[str, str, Entry, Entry | None]] = []
        self._need: dict[bytes, None] = {}
        self._files: list[tuple[str, Entry]] = []  # regular files written or given metadata

    # --- trees ------------------------------------------------------------------------------

    def _load_trees(self, pairs: list[tuple[bytes, bytes | None]]) -> None:
        """Fetch every tree the walk of (new, old) pairs will read, level by level."""
        while pairs:
            want = [h for n, o in pairs for h in (n, o) if h is not None and h not in self.trees]
            for h, raw in self.remote.fetch(want, "tree"):
                self.trees[h] = decode_tree(h, raw)
                self.stats.trees_fetched += 1
            nxt: list[tuple[bytes, bytes | None]] = []
            for n, o in pairs:
                if n == o:
                    continue
                old = {e["name"]: e for e in self.trees[o]} if o is not None else {}
                for e in self.trees[n]:
                    if e["type"] != "dir":
                        continue
                    oe = old.get(e["name"])
                    ot = bytes.fromhex(oe["tree"]) if oe is not None and oe["type"] == "dir" else None
                    nt = bytes.fromhex(e["tree"])
                    if nt != ot:
                        nxt.append((nt, ot))
            pairs = nxt

    # --- plan ---------------------------------------------------------------------------------

    def _plan_dir(self, path: str, new: bytes, old: bytes | None) -> None:
        """Operations that turn the directory at path (holding tree old, or unknown content
        when None) into tree new."""
        new_entries = self.trees[new]
        names = {e["name"] for e in new_entries}
        if old is not None:
            old_entries = {e["name"]: e for e in self.trees[old]}
            for name in old_entries:
                if name not in names:
                    self._ops.append(("remove", os.path.join(path, name), {}, None))
        else:
            old_entries = {}
            try:
                present = os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):   # made (or replaced) by the plan
                present = []
            for name in present:
                if name not in names:
                    self._ops.append(("remove", os.path.join(path, name), {}, None))
        for e in new_entries:
            p = os.path.join(path, e["name"])
            oe = old_entries.get(e["name"])
            if _same(e, oe):
                self.stats.entries_kept += 1
                continue
            if e["type"] == "dir":
                ot = bytes.fromhex(oe["tree"]) if oe is not None and oe["type"] == "dir" else None
                known = oe is not None or old is None
                self._ops.append(("mkdir", p, e, oe if known else None))
                nt = bytes.fromhex(e["tree"])
                if ot != nt:     # ot None: p holds nothing known (listed when planned)
                    self._plan_dir(p, nt, ot)
                self._ops.append(("dirmeta", p, e, oe))
                continue
            if e["type"] == "file" and e.get("link") not in (None, self._rel(p)):
                self._ops.append(("link", p, e, oe))
                continue
            if e["type"] == "file":
                in_place = (oe is not None and oe["type"] == "file" and "link" not in oe and "link" not in e)
                if in_place and oe["chunks"] == e["chunks"] and oe["size"] == e["size"]:
                    self._ops.append(("meta", p, e, oe))      # the content is in place already
                    continue
                old_chunks = entry_chunks(oe) if in_place else []
                for i, h in enumerate(entry_chunks(e)):
                    if h is None:
                        continue
                    if i < len(old_chunks) and old_chunks[i] == h:
                        self.stats.chunks_reused += 1
                        continue
                    self._need[h] = None
                self._ops.append(("file", p, e, oe if in_place else None))
            else:
                self._ops.append(("other", p, e, None))

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self._root)

    # --- apply --------------------------------------------------------------------------------

    def sync(self, root: str, new_root: Entry, old_root: Entry | None, spool_parent: str) -> PullStats:
        """Make the directory root hold new_root's tree (root holds old_root's, or unknown)."""
        t0 = time.monotonic()
        got = self.remote.bytes_got
        self._root = root
        new = bytes.fromhex(new_root["tree"])
        old = bytes.fromhex(old_root["tree"]) if old_root is not None else None
        self._load_trees([(new, old)])
        if new != old:
            self._plan_dir(root, new, old)
        os.makedirs(spool_parent, mode=0o700, exist_ok=True)
        spool = tempfile.mkdtemp(prefix="pull-", dir=spool_parent)
        try:
            for h, raw in self.remote.fetch(list(self._need), "chunk"):
                with open(os.path.join(spool, h.hex()), "wb") as f:
                    f.write(raw)
                self.stats.chunks_fetched += 1
                self.stats.bytes_fetched += len(raw)
            self._apply(spool)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        if not _same(new_root, old_root):
            self._meta(root, new_root, "dir")
        self.stats.bytes_downloaded = self.remote.bytes_got - got
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def cache_rows(self, store: str, snapshot_root: str) -> list[tuple[str, bytes, int, int, int, bytes]]:
        """Stat-cache rows (cowfs.fleet.state) for the files this pull wrote or set, as a push
        of the snapshot taken right after it sees them at snapshot_root: a push of that snapshot,
        or of a branch made from it, does not read them again.  Their stat is taken there, last,
        since hard links and metadata set after the writes move ctime."""
        rows = []
        for p, e in self._files:
            rel = self._rel(p)
            try:
                st = os.lstat(os.path.join(snapshot_root, rel))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size == int(e["size"]):
                rows.append((store, os.fsencode(rel), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                             pack_chunks(entry_chunks(e))))
        return rows

    def _apply(self, spool: str) -> None:
        old_umask = os.umask(0)
        later: list[tuple[str, str, Entry]] = []
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="pull-write") as pool:
                futures: list[Future[None]] = []
                for op, p, e, oe in self._ops:
                    if op == "remove":
                        remove_path(p)
                        self.stats.removed += 1
                    elif op == "mkdir":
                        self._mkdir(p)
                    elif op == "dirmeta":
                        later.append(("dirmeta", p, e))
                    elif op == "link":
                        remove_path(p)
                        later.append(("link", p, e))
                    elif op == "file":
                        futures.append(pool.submit(self._file, p, e, oe, spool))
                        self._files.append((p, e))
                    elif op == "meta":
                        self._meta(p, e, "file")
                        self.stats.meta_only += 1
                        self._files.append((p, e))
                    else:
                        self._other(p, e)
                errors = [f.exception() for f in futures]
            first = next((x for x in errors if x is not None), None)
            if first is not None:
                raise first
            for op, p, e in later:
                if op == "link":
                    os.link(os.path.join(self._root, e["link"]), p)
                    self.progress(e.get("size", 0))
            for op, p, e in reversed(later):
                if op == "dirmeta":
                    self._meta(p, e, "dir")
        finally:
            os.umask(old_umask)

    def _mkdir(self, p: str) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            os.mkdir(p, 0o700)
            return
        if not stat.S_ISDIR(st.st_mode):
            remove_path(p)
            os.mkdir(p, 0o700)
        else:
            os.chmod(p, 0o700)          # fill it whatever its mode; set at the end

    def _file(self, p: str, e: Entry, oe: Entry | None, spool: str) -> None:
        try:
            self._write(p, e, oe, spool)
            self._meta(p, e, "file")
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (pulling {p})") from None

    def _write(self, p: str, e: Entry, oe: Entry | None, spool: str) -> None:
        size = int(e["size"])
        old_chunks = entry_chunks(oe) if oe is not None else []
        if oe is not None and stat.S_ISREG(os.lstat(p).st_mode):
            os.chmod(p, 0o600)
            fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW)
        else:
            old_chunks = []
            if os.path.lexists(p):
                remove_path(p)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            for i, h in enumerate(entry_chunks(e)):
                length = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
                old = old_chunks[i] if i < len(old_chunks) else None
                if h == old:
                    continue
                if h is None:
                    if old is not None:
                        os.pwrite(fd, bytes(length), i * CHUNK_SIZE)
                    continue
                with open(os.path.join(spool, h.hex()), "rb") as f:
                    data = f.read()
                view = memoryview(data)
                off = i * CHUNK_SIZE
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self.stats.files_written += 1
        self.progress(size)

    def _other(self, p: str, e: Entry) -> None:
        if os.path.lexists(p):
            remove_path(p)
        t = e["type"]
        if t == "symlink":
            os.symlink(e["target"], p)
            self._meta(p, e, "link")
            return
        perm = e["mode"] & 0o777
        if t == "fifo":
            os.mkfifo(p, perm)
        else:
            fmt = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}[t]
            os.mknod(p, fmt | perm, int(e.get("rdev", 0)))
        self._meta(p, e, "special")

    def _meta(self, p: str, e: Entry, kind: str) -> None:
        """Owner, xattrs (stale ones removed), mode, then times (last: the others change ctime)."""
        if self.can_chown:
            st = os.lstat(p)
            if (st.st_uid, st.st_gid) != (e["uid"], e["gid"]):
                os.chown(p, e["uid"], e["gid"], follow_symlinks=False)
        if kind != "link":
            want = {n: base64.b64decode(v) for n, v in e.get("xattrs", {}).items()}
            try:
                have = os.listxattr(p, follow_symlinks=False)
            except OSError:
                have = []
            for n in have:
                if n not in want:
                    try:
                        os.removexattr(p, n, follow_symlinks=False)
                    except OSError:
                        pass
            for n, v in want.items():
                os.setxattr(p, n, v, follow_symlinks=False)
            os.chmod(p, e["mode"])
        os.utime(p, ns=(e["atime"], e["mtime"]), follow_symlinks=False)


def remove_path(p: str) -> None:
    """Remove p, whatever it is (a directory with all below it, read-only ones too); nothing if absent."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(p)
        return
    try:
        shutil.rmtree(p)
    except PermissionError:     # a read-only directory inside (not for root): open them up
        for d, _dirs, _files in os.walk(p):
            os.chmod(d, 0o700)
        shutil.rmtree(p)
