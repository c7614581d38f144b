"""Lazy mounts: a pushed snapshot mounted from its metadata alone, its chunks fetched on first read.

`build` (run by `cowfs mount REMOTE:SNAPSHOT MNT --store STORE` in the forked daemon, before
it opens the store: cowfs.daemon.process) fetches the commit and its trees only, and writes the snapshot's whole tree into branch main of a new store, in
process (no FUSE round trip): directories, files with their sizes, modes, owners, times and
xattrs, symlinks, special files, hard links.  Each file's chunk tree is the pushed chunk ids
(the local store's own ids: cowfs.fleet.objects), and each chunk the store lacks is stored as
an F object (cowfs.chunks.codec): where on the remote its bytes are (pack, offset, length,
encoding), taken from the pack indexes at build time.  The store's `lazy.json` names the
remote (and keeps the build's figures), so that the daemon serving the store sets a `RemoteFetcher` on its object store.

A read of an F chunk fetches it (cowfs.core.lazy: in a thread, ranged GETs), checks it
against its id and re-encodes it as a local object, so the second read is local; fsck
counts F objects as remote, the background workers leave them alone.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cowfs.chunks import codec
from cowfs.fleet import FleetError
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.model import load_model, seed
from cowfs.fleet.objects import CHUNK_SIZE, TYPE_CHUNK, TYPE_TREE, Loc, decode_tree, decode_warm, entry_chunks
from cowfs.fleet.state import State, pack_chunks

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.core.node import Node
    from cowfs.fleet.remote import Remote
    from cowfs.store import Store

LAZY_FILE = "lazy.json"
BATCH_ENTRIES = 4096    # entries the build writes per commit
DOWN_FOR = 2.0          # seconds a failed fetch makes the next ones fail at once (no event-loop stall)
RANGE_GAP = 16 << 10    # a read's GET covers blobs this close (a pull's: 256 KiB; reads want few extra bytes)
LANDED_MAX = 64 << 20   # bytes fetched by blocking reads (fetch_one) kept until a commit stores them
_FMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
        "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}


def source_of(store: str) -> dict[str, Any] | None:
    """The store's lazy.json (what it was lazily mounted from), or None for any other store."""
    try:
        return json.loads((Path(store) / LAZY_FILE).read_text())
    except FileNotFoundError:
        return None


def _remote_config(d: dict[str, Any]) -> RemoteConfig:
    return RemoteConfig(name=d["name"], url=d["url"], refs=d["refs"], endpoint=d.get("endpoint"))


class RemoteFetcher:
    """Fetches F chunks for one daemon (cowfs.chunks.objects.Fetcher).  Thread-safe: reads on
    the event loop hand whole batches to a thread (fetch_many); readahead and prefetch
    threads may call fetch_one."""

    def __init__(self, remotes: list[RemoteConfig]) -> None:
        self.configs = remotes
        self._remotes: dict[int, "Remote"] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_why = ""
        self.landed: dict[bytes, tuple[bytes, bytes]] = {}   # h -> (content, local encoding)
        self._landed_bytes = 0
        self.chunks_fetched = 0
        self.bytes_fetched = 0        # raw content of the chunks fetched
        self.bytes_transferred = 0    # what the ranged GETs returned (gaps between blobs included)
        self.gets = 0
        self.failures = 0

    @classmethod
    def for_source(cls, src: dict[str, Any]) -> "RemoteFetcher":
        """The fetcher of a store whose lazy.json (`source_of`) is src."""
        return cls([_remote_config(r) for r in src["remotes"]])

    def close(self) -> None:
        with self._lock:
            for r in self._remotes.values():
                r.close()
            self._remotes.clear()

    def figures(self) -> dict[str, Any]:
        return {"chunks_fetched": self.chunks_fetched, "bytes_fetched": self.bytes_fetched,
                "bytes_transferred": self.bytes_transferred, "gets": self.gets, "failures": self.failures,
                "remote": ", ".join(c.name for c in self.configs)}

    def _remote(self, source: int) -> "Remote":
        from cowfs.fleet.remote import Remote
        from cowfs.remote import Retry

        with self._lock:
            r = self._remotes.get(source)
            if r is None:
                if source >= len(self.configs):
                    raise codec.RemoteChunk(f"remote source {source} is not in the store's {LAZY_FILE}")
                # A read waits at most ~0.3 s of back-off (plus the timeouts) on a dead remote.
                r = self._remotes[source] = Remote(self.configs[source], retry=Retry(2, 0.1, 0.2),
                                                   connect_timeout=1.0, read_timeout=10.0)
            return r

    def fetch_many(self, items: list[tuple[bytes, bytes]], level: int) -> dict[bytes, tuple[bytes, bytes]]:
        """h -> (content, local encoding at zstd level) of F objects (h, record), each checked
        against h; ranged GETs merge neighbours of one pack.  codec.RemoteChunk (one line
        naming the remote and why) if any cannot be fetched."""
        out: dict[bytes, tuple[bytes, bytes]] = {}
        by_source: dict[int, list[tuple[bytes, Loc]]] = {}
        with self._lock:
            for h, raw in items:
                got = self.landed.pop(h, None)
                if got is not None:
                    self._landed_bytes -= len(got[0])
                    out[h] = got
        for h, raw in items:
            if h in out:
                continue
            loc = codec.remote_loc(raw)
            if loc is None:
                raise codec.RemoteChunk(f"chunk {h.hex()} is not a remote chunk")
            by_source.setdefault(loc.source, []).append(
                (h, Loc(loc.pack.hex(), TYPE_CHUNK, loc.enc, loc.offset, loc.length, loc.raw)))
        for source, located in by_source.items():
            name = self.configs[source].name if source < len(self.configs) else str(source)
            now = time.monotonic()
            if now < self._down_until:
                raise codec.RemoteChunk(f"chunk {located[0][0].hex()} is not fetched yet and the remote {name} "
                                        f"failed {now - (self._down_until - DOWN_FOR):.1f} s ago ({self._down_why})")
            try:
                r = self._remote(source)
                for h, data in r.fetch_located(located, "chunk", RANGE_GAP, self._got):
                    out[h] = (data, codec.encode_chunk(data, level))
                with self._lock:
                    self.chunks_fetched += len(located)
                    self.bytes_fetched += sum(loc.raw for _h, loc in located)
            except codec.RemoteChunk:
                raise
            except Exception as e:     # an engine down, a lost pack, damaged bytes: one line
                from cowfs.remote import one_line

                why = one_line(e)
                with self._lock:
                    self.failures += 1
                    self._down_until, self._down_why = time.monotonic() + DOWN_FOR, why
                raise codec.RemoteChunk(f"chunk {located[0][0].hex()} (and {len(located) - 1} more) could not be "
                                        f"fetched from the remote {name}: {why}") from None
        return out

    def _got(self, n: int) -> None:
        with self._lock:
            self.gets += 1
            self.bytes_transferred += n

    def fetch_one(self, h: bytes, raw: bytes) -> bytes:
        """A blocking fetch (a read path without an await: a truncate, a readahead thread);
        the chunk is kept in `landed` for the next commit of fetched chunks to store."""
        data, enc = self.fetch_many([(h, raw)], 3)[h]
        with self._lock:
            if self._landed_bytes + len(data) <= LANDED_MAX and h not in self.landed:
                self.landed[h] = (data, enc)
                self._landed_bytes += len(data)
        return data

    def take_landed(self) -> dict[bytes, tuple[bytes, bytes]]:
        with self._lock:
            out, self.landed, self._landed_bytes = self.landed, {}, 0
        return out


