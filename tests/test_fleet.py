"""The fleet on real engines: `cowfs remote`, `cowfs push`, `cowfs pull` and `cowfs remote check`
against SeaweedFS (S3) and etcd started by the fixtures, with real mounts on both sides.

Each "host" is a store with its own user configuration and cache directories (XDG_CONFIG_HOME,
XDG_CACHE_HOME), as two machines would have; the remote is the session's SeaweedFS bucket
under a prefix of the test's own, and the session's etcd (references under that prefix).
The hosts and the ``fleet`` fixture are shared with tests/test_fleet_ceph.py (the same on
Ceph RADOS Gateway): tests/mounting.py, tests/conftest.py.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

import mounting
from mounting import Host, big_tree, fetched, lazy_mounted, push_files, same_tree, snap, wait_for_objects
from conftest import UNPRIV_GID, UNPRIV_UID


# --- cowfs remote ------------------------------------------------------------------------------

def test_remote_add_list_remove_and_their_errors(tmp_path):
    h = Host("a", tmp_path / "a", {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"})
    h.cowfs("remote", "add", "origin", "s3://my-bucket/fleet/one", "--refs", "http://127.0.0.1:2379")
    h.cowfs("remote", "add", "backup", "s3://other.bucket", "--refs", "http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--endpoint", "http://127.0.0.1:8333")
    listed = h.json("remote", "list")["remotes"]
    assert [(r["name"], r["url"], r["refs"]) for r in listed] == [
        ("backup", "s3://other.bucket", "http://10.0.0.1:2379,http://10.0.0.2:2379"),
        ("origin", "s3://my-bucket/fleet/one", "http://127.0.0.1:2379")]
    text = h.cowfs("remote", "list").stdout
    assert "origin\ts3://my-bucket/fleet/one\thttp://127.0.0.1:2379" in text
    cfg = tmp_path / "a" / "config" / "cowfs" / "remotes.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert "secret" not in cfg.read_text() and "AKID" not in cfg.read_text(), "credentials are never stored"

    def fails(*args: str, says: str) -> None:
        r = h.cowfs(*args, check=False)
        assert r.returncode != 0 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    fails("remote", "add", "origin", "s3://b2b/x", "--refs", "http://h:1", says="a remote named 'origin' exists already")
    fails("remote", "add", "x", "http://bucket/x", "--refs", "http://h:1", says="expected s3://BUCKET/PREFIX")
    fails("remote", "add", "x", "s3://Bad_Bucket/x", "--refs", "http://h:1", says="bad bucket name")
    fails("remote", "add", "x", "s3://bucket/.hidden", "--refs", "http://h:1", says="bad prefix")
    fails("remote", "add", "x", "s3://bucket/p", "--refs", "etcd-host", says="bad --refs endpoint")
    fails("remote", "add", "x", "s3://bucket/p", "--refs", "http://h", says="bad --refs endpoint")
    fails("remote", "add", ".x", "s3://bucket/p", "--refs", "http://h:1", says="bad remote name")
    fails("remote", "remove", "nope", says="no remote named 'nope' (known: backup, origin")
    fails("remote", "check", "nope", says="no remote named 'nope'")
    h.cowfs("remote", "remove", "backup")
    assert [r["name"] for r in h.json("remote", "list")["remotes"]] == ["origin"]
    # Per user, and private: a sandbox user pointed at our file (our HOME) cannot read it.
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "a", 0o755)
    other = mounting.run_cowfs_as(UNPRIV_UID, UNPRIV_GID, "remote", "list", text=True, check=False,
                                  env={"XDG_CONFIG_HOME": str(tmp_path / "a" / "config")})
    assert other.returncode == 1 and "remotes.json: Permission denied" in other.stderr, other.stderr


# --- push and pull -------------------------------------------------------------------------------

def test_push_then_pull_gives_the_same_tree_metadata_included(fleet, mount_factory):
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    mounting.make_full_tree(src.path, small_files=40, sparse_size=24 << 20)
    pushed = snap(src, "base")
    first = a.json("push", src.path, "base", "origin")["pushed"]
    assert first["objects_uploaded"] >= 3 and first["files_read"] == first["files"] - 1 > 40  # a hard link: read once
    assert first["bytes_uploaded"] < 6 << 20, "compressed packs, holes not stored"

    store_b = mounting.init_store(b.base / "store")
    pulled = b.json("pull", "origin", "base", store_b)["pulled"]
    assert pulled["branch"] == "base" and pulled["chunks_fetched"] > 0 and pulled["base"] is None
    dst = mount_factory(store=store_b, branch="base")
    same_tree(pushed, dst.path)
    same_tree(pushed, dst.path / ".cowfs" / "snapshots" / pulled["snapshot"])
    assert os.stat(dst.path / "sparse").st_blocks * 512 < 1 << 20, "holes were written out as data"
    dst.stop()

    # A fork changes 10 files: its push reads and uploads only those.
    for i in range(10):
        (src.path / "dir" / f"small-{i + 10:03d}").write_bytes(os.urandom(5000))
    os.utime(src.path / "big", ns=(1, 2))                       # metadata only
    fork = snap(src, "fork")
    second = a.json("push", src.path, "fork", "origin")["pushed"]
    # read: the 10, and big whose mtime moved (its chunks are on the remote: not uploaded)
    assert second["files_read"] == 11 and second["files_cached"] == first["files"] - 12
    assert second["chunks_new"] == 10 and second["trees_new"] == 2     # dir/ and the root
    assert second["bytes_uploaded"] < 50_000 + (1 << 20)
    # ... and its pull, based on the one already pulled, fetches only those.
    again = b.json("pull", "origin", "fork", store_b, "--into", "fork-b")["pulled"]
    assert again["base"] == pulled["snapshot"] and again["chunks_fetched"] == 10 and again["files_written"] == 10 and again["meta_only"] == 1
    dst2 = mount_factory(store=store_b, branch="fork-b")
    same_tree(fork, dst2.path)
    # Host b pushes its own change to the pulled tree: the pulls filled its stat cache, so
    # only the changed file is read (before: every file of the tree, 45 here).
    (dst2.path / "dir" / "small-030").write_bytes(b"changed on b")
    snap(dst2, "b-change")
    third = b.json("push", dst2.path, "b-change", "origin")["pushed"]
    assert third["files_read"] == 1 and third["chunks_new"] == 1, third

    # Errors: one line each.
    r = a.cowfs("push", src.path, "nope", "origin", check=False)
    assert r.returncode == 1 and "no snapshot named 'nope'" in r.stderr
    r = b.cowfs("pull", "origin", "nope", store_b, check=False)
    assert r.returncode == 1 and "the remote origin has no snapshot named 'nope' (it has: b-change, base, fork)" in r.stderr
    r = b.cowfs("pull", "origin", "base", store_b, check=False)
    assert r.returncode == 1 and "has a branch named 'base' already" in r.stderr
    mounting.write(src.path / "text", b"changed")
    snap(src, "other")
    r = a.cowfs("push", src.path, "other", "origin", "--as", "base", check=False)
    assert r.returncode == 1 and "conflict" in r.stderr and "has a snapshot base already" in r.stderr
    # On a terminal: a progress bar and a summary (never in scripts: the runs above printed
    # nothing but their JSON).
    code, out = a.tty("push", src.path, "other", "origin")
    assert code == 0 and "pushing other" in out and "100%" in out and "pushed other to origin as other" in out, out
    code, out = b.tty("pull", "origin", "other", store_b)
    assert code == 0 and "pulled other from origin into branch other" in out and "based on" in out, out
    assert a.json("remote", "check", "origin", "--verify")["ok"]


# --- branches: compare-and-set ---------------------------------------------------------------------

def test_two_stores_pushing_one_branch_at_once_one_wins_the_other_conflicts(fleet, mount_factory):
    a, b = fleet("a"), fleet("b")
    ma = mount_factory()
    (ma.path / "who").write_text("base")
    snap(ma, "c0")
    first = a.json("push", ma.path, "c0", "origin", "--branch", "dev")["pushed"]
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev")
    mb = mount_factory(store=store_b, branch="dev")
    assert (mb.path / "who").read_text() == "base"
    (ma.path / "who").write_text("a")
    (mb.path / "who").write_text("b")
    snap(ma, "a1")
    snap(mb, "b1")
    procs = {"a": a.popen("push", ma.path, "a1", "origin", "--branch", "dev", "--json"),
             "b": b.popen("push", mb.path, "b1", "origin", "--branch", "dev", "--json")}
    out = {k: (p.wait(120), *[s.decode() for s in p.communicate()]) for k, p in procs.items()}
    winners = [k for k, (rc, _o, _e) in out.items() if rc == 0]
    assert len(winners) == 1, out
    (win,) = winners
    lose = "b" if win == "a" else "a"
    won = json.loads(out[win][1])["pushed"]["commit"]
    rc, _o, err = out[lose]
    assert rc == 1 and err.count("\n") == 1, err
    assert "conflict" in err and f"branch/dev on the remote origin is at commit {won}" in err, err
    assert f"expected {first['commit']}" in err and "nothing was overwritten" in err
    # Pushing again without pulling is still refused; the loser's work is not lost: it is
    # still its snapshot, which it can push under its own name.
    loser, lm, ls = (a, ma, "a1") if lose == "a" else (b, mb, "b1")
    r = loser.cowfs("push", lm.path, ls, "origin", "--branch", "dev", check=False)
    assert r.returncode == 1 and f"is at commit {won}" in r.stderr
    loser.json("push", lm.path, ls, "origin")
    # The remote holds both; dev is the winner's.
    store_c = mounting.init_store(b.base / "store-c")
    c = fleet("c")
    c.json("pull", "origin", "dev", store_c, "--branch", "--into", "dev")
    c.json("pull", "origin", ls, store_c, "--into", "theirs")
    mc = mount_factory(store=store_c, branch="dev")
    assert (mc.path / "who").read_text() == win
    assert mounting.ok(mc.path, "list")
    assert a.json("remote", "check", "origin")["ok"]
    shown = {(x["kind"], x["name"]): x for x in a.json("remote", "show", "origin")["refs"]}
    assert set(shown) == {("snapshot", "c0"), ("snapshot", win + "1"), ("snapshot", ls), ("branch", "dev")}
    assert shown[("branch", "dev")]["commit"] == won and shown[("snapshot", "c0")]["commit"] == first["commit"]
    text = a.cowfs("remote", "show", "origin").stdout
    assert f"branch    dev  {won[:12]}" in text, text
    # A pull of the new head, then a push on top of it, succeeds.
    d = fleet("d")
    store_d = mounting.init_store(d.base / "store")
    d.json("pull", "origin", "dev", store_d, "--branch", "--into", "work")
    mc.stop()
    md = mount_factory(store=store_d, branch="work")
    (md.path / "who").write_text("d")
    snap(md, "d1")
    pushed = d.json("push", md.path, "d1", "origin", "--branch", "dev")["pushed"]
    assert pushed["commit"] and pushed["chunks_new"] == 1


# --- remote check ------------------------------------------------------------------------------------

def test_remote_check_names_every_missing_or_corrupt_object(fleet, mount_factory, seaweedfs, engine_prefix):
    from cowfs.fleet.objects import ENC_RAW, TYPE_CHUNK, decode_index
    a = fleet("a")
    m = mount_factory()
    (m.path / "data").write_bytes(os.urandom(300_000))
    (m.path / "d").mkdir()
    (m.path / "d" / "f").write_bytes(b"x" * 1000)
    snap(m, "one")
    a.json("push", m.path, "one", "origin")
    (m.path / "d" / "g").write_bytes(os.urandom(70_000))
    snap(m, "two")
    a.json("push", m.path, "two", "origin")
    r = a.cowfs("remote", "check", "origin", "--verify")
    assert r.returncode == 0 and r.stdout == "", r.stdout
    s3 = seaweedfs.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=engine_prefix + "/")["Contents"]]
    indexes = {k.rsplit("/", 1)[1]: decode_index(k.rsplit("/", 1)[1], s3.get_object(
        Bucket=seaweedfs.BUCKET, Key=k)["Body"].read()) for k in keys if "/index/" in k}
    # the first push's pack: corrupt one raw chunk's bytes (same length: only --verify sees it)
    first = max(indexes, key=lambda p: len(indexes[p]))
    h, loc = next((h, loc) for h, loc in indexes[first].items() if loc.kind == TYPE_CHUNK and loc.enc == ENC_RAW)
    key = f"{engine_prefix}/data/{first}"
    data = bytearray(s3.get_object(Bucket=seaweedfs.BUCKET, Key=key)["Body"].read())
    data[loc.offset + 10] ^= 0xFF
    s3.put_object(Bucket=seaweedfs.BUCKET, Key=key, Body=bytes(data))
    r = a.cowfs("remote", "check", "origin", check=False)
    assert r.returncode == 0 and r.stdout == ""
    r = a.cowfs("remote", "check", "origin", "--verify", check=False)
    assert r.returncode == 1 and r.stdout == f"chunk {h.hex()} in pack {first}: its content does not hash to its id\n"
    # the second push's pack goes, and the first push's commit
    (second,) = set(indexes) - {first}
    s3.delete_object(Bucket=seaweedfs.BUCKET, Key=f"{engine_prefix}/data/{second}")
    one = next(k for k in keys if "/commit/" in k and json.loads(
        s3.get_object(Bucket=seaweedfs.BUCKET, Key=k)["Body"].read())["snapshot"] == "one")
    s3.delete_object(Bucket=seaweedfs.BUCKET, Key=one)
    r = a.cowfs("remote", "check", "origin", check=False)
    lines = r.stdout.splitlines()
    assert r.returncode == 1
    assert f"pack data/{second} is missing" in lines[0]
    assert f"snap/one: commit/{one.rsplit('/', 1)[1]} is missing" in lines
    # (the trees of "two" are in that pack: its chunks cannot be reached, hence not named)
    assert any(line.startswith("tree ") and f"damaged pack {second}" in line for line in lines), lines
    store = mounting.init_store(a.base / "s")
    r = a.cowfs("pull", "origin", "one", store, check=False)
    assert r.returncode == 1 and "lacks the commit" in r.stderr and r.stderr.count("\n") == 1
    # A pull that fails once its branch is made removes it: the same pull can run again.
    r = a.cowfs("pull", "origin", "two", store, check=False)
    assert r.returncode == 1 and f"the remote origin lacks the pack data/{second}" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert [b["name"] for b in a.json("list", store)["branches"]] == ["main"]


# --- faults --------------------------------------------------------------------------------------

def test_a_push_killed_midway_leaves_the_remote_consistent_and_resumes(fleet, mount_factory, seaweedfs,
                                                                        engine_prefix):
    mounting.check_a_killed_push_resumes(fleet("a"), fleet("b"), seaweedfs, engine_prefix, mount_factory)


def test_engines_down_fail_push_and_pull_in_one_line_and_a_killed_s3_resumes(
        fleet, mount_factory, seaweedfs_killable, etcd_private, engine_prefix):
    sw, etcd = seaweedfs_killable, etcd_private
    a = fleet("a", s3=sw, etcd=etcd)
    m = mount_factory()
    (m.path / "f").write_text("one")
    snap(m, "one")
    a.json("push", m.path, "one", "origin")
    store = mounting.init_store(a.base / "store")

    def one_line(r, engine: str) -> None:
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert engine in r.stderr and "unavailable after 5 attempts" in r.stderr, r.stderr

    # S3 killed in the middle of a push: it fails in one line; once S3 is back the remote is
    # consistent and the push resumes.
    big_tree(m.path)                                     # 40 MiB: 3 packs
    snap(m, "two")
    p = a.popen("push", m.path, "two", "origin")
    wait_for_objects(sw.client(), sw.BUCKET, engine_prefix, p, at_least=5)  # one's 3 objects, a pack and its index
    sw.kill()
    rc = p.wait(120)
    err = p.communicate()[1].decode()
    one_line(subprocess.CompletedProcess([], rc, "", err), f"S3 endpoint {sw.endpoint}")
    t0 = time.monotonic()
    one_line(a.cowfs("pull", "origin", "one", store, "--into", "x", check=False), f"S3 endpoint {sw.endpoint}")
    assert time.monotonic() - t0 < 60
    sw.start()
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    resumed = a.json("push", m.path, "two", "origin")["pushed"]
    assert resumed["chunks_skipped"] > 0 or resumed["objects_skipped"] > 0, resumed
    # etcd down: the references cannot be read or set.
    etcd.kill()
    (m.path / "f").write_text("three")
    snap(m, "three")
    one_line(a.cowfs("push", m.path, "three", "origin", check=False), f"etcd at {etcd.endpoint}")
    one_line(a.cowfs("pull", "origin", "one", store, "--into", "y", check=False), f"etcd at {etcd.endpoint}")
    etcd.restart()
    a.json("push", m.path, "three", "origin")
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    a.json("pull", "origin", "three", store)
    assert (mount_factory(store=store, branch="three").path / "f").read_text() == "three"


def test_engines_stalled_mid_push_or_pull_slow_them_and_local_work_goes_on(
        fleet, mount_factory, seaweedfs_killable, etcd_private, engine_prefix):
    """Slow engines (SIGSTOP for a few seconds, under the clients' timeouts): SeaweedFS stalled
    mid-push, then etcd stalled as a push and a pull begin.  Meanwhile the mount reads and
    writes as ever; once the engine answers, the push and the pull finish, nothing doubled or
    lost (`remote check --verify`, the pulled tree)."""
    sw, etcd = seaweedfs_killable, etcd_private
    a, b = fleet("a", s3=sw, etcd=etcd), fleet("b", s3=sw, etcd=etcd)
    m = mount_factory()
    big_tree(m.path)                                     # 40 MiB: 3 packs
    (m.path / "local").write_text("before")
    pushed = snap(m, "big")
    p = a.popen("push", m.path, "big", "origin", "--json")
    wait_for_objects(sw.client(), sw.BUCKET, f"{engine_prefix}/index/", p)    # a pack and its index up
    with mounting.stopped(sw.process.pid):
        stalled = time.monotonic()
        assert (m.path / "blob-0").read_bytes()[:4] and (m.path / "local").read_text() == "before"
        (m.path / "local").write_text("during")
        snap(m, "during")
        time.sleep(max(0.0, 4 - (time.monotonic() - stalled)))
        assert p.poll() is None, p.communicate()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not err, err
    assert json.loads(out)["pushed"]["objects_uploaded"] >= 6
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    store = mounting.init_store(b.base / "store")
    with mounting.stopped(etcd.process.pid):
        procs = [a.popen("push", m.path, "during", "origin", "--branch", "dev", "--json"),
                 b.popen("pull", "origin", "big", store, "--json")]
        time.sleep(2)
        assert all(q.poll() is None for q in procs), [q.communicate() for q in procs]
        assert (m.path / "local").read_text() == "during"
    for q in procs:
        out, err = q.communicate(timeout=120)
        assert q.returncode == 0 and not err, err
    same_tree(pushed, mount_factory(store=store, branch="big").path)
    shown = {(x["kind"], x["name"]) for x in a.json("remote", "show", "origin")["refs"]}
    assert shown == {("snapshot", "big"), ("snapshot", "during"), ("branch", "dev")}, shown
    assert a.json("remote", "check", "origin", "--verify")["ok"]


def _pull_at(h: Host, store: Path, into: str, pattern: str) -> subprocess.Popen:
    """`cowfs pull origin big STORE --into INTO` by host h, once a path of pattern exists
    (under the host's base directory: its cache, or its TMPDIR where the pull mounts INTO)."""
    p = h.popen("pull", "origin", "big", store, "--into", into, "--json")
    deadline = time.monotonic() + 120
    while p.poll() is None and not any(h.base.glob(pattern)):
        assert time.monotonic() < deadline, f"timed out waiting for the pull at {pattern}"
        time.sleep(0.005)
    assert p.poll() is None, p.communicate()
    return p


def test_a_pull_killed_midway_or_whose_s3_dies_leaves_the_store_clean_and_runs_again(
        fleet, mount_factory, seaweedfs_killable, engine_prefix):
    """kill -9 of SeaweedFS mid-pull: the pull fails in one line and drops its half-written
    branch.  kill -9 of the pull itself mid-pull (nothing of it runs afterwards): the store is
    clean for fsck, and the same pull run again finds the branch half written, says so, ends
    the killed pull's temporary mount and writes the branch whole; no mount is left."""
    sw = seaweedfs_killable
    a, b = fleet("a", s3=sw), fleet("b", s3=sw)
    m = mount_factory()
    big_tree(m.path)                                      # 40 MiB: 3 packs
    pushed = snap(m, "big")
    a.json("push", m.path, "big", "origin")
    store = mounting.init_store(b.base / "store")
    (b.base / "tmp").mkdir()
    b.env["TMPDIR"] = str(b.base / "tmp")
    p = _pull_at(b, store, "x", "cache/cowfs/fleet/*/spool/pull-*")     # fetching: stopped there
    with mounting.stopped(p.pid):
        sw.kill()
    rc = p.wait(120)
    err = p.communicate()[1].decode()
    assert rc == 1 and err.count("\n") == 1 and f"S3 endpoint {sw.endpoint}" in err, err
    assert [x["name"] for x in b.json("list", store)["branches"]] == ["main"]
    assert not mounting.fuse_mounts_under(str(b.base))
    sw.start()
    p = _pull_at(b, store, "big", "tmp/cowfs-pull-big-*/blob-*")        # writing
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    r = b.cowfs("pull", "origin", "big", store, "--into", "other", "--json")
    assert not r.stderr, r.stderr       # another branch: the killed pull's is not in the way
    again = b.cowfs("pull", "origin", "big", store)
    assert again.stderr.count("\n") == 1 and (f"branch big of {store} was left half written by a pull killed "
                                              "midway: pulling it again") in again.stderr, again.stderr
    assert not mounting.fuse_mounts_under(str(b.base)), "the killed pull's temporary mount is left"
    mounting.fsck(store)
    listed = {x["name"] for x in b.json("list", store)["snapshots"]}
    assert {n.split(".")[0] for n in listed} == {"big", "other"}, listed
    whole = mount_factory(store=store, branch="big")
    same_tree(pushed, whole.path)
    whole.stop()
    r = b.cowfs("pull", "origin", "big", store, check=False)
    assert r.returncode == 1 and "has a branch named 'big' already" in r.stderr, r.stderr
    # Killed again, then its branch deleted and one made anew under that name: never taken
    # for the half-written one.
    p = _pull_at(b, store, "again", "tmp/cowfs-pull-again-*/blob-*")
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    for e in mounting.fuse_mounts_under(str(b.base / "tmp")):
        b.cowfs("umount", e["mountpoint"])
    b.cowfs("delete", store, "again")
    main = mount_factory(store=store)
    (main.path / "mine").write_text("mine")
    mounting.ok(main.path, "branch again")
    main.stop()
    r = b.cowfs("pull", "origin", "big", store, "--into", "again", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "branch again of" in r.stderr and "has no mark of the pull killed midway that made it" in r.stderr, r.stderr
    kept = mount_factory(store=store, branch="again")
    assert os.listdir(kept.path) == ["mine"]
    kept.stop()
    mounting.fsck(store)


def test_a_pull_killed_while_it_makes_its_branch_leaves_no_mount_after_the_next_pull(fleet, mount_factory):
    """A pull makes its branch through a temporary mount of the branch it branches from; a
    kill -9 of the pull then (before its writes) leaves that mount, whose daemon outlives the
    command.  The next pull in the store ends it (the pid in its name runs no pull) and pulls;
    nothing is left mounted and the store is clean."""
    a, b = fleet("a"), fleet("b")
    m = mount_factory()
    (m.path / "f").write_text("pulled\n")
    snap(m, "big")
    a.json("push", m.path, "big", "origin")
    store = mounting.init_store(b.base / "store")
    tmp = b.base / "tmp"
    tmp.mkdir()
    b.env["TMPDIR"] = str(tmp)
    left: list[dict] = []
    for attempt in range(5):        # the kill must land while main's temporary mount is there
        p = b.popen("pull", "origin", "big", store, "--into", f"x{attempt}", "--json")
        deadline = time.monotonic() + 60
        while p.poll() is None and not any("/cowfs-pull-main-" in e["mountpoint"]
                                           for e in mounting.fuse_mounts_under(str(tmp))):
            assert time.monotonic() < deadline, "timed out waiting for the pull's mount of main"
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        left = mounting.fuse_mounts_under(str(tmp))
        if left:
            break
    assert left and all("/cowfs-pull-main-" in e["mountpoint"] for e in left), left
    r = b.json("pull", "origin", "big", store, "--into", "y")
    assert r["pulled"]["branch"] == "y", r
    assert not mounting.fuse_mounts_under(str(b.base)), "the killed pull's temporary mount of main is left"
    assert not list(tmp.iterdir()), list(tmp.iterdir())
    mounting.fsck(store)
    got = mount_factory(store=store, branch="y")
    assert (got.path / "f").read_text() == "pulled\n"
    got.stop()


def test_a_daemon_killed_mid_push_or_mid_pull_leaves_both_sides_consistent(
        fleet, mount_factory, seaweedfs, engine_prefix):
    """kill -9 of the daemon a push reads through: the push fails in one line, nothing is
    named on the remote, what was uploaded is whole (`remote check --verify`), the store is
    clean (fsck) and, mounted again, the push completes.  kill -9 of the
    daemon a pull writes through: the pull fails in one line, fsck is clean, no mount is left,
    and the same pull run again gives the pushed tree."""
    a, b = fleet("a"), fleet("b")
    m = mount_factory()
    big_tree(m.path)                                      # 40 MiB: 3 packs
    pushed = snap(m, "big")
    p = a.popen("push", m.path, "big", "origin", "--json")

    def read_mib() -> float:        # what the push read so far (through the mount: its files)
        with open(f"/proc/{p.pid}/io") as f:
            return int(next(x for x in f if x.startswith("read_bytes") or x.startswith("rchar")).split()[1]) / 2**20
    mounting.wait_until(lambda: p.poll() is not None or read_mib() > 12, "the push reading its files", 120)
    assert p.poll() is None, p.communicate()
    mounting.sigkill(m)
    rc = p.wait(120)
    err = p.communicate()[1].decode()
    dead = ("Transport endpoint is not connected", "Software caused connection abort")   # after / during a read
    assert rc == 1 and err.count("\n") == 1 and any(f"{d} (pushing " in err for d in dead), err
    r = a.cowfs("remote", "show", "origin", "--json")
    assert json.loads(r.stdout)["refs"] == [], r.stdout
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    mounting.fsck(m.store)
    m.start()
    a.json("push", m.path, "big", "origin")
    assert a.json("remote", "check", "origin", "--verify")["ok"]

    store = mounting.init_store(b.base / "store")
    (b.base / "tmp").mkdir()
    b.env["TMPDIR"] = str(b.base / "tmp")
    p = _pull_at(b, store, "big", "tmp/cowfs-pull-big-*/blob-*")
    with mounting.stopped(p.pid):                           # writing: its daemon killed under it
        (mp,) = [e["mountpoint"] for e in mounting.fuse_mounts_under(str(b.base / "tmp"))]
        os.kill(b.json("stats", mp)["daemon_pid"], signal.SIGKILL)
    rc = p.wait(120)
    err = p.communicate()[1].decode()
    assert rc == 1 and err.count("\n") == 1 and any(f"{d} (pulling " in err for d in dead), err
    assert not mounting.fuse_mounts_under(str(b.base)), "the dead daemon's mount is left"
    assert [x["name"] for x in b.json("list", store)["branches"]] == ["main"], "the half-written branch is left"
    mounting.fsck(store)
    b.cowfs("pull", "origin", "big", store)
    assert not mounting.fuse_mounts_under(str(b.base))
    whole = mount_factory(store=store, branch="big")
    same_tree(pushed, whole.path)


def test_a_sandbox_user_pushes_only_what_it_can_read(fleet, mount_factory, aws_env, etcd, engine_prefix, test_dir):
    """uid 65534 owns the mount's root (a sandbox): it may push its snapshot with its own remote
    configuration and credentials, reading through the mount as itself; a file it cannot read
    fails the push in one line and nothing is named on the remote."""
    a = fleet("a")
    m = mount_factory(options=("allow_other",))
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    (m.path / "mine").write_text("sandbox data")
    os.chown(m.path / "mine", UNPRIV_UID, UNPRIV_GID)
    snap(m, "ok")
    (m.path / "root-only").write_text("secret")
    os.chmod(m.path / "root-only", 0o600)
    snap(m, "mixed")
    home = test_dir / "sandbox-home"                   # test_dir: reachable by the sandbox user
    home.mkdir()
    os.chown(home, UNPRIV_UID, UNPRIV_GID)
    env = {k: v for k, v in aws_env.environment(test_dir).items() if v is not None}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"))

    def as_sandbox(*args, check=True):
        return mounting.run_cowfs_as(UNPRIV_UID, UNPRIV_GID, *args, text=True, check=check, env=env, timeout=120)
    as_sandbox("remote", "add", "origin", f"s3://{aws_env.BUCKET}/{engine_prefix}", "--refs", etcd.endpoint)
    r = as_sandbox("push", m.path, "mixed", "origin", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "Permission denied" in r.stderr and "root-only" in r.stderr, r.stderr
    pushed = json.loads(as_sandbox("push", m.path, "ok", "origin", "--json").stdout)["pushed"]
    assert pushed["files"] == 1
    r = a.cowfs("pull", "origin", "nope", mounting.init_store(a.base / "s"), check=False)
    assert "the remote origin has no snapshot named 'nope' (it has: ok)" in r.stderr, r.stderr   # not mixed
    assert stat.S_IMODE(os.stat(home / "config" / "cowfs" / "remotes.json").st_mode) == 0o600
    assert os.stat(home / "cache" / "cowfs" / "fleet" / "state.sqlite").st_uid == UNPRIV_UID


# --- fleet gc ----------------------------------------------------------------------------------------

def test_fleet_gc_removes_the_unreachable_after_the_grace_and_never_beside_a_push(
        fleet, mount_factory, seaweedfs, etcd, engine_prefix):
    from cowfs.kv.etcd import EtcdKV
    a, b = fleet("a"), fleet("b")
    m = mount_factory()
    (m.path / "keep").write_bytes(os.urandom(200_000))
    kept = snap(m, "keep")
    a.json("push", m.path, "keep", "origin")
    (m.path / "tmp").write_bytes(os.urandom(300_000))
    snap(m, "tmp")
    a.json("push", m.path, "tmp", "origin")
    s3 = seaweedfs.client()

    def objects() -> dict[str, int]:
        got = s3.list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=engine_prefix + "/").get("Contents", [])
        return {o["Key"][len(engine_prefix) + 1:]: o["Size"] for o in got}
    before = objects()
    assert a.json("remote", "gc", "origin", "--grace", "0")["garbage_objects"] == 0
    r = a.cowfs("remote", "delete", "origin", "tmp")
    assert "deleted snapshot tmp of origin" in r.stdout
    r = a.cowfs("remote", "delete", "origin", "tmp", check=False)
    assert r.returncode == 1 and "has no snapshot named 'tmp' (it has: keep)" in r.stderr
    # First run: condemned, nothing deleted (the grace starts now); with a long grace, still nothing.
    first = a.json("remote", "gc", "origin", "--grace", "0")
    assert first["garbage_objects"] == 3 and first["condemned"] == 3 and first["deleted"] == 0, first
    assert a.json("remote", "gc", "origin", "--grace", "3600")["deleted"] == 0
    assert objects() == before
    dry = a.json("remote", "gc", "origin", "--grace", "0", "--dry-run")
    assert dry["deleted"] == 3 and objects() == before
    second = a.json("remote", "gc", "origin", "--grace", "0")
    assert second["deleted"] == 3 and second["deleted_bytes"] > 300_000, second
    gone = set(before) - set(objects())
    assert len(gone) == 3 and {n.split("/")[0] for n in gone} == {"data", "index", "commit"}, gone
    assert a.json("remote", "check", "origin", "--verify")["ok"]
    store = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "keep", store)
    same_tree(kept, mount_factory(store=store, branch="keep").path)
    # A push in flight: gc refuses; a gc running: push refuses.  (Their locks are taken here as a
    # push and a gc take them: under an etcd lease, in the remote's key space.)
    kv = EtcdKV(etcd.endpoint, ("lock",), f"cowfs-fleet/{seaweedfs.BUCKET}/{engine_prefix}/".encode())
    lease = kv.acquire("lock", b"push/x", "a test pushing", 10)
    try:
        r = a.cowfs("remote", "gc", "origin", "--grace", "0", check=False)
        assert r.returncode == 1 and "1 pushes in flight on the remote origin (a test pushing): gc not run" \
            in r.stderr, r.stderr
    finally:
        lease.release()
    lease = kv.acquire("lock", b"gc", "a test holding the gc lock", 10)
    try:
        (m.path / "more").write_text("more")
        snap(m, "more")
        r = a.cowfs("push", m.path, "more", "origin", check=False)
        assert r.returncode == 1 and "a fleet gc is running on the remote origin (a test holding the gc lock)" \
            in r.stderr, r.stderr
        r = a.cowfs("remote", "gc", "origin", check=False)
        assert r.returncode == 1 and "already (a test holding the gc lock)" in r.stderr
    finally:
        lease.release()
        kv.close()
    a.json("push", m.path, "more", "origin")
    assert a.json("remote", "gc", "origin", "--grace", "0")["garbage_objects"] == 0


def test_a_branch_pushed_while_the_etcd_leader_dies_loses_no_reference(fleet, mount_factory, etcd_cluster):
    """Six pushes moving one branch (each by compare-and-set from the last), through a remote
    that knows the three members; the leader is killed -9 after the second and restarted
    after the fourth.  Every push succeeds, every name is there, the branch is at the last."""
    import requests
    eps = etcd_cluster.endpoints
    leader_id = requests.post(eps[0] + "/v3/maintenance/status", json={}, timeout=5).json()["leader"]
    leader = next(i for i, e in enumerate(eps) if requests.post(
        e + "/v3/maintenance/status", json={}, timeout=5).json()["header"]["member_id"] == leader_id)
    order = [leader] + [i for i in range(3) if i != leader]
    a = fleet("a", refs=",".join(eps[i] for i in order))      # the leader first: the kill hits it
    m = mount_factory()
    commits = []
    for n in range(6):
        if n == 2:
            etcd_cluster.kill(leader)
        if n == 4:
            etcd_cluster.restart(leader)
        (m.path / "n").write_text(str(n))
        snap(m, f"s{n}")
        commits.append(a.json("push", m.path, f"s{n}", "origin", "--branch", "line")["pushed"]["commit"])
    assert len(set(commits)) == 6
    store = mounting.init_store(a.base / "store")
    r = a.cowfs("pull", "origin", "nope", store, check=False)
    assert "(it has: s0, s1, s2, s3, s4, s5)" in r.stderr, r.stderr
    a.json("pull", "origin", "line", store, "--branch")
    assert (mount_factory(store=store, branch="line").path / "n").read_text() == "5"
    assert a.json("remote", "check", "origin")["ok"]


def _commit(seaweedfs, prefix: str, cid: str) -> dict:
    body = seaweedfs.client().get_object(Bucket=seaweedfs.BUCKET, Key=f"{prefix}/commit/{cid}")["Body"].read()
    return json.loads(body)


def _cached_indexes(h: Host) -> set[str]:
    d = h.base / "cache" / "cowfs" / "fleet"
    return {f.name for f in d.glob("*/index/*") if not f.name.startswith(".")}


def test_a_commit_names_its_packs_and_pulls_and_fork_pushes_read_only_their_indexes(
        fleet, mount_factory, seaweedfs, etcd, engine_prefix):
    from cowfs.fleet.objects import encode_commit
    from cowfs.kv.base import Batch
    from cowfs.kv.etcd import EtcdKV

    a, b, c, d = fleet("a"), fleet("b"), fleet("c"), fleet("d")
    m = mount_factory()
    for i in range(5):
        (m.path / f"d{i}").mkdir()
        for j in range(4):
            (m.path / f"d{i}" / f"f{j}").write_bytes(os.urandom(70_000))
    snap(m, "base")
    a.json("push", m.path, "base", "origin")
    (m.path / "d0" / "f0").write_bytes(b"fork")
    fork = snap(m, "fork")
    a.json("push", m.path, "fork", "origin")
    other = mount_factory()
    (other.path / "unrelated").write_bytes(os.urandom(100_000))
    snap(other, "other")
    c.json("push", other.path, "other", "origin")                     # a pack nobody else needs
    refs = {r["name"]: r["commit"] for r in a.json("remote", "show", "origin")["refs"]}
    base_c, fork_c, other_c = (_commit(seaweedfs, engine_prefix, refs[n]) for n in ("base", "fork", "other"))
    base_p, fork_p, other_p = set(base_c["packs"]), set(fork_c["packs"]), set(other_c["packs"])
    assert len(base_p) == 1 and len(fork_p) == 2 and base_p < fork_p and len(other_p) == 1, (base_p, fork_p)
    assert not other_p & fork_p

    # A pull reads the indexes of the commit's packs only (no LIST of index/: the other pack's
    # index never reaches b), and they locate every blob of its tree.
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "fork", store_b)
    assert _cached_indexes(b) == fork_p
    fb = mount_factory(store=store_b, branch="fork")
    same_tree(fork, fb.path)
    # A fork pushed from there reads its parent's packs' indexes only, uploads only the change,
    # and its commit names the packs it shares with its parent.
    (fb.path / "d1" / "f1").write_bytes(b"b's change")
    snap(fb, "b-fork")
    pushed = b.json("push", fb.path, "b-fork", "origin")["pushed"]
    assert pushed["files_read"] == 1 and pushed["chunks_new"] == 1 and pushed["bytes_uploaded"] < 20_000, pushed
    assert not _cached_indexes(b) & other_p
    b_c = _commit(seaweedfs, engine_prefix, pushed["commit"])
    assert set(b_c["packs"]) - fork_p and fork_p <= set(b_c["packs"]) and len(b_c["packs"]) == 3
    # The first push of a remote branch from there (no head expected: no parent) reads the
    # indexes of the commit the local branch was last pushed as, not every index either.
    (fb.path / "d1" / "f2").write_bytes(b"on a branch")
    snap(fb, "b-branch")
    pushed = b.json("push", fb.path, "b-branch", "origin", "--branch", "b-work")["pushed"]
    assert pushed["files_read"] == 1 and not _cached_indexes(b) & other_p, pushed
    assert _commit(seaweedfs, engine_prefix, pushed["commit"])["parent"] is None

    # A commit pushed before commits named their packs: a pull reads every index instead.
    old = {k: v for k, v in base_c.items() if k != "packs"}
    cid, data = encode_commit(old)
    seaweedfs.client().put_object(Bucket=seaweedfs.BUCKET, Key=f"{engine_prefix}/commit/{cid}", Body=data)
    kv = EtcdKV(etcd.endpoint, ("snap",), f"cowfs-fleet/{seaweedfs.BUCKET}/{engine_prefix}/".encode())
    batch = Batch()
    batch.put("snap", b"old", cid.encode())
    kv.write(batch, [])
    kv.close()
    store_d = mounting.init_store(d.base / "store")
    d.json("pull", "origin", "old", store_d)
    listed = seaweedfs.client().list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=f"{engine_prefix}/index/")
    assert _cached_indexes(d) == {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} > fork_p | other_p
    same_tree(m.path / ".cowfs" / "snapshots" / "base", mount_factory(store=store_d, branch="old").path)
    assert a.json("remote", "check", "origin", "--verify")["ok"]

    # check names a commit whose pack's index is gone.
    seaweedfs.client().delete_object(Bucket=seaweedfs.BUCKET, Key=f"{engine_prefix}/index/{sorted(other_p)[0]}")
    r = a.cowfs("remote", "check", "origin", check=False)
    assert r.returncode == 1 and f"commit/{refs['other']} names the pack {sorted(other_p)[0]}, which has no index" \
        in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_pull_downloads_each_pack_byte_about_once(fleet, mount_factory, seaweedfs, engine_prefix):
    """Trees are fetched level by level: when they lay between the chunks, each level's ranges
    (covering gaps under 256 KiB) read the chunks around them again (3.1x the pack for Django).
    A pack keeps its trees together after its chunks, and trees a range covers are kept."""
    a, b = fleet("a"), fleet("b")
    m = mount_factory()
    rnd = os.urandom
    for i in range(6):
        for j in range(6):
            d = m.path / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            for k in range(3):
                (d / f"f{k}").write_bytes(rnd(20_000))
    pushed = snap(m, "base")
    a.json("push", m.path, "base", "origin")
    s3 = seaweedfs.client()
    packs = s3.list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=f"{engine_prefix}/data/")["Contents"]
    pack_bytes = sum(o["Size"] for o in packs)
    store_b = mounting.init_store(b.base / "store")
    pulled = b.json("pull", "origin", "base", store_b)["pulled"]
    assert pulled["trees_fetched"] == 43 and pulled["chunks_fetched"] == 108, pulled
    assert pack_bytes <= pulled["bytes_downloaded"] <= 1.02 * pack_bytes, (pulled, pack_bytes)
    same_tree(pushed, mount_factory(store=store_b, branch="base").path)


