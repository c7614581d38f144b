"""Helpers for the cowfs benchmarks: targets to mount and measure, FUSE request counting, disk and
process counters. Used by scripts/bench_core.py; self-contained (standard library only) so that other
benchmark scripts can import it too (`sys.path.insert(0, "scripts")`).

Targets (each exposes `.path`, the directory the workload runs in):
  plain        a plain directory on the disk that holds the work directory
  overlay      fuse-overlayfs, lowerdir = an empty directory, upperdir + workdir on the same disk
  passthrough  scripts/passthroughfs.py (bare pyfuse3 + trio), counters via SIGUSR1
  cowfs        `cowfs init` / `cowfs mount` / `cowfs umount`, counters via `cowfs stats --json`

FUSE requests are counted two ways where possible:
  * by the daemon itself (cowfs stats "requests", passthroughfs --counters): "daemon" counts;
  * by the kernel, with the fuse:fuse_request_send tracepoint filtered on the mount's connection
    (tracefs instance, no hist triggers needed): "kernel" counts, which also work for fuse-overlayfs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PASSTHROUGH = os.path.join(REPO, "scripts", "passthroughfs.py")


# ---------------------------------------------------------------------------------------------
# small system helpers

def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run(cmd, timeout=600, check=True, ok_codes=(0,), **kw) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout, captured output, and a readable error."""
    p = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    if check and p.returncode not in ok_codes:
        raise RuntimeError(f"{cmd if isinstance(cmd, str) else ' '.join(map(str, cmd))} -> "
                           f"rc {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return p


def _mountinfo_entry(path: str) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at `path` (the top one), without touching the
    mounted filesystem itself (no stat: a hung FUSE daemon must not hang the caller)."""
    path = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == path:
                found = fields
    return found


def is_mounted(path: str) -> bool:
    return _mountinfo_entry(path) is not None


def fuse_connection(path: str) -> int | None:
    """The FUSE connection number (= minor device number) of the mount at `path`."""
    e = _mountinfo_entry(path)
    if e is None:
        return None
    major, minor = (int(x) for x in e[2].split(":"))
    return minor if major == 0 else None


def abort_fuse(path: str) -> bool:
    """Abort a FUSE connection: every request blocked on it fails with ENOTCONN."""
    c = fuse_connection(path)
    if c is None:
        return False
    try:
        with open(f"/sys/fs/fuse/connections/{c}/abort", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str, interval=0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), seconds."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_status_kb(pid: int | None, key: str) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def random_offsets(size: int, n: int, seed: int, block: int = 4096) -> list[int]:
    """`n` block-aligned offsets into a file of `size` bytes, the same for every target (seeded)."""
    rng = random.Random(seed)
    blocks = size // block
    return [rng.randrange(blocks) * block for _ in range(n)]


def timed_preads(fd: int, offsets: list[int], block: int = 4096) -> list[int]:
    """One `block`-byte pread at each offset; -> each call's latency, ns. A short read raises."""
    lat = []
    for o in offsets:
        s = time.perf_counter_ns()
        got = os.pread(fd, block, o)
        lat.append(time.perf_counter_ns() - s)
        if len(got) != block:
            raise RuntimeError(f"short read at {o}: {len(got)} bytes")
    return lat


def timed_pwrites_fsync(fd: int, offsets: list[int], data: memoryview, block: int = 4096) -> list[int]:
    """A `block`-byte pwrite at each offset, each followed by fsync (what SQLite and package
    managers do); the bytes come from `data` at a stride, so they are not all the same block.
    -> each write+fsync's latency, ns."""
    lat = []
    for i, o in enumerate(offsets):
        src = (i * block * 7) % (len(data) - block)
        s = time.perf_counter_ns()
        os.pwrite(fd, data[src:src + block], o)
        os.fsync(fd)
        lat.append(time.perf_counter_ns() - s)
    return lat


def percentile_us(lat_ns: list[int], q: float) -> float:
    """The q-quantile (0..1) of latencies in ns, in µs (nearest rank, as bench_core has always printed)."""
    lat = sorted(lat_ns)
    return lat[min(len(lat) - 1, int(len(lat) * q))] / 1000


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class DiskCounter:
    """Sectors written to the block device holding `path` (/sys/dev/block/M:m/stat, field 7, always
    512-byte units). Counts everything written to that device: the store's own files, the ext4
    journal, and any other process writing to the same disk meanwhile."""

    def __init__(self, path: str):
        st = os.stat(path)
        self.dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        self.stat_path = f"/sys/dev/block/{self.dev}/stat"
        self.name = os.path.basename(os.path.realpath(f"/sys/dev/block/{self.dev}"))
        self.ok = os.path.exists(self.stat_path)

    def bytes_written(self) -> int | None:
        if not self.ok:
            return None
        with open(self.stat_path) as f:
            return int(f.read().split()[6]) * 512


def users_of(prefix: str) -> list[str]:
    """Processes with a cwd, root or open file below `prefix` (to explain "target is busy")."""
    prefix = os.path.abspath(prefix).rstrip("/") + "/"
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        links = []
        for name in ("cwd", "root"):
            links.append(f"/proc/{d}/{name}")
        try:
            links += [f"/proc/{d}/fd/{fd}" for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if (target + "/").startswith(prefix):
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
                except OSError:
                    cmd = "?"
                out.append(f"{d} ({cmd}): {link} -> {target}")
                break
    return out


class LoopScratch:
    """An ext4 filesystem on a loop device (direct I/O) backed by a sparse file, mounted at `mountpoint`.

    Everything a benchmark writes then goes through a block device of its own, so the device's
    sectors-written counter sees only the benchmark (the root disk is shared with other work)."""

    def __init__(self, backing: str, mountpoint: str, size_gib: int):
        self.backing, self.mountpoint, self.size_gib = backing, mountpoint, size_gib
        self.dev = None
        self.mounted = False

    def setup(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.backing, "wb") as f:
            f.truncate(self.size_gib << 30)
        self.dev = run(["losetup", "--find", "--show", "--direct-io=on", self.backing],
                       timeout=60).stdout.strip()
        # initialise inode tables and journal now, not lazily in the background during the run
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.dev],
            timeout=600)
        run(["mount", "-t", "ext4", self.dev, self.mountpoint], timeout=60)
        self.mounted = True

    def teardown(self) -> None:
        if self.mounted:
            for _ in range(30):  # a daemon that was just killed may still hold files open
                p = subprocess.run(["umount", self.mountpoint], timeout=120, capture_output=True,
                                   text=True)
                if p.returncode == 0:
                    break
                time.sleep(1)
            if p.returncode != 0:
                log(f"umount {self.mountpoint}: {p.stderr.strip()}; held by: {users_of(self.mountpoint)}; "
                    f"lazy unmount")
                subprocess.run(["umount", "-l", self.mountpoint], timeout=60, capture_output=True)
            self.mounted = False
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], timeout=60, capture_output=True)
            self.dev = None
        if os.path.exists(self.backing):
            os.unlink(self.backing)


