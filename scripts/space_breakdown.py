#!/usr/bin/env python3
"""Where the bytes of identical copies go: on-disk bytes per column family after each copy.

Issue #4 asks that five identical copies of a tree cost at most 1.05x one copy. The copies
add no chunk (content is deduplicated), so what they cost is metadata; this script shows
which family it lands in. It writes copy 1..N of SRC (`cp -a`) into a fresh store, one per
mount, lets the background worker settle and RocksDB compact (`cowfs dedup --wait`,
`cowfs gc`), unmounts, and reads each family's SST bytes and key count from RocksDB.

    .venv/bin/python scripts/space_breakdown.py SRC [--copies 3] [--work /var/tmp/cowfs-space-breakdown]

Without SRC, the Django 5.1.4 source tree is used (its sdist is downloaded with pip into
/var/tmp/cowfs-test-cache on first use, as the other benchmarks do).
Chunk payloads live in blob files and pack files, which are not in these figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import rocksdict as rd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from cowfs.store import FAMILIES  # noqa: E402
from cowfs.storedir import DB_DIR  # noqa: E402

COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=3600).stdout


def families(store: str) -> dict[str, tuple[int, int]]:
    """family -> (SST bytes, estimated keys), from a read-only open of the unmounted store."""
    opts = {f: rd.Options(raw_mode=True) for f in FAMILIES}
    db = rd.Rdict(os.path.join(store, DB_DIR), rd.Options(raw_mode=True), column_families=opts,
                  access_type=rd.AccessType.read_only())
    try:
        out = {}
        for f in FAMILIES:
            cf = db.get_column_family(f)
            out[f] = (cf.property_int_value("rocksdb.total-sst-files-size") or 0,
                      cf.property_int_value("rocksdb.estimate-num-keys") or 0)
        return out
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", help="the tree to copy (default: the Django 5.1.4 sources)")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/cowfs-space-breakdown")
    a = ap.parse_args()
    if a.copies < 2:
        ap.error("--copies must be at least 2")
    store, mp = os.path.join(a.work, "store"), os.path.join(a.work, "mnt")
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(mp)
    if a.src is None:
        a.src = os.path.join(a.work, "src")
        os.makedirs(a.src)
        run("tar", "xf", benchlib.django_tar()[0], "--no-same-owner", "-C", a.src)
    run(COWFS, "init", store)
    rows = []
    for i in range(a.copies):
        run(COWFS, "mount", store, mp)
        try:
            run("cp", "-a", a.src, os.path.join(mp, f"c{i}"))
            run("sync", "-f", mp)
            run(COWFS, "dedup", mp, "--wait")
            run(COWFS, "gc", mp)
        finally:
            run(COWFS, "umount", mp)
        fam = families(store)
        rows.append(fam)
        total = sum(b for b, _ in fam.values())
        print(f"{i + 1} copies: SST bytes {total:,}  " +
              "  ".join(f"{f} {b:,}" for f, (b, _) in fam.items() if b))
    first, last, n = rows[0], rows[-1], a.copies - 1
    print(f"per extra copy (mean of {n}):")
    for f in FAMILIES:
        db = (last[f][0] - first[f][0]) / n
        dk = (last[f][1] - first[f][1]) / n
        if db or dk:
            per = f", {db / dk:.1f} bytes per key" if dk >= 1 else ""
            print(f"  {f:<10} {db:>12,.0f} bytes  {dk:>9,.0f} keys{per}")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
