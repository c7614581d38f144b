"""History that compacts (issue 20): deleting snapshots merges their layers into their
neighbours, on a real mount, and nothing a surviving snapshot shows changes.

* Differential: a random workload with a snapshot after each step and a plain `cp -a` copy
  of the tree at each; then interior snapshots are deleted and `cowfs gc` runs: every
  surviving snapshot must read exactly as its copy, and `cowfs diff` between surviving
  snapshots must report exactly the paths that differ between their copies (and the same
  as before the deletes); the layer chain holds only live snapshots; fsck is clean.
* Crash: the daemon is SIGKILLed while a pass merges layers (and, deterministically, the
  pass is stopped after each of its batches in turn, offline): fsck is clean each time and
  every snapshot still reads right once the pass is done.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time

import pytest

import mounting
import workload
from cowfs import api

IGNORE = ("ino", "atime", "ctime", "blocks", "blksize", "dir_size", "nlink")


def mutate(root: str, rnd: random.Random, step: int) -> None:
    """A few random changes of the tree under root (files, directories, symlinks, modes,
    xattrs, renames); no hard links."""
    for k in range(rnd.randrange(1, 6)):
        files = [os.path.join(d, f) for d, _dirs, fs in os.walk(root) for f in fs
                 if not os.path.islink(os.path.join(d, f))]
        dirs = [d for d, _dirs, _fs in os.walk(root)]
        op = rnd.choice(["new", "new", "overwrite", "append", "delete", "mkdir", "rename", "symlink", "chmod",
                         "xattr", "rmdir"])
        d = rnd.choice(dirs)
        if op == "new" or (not files and op in ("overwrite", "append", "delete", "rename", "chmod", "xattr")):
            with open(os.path.join(d, f"f{step}_{k}"), "wb") as f:
                f.write(os.urandom(rnd.choice((0, 10, 5000, 70000))))
        elif op == "overwrite":
            with open(rnd.choice(files), "wb") as f:
                f.write(os.urandom(rnd.randrange(1, 3000)))
        elif op == "append":
            with open(rnd.choice(files), "ab") as f:
                f.write(b"more %d\n" % step)
        elif op == "delete":
            os.unlink(rnd.choice(files))
        elif op == "mkdir":
            os.mkdir(os.path.join(d, f"d{step}_{k}"))
        elif op == "rename":
            os.rename(rnd.choice(files), os.path.join(d, f"r{step}_{k}"))
        elif op == "symlink":
            os.symlink(f"target-{step}-{k}", os.path.join(d, f"l{step}_{k}"))
        elif op == "chmod":
            os.chmod(rnd.choice(files), rnd.choice((0o600, 0o644, 0o755)))
        elif op == "xattr":
            os.setxattr(rnd.choice(files), b"user.h", b"%d" % step)
        elif op == "rmdir" and d != root and not os.listdir(d):
            os.rmdir(d)


def changed_paths(a: dict, b: dict) -> set[str]:
    """Paths whose entries differ between two mounting.snapshot()s (the diff oracle)."""
    def entry(e: dict) -> dict:
        return {k: v for k, v in e.items() if k not in IGNORE and not (k == "size" and e.get("type") == "dir")}
    return {rel for rel in set(a) | set(b) if rel and (rel not in a or rel not in b or entry(a[rel]) != entry(b[rel]))}


def reported(mp, a: str, b: str) -> tuple[set[str], list]:
    changes = api.control(mp, "diff", a, b)["changes"]
    paths = set()
    for c in changes:
        paths.add(c["path"].lstrip("/"))
        if "from" in c:
            paths.add(c["from"].lstrip("/"))
    return paths, changes


def chain_layers(store) -> tuple[int, int]:
    """(layers in main's head ancestry, live snapshots among them), read offline."""
    from cowfs.store import Store
    st = Store(str(store))
    try:
        anc = set(st.catalog.ancestry(st.catalog.branches["main"].head))
        return len(anc), sum(1 for s in st.catalog.snapshots.values() if s.layer in anc)
    finally:
        st.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2])
