"""The differential POSIX state machine: random operation sequences run on a cowfs mount
and on a plain local directory (ext4); every return value / errno, the mtime/ctime changes of
the touched inodes and, periodically, the whole trees must agree.

test_posix_differential.py runs it as root and as an unprivileged user;
test_branching_differential.py extends it with snapshots, rollback, branches and clones.

``Ctx`` holds what one test function shares between the examples (the mount, the reference
directory, the worker processes); ``PosixMachine`` is the machine, bound to a Ctx by the test.
All operations run in worker processes with a timeout, so a hung daemon fails the test instead
of hanging it.  In a fraction of the examples the mount is remounted once (all metadata incl.
inode numbers and timestamps must survive).

The suite runs SUITE_EXAMPLES examples per variant; the long form (scripts/test_slow.sh)
``COWFS_HYPOTHESIS_EXAMPLES`` (default 250).  ``COWFS_HYPOTHESIS_STEPS``: steps per example
(default 30).
"""
from __future__ import annotations

import collections
import errno
import os
import random
import stat

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import RENAME_EXCHANGE, RENAME_NOREPLACE, compare_snapshots

SUITE_EXAMPLES = 60                   # per variant in the suite (9 s each on a quiet machine; 100 until CI neared 20 minutes)
EXAMPLES = int(os.environ.get("COWFS_HYPOTHESIS_EXAMPLES", "250"))  # the long form's
STEPS = int(os.environ.get("COWFS_HYPOTHESIS_STEPS", "30"))
CHECK_EVERY = 10                      # full tree comparison every N steps (and at the end)
REMOUNT_ODDS = 10                     # the remount rule acts with probability ~1/10 ...
REMOUNTS_PER = 12                     # ... at most once per this many examples (and 4 times) per test
OP_TIMEOUT = 30.0
MAX_FDS = 6
# Timestamps may legitimately come from a coarse clock (with FUSE writeback cache the kernel
# sets mtime/ctime from its jiffy clock): before an operation whose timestamp effects are
# compared, wait until the watched inodes' newest timestamp is this old.
MIN_STAMP_AGE_NS = 12_000_000

# ---- the shared vocabulary -------------------------------------------------------------------
TOP = ["a", "b", "c", "d"]
SUB = ["a", "b", "c"]
PATHS = TOP + [f"{x}/{y}" for x in TOP[:3] for y in SUB] + ["a/b/c", "b/a/a",
                                                            "r", "r/f", "s", "s/f", "s/g"]
# A path argument is either a fixed name from PATHS or ("existing", k): the k-th entry (modulo)
# of the reference tree as it is when the step runs.  Drawing a token (instead of drawing
# from the current tree) keeps data generation independent of filesystem state.
PATH = st.sampled_from(PATHS) | st.tuples(st.just("existing"), st.integers(0, 63))
SYMLINK_TARGETS = ["a", "b", "c", "d/a", "a/b", "nonexistent", "nonexistent/x", ".", "r/f",
                   "s", "", "t" * 1000, "a/../b"]
OFFSETS = st.one_of(st.sampled_from([0, 1, 4095, 4096, 65535, 65536, 65537, 131072, 1 << 20]),
                    st.integers(0, 300))
SIZES = st.one_of(st.sampled_from([0, 1, 4095, 4096, 4097, 65535, 65536, 65537, 200_000,
                                   1 << 20]), st.integers(0, 300))
DATA = st.one_of(
    st.binary(min_size=0, max_size=40).map(lambda b: ("bytes", b)),
    st.tuples(st.integers(0, 1000),
              st.sampled_from([1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 150_000]))
    .map(lambda t: ("random", t[0], t[1])),
)
ACCESS = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR]
EXTRA_FLAGS = [os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_NOFOLLOW, os.O_DIRECTORY]
FLAGS = st.builds(lambda acc, extra: acc | sum(extra), st.sampled_from(ACCESS),
                  st.sets(st.sampled_from(EXTRA_FLAGS), max_size=3))
