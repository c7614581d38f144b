"""A store is its owner's alone; a sandbox learns nothing of the host from its mount.

* the store directory is 0700 and everything in it 0600/0700, whatever the umask of whoever
  created or mounted it: after `cowfs init`, while mounted after writes (new WAL, SST and
  blob files, daemon.log/pid/sock), and for an old store left with loose modes, which a
  mount or an offline command tightens (and the log says so); the unprivileged uid can open
  or list nothing under it;
* what that uid may still do through an allow_other mount keeps working: `cowfs stats MNT`,
  `cowfs status`, control-file commands;
* `.cowfs/stats` inside a mount names no host path, no daemon pid and no other branch; the
  admin socket (`cowfs stats` as root) still has them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from cowfs.daemon import admin
from mounting import Worker, run_cowfs, run_cowfs_as

SECRET = b"cowfs-privacy-canary-" + b"0123456789abcdef" * 4


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def store_paths(store) -> list[str]:
    """Every path under store (store included), as root sees them."""
    out = [str(store)]
    for dirpath, dirnames, filenames in os.walk(store):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return out


def loose(store) -> list[str]:
    """Paths under store with any permission for group or others (symlinks aside)."""
    bad = []
    for p in store_paths(store):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue  # RocksDB removed an obsolete file meanwhile
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            bad.append(f"{os.path.relpath(p, store)} {stat.filemode(st.st_mode)}")
    return bad


def assert_private(store, w: Worker) -> None:
    """Nothing under store is readable by others: by mode, and by trying as the worker's uid."""
    assert not loose(store), f"readable by others under {store}: {loose(store)}"
    reached = []
    for p in store_paths(store):
        if os.path.isdir(p):
            r = w.call("os.listdir", p)
        else:
            r = w.call("os.open", p, os.O_RDONLY)
            if r[0] == "ok":
                w.call("os.close", r[1])
        if r[0] == "ok" or r[1] != errno.EACCES:
            reached.append(f"{os.path.relpath(p, store)}: {r}")
    assert not reached, f"uid {w.uid} reached: {reached}"


def files_holding(store, needle: bytes) -> list[str]:
    found = []
    for p in store_paths(store):
        if os.path.isfile(p):
            with contextlib.suppress(OSError), open(p, "rb") as f:
                if needle in f.read():
                    found.append(p)
    return found


@pytest.fixture
def nobody():
    w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID)
    yield w
    w.close()


@pytest.mark.timeout(180)
def test_store_is_private_after_init_and_while_mounted(mount_factory, test_dir, nobody):
    store = test_dir / "store"
    with umask(0):  # whatever the umask of whoever creates or mounts it
        run_cowfs("init", store)
        assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
        assert_private(store, nobody)
        m = mount_factory(store=store, options=["allow_other"])
    fd = os.open(m.path / "secret", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, os.urandom(30000) + SECRET + os.urandom(30000))  # incompressible: stored as is
    os.fsync(fd)
    os.close(fd)
    (m.path / "big").write_bytes(os.urandom(12 << 20))  # a pack file, blob files
    run_cowfs("gc", m.path)  # compaction: new SST and blob files while mounted
    held = files_holding(store, SECRET)
    assert held, "the canary is in no store file: the check below would prove nothing"
    names = {os.path.basename(p) for p in store_paths(store)}
    assert {"daemon.pid", "daemon.log", "cowfs-store.json"} <= names, names
    sock = admin.socket_path(str(store))  # outside the store when its path is too long for AF_UNIX
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and not os.stat(sock).st_mode & 0o077
    assert not os.stat(os.path.dirname(sock)).st_mode & 0o077 or os.path.dirname(sock) == str(store)
    assert any(n.endswith(".sst") for n in names) and any(n.endswith(".pack") for n in names), names
    assert_private(store, nobody)
    m.stop()
    assert_private(store, nobody)