# --- the build ------------------------------------------------------------------------------------

def load_trees(r: "Remote", root: bytes, packs: list[str]) -> dict[bytes, list[dict[str, Any]]]:
    """Every tree under root.  The trees the commit's packs hold come first, all at once: a
    push writes a pack's trees together after its chunks, so a few ranged GETs in parallel
    bring them (instead of one round trip per level of the tree); what they lack (trees of
    packs the commit does not name: none for a push's own) is fetched level by level."""
    named = set(packs)
    held = dict(r.fetch([h for h, loc in r.index.items() if loc.kind == TYPE_TREE and loc.pack in named], "tree"))
    trees: dict[bytes, list[dict[str, Any]]] = {}
    level = [root]
    while level:
        want = [h for h in dict.fromkeys(level) if h not in trees]
        held.update(r.fetch([h for h in want if h not in held], "tree"))
        for h in want:
            trees[h] = decode_tree(h, held[h])
        level = [bytes.fromhex(e["tree"]) for h in want for e in trees[h] if e["type"] == "dir"]
    return trees


def load_warm(r: "Remote", commit: dict[str, Any]) -> list[bytes]:
    """The chunk ids of the cold start pushed with the commit (none for a commit without one)."""
    from cowfs.blob.base import BlobNotFound

    wid = commit.get("warm")
    if not wid:
        return []
    try:
        return decode_warm(wid, r.blobs.get("warm/" + wid))
    except BlobNotFound:
        raise FleetError(f"the remote {r.cfg.name} lacks warm/{wid}, which the commit names: run cowfs remote "
                         f"check {r.cfg.name}") from None


def warm_chunks_of(src: dict[str, Any]) -> list[bytes]:
    """The pushed cold start in a store's lazy.json (`source_of`), which its daemon fetches
    ahead (cowfs.background.lazy_warming)."""
    warm = src.get("warm") or {}
    return [bytes.fromhex(h) for h in warm.get("chunks", [])]


