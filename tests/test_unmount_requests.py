"""Requests still outstanding when a mount goes (docs/reliability.md, 'Unmount and the
requests still outstanding').

close(2) returns before the kernel sends the file's RELEASE (in the background), and an
unmount ends the FUSE connection without waiting for the requests it sent: one the daemon is
still serving has its reply refused with ENOENT, one still queued never arrives.  Any FUSE
daemon sees this; cowfs serves the first to the end and logs the refused reply at INFO
(cowfs.fuse.replies), and loses nothing to the second.  A reply refused while the
connection is up is a real bug (a request answered twice) and stays an ERROR.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mounting

MiB = 1 << 20
HOLD_S = 6  # how long the test hook holds the commit of the file being released


def wait_for(what: str, fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s")
        time.sleep(0.05)
    return got


def held_since(m: mounting.Mount) -> float:
    """When the test hook began holding the commit (the daemon log's timestamp)."""
    line = next(ln for ln in m.log_text().splitlines() if "injected fault at flush_encode" in ln)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fsck_clean(store) -> None:
    r = mounting.run_cowfs("fsck", store, "--json", check=False, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["clean"], f"fsck: {report['problems'][:20]}"


@pytest.mark.timeout(240)
def test_releases_outstanding_at_unmount(mount_factory):
    # 1. A RELEASE still being served when the mount goes: its commit (held in its encoding
    # thread by the test hook) finishes, the kernel refuses the reply.  Before
    # cowfs.fuse.replies: 'ERROR pyfuse3: fuse_release(): fuse_reply_* failed with No such
    # file or directory', the soak test's failure.
    m = mount_factory(env={"COWFS_FAULTS": f"flush_encode:sleep{HOLD_S}:1"})
    with open(m.path / "warm", "wb"):  # the first close's FLUSH is declined: later closes send none
        pass
    data = os.urandom(2 * MiB)  # above THREAD_FLUSH_BYTES: encoded in a thread, where the hook holds it
    with open(m.path / "slow", "wb") as f:
        f.write(data)
    # close(2) has returned and queued the RELEASE.  The kernel hands requests out in the
    # order they were queued, so once a request sent now is answered, the daemon has taken
    # the RELEASE, which waits for the commit of the file's data, held by the hook.  (Not
    # `cowfs stats`: it waits for the commit too.)
    try:
        os.getxattr(m.path / "warm", "user.absent")
    except OSError:
        pass
    wait_for("the commit held", lambda: "injected fault at flush_encode" in m.log_text())
    assert time.time() - held_since(m) < HOLD_S - 1, "the machine is too slow for this test's hold"
    assert m.stop() == 0
    log = m.log_text()
    assert " ERROR " not in log, m.describe()
    assert ("INFO cowfs.fuse.replies: fuse_release(): reply not delivered: the kernel had ended the FUSE "
            "connection (unmount or abort)") in log, m.describe()

    # 2. RELEASEs the kernel never delivers: the daemon is stopped when the files are closed,
    # and the unmount drops their queued RELEASEs.  Nothing is lost: what was written is
    # committed at the unmount, and the file unlinked while open (an orphan until its
    # RELEASE, which never comes) is removed when the branch is next attached.
    m.env = {}
    m.options = ["warm=0"]  # no cold-start helper holding the mount when it is unmounted
    m.start()
    assert (m.path / "slow").read_bytes() == data  # the refused reply's commit stands
    kept = os.urandom(MiB)
    g, h = open(m.path / "orphan", "wb"), open(m.path / "kept", "wb")
    g.write(os.urandom(3 * MiB))
    h.write(kept)
    for f in (g, h):
        f.flush()
        os.fsync(f.fileno())  # nothing dirty is left for close(2) to write back
    os.unlink(m.path / "orphan")
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        g.close()  # two RELEASEs queued for a daemon that cannot read them
        h.close()
        libc = ctypes.CDLL(None, use_errno=True)
        # umount2 itself, not fusermount3 (which may look at the mount point): no request
        # reaches a daemon for the unmount of a non-block FUSE mount.
        assert libc.umount2(os.fsencode(m.path), 0) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    assert m.proc.wait(timeout=60) == 0, m.describe()
    assert "fuse_replies" not in m.log_text().rsplit("===== start", 1)[1]  # neither RELEASE arrived
    fsck_clean(m.store)
    m.start()
    assert sorted(os.listdir(m.path)) == ["kept", "slow", "warm"]
    assert (m.path / "kept").read_bytes() == kept
    assert "removing 1 inodes left open-but-unlinked by the previous daemon" in m.log_text().rsplit("===== start", 1)[1]
    assert m.stop() == 0
    assert " ERROR " not in m.log_text(), m.describe()
    fsck_clean(m.store)


# Run in a mount namespace of its own: the connection is never answered (no INIT reply),
# and a stat of its mount point by anyone else would wait for it.
_KERNEL_CHECK = textwrap.dedent("""
    import ctypes, errno, json, logging, os, struct, sys, tempfile
    from cowfs.fuse import replies as fuse_replies

    records = []
    class Keep(logging.Handler):
        def emit(self, r):
            records.append([r.name, r.levelname, r.getMessage()])
    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    pyfuse3_log = logging.getLogger("pyfuse3")

    def as_pyfuse3_logs(err):  # pyfuse3's handlers.pxi, after a failed fuse_reply_err
        pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", os.strerror(err))

    def reply(fd):  # a reply to a request the kernel never sent (its id is unknown)
        try:
            os.write(fd, struct.pack("<IiQ", 16, 0, 1 << 40))
        except OSError as e:
            return e.errno
        return 0

    libc = ctypes.CDLL(None, use_errno=True)
    target = tempfile.mkdtemp()
    before = fuse_replies.fuse_fds()
    fd = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"cowfs-test", target.encode(), b"fuse.cowfs-test", 6, opts) != 0:  # MS_NOSUID|MS_NODEV
        sys.exit("mount: " + os.strerror(ctypes.get_errno()))
    fuse_replies.install(before)
    out = {"found_fd": fuse_replies._fd == fd, "live_write": reply(fd),
           "live_ended": fuse_replies.connection_ended()}
    as_pyfuse3_logs(errno.ENOENT)
    out["live_records"] = records[:]
    records.clear()
    # The unmount of an unused mount ends the connection at once (fuse_conn_destroy).
    if libc.umount2(target.encode(), 2) != 0:  # MNT_DETACH
        sys.exit("umount2: " + os.strerror(ctypes.get_errno()))
    try:
        os.read(fd, 1 << 17)
        out["read_after"] = 0
    except OSError as e:
        out["read_after"] = e.errno
    out["ended_write"] = reply(fd)
    out["ended"] = fuse_replies.connection_ended()
    as_pyfuse3_logs(errno.ENOENT)
    as_pyfuse3_logs(errno.EINVAL)  # any other error passes as pyfuse3 logged it
    out["ended_records"] = records[:]
    print(json.dumps(out))
""")


@pytest.mark.timeout(60)
def test_a_refused_reply_is_an_error_while_the_connection_is_up(tmp_path):
    """What cowfs.fuse.replies tells apart, on a real FUSE connection: the kernel refuses a
    reply with ENOENT both while the connection is up (an unknown request: a bug, ERROR) and
    after it ended (the unmount dropped the request: INFO)."""
    script = tmp_path / "check.py"
    script.write_text(_KERNEL_CHECK)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=30, cwd=str(mounting.REPO))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["found_fd"]
    assert out["live_write"] == out["ended_write"] == 2  # ENOENT both times
    assert out["read_after"] == 19  # ENODEV: the unmount ended the connection
    assert out["live_ended"] is False and out["ended"] is True
    [(name, level, msg)] = out["live_records"]
    assert (name, level) == ("cowfs.fuse.replies", "ERROR"), out
    assert "while the FUSE connection is up" in msg and "answered twice" in msg, msg
    [(name, level, msg), other] = out["ended_records"]
    assert (name, level) == ("cowfs.fuse.replies", "INFO"), out
    assert msg.startswith("fuse_release(): reply not delivered: the kernel had ended the FUSE connection"), msg
    assert other == ["pyfuse3", "ERROR", "fuse_release(): fuse_reply_* failed with Invalid argument"]
