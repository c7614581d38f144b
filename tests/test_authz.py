"""The authorization model (docs/architecture.md, "Authorization") on real mounts, as the
unprivileged agent user and as root.

The setup (``sbx``) is an orchestrator's: store S with branch main mounted at A (root's, with
allow_other); branches agent-b and agent-c made from main and mounted as forks B and C; B's
root chowned to the agent (UNPRIV_UID), which then works at B with nothing but the mount.
main has the snapshot before-step and the branch a-child; agent-c has the snapshot c-snap and
the branch c-child.  Through B's control file the agent (and root too) reaches only what
agent-b owns; the store's administrator (root, or the store's owner) reaches everything
through `cowfs delete|list STORE`, never a mounted branch.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Forks, Mount, Worker, run_cowfs

AGENT = UNPRIV_UID
FOREIGN = ("before-step", "main", "agent-c", "c-snap", "c-child", "a-child")  # none is agent-b's
ABSENT = "never-was"


@dataclass
class Sbx:
    a: Mount
    b: Path
    c: Path
    store: Path
    forks: Forks
    agent: Worker


def ctl(mp, line: str) -> tuple[int, dict]:
    """A command through mp's control file, as root: (errno of the write, reply)."""
    err, out = mounting.call_with_timeout(mounting.ctl_exchange, mp, line.encode() + b"\n", timeout=60)
    return err, json.loads(out)


def ok(mp, line: str) -> dict:
    err, reply = ctl(mp, line)
    assert err == 0 and reply["ok"], f"{line!r} at {mp}: {reply}"
    return reply


def actl(sbx: Sbx, line: str) -> tuple[int, dict]:
    """A command through B's control file as the agent."""
    r = sbx.agent.call("ctl_exchange", str(sbx.b), line.encode() + b"\n", timeout=60)
    assert r[0] == "ok", f"the agent cannot use B's control file: {r}"
    err, out = r[1]
    return err, json.loads(out)


def aok(sbx: Sbx, line: str) -> dict:
    err, reply = actl(sbx, line)
    assert err == 0 and reply["ok"], f"agent {line!r}: {reply}"
    return reply


def afails(sbx: Sbx, line: str, errname: str) -> dict:
    err, reply = actl(sbx, line)
    assert not reply["ok"] and reply["errno"] == errname and errno.errorcode.get(err) == errname, \
        f"agent {line!r}: expected {errname}, got {reply}"
    return reply


def names(reply: dict, key: str) -> set[str]:
    return {r["name"] for r in reply[key]}


def agent_cli(*args) -> subprocess.CompletedProcess:
    """The cowfs CLI run by the agent user."""
    return mounting.run_cowfs_as(AGENT, UNPRIV_GID, *args, check=False)


def listing(store) -> dict:
    r = run_cowfs("list", store, "--json", timeout=120)
    return json.loads(r.stdout)


@pytest.fixture
def sbx(mount_factory, test_dir):
    store = test_dir / "store"
    mounting.init_store(store)
    a = mount_factory(store=store, options=["allow_other"])
    (a.path / "f").write_bytes(b"main's file")
    ok(a.path, "snapshot before-step")
    ok(a.path, "branch a-child")
    ok(a.path, "branch agent-b")
    ok(a.path, "branch agent-c")
    forks = Forks(test_dir)
    agent = None
    try:
        b = forks.mount(store, "agent-b")
        c = forks.mount(store, "agent-c")
        os.chown(b, AGENT, UNPRIV_GID)  # the orchestrator hands B to the agent
        (c / "c-file").write_bytes(b"C's file")
        ok(c, "snapshot c-snap")
        ok(c, "branch c-child")
        agent = Worker(uid=AGENT, gid=UNPRIV_GID)
        yield Sbx(a, b, c, store, forks, agent)
    finally:
        if agent is not None:
            agent.close()
        problems = [p for p in forks.close() if "still mounted" not in p]
        assert not problems, problems


def stop_all(sbx: Sbx) -> None:
    """Unmount every fork and A: the daemon exits (it serves the forks after A goes)."""
    for mp in sbx.forks.mps:
        if mounting.is_mounted(mp):
            sbx.forks.umount(mp)
    if mounting.is_mounted(sbx.a.path):
        run_cowfs("umount", sbx.a.path, timeout=60)
    try:
        rc = sbx.a.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not exit after its last mount went")
    sbx.a.exit_codes.append(rc)  # a clean stop, as Mount.stop records it
    assert rc == 0, rc


