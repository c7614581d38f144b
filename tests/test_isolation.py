"""Isolation and permissions, checked as an unprivileged uid (root skips most checks).

* allow_other is off unless asked: another uid gets EACCES on the mount;
* .cowfs/ctl is for the mount root's owner and root only, unless -o ctl_group=GID;
* snapshot views are read-only even for root, and nothing moves or links out of or into them;
* clone and rollback cannot reach outside the mount (.., absolute paths, symlinks);
* a branch mounted for one sandbox cannot be reached or changed from another sandbox's mount
  (the authorization model as the agent user sees it: test_authz.py).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Worker, run_cowfs

OTHER_UID = UNPRIV_UID - 1  # a second unprivileged user
CTL_GID = 4242


def ctl(mp, line: str) -> tuple[int, dict]:
    err, out = mounting.ctl_exchange(mp, line.encode("utf-8", "surrogateescape") + b"\n")
    return err, json.loads(out)


def wctl(w: Worker, mp, line: str) -> tuple[int, str | None]:
    """ctl() as the worker's user: (errno of the open or the write, reply or None)."""
    r = w.call("os.open", os.path.join(str(mp), ".cowfs", "ctl"), os.O_RDWR)
    if r[0] == "err":
        return r[1], None
    fd = r[1]
    try:
        r = w.call("os.write", fd, line.encode() + b"\n")
        err = r[1] if r[0] == "err" else 0
        return err, w.ok("os.read", fd, 1 << 20).decode()
    finally:
        w.call("os.close", fd)


@pytest.fixture
def workers():
    made = []

    def make(uid, gid=None, groups=()):
        w = Worker(uid=uid, gid=gid if gid is not None else uid, groups=groups)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


@pytest.mark.timeout(120)
def test_allow_other_is_off_unless_asked(mount_factory, workers):
    plain = mount_factory()
    shared = mount_factory(options=["allow_other"])
    for m in (plain, shared):
        (m.path / "f").write_bytes(b"hello")
        os.chmod(m.path / "f", 0o644)
    w = workers(UNPRIV_UID, UNPRIV_GID)
    assert w.call("os.stat", str(plain.path)) == ("err", errno.EACCES)
    assert w.call("read_file", str(plain.path / "f")) == ("err", errno.EACCES)
    assert w.call("os.listdir", str(plain.path)) == ("err", errno.EACCES)
    assert w.call("read_file", str(shared.path / "f")) == ("ok", b"hello")
    assert "allow_other" not in mounting.mount_entry(plain.path)["super_options"]


@pytest.mark.timeout(120)
def test_ctl_only_for_owner_root_and_ctl_group(mount_factory, workers):
    m = mount_factory(options=["allow_other"])
    g = mount_factory(options=["allow_other", f"ctl_group={CTL_GID}"])
    nobody = workers(UNPRIV_UID, UNPRIV_GID)
    other = workers(OTHER_UID, OTHER_UID)
    member = workers(OTHER_UID, OTHER_UID, groups=[CTL_GID])
    # root owns both roots: nobody else may use ctl; .cowfs/stats stays readable.
    for w in (nobody, other, member):
        assert wctl(w, m.path, "snapshot x")[0] == errno.EACCES
        assert w.call("os.open", str(m.path / ".cowfs/ctl"), os.O_RDONLY) == ("err", errno.EACCES)
    assert ctl(m.path, "snapshot by-root")[0] == 0
    # The owner of the mount root may; another uid still may not.
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    err, reply = wctl(nobody, m.path, "snapshot by-owner")
    assert err == 0, reply
    assert wctl(other, m.path, "snapshot by-other")[0] == errno.EACCES
    # -o ctl_group: members may, others may not.
    err, reply = wctl(member, g.path, "snapshot by-member")
    assert err == 0, reply
    assert wctl(other, g.path, "snapshot by-nonmember")[0] == errno.EACCES
    assert wctl(nobody, g.path, "snapshot by-nobody")[0] == errno.EACCES
    names = set(os.listdir(m.path / ".cowfs/snapshots")) | set(os.listdir(g.path / ".cowfs/snapshots"))
    assert names == {"by-root", "by-owner", "by-member"}, names


