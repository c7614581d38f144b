"""Sparse dirty buffers (cowfs/core/node.py, `Sparse`): a write into part of a stored chunk
that is in no buffer does not read that chunk; the stored chunk is merged in only where the
whole chunk is needed (a read of bytes not written, a truncate, the fold that encodes it).

The daemons hold the 1 s timer's flush (the `timer_flush` test hook) so that the written
pages stay in sparse buffers until the test folds them (reading the stats folds).  Reads go
around the kernel's page cache (O_DIRECT) so that the daemon serves them.  The stored chunks
are random bytes, so each one is a distinct L1 entry when read: the L1 misses count the
stored chunks read (and the few tree nodes looked up).
"""
from __future__ import annotations

import os
import random

import pytest

import mounting
from mounting import stats

HOLD = {"COWFS_FAULTS": "timer_flush:eio:*"}
CHUNK = 64 << 10
PAGE = 4096
CHUNKS = 16


def _cold_file(m: mounting.Mount, seed: int) -> tuple[bytearray, random.Random]:
    """File f of CHUNKS random chunks, committed, and the daemon restarted (nothing of it
    cached): the model of its bytes and the random source of the writes to come."""
    rnd = random.Random(seed)
    model = bytearray(rnd.randbytes(CHUNKS * CHUNK))
    (m.path / "f").write_bytes(model)
    m.remount()
    return model, rnd


def _misses(m: mounting.Mount) -> int:
    """L1 misses so far (reading them folds the log: every write is committed after)."""
    return stats(m.path)["cache"]["l1"]["misses"]


@pytest.mark.timeout(180)
def test_page_writes_into_cold_chunks_read_no_stored_chunk(mount_factory):
    """One fsync'd 4 KiB page into each of 16 stored chunks: no chunk is read, neither by
    the writes nor by the fold that commits them (it reads them outside the cache); the file
    is right before and after the fold, and after a SIGKILL that replays the log."""
    m = mount_factory(env=HOLD)
    model, rnd = _cold_file(m, 35)
    path = m.path / "f"
    fd = os.open(path, os.O_RDWR)
    try:
        before = _misses(m)
        for i in range(CHUNKS):
            off = i * CHUNK + rnd.randrange(CHUNK // PAGE) * PAGE
            page = rnd.randbytes(PAGE)
            assert os.pwrite(fd, page, off) == PAGE
            model[off : off + PAGE] = page
            os.fsync(fd)
        folded = _misses(m)
        # Before sparse buffers: one miss per chunk written (its 64 KiB read, checked, cached).
        assert folded - before <= 2, (before, folded)  # the file's tree nodes at most
        assert path.read_bytes() == model
        for i in range(CHUNKS):  # again, unfolded this time, and killed before any fold
            off = i * CHUNK + rnd.randrange(CHUNK // PAGE) * PAGE
            page = rnd.randbytes(PAGE)
            assert os.pwrite(fd, page, off) == PAGE
            model[off : off + PAGE] = page
            os.fsync(fd)
        mounting.sigkill_fsck_start(m)
    finally:
        mounting.close_after_kill(fd)
    assert "16 small-write log records of a previous daemon replayed" in m.log_text()
    assert path.read_bytes() == model


def _pwrite(fd: int, model: bytearray, off: int, data: bytes) -> None:
    """Write data at off through an O_DIRECT handle (an aligned buffer), and into model."""
    mounting.direct_pwrite(fd, off, data)
    model[off : off + len(data)] = data


@pytest.mark.timeout(180)
def test_reads_of_sparse_buffers_merge_the_stored_chunk_only_for_bytes_not_written(mount_factory):
    """A read of written bytes only is served from the buffer (no chunk read); a read that
    covers bytes not written merges the stored chunk; a truncate into a sparse buffer; the
    results match a model throughout, and after a SIGKILL replays the log."""
    m = mount_factory(env=HOLD)
    model, rnd = _cold_file(m, 36)
    path = m.path / "f"
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        base = _misses(m)
        for c in (1, 2, 3, 4):
            for first, n in [(0, 3), (5, 2), (14, 1)]:  # (first page, pages): three runs per chunk
                _pwrite(fd, model, c * CHUNK + first * PAGE, rnd.randbytes(n * PAGE))
        # Written bytes only: from the buffers.
        for c in (1, 2, 3, 4):
            assert mounting.direct_pread(fd, c * CHUNK, 3 * PAGE) == model[c * CHUNK : c * CHUNK + 3 * PAGE]
            assert mounting.direct_pread(fd, c * CHUNK + 6 * PAGE, PAGE) == model[c * CHUNK + 6 * PAGE : c * CHUNK + 7 * PAGE]
        # No chunk read: before sparse buffers, one miss per chunk written.  (This folds; the
        # fold reads the stored chunks outside the cache.)
        assert _misses(m) - base <= 2, base
        # Written again after the fold: sparse again.  Reads across written and unwritten
        # pages merge the stored chunk.
        _pwrite(fd, model, 4 * PAGE, rnd.randbytes(PAGE))
        _pwrite(fd, model, 3 * CHUNK + 9 * PAGE, rnd.randbytes(2 * PAGE))
        os.fsync(fd)
        assert mounting.direct_pread(fd, 0, CHUNK) == model[:CHUNK]
        assert mounting.direct_pread(fd, 3 * CHUNK + 8 * PAGE, 2 * PAGE) == model[3 * CHUNK + 8 * PAGE : 3 * CHUNK + 10 * PAGE]
        assert mounting.direct_pread(fd, CHUNK, 3 * CHUNK) == model[CHUNK : 4 * CHUNK]
        # A sparse chunk truncated into (the truncate folds it first), then written sparse
        # again below the new end, and killed before the fold.
        _pwrite(fd, model, 2 * CHUNK + 12 * PAGE, rnd.randbytes(2 * PAGE))
        os.ftruncate(fd, 2 * CHUNK + 13 * PAGE + 100)
        del model[2 * CHUNK + 13 * PAGE + 100 :]
        _pwrite(fd, model, CHUNK + 9 * PAGE, rnd.randbytes(PAGE))
        os.fsync(fd)
        assert mounting.direct_pread(fd, 0, (len(model) // PAGE + 1) * PAGE) == model
        mounting.sigkill_fsck_start(m)
    finally:
        mounting.close_after_kill(fd)
    assert path.read_bytes() == model
    assert os.stat(path).st_size == len(model)
