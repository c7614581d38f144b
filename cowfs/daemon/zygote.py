"""The store daemon's zygote: a process that has imported everything a daemon needs (trio,
pyfuse3, the store's modules) and opened nothing, which forks the daemon of a branch with a
home of its own when `cowfs mount STORE MNT --branch B` asks (docs/architecture.md,
"Process model").  A daemon's imports are most of a mount's start-up (~120 ms of CPU of
~190); a fork of the zygote costs ~2 ms.

Owned by the store's daemon: forked by it (twice, so that init reaps it) after its imports and
before it opens the store, so it holds no database, no FUSE session and no thread; it lives
while the store's daemon does (a pipe whose write end only that daemon holds: its end, at exit
or kill -9, is the zygote's end) and removes its socket, `STORE/zygote.sock`, when it goes.
Only a caller the forked daemon could not tell from one it forked itself is served: the same
user, groups, capabilities, namespaces, root directory, cgroup, limits, OOM score adjustment
and scheduling (nice, policy, priority), from /proc of the peer the kernel names
(SO_PEERCRED); anything else, or no zygote, and `cowfs mount` forks the daemon itself as before.  The caller's environment, working directory and CPU
affinity go to the daemon with the request; the daemon reports ready or its error on the
caller's own pipe (passed with SCM_RIGHTS), as a daemon forked by `cowfs mount` does.
"""
from __future__ import annotations

import array
import os
import pickle
import select
import socket
import struct
import time
from typing import TYPE_CHECKING, Callable, NoReturn

from cowfs.daemon.admin import peer_uid, socket_path
from cowfs.storedir import ZYGOTE_SOCKET

if TYPE_CHECKING:
    from cowfs.daemon.config import MountConfig

# What makes a process's children what they are, beyond the environment and working
# directory that a request carries: /proc/PID/status lines, namespaces, files.
_STATUS_KEYS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:",
                b"NoNewPrivs:", b"Seccomp:")
_NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")
_HEADER = struct.Struct("<I")
REQUEST_TIMEOUT = 5.0  # seconds a caller waits for the zygote's answer
EXIT_WAIT = 2.0  # seconds the store's daemon, exiting, waits for its zygote to be gone
# This process's zygote (the store's daemon), or the zygote that forked it (a branch's daemon):
# pids, for `stats`
started: int | None = None
forked_by: int | None = None
# The store daemon's end of its zygote's life pipe (closed by forget, or by the kernel at exit)
_life: int | None = None

# Run in the forked daemon: (configuration, ready pipe) -> never returns (process._run_daemon)
RunDaemon = Callable[["MountConfig", int], NoReturn]


def path(store: str) -> str:
    """The zygote's socket (in /run/cowfs like the admin socket's when the path is too long)."""
    return socket_path(store, ZYGOTE_SOCKET)


def identity(pid: int | str) -> tuple[object, ...]:
    """What a child of process pid inherits and a request cannot carry; OSError if unreadable."""
    base = f"/proc/{pid}"
    with open(f"{base}/status", "rb") as f:
        status = tuple(line for line in f if line.startswith(_STATUS_KEYS))
    with open(f"{base}/cgroup", "rb") as f:
        cgroup = f.read()
    with open(f"{base}/limits", "rb") as f:
        limits = f.read()
    namespaces = tuple(os.stat(f"{base}/ns/{ns}").st_ino for ns in _NAMESPACES if os.path.exists(f"/proc/self/ns/{ns}"))
    with open(f"{base}/oom_score_adj", "rb") as f:
        oom = f.read()
    with open(f"{base}/stat", "rb") as f:
        stat = f.read().rsplit(b")", 1)[1].split()
    scheduling = (stat[16], stat[37], stat[38])  # nice, rt_priority, policy (fields 19, 40, 41)
    root = os.stat(f"{base}/root")
    return status, cgroup, limits, namespaces, (root.st_dev, root.st_ino), oom, scheduling


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, closed already


