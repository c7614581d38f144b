"""One opened remote: its objects (an S3BlobStore on BUCKET/PREFIX), its references (an EtcdKV
with the families `snap` and `branch`, under the etcd key prefix `cowfs-fleet/BUCKET/PREFIX/`,
so one etcd can serve several remotes; `lock`, `condemned` and `gc` are the gc's) and the union of
the pack indexes read so far: a commit's own packs for push, pull and a lazy mount
(`index_commit`: a commit names the packs its tree's blobs are in), all of them for check and gc.

A pack a gc repacked (cowfs.fleet.repack) has a forward: the packs that hold its live blobs
now, in the remote's forwards object `forwards/<id>` that the etcd key `gc/forwards` names.
Readers (`load_packs`, `load_index`) take those packs' indexes instead of the repacked one's,
which the gc deletes after its grace period; a fetch from a pack found gone meanwhile (a lazy
mount's chunk records name packs) follows them too.

References are the only mutable state of a remote and change only by compare-and-set
(`set_ref`); a reference's value is a commit id.  Indexes are immutable, so each is fetched
once and kept in the local cache ($XDG_CACHE_HOME/cowfs/fleet/<remote id>/index/).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from cowfs.fleet import FleetError, RefConflict
from cowfs.fleet.config import RemoteConfig, cache_dir
from cowfs.fleet.objects import TYPE_TREE, Loc, decode_blob, decode_commit, decode_forwards, decode_index
from cowfs.remote import OutcomeUnknown

REF_FAMILIES = ("snap", "branch")        # the names: each value a commit id
# lock: push/<id> per push in flight and gc while a gc runs, each under an etcd lease (gone
# with its process); condemned: <object name> -> when a gc found it unreachable; gc: forwards
# -> the id of the current forwards object (cowfs.fleet.repack).
FAMILIES = REF_FAMILIES + ("lock", "condemned", "gc")
PUSH_TTL = 20
HOLD_ENV = "COWFS_FLEET_HOLD"     # set by `cowfs remote hold` for its command: the hold it has


def hold_key(branch: str) -> bytes:
    return b"branch/" + branch.encode()


def refs_prefix(cfg: RemoteConfig) -> bytes:
    """The etcd key prefix of a remote's references (one etcd can serve several remotes)."""
    return f"cowfs-fleet/{cfg.bucket}/{cfg.prefix}".rstrip("/").encode() + b"/"


def this_holder() -> str:
    """How this process names itself as the holder of a lock (shown to whoever is refused)."""
    return f"{socket.gethostname()} pid {os.getpid()}"


_RANGE_GAP = 256 << 10       # blobs of a pack closer than this are fetched in one ranged GET
_RANGE_MAX = 16 << 20


