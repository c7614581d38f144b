#!/usr/bin/env bash
# The optional slower job: the tests on Ceph RADOS Gateway (marked `ceph`, which the suite's
# command leaves out).  Installs Debian's Ceph (16 Pacific on bookworm: a monitor, an OSD and
# radosgw; the tests' fixture creates a throwaway one-host cluster under pytest's temporary
# directory, on 127.0.0.1, and stops it) unless it is there, then runs them.  After
# `bash scripts/setup.sh --system`, as root; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(ceph-mon ceph-osd radosgw ceph-common)
missing=0
for cmd in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool; do
    command -v "$cmd" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${packages[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${packages[@]}"; }
fi
exec .venv/bin/python -m pytest -q -m ceph tests "$@"