CREATE_FLAGS = st.builds(lambda acc, extra: acc | os.O_CREAT | sum(extra),
                         st.sampled_from([os.O_WRONLY, os.O_RDWR]),
                         st.sets(st.sampled_from([os.O_EXCL, os.O_TRUNC, os.O_APPEND]),
                                 max_size=2))
FILE_MODES = st.sampled_from([0o644, 0o600, 0o777, 0o000, 0o444, 0o4755, 0o2755, 0o1644])
DIR_MODES = st.sampled_from([0o755, 0o700, 0o777, 0o000, 0o1777, 0o2755, 0o500, 0o300])
CHMOD_MODES = st.sampled_from([0o644, 0o755, 0o000, 0o444, 0o200, 0o300, 0o500, 0o700, 0o777,
                               0o4755, 0o2755, 0o6777, 0o1777, 0o2775, 0o2644])
OWNERS = st.sampled_from([(-1, -1), (0, 0), (65534, 65534), (-1, 0), (0, -1), (1000, 1000),
                          (-1, 65534), (-1, 1000)])
TIMES_NS = st.sampled_from([0, 1, 999_999_999, 1_000_000_000, 1_234_567_890_123_456_789,
                            -1, -1_000_000_001, -315_619_200_000_000_000,      # 1960
                            4_102_444_800_123_456_789,                          # 2100
                            2_147_483_648_000_000_001])                         # 2038+
XATTR_NAMES = st.sampled_from(["user.a", "user.b", "user." + "n" * 200, "user.", "nonamespace",
                               "trusted.cowfs"])
XATTR_VALUES = st.sampled_from([b"", b"1", b"v" * 100, b"\0\xff\0", b"w" * 1000])
# (XATTR_CREATE|XATTR_REPLACE together is left out: pyfuse3 handles the flags itself, checks
# only XATTR_CREATE when both are given and does not pass them on to the filesystem.)
XATTR_FLAGS = st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE])
ACCESS_MODES = st.sampled_from([os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK,
                                os.R_OK | os.X_OK, os.W_OK | os.X_OK])

SIDES = ("cowfs", "ref")
ERRNAME = errno.errorcode


def make_data(spec) -> bytes:
    if spec[0] == "bytes":
        return spec[1]
    _, seed, size = spec
    return random.Random(seed * 7919 + size).randbytes(size)


def show(res) -> str:
    if isinstance(res, tuple) and res and res[0] == "err":
        return f"error {ERRNAME.get(res[1], res[1])}"
    if isinstance(res, tuple) and res and res[0] == "ok":
        v = res[1]
        r = repr(v)
        if isinstance(v, bytes) and len(v) > 64:
            r = f"<{len(v)} bytes {v[:32]!r}...>"
        return f"ok {r[:400]}"
    return repr(res)[:400]


def parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def stat_view(d: dict) -> dict:
    """The stat fields that must agree between cowfs and ext4."""
    out = {k: d[k] for k in ("mode", "nlink", "uid", "gid", "rdev")}
    if not stat.S_ISDIR(d["mode"]):
        out["size"] = d["size"]
    return out


def classify(pre, post, data_op=False):
    """What happened to one watched inode's timestamps during an operation.

    Reading/writing a FIFO changes its times only inside the kernel (pipe_write ->
    file_update_time); a FUSE filesystem is never told, so that is not compared."""
    if data_op and pre[0] != "err" and post[0] != "err" and pre[2] == post[2] \
            and post[3] == stat.S_IFIFO:
        return ("FIFO data operation: not compared",)
    if pre[0] == "err" or post[0] == "err":
        return ("exists" if pre[0] != "err" else ERRNAME.get(pre[1]),
                "exists" if post[0] != "err" else ERRNAME.get(post[1]))
    if pre[2] != post[2]:
        return ("replaced by another inode",)
    def how(a, b):
        return "unchanged" if a == b else "changed" if b > a else "went back"
    return ("mtime " + how(pre[0], post[0]), "ctime " + how(pre[1], post[1]))


