"""An error in background work never takes the mount down (cowfs/background/supervise.py).

Each background task meets an injected EIO (the COWFS_FAULTS test hook, cowfs/faults.py)
on a real mount: the mount keeps serving reads and writes, the stats count the failure for
that task, and the task runs again (flusher, gc, dedup worker, sharer, model saver) or, for
speculative work (prefetch, warming), stops while everything else goes on.  Before the
supervisor, each of these errors ended the FUSE session: every branch unmounted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import time

import pytest

import mounting
from cowfs.daemon import admin
from mounting import run_cowfs

MiB = 1 << 20


def admin_stats(m) -> dict:
    return json.loads(run_cowfs("stats", m.path, "--json").stdout)


def wait_for(what: str, fn, timeout: float = 30.0, m=None):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s" + (f"\n{m.describe()}" if m else ""))
        time.sleep(0.2)


def task(m, name: str) -> dict:
    return admin_stats(m)["background"][name]


def restarted(m, name: str):
    t = task(m, name)
    return t if t["failures"] >= 1 and t["restarts"] >= 1 and t["running"] else None


def still_serving(m, tag: str) -> None:
    """A write, a rename, a read and a listing through the mount."""
    data = os.urandom(200_000) + tag.encode()
    p = m.path / f"alive-{tag}"
    p.with_suffix(".tmp").write_bytes(data)
    os.rename(p.with_suffix(".tmp"), p)
    assert p.read_bytes() == data and p.name in os.listdir(m.path)


def write_open(path, data: bytes):
    """Write data and return the still-open descriptor: its commit is the flusher's to do."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    return fd


@pytest.mark.timeout(240)
def test_failing_background_tasks_restart_and_the_mount_serves_on(mount_factory):
    faults = "pack_put:eio:1,gc:eio:1,dedup_plan:eio:1,share_walk:eio:1,model_save:eio:1"
    m = mount_factory(env={"COWFS_FAULTS": faults})
    # flusher: a pack append fails in its encoding thread (an OSError, not an FSError)
    big = os.urandom(16 * MiB)
    fd = write_open(m.path / "big", big)
    try:
        t = wait_for("the flusher's failure and restart", lambda: restarted(m, "flusher"), m=m)
        assert "injected fault at pack_put" in task(m, "flusher")["last_error"]
        wait_for("the restarted flusher's commit", lambda: admin_stats(m)["dirty_bytes"] == 0, m=m)
    finally:
        os.close(fd)
    assert t["failures"] == 1, t
    still_serving(m, "flusher")

    # gc: a pass fails; the restarted loop runs the pass still owed
    run_cowfs("snapshot", m.path, "s1")
    run_cowfs("delete", m.path, "s1")
    wait_for("gc's failure and restart", lambda: restarted(m, "gc"), m=m)
    wait_for("the owed gc pass", lambda: "garbage collection removed" in m.log_text(), m=m)
    still_serving(m, "gc")

    # dedup worker and sharer: their threads fail; once restarted they do their work.
    src = m.path / "tree"
    src.mkdir()
    for i in range(80):
        (src / f"f{i}").write_bytes(os.urandom(5000) + b"%d" % i)
    shutil.copytree(src, m.path / "copy", copy_function=shutil.copy2)
    wait_for("the dedup worker's failure and restart", lambda: restarted(m, "dedup"), timeout=60, m=m)
    wait_for("the sharer's failure and restart", lambda: restarted(m, "sharer"), timeout=60, m=m)
    wait_for("a copy shared by the restarted sharer",
             lambda: admin_stats(m)["shared"]["copies_shared"] >= 1, timeout=60, m=m)
    reply = json.loads(run_cowfs("dedup", m.path, "--wait", "--json", timeout=120).stdout)
    assert reply["ok"] and reply["background_queue"] == 0, reply
    still_serving(m, "dedup")

    # model saver: its loop fails; it runs again
    wait_for("the model saver's failure and restart", lambda: restarted(m, "model_saver"), timeout=40, m=m)

    st = admin_stats(m)["background"]
    assert {n: t["failures"] for n, t in st.items() if t["failures"]} == {
        "flusher": 1, "gc": 1, "dedup": 1, "sharer": 1, "model_saver": 1}, st
    sandbox = json.loads((m.path / ".cowfs/stats").read_bytes())["background"]
    assert sandbox["flusher"]["failures"] == 1 and "last_error" not in sandbox["flusher"]
    log = m.log_text()
    assert log.count("Traceback") >= 5 and "background task dedup failed" in log
    m.remount()  # a clean unmount (exit 0), and everything acknowledged is there
    assert hashlib.sha256((m.path / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert sorted(os.listdir(m.path / "copy")) == sorted(os.listdir(src))


@pytest.mark.timeout(240)
def test_speculative_work_stops_after_an_error(mount_factory):
    m = mount_factory(env={"COWFS_FAULTS": "prefetch_load:eio:1,warm_paths:eio:1"})
    # Inline chunks (a flush under 4 MiB, fsync'd): a cold sequential read of them goes
    # through readahead, i.e. the prefetch threads.
    data = os.urandom(3 * MiB)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    for i in range(12):  # a cold start to learn, for warming at the next mount
        os.mkdir(m.path / f"d{i}")
    m.remount()
    for i in range(12):
        os.listdir(m.path / f"d{i}")
    m.remount()
    os.listdir(m.path / "d0")  # the first touch: the warmer resolves its paths, and fails
    wait_for("warming stopped", lambda: task(m, "warmer")["stopped"], m=m)
    with open(m.path / "f", "rb") as f:
        got = b"".join(iter(lambda: f.read(128 << 10), b""))
    assert got == data
    st = wait_for("prefetch stopped", lambda: (s := admin_stats(m))["background"]["prefetch"]["stopped"] and s, m=m)
    assert st["background"]["prefetch"]["failures"] == 1 and st["background"]["prefetch"]["restarts"] == 0
    assert not st["prefetch_enabled"] and not st["warm"]["enabled"]
    assert st["background"]["warmer"]["failures"] == 1
    still_serving(m, "speculative")
    with open(m.path / "f", "rb") as f:  # reads go on without prefetch
        assert f.read() == data
    assert mounting.is_mounted(m.path)


@pytest.mark.timeout(120)
def test_admin_clients_that_go_away_do_not_end_the_mount(mount_factory):
    """A `cowfs stats` interrupted before the daemon's reply (the connection reset under it)
    used to end the daemon's session: every branch unmounted."""
    m = mount_factory()
    (m.path / "f").write_bytes(b"still here")
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(admin.socket_path(str(m.store)))
        s.sendall(b'{"cmd": "stats"}\n')
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.close()
    time.sleep(0.5)
    assert mounting.is_mounted(m.path) and m.alive()
    assert (m.path / "f").read_bytes() == b"still here"
    st = admin_stats(m)["background"]["admin"]
    assert st["running"] and st["failures"] == 0, st
