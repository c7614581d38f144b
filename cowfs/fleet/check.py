"""`cowfs remote check`: is everything a reference reaches on the remote?  And the mark that
`cowfs remote gc` shares with it.

From every reference (snap/*, branch/*): its commit object exists and decodes, and every
pack it names has an index, its warm object (a learned cold start) exists and names only chunks
that reachable trees list, its model object (a prefetch model) exists and decodes; every tree reachable from those commits is in a pack index and decodes; every chunk
a file lists is in a pack index; every pack an index names exists and is long enough for the
index's entries.  With verify, every reachable blob is also fetched and hashed.  Objects
no reference reaches (a push killed before its references were set) are not problems: they
are garbage for `cowfs remote gc`.  A commit's parent is not followed: it says what the commit
was made from (a pull's hint for a base it may already have), and it may have been deleted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cowfs.blob.base import BlobNotFound
from cowfs.fleet import FleetError
from cowfs.fleet.model import decode_model
from cowfs.fleet.objects import CorruptObject, decode_commit, decode_tree, decode_warm, entry_chunks
from cowfs.fleet.remote import REF_FAMILIES, Remote


@dataclass
class Mark:
    """What the references reach, and what is wrong on the way."""
    problems: list[str] = field(default_factory=list)
    refs: int = 0
    commits: dict[str, dict | None] = field(default_factory=dict)
    trees: set[bytes] = field(default_factory=set)
    chunks: dict[bytes, str] = field(default_factory=dict)      # id -> where it was named
    sizes: dict[str, int] = field(default_factory=dict)         # pack id -> bytes of data/<id>
    bad_packs: set[str] = field(default_factory=set)
    warm: set[str] = field(default_factory=set)                 # warm ids the commits name
    model: set[str] = field(default_factory=set)                # model ids (prefetch models) they name
    named: set[str] = field(default_factory=set)                # packs the commits name


def mark(remote: Remote, progress: Callable[[int], None] = lambda n: None) -> Mark:
    m = Mark()
    try:
        remote.forwards(again=True)          # the forwards of repacked packs (cowfs.fleet.repack)
    except FleetError as e:
        m.problems.append(str(e))
        remote.forget_forwards()
    remote.load_index(everything=True)
    m.sizes = {e.name[len("data/"):]: e.size for e in remote.blobs.list("data/")}
    ends: dict[str, int] = {}
    for loc in remote.index.values():
        ends[loc.pack] = max(ends.get(loc.pack, 0), loc.offset + loc.length)
    for pack, end in sorted(ends.items()):
        if pack not in m.sizes:
            m.problems.append(f"pack data/{pack} is missing (its index names {end} bytes of blobs)")
        elif m.sizes[pack] < end:
            m.problems.append(f"pack data/{pack} has {m.sizes[pack]} bytes, its index needs {end}")
        else:
            continue
        m.bad_packs.add(pack)

    trees: list[bytes] = []
    warms: dict[str, list[str]] = {}   # warm id -> the references whose commits name it
    models: dict[str, list[str]] = {}  # model id -> likewise
    for family in REF_FAMILIES:
        for name, cid in remote.list_refs(family):
            m.refs += 1
            if cid in m.commits:
                continue
            try:
                doc = decode_commit(cid, remote.blobs.get("commit/" + cid))
            except BlobNotFound:
                m.problems.append(f"{family}/{name}: commit/{cid} is missing")
                m.commits[cid] = None
                continue
            except CorruptObject as e:
                m.problems.append(f"{family}/{name}: {e}")
                m.commits[cid] = None
                continue
            m.commits[cid] = doc
            trees.append(bytes.fromhex(doc["tree"]))
            if doc.get("warm"):
                m.warm.add(doc["warm"])
                warms.setdefault(doc["warm"], []).append(f"{family}/{name}")
            if doc.get("model"):
                m.model.add(doc["model"])
                models.setdefault(doc["model"], []).append(f"{family}/{name}")
            for pack in doc.get("packs") or ():
                m.named.add(pack)
                for leaf in remote.leaves([pack]):     # a repacked pack: where its forwards lead
                    via = "" if leaf == pack else f" (repacked into {leaf})"
                    if leaf not in remote.packs:
                        m.problems.append(f"{family}/{name}: commit/{cid} names the pack {pack}{via}, which has no index")
                    elif leaf in m.bad_packs:
                        m.problems.append(f"{family}/{name}: commit/{cid} names the damaged pack {pack}{via}")
    while trees:
        level, trees = [h for h in dict.fromkeys(trees) if h not in m.trees], []
        m.trees.update(level)
        present = []
        for h in level:
            loc = remote.index.get(h)
            if loc is None:
                m.problems.append(f"tree {h.hex()} is in no pack index")
            elif loc.pack in m.bad_packs:
                m.problems.append(f"tree {h.hex()} is in the damaged pack {loc.pack}")
            else:
                present.append(h)
        try:
            fetched = list(remote.fetch(present, "tree"))
        except CorruptObject as e:
            m.problems.append(str(e))
            fetched = []
        for h, raw in fetched:
            try:
                entries = decode_tree(h, raw)
            except CorruptObject as e:
                m.problems.append(str(e))
                continue
            for e in entries:
                if e.get("type") == "dir":
                    trees.append(bytes.fromhex(e["tree"]))
                elif e.get("type") == "file":
                    for c in entry_chunks(e):
                        if c is not None:
                            m.chunks.setdefault(c, f"{e['name']} in tree {h.hex()}")
            progress(1)
    for wid, refs in warms.items():    # fetched and decoded once, however many commits name it
        try:
            chunks = decode_warm(wid, remote.blobs.get("warm/" + wid))
        except BlobNotFound:
            problem = f"warm/{wid} is missing"
        except CorruptObject as e:
            problem = str(e)
        else:
            stray = [c for c in chunks if c not in m.chunks]
            if not stray:
                continue
            problem = f"warm/{wid} names {len(stray)} chunks no tree lists (first {stray[0].hex()})"
        m.problems += [f"{ref}: {problem}" for ref in refs]
    for mid, refs in models.items():
        try:
            decode_model(mid, remote.blobs.get("model/" + mid))
            continue
        except BlobNotFound:
            problem = f"model/{mid} is missing"
        except CorruptObject as e:
            problem = str(e)
        m.problems += [f"{ref}: {problem}" for ref in refs]
    for c, where in m.chunks.items():
        loc = remote.index.get(c)
        if loc is None:
            m.problems.append(f"chunk {c.hex()} ({where}) is in no pack index")
        elif loc.pack in m.bad_packs:
            m.problems.append(f"chunk {c.hex()} ({where}) is in the damaged pack {loc.pack}")
    return m


def check(remote: Remote, verify: bool = False, progress: Callable[[int], None] = lambda n: None) -> tuple[list[str], dict[str, int]]:
    """(one line per problem, figures)."""
    m = mark(remote, progress)
    verified = 0
    if verify:
        good = [c for c in m.chunks if c in remote.index and remote.index[c].pack not in m.bad_packs]
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
                        m.problems.append(str(e))
    figures = {"references": m.refs, "commits": len(m.commits), "trees": len(m.trees), "chunks": len(m.chunks),
               "packs": len(m.sizes), "verified": verified, "forwards": len(remote.forwards())}
    return m.problems, figures