# ---------------------------------------------------------------------------------------------
# kernel-side FUSE request counting (tracefs)

_OPNAMES = {"BATCH_FORGET": "forget", "RENAME2": "rename", "READDIRPLUS": "readdirplus"}


def _opname(kernel_name: str) -> str:
    n = kernel_name[5:] if kernel_name.startswith("FUSE_") else kernel_name
    return _OPNAMES.get(n, n.lower())


class FuseTracer:
    """Counts FUSE requests per opcode for one connection with the fuse:fuse_request_send tracepoint,
    in a private tracefs instance with a big ring buffer read after each phase (so nothing runs
    while the workload does)."""

    INSTANCE = "cowfs_bench"

    def __init__(self, buffer_kb: int = 65536):
        self.root = None
        self.mounted_here = False
        self.error = None
        try:
            root = "/sys/kernel/tracing"
            if not os.path.exists(os.path.join(root, "instances")):
                if not os.path.isdir(root):
                    raise OSError("no /sys/kernel/tracing")
                run(["mount", "-t", "tracefs", "nodev", root], timeout=10)
                self.mounted_here = True
            ev = os.path.join(root, "events", "fuse", "fuse_request_send")
            if not os.path.isdir(ev):
                raise OSError("kernel has no fuse:fuse_request_send tracepoint")
            inst = os.path.join(root, "instances", self.INSTANCE)
            if not os.path.isdir(inst):
                os.mkdir(inst)
            self.root = inst
            self._w("buffer_size_kb", str(buffer_kb))
            self._w("tracing_on", "1")
        except Exception as e:  # noqa: BLE001 - any failure just means "no kernel counts"
            self.error = f"{type(e).__name__}: {e}"
            self.root = None

    @property
    def available(self) -> bool:
        return self.root is not None

    def _w(self, rel: str, val: str) -> None:
        with open(os.path.join(self.root, rel), "w") as f:
            f.write(val)

    @staticmethod
    def connection_of(mountpoint: str) -> int:
        e = _mountinfo_entry(mountpoint)
        major, minor = (int(x) for x in e[2].split(":"))
        return (major << 20) | minor  # the kernel's dev_t encoding (what the tracepoint prints)

    def start(self, mountpoint: str) -> None:
        if not self.root:
            return
        ev = "events/fuse/fuse_request_send/"
        self._w(ev + "enable", "0")
        self._w("trace", "")  # clear
        self._w(ev + "filter", f"connection == {self.connection_of(mountpoint)}")
        self._w(ev + "enable", "1")

    def stop(self) -> tuple[Counter, bool] | None:
        """-> (counts per op, complete?)"""
        if not self.root:
            return None
        self._w("events/fuse/fuse_request_send/enable", "0")
        counts: Counter = Counter()
        complete = True
        pat = re.compile(r"opcode \d+ \((\w+)\)")
        with open(os.path.join(self.root, "trace"), errors="replace") as f:
            for line in f:
                if line.startswith("#"):
                    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", line)
                    if m and m.group(1) != m.group(2):
                        complete = False
                    continue
                m = pat.search(line)
                if m:
                    counts[_opname(m.group(1))] += 1
        self._w("trace", "")
        return counts, complete

    def close(self) -> None:
        if self.root:
            try:
                self._w("events/fuse/fuse_request_send/enable", "0")
                self._w("events/fuse/fuse_request_send/filter", "0")
                os.rmdir(self.root)
            except OSError:
                pass
            self.root = None
        if self.mounted_here:
            subprocess.run(["umount", "/sys/kernel/tracing"], timeout=10, capture_output=True)
            self.mounted_here = False


