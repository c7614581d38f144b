"""The background worker: delta-encodes new chunks against similar stored ones.

Every chunk the store creates is queued (CF_PENDING) in the batch that creates it, so the
queue survives a crash or an unmount.  The worker takes the queue in batches: in a thread,
without the filesystem lock, it computes each chunk's super-features, looks them up in the
similarity index (CF_SIMILAR) and delta-encodes against the whole chunk found there; then,
under `Filesystem.lock` and with no checkpoint until the commit, it re-checks everything
the thread assumed (the chunk still exists, is whole and no delta's base; the base still
exists and is whole) and commits {new encodings, base pins, index entries, queue removals}
in one batch through `Store.commit`, the single writer of reference counts.  Writes never
wait for it: it takes the lock only for that short commit, and sleeps after each batch so
that it uses at most its share of wall time: `cpu_share` while the mount is quiet; while
FUSE requests keep arriving it waits for a quiet moment, unless BUSY_QUEUE chunks are
queued, and then takes at most quiet.BUSY_SHARE (the worker's Python code competes with the
request handlers for the GIL, so a share taken from it comes straight off foreground
throughput).

Chunks with no near-copy are tried against the store's trained dictionary (see
cowfs.chunks.delta): trained once from a sample of the chunks the worker has seen, stored
as a whole chunk that the deltas using it pin (created by the first commit that uses it,
freed with the last delta that does), named by DICT_KEY in CF_SPACE.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

import trio
import zstandard

from cowfs import faults
from cowfs.background.quiet import Quiet
from cowfs.chunks import codec, delta
from cowfs.chunks.families import CF_OBJECTS, CF_PENDING, CF_SIMILAR, CF_SPACE
from cowfs.chunks.refs import RefTxn
from cowfs.core.filesystem import Filesystem
from cowfs.kv.base import Batch

log = logging.getLogger(__name__)

BATCH = 64  # chunks per thread call (at most 4 MiB: tens of milliseconds)
IDLE_POLL = 0.2  # seconds between two looks for a quiet moment while chunks wait
MAX_DELTA_RATIO = 0.5  # keep a delta only at most half the size of the whole encoding ...
MIN_DELTA_SAVING = 64  # ... and saving at least this many bytes
BUSY_QUEUE = 1 << 16  # on a busy mount (cowfs.background.quiet) it works only with this many chunks
                      # (4 GiB) queued; else it waits for quiet
MAX_DICT_RATIO = 0.97  # against the dictionary (a hot object: the extra hop is cheap): 3% smaller ...
MIN_DICT_SAVING = 32  # ... and this many bytes
DICT_KEY = b"dict"
TRAIN_SAMPLES = 400  # chunks sampled before training the dictionary
MAX_SAMPLE = 16 * 1024  # bytes kept of each sample


@dataclass
class Plan:
    """What the thread decided for one queued chunk."""

    hash: bytes
    features: list[bytes] = field(default_factory=list)
    value: bytes | None = None  # a D encoding, if one pays
    base: bytes | None = None
    later: bool = False  # left in the queue for a quiet moment


def _whole(raw: bytes | None) -> bool:
    return raw is not None and raw[0] in codec.WHOLE


class DedupWorker:
    def __init__(self, fs: Filesystem, cpu_share: float = 0.25, enabled: bool = True,
                 activity: Callable[[], int] = lambda: 0) -> None:
        """activity: a count that grows with every foreground (FUSE) request."""
        self.fs = fs
        self.quiet = Quiet(activity)  # no foreground request for a while (the sharer asks it too)
        self._cursor = b""  # where the next batch starts in CF_PENDING
        self.kv = fs.store.kv
        self.cpu_share = min(1.0, max(0.01, cpu_share))
        self.enabled = enabled
        self.chunks_done = 0
        self.bytes_done = 0
        self.deltas = 0
        self.busy_s = 0.0
        self.samples: list[bytes] = []
        self.dict_hash: bytes | None = self.kv.get(CF_SPACE, DICT_KEY)
        self.dict_data: bytes | None = None
        self._dict_value = b""  # its whole encoding, for the commit that (re-)creates it
        self._dict_comp: zstandard.ZstdCompressor | None = None
        raw = fs.store.objects.stored(self.dict_hash) if self.dict_hash else None
        if _whole(raw):
            assert raw is not None
            self._use_dict(codec.decode_chunk(raw), raw)
        else:
            self.dict_hash = None  # no delta uses it any more: it was freed; train anew

    def figures(self) -> dict[str, object]:
        return {"enabled": self.enabled, "cpu_share": self.cpu_share, "chunks_done": self.chunks_done,
                "bytes_done": self.bytes_done, "deltas_made": self.deltas, "busy_s": round(self.busy_s, 3),
                "dictionary": self.dict_hash.hex() if self.dict_hash else None,
                "mb_per_busy_s": round(self.bytes_done / 1e6 / self.busy_s, 1) if self.busy_s else None}

    # -- in a thread: reads only -------------------------------------------------------------
    def _plan_one(self, h: bytes, stored: bytes | None, local: dict[bytes, bytes]) -> Plan:
        """stored: h's record in the objects family (a P pointer is resolved here)."""
        plan = Plan(h)
        objects = self.fs.store.objects
        try:
            raw = None if stored is None else objects.resolve(stored)  # packed: read from its pack
            if not _whole(raw):
                return plan
            assert raw is not None
            data = codec.decode_chunk(raw)
        except (OSError, codec.CorruptObject):
            return plan  # freed (its extent punched) while we looked: the commit re-checks
        self.bytes_done += len(data)
        if len(data) < delta.MIN_DELTA_SIZE:
            return plan
        plan.features = delta.super_features(data)
        tried = {h}
        for f in plan.features:
            b = local.get(f) or self.kv.get(CF_SIMILAR, f)
            if b is None or b in tried:
                continue
            tried.add(b)
            try:
                braw = objects.stored(b)
                if not _whole(braw):
                    continue  # freed, or (re-created as) a delta since it was indexed
                assert braw is not None
                bdata = codec.decode_chunk(braw)
            except (OSError, codec.CorruptObject):
                continue
            value = codec.encode_delta(data, b, delta.compressor(bdata), len(raw))
            if len(value) <= len(raw) * MAX_DELTA_RATIO and len(raw) - len(value) >= MIN_DELTA_SAVING:
                plan.value, plan.base = value, b
                return plan
        for f in plan.features:
            local[f] = h
        if raw[0] == codec.KIND_RAW:
            return plan  # incompressible: a dictionary of typical content cannot help, nor learn from it
        if self._dict_comp is not None and h != self.dict_hash:
            value = codec.encode_delta(data, self.dict_hash, self._dict_comp, len(raw))  # type: ignore[arg-type]
            if len(value) <= len(raw) * MAX_DICT_RATIO and len(raw) - len(value) >= MIN_DICT_SAVING:
                plan.value, plan.base = value, self.dict_hash
        elif self.dict_data is None:
            self.samples.append(data[:MAX_SAMPLE])
        return plan

    def _next_batch(self) -> list[bytes]:
        """Up to BATCH queued hashes after the cursor, wrapping around.  Always starting at
        the front would step over every tombstone of the entries taken before (until
        RocksDB compacts them): quadratic in the queue's length."""
        hashes = [k for k, _ in islice(self.kv.scan(CF_PENDING, self._cursor), BATCH)]
        if len(hashes) < BATCH and self._cursor:
            hashes += [k for k, _ in islice(self.kv.scan(CF_PENDING, b""), BATCH - len(hashes))
                       if k < self._cursor]
        self._cursor = hashes[-1] + b"\x00" if hashes else b""
        return hashes

    def _plan(self, hashes: list[bytes], busy: bool = False) -> list[Plan]:
        """busy: the mount is serving requests; chunks in pack files wait for a quiet moment
        (reading them back competes with the foreground's reads of the same disk)."""
        faults.point("dedup_plan")
        local: dict[bytes, bytes] = {}  # index entries of this batch, not committed yet
        plans = []
        for h in hashes:
            stored = self.kv.get(CF_OBJECTS, h)
            if busy and stored is not None and stored[0] == codec.KIND_PACKED:
                plans.append(Plan(h, later=True))
                continue
            try:
                plans.append(self._plan_one(h, stored, local))
            except codec.CorruptObject as exc:  # fsck's business; just take it off the queue
                log.error("background worker skips chunk %s: %s", h.hex(), exc)
                plans.append(Plan(h))
        if self.dict_data is None and len(self.samples) >= TRAIN_SAMPLES:
            self._train()
        return plans

    def _train(self) -> None:
        samples, self.samples = self.samples, []
        try:
            data = delta.train(samples)
        except zstandard.ZstdError as exc:  # e.g. samples too uniform: sample again later
            log.info("no dictionary from %d samples: %s", len(samples), exc)
            return
        self.dict_hash = codec.chunk_hash(data)
        self._use_dict(data, codec.encode_chunk(data, self.fs.level))
        log.info("trained a %d-byte dictionary from %d chunks", len(data), len(samples))

    def _use_dict(self, data: bytes, value: bytes) -> None:
        # Encoded once here: the commits that use it may each have to (re-)create it, and
        # encoding 64 KiB per commit was a third of the worker's time.
        self.dict_data, self._dict_value = data, value
        self._dict_comp = delta.compressor(data, delta.DICT_LEVEL)

    # -- on the event loop, under the lock: re-check and commit ------------------------------
    def _commit(self, plans: list[Plan]) -> None:
        objects = self.fs.store.objects
        txn, batch = RefTxn(), Batch()
        bases: set[bytes] = set()
        for p in plans:
            if p.later:
                continue
            txn.done.append(p.hash)
            raw = self.kv.get(CF_OBJECTS, p.hash)
            if not _whole(raw):
                continue  # freed meanwhile (or never whole): nothing to index
            if (p.value is not None and p.base is not None and p.hash not in bases
                    and p.base not in txn.recode and objects.ref(p.hash).pins == 0
                    and (_whole(self.kv.get(CF_OBJECTS, p.base)) or p.base == self.dict_hash)):
                if p.base == self.dict_hash and p.base not in txn.new:
                    # Created by this commit if no delta pins it yet (or any more).
                    txn.add_object(p.base, self._dict_value, [])
                    batch.put(CF_SPACE, DICT_KEY, p.base)
                txn.recode[p.hash] = p.value
                bases.add(p.base)
                self.deltas += 1
                continue
            for f in p.features:
                batch.put(CF_SIMILAR, f, p.hash)
        self.fs.store.commit(batch, txn)
        self.chunks_done += sum(not p.later for p in plans)

    async def run(self) -> None:
        """Work through the queue forever; asleep while it is empty or the worker is off
        (woken by the commit that queues a chunk: `Store.commits`).

        Started as the mount is served, which counts as a request: the first batch (64
        chunks read and sketched in a thread, ~0.1-0.2 s, the request loop not spinning
        meanwhile) waits for the clients' first requests to stop instead of running beside
        them (docs/benchmarks.md, issue 24, h65)."""
        self.quiet.mark()
        store = self.fs.store
        while True:
            # Nothing queued (or off): asleep until a commit queues a chunk, not on a timer.
            await store.commits.until(lambda: self.enabled and store.objects.space.queue > 0)
            serving = not self.quiet()
            if serving and self.fs.store.objects.space.queue < BUSY_QUEUE:
                # The queue survives unmounts and crashes: it can wait for a quiet moment.
                # Running beside requests, even at BUSY_SHARE, took 7% off an untar+grep+rm
                # (its thread holds the GIL, and the request loop does not spin meanwhile).
                await trio.sleep(IDLE_POLL)
                continue
            t0 = time.perf_counter()
            plans = await self.fs.store.in_thread(lambda: self._plan(self._next_batch(), serving))
            try:
                async with self.fs.lock:
                    self._commit(plans)
            except Exception as exc:  # e.g. a full disk: the queue is intact, try again later
                log.error("background worker commit failed: %s", exc)
                self.fs.store.recover()
                await trio.sleep(1.0)
            busy = time.perf_counter() - t0
            self.busy_s += busy
            share = self.quiet.share(self.cpu_share)
            await trio.sleep(busy * (1 - share) / share)

    async def settle(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or timeout passes (False)."""
        with trio.move_on_after(timeout):
            while self.fs.store.objects.space.queue > 0:
                await trio.sleep(0.05)
            return True
        return False