class Remote:
    def __init__(self, cfg: RemoteConfig, workers: int = 4, **blob_options: Any) -> None:
        """blob_options: for the S3BlobStore (a lazy mount's reads use a shorter retry)."""
        from cowfs.blob.s3 import S3BlobStore
        from cowfs.kv.etcd import EtcdKV

        self.cfg = cfg
        self.workers = workers
        self.blobs = S3BlobStore(cfg.bucket, cfg.prefix, endpoint_url=cfg.endpoint, **blob_options)
        where = f"{cfg.bucket}/{cfg.prefix}".rstrip("/")
        self.refs = EtcdKV(cfg.refs, FAMILIES, refs_prefix(cfg))
        # What identifies the remote in the local state (not its name: names can be re-added).
        self.key = f"{self.blobs.endpoint}/{where}"
        ident = hashlib.sha256(self.key.encode()).hexdigest()[:16]
        self.cache = cache_dir() / "fleet" / ident
        self.index: dict[bytes, Loc] = {}
        self.packs: set[str] = set()
        self._listed = False         # every index of the remote read (load_index)
        self.by_pack: dict[str, dict[bytes, Loc]] | None = None     # per pack, when the gc asks (check.mark)
        self._moved: dict[str, list[str]] | None = None   # forwards: repacked pack -> packs holding its blobs
        self.forwards_id: str | None = None               # the forwards object they came from
        self._relocated: dict[str, dict[bytes, Loc]] = {}  # a gone pack's blobs, where its forwards put them
        # Trees a ranged GET for other trees covered (a pack keeps its trees together): decoded
        # and checked then, handed out once by fetch instead of fetched again.
        self._passing: dict[bytes, bytes] = {}
        self._tree_locs: dict[str, list[tuple[Loc, bytes]]] | None = None     # pack -> its trees by offset
        self._passing_lock = threading.Lock()
        self.bytes_got = 0           # bytes of the ranged GETs of packs (data/) made by fetch
        self._commits: dict[str, dict[str, Any]] = {}     # read already (immutable, named by their hash)

    def close(self) -> None:
        self.blobs.close()
        self.refs.close()

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- indexes ----------------------------------------------------------------------------

    def load_index(self, progress: Callable[[int], None] = lambda n: None, everything: bool = False) -> int:
        """Read every pack index of the remote (LIST `index/`; each fetched unless cached); how
        many.  What check and gc need (everything: repacked packs' too), and the fallback for a
        commit that names no packs (not the repacked ones: their blobs may be gone by the time
        they are read, and a push must not find there a blob the repack did not keep)."""
        names = [e.name[len("index/"):] for e in self.blobs.list("index/")]
        if not everything:
            moved = self.forwards()
            names = [n for n in names if n not in moved]
        self._load(names, progress)
        self._listed = True
        return len(names)

    def forwards(self, again: bool = False) -> dict[str, list[str]]:
        """Repacked pack -> the packs holding its live blobs now: the forwards object the etcd
        key gc/forwards names (read once unless again; each object fetched once per host:
        it is immutable).  FleetError if that object is missing or damaged."""
        from cowfs.blob.base import BlobNotFound

        if self._moved is None or again:
            fid = self.refs.get("gc", b"forwards")
            moved: dict[str, list[str]] = {}
            if fid is not None:
                fid_s = fid.decode(errors="replace")
                if len(fid_s) != 64 or fid_s.strip("0123456789abcdef"):
                    raise FleetError(f"the remote {self.cfg.name}'s key gc/forwards holds {fid_s!r}, not an object id: "
                                     f"run cowfs remote check {self.cfg.name}")
                f = self.cache / "forwards" / fid_s
                try:
                    data = f.read_bytes() if f.exists() else self.blobs.get("forwards/" + fid_s)
                except BlobNotFound:
                    raise FleetError(f"the remote {self.cfg.name} lacks forwards/{fid_s}, its current forwards of "
                                     f"repacked packs: run cowfs remote check {self.cfg.name}") from None
                moved = decode_forwards(fid_s, data)
                if not f.exists():
                    self._cache_file("forwards", fid_s, data)
            self._moved, self.forwards_id = moved, None if fid is None else fid.decode()
        return self._moved

    def forget_forwards(self) -> None:
        """Go on as if no pack were repacked (`remote check`, once it reported forwards it cannot read)."""
        self._moved, self.forwards_id = {}, None

    def leaves(self, packs: Iterable[str]) -> list[str]:
        """The packs readers take for these: each repacked one replaced by its forwards' packs,
        again while those were repacked too."""
        moved = self.forwards()
        out: dict[str, None] = {}
        seen: set[str] = set()
        todo = list(packs)
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            if p in moved:
                todo.extend(moved[p])
            else:
                out[p] = None
        return list(out)

    def load_packs(self, packs: Iterable[str], progress: Callable[[int], None] = lambda n: None) -> None:
        """Read the indexes of these packs, a repacked one's forwards instead of its own (from
        the local cache when there, no LIST): the union index then locates every blob they
        hold.  FleetError if one is missing."""
        self._load(self.leaves(packs), progress)

    def pack_index(self, pack: str) -> dict[bytes, Loc]:
        """One pack's index, from the local cache or fetched (checked before it is cached);
        FleetError if missing."""
        from cowfs.blob.base import BlobNotFound

        f = self.cache / "index" / pack
        if f.exists():
            return decode_index(pack, f.read_bytes())
        try:
            data = self.blobs.get("index/" + pack)
        except BlobNotFound:
            raise FleetError(f"the remote {self.cfg.name} lacks the pack index index/{pack}: run cowfs remote "
                             f"check {self.cfg.name}") from None
        entries = decode_index(pack, data)
        self._cache_index(pack, data)
        return entries

    def _load(self, packs: Iterable[str], progress: Callable[[int], None]) -> None:
        names = [p for p in dict.fromkeys(packs) if p not in self.packs]
        with ThreadPoolExecutor(self.workers) as pool:
            for pack, entries in zip(names, pool.map(self.pack_index, names)):
                self.add_index(pack, entries)
                progress(1)

    def index_commit(self, doc: dict[str, Any]) -> None:
        """Make every blob of a commit's tree locatable (`locate`, `fetch`): the indexes of the
        packs the commit names (its push recorded them), or, for a commit made before pushes
        recorded them, every index of the remote."""
        packs = doc.get("packs")
        if packs is None:
            if not self._listed:
                self.load_index()
        else:
            self.load_packs(packs)

    def add_index(self, pack: str, entries: dict[bytes, Loc]) -> None:
        for h, loc in entries.items():
            self.index.setdefault(h, loc)
        if self.by_pack is not None:
            self.by_pack[pack] = entries
        self.packs.add(pack)
        self._tree_locs = None

    def remember_index(self, pack: str, data: bytes) -> None:
        """An index this process uploaded: into the cache and the union without a fetch."""
        self._cache_index(pack, data)
        self.add_index(pack, decode_index(pack, data))

    def _cache_index(self, pack: str, data: bytes) -> None:
        self._cache_file("index", pack, data)

    def _cache_file(self, kind: str, name: str, data: bytes) -> None:
        """Into the local cache, whole or not at all (a name there is a complete object)."""
        d = self.cache / kind
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, d / name)

    # --- blobs ------------------------------------------------------------------------------

    def locate(self, h: bytes, what: str) -> Loc:
        loc = self.index.get(h)
        if loc is None:
            raise FleetError(f"the remote {self.cfg.name} lacks the {what} {h.hex()} (no pack index "
                             f"names it): run cowfs remote check {self.cfg.name}")
        return loc

    def fetch(self, hashes: list[bytes], what: str) -> Iterator[tuple[bytes, bytes]]:
        """(hash, raw bytes) of each blob, verified, fetched with ranged GETs that cover
        neighbouring blobs of one pack together, several at a time.  Fetching trees, the other
        trees a range covers are kept (checked) and handed out by a later call without a GET:
        a pull reads the trees level by level, and one level's ranges cover the next levels'."""
        located = []
        for h in dict.fromkeys(hashes):
            with self._passing_lock:
                raw = self._passing.pop(h, None)
            if raw is not None:
                yield h, raw
            else:
                located.append((h, self.locate(h, what)))
        yield from self.fetch_located(located, what)

    def fetch_located(self, located: list[tuple[bytes, Loc]], what: str,
                      gap: int = _RANGE_GAP, on_get: Callable[[int], None] = lambda n: None,
                      others: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """fetch() of blobs whose places are known (a lazy mount keeps each chunk's); one GET
        covers blobs of a pack less than gap bytes apart; on_get(bytes) after each GET.
        others=False: the other trees a range covers are not kept (a caller that asks for
        every tree of the pack, while the union index still grows in another thread)."""
        by_pack: dict[str, list[tuple[Loc, bytes]]] = {}
        for h, loc in located:
            by_pack.setdefault(loc.pack, []).append((loc, h))
        trees = self._trees_by_pack() if what == "tree" and others else {}
        ranges: list[list[tuple[Loc, bytes]]] = []
        for items in by_pack.values():
            items.sort(key=lambda x: x[0].offset)
            cur: list[tuple[Loc, bytes]] = []
            for loc, h in items:
                if cur and (loc.offset - (cur[-1][0].offset + cur[-1][0].length) > gap
                            or loc.offset + loc.length - cur[0][0].offset > _RANGE_MAX):
                    ranges.append(cur)
                    cur = []
                cur.append((loc, h))
            ranges.append(cur)

        def get(run: list[tuple[Loc, bytes]]) -> list[tuple[bytes, bytes]]:
            from cowfs.blob.base import BlobNotFound

            start = run[0][0].offset
            end = run[-1][0].offset + run[-1][0].length
            pack = run[0][0].pack
            try:
                if pack in self._relocated:
                    raise BlobNotFound("data/" + pack)
                data = self.blobs.get("data/" + pack, start, end - start)
            except BlobNotFound:
                return self._moved_run(pack, run, what, on_get, others)
            on_get(len(data))
            with self._passing_lock:
                self.bytes_got += len(data)
            out = [(h, decode_blob(loc, data[loc.offset - start:loc.offset - start + loc.length], h))
                   for loc, h in run]
            wanted = {h for _loc, h in run}
            for loc, h in trees.get(run[0][0].pack, ()):
                if start <= loc.offset and loc.offset + loc.length <= end and h not in wanted:
                    raw = decode_blob(loc, data[loc.offset - start:loc.offset - start + loc.length], h)
                    with self._passing_lock:
                        self._passing.setdefault(h, raw)
            return out
        if len(ranges) == 1:        # a lazy mount's read: no pool to start
            yield from get(ranges[0])
            return
        with ThreadPoolExecutor(self.workers) as pool:
            for out in pool.map(get, ranges):
                yield from out

    def _moved_run(self, pack: str, run: list[tuple[Loc, bytes]], what: str,
                   on_get: Callable[[int], None], others: bool = True) -> list[tuple[bytes, bytes]]:
        """The blobs of a run whose pack is gone, fetched where the gc's forwards of it put
        them (a lazy mount's chunk records, or an index read before the repack, name the old
        pack); FleetError if the pack was not repacked or its forwards lack one."""
        with self._passing_lock:
            where = self._relocated.get(pack)
        if where is None:
            if pack not in self.forwards() and pack not in self.forwards(again=True):
                raise FleetError(f"the remote {self.cfg.name} lacks the pack data/{pack} that holds the {what} "
                                 f"{run[0][1].hex()}: run cowfs remote check {self.cfg.name}")
            where = {}
            for leaf in self.leaves([pack]):
                for h, loc in self.pack_index(leaf).items():
                    where.setdefault(h, loc)
            with self._passing_lock:
                self._relocated[pack] = where
        located = []
        for _loc, h in run:
            if h not in where:
                raise FleetError(f"the remote {self.cfg.name} lacks the {what} {h.hex()}: its pack {pack} is gone "
                                 f"and the packs it was repacked into lack it: run cowfs remote check {self.cfg.name}")
            located.append((h, where[h]))
        return list(self.fetch_located(located, what, on_get=on_get, others=others))

    def _trees_by_pack(self) -> dict[str, list[tuple[Loc, bytes]]]:
        if self._tree_locs is None:
            by: dict[str, list[tuple[Loc, bytes]]] = {}
            for h, loc in self.index.items():
                if loc.kind == TYPE_TREE:
                    by.setdefault(loc.pack, []).append((loc, h))
            self._tree_locs = by
        return self._tree_locs

    def commit(self, cid: str) -> dict[str, Any]:
        """The commit cid, fetched once per process (a pull reads the pulled one, its parents
        walking to a local base and that base's root; refs may share one)."""
        from cowfs.blob.base import BlobNotFound

        if cid not in self._commits:
            try:
                self._commits[cid] = decode_commit(cid, self.blobs.get("commit/" + cid))
            except BlobNotFound:
                raise FleetError(f"the remote {self.cfg.name} lacks the commit {cid}: run cowfs remote "
                                 f"check {self.cfg.name}") from None
        return self._commits[cid]

    # --- references -------------------------------------------------------------------------

    def get_ref(self, family: str, name: str) -> str | None:
        v = self.refs.get(family, name.encode())
        return None if v is None else v.decode()

    def list_refs(self, family: str) -> list[tuple[str, str]]:
        return [(k.decode(errors="replace"), v.decode(errors="replace"))
                for k, v in self.refs.scan(family, b"")]

    def delete_ref(self, family: str, name: str) -> str:
        """Remove family/name (by compare-and-set on the value read); the commit it named."""
        from cowfs.kv.base import Batch, Conflict

        current = self.get_ref(family, name)
        if current is None:
            have = ", ".join(n for n, _c in self.list_refs(family)) or "none"
            raise FleetError(f"the remote {self.cfg.name} has no {'branch' if family == 'branch' else 'snapshot'} "
                             f"named {name!r} (it has: {have})")
        batch = Batch()
        batch.delete(family, name.encode())
        try:
            self.refs.write(batch, [(family, name.encode(), current.encode())])
        except Conflict as e:
            raise RefConflict(f"{family}/{name} on the remote {self.cfg.name} moved while it was being deleted "
                              f"(now {e.found.decode() if e.found else 'absent'}); nothing was deleted") from None
        return current

    @contextlib.contextmanager
    def pushing(self) -> Iterator[Any]:
        """A push in flight, registered under an etcd lease (kept alive while it runs) so that
        a gc does not start meanwhile; refused while a gc runs.  Yields the lease, whose fence
        the push's final compare-and-set names: if the lease was lost (and a gc may have run),
        the references are not set."""
        import uuid

        lease = self.refs.acquire("lock", b"push/" + uuid.uuid4().hex.encode(), this_holder(), PUSH_TTL)
        lease.start_keepalive()
        try:
            gc = self.refs.get("lock", b"gc")
            if gc is not None:
                from cowfs.kv.etcd import lease_holder
                raise FleetError(f"a fleet gc is running on the remote {self.cfg.name} ({lease_holder(gc)}): "
                                 "push again once it ends")
            yield lease
        finally:
            release(lease)

    @contextlib.contextmanager
    def holding(self, branch: str, ttl: int) -> Iterator[Any]:
        """Hold the remote branch: one holder at a time (an etcd lease, kept alive), the only
        one whose pushes may move it.  FleetError naming the holder if someone has it; it is
        taken over once that holder's lease expires (ttl seconds without renewal)."""
        from cowfs.kv.etcd import LeaseHeld

        try:
            lease = self.refs.acquire("lock", hold_key(branch), this_holder(), ttl)
        except LeaseHeld as e:
            raise FleetError(f"branch {branch} of the remote {self.cfg.name} is held by {e.holder} (its lease "
                             f"expires in {e.ttl} s unless renewed)") from None
        lease.start_keepalive()
        try:
            yield lease
        finally:
            release(lease)

    def hold_fence(self, branch: str, mount_holder: str | None = None) -> Any:
        """The expectation a push of the remote branch must add: None if nobody holds it, the
        hold's own value if this process runs under it (`cowfs remote hold`) or if the mount
        pushed from holds it (its holder name is mount_holder: fleet/holds.py); FleetError
        naming the holder otherwise."""
        import json

        from cowfs.kv.etcd import lease_holder

        held = self.refs.get("lock", hold_key(branch))
        if held is None:
            return None
        if mount_holder is not None and lease_holder(held) == mount_holder:
            return ("lock", hold_key(branch), held)
        try:
            mine = json.loads(os.environ.get(HOLD_ENV, "{}"))
        except ValueError:
            mine = {}
        if mine.get("remote") == self.key and mine.get("branch") == branch and mine.get("value") == held.hex():
            return ("lock", hold_key(branch), held)
        raise FleetError(f"branch {branch} of the remote {self.cfg.name} is held by {lease_holder(held)}: only its "
                         "holder pushes to it (a mount of a branch that follows it, or cowfs remote hold); "
                         "nothing was pushed")

    def set_ref(self, family: str, name: str, new: str, expected: str | None,
                also: tuple[str, str, str, str | None] | None = None, fences: tuple[Any, ...] = ()) -> None:
        """Set family/name to commit `new` if it holds `expected` (None: absent), and
        `also` (family, name, new, expected) in the same transaction, and only while every
        fence (a lock's key and value) holds; RefConflict naming what was found otherwise.  A
        lost reply is settled by reading the references back."""
        from cowfs.kv.base import Batch, Conflict

        batch = Batch()
        fences = tuple(f for f in fences if f is not None)
        expect = list(fences)
        for fam, key, value, exp in [(family, name, new, expected)] + ([also] if also else []):
            batch.put(fam, key.encode(), value.encode())
            expect.append((fam, key.encode(), None if exp is None else exp.encode()))
        try:
            self.refs.write(batch, expect)
        except Conflict as e:
            if any((e.cf, e.key) == (f[0], f[1]) for f in fences):
                what = ("the hold of this branch" if e.key.startswith(b"branch/")
                        else "this push's registration (a gc may have run)")
                raise FleetError(f"{what} on the remote {self.cfg.name} expired (etcd unreachable for longer than "
                                 "its lease?): nothing was set, push again") from None
            found = None if e.found is None else e.found.decode(errors="replace")
            fam, key = e.cf, e.key.decode(errors="replace")
            want = next(x for f, k, _v, x in [(family, name, new, expected)] + ([also] if also else [])
                        if f == fam and k == key)
            raise RefConflict(
                f"{fam}/{key} on the remote {self.cfg.name} is at commit {found or '(absent)'}, "
                f"but this push expected {want or '(absent)'}: someone else pushed meanwhile; "
                "nothing was overwritten") from None
        except OutcomeUnknown:
            if self.get_ref(family, name) == new and (also is None or self.get_ref(also[0], also[1]) == also[2]):
                return
            raise


def release(lease: Any) -> None:
    """Give a lock back; if etcd cannot be told now, its lease expires by itself (its TTL), and
    what was done under it stands."""
    from cowfs.kv.etcd import KVReplyError
    from cowfs.remote import EngineUnavailable

    try:
        lease.release()
    except (EngineUnavailable, KVReplyError):
        pass
