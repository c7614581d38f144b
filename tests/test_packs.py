"""Packs (cowfs/chunks/packs.py, repack.py): large flushes write their chunk encodings as one
immutable pack each, in a BlobStore; freed chunks only lose their pointer, and `cowfs gc`
deletes the packs nothing points at and repacks the mostly-dead ones.

Real mounts: a streamed file lives in packs and reads back through run reads; deleting data
gives its space back at gc, exactly; a kill -9 while a flush's pack is put but not committed,
or in the middle of a repack, leaves a store that fsck finds clean, with every acknowledged
byte, whose leftovers the next gc deletes; a store made by the code before packs were
blobs (format 6: numbered, appended, hole-punched pack files) is upgraded at first open.
The ObjectStore itself is unit-tested in tests/unit/test_objects.py.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

import mounting
import workload
from cowfs.blob.local import LocalBlobStore
from cowfs.chunks import codec
from cowfs.chunks.packs import ENTRY, FOOTER, MissingPack, Packs, pack_id

KiB, MiB = 1 << 10, 1 << 20


def text(rnd: random.Random, size: int) -> bytes:
    """Compressible lines, all distinct enough not to dedup."""
    out = bytearray()
    while len(out) < size:
        out += b"line %d of something %d\n" % (rnd.randrange(10**9), rnd.randrange(10**6))
    return bytes(out[:size])


def _stream(path, total: int, seed: int, tail: int = 0, texty: bool = True) -> str:
    """Write `total` bytes (random blocks, every other one text when texty) with 1 MiB
    writes, then `tail` random bytes (a short last chunk); return the sha256."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(total // MiB):
            block = text(rnd, MiB) if texty and i % 2 else rnd.randbytes(MiB)
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


def packs(store) -> list[str]:
    d = os.path.join(store, "packs")
    return sorted(n for n in os.listdir(d) if pack_id(n) is not None)


def gc(mp, *args) -> dict:
    return mounting.cowfs_json("gc", mp, *args)


# -- the pack layer on the local blob store ------------------------------------------------------
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_packs_on_a_local_blob_store(tmp_path, where):
    """Direct I/O on a disk, buffered writes on tmpfs (no O_DIRECT): the same objects."""
    if where == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        import tempfile
        root = tempfile.mkdtemp(dir="/dev/shm")
    else:
        root = str(tmp_path / "packs")
    try:
        ps = Packs(LocalBlobStore(root))
        values = [os.urandom(n) for n in (100 * KiB, 64 * KiB, 3 * MiB + 5)]
        keys = [(codec.chunk_hash(v), codec.KIND_RAW, len(v)) for v in values]
        pack, exts = ps.write(values, keys)
        assert [e[1] for e in exts] == [len(v) for v in values]
        assert exts[1][0] == exts[0][0] + exts[0][1]  # back to back, in order
        index = 3 * ENTRY.size + FOOTER.size
        assert os.path.getsize(os.path.join(root, f"{pack:016x}.pack")) == sum(map(len, values)) + index
        assert [(e.hash, e.kind, e.raw_size, e.offset, e.length) for e in ps.index(pack)] == [
            k + x for k, x in zip(keys, exts)]
        for v, (off, length) in zip(values, exts):
            assert ps.read(pack, off, length) == v
        ps.read_ahead(pack, 0, 1 * MiB)
        with pytest.raises(MissingPack):
            ps.read(pack, exts[2][0], exts[2][1] + index + 1)  # past the end (of the index)
        other, _ = ps.write([b"x" * 10], [(codec.chunk_hash(b"x" * 10), codec.KIND_RAW, 10)])
        assert ps.listing() == {pack: sum(map(len, values)) + index, other: 10 + ENTRY.size + FOOTER.size}
        assert ps.encoding_sizes(ps.listing()) == {pack: sum(map(len, values)), other: 10}
        assert ps.disk_usage() >= sum(map(len, values))
        ps.delete(pack)
        with pytest.raises(MissingPack):
            ps.read(pack, 0, 10)
        assert not [n for n in os.listdir(root) if n.startswith(".")], "no temporary left"
        ps.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- real mounts ----------------------------------------------------------------------------------
