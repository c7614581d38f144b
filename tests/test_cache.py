"""The read cache (issue #5): byte bounds, the L2 page layout, readahead, the learned model,
and reads that never return stale data through small caches under writes, truncates, clones
and rollbacks (on real mounts)."""
from __future__ import annotations

import base64
import mmap
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs.cache import ByteLRU, ChunkCache
from cowfs.cache.l2 import pack
from cowfs.cache.learned import OpenModel
from cowfs.cache.lru import ENTRY_OVERHEAD
from cowfs.cache.readahead import Readahead
from cowfs.chunks.tree import CHUNK
from mounting import ok, stats, wait_until

KiB = 1024


# -- units ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64 * KiB),
       st.lists(st.tuples(st.integers(0, 40), st.integers(0, 20 * KiB)), max_size=200))
def test_byte_lru_never_exceeds_its_bound(limit, puts):
    lru: ByteLRU[bytes] = ByteLRU(limit)
    for k, n in puts:
        lru.put(k.to_bytes(32, "big"), bytes(n))
        assert lru.bytes <= limit
        assert lru.bytes == sum(len(v) + ENTRY_OVERHEAD for v in lru._d.values())


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=CHUNK), st.data())
def test_l2_pages_read_back_exactly(data, draw):
    text = (data * (CHUNK // max(1, len(data)) + 1))[: len(data) * 3 // 2 or 1][:CHUNK] if data else b""
    p = pack(text)
    assert p.whole() == text
    if text:
        a = draw.draw(st.integers(0, len(text) - 1))
        b = draw.draw(st.integers(a + 1, len(text)))
        assert p.read(a, b) == text[a:b]


def test_chunk_cache_levels_and_bounds():
    c = ChunkCache(3 * (CHUNK + ENTRY_OVERHEAD), 1 << 20)
    rnd = random.Random(1)
    chunks = {rnd.randbytes(32): ((b"%d " % i) * CHUNK)[:CHUNK] for i in range(20)}
    once = rnd.randbytes(32)
    c.put(once, chunks[next(iter(chunks))])  # read once only: not worth packing into L2
    for h, d in chunks.items():
        c.put(h, d)
        assert bytes(c.read(h, 0, 10)) == d[:10]  # a second use: evicted into L2, not dropped
        assert c.l1.bytes <= c.l1.max_bytes and c.l2.bytes <= c.l2.max_bytes
    assert len(c.l1) == 3 and c.l1.evictions == 18 and len(c.l2) == 17 and once not in c.l2
    for h, d in list(chunks.items())[:17]:  # partial reads from L2 are not promoted
        assert bytes(c.read(h, 100, 5000)) == d[100:5000]
    assert c.l2.hits == 17 and len(c.l2) == 17
    h0 = next(iter(chunks))
    assert bytes(c.read(h0, 0, CHUNK)) == chunks[h0] and h0 in c.l1  # a whole one is
    c.discard(h0)
    assert not c.cached(h0)


def test_readahead_grows_on_sequential_and_strided_reads_and_resets():
    r = Readahead()
    size = 64 << 20
    assert r.observe(0, 128 * KiB, size) == []
    first = r.observe(128 * KiB, 128 * KiB, size)
    second = r.observe(256 * KiB, 128 * KiB, size)
    assert first == [4, 5] and len(second) > 0 and second[0] == 6  # window grows, no repeats
    assert r.observe(10 << 20, 4 * KiB, size) == []  # a jump resets
    r2 = Readahead()
    for k in range(3):
        got = r2.observe(k * 1 << 20, 4 * KiB, size)
    assert got == [48]  # stride 1 MiB seen twice: the next stride's chunk
    assert r2.observe(3 << 20, 4 * KiB, size) == [64, 80]  # the window grows


def test_open_model_chain_threshold_and_roundtrip():
    m = OpenModel()
    for ino in [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4]:
        m.opened(ino)
        m.read(ino, 0, 1)
    # The prediction follows likely successors (3 -> 4 twice, 3 -> 5 once: p = 2/3 >= 0.5)
    # until a file would repeat (4 -> 1).
    assert OpenModel.loads(m.dumps()).to_prefetch(1) == [1, 2, 3, 4]
    m.opened(3)
    m.opened(5)
    m.opened(3)
    m.opened(5)  # now 3 -> 4: 2, 3 -> 5: 3: 5 leads, p = 0.6
    back = OpenModel.loads(m.dumps())
    assert back.next == m.next and back.chunks == m.chunks
    assert back.to_prefetch(2) == [2, 3, 5, 1]
    assert back.to_prefetch(3) == []  # opens along the prediction: each file asked for once
    assert back.to_prefetch(5) == []
    assert back.to_prefetch(4) == [4]  # off the prediction: predicted afresh (4 -> 1 -> 2 ...)


# -- on a mount -------------------------------------------------------------------------------
def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pf(mp) -> dict:
    return stats(mp)["cache"]["prefetch"]


@pytest.mark.timeout(120)
def test_readahead_counters_move_on_a_sequential_read(mount_factory):
    m = mount_factory(options=["prefetch_learn=0"])
    # Compressible (zstd chunks): raw chunks streamed into a pack are served a whole request
    # per pread and get no chunk readahead (the kernel reads ahead in the pack file).
    data = base64.b64encode(random.Random(3).randbytes(12 << 20))
    (m.path / "big").write_bytes(data)
    m.remount()
    fd = os.open(m.path / "big", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    out = bytearray()
    try:
        # A consumer that does some work per MiB: 50 ms, time for the prefetch threads to load
        # the window ahead before the next read even on a loaded machine (a chunk the reader
        # decoded first is not counted as prefetched; with 10 ms, at load ~12 with another
        # pytest-xdist worker, the reader won every race once: prefetched 0).
        for off in range(0, len(data), 1 << 20):
            n = os.preadv(fd, [buf], off)
            out += buf[:n]
            time.sleep(0.05)
    finally:
        os.close(fd)
    assert out == data
    ra = _pf(m.path)["readahead"]
    assert ra["prefetched"] > 0 and ra["used"] > 0 and ra["served_reads"] > 0, ra


def _train(mp, names: list[str], rounds: int = 3) -> None:
    for _ in range(rounds):
        for n in names:
            _read(mp / n)


@pytest.mark.timeout(180)
def test_learned_model_persists_across_remounts_and_into_forks(mount_factory, forks):
    m = mount_factory()
    names = [f"f{i}" for i in range(6)]
    for i, n in enumerate(names):
        (m.path / n).write_bytes(random.Random(i).randbytes(200 * KiB))  # 4 distinct chunks
    m.remount()
    _train(m.path, names)
    st0 = stats(m.path)
    assert st0["prefetch_learning"] and st0["prefetch_model"]["files"] >= len(names) - 1, st0["prefetch_model"]
    m.remount()  # the model is written at unmount, read back on first use
    assert stats(m.path)["prefetch_model"] == st0["prefetch_model"]
    _read(m.path / names[0])  # a known sequence starts: the next files' chunks are fetched
    le = wait_until(lambda: (lambda p: p if p["prefetched"] >= 4 * 4 else None)(_pf(m.path)["learned"]),
               "learned prefetch after a remount")
    for n in names[1:]:
        assert _read(m.path / n) == (m.path / n).read_bytes()
    assert _pf(m.path)["learned"]["used"] >= le["prefetched"] * 3 // 4
    ok(m.path, "branch feat")
    fork = forks.mount(m.store, "feat")
    assert stats(fork)["prefetch_model"]["files"] == st0["prefetch_model"]["files"]  # inherited
    forks.umount(fork)


@pytest.mark.timeout(120)
def test_learning_off_by_mount_option(mount_factory):
    m = mount_factory(options=["prefetch_learn=0"])
    names = [f"g{i}" for i in range(4)]
    for n in names:
        (m.path / n).write_bytes(b"x" * (100 * KiB))
    m.remount()
    _train(m.path, names)
    st0 = stats(m.path)
    assert not st0["prefetch_learning"] and st0["prefetch_model"]["files"] == 0
    m.options = ["prefetch=0"]
    m.remount()
    st1 = stats(m.path)
    assert not st1["prefetch_enabled"] and st1["prefetch_model"]["files"] == 0


# Stale reads: a random mix of writes, truncates, clones, snapshots and rollbacks, through
# caches small enough (1 MiB each) that chunks move between L1, L2 and the store all the time,
# with readahead and learned prefetch on; every read is compared with a model.
_FILES = ["a", "b", "c"]
_op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(_FILES), st.integers(0, 600 * KiB), st.integers(1, 200 * KiB),
              st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.sampled_from(_FILES), st.integers(0, 700 * KiB)),
    st.tuples(st.just("clone"), st.sampled_from(_FILES), st.sampled_from(_FILES)),
    st.tuples(st.just("snapshot"),),
    st.tuples(st.just("rollback"),),
    st.tuples(st.just("read"), st.sampled_from(_FILES)),
)


@pytest.mark.timeout(240)
def test_reads_never_stale_under_writes_truncates_clones_rollbacks(mount_factory):
    m = mount_factory(options=["cache_l1=1M", "cache_l2=1M"])
    mp = m.path
    counter = iter(range(10**6))

    # Derandomized: the cache figures asserted below depend on the sequences drawn.
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(_op, min_size=5, max_size=25))
    def run(ops):
        model: dict[str, bytes] = {}
        for n in _FILES:
            data = random.Random(n).randbytes(300 * KiB)
            (mp / n).write_bytes(data)
            model[n] = data
        snap: tuple[str, dict[str, bytes]] | None = None
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, n, off, size, byte = op
                with open(mp / n, "r+b") as f:
                    f.seek(off)
                    f.write(bytes([byte]) * size)
                cur = model[n]
                cur = cur + bytes(max(0, off - len(cur)))
                model[n] = cur[:off] + bytes([byte]) * size + cur[off + size:]
            elif kind == "truncate":
                _, n, size = op
                os.truncate(mp / n, size)
                model[n] = model[n][:size] + bytes(max(0, size - len(model[n])))
            elif kind == "clone":
                _, src, dst = op
                if src == dst:
                    continue
                os.unlink(mp / dst)
                ok(mp, f"clone {src} {dst}")
                model[dst] = model[src]
            elif kind == "snapshot":
                name = f"s{next(counter)}"
                ok(mp, f"snapshot {name}")
                snap = (name, dict(model))
            elif kind == "rollback" and snap is not None:
                ok(mp, f"rollback {snap[0]}")
                model = dict(snap[1])
            for n in _FILES if kind in ("rollback", "clone", "read") else [op[1]] if len(op) > 1 else []:
                assert _read(mp / n) == model[n], f"{n} after {op}"
        for n in _FILES:
            assert _read(mp / n) == model[n]

    run()
    c = stats(mp)["cache"]
    for level in ("l1", "l2"):
        assert c[level]["bytes"] <= c[level]["max_bytes"] == 1 << 20, c[level]
    assert c["l2"]["hits"] > 0 and c["l1"]["evictions"] > 0, c


def test_unreadable_model_starts_afresh():
    from cowfs.cache.learned import Learner
    from cowfs.meta.layers import model_key
    from cowfs.meta.layers import CF_META

    class KV:
        def __init__(self) -> None:
            self.d = {(CF_META, model_key("main")): b"not zlib"}

        def get(self, cf: str, key: bytes) -> bytes | None:
            return self.d.get((cf, key))

    class Catalog:
        branches: dict = {}

    learner = Learner(KV(), Catalog(), learn=True)  # type: ignore[arg-type]
    assert learner.opened("main", 5) == [] and learner.model("main").dirty
