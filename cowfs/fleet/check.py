"""`cowfs remote check`: is everything a reference reaches on the remote?

From every reference (snap/*, branch/*): its commit object exists and decodes, so does each
parent; every tree reachable from those commits is in a pack index and decodes; every chunk
a file lists is in a pack index; every pack an index names exists and is long enough for the
index's entries.  With verify, every reachable blob is also fetched and hashed.  Objects
no reference reaches (a push killed before its references were set) are not problems: they
are garbage for a fleet gc.
"""
from __future__ import annotations

from typing import Callable

from cowfs.blob.base import BlobNotFound
from cowfs.fleet.objects import CorruptObject, decode_commit, decode_tree, entry_chunks
from cowfs.fleet.remote import FAMILIES, Remote


def check(remote: Remote, verify: bool = False, progress: Callable[[int], None] = lambda n: None) -> tuple[list[str], dict[str, int]]:
    """(one line per problem, figures)."""
    problems: list[str] = []
    remote.load_index()
    sizes = {e.name[len("data/"):]: e.size for e in remote.blobs.list("data/")}
    ends: dict[str, int] = {}
    for loc in remote.index.values():
        ends[loc.pack] = max(ends.get(loc.pack, 0), loc.offset + loc.length)
    for pack, end in sorted(ends.items()):
        if pack not in sizes:
            problems.append(f"pack data/{pack} is missing (its index names {end} bytes of blobs)")
        elif sizes[pack] < end:
            problems.append(f"pack data/{pack} has {sizes[pack]} bytes, its index needs {end}")
    bad_packs = {p for p in ends if p not in sizes or sizes[p] < ends[p]}

    commits: dict[str, dict | None] = {}
    trees: list[bytes] = []
    for family in FAMILIES:
        for name, cid in remote.list_refs(family):
            todo, where = cid, f"{family}/{name}"
            while todo and todo not in commits:
                try:
                    doc = decode_commit(todo, remote.blobs.get("commit/" + todo))
                except BlobNotFound:
                    problems.append(f"{where}: commit/{todo} is missing")
                    commits[todo] = None
                    break
                except CorruptObject as e:
                    problems.append(f"{where}: {e}")
                    commits[todo] = None
                    break
                commits[todo] = doc
                trees.append(bytes.fromhex(doc["tree"]))
                where, todo = f"{where} (parent of {todo})", doc.get("parent")
    seen: set[bytes] = set()
    chunks: dict[bytes, str] = {}
    while trees:
        level, trees = [h for h in dict.fromkeys(trees) if h not in seen], []
        seen.update(level)
        present = []
        for h in level:
            loc = remote.index.get(h)
            if loc is None:
                problems.append(f"tree {h.hex()} is in no pack index")
            elif loc.pack in bad_packs:
                problems.append(f"tree {h.hex()} is in the damaged pack {loc.pack}")
            else:
                present.append(h)
        try:
            fetched = list(remote.fetch(present, "tree"))
        except CorruptObject as e:
            problems.append(str(e))
            fetched = []
        for h, raw in fetched:
            try:
                entries = decode_tree(h, raw)
            except CorruptObject as e:
                problems.append(str(e))
                continue
            for e in entries:
                if e.get("type") == "dir":
                    trees.append(bytes.fromhex(e["tree"]))
                elif e.get("type") == "file":
                    for c in entry_chunks(e):
                        if c is not None:
                            chunks.setdefault(c, f"{e['name']} in tree {h.hex()}")
            progress(1)
    for c, where in chunks.items():
        loc = remote.index.get(c)
        if loc is None:
            problems.append(f"chunk {c.hex()} ({where}) is in no pack index")
        elif loc.pack in bad_packs:
            problems.append(f"chunk {c.hex()} ({where}) is in the damaged pack {loc.pack}")
    verified = 0
    if verify:
        good = [c for c in chunks if c in remote.index and remote.index[c].pack not in bad_packs]
        for i in range(0, len(good), 256):     # one bad blob must not hide the others
            part = good[i:i + 256]
            try:
                for _h, _raw in remote.fetch(part, "chunk"):
                    verified += 1
            except CorruptObject:
                for c in part:
                    try:
                        list(remote.fetch([c], "chunk"))
                        verified += 1
                    except CorruptObject as e:
                        problems.append(str(e))
    figures = {"references": sum(len(remote.list_refs(f)) for f in FAMILIES), "commits": len(commits),
               "trees": len(seen), "chunks": len(chunks), "packs": len(sizes), "verified": verified}
    return problems, figures

