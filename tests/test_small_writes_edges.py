"""The small-write log (cowfs/core/smallwrites.py) against the operations that change a file
between its fsync'd small writes and the next fold: truncate, extend, unlink while open,
rename over, hard link, clone, rollback.  Each test holds the 1 s timer's flush (the
`timer_flush` hook) so that records are pending when the daemon is killed -9, and compares
the replayed files with a model of what POSIX requires after the acknowledged fsyncs: every
fsync'd byte back, nothing a later committed operation removed resurrected, and usage equal
to what the files hold.
"""
from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random

import pytest

import mounting
from mounting import ok, stats

HOLD = {"COWFS_FAULTS": "timer_flush:eio:*"}
BASE = 256 << 10


def _replayed(m: mounting.Mount) -> int:
    """How many records the last start replayed (0: none)."""
    tail = m.log_text().split("start #")[-1]
    for line in tail.splitlines():
        if "small-write log records of a previous daemon replayed" in line:
            return int(line.split(" small-write log records")[0].split()[-1])
    return 0


class Model:
    """An open file on the mount and the bytes it must hold."""

    def __init__(self, path, data: bytes = b"") -> None:
        self.path = path
        self.data = bytearray(data)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if data:
            assert os.pwrite(self.fd, data, 0) == len(data)
            os.fsync(self.fd)  # more than the log takes: committed as chunks

    def pwrite(self, off: int, data: bytes, sync: bool = True) -> None:
        assert os.pwrite(self.fd, data, off) == len(data)
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off : off + len(data)] = data
        if sync:
            os.fsync(self.fd)

    def small(self, rnd: random.Random, n: int) -> None:
        for _ in range(n):
            self.pwrite(rnd.randrange(max(1, len(self.data))), rnd.randbytes(rnd.choice([1, 300, 4096, 6000])))

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))
        os.fsync(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a handle of the killed daemon's connection
            os.close(self.fd)


def _usage_matches_files(mp) -> None:
    """The branch's usage is what its regular files hold (sizes, allocated blocks)."""
    st = stats(mp)
    files = [p for p in mp.iterdir() if p.is_file() and not p.is_symlink()]
    inodes = {os.stat(p).st_ino: os.stat(p) for p in files}.values()
    assert st["usage_bytes"] == sum(s.st_size for s in inodes), st
    blocks = sum(s.st_blocks * 512 for s in inodes)
    assert 0 <= blocks - st["usage_allocated_bytes"] < 512 * max(1, len(inodes)), (blocks, st)


@pytest.mark.timeout(240)
def test_replay_after_truncate_extend_unlink_rename_and_link_holds_only_what_is_current(mount_factory):
    """Logged pages, then a committed truncate to 0 / truncate down / extend / unlink while
    open / rename over / hard link, then more logged pages: after SIGKILL the replay gives
    each file its last fsync'd state (never the bytes the truncate or the rename removed),
    the unlinked file stays gone, and usage matches the files."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(241)
    mp = m.path
    files: dict[str, Model] = {}
    try:
        for name in ("zero", "down", "up", "gone", "src", "dst", "linked", "overlap"):
            files[name] = Model(mp / name, rnd.randbytes(BASE))
        for f in files.values():
            f.small(rnd, 3)  # logged, folded by the operations below
        files["zero"].truncate(0)
        files["down"].truncate(70000)
        files["up"].truncate(3 * BASE + 123)
        os.unlink(mp / "gone")
        os.rename(mp / "src", mp / "dst")
        files["dst"].close()
        files["dst"] = files.pop("src")
        files["dst"].path = mp / "dst"
        os.link(mp / "linked", mp / "linked2")
        # Pending at the kill: records written after every operation above.
        files["zero"].pwrite(200000, b"after the truncate to zero")  # a hole, then these
        files["down"].pwrite(100000, rnd.randbytes(5000))  # past the cut: zeros between
        files["up"].pwrite(3 * BASE, rnd.randbytes(4096))
        files["gone"].pwrite(10, rnd.randbytes(8192))  # the orphan: written, then dropped
        files["dst"].small(rnd, 3)
        l2 = Model(mp / "linked2")
        l2.data = files["linked"].data  # one inode, one content
        l2.small(rnd, 3)
        files["linked"].small(rnd, 2)
        o = files["overlap"]  # overlapping fsyncs: the later wins
        o.pwrite(4000, b"a" * 9000)
        o.pwrite(6000, b"b" * 4096)
        o.pwrite(4100, b"c" * 100)
        o.pwrite(65530, b"d" * 20)  # across a chunk boundary
        o.pwrite(65536 - 4096, b"e" * 4096)
        assert os.pread(files["zero"].fd, 300000, 0) == files["zero"].data
        mounting.sigkill_fsck_start(m)
    finally:
        for f in files.values():
            f.close()
        with contextlib.suppress(NameError):
            l2.close()
    assert _replayed(m) >= 7, m.log_text()[-3000:]
    assert not (mp / "gone").exists() and not (mp / "src").exists()
    for name, f in files.items():
        if name == "gone":
            continue
        got = (mp / name).read_bytes()
        assert got == f.data, f"{name}: {len(got)} bytes, expected {len(f.data)}; first difference at " \
                              f"{next((i for i, (x, y) in enumerate(zip(got, f.data)) if x != y), None)}"
    assert (mp / "linked2").read_bytes() == files["linked"].data
    assert os.stat(mp / "linked").st_nlink == 2
    _usage_matches_files(mp)
    mounting.sigkill_fsck_start(m)  # replayed once: nothing changes a second time
    assert _replayed(m) == 0
    assert (mp / "zero").read_bytes() == files["zero"].data


@pytest.mark.timeout(240)
def test_replay_after_rollback_gives_the_snapshot_and_the_writes_after_it(mount_factory):
    """Records logged before a rollback, and through a handle opened before it (its
    detached tree), are not replayed into the rolled-back branch; the pages logged on the
    new tree are."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(242)
    mp = m.path
    f = Model(mp / "f", rnd.randbytes(BASE))
    old = None
    try:
        f.small(rnd, 3)
        ok(mp, "snapshot s1")
        snap = bytes(f.data)
        f.small(rnd, 4)  # logged, then thrown away by the rollback
        ok(mp, "rollback s1")
        old = f
        old.pwrite(0, b"through the old handle" * 100)  # the detached tree's: gone with it
        f = Model(mp / "f")
        f.data = bytearray(snap)
        assert os.pread(f.fd, BASE + 1, 0) == snap
        f.small(rnd, 4)
        mounting.sigkill_fsck_start(m)
    finally:
        f.close()
        if old is not None:
            old.close()
    assert _replayed(m) >= 4
    assert (mp / "f").read_bytes() == f.data
    assert (mp / ".cowfs/snapshots/s1/f").read_bytes() == snap
    _usage_matches_files(mp)


@pytest.mark.timeout(240)
def test_replay_into_a_clone_and_its_original(mount_factory):
    """A file cloned with `cowfs clone` after logged writes, both then written with more
    logged pages: after SIGKILL each holds its own writes, the clone its state at the clone
    plus its own, and a copy inside a cloned directory (read through the clone record until
    written) gets its logged pages back too."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(243)
    mp = m.path
    os.mkdir(mp / "d")
    f = Model(mp / "f", rnd.randbytes(BASE))
    inner = Model(mp / "d" / "inner", rnd.randbytes(BASE))
    inner.close()
    models = [f]
    try:
        f.small(rnd, 3)
        ok(mp, "clone f g")
        ok(mp, "clone d e")
        g = Model(mp / "g")
        g.data = bytearray(f.data)
        models.append(g)
        e = Model(mp / "e" / "inner")
        e.data = bytearray(inner.data)
        models.append(e)
        for x in models:
            x.small(rnd, 3)
        mounting.sigkill_fsck_start(m)
    finally:
        for x in models:
            x.close()
    assert _replayed(m) >= 3
    for x in models:
        assert x.path.read_bytes() == x.data, x.path
    assert (mp / "d" / "inner").read_bytes() == inner.data


@pytest.mark.timeout(240)
def test_replay_under_a_quota_counts_what_the_files_allocate(mount_factory):
    """With a byte quota, logged writes that grew files (past holes, over holes) are
    replayed, usage afterwards is what the files allocate, and the quota still refuses."""
    m = mount_factory(options=["quota_bytes=4M"], env=HOLD)
    rnd = random.Random(244)
    mp = m.path
    f = Model(mp / "f", rnd.randbytes(BASE))
    s = Model(mp / "sparse")
    try:
        s.truncate(2 << 20)  # a hole
        for _ in range(6):
            f.pwrite(len(f.data) + rnd.randrange(70000), rnd.randbytes(4096))  # grows, past a hole
            s.pwrite(rnd.randrange(2 << 20), rnd.randbytes(4096))  # into the hole
        mounting.sigkill_fsck_start(m)
    finally:
        f.close()
        s.close()
    assert _replayed(m) >= 6
    assert (mp / "f").read_bytes() == f.data
    assert (mp / "sparse").read_bytes() == s.data
    _usage_matches_files(mp)
    with pytest.raises(OSError) as exc:
        with open(mp / "big", "wb") as out:
            for _ in range(8):
                out.write(rnd.randbytes(1 << 20))
                out.flush()
                os.fsync(out.fileno())
    assert exc.value.errno == errno.EDQUOT
    assert stats(mp)["usage_allocated_bytes"] <= 4 << 20


@pytest.mark.timeout(240)
def test_records_of_a_branch_deleted_offline_after_the_crash_are_dropped(mount_factory):
    """A branch's daemon killed with records pending, the branch then deleted by the
    administrator on the unmounted store: the next daemon (of another branch) applies none
    of them, deletes them all at once (they could never apply), and its own files keep
    their contents."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(245)
    base = rnd.randbytes(BASE)
    (m.path / "f").write_bytes(base)
    ok(m.path, "branch side")
    m.stop()
    side = mount_factory(store=m.store, init=False, branch="side", name="side", env=HOLD)
    f = Model(side.path / "f")
    f.data = bytearray(base)
    try:
        f.small(rnd, 5)
        mounting.sigkill(side)
    finally:
        f.close()
    mounting.run_cowfs("delete", m.store, "side", timeout=120)
    assert mounting.fsck(m.store)["clean"]
    m.start()
    assert "5 of them dropped" in m.log_text()
    assert stats(m.path)["small_write_log"]["pending_records"] == 0
    assert (m.path / "f").read_bytes() == base
    m.stop()
    assert mounting.fsck(m.store)["clean"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags", [os.O_SYNC, os.O_DSYNC | os.O_DIRECT], ids=["o_sync", "o_dsync_direct"])
def test_every_synchronous_write_survives_sigkill_through_the_log(mount_factory, flags):
    """O_SYNC / O_DSYNC writes (the kernel fsyncs each, through the page cache or, with
    O_DIRECT, as the bytes came) go to the log one record per write, unaligned ones
    across page and chunk boundaries included: after SIGKILL every one is back."""
    m = mount_factory(env=HOLD)
    rnd = random.Random(246)
    base = rnd.randbytes(BASE)
    path = m.path / "f"
    Model(path, base).close()
    model = bytearray(base)
    fd = os.open(path, os.O_RDWR | flags)
    try:
        for k in range(300):
            if flags & os.O_DIRECT:  # aligned buffers and offsets
                off, data = rnd.randrange(len(model) // 4096) * 4096, rnd.randbytes(4096)
            else:
                off = rnd.choice([rnd.randrange(len(model)), 65536 * rnd.randrange(1, 4) - 3])
                data = rnd.randbytes(rnd.choice([1, 7, 100, 5000]))
            if k == 299:  # the last one grows the file
                off = len(model) if not flags & os.O_DIRECT else len(model) // 4096 * 4096
            if flags & os.O_DIRECT:
                buf = mmap.mmap(-1, len(data))
                buf.write(data)
                assert os.pwritev(fd, [buf], off) == len(data)
            else:
                assert os.pwrite(fd, data, off) == len(data)
            model[off : off + len(data)] = data
        mounting.sigkill_fsck_start(m)
    finally:
        mounting.close_after_kill(fd)
    assert _replayed(m) >= 250, m.log_text()[-2000:]
    assert path.read_bytes() == model


@pytest.mark.timeout(240)
def test_a_damaged_log_record_is_found_by_fsck_and_its_repair_lets_the_store_mount(mount_factory):
    """A record that does not parse stops the replay, so no daemon can start: fsck must
    call the store damaged (it said clean), the mount's error names the repair, and
    `fsck --repair` deletes that record alone: the next start replays the others."""
    from cowfs.kv.base import Batch
    from cowfs.meta import writelog
    from cowfs.store import Store

    m = mount_factory(env=HOLD)
    rnd = random.Random(247)
    f = Model(m.path / "f", rnd.randbytes(BASE))
    try:
        f.small(rnd, 3)
        mounting.sigkill(m)
    finally:
        f.close()
    st = Store(str(m.store))
    try:
        batch = Batch()
        batch.put(writelog.CF_META, writelog.PREFIX + (1 << 40).to_bytes(8, "big"), b"not a record")
        st.kv.write(batch)
        st.kv.sync()
    finally:
        st.close()
    r = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode != 0 and not report["clean"] and any("small-write log record" in p for p in report["problems"]), report
    with pytest.raises(mounting.MountError):
        m.start()
    assert "cowfs fsck --repair" in m.log_text().split("start #")[-1], m.log_text()[-2000:]
    r = mounting.run_cowfs("fsck", m.store, "--repair", "--json", check=False, timeout=120)
    assert b"deleted damaged small-write log record" in r.stdout, r.stdout
    assert mounting.fsck(m.store)["clean"]
    m.start()
    assert _replayed(m) >= 3  # every record but the damaged one
    assert (m.path / "f").read_bytes() == f.data


@pytest.mark.timeout(240)
@pytest.mark.parametrize("journal", ["persist", "wal"])
def test_sqlite_commits_survive_sigkill_through_the_log(mount_factory, journal):
    """sqlite, the log's first user (issue 24): each COMMIT fsyncs its rollback journal (kept,
    its header zeroed: `persist`) or its write-ahead log, and its database pages, as small
    writes, that is log records, with no other operation to fold them (a journal deleted or
    truncated at each COMMIT would).  After SIGKILL with records pending the database passes
    integrity_check and holds every transaction whose COMMIT returned."""
    import sqlite3

    m = mount_factory(env=HOLD)
    db = m.path / "t.db"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute(f"PRAGMA journal_mode={journal}")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        rnd = random.Random(248)
        acked = 0
        for k in range(300):
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?, ?)", (k, rnd.randbytes(rnd.choice([10, 500, 3000]))))
            if k % 7 == 0 and k:
                con.execute("UPDATE t SET v = ? WHERE k = ?", (b"updated", k // 2))
            con.execute("COMMIT")
            acked = k + 1
        mounting.sigkill(m)
    finally:
        with contextlib.suppress(sqlite3.Error):
            con.close()
    r = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=120)
    assert json.loads(r.stdout)["clean"], r.stdout[-2000:]
    m.start()
    assert _replayed(m) > 0, "nothing was pending in the log: the test proves nothing"
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == acked
        assert con.execute("SELECT v FROM t WHERE k = 7").fetchone()[0] == b"updated"
    finally:
        con.close()
