"""The build of a lazy mount (cowfs.fleet.lazy): a pushed snapshot's whole tree written into
branch main of a new store from its metadata alone, in process (no FUSE round trip):
directories, files with their sizes, modes, owners, times and xattrs, symlinks, special files,
hard links; each file's chunks F objects (where on the remote their bytes are).

`build` runs in the forked daemon, which then serves the store the build leaves open
(cowfs.daemon.process).  The metadata (the commit, the pack indexes it names, every tree) is
fetched by a child process forked at the build's start (cowfs.fleet.lazyfetch), while the
daemon imports what it needs and creates and opens the store: two cores for the two halves
of the ready time, where threads would share one (the GIL); the child hands back what it
fetched in an in-memory file, then writes the files' stat-cache rows while the daemon writes
the tree (every node the build makes has the build's start as its ctime, known to both).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from cowfs.chunks import codec
from cowfs.fleet import FleetError
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.lazy import LAZY_FILE
from cowfs.fleet.lazyfetch import Fetch, Metadata, Trees
from cowfs.fleet.model import seed
from cowfs.fleet.objects import CHUNK_SIZE, Loc, entry_chunks
from cowfs.fleet.state import State

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.node import Node
    from cowfs.store import Store

BUILDING_FILE = "lazy.building"   # in a store while its build runs: the builder's pid, what it builds
BATCH_ENTRIES = 4096    # entries the build writes per commit
_CLOCK_REALTIME_COARSE = 5  # the clock of cowfs.core.txn.now_ns (not imported before the fork: it imports trio)
_FMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
        "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}


class Builder:
    """Writes a commit's tree into branch main of a store (in process, under trio.run)."""

    def __init__(self, fs: "Filesystem", meta: Metadata, trees: Trees, ctime: int) -> None:
        self.fs = fs
        self.meta = meta
        self.ctime = ctime      # of every node made (stat_rows: the child's rows have it)
        self.trees = trees      # the snapshot's, decoded
        self.files = self.dirs = self.links = self.other = self.remote_chunks = self.commits = 0
        self.bytes = 0
        self.model: dict[str, int] = {}    # the pushed prefetch model kept (cowfs.fleet.model.seed)
        # The objects the store holds: those the build's earlier commits brought (the store is
        # new: a set instead of a RocksDB read per chunk, 25,000 of them for issue 23's sandbox);
        # a chunk twice in one commit gets an F record each time, as it did before the set.
        # What a commit brings beyond them is known absent (RefTxn.absent): its count is not read.
        self._stored: set[bytes] = set()
        self.inos: dict[str, int] = {}     # a file's path -> its inode (the pushed prefetch model's paths)

    async def run(self, root_entry: dict[str, Any]) -> None:
        from cowfs.store import ROOT_INO

        fs = self.fs
        view = fs.primary
        root = fs.node(view, ROOT_INO)
        if fs.list_dir(root):
            raise FleetError("the store's branch main is not empty: a lazy mount builds into a new store")
        links: list[tuple["Node", bytes, dict[str, Any]]] = []
        firsts: dict[str, "Node"] = {}
        async with fs.mutate(view) as m:
            m.now = self.ctime
            self._attrs(root, root_entry)
            root.attrs.nlink = 2 + self._subdirs(root_entry)
            self._xattrs(m, root, root_entry)
            m.save(root)
        # Every node is saved once, by the commit that makes it, with its final link count (a
        # directory's: 2 + its subdirectories, known from its tree); a commit takes directories
        # until it holds about BATCH_ENTRIES entries.
        stack = [(root, bytes.fromhex(root_entry["tree"]), "")]
        while stack:
            async with fs.mutate(view) as m:
                m.now = self.ctime
                n = 0
                while stack and n < BATCH_ENTRIES:
                    parent, th, rel = stack.pop()
                    n += len(self.trees[th])
                    for e in self.trees[th]:
                        p = f"{rel}/{e['name']}" if rel else e["name"]
                        name = os.fsencode(e["name"])
                        t = e["type"]
                        if t == "file" and e.get("link") not in (None, p):
                            links.append((parent, name, e))
                            continue
                        node = fs.nodes.new(m, parent, _FMT[t] | e["mode"], e["uid"], e["gid"],
                                            int(e.get("rdev", 0)), os.fsencode(e["target"]) if t == "symlink" else b"")
                        self._attrs(node, e)
                        m.link(parent, name, node)
                        self._xattrs(m, node, e)
                        if t == "dir":
                            node.attrs.nlink = 2 + self._subdirs(e)
                            m.save(node)
                            stack.append((node, bytes.fromhex(e["tree"]), p))
                            self.dirs += 1
                        elif t == "file":
                            self._content(m, node, e, p)
                            self.inos[p] = node.ino
                            if "link" in e:
                                firsts[p] = node
                            self.files += 1
                        else:
                            m.save(node)
                            self.other += 1
                self.commits += 1
                m.txn.absent = m.txn.new.keys() - self._stored
            self._stored.update(m.txn.new)
        if links:
            async with fs.mutate(view) as m:
                m.now = self.ctime
                for parent, name, e in links:
                    node = firsts.get(e["link"])
                    if node is None:
                        raise FleetError(f"the tree's hard link {e['name']!r} names {e['link']!r}, "
                                         "which it does not hold")
                    node.attrs.nlink += 1
                    fs.namespace.more_names(m, node, parent, name)
                    m.link(parent, name, node)
                    m.save(node)
                    self.links += 1

    def _subdirs(self, e: dict[str, Any]) -> int:
        return sum(c["type"] == "dir" for c in self.trees[bytes.fromhex(e["tree"])])

    @staticmethod
    def _attrs(node: "Node", e: dict[str, Any]) -> None:
        """Exactly the entry's owner, mode and times (nodes.new applies a setgid parent's rules)."""
        a = node.attrs
        a.mode = stat.S_IFMT(a.mode) | e["mode"]
        a.uid, a.gid = e["uid"], e["gid"]
        a.atime_ns, a.mtime_ns = e["atime"], e["mtime"]

    def _xattrs(self, m: Any, node: "Node", e: dict[str, Any]) -> None:
        if "xattrs" not in e:       # most entries: no imports run per entry
            return
        import base64

        from cowfs.meta.versioned import CF_XATTRS, name_key

        for n, v in e["xattrs"].items():
            self.fs.store.meta.put(m.batch, CF_XATTRS, name_key(node.ino, os.fsencode(n)), node.view.lv.top,
                                   b"v" + base64.b64decode(v))

    def _content(self, m: Any, node: "Node", e: dict[str, Any], rel: str) -> None:
        """The file's chunk tree from its chunk ids; F objects for those the store lacks."""
        size = int(e["size"])
        encoded: dict[int, tuple[bytes, bytes | None] | None] = {}
        chunks = entry_chunks(e)
        for i, h in enumerate(chunks):
            if h is None:
                continue
            if h in self._stored:
                encoded[i] = (h, None)
                continue
            fields = self.meta.chunks.get(h)
            if fields is None:
                raise FleetError(f"the remote {self.meta.remote} lacks the chunk {h.hex()} (no pack index "
                                 f"names it): run cowfs remote check {self.meta.remote}")
            loc = Loc._make(fields)
            raw = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
            if loc.raw != raw:
                raise FleetError(f"chunk {h.hex()} of {e['name']!r} is {loc.raw} bytes on the remote, its file "
                                 f"needs {raw} there")
            value = codec.encode_remote(codec.RemoteLoc(0, loc.enc, loc.raw, loc.offset, loc.length,
                                                        bytes.fromhex(loc.pack)))
            encoded[i] = (h, value)
            self.remote_chunks += 1
        node.attrs.size = size  # flush_node_into saves this size but leaves the node's as it finds it
        # A new node's allocation, loaded before it has a tree: 0 without a refs read of a root
        # the store does not hold yet (which would find no record: 0 all the same)
        self.fs.usage.allocated(node)
        self.fs.flusher.flush_node_into(m, node, encoded, size)
        self.bytes += size


