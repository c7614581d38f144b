"""Pack files (cowfs/chunks/packs.py): large flushes put chunk encodings in append-only packs.

Unit tests of PackStore, then real mounts: streamed data lands in packs and reads back after
a remount; freeing and re-encoding give pack space back; a kill -9 in the middle of a stream
leaves a store that fsck finds clean, with every fsync'd byte, and whose stray pack bytes the
next `cowfs gc` punches out.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import subprocess
import time

import pytest

import mounting
from cowfs.chunks.packs import PackStore
from test_dedup import KiB, MiB, du, fsck, settle, stats, text


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_pack_append_read_punch_sweep(tmp_path):
    ps = PackStore(str(tmp_path))
    values = [os.urandom(n) for n in (100 * KiB, 64 * KiB, 300 * KiB)]
    exts = ps.append(values)
    assert [e[2] for e in exts] == [len(v) for v in values]
    assert exts[1][1] == exts[0][1] + exts[0][2]  # written back to back, in order
    for v, e in zip(values, exts):
        assert ps.read(*e) == v
    path = tmp_path / "packs" / "00000001.pack"
    before = allocated(path)
    ps.punch([exts[0], exts[1]])  # adjacent: merged into one hole
    assert allocated(path) <= before - 160 * KiB
    assert ps.read(*exts[2]) == values[2]
    assert ps.read(*exts[0]) == bytes(exts[0][2])  # a hole reads as zeros
    # sweep: only the live extent keeps its blocks; the stray tail goes too
    more = ps.append([os.urandom(200 * KiB)])
    ps.sweep({1: [(exts[2][1], exts[2][2])]})
    assert allocated(path) <= exts[2][2] + 8 * KiB
    assert ps.read(*exts[2]) == values[2]
    assert more[0][0] == 1
    with pytest.raises(OSError):
        ps.read(1, os.path.getsize(path) - 10, 20)  # past the end
    ps.close()
    ps = PackStore(str(tmp_path))  # reopened: appends go after everything written before
    e = ps.append([b"x" * 10 * KiB])[0]
    assert e[1] >= more[0][1] + more[0][2]
    ps.close()


def _stream(path, total: int, seed: int, tail: int = 0) -> str:
    """Write `total` bytes (text and random blocks) with 1 MiB writes, then `tail` random
    bytes (a short last chunk); return the sha256."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(total // MiB):
            block = text(rnd, MiB) if i % 2 else rnd.randbytes(MiB)
            f.write(block)
            h.update(block)
        block = rnd.randbytes(tail)
        f.write(block)
        h.update(block)
    return h.hexdigest()


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()


@pytest.mark.timeout(300)
def test_streamed_file_lives_in_packs_and_space_comes_back(mount_factory):
    m = mount_factory(options=("dedup=off",))
    want = _stream(m.path / "big", 48 * MiB, 1, tail=1000)
    os.sync()
    packs = m.store / "packs"
    assert du(packs) >= 24 * MiB, "a 48 MiB stream should be packed, not inline"
    s = stats(m.path)
    assert s["stored_bytes"] >= du(packs)
    m.remount()
    assert _sha(m.path / "big") == want
    # Reads that start and end inside chunks, past the daemon's page cache (O_DIRECT): runs
    # of raw chunks come from one pread, the compressed ones chunk by chunk.
    rnd = random.Random(9)
    with open(m.path / "big", "rb") as f:
        whole = f.read()
    fd = os.open(m.path / "big", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 3 * MiB)
    try:
        for _ in range(40):
            off = rnd.randrange(0, len(whole) // 4096) * 4096
            size = rnd.choice([8 * KiB, 68 * KiB, 1 * MiB, 3 * MiB])
            n = os.preadv(fd, [memoryview(buf)[:size]], off)
            assert buf[:n] == whole[off : off + size], (off, size)
    finally:
        os.close(fd)
    # Rewrite a few chunks in the middle (small flushes: inline), then delete the file.
    with open(m.path / "big", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"y" * 200 * KiB)
        os.fsync(f.fileno())
    os.unlink(m.path / "big")
    os.sync()
    assert du(packs) < 1 * MiB, "freed chunks are punched out of the pack"
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(300)
def test_worker_recodes_packed_chunks_and_punches_them(mount_factory):
    rnd = random.Random(2)
    m = mount_factory(options=("dedup=off",))
    base = text(rnd, 8 * MiB)
    with open(m.path / "a", "wb") as f:
        f.write(base)
    near = bytearray(base)
    for c in range(0, len(near), 64 * KiB):  # one edit in place per chunk: each stays similar to a's
        p = c + rnd.randrange(64 * KiB - 10)
        near[p : p + 5] = b"EDIT!"
    with open(m.path / "b", "wb") as f:
        f.write(near)
        os.fsync(f.fileno())  # committed now, not at the release after close
    packed = du(m.store / "packs")
    assert packed > 2 * MiB
    m.stop()
    m.options = ["dedup=on", "dedup_cpu=1"]
    m.start()
    s = settle(m.path)
    assert s["delta_chunks"] >= 100, s
    mounting.run_cowfs("gc", m.path, timeout=300)
    assert du(m.store / "packs") < packed * 0.75, "b's chunks became deltas: their pack bytes are gone"
    assert (m.path / "a").read_bytes() == base
    assert (m.path / "b").read_bytes() == bytes(near)
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(300)
def test_kill9_during_a_stream_keeps_fsynced_data_and_gc_sweeps_the_rest(mount_factory):
    m = mount_factory(options=("dedup=off",))
    want = _stream(m.path / "synced", 24 * MiB, 3)
    fd = os.open(m.path / "synced", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    # A second stream, killed in the middle: some of it may be packed but never committed.
    writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={m.path / 'partial'}", "bs=1M", "count=400"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while du(m.store / "packs") < 48 * MiB:
        assert time.monotonic() < deadline, "the stream never reached the packs"
        time.sleep(0.02)
    os.killpg(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=30)
    m.exit_codes.append(m.proc.returncode)
    writer.kill()
    writer.wait(timeout=30)
    subprocess.run(["fusermount3", "-u", str(m.path)], timeout=30)
    if m.mounted():
        mounting.lazy_unmount(m.path)
    fsck(m.store)
    m.start()
    assert _sha(m.path / "synced") == want
    if (m.path / "partial").exists():
        os.unlink(m.path / "partial")
    os.sync()
    mounting.run_cowfs("gc", m.path, timeout=300)
    # Only the synced file's chunks are left in the packs (24 MiB, half of it text that
    # compresses): whatever the kill left behind was swept.
    assert du(m.store / "packs") <= 20 * MiB, du(m.store / "packs")
    assert _sha(m.path / "synced") == want
    m.stop()
    fsck(m.store)


def test_pack_appends_fall_back_to_buffered_writes_without_direct_io():
    """tmpfs takes no O_DIRECT: appends go through the page cache instead."""
    import tempfile
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        ps = PackStore(d)
        values = [os.urandom(5000), os.urandom(70 * KiB)]
        exts = ps.append(values)
        exts += ps.append([b"z" * 100])
        assert exts[2][1] % 4096 == 0  # the next append still starts aligned
        for v, e in zip(values + [b"z" * 100], exts):
            assert ps.read(*e) == v
        ps.close()
