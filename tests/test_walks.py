"""Walks of whole trees (issue 20): a large diff runs in a worker thread on frozen layers while
the request loop keeps serving other branches; listings through clones of clones are one
merge, not a recursion per nesting level; long replies (`list`, `diff`) are made as they are
read and read back whole through the control file and the CLI; deep trees clone and diff."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from mounting import cowfs_command, ctl_exchange, ok, run_cowfs


def _tree(root: str, dirs: int, files: int) -> int:
    """dirs directories of files small files each under root: the number of inodes made."""
    os.makedirs(root)
    for d in range(dirs):
        sub = os.path.join(root, f"d{d}")
        os.mkdir(sub)
        for f in range(files):
            with open(os.path.join(sub, f"f{f}"), "wb") as fh:
                fh.write(b"x")
    return 1 + dirs * (1 + files)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_clones_of_clones_700_deep_list_and_diff(cowfs_mount):
    """Each clone of the previous clone adds a level a listing reads through; 700 levels
    overflowed Python's stack (a generator per level and per translation: RecursionError,
    EIO) before the listing became one merge."""
    mp = str(cowfs_mount.path)
    os.makedirs(os.path.join(mp, "c0", "sub"))
    for n in ("a", "b", "c"):
        with open(os.path.join(mp, "c0", "sub", n), "w") as f:
            f.write(n)
    ok(mp, "snapshot before")
    levels = 700
    for i in range(levels):
        if i == levels - 1:
            ok(mp, "snapshot mid")
        ok(mp, f"clone c{i} c{i + 1}")
    last = os.path.join(mp, f"c{levels}")
    assert sorted(os.listdir(last)) == ["sub"]
    assert sorted(os.listdir(os.path.join(last, "sub"))) == ["a", "b", "c"]
    with open(os.path.join(last, "sub", "b")) as f:
        assert f.read() == "b"
    # a write at the bottom level shows through nothing above it: the copies stay independent
    with open(os.path.join(mp, f"c{levels - 1}", "sub", "d"), "w") as f:
        f.write("d")
    assert sorted(os.listdir(os.path.join(last, "sub"))) == ["a", "b", "c"]
    d = ok(mp, "diff mid")  # the last clone expands through every level below it
    added = {c["path"] for c in d["changes"] if c["change"] == "added"}
    assert added == {f"c{levels}", f"c{levels}/sub", f"c{levels}/sub/a", f"c{levels}/sub/b", f"c{levels}/sub/c",
                     f"c{levels - 1}/sub/d"}, added


@pytest.mark.timeout(400)
@pytest.mark.parametrize("depth", [3000, pytest.param(10_000, marks=pytest.mark.slow, id="10000")])
def test_deep_tree_clone_diff_fsck(cowfs_mount, depth):
    """A tree depth directories deep (made with relative mkdir/chdir steps: its paths are far
    longer than PATH_MAX, its depth thrice Python's recursion limit; 3,000 in the suite,
    10,000 in the long form) clones and diffs; fsck is clean afterwards."""
    mp = str(cowfs_mount.path)
    ok(mp, "snapshot before")
    code = ("import os, sys\nos.chdir(sys.argv[1])\nos.mkdir('deep'); os.chdir('deep')\n"
            f"for i in range({depth - 1}):\n    os.mkdir('d'); os.chdir('d')\n"
            "open('leaf', 'w').write('bottom')\n")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code, mp], check=True, timeout=300)
    built = time.monotonic() - t0
    r = ok(mp, "clone deep deep2")
    assert r["cloned"] == "deep"
    # the copy reads to its bottom (relative steps again)
    code = ("import os, sys\nos.chdir(os.path.join(sys.argv[1], 'deep2'))\n"
            f"for i in range({depth - 1}):\n    os.chdir('d')\n"
            "print(open('leaf').read())\n")
    out = subprocess.run([sys.executable, "-c", code, mp], check=True, timeout=300, capture_output=True, text=True)
    assert out.stdout.strip() == "bottom"
    ok(mp, "snapshot after")
    d = ok(mp, "diff before after", timeout=300)
    added = [c for c in d["changes"] if c["change"] == "added"]
    assert len(added) == 2 * (depth + 1), (len(added), built)
    deepest = "deep2/" + "/".join(["d"] * (depth - 1)) + "/leaf"
    assert any(c["path"] == deepest and c["type"] == "file" for c in added)
    cowfs_mount.stop()
    r = run_cowfs("fsck", str(cowfs_mount.store), "--json", timeout=300, check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout[-2000:] + r.stderr[-2000:]


def _stat_latencies(path: str, stop: threading.Event, out: list[float]) -> None:
    names = sorted(os.listdir(path))
    i = 0
    while not stop.is_set():
        p = os.path.join(path, names[i % len(names)])
        t0 = time.perf_counter()
        os.stat(p)
        with open(p, "rb") as f:
            f.read(1)
        out.append(time.perf_counter() - t0)
        i += 1
        time.sleep(0.002)


@pytest.mark.timeout(400)
def test_large_diff_leaves_other_branches_served(cowfs_mount, forks):
    """While a diff of ~40,000 added paths (a tree cloned 20 times: each clone expands into its
    whole tree) is computed, stat+open in another branch of the same daemon stay fast:
    before, the diff ran on the event loop and every request waited for it (seconds)."""
    mp = str(cowfs_mount.path)
    ok(mp, "snapshot before")
    _tree(os.path.join(mp, "t0"), 40, 50)  # 2,041 inodes
    for i in range(1, 20):
        ok(mp, f"clone t0 t{i}")
    ok(mp, "branch other before")
    fork = str(forks.mount(cowfs_mount.store, "other"))
    _tree(os.path.join(fork, "w"), 1, 200)
    probe = os.path.join(fork, "w", "d0")
    stop = threading.Event()
    lat: list[float] = []
    t = threading.Thread(target=_stat_latencies, args=(probe, stop, lat))
    t.start()
    try:
        time.sleep(0.3)
        before = len(lat)
        t0 = time.monotonic()
        r = run_cowfs("diff", mp, "before", "--json", timeout=300)
        took = time.monotonic() - t0
        during = lat[before:]
    finally:
        stop.set()
        t.join(30)
    reply = json.loads(r.stdout)
    assert reply["ok"] and len(reply["changes"]) == 20 * 2041
    assert len(during) >= 20, (len(during), took)
    during.sort()
    p99 = during[min(len(during) - 1, int(len(during) * 0.99))]
    # a stall stops the sampler too, so it shows as one long sample: the longest is bounded
    assert during[-1] <= 1.0, f"a stat+open in another branch waited {during[-1]:.2f} s during a {took:.1f} s diff"
    # the goal is 50 ms; the bound here leaves room for a loaded machine (before: seconds)
    assert p99 <= 0.2, f"p99 stat+open in another branch {p99 * 1000:.1f} ms during a {took:.1f} s diff " \
                        f"(median {statistics.median(during) * 1000:.1f} ms, {len(during)} samples)"
    forks.umount(fork)


def _read_small(mp: str, line: bytes, size: int) -> tuple[bytes, int]:
    """The reply to line read size bytes at a time: (reply, reads)."""
    fd = os.open(os.path.join(mp, ".cowfs", "ctl"), os.O_RDWR)
    try:
        os.write(fd, line)
        out, reads = [], 0
        while True:
            b = os.read(fd, size)
            reads += 1
            if not b:
                return b"".join(out), reads
            out.append(b)
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_long_replies_read_whole_through_ctl_and_cli(cowfs_mount):
    """A diff reply of several MiB (made as it is read) reads back complete, byte for byte the
    same through small reads and big ones, through the CLI (--json valid, human lines, -z);
    a list of 2,500 snapshots likewise (--json valid)."""
    mp = str(cowfs_mount.path)
    ok(mp, "snapshot before")
    _tree(os.path.join(mp, "t0"), 20, 50)  # 1,021 inodes
    for i in range(1, 40):
        ok(mp, f"clone t0 {'long-name-' * 8}{i}")
    ok(mp, "snapshot after")
    _err, whole = ctl_exchange(mp, b"diff before after\n")
    small, reads = _read_small(mp, b"diff before after\n", 4096)
    assert small == whole and len(whole) > 4 << 20 and reads > 1000
    d = json.loads(whole)
    assert len(d["changes"]) == 40 * 1021 and whole.count(b"\n") == 1
    assert [c["path"] for c in d["changes"]] == sorted(c["path"] for c in d["changes"])
    r = run_cowfs("diff", mp, "before", "after", "--json", timeout=300)
    assert json.loads(r.stdout) == d
    r = run_cowfs("diff", mp, "before", "after", timeout=300)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(d["changes"]) and lines[0] == "+\t" + d["changes"][0]["path"]
    r = subprocess.run(cowfs_command() + ["diff", mp, "before", "after", "-z"],
                       capture_output=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count(b"\0") == 2 * len(d["changes"])
    for i in range(2500):
        ok(mp, f"snapshot s{i:05d}-{'x' * 60}")
    _err, whole = ctl_exchange(mp, b"list\n")
    small, _reads = _read_small(mp, b"list\n", 1000)
    listing = json.loads(whole)
    assert len(listing["snapshots"]) == 2502 and len(whole) > 300_000
    assert json.loads(small)["snapshots"] == listing["snapshots"]
    r = run_cowfs("list", mp, "--json", timeout=300)
    assert [s["name"] for s in json.loads(r.stdout)["snapshots"]] == [s["name"] for s in listing["snapshots"]]
    r = run_cowfs("list", mp, timeout=300)
    assert len(r.stdout.decode().splitlines()) == 1 + 2502 + 1
    # a refusal still prints one error, and --json its reply
    r = run_cowfs("diff", mp, "nosuch", "--json", timeout=60, check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["errno"] == "ENOENT"