@contextlib.contextmanager
def _uncollected() -> Iterator[None]:
    """Closing a store collects garbage (cowfs.kv.rocks: the database's handles); the build's
    trees and index are live, not garbage: kept out of that walk (0.15-0.45 s of 10,000 entries)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """The build allocates ~10 objects per entry and frees almost none until it ends (trees,
    index, nodes): every automatic collection walks that growing heap for nothing (the
    sandbox's 32,226 entries: ~40% of the build's CPU).  Explicit collections (a store's
    close) still run.  What is live at the end (the open store's caches, the daemon's imports)
    goes to the oldest generation unwalked (freeze, unfreeze): left in the youngest, the first
    collections once the collector is back would walk all of it, during the daemon's start."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if was:
            gc.enable()


def build(store_path: str, cfg: RemoteConfig, snapshot: str, cache: tuple[int, int] = (256 << 20, 256 << 20),
          meanwhile: Callable[[], None] | None = None) -> "tuple[Store, dict[str, Any]]":
    """Fetch the snapshot's commit and trees (a child process), create the store and write the
    tree into it, and name the remote in the store's lazy.json.  `meanwhile` (the daemon's
    imports) runs while the child fetches; cache: the store's chunk cache sizes (the daemon's,
    Store's cache_l1 and cache_l2).  The store stays open for the caller (the daemon serves
    it: no close, whose memtable flush and reopen cost ~0.3 s of the ready time), its writes
    durable (the WAL synced) before lazy.json says it is built.  Returns it with figures of
    what the build did (also in lazy.json)."""
    t0 = time.monotonic()
    ctime = time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
    abs_store = os.path.abspath(store_path)
    with _collector_off():
        fetch = Fetch(cfg, snapshot, abs_store, ctime)
        try:
            import trio

            from cowfs.core.filesystem import Filesystem
            from cowfs.store import Store, init_store

            if meanwhile is not None:
                meanwhile()
            with _uncollected():
                init_store(store_path)
            (Path(store_path) / BUILDING_FILE).write_text(json.dumps({"pid": os.getpid(), "remote": cfg.name,
                                                                      "snapshot": snapshot}) + "\n")
            store = Store(abs_store, cache_l1=cache[0], cache_l2=cache[1])
            try:
                t_open = time.monotonic() - t0
                meta, trees = fetch.result()
                t1 = time.monotonic()

                async def work() -> Builder:
                    b = Builder(Filesystem(store, "main"), meta, trees, ctime)
                    await b.run(meta.commit["root"])
                    b.model = seed(b.fs, b.inos, meta.model) if meta.model else {}
                    await store.sync()      # durable before lazy.json names the store built
                    return b
                b = trio.run(work)
                t_build = time.monotonic() - t1
                fetch.rows()
                state = State()
                try:
                    state.set_origin(abs_store, "main", meta.key, meta.commit_id)   # a push's parent
                finally:
                    state.close()
                figures = {"commit": meta.commit_id, "trees": len(trees), "indexes": meta.indexes,
                           "files": b.files, "dirs": b.dirs, "hard_links": b.links, "other": b.other,
                           "commits": b.commits, "remote_chunks": b.remote_chunks, "warm_chunks": len(meta.warm),
                           "model_files": b.model.get("files", 0),
                           "model_transitions": b.model.get("transitions", 0), "bytes": b.bytes,
                           "metadata_seconds": round(meta.seconds, 3), "open_seconds": round(t_open, 3),
                           "waited_seconds": round(t1 - t0 - t_open, 3), "build_seconds": round(t_build, 3),
                           "seconds": round(time.monotonic() - t0, 3)}
                doc = {"version": 1,
                       "remotes": [{"name": cfg.name, "url": cfg.url, "refs": cfg.refs, "endpoint": cfg.endpoint}],
                       "remote_key": meta.key, "snapshot": snapshot, "commit": meta.commit_id, "built": time.time(),
                       "build": figures}
                if meta.warm:
                    doc["warm"] = {"object": meta.commit["warm"], "chunks": [h.hex() for h in meta.warm]}
                if meta.model_error:
                    doc["model_error"] = meta.model_error
                tmp = Path(store_path) / (LAZY_FILE + ".tmp")
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                os.replace(tmp, Path(store_path) / LAZY_FILE)
                os.unlink(Path(store_path) / BUILDING_FILE)
            except BaseException:
                with _uncollected():
                    store.close()
                if fetch.answered:      # its rows may be written: they go with the store
                    fetch.close()
                    _forget_rows(abs_store)
                raise
        finally:
            fetch.close()
    return store, figures