# ============================================================================================

@pytest.mark.timeout(240)
def test_agent_cannot_delete_roots_snapshot(sbx):
    """The issue's first finding: `cowfs delete B before-step` as the agent deleted root's
    snapshot on main (root's later `cowfs rollback A before-step` failed ENOENT)."""
    r = agent_cli("delete", sbx.b, "before-step")
    assert r.returncode != 0 and b"no snapshot or branch named 'before-step'" in r.stderr, r
    r = agent_cli("rollback", sbx.b, "before-step")
    assert r.returncode != 0, r
    (sbx.a.path / "f").write_bytes(b"changed")
    run_cowfs("rollback", sbx.a.path, "before-step", timeout=60)
    assert (sbx.a.path / "f").read_bytes() == b"main's file"


@pytest.mark.timeout(240)
def test_agent_cannot_delete_main(sbx):
    """The issue's second finding: with main not mounted, `cowfs delete B main` as the agent
    destroyed branch main (the store could no longer mount it).  Nor may root through B."""
    run_cowfs("umount", sbx.a.path, timeout=60)  # the daemon goes on serving the forks
    r = agent_cli("delete", sbx.b, "main")
    assert r.returncode != 0 and b"no snapshot or branch named 'main'" in r.stderr, r
    err, reply = ctl(sbx.b, "delete main")
    assert reply.get("errno") == "ENOENT", reply
    assert "main" in names(listing(sbx.store), "branches")
    stop_all(sbx)
    sbx.a.start()
    assert (sbx.a.path / "f").read_bytes() == b"main's file"
    assert "before-step" in names(ok(sbx.a.path, "list"), "snapshots")


@pytest.mark.timeout(300)
def test_agent_reaches_exactly_what_its_branch_owns(sbx):
    # Everything on what agent-b owns works.
    (sbx.b / "mine").write_bytes(b"agent data")  # as root: the file is the agent's to clone anyway
    os.chown(sbx.b / "mine", AGENT, UNPRIV_GID)
    aok(sbx, "snapshot b1")
    aok(sbx, "branch b-kid")
    assert aok(sbx, "branch b-kid2 b1")["from"] == "b1"
    got = aok(sbx, "list")
    assert names(got, "snapshots") == {"b1"}, got
    assert names(got, "branches") == {"agent-b", "b-kid", "b-kid2"}, got
    rows = {r["name"]: r for r in got["branches"]}
    assert rows["agent-b"]["parent"] is None, "B's parent (main) is not B's: its name must not show"
    assert rows["b-kid2"]["parent"] == "b1" and rows["agent-b"]["mounted_here"]
    assert sbx.agent.ok("os.listdir", str(sbx.b / ".cowfs/snapshots")) == ["b1"]
    assert sbx.agent.ok("read_file", str(sbx.b / ".cowfs/snapshots/b1/mine")) == b"agent data"
    aok(sbx, "clone .cowfs/snapshots/b1/mine restored")
    assert sbx.agent.ok("read_file", str(sbx.b / "restored")) == b"agent data"
    sbx.agent.ok("write_file", str(sbx.b / "mine"), os.O_WRONLY | os.O_TRUNC, 0o644, 0, b"changed")
    assert {c["path"] for c in aok(sbx, "diff b1")["changes"]} == {"mine", "restored"}
    assert aok(sbx, "diff b1 b-kid")["changes"] == []
    aok(sbx, "rollback b1")
    assert sbx.agent.ok("read_file", str(sbx.b / "mine")) == b"agent data"
    stats = sbx.agent.ok("read_file", str(sbx.b / ".cowfs/stats")).decode()
    assert not {f'"{n}"' for n in FOREIGN if stats.count(f'"{n}"')}, stats

    # Every name agent-b does not own is answered exactly like a name that does not exist.
    templates = ("rollback {}", "delete {}", "diff {}", "diff b1 {}", "branch never-made {}",
                 "clone .cowfs/snapshots/{}/f stolen", "clone .cowfs/snapshots/{}/c-file stolen")
    for tpl in templates:
        e0, r0 = actl(sbx, tpl.format(ABSENT))
        assert not r0["ok"] and e0 == errno.ENOENT, (tpl, r0)
        want = json.dumps(r0).replace(ABSENT, "NAME")
        for name in FOREIGN:
            e1, r1 = actl(sbx, tpl.format(name))
            assert (e1, json.dumps(r1).replace(name, "NAME")) == (e0, want), \
                f"agent {tpl.format(name)!r} answers {r1}, a name that does not exist {r0}"
    for name in FOREIGN + (ABSENT,):
        assert sbx.agent.call("os.stat", str(sbx.b / ".cowfs/snapshots" / name)) == ("err", errno.ENOENT), name
    # A taken name can only be told to be taken, not by what.
    for name in FOREIGN:
        r = afails(sbx, f"snapshot {name}", "EEXIST")
        assert r["error"] == f"the name {name!r} is taken in this store (names are store-wide)", r
    afails(sbx, "snapshot b1", "EEXIST")  # its own: said plainly
    # The branch mounted here is never deleted through its own mount.
    afails(sbx, "delete agent-b", "EBUSY")

    # Nothing outside agent-b changed.
    a_list = ok(sbx.a.path, "list")
    assert {"before-step", "c-snap"} <= names(a_list, "snapshots")
    assert {"main", "a-child", "agent-c", "c-child"} <= names(a_list, "branches")
    assert names(ok(sbx.c, "list"), "snapshots") == {"c-snap"}
    aok(sbx, "delete b-kid2")
    aok(sbx, "delete b1")
    aok(sbx, "delete b-kid")
    assert names(aok(sbx, "list"), "branches") == {"agent-b"}