def test_surviving_snapshots_read_and_diff_exactly_after_interior_deletes(cowfs_mount, tmp_path, seed):
    rnd = random.Random(seed)
    m = cowfs_mount
    work = m.path / "w"
    os.mkdir(work)
    copies = tmp_path / "copies"
    os.mkdir(copies)
    names = []
    for step in range(24):
        mutate(str(work), rnd, step)
        time.sleep(0.005)  # a new tick of the coarse clock: mtimes tell the steps apart
        name = f"s{step}"
        api.control(m.path, "snapshot", name)
        names.append(name)
        subprocess.run(["cp", "-a", str(work), str(copies / name)], check=True)
    keep = [names[0]] + sorted(rnd.sample(names[1:-1], 6), key=lambda n: int(n[1:])) + [names[-1]]
    for name in keep:  # before any delete (a snapshot the kernel has looked at stays until it forgets it)
        got = mounting.snapshot(str(m.path / ".cowfs" / "snapshots" / name / "w"))
        diffs = mounting.compare_snapshots(got, mounting.snapshot(str(copies / name)), ignore=IGNORE)
        assert not diffs, f"snapshot {name}: {diffs[:10]}"
    pairs = list(zip(keep, keep[1:])) + [(keep[0], keep[-1])]
    before = {p: reported(m.path, *p)[1] for p in pairs}
    for name in names:
        if name not in keep:
            api.control(m.path, "delete", name)
    r = mounting.run_cowfs("gc", m.store, "--json")
    assert json.loads(r.stdout)["ok"]
    for name in keep:
        got = mounting.snapshot(str(m.path / ".cowfs" / "snapshots" / name / "w"))
        want = mounting.snapshot(str(copies / name))
        diffs = mounting.compare_snapshots(got, want, ignore=IGNORE)
        assert not diffs, f"snapshot {name} after the deletes: {diffs[:10]}"
    for a, b in pairs:
        paths, changes = reported(m.path, a, b)
        assert changes == before[(a, b)], f"diff {a} {b} changed with the deletes"
        want = {"w/" + p if p else "w" for p in changed_paths(mounting.snapshot(str(copies / a)),
                                                               mounting.snapshot(str(copies / b)))}
        assert paths - {"w"} == want - {"w"}, f"diff {a} {b}: reported {sorted(paths ^ want)[:10]}"
    m.stop()
    layers, live = chain_layers(m.store)
    assert live == len(keep) and layers <= len(keep) + 1, (layers, live)
    workload.fsck_clean(m.store)
    m.start()
    for name in keep:  # and once more after a remount
        got = mounting.snapshot(str(m.path / ".cowfs" / "snapshots" / name / "w"))
        assert not mounting.compare_snapshots(got, mounting.snapshot(str(copies / name)), ignore=IGNORE)


def _history(m, snapshots: int, files: int) -> list[str]:
    """snapshots of a tree of `files` files, each after rewriting all of them."""
    os.mkdir(m.path / "d")
    names = []
    for s in range(snapshots):
        for n in range(files):
            (m.path / "d" / f"f{n}").write_bytes(f"v{s} {n}".encode())
        workload.ctl(m.path, f"snapshot g{s}")
        names.append(f"g{s}")
    return names


def _reads_right(root, names: list[str], files: int) -> None:
    for name in names:
        s = int(name[1:])
        for n in (0, files // 2, files - 1):
            got = (root / ".cowfs" / "snapshots" / name / "d" / f"f{n}").read_bytes()
            assert got == f"v{s} {n}".encode(), (name, n, got)


@pytest.mark.timeout(400)
def test_a_merge_stopped_after_any_batch_leaves_fsck_clean(cowfs_mount, tmp_path):
    """Deleted interior snapshots (layers that merge into their child), the daemon killed
    before its pass; the pass run offline and stopped after each of its batches in turn."""
    from cowfs.store import Store

    m = cowfs_mount
    names = _history(m, 6, 600)
    for name in names[1:-1]:
        workload.ctl(m.path, f"delete {name}")
    workload.kill_daemon(m)  # before the pass the deletes scheduled (it waits 0.5 s)
    pristine = tmp_path / "pristine"
    shutil.copytree(m.store, pristine, symlinks=True, ignore=shutil.ignore_patterns("daemon.sock", "daemon.pid"))
    st = Store(str(pristine))
    try:
        assert len(st.catalog.queued) == 4
    finally:
        st.close()
    batches = mounting.gc_batches_of_copy(pristine, tmp_path)
    assert batches > 4, f"the pass has only {batches} batches: nothing to interrupt"
    problems = mounting.fsck_after_gc_stops(pristine, tmp_path, range(1, batches, 2))
    assert not problems, f"fsck after a crash between merge batches ({batches} batches): {problems}"
    m.start()
    _reads_right(m.path, [names[0], names[-1]], 600)


@pytest.mark.timeout(400)
def test_kill9_while_the_daemon_merges_then_fsck_clean(cowfs_mount):
    m = cowfs_mount
    names = _history(m, 12, 1500)
    for name in names[1:-1]:
        workload.ctl(m.path, f"delete {name}")
    time.sleep(0.5 + random.random() * 0.6)  # the pass starts 0.5 s after the deletes
    workload.kill_daemon(m)
    workload.fsck_clean(m.store)
    m.start()
    _reads_right(m.path, [names[0], names[-1]], 1500)
    r = mounting.run_cowfs("gc", m.store, "--json")
    assert json.loads(r.stdout)["ok"]
    m.stop()
    layers, live = chain_layers(m.store)
    assert live == 2 and layers <= 3, (layers, live)
    workload.fsck_clean(m.store)
