"""cowfs status / log / run / import / export (cowfs/cli/status.py, history.py, run.py, transfer.py),
on real mounts."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import mounting
from cowfs.cli.history import build_history, render_graph

COWFS = mounting.cowfs_command()


def cowfs(*args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(COWFS + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"cowfs {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def _mounts_of(store: Path) -> list[str]:
    return [e["mountpoint"] for e in mounting.mount_entries() if e["source"] == f"cowfs:{store}"]


def _wait_no_daemon(store: Path, timeout: float = 15) -> None:
    pid_file = store / "daemon.pid"
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            return
        assert mounting.wait_pid_gone(pid, timeout), f"daemon {pid} of {store} still running"


@pytest.fixture
def stores(tmp_path):
    """Stores made by the test; every mount of them is gone at teardown (lazily if need be)."""
    made: list[Path] = []

    def make(name="store") -> Path:
        s = tmp_path / name
        cowfs("init", s)
        made.append(s)
        return s
    yield make
    leftovers = []
    for s in made:
        for mp in sorted(_mounts_of(s), key=len, reverse=True):
            leftovers.append(mp)
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
        _wait_no_daemon(s)
    assert not leftovers, f"mounts left behind: {leftovers}"


# -- status ---------------------------------------------------------------------------------------
def test_status_lists_stores_branches_daemons_and_figures(stores, tmp_path):
    store = stores()
    main_mp, side_mp = tmp_path / "main", tmp_path / "side"
    main_mp.mkdir()
    side_mp.mkdir()
    cowfs("mount", store, main_mp, "-o", "allow_other,quota_inodes=500")
    try:
        (main_mp / "f").write_bytes(b"x" * 100_000)
        cowfs("branch", main_mp, "side")
        cowfs("mount", store, side_mp, "--branch", "side")
        data = json.loads(cowfs("status", store, "--json").stdout)
        (rec,) = data["stores"]
        assert rec["store"] == str(store)
        assert [r["store"] for r in json.loads(cowfs("status", side_mp, "--json").stdout)["stores"]] == [str(store)]
        pid = int((store / "daemon.pid").read_text())
        assert rec["daemon_pid"] == pid and rec["alive"]
        by_mp = {m["mountpoint"]: m for m in rec["mounts"]}
        assert by_mp[str(main_mp)]["branch"] == "main" and not by_mp[str(main_mp)]["bind"]
        assert "allow_other" in by_mp[str(main_mp)]["options"]
        assert by_mp[str(side_mp)]["branch"] == "side" and by_mp[str(side_mp)]["bind"]
        st = rec["stats"]
        assert st["daemon_pid"] == pid and st["quota_inodes"] == 500
        for level in ("l1", "l2"):
            assert {"bytes", "max_bytes", "hits", "misses", "evictions", "hit_rate"} <= set(st["cache"][level])
        assert {"readahead", "learned", "recall"} <= set(st["cache"]["prefetch"])
        assert "dirty_bytes" in st and "commits" in st

        text = cowfs("status", store).stdout
        block = text.split(str(store), 1)[1].split("\n\n", 1)[0]
        assert f"daemon pid {pid}" in block
        assert re.search(rf"{re.escape(str(main_mp))}\s+main\b", block)
        assert re.search(rf"{re.escape(str(side_mp))}\s+side\s+\(bind", block)
        assert "cache" in block and "queues" in block and "dirty" in block
    finally:
        for mp in (side_mp, main_mp):
            if mounting.is_mounted(mp):
                cowfs("umount", mp)


def test_status_reports_a_dead_daemon(stores, tmp_path):
    store = stores()
    mp = tmp_path / "mnt"
    m = mounting.Mount(store, mp, tmp_path / "daemon.log").start()
    try:
        m.proc.kill()
        m.proc.wait(timeout=10)
        (rec,) = json.loads(cowfs("status", store, "--json").stdout)["stores"]
        assert not rec["alive"] and rec["daemon_pid"] is None
        assert "stale" in rec["mounts"][0]["error"]
        assert "no daemon" in cowfs("status", mp).stdout
    finally:
        m.force_cleanup()


def test_status_without_mounts(tmp_path):
    assert json.loads(cowfs("status", tmp_path, "--json").stdout) == {"stores": []}
    assert cowfs("status", tmp_path).stdout == "no cowfs mounts\n"
    assert isinstance(json.loads(cowfs("status", "--json", timeout=60).stdout)["stores"], list)


# -- log ------------------------------------------------------------------------------------------
def _listing(snaps, branches):
    """A `list --json` reply from compact tuples: (name, parent, created[, mounted_here])."""
    return {"snapshots": [{"name": n, "kind": "snapshot", "parent": p, "created": t, "logical_bytes": 1, "inodes": 1}
                          for n, p, t in snaps],
            "branches": [{"name": b[0], "kind": "branch", "parent": b[1], "created": b[2], "logical_bytes": 1,
                          "inodes": 1, "mounted_here": len(b) > 3 and b[3]} for b in branches]}


def _check_graph(rows):
    """Every graph cell is one of the graph's characters."""
    for g, _ in rows:
        assert re.fullmatch(r"[|/ *@o.]*", g), g


