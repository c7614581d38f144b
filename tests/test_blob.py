"""The BlobStore interface: one suite, run on every backend (in memory, a local directory,
S3 on a real SeaweedFS, and on Ceph RADOS Gateway: marked ceph, scripts/test_ceph.sh).
Write-once puts, ranged gets, ordered paged listings, deletes, names; then what only one
backend has to show (a killed local writer leaves nothing visible, S3 errors and
credentials)."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cowfs.blob.base import BlobConflict, BlobEntry, BlobError, BlobNotFound, BlobStore
from cowfs.blob.local import TEMP_PREFIX, LocalBlobStore
from cowfs.blob.memory import MemoryBlobStore
from conftest import set_aws_env


@pytest.fixture(params=["memory", "local", "s3", pytest.param("ceph", marks=pytest.mark.ceph)])
def blobs(request, tmp_path):
    if request.param == "memory":
        store: BlobStore = MemoryBlobStore()
        store.PAGE = 3  # listings cross page boundaries
    elif request.param == "local":
        store = LocalBlobStore(str(tmp_path / "blobs"))
    else:
        from cowfs.blob.s3 import S3BlobStore
        if request.param == "s3":
            sw = request.getfixturevalue("aws_env")  # credentials and endpoint from the environment
        else:  # Ceph RADOS Gateway (scripts/test_ceph.sh)
            sw = request.getfixturevalue("ceph_rgw")
            set_aws_env(request.getfixturevalue("monkeypatch"), sw, tmp_path)
        store = S3BlobStore(sw.BUCKET, request.getfixturevalue("engine_prefix"), page_size=3)
    yield store
    store.close()


def names(entries) -> list[str]:
    return [e.name for e in entries]


def test_put_then_get_whole_and_ranges(blobs):
    data = bytes(range(256)) * 40  # 10 KiB
    blobs.put("chunks/ab/abcdef", data)
    assert blobs.get("chunks/ab/abcdef") == data
    assert blobs.size("chunks/ab/abcdef") == len(data)
    assert blobs.exists("chunks/ab/abcdef")
    assert blobs.get("chunks/ab/abcdef", 100) == data[100:]
    assert blobs.get("chunks/ab/abcdef", 100, 50) == data[100:150]
    assert blobs.get("chunks/ab/abcdef", 0, 1) == data[:1]
    assert blobs.get("chunks/ab/abcdef", len(data) - 10, 100) == data[-10:]  # short at the end
    assert blobs.get("chunks/ab/abcdef", len(data)) == b""
    assert blobs.get("chunks/ab/abcdef", len(data) + 5, 3) == b""
    assert blobs.get("chunks/ab/abcdef", 7, 0) == b""


def test_an_empty_object_exists(blobs):
    blobs.put("empty", b"")
    assert blobs.exists("empty") and blobs.size("empty") == 0
    assert blobs.get("empty") == b"" and blobs.get("empty", 0, 10) == b""
    assert list(blobs.list()) == [BlobEntry("empty", 0)]


def test_a_large_object_round_trips(blobs):
    data = os.urandom(3 << 20) + b"tail"
    blobs.put("packs/big", data)
    assert blobs.size("packs/big") == len(data)
    assert hashlib.sha256(blobs.get("packs/big")).digest() == hashlib.sha256(data).digest()
    assert blobs.get("packs/big", (2 << 20) + 7, 1 << 20) == data[(2 << 20) + 7:(3 << 20) + 7]


def test_put_is_write_once(blobs):
    blobs.put("x", b"first")
    blobs.put("x", b"first")  # the same bytes again: a no-op
    blobs.put("x", bytearray(b"first"))
    with pytest.raises(BlobConflict, match="other content"):
        blobs.put("x", b"other")  # same length, other bytes
    with pytest.raises(BlobConflict, match="other content"):
        blobs.put("x", b"longer content")
    with pytest.raises(BlobConflict):
        blobs.put("x", b"")
    assert blobs.get("x") == b"first"


def test_missing_objects(blobs):
    with pytest.raises(BlobNotFound):
        blobs.get("nope")
    with pytest.raises(BlobNotFound):
        blobs.get("nope", 5, 5)
    with pytest.raises(BlobNotFound):
        blobs.get("nope", 0, 0)
    with pytest.raises(BlobNotFound):
        blobs.size("nope")
    assert not blobs.exists("nope") and not blobs.exists("a/nope")
    blobs.delete("nope")  # deleting what is absent is fine: deletes may be repeated


def test_delete_removes_and_frees_the_name(blobs):
    blobs.put("d/x", b"1")
    blobs.put("d/y", b"2")
    blobs.delete("d/x")
    blobs.delete("d/x")
    assert not blobs.exists("d/x") and blobs.get("d/y") == b"2"
    assert names(blobs.list("d/")) == ["d/y"]
    blobs.put("d/x", b"a new object may take a deleted name")
    assert blobs.get("d/x") == b"a new object may take a deleted name"


def listed(blobs, prefix: str = "") -> list[str]:
    """The names a listing yields, sorted (the order is the backend's), each exactly once."""
    got = names(blobs.list(prefix))
    assert len(got) == len(set(got)), f"listed twice: {got}"
    return sorted(got)


def test_list_by_prefix(blobs):
    # "a", "a/b" and "a-b" coexist, as on object storage.
    all_names = ["a", "a/b", "a/b/c", "a/c", "a-b", "a0", "b", "b/z", "chunks/00", "chunks/01",
                 "chunks/0a", "chunks/ff", "c_d", "c=d", "e", "e.x", "e/f.g/h"]
    for i, n in enumerate(all_names):
        blobs.put(n, b"x" * i)
    assert listed(blobs) == sorted(all_names)
    assert {e.name: e.size for e in blobs.list()} == {n: i for i, n in enumerate(all_names)}
    assert listed(blobs, "a") == ["a", "a-b", "a/b", "a/b/c", "a/c", "a0"]
    assert listed(blobs, "a/") == ["a/b", "a/b/c", "a/c"]
    assert listed(blobs, "a/b") == ["a/b", "a/b/c"]
    assert listed(blobs, "e") == ["e", "e.x", "e/f.g/h"]
    assert listed(blobs, "chunks/0") == ["chunks/00", "chunks/01", "chunks/0a"]
    assert listed(blobs, "zz") == []


def test_local_and_memory_list_in_name_order(tmp_path):
    for store in (MemoryBlobStore(), LocalBlobStore(str(tmp_path / "blobs"))):
        all_names = ["a", "a/b", "a/b/c", "a/c", "a-b", "a0", "b", "e.x", "e/f"]
        for n in all_names:
            store.put(n, b"")
        assert names(store.list()) == sorted(all_names)
        assert names(store.list("a")) == sorted(n for n in all_names if n.startswith("a"))


def test_listing_pages_through_many_objects(blobs):
    want = [f"many/{i:04d}" for i in range(40)]
    for n in want:
        blobs.put(n, n.encode())
    assert listed(blobs, "many/") == want
    it = blobs.list("many/")
    first = [next(it).name for _ in range(5)]
    blobs.put("many/late", b"")  # a put during the listing breaks nothing
    assert len(set(first + names(it)) - {"many/late"}) == 40


@pytest.mark.parametrize("bad", ["", "/a", "a/", "a//b", ".hidden", "a/.tmp-x", "a/..", "..",
                                 "a b", "a\nb", "é", "a~", "a+b", "x" * 600, "a\\b"])
def test_bad_names_are_refused_before_any_io(blobs, bad):
    for op in (lambda: blobs.put(bad, b"x"), lambda: blobs.get(bad), lambda: blobs.size(bad),
               lambda: blobs.delete(bad), lambda: blobs.exists(bad)):
        with pytest.raises(ValueError, match="blob name"):
            op()


def test_bad_ranges_are_refused(blobs):
    blobs.put("r", b"data")
    with pytest.raises(ValueError, match="bad range"):
        blobs.get("r", -1)
    with pytest.raises(ValueError, match="bad range"):
        blobs.get("r", 0, -5)


def test_racing_puts_of_one_name(blobs):
    """Writers racing on one name: with the same bytes all succeed; with different bytes
    exactly one wins and every other gets BlobConflict; the object is the winner's, whole."""
    payloads = [bytes([i]) * (256 << 10) for i in range(6)]
    for name, same in (("race/same", True), ("race/diff", False)):
        results: list[object] = [None] * 6
        barrier = threading.Barrier(6)

        def writer(i: int) -> None:
            barrier.wait()
            try:
                blobs.put(name, payloads[0] if same else payloads[i])
                results[i] = "ok"
            except BlobConflict:
                results[i] = "conflict"
            except Exception as e:  # reported below
                results[i] = e

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts)
        if same:
            assert results == ["ok"] * 6
            assert blobs.get(name) == payloads[0]
        else:
            assert sorted(map(str, results)) == ["conflict"] * 5 + ["ok"], results
            assert blobs.get(name) == payloads[results.index("ok")]


