"""Large stores built quickly through the store's own API (no FUSE): the base tree through
`cowfs.core.Filesystem` (the daemon's own code, in process), then snapshots, branches and
deletes written as the catalog writes them, thousands per batch.  Used by
scripts/bench_scale.py and the tests that need a store with a long history
(`sys.path.insert(0, "scripts")`).

Every snapshot and branch is one the daemon could have made: a snapshot freezes the
branch head (its layer becomes the snapshot's) and gives the branch a new child layer; a
branch from a snapshot gets a new layer under the snapshot's.  Between two snapshots the
loader rewrites the record of one symlink, `d/link`, whose target names the snapshot that
will freeze it (`s<i>`), so that every snapshot reads differently and a reader can check
that it reads the right one.  Symlink records hold their target, so no chunk is written.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import trio

from cowfs.core.filesystem import Filesystem
from cowfs.kv.base import Batch
from cowfs.meta.layers import Branch, Snapshot, Usage
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_INODES, Versioned, ino_key
from cowfs.store import ROOT_INO, Store, init_store

BATCH = 5000  # snapshots or branches per committed batch
FILES = 10  # regular files in the base tree (d/f0 .. d/f9, content b"file <n>\n")
DIR_FILES = 1000  # files per directory of a wide tree (`_wide_tree`)
FLUSH_EVERY = 20_000  # entries made by the filesystem core between two flushes


@dataclass
class Built:
    """What a builder made and how long it took."""

    path: str
    seconds: float
    snapshots: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    link_ino: int = 0


def file_content(n: int) -> bytes:
    return f"file {n}\n".encode()


def _base_tree(store: Store) -> int:
    """d/ with FILES small files and the symlink d/link (target "base") in branch main,
    through the filesystem core; the symlink's inode number."""
    async def build() -> int:
        fs = Filesystem(store, "main")
        root = fs.node(fs.primary, ROOT_INO)
        d = await fs.make(root, b"d", 0o40755, 0, 0)
        for n in range(FILES):
            f = await fs.make(d, f"f{n}".encode(), 0o100644, 0, 0)
            await fs.write(f, 0, file_content(n))
        link = await fs.make(d, b"link", 0o120777, 0, 0, target=b"base")
        await fs.flush()
        return link.ino
    return trio.run(build)


def _relink(store: Store, batch: Batch, ino: int, layer: int, attrs: Attrs, target: str) -> None:
    """Write the symlink's record with a new target as a version in layer."""
    attrs.target = target.encode()
    attrs.size = len(attrs.target)
    Versioned.put(batch, CF_INODES, ino_key(ino), layer, attrs.pack())


def _link_attrs(store: Store, ino: int, layer: int) -> Attrs:
    found = store.meta.get(CF_INODES, ino_key(ino), store.catalog.layer_view(layer))
    assert found is not None and found[1]
    return Attrs.unpack(found[1])


def _wide_tree(store: Store, entries: int) -> None:
    """t/ in branch main with `entries` entries below it: directories t/d<k> of up to
    DIR_FILES empty files each (the directories count as entries), through the filesystem
    core, flushed every FLUSH_EVERY entries so a million entries stay within memory."""
    async def build() -> None:
        fs = Filesystem(store, "main")
        root = fs.node(fs.primary, ROOT_INO)
        top = await fs.make(root, b"t", 0o40755, 0, 0)
        d, made, k = top, 0, 0
        while made < entries:
            if made % (DIR_FILES + 1) == 0:
                d = await fs.make(top, f"d{k}".encode(), 0o40755, 0, 0)
                k += 1
            else:
                await fs.make(d, f"f{made}".encode(), 0o100644, 0, 0)
            made += 1
            if made % FLUSH_EVERY == 0:
                await fs.flush()
        await fs.flush()
    trio.run(build)


def _deep_tree(store: Store, depth: int) -> None:
    """deep/d/d/.../leaf in branch main: `depth` directories one in the other (deep and
    depth - 1 levels of d) and a file `leaf` (content b"bottom") at the bottom."""
    async def build() -> None:
        fs = Filesystem(store, "main")
        d = await fs.make(fs.node(fs.primary, ROOT_INO), b"deep", 0o40755, 0, 0)
        for i in range(depth - 1):
            d = await fs.make(d, b"d", 0o40755, 0, 0)
            if i % FLUSH_EVERY == 0:
                await fs.flush()
        leaf = await fs.make(d, b"leaf", 0o100644, 0, 0)
        await fs.write(leaf, 0, b"bottom")
        await fs.flush()
    trio.run(build)