def test_a_pull_over_an_earlier_pull_applies_every_kind_of_change(fleet, mount_factory):
    """The incremental pull (a branch made from the snapshot of the base, then only the
    difference written) against a fork that changes every kind of thing: content in the
    middle of a big file, a file grown and one shrunk, data turned to a hole and a hole to
    data, hard-link groups changed, a directory replaced by a file and a file by a
    directory, a symlink retargeted, xattrs removed and added, modes and owners changed."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    mounting.make_full_tree(src.path, small_files=40, sparse_size=24 << 20)
    (src.path / "grow").write_bytes(os.urandom(100_000))
    (src.path / "shrink").write_bytes(os.urandom(300_000))
    (src.path / "become-file").mkdir()
    (src.path / "become-file" / "x").write_text("x")
    (src.path / "become-dir").write_text("file")
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    with open(src.path / "big", "r+b") as f:                  # one chunk in the middle
        f.seek(2 << 20)
        f.write(os.urandom(1000))
    with open(src.path / "grow", "ab") as f:
        f.write(os.urandom(200_000))
    os.truncate(src.path / "shrink", 70_000)
    with open(src.path / "sparse", "r+b") as f:               # the head to zeros, a hole to data
        f.write(bytes(4))
        f.seek(10 << 20)
        f.write(b"filled")
    os.unlink(src.path / "dir" / "hardlink-to-text")          # the group loses a name ...
    os.link(src.path / "dir" / "small-003", src.path / "dir" / "sub2-link")   # ... a new one forms
    import shutil
    shutil.rmtree(src.path / "become-file")
    (src.path / "become-file").write_text("now a file")
    os.unlink(src.path / "become-dir")
    (src.path / "become-dir").mkdir()
    (src.path / "become-dir" / "inside").write_text("inside")
    os.unlink(src.path / "dir" / "link")
    os.symlink("sub/deep", src.path / "dir" / "link")
    os.removexattr(src.path / "text", "user.origin")
    os.setxattr(src.path / "dir" / "small-005", "user.new", b"1")
    os.chmod(src.path / "dir" / "small-006", 0o600)
    os.chown(src.path / "dir" / "small-007", 777, 888)
    os.chmod(src.path / "dir" / "sub", 0o755)
    (src.path / "dir" / "sub" / "added").write_text("added")
    os.chmod(src.path / "dir" / "sub", 0o555)
    fork = snap(src, "fork")
    pushed = a.json("push", src.path, "fork", "origin")["pushed"]
    assert pushed["chunks_new"] <= 12, pushed
    store = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "base", store)
    got = b.json("pull", "origin", "fork", store)["pulled"]
    assert got["base"] and got["chunks_fetched"] <= 12 and got["chunks_reused"] > 40, got   # big: 1 of 65 chunks
    dst = mount_factory(store=store, branch="fork")
    same_tree(fork, dst.path)
    assert os.stat(dst.path / "sparse").st_blocks * 512 < 1 << 20


def test_a_held_branch_is_pushed_only_by_its_holder_and_taken_over_once_its_lease_expires(
        fleet, mount_factory, tmp_path):
    import shlex
    a, b = fleet("a"), fleet("b")
    ma = mount_factory()
    (ma.path / "who").write_text("base")
    snap(ma, "c0")
    a.json("push", ma.path, "c0", "origin", "--branch", "dev")
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev")
    mb = mount_factory(store=store_b, branch="dev")
    (ma.path / "who").write_text("a")
    snap(ma, "a1")
    (mb.path / "who").write_text("b")
    snap(mb, "b1")
    marker = tmp_path / "pushed"
    inner = (f"{shlex.join(mounting.cowfs_command())} push {ma.path} a1 origin --branch dev && touch {marker} "
             "&& exec sleep 60")
    hold = subprocess.Popen(mounting.cowfs_command() + ["remote", "hold", "origin", "dev", "--ttl", "3", "--",
                                                        "sh", "-c", inner],
                            env=a.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        mounting.wait_until(lambda: marker.exists() or hold.poll() is not None, "the push inside the hold", 120)
        assert marker.exists(), hold.communicate()
        # B may neither push the branch nor hold it; the messages name the holder.
        r = b.cowfs("push", mb.path, "b1", "origin", "--branch", "dev", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"branch dev of the remote origin is held by {os.uname().nodename} pid {hold.pid}" in r.stderr
        r = b.cowfs("remote", "hold", "origin", "dev", "--", "true", check=False)
        assert r.returncode == 1 and f"is held by {os.uname().nodename} pid {hold.pid} (its lease expires in" \
            in r.stderr, r.stderr
        # A push of a snapshot (not the branch) is not held back.
        b.json("push", mb.path, "b1", "origin")
        # The holder dies: its hold lasts its TTL, then B takes over.
        os.killpg(hold.pid, signal.SIGKILL)
        hold.wait(30)
        died = time.monotonic()
        while True:
            r = b.cowfs("remote", "hold", "origin", "dev", "--ttl", "3", "--", "true", check=False)
            if r.returncode == 0:
                break
            assert "is held by" in r.stderr and time.monotonic() - died < 15, r.stderr
            time.sleep(0.5)
    finally:
        if hold.poll() is None:
            os.killpg(hold.pid, signal.SIGKILL)
            hold.wait(30)
    shown = {(x["kind"], x["name"]): x["commit"] for x in a.json("remote", "show", "origin")["refs"]}
    assert shown[("branch", "dev")] == shown[("snapshot", "a1")]
    r = b.cowfs("remote", "hold", "origin", "dev", "--", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, "the command's exit status is passed on"


def hold_of(mp: Path) -> dict:
    """The first hold of the mount mp's branch (`cowfs stats` holds)."""
    return mounting.stats(mp)["holds"][0]


