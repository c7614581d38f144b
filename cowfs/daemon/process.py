"""The daemon process: `cowfs mount` checks everything it can in the calling process (clear
errors, no traceback), then forks the daemon, which reports back on a pipe once the kernel
has the mount, so `cowfs mount` returns only when the mount is usable (`--foreground`: the
daemon runs in the calling process, for systemd).  A lazy mount's build (`prepare`) runs in
the daemon and hands it the store it built, still open: no second interpreter, imports made
once, no close and reopen of the new store.
A store already served by a daemon gets the branch attached by that daemon instead (the
admin socket's `attach`), except a branch with a home database of its own, which is always
served by a daemon of its own (docs/design-many-processes.md, "Step 6"; its files in
STORE/homes/<id>/, cowfs.daemon.locate).  The daemon's work once it runs is cowfs.daemon.server's.
"""
from __future__ import annotations

import base64
import errno
import gc
import logging
import os
import pickle
import sys
from typing import TYPE_CHECKING, Callable, NoReturn

from cowfs import faults, private
from cowfs.libc import libc
from cowfs.daemon import admin, mounts, options as mount_options
from cowfs.daemon.config import MountConfig, option_conflicts, options_asked
from cowfs.daemon.mounts import daemon_pid
from cowfs.errors import MountError, StoreError
from cowfs.storedir import LOG_NAME

if TYPE_CHECKING:
    from cowfs.store import Store

log = logging.getLogger("cowfs.daemon")
_FRESH_ENV = "COWFS_DAEMON_CONFIG"  # the configuration _exec_fresh hands to fresh_child

__all__ = ["MountConfig", "mount"]


def check_mountpoint(mountpoint: str) -> None:
    """Refuse missing, non-empty or already mounted mountpoints; clear the mount a dead
    daemon of a cowfs store left there.  The mount table is read before the mountpoint is
    touched: a stat of a hung FUSE mount would block."""
    entry = mounts.entry_at(mountpoint)
    if entry is not None:
        from cowfs.daemon.locate import daemon_dir  # SQLite: imported only when needed

        if entry.store is None or daemon_pid(daemon_dir(entry.store, mountpoint)) is not None:
            raise MountError(f"{mountpoint} is already a mount point ({entry.fstype} {entry.source})")
        log.warning("clearing the mount a dead daemon of %s left at %s", entry.store, mountpoint)
        mounts.clear_connection(entry.dev)
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise MountError(f"mountpoint {mountpoint} does not exist") from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.listdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not empty")


def check_environment() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist: this machine or container has no FUSE")
    mounts.fusermount()


def _setup_logging(where: str, debug: bool, to_stderr: bool) -> None:
    """Log to where/daemon.log (the store's directory, or a home's for a branch's own daemon)."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    path = os.path.join(where, LOG_NAME)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, private.FILE_MODE))
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if to_stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> None:
    """Let glibc reuse freed request buffers instead of unmapping them.

    Every 1 MiB write request and every 64 KiB chunk buffer is a large allocation, which
    glibc serves from fresh mmap()s and gives back on free; touching fresh pages costs a page
    fault each, ~2 ms per MiB on this VM kind.  Serving them from the heap and keeping up to
    256 MiB of freed heap mapped makes them reuse warm pages (bounded: the dirty limit and
    the caches bound what is live)."""
    try:
        lib = libc()
        lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        lib.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its defaults stand


# A lazy mount's build: creates the store (the configuration's cache sizes) and returns it
# open, for the daemon to serve; MountError: one line
Prepare = Callable[[MountConfig], "Store"]


def _run_daemon(cfg: MountConfig, wfd: int, prepare: Prepare | None = None) -> NoReturn:
    """The forked daemon's life: run, saying OK or the error on the pipe wfd once, then exit."""
    def report(err: str | None) -> None:
        try:
            os.write(wfd, (f"ERR {err}" if err else "OK").encode() + b"\n")
            os.close(wfd)
        except OSError:
            pass

    code = 1
    try:
        code = _start(cfg, report, to_stderr=False, prepare=prepare)
    except BaseException as exc:
        logging.getLogger("cowfs.daemon").exception("daemon failed")
        report(f"daemon failed: {exc}")
    finally:
        os._exit(code)


