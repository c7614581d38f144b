"""The learned prefetch model pushed with a snapshot (issue 23: lazy mounts use "the learned
prefetch model ... pushed with the snapshot").

A store learns per branch which file is opened after which and which chunks of each are read
(cowfs.cache.learned, keyed by inode number).  Inode numbers mean nothing on another store,
so the push asks the daemon (control file `coldstart`, its `model`) for the model as paths in
the snapshot and uploads it as `model/<id>`: JSON {"v": 1, "files": [[path, chunk bitmask]],
"next": [[i, [[j, count], ...]], ...]} (i, j: indexes into files), id = BLAKE3 of it,
write-once like `warm/`, named by the commit (`model`).  A lazy build fetches it, maps the
paths to the inode numbers it gave them and writes the model as branch main's own
(`seed`), so the lazy mount's first opens predict what the pushing host's workload read
next, and background/lazy_warming.py `LazyPrefetch` fetches those chunks ahead.  A model
object missing or damaged costs only the predictions: the build goes on without it and
says why (lazy.json `model_error`, logged by the daemon, shown by `cowfs mount`).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import blake3
import zstandard

from cowfs.fleet import FleetError
from cowfs.fleet.objects import _ZSTD_LEVEL, CorruptObject, _is_hexid

# A model object is its JSON in one zstd frame (paths and small integers: the quick sandbox's
# 1,041,357 B of JSON; see docs/benchmarks.md); one written before the frame (plain JSON) still
# reads.  MODEL_MAX bounds what a damaged or hostile frame may inflate to.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MODEL_MAX = 256 << 20

if TYPE_CHECKING:
    from cowfs.core.filesystem import Filesystem
    from cowfs.fleet.remote import Remote


def encode_model(files: list[list[Any]], nxt: list[list[Any]]) -> tuple[str, bytes]:
    """(model id, bytes) of a prefetch model: files as [path, chunk bitmask], transitions as
    [i, [[j, count], ...]] between indexes of files."""
    doc = json.dumps({"v": 1, "files": files, "next": nxt}, separators=(",", ":")).encode()
    data = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(doc)
    return blake3.blake3(data).hexdigest(), data


def decode_model(mid: str, data: bytes) -> dict[str, Any]:
    """The model model/mid, checked against its name and its shape."""
    if not _is_hexid(mid) or blake3.blake3(data).hexdigest() != mid:
        raise CorruptObject(f"model/{mid}: its content does not hash to its name")
    try:
        doc = json.loads(_inflate(data) if data[:4] == _ZSTD_MAGIC else data)
        files, nxt = doc["files"], doc["next"]
        n = len(files)
        if doc.get("v") != 1 or not all(isinstance(p, str) and isinstance(b, int) and b >= 0 for p, b in files):
            raise ValueError("not a list of [path, chunk bitmask]")
        for i, succ in nxt:
            if not (isinstance(i, int) and 0 <= i < n) or not all(
                    isinstance(j, int) and 0 <= j < n and isinstance(c, int) and c > 0 for j, c in succ):
                raise ValueError("a transition names no file of the model")
    except (ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
        raise CorruptObject(f"model/{mid}: {e}") from None
    return doc


def _inflate(frame: bytes) -> bytes:
    """The frame's content, refused when its header declares no size or one over MODEL_MAX
    (decompress allocates what the header declares)."""
    size = zstandard.frame_content_size(frame)
    if not 0 <= size <= MODEL_MAX:
        raise ValueError(f"a zstd frame declaring {size} bytes (at most {MODEL_MAX})")
    return zstandard.ZstdDecompressor().decompress(frame)


def load_model(r: "Remote", commit: dict[str, Any]) -> dict[str, Any] | None:
    """The prefetch model pushed with the commit (None for a commit without one); FleetError
    (one line) if it is named but missing or damaged."""
    from cowfs.blob.base import BlobNotFound

    mid = commit.get("model")
    if not mid:
        return None
    try:
        return decode_model(mid, r.blobs.get("model/" + mid))
    except BlobNotFound:
        raise FleetError(f"the remote {r.cfg.name} lacks model/{mid}, which the commit names") from None
    except CorruptObject as e:
        raise FleetError(f"the prefetch model pushed with the snapshot is damaged: {e}") from None


def seed(fs: "Filesystem", inos: dict[str, int], doc: dict[str, Any]) -> dict[str, int]:
    """Write the pushed model as branch main's own, its paths mapped to this store's inode
    numbers (inos: path in the tree -> inode); figures: files and transitions kept."""
    from cowfs.cache.learned import MAX_FILES, MAX_NEXT, OpenModel
    from cowfs.kv.base import Batch
    from cowfs.meta import layers

    ino_of = [inos.get(p) for p, _bits in doc["files"]]
    m = OpenModel()
    for (_p, bits), ino in zip(doc["files"], ino_of):
        if ino is not None and bits and len(m.chunks) < MAX_FILES:
            m.chunks[ino] = bits
    for i, succ in doc["next"]:
        a = ino_of[i]
        if a is None or len(m.next) >= MAX_FILES:
            continue
        kept = {ino_of[j]: c for j, c in sorted(succ, key=lambda s: -s[1]) if ino_of[j] is not None}
        if kept:
            m.next[a] = dict(list(kept.items())[:MAX_NEXT])
    if m.chunks or m.next:
        batch = Batch()
        layers.save_model(batch, fs.primary.name, m.dumps())
        fs.store.write(batch)
    return {"files": len(m.chunks), "transitions": sum(sum(s.values()) for s in m.next.values())}