@pytest.mark.timeout(180)
def test_an_old_loose_store_is_tightened_when_opened(mount_factory, test_dir, nobody):
    store = test_dir / "old"
    run_cowfs("init", store)
    m = mount_factory(store=store)
    (m.path / "f").write_bytes(os.urandom(30000) + SECRET)
    m.stop()

    def loosen() -> None:  # as a store made before stores were private looked
        for p in store_paths(store):
            os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    loosen()
    assert loose(store) and nobody.call("os.listdir", str(store))[0] == "ok"
    m.start()
    assert_private(store, nobody)
    assert "took group and other permissions off" in (store / "daemon.log").read_text()
    m.stop()
    loosen()
    run_cowfs("fsck", store)  # an offline open tightens it too
    assert_private(store, nobody)


@pytest.mark.timeout(180)
def test_what_other_users_may_do_still_works(mount_factory, test_dir):
    """The unprivileged uid, through an allow_other mount of root's private store: stats,
    status and control-file commands as before."""
    store = test_dir / "store"
    run_cowfs("init", store)
    m = mount_factory(store=store, options=["allow_other"])
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)  # the sandbox user owns its mount root
    nobody = (UNPRIV_UID, UNPRIV_GID)
    st = json.loads(run_cowfs_as(*nobody, "stats", m.path, "--json").stdout)
    assert st["branch"] == "main" and st["usage_inodes"] >= 1, st
    run_cowfs_as(*nobody, "snapshot", m.path, "by-nobody")
    listing = json.loads(run_cowfs_as(*nobody, "list", m.path, "--json").stdout)
    assert "by-nobody" in json.dumps(listing)
    status = json.loads(run_cowfs_as(*nobody, "status", "--json").stdout)
    rec = next(r for r in status["stores"] if r["store"] == str(store))
    assert rec["alive"] and rec["mounts"][0]["branch"] == "main", rec
    r = run_cowfs_as(*nobody, "stats", store, check=False)  # the store, not the mount
    assert r.returncode != 0 and b"private to its owner" in r.stderr, r
    r = run_cowfs_as(*nobody, "umount", m.path, check=False)
    assert r.returncode != 0 and b"was mounted by root (uid 0): only that user or root may unmount it" in r.stderr, r
    assert mounting.is_mounted(m.path)


@pytest.mark.timeout(180)
def test_stats_in_the_mount_tell_nothing_of_the_host(mount_factory, test_dir, nobody):
    """`.cowfs/stats` is world-readable inside a sandbox: no host path, no daemon pid, no
    other sandbox's branch.  `cowfs stats` from outside (the admin socket) keeps them."""
    m = mount_factory(options=["allow_other"])
    other = "other-sandbox-b7"
    run_cowfs("branch", m.path, other)
    fork = test_dir / "fork"
    fork.mkdir()
    run_cowfs("mount", m.store, fork, "--branch", other)
    try:
        host = [str(m.store), str(m.path), str(fork), str(test_dir)]
        for mp, mine, theirs in ((m.path, "main", other), (fork, other, "main")):
            text = nobody.ok("read_file", str(mp / ".cowfs/stats")).decode()
            st = json.loads(text)
            assert st["branch"] == mine and st["ok"], st
            leaked = {"store", "mountpoint", "daemon_pid", "mounted_branches"} & set(st)
            assert not leaked, f"{mp}/.cowfs/stats shows {leaked}"
            assert not [h for h in host if h in text], f"a host path in {mp}/.cowfs/stats: {text[:400]}"
            assert f'"{theirs}"' not in text, f"{mp}/.cowfs/stats names the branch {theirs!r}"
        outside = json.loads(run_cowfs("stats", m.path, "--json").stdout)
        assert outside["store"] == str(m.store) and outside["mountpoint"] == str(m.path)
        assert outside["daemon_pid"] == m.pid and outside["mounted_branches"] == sorted(["main", other])
    finally:
        run_cowfs("umount", fork, check=False)
        if mounting.is_mounted(fork):
            mounting.lazy_unmount(fork)