def _exec_fresh(cfg: MountConfig, wfd: int) -> NoReturn:
    """Become a fresh interpreter that runs the daemon (fresh_child): the calling process
    opened RocksDB, whose threads a forked copy lacks (cowfs.kv.rocks.opened_in_this_process)."""
    try:
        os.set_inheritable(wfd, True)
        env = dict(os.environ, **{_FRESH_ENV: base64.b64encode(pickle.dumps(cfg)).decode()})
        os.execve(sys.executable, [sys.executable, "-I", "-c",
                                   "from cowfs.daemon.process import fresh_child; fresh_child()", str(wfd)], env)
    except OSError as exc:
        os.write(wfd, f"ERR cannot start the daemon ({sys.executable}): {exc}\n".encode())
    os._exit(1)


def fresh_child() -> NoReturn:
    """The daemon in the interpreter _exec_fresh started: its configuration from the
    environment, the parent's pipe from argv."""
    cfg = pickle.loads(base64.b64decode(os.environ.pop(_FRESH_ENV)))
    _run_daemon(cfg, int(sys.argv[1]))


def _start(cfg: MountConfig, ready: Callable[[str | None], None], to_stderr: bool,
           prepare: Prepare | None = None) -> int:
    # Every file the daemon, RocksDB's threads or the store create is the owner's alone
    # (cowfs.private); for the daemon's whole life, so never given back.
    os.umask(private.UMASK)
    built: "Store | None" = None
    if prepare is not None:
        try:
            built = prepare(cfg)
        except MountError as exc:
            ready(str(exc))
            return 1
    _setup_logging(cfg.daemon_dir, cfg.debug, to_stderr)
    try:
        faults.load(os.environ.get(faults.ENV))  # a test hook (cowfs.faults)
    except ValueError as exc:
        if built is not None:
            built.close()
        ready(str(exc))
        return 1
    _keep_freed_memory()
    from cowfs.daemon.imports import import_fuse_stack

    import_fuse_stack()  # without the look-ups at import that the daemon does not need
    from cowfs.daemon.server import Daemon  # pyfuse3, trio and the store: only in the daemon

    if built is None:
        # The modules, classes and functions imported so far live as long as the process:
        # frozen, no full collection walks them again, the one at the store's close
        # (cowfs.kv.rocks, which frees the database's last handles) included: 15-68 ms of
        # ~34,500 objects at every unmount, ~1 ms after.  Every database object is made after
        # this, so none is kept from that collection.  A lazy build's store was opened before
        # (a cycle of its objects frozen could keep a handle open): not frozen then.
        gc.freeze()
        if cfg.home is None and not to_stderr:
            # The store's daemon, all imported and nothing opened yet: its zygote forks the
            # branches' own daemons from here on (cowfs.daemon.zygote).  Not under --foreground:
            # a service manager's unit holds one daemon.
            from cowfs.daemon import zygote

            zygote.started = zygote.start(cfg.store, _run_daemon)

    try:
        daemon = Daemon(cfg, built)
    except StoreError as exc:
        ready(str(exc))
        return 1
    return daemon.run(ready)


def _zygote_forked(cfg: MountConfig, wfd: int) -> bool:
    """Whether the store daemon's zygote forked the daemon of cfg's branch (a home's), which
    reports on wfd: no imports to wait for (cowfs.daemon.zygote).  False: no zygote (the
    store's daemon does not run), or it declined this caller: we fork the daemon ourselves."""
    from cowfs.daemon import zygote

    return zygote.request(cfg, wfd)


