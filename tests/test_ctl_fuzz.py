"""Bad input on .cowfs/ctl: every input gets a clean errno and one JSON reply, the daemon never
dies, and its memory does not grow with the number of commands.

Hypothesis writes random bytes, huge lines, unicode, NUL, path traversal and colliding names;
then many processes race commands at once.  After each phase: the daemon's pid is alive, the
mount still works, and (at the end) fsck is clean.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shlex
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mounting

# Every errno a command may fail with (a reply with another one is a bug).
CLEAN_ERRNOS = {"EINVAL", "ENOENT", "EEXIST", "EPERM", "EACCES", "EROFS", "EBUSY", "ENOTDIR",
                "EISDIR", "ENAMETOOLONG", "ENOTEMPTY", "EDQUOT", "ENOSPC", "EXDEV"}
WORDS = ["snapshot", "branch", "rollback", "clone", "delete", "list", "diff", "", "..", "../..",
         "/etc/passwd", "/", ".", ".cowfs", ".cowfs/snapshots", ".cowfs/snapshots/s0/x", "s0", "s1",
         "main", "a/../..", "x" * 200, "é", "日本", "\udcff", "'", '"', "\\", "-", "--", "*", "$HOME",
         "f", "d/f", "d", "missing/x", "f\tg", "#", ";", "|", "s0 s1"]


def vmrss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send(mp, data: bytes) -> tuple[int, bytes]:
    """One session: write data (all of it, in one write), read the whole reply."""
    return mounting.ctl_exchange(mp, data)


def check_reply(data: bytes, err: int, out: bytes) -> None:
    if not data:  # write(2) of nothing sends no request
        assert err == 0 and out == b"", f"empty write: got {err} {out[:200]!r}"
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1, f"{data[:100]!r}: reply not one line: {out[:300]!r}"
    reply = json.loads(out)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert err == 0, f"{data[:100]!r}: ok reply but write failed with {errno.errorcode.get(err)}"
    else:
        assert reply.get("errno") in CLEAN_ERRNOS, f"{data[:100]!r}: unexpected errno in {reply}"
        assert errno.errorcode.get(err) == reply["errno"], f"{data[:100]!r}: write errno {err} vs {reply}"
        assert reply.get("error"), reply
    if not data.endswith(b"\n"):
        assert err == errno.EINVAL and "newline" in reply["error"], \
            f"{data[:100]!r}: a write without a trailing newline must fail with EINVAL: {reply}"


def alive(m) -> None:
    assert m.alive(), f"the daemon died (exit {m.proc.poll()})\n{m.describe()}"
    os.stat(m.path)
    (m.path / "probe").write_bytes(b"still works")
    assert (m.path / "probe").read_bytes() == b"still works"


line_st = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(WORDS), max_size=5).map(lambda ws: " ".join(ws).encode("utf-8", "surrogateescape")),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogateescape")),
    st.builds(lambda w, n: (w + " " + "a" * n).encode(), st.sampled_from(["snapshot", "clone f", "delete"]),
              st.integers(100, 9000)),
)


@pytest.mark.timeout(300)
def test_fuzz_ctl_inputs(cowfs_mount):
    m = cowfs_mount
    os.mkdir(m.path / "d")
    (m.path / "f").write_bytes(b"file")
    (m.path / "d" / "f").write_bytes(b"file in d")
    os.symlink("/etc", m.path / "out")
    assert send(m.path, b"snapshot s0\n")[0] == 0
    pid = m.proc.pid
    counts = {"examples": 0, "lines": 0}

    @settings(max_examples=int(os.environ.get("COWFS_FUZZ_EXAMPLES", "1000")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(lines=st.lists(line_st, min_size=1, max_size=3), newline=st.booleans())
    def one(lines, newline):
        counts["examples"] += 1
        for line in lines:
            counts["lines"] += 1
            data = line + (b"\n" if newline else b"")
            err, out = send(m.path, data)
            check_reply(data, err, out)
        assert m.alive(), f"the daemon died after {lines!r}\n{m.describe()}"

    one()
    print(f"fuzzed {counts['examples']} examples, {counts['lines']} command lines")
    assert counts["examples"] >= 100, counts
    alive(m)
    # Nothing escaped the mount: path traversal cannot have created files outside.
    assert not os.path.exists("/etc/cowfs-fuzz") and sorted(os.listdir(m.path / "d"))[:1] == ["f"]
    assert m.proc.pid == pid


@pytest.mark.timeout(300)
def test_huge_writes_and_partial_lines(cowfs_mount):
    m = cowfs_mount
    for size in (4097, 65536, 1 << 20, 8 << 20):
        err, out = send(m.path, b"s" * size)  # no newline, longer than a line may be
        assert err == errno.EINVAL, (size, err, out[:200])
        assert json.loads(out)["errno"] == "EINVAL"
    # Every write must end with a newline: a line in pieces is refused piece by piece and
    # never runs; a whole line on the same handle afterwards does.
    fd = os.open(m.path / ".cowfs" / "ctl", os.O_RDWR)
    try:
        for piece in (b"snapshot sp", b"lit"):
            with pytest.raises(OSError) as exc:
                os.write(fd, piece)
            assert exc.value.errno == errno.EINVAL
            assert "newline" in json.loads(os.read(fd, 65536))["error"]
        os.write(fd, b"snapshot whole\n")
        assert json.loads(os.read(fd, 65536))["ok"]
    finally:
        os.close(fd)
    assert sorted(os.listdir(m.path / ".cowfs/snapshots")) == ["whole"]
    alive(m)


@pytest.mark.timeout(120)
def test_write_without_newline_fails_and_runs_nothing(cowfs_mount):
    """`printf 'snapshot nonl' > .cowfs/ctl` used to exit 0 with no snapshot (the fragment was
    kept and dropped at close); now the write fails with EINVAL and none of its lines runs."""
    m = cowfs_mount
    ctl = shlex.quote(str(m.path / ".cowfs" / "ctl"))

    def sh(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)

    r = sh(f"printf 'snapshot nonl' > {ctl}")
    assert r.returncode != 0 and "Invalid argument" in r.stderr, (r.returncode, r.stderr)
    err, out = send(m.path, b"snapshot first\nsnapshot second")  # one write: whole lines, then a fragment
    assert err == errno.EINVAL and "newline" in json.loads(out)["error"], (err, out)
    assert os.listdir(m.path / ".cowfs/snapshots") == [], "a refused write ran some of its lines"
    r = sh(f"printf 'snapshot nl\\n' > {ctl}")
    assert r.returncode == 0, r.stderr
    err, out = send(m.path, b"snapshot one\nsnapshot two\nbranch three\n")  # one write, three lines
    assert err == 0 and json.loads(out)["ok"] and json.loads(out)["branch"] == "three", (err, out)
    assert sorted(os.listdir(m.path / ".cowfs/snapshots")) == ["nl", "one", "two"]
    listing = json.loads(send(m.path, b"list\n")[1])
    assert "three" in [b["name"] for b in listing["branches"]], listing
    alive(m)


def _racer(mp: str, k: int, rounds: int, q) -> None:
    bad = []
    for i in range(rounds):
        for line in (f"snapshot race{i % 7}", f"clone f c{i % 5}", f"delete race{(i + k) % 7}",
                     f"branch b{i % 3}", f"delete b{(i + 1) % 3}", "list", f"diff race{i % 7}",
                     f"rollback race{(i * k) % 7}", f"clone ../x y{k}", "bogus"):
            data = (line + "\n").encode()
            try:
                err, out = send(mp, data)
                check_reply(data, err, out)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                bad.append(f"{line}: {type(e).__name__}: {e}")
    q.put(bad)


@pytest.mark.timeout(300)
def test_commands_racing_from_many_processes(cowfs_mount):
    m = cowfs_mount
    (m.path / "f").write_bytes(b"x" * 100_000)
    pid = m.proc.pid
    q = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_racer, args=(str(m.path), k, 15, q))
             for k in range(8)]
    for p in procs:
        p.start()
    bad = []
    for _ in procs:
        bad += q.get(timeout=240)
    for p in procs:
        p.join(timeout=30)
    assert not bad, "\n".join(bad[:20])
    assert m.proc.pid == pid
    alive(m)
    m.stop()
    r = mounting.run_cowfs("fsck", m.store, "--json", check=False, timeout=120)
    assert r.returncode == 0, f"fsck after racing commands: {r.stdout[-3000:]!r}"
    m.start()


@pytest.mark.timeout(300)
def test_memory_does_not_grow_with_commands(cowfs_mount):
    m = cowfs_mount
    (m.path / "f").write_bytes(b"x" * 10_000)
    assert send(m.path, b"snapshot base\n")[0] == 0
    batch = [b"bogus command\n", b"clone ../../etc/passwd x\n", b"snapshot ..\n", b"list\n",
             b"diff base\n", b"rollback nosuch\n", b"\xff\xfe\x00\n", b"x" * 5000,
             b"clone f g\n", b"delete nosuch\n"]

    def run(n):
        for _ in range(n):
            for data in batch:
                send(m.path, data)
            # keep the tree the same: remove the clone
            try:
                os.unlink(m.path / "g")
            except FileNotFoundError:
                pass

    run(100)  # warm up caches and allocator pools
    before = vmrss(m.proc.pid)
    run(400)
    after = vmrss(m.proc.pid)
    print(f"daemon VmRSS {before >> 10} KiB -> {after >> 10} KiB after 4000 more commands")
    assert after - before < 16 << 20, f"VmRSS grew by {(after - before) >> 20} MiB over 4000 commands"
    alive(m)


@pytest.mark.timeout(120)
def test_long_store_path_mounts_or_fails_cleanly(tmp_path):
    """Bad input on the command line: a long but valid store path."""
    import subprocess
    import tempfile

    base = tempfile.mkdtemp(prefix="cowfs-long-", dir="/tmp")
    store = os.path.join(base, "s" * (118 - len(base)), "store")  # daemon.sock path: ~130 bytes
    mp = os.path.join(base, "mnt")
    os.makedirs(mp)
    try:
        mounting.init_store(store)
        r = mounting.run_cowfs("mount", store, mp, check=False, timeout=60)
        err = r.stderr.decode(errors="replace").strip()
        mounted = mounting.is_mounted(mp)
        if r.returncode == 0:
            assert mounted
            mounting.run_cowfs("umount", mp, timeout=60)
            return
        assert not mounted, f"`cowfs mount` failed ({err}) but left a mount at {mp}"
        assert len(err.splitlines()) == 1 and "Trio" not in err and "nursery" not in err, err
    finally:
        if mounting.is_mounted(mp):
            subprocess.run(["fusermount3", "-uz", mp])
        subprocess.run(["rm", "-rf", base])
