"""The store keeper's pass (cowfs.chunks.dups.Keeper) at the scale docs/benchmarks.md gives:
STORE/db and 8 homes (RocksDB), 2,000 packs of 128 chunk records, every chunk packed by two
databases (128,000 duplicates).  Times a first pass (every pack index new), a pass with
nothing new while every record waits for its rewrites, one after every database followed
(settles them), and one with nothing left.  Usage: bench_keeper.py DIR [--json]."""
from __future__ import annotations

import json
import os
import sys
import time

from cowfs.blob.local import LocalBlobStore
from cowfs.chunks import codec, dups
from cowfs.chunks.families import CF_OBJECTS
from cowfs.chunks.liveness import CF_GC
from cowfs.chunks.packs import Packs
from cowfs.kv.base import Batch
from cowfs.kv.rocks import RocksKV
from cowfs.kv.sqlite import SQLiteKV

DBS, PACKS, PER_PACK = 9, 2000, 128


def build(root: str) -> tuple[SQLiteKV, Packs, list[tuple[str, RocksKV]]]:
    refs = SQLiteKV(os.path.join(root, "refs.sqlite"), (CF_GC, dups.CF_DUP))
    packs = Packs(LocalBlobStore(os.path.join(root, "packs")))
    dbs = [(("db" if i == 0 else f"home-{i:02d}"), RocksKV(os.path.join(root, f"db{i}"), (CF_OBJECTS,),
                                                         blob_families=(CF_OBJECTS,))) for i in range(DBS)]
    distinct = PACKS * PER_PACK // 2
    mine: list[list[int]] = [[] for _ in range(DBS)]
    for n in range(distinct):  # chunk n packed by databases n % DBS and (n + 1) % DBS
        mine[n % DBS].append(n)
        mine[(n + 1) % DBS].append(n)
    for (_name, kv), ns in zip(dbs, mine):
        for i in range(0, len(ns), PER_PACK):
            chunks = [(codec.chunk_hash(d), codec.encode_chunk(d, 1)) for d in
                      (n.to_bytes(8, "big") * 16 for n in ns[i:i + PER_PACK])]
            pack, exts = packs.write([v[1:] for _h, v in chunks], [(h, v[0], codec.chunk_sizes(v)[0]) for h, v in chunks])
            b = Batch()
            for (h, v), (off, length) in zip(chunks, exts):
                b.put(CF_OBJECTS, h, codec.encode_packed(v[0], pack, off, length, codec.chunk_sizes(v)[0]))
            kv.write(b)
    return refs, packs, dbs


def timed(refs, packs, dbs) -> dict:
    t0 = time.perf_counter()
    fig = dups.Keeper(refs, packs, dbs, "db", set(), set()).run(packs.listing())
    return {"seconds": round(time.perf_counter() - t0, 3), **{k: v for k, v in fig.as_dict().items() if k != "dup_seconds"}}


def main() -> None:
    root = sys.argv[1]
    os.makedirs(root, exist_ok=False)
    t0 = time.perf_counter()
    refs, packs, dbs = build(root)
    out = {"build_seconds": round(time.perf_counter() - t0, 1), "first": timed(refs, packs, dbs),
           "nothing_new_all_open": timed(refs, packs, dbs)}
    found = dups.records(refs)
    for _name, kv in dbs:
        recode = dups.plan(kv, found, set(), lambda p: True)
        b = Batch()
        for h, raw in recode.items():
            b.put(CF_OBJECTS, h, raw)
        kv.write(b)
        dups.mark_followed(refs, _name, dups.generation(refs))
    out["after_every_rewrite"] = timed(refs, packs, dbs)
    out["nothing_left"] = timed(refs, packs, dbs)
    print(json.dumps(out, indent=None if "--json" in sys.argv else 1))
    for _name, kv in dbs:
        kv.close()
    refs.close()


if __name__ == "__main__":
    main()
