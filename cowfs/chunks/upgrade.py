"""In-place upgrades of the chunk layer's records from older store formats (cowfs.store
decides when: at the first open by a newer cowfs).

  format 1 -> 2   `rebuild`: reference records rewritten in full (pins, roots, size) and
                  the space accounting counted once;
  format <= 5 -> 6 `convert_packs`: pack files were numbered and appended to, and P pointers
                  held a u32 pack number; now packs are immutable objects of a BlobStore
                  named by a u64 id.  Each old pack file NNNNNNNN.pack gets the new name of
                  id NNNNNNNN (a hard link, so no byte is copied), every pointer is
                  rewritten, and the old names go.  An old pack may have punched holes
                  (freed extents): it is just a pack with dead ranges, which repacking
                  reclaims at the next `cowfs gc` (chunks.repack).
  format <= 7 -> 8 `count_remote`: the space accounting counts the chunks still on a lazy
                  mount's remote (F objects), once, from a scan of the object records.
  format <= 10 -> 11 `move_catalog`: the catalog (branch/, snap/, layer/, counter/ records of
                  the `meta` family) moves to the reference store's `catalog` family.
Each step can be interrupted by a crash and run again.
"""
from __future__ import annotations

import logging
import os
import re
import struct

from cowfs import private
from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS, CF_REFS, CF_SPACE, SPACE_KEY
from cowfs.chunks.packs import pack_name
from cowfs.chunks.refs import Ref, parse_ref, scan_space, tree_sizes
from cowfs.chunks.space import Space
from cowfs.kv.base import KV, Batch

log = logging.getLogger(__name__)

_LEGACY_PACKED = struct.Struct("<BBIQII")  # kind, inner kind, pack u32, offset, length, raw size
_LEGACY_NAME = re.compile(r"^(\d{8})\.pack$")
BATCH = 4096  # pointers rewritten per batch


def rebuild(kv: KV, roots: dict[bytes, int]) -> Space:
    """Rewrite every refs record in full (roots: references from inode-record versions) and
    count the accounting once; from then on commits keep both exact.  Returns the accounting."""
    pins: dict[bytes, int] = {}
    for _h, value in kv.scan(CF_OBJECTS, b""):
        base = codec.delta_base(value) if value[0] != codec.KIND_NODE else None
        if base is not None:
            pins[base] = pins.get(base, 0) + 1
    refs = [(h, parse_ref(v).count) for h, v in kv.scan(CF_REFS, b"")]
    sizes = tree_sizes(kv, [h for h, _ in refs])
    batch = Batch()
    for h, count in refs:
        batch.put(CF_REFS, h, Ref(count, pins.get(h, 0), roots.get(h, 0), sizes[h]).pack())
    kv.write(batch)
    space = scan_space(kv)
    batch = Batch()
    batch.put(CF_SPACE, SPACE_KEY, space.pack())
    kv.write(batch)
    return space


def count_remote(kv: KV, space: Space) -> None:
    """Format <= 8 -> 9: count space.remote_chunks and remote_bytes (format 8 counted the
    chunks only) from the object records and store them."""
    space.remote_chunks = space.remote_bytes = 0
    for _h, v in kv.scan(CF_OBJECTS, b""):
        if v[0] == codec.KIND_REMOTE:
            space.remote_chunks += 1
            space.remote_bytes += codec.chunk_sizes(v)[0]
    batch = Batch()
    batch.put(CF_SPACE, SPACE_KEY, space.pack())
    kv.write(batch)


def convert_packs(kv: KV, pack_dir: str) -> int:
    """Format <= 5 -> 6 for a store whose packs are in pack_dir (the local blob store's
    directory: a name without '/' is a file there).  Returns the pointers rewritten."""
    legacy = {}
    if os.path.isdir(pack_dir):
        for name in os.listdir(pack_dir):
            m = _LEGACY_NAME.match(name)
            if m:
                legacy[int(m.group(1))] = name
    # 1. New names beside the old ones (hard links: the same bytes, holes included).
    for n, name in sorted(legacy.items()):
        old, new = os.path.join(pack_dir, name), os.path.join(pack_dir, pack_name(n))
        try:
            os.link(old, new)
        except FileExistsError:
            if not os.path.samefile(old, new):
                raise OSError(f"{new} exists and is not {old}: cannot upgrade the packs") from None
    if legacy:
        private.fsync_dir(pack_dir)
    # 2. Every legacy pointer rewritten (a converted one is longer: left alone).
    converted = 0
    batch = Batch()
    for h, raw in kv.scan(CF_OBJECTS, b""):
        if raw[0] != codec.KIND_PACKED or len(raw) != _LEGACY_PACKED.size:
            continue
        _p, kind, pack, off, length, size = _LEGACY_PACKED.unpack(raw)
        batch.put(CF_OBJECTS, h, codec.encode_packed(kind, pack, off, length, size))
        converted += 1
        if len(batch) >= BATCH:
            kv.write(batch)
            batch = Batch()
    if len(batch):
        kv.write(batch)
    kv.sync()
    # 3. The old names go (the new ones hold the same files).
    for name in legacy.values():
        os.unlink(os.path.join(pack_dir, name))
    if legacy:
        private.fsync_dir(pack_dir)
        log.info("%s: %d pack files renamed, %d pointers converted", pack_dir, len(legacy), converted)
    return converted


# What of the home database's `meta` family is the catalog's (format <= 9), and the key that
# says the catalog moved (the store's format, written by the move's own batch).
# (counter/copyino, the shared copies' own counter, stays: cowfs.meta.shared keeps it at home)
CATALOG_PREFIXES = (b"branch/", b"snap/", b"layer/", b"counter/layer", b"counter/view", b"counter/ino")
OWNERS_SETTLED = b"catalog/owners-settled"


def move_catalog(home: KV, refs: KV, meta: str, catalog: str, version: int) -> int:
    """Format <= 10 -> 11: copy the catalog's records from home's family meta to refs's family
    catalog, then delete them from home and write home's `format` key (version) in one
    batch, synced.  While home's `format` is older, its copy is the truth (an older cowfs may
    have changed it after a crash between the two steps), so the copy replaces whatever refs
    holds; once it says version, the move is done and nothing happens.  Run before the
    store's marker says version (so a crash anywhere repeats it or only the marker).
    Returns the records moved (0: already moved)."""
    raw = home.get(meta, b"format")
    if raw is not None and int(raw) >= version:
        return 0
    copy, drop = Batch(), Batch()
    n = 0
    for prefix in CATALOG_PREFIXES:
        for k, v in home.scan(meta, prefix, prefix):
            copy.put(catalog, k, v)
            drop.delete(meta, k)
            n += 1
    layers = [int.from_bytes(k[6:], "big") for _c, k, _v in copy.ops if k.startswith(b"layer/")]
    if layers:  # every catalog has its root layer
        # Older cowfs took the next layer id from the layers too, and may have left no counter.
        counter = next((v for _c, k, v in copy.ops if k == b"counter/layer"), None)
        floor = max(layers) + 1
        if counter is None or int.from_bytes(counter, "big") < floor:
            copy.put(catalog, b"counter/layer", floor.to_bytes(8, "big"))
        copy.ops[:0] = [(catalog, k, None) for k, _v in refs.scan(catalog, b"")]
        refs.write(copy)  # one transaction: the reference store holds all of it or none
    drop.delete(meta, OWNERS_SETTLED)  # settled again at the first open (cowfs.meta.layers)
    drop.put(meta, b"format", str(version).encode())
    home.write(drop)
    home.sync()
    return n