def mount(cfg: MountConfig, foreground: bool, prepare: Prepare | None = None) -> int:
    """Check, then serve (foreground) or fork a daemon and wait until it is ready.  prepare
    (a lazy mount's build): run by the daemon first, it creates the store."""
    cfg.store = os.path.abspath(cfg.store)
    cfg.mountpoint = os.path.abspath(cfg.mountpoint)
    check_environment()
    if prepare is None and not os.path.isdir(cfg.store):
        raise MountError(f"{cfg.store}: no such store directory (create one with 'cowfs init {cfg.store}')")
    check_mountpoint(cfg.mountpoint)
    if cfg.cpus is not None:
        allowed = os.sched_getaffinity(0)
        missing = sorted(mount_options.cpu_set(cfg.cpus) - allowed)
        if missing:
            raise MountError(f"-o cpus={cfg.cpus}: CPU {missing[0]} is not one this process may run on "
                             f"(allowed: {mount_options.parse_cpus('+'.join(map(str, sorted(allowed))))})")
    if prepare is None:
        from cowfs.daemon.locate import branch_home

        cfg.home = branch_home(cfg.store, cfg.branch)
    if cfg.home is not None:
        # A branch with a home database: a daemon of its own, whether or not the store's
        # runs; one at a time (its serve record, checked again by the daemon under CAS).
        pid = daemon_pid(cfg.daemon_dir)
        if pid is not None:
            raise MountError(f"branch {cfg.branch!r} is already served by its own daemon pid {pid} (a branch is "
                             "served by one mount at a time: use that one, or mount another branch)")
    pid = daemon_pid(cfg.store) if prepare is None and cfg.home is None else None
    if pid is not None:
        # One daemon per store: ask it to serve this branch here too.
        if foreground:
            raise MountError(f"store {cfg.store} is already served by daemon pid {pid}; "
                             "mount further branches without --foreground")
        asked = options_asked(cfg)
        if asked:
            # Options the daemon already has are fine; any other value cannot hold for this
            # branch only (they are the FUSE connection's, or the daemon's).
            try:
                resp = admin.request(cfg.store, {"cmd": "options"})
            except OSError as exc:
                raise MountError(f"cannot reach daemon pid {pid} of {cfg.store}: {exc}") from None
            if not resp.get("ok"):  # a daemon from before this command: it cannot tell
                raise MountError(f"store {cfg.store} is already served by daemon pid {pid}, whose mount options "
                                 "hold for every branch it serves; only quota_bytes, quota_inodes and hold_ttl may be "
                                 "given for another branch")
            conflicts = option_conflicts(asked, resp["options"])
            if conflicts:
                raise MountError(f"store {cfg.store} is already served by daemon pid {pid}, whose mount options "
                                 f"hold for every branch it serves: {'; '.join(conflicts)}; give the options "
                                 "in force or leave them out (quota_bytes, quota_inodes and hold_ttl are per branch)")
        try:
            resp = admin.request(cfg.store, {"cmd": "attach", "branch": cfg.branch, "mountpoint": cfg.mountpoint,
                                             "quota_bytes": cfg.quota_bytes, "quota_inodes": cfg.quota_inodes,
                                             "hold_ttl": cfg.hold_ttl})
        except OSError as exc:
            raise MountError(f"cannot reach daemon pid {pid} of {cfg.store}: {exc}") from None
        if not resp.get("ok"):
            raise MountError(resp.get("error", "the daemon refused"))
        return 0

    if foreground:
        def say(err: str | None) -> None:
            if err:
                print(f"cowfs: {err}", file=sys.stderr)
        return _start(cfg, say, to_stderr=True, prepare=prepare)

    from cowfs.kv.rocks import opened_in_this_process

    if prepare is not None and opened_in_this_process():
        raise MountError("internal: a store's build cannot run in a daemon re-executed to drop RocksDB's state")

    rfd, wfd = os.pipe()
    child = None
    if cfg.home is None or prepare is not None or not _zygote_forked(cfg, wfd):
        child = os.fork()
        if child == 0:  # the daemon
            os.close(rfd)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            if opened_in_this_process():  # e.g. `cowfs export STORE ...` listed the store offline first
                _exec_fresh(cfg, wfd)
            _run_daemon(cfg, wfd, prepare)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        line = r.readline().strip()
    if line == "OK":
        return 0
    if line.startswith("ERR "):
        raise MountError(line[4:])
    if child is not None:
        os.waitpid(child, 0)
    raise MountError(f"the daemon exited before mounting; see {os.path.join(cfg.daemon_dir, LOG_NAME)}")
