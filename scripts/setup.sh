#!/usr/bin/env bash
# Sets up everything cowfs needs on a fresh Debian 12 machine (as root): Debian packages,
# a virtualenv in .venv and the package itself. Re-running it is cheap: each step is skipped
# when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(fuse3 libfuse3-dev pkg-config python3-venv fuse-overlayfs git sqlite3 attr acl systemd gcc make)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.cowfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing cowfs and its test dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# The systemd unit runs /usr/local/bin/cowfs; mount(8) runs /sbin/mount.fuse.cowfs (-t fuse.cowfs, fstab).
for link in /usr/local/bin/cowfs:cowfs /sbin/mount.fuse.cowfs:mount.fuse.cowfs /sbin/mount.cowfs:mount.fuse.cowfs; do
  [ -e "${link%%:*}" ] && [ ! -L "${link%%:*}" ] || ln -sfn "$PWD/.venv/bin/${link#*:}" "${link%%:*}"
done
echo "setup: ready (.venv/bin/cowfs)"
