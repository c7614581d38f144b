#!/usr/bin/env bash
# Sets up everything cowfs needs on a fresh Debian 12 machine (as root): Debian packages,
# a virtualenv in .venv and the package itself. Re-running it is cheap: each step is skipped
# when already done.
#
#   scripts/setup.sh            this checkout only; the machine-wide links are left as they are
#   scripts/setup.sh --system   also point /usr/local/bin/cowfs, /sbin/mount.fuse.cowfs and
#                               /sbin/mount.cowfs at this checkout (systemd units, mount(8), fstab
#                               and tests/test_systemd.py, tests/test_mount_helper.py use them)
#
# COWFS_SYSTEM_ROOT (default empty) is put in front of those paths; the tests use it.
set -euo pipefail
cd "$(dirname "$0")/.."
system=0
for arg in "$@"; do
  case "$arg" in
    --system) system=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument $arg (known: --system)" >&2; exit 2 ;;
  esac
done
root=${COWFS_SYSTEM_ROOT:-}

debs=(fuse3 libfuse3-dev pkg-config python3-venv fuse-overlayfs git sqlite3 attr acl systemd gcc make etcd-server)
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
# Bytecode for the package itself (pip compiles only what it installs, not an editable
# source tree): with PYTHONDONTWRITEBYTECODE set, as on the CI machines, every `cowfs`
# command and daemon would otherwise compile the modules it imports again (~0.15 s each).
# Python checks each .pyc against its source, so an edited module is still compiled afresh.
.venv/bin/python -m compileall -q cowfs >/dev/null
# The systemd unit runs /usr/local/bin/cowfs; mount(8) runs /sbin/mount.fuse.cowfs (-t fuse.cowfs, fstab).
for link in /usr/local/bin/cowfs:cowfs /sbin/mount.fuse.cowfs:mount.fuse.cowfs /sbin/mount.cowfs:mount.fuse.cowfs; do
  path=$root${link%%:*}
  want=$PWD/.venv/bin/${link#*:}
  if [ "$system" = 1 ]; then
    if [ -e "$path" ] && [ ! -L "$path" ]; then
      echo "setup: $path is a file, not a link: left alone"
    elif [ "$(readlink "$path" 2>/dev/null)" != "$want" ]; then
      mkdir -p "$(dirname "$path")"
      ln -sfn "$want" "$path"
      echo "setup: $path -> $want"
    fi
  elif [ -L "$path" ] || [ -e "$path" ]; then
    now=$(readlink "$path" 2>/dev/null || echo "a file")
    [ "$now" = "$want" ] || echo "setup: $path points at $now (left as it is; --system points it here)"
  else
    echo "setup: $path is not installed (--system links it to this checkout)"
  fi
done
echo "setup: ready (.venv/bin/cowfs)"
