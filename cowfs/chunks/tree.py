"""A file's content as a copy-on-write tree of content-addressed chunks.

A file is a sequence of fixed-size chunks (index i covers bytes [i*CHUNK, (i+1)*CHUNK)).
Its tree is (depth, hash):
  depth 0: hash is the chunk at index 0 (the common single-chunk file: no node at all);
  depth d >= 1: hash is a node of up to FANOUT entries, each the hash of a depth d-1 subtree
  (a chunk at d == 1) or ZERO_HASH for a hole.
Holes (sparse ranges, all-zero chunks) are never stored.  Updating k chunks rewrites only
the nodes on their paths; two files (or snapshots) share every unchanged subtree, which is
what makes clone and snapshot O(1): they copy (depth, hash) and add one reference.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

from cowfs.chunks import codec
from cowfs.chunks.codec import HASH_LEN, ZERO_HASH
from cowfs.chunks.refs import RefTxn

CHUNK = codec.CHUNK
FANOUT = 512
# The all-zero chunk.  Writes never store it (zeros are holes), so a tree slot holding it is
# space reserved by fallocate: it reads as zeros, counts as allocated, and is a hole to
# SEEK_DATA/SEEK_HOLE, as ext4's unwritten extents are.
RESERVED = codec.chunk_hash(bytes(CHUNK))


class Root(NamedTuple):
    depth: int
    hash: bytes


def capacity(depth: int) -> int:
    return FANOUT**depth


def depth_for(n_chunks: int) -> int:
    d = 1
    while capacity(d) < n_chunks:
        d += 1
    return d


def lookup(root: Root | None, index: int, load_node: Callable[[bytes], bytes]) -> bytes | None:
    """Hash of chunk `index`, or None for a hole."""
    return lookup_leaf(root, index, load_node)[0]


def lookup_leaf(root: Root | None, index: int, load_node: Callable[[bytes], bytes]) -> tuple[bytes | None, bytes | None]:
    """(hash of chunk `index` or None for a hole, hash of the node whose slot holds it or
    None for a depth-0 tree): `lookup` that also names the leaf (ObjectStore.chunk_size)."""
    if root is None or (root.depth and index >= capacity(root.depth)):
        return None, None
    if root.depth == 0:
        return (root.hash if index == 0 else None), None
    h = root.hash
    leaf = h
    for level in range(root.depth, 0, -1):
        node = load_node(h)
        j, index = divmod(index, capacity(level - 1))
        off = j * HASH_LEN
        if off >= len(node):
            return None, None
        leaf, h = h, node[off : off + HASH_LEN]
        if h == ZERO_HASH:
            return None, None
    return h, leaf


def iter_chunks(root: Root | None, load_node: Callable[[bytes], bytes], start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(index, hash) of every stored chunk from index `start` on, in order (holes, and
    subtrees wholly before `start`, are skipped without being loaded)."""
    if root is None:
        return
    if root.depth == 0:
        if start == 0:
            yield 0, root.hash
        return

    def walk(h: bytes, level: int, base: int) -> Iterator[tuple[int, bytes]]:
        node = load_node(h)
        span = capacity(level - 1)
        for j in range(max(0, (start - base) // span), len(node) // HASH_LEN):
            c = node[j * HASH_LEN : (j + 1) * HASH_LEN]
            if c == ZERO_HASH:
                continue
            if level == 1:
                yield base + j, c
            else:
                yield from walk(c, level - 1, base + j * span)

    yield from walk(root.hash, root.depth, 0)


def extent(root: Root | None, load_node: Callable[[bytes], bytes]) -> int:
    """One past the index of the last stored chunk (0 for an empty tree): the rightmost path,
    since nodes never end with a hole."""
    if root is None:
        return 0
    h, base = root.hash, 0
    for level in range(root.depth, 0, -1):
        node = load_node(h)
        j = len(node) // HASH_LEN - 1
        base += j * capacity(level - 1)
        h = node[j * HASH_LEN :]
    return base + 1


class TreeWriter:
    """Builds a new root from an old one plus chunk changes, recording new nodes in a RefTxn.

    The caller moves the file's single reference from the old root to the new one; this
    class only creates nodes (each new node references its children when it is created).
    """

    def __init__(self, load_node: Callable[[bytes], bytes], txn: RefTxn) -> None:
        self._load_stored = load_node
        self.txn = txn

    def load_node(self, h: bytes) -> bytes:
        new = self.txn.new.get(h)
        return new[0][1:] if new is not None else self._load_stored(h)

    def _make_node(self, entries: list[bytes]) -> bytes | None:
        while entries and entries[-1] == ZERO_HASH:
            entries.pop()
        if not entries:
            return None
        node = b"".join(entries)
        h = codec.node_hash(node)
        self.txn.add_object(h, codec.encode_node(node), [e for e in entries if e != ZERO_HASH])
        return h

    def _entries(self, h: bytes | None) -> list[bytes]:
        if h is None:
            return []
        node = self.load_node(h)
        return [node[i : i + HASH_LEN] for i in range(0, len(node), HASH_LEN)]

    def _update(self, h: bytes | None, level: int, changes: list[tuple[int, bytes | None]], keep: int) -> bytes | None:
        """New hash of the subtree h at `level` covering indices [0, capacity(level)).

        changes: sorted (relative index, chunk hash or None); keep: indices >= keep are dropped.
        """
        entries = self._entries(h)
        span = capacity(level - 1)
        max_j = (keep + span - 1) // span  # entries at j >= max_j lie wholly beyond `keep`
        del entries[max_j:]
        groups: dict[int, list[tuple[int, bytes | None]]] = {}
        for idx, ch in changes:
            groups.setdefault(idx // span, []).append((idx % span, ch))
        # The entry that straddles `keep` must be trimmed inside, too.
        if keep < capacity(level) and keep % span and (keep // span) < len(entries):
            groups.setdefault(keep // span, [])
        for j in sorted(groups):
            if j >= max_j:
                continue
            while len(entries) <= j:
                entries.append(ZERO_HASH)
            old = entries[j]
            sub_keep = min(span, keep - j * span)
            if level == 1:
                new = groups[j][-1][1] if groups[j] else (old if old != ZERO_HASH else None)
            else:
                new = self._update(None if old == ZERO_HASH else old, level - 1, groups[j], sub_keep)
            entries[j] = new if new is not None else ZERO_HASH
        made = self._make_node(entries)
        if h is not None and made is not None and made != h and h not in self.txn.new:
            self.txn.pairs[made] = h
        return made

    def fill(self, root: Root | None, first: int, last: int, value: bytes | None, only_holes: bool,
             size_of: Callable[[bytes], int]) -> tuple[Root | None, list[int]]:
        """Set chunks [first, last) to `value` (a chunk hash, or None: holes), whole subtrees
        at a time: a subtree the range covers becomes a hole, or a subtree of `value` only
        (built once per level, so filling a terabyte costs a few nodes).  only_holes: only
        holes take `value` (subtrees whose content size says they are full are not even
        loaded); returns the new root and the indices of stored chunks in the range that are
        shorter than a chunk (the caller lengthens them)."""
        short: list[int] = []
        if last <= first:
            return root, short
        depth = max(depth_for(last), root.depth if root is not None else 0)
        h: bytes | None
        if root is None:
            h = None
        elif root.depth == 0:
            h = root.hash
            for _ in range(depth):
                h = self._make_node([h])  # type: ignore[list-item]
        else:
            h = root.hash
            for _ in range(depth - root.depth):
                h = self._make_node([h])  # type: ignore[list-item]
        full: dict[int, bytes | None] = {0: value}

        def whole(level: int) -> bytes | None:
            """A subtree of `level` holding `value` in every slot."""
            if level not in full:
                child = whole(level - 1)
                full[level] = None if child is None else self._make_node([child] * FANOUT)
            return full[level]

        def walk(h: bytes | None, level: int, base: int, lo: int, hi: int) -> bytes | None:
            """New hash of subtree h (covering [base, base + capacity(level))) with its
            chunks [lo, hi) (absolute, within it) filled."""
            if level == 0:
                if h is None or not only_holes:
                    return value
                if size_of(h) < CHUNK:
                    short.append(base)
                return h
            if lo == base and hi == base + capacity(level) and (not only_holes or h is None):
                return whole(level)
            if h is not None and only_holes and h not in self.txn.new and size_of(h) == capacity(level) * CHUNK:
                return h  # every chunk there is stored and whole (a node made just now has no size yet)
            entries = self._entries(h)
            span = capacity(level - 1)
            for j in range((lo - base) // span, (hi - base + span - 1) // span):
                if j >= len(entries):
                    if value is None:
                        break
                    entries.extend([ZERO_HASH] * (j + 1 - len(entries)))
                old = entries[j]
                b = base + j * span
                new = walk(None if old == ZERO_HASH else old, level - 1, b, max(lo, b), min(hi, b + span))
                entries[j] = new if new is not None else ZERO_HASH
            made = self._make_node(entries)
            if h is not None and made is not None and made != h and h not in self.txn.new:
                self.txn.pairs[made] = h
            return made

        new = walk(h, depth, 0, first, last)
        return (Root(depth, new) if new is not None else None), short

    def update(self, root: Root | None, changes: dict[int, bytes | None], n_chunks: int) -> Root | None:
        """Apply changes (index -> chunk hash, None = hole) and cut the file to n_chunks."""
        changes = {i: h for i, h in changes.items() if i < n_chunks}
        if n_chunks == 0:
            return None
        # Single-chunk files keep no node at all.
        if n_chunks == 1:
            if 0 in changes:
                h = changes[0]
            else:
                h = lookup(root, 0, self.load_node)
            return Root(0, h) if h is not None else None
        depth = depth_for(n_chunks)
        # Lift the old root to `depth` (or, if it is deeper than needed, descend into entry 0:
        # everything beyond n_chunks is being cut anyway).
        h: bytes | None
        if root is None:
            h = None
        elif root.depth == 0:
            h = self._make_node([root.hash])
            for _ in range(depth - 1):
                h = self._make_node([h])  # type: ignore[list-item]
        else:
            h = root.hash
            d = root.depth
            while d < depth:
                h = self._make_node([h])
                d += 1
            while d > depth:
                node = self.load_node(h)
                first = node[:HASH_LEN]
                h = None if (not first or first == ZERO_HASH) else first
                d -= 1
                if h is None:
                    break
        new = self._update(h, depth, sorted(changes.items()), n_chunks)
        return Root(depth, new) if new is not None else None