def test_log_graph_shapes():
    L = _listing(snaps=[("s1", "main", 1), ("s2", "main", 3), ("gone-branch-snap", "old", 2)],
                 branches=[("main", None, 0, True), ("a", "s1", 2), ("b", "main", 4), ("c", "s1", 5),
                           ("d", "vanished", 6)])
    order = build_history(L)
    ids = [n.id for n in order]
    # children before parents, and every node once
    assert len(ids) == len(set(ids))
    pos = {nid: i for i, nid in enumerate(ids)}
    for n in order:
        if n.parent is not None:
            assert pos[n.id] < pos[n.parent], (n.id, n.parent)
    nodes = {n.id: n for n in order}
    assert nodes["b:a"].parent == "s:s1" and nodes["b:c"].parent == "s:s1"
    # main's line in time order: s1 (1), s2 (3), the point b was made from it (4), its head
    assert nodes["s:s2"].parent == "s:s1"
    assert nodes["b:b"].parent == "f:b" and nodes["f:b"].parent == "s:s2" and nodes["f:b"].line == "main"
    assert nodes["b:main"].parent == "f:b"
    assert nodes["b:d"].parent is None and "vanished" in nodes["b:d"].note
    assert nodes["s:gone-branch-snap"].parent is None
    rows = render_graph(order, lambda n: "*")
    _check_graph(rows)
    assert [n.id for _, n in rows if n is not None] == ids
    assert render_graph([], lambda n: "*") == []


def _build_dozen(mp: Path) -> None:
    """A dozen snapshots and branches: forks from snapshots, a branch from the live branch,
    a rollback and a deletion."""
    steps = [("snapshot", "init"), ("snapshot", "deps"), ("branch", "try-a", "deps"), ("branch", "try-b", "deps"),
             ("snapshot", "green"), ("branch", "refactor"), ("snapshot", "pre-upgrade"),
             ("branch", "up-1", "pre-upgrade"), ("branch", "up-2", "pre-upgrade"), ("branch", "up-3", "pre-upgrade"),
             ("snapshot", "release"), ("rollback", "green"), ("snapshot", "hotfix"), ("delete", "up-2")]
    import cowfs as api      # through the control file, as the CLI does, without a process per step

    m = api.open_mount(mp)
    for i, (verb, *args) in enumerate(steps):
        (mp / "f").write_text(f"step {i}\n")
        getattr(m, verb)(*args)


def test_log_draws_a_dozen_snapshots_and_branches(stores, tmp_path):
    store = stores()
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        _build_dozen(mp)
        data = json.loads(cowfs("log", mp, "--json").stdout)
        nodes = {n["id"]: n for n in data["nodes"]}
        names = sorted(n["name"] for n in data["nodes"] if n["kind"] != "fork")
        assert names == sorted(["init", "deps", "try-a", "try-b", "green", "refactor", "pre-upgrade", "up-1",
                                "up-3", "release", "hotfix", "main"])
        assert nodes["b:try-a"]["parent"] == "s:deps" and nodes["b:up-3"]["parent"] == "s:pre-upgrade"
        assert nodes["b:refactor"]["parent"] == "f:refactor" and nodes["f:refactor"]["branch"] == "main"
        assert nodes["b:main"]["mounted_here"] is True and nodes["s:deps"]["parent"] == "s:init"

        out = cowfs("log", mp).stdout
        lines = out.splitlines()
        # one line per snapshot/branch (+ the fork point and graph joins), nothing wider than a terminal
        for name in names:
            assert sum(1 for ln in lines if re.search(rf"\s{re.escape(name)}\s", ln)) >= 1, name
        assert all(len(ln) <= 110 for ln in lines), out
        assert lines[0].startswith("@") and "mounted here" in lines[0]
        assert len(lines) <= 2 * len(names) + 2, out
        graph = [re.match(r"[|/ *@o.]*", ln).group(0) for ln in lines]
        assert max(len(g.rstrip()) for g in graph) <= 9, out      # at most 5 columns side by side
        # newest first: hotfix above release above pre-upgrade above green above deps above init
        order = [next(i for i, ln in enumerate(lines) if re.search(rf"\s{n}\s", ln))
                 for n in ("hotfix", "release", "pre-upgrade", "green", "deps", "init")]
        assert order == sorted(order), out
        print(out)
    finally:
        cowfs("umount", mp)