@pytest.mark.timeout(300)
def test_mounted_branches_and_their_snapshots_are_off_limits(sbx):
    aok(sbx, "branch b-kid")
    kid = sbx.forks.mount(sbx.store, "b-kid")  # another sandbox, made from the agent's branch
    ok(kid, "snapshot kid-snap")
    afails(sbx, "delete b-kid", "EBUSY")
    afails(sbx, "delete kid-snap", "EBUSY")  # another live sandbox's restore point
    r = afails(sbx, "rollback kid-snap", "EINVAL")  # owned, but not agent-b's own snapshot
    assert "only to its own snapshots" in r["error"], r
    assert "kid-snap" in names(aok(sbx, "list"), "snapshots")  # owned: listed and readable
    assert names(ok(kid, "list"), "snapshots") == {"kid-snap"}, "agent-b's snapshots are not b-kid's"
    sbx.forks.umount(kid)
    aok(sbx, "delete kid-snap")
    aok(sbx, "delete b-kid")


@pytest.mark.timeout(300)
def test_root_through_a_mount_has_that_mounts_scope(sbx):
    # Root through B's control file: B's scope, nothing more.
    for name in FOREIGN:
        for line in (f"delete {name}", f"rollback {name}", f"diff {name}"):
            err, reply = ctl(sbx.b, line)
            assert reply.get("errno") == "ENOENT", (line, reply)
    got = ok(sbx.b, "list")
    assert names(got, "snapshots") == set() and names(got, "branches") == {"agent-b"}, got
    assert sorted(os.listdir(sbx.b / ".cowfs/snapshots")) == []
    # Root through A: main's scope, which takes in the forks made from it and their snapshots.
    got = ok(sbx.a.path, "list")
    assert names(got, "snapshots") == {"before-step", "c-snap"}, got
    assert names(got, "branches") == {"main", "a-child", "agent-b", "agent-c", "c-child"}, got
    assert sorted(os.listdir(sbx.a.path / ".cowfs/snapshots")) == ["before-step", "c-snap"]
    for line, want in (("delete agent-b", "EBUSY"), ("delete main", "EBUSY"), ("delete c-snap", "EBUSY"),
                       ("rollback c-snap", "EINVAL"), ("branch x agent-c", "EINVAL")):
        err, reply = ctl(sbx.a.path, line)
        assert reply.get("errno") == want and errno.errorcode.get(err) == want, (line, reply)
    assert ok(sbx.a.path, "diff before-step c-snap")["changes"]
    ok(sbx.a.path, "clone .cowfs/snapshots/c-snap/c-file from-c")
    ok(sbx.a.path, "delete c-child")       # owned through agent-c, mounted nowhere
    ok(sbx.a.path, "delete a-child")
    # Root through C: agent-c's scope.
    got = ok(sbx.c, "list")
    assert names(got, "snapshots") == {"c-snap"} and names(got, "branches") == {"agent-c"}, got
    err, reply = ctl(sbx.c, "delete before-step")
    assert reply.get("errno") == "ENOENT", reply


