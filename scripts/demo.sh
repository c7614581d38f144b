#!/usr/bin/env bash
# The main job: set up, create a store (once) and mount a sandbox directory on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
store=${COWFS_STORE:-demo-store}
mnt=${COWFS_MOUNT:-sandbox}
[ -e "$store/cowfs-store.json" ] || .venv/bin/cowfs init "$store"
mkdir -p "$mnt"
if mountpoint -q "$mnt"; then
  echo "$mnt is already mounted; unmount with: .venv/bin/cowfs umount $mnt"
  exit 0
fi
.venv/bin/cowfs mount "$store" "$mnt"
echo "sandbox ready at $(cd "$mnt" && pwd)"
