#!/usr/bin/env bash
# The long forms of the tests (marked `slow`), which the suite's command leaves out to keep a
# CI run short: the 100,000-entry directory, ten rounds of the memory test.  After
# `bash scripts/setup.sh --system`; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -m slow tests "$@"