# ---------------------------------------------------------------------------------------------
# targets

class Target:
    name = "?"
    fuse = False

    def __init__(self, base: str):
        self.base = os.path.join(base, self.name)
        self.path = None          # where the workload runs
        self.pid = None           # daemon pid
        self.peak_rss_kb = None   # max VmHWM over this target's daemon processes
        self.note = ""

    # lifecycle
    def setup(self) -> None:
        if os.path.exists(self.base):
            shutil.rmtree(self.base)
        os.makedirs(self.base)

    def mount(self) -> None:
        pass

    def unmount(self) -> None:
        pass

    def teardown(self) -> None:
        """Unmount whatever is mounted; must never raise."""
        try:
            self.unmount()
        except Exception as e:  # noqa: BLE001
            log(f"[{self.name}] unmount failed: {e}")
        self._force_cleanup()

    def _force_cleanup(self) -> None:
        mp = getattr(self, "mp", None)
        if mp and is_mounted(mp):
            subprocess.run(["fusermount3", "-u", mp], timeout=30, capture_output=True)
            if is_mounted(mp):
                subprocess.run(["fusermount3", "-uz", mp], timeout=30, capture_output=True)
        if pid_alive(self.pid):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    wait_for(lambda: not pid_alive(self.pid), 10, f"{self.name} daemon exit")
                    break
                except TimeoutError:
                    continue
        self._reap()

    def _reap(self) -> None:
        p = getattr(self, "proc", None)
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            self.proc = None
        logf = getattr(self, "_logf", None)
        if logf is not None:
            logf.close()
            self._logf = None

    def cold(self) -> None:
        """Make the next read cold: unmount, drop the page cache, mount again."""
        self.unmount()
        drop_caches()
        self.mount()

    def settle(self) -> None:
        """Push everything to the disk (used to bound write amplification): unmount + sync."""
        os.sync()
        self.unmount()
        os.sync()

    def record_rss(self) -> None:
        hwm = proc_status_kb(self.pid, "VmHWM")
        if hwm is not None:
            self.peak_rss_kb = max(self.peak_rss_kb or 0, hwm)

    # counters
    def daemon_requests(self) -> dict | None:
        return None

    def fuse_mountpoint(self) -> str | None:
        return self.path if self.fuse else None


class PlainTarget(Target):
    name = "plain"

    def setup(self):
        super().setup()
        self.path = os.path.join(self.base, "dir")
        os.makedirs(self.path)

    def settle(self):
        os.sync()


