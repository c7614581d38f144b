"""Quick forms of scripts/soak.py (8 processes of mixed I/O for a fixed time): without
rollbacks, and with snapshots, clones, deletes and rollbacks racing the writers.  Zero
unexpected errors (see the script for the errno values that are expected and why), no ERROR in
the daemon's log, fsck clean afterwards.  8 s each in the suite (12 until CI neared 20 min); the long forms
(scripts/test_slow.sh) run COWFS_SOAK_SECONDS (default 60)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SOAK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "soak.py")
SECONDS = float(os.environ.get("COWFS_SOAK_SECONDS", "60"))
FORMS = [8, pytest.param(SECONDS, marks=pytest.mark.slow, id="long")]


def soak(seconds: float, *args, env=None) -> dict:
    r = subprocess.run([sys.executable, SOAK, "--seconds", str(seconds), "--json", *args], capture_output=True,
                       timeout=int(seconds) + 240, env=dict(os.environ, **(env or {})))
    out = r.stdout.decode(errors="replace")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert last.startswith("{"), f"soak.py printed no figures (exit {r.returncode}):\n{out}\n{r.stderr.decode()[-3000:]}"
    figures = json.loads(last)
    figures["text"] = out
    return figures


@pytest.mark.timeout(400 + SECONDS)
@pytest.mark.parametrize("seconds", FORMS)
def test_soak_mixed_io_with_snapshots_and_clones(seconds):
    f = soak(seconds, env={"COWFS_SOAK_ROLLBACK_WEIGHT": "0"})
    assert f["unexpected_errors"] == 0 and f["fsck_clean"], f["text"]
    assert f["operations"] > 1000 and f["by_kind"].get("snapshot") and f["by_kind"].get("clone"), f["text"]


@pytest.mark.timeout(400 + SECONDS)
@pytest.mark.parametrize("seconds", FORMS)
def test_soak_with_rollbacks(seconds):
    f = soak(seconds)
    assert f["by_kind"].get("rollback"), f["text"]
    assert f["unexpected_errors"] == 0 and f["fsck_clean"], f["text"]
