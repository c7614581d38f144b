"""Lazy mounts: a pushed snapshot mounted from its metadata alone, its chunks fetched on first read.

The build (cowfs.fleet.lazybuild, run by `cowfs mount REMOTE:SNAPSHOT MNT --store STORE` in
the forked daemon, before it opens the store) writes the snapshot's whole tree into branch main
of a new store from its metadata alone.  Each file's chunk tree is the pushed chunk ids (the
local store's own ids: cowfs.fleet.objects), and each chunk the store lacks is stored as an F
object (cowfs.chunks.codec): where on the remote its bytes are (pack, offset, length,
encoding), taken from the pack indexes at build time.  The store's `lazy.json` (this module's
LAZY_FILE) names the remote (and keeps the build's figures), so that the daemon serving the
store sets a `RemoteFetcher` on its object store.

A read of an F chunk fetches it (cowfs.core.lazy: in a thread, ranged GETs), checks it
against its id and re-encodes it as a local object, so the second read is local; fsck
counts F objects as remote, the background workers leave them alone.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cowfs.chunks import codec
from cowfs.fleet.config import RemoteConfig
from cowfs.fleet.objects import TYPE_CHUNK, Loc

if TYPE_CHECKING:
    from cowfs.fleet.remote import Remote

LAZY_FILE = "lazy.json"
DOWN_FOR = 2.0          # seconds a failed fetch makes the next ones fail at once (no event-loop stall)
RANGE_GAP = 16 << 10    # a read's GET covers blobs this close (a pull's: 256 KiB; reads want few extra bytes)
LANDED_MAX = 64 << 20   # bytes fetched by blocking reads (fetch_one) kept until a commit stores them


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


def warm_chunks_of(src: dict[str, Any]) -> list[bytes]:
    """The pushed cold start in a store's lazy.json (`source_of`), which its daemon fetches
    ahead (cowfs.background.lazy_warming)."""
    warm = src.get("warm") or {}
    return [bytes.fromhex(h) for h in warm.get("chunks", [])]