# --- the local backend ----------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from cowfs.blob.local import LocalBlobStore
    store = LocalBlobStore(sys.argv[1])
    os.write(1, b"ready\\n")
    i = int(sys.argv[2])
    while True:  # killed by the test somewhere in here
        store.put(f"obj/{i:06d}", bytes([i % 251]) * ((1 + i % 7) << 20))
        i += 1
""")


def test_local_kill_9_of_a_writer_leaves_no_partial_object(tmp_path):
    """Writers killed at random moments of their puts leave every visible object whole
    (temporaries are invisible), and a later open removes temporaries that are old enough
    to be no one's."""
    root = tmp_path / "blobs"
    rnd = random.Random(7)
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root),
                              str(round_ * 1000)], stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline() == b"ready\n"
            time.sleep(rnd.uniform(0.05, 0.4))
            p.send_signal(signal.SIGKILL)
        finally:
            p.kill()
            p.wait(30)
    temps = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
             if f.startswith(TEMP_PREFIX)]
    store = LocalBlobStore(str(root))
    listed = list(store.list())
    assert listed, "the writers stored nothing before their kill"
    for entry in listed:
        i = int(entry.name.split("/")[1])
        assert entry.size == (1 + i % 7) << 20, f"{entry.name}: partial ({entry.size} bytes)"
        assert store.get(entry.name) == bytes([i % 251]) * entry.size, entry.name
    # Temporaries survive an open while they may be a live writer's, not once they are old.
    for t in temps:
        assert os.path.exists(t)
        os.utime(t, (time.time() - 7200, time.time() - 7200))
    LocalBlobStore(str(root))
    assert not any(os.path.exists(t) for t in temps)
    assert list(LocalBlobStore(str(root)).list()) == listed