def _file_hashes(store, name: bytes) -> list[bytes]:
    """The chunk hashes of /name in branch main (read offline from the store)."""
    from cowfs.chunks import tree
    from cowfs.meta.records import Attrs
    from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, LayerView, ino_key, name_key
    from cowfs.store import ROOT_INO, Store

    st = Store(str(store))
    try:
        head = st.catalog.branches["main"].head
        lv = LayerView(head, frozenset(st.catalog.ancestry(head)))
        ino = int.from_bytes(st.meta.get(CF_DIRENTS, name_key(ROOT_INO, name), lv)[1][:8], "big")
        a = Attrs.unpack(st.meta.get(CF_INODES, ino_key(ino), lv)[1])
        return [h for _i, h in tree.iter_chunks(a.root, st.objects.load_node)]
    finally:
        st.close()


@pytest.mark.timeout(300)
def test_streamed_file_lives_in_packs_and_reads_back_by_runs(mount_factory):
    m = mount_factory(options=("dedup=off",))
    want = _stream(m.path / "big", 48 * MiB, 1, tail=1000, texty=False)
    mounting.syncfs(m.path)
    s = mounting.cowfs_json("stats", m.path)
    assert mounting.du(m.store / "packs") >= 40 * MiB, "a 48 MiB stream should be packed, not inline"
    assert s["stored_bytes"] >= mounting.du(m.store / "packs")
    n_packs = len(packs(m.store))
    assert 1 <= n_packs <= 48, f"one pack per flush of at least 1 MiB: {n_packs}"
    m.stop()
    # The file's chunks are raw runs in few packs: run reads serve them (one ranged read per
    # pack a read spans), with the bytes chunk-by-chunk reads give.  (A flush under 4 MiB, as
    # the 1 s timer makes on a loaded machine, stays inline: its chunks are no run.)
    from cowfs.store import Store
    hashes = _file_hashes(m.store, b"big")
    assert len(hashes) == 48 * 16 + 1
    st = Store(str(m.store))
    runs = 0
    try:
        for start in range(0, len(hashes) - 16, 16):
            run = hashes[start:start + 16]
            data = st.objects.read_run(run, 16 * codec.CHUNK)
            if data is not None:
                runs += 1
                assert data == b"".join(st.objects.load(h) for h in run)
    finally:
        st.close()
    assert runs >= 36, f"only {runs} of 47 MiB-long stretches are runs"
    m.start()
    assert _sha(m.path / "big") == want
    # Reads that start and end inside chunks, past the daemon's page cache (O_DIRECT).
    rnd = random.Random(9)
    with open(m.path / "big", "rb") as f:
        whole = f.read()
    fd = os.open(m.path / "big", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 3 * MiB)
    try:
        for _ in range(40):
            off = rnd.randrange(0, len(whole) // 4096) * 4096
            n = rnd.choice([8 * KiB, 68 * KiB, 1 * MiB, 3 * MiB])
            got = os.preadv(fd, [memoryview(buf)[:n]], off)
            assert buf[:got] == whole[off : off + n], (off, n)
    finally:
        os.close(fd)
    m.stop()
    workload.fsck_clean(m.store)


@pytest.mark.timeout(300)
def test_deleted_packed_data_comes_back_at_gc_exactly(mount_factory):
    """Two files written side by side share their packs; deleting one leaves the packs
    about a third live: its space stays until `cowfs gc`, which repacks every pack under
    half live (so at most half of what stays is dead), and with --repack-below 1 every pack
    with a dead byte; the kept file reads back exactly and the figures match the disk."""
    m = mount_factory(options=("dedup=off",))
    keep = _side_by_side(m, random.Random(5))
    packed = mounting.du(m.store / "packs")
    # most of the 48 MiB: flushes under 4 MiB stay inline, and how writeback splits the writes
    # into flushes depends on timing (36-39 MiB packed seen on a loaded machine)
    assert packed >= 30 * MiB, packed
    m.remount()  # nothing is given back at unmount either
    assert mounting.du(m.store / "packs") == packed, "a free only drops pointers"
    s = mounting.cowfs_json("stats", m.path)
    assert s["unique_bytes"] == 16 * MiB
    r = gc(m.path)
    assert r["packs_repacked"] >= 1 and r["pack_bytes_copied"] <= 16 * MiB + 64 * KiB, r
    half = mounting.du(m.store / "packs")
    assert half <= 2 * 16 * MiB + 256 * KiB, f"{packed} -> {half} bytes of packs"
    assert (m.path / "keep").read_bytes() == keep
    gc(m.path, "--repack-below", "1")
    after = mounting.du(m.store / "packs")
    assert after <= 16 * MiB + 256 * KiB, f"{packed} -> {half} -> {after} bytes of packs"
    s = mounting.cowfs_json("stats", m.path)  # stored_bytes: the database (less its log) and the packs
    on_disk = mounting.du(m.store / "db") + after
    assert abs(s["stored_bytes"] + s["wal_bytes"] - on_disk) <= 256 * KiB, (s, on_disk)
    assert (m.path / "keep").read_bytes() == keep
    # Nothing left to do: another pass copies nothing.
    assert gc(m.path, "--repack-below", "1")["pack_bytes_copied"] == 0
    m.remount()
    assert (m.path / "keep").read_bytes() == keep
    m.stop()
    workload.fsck_clean(m.store)


@pytest.mark.timeout(300)
def test_worker_recodes_packed_chunks_and_gc_gives_their_space_back(mount_factory):
    """Chunks re-encoded as deltas (inline) leave their pack bytes dead: gc reclaims them."""
    rnd = random.Random(2)
    m = mount_factory(options=("dedup=off",))
    base = text(rnd, 8 * MiB)
    with open(m.path / "a", "wb") as f:
        f.write(base)
        os.fsync(f.fileno())
    near = bytearray(base)
    for c in range(0, len(near), 64 * KiB):  # one edit in place per chunk: each stays similar to a's
        p = c + rnd.randrange(64 * KiB - 10)
        near[p : p + 5] = b"EDIT!"
    with open(m.path / "b", "wb") as f:
        f.write(near)
        os.fsync(f.fileno())  # committed now, not at the release after close
    packed = mounting.du(m.store / "packs")
    assert packed > 2 * MiB
    m.stop()
    m.options = ["dedup=on", "dedup_cpu=1"]
    m.start()
    s = json.loads(mounting.run_cowfs("dedup", m.path, "--wait", "--json", "--timeout", "120",
                                      timeout=180).stdout)
    assert s["delta_chunks"] >= 100, s
    assert mounting.du(m.store / "packs") == packed, "re-encoding only moves pointers"
    r = gc(m.path)
    assert r["packs_deleted"] + r["packs_repacked"] >= 1, r
    assert mounting.du(m.store / "packs") < packed * 0.75, "b's chunks became deltas: their pack bytes are gone"
    assert (m.path / "a").read_bytes() == base
    assert (m.path / "b").read_bytes() == bytes(near)
    m.stop()
    workload.fsck_clean(m.store)


WRITER = """
import os, random, sys
rnd = random.Random(int(sys.argv[2]))
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[3])):
        f.write(rnd.randbytes(1 << 20))
    os.fsync(f.fileno())
"""


@pytest.mark.timeout(300)
def test_kill9_between_a_pack_put_and_its_commit(mount_factory):
    """A flush's thread is held right after its pack is put (durable, not committed) and the
    daemon is killed: what was fsync'd before is all there, the file being written reads
    back as a prefix of what was written, fsck is clean, and the next gc deletes the pack
    nothing points at."""
    m = mount_factory(options=("dedup=off",), env={"COWFS_FAULTS": "pack_written:sleep60"})
    before = random.Random(1).randbytes(2 * MiB)  # under PACK_FLUSH_BYTES: inline, no pack
    with open(m.path / "before", "wb") as f:
        f.write(before)
        os.fsync(f.fileno())
    assert not packs(m.store)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path / "partial"), "2", "16"])
    try:
        mounting.wait_log(m, "injected fault at pack_written")
        stray = packs(m.store)
        assert len(stray) == 1, stray
        workload.kill_daemon(m)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    workload.fsck_clean(m.store)
    m.env = {}
    m.start()
    assert (m.path / "before").read_bytes() == before
    written = random.Random(2).randbytes(16 * MiB)
    got = (m.path / "partial").read_bytes() if (m.path / "partial").exists() else b""
    for i in range(0, len(got), codec.CHUNK):  # committed chunks, or holes where none was
        part = got[i:i + codec.CHUNK]
        assert part == written[i:i + len(part)] or not part.strip(b"\0"), i
    r = gc(m.path, "--repack-below", "0")
    assert r["packs_deleted"] == 1 and r["packs_repacked"] == 0, r
    assert not set(stray) & set(packs(m.store))
    assert (m.path / "before").read_bytes() == before
    m.stop()
    workload.fsck_clean(m.store)


