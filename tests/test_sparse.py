"""Sparse files and allocated space (issue 19, items 7 and 13), on real mounts.

What a file allocates is the length of its stored chunks (holes, and chunks of zeros, take
nothing): st_blocks, `du`, the branch usage that quotas charge and `df` under a quota all
count that, checked against the kernel's own filesystem (a plain directory under /tmp) where
Linux defines the answer.  Exact equality with ext4 is not expected (cowfs allocates in
chunks' lengths, ext4 in 4 KiB blocks, and cowfs keeps zeros as holes), so the comparisons
allow one 64 KiB chunk per data region.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB


def stats(target) -> dict:
    return json.loads(mounting.run_cowfs("stats", target, "--json").stdout)


def listing(target) -> dict:
    return json.loads(mounting.run_cowfs("list", target, "--json").stdout)


def fsck(store) -> dict:
    r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=300)
    report = json.loads(r.stdout)
    assert report["clean"], report["problems"][:20]
    return report


def as_user(cwd, *cmd, timeout=120) -> subprocess.CompletedProcess:
    """Run a command as the unprivileged test user (no supplementary groups)."""
    return subprocess.run(["setpriv", f"--reuid={UNPRIV_UID}", f"--regid={UNPRIV_GID}", "--clear-groups", *cmd],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def du_bytes(path) -> int:
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True,
                              timeout=60).stdout.split()[0])


# name -> (operations, nonzero data bytes, data regions); operations are ("write", offset,
# bytes) and ("truncate", size), applied in order.
def layouts() -> dict[str, tuple[list[tuple], int, int]]:
    rnd = random.Random(7)
    r = rnd.randbytes
    return {
        "truncated-1g": ([("truncate", GiB)], 0, 0),
        "dense-3m": ([("write", 0, r(3 * MiB))], 3 * MiB, 1),
        "small": ([("write", 0, b"x" * 100)], 100, 1),
        "islands": ([("write", 0, r(CHUNK)), ("write", 10 * MiB, r(4 * KiB)),
                     ("write", 50 * MiB + 123, r(70 * KiB)), ("truncate", 100 * MiB)], CHUNK + 74 * KiB, 3),
        "grown-tail": ([("write", 0, r(MiB)), ("truncate", 100 * MiB)], MiB, 1),
        "shrunk": ([("write", 0, r(5 * MiB)), ("truncate", MiB + 10)], MiB + 10, 1),
        # ext4 allocates written zeros; cowfs keeps them as holes (never more than ext4)
        "zeros": ([("write", 0, bytes(2 * MiB)), ("write", 4 * MiB, b"end")], 3, 1),
        "only-zeros": ([("write", 0, bytes(300_000))], 0, 0),
    }


def build(root: Path) -> None:
    for name, (ops, _data, _regions) in layouts().items():
        fd = os.open(root / name, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for op in ops:
                if op[0] == "write":
                    assert os.pwrite(fd, op[2], op[1]) == len(op[2])
                else:
                    os.ftruncate(fd, op[1])
        finally:
            os.close(fd)


def check_against(ref: Path, mp: Path) -> None:
    for name, (_ops, data, regions) in layouts().items():
        want, got = os.stat(ref / name), os.stat(mp / name)
        assert got.st_size == want.st_size, name
        ext4, cow = want.st_blocks * 512, got.st_blocks * 512
        assert data <= cow <= ext4 + regions * CHUNK, \
            f"{name}: {cow} bytes allocated for {data} bytes of data (ext4: {ext4}, size {got.st_size})"
    assert du_bytes(mp) <= du_bytes(ref) + 8 * CHUNK, "du over the mount counts more than ext4's"
    assert du_bytes(mp) < 16 * MiB, "du counts holes"


@pytest.mark.timeout(180)
def test_st_blocks_and_du_count_allocated_bytes_like_ext4(cowfs_mount, test_dir):
    ref = test_dir / "ext4"
    ref.mkdir()
    build(ref)
    build(cowfs_mount.path)
    check_against(ref, cowfs_mount.path)          # on the live mount
    cowfs_mount.remount()
    check_against(ref, cowfs_mount.path)          # as committed
    # a rewrite allocates nothing new; a chunk of zeros over data gives its space back
    p = cowfs_mount.path / "dense-3m"
    before = allocated(p)
    with open(p, "r+b") as f:
        f.write(os.urandom(MiB))
        f.seek(2 * MiB)
        f.write(bytes(MiB))
    assert allocated(p) == before - MiB
    s = stats(cowfs_mount.path)
    total = sum(allocated(cowfs_mount.path / n) for n in layouts())
    assert 0 <= total - s["usage_allocated_bytes"] < 512 * len(layouts()), (s["usage_allocated_bytes"], total)
    assert s["usage_bytes"] == sum(os.stat(cowfs_mount.path / n).st_size for n in layouts())
    cowfs_mount.stop()
    fsck(cowfs_mount.store)


@pytest.mark.timeout(180)
def test_quota_charges_allocated_bytes_for_an_unprivileged_user(mount_factory):
    m = mount_factory(options=["allow_other", "quota_bytes=50M"])
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    # a sparse gigabyte allocates nothing: within a 50M quota
    r = as_user(m.path, "truncate", "-s", "1G", "big")
    assert r.returncode == 0, r.stderr
    r = as_user(m.path, "dd", "if=/dev/urandom", "of=big", "bs=1M", "count=10", "seek=100", "conv=notrunc")
    assert r.returncode == 0, r.stderr
    assert os.stat(m.path / "big").st_size == GiB and allocated(m.path / "big") == 10 * MiB
    # df: the quota is the size, the branch's allocated bytes are what is used
    r = as_user(m.path, "df", "-B1", "--output=size,used,avail", ".")
    size, used, avail = map(int, r.stdout.split()[3:6])
    assert size == 50 * MiB and used == 10 * MiB and avail == 40 * MiB, r.stdout
    # filling the rest fails with EDQUOT, and no further
    r = as_user(m.path, "dd", "if=/dev/urandom", "of=fill", "bs=1M", "count=60")
    assert r.returncode != 0 and "quota" in r.stderr.lower(), r.stderr
    assert allocated(m.path / "fill") <= 40 * MiB
    s = stats(m.path)
    assert s["quota_bytes"] == 50 * MiB and s["usage_allocated_bytes"] <= 50 * MiB
    assert s["usage_bytes"] == GiB + os.stat(m.path / "fill").st_size     # logical: sizes
    # zeros written do not count; holes do not count
    os.unlink(m.path / "fill")
    r = as_user(m.path, "dd", "if=/dev/zero", "of=zeros", "bs=1M", "count=100")
    assert r.returncode == 0, r.stderr
    assert stats(m.path)["usage_allocated_bytes"] == 10 * MiB
    main = next(b for b in listing(m.path)["branches"] if b["name"] == "main")
    assert main["allocated_bytes"] == 10 * MiB and main["logical_bytes"] == GiB + 100 * MiB
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(180)
def test_allocated_usage_of_snapshots_branches_rollback_and_clone(mount_factory):
    m = mount_factory(options=["quota_bytes=20M"])
    mp = m.path
    with open(mp / "sparse", "wb") as f:
        f.truncate(GiB)
        f.seek(5 * MiB)
        f.write(os.urandom(2 * MiB))
    mounting.run_cowfs("snapshot", mp, "two")
    with open(mp / "sparse", "r+b") as f:
        f.seek(100 * MiB)
        f.write(os.urandom(3 * MiB))
    # a clone of a sparse gigabyte allocates 5 MiB more, not a gigabyte: within the quota
    mounting.run_cowfs("clone", mp, "sparse", "copy")
    assert stats(mp)["usage_allocated_bytes"] == 10 * MiB
    rows = {r["name"]: r for r in listing(mp)["snapshots"] + listing(mp)["branches"]}
    assert rows["two"]["allocated_bytes"] == 2 * MiB and rows["two"]["logical_bytes"] == GiB
    assert rows["main"]["allocated_bytes"] == 10 * MiB and rows["main"]["logical_bytes"] == 2 * GiB
    mounting.run_cowfs("branch", mp, "b2", "--from", "two")
    rows = {r["name"]: r for r in listing(mp)["branches"]}
    assert rows["b2"]["allocated_bytes"] == 2 * MiB
    mounting.run_cowfs("rollback", mp, "two")
    assert stats(mp)["usage_allocated_bytes"] == 2 * MiB
    m.remount()
    assert stats(mp)["usage_allocated_bytes"] == 2 * MiB
    m.stop()
    fsck(m.store)


@pytest.mark.timeout(120)
def test_format_4_store_gets_allocated_usage_at_first_open(mount_factory):
    from cowfs.kv.base import Batch
    from cowfs.meta.layers import CF_META
    from cowfs.store import FORMAT_VERSION, Store

    m = mount_factory()
    with open(m.path / "sparse", "wb") as f:
        f.truncate(GiB)
        f.write(os.urandom(MiB))
    mounting.run_cowfs("snapshot", m.path, "s1")
    (m.path / "dense").write_bytes(os.urandom(3 * MiB))
    m.stop()
    st = Store(str(m.store))
    b = Batch()  # what format 4 left: (logical bytes, inodes) only
    for key, value in st.kv.scan(CF_META, b"usage/", b"usage/"):
        b.put(CF_META, key, value[:16])
    b.put(CF_META, b"format", b"4")
    st.kv.write(b)
    st.close()
    marker = m.store / "cowfs-store.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 4}))
    m.start()
    assert json.loads(marker.read_text())["format"] == FORMAT_VERSION
    assert stats(m.path)["usage_allocated_bytes"] == 4 * MiB
    rows = {r["name"]: r for r in listing(m.path)["snapshots"]}
    assert rows["s1"]["allocated_bytes"] == MiB
    assert "allocated bytes counted" in m.log_text()
    m.stop()
    fsck(m.store)