@pytest.mark.timeout(300)
def test_snapshots_of_a_deleted_branch_pass_to_its_parent(sbx):
    aok(sbx, "branch x")
    x = sbx.forks.mount(sbx.store, "x")  # x's root is the agent's: made from agent-b's tree
    ok(x, "snapshot x-snap")
    ok(x, "branch x-kid x-snap")
    sbx.forks.umount(x)
    aok(sbx, "delete x")
    got = aok(sbx, "list")
    assert {r["name"]: r["parent"] for r in got["snapshots"]} == {"x-snap": "agent-b"}, got
    assert names(got, "branches") == {"agent-b", "x-kid"}, got
    # The name x is free again; whoever takes it gets nothing of the old x.
    ok(sbx.c, "branch x")
    got = ok(sbx.c, "list")
    assert names(got, "snapshots") == {"c-snap"} and "x-kid" not in names(got, "branches"), got
    assert "x" not in names(aok(sbx, "list"), "branches")
    aok(sbx, "rollback x-snap")  # agent-b's own now
    stop_all(sbx)
    stored = listing(sbx.store)  # offline: what the catalog holds
    snaps = {r["name"]: r["parent"] for r in stored["snapshots"]}
    assert snaps["x-snap"] == "agent-b", stored
    kid = next(r for r in stored["branches"] if r["name"] == "x-kid")
    assert kid["parent"] == "x-snap"


