"""What the etcd KV adds to the shared KV suite (tests/unit/test_kv.py runs that on etcd
too): its key layout, etcd's transaction limits, scans across compaction, leases between
holders (one of them killed -9), and the optional client packages."""
from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from cowfs.kv.base import Batch, Conflict
from cowfs.kv.etcd import BatchTooLarge, EtcdKV, LeaseHeld, LeaseLost, ScanExpired

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def etcd_kv(etcd, engine_prefix):
    kv = EtcdKV(etcd.endpoint, ("a", "ab"), engine_prefix.encode() + b"/", page_size=2)
    yield kv
    kv.close()


def raw_keys(etcd, prefix: bytes) -> list[bytes]:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    r = requests.post(etcd.endpoint + "/v3/kv/range", json={
        "key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode(),
        "keys_only": True}, timeout=5).json()
    return [base64.b64decode(kv["key"]) for kv in r.get("kvs", [])]


def batch(*items: tuple[str, bytes, bytes | None]) -> Batch:
    b = Batch()
    for cf, key, value in items:
        if value is None:
            b.delete(cf, key)
        else:
            b.put(cf, key, value)
    return b


def test_families_are_key_prefixes_and_keys_are_binary(etcd, etcd_kv):
    keys = [b"", b"\x00", b"\xff", b"\xff\xff", b"x\xff", b"y"]
    etcd_kv.write(batch(*[("a", k, b"A" + k) for k in keys], *[("ab", k, b"B" + k) for k in keys]))
    # "a" and "ab" do not overlap although one name is a prefix of the other.
    assert list(etcd_kv.scan("a", b"")) == [(k, b"A" + k) for k in sorted(keys)]
    assert list(etcd_kv.scan("ab", b"")) == [(k, b"B" + k) for k in sorted(keys)]
    assert list(etcd_kv.scan("a", b"", b"\xff")) == [(b"\xff", b"A\xff"), (b"\xff\xff", b"A\xff\xff")]
    assert list(etcd_kv.scan("a", b"x\xff\x00", b"x")) == []
    assert etcd_kv.get("a", b"") == b"A" and etcd_kv.get("ab", b"\xff") == b"B\xff"
    prefix = etcd_kv.prefix
    assert raw_keys(etcd, prefix) == sorted([prefix + b"a/" + k for k in keys]
                                            + [prefix + b"ab/" + k for k in keys])
    with pytest.raises(ValueError, match="family"):
        EtcdKV(etcd.endpoint, ("a/b",))


def test_batches_over_etcds_limits_are_refused_whole(etcd_kv):
    etcd_kv.write(batch(*[("a", b"k%03d" % i, b"v") for i in range(128)]))  # the limit: fine
    assert len(list(etcd_kv.scan("a", b""))) == 128
    with pytest.raises(BatchTooLarge, match="128 operations per transaction"):
        etcd_kv.write(batch(*[("a", b"n%03d" % i, b"v") for i in range(129)]))
    with pytest.raises(BatchTooLarge, match="128 operations per transaction"):
        etcd_kv.write(Batch(), expect=[("a", b"n%03d" % i, None) for i in range(129)])
    with pytest.raises(BatchTooLarge, match="request limit"):
        etcd_kv.write(batch(("a", b"big", b"x" * (2 << 20))))
    # Operations on one key count once (the last wins), as the interface says.
    etcd_kv.write(batch(*[("a", b"same", b"%d" % i) for i in range(300)]))
    assert etcd_kv.get("a", b"same") == b"299"
    assert list(etcd_kv.scan("a", b"n")) == [(b"same", b"299")]  # nothing of the refused ones


def test_a_scan_whose_revision_is_compacted_says_so(etcd, etcd_kv):
    etcd_kv.write(batch(*[("a", b"%d" % i, b"v") for i in range(6)]))
    it = etcd_kv.scan("a", b"")  # pages of 2
    assert next(it) == (b"0", b"v")
    etcd_kv.write(batch(("a", b"1", b"changed")))
    rev = requests.post(etcd.endpoint + "/v3/kv/range", json={"key": "AA=="},
                        timeout=5).json()["header"]["revision"]
    requests.post(etcd.endpoint + "/v3/kv/compaction", json={"revision": rev, "physical": True},
                  timeout=5).raise_for_status()
    assert next(it) == (b"1", b"v")  # the rest of the first page
    with pytest.raises(ScanExpired, match="compacted"):
        next(it)


