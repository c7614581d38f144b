"""A logged, mixed filesystem workload for crash tests, and the checker of what survives.

The workload (run as a child process: ``python workload.py MOUNT REL LOG SEED ...``) works in
the directory MOUNT/REL: creates, overwrites, in-place patches, renames (files over files,
directories), unlinks, mkdir/rmdir, fsync/fsyncdir, and, through MOUNT/.cowfs/ctl, snapshot,
clone, delete and rollback.  It keeps a model of REL and picks only operations that are valid
in it.  Each operation is logged to LOG (outside the mount) as one JSON line *before* it starts
(``{"i": N, "op": {...}}``) and one when it returned (``{"i": N, "ok": true}`` or
``{"i": N, "err": "ENOTCONN"}``); the log is fsynced after every operation that contains an
fsync, so a returned fsync is on record before the workload goes on.  It stops at the first
error: the daemon died (ENOTCONN/ECONNABORTED) or something unexpected (logged, exit 3).

:func:`check` replays the log into the sequence of states the model went through and says
whether what is on the mount after the crash is one that the durability rules allow:

* ``mode="process"`` (SIGKILL of the daemon): every acknowledged operation is there; the one
  in flight may be absent, complete, or (a data operation) partly done.
* ``mode="power"`` (power cut): a prefix of the operations that includes every operation
  up to the last fsync/fsyncdir that returned; the last operation included may be partly done
  if it writes data.

Either way every snapshot of the chosen prefix must exist with exactly the content the model
had when it was taken, and no other snapshot of the run may exist.  Renames and clones are
atomic (a state with both or neither name of a rename matches no prefix).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import sys
import time

CRASH_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}
BIG = 3 << 20


# --------------------------------------------------------------------------------------------
# content
# --------------------------------------------------------------------------------------------

def make_bytes(seed: int, size: int) -> bytes:
    """Deterministic content: random (incompressible) or text-like (compressible, dedups)."""
    if seed % 3 == 0:
        line = f"line of content {seed}\n".encode()
        return (line * (size // len(line) + 1))[:size]
    return random.Random(seed).randbytes(size)


def apply_patch(old: bytes, off: int, data: bytes) -> bytes:
    if off > len(old):
        old = old + bytes(off - len(old))
    return old[:off] + data + old[off + len(data):]


# --------------------------------------------------------------------------------------------
# the model: {relative path: ("d",) | ("f", bytes)}; "" is the workload's directory itself
# --------------------------------------------------------------------------------------------

def _parent(p: str) -> str:
    return p.rsplit("/", 1)[0] if "/" in p else ""


def _join(d: str, n: str) -> str:
    return f"{d}/{n}" if d else n


def _under(p: str, d: str) -> bool:
    return p == d or p.startswith(d + "/")


class Model:
    def __init__(self) -> None:
        self.tree: dict[str, tuple] = {}
        self.snaps: dict[str, dict[str, tuple]] = {}

    def copy(self) -> "Model":
        m = Model()
        m.tree = dict(self.tree)
        m.snaps = dict(self.snaps)
        return m

    def apply(self, op: dict) -> None:
        t = self.tree
        kind = op["op"]
        p = op.get("path")
        if kind == "mkdir":
            t[p] = ("d",)
        elif kind in ("create", "overwrite"):
            t[p] = ("f", make_bytes(op["seed"], op["size"]))
        elif kind == "patch":
            t[p] = ("f", apply_patch(t[p][1], op["off"], make_bytes(op["seed"], op["len"])))
        elif kind in ("unlink", "rmdir"):
            del t[p]
        elif kind == "rename":
            src, dst = op["path"], op["dst"]
            moved = {k: v for k, v in t.items() if _under(k, src)}
            for k in moved:
                del t[k]
            for k, v in moved.items():
                t[dst + k[len(src):]] = v
        elif kind == "clone":
            src, dst = op["path"], op["dst"]
            for k, v in [(k, v) for k, v in t.items() if _under(k, src)]:
                t[dst + k[len(src):]] = v
        elif kind == "snapshot":
            self.snaps[op["name"]] = dict(t)
        elif kind == "delete":
            del self.snaps[op["name"]]
        elif kind == "rollback":
            self.tree = dict(self.snaps[op["name"]])
        elif kind in ("fsync", "fsyncdir"):
            pass
        else:
            raise ValueError(kind)

    # -- choosing a valid operation ------------------------------------------------------
    def files(self) -> list[str]:
        return sorted(k for k, v in self.tree.items() if v[0] == "f")

    def dirs(self) -> list[str]:
        return sorted(k for k, v in self.tree.items() if v[0] == "d")

    def free_name(self, rnd: random.Random, prefix: str) -> str:
        d = rnd.choice(self.dirs())
        while True:
            p = _join(d, f"{prefix}{rnd.randrange(10**6)}")
            if p not in self.tree:
                return p

    def choose(self, rnd: random.Random, i: int, tag: str, ctl: bool, fsync_p: float,
               rollback: bool = False) -> dict:
        if "" not in self.tree:
            return {"op": "mkdir", "path": ""}
        files, dirs = self.files(), self.dirs()
        weights = {"create": 8, "overwrite": 3, "patch": 4, "rename": 4, "unlink": 2,
                   "mkdir": 1, "rmdir": 1, "fsync": 2, "fsyncdir": 1}
        if ctl:
            weights.update(snapshot=1.5, clone=1.5, delete=0.5)
            if rollback:
                weights["rollback"] = 0.3
        while True:
            kind = rnd.choices(list(weights), list(weights.values()))[0]
            sync = rnd.random() < fsync_p
            size = rnd.choice([0, 1, 100, 4096, 65536, 65537, 200_000]) if rnd.random() < 0.9 \
                else rnd.randrange(1 << 20, BIG)
            if kind == "create":
                return {"op": "create", "path": self.free_name(rnd, "f"), "seed": rnd.randrange(1 << 30),
                        "size": size, "sync": sync}
            if kind == "mkdir" and len(dirs) < 8:
                return {"op": "mkdir", "path": self.free_name(rnd, "d")}
            if kind in ("fsyncdir",):
                return {"op": "fsyncdir", "path": rnd.choice(dirs), "sync": True}
            if kind == "rmdir":
                empty = [d for d in dirs if d and not any(_parent(k) == d for k in self.tree if k)]
                if empty:
                    return {"op": "rmdir", "path": rnd.choice(empty)}
                continue
            if kind == "snapshot":
                return {"op": "snapshot", "name": f"{tag}-{i}"}
            if kind in ("delete", "rollback"):
                if self.snaps:
                    return {"op": kind, "name": rnd.choice(sorted(self.snaps))}
                continue
            if kind == "clone":
                sources = files + [d for d in dirs if d]
                if not sources:
                    continue
                src = rnd.choice(sources)
                dst = self.free_name(rnd, "c")
                if _under(dst, src):
                    continue
                return {"op": "clone", "path": src, "dst": dst}
            if kind == "rename" and rnd.random() < 0.2:
                subdirs = [d for d in dirs if d]
                if subdirs:
                    src = rnd.choice(subdirs)
                    dst = self.free_name(rnd, "d")
                    if not _under(dst, src):
                        return {"op": "rename", "path": src, "dst": dst}
                continue
            if not files:
                continue
            f = rnd.choice(files)
            if kind == "overwrite":
                return {"op": "overwrite", "path": f, "seed": rnd.randrange(1 << 30), "size": size,
                        "sync": sync}
            if kind == "patch":
                old = len(self.tree[f][1])
                return {"op": "patch", "path": f, "off": rnd.randrange(old + 70_000), "seed": rnd.randrange(1 << 30),
                        "len": rnd.choice([1, 500, 4096, 70_000]), "sync": sync}
            if kind == "rename":
                dst = rnd.choice(files) if rnd.random() < 0.4 else self.free_name(rnd, "r")
                if dst == f:
                    continue
                return {"op": "rename", "path": f, "dst": dst}
            if kind == "unlink":
                return {"op": "unlink", "path": f}
            if kind == "fsync":
                return {"op": "fsync", "path": f, "sync": True}


# --------------------------------------------------------------------------------------------
# running one operation on the mount
# --------------------------------------------------------------------------------------------

def ctl(mount: str, line: str) -> None:
    """One control-file command that must succeed (OSError with the reply otherwise).  Kept
    free of mounting.py: this module also runs as the workload's child process."""
    fd = os.open(os.path.join(mount, ".cowfs", "ctl"), os.O_RDWR)
    try:
        try:
            os.write(fd, line.encode() + b"\n")
        except OSError as exc:
            reply = os.read(fd, 65536)
            raise OSError(exc.errno, f"{line}: {reply.decode(errors='replace').strip()}") from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, off: int = 0) -> None:
    view = memoryview(data)
    step = 1 << 20
    for pos in range(0, len(data), step):
        os.pwrite(fd, view[pos:pos + step], off + pos)