def _forget_rows(store: str) -> None:
    """Drop the stat-cache rows of a store whose build failed (the child may have written
    them); if that fails too, the build's own error is the one reported (rows of a store that
    is gone match no file: their ctime is that build's)."""
    try:
        state = State()
        try:
            state.forget_store(store)
        finally:
            state.close()
    except (OSError, sqlite3.Error):
        pass


def remove_built(store: str, keep_dir: bool) -> None:
    """Remove what a build made in store (the directory too unless keep_dir: it was there
    before); what cannot go stays (a failed build's error is the one to report)."""
    from cowfs.fleet.pull import remove_path

    for p in ([os.path.join(store, n) for n in os.listdir(store)] if keep_dir else [store]):
        with contextlib.suppress(OSError):
            remove_path(p)


def clear_half_built(store: str) -> dict[str, Any] | None:
    """A store that a build killed midway left (its BUILDING_FILE, no lazy.json) is emptied for
    a new build: its BUILDING_FILE's contents, or None for any other store.  FleetError if
    its builder still runs."""
    try:
        half = json.loads((Path(store) / BUILDING_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    if (Path(store) / LAZY_FILE).exists():
        return None
    try:
        os.kill(half["pid"], 0)
    except ProcessLookupError:
        remove_built(store, keep_dir=True)
        return half
    except PermissionError:
        pass
    raise FleetError(f"{store} is being built by process {half['pid']} (a lazy mount of {half['remote']}:"
                     f"{half['snapshot']}): wait for it, or choose another --store")