class Builder:
    """Writes a commit's tree into branch main of a store (in process, under trio.run)."""

    def __init__(self, fs: "Filesystem", r: "Remote", trees: dict[bytes, list[dict[str, Any]]]) -> None:
        self.fs = fs
        self.remote = r
        self.trees = trees
        self.files = self.dirs = self.links = self.other = self.remote_chunks = self.commits = 0
        self.bytes = 0
        self.model: dict[str, int] = {}    # the pushed prefetch model kept (cowfs.fleet.model.seed)
        # stat-cache rows (cowfs.fleet.state) of the files as the mount shows them: a push of
        # this tree (or of a fork of it) does not read, so does not fetch, what is unchanged
        self.rows: list[tuple[str, bytes, int, int, int, bytes]] = []
        # The chunks the store holds: those of the build's earlier commits (the store is new: a
        # set instead of a RocksDB read per chunk, 25,000 of them for issue 23's sandbox); a
        # chunk twice in one commit gets an F record each time, as it did before the set.
        self._stored: set[bytes] = set()
        self._new: set[bytes] = set()
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
            self._stored |= self._new
            self._new.clear()
        if links:
            async with fs.mutate(view) as m:
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
        import base64

        from cowfs.meta.versioned import CF_XATTRS, name_key

        for n, v in e.get("xattrs", {}).items():
            self.fs.store.meta.put(m.batch, CF_XATTRS, name_key(node.ino, os.fsencode(n)), node.view.lv.top,
                                   b"v" + base64.b64decode(v))

    def _content(self, m: Any, node: "Node", e: dict[str, Any], rel: str) -> None:
        """The file's chunk tree from its chunk ids; F objects for those the store lacks."""
        size = int(e["size"])
        encoded: dict[int, tuple[bytes, bytes | None] | None] = {}
        chunks = entry_chunks(e)
        self.rows.append((self.fs.store.path, os.fsencode(rel), size, e["mtime"], node.attrs.ctime_ns,
                          pack_chunks(chunks)))
        for i, h in enumerate(chunks):
            if h is None:
                continue
            if h in self._stored:
                encoded[i] = (h, None)
                continue
            loc = self.remote.locate(h, "chunk")
            raw = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
            if loc.raw != raw:
                raise FleetError(f"chunk {h.hex()} of {e['name']!r} is {loc.raw} bytes on the remote, its file "
                                 f"needs {raw} there")
            value = codec.encode_remote(codec.RemoteLoc(0, loc.enc, loc.raw, loc.offset, loc.length,
                                                        bytes.fromhex(loc.pack)))
            encoded[i] = (h, value)
            self._new.add(h)
            self.remote_chunks += 1
        node.attrs.size = size  # flush_node_into saves this size but leaves the node's as it finds it
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


def build(store_path: str, cfg: RemoteConfig, snapshot: str) -> dict[str, Any]:
    """Fetch the snapshot's commit and trees, create the store and write the tree into it,
    and name the remote in the store's lazy.json.  Figures of what it did (also in lazy.json)."""
    import trio

    from cowfs.core.filesystem import Filesystem
    from cowfs.fleet.remote import Remote
    from cowfs.store import Store, init_store

    t0 = time.monotonic()
    with Remote(cfg) as r:
        cid = r.get_ref("snap", snapshot)
        if cid is None:
            have = ", ".join(n for n, _c in r.list_refs("snap")) or "none"
            raise FleetError(f"the remote {cfg.name} has no snapshot named {snapshot!r} (it has: {have})")
        commit = r.commit(cid)
        r.index_commit(commit)      # the indexes of the packs the commit names (all, for an old commit)
        indexes = len(r.packs)
        trees = load_trees(r, bytes.fromhex(commit["root"]["tree"]), commit.get("packs") or [])
        warm = load_warm(r, commit)
        try:        # only predictions are lost without it: the build goes on, saying why
            model, model_error = load_model(r, commit), None
        except FleetError as e:
            model, model_error = None, str(e)
        t_meta = time.monotonic() - t0
        t1 = time.monotonic()
        with _uncollected():
            init_store(store_path)
        store: "Store" = Store(os.path.abspath(store_path))
        try:
            async def work() -> Builder:
                b = Builder(Filesystem(store, "main"), r, trees)
                await b.run(commit["root"])
                b.model = seed(b.fs, b.inos, model) if model else {}
                return b
            b = trio.run(work)
        finally:
            with _uncollected():
                store.close()
        t_build = time.monotonic() - t1
        state = State()
        try:
            state.remember_chunks(b.rows)
            state.set_origin(os.path.abspath(store_path), "main", r.key, cid)   # a push's parent commit
        finally:
            state.close()
        key = r.key
    figures = {"commit": cid, "trees": len(trees), "indexes": indexes, "files": b.files, "dirs": b.dirs,
               "hard_links": b.links, "other": b.other, "commits": b.commits, "remote_chunks": b.remote_chunks,
               "warm_chunks": len(warm), "model_files": b.model.get("files", 0),
               "model_transitions": b.model.get("transitions", 0), "bytes": b.bytes, "metadata_seconds": round(t_meta, 3),
               "build_seconds": round(t_build, 3), "seconds": round(time.monotonic() - t0, 3)}
    doc = {"version": 1,
           "remotes": [{"name": cfg.name, "url": cfg.url, "refs": cfg.refs, "endpoint": cfg.endpoint}],
           "remote_key": key, "snapshot": snapshot, "commit": cid, "built": time.time(), "build": figures}
    if warm:
        doc["warm"] = {"object": commit["warm"], "chunks": [h.hex() for h in warm]}
    if model_error:
        doc["model_error"] = model_error
    tmp = Path(store_path) / (LAZY_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, Path(store_path) / LAZY_FILE)
    return figures