def execute(mount: str, rel: str, op: dict) -> None:
    path = lambda p: os.path.join(mount, rel, p) if p else os.path.join(mount, rel)  # noqa: E731
    kind = op["op"]
    if kind == "mkdir":
        os.mkdir(path(op["path"]))
    elif kind in ("create", "overwrite", "patch"):
        flags = os.O_WRONLY | {"create": os.O_CREAT | os.O_EXCL, "overwrite": os.O_TRUNC, "patch": 0}[kind]
        stage = "open"
        fd = os.open(path(op["path"]), flags, 0o644)
        try:
            stage = "write"
            if kind == "patch":
                _write_all(fd, make_bytes(op["seed"], op["len"]), op["off"])
            else:
                _write_all(fd, make_bytes(op["seed"], op["size"]))
            if op.get("sync"):
                stage = "fsync"
                os.fsync(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (in {stage})") from None
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (in close)") from None
    elif kind == "unlink":
        os.unlink(path(op["path"]))
    elif kind == "rmdir":
        os.rmdir(path(op["path"]))
    elif kind == "rename":
        os.rename(path(op["path"]), path(op["dst"]))
    elif kind in ("fsync", "fsyncdir"):
        fd = os.open(path(op["path"]), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif kind == "snapshot":
        ctl(mount, f"snapshot {op['name']}")
    elif kind in ("delete", "rollback"):
        ctl(mount, f"{kind} {op['name']}")
    elif kind == "clone":
        ctl(mount, f"clone {os.path.join(rel, op['path'])} {os.path.join(rel, op['dst'])}")
    else:
        raise ValueError(kind)


def run(mount: str, rel: str, log: str, seed: int, max_ops: int = 10**9, seconds: float = 1e9,
        ctl: bool = True, fsync_p: float = 0.15, tag: str = "w", rollback: bool = False) -> int:
    """The workload's main loop; returns the process exit code (0: done, 2: daemon died, 3: unexpected)."""
    rnd = random.Random(seed)
    model = Model()
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    deadline = time.monotonic() + seconds
    try:
        for i in range(max_ops):
            if time.monotonic() > deadline:
                return 0
            op = model.choose(rnd, i, tag, ctl, fsync_p, rollback)
            os.write(logfd, (json.dumps({"i": i, "op": op}) + "\n").encode())
            try:
                execute(mount, rel, op)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                os.write(logfd, (json.dumps({"i": i, "err": name, "msg": str(exc), "t": time.time()}) + "\n").encode())
                os.fsync(logfd)
                return 2 if exc.errno in CRASH_ERRNOS else 3
            os.write(logfd, (json.dumps({"i": i, "ok": True}) + "\n").encode())
            if op.get("sync"):
                os.fsync(logfd)
            model.apply(op)
        return 0
    finally:
        os.close(logfd)


# --------------------------------------------------------------------------------------------
# checking a crashed run
# --------------------------------------------------------------------------------------------

def read_log(log: str, crash_time: float | None = None) -> tuple[list[dict], list[str | None]]:
    """(operations begun, their outcome: "ok", an errno name, or None if none was logged).

    An error logged at or after crash_time is the crash's doing: the outcome is None (the
    operation was in flight), whatever the errno (an interrupted writeback reports EIO at close).
    """
    ops: list[dict] = []
    outcome: list[str | None] = []
    with open(log, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if "op" in rec:
                assert rec["i"] == len(ops), f"log out of order at {rec}"
                ops.append(rec["op"])
                outcome.append(None)
            elif "ok" in rec:
                outcome[rec["i"]] = "ok"
            elif crash_time is not None and rec.get("t", 0) >= crash_time:
                outcome[rec["i"]] = None
            else:
                outcome[rec["i"]] = rec["err"] + ": " + rec.get("msg", "")
    return ops, outcome


def digest(v: tuple) -> tuple:
    return ("f", len(v[1]), hashlib.sha256(v[1]).hexdigest()[:16]) if v[0] == "f" else v


def observe(root: str) -> dict[str, tuple]:
    """The tree at root as {relative path: ("d",) | ("f", size, sha) | ("other", mode)}; {} if absent."""
    out: dict[str, tuple] = {}

    def visit(rel: str) -> None:
        p = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d",)
            for n in sorted(os.listdir(p)):
                visit(_join(rel, n))
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                out[rel] = digest(("f", f.read()))
        else:
            out[rel] = ("other", st.st_mode)

    visit("")
    return out


FUZZY = {"create": True, "overwrite": False, "patch": False}  # op -> its target may be absent


def differences(seen: dict, want: dict[str, tuple], fuzzy: dict[str, bool] | None = None) -> list[str]:
    fuzzy = fuzzy or {}
    out = []
    for p in sorted(set(seen) | set(want)):
        if p in fuzzy:
            s = seen.get(p)
            if s is None and fuzzy[p]:
                continue
            if s is not None and s[0] == "f":
                continue
        a, b = seen.get(p), (digest(want[p]) if p in want else None)
        if a != b:
            out.append(f"/{p}: found {a}, expected {b}")
    return out


def _committed_before(op: dict, i: int) -> int:
    """How many operations a killed daemon must keep once op i was acknowledged (process
    mode).  Every metadata operation commits before it is acknowledged, and commits all
    file data acknowledged before it first; file data itself is committed at the latest
    when its handle is released, which close(2) does not wait for.  So: all ops up to a
    metadata op; the ops before a create (its CREATE commits); none for overwrite and patch
    (their data may go, and an overwrite of an empty file commits nothing)."""
    if op["op"] == "create":
        return i
    return 0 if op["op"] in FUZZY else i + 1


def check(mount: str, rel: str, log: str, mode: str, snap_prefix: str,
          crash_time: float | None = None) -> tuple[int, str, list[str]]:
    """Compare the mount with the states the log allows; returns (prefix length k, how, problems).

    problems is empty when the state matches; otherwise it explains the closest candidate.
    """
    ops, outcome = read_log(log, crash_time)
    bad = [(i, o) for i, o in enumerate(outcome)
           if o not in (None, "ok") and o.split(":")[0] not in ("ENOTCONN", "ECONNABORTED")]
    if bad:
        return -1, "", [f"the workload got an unexpected error: op {i} {ops[i]} -> {o}" for i, o in bad]
    acked = sum(1 for o in outcome if o == "ok")
    assert all(o == "ok" for o in outcome[:acked]), "an operation after a failed one"
    models = [Model()]
    for op in ops:
        m = models[-1].copy()
        m.apply(op)
        models.append(m)
    synced = max([i + 1 for i in range(acked) if ops[i].get("sync")], default=0)
    lo = synced if mode == "power" else max([synced] + [_committed_before(ops[i], i) for i in range(acked)])
    hi = len(ops)  # every begun operation may have completed
    seen = observe(os.path.join(mount, rel))
    snaps_dir = os.path.join(mount, ".cowfs", "snapshots")
    listed = {n for n in os.listdir(snaps_dir) if n.startswith(snap_prefix)}
    candidates = []
    for k in range(hi, lo - 1, -1):
        candidates.append((k, "complete", None))
        if 0 < k and ops[k - 1]["op"] in FUZZY and k - 1 >= lo:
            op = ops[k - 1]
            candidates.append((k, "last op partly done", {op["path"]: FUZZY[op["op"]]}))
    best = None
    for k, how, fuzzy in candidates:
        m = models[k]
        probs = differences(seen, m.tree, fuzzy)
        if set(m.snaps) != listed:
            probs.append(f"snapshots {sorted(listed)}, expected {sorted(m.snaps)}")
        if not probs:
            for name, tree in sorted(m.snaps.items()):
                got = observe(os.path.join(snaps_dir, name, rel))
                probs += [f"snapshot {name}: {d}" for d in differences(got, tree)]
            if not probs:
                return k, how, []
        if best is None or len(probs) < len(best[2]):
            best = (k, how, probs)
    assert best is not None
    k, how, probs = best
    last = ops[lo - 1] if lo else None
    head = (f"no allowed state matches ({mode}: {len(ops)} ops begun, {acked} acknowledged, "
            f"prefix must include the first {lo}{' (last fsync: op ' + str(lo - 1) + ' ' + json.dumps(last) + ')' if mode == 'power' and lo else ''}); "
            f"closest: first {k} ops ({how}), last ops: {[ (j, ops[j]) for j in range(max(0, k - 3), min(len(ops), k + 1))]}")
    return k, how, [head] + probs[:30]


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mount")
    ap.add_argument("rel")
    ap.add_argument("log")
    ap.add_argument("seed", type=int)
    ap.add_argument("--tag", default="w")
    ap.add_argument("--max-ops", type=int, default=10**9)
    ap.add_argument("--seconds", type=float, default=1e9)
    ap.add_argument("--no-ctl", action="store_true")
    ap.add_argument("--fsync-p", type=float, default=0.15)
    ap.add_argument("--rollback", action="store_true", help="also roll back to snapshots (see README)")
    a = ap.parse_args(argv)
    return run(a.mount, a.rel, a.log, a.seed, a.max_ops, a.seconds, not a.no_ctl, a.fsync_p, a.tag,
               a.rollback)


def synced_files(root: str, log: str) -> int:
    """fsync'd files root/main-<i>.bin (20,000 + 997 i random bytes) until one fails (a power
    cut stopped, then killed the daemon): "name sha256" on a line of log once its write, fsync
    and close returned.  A child process of its own (start_synced_files): a thread of the test
    process writing there would hold a file with dirty pages open on the mount of a daemon
    that the cut stops, which a fork of the test process waits for (kill_daemons)."""
    i = 0
    with open(log, "a") as out:
        while True:
            rel, data = f"main-{i}.bin", os.urandom(20_000 + 997 * i)
            try:
                fd = os.open(os.path.join(root, rel), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                return 0
            out.write(f"{rel} {hashlib.sha256(data).hexdigest()}\n")
            out.flush()
            i += 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--synced-files"]:
        sys.exit(synced_files(*sys.argv[2:4]))
    sys.exit(main(sys.argv[1:]))


# --------------------------------------------------------------------------------------------
# one SIGKILL round on a mounting.Mount (shared by tests/test_crash_workload.py and
# scripts/soak_crash.py)
# --------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def start_workload(mount: str, rel: str, log: str, seed: int, tag: str, *extra: str):
    import subprocess
    return subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), mount, rel, log,
                             str(seed), "--tag", tag, *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, cwd="/")


def start_synced_files(root: str, log: str):
    """synced_files(root, log) in a child process."""
    import subprocess
    return subprocess.Popen([sys.executable, os.path.join(HERE, "workload.py"), "--synced-files", root, log],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, cwd="/")


def synced_files_done(log: str) -> list[tuple[str, str]]:
    """(name, sha256) of each file that synced_files fsync'd, in order."""
    with open(log) as f:
        return [tuple(line.split()) for line in f if line.strip()]


def wait_acked(log: str, n: int, proc, timeout: float = 30.0) -> None:
    """Wait until the workload has n acknowledged operations (or has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log, "rb") as f:
                if f.read().count(b'"ok": true') >= n:
                    return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return
        time.sleep(0.01)
    raise AssertionError(f"the workload did not get {n} operations done within {timeout}s")


def fsck_clean(store) -> dict:
    import mounting
    code, report = mounting.fsck_json(store)
    assert code == 0 and report["clean"], \
        f"fsck after the crash is not clean (exit {code}): {report['problems'][:20]}"
    return report


def kill_daemons(*mounts) -> list[int]:
    """SIGKILL the daemons of mounting.Mounts and clear their dead mounts; their exit codes.

    Every daemon is killed before this process forks (fusermount3): a forked child closes
    its copies of our descriptors, and the close of a file with dirty pages on a stopped
    daemon's mount waits, in the kernel, until that daemon writes them back (fuse_flush:
    write_inode_now); the parent waits for its vforked child meanwhile.  A test writing
    through one daemon while it kills another hung that way for 400 s, until a watchdog
    killed the stopped daemon."""
    import signal
    import subprocess
    import mounting
    for m in mounts:
        os.kill(m.proc.pid, signal.SIGKILL)
    codes = []
    for m in mounts:
        try:
            rc = mounting.wait_exit(m.proc, 10)
        except subprocess.TimeoutExpired:
            # A thread of the daemon still waits in a request to its own mount (the pages the
            # kernel writes back to us on invalidate_inode): its /dev/fuse descriptor stays open
            # until the kernel side of the connection is aborted.
            mounting.abort_fuse_connection(m.path)
            try:
                rc = mounting.wait_exit(m.proc, 30)
            except subprocess.TimeoutExpired:
                raise mounting.OpTimeout(
                    f"the daemon of {m.path} (pid {m.proc.pid}) still runs 10 s after SIGKILL and 30 s "
                    f"after the abort of its connection: {mounting.wait_state(m.proc.pid)}") from None
        m.exit_codes.append(rc)  # killed on purpose: not "died during the test"
        codes.append(rc)
    for m in mounts:
        mounting.lazy_unmount(m.path)
    return codes


def reap(*procs) -> None:
    """SIGKILL each of procs (Popens) still running and wait for its exit, bounded: one that
    cannot exit (asleep in the kernel in a request nobody answers) fails the test, naming it
    and where it waits, instead of hanging it."""
    import subprocess
    import mounting
    for p in procs:
        if p.poll() is None:
            p.kill()
            try:
                mounting.wait_exit(p, 10)
            except subprocess.TimeoutExpired:
                raise mounting.OpTimeout(f"pid {p.pid} ({os.path.basename(str(p.args[1]))}) still runs 10 s "
                                         f"after SIGKILL: {mounting.wait_state(p.pid)}") from None


def kill_daemon(m) -> int:
    """SIGKILL the daemon of a mounting.Mount and clear its dead mount; returns its exit code."""
    return kill_daemons(m)[0]


def release(lazy, daemons, procs=()) -> None:
    """End at once whatever a power cut's step may wait for: SIGKILL the daemons (stopped or
    not), the other processes (a workload, a writer) and lazyfs, and abort their FUSE
    connections.  Neither waits nor forks (mounting.Steps calls it while a step is stuck)."""
    import signal
    import mounting
    for p in [d.proc for d in daemons] + list(procs):
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for d in daemons:
        mounting.abort_fuse_connection(d.path)
    lazy.abort()


def power_cut(lazy, daemons, steps=None) -> tuple[float, dict]:
    """The power cut under daemons (mounting.Mounts) whose store is on lazy (mounting.Lazy):
    SIGSTOP them (they acknowledge nothing more), drop what lazyfs holds unsynced, SIGKILL
    them all, unmount their mounts and lazyfs; each step bounded by steps (mounting.Steps,
    by default one that releases these daemons).  Returns (the time of the cut, lazyfs's
    figures)."""
    import signal
    import mounting
    steps = steps or mounting.Steps(lambda: release(lazy, daemons))
    t = time.time()
    for d in daemons:
        os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        figures = steps("power cut (lazyfs drops what is unsynced)", 30, lazy.cut)
    finally:
        steps("SIGKILL of the daemons and their unmount", 60, kill_daemons, *daemons)
        steps("unmount of lazyfs and its exit", 90, lazy.stop)
    return t, figures


def sigkill_round(m, round_no: int, logdir: str, rnd: random.Random, max_delay: float = 1.5,
                  previous: dict | None = None, rollback: bool = False) -> dict:
    """Run the workload in m.path/r<round_no>, SIGKILL the daemon at a random moment, fsck,
    remount, check.  ``previous`` maps earlier rounds' directories to their (type, size)
    listing, which must not change.  Returns figures of the round."""
    rel, tag = f"r{round_no}", f"r{round_no}"
    log = os.path.join(logdir, f"{rel}.log")
    seed = rnd.randrange(1 << 30)
    w = start_workload(str(m.path), rel, log, seed, tag, *(["--rollback"] if rollback else []))
    try:
        wait_acked(log, 2, w)
        time.sleep(rnd.uniform(0.0, max_delay))
        crash_time = time.time()
        kill_daemon(m)
        code = w.wait(timeout=60)
    finally:
        reap(w)
    err = w.stderr.read().decode(errors="replace")
    w.stderr.close()
    if code not in (0, 2) and not _failed_after(log, crash_time):
        with open(log, errors="replace") as f:
            tail = f.readlines()[-4:]
        raise AssertionError(f"round {round_no} (seed {seed}): workload exit {code} (3: an unexpected "
                             f"error)\nlog {log} ends:\n{''.join(tail)}{err[-3000:]}")
    fsck_clean(m.store)
    m.start()
    k, how, probs = check(str(m.path), rel, log, "process", tag + "-", crash_time)
    assert not probs, f"round {round_no} (seed {seed}, log {log}):\n" + "\n".join(probs)
    # Keep fsck's work (it walks every snapshot's tree) from growing round after round.
    for name in os.listdir(os.path.join(m.path, ".cowfs", "snapshots")):
        if name.startswith(tag + "-"):
            ctl(str(m.path), f"delete {name}")
    if previous is not None:
        for d, listing in previous.items():
            now = shape(os.path.join(m.path, d))
            assert now == listing, f"round {round_no}: earlier round's {d} changed: {sorted(set(now.items()) ^ set(listing.items()))[:10]}"
        previous[rel] = shape(os.path.join(m.path, rel))
    ops, outcome = read_log(log, crash_time)
    return {"ops": len(ops), "acked": sum(o == "ok" for o in outcome), "k": k, "how": how,
            "last": ops[-1]["op"] if ops else None}


def _failed_after(log: str, t: float) -> bool:
    with open(log, "rb") as f:
        lines = f.read().splitlines()
    try:
        return json.loads(lines[-1]).get("t", 0) >= t
    except (ValueError, IndexError):
        return False


def shape(root: str) -> dict[str, tuple]:
    """(type, size) of everything under root: a cheap fingerprint (no data read)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out
