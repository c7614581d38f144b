"""A lazy mount's metadata (cowfs.fleet.lazybuild): the snapshot's commit, the pack indexes it
names and every tree, fetched by a child process (`Fetch`) forked at the build's start while
the daemon imports what it needs and creates and opens the store; the child then writes the
files' stat-cache rows (`stat_rows`) while the daemon writes the tree."""
from __future__ import annotations

import contextlib
import marshal
import os
import re
import signal
import struct
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from cowfs.fleet import FleetError
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.model import load_model
from cowfs.fleet.objects import TYPE_CHUNK, TYPE_TREE, CorruptObject, decode_tree, decode_warm, entry_chunks
from cowfs.fleet.state import State, pack_chunks

if TYPE_CHECKING:
    from cowfs.fleet.remote import Remote

_PR_SET_PDEATHSIG = 1   # prctl(2)


# GETs of the metadata in flight at once (indexes, trees, the cold start, the model): 8 cost
# more CPU (connections, GIL switches) than they saved, the fetch being CPU-bound here
FETCHERS = 4
Trees = dict[bytes, list[dict[str, Any]]]   # tree id -> its entries (cowfs.fleet.objects.decode_tree)
RawTrees = dict[bytes, bytes]               # tree id -> its JSON, checked against the id
# A directory entry's tree in a tree's canonical JSON (objects.encode_tree: no spaces, quotes
# in strings escaped, so this only matches the key): the walk of the child, which leaves the
# JSON's decoding to the daemon.
_SUBTREE = re.compile(rb'"tree":"([0-9a-f]{64})"')


def subtrees(raw: bytes) -> list[bytes]:
    """The ids of the trees a tree's directories have."""
    return [bytes.fromhex(m.decode()) for m in _SUBTREE.findall(raw)]


def load_trees(r: "Remote", root: bytes, packs: list[str] | None, pool: ThreadPoolExecutor,
               sent: Callable[[RawTrees], None] = lambda part: None) -> RawTrees:
    """The indexes of the packs the commit names (all of the remote's for a commit that names
    none) and every tree under root, checked, not decoded.  A push writes a pack's trees
    together after its chunks, so each pack's trees are fetched (a ranged GET or a few) as
    soon as its index is in, while the other indexes still come: index and tree GETs overlap
    instead of one phase after the other; sent(part) as each pack's trees are in.  What those
    packs lack (trees of packs the commit does not name: none for a push's own) is fetched
    level by level."""
    held: RawTrees = {}
    if packs is None:
        r.load_index()      # every index of the remote (a commit from before pushes named packs)
    else:
        pending = {pool.submit(r.pack_index, p): p for p in r.leaves(packs) if p not in r.packs}
        trees_of: set[Future] = set()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for job in done:
                pack = pending.pop(job)
                if job in trees_of:
                    part = job.result()
                    held.update(part)
                    sent(part)
                    continue
                entries = job.result()
                r.add_index(pack, entries)
                located = [(h, loc) for h, loc in entries.items() if loc.kind == TYPE_TREE]
                if located:
                    more = pool.submit(lambda lo: dict(r.fetch_located(lo, "tree", others=False)), located)
                    trees_of.add(more)
                    pending[more] = pack
    trees: RawTrees = {}
    level = [root]
    while level:
        want = [h for h in dict.fromkeys(level) if h not in trees]
        held.update(r.fetch([h for h in want if h not in held], "tree"))
        for h in want:
            trees[h] = held[h]
        level = [c for h in want for c in subtrees(trees[h])]
    return trees


def decoded(raw: RawTrees, root: bytes, ready: Trees | None = None) -> Trees:
    """The trees under root decoded (those in ready already are); CorruptObject if one does
    not decode or is missing."""
    ready = ready or {}
    out: Trees = {}
    level = [root]
    while level:
        want = [h for h in dict.fromkeys(level) if h not in out]
        for h in want:
            got = ready.get(h)
            if got is None:
                if h not in raw:
                    raise CorruptObject(f"tree {h.hex()}: missing from the snapshot's metadata")
                got = decode_tree(h, raw[h])
            out[h] = got
        level = [bytes.fromhex(e["tree"]) for h in want for e in out[h] if e["type"] == "dir"]
    return out


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