def _side_by_side(m, rnd: random.Random) -> bytes:
    """keep (16 MiB) and gone (32 MiB) written side by side, so they share packs; gone is
    deleted: the packs are a third live.  Returns keep's content."""
    keep = bytearray()
    with open(m.path / "keep", "wb") as fk, open(m.path / "gone", "wb") as fg:
        for _ in range(16):
            block = rnd.randbytes(MiB)
            fk.write(block)
            keep += block
            fg.write(rnd.randbytes(2 * MiB))
        os.fsync(fk.fileno())
        os.fsync(fg.fileno())
    os.unlink(m.path / "gone")
    mounting.syncfs(m.path)
    return bytes(keep)


def _unindexed_pointers(store) -> tuple[int, list[str]]:
    """(packed pointers, those their pack's index does not list at their place), read offline."""
    from cowfs.chunks.families import CF_OBJECTS
    from cowfs.store import Store

    st = Store(str(store))
    try:
        indexes: dict[int, dict] = {}
        n, missing = 0, []
        for h, raw in st.kv.scan(CF_OBJECTS, b""):
            ext = codec.packed_extent(raw)
            if ext is None:
                continue
            n += 1
            if ext[0] not in indexes:
                indexes[ext[0]] = {e.hash: e for e in st.packs.index(ext[0])}
            e = indexes[ext[0]].get(h)
            if e is None or (e.kind, e.offset, e.length, e.raw_size) != (
                    codec.packed_kind(raw), ext[1], ext[2], codec.chunk_sizes(raw)[0]):
                missing.append(h.hex())
        return n, missing
    finally:
        st.close()


