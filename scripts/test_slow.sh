#!/usr/bin/env bash
# The long forms of the tests (marked `slow`), which the suite's command leaves out to keep a
# CI run short (the 100,000-entry directory, ten rounds of 20,000 files of the memory test,
# 20 SIGKILL rounds of test_crash_workload, 60 s soaks, the 66,001-view store of test_ids,
# 700 nested clones, long control replies and the 10,000-level tree of test_walks, 250
# examples per variant of test_posix_differential and 40 of test_branching_differential, the
# 1 GiB O(1) clone of test_branching, 30 s more of gc with three daemons writing and 5 power
# cuts under a branch daemon's home of test_own_daemon_more); the suite keeps a shorter form of
# each.  After `bash scripts/setup.sh --system`; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -m slow tests "$@"