def stat_rows(store: str, trees: dict[bytes, list[dict[str, Any]]], root: bytes,
              ctime: int) -> list[tuple[str, bytes, int, int, int, bytes]]:
    """The stat-cache rows (cowfs.fleet.state) of the tree's files as its build makes them in
    store (a hard-linked file's under its first name; ctime: the build's): a push of this
    tree (or of a fork of it) does not read, so does not fetch, what is unchanged."""
    rows = []
    stack = [(root, "")]
    while stack:
        th, rel = stack.pop()
        for e in trees[th]:
            p = f"{rel}/{e['name']}" if rel else e["name"]
            if e["type"] == "dir":
                stack.append((bytes.fromhex(e["tree"]), p))
            elif e["type"] == "file" and e.get("link") in (None, p):
                rows.append((store, os.fsencode(p), int(e["size"]), e["mtime"], ctime, pack_chunks(entry_chunks(e))))
    return rows


class Metadata(NamedTuple):
    """What the build needs from the remote, fetched by `fetch_metadata`."""
    remote: str                                 # the remote's name (for errors)
    key: str                                    # Remote.key: the machine state's name of it
    commit_id: str
    commit: dict[str, Any]
    indexes: int                                # pack indexes read
    trees: RawTrees                             # every tree under the root, checked, not decoded
    chunks: dict[bytes, tuple]                  # every chunk the indexes name -> where it is (a Loc's fields)
    warm: list[bytes]
    model: dict[str, Any] | None                # the pushed prefetch model (cowfs.fleet.model)
    model_error: str | None                     # why it could not be had (the build goes on)
    seconds: float


def fetch_metadata(cfg: RemoteConfig, snapshot: str, sent: Callable[[Trees], None] = lambda part: None) -> Metadata:
    """The snapshot's commit, the indexes of the packs it names and every tree (sent: as
    `load_trees`, before the whole is returned)."""
    from cowfs.fleet.remote import Remote

    t0 = time.monotonic()
    # Round trips overlapped: the gc's forwards (an etcd read the indexes need) beside the
    # snapshot's reference and commit; the cold start and the model beside the indexes and trees.
    with Remote(cfg, workers=FETCHERS) as r, ThreadPoolExecutor(FETCHERS) as pool:
        forwards = pool.submit(r.forwards)
        cid = r.get_ref("snap", snapshot)
        if cid is None:
            have = ", ".join(n for n, _c in r.list_refs("snap")) or "none"
            raise FleetError(f"the remote {cfg.name} has no snapshot named {snapshot!r} (it has: {have})")
        commit = r.commit(cid)
        warm_job = pool.submit(load_warm, r, commit)
        model_job = pool.submit(load_model, r, commit)
        forwards.result()
        trees = load_trees(r, bytes.fromhex(commit["root"]["tree"]), commit.get("packs"), pool, sent)
        warm = warm_job.result()
        try:        # only predictions are lost without it: the build goes on, saying why
            model, model_error = model_job.result(), None
        except FleetError as e:
            model, model_error = None, str(e)
        chunks = {h: tuple(loc) for h, loc in r.index.items() if loc.kind == TYPE_CHUNK}
        return Metadata(cfg.name, r.key, cid, commit, len(r.packs), trees, chunks, warm, model, model_error,
                        time.monotonic() - t0)


_LEN = struct.Struct("<Q")      # a part's length, after "T" on the pipe


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int, n: int) -> bytes:
    """n bytes of the pipe (fewer: the child died)."""
    out = b""
    while len(out) < n:
        got = os.read(fd, n - len(out))
        if not got:
            break
        out += got
    return out


def _pread_all(fd: int, n: int, at: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, n - len(out), at + len(out))
        if not got:
            break
        out += got
    return bytes(out)


def _die_with(parent: int) -> None:
    """This process gets SIGKILL when its parent dies (a daemon killed during its build)."""
    from cowfs.libc import libc

    libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:      # it died before the prctl
        os._exit(1)