@pytest.mark.timeout(300)
def test_every_pack_lists_its_encodings_and_fsck_checks_the_lists(mount_factory):
    """Each pack ends with the index of its encodings, what a process without the store's
    database (another branch's daemon, a remote's reader) reads to learn what a pack holds:
    every pointer is listed in its pack's index at its place, after writes and after a repack;
    gc counts the index as neither live nor dead; fsck reports a damaged index (the data
    still reads: pointers do not go through the index)."""
    m = mount_factory(options=("dedup=off",))
    keep = _side_by_side(m, random.Random(7))
    m.stop()
    n, missing = _unindexed_pointers(m.store)
    # keep's 256 chunks: those of flushes of 4 MiB or more are packed (how the writeback splits
    # the writes into flushes depends on timing: 191-256 seen); enough to make the check real
    assert n >= 100 and missing == [], (n, missing[:5])
    m.start()
    r = gc(m.path, "--repack-below", "1")
    assert r["packs_repacked"] >= 1 and r["pack_bytes_copied"] <= 16 * MiB + 64 * KiB, r
    # Another pass finds nothing dead: the indexes at the ends of the new packs are not dead bytes.
    r = gc(m.path, "--repack-below", "1")
    assert r["pack_bytes_copied"] == 0 and r["pack_bytes_dead"] == 0, r
    m.stop()
    n, missing = _unindexed_pointers(m.store)
    assert n >= 100 and missing == [], (n, missing[:5])
    workload.fsck_clean(m.store)
    # One byte of one pack's index damaged: fsck says which pack.
    victim = os.path.join(m.store, "packs", packs(m.store)[0])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - FOOTER.size - ENTRY.size + 40)  # the last entry's offset
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    res = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode != 0 and not report["clean"], report
    assert any(os.path.basename(victim) in p and "index" in p for p in report["problems"]), report["problems"]
    m.start()
    assert (m.path / "keep").read_bytes() == keep
    m.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["repack_copied", "repack_moved"])