def write_errno(path: Path, text: str) -> str:
    """"ok" if path could be written (text), else the errno's name."""
    try:
        path.write_text(text)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def branch_holder(kv, branch: str) -> str | None:
    """Who holds the remote branch (the lock `cowfs remote hold` and mounts take), or None."""
    from cowfs.kv.etcd import lease_holder
    value = kv.get("lock", b"branch/" + branch.encode())
    return None if value is None else lease_holder(value)


def test_a_writable_mount_of_a_branch_that_follows_a_remote_branch_holds_it_one_host_at_a_time(
        fleet, mount_factory, etcd, seaweedfs, engine_prefix, tmp_path):
    from cowfs.kv.etcd import EtcdKV
    kv = EtcdKV(etcd.endpoint, ("lock",), f"cowfs-fleet/{seaweedfs.BUCKET}/{engine_prefix}/".encode())
    host = os.uname().nodename
    a, b = fleet("a"), fleet("b")
    store_a = mounting.init_store(a.base / "store")
    ma = mount_factory(store=store_a, env={k: a.env[k] for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")},
                       options=("hold_ttl=3",))
    (ma.path / "who").write_text("a0")
    snap(ma, "c0")
    assert branch_holder(kv, "dev") is None
    # The push makes A's main follow dev: A's mount takes the hold at the keeper's next pass.
    a.json("push", ma.path, "c0", "origin", "--branch", "dev")
    a_holds = f"{host} pid {ma.pid} (a mount of branch main of {store_a})"
    mounting.wait_until(lambda: branch_holder(kv, "dev") == a_holds, "A's mount holding dev", 20)
    # Its own pushes of the branch go on (its hold is theirs).
    (ma.path / "who").write_text("a1")
    snap(ma, "c1")
    a.json("push", ma.path, "c1", "origin", "--branch", "dev")
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev")
    mp = tmp_path / "mnt-b"
    mp.mkdir()
    # B's branch dev follows dev too: a writable mount of it is refused, one line naming A's mount.
    r = b.cowfs("mount", store_b, mp, "--branch", "dev", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert (f"branch dev of {store_b} follows branch dev of the remote origin, which {a_holds} holds (its lease "
            "expires in ") in r.stderr and "mount it with -o ro to read it" in r.stderr, r.stderr
    assert not mounting.is_mounted(mp)
    # Read-only, it mounts (no hold), and B can still pull the branch's new head (a second pull
    # branches from the snapshot of dev through a mount of dev that takes no hold).
    b.cowfs("mount", store_b, mp, "--branch", "dev", "-o", "ro")
    try:
        assert (mp / "who").read_text() == "a1"
        with pytest.raises(OSError) as e:
            (mp / "who").write_text("b")
        assert e.value.errno == errno.EROFS
    finally:
        b.cowfs("umount", mp)
    (ma.path / "who").write_text("a2")
    snap(ma, "c2")
    a.json("push", ma.path, "c2", "origin", "--branch", "dev")
    got = b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev2")["pulled"]
    assert got["base"], got
    r = b.cowfs("mount", store_b, mp, "--branch", "dev2", check=False)
    assert r.returncode != 0 and f"which {a_holds} holds" in r.stderr, r.stderr
    assert branch_holder(kv, "dev") == a_holds
    # A's daemon dies: its hold lasts its lease (3 s), then B's mount takes over.
    mounting.sigkill(ma)
    died = time.monotonic()
    while True:
        r = b.cowfs("mount", store_b, mp, "--branch", "dev2", check=False)
        if r.returncode == 0:
            break
        assert f"which {a_holds} holds" in r.stderr and time.monotonic() - died < 15, r.stderr
        time.sleep(0.5)
    try:
        pid = b.json("stats", mp)["daemon_pid"]
        b_holds = f"{host} pid {pid} (a mount of branch dev2 of {store_b})"
        assert branch_holder(kv, "dev") == b_holds
        holds = b.json("stats", mp)["holds"]
        assert [(h["remote"], h["branch"], h["state"]) for h in holds] == [("origin", "dev", "held")], holds
        (mp / "who").write_text("b")          # writable: B is the writer now
        mounting.ok(mp, "snapshot b1")
        b.json("push", mp, "b1", "origin", "--branch", "dev")
        # The lease is kept alive well past its TTL while the mount lives.
        time.sleep(4)
        assert branch_holder(kv, "dev") == b_holds
    finally:
        b.cowfs("umount", mp)
    # Given back at the unmount: anyone may hold it at once.
    assert branch_holder(kv, "dev") is None
    shown = {(x["kind"], x["name"]): x["commit"] for x in a.json("remote", "show", "origin")["refs"]}
    assert shown[("branch", "dev")] == shown[("snapshot", "b1")]


def test_with_etcd_down_a_mount_of_a_following_branch_stays_writable_and_holds_once_etcd_is_back(
        fleet, mount_factory, etcd_private, seaweedfs, engine_prefix, tmp_path):
    from cowfs.kv.etcd import EtcdKV
    kv = EtcdKV(etcd_private.endpoint, ("lock",), f"cowfs-fleet/{seaweedfs.BUCKET}/{engine_prefix}/".encode())
    a, b = fleet("a", etcd=etcd_private), fleet("b", etcd=etcd_private)
    store_a = mounting.init_store(a.base / "store")
    ma = mount_factory(store=store_a, env={k: a.env[k] for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")},
                       options=("hold_ttl=3",))
    (ma.path / "who").write_text("a0")
    snap(ma, "c0")
    a.json("push", ma.path, "c0", "origin", "--branch", "dev")
    mounting.wait_until(lambda: branch_holder(kv, "dev") is not None, "A's mount holding dev", 20)
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev")

    def holds(h: Host, mp: Path) -> list[tuple[str, str]]:
        return [(x["state"], x.get("holder") or x["detail"]) for x in h.json("stats", mp)["holds"]]

    # Killed just after a renewal: A's lease bounds its writes 2.5 s later (its TTL, 3 s, less the margin).
    mounting.wait_until(lambda: hold_of(ma.path)["renewed_s_ago"] < 0.3, "a fresh renewal of A's hold", 10)
    etcd_private.kill()
    mp = tmp_path / "mnt-b"
    mp.mkdir()
    try:
        # A's mount serves on: reads, writes, snapshots; past its lease's bound it is read-only.
        (ma.path / "who").write_text("a1")
        assert (ma.path / "who").read_text() == "a1"
        snap(ma, "c1")
        mounting.wait_until(lambda: holds(a, ma.path)[0][0] == "lost", "A's hold lost", 30)
        assert write_errno(ma.path / "who", "a2") == "EROFS" and (ma.path / "who").read_text() == "a1"
        snap(ma, "c1b")     # a snapshot changes no tree: still taken
        # B mounts its branch dev writable: etcd is not reached, the hold is taken once it is.
        t0 = time.monotonic()
        b.cowfs("mount", store_b, mp, "--branch", "dev", "-o", "hold_ttl=3")
        assert time.monotonic() - t0 < 30
        (mp / "who").write_text("b1")
        mounting.ok(mp, "snapshot b1")
        state, detail = holds(b, mp)[0]
        assert state == "waiting" and etcd_private.endpoint in detail, (state, detail)
        assert "the hold of branch dev of the remote origin could not be taken" in (store_b / "daemon.log").read_text()
        etcd_private.restart()
        # Exactly one of the two takes the hold; the other says who has it.
        def settled() -> bool:
            got = dict(holds(a, ma.path) + holds(b, mp))
            return sorted(got) == ["held", "taken"] and got["taken"] == branch_holder(kv, "dev")
        mounting.wait_until(settled, "one hold taken again, the other naming it", 30)
        winner, loser = (a, ma.path), (b, mp)
        if holds(b, mp)[0][0] == "held":
            winner, loser = loser, winner
        # The holder writes (A again, if it won: it held the branch before); the other is read-only.
        mounting.wait_until(lambda: write_errno(winner[1] / "who", "w") == "ok", "the holder writable", 10)
        assert write_errno(loser[1] / "who", "l") == "EROFS"
        # Both wrote during the outage: only the holder's push moves the branch.
        r = loser[0].cowfs("push", loser[1], "c1" if loser[0] is a else "b1", "origin", "--branch", "dev",
                           check=False)
        assert r.returncode == 1 and "is held by" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        winner[0].json("push", winner[1], "c1" if winner[0] is a else "b1", "origin", "--branch", "dev")
    finally:
        if not etcd_private.healthy():
            etcd_private.restart()
        if mounting.is_mounted(mp):
            b.cowfs("umount", mp, check=False)


def test_a_mount_whose_hold_another_host_took_over_turns_read_only_and_keeps_what_it_wrote(
        fleet, mount_factory, etcd, seaweedfs, engine_prefix, tmp_path):
    """A's daemon stalls (SIGSTOP) past its lease; B's mount takes the branch over.  A's mount
    then refuses every write-type request with EROFS (root and the sandbox's uid alike), reads
    go on, what it wrote before is all in its store (fsck clean), and its figures, log and
    `cowfs status` name B and when the hold was lost; a snapshot of it pushed under a new name
    keeps its work on the remote, while a push of the branch is refused naming B."""
    from cowfs.kv.etcd import EtcdKV
    kv = EtcdKV(etcd.endpoint, ("lock",), f"cowfs-fleet/{seaweedfs.BUCKET}/{engine_prefix}/".encode())
    host = os.uname().nodename
    a, b = fleet("a"), fleet("b")
    store_a = mounting.init_store(a.base / "store")
    ma = mount_factory(store=store_a, env={k: a.env[k] for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")},
                       options=("hold_ttl=3", "allow_other"))   # allow_other: the sandbox's uid reaches it
    mounting.prepare_writes(ma.path / "root", 0, 0, "root's")
    mounting.prepare_writes(ma.path / "user", UNPRIV_UID, UNPRIV_GID, "user's")
    synced = os.urandom(300_000)
    with open(ma.path / "synced", "wb") as f:
        f.write(synced)
        os.fsync(f.fileno())
    snap(ma, "c0")
    a.json("push", ma.path, "c0", "origin", "--branch", "dev")
    a_holds = f"{host} pid {ma.pid} (a mount of branch main of {store_a})"
    mounting.wait_until(lambda: branch_holder(kv, "dev") == a_holds, "A's mount holding dev", 20)
    store_b = mounting.init_store(b.base / "store")
    b.json("pull", "origin", "dev", store_b, "--branch", "--into", "dev")
    # Written just before the stall, never fsynced: acknowledged, in the daemon's buffers.
    late = os.urandom(200_000)
    (ma.path / "late").write_bytes(late)
    (ma.path / "open").write_bytes(b"before")
    fd = os.open(ma.path / "open", os.O_RDWR)   # a handle open for writing across the loss
    mp = tmp_path / "mnt-b"
    mp.mkdir()
    try:
        with mounting.stopped(ma.pid):
            stalled = time.time()
            while True:     # refused while A's lease lives (3 s at most), then B holds dev
                r = b.cowfs("mount", store_b, mp, "--branch", "dev", "-o", "hold_ttl=3", check=False)
                if r.returncode == 0:
                    break
                assert f"which {a_holds} holds" in r.stderr and time.time() - stalled < 20, r.stderr
                time.sleep(0.3)
        b_holds = f"{host} pid {b.json('stats', mp)['daemon_pid']} (a mount of branch dev of {store_b})"
        assert branch_holder(kv, "dev") == b_holds
        (mp / "who").write_text("b")          # B is the writer now
        # A's lease's bound passed while it was stopped: its writes fail at once, reads go on.
        for d, uid, gid, content in ((ma.path / "root", None, None, "root's"),
                                     (ma.path / "user", UNPRIV_UID, UNPRIV_GID, "user's")):
            got = mounting.try_writes(d, uid, gid)
            assert {op: got[op] for op in mounting.WRITE_OPS} == dict.fromkeys(mounting.WRITE_OPS, "EROFS"), got
            assert got["read"] == got["list"] == "ok", got
            assert got["content"] == content and got["listed"] == ["empty", "f", "victim"], got
        with pytest.raises(OSError) as e:
            mounting.fallocate(fd, 0, 0, 1 << 20)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno == errno.EROFS
        # A write the page cache took is refused when it reaches the daemon (fsync says so) and
        # the kernel's view brought back, as on a full disk.
        os.pwrite(fd, b"AFTER!", 0)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno in (errno.EROFS, errno.EIO)
        try:
            os.close(fd)    # the close reports the refused write (or the kernel's own time update)
        except OSError as exc:
            assert exc.errno in (errno.EROFS, errno.EIO)
        fd = -1
        mounting.wait_until(lambda: (ma.path / "open").read_bytes() == b"before",   # the release's fix is
                            "the kernel's view of the refused write brought back", 10)  # asynchronous
        mounting.fails(ma.path, "rollback c0", "EROFS")
        mounting.fails(ma.path, "clone synced synced2", "EROFS")
        assert (ma.path / "synced").read_bytes() == synced
        assert (ma.path / "late").read_bytes() == late
        # The daemon names the new holder and when the hold was lost.
        mounting.wait_until(lambda: a.json("stats", ma.path)["holds"][0]["state"] == "taken", "A's hold taken", 20)
        st = a.json("stats", ma.path)
        hold = st["holds"][0]
        assert hold["holder"] == b_holds and stalled - 1 < hold["lost_at"] < stalled + 5, (hold, stalled)
        assert st["read_only"]["read_only"] and b_holds in st["read_only"]["why"], st["read_only"]
        inside = json.loads((ma.path / ".cowfs" / "stats").read_text())["read_only"]   # the sandbox's view
        assert inside["read_only"] and "why" not in inside, inside
        assert "branch main is read-only (since " in ma.log_text() and f"is held by {b_holds}" in ma.log_text()
        shown = a.cowfs("status", store_a).stdout
        assert "hold    branch dev of the remote origin: taken since " in shown and f"held by {b_holds}" in shown, shown
        assert "read-only since " in shown, shown
        shown = a.cowfs("stats", ma.path).stdout
        assert "read-only   since " in shown and f"is held by {b_holds}" in shown, shown
        # A's work is kept on the remote under a name of its own; the branch is B's.
        snap(ma, "rescue")
        r = a.cowfs("push", ma.path, "rescue", "origin", "--branch", "dev", check=False)
        assert r.returncode == 1 and f"is held by {b_holds}" in r.stderr, r.stderr
        a.json("push", ma.path, "rescue", "origin", "--as", "a-rescued")
    finally:
        if fd >= 0:
            os.close(fd)
        b.cowfs("umount", mp, check=False)
    ma.stop()
    mounting.fsck(store_a)
    kept = mount_factory(store=store_a, options=("ro",))   # read-only: takes no hold
    assert (kept.path / "synced").read_bytes() == synced and (kept.path / "late").read_bytes() == late
    assert (kept.path / "user" / "f").read_text() == "user's"


def _holding_mount(a: Host, mount_factory) -> mounting.Mount:
    """A mount of a branch that follows the remote branch dev, holding it under a 3 s lease."""
    ma = mount_factory(store=mounting.init_store(a.base / "store"),
                       env={k: a.env[k] for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")}, options=("hold_ttl=3",))
    (ma.path / "f").write_text("0")
    snap(ma, "c0")
    a.json("push", ma.path, "c0", "origin", "--branch", "dev")
    mounting.wait_until(lambda: [h["state"] for h in mounting.stats(ma.path)["holds"]] == ["held"],
                        "the mount holding dev", 20)
    return ma


def test_an_etcd_outage_shorter_than_the_lease_leaves_a_mount_writable(fleet, mount_factory, etcd_private):
    """The other side of the rule (docs/architecture.md, "A mount whose hold is lost turns
    read-only"): etcd stopped for less than the lease's TTL less the margin changes nothing;
    the mount writes on, and its lease, renewed once etcd answers, outlives the bound it had
    when etcd stopped."""
    a = fleet("a", etcd=etcd_private)
    ma = _holding_mount(a, mount_factory)
    mounting.wait_until(lambda: hold_of(ma.path)["renewed_s_ago"] < 0.3, "a fresh renewal", 10)
    with mounting.stopped(etcd_private.process.pid):
        paused = time.monotonic()
        i = 0
        while time.monotonic() - paused < 1.2:      # the bound: 2.5 s after the last renewal
            i += 1
            assert write_errno(ma.path / "f", str(i)) == "ok"
            (ma.path / f"d{i}").mkdir()
            time.sleep(0.1)
    time.sleep(max(0.0, 3.5 - (time.monotonic() - paused)))    # past that bound: renewed since
    assert write_errno(ma.path / "f", "after") == "ok"
    (ma.path / "after").mkdir()
    h, st = hold_of(ma.path), mounting.stats(ma.path)
    assert h["state"] == "held" and h["renewed_s_ago"] < 2.5 and not st["read_only"]["read_only"], (h, st["read_only"])
    assert "read-only" not in ma.log_text()


@pytest.mark.slow
def test_a_mount_whose_lease_lapsed_while_etcd_was_stopped_is_writable_again_once_it_holds_the_branch_again(
        fleet, mount_factory, etcd_private):
    """etcd stopped past the lease: the mount turns read-only at its bound (before etcd can
    expire the lease), says so, and once etcd answers and nobody took the branch, it holds
    it again and is writable again."""
    a = fleet("a", etcd=etcd_private)
    ma = _holding_mount(a, mount_factory)
    mounting.wait_until(lambda: hold_of(ma.path)["renewed_s_ago"] < 0.3, "a fresh renewal", 10)
    with mounting.stopped(etcd_private.process.pid):
        paused = time.monotonic()
        mounting.wait_until(lambda: write_errno(ma.path / "f", "x") == "EROFS", "the mount read-only", 6)
        assert time.monotonic() - paused < 3.0, "read-only no later than its bound, 2.5 s after the last renewal"
        h = hold_of(ma.path)
        assert h["state"] == "lost" and abs(h["lost_at"] - time.time()) < 3, h
        assert mounting.stats(ma.path)["read_only"]["read_only"]
        assert (ma.path / "f").read_text() == "x"     # the last write before the bound; reads go on
        time.sleep(max(0.0, 4.5 - (time.monotonic() - paused)))   # past the TTL: etcd expires the lease
    mounting.wait_until(lambda: write_errno(ma.path / "f", "again") == "ok", "writable again", 20)
    assert hold_of(ma.path)["state"] == "held" and not mounting.stats(ma.path)["read_only"]["read_only"]
    assert "branch main is writable again" in ma.log_text()


# --- lazy mounts: cowfs mount REMOTE:SNAPSHOT MNT --store STORE ----------------------------------


def test_a_lazy_mount_shows_the_pushed_tree_and_fetches_only_what_is_read(fleet, mount_factory):
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    mounting.make_full_tree(src.path, small_files=40, sparse_size=24 << 20)
    big = (src.path / "big").read_bytes()
    pushed = snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store = b.base / "lazy-store"
    mp = b.base / "mnt"
    # lazy_near=0: a read fetches its file's chunks only (the neighbours in the pack: below)
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0"):
        assert fetched(mp)["bytes_fetched"] == 0, "the mount fetched data before any read"
        # The build (in the daemon, before it opened the store) left its figures in lazy.json.
        built = json.loads((store / "lazy.json").read_text())["build"]
        assert (built["files"], built["dirs"], built["hard_links"], built["commits"]) == (45, 3, 1, 1), built
        assert built["remote_chunks"] == 92 and 0 < built["metadata_seconds"] <= built["seconds"], built
        # Reading a file fetches its chunks only: 48 random ones and the 100-byte tail (its
        # 1 MiB of zeros is a hole, never stored nor fetched); four readers at once (the
        # kernel's readahead reads of each run in parallel too) fetch each chunk once.
        got: list[bytes] = []
        readers = [threading.Thread(target=lambda: got.append((mp / "big").read_bytes())) for _ in range(4)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        assert got == [big] * 4
        f = fetched(mp)
        assert f["bytes_fetched"] == (3 << 20) + 100 and f["chunks_fetched"] == 49, f
        assert f["bytes_transferred"] < f["bytes_fetched"] * 1.3, f
        assert "lazy mount  of origin: 49 chunks fetched (3.0 MiB" in b.cowfs("stats", mp).stdout
        assert (mp / "big").read_bytes() == big
        assert fetched(mp)["bytes_fetched"] == (3 << 20) + 100, "the second read fetched again"
        # The whole tree, metadata included (every file read: everything else fetched now).
        same_tree(pushed, mp, names=("pushed", "lazy"))
        assert (mp / "dir" / "hardlink-to-text").stat().st_ino == (mp / "text").stat().st_ino
        assert os.stat(mp / "sparse").st_blocks * 512 < 1 << 20, "holes became data"
        # No chunk left remote: reads no longer look their chunks up for one.
        stats = json.loads((mp / ".cowfs" / "stats").read_text())
        assert stats["remote_chunks"] == 0, stats
        checks = stats["lazy"]["checks"]
        fd = os.open(mp / "big", os.O_RDONLY | os.O_DIRECT)  # past the page cache: the daemon reads
        try:
            assert mounting.direct_pread(fd, 0, 1 << 20) == big[: 1 << 20]
        finally:
            os.close(fd)
        assert fetched(mp)["checks"] == checks, "a read looked for remote chunks where none is left"
    # Unmounted: the fetched chunks are in the store, which fsck finds clean.
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    assert not report["counts"].get("remote_chunks"), "every chunk was read: none is still remote"
    # Mounted again (the same command): served from the store, nothing fetched.
    with lazy_mounted(b, "origin:base", mp, store):
        assert (mp / "big").read_bytes() == big
        same_tree(pushed, mp, names=("pushed", "lazy again"))
        assert fetched(mp)["bytes_fetched"] == 0 and fetched(mp)["checks"] == 0
    # Errors, one line each.  The mountpoint is checked before the build: a lazy mount that
    # cannot mount builds nothing (it used to build the whole store first).
    r = b.cowfs("mount", "origin:base", b.base / "m2", "--store", b.base / "s2", check=False)
    assert r.returncode == 1 and "mountpoint" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (b.base / "s2").exists(), "a lazy mount that could not mount built its store"
    (b.base / "m2").mkdir()
    r = b.cowfs("mount", "origin:nope", b.base / "m2", "--store", b.base / "s2", check=False)
    assert r.returncode == 1 and "the remote origin has no snapshot named 'nope'" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (b.base / "s2").exists(), "a failed build leaves no store"
    r = b.cowfs("mount", "origin:base", b.base / "m2", "--store", src.store, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert (f"{src.store} exists and is not the store of a lazy mount: a lazy mount builds a new store (choose a "
            "path that does not exist, or an empty directory); to have the snapshot as a branch of this cowfs store, "
            f"pull it (its data fetched now): cowfs pull origin base {src.store} --into BRANCH") in r.stderr, r.stderr
    b.json("pull", "origin", "base", src.store, "--into", "pulled")   # the way out it names works
    assert "pulled" in mounting.names(mounting.ok(src.path, "list"), "branches")
    (b.base / "not-a-store").mkdir()
    (b.base / "not-a-store" / "x").write_text("x")
    r = b.cowfs("mount", "origin:base", b.base / "m2", "--store", b.base / "not-a-store", check=False)
    assert r.returncode == 1 and "exists and is not the store of a lazy mount" in r.stderr, r.stderr
    assert "cowfs pull" not in r.stderr and (b.base / "not-a-store" / "x").read_text() == "x"
    r = b.cowfs("mount", "nowhere:base", b.base / "m2", "--store", b.base / "s3", check=False)
    assert r.returncode == 1 and "no remote named 'nowhere'" in r.stderr, r.stderr


def test_a_lazy_read_fetches_its_neighbours_in_the_pack_in_the_same_get(fleet, mount_factory):
    """A push packs a directory's files together: a read of one small file fetches the
    others near it in the pack (-o lazy_near, default 256 KiB) in its one GET, and reading
    them afterwards fetches nothing; what lies farther in the pack stays remote."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    (src.path / "d").mkdir()
    small = {f"m{i:02d}.py": os.urandom(2000 + i) for i in range(40)}
    for name, content in small.items():
        (src.path / "d" / name).write_bytes(content)
    (src.path / "e").mkdir()
    big = os.urandom(4 << 20)
    (src.path / "e" / "big").write_bytes(big)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    with lazy_mounted(b, "origin:base", b.base / "mnt", b.base / "store") as mp:
        assert (mp / "d" / "m07.py").read_bytes() == small["m07.py"]
        f = fetched(mp)
        assert f["gets"] == 1, f
        assert f["chunks_fetched"] >= 40 and f["near_fetched"] == f["chunks_fetched"] - 1, f
        # the 4 MiB file: at most the chunks within 256 KiB of the small files (and one ahead)
        assert f["bytes_fetched"] <= sum(map(len, small.values())) + (256 << 10) + (64 << 10), f
        for name, content in small.items():
            assert (mp / "d" / name).read_bytes() == content, name
        assert {**fetched(mp), "checks": f["checks"]} == f, "reading the neighbours fetched again"
        assert (mp / "e" / "big").read_bytes() == big
        assert fetched(mp)["bytes_fetched"] == sum(map(len, small.values())) + len(big)
    report = mounting.fsck(b.base / "store")
    assert report["clean"] and not report["counts"].get("remote_chunks"), report
    # lazy_near=0: the file read alone, in one GET of its one chunk.
    with lazy_mounted(b, "origin:base", b.base / "mnt0", b.base / "store0", "-o", "lazy_near=0") as mp:
        assert (mp / "d" / "m07.py").read_bytes() == small["m07.py"]
        f = fetched(mp)
        assert (f["gets"], f["chunks_fetched"], f["near_fetched"]) == (1, 1, 0), f
        assert "lazy_near" in b.cowfs("mount", "--help").stdout


def test_a_lazy_mounts_metadata_fetch_overlaps_its_round_trips(fleet, mount_factory, monkeypatch):
    """Before a lazy mount is ready its child fetches the commit, every pack's index and the
    trees (issue 23's ready time): a pack's trees are fetched as soon as its index is in,
    while other indexes still come, not one phase after the other, and handed on as they
    come (the build's child sends them to the daemon before its answer, which decodes them).  The indexes of the
    packs that hold no tree are made slow (0.6 s a GET): the trees' GETs start, and the trees
    are handed on, before those end; the metadata is that of the pushed tree."""
    from cowfs.blob.s3 import S3BlobStore
    from cowfs.fleet import config
    from cowfs.fleet.lazyfetch import Fetch, decoded, fetch_metadata
    from cowfs.fleet.objects import TYPE_TREE
    from cowfs.fleet.remote import Remote

    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    (src.path / "data").mkdir()
    for i in range(8):      # 40 MiB: packs of chunks alone, then the trees (PACK_TARGET: 16 MiB)
        (src.path / "data" / f"f{i}").write_bytes(os.urandom(5 << 20))
    (src.path / "zz" / "sub").mkdir(parents=True)
    (src.path / "zz" / "sub" / "small").write_text("small\n")
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    # Within this process, as host b (its remote, a cache of its own: every index fetched).
    for k, v in b.env.items():
        if k.startswith(("AWS_", "XDG_")):
            monkeypatch.setenv(k, v)
    cfg = config.get("origin")
    with Remote(cfg) as r:
        commit = r.commit(r.get_ref("snap", "base"))
        r.index_commit(commit)
        tree_packs = {loc.pack for loc in r.index.values() if loc.kind == TYPE_TREE}
    others = set(commit["packs"]) - tree_packs
    assert others and tree_packs, (commit["packs"], tree_packs)
    monkeypatch.setenv("XDG_CACHE_HOME", str(b.base / "cache-2"))
    gets: list[tuple[str, float, float]] = []
    get = S3BlobStore.get

    def timed(self, name, offset=0, length=None):
        t0 = time.monotonic()
        if name.startswith("index/") and name[len("index/"):] in others:
            time.sleep(0.6)
        try:
            return get(self, name, offset, length)
        finally:
            gets.append((name, t0, time.monotonic()))
    monkeypatch.setattr(S3BlobStore, "get", timed)
    parts: list[tuple[float, dict]] = []
    meta = fetch_metadata(cfg, "base", lambda part: parts.append((time.monotonic(), part)))
    root = bytes.fromhex(commit["root"]["tree"])
    trees = decoded(meta.trees, root)
    assert {e["name"] for e in trees[root]} == {"data", "zz"}
    assert len(trees) == len(meta.trees) == 4 and meta.indexes == len(commit["packs"]), meta.indexes
    slow_end = min(t1 for n, _t0, t1 in gets if n.startswith("index/") and n[len("index/"):] in others)
    starts = [t0 for n, t0, _t1 in gets if n.startswith("data/")]
    assert starts and max(starts) < slow_end, gets
    # ... and handed on (sent) as they come, before the slow indexes end
    assert parts and max(t for t, _p in parts) < slow_end and {h for _t, p in parts for h in p} == set(meta.trees)
    # The build's child hands them to the daemon so (parts, then the answer), which decodes
    # them: the same metadata, and the trees decoded.
    monkeypatch.setattr(S3BlobStore, "get", get)
    monkeypatch.setenv("XDG_CACHE_HOME", str(b.base / "cache-3"))
    fetch = Fetch(cfg, "base", str(b.base / "no-store"), time.time_ns())
    try:
        handed, handed_trees = fetch.result()
        fetch.rows()
    finally:
        fetch.close()
    assert handed_trees == trees
    assert handed._replace(seconds=0, trees={}) == meta._replace(seconds=0, trees={}) and not handed.trees


def test_a_branch_made_in_a_lazy_mount_is_mounted_and_fetches_on_first_read(fleet, mount_factory):
    """`cowfs mount REMOTE:SNAPSHOT` "or a branch made from it": a branch of the lazy mount's
    store, mounted beside it, reads files never fetched (fetched then, once, by the store's
    daemon) and writes its own; the lazy branch does not see them."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    files = {f"f{i}": os.urandom(150_000 + i) for i in range(4)}
    for name, content in files.items():
        (src.path / name).write_bytes(content)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store = b.base / "store"
    with lazy_mounted(b, "origin:base", b.base / "mnt", store, "-o", "lazy_near=0") as mp:
        assert (mp / "f0").read_bytes() == files["f0"]
        mounting.ok(mp, "branch work")
        (b.base / "mnt-work").mkdir()
        b.cowfs("mount", store, b.base / "mnt-work", "--branch", "work")
        try:
            work = b.base / "mnt-work"
            before = fetched(mp)["chunks_fetched"]
            assert {n: (work / n).read_bytes() for n in files} == files
            assert fetched(work)["chunks_fetched"] > before, "nothing fetched for the branch's reads"
            (work / "f1").write_bytes(b"the branch's own")
            assert (mp / "f1").read_bytes() == files["f1"]
            assert (mp / "f2").read_bytes() == files["f2"]
        finally:
            b.cowfs("umount", b.base / "mnt-work", check=False)
    mounting.fsck(store)


def test_lazy_writes_push_and_a_remote_down(fleet, mount_factory, seaweedfs_killable, engine_prefix):
    sw = seaweedfs_killable
    a, b = fleet("a", s3=sw), fleet("b", s3=sw)
    src = mount_factory()
    data = {f"f{i}": os.urandom(200_000) for i in range(5)}
    push_files(a, src, data)
    store, mp = b.base / "lazy-store", b.base / "mnt"
    # lazy_near=0: the files lie next to each other in one pack, and f2 must stay unfetched
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0"):
        # A write into a chunk never read: the chunk is fetched first, then changed (CoW).
        with open(mp / "f0", "r+b") as f:
            f.seek(70_000)
            f.write(b"0123456789")
        want = bytearray(data["f0"])
        want[70_000:70_010] = b"0123456789"
        # (the kernel reads the page it writes in part: that read fetches chunk 1 and the rest
        # of the file ahead of it, never chunk 0)
        assert 1 <= fetched(mp)["chunks_fetched"] <= 3, fetched(mp)
        assert (mp / "f0").read_bytes() == want
        assert (mp / "f1").read_bytes() == data["f1"]
        # S3 down: fetched data keeps serving, an unfetched file fails with EIO (at once, in
        # one log line naming the remote), writes go on.
        sw.kill()
        t0 = time.monotonic()
        assert (mp / "f1").read_bytes() == data["f1"]
        with pytest.raises(OSError) as e:
            (mp / "f2").read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 30
        log = (store / "daemon.log").read_text()
        lines = [ln for ln in log.splitlines() if "could not be fetched from the remote origin" in ln]
        assert len(lines) == 1, log[-3000:]
        (mp / "f3").write_bytes(b"new while the remote is down")
        mounting.syncfs(mp)
        sw.start()
        # Back: the failed file reads (after the few seconds a failure makes reads fail fast).
        mounting.wait_until(lambda: _reads(mp / "f2") == data["f2"], "f2 readable once S3 is back", timeout=30)
    # f4 was never read: fsck counts its 4 chunks as remote, not missing.
    report = mounting.fsck(store)
    assert report["counts"]["remote_chunks"] == 4, report["counts"]
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0"):
        assert (mp / "f0").read_bytes() == want, "a write to a lazy file did not survive the remount"
        assert (mp / "f3").read_bytes() == b"new while the remote is down"
        # A snapshot of the lazy branch is pushed: only the two files written are read (the
        # build filled the stat cache), so f4 stays unfetched; a lazy mount of it elsewhere is
        # exactly it.
        changed = snap(_At(mp), "changed")
        before = fetched(mp)["bytes_fetched"]
        pushed = b.json("push", mp, "changed", "origin")["pushed"]
        assert pushed["files_read"] == 2 and pushed["files_cached"] == 3, pushed
        assert fetched(mp)["bytes_fetched"] == before, "the push fetched unchanged files"
        with lazy_mounted(a, "origin:changed", a.base / "mnt2", a.base / "lazy2") as mp2:
            same_tree(changed, mp2, names=("lazy snapshot", "its lazy mount"))
            assert (mp2 / "f4").read_bytes() == data["f4"]
    # (comparing the trees read f4 through the snapshot of store b too: nothing is remote now)
    assert not mounting.fsck(store)["counts"].get("remote_chunks")


def test_a_sandbox_user_reads_a_lazy_mount_only_where_permissions_allow(fleet, mount_factory, test_dir):
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    (src.path / "shared").write_bytes(os.urandom(100_000))
    os.chmod(src.path / "shared", 0o644)
    (src.path / "root-only").write_bytes(os.urandom(100_000))
    os.chmod(src.path / "root-only", 0o600)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    # lazy_near=0: root-only lies next to shared in the pack (fetching it would show nothing to
    # uid 65534 either, but the counts below are of the files read)
    with lazy_mounted(b, "origin:base", test_dir / "mnt", b.base / "store", "-o", "allow_other,lazy_near=0") as mp:
        r = mounting.run_as(UNPRIV_UID, UNPRIV_GID, ["cat", str(mp / "root-only")])
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
        assert fetched(mp)["bytes_fetched"] == 0, "a refused open fetched data"
        r = mounting.run_as(UNPRIV_UID, UNPRIV_GID, ["sha256sum", str(mp / "shared")])
        want = hashlib.sha256((src.path / "shared").read_bytes()).hexdigest()
        assert r.returncode == 0 and r.stdout.split()[0] == want, r
        assert fetched(mp)["bytes_fetched"] == 100_000


class _At:
    """What snap() needs of a mount: its path."""

    def __init__(self, path: Path) -> None:
        self.path = path


def _reads(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except OSError:
        return None


def _odirect_pwrite(path: Path, off: int, data: bytes) -> None:
    """pwrite past the kernel's page cache (no read of the page first): the daemon sees it as is."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        mounting.direct_pwrite(fd, off, data)
    finally:
        os.close(fd)


def test_lazy_files_written_cut_cloned_and_read_at_once(fleet, mount_factory, test_dir):
    """Files of a lazy mount whose chunks are all still remote: two threads read one chunk at
    once; O_DIRECT writes into unfetched chunks (in part, and past EOF into the last chunk);
    a truncate into an unfetched chunk and back out; a punched hole; a clone and a snapshot
    of an unfetched file; what uid 65534 may read and write; fsck and gc on the store
    afterwards, and a remount. The bytes match a model throughout."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    rnd = random.Random(7)
    model = {"big": bytearray(rnd.randbytes(20 * 65536 + 5000)), "tail": bytearray(rnd.randbytes(65536 + 3000)),
             "cut": bytearray(rnd.randbytes(4 * 65536)), "hole": bytearray(rnd.randbytes(3 * 65536)),
             "secret": bytearray(b"s" * 70000)}
    model["dup"] = bytearray(model["big"][:8 * 65536])
    for name, data in model.items():
        (src.path / name).write_bytes(data)
    os.chmod(src.path / "secret", 0o600)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", test_dir / "lazy-mnt"  # a path uid 65534 can reach
    mp.mkdir(parents=True, exist_ok=True)
    b.cowfs("mount", "origin:base", mp, "--store", store, "-o", "allow_other", timeout=300)
    try:
        # Two readers of one unfetched chunk at once (and of the chunks ahead of it).
        outs: dict[int, bytes] = {}

        def reader(k: int) -> None:
            with open(mp / "big", "rb") as f:
                f.seek(3 * 65536)
                outs[k] = f.read(4 * 65536)
        ts = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert all(outs[k] == model["big"][3 * 65536:7 * 65536] for k in range(4))
        # O_DIRECT writes: in part into an unfetched chunk; past EOF into the unfetched last chunk.
        for name, off, n in (("big", 10 * 65536 + 8192, 4096), ("tail", 65536 + 8192, 8192),
                             ("dup", 5 * 65536 + 4096, 4096)):
            data = rnd.randbytes(n)
            _odirect_pwrite(mp / name, off, data)
            m = model[name]
            if len(m) < off:
                m.extend(bytes(off - len(m)))
            m[off:off + n] = data
        for name in ("big", "tail", "dup"):
            assert mounting.direct_read_all(mp / name) == model[name], name
        # A truncate into an unfetched chunk, then back out; a punched hole in part of one.
        os.truncate(mp / "cut", 2 * 65536 + 100)
        os.truncate(mp / "cut", 3 * 65536)
        model["cut"] = model["cut"][:2 * 65536 + 100] + bytes(3 * 65536 - (2 * 65536 + 100))
        fd = os.open(mp / "hole", os.O_RDWR)
        try:
            mounting.fallocate(fd, 0x03, 65536 + 1000, 3000)  # PUNCH_HOLE | KEEP_SIZE
        finally:
            os.close(fd)
        model["hole"][65536 + 1000:65536 + 4000] = bytes(3000)
        for name in ("cut", "hole"):
            assert mounting.direct_read_all(mp / name) == model[name], name
        # A clone and a snapshot of files never read.
        mounting.ok(mp, "clone dup dup2")
        mounting.ok(mp, "snapshot s1")
        assert (mp / "dup2").read_bytes() == model["dup"]
        assert (mp / ".cowfs/snapshots/s1/big").read_bytes() == model["big"]
        # uid 65534: may read what the modes allow, not the 0600 file (nor fetch it).
        r = mounting.run_as(UNPRIV_UID, UNPRIV_GID, ["cat", mp / "secret"])
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
        r = mounting.run_as(UNPRIV_UID, UNPRIV_GID, ["sha256sum", mp / "tail", mp / "big"])
        assert r.returncode == 0, r.stderr
        r = mounting.run_as(UNPRIV_UID, UNPRIV_GID, ["sh", "-c", f"echo x > {mp}/big"])
        assert r.returncode != 0, "uid 65534 wrote a file of root's (0644)"
    finally:
        b.cowfs("umount", mp, check=False, timeout=120)
        if mounting.is_mounted(mp):
            mounting.lazy_unmount(mp)
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    b.cowfs("gc", store, timeout=300)
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    with lazy_mounted(b, "origin:base", mp, store):
        for name, data in model.items():
            assert mounting.direct_read_all(mp / name) == data, f"{name} after gc and a remount"
        assert (mp / "dup2").read_bytes() == model["dup"]
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]


def test_lazy_append_past_an_unfetched_chunk_while_the_remote_is_down(fleet, mount_factory, seaweedfs_killable):
    """An append to a lazy file whose last chunk (in part before EOF) is still remote, the
    remote down: the kernel sends the write without reading the page (it starts at a page
    boundary at EOF), so nothing fetched that chunk. The write must fail alone (EIO): acked,
    it would leave a buffer no flush can merge, and every later commit of the mount failed."""
    sw = seaweedfs_killable
    a, b = fleet("a", s3=sw), fleet("b", s3=sw)
    src = mount_factory()
    data = os.urandom(65536 + 8192)  # EOF at a page boundary inside chunk 1
    (src.path / "f").write_bytes(data)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", b.base / "mnt"
    with lazy_mounted(b, "origin:base", mp, store):
        sw.kill()
        try:
            fd = os.open(mp / "f", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"appended")
                os.fsync(fd)
                appended = True
            except OSError as e:
                assert e.errno == errno.EIO, e
                appended = False
            finally:
                os.close(fd)
            # The rest of the mount works: a new directory and file commit.
            os.mkdir(mp / "d")
            (mp / "d" / "g").write_bytes(b"new")
            fd = os.open(mp / "d" / "g", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            sw.start()
        want = data + b"appended" if appended else data
        mounting.wait_until(lambda: _reads(mp / "f") == want, "f readable once S3 is back", timeout=30)
    with lazy_mounted(b, "origin:base", mp, store):
        assert (mp / "f").read_bytes() == want
        assert (mp / "d" / "g").read_bytes() == b"new"
    assert mounting.fsck(store)["clean"]


def test_lazy_mount_killed_during_fetches_mounts_again_clean(fleet, mount_factory):
    """SIGKILL of a lazy mount's daemon while a reader's fetches are in flight (chunks fetched,
    some committed as local objects, some not): fsck finds the store clean, and the same
    command mounts it again, where the file reads whole and right."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    data = os.urandom(16 << 20)
    (src.path / "big").write_bytes(data)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", b.base / "mnt"
    with lazy_mounted(b, "origin:base", mp, store):
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                with open(mp / "big", "rb") as f:
                    while f.read(1 << 20):
                        pass
            except OSError as e:
                errors.append(e)
        t = threading.Thread(target=reader)
        t.start()
        mounting.wait_until(lambda: fetched(mp)["chunks_fetched"] >= 16, "some chunks fetched", timeout=60)
        pids = mounting.pids_mentioning(mp)
        assert pids, "no daemon found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        mounting.lazy_unmount(mp)
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    assert report["counts"].get("remote_chunks"), "the kill came after every chunk was fetched"
    with lazy_mounted(b, "origin:base", mp, store):
        assert (mp / "big").read_bytes() == data
    report = mounting.fsck(store)
    assert report["clean"] and not report["counts"].get("remote_chunks"), report


def _procs(field: int, value: int) -> list[int]:
    """The processes whose /proc/PID/stat field (1: ppid, 3: session) is value."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[field]) == value:
                out.append(int(d))
    return out


def test_a_lazy_build_killed_midway_is_built_again_by_the_next_mount(fleet, mount_factory):
    """SIGKILL of the daemon while it builds a lazy mount's store: the mount fails in one
    line, the process fetching the metadata dies with it, and the same command then finds the
    half-built store (its lazy.building names a dead builder), empties it and builds it
    again, clean.  A store whose builder still runs is refused in one line."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory()
    for d in range(20):
        (src.path / f"d{d}").mkdir()
        for f in range(100):
            (src.path / f"d{d}" / f"f{f}").write_bytes(os.urandom(100 + f))
    pushed = snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", b.base / "mnt"
    mp.mkdir()
    p = subprocess.Popen(mounting.cowfs_command() + ["mount", "origin:base", str(mp), "--store", str(store)],
                         env=b.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The daemon (the CLI's child) forks the metadata fetch: stopped, it holds the build
        # where the store exists (made meanwhile) and the tree is not written yet.
        daemon = mounting.wait_until(lambda: _procs(1, p.pid), "the daemon", timeout=60)[0]
        fetch = mounting.wait_until(lambda: _procs(1, daemon), "the metadata fetch", timeout=60)[0]
        os.kill(fetch, signal.SIGSTOP)
        marker = store / "lazy.building"
        building = mounting.wait_until(lambda: marker.exists() and json.loads(marker.read_text() or "null"),
                                       "the build's marker", timeout=120)
        assert building["pid"] == daemon
        os.kill(daemon, signal.SIGKILL)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "the daemon exited before mounting" in err.decode(), err
    assert not mounting.is_mounted(mp)
    mounting.wait_until(lambda: not _procs(3, daemon), "the build's processes gone", timeout=20)
    assert marker.exists() and not (store / "lazy.json").exists()
    # Its builder alive (this process, for the test), the store is refused, left as it is.
    marker.write_text(json.dumps(dict(building, pid=os.getpid())))
    r = b.cowfs("mount", "origin:base", mp, "--store", store, check=False)
    assert r.returncode == 1 and f"is being built by process {os.getpid()}" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and marker.exists()
    marker.write_text(json.dumps(building))
    with lazy_mounted(b, "origin:base", mp, store):
        same_tree(pushed, mp, names=("pushed", "built again"))
    assert not marker.exists()
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]


def _read_all(root: Path, rels: list[str]) -> dict[str, bytes]:
    return {r: (root / r).read_bytes() for r in rels}


def test_a_lazy_mount_fetches_the_pushed_cold_start_ahead_of_its_workload(
        fleet, mount_factory, seaweedfs_killable, engine_prefix):
    """The source store learns which files its mounts read first; the push sends them (warm/<id>,
    named by the commit); a lazy mount of the snapshot fetches exactly those chunks before any
    read, and the same workload then fetches nothing more.  A commit without one (a store
    that learned nothing: as every commit pushed before) warms nothing.  A remote down stops
    the warming with one log line, the mount serving on."""
    sw = seaweedfs_killable
    a, b = fleet("a", s3=sw), fleet("b", s3=sw)
    src = mount_factory()
    rng = random.Random(23)
    work = [f"pkg/m{i}.py" for i in range(12)] + [f"pkg/sub/s{i}.py" for i in range(5)]
    (src.path / "pkg" / "sub").mkdir(parents=True)
    (src.path / "data").mkdir()
    for r in work:
        (src.path / r).write_bytes(rng.randbytes(rng.randrange(1_000, 200_000)))
    for i in range(4):
        (src.path / "data" / f"blob{i}").write_bytes(rng.randbytes(2 << 20))
    src.remount()               # a cold start: the workload's reads are what the model learns
    want = _read_all(src.path, work)
    work_bytes = sum(map(len, want.values()))
    work_chunks = sum((len(v) + (64 << 10) - 1) >> 16 for v in want.values())
    snap(src, "base")
    pushed = a.json("push", src.path, "base", "origin")["pushed"]
    assert pushed["warm_files"] == len(work) and pushed["warm_chunks"] == work_chunks, pushed
    commit = _commit(sw, engine_prefix, pushed["commit"])
    assert commit["warm"], commit
    assert a.json("remote", "check", "origin")["ok"]
    # The same tree pushed again under its name: the same commit (the warm object is content-addressed).
    assert a.json("push", src.path, "base", "origin")["pushed"]["commit"] == pushed["commit"]
    # Another commit naming the same warm object (a file outside the cold start changed):
    # with the object gone, `remote check` names both references (it fetches the object once).
    (src.path / "data" / "blob3").write_bytes(rng.randbytes(1 << 20))
    snap(src, "other")
    other = a.json("push", src.path, "other", "origin")["pushed"]
    assert other["commit"] != pushed["commit"] and _commit(sw, engine_prefix, other["commit"])["warm"] == commit["warm"]
    s3, key = sw.client(), f"{engine_prefix}/warm/{commit['warm']}"
    body = s3.get_object(Bucket=sw.BUCKET, Key=key)["Body"].read()
    s3.delete_object(Bucket=sw.BUCKET, Key=key)
    r = a.cowfs("remote", "check", "origin", check=False)
    assert r.returncode == 1 and sorted(r.stdout.splitlines()) == [
        f"snap/{n}: warm/{commit['warm']} is missing" for n in ("base", "other")], r.stdout
    s3.put_object(Bucket=sw.BUCKET, Key=key, Body=body)
    a.cowfs("remote", "delete", "origin", "other")

    store, mp = b.base / "lazy-store", b.base / "mnt"
    # lazy_near=0: the data files lie next to the workload's in the pack (reading one must fetch it alone)
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0"):
        mounting.wait_until(lambda: fetched(mp)["warming"]["state"] == "done", "the warming to finish", timeout=60)
        f = fetched(mp)
        assert f["chunks_fetched"] == work_chunks and f["bytes_fetched"] == work_bytes, f
        assert f["warming"]["fetched"] == work_chunks and f["warming"]["bytes"] == work_bytes, f
        assert f["warming"]["gets"] <= f["gets"], f
        # The workload: everything it reads is local already.
        assert _read_all(mp, work) == want
        assert fetched(mp)["chunks_fetched"] == work_chunks, "the workload fetched what the warming had not"
        # What the cold start did not read stays remote until read.
        assert (mp / "data" / "blob0").read_bytes() == (src.path / "data" / "blob0").read_bytes()
        assert fetched(mp)["chunks_fetched"] == work_chunks + 32
    report = mounting.fsck(store)
    assert report["clean"], report["problems"]
    assert report["counts"]["remote_chunks"] == 3 * 32, report["counts"]
    # Mounted again: what is local is skipped without a GET.
    with lazy_mounted(b, "origin:base", mp, store):
        mounting.wait_until(lambda: fetched(mp)["warming"]["state"] == "done", "the warming to finish", timeout=60)
        f = fetched(mp)
        assert f["gets"] == 0 and f["warming"]["skipped"] == work_chunks, f

    # A store that learned nothing (prefetch and learning off): its commit has no warm object,
    # and a lazy mount of it fetches nothing before a read, as before.
    plain = mount_factory(options=("prefetch=0", "prefetch_learn=0"))
    for r in work[:3]:
        (plain.path / r).parent.mkdir(parents=True, exist_ok=True)
        (plain.path / r).write_bytes(want[r])
    _read_all(plain.path, work[:3])
    snap(plain, "plain")
    p = a.json("push", plain.path, "plain", "origin")["pushed"]
    assert p["warm_files"] == 0 and "warm" not in _commit(sw, engine_prefix, p["commit"])
    with lazy_mounted(b, "origin:plain", b.base / "mnt2", b.base / "lazy2") as mp2:
        time.sleep(1)
        f = fetched(mp2)
        assert f["chunks_fetched"] == 0 and f["warming"]["state"] == "none", f
        assert _read_all(mp2, work[:3]) == {r: want[r] for r in work[:3]}

    # The remote down: the warming stops with one log line; metadata keeps serving.
    store3, mp3 = b.base / "lazy3", b.base / "mnt3"
    b.env["COWFS_FAULTS"] = "lazy_warming:eio"     # the first mount (the build) warms nothing
    with lazy_mounted(b, "origin:base", mp3, store3):
        mounting.wait_until(lambda: fetched(mp3)["warming"]["state"] == "failed", "the fault", timeout=30)
        assert fetched(mp3)["chunks_fetched"] == 0
    del b.env["COWFS_FAULTS"]
    sw.kill()
    try:
        with lazy_mounted(b, "origin:base", mp3, store3):
            mounting.wait_until(lambda: fetched(mp3)["warming"]["state"] == "failed", "the warming to stop",
                                timeout=30)
            assert sorted(os.listdir(mp3 / "pkg")) == sorted(["sub", *(r[4:] for r in work[:12])])
            assert fetched(mp3)["chunks_fetched"] == 0
            with pytest.raises(OSError) as e:
                (mp3 / work[0]).read_bytes()
            assert e.value.errno == errno.EIO
        log = (store3 / "daemon.log").read_text()
        stopped = [ln for ln in log.splitlines() if "lazy warming stopped" in ln]
        assert len(stopped) == 2 and "could not be fetched from the remote origin" in stopped[1], stopped
    finally:
        sw.start()


def test_a_lazy_mount_prefetches_what_the_pushing_hosts_model_learned_and_survives_a_bad_model(
        fleet, mount_factory, seaweedfs, engine_prefix):
    """The source store's learned prefetch model (which file is opened after which, which
    chunks of each are read) goes with the snapshot (model/<id>, named by the commit); a lazy
    mount's build seeds its branch with it, so its first open fetches ahead the files the
    source's workload read next, and the rest of the workload fetches nothing.  A model object
    damaged or missing: the mount works, without predictions, and says why in one log line."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory(options=("warm_window=2",))
    os.listdir(src.path)        # the mount's first touch: its cold start's window opens ...
    time.sleep(2.5)             # ... and closes (2 s): what follows is learned as transitions only
    (src.path / "pkg").mkdir()
    names = [f"pkg/m{i:02d}" for i in range(12)]
    rng = random.Random(42)
    want = {n: rng.randbytes(3 << 16) for n in names}        # 3 chunks each
    for n, data in want.items():
        (src.path / n).write_bytes(data)
    for _round in range(3):     # past the page cache: every read reaches the daemon's model
        for n in names:
            fd = os.open(src.path / n, os.O_RDONLY | os.O_DIRECT)
            try:
                assert mounting.direct_pread(fd, 0, 3 << 16) == want[n]
            finally:
                os.close(fd)
    snap(src, "learned")
    pushed = a.json("push", src.path, "learned", "origin")["pushed"]
    assert pushed["model_files"] == 12 and pushed["model_transitions"] >= 2 * 11, pushed
    assert pushed["warm_chunks"] == 0, "the files lie outside the cold start: only the model predicts them"
    mid = _commit(seaweedfs, engine_prefix, pushed["commit"])["model"]
    assert a.json("remote", "check", "origin")["ok"]

    store, mp = b.base / "lazy-store", b.base / "mnt"
    with lazy_mounted(b, "origin:learned", mp, store, "-o", "lazy_near=0"):
        built = json.loads((store / "lazy.json").read_text())["build"]
        assert built["model_files"] == 12 and built["model_transitions"] >= 22, built
        assert fetched(mp)["chunks_fetched"] == 0
        assert (mp / names[0]).read_bytes() == want[names[0]]      # the first open predicts the other 11
        # chunks_fetched counts a fetch at its GET (in the worker thread), the prefetch's own
        # `fetched` only after that fetch's commit (a part of <= 2 MiB at a time: 32 + 1 chunks
        # here): 36 alone may be read between the last part's GET and its commit.
        f = mounting.wait_until(lambda: (f := fetched(mp))["chunks_fetched"] == 36 and f["prefetch"]["fetched"] >= 33
                                and f, "the predicted files fetched ahead and committed", 60)
        assert f["prefetch"]["files"] >= 11, f
        assert f["prefetch"]["gets"] < 33, "fetched ahead in runs of neighbouring blobs, not a GET per chunk"
        gets = f["gets"]
        assert _read_all(mp, names) == want
        f = fetched(mp)
        assert f["chunks_fetched"] == 36 and f["gets"] == gets, "the workload fetched what the model had predicted"
    assert mounting.fsck(store)["clean"]

    # The model object damaged, then missing: the mount works, learns afresh, and says why.
    s3 = seaweedfs.client()
    key = f"{engine_prefix}/model/{mid}"
    for how, damage, says in [("damaged", lambda: s3.put_object(Bucket=seaweedfs.BUCKET, Key=key, Body=b"{}"),
                               f"model/{mid}: its content does not hash to its name"),
                              ("missing", lambda: s3.delete_object(Bucket=seaweedfs.BUCKET, Key=key),
                               f"lacks model/{mid}, which the commit names")]:
        damage()
        store = b.base / f"lazy-{how}"
        with lazy_mounted(b, "origin:learned", mp, store, "-o", "lazy_near=0"):
            assert (mp / names[0]).read_bytes() == want[names[0]]
            assert _read_all(mp, names) == want
            f = fetched(mp)
            assert f["prefetch"]["files"] == 0 and f["chunks_fetched"] == 36, f
            lines = [ln for ln in (store / "daemon.log").read_text().splitlines()
                     if "prefetch model pushed with the snapshot is not used" in ln]
            assert len(lines) == 1 and says in lines[0], lines
        assert json.loads((store / "lazy.json").read_text())["build"]["model_files"] == 0
        r = a.cowfs("remote", "check", "origin", check=False)
        assert r.returncode == 1 and f"model/{mid}" in r.stdout, r.stdout


def test_a_lazy_mounts_space_figures_count_the_bytes_on_the_remote_apart_from_compression(fleet, mount_factory):
    """Chunks still on the remote (F objects) take no encoding here: they are `remote_bytes`,
    not bytes saved by compression; the identity unique = stored + compression saved + delta
    saved + remote holds at every point, and fetching moves bytes from remote to stored."""
    a, b = fleet("a"), fleet("b")
    src = mount_factory(options=("dedup=off",))
    rng = random.Random(3)
    noise, text = rng.randbytes(5 << 16), b"".join(b"line %d of a text that compresses\n" % i for i in range(6000))
    (src.path / "noise").write_bytes(noise)
    (src.path / "text").write_bytes(text)
    snap(src, "base")
    a.json("push", src.path, "base", "origin")
    store, mp = b.base / "lazy-store", b.base / "mnt"

    def space() -> dict:
        s = json.loads((mp / ".cowfs" / "stats").read_text())
        assert s["unique_bytes"] == (s["chunk_bytes"] + s["compression_saved_bytes"] + s["delta_saved_bytes"]
                                     + s["remote_bytes"]), s
        return s
    with lazy_mounted(b, "origin:base", mp, store, "-o", "lazy_near=0,dedup=off"):
        s = space()
        assert s["remote_bytes"] == len(noise) + len(text) == s["unique_bytes"], s
        assert s["compression_saved_bytes"] == 0, "nothing is stored here yet: nothing was saved by compression"
        assert "still on the remote of a lazy mount" in b.cowfs("stats", mp).stdout
        assert (mp / "noise").read_bytes() == noise       # incompressible: stored raw, nothing saved
        s = space()
        assert s["remote_bytes"] == len(text) and s["compression_saved_bytes"] <= 0, s
        assert (mp / "text").read_bytes() == text
        s = space()
        assert s["remote_bytes"] == 0 and s["compression_saved_bytes"] > len(text) // 2, s
        assert "still on the remote" not in b.cowfs("stats", mp).stdout
    assert mounting.fsck(store)["clean"]