@pytest.mark.timeout(120)
def test_snapshot_views_read_only_and_sealed(cowfs_mount):
    mp = cowfs_mount.path
    os.mkdir(mp / "d")
    (mp / "d" / "f").write_bytes(b"frozen")
    assert ctl(mp, "snapshot s")[0] == 0
    s = mp / ".cowfs/snapshots/s"
    attempts = {
        "write": lambda: os.open(s / "d/f", os.O_WRONLY),
        "create": lambda: os.open(s / "d/new", os.O_CREAT | os.O_WRONLY, 0o644),
        "truncate": lambda: os.truncate(s / "d/f", 0),
        "unlink": lambda: os.unlink(s / "d/f"),
        "chmod": lambda: os.chmod(s / "d/f", 0o777),
        "rename out": lambda: os.rename(s / "d/f", mp / "stolen"),
        "rename in": lambda: os.rename(mp / "d/f", s / "d/g"),
        "link out": lambda: os.link(s / "d/f", mp / "linked"),
        "link in": lambda: os.link(mp / "d/f", s / "d/h"),
        "setxattr": lambda: os.setxattr(s / "d/f", "user.x", b"1"),
    }
    wrong = {}
    for what, fn in attempts.items():
        try:
            r = fn()
            if isinstance(r, int):
                os.close(r)
            wrong[what] = "succeeded"
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EXDEV):
                wrong[what] = errno.errorcode.get(e.errno)
    assert not wrong, f"as root, changes through a snapshot view (want EROFS or EXDEV): {wrong}"
    assert (s / "d/f").read_bytes() == b"frozen" and sorted(os.listdir(s / "d")) == ["f"]
    assert (mp / "d/f").read_bytes() == b"frozen" and not (mp / "linked").exists()
    cowfs_mount.remount()  # and the stored snapshot is unchanged too
    assert (s / "d/f").read_bytes() == b"frozen" and sorted(os.listdir(s / "d")) == ["f"]
    assert os.stat(s / "d/f").st_nlink == 1


@pytest.mark.timeout(120)
def test_clone_and_rollback_cannot_leave_the_mount(cowfs_mount, tmp_path):
    mp = cowfs_mount.path
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    (mp / "f").write_bytes(b"inside")
    os.symlink(str(outside), mp / "out")           # absolute symlink to a host directory
    os.symlink("../../..", mp / "up")              # relative symlink climbing out
    assert ctl(mp, "snapshot s")[0] == 0
    bad = {
        "clone ../x y": None, "clone f ../escaped": None, f"clone {outside}/secret x": None,
        f"clone f {outside}/planted": None, "clone out/secret x": None, "clone up/etc/passwd x": None,
        "clone d/../../f x": None, "clone .cowfs/snapshots/../../../f x": None,
        "clone f .cowfs/snapshots/s/planted": None, "clone f .cowfs/planted": None,
        "clone /etc/passwd x": None, "clone f /tmp/planted": None,
        "rollback ../s": None, "rollback /s": None, "rollback s/..": None, "rollback .cowfs/snapshots/s": None,
    }
    for line in bad:
        err, reply = ctl(mp, line)
        bad[line] = (errno.errorcode.get(err), reply.get("errno"))
    wrong = {k: v for k, v in bad.items() if v[0] is None or v[0] not in ("EINVAL", "ENOENT", "ENOTDIR", "EROFS", "EEXIST")}
    assert not wrong, f"commands that should be refused: {wrong}"
    assert sorted(os.listdir(outside)) == ["secret"] and not os.path.exists("/tmp/planted")
    assert sorted(os.listdir(mp)) == sorted(["f", "out", "up"])
    # Cloning a symlink copies the link itself, never what it points at.
    assert ctl(mp, "clone out copy")[0] == 0
    assert os.readlink(mp / "copy") == str(outside) and os.path.islink(mp / "copy")