def start(store: str, run: RunDaemon) -> int | None:
    """Fork the zygote of store (from the store's daemon, after its imports, before it opens
    anything); return its pid, or None if it could not be started.  The daemon keeps the
    write end of the life pipe (`_life`): inherited by no other process (close-on-exec, and
    the zygote's children close it), closed by forget() at the daemon's exit or by the kernel
    when it is killed, which ends the zygote."""
    life_r, life_w = os.pipe()
    told_r, told_w = os.pipe()
    try:
        first = os.fork()
    except OSError:
        for fd in (life_r, life_w, told_r, told_w):
            os.close(fd)
        return None
    if first == 0:  # in between: forks the zygote and exits, so init (not the daemon) reaps it
        code = 1
        try:
            os.close(life_w)
            os.close(told_r)
            zygote = os.fork()
            if zygote == 0:
                os.close(told_w)
                _serve(store, life_r, run)
            os.write(told_w, str(zygote).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(life_r)
    os.close(told_w)
    os.waitpid(first, 0)
    with os.fdopen(told_r, "rb") as f:
        told = f.read()
    if not told:
        os.close(life_w)
        return None
    global _life
    _life = life_w  # open until forget() or this process's end (see above)
    return int(told)


def forget(store: str) -> None:
    """At the store daemon's exit, while it still holds the store (so no other daemon of the
    store, nor its zygote, can exist): end the zygote (its life pipe closed) and wait, at most
    EXIT_WAIT, until it is gone, so that `cowfs umount`, which waits for this daemon's exit,
    returns with no process of the mount left; remove the zygote's socket if it is gone
    without removing it (killed)."""
    global _life
    if started is None:
        return
    if _life is not None:
        os.close(_life)
        _life = None
    deadline = time.monotonic() + EXIT_WAIT
    while _running(started):
        if time.monotonic() > deadline:
            return  # still running: it removes its own socket when it goes
        time.sleep(0.005)
    try:
        os.unlink(path(store))
    except FileNotFoundError:
        pass


def _running(pid: int) -> bool:
    """Whether pid runs (a zombie, waiting for init to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _serve(store: str, life: int, run: RunDaemon) -> NoReturn:
    """The zygote's life: answer requests until the store's daemon is gone."""
    code = 0
    try:
        import logging

        for h in logging.getLogger().handlers:
            h.close()  # the store daemon's log file: not ours to keep open
        logging.getLogger().handlers.clear()
        _close_all_but({life})
        where = path(store)
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)  # created under the daemon's private umask: owner only
        mine = os.stat(where).st_ino
        sock.listen(16)
        me = identity("self")
        try:
            while True:
                ready, _, _ = select.select([sock, life], [], [])
                if life in ready:
                    return  # the store's daemon is gone
                conn, _ = sock.accept()
                with conn:
                    _answer(conn, me, sock, life, run)
        finally:
            try:
                if os.stat(where).st_ino == mine:  # not a later zygote's socket
                    os.unlink(where)
            except OSError:
                pass
    except BaseException:  # noqa: BLE001 - the zygote only ever exits; callers fork themselves
        code = 1
    finally:
        os._exit(code)


def _answer(conn: socket.socket, me: tuple[object, ...], sock: socket.socket, life: int, run: RunDaemon) -> None:
    """One request: check the caller, fork its daemon, say "ok" or why not."""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if peer_uid(conn) != os.getuid() or identity(pid) != me:
            conn.sendall(b"no: the caller's credentials, namespaces, cgroup or limits differ\n")
            return
        conn.sendall(b"go\n")
        cfg, env, cwd, cpus, ready = _receive(conn)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):
        return
    zygote = os.getpid()
    try:
        first = os.fork()
        if first == 0:  # in between, so that init reaps the daemon
            code = 1
            try:
                if os.fork() == 0:
                    for closing in (conn, sock):
                        closing.close()
                    os.close(life)
                    _become(zygote, cfg, env, cwd, cpus)
                    run(cfg, ready)
                code = 0
            finally:
                os._exit(code)
        os.waitpid(first, 0)
    finally:
        os.close(ready)
    conn.sendall(b"ok\n")


def _retitle(args: list[str]) -> None:
    """Make /proc/self/cmdline (what ps and pgrep show) args, as far as they fit where the
    kernel keeps it (our argv's place, the store daemon's command line): a forked daemon
    names its own branch and mount point, not the store's (`pkill -f` of the store's
    mount must not reach it)."""
    import ctypes

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
    size = end - start
    if size <= 0:
        return
    title = b"\0".join(os.fsencode(a) for a in args)[: size - 1]
    ctypes.memmove(start, title.ljust(size, b"\0"), size)


def _become(zygote: int, cfg: "MountConfig", env: dict[str, str], cwd: str, cpus: set[int]) -> None:
    """The forked daemon takes the caller's environment, directory and CPUs, and a command
    line of its own."""
    global forked_by
    forked_by = zygote
    _retitle(["cowfs", "mount", cfg.store, cfg.mountpoint, "--branch", cfg.branch])
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        pass  # a CPU our cgroup (the caller's too) no longer allows: the zygote's CPUs then


def _receive(conn: socket.socket) -> tuple["MountConfig", dict[str, str], str, set[int], int]:
    """A request: its length, then the pickled (configuration, environment, working directory,
    CPU affinity), with the caller's ready pipe as SCM_RIGHTS."""
    fds = array.array("i")
    head, anc, _flags, _addr = conn.recvmsg(_HEADER.size, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(head) != _HEADER.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed request")
    (size,) = _HEADER.unpack(head)
    body = b""
    while len(body) < size:
        part = conn.recv(size - len(body))
        if not part:
            os.close(fds[0])
            raise EOFError("request cut short")
        body += part
    cfg, env, cwd, cpus = pickle.loads(body)  # from a peer of our own uid (checked above)
    return cfg, env, cwd, cpus, fds[0]


def request(cfg: "MountConfig", ready: int) -> bool:
    """Ask the zygote of cfg.store to fork the daemon for cfg, which reports on the pipe ready
    (our write end: the daemon gets a copy).  False when there is no zygote or it declined:
    the caller forks the daemon itself.  Once the request is sent, anything but a refusal
    counts as taken (True): the caller then reads the pipe, which says OK, the error, or
    nothing (EOF) if no daemon was forked, and never starts a second daemon.  Protocol: the
    zygote says "go" (or "no: why") once it has checked the caller, then reads the request
    and says "ok" once the daemon is forked."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(REQUEST_TIMEOUT)
        try:
            s.connect(path(cfg.store))
            replies = s.makefile("rb")
            if replies.readline() != b"go\n":
                return False  # declined (this caller is not like the zygote)
        except OSError:
            return False  # no zygote (or a dead one's socket)
        body = pickle.dumps((cfg, dict(os.environ), os.getcwd(), os.sched_getaffinity(0)))
        try:
            s.sendmsg([_HEADER.pack(len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ready]))])
        except OSError:
            return False  # nothing sent
        try:
            s.sendall(body)
            replies.readline()  # "ok" once forked
        except OSError:
            pass
        return True
    finally:
        s.close()