class Fetch:
    """`fetch_metadata` in a child process forked now; `result` waits for its answer,
    marshalled (plain values: 3x faster than pickle here) into an in-memory file made before
    the fork (a pipe would pass the ~9 MiB of issue 23's sandbox 64 KiB per scheduling
    round), then "M" on a pipe.  The trees come first, checked and not decoded, a part as
    each pack's are in (each appended to the file, then "T" and its length on the pipe):
    `result` unmarshals and decodes them while the child still fetches (the JSON of the
    sandbox's 9,593 trees: ~0.25 s of CPU, off the child's path and so off the ready time's;
    and their unmarshal, 0.07-0.13 s decoded, after the answer before); the answer then
    holds only the trees not sent.  The child then writes the files' stat-cache rows (`stat_rows`, ctime the
    build's) while the daemon writes the tree, says any error on the pipe and exits (`rows`
    waits for that).  It never touches the store: it is forked before the store is opened,
    and leaves by os._exit."""

    def __init__(self, cfg: RemoteConfig, snapshot: str, store: str, ctime: int) -> None:
        from cowfs.remote import one_line

        self.fd = os.memfd_create("cowfs-lazy-metadata", os.MFD_CLOEXEC)
        self.rfd, wfd = os.pipe2(os.O_CLOEXEC)
        self.answered = False      # the child's answer read: it may have written rows since
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                _die_with(parent)
                meta = None
                given: set[bytes] = set()

                def send(part: RawTrees) -> None:
                    data = marshal.dumps(part)
                    _write_all(self.fd, data)
                    os.write(wfd, b"T" + _LEN.pack(len(data)))
                    given.update(part)
                try:
                    meta = fetch_metadata(cfg, snapshot, send)
                    rest = meta._replace(trees={h: t for h, t in meta.trees.items() if h not in given})
                    answer: tuple[str, Any] = ("ok", tuple(rest))
                except Exception as e:      # noqa: BLE001 - the parent raises it, one line
                    answer = ("error", one_line(e))
                _write_all(self.fd, marshal.dumps(answer))
                os.write(wfd, b"M")
                if meta is not None:
                    try:
                        root = bytes.fromhex(meta.commit["root"]["tree"])
                        state = State()
                        try:
                            state.remember_chunks(stat_rows(store, decoded(meta.trees, root), root, ctime))
                        finally:
                            state.close()
                        code = 0
                    except Exception as e:  # noqa: BLE001 - the parent raises it, one line
                        os.write(wfd, one_line(e).encode())
            finally:
                os._exit(code)
        os.close(wfd)

    def result(self) -> tuple[Metadata, Trees]:
        """The child's Metadata and the snapshot's trees decoded (those sent before the answer
        decoded as they came: the daemon's idle time while the child fetches); FleetError
        with the child's error (or its death, or a tree that does not decode) otherwise."""
        raw: RawTrees = {}
        ready: Trees = {}
        at = 0
        try:
            while True:
                said = os.read(self.rfd, 1)
                if said != b"T":
                    break
                (n,) = _LEN.unpack(_read_all(self.rfd, _LEN.size))
                part: RawTrees = marshal.loads(_pread_all(self.fd, n, at))
                at += n
                for h, doc in part.items():
                    try:
                        ready[h] = decode_tree(h, doc)
                    except CorruptObject:       # an error if the snapshot's tree reaches it
                        raw[h] = doc
            data = _pread_all(self.fd, os.fstat(self.fd).st_size - at, at)
        finally:
            os.close(self.fd)
            self.fd = -1
        if said != b"M" or not data:
            raise FleetError(f"the process fetching the snapshot's metadata died without an answer "
                             f"(wait status {self._reap()})")
        kind, value = marshal.loads(data)
        if kind != "ok":
            raise FleetError(value)
        self.answered = True
        meta = Metadata._make(value)
        raw.update(meta.trees)
        return meta, decoded(raw, bytes.fromhex(meta.commit["root"]["tree"]), ready)

    def rows(self) -> None:
        """Wait for the child's stat-cache rows; FleetError with its error (or its death)."""
        said = b"".join(iter(lambda: os.read(self.rfd, 4096), b""))
        status = self._reap()
        if status:
            raise FleetError("the stat cache of the build's files could not be written: "
                             f"{said.decode(errors='replace') or f'its process died (wait status {status})'}")

    def _reap(self) -> int:
        _pid, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return status

    def close(self) -> None:
        """Stop the child if it still runs (the build failed first), reap it, drop the files."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        for fd in (self.fd, self.rfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.rfd = -1
