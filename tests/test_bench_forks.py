"""Smoke test of scripts/bench_forks.py (issue 22's benchmark: forks of one store at once): a quick run
of the branch + mount latency, idle RSS and same-data sections on real mounts, the JSON it prints, that
it leaves no mount behind, and its refusal of an unknown section; a quick untar with --cpu-groups (each
fork's daemon and tar in a cgroup of their own), which leaves no cgroup behind. The full benchmark (with
the whole Django untars) is run by hand (docs/benchmarks.md "Parallel forks")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "bench_forks.py")


def bench_forks(*args: str, work: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COWFS_BENCH_FORKS_DIR=work), stdin=subprocess.DEVNULL)


@pytest.mark.timeout(450)
def test_quick_run_measures_branch_mount_idle_rss_and_same_data(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench_forks mounts branches as bind mounts of one daemon today: needs root")
    work = str(tmp_path / "work")
    r = bench_forks("--quick", "--many", "2", "--only", "branch,idle,same_data", "--json", work=work)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res = out["results"]
    assert 0 < res["branch"]["branch_mount_s"] < 60 and len(res["branch"]["branch_mount_all_s"]) == 5
    assert res["branch"]["branch_daemon_ms"] > 0
    assert res["idle"]["daemons"] >= 1 and all(10 < x < 1000 for x in res["idle"]["rss_mib"])
    assert sum(res["idle"]["mounts_per_daemon"]) == 3  # the base and 2 forks
    s = res["same_data"]
    assert s["forks"] == 2 and s["size_mib"] == 32
    assert 0.9 <= s["chunk_growth_after_gc"] <= 1.05, s  # the same 32 MiB twice is stored once
    names = [g[0] for g in out["goals"]]
    assert any("branch + cowfs mount" in n for n in names) and any("same 32 MiB" in n for n in names)
    assert "| measure | figure | goal | met |" in r.stdout
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read(), "a mount was left behind"
    assert not os.path.exists(work)


@pytest.mark.timeout(300)
def test_own_daemon_same_data_settles_at_one_copy(tmp_path):
    """--own-daemon: 2 forks with daemons of their own write the same 32 MiB (two copies in the
    packs); the store keeper's gc runs bring the store back to one copy."""
    if os.geteuid() != 0:
        pytest.skip("bench_forks mounts as root")
    work = str(tmp_path / "work")
    r = bench_forks("--quick", "--own-daemon", "--many", "2", "--only", "same_data", "--json", work=work)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["results"]["same_data"]
    assert out["meta"]["own_daemon"] and s["daemons"] == 3, s
    assert s["stored_growth_written"] >= 1.9 and s["stored_growth_after_gc"] <= 1.05, s
    assert s["dup_published"] >= 400 and s["packs_deleted"] >= 1 and s["gc_runs"] >= 2, s
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read(), "a mount was left behind"


def test_unknown_section_is_refused(tmp_path):
    r = bench_forks("--only", "untar,nope", work=str(tmp_path / "work"), timeout=60)
    assert r.returncode != 0 and "--only takes untar,branch,idle,same_data" in r.stderr


@pytest.mark.timeout(600)
def test_cpu_groups_place_each_fork_daemon_with_its_commands_and_leave_no_group(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench_forks needs root")
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_forks as script
    root = script.cpu_controller()
    if root is None:
        pytest.skip("no cgroup cpu controller on this machine")
    work = str(tmp_path / "work")
    r = bench_forks("--quick", "--own-daemon", "--cpu-groups", "--only", "untar", "--many", "2", "--json", work=work,
                    timeout=550)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["meta"]["cpu_groups"] is True
    u = out["results"]["untar"]
    for key, forks in (("1_forks", 1), ("2_forks", 2), ("2_separate_stores", 2), ("many_forks", 2)):
        assert all(x["grouped_daemons"] == forks for x in u[key]["rounds"]), (key, u[key]["rounds"])
        assert all(0 < x["untar_tar_cpu_s"] < x["untar_daemon_cpu_s"] for x in u[key]["rounds"]), (key, u[key]["rounds"])
    assert any("CPU per fork" in g[1] for g in out["goals"])
    assert not [d for d in os.listdir(root) if d.startswith("cowfs-bench-forks-")], "a cgroup was left behind"
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read(), "a mount was left behind"