def test_a_lease_holds_a_key_for_one_holder(etcd_kv):
    a = etcd_kv.acquire("a", b"branch/main", "host-a", ttl=2)
    with pytest.raises(LeaseHeld, match="branch/main is held by 'host-a'") as e:
        etcd_kv.acquire("a", b"branch/main", "host-b", ttl=2)
    assert e.value.holder == "host-a" and 0 <= e.value.ttl <= 2
    # The holder's fenced writes commit (kept alive past its TTL: the next test).
    etcd_kv.write(batch(("a", b"head/main", b"commit-1")), expect=[a.fence])
    # Released, it is free at once, and the old holder's fence no longer lets writes through.
    a.release()
    b = etcd_kv.acquire("a", b"branch/main", "host-b", ttl=2)
    with pytest.raises(Conflict):
        etcd_kv.write(batch(("a", b"head/main", b"stale")), expect=[a.fence])
    assert etcd_kv.get("a", b"head/main") == b"commit-1"
    b.release()


_HOLDER = textwrap.dedent("""
    import sys
    from cowfs.kv.etcd import EtcdKV
    kv = EtcdKV(sys.argv[1], ("a",), sys.argv[2].encode())
    lease = kv.acquire("a", b"branch/main", "host-a", ttl=2)
    lease.start_keepalive()
    print("held", flush=True)
    sys.stdin.read()  # until killed
""")


def test_a_killed_holders_lease_expires_and_another_takes_over(etcd, engine_prefix):
    """Host A holds the branch, renewing its lease, and dies (kill -9): host B is refused,
    naming A, until A's lease expires (at most its TTL of 2 s after A's last renewal), then
    B holds it."""
    prefix = engine_prefix + "/"
    kv = EtcdKV(etcd.endpoint, ("a",), prefix.encode())
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, etcd.endpoint, prefix],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert p.stdout.readline() == b"held\n"
        time.sleep(2.5)  # past the TTL: only the renewals keep it
        with pytest.raises(LeaseHeld, match="'host-a'"):
            kv.acquire("a", b"branch/main", "host-b", ttl=2)
        p.send_signal(signal.SIGKILL)
        killed = time.monotonic()
    finally:
        p.kill()
        p.wait(30)
    while True:
        try:
            lease = kv.acquire("a", b"branch/main", "host-b", ttl=2)
            break
        except LeaseHeld as e:
            assert e.holder == "host-a"
            assert time.monotonic() - killed < 2 + 2, "host-a's lease outlived its TTL"
            time.sleep(0.1)
    took = time.monotonic() - killed
    assert took > 0.5, f"taken over {took:.1f} s after the kill: the lease was not live"
    assert lease.keep_alive() >= 1
    lease.release()
    with pytest.raises(LeaseLost):
        lease.keep_alive()
    kv.close()


def test_without_the_remote_extra_the_embedded_store_still_works(tmp_path):
    """With boto3, etcd3gw and requests unimportable, the embedded store opens and the
    remote backends say how to get their packages."""
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("boto3", "botocore", "etcd3gw", "requests"):
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
        sys.meta_path.insert(0, Block())
        import cowfs.cli, cowfs.daemon.server, cowfs.store, cowfs.blob, cowfs.blob.local
        import cowfs.kv.etcd, cowfs.blob.s3
        from cowfs.remote import MissingDependency
        for make in (lambda: cowfs.kv.etcd.EtcdKV("http://127.0.0.1:1", ("a",)),
                     lambda: cowfs.blob.s3.S3BlobStore("bucket")):
            try:
                make()
            except MissingDependency as e:
                print(e)
        from cowfs.store import init_store, Store
        init_store(sys.argv[1])
        Store(sys.argv[1]).close()
        print("store ok")
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "store ok"
    assert "the etcd key-value backend needs the Python package 'etcd3gw'" in lines[0]
    assert "the S3 blob store needs the Python package 'botocore'" in lines[1]
    assert all("pip install 'cowfs[remote]'" in line for line in lines[:2])
