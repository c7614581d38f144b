"""The remote backends when their engine fails, on real engines killed for real: bounded
retries ending in one clear error, work again once the engine is back, no partial object
after a kill -9 of SeaweedFS in the middle of uploads."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from cowfs.remote import EngineUnavailable, Retry

# Quick retries for tests: worst case 0.1 + 0.2 = 0.3 s of sleep per operation.
FAST = Retry(attempts=3, first_delay=0.1, max_delay=0.5)


def one_line_naming(e: BaseException, endpoint: str) -> None:
    text = str(e)
    assert "\n" not in text and endpoint in text and "unavailable after 3 attempts" in text, text


def test_s3_kill_9_mid_uploads_leaves_whole_objects_and_recovers(seaweedfs_private):
    """Writers upload objects named by the hash of their bytes; SeaweedFS is killed -9 under
    them.  Every writer then fails with one EngineUnavailable line within the retry bound,
    so does every other operation; once SeaweedFS is back (same data), every acknowledged
    object is there, every listed object is whole (its bytes match its name) and the same
    store object works again."""
    from cowfs.blob.s3 import S3BlobStore
    sw = seaweedfs_private
    store = S3BlobStore(sw.BUCKET, "crash", retry=FAST, connect_timeout=1, read_timeout=5)
    acked: list[str] = []
    errors: list[tuple[BaseException, float]] = []
    killed_at: list[float] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            data = rnd.randbytes(rnd.randrange(256 << 10, 3 << 20))
            name = "obj/" + hashlib.sha256(data).hexdigest()
            try:
                store.put(name, data)
            except Exception as e:
                errors.append((e, time.monotonic()))
                return
            acked.append(name)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 6 and time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        assert len(acked) >= 6 and not errors, (acked, errors)
        sw.kill()
        killed_at.append(time.monotonic())
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(errors) == 3
    for e, when in errors:
        assert isinstance(e, EngineUnavailable), repr(e)
        one_line_naming(e, sw.endpoint)
        # The retries are bounded: 0.3 s of sleep plus quick refusals (and one read of at most
        # read_timeout for a request cut by the kill).
        assert when - killed_at[0] < 8, when - killed_at[0]
    for op in (lambda: store.get(acked[0]), lambda: store.size(acked[0]),
               lambda: list(store.list("obj/")), lambda: store.delete(acked[0]),
               lambda: store.put("obj/new", b"x")):
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable) as e:
            op()
        one_line_naming(e.value, sw.endpoint)
        assert time.monotonic() - t0 < 3

    sw.start()  # the same ports and data
    listed = {e.name: e.size for e in store.list("obj/")}
    assert set(acked) <= set(listed), "an acknowledged upload is missing after the restart"
    for name, size in listed.items():
        data = store.get(name)
        assert len(data) == size and "obj/" + hashlib.sha256(data).hexdigest() == name, \
            f"{name}: a partial or damaged object is visible ({size} bytes)"
    store.put("obj/after", b"works again")
    assert store.get("obj/after") == b"works again"
