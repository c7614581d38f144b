"""Who serves which branch, on real mounts (cowfs.meta.serving, cowfs.daemon.branches): every
daemon records each branch it serves in the store's reference store (`serve/<branch>`), a
second mount of a branch a live process serves is refused with one line naming that process
and its mount point (the same daemon's attach path, and a record another process holds, as a
daemon of its own will: design step 6), a record left by a daemon killed -9 is stale and the
next mount takes the branch, `cowfs status` shows the records (the unprivileged uid, which may
not read root's private store, gets the mounts without them), fsck counts what is stale.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import ok, run_cowfs, run_cowfs_as, wait_until

HOLD = """
import sys
from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.serving import REF_FAMILIES, Serving
s = Serving(SQLiteKV(sys.argv[1], REF_FAMILIES), "w")
s.take(sys.argv[2], sys.argv[3])
print("held", flush=True)
sys.stdin.read()
"""


def _serving(store, as_uid: tuple[int, int] | None = None) -> dict[str, dict] | None:
    args = ("status", store, "--json")
    out = (run_cowfs_as(*as_uid, *args) if as_uid else run_cowfs(*args)).stdout
    (rec,) = json.loads(out)["stores"]
    return None if rec.get("serving") is None else {r["branch"]: r for r in rec["serving"]}


def _refused(store, mp, branch: str) -> str:
    r = run_cowfs("mount", store, mp, "--branch", branch, check=False)
    assert r.returncode == 1 and not mounting.is_mounted(mp), r
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def test_a_branch_is_served_once_and_a_killed_daemons_record_is_taken_over(mount_factory, forks, tmp_path):
    m = mount_factory()
    store = m.store
    ok(m.path, "branch feat")
    main = _serving(store)["main"]
    assert (main["pid"], main["mountpoint"], main["alive"]) == (m.pid, str(m.path), True)

    # the same daemon: its attach path refuses the branch it serves, naming itself and where
    err = _refused(store, forks.path("again"), "main")
    assert f"branch 'main' is already served by pid {m.pid} at {m.path}" in err, err

    # a record another live process holds (a daemon of its own, design step 6) is refused too
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store / "refs.sqlite"), "feat", "/elsewhere"],
                              cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _refused(store, forks.path("feat"), "feat")
        assert f"branch 'feat' is already served by pid {holder.pid} at /elsewhere" in err, err
        # nor is a branch another process serves deleted from under it
        r = run_cowfs("delete", store, "feat", check=False)
        assert r.returncode != 0 and f"served by pid {holder.pid} at /elsewhere" in r.stderr.decode(), r
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert _serving(store)["feat"]["alive"] is False, "killed -9: stale"
    feat = forks.mount(store, "feat")  # takes the stale record over
    assert {b: (r["pid"], r["mountpoint"]) for b, r in _serving(store).items()} == {
        "main": (m.pid, str(m.path)), "feat": (m.pid, str(feat))}
    forks.umount(feat)
    wait_until(lambda: "feat" not in _serving(store), "the daemon to give back serve/feat once unmounted")
    feat = forks.mount(store, "feat")  # and it can be mounted again at once elsewhere too
    assert _serving(store)["feat"]["mountpoint"] == str(feat)

    # root's private store: the unprivileged uid sees its mounts, not who serves them
    stores = json.loads(run_cowfs_as(UNPRIV_UID, UNPRIV_GID, "status", "--json").stdout)["stores"]
    (rec,) = [r for r in stores if r["store"] == str(store)]
    assert rec["serving"] is None and {x["mountpoint"] for x in rec["mounts"]} == {str(m.path), str(feat)}, rec

    # kill -9 of the daemon: its records are stale, a new daemon takes main
    os.killpg(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=30)
    m.exit_codes.append(m.proc.returncode)
    stale = _serving(store)
    assert stale["main"]["alive"] is False and stale["feat"]["alive"] is False, stale
    text = run_cowfs("status", store).stdout.decode()
    assert f"serving main: stale record of pid {m.pid} (gone) at {m.path}" in text, text
    run_cowfs("umount", m.path)  # clears the dead daemon's mounts
    assert not mounting.is_mounted(m.path) and not mounting.is_mounted(feat)
    again = forks.mount(store, "main", name="main2")
    new = _serving(store)["main"]
    assert new["alive"] and new["mountpoint"] == str(again) and new["pid"] != m.pid
    assert _serving(store)["feat"]["alive"] is False  # stale until feat is mounted again
    forks.umount(again)
    code, report = mounting.fsck_json(store)
    assert code == 0 and report["counts"]["stale_serve_records"] == 1, report  # counted, no problem
    report = json.loads(run_cowfs("fsck", store, "--repair", "--json").stdout)
    assert report["repaired"] == ["removed the serve records of feat (damaged, stale, or naming no branch)"], report
    assert mounting.fsck(store)["counts"]["stale_serve_records"] == 0