class _DaemonTarget(Target):
    fuse = True

    def _start_daemon(self, cmd, logname: str) -> None:
        self.log_path = os.path.join(self.base, logname)
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        try:
            wait_for(lambda: is_mounted(self.mp) or self.proc.poll() is not None, 30, f"{self.name} mount")
            if not is_mounted(self.mp):
                raise RuntimeError(f"{self.name} daemon exited rc={self.proc.returncode}: "
                                   f"{open(self.log_path, errors='replace').read()[-2000:]}")
        except Exception:
            self._force_cleanup()
            raise
        self.path = self.mp

    def unmount(self) -> None:
        if self.mp and is_mounted(self.mp):
            self.record_rss()
            run(["fusermount3", "-u", self.mp], timeout=120)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log(f"[{self.name}] daemon did not exit after unmount; killing")
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        self.pid = None
        self._reap()


class OverlayTarget(_DaemonTarget):
    name = "overlay"

    def setup(self):
        super().setup()
        for d in ("lower", "upper", "work", "mnt"):
            os.makedirs(os.path.join(self.base, d))
        self.mp = os.path.join(self.base, "mnt")
        self.proc = None

    def mount(self):
        b = self.base
        self._start_daemon(["fuse-overlayfs", "-f", "-o",
                            f"lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work",
                            self.mp], "fuse-overlayfs.log")


class PassthroughTarget(_DaemonTarget):
    name = "passthrough"

    def __init__(self, base, python=None):
        super().__init__(base)
        self.python = python or sys.executable

    def setup(self):
        super().setup()
        for d in ("src", "mnt"):
            os.makedirs(os.path.join(self.base, d))
        self.mp = os.path.join(self.base, "mnt")
        self.counters = os.path.join(self.base, "counters.json")
        self.proc = None

    def mount(self):
        if os.path.exists(self.counters):
            os.unlink(self.counters)
        self._start_daemon([self.python, PASSTHROUGH, os.path.join(self.base, "src"), self.mp,
                            "--counters", self.counters], "passthroughfs.log")
        self._offset = Counter()
        self._last_dumps = 0

    def daemon_requests(self):
        if not pid_alive(self.pid):
            return None
        os.kill(self.pid, signal.SIGUSR1)

        def fresh():
            try:
                with open(self.counters) as f:
                    d = json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return d if d["dumps"] > self._last_dumps else None

        wait_for(lambda: fresh() is not None, 30, "passthroughfs counters")
        d = fresh()
        self._last_dumps = d["dumps"]
        return d["requests"]


