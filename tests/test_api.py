"""cowfs.api (re-exported by `import cowfs`): mounts, branching commands, typed errors, and the
worked example of docs/python-api.md run for real."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cowfs
from cowfs import api

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "python-api.md"


def _cowfs_mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " fuse.cowfs " in line and line.split()[4].startswith(prefix)]


def _daemons_of(root: Path) -> list[int]:
    want = str(root).encode()
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"cowfs" in cmd and want in cmd and b"mount" in cmd:
                pids.append(int(d))
    return pids


@pytest.fixture
def work(tmp_path):
    yield tmp_path
    left = _cowfs_mounts_under(tmp_path)
    for mp in sorted(left, key=len, reverse=True):
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    deadline = time.monotonic() + 10
    while _daemons_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"mounts left behind: {left}"


def test_import_cowfs_is_cheap():
    code = ("import sys, cowfs\n"
            "heavy = {'trio', 'pyfuse3', 'rocksdict', 'cowfs.api', 'cowfs.daemon.server'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert cowfs.mount is cowfs.api.mount and issubclass(cowfs.NotFound, cowfs.CowfsError)\n"
            "heavy = {'trio', 'pyfuse3', 'rocksdict'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mount" in dir(cowfs)
    with pytest.raises(AttributeError):
        cowfs.no_such_name


def test_errno_mapping():
    cases = {errno.EEXIST: cowfs.AlreadyExists, errno.ENOENT: cowfs.NotFound, errno.EINVAL: cowfs.InvalidArgument,
             errno.EBUSY: cowfs.Busy, errno.EROFS: cowfs.ReadOnly, errno.EDQUOT: cowfs.QuotaExceeded,
             errno.ENOSPC: cowfs.QuotaExceeded, errno.EPERM: cowfs.PermissionDenied,
             errno.EACCES: cowfs.PermissionDenied, errno.EIO: cowfs.CowfsError}
    for e, cls in cases.items():
        exc = api.error_for(e, "x")
        assert type(exc) is cls and exc.errno == e
    assert cowfs.SnapshotExists is cowfs.AlreadyExists


def test_mount_commands_and_errors(work):
    store = cowfs.init_store(work / "store")
    with pytest.raises(cowfs.StoreError, match="already a cowfs store"):
        cowfs.init_store(store)
    with pytest.raises(cowfs.MountError, match="no such store"):
        cowfs.mount(work / "missing", work / "m0")
    with pytest.raises(cowfs.NotMounted):
        cowfs.open_mount(work)

    with cowfs.mount(store, work / "main", options=["quota_inodes=50"]) as m:
        assert m.is_mounted() and m.branch_name == "main" and m.store == store
        (m.path / "a.txt").write_text("one")
        r = m.snapshot("s1")
        assert r["snapshot"] == "s1"
        with pytest.raises(cowfs.AlreadyExists, match="already exists") as ei:
            m.snapshot("s1")
        assert ei.value.errno == errno.EEXIST and ei.value.reply["errno"] == "EEXIST"
        with pytest.raises(cowfs.NotFound):
            m.rollback("nope")
        with pytest.raises(cowfs.InvalidArgument):
            m.snapshot("bad name")
        with pytest.raises(cowfs.InvalidArgument):
            m.rollback("main")                        # a branch, not a snapshot
        with pytest.raises(cowfs.Busy):
            m.delete("main")                          # mounted
        with pytest.raises(cowfs.ReadOnly):
            m.clone("a.txt", ".cowfs/snapshots/s1/b.txt")
        with pytest.raises(cowfs.AlreadyExists):
            m.clone("a.txt", "a.txt")

        (m.path / "a.txt").write_text("two")
        (m.path / "new").mkdir()
        changes = {(c.change, c.path) for c in m.diff("s1")}
        assert changes == {("modified", "a.txt"), ("added", "new")}
        assert (m.snapshot_path("s1") / "a.txt").read_text() == "one"
        assert m.clone("a.txt", "new/copy.txt")["entries"] == 1
        assert (m.path / "new" / "copy.txt").read_text() == "two"

        # quota: 50 inodes; a clone of a big tree is refused with EDQUOT
        (m.path / "many").mkdir()
        for i in range(20):
            (m.path / "many" / str(i)).write_text(str(i))
        with pytest.raises(cowfs.QuotaExceeded):
            m.clone("many", "many2")
            m.clone("many", "many3")

        listing = m.list()
        assert "s1" in listing and [s.name for s in listing.snapshots] == ["s1"]
        (main_ref,) = [b for b in listing.branches if b.name == "main"]
        assert main_ref.mounted_here and main_ref.quota_inodes == 50 and main_ref.inodes > 20
        st = m.stats()
        assert st["branch"] == "main" and st["quota_inodes"] == 50

        m.branch("b1", "s1")
        with m.attach("b1", work / "b1") as b:
            assert b.branch_name == "b1" and (b.path / "a.txt").read_text() == "one"
            (b.path / "only-b1").write_text("x")
            opened = cowfs.open_mount(b.path)
            assert opened.branch_name == "b1" and not opened.owned
            with pytest.raises(cowfs.Busy):
                m.delete("b1")
        assert not (work / "b1").is_mount()
        m.delete("b1")
        assert "b1" not in m.list()

        m.rollback("s1")
        assert (m.path / "a.txt").read_text() == "one" and not (m.path / "new").exists()
        m.delete("s1")
        with pytest.raises(cowfs.NotFound):
            m.delete("s1")
    assert not m.is_mounted()
    m.umount()                                        # idempotent


def test_permission_denied_for_other_users(work, test_dir):
    store = cowfs.init_store(work / "store")
    with cowfs.mount(store, test_dir / "main", options=["allow_other"]) as m:
        code = ("import cowfs\n"
                f"m = cowfs.Mount(path=__import__('pathlib').Path({str(m.path)!r}), "
                f"store=__import__('pathlib').Path({str(store)!r}), branch_name='main', owned=False)\n"
                "try:\n    m.snapshot('x')\nexcept cowfs.PermissionDenied as e:\n    print('denied', e.errno)\n")
        # the system python: the venv's may live where nobody cannot reach (cowfs.api needs stdlib only)
        r = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)),
                           user=65534, group=65534, extra_groups=[], cwd="/")
        assert r.stdout.strip() == f"denied {errno.EACCES}", r.stdout + r.stderr


def _worked_example() -> str:
    text = DOC.read_text()
    m = re.search(r"## Worked example.*?```python\n(.*?)```", text, re.S)
    assert m, "docs/python-api.md lost its worked example"
    return m.group(1)


def test_worked_example_runs(work):
    """The block in docs/python-api.md, as is, with N=3."""
    script = work / "example.py"
    script.write_text(_worked_example())
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ATTEMPTS="3", WORKDIR=str(work / "w")))
    assert r.returncode == 0, r.stdout + r.stderr
    expected = re.search(r"Output:\n\n```\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert r.stdout == expected
    assert not _cowfs_mounts_under(work)
    deadline = time.monotonic() + 10
    while _daemons_of(work) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _daemons_of(work), "the example left a daemon running"