class Ctx:
    """Everything one test function shares between the examples of its state machine."""

    def __init__(self, variant, mount, ref_top, worker, admin, sub="", examples=EXAMPLES):
        self.variant = variant
        self.mount = mount
        self.ref_top = str(ref_top)
        self.sub = sub
        self.worker = worker
        self.admin = admin
        self.remounts_left = max(4, examples // REMOUNTS_PER)
        self.examples = 0
        self.steps = 0
        self.remounts = 0
        self.fine_timestamps = True
        self.open_fds: set[int] = set()
        self.outcomes: collections.Counter = collections.Counter()

    def top(self, side):
        return str(self.mount.path) if side == "cowfs" else self.ref_top

    def root(self, side):
        return os.path.join(self.top(side), self.sub) if self.sub else self.top(side)

    def abs(self, side, rel):
        return os.path.join(self.root(side), rel) if rel else self.root(side)

    def daemon_state(self) -> str:
        if not self.mount.alive():
            return (f"\n!!! the cowfs daemon is not running (exit code "
                    f"{self.mount.proc.returncode if self.mount.proc else None})\n"
                    + self.mount.describe())
        return ""

    def calibrate(self):
        """Does the reference fs show a new mtime for every modification (multigrain / fine
        timestamps)?  If not, 'unchanged on ext4 but changed on cowfs' is tolerated."""
        p = os.path.join(self.ref_top, ".calibrate")
        fd = self.admin.ok("os.open", p, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            for _ in range(100):
                pre, res, post = self.admin.ok("step", "os.write", (fd, b"x"), {}, (), (fd,))
                if pre[0][0] == post[0][0]:
                    self.fine_timestamps = False
                    break
        finally:
            self.admin.ok("os.close", fd)
            self.admin.ok("os.unlink", p)

    def close_fds(self):
        """Close every file the worker still has open (also those of a failed example)."""
        fds, self.open_fds = sorted(self.open_fds), set()
        if fds:
            self.worker.ok("close_all", fds)

    def reset(self):
        """Empty both trees (as root) and set up the fixed part of the tree."""
        self.close_fds()
        for side in SIDES:
            self.admin.ok("rm_contents", self.top(side), keep=(mounting.HIDDEN,), timeout=60)
        if self.variant == "unpriv":
            uid, gid = UNPRIV_UID, UNPRIV_GID
            for side in SIDES:
                w = self.root(side)
                a = self.admin
                a.ok("os.mkdir", w, 0o755)
                a.ok("os.chown", w, uid, gid)
                a.ok("os.chmod", w, 0o755)
                a.ok("os.mkdir", os.path.join(w, "r"), 0o755)
                a.ok("os.chmod", os.path.join(w, "r"), 0o755)
                a.ok("write_file", os.path.join(w, "r/f"), os.O_CREAT | os.O_WRONLY, 0o644, 0,
                     b"root-owned\n")
                a.ok("os.chmod", os.path.join(w, "r/f"), 0o644)
                a.ok("os.mkdir", os.path.join(w, "s"), 0o755)
                a.ok("os.chmod", os.path.join(w, "s"), 0o1777)
                a.ok("write_file", os.path.join(w, "s/f"), os.O_CREAT | os.O_WRONLY, 0o666, 0,
                     b"sticky\n")
                a.ok("os.chmod", os.path.join(w, "s/f"), 0o666)
        # A small starting tree, made by the worker (so owned by the test user), identical on
        # both sides.
        for side in SIDES:
            w, r = self.worker, self.root(side)
            j = lambda rel: os.path.join(r, rel)  # noqa: E731
            w.ok("os.mkdir", j("a"), 0o755)
            w.ok("os.mkdir", j("a/b"), 0o755)
            w.ok("write_file", j("b"), os.O_CREAT | os.O_WRONLY, 0o644, 0,
                 make_data(("random", 1, 5000)))
            w.ok("os.setxattr", j("b"), "user.a", b"1")
            w.ok("write_file", j("a/a"), os.O_CREAT | os.O_WRONLY, 0o600, 0,
                 make_data(("random", 2, 70000)))
            w.ok("os.symlink", "b", j("c"))
            w.ok("os.symlink", "nonexistent", j("a/c"))
            w.ok("os.link", j("b"), j("a/b/a"))
            w.ok("write_file", j("a/b/b"), os.O_CREAT | os.O_WRONLY, 0o755, 0, b"")


class PosixMachine(RuleBasedStateMachine):
    ctx: Ctx = None  # bound by the test function

    def __init__(self):
        super().__init__()
        c = self.ctx
        c.examples += 1
        c.reset()
        self.fds: dict[int, dict] = {}
        self.next_slot = 0
        self.steps = 0
        self.broken = False
        self.remounted = False

    # ---- the core: run one operation on both sides and compare ------------------------------
    def both(self, what, op, args_for, watch=(), slot=None, norm=None, check_stamps=True,
             data_op=False):
        """Run ``op`` with ``args_for(side) -> (args, kwargs)`` on both trees; compare the
        results (after ``norm``) and the timestamp changes of ``watch`` = [(rel, follow)] and
        of the open file ``slot``.  Returns {side: raw result}."""
        c = self.ctx
        out, stamps = {}, {}
        for side in SIDES:
            args, kwargs = args_for(side)
            wp = [(c.abs(side, rel), follow) for rel, follow in watch]
            wf = [self.fds[slot][side]] if slot is not None else []
            try:
                pre, res, post = c.worker.ok("step", op, args, kwargs, wp, wf,
                                             MIN_STAMP_AGE_NS if check_stamps else 0,
                                             timeout=OP_TIMEOUT)
            except mounting.OpTimeout as e:
                self.broken = True
                raise AssertionError(f"{what}: {side} did not return: {e}"
                                     f"{c.daemon_state()}") from None
            out[side] = res
            stamps[side] = [classify(a, b, data_op) for a, b in zip(pre, post)]
        self.steps += 1
        c.steps += 1
        r = out["ref"]
        c.outcomes[(op, "ok" if r[0] == "ok" else ERRNAME.get(r[1], r[1]))] += 1
        na = norm(out["cowfs"]) if norm else out["cowfs"]
        nb = norm(out["ref"]) if norm else out["ref"]
        if na != nb:
            self.broken = True
            raise AssertionError(
                f"{what}: results differ\n  cowfs:     {show(na)}\n  reference: {show(nb)}"
                f"{c.daemon_state()}")
        if check_stamps:
            labels = [f"{'stat' if f else 'lstat'}({rel or '/'})" for rel, f in watch]
            if slot is not None:
                labels.append(f"fstat(fd of {self.fds[slot]['path']})")
            for label, sa, sb in zip(labels, stamps["cowfs"], stamps["ref"]):
                if sa == sb:
                    continue
                if not c.fine_timestamps and len(sb) == 2 and len(sa) == 2 \
                        and sb[0].startswith("mtime") and sa[0].startswith("mtime") \
                        and all(x == y or (x.endswith(" unchanged") and y.endswith(" changed"))
                                for x, y in zip(sb, sa)):
                    continue   # coarse reference clock: an unchanged stamp proves nothing
                self.broken = True
                raise AssertionError(
                    f"{what}: timestamps of {label} behave differently "
                    f"(result on both sides: {show(na)})\n  cowfs:     {sa}\n  reference: {sb}"
                    f"{c.daemon_state()}")
        return out

    def resolve(self, path):
        """Turn a drawn path token into a path (see PATH)."""
        if isinstance(path, str):
            return path
        existing = self.ctx.admin.ok("list_paths", self.ctx.root("ref"))
        return existing[path[1] % len(existing)] if existing else PATHS[path[1] % len(PATHS)]

    def paths(self, *rels):
        return lambda side: (tuple(self.ctx.abs(side, r) for r in rels), {})

    @staticmethod
    def watch(*rels, follow_target=False):
        w = []
        for r in rels:
            for item in ((r, follow_target), (parent(r), True)):
                if item not in w:
                    w.append(item)
        return w

    def check_tree(self, why):
        c = self.ctx
        try:
            a = c.admin.ok("snapshot", c.root("cowfs"), timeout=60)
            b = c.admin.ok("snapshot", c.root("ref"), timeout=60)
        except mounting.OpTimeout as e:
            self.broken = True
            raise AssertionError(f"tree snapshot ({why}) hung: {e}{c.daemon_state()}") from None
        diffs = compare_snapshots(a, b)
        if diffs:
            self.broken = True
            raise AssertionError(f"trees differ ({why}):\n  " + "\n  ".join(diffs[:40])
                                 + c.daemon_state())
        return a

    # ---- path operations --------------------------------------------------------------------
    @rule(path=PATH, flags=CREATE_FLAGS, mode=FILE_MODES, offset=st.none() | OFFSETS,
          data=DATA)
    def write_file(self, path, flags, mode, offset, data):
        path = self.resolve(path)
        buf = make_data(data)
        self.both(f"write_file({path!r}, flags={flags:#o}, mode={mode:#o}, offset={offset}, "
                  f"{len(buf)} bytes)", "write_file",
                  lambda s: ((self.ctx.abs(s, path), flags, mode, offset, buf), {}),
                  watch=self.watch(path, follow_target=True), data_op=True)

    @rule(path=PATH)
    def read_file(self, path):
        path = self.resolve(path)
        self.both(f"read_file({path!r})", "read_file", self.paths(path),
                  watch=self.watch(path, follow_target=True), data_op=True)

    @rule(path=PATH, size=SIZES)
    def truncate(self, path, size):
        path = self.resolve(path)
        # POSIX: timestamps change "if the file size is changed" (ext4 changes them anyway)
        old = self.ctx.admin.call("stat", self.ctx.abs("ref", path), True)
        self.both(f"truncate({path!r}, {size})", "os.truncate",
                  lambda s: ((self.ctx.abs(s, path), size), {}),
                  watch=self.watch(path, follow_target=True),
                  check_stamps=not (old[0] == "ok" and old[1]["size"] == size))

    @rule(path=PATH, mode=DIR_MODES)
    def mkdir(self, path, mode):
        path = self.resolve(path)
        self.both(f"mkdir({path!r}, {mode:#o})", "os.mkdir",
                  lambda s: ((self.ctx.abs(s, path), mode), {}), watch=self.watch(path))

    @rule(path=PATH)
    def rmdir(self, path):
        path = self.resolve(path)
        self.both(f"rmdir({path!r})", "os.rmdir", self.paths(path), watch=self.watch(path))

    @rule(path=PATH)
    def unlink(self, path):
        path = self.resolve(path)
        self.both(f"unlink({path!r})", "os.unlink", self.paths(path), watch=self.watch(path))

    @rule(src=PATH, dst=PATH, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src, dst, flags):
        src = self.resolve(src)
        dst = self.resolve(dst)
        self.both(f"renameat2({src!r}, {dst!r}, flags={flags})", "renameat2",
                  lambda s: ((self.ctx.abs(s, src), self.ctx.abs(s, dst), flags), {}),
                  watch=self.watch(src, dst))

    @rule(link_target=st.sampled_from(SYMLINK_TARGETS), path=PATH)
    def symlink(self, link_target, path):
        path = self.resolve(path)
        self.both(f"symlink({link_target[:40]!r}, {path!r})", "os.symlink",
                  lambda s: ((link_target, self.ctx.abs(s, path)), {}), watch=self.watch(path))

    @rule(path=PATH)
    def readlink(self, path):
        path = self.resolve(path)
        self.both(f"readlink({path!r})", "os.readlink", self.paths(path),
                  watch=self.watch(path))

    @rule(src=PATH, dst=PATH, follow=st.booleans())
    def link(self, src, dst, follow):
        src = self.resolve(src)
        dst = self.resolve(dst)
        self.both(f"link({src!r}, {dst!r}, follow_symlinks={follow})", "os.link",
                  lambda s: ((self.ctx.abs(s, src), self.ctx.abs(s, dst)),
                             {"follow_symlinks": follow}),
                  watch=self.watch(src, dst))

    @rule(path=PATH, mode=CHMOD_MODES)
    def chmod(self, path, mode):
        path = self.resolve(path)
        self.both(f"chmod({path!r}, {mode:#o})", "os.chmod",
                  lambda s: ((self.ctx.abs(s, path), mode), {}),
                  watch=self.watch(path, follow_target=True))

    @rule(path=PATH, owner=OWNERS, follow=st.booleans())
    def chown(self, path, owner, follow):
        path = self.resolve(path)
        self.both(f"chown({path!r}, {owner[0]}, {owner[1]}, follow_symlinks={follow})",
                  "os.chown",
                  lambda s: ((self.ctx.abs(s, path), owner[0], owner[1]),
                             {"follow_symlinks": follow}),
                  watch=self.watch(path, follow_target=follow),
                  # chown(-1, -1) changes nothing but ctime; FUSE does not forward a
                  # ctime-only setattr (without writeback cache), so ctime is unspecified.
                  check_stamps=owner != (-1, -1))

    @rule(path=PATH, atime=TIMES_NS | st.sampled_from(["now", "omit"]),
          mtime=TIMES_NS | st.sampled_from(["now", "omit"]), follow=st.booleans())
    def utime(self, path, atime, mtime, follow):
        path = self.resolve(path)
        what = f"utimensat({path!r}, atime={atime}, mtime={mtime}, follow={follow})"
        out = self.both(what, "utimensat",
                        lambda s: ((self.ctx.abs(s, path), atime, mtime), {"follow_symlinks": follow}),
                        watch=self.watch(path, follow_target=follow),
                        check_stamps=not (atime == "omit" and mtime == "omit"))
        got = {s: self.ctx.worker.call("stat", self.ctx.abs(s, path), follow) for s in SIDES}
        if out["cowfs"][0] == "ok" and got["cowfs"][0] == got["ref"][0] == "ok":
            got = {s: got[s][1] for s in SIDES}
            for field, val in (("atime", atime), ("mtime", mtime)):
                if isinstance(val, int) and got["cowfs"][field] != got["ref"][field]:
                    self.broken = True
                    raise AssertionError(f"{what}: {field} afterwards is "
                                         f"{got['cowfs'][field]} on cowfs but "
                                         f"{got['ref'][field]} on the reference (set: {val})")

    @rule(path=PATH, name=XATTR_NAMES, value=XATTR_VALUES, flags=XATTR_FLAGS,
          follow=st.booleans())
    def setxattr(self, path, name, value, flags, follow):
        path = self.resolve(path)
        # ext4 skips the update (and the ctime change) when the value does not change; other
        # filesystems do not: ctime is only compared when the value really changes.
        old = self.ctx.admin.call("os.getxattr", self.ctx.abs("ref", path), name,
                                  follow_symlinks=follow)
        self.both(f"setxattr({path!r}, {name[:20]!r}, {value[:10]!r}..., flags={flags}, "
                  f"follow={follow})", "os.setxattr",
                  lambda s: ((self.ctx.abs(s, path), name, value, flags),
                             {"follow_symlinks": follow}),
                  watch=self.watch(path, follow_target=follow),
                  check_stamps=old != ("ok", value))

    @rule(path=PATH, name=XATTR_NAMES, follow=st.booleans())
    def getxattr(self, path, name, follow):
        path = self.resolve(path)
        self.both(f"getxattr({path!r}, {name[:20]!r}, follow={follow})", "os.getxattr",
                  lambda s: ((self.ctx.abs(s, path), name), {"follow_symlinks": follow}),
                  watch=self.watch(path, follow_target=follow))

    @rule(path=PATH, follow=st.booleans())
    def listxattr(self, path, follow):
        path = self.resolve(path)
        self.both(f"listxattr({path!r}, follow={follow})", "os.listxattr",
                  lambda s: ((self.ctx.abs(s, path),), {"follow_symlinks": follow}),
                  watch=self.watch(path, follow_target=follow),
                  norm=lambda r: (r[0], sorted(r[1])) if r[0] == "ok" else r)

    @rule(path=PATH, name=XATTR_NAMES, follow=st.booleans())
    def removexattr(self, path, name, follow):
        path = self.resolve(path)
        self.both(f"removexattr({path!r}, {name[:20]!r}, follow={follow})", "os.removexattr",
                  lambda s: ((self.ctx.abs(s, path), name), {"follow_symlinks": follow}),
                  watch=self.watch(path, follow_target=follow))

    @rule(path=PATH, kind=st.sampled_from(["fifo", "socket"]), mode=FILE_MODES)
    def mknod(self, path, kind, mode):
        path = self.resolve(path)
        if kind == "fifo":
            self.both(f"mkfifo({path!r}, {mode:#o})", "os.mkfifo",
                      lambda s: ((self.ctx.abs(s, path), mode), {}), watch=self.watch(path))
        else:
            self.both(f"mknod({path!r}, S_IFSOCK|{mode:#o})", "os.mknod",
                      lambda s: ((self.ctx.abs(s, path), stat.S_IFSOCK | mode), {}),
                      watch=self.watch(path))

    @rule(path=PATH, follow=st.booleans())
    def stat(self, path, follow):
        path = self.resolve(path)
        self.both(f"{'stat' if follow else 'lstat'}({path!r})", "stat",
                  lambda s: ((self.ctx.abs(s, path), follow), {}),
                  watch=self.watch(path, follow_target=follow),
                  norm=lambda r: ("ok", stat_view(r[1])) if r[0] == "ok" else r)

    @rule(path=st.just("") | PATH)
    def listdir(self, path):
        path = self.resolve(path)
        def norm(r):
            if r[0] != "ok":
                return r
            names = sorted(r[1])
            if path == "" and self.ctx.variant == "root":
                names = [n for n in names if n != mounting.HIDDEN]
            return ("ok", names)
        self.both(f"listdir({path!r})", "scandir_names", self.paths(path),
                  watch=[(path, True)], norm=norm)

    @rule(path=PATH, mode=ACCESS_MODES)
    def access(self, path, mode):
        path = self.resolve(path)
        self.both(f"access({path!r}, {mode})", "os.access",
                  lambda s: ((self.ctx.abs(s, path), mode), {}),
                  watch=self.watch(path, follow_target=True))

    # ---- open files -------------------------------------------------------------------------
    @precondition(lambda self: len(self.fds) < MAX_FDS)
    @rule(path=PATH, flags=FLAGS | CREATE_FLAGS, mode=FILE_MODES)
    def open(self, path, flags, mode):
        path = self.resolve(path)
        out = self.both(f"open({path!r}, flags={flags:#o}, mode={mode:#o})", "open",
                        lambda s: ((self.ctx.abs(s, path), flags, mode), {}),
                        watch=self.watch(path, follow_target=True),
                        norm=lambda r: ("ok", "<fd>") if r[0] == "ok" else r)
        if out["cowfs"][0] == "ok":
            slot = self.next_slot
            self.next_slot += 1
            self.fds[slot] = {"cowfs": out["cowfs"][1], "ref": out["ref"][1], "path": path,
                              "flags": flags}
            self.ctx.open_fds.update((out["cowfs"][1], out["ref"][1]))

    def _slot(self, data):
        return data.draw(st.sampled_from(sorted(self.fds)), label="fd slot")

    def fd_args(self, slot, *rest, **kw):
        return lambda s: ((self.fds[slot][s],) + rest, kw)

    def fd_desc(self, slot):
        f = self.fds[slot]
        return f"fd#{slot}[{f['path']!r}, flags={f['flags']:#o}]"

    def fd_stat_norm(self, slot):
        """How the two sides' fstat results of the fd in slot are compared (a subclass leaves
        out what legitimately differs)."""
        return lambda r: ("ok", stat_view(r[1])) if r[0] == "ok" else r

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def close(self, data):
        slot = self._slot(data)
        f = self.fds.pop(slot)
        self.ctx.open_fds.difference_update((f["cowfs"], f["ref"]))
        self.both(f"close({f['path']!r} fd#{slot})", "os.close",
                  lambda s: ((f[s],), {}))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=st.none() | OFFSETS, buf=DATA)
    def fd_write(self, data, offset, buf):
        slot = self._slot(data)
        b = make_data(buf)
        if offset is None:
            self.both(f"write({self.fd_desc(slot)}, {len(b)} bytes)", "os.write",
                      self.fd_args(slot, b), slot=slot, data_op=True)
        else:
            self.both(f"pwrite({self.fd_desc(slot)}, {len(b)} bytes, {offset})", "os.pwrite",
                      self.fd_args(slot, b, offset), slot=slot, data_op=True)

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=st.none() | OFFSETS, size=SIZES)
    def fd_read(self, data, offset, size):
        slot = self._slot(data)
        if offset is None:
            self.both(f"read({self.fd_desc(slot)}, {size})", "os.read",
                      self.fd_args(slot, size), slot=slot, data_op=True)
        else:
            self.both(f"pread({self.fd_desc(slot)}, {size}, {offset})", "os.pread",
                      self.fd_args(slot, size, offset), slot=slot, data_op=True)

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), size=SIZES)
    def fd_truncate(self, data, size):
        slot = self._slot(data)
        old = self.ctx.worker.call("fstat", self.fds[slot]["ref"])
        self.both(f"ftruncate({self.fd_desc(slot)}, {size})", "os.ftruncate",
                  self.fd_args(slot, size), slot=slot,
                  check_stamps=not (old[0] == "ok" and old[1]["size"] == size))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), datasync=st.booleans())
    def fd_sync(self, data, datasync):
        slot = self._slot(data)
        self.both(f"{'fdatasync' if datasync else 'fsync'}({self.fd_desc(slot)})",
                  "os.fdatasync" if datasync else "os.fsync", self.fd_args(slot), slot=slot)

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def fd_stat(self, data):
        slot = self._slot(data)
        self.both(f"fstat({self.fd_desc(slot)})", "fstat", self.fd_args(slot), slot=slot,
                  norm=self.fd_stat_norm(slot))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), mode=CHMOD_MODES)
    def fd_chmod(self, data, mode):
        slot = self._slot(data)
        self.both(f"fchmod({self.fd_desc(slot)}, {mode:#o})", "os.fchmod",
                  self.fd_args(slot, mode), slot=slot)

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def unlink_open_file(self, data):
        """unlink the name an open file was opened by; the fd must stay fully usable."""
        slot = self._slot(data)
        path = self.fds[slot]["path"]
        self.both(f"unlink({path!r}) while {self.fd_desc(slot)} is open", "os.unlink",
                  self.paths(path), watch=self.watch(path), slot=slot)
        self.both(f"fstat({self.fd_desc(slot)}) after unlinking its name", "fstat",
                  self.fd_args(slot), slot=slot, norm=self.fd_stat_norm(slot))
        self.both(f"read back ({self.fd_desc(slot)}) after unlinking its name", "read_fd_all",
                  self.fd_args(slot), slot=slot, data_op=True)

    # ---- persistence ------------------------------------------------------------------------
    @rule(go=st.integers(0, REMOUNT_ODDS - 1))
    def remount(self, go):
        """Unmount and mount again (rare: only when ``go`` hits one value, at most once per
        sequence and Ctx.remounts_left times per test; no precondition so that the choice does not
        depend on state outside the example)."""
        c = self.ctx
        if go != 0 or self.remounted or c.remounts_left <= 0:
            return
        self.remounted = True
        c.remounts_left -= 1
        c.remounts += 1
        c.close_fds()
        self.fds.clear()
        before = self.check_tree("before remount")
        c.mount.remount()
        after = c.admin.ok("snapshot", c.root("cowfs"), timeout=60)
        diffs = compare_snapshots(after, before, names=("after remount", "before remount"),
                                  ignore=("atime",))
        if diffs:
            self.broken = True
            raise AssertionError("cowfs tree changed across unmount/mount:\n  "
                                 + "\n  ".join(diffs[:40]))

    # ---- invariants / teardown --------------------------------------------------------------
    @invariant()
    def periodic_tree_check(self):
        if self.steps and self.steps % CHECK_EVERY == 0 and not self.broken:
            self.check_tree(f"after {self.steps} operations")

    def teardown(self):
        c = self.ctx
        try:
            c.close_fds()
        except (mounting.OpTimeout, mounting.WorkerError):
            return
        finally:
            self.fds.clear()
        if not self.broken and c.mount.alive():
            self.check_tree("at the end of the sequence")