def deep(path: str, depth: int) -> Built:
    """A store whose branch main holds d/ (the base tree) and a tree `depth` directories
    deep (`_deep_tree`)."""
    t0 = time.perf_counter()
    init_store(path)
    store = Store(path)
    try:
        ino = _base_tree(store)
        _deep_tree(store, depth)
        store.kv.sync()
    finally:
        store.close()
    return Built(path, time.perf_counter() - t0, link_ino=ino)


def chain(path: str, snapshots: int, prefix: str = "s", entries: int = 0) -> Built:
    """A store whose branch main has `snapshots` snapshots in one line (<prefix>0, ...):
    before snapshot i, d/link's target is rewritten to "<prefix><i>".  With `entries`, the
    tree t/ of that many entries (`_wide_tree`) is made first, before every snapshot."""
    t0 = time.perf_counter()
    init_store(path)
    store = Store(path)
    try:
        ino = _base_tree(store)
        if entries:
            _wide_tree(store, entries)
        cat = store.catalog
        b = cat.branches["main"]
        attrs = _link_attrs(store, ino, b.head)
        usage = cat.usage(b.head) or Usage(0, 0, 0)
        out = Built(path, 0.0, link_ino=ino)
        batch, now = Batch(), time.time()
        for i in range(snapshots):
            name = f"{prefix}{i}"
            _relink(store, batch, ino, b.head, attrs, name)
            frozen = b.head
            b.head = cat.new_layer(frozen, batch)
            cat.save_snapshot(Snapshot(name, frozen, cat.new_view(batch), "main", created=now + i * 1e-6), batch)
            cat.save_usage(b.head, usage, batch)
            out.snapshots.append(name)
            if len(out.snapshots) % BATCH == 0:
                cat.save_branch(b, batch)
                store.commit(batch)
                batch = Batch()
        cat.save_branch(b, batch)
        store.commit(batch)
        store.kv.sync()
    finally:
        store.close()
    out.seconds = time.perf_counter() - t0
    return out


def fan(path: str, forks: int) -> Built:
    """A store with snapshot "base" of main and `forks` branches b<k> made from it, each with
    d/link rewritten to "s<k>" and then one snapshot s<k> of its own: 2*forks + 1 snapshots
    and branches besides main, every snapshot a few layers deep (owned by main through its
    branch, so main's .cowfs/snapshots lists them all)."""
    t0 = time.perf_counter()
    init_store(path)
    store = Store(path)
    try:
        ino = _base_tree(store)
        cat = store.catalog
        main = cat.branches["main"]
        attrs = _link_attrs(store, ino, main.head)
        usage = cat.usage(main.head) or Usage(0, 0, 0)
        out = Built(path, 0.0, link_ino=ino)
        batch, now = Batch(), time.time()
        base = main.head
        main.head = cat.new_layer(base, batch)
        cat.save_branch(main, batch)
        cat.save_usage(main.head, usage, batch)
        cat.save_snapshot(Snapshot("base", base, cat.new_view(batch), "main", created=now), batch)
        out.snapshots.append("base")
        for k in range(forks):
            head = cat.new_layer(base, batch)
            name = f"s{k}"
            _relink(store, batch, ino, head, attrs, name)
            frozen, head = head, cat.new_layer(head, batch)
            br = Branch(f"b{k}", head, cat.new_view(batch), created=now + k * 1e-6, parent="base",
                        parent_branch="main")
            cat.save_branch(br, batch)
            cat.save_usage(frozen, usage, batch)
            cat.save_usage(head, usage, batch)
            cat.save_snapshot(Snapshot(name, frozen, cat.new_view(batch), br.name, created=now + k * 1e-6), batch)
            out.branches.append(br.name)
            out.snapshots.append(name)
            if (k + 1) % BATCH == 0:
                store.commit(batch)
                batch = Batch()
        store.commit(batch)
        store.kv.sync()
    finally:
        store.close()
    out.seconds = time.perf_counter() - t0
    return out


def delete(path: str, names: list[str]) -> float:
    """Delete snapshots or branches of an unmounted store as the daemon's delete does
    (catalog entries only; garbage collection is left to the next pass); seconds taken."""
    t0 = time.perf_counter()
    store = Store(path)
    try:
        batch = Batch()
        for i, name in enumerate(names, 1):
            store.catalog.remove(name, batch)
            if i % BATCH == 0:
                store.commit(batch)
                batch = Batch()
        store.commit(batch)
        store.kv.sync()
    finally:
        store.close()
    return time.perf_counter() - t0


def store_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total
