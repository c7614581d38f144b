"""Smoke test of scripts/bench_scale.py (issue 20's scale benchmark): the quick form builds its
stores through the bulk loader, measures every row through real mounts and prints the table
and the JSON; the full form is run by hand (docs/benchmarks.md)."""
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
    r = bench_scale("--quick", "--json", "--workdir", str(tmp_path / "work"))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout)
    assert out["errors"] == {} and out["config"]["quick"] and out["commit"]
    rows = {}
    for row in out["rows"]:
        rows.setdefault(row["row"], []).append(row)
        assert row["goal"] and row["value"] is not None
        assert f"| {row['measure']} |" in r.stderr  # the table went to stderr
    assert {"snapshot", "gc", "layers", "ids"} <= set(rows)
    for name in ("snapshot", "gc", "layers", "ids"):
        assert rows[name][0]["build_s"] is not None and rows[name][0]["build_s"] >= 0
    # what does not depend on the machine's load: the layer chain (deleted snapshots merge
    # away) and the id space
    assert rows["layers"][0]["ok"], rows["layers"][0]
    assert rows["ids"][0]["ok"], rows["ids"][0]
    assert not os.listdir(tmp_path / "work") or all(not m.startswith("mnt-") or not os.path.ismount(tmp_path / "work" / m)
                                                   for m in os.listdir(tmp_path / "work"))


def test_unknown_row_is_refused():
    r = bench_scale("--only", "nosuch")
    assert r.returncode == 2 and "unknown row(s) nosuch" in r.stderr