class CowfsTarget(Target):
    name = "cowfs"
    fuse = True

    def __init__(self, base, cowfs_bin=None, mount_opts=()):
        super().__init__(base)
        self.bin = cowfs_bin or os.path.join(VENV_BIN, "cowfs")
        self.mount_opts = list(mount_opts)
        self.stats_missing = None

    @staticmethod
    def available(cowfs_bin=None) -> tuple[bool, str]:
        b = cowfs_bin or os.path.join(VENV_BIN, "cowfs")
        if not os.path.exists(b):
            return False, f"{b} does not exist"
        try:
            p = subprocess.run([b, "--help"], timeout=60, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return False, "cowfs --help timed out"
        if p.returncode != 0:
            return False, f"cowfs --help failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"
        return True, ""

    def setup(self):
        super().setup()
        self.store = os.path.join(self.base, "store")
        self.mp = os.path.join(self.base, "mnt")
        os.makedirs(self.mp)
        run([self.bin, "init", self.store], timeout=120)

    def mount(self):
        cmd = [self.bin, "mount", self.store, self.mp]
        for o in self.mount_opts:
            cmd += ["-o", o]
        try:
            run(cmd, timeout=120)
            wait_for(lambda: is_mounted(self.mp), 30, "cowfs mount")
        except Exception:
            self._force_cleanup()
            raise
        self.path = self.mp
        st = self.stats()
        self.pid = (st or {}).get("daemon_pid") or self._find_pid()

    def _find_pid(self) -> int | None:
        """Fallback when `cowfs stats` has no daemon_pid: the process whose command line names the
        mount point."""
        me = os.getpid()
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if os.fsencode(self.mp) in args and any(b"cowfs" in a for a in args):
                if b"umount" not in args and b"stats" not in args:
                    return int(d)
        return None

    def stats(self) -> dict | None:
        try:
            p = run([self.bin, "stats", self.mp, "--json"], timeout=60)
            lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
            return json.loads(lines[-1])
        except Exception as e:  # noqa: BLE001
            self.stats_missing = f"cowfs stats failed: {e}"
            return None

    def daemon_requests(self):
        st = self.stats()
        if st is None:
            return None
        req = st.get("requests")
        if not isinstance(req, dict):
            self.stats_missing = "`cowfs stats --json` has no 'requests' key"
            return None
        return req

    def _force_cleanup(self) -> None:
        if not hasattr(self, "mp"):
            return  # never set up (an earlier target failed): nothing to clean
        if not self.pid:
            self.pid = self._find_pid()
        super()._force_cleanup()

    def unmount(self):
        if self.mp and is_mounted(self.mp):
            self.record_rss()
            run([self.bin, "umount", self.mp], timeout=300)
        if self.pid:
            try:
                wait_for(lambda: not pid_alive(self.pid), 60, "cowfs daemon exit")
            except TimeoutError:
                log("[cowfs] daemon still alive 60 s after `cowfs umount`")
                raise
        self.pid = None


class BaselineCowfsTarget(CowfsTarget):
    """Another build of cowfs (--baseline-cowfs: the executable of another checkout's venv), in the
    same run and the same rotation as `cowfs`: a before/after comparison within one run."""
    name = "cowfs_base"


def make_target(name: str, base: str, **kw) -> Target:
    return {"plain": PlainTarget, "overlay": OverlayTarget, "passthrough": PassthroughTarget,
            "cowfs": CowfsTarget, "cowfs_base": BaselineCowfsTarget}[name](base, **kw)


def counter_delta(after: dict | None, before: dict | None, overhead: dict | None = None) -> Counter | None:
    if after is None or before is None:
        return None
    d = Counter()
    for k, v in after.items():
        if not isinstance(v, (int, float)):
            continue
        n = v - before.get(k, 0) - (overhead or {}).get(k, 0)
        if n > 0:
            d[k] = n
    return d


def machine_info() -> dict:
    u = os.uname()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        memtotal = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "kernel": u.release, "cpu": cpu,
            "mem_gib": round(memtotal / 2**20, 1), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- inputs: fetched on first use, kept in a cache directory ---------------------------------------------
DJANGO = "django==5.1.4"
DJANGO_CACHE = os.environ.get("COWFS_BENCH_CACHE", "/var/tmp/cowfs-test-cache")  # tests/test_real_tools.py downloads there too


def django_sdist(cache: str = DJANGO_CACHE) -> str:
    """The Django sdist (.tar.gz) in `cache`, downloaded with pip the first time.  The cache is
    shared by concurrent runs (benchmarks, the test suite's pytest-xdist workers): the download
    is made under the cache's lock and renamed into place once whole, so a file that exists is
    complete and no two runs download it at once."""
    os.makedirs(cache, exist_ok=True)
    gz = os.path.join(cache, f"Django-{DJANGO.split('==')[1]}.tar.gz")
    with cache_lock(cache):
        if not os.path.exists(gz):
            log(f"downloading the {DJANGO} sdist into {cache}")
            with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
                run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                     DJANGO, "-d", tmp], timeout=600)
                os.replace(os.path.join(tmp, os.path.basename(gz)), gz)
    return gz


@contextlib.contextmanager
def cache_lock(cache: str) -> Iterator[None]:
    """An exclusive flock on cache/.lock while a cache file is made."""
    fd = os.open(os.path.join(cache, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def django_tar(cache: str = DJANGO_CACHE, limit: int | None = None) -> tuple[str, int]:
    """The Django sdist as an uncompressed .tar (optionally its first `limit` entries) -> (path, entries),
    made from django_sdist(cache) the first time (under the cache's lock, renamed into place once
    whole): every benchmark fetches its own inputs."""
    gz = django_sdist(cache)
    out = os.path.join(cache, f"Django-{DJANGO.split('==')[1]}" + (f"-first{limit}" if limit else "") + ".tar")
    with cache_lock(cache):
        if not os.path.exists(out):
            tmp = out + ".tmp"
            with tarfile.open(gz, "r:gz") as src, tarfile.open(tmp, "w") as dst:
                for i, m in enumerate(src):
                    if limit and i >= limit:
                        break
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            os.replace(tmp, out)
    with tarfile.open(out) as tf:
        entries = sum(1 for _ in tf)
    return out, entries
