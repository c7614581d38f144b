"""fsck names every kind of injected inconsistency, repairs what it can, and damaged chunks
make reads fail with EIO (only for the files that use them)."""
from __future__ import annotations

import errno
import json
import os

import pytest

import mounting
from cowfs.chunks import codec
from cowfs.chunks.families import CF_OBJECTS, CF_REFS
from cowfs.kv.base import Batch
from cowfs.meta.layers import layer_suffix
from cowfs.meta.records import Attrs
from cowfs.meta.versioned import CF_DIRENTS, CF_INODES, name_key
from cowfs.store import Store


def fsck(store, *args) -> tuple[int, dict]:
    r = mounting.run_cowfs("fsck", store, "--json", *args, check=False, timeout=120)
    assert r.stdout, r.stderr.decode(errors="replace")
    return r.returncode, json.loads(r.stdout)


def build(m) -> None:
    os.makedirs(m.path / "dir" / "sub")
    (m.path / "dir" / "small").write_bytes(b"small file\n")
    (m.path / "dir" / "big").write_bytes(os.urandom(3 * 65536 + 100))
    (m.path / "lonely").write_bytes(b"lonely file\n")
    (m.path / "linked").write_bytes(b"two names\n")
    os.link(m.path / "linked", m.path / "dir" / "link2")
    os.symlink("dir/small", m.path / "sym")


def head_layer(st: Store) -> int:
    return st.catalog.branches["main"].head


def ino_of(st: Store, parent: int, name: bytes) -> int:
    v = st.kv.get(CF_DIRENTS, name_key(parent, name) + layer_suffix(head_layer(st)))
    return int.from_bytes(v[:8], "big")


def record(st: Store, ino: int) -> Attrs:
    return Attrs.unpack(st.kv.get(CF_INODES, ino.to_bytes(8, "big") + layer_suffix(head_layer(st))))


def write(st: Store, *ops) -> None:
    b = Batch()
    for op in ops:
        (b.delete if len(op) == 2 else b.put)(*op)
    st.kv.write(b)
    st.kv.sync()


@pytest.mark.timeout(120)
def test_fsck_clean_store(cowfs_mount):
    build(cowfs_mount)
    cowfs_mount.stop()
    code, rep = fsck(cowfs_mount.store)
    assert code == 0 and rep["clean"], rep


@pytest.mark.timeout(180)
def test_fsck_names_each_injected_problem_and_repairs(cowfs_mount):
    m = cowfs_mount
    build(m)
    m.stop()
    st = Store(str(m.store))
    try:
        layer = head_layer(st)
        d = ino_of(st, 1, b"dir")
        lonely = ino_of(st, 1, b"lonely")
        linked = ino_of(st, 1, b"linked")
        big_root = record(st, ino_of(st, d, b"big")).root
        small_root = record(st, ino_of(st, d, b"small")).root
        wrong = record(st, linked)
        wrong.nlink = 5
        write(st,
              # a wrong reference count
              (CF_REFS, small_root.hash, (7).to_bytes(8, "little")),
              # an orphan: the only name of "lonely" vanishes without its inode
              (CF_DIRENTS, name_key(1, b"lonely") + layer_suffix(layer)),
              # a bad link count
              (CF_INODES, linked.to_bytes(8, "big") + layer_suffix(layer), wrong.pack()),
              # an unreferenced object
              (CF_OBJECTS, b"\x01" * 32, codec.encode_chunk(b"stray", 1)),
              (CF_REFS, b"\x01" * 32, (1).to_bytes(8, "little")),
              # a dangling reference: a chunk of "big" disappears
              (CF_OBJECTS, big_root.hash))
    finally:
        st.close()
    code, rep = fsck(m.store)
    text = "\n".join(rep["problems"])
    assert code == 4, rep
    assert f"reference count 7, expected 1" in text
    assert f"inode {lonely} is not reachable" in text
    assert f"inode {linked} has link count 5, expected 2" in text
    assert "0101010101" in text and "nothing references it" in text
    assert f"{big_root.hash.hex()} is referenced but missing" in text
    assert any("lost" in u for u in rep["unrepairable"]), rep["unrepairable"]

    code, rep = fsck(m.store, "--repair")
    assert code == 4, rep  # the lost chunk of "big" cannot come back
    code, rep = fsck(m.store)
    left = "\n".join(rep["problems"])
    assert "reference count 7" not in left and "link count 5" not in left
    assert "not reachable" not in left and "nothing references it" not in left
    m.start()
    assert (m.path / "lost+found" / f"#{lonely}").read_bytes() == b"lonely file\n"
    assert os.stat(m.path / "linked").st_nlink == 2
    assert (m.path / "dir" / "small").read_bytes() == b"small file\n"