@pytest.mark.timeout(300)
def test_store_administration(sbx):
    store = sbx.store
    got = listing(store)
    assert names(got, "snapshots") == {"before-step", "c-snap"}
    where = {r["name"]: r["mounted_at"] for r in got["branches"]}
    assert where == {"main": [str(sbx.a.path)], "a-child": [], "agent-b": [str(sbx.b)],
                     "agent-c": [str(sbx.c)], "c-child": []}, where
    for name, mp in (("agent-b", sbx.b), ("main", sbx.a.path)):
        r = run_cowfs("delete", store, name, check=False, timeout=60)
        assert r.returncode != 0 and f"branch {name!r} is mounted at {mp}".encode() in r.stderr, r
    run_cowfs("delete", store, "c-snap", timeout=60)  # a mounted branch's snapshot: the admin may
    run_cowfs("delete", store, "c-child", timeout=60)
    r = run_cowfs("delete", store, "no-such", check=False, timeout=60)
    assert r.returncode != 0 and b"no snapshot or branch named 'no-such'" in r.stderr, r

    # The agent, even with the store and its socket open to everyone: the daemon asks the
    # kernel who is connecting (SO_PEERCRED) and refuses.
    os.chmod(store, 0o755)
    os.chmod(os.path.join(store, "daemon.sock"), 0o666)
    code = ("import json, sys\nfrom cowfs.daemon import admin\n"
            "print(json.dumps(admin.request(sys.argv[1], {'cmd': sys.argv[2], 'name': 'before-step'})))")
    for cmd in ("delete", "list", "stats", "gc"):
        r = subprocess.run(["/usr/bin/python3", "-c", code, str(store), cmd], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(mounting.REPO)), user=AGENT, group=UNPRIV_GID,
                           extra_groups=[], cwd="/", timeout=60)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply == {"ok": False, "errno": "EPERM",
                         "error": "only root or the owner of the store may use its admin socket"}, (cmd, reply)
    r = agent_cli("delete", store, "before-step")
    assert r.returncode != 0, r
    r = agent_cli("list", store)
    assert r.returncode != 0 and b"before-step" not in r.stdout, r
    assert names(listing(store), "snapshots") == {"before-step"}

    # Offline, on the store itself.
    stop_all(sbx)
    got = listing(store)
    assert names(got, "branches") == {"main", "a-child", "agent-b", "agent-c"}, got
    assert all(r["mounted_at"] == [] for r in got["branches"])
    r = agent_cli("delete", store, "before-step")  # the store is closed to it (0700) ...
    assert r.returncode != 0 and b"only root or the owner of the store" in r.stderr, r
    os.chmod(store, 0o755)
    r = agent_cli("delete", store, "before-step")  # ... and refused when it is not
    assert r.returncode != 0 and b"only root or the owner of the store" in r.stderr, r
    r = run_cowfs("delete", store, "before-step", "--json", timeout=120)
    assert json.loads(r.stdout)["kind"] == "snapshot"
    run_cowfs("delete", store, "main", timeout=120)  # not mounted: the administrator may
    assert names(listing(store), "branches") == {"a-child", "agent-b", "agent-c"}
    r = run_cowfs("fsck", store, check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(180)
def test_references_to_branches_deleted_before_are_cleared(mount_factory, forks):
    """Older cowfs deleted a branch without re-parenting what named it: a new branch given
    that name would have inherited the old one's snapshots.  (Such a store was never marked
    settled: a store is settled once, when a cowfs that re-parents first opens it.)"""
    from cowfs.kv.base import Batch
    from cowfs.meta.layers import CF_CATALOG, OWNERS_SETTLED
    from cowfs.store import Store

    a = mount_factory()
    ok(a.path, "branch gone")
    g = forks.mount(a.store, "gone")
    ok(g, "snapshot gone-snap")
    forks.umount(g)
    a.stop()
    st = Store(str(a.store))
    try:
        batch = Batch()
        batch.delete(CF_CATALOG, b"branch/gone")  # what an older cowfs's delete left behind
        batch.delete(CF_CATALOG, OWNERS_SETTLED)  # in a store it alone had written
        st.kv.write(batch)
    finally:
        st.close()
    a.start()
    ok(a.path, "branch gone")
    got = ok(a.path, "list")
    assert "gone-snap" not in names(got, "snapshots"), got
    assert "gone-snap" in names(listing(a.store), "snapshots")  # the administrator's


@pytest.mark.timeout(180)
def test_a_branch_being_attached_counts_as_mounted(mount_factory, forks):
    """Between the daemon's acceptance of an attach and its bind mount (held 3 s here by the
    test hook), the branch is not in the mount table yet: a delete then must still refuse it."""
    a = mount_factory(env={"COWFS_FAULTS": "attach_bind:sleep3"})
    ok(a.path, "branch late")
    mp = forks.path("late")
    forks.mps.append(mp)
    proc = subprocess.Popen(mounting.cowfs_command() + ["mount", str(a.store), str(mp), "--branch", "late"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while "injected fault at attach_bind" not in a.log_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the attach did not reach its bind mount"
            time.sleep(0.05)
        err, reply = ctl(a.path, "delete late")
        assert reply.get("errno") == "EBUSY", reply
        r = run_cowfs("delete", a.store, "late", check=False, timeout=60)
        assert r.returncode != 0 and f"branch 'late' is mounted at {mp}".encode() in r.stderr, r
        out, errout = proc.communicate(timeout=60)
        assert proc.returncode == 0, errout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (mp / "still-there").write_bytes(b"the branch was not deleted under its mount")
    assert "late" in names(ok(a.path, "list"), "branches")


@pytest.mark.timeout(180)
def test_store_owner_administers_through_the_socket(mount_factory, shared_tmp):
    """A store owned by another user, mounted by root: its owner may list and delete through
    the daemon (the socket is handed to it), not attach; anyone else is refused.  (A short
    path: the socket of a store whose path is too long for AF_UNIX lives under /run/cowfs,
    root's alone.)"""
    owner = UNPRIV_UID - 1
    base = Path(tempfile.mkdtemp(prefix="own-", dir=shared_tmp))
    os.chmod(base, 0o755)
    store = base / "s"
    mounting.init_store(store)
    os.chown(store, owner, owner)
    a = mount_factory(store=store)
    ok(a.path, "snapshot s1")
    r = mounting.run_cowfs_as(owner, owner, "list", store, "--json", check=False)
    assert r.returncode == 0, r.stderr
    assert names(json.loads(r.stdout), "snapshots") == {"s1"}
    r = mounting.run_cowfs_as(owner, owner, "delete", store, "s1", check=False)
    assert r.returncode == 0, r.stderr
    assert names(ok(a.path, "list"), "snapshots") == set()
    code = ("import json, sys\nfrom cowfs.daemon import admin\n"
            "print(json.dumps(admin.request(sys.argv[1], {'cmd': 'attach', 'branch': 'main', 'mountpoint': '/'})))")
    r = subprocess.run(["/usr/bin/python3", "-c", code, str(store)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(mounting.REPO)), user=owner, group=owner,
                       extra_groups=[], cwd="/", timeout=60)
    assert json.loads(r.stdout) == {"ok": False, "errno": "EPERM", "error": "attaching a branch needs root"}, r
    ok(a.path, "snapshot s2")
    r = agent_cli("delete", store, "s2")
    assert r.returncode != 0, r
    assert names(ok(a.path, "list"), "snapshots") == {"s2"}