def test_local_objects_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = LocalBlobStore(str(tmp_path / "blobs"))
        store.put("a/b/c", b"secret")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "blobs").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "blobs" / "a~" / "b~").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "blobs" / "a~" / "b~" / "c").st_mode & 0o777 == 0o600


def test_local_refuses_a_file_as_root(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(BlobError, match="not a directory"):
        LocalBlobStore(str(tmp_path / "f"))


def _open_fds_on(directory) -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(directory) + "/"))


def test_local_pread_kept_reads_through_one_descriptor_closed_at_delete(tmp_path, monkeypatch):
    """Small reads of the event loop (a cold random read of a pack) keep their descriptor
    open: one pread each, not open + fstat + fadvise + pread + close; a delete closes it
    (the space is freed at once), and at most KEPT_MAX stay open."""
    from cowfs.blob import local
    store = LocalBlobStore(str(tmp_path / "blobs"))
    data = os.urandom(20000)
    store.put("packs/a", data)
    opened = []
    real_open = os.open
    monkeypatch.setattr(local.os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for off in range(0, 16384, 4096):
        assert store.pread_kept("packs/a", off, 4096) == data[off:off + 4096]
    assert store.pread_kept("packs/a", 19000, 4096) == data[19000:]  # short at the end
    assert store.pread_kept("packs/a", 30000, 10) == b""
    assert len(opened) == 1
    assert _open_fds_on(tmp_path / "blobs") == 1
    store.delete("packs/a")
    assert _open_fds_on(tmp_path / "blobs") == 0
    with pytest.raises(BlobNotFound):
        store.pread_kept("packs/a", 0, 10)
    monkeypatch.setattr(local, "KEPT_MAX", 3)
    for i in range(5):
        store.put(f"p{i}", bytes([i]) * 10)
        assert store.pread_kept(f"p{i}", 2, 3) == bytes([i]) * 3
    assert _open_fds_on(tmp_path / "blobs") == 3
    store.close()
    assert _open_fds_on(tmp_path / "blobs") == 0


# --- the S3 backend -------------------------------------------------------------------------

def test_s3_wrong_credentials_say_so_in_one_line(aws_env, monkeypatch, engine_prefix):
    from cowfs.blob.s3 import S3BlobStore
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3BlobStore(aws_env.BUCKET, engine_prefix)
    with pytest.raises(BlobError) as e:
        store.put("x", b"1")
    assert "access denied" in str(e.value) and "credentials" in str(e.value)
    assert aws_env.endpoint in str(e.value) and "\n" not in str(e.value)


def test_s3_missing_bucket_is_named(aws_env):
    from cowfs.blob.s3 import S3BlobStore
    store = S3BlobStore("no-such-bucket-here")
    for op in (lambda: store.put("x", b"1"), lambda: store.get("x"), lambda: list(store.list())):
        with pytest.raises(BlobError, match="bucket no-such-bucket-here.*does not exist"):
            op()


def test_s3_objects_live_under_the_prefix(aws_env, engine_prefix):
    from cowfs.blob.s3 import S3BlobStore
    one = S3BlobStore(aws_env.BUCKET, engine_prefix + "/one")
    two = S3BlobStore(aws_env.BUCKET, engine_prefix + "/two/")
    one.put("k", b"1")
    two.put("k", b"2")
    assert one.get("k") == b"1" and two.get("k") == b"2"
    assert names(one.list()) == ["k"]
    keys = [o["Key"] for o in aws_env.client().list_objects_v2(
        Bucket=aws_env.BUCKET, Prefix=engine_prefix)["Contents"]]
    assert keys == [f"{engine_prefix}/one/k", f"{engine_prefix}/two/k"]


def test_s3_put_of_an_existing_object_uploads_nothing(aws_env, engine_prefix):
    """Content-addressed pushes resume cheaply: an object already there is not sent again."""
    from cowfs.blob.s3 import S3BlobStore
    store = S3BlobStore(aws_env.BUCKET, engine_prefix)
    sent: list[str] = []
    store._client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(request.method))
    data = os.urandom(1 << 20)
    store.put("obj", data)
    assert sent == ["HEAD", "PUT"]
    sent.clear()
    store.put("obj", data)
    assert sent == ["HEAD"]


def test_s3_lists_page_by_page_as_the_iteration_goes(aws_env, engine_prefix):
    from cowfs.blob.s3 import S3BlobStore
    store = S3BlobStore(aws_env.BUCKET, engine_prefix, page_size=3)
    for i in range(10):
        store.put(f"p/{i}", b"")
    sent: list[str] = []
    store._client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(request.method))
    it = store.list("p/")
    assert len([next(it) for _ in range(5)]) == 5
    assert sent == ["GET", "GET"]  # two pages of three so far, not the whole listing
    assert len(list(it)) == 5 and sent == ["GET"] * 4
