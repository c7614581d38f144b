"""Smoke test of scripts/bench_agent.py (the agent-workload benchmark of issue 24): a quick run of
three cheap workloads (SQLite commits, git clone of the generated repository, git status) on the plain directory
and a real cowfs mount, and the JSON it prints; and the clear refusals (a missing prerequisite, an
unknown workload). The full benchmark is run by hand (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mounting  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "bench_agent.py")


def bench_agent(*args, env=None, timeout=150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


# Exclusive: before each measured phase the benchmark runs sync(2), which writes back every mount
# on the machine and so waits for any daemon another pytest-xdist worker's test has stopped.
@pytest.mark.exclusive
@pytest.mark.timeout(200)
def test_quick_run_prints_medians_ratios_and_cowfs_requests(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench_agent mounts fuse filesystems: needs root")
    work = tmp_path / "work"
    r = bench_agent("--quick", "--only", "git_status,sqlite,git", "--targets", "plain,cowfs", "--json",
                    "--cache", str(tmp_path / "cache"), "--workdir", str(work))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout)   # --json: stdout is the JSON object alone; the table goes to stderr
    assert "building the git repository" in r.stderr and str(tmp_path / "cache") in r.stderr
    assert "| sqlite: " in r.stderr and "Geometric mean" in r.stderr
    assert out["config"]["rounds"] == 1 and out["config"]["targets"] == ["plain", "cowfs"]
    assert out["errors"] == {} and out["commit"]
    assert list(out["workloads"]) == ["sqlite", "git", "git_status"]   # the run's order, not --only's
    for name, w in out["workloads"].items():
        assert w["kind"] == "workload"
        p, c = w["targets"]["plain"], w["targets"]["cowfs"]
        for s in (p, c):
            assert s["median_s"] > 0 and len(s["rounds_s"]) == 1 and s["rounds"][0]["round"] == 0
            assert s["rounds"][0]["seconds"] == s["median_s"]
        assert w["ratio_cowfs_plain"] == pytest.approx(c["median_s"] / p["median_s"])
        assert w["ratio_cowfs_overlay"] is None          # no overlay target in this run
        assert p["requests"] is None                      # the plain directory has no daemon
        assert c["daemon_cpu_s"] is not None and c["daemon_cpu_s"] >= 0
        assert c["requests_total"] == sum(c["requests"].values()) > 0
    sq = out["workloads"]["sqlite"]["targets"]["cowfs"]["requests"]
    commits = out["config"]["sqlite_commits"]
    # each autocommit INSERT is one WAL append and one fsync of it (synchronous=FULL)
    assert commits <= sq["fsync"] <= commits + 20 and sq["write"] >= commits
    assert out["workloads"]["git"]["targets"]["cowfs"]["requests"]["create"] > 300  # the clone's files
    st = out["workloads"]["git_status"]["targets"]["cowfs"]["requests"]
    # reads the tree; writes at most the index, which git refreshes when its stat data is racy
    # (listings come without OPENDIR: cowfs.fuse.ops declines it)
    assert st.get("readdir", 0) >= 12 and st.get("opendir", 0) == 0 and st.get("write", 0) <= 2 \
        and st.get("create", 0) <= 1
    g = out["geomean"]
    ratios = [w["ratio_cowfs_plain"] for w in out["workloads"].values()]
    assert g["n_cowfs_plain"] == 3 and g["cowfs_plain"] == pytest.approx((ratios[0] * ratios[1] * ratios[2]) ** (1 / 3))
    assert not mounting.fuse_mounts_under(str(tmp_path)) and not work.exists()


def test_missing_prerequisite_is_named_before_anything_runs(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))   # no git (nor anything else) on the PATH
    r = bench_agent("--only", "git", "--targets", "plain", "--cache", str(tmp_path / "cache"),
                    "--workdir", str(tmp_path / "work"), env=env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "missing prerequisites" in r.stderr and "git for the git workload" in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "work").exists()


def test_unknown_workload_or_target_is_refused(tmp_path):
    r = bench_agent("--only", "sqlite,tar", "--workdir", str(tmp_path / "work"), timeout=60)
    assert r.returncode == 2 and "unknown workload(s) tar" in r.stderr and "cold_import" in r.stderr, r.stderr
    r = bench_agent("--targets", "plain,btrfs", "--workdir", str(tmp_path / "work"), timeout=60)
    assert r.returncode == 2 and "--targets" in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()
