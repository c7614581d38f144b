"""Dedup, delta compression and space accounting (issue #4), on real mounts.

Every test ends with a full reference walk (`cowfs fsck`), which also recounts the space
accounting and compares it with the figures the daemon keeps incrementally.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mounting
from cowfs.background.quiet import QUIET_AFTER
from cowfs.chunks import codec, delta
from mounting import KiB, MiB, du, fsck, ok, settle, stats

WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"import os", b"return x", b"def f(a):", b"self.x = 1",
         b"# comment", b"class Foo:", b"for i in range(10):", b"print(i)", b"    pass", b"}", b"{"]


def text(rnd: random.Random, size: int) -> bytes:
    """Source-like text: compressible, with many distinct lines."""
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 8)))
        out += b" %d\n" % rnd.randrange(10**6)
    return bytes(out[:size])


def edit(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(data)
    for kind, where, blob in edits:
        pos = int(where * len(b))
        if kind == "overwrite":
            b[pos : pos + len(blob)] = blob
        elif kind == "insert":
            b[pos:pos] = blob
        else:
            del b[pos : pos + len(blob)]
    return bytes(b)


edits_st = st.lists(st.tuples(st.sampled_from(["overwrite", "insert", "delete"]),
                              st.floats(0, 1, allow_nan=False), st.binary(min_size=1, max_size=300)),
                    min_size=1, max_size=12)


def check_identities(s: dict) -> None:
    assert s["logical_bytes"] == s["unique_bytes"] + s["dedup_saved_bytes"]
    assert s["unique_bytes"] == (s["chunk_bytes"] + s["compression_saved_bytes"] + s["delta_saved_bytes"])
    assert s["chunks"] == s["delta_chunks"] + s["whole_chunks"]
    assert s["delta_saved_bytes"] >= 0


# -- unit: codec and features -------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(300, 64 * KiB), edits=edits_st)
def test_delta_round_trip_and_sizes(seed, size, edits):
    base = text(random.Random(seed), size)
    new = edit(base, edits)[: 64 * KiB] or b"x"
    plain = codec.encode_chunk(new, 3)
    value = codec.encode_delta(new, codec.chunk_hash(base), delta.compressor(base), len(plain))
    assert codec.delta_base(value) == codec.chunk_hash(base)
    assert codec.chunk_sizes(value) == (len(new), len(plain))
    assert codec.decode_chunk(value, codec.chunk_hash(new), lambda h: base) == new


def test_features_find_near_copies_not_strangers():
    rnd = random.Random(7)
    hits = misses = 0
    for _ in range(40):
        base = text(rnd, 40 * KiB)
        near = edit(base, [("insert", rnd.random(), b"new line\n"), ("overwrite", rnd.random(), b"XYZ")])
        stranger = text(rnd, 40 * KiB)
        hits += bool(set(delta.super_features(base)) & set(delta.super_features(near)))
        misses += bool(set(delta.super_features(base)) & set(delta.super_features(stranger)))
    assert hits >= 36 and misses == 0, (hits, misses)


# -- mounts -----------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), variants=st.lists(edits_st, min_size=2, max_size=4))
def test_near_duplicates_round_trip_before_and_after_worker(mount_factory, seed, variants):
    """Every byte reads back, as written and after the worker delta-encoded it, and after a remount."""
    rnd = random.Random(seed)
    m = mount_factory(options=("dedup=off",))
    base = text(rnd, rnd.randint(100 * KiB, 300 * KiB))
    files = {"base": base, "random": rnd.randbytes(200 * KiB)}
    for i, edits in enumerate(variants):
        files[f"v{i}"] = edit(base, edits)
        files[f"r{i}"] = edit(files["random"], edits)
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data
    s = stats(m.path)
    assert s["background_queue"] > 0 and s["delta_chunks"] == 0
    m.stop()
    m.options = ["dedup=on", "dedup_cpu=1"]
    m.start()
    s = settle(m.path)
    assert s["background_queue"] == 0 and s["delta_chunks"] > 0, s
    check_identities(s)
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
    m.stop()
    fsck(m.store)
    m.start()
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
    m.stop()


@pytest.mark.timeout(240)
def test_copies_cost_one_copy_and_gc_gives_space_back(mount_factory, tmp_path):
    m = mount_factory()
    rnd = random.Random(3)
    src = tmp_path / "tree"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.py").write_bytes(text(rnd, rnd.randint(1 * KiB, 150 * KiB)))
    (src / "blob").write_bytes(rnd.randbytes(4 * MiB))
    shutil.copytree(src, m.path / "c0")
    settle(m.path)
    mounting.run_cowfs("gc", m.path, timeout=300)
    one = stats(m.path)
    for i in range(1, 5):
        shutil.copytree(src, m.path / f"c{i}")
    settle(m.path)
    mounting.run_cowfs("gc", m.path, timeout=300)
    five = stats(m.path)
    check_identities(five)
    assert five["unique_bytes"] == one["unique_bytes"] and five["chunk_bytes"] == one["chunk_bytes"]
    assert five["logical_bytes"] == 5 * one["logical_bytes"]
    assert five["stored_bytes"] <= 1.05 * one["stored_bytes"] + 256 * KiB, (one, five)
    for i in range(1, 5):
        shutil.rmtree(m.path / f"c{i}")
    mounting.run_cowfs("gc", m.path, timeout=300)
    back = stats(m.path)
    assert back["logical_bytes"] == one["logical_bytes"] and back["chunks"] == one["chunks"]
    # Margin: RocksDB's info log (in the database directory) grows with each compaction.
    assert back["stored_bytes"] <= one["stored_bytes"] + 768 * KiB, (one, back)
    m.stop()
    report = fsck(m.store)
    offline = stats(m.store)
    assert offline["logical_bytes"] == report["counts"]["logical_bytes"] == back["logical_bytes"]
    # On disk: the database (its write-ahead log told apart) plus the pack files (chunks of
    # large flushes, the 4 MiB blob's).
    on_disk = offline["stored_bytes"] + offline["wal_bytes"]
    assert abs(on_disk - du(m.store / "db") - du(m.store / "packs")) <= 64 * KiB


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [11, 12])
def test_gc_never_frees_what_a_file_or_delta_needs(mount_factory, seed):
    """Random create/edit/clone/snapshot/branch/delete with the worker running; then a full walk."""
    rnd = random.Random(seed)
    m = mount_factory(options=("dedup_cpu=1",))
    mp = m.path
    model: dict[str, bytes] = {}
    base = text(rnd, 200 * KiB)
    snaps: list[str] = []
    for step in range(60):
        op = rnd.choice(["write", "write", "edit", "clone", "delete", "snapshot", "drop", "settle"])
        if op == "write" or not model:
            name = f"f{step}"
            model[name] = edit(base, [("insert", rnd.random(), rnd.randbytes(rnd.randint(1, 50)))])
            (mp / name).write_bytes(model[name])
        elif op == "edit":
            name = rnd.choice(sorted(model))
            model[name] = edit(model[name], [("overwrite", rnd.random(), b"edit %d" % step)])
            (mp / name).write_bytes(model[name])
        elif op == "clone":
            name = rnd.choice(sorted(model))
            ok(mp, f"clone {name} k{step}")
            model[f"k{step}"] = model[name]
        elif op == "delete":
            name = rnd.choice(sorted(model))
            os.unlink(mp / name)
            del model[name]
        elif op == "snapshot":
            snaps.append(f"s{step}")
            ok(mp, f"snapshot {snaps[-1]}")
            if rnd.random() < 0.5:
                ok(mp, f"branch b{step} {snaps[-1]}")
        elif op == "drop" and snaps:
            ok(mp, f"delete {snaps.pop(rnd.randrange(len(snaps)))}")
        elif op == "settle":
            settle(mp)
    settle(mp)
    for name in snaps:
        ok(mp, f"delete {name}")
    mounting.run_cowfs("gc", mp, timeout=300)
    s = stats(mp)
    check_identities(s)
    assert s["delta_chunks"] > 0, s
    for name, data in model.items():
        assert (mp / name).read_bytes() == data, name
    m.stop()
    report = fsck(m.store)
    assert report["counts"]["logical_bytes"] == s["logical_bytes"]


@pytest.mark.timeout(300)
def test_kill9_during_background_work_loses_nothing(mount_factory):
    rnd = random.Random(5)
    m = mount_factory(options=("dedup=off",))
    base = text(rnd, 60 * KiB)
    files = {}
    for i in range(400):
        files[f"f{i}"] = edit(base, [("insert", rnd.random(), b"line %d\n" % i)])[: 64 * KiB - 1]
        (m.path / f"f{i}").write_bytes(files[f"f{i}"])
    m.stop()
    queued = stats(m.store)["background_queue"]
    assert queued >= 400
    m.options = ["dedup=on", "dedup_cpu=0.2"]
    m.start()
    deadline = time.monotonic() + 60
    while stats(m.path)["background_queue"] > queued * 0.6:
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    os.killpg(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=30)
    m.exit_codes.append(m.proc.returncode)
    subprocess.run(["fusermount3", "-u", str(m.path)], timeout=30)
    if m.mounted():
        mounting.lazy_unmount(m.path)
    fsck(m.store)
    left = stats(m.store)
    assert 0 < left["background_queue"] < queued and left["delta_chunks"] > 0, left
    m.options = ["dedup=on", "dedup_cpu=1"]
    m.start()
    s = settle(m.path)
    assert s["background_queue"] == 0 and s["delta_chunks"] > left["delta_chunks"], s
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(240)
def test_dictionary_is_pinned_while_used_and_freed_after(mount_factory):
    """Small unrelated files get delta-encoded against the trained dictionary; the dictionary
    lives exactly as long as some delta uses it."""
    rnd = random.Random(9)
    m = mount_factory(options=("dedup_cpu=1",))
    files = {f"s{i}.py": text(rnd, rnd.randint(2 * KiB, 12 * KiB)) for i in range(600)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    s = settle(m.path)
    assert s["dedup"]["dictionary"] and s["delta_chunks"] > 100, s
    check_identities(s)
    for name in sorted(files)[10:]:
        os.unlink(m.path / name)
    mounting.run_cowfs("gc", m.path, timeout=300)
    for name in sorted(files)[:10]:
        assert (m.path / name).read_bytes() == files[name]
    m.stop()
    fsck(m.store)
    m.start()
    for name in sorted(files)[:10]:
        os.unlink(m.path / name)
    mounting.run_cowfs("gc", m.path, timeout=300)
    s = stats(m.path)
    assert s["chunks"] == 0 and s["logical_bytes"] == 0 and s["unique_bytes"] == 0, s
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(120)
def test_format_1_store_is_upgraded_and_counted_at_first_open(mount_factory):
    from cowfs.chunks.families import CF_REFS, CF_SPACE, SPACE_KEY
    from cowfs.chunks.refs import parse_ref
    from cowfs.kv.base import Batch
    from cowfs.store import FORMAT_VERSION, Store

    rnd = random.Random(4)
    m = mount_factory(options=("dedup_cpu=1",))
    for i in range(30):
        (m.path / f"f{i}").write_bytes(text(rnd, rnd.randint(1 * KiB, 200 * KiB)))
    shutil.copy(m.path / "f1", m.path / "copy")
    settle(m.path)
    m.stop()
    st = Store(str(m.store))
    before = st.objects.space
    b = Batch()  # what an older cowfs left: no accounting, 8-byte counts
    b.delete(CF_SPACE, SPACE_KEY)
    for h, v in st.kv.scan(CF_REFS, b""):
        b.put(CF_REFS, h, parse_ref(v).count.to_bytes(8, "little"))
    st.kv.write(b)
    st.close()
    marker = m.store / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 1}))
    st = Store(str(m.store))
    assert st.objects.space == before
    st.close()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION
    fsck(m.store)


def stats_file(mp) -> dict:
    """The figures through .cowfs/stats: requests of this process to the mount, answered in
    milliseconds (`cowfs stats` reaches the daemon only after its own start-up, 0.5-0.8 s on
    a loaded machine, during which the mount gets no request at all)."""
    return json.loads((mp / ".cowfs" / "stats").read_bytes())


@pytest.mark.timeout(120)
def test_worker_waits_while_requests_keep_arriving(mount_factory):
    """With a small queue, the worker leaves the CPU (and the GIL) to a busy mount and does
    its work at the next quiet moment."""
    m = mount_factory(options=("dedup_cpu=1",))
    rnd = random.Random(5)
    base = text(rnd, 256 * KiB)
    calls: list[tuple[float, float]] = []  # (start, end) of each call to the mount, in order

    def timed(fn, *args):
        t = time.monotonic()
        try:
            return fn(*args)
        finally:
            calls.append((t, time.monotonic()))

    def absent_xattr() -> None:  # a GETXATTR of an absent name reaches the daemon each time
        try:
            os.getxattr(m.path / "f0", "user.absent")
        except OSError:
            pass

    for i in range(8):
        timed((m.path / f"f{i}").write_bytes, edit(base, [("insert", rnd.random(), b"copy %d" % i)]))
    before = timed(stats_file, m.path)  # close committed the files: their chunks are queued
    assert before["background_queue"] > 0
    end = time.monotonic() + 2.0  # 2 s of requests back to back
    while time.monotonic() < end:
        timed(absent_xattr)
    during = timed(stats_file, m.path)
    if during["dedup"]["chunks_done"] != before["dedup"]["chunks_done"]:
        # The worker ran: right only if the mount had a quiet moment, QUIET_AFTER without a
        # request, which only a machine that kept this process (or the daemon) off the CPU
        # that long can make here.  The daemon counted each request somewhere within its call.
        longest = max(b_end - a_start for (a_start, _), (_, b_end) in zip(calls, calls[1:]))
        if longest >= QUIET_AFTER:
            pytest.skip(f"the machine left the mount without a request for up to {longest:.2f} s "
                        f"(the worker's quiet moment is {QUIET_AFTER} s): nothing to check")
        raise AssertionError(f"the worker ran while requests kept arriving (at most {longest:.3f} s "
                             f"apart): {before['dedup']} -> {during['dedup']}")
    s = settle(m.path)
    assert s["background_queue"] == 0
    assert stats(m.path)["dedup"]["chunks_done"] > before["dedup"]["chunks_done"]


@pytest.mark.timeout(300)
def test_cold_small_reads_of_raw_compressed_and_delta_chunks_after_a_repack(mount_factory):
    """Reads of at most 16 KiB that reach a fresh daemon (nothing cached, kernel readahead
    off) read a raw packed chunk's range alone from its pack (chunks/objects.py,
    `_read_part`): they return the same bytes as the file holds for every kind of chunk,
    raw, zstd and delta-encoded, after the dedup worker re-encoded some and after `cowfs gc`
    repacked every pack with a dead byte (the pointers moved, the old packs deleted)."""
    rnd = random.Random(31)
    m = mount_factory(options=("dedup=off",))
    rand = rnd.randbytes(6 * MiB)  # flushes of 4 MiB or more put their chunks in packs
    files = {"random": rand, "text": text(rnd, 5 * MiB),
             "near": edit(rand, [("overwrite", k / 8, rnd.randbytes(64)) for k in range(8)])}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    (m.path / "scratch").write_bytes(rnd.randbytes(5 * MiB))
    os.unlink(m.path / "scratch")
    m.stop()
    m.options = ["dedup=on", "dedup_cpu=1"]
    m.start()
    s = settle(m.path)
    assert s["delta_chunks"] > 0, s
    got = mounting.cowfs_json("gc", m.path, "--repack-below", "1.0")
    assert got["packs_repacked"] > 0, got
    for rounds in range(2):  # the second: after another start, now from the repacked packs
        m.stop()
        m.start()
        for name, data in files.items():
            fd = os.open(m.path / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # small reads reach the daemon
                for _ in range(150):
                    off = rnd.randrange(len(data))
                    n = rnd.choice([1, 100, 4096, 5000, 16384])
                    assert os.pread(fd, n, off) == data[off : off + n], (name, off, n, rounds)
            finally:
                os.close(fd)
    m.stop()
    fsck(m.store)