@pytest.mark.timeout(180)
def test_other_sandbox_branch_is_unreachable(cowfs_mount, test_dir, workers):
    """Sibling sandboxes B and C (both made from main's snapshot base): nothing of one is
    reachable from the other, not even its names.  main, which B was made from, may read B
    (list, diff, its snapshots: see test_diff_and_list_from_another_sandbox) but change
    nothing of it while it is mounted; B cannot touch main."""
    m = cowfs_mount
    mp1 = m.path
    (mp1 / "shared").write_bytes(b"before the fork")
    assert ctl(mp1, "snapshot base")[0] == 0
    assert ctl(mp1, "branch B base")[0] == 0
    assert ctl(mp1, "branch C base")[0] == 0
    mp2, mp3 = test_dir / "sandbox-B", test_dir / "sandbox-C"
    mp2.mkdir()
    mp3.mkdir()
    run_cowfs("mount", m.store, mp2, "--branch", "B", timeout=60)
    try:
        run_cowfs("mount", m.store, mp3, "--branch", "C", timeout=60)
        (mp2 / "secret-of-B").write_bytes(b"B only")
        assert ctl(mp2, "snapshot B-snap")[0] == 0
        nobody = workers(UNPRIV_UID, UNPRIV_GID)
        for other in (mp1, mp3):
            # No path from another sandbox names B's files.
            assert not (other / "secret-of-B").exists()
            assert "by-view" not in os.listdir(other / ".cowfs")
            for vid in range(0, 64):  # (root: see test_by_view_is_not_resolvable_after_attach)
                assert nobody.call("os.stat", str(other / ".cowfs/by-view" / str(vid)))[0] == "err"
        assert "B-snap" not in os.listdir(mp3 / ".cowfs/snapshots")
        # Nor do the sibling's control commands reach into B, or even tell B's names from
        # names that do not exist.
        for line in ("clone .cowfs/snapshots/B-snap/secret-of-B stolen", "rollback B-snap", "delete B-snap",
                     "delete B", "branch B2 B", "branch B2 B-snap", "diff B-snap", "diff B"):
            err, reply = ctl(mp3, line)
            assert reply.get("errno") == "ENOENT", (line, reply)
        assert {"B", "B-snap"}.isdisjoint(json.dumps(ctl(mp3, "list")[1]).split('"'))
        assert not (mp3 / "stolen").exists()
        # main made B: it reads B, changes nothing of it while B is mounted.
        assert "B-snap" in os.listdir(mp1 / ".cowfs/snapshots")
        for line, want in (("rollback B-snap", "EINVAL"), ("delete B-snap", "EBUSY"),
                           ("delete B", "EBUSY"), ("branch B2 B", "EINVAL")):
            err, reply = ctl(mp1, line)
            assert reply.get("errno") == want, (line, reply)
        assert (mp2 / "secret-of-B").read_bytes() == b"B only"
        assert "B-snap" in os.listdir(mp2 / ".cowfs/snapshots")
        # And the other way round: B cannot see main's later files, its snapshots, or change main.
        (mp1 / "main-only").write_bytes(b"main")
        assert not (mp2 / "main-only").exists()
        assert os.listdir(mp2 / ".cowfs/snapshots") == ["B-snap"]
        for line in ("delete main", "delete base", "rollback base", "delete C"):
            assert ctl(mp2, line)[1].get("errno") == "ENOENT", line
        assert (mp1 / "main-only").read_bytes() == b"main"
        assert "base" in os.listdir(mp1 / ".cowfs/snapshots")
    finally:
        failed = []
        for mp in (mp3, mp2):
            if not mounting.is_mounted(mp):
                continue
            r = run_cowfs("umount", mp, timeout=60, check=False)
            if mounting.is_mounted(mp):
                subprocess.run(["fusermount3", "-uz", str(mp)])
            if r.returncode != 0:
                failed.append(r.stderr)
        assert not failed, failed


@pytest.mark.timeout(180)
def test_diff_and_list_from_another_sandbox(cowfs_mount, test_dir):
    """What the parent sandbox can learn about a child branch mounted elsewhere (by design, a
    lineage sees its branches): list shows the branch, diff names its changed paths.  Recorded
    here so that a change in this boundary is a visible decision."""
    m = cowfs_mount
    mp1 = m.path
    assert ctl(mp1, "snapshot base")[0] == 0
    assert ctl(mp1, "branch B base")[0] == 0
    mp2 = test_dir / "sandbox-B"
    mp2.mkdir()
    run_cowfs("mount", m.store, mp2, "--branch", "B", timeout=60)
    try:
        (mp2 / "secret-name-of-B").write_bytes(b"B only")
        err, listing = ctl(mp1, "list")
        assert "B" in {b["name"] for b in listing["branches"]}
        err, diff = ctl(mp1, "diff base B")
        paths = {c["path"] for c in diff.get("changes", [])}
        assert err == 0 and "secret-name-of-B" in paths, diff
    finally:
        run_cowfs("umount", mp2, timeout=60, check=False)
        if mounting.is_mounted(mp2):
            subprocess.run(["fusermount3", "-uz", str(mp2)])


@pytest.mark.timeout(180)
def test_by_view_is_not_resolvable_after_attach(cowfs_mount, test_dir):
    m = cowfs_mount
    mp1 = m.path
    assert ctl(mp1, "snapshot base")[0] == 0
    assert ctl(mp1, "branch B base")[0] == 0
    mp2 = test_dir / "sandbox-B"
    mp2.mkdir()
    run_cowfs("mount", m.store, mp2, "--branch", "B", timeout=60)
    try:
        (mp2 / "secret-of-B").write_bytes(b"B only")
        reached = {}
        for vid in range(0, 64):
            p = mp1 / ".cowfs/by-view" / str(vid)
            try:
                reached[vid] = sorted(os.listdir(p))
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR), (p, e)
        assert not reached, f"root in the first sandbox lists other branches through by-view: {reached}"
        # The probe made the kernel drop the bind mount's root dentry (mountinfo then shows
        # ".../by-view/N//deleted"): the daemon must still know B is mounted there.
        r = run_cowfs("stats", mp2, "--json", timeout=60)
        assert json.loads(r.stdout)["mounted_branches"] == ["B", "main"], r.stdout[:300]
        err, reply = ctl(mp1, "delete B")
        assert err != 0 and reply.get("errno") == "EBUSY", reply
        assert (mp2 / "secret-of-B").read_bytes() == b"B only"
    finally:
        run_cowfs("umount", mp2, timeout=60, check=False)
        if mounting.is_mounted(mp2):
            subprocess.run(["fusermount3", "-uz", str(mp2)])
