"""Sparse dirty buffers against the kernel's own filesystem: random data operations on
large files (pwrite at random offsets, O_DIRECT and buffered, O_APPEND, mmap writes, reads,
truncates, fallocate, fsync, snapshots and clones, remounts and SIGKILLs after an fsync) run on
a cowfs mount and on a plain local directory; the bytes must agree.  The daemon holds the 1 s
timer's flush (the `timer_flush` fault) so written chunks stay in sparse buffers between
operations.  Reads that are compared go around the kernel's page cache (O_DIRECT), so the
daemon serves them.

The suite runs seed 0 for COWFS_SPARSE_DIFF_STEPS steps (default 120); the slow form
(scripts/test_slow.sh) runs COWFS_SPARSE_DIFF_SEEDS more seeds (default 8) of twice as many."""
from __future__ import annotations

import mmap
import os
import random

import pytest

import mounting
from mounting import ok

HOLD = {"COWFS_FAULTS": "timer_flush:eio:*"}
CHUNK = 64 << 10
PAGE = 4096
SEEDS = int(os.environ.get("COWFS_SPARSE_DIFF_SEEDS", "8"))
STEPS = int(os.environ.get("COWFS_SPARSE_DIFF_STEPS", "120"))
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


WORDS = [b"alpha ", b"beta ", b"import os\n", b"return x\n", b"def f(a):\n", b"    self.x = 1\n"]


def _bytes(rnd: random.Random, n: int) -> bytes:
    """n bytes, random or text-like (stored zstd-encoded, and delta candidates)."""
    if rnd.random() < 0.5:
        return rnd.randbytes(n)
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(WORDS)
    return bytes(out[:n])