def test_kill9_in_the_middle_of_a_repack(mount_factory, point):
    """`cowfs gc` is held after the new pack is put (repack_copied: its pointers not yet
    committed) or after the pointers moved (repack_moved: the old packs not yet deleted) and
    the daemon is killed: fsck is clean, the kept file reads back exactly, and the next gc
    finishes the work (the space comes back)."""
    m = mount_factory(options=("dedup=off",), env={"COWFS_FAULTS": f"{point}:sleep60"})
    keep = _side_by_side(m, random.Random(7))
    old = packs(m.store)
    packed = mounting.du(m.store / "packs")
    assert packed >= 30 * MiB, packed  # most of the 48 MiB (see above)
    gc_run = subprocess.Popen(mounting.cowfs_command() + ["gc", str(m.path), "--repack-below", "1", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        mounting.wait_log(m, f"injected fault at {point}", gc_run)
        held = packs(m.store)
    finally:
        workload.kill_daemon(m)
        gc_run.communicate(timeout=60)
    assert set(held) - set(old), "the new pack is there"
    assert len(set(old) & set(held)) >= 1, "the old packs are still there"
    workload.fsck_clean(m.store)
    m.env = {}
    m.start()
    assert (m.path / "keep").read_bytes() == keep
    r = gc(m.path, "--repack-below", "1")  # every dead byte: the space figure is exact
    assert r["packs_deleted"] >= 1, r  # the new pack (repack_copied) or the old ones (repack_moved)
    after = mounting.du(m.store / "packs")
    assert after <= 16 * MiB + 256 * KiB, f"{packed} -> {after}"
    new = set(held) - set(old)
    if point == "repack_copied":  # its pointers were never committed: deleted as garbage
        assert not new & set(packs(m.store))
    else:  # committed: it holds keep's bytes now, fully live, and stays
        assert new <= set(packs(m.store))
    assert (m.path / "keep").read_bytes() == keep
    m.stop()
    workload.fsck_clean(m.store)


# -- the upgrade from format 6 -------------------------------------------------------------------
OLD_COMMIT = "ffbd797"  # main before packs became blobs: format 6, appended and punched packs


@pytest.mark.timeout(600)
def test_a_store_of_the_previous_format_is_upgraded(mount_factory, tmp_path):
    """A store made by the code of OLD_COMMIT (numbered pack files, appended to, with holes
    punched where data was deleted, and 22-byte pointers) is upgraded at the first mount:
    every byte reads back, fsck is clean, and gc repacks the punched pack."""
    old = tmp_path / "old"
    old.mkdir()
    arch = subprocess.run(["git", "-C", str(mounting.REPO), "archive", OLD_COMMIT, "cowfs"],
                          capture_output=True)
    if arch.returncode != 0:
        pytest.skip(f"the code of {OLD_COMMIT} is not in this checkout's history: "
                    f"{arch.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "x", "-C", str(old)], input=arch.stdout, check=True)
    env = {"PYTHONPATH": str(old)}
    store = tmp_path / "store"
    subprocess.run(mounting.cowfs_command() + ["init", str(store)], env=dict(os.environ, **env),
                   check=True, capture_output=True)
    m = mount_factory(store=store, init=False, options=("dedup=off",), env=env)
    assert "cowfs.store" not in m.log_text()
    rnd = random.Random(11)
    files = {"random": rnd.randbytes(24 * MiB), "text": text(rnd, 8 * MiB),
             "small": rnd.randbytes(3000), "gone": rnd.randbytes(40 * MiB)}
    for name, data in files.items():
        with open(m.path / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    os.unlink(m.path / "gone")
    del files["gone"]
    mounting.syncfs(m.path)
    m.stop()
    marker = json.loads((store / "cowfs-store.json").read_text())
    assert marker["format"] == 6, marker
    legacy = sorted(os.listdir(store / "packs"))
    assert legacy == ["00000001.pack"], legacy
    st = os.stat(store / "packs" / legacy[0])
    assert st.st_blocks * 512 < st.st_size - 32 * MiB, "the deleted file's extents were punched"
    m.env = {}
    m.start()
    from cowfs.store import FORMAT_VERSION
    assert json.loads((store / "cowfs-store.json").read_text())["format"] == FORMAT_VERSION
    assert [pack_id(n) for n in os.listdir(store / "packs")] == [1]
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
    m.stop()
    workload.fsck_clean(store)
    m.start()
    r = gc(m.path)
    assert r["packs_repacked"] == 1, r
    assert 1 not in [pack_id(n) for n in packs(store)]
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data, name
    assert mounting.du(store / "packs") <= 24 * MiB + 8 * MiB
    m.stop()
    workload.fsck_clean(store)
