"""Smoke test of scripts/bench_scale.py (issue 20's scale benchmark): the smoke form (tiny
sizes) builds its stores through the bulk loader, measures every row through real mounts and
prints the table and the JSON; the quick and full forms are run by hand (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "bench_scale.py")


def bench_scale(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.timeout(450)
def test_quick_run_prints_every_row_with_its_goal(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench_scale mounts fuse filesystems: needs root")
    r = bench_scale("--smoke", "--json", "--workdir", str(tmp_path / "work"))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout)
    assert out["errors"] == {} and out["config"]["quick"] and out["commit"]
    rows = {}
    for row in out["rows"]:
        rows.setdefault(row["row"], []).append(row)
        assert row["goal"] and row["value"] is not None
        assert f"| {row['measure']} |" in r.stderr  # the table went to stderr
    assert {"snapshot", "gc", "layers", "ids", "clone", "mount", "busy", "deep"} <= set(rows)
    for name in ("snapshot", "gc", "layers", "ids", "clone", "mount", "busy", "deep"):
        assert rows[name][0]["build_s"] is not None and rows[name][0]["build_s"] >= 0
    # what does not depend on the machine's load: the layer chain (deleted snapshots merge
    # away) and the id space
    assert rows["layers"][0]["ok"], rows["layers"][0]
    assert rows["ids"][0]["ok"], rows["ids"][0]
    # the tree rows: two lines for clone (time, growth) and mount (time, RSS), in their units;
    # the O(1) clone's store growth and the deep tree's clone and diff do not depend on the load
    assert [r["unit"] for r in rows["clone"]] == ["ms", "bytes"] and rows["clone"][0]["value"] > 0
    assert rows["clone"][1]["ok"], rows["clone"][1]
    assert len(rows["clone"][0]["details"]["daemon_ms"]) == len(rows["clone"][0]["details"]["wall_ms"]) > 0
    assert [r["unit"] for r in rows["mount"]] == ["s", "MiB"] and rows["mount"][0]["value"] > 0
    assert rows["mount"][1]["details"]["empty_rss_mib"] > 0 and rows["mount"][1]["value"] > 0
    assert rows["busy"][0]["unit"] == "ms" and rows["busy"][0]["details"]["samples"] > 0
    assert rows["deep"][0]["ok"] and rows["deep"][0]["value"] == out["config"]["deep_depth"] + 1, rows["deep"][0]
    assert not os.listdir(tmp_path / "work") or all(not m.startswith("mnt-") or not os.path.ismount(tmp_path / "work" / m)
                                                   for m in os.listdir(tmp_path / "work"))


def test_unknown_row_is_refused():
    r = bench_scale("--only", "nosuch")
    assert r.returncode == 2 and "unknown row(s) nosuch" in r.stderr