@pytest.mark.timeout(120)
def test_damaged_chunk_reads_eio_and_fsck_names_the_file(cowfs_mount):
    m = cowfs_mount
    build(m)
    (m.path / "victim").write_bytes(os.urandom(200_000))
    m.stop()
    st = Store(str(m.store))
    try:
        victim = ino_of(st, 1, b"victim")
        root = record(st, victim).root
        node = codec.decode_node(st.kv.get(CF_OBJECTS, root.hash))
        chunk = node[32:64]  # the second chunk
        raw = bytearray(st.kv.get(CF_OBJECTS, chunk))
        raw[len(raw) // 2] ^= 0xFF
        write(st, (CF_OBJECTS, chunk, bytes(raw)))
    finally:
        st.close()
    code, rep = fsck(m.store)
    assert code == 4
    assert any(f"inode {victim}" in u for u in rep["unrepairable"]), rep
    m.start()
    with open(m.path / "victim", "rb") as f:
        assert len(f.read(65536)) == 65536  # the first chunk is intact
        with pytest.raises(OSError) as e:
            f.read(65536)
        assert e.value.errno == errno.EIO
    assert (m.path / "dir" / "small").read_bytes() == b"small file\n"
    assert "victim" in "".join(os.listdir(m.path))
    assert "does not match its hash" in m.log_text() or "does not decode" in m.log_text()


@pytest.mark.timeout(60)
def test_fsck_refuses_a_mounted_store(cowfs_mount):
    r = mounting.run_cowfs("fsck", cowfs_mount.store, check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "in use by daemon pid" in err and "Traceback" not in err


@pytest.mark.timeout(180)
def test_rewrites_in_a_two_level_tree_keep_counts_exact(cowfs_mount):
    """Reference changes are netted per object (ObjectStore.apply): rewriting chunks under a
    512-child node, in and across snapshots, must leave every count exactly as fsck's walk."""
    m = cowfs_mount
    size = 600 * 65536  # more than one node's 512 chunks: a two-level tree
    data = bytearray(os.urandom(size))
    (m.path / "f").write_bytes(data)
    (m.path / ".cowfs" / "ctl").write_text("snapshot before\n")
    fd = os.open(m.path / "f", os.O_RDWR)
    try:
        for off in (0, 511 * 65536 + 7, 512 * 65536, 599 * 65536 + 100, 70000):
            piece = os.urandom(4096)
            os.pwrite(fd, piece, off)
            data[off:off + 4096] = piece
            os.fsync(fd)
        os.ftruncate(fd, 300 * 65536)  # back to one level: the second node is freed
        del data[300 * 65536:]
    finally:
        os.close(fd)
    (m.path / "g").write_bytes(data[:65536] * 3)  # the same chunk three times in one file
    os.unlink(m.path / "g")
    assert (m.path / "f").read_bytes() == data
    m.stop()
    rc, report = fsck(m.store)
    assert rc == 0 and report["clean"], report


def _damage_second_chunk(m, name: bytes) -> int:
    """Flip a byte of the stored encoding of file name's second chunk (the mount stopped);
    returns its inode."""
    st = Store(str(m.store))
    try:
        ino = ino_of(st, 1, name)
        node = codec.decode_node(st.kv.get(CF_OBJECTS, record(st, ino).root.hash))
        chunk = node[32:64]
        raw = bytearray(st.kv.get(CF_OBJECTS, chunk))
        raw[len(raw) // 2] ^= 0xFF
        write(st, (CF_OBJECTS, chunk, bytes(raw)))
    finally:
        st.close()
    return ino


@pytest.mark.timeout(180)
def test_a_write_into_part_of_a_damaged_chunk_stays_that_chunks_damage(cowfs_mount):
    """A page written (O_DIRECT: the kernel reads nothing first) into a damaged stored chunk
    that nothing has read: the write goes into a sparse buffer that cannot be merged with the
    chunk. The damage must stay that chunk's (it reads EIO, as before): every other commit of
    the mount goes on, the small-write log of the fsync'd page replays after a SIGKILL, and
    the mount stops and starts cleanly."""
    import mmap
    m = cowfs_mount
    build(m)
    (m.path / "victim").write_bytes(os.urandom(200_000))
    m.stop()
    _damage_second_chunk(m, b"victim")
    m.start()

    def write_page(off: int) -> None:
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"w" * 4096
        try:
            fd = os.open(m.path / "victim", os.O_RDWR | os.O_DIRECT)
            try:
                os.pwritev(fd, [buf], off)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            assert e.errno == errno.EIO, e
        finally:
            buf.close()

    def works(name: str) -> None:
        os.mkdir(m.path / name)
        (m.path / name / "f").write_bytes(name.encode())
        fd = os.open(m.path / name / "f", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    write_page(65536 + 8192)
    works("after-write")
    write_page(65536 + 16384)  # fsync'd into the small-write log, then the daemon killed
    mounting.sigkill(m)
    m.start()  # replays the log: its page cannot be merged either
    works("after-replay")
    m.stop()
    m.start()
    for name in ("after-write", "after-replay"):
        assert (m.path / name / "f").read_bytes() == name.encode()
    assert (m.path / "dir" / "small").read_bytes() == b"small file\n"
    with open(m.path / "victim", "rb") as f:
        assert len(f.read(65536)) == 65536
        with pytest.raises(OSError) as e:
            f.read(65536)
        assert e.value.errno == errno.EIO