def _direct_read(path, off: int, n: int) -> bytes:
    """n bytes at page-aligned off, past the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return mounting.direct_pread(fd, off, -(-n // PAGE) * PAGE)
    finally:
        os.close(fd)


class Pair:
    """One file on the mount and its twin in a plain directory."""

    def __init__(self, m: mounting.Mount, ref, name: str) -> None:
        self.m, self.ref, self.name = m, ref, name

    @property
    def paths(self):
        return self.m.path / self.name, self.ref / self.name


def _check(pair: Pair, why: str) -> None:
    mine, theirs = pair.paths
    want = theirs.read_bytes()
    assert os.stat(mine).st_size == len(want), f"{why}: size {os.stat(mine).st_size} != {len(want)}"
    got = _direct_read(mine, 0, len(want))
    if got != want:
        bad = next(i for i in range(len(want)) if got[i] != want[i])
        raise AssertionError(f"{why}: {pair.name} differs first at {bad} (chunk {bad // CHUNK} "
                             f"+{bad % CHUNK}), size {len(want)}")


def _step(rnd: random.Random, m: mounting.Mount, pairs: list[Pair], log: list[str]) -> None:
    pair = rnd.choice(pairs)
    mine, theirs = pair.paths
    size = os.stat(theirs).st_size
    op = rnd.choices(["pwrite_direct", "pwrite", "append", "mmap", "read", "truncate", "fsync",
                      "falloc", "snapshot", "clone", "remount", "kill"],
                     [30, 20, 4, 5, 20, 8, 10, 6, 2, 2, 2, 3])[0]
    if op in ("pwrite_direct", "read"):
        off = rnd.randrange(0, size + 3 * CHUNK) // PAGE * PAGE
        n = rnd.choice([1, 1, 2, 3, 16, 17, 40]) * PAGE
    else:
        off = rnd.randrange(0, size + 3 * CHUNK)
        n = rnd.choice([1, 100, 4096, 5000, 70000, rnd.randrange(1, 3 * CHUNK)])
    log.append(f"{op} {pair.name} off={off} n={n} size={size}")
    if op == "pwrite_direct":
        data = _bytes(rnd, n)
        fd = os.open(mine, os.O_WRONLY | os.O_DIRECT)
        try:
            mounting.direct_pwrite(fd, off, data)
        finally:
            os.close(fd)
        with open(theirs, "r+b") as f:
            assert os.pwrite(f.fileno(), data, off) == n
    elif op in ("pwrite", "append"):
        data = _bytes(rnd, n)
        flags = os.O_WRONLY | (os.O_APPEND if op == "append" else 0)
        for p in (mine, theirs):
            fd = os.open(p, flags)
            try:
                assert (os.write(fd, data) if op == "append" else os.pwrite(fd, data, off)) == n
            finally:
                os.close(fd)
    elif op == "mmap":
        if size == 0:
            return
        off = rnd.randrange(size)
        n = min(n, size - off)
        data = _bytes(rnd, n)
        for p in (mine, theirs):
            with open(p, "r+b") as f:
                mm = mmap.mmap(f.fileno(), size)
                mm[off : off + n] = data
                mm.flush()
                mm.close()
    elif op == "read":
        want = _direct_read(theirs, off, n)
        got = _direct_read(mine, off, n)
        assert got == want, f"read at {off} of {n}: differs ({len(got)} vs {len(want)} bytes)"
    elif op == "truncate":
        new = rnd.choice([rnd.randrange(0, size + 1), rnd.randrange(0, size + 2 * CHUNK),
                          size // CHUNK * CHUNK + rnd.randrange(CHUNK)])
        log[-1] += f" -> {new}"
        os.truncate(mine, new)
        os.truncate(theirs, new)
    elif op == "fsync":
        fd = os.open(mine, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif op == "falloc":
        mode = rnd.choice([0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           FALLOC_FL_ZERO_RANGE])
        log[-1] += f" mode={mode:#x}"
        for p in (mine, theirs):
            fd = os.open(p, os.O_RDWR)
            try:
                mounting.fallocate(fd, mode, off, n)
            finally:
                os.close(fd)
    elif op == "snapshot":
        name = f"s{rnd.randrange(1 << 30)}"
        ok(m.path, f"snapshot {name}")
        snap = m.path / ".cowfs" / "snapshots" / name / pair.name
        if snap.exists():
            want = theirs.read_bytes()
            assert snap.read_bytes() == want, f"snapshot {name} of {pair.name} differs"
    elif op == "clone":
        dst = f"{pair.name}.c{len(log)}"
        ok(m.path, f"clone {pair.name} {dst}")
        (pair.ref / dst).write_bytes(theirs.read_bytes())
        pairs.append(Pair(m, pair.ref, dst))
    elif op == "remount":
        m.remount()
    elif op == "kill":
        for p in pairs:  # what is not fsync'd may be lost: make it all durable first
            fd = os.open(p.paths[0], os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        mounting.sigkill_fsck_start(m)


def _run(m: mounting.Mount, ref, seed: int, steps: int) -> None:
    ref.mkdir()
    rnd = random.Random(seed)
    pairs = []
    for name, chunks in (("f", 24), ("g", 3)):
        data = _bytes(rnd, chunks * CHUNK + rnd.randrange(CHUNK))
        (m.path / name).write_bytes(data)
        (ref / name).write_bytes(data)
        pairs.append(Pair(m, ref, name))
    m.remount()  # cold: nothing of them cached
    log: list[str] = []
    for k in range(steps):
        try:
            _step(rnd, m, pairs, log)
            if k % 10 == 9:
                for p in pairs:
                    _check(p, f"step {k}")
        except BaseException:
            print(f"seed {seed}:\n" + "\n".join(log[-40:]))
            print(m.log_tail(40))
            raise
    for p in pairs:
        _check(p, "end")
    m.remount()
    for p in pairs:
        _check(p, "after remount")


@pytest.mark.timeout(600)
def test_sparse_buffers_differential(mount_factory, tmp_path):
    _run(mount_factory(env=HOLD), tmp_path / "ref", 0, STEPS)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", range(1, 1 + SEEDS))
def test_sparse_buffers_differential_long(mount_factory, tmp_path, seed):
    _run(mount_factory(env=HOLD), tmp_path / "ref", seed, 2 * STEPS)
