"""The kernel's settings for one mount and the daemon's threads: read-ahead, the dirty-page
limit the kernel allows the mount, CPU placement (-o cpus=).  Best effort where the kernel
says no; kept apart from the daemon's serving loop (cowfs.daemon.server)."""
from __future__ import annotations

import logging
import os

from cowfs.daemon import mounts

log = logging.getLogger(__name__)


def raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB per request instead of 128 KiB (root only; best effort).

    The device number comes from mountinfo: stat() on our own mount would wait for us.
    """
    entry = mounts.entry_at(mountpoint)
    if entry is None or entry.fstype != "fuse.cowfs":
        return
    try:
        with open(f"/sys/class/bdi/{entry.dev}/read_ahead_kb", "w") as out:
            out.write("1024")
    except OSError as exc:
        log.debug("read_ahead_kb unchanged: %s", exc)


def kernel_dirty_limit(dev: str) -> int | None:
    """How many bytes of dirty pages the kernel lets our mount hold (FUSE mounts have a
    strict per-device limit, 1% of the dirty threshold by default): what it may have
    acknowledged to writers before we see it."""
    try:
        with open(f"/sys/class/bdi/{dev}/max_bytes") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def pin_threads(cpus: set[int]) -> None:
    """-o cpus=: every thread of this process (RocksDB's, started when the store opened,
    included) runs on cpus only; threads started later inherit it.  A FUSE request wakes the
    daemon and its reply wakes the client: on the same CPU each wake-up is a switch, on
    another an inter-processor interrupt and a cold cache (docs/benchmarks.md)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    log.info("threads pinned to CPUs %s", ",".join(map(str, sorted(cpus))))
