"""mount.fuse.cowfs: `mount -t fuse.cowfs STORE MP -o ...` and fstab lines, with the real mount(8).

mount(8) finds the helper as /sbin/mount.fuse.cowfs (scripts/setup.sh --system links it from
.venv/bin); `umount MP` needs no helper: the daemon exits when its mount goes away.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cowfs import mount_helper
from cowfs.mount_helper import HelperError, parse_args

HELPER = "/sbin/mount.fuse.cowfs"
COWFS = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "cowfs")


# -- option translation (no mount) ----------------------------------------------------------------
def test_parse_translates_options():
    r = parse_args(["cowfs:/var/lib/cowfs/a", "/srv/a", "-o",
                    "rw,branch=feature,allow_other,suid,dev,cache_size=64M,dedup=off,dedup_cpu=0.5,quota_bytes=1G,quota_inodes=5000,"
                    "ctl_group=0,noatime,noexec,defaults,noauto,_netdev,nofail,x-systemd.automount,"
                    "x-systemd.requires=network.target,comment=hi,debug", "-n", "-t", "fuse.cowfs"])
    assert r.store == "/var/lib/cowfs/a" and r.mountpoint == "/srv/a" and r.branch == "feature"
    assert r.options == ["allow_other", "suid", "dev", "noatime", "noexec"]
    assert (r.cache, r.quota_bytes, r.quota_inodes, r.ctl_group) == (
        [("cache_size", "64M"), ("dedup", "off"), ("dedup_cpu", "0.5")], 1 << 30, 5000, 0)
    assert r.debug and not r.fake
    assert set(r.ignored) == {"rw", "defaults", "noauto", "_netdev", "nofail", "x-systemd.automount",
                              "x-systemd.requires=network.target", "comment=hi"}


def test_parse_flags_and_errors():
    r = parse_args(["-sfv", "store", "mp", "-obranch=b,frobnicate", "-r"])
    assert r.fake and r.verbose and r.branch == "b" and "ro" in r.options
    assert r.warnings == ["ignoring unknown option 'frobnicate'"]       # -s: sloppy
    for argv, msg in ((["store", "mp", "-o", "frobnicate"], "unknown mount option 'frobnicate'"),
                      (["store", "mp", "-o", "quota_bytes=lots"], "bad value"),
                      (["store", "mp", "-o", "branch="], "bad value"),
                      (["store", "mp", "-o", "dedup=maybe"], "bad value"),
                      (["store", "mp", "-o", "dedup_cpu=2"], "bad value"),
                      (["store", "mp", "-o", "spin_us=5000"], "bad value"),
                      (["store", "mp", "-o", "spin_us=fast"], "bad value"),
                      (["store"], "usage"),
                      (["store", "mp", "-t", "ext4"], "not ext4")):
        with pytest.raises(HelperError, match=msg):
            parse_args(argv)
    assert mount_helper.main(["store", "mp", "-o", "nope"]) == 1


# -- the real mount(8) ----------------------------------------------------------------------------
def _mounts(path: Path) -> list[dict]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(), right.split()
            if lf[4] == str(path):
                out.append({"opts": lf[5].split(","), "fstype": rf[0], "source": rf[1],
                            "super": rf[2].split(",")})
    return out


def _pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def env(tmp_path):
    if not os.access(HELPER, os.X_OK):
        pytest.fail(f"{HELPER} is missing: run `bash scripts/setup.sh --system` (it links the helper there)")
    store, mp = tmp_path / "store", tmp_path / "mnt"
    subprocess.run([COWFS, "init", str(store)], check=True, capture_output=True)
    mp.mkdir()
    yield store, mp
    for _ in range(3):
        if not _mounts(mp):
            break
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)
    pid_file = store / "daemon.pid"
    if pid_file.exists():
        _pid_gone(int(pid_file.read_text()), 10)


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)


def _umount_and_check_exit(store: Path, mp: Path) -> None:
    pid = int((store / "daemon.pid").read_text())
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not _mounts(mp)
    assert _pid_gone(pid, 20), f"daemon pid {pid} still running after umount"
    assert not (store / "daemon.pid").exists()


def test_mount_t_fuse_cowfs(env):
    store, mp = env
    # a branch to mount by name
    r = _mount("-t", "fuse.cowfs", str(store), str(mp))
    assert r.returncode == 0, r.stderr
    (mp / "on-main").write_text("main\n")
    subprocess.run([COWFS, "branch", str(mp), "feature"], check=True, capture_output=True)
    _umount_and_check_exit(store, mp)

    r = _mount("-t", "fuse.cowfs", str(store), str(mp),
               "-o", "branch=feature,allow_other,quota_inodes=100,noexec,rw,_netdev,nofail")
    assert r.returncode == 0, r.stderr
    (entry,) = _mounts(mp)
    assert entry["fstype"] == "fuse.cowfs" and entry["source"] == f"cowfs:{store}"
    assert "allow_other" in entry["super"]
    assert {"noexec", "nosuid", "nodev"} <= set(entry["opts"])
    stats = json.loads((mp / ".cowfs" / "stats").read_text())
    assert stats["branch"] == "feature" and stats["quota_inodes"] == 100
    assert (mp / "on-main").read_text() == "main\n"          # the branch started from main
    (mp / "on-feature").write_text("feature\n")
    _umount_and_check_exit(store, mp)

    # read-only, and errors are one line with mount(8)'s failure status
    r = _mount("-t", "fuse.cowfs", str(store), str(mp), "-o", "ro")
    assert r.returncode == 0, r.stderr
    assert "ro" in _mounts(mp)[0]["opts"]
    with pytest.raises(OSError):
        (mp / "x").write_text("no")
    _umount_and_check_exit(store, mp)

    r = _mount("-t", "fuse.cowfs", str(store), str(mp), "-o", "branch=nope")
    assert r.returncode != 0 and "nope" in r.stderr and not _mounts(mp)
    r = _mount("-t", "fuse.cowfs", str(store), str(mp), "-o", "turbo")
    assert r.returncode != 0 and "unknown mount option 'turbo'" in r.stderr and not _mounts(mp)


def test_fstab_line(env, tmp_path):
    store, mp = env
    fstab = tmp_path / "fstab"
    # What a newcomer puts in /etc/fstab (here a private copy: mount --fstab FILE).
    fstab.write_text("# cowfs sandbox\n"
                     f"{store}  {mp}  fuse.cowfs  noauto,nofail,_netdev,allow_other,branch=main,"
                     "x-systemd.automount,x-systemd.mount-timeout=30  0  0\n")
    r = _mount("--fstab", str(fstab), str(mp))
    assert r.returncode == 0, r.stderr
    (entry,) = _mounts(mp)
    assert entry["fstype"] == "fuse.cowfs" and "allow_other" in entry["super"]
    (mp / "hello").write_text("from fstab\n")
    _umount_and_check_exit(store, mp)

    # the data is in the store: mount it again by its source through the same line
    r = _mount("--fstab", str(fstab), str(store))
    assert r.returncode == 0, r.stderr
    assert (mp / "hello").read_text() == "from fstab\n"
    _umount_and_check_exit(store, mp)


def test_helper_directly_is_quiet_and_returns_when_ready(env):
    store, mp = env
    r = subprocess.run([HELPER, str(store), str(mp), "-o", "rw"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert os.stat(mp).st_ino == 1      # usable at once
    assert shutil.disk_usage(mp).total > 0
    _umount_and_check_exit(store, mp)


def test_mount_t_cowfs_short_type(env):
    """`-t cowfs` runs /sbin/mount.cowfs (the same helper); the mount is fuse.cowfs."""
    store, mp = env
    if not os.access("/sbin/mount.cowfs", os.X_OK):
        pytest.fail("/sbin/mount.cowfs is missing: run `bash scripts/setup.sh --system`")
    r = _mount("-t", "cowfs", str(store), str(mp), "-o", "branch=main")
    assert r.returncode == 0, r.stderr
    assert _mounts(mp)[0]["fstype"] == "fuse.cowfs"
    _umount_and_check_exit(store, mp)