def test_log_errors(tmp_path):
    r = cowfs("log", tmp_path, check=False)
    assert r.returncode == 1 and "is not inside a cowfs mount" in r.stderr


# -- run ------------------------------------------------------------------------------------------
def test_run_mounts_runs_and_unmounts(stores):
    store = stores()
    r = cowfs("run", store, "--", "sh", "-c", 'pwd; echo "$COWFS_BRANCH" > who; echo out; echo err >&2; exit 3',
              check=False)
    assert r.returncode == 3, r.stderr
    cwd = r.stdout.splitlines()[0]
    assert r.stdout.splitlines()[1:] == ["out"] and r.stderr == "err\n"
    assert not _mounts_of(store) and not os.path.exists(cwd)       # unmounted, temp dir removed
    _wait_no_daemon(store)

    # again, with a snapshot first; the file written before is there
    r = cowfs("run", store, "--snapshot-before", "before", "--", "sh", "-c", "cat who; echo changed > who")
    assert r.stdout == "main\n"
    r = cowfs("run", store, "--", "sh", "-c", "cat who .cowfs/snapshots/before/who")
    assert r.stdout == "changed\nmain\n"
    # the exit status of a signal, a missing command, a bad branch
    assert cowfs("run", store, "--", "sh", "-c", "kill -TERM $$", check=False).returncode == 128 + signal.SIGTERM
    r = cowfs("run", store, "--", "no-such-command-xyz", check=False)
    assert r.returncode == 127 and "not found" in r.stderr
    r = cowfs("run", store, "--branch", "nope", "--", "true", check=False)
    assert r.returncode == 1 and "nope" in r.stderr
    r = cowfs("run", store, "--snapshot-before", "before", "--", "true", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert not _mounts_of(store)


def test_run_uses_an_existing_mount_and_leaves_it(stores, tmp_path):
    store = stores()
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        cowfs("branch", mp, "side")
        r = cowfs("run", store, "--", "pwd")
        assert r.stdout.strip() == str(mp)
        assert mounting.is_mounted(mp)
        # another branch of the served store: a temporary bind mount by the same daemon
        pid = int((store / "daemon.pid").read_text())
        r = cowfs("run", store, "--branch", "side", "--", "sh", "-c", "pwd; echo side > s")
        assert r.stdout.strip() != str(mp) and int((store / "daemon.pid").read_text()) == pid
        assert _mounts_of(store) == [str(mp)]
        assert not (mp / "s").exists()
    finally:
        cowfs("umount", mp)


def test_run_places_the_command_on_the_daemons_cpus(stores, tmp_path):
    """-o cpus=LIST pins the daemon; `cowfs run` runs the command on the same CPUs, whether
    it mounts the branch itself or finds it mounted; an unpinned daemon leaves the command
    where it may run."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to tell placements apart")
    store = stores()
    cpu = max(os.sched_getaffinity(0))
    show = ["python3", "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    r = cowfs("run", store, "-o", f"cpus={cpu}", "--", *show)
    assert r.stdout.strip() == f"[{cpu}]", r
    _wait_no_daemon(store)
    r = cowfs("run", store, "--", *show)
    assert r.stdout.strip() == str(sorted(os.sched_getaffinity(0))), r
    _wait_no_daemon(store)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp, "-o", f"cpus={cpu}")
    try:
        r = cowfs("run", store, "--", *show)
        assert r.stdout.strip() == f"[{cpu}]", r
    finally:
        cowfs("umount", mp)


# -- import / export ------------------------------------------------------------------------------
IGNORE = ("ino", "atime", "ctime", "blocks", "blksize", "dir_size")


def _compare(a: Path, b: Path, names) -> None:
    diffs = mounting.compare_snapshots(mounting.snapshot(str(a)), mounting.snapshot(str(b)), names=names,
                                       ignore=IGNORE, ignore_root=("nlink", "uid", "gid", "mode", "mtime"))
    assert not diffs, "\n".join(diffs[:30])


def test_import_then_export_round_trip(stores, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mounting.make_full_tree(src, small_files=200, sparse_size=64 << 20)
    store = stores()
    t0 = time.monotonic()
    r = cowfs("import", store, src, "--snapshot", "imported")
    elapsed = time.monotonic() - t0
    assert r.stdout == "" and r.stderr == "", "import must be quiet in scripts"
    assert not _mounts_of(store)
    assert elapsed < 30

    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        _compare(src, mp, ("source", "imported"))
        assert os.stat(mp / "sparse").st_size == 64 << 20
        # export to a directory
        out = tmp_path / "out"
        r = cowfs("export", mp, "imported", out)
        assert r.stdout == "" and r.stderr == ""
        _compare(src, out, ("source", "exported"))
        assert os.stat(out / "sparse").st_blocks * 512 < 1 << 20, "holes were written out as data"
        # export as a tar stream
        tar_path = tmp_path / "snap.tar"
        with open(tar_path, "wb") as f:
            r = subprocess.run(COWFS + ["export", str(mp), "imported", "-"], stdout=f, stderr=subprocess.PIPE,
                               timeout=120)
        assert r.returncode == 0, r.stderr
        with tarfile.open(tar_path) as tf:
            members = {m.name.lstrip("./"): m for m in tf.getmembers()}
        assert members["dir/hardlink-to-text"].islnk() or members["text"].islnk()
        assert members["dir/link"].issym() and members["fifo"].isfifo() and members["null-dev"].ischr()
        assert members["dir/small-002"].uid == 1234 and members["dir/small-001"].mode & 0o7777 == 0o4755
        (first,) = [members[n] for n in ("text", "dir/hardlink-to-text") if members[n].isfile()]
        assert first.pax_headers.get("SCHILY.xattr.user.origin") == "test"
        untar = tmp_path / "untar"
        untar.mkdir()
        subprocess.run(["tar", "--extract", "--file", str(tar_path), "--directory", str(untar), "--xattrs",
                        "--xattrs-include=*", "--numeric-owner", "--preserve-permissions"], check=True)
        _compare(src, untar, ("source", "untarred"))

        # errors
        r = cowfs("export", mp, "nope", tmp_path / "x", check=False)
        assert r.returncode == 1 and "no snapshot named 'nope'" in r.stderr
        r = cowfs("export", mp, "main", tmp_path / "x", check=False)
        assert r.returncode == 1 and "is a branch" in r.stderr
        r = cowfs("export", mp, "imported", out, check=False)
        assert r.returncode == 1 and "not an empty directory" in r.stderr
    finally:
        cowfs("umount", mp)


def test_export_of_an_unmounted_store_starts_a_daemon_that_exits(stores, tmp_path):
    """`cowfs export STORE SNAP DIR` lists the unmounted store offline (RocksDB opened in the
    command's own process), then mounts the snapshot's branch for the copy.  A daemon forked
    from that process lacked RocksDB's background threads: its flush at unmount waited
    forever and the command failed after 60 s (cowfs.kv.rocks.opened_in_this_process)."""
    store = stores()
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        (mp / "f").write_text("data\n")
        cowfs("snapshot", mp, "s1")
    finally:
        cowfs("umount", mp)
    t0 = time.monotonic()
    cowfs("export", store, "s1", tmp_path / "out", timeout=45)
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "out" / "f").read_text() == "data\n"
    assert _mounts_of(store) == []
    _wait_no_daemon(store)


def test_import_into_a_mounted_branch_subdirectory(stores, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    store = stores()
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        (mp / "keep").write_text("kept")
        cowfs("import", store, src, "--to", "vendor/pkg")
        assert (mp / "vendor" / "pkg" / "a").read_text() == "a" and (mp / "keep").read_text() == "kept"
        assert mounting.is_mounted(mp)
        r = cowfs("import", store, src, "--to", "../escape", check=False)
        assert r.returncode == 1 and "inside the branch" in r.stderr
        r = cowfs("import", store, mp / "vendor", check=False)
        assert r.returncode == 1 and "inside the branch itself" in r.stderr
    finally:
        cowfs("umount", mp)


def test_import_and_export_show_progress_on_a_terminal(stores, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
    store = stores()
    code, out = mounting.run_on_tty(COWFS + ["import", str(store), str(src), "--snapshot", "s"])
    assert code == 0, out
    assert "importing 50 entries" in out and "100%" in out and "imported 50 files" in out
    mp = tmp_path / "mnt"
    mp.mkdir()
    cowfs("mount", store, mp)
    try:
        code, out = mounting.run_on_tty(COWFS + ["export", str(mp), "s", str(tmp_path / "out")])
        assert code == 0 and "exported 50 files" in out, out
        code, out = mounting.run_on_tty(COWFS + ["export", str(mp), "s", "-"])
        assert code == 1 and "refusing to write a tar stream to a terminal" in out
    finally:
        cowfs("umount", mp)
