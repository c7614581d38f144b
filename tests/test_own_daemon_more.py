"""More of several daemons of one store on real mounts (docs/design-many-processes.md, "Step 6";
tests/test_own_daemon.py has the first ones): gc of every kind run again and again while the
store's daemon and two branch daemons write, delete and snapshot (every file compared with a
model, fsck clean); a power cut (tests/lazyfs.py) under a branch daemon's home while the
store's daemon writes too; fsck of homes whose lineage crosses another home, before and after
the branch is deleted; and what a sandbox user reaches from inside a branch daemon's mount
(nothing of a sibling branch, of main, or of STORE/homes; a clear refusal of a plain branch).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

import mounting
import workload
from conftest import UNPRIV_GID, UNPRIV_UID
from mounting import Worker, ok, read, run_cowfs, run_cowfs_as, sync_tree, write

OTHER_UID = UNPRIV_UID - 1  # the user of the sibling sandbox
# The long forms (marked slow): writers and gc for this many more seconds, this many power cuts
GC_SECONDS = float(os.environ.get("COWFS_GC_WRITERS_SECONDS", "30"))
POWER_ROUNDS = int(os.environ.get("COWFS_HOME_POWER_ROUNDS", "5"))


def _own_branch(mp: Path, name: str, source: str | None = None) -> str:
    """`branch-home` in the daemon serving mp; the new home's id."""
    reply = ok(mp, f"branch-home {name}" + (f" {source}" if source else ""))
    assert reply["home"], reply
    return reply["home"]


def _main_with_base(mount_factory, files: dict[str, bytes]) -> mounting.Mount:
    m = mount_factory()
    for rel, data in files.items():
        (m.path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(m.path / rel, data, sync=True)
    return m


# -- gc with writers running ----------------------------------------------------------------------
class Writer(threading.Thread):
    """Random fsync'd creates, rewrites, appends, partial overwrites and deletes under root, and a
    snapshot now and then with the one before the last deleted (dead layers for gc); model:
    what every file must read back as."""

    def __init__(self, root: Path, tag: str, seed: int, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{tag}")
        self.root, self.tag, self.stop = root, tag, stop
        self.rnd = random.Random(seed)
        self.model: dict[str, bytes] = {}
        self.ops = 0
        self.snapshots: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(0.01):  # busy, but leaving gc a share of 2 CPUs
                self.step()
                self.ops += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def step(self) -> None:
        rnd, names = self.rnd, sorted(self.model)
        op = rnd.random()
        if op < 0.4 or not names:
            rel = f"{self.tag}-{rnd.randrange(40)}.bin"
            data = rnd.randbytes(rnd.choice([300, 5_000, 40_000, 120_000]))
            write(self.root / rel, data, sync=True)
            self.model[rel] = data
        elif op < 0.55:
            rel = rnd.choice(names)
            os.unlink(self.root / rel)
            del self.model[rel]
        elif op < 0.7:
            rel = rnd.choice(names)
            extra = rnd.randbytes(rnd.randrange(1, 20_000))
            with open(self.root / rel, "ab") as f:
                f.write(extra)
                os.fsync(f.fileno())
            self.model[rel] += extra
        elif op < 0.92:
            rel = rnd.choice(names)
            old = bytearray(self.model[rel])
            off = rnd.randrange(len(old))
            data = rnd.randbytes(rnd.randrange(1, 40_000))
            with open(self.root / rel, "r+b") as f:
                f.seek(off)
                f.write(data)
                os.fsync(f.fileno())
            old[off:off + len(data)] = data
            self.model[rel] = bytes(old)
        else:
            name = f"{self.tag}-s{self.ops}"
            ok(self.root, f"snapshot {name}")
            self.snapshots.append(name)
            if len(self.snapshots) > 2:
                ok(self.root, f"delete {self.snapshots.pop(0)}")


@pytest.mark.timeout(300 + GC_SECONDS)
@pytest.mark.parametrize("seconds", [1, pytest.param(GC_SECONDS, marks=pytest.mark.slow, id="long")])
def test_gc_runs_again_and_again_while_three_daemons_write(mount_factory, seconds):
    """`cowfs gc STORE --repack-below` (the store's daemon: its layers, pack gc and repack with
    the branch daemons' acknowledgements, homes of deleted branches) and `cowfs gc` of each
    branch daemon, in a loop, while the store's daemon and two branch daemons write, delete and
    snapshot; meanwhile a third branch daemon is made, written, stopped and its branch deleted,
    so that a gc drops its home.  Every file of every branch reads back as its model says, live,
    after fsck (clean) and after a remount."""
    base = {f"base/f{i}.bin": random.Random(i).randbytes(150_000) for i in range(4)}
    m = _main_with_base(mount_factory, base)
    m.stop()  # the base's packs half dead (tests/test_own_daemon.py _half_dead): a repack's work
    m.options = ["dedup=off"]
    m.start()
    keep = bytearray(random.Random(7).randbytes(8 << 20))
    write(m.path / "keep", bytes(keep), sync=True)
    keep[4 << 20:] = random.Random(8).randbytes(4 << 20)
    with open(m.path / "keep", "r+b") as fh:
        fh.seek(4 << 20)
        fh.write(keep[4 << 20:])
        os.fsync(fh.fileno())
    base["keep"] = bytes(keep)
    ok(m.path, "snapshot base")
    _own_branch(m.path, "F", "base")
    _own_branch(m.path, "G", "base")
    f = mount_factory(store=m.store, init=False, branch="F", name="F")
    g = mount_factory(store=m.store, init=False, branch="G", name="G")
    for mp in (f, g):  # the branch daemons read the moved half only once the repack's packs are gone
        with open(mp.path / "keep", "rb") as fh:
            fh.seek(6 << 20)
            assert fh.read(4096) == keep[6 << 20:(6 << 20) + 4096]
    packs = Path(m.store) / "packs"
    first_packs = set(os.listdir(packs))
    stop = threading.Event()
    writers = [Writer(mp.path, tag, seed, stop) for mp, tag, seed in ((m, "main", 1), (f, "F", 2), (g, "G", 3))]
    figures = {"rounds": 0, "packs_repacked": 0, "packs_deleted": 0}
    gc_errors: list[str] = []

    def collect() -> None:
        while not stop.is_set():
            try:
                r = mounting.cowfs_json("gc", str(m.store), "--repack-below", "0.6")
                for k in ("packs_repacked", "packs_deleted"):
                    figures[k] += r.get(k, 0)
                for mp in (f.path, g.path):
                    mounting.cowfs_json("gc", str(mp))
                figures["rounds"] += 1
            except Exception as exc:  # noqa: BLE001 - reported by the test
                gc_errors.append(repr(exc))
                return

    collector = threading.Thread(target=collect, name="gc")
    for t in writers + [collector]:
        t.start()
    try:
        # a branch that lives and goes while the others write: its home is a gc's to drop
        home = _own_branch(m.path, "H")
        h = mount_factory(store=m.store, init=False, branch="H", name="H")
        write(h.path / "h.bin", os.urandom(100_000), sync=True)
        h.stop()
        ok(m.path, "delete H")
        deadline = time.monotonic() + 30
        while (Path(m.store) / "homes" / home).exists() and time.monotonic() < deadline and not gc_errors:
            time.sleep(0.2)
        assert not (Path(m.store) / "homes" / home).exists(), "no gc dropped the deleted branch's home"
        # a repacked pack of the base deleted (by a `cowfs gc` or the store daemon's own pass)
        # once both branch daemons acknowledged its round; and gc again after that
        while ((first_packs <= set(os.listdir(packs)) or figures["rounds"] < 2) and not gc_errors
               and time.monotonic() < deadline + 90):
            time.sleep(0.2)
        time.sleep(seconds)
    finally:
        stop.set()
        for t in writers + [collector]:
            t.join(120)
    assert not gc_errors, gc_errors
    for w in writers:
        assert w.error is None, f"{w.name}: {w.error!r}"
        assert w.ops >= 10, (w.name, w.ops)
    assert figures["rounds"] >= 2 and figures["packs_repacked"] >= 1, figures
    assert not first_packs <= set(os.listdir(packs)), "no repacked pack of the base was deleted"
    print(f"\n[gc with writers] {figures}, writer ops {[w.ops for w in writers]}")

    mounts = (m, f, g)
    for mp, w in zip(mounts, writers):
        assert mounting.file_tree(mp.path) == {**base, **w.model}, f"{w.tag} differs from its model"
    for mp in (g, f, m):
        mp.stop()
    mounting.fsck(m.store)
    for mp in mounts:
        mp.start()
    for mp, w in zip(mounts, writers):
        assert mounting.file_tree(mp.path) == {**base, **w.model}, f"{w.tag} differs from its model after the remount"
        for name in w.snapshots:  # the snapshots left stand as they were taken: readable whole
            assert (mp.path / ".cowfs/snapshots" / name).is_dir()
    for mp in (g, f, m):
        mp.stop()


# -- fsck of homes over another home -----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_fsck_of_a_home_over_another_home_before_and_after_its_branch_is_deleted(mount_factory):
    """A made a snapshot, a branch-home A2 of its current state and then a directory clone of
    its snapshot: A2's fsck must leave A's usage to A's home (A2's view of A's clone is not A's),
    and once A2 is deleted its home, left for gc, is checked over its lineage instead of making
    fsck give up ("not checked"); gc drops it, fsck stays clean."""
    m = _main_with_base(mount_factory, {"shared": b"base\n"})
    _own_branch(m.path, "A")
    a = mount_factory(store=m.store, init=False, branch="A", name="A")
    (a.path / "d").mkdir()
    write(a.path / "d/f", b"in A\n", sync=True)
    ok(a.path, "snapshot a1")
    home2 = _own_branch(a.path, "A2")
    ok(a.path, "clone .cowfs/snapshots/a1/d dcopy")
    write(a.path / "later", b"after A2\n", sync=True)
    want = mounting.file_tree(a.path)
    a.stop()
    m.stop()
    mounting.fsck(m.store)
    m.start()
    a.start()
    ok(a.path, "delete A2")
    a.stop()
    m.stop()
    mounting.fsck(m.store)
    m.start()
    assert (Path(m.store) / "homes" / home2).is_dir()
    run_cowfs("gc", str(m.store))
    assert not (Path(m.store) / "homes" / home2).exists()
    m.stop()
    mounting.fsck(m.store)
    a.start()
    assert mounting.file_tree(a.path) == want


# -- power loss under a home ------------------------------------------------------------------------
@pytest.mark.parametrize("rounds", [
    pytest.param(1, marks=pytest.mark.timeout(180)),
    pytest.param(POWER_ROUNDS, marks=[pytest.mark.slow, pytest.mark.timeout(120 + 60 * POWER_ROUNDS)], id="long")])
def test_power_cut_under_a_branch_daemons_home_while_the_store_daemon_writes(lazy, mount_factory, tmp_path, rounds):
    """The store on LazyFS (tests/test_power_loss.py): tests/workload.py in a branch daemon
    (mode "power": the branch is a prefix of its operations holding all it fsync'd, each of
    its snapshots exact) while the store's daemon writes fsync'd files (another process:
    workload.synced_files); the power cut stops both daemons, drops what was not synced,
    kills both.  fsck of the store and its home is clean, each fsync'd file of main is there
    whole, and both daemons serve again.  Each step after the cut has a time limit of its
    own (mounting.Steps): a stuck one fails the round at once, naming it."""
    store = os.path.join(lazy.mp, "store")
    mounting.init_store(store)
    sync_tree(store)
    m = mount_factory(store=store, init=False)
    write(m.path / "base.bin", os.urandom(300_000), sync=True)
    _own_branch(m.path, "F")  # made durable by the branch command itself: no sync_tree here
    f = mount_factory(store=store, init=False, branch="F", name="F")
    rnd = random.Random(int(os.environ.get("COWFS_POWER_SEED", "4243")))
    lost = 0
    for r in range(rounds):
        rel = tag = f"p{r}"
        log, synced_log = str(tmp_path / f"{rel}.log"), str(tmp_path / f"r{r}.synced")
        w = workload.start_workload(str(f.path), rel, log, rnd.randrange(1 << 30), tag, "--fsync-p", "0.3")
        (m.path / f"r{r}").mkdir()
        writer = workload.start_synced_files(str(m.path / f"r{r}"), synced_log)
        steps = mounting.Steps(lambda: workload.release(lazy, (m, f), (w, writer)))
        try:
            workload.wait_acked(log, 3, w, timeout=60)
            time.sleep(rnd.uniform(0.3, 1.5))
            cut_time, figures = workload.power_cut(lazy, (m, f), steps)
            steps("exit of the workload in F", 60, w.wait)
            code = steps("exit of main's writer", 30, writer.wait)
            assert code == 0, f"main's writer exited with {code}: {writer.stderr.read().decode(errors='replace')}"
        finally:
            workload.reap(w, writer)
            w.stderr.close()
            writer.stderr.close()
        lost += figures["lost_bytes"]
        steps("start of a new lazyfs", 30, lazy.start)
        steps("fsck of the store", 120, workload.fsck_clean, store)
        steps("start of main's daemon", 60, m.start)
        steps("start of F's daemon", 60, f.start)
        k, how, probs = steps("check of F against the workload's log", 60, workload.check,
                              str(f.path), rel, log, "power", tag + "-", cut_time)
        assert not probs, f"round {r} (log {log}, lazyfs: {figures}):\n" + "\n".join(probs)
        done = workload.synced_files_done(synced_log)
        assert done, "the store's daemon wrote nothing before the cut"
        for name, digest in done:
            assert hashlib.sha256(read(m.path / f"r{r}" / name)).hexdigest() == digest, \
                f"round {r}: main's fsync'd {name}"
        assert not any(p.startswith(f"r{r}") for p in mounting.file_tree(f.path)), "main's files in the branch"
        print(f"round {r}: branch state = first {k} ops ({how}); main {len(done)} fsync'd files; "
              f"lazyfs dropped {figures['lost_bytes']} bytes; steps: {steps.summary()}")
    assert lost > 0, "no cut dropped any data: the test did not test anything"
    f.stop()
    m.stop()
    workload.fsck_clean(store)


# -- the sandbox user inside a branch daemon's mount --------------------------------------------------
def _wctl(w: Worker, mp: Path, line: str) -> dict:
    """A control command given by the worker's user through mp's control file."""
    fd = w.ok("os.open", str(mp / ".cowfs" / "ctl"), os.O_RDWR)
    try:
        w.call("os.write", fd, line.encode() + b"\n")
        return json.loads(w.ok("os.read", fd, 1 << 20))
    finally:
        w.call("os.close", fd)


@pytest.mark.timeout(180)
def test_a_sandbox_in_a_branch_daemon_reaches_nothing_of_its_sibling_main_or_the_homes(mount_factory):
    """Sibling sandboxes A (user nobody) and B (another user), each branch served by a daemon of
    its own, both made from main's snapshot base.  As nobody inside A: no control command names
    B, B's snapshot, main or base (each answered as a name that does not exist), no clone reaches
    B's mount or STORE/homes by path or symlink, B's xattrs and files stay invisible, the
    cowfs CLI refuses nobody the store; a plain `branch` is refused with a line naming
    --own-daemon; A's own snapshots and branch-home branches work.  B, main and every home are
    as they were, fsck clean."""
    m = _main_with_base(mount_factory, {"shared": b"before the fork\n", "d/f": b"in d\n"})
    os.setxattr(m.path / "shared", "user.tag", b"main")
    ok(m.path, "snapshot base")
    _own_branch(m.path, "A", "base")
    home_b = _own_branch(m.path, "B", "base")
    a = mount_factory(store=m.store, init=False, branch="A", name="A", options=("allow_other",))
    b = mount_factory(store=m.store, init=False, branch="B", name="B", options=("allow_other",))
    os.chown(a.path, UNPRIV_UID, UNPRIV_GID)
    os.chown(a.path / "shared", UNPRIV_UID, UNPRIV_GID)  # A's to change: in A only
    os.chown(b.path, OTHER_UID, OTHER_UID)
    os.chmod(b.path, 0o700)
    write(b.path / "secret-of-B", b"B only", sync=True)
    os.setxattr(b.path / "shared", "user.b", b"B's")
    ok(b.path, "snapshot B-snap")
    homes_dir = Path(m.store) / "homes"
    w = Worker(uid=UNPRIV_UID, gid=UNPRIV_GID)
    try:
        refused = {}
        for line in ("clone .cowfs/snapshots/B-snap/secret-of-B stolen", "rollback B-snap", "delete B-snap",
                     "delete B", "branch-home B2 B-snap", "branch-home B2 B", "diff B-snap", "diff B",
                     "coldstart B-snap", "delete main", "delete base", "rollback base", "diff base",
                     "branch-home M2 base", "clone .cowfs/snapshots/base/shared stolen"):
            refused[line] = _wctl(w, a.path, line).get("errno")
        assert set(refused.values()) == {"ENOENT"}, refused
        for line in (f"clone {b.path}/secret-of-B stolen", f"clone shared {b.path}/planted",
                     f"clone {homes_dir} stolen", f"clone {homes_dir / home_b / 'db'} stolen",
                     "clone ../../../ stolen", f"clone shared {homes_dir}/planted"):
            reply = _wctl(w, a.path, line)
            assert reply.get("errno") in ("EINVAL", "ENOENT", "ENOTDIR"), (line, reply)
        # symlinks out of A: the kernel resolves them for nobody, who may open neither
        w.ok("os.symlink", str(b.path / "secret-of-B"), str(a.path / "to-b"))
        w.ok("os.symlink", str(homes_dir / home_b / "db"), str(a.path / "to-home"))
        assert w.call("read_file", str(a.path / "to-b")) == ("err", errno.EACCES)
        assert w.call("os.listdir", str(a.path / "to-home")) == ("err", errno.EACCES)
        assert w.call("os.listdir", str(homes_dir)) == ("err", errno.EACCES)
        for line in ("clone to-b/x stolen", "clone to-home/CURRENT stolen"):
            reply = _wctl(w, a.path, line)
            assert reply.get("errno") in ("EINVAL", "ENOENT", "ENOTDIR"), (line, reply)
        reply = _wctl(w, a.path, "clone to-home link-copy")  # the link itself, never its target
        assert reply.get("ok"), reply
        assert w.ok("os.readlink", str(a.path / "link-copy")) == str(homes_dir / home_b / "db")
        # xattrs: main's (below the fork) are read, B's are not seen, A's stay A's
        assert sorted(w.ok("os.listxattr", str(a.path / "shared"))) == ["user.tag"]
        assert w.call("os.getxattr", str(a.path / "shared"), "user.b")[0] == "err"
        w.ok("os.setxattr", str(a.path / "shared"), "user.a", b"A's")
        assert "user.a" not in os.listxattr(b.path / "shared") and "user.a" not in os.listxattr(m.path / "shared")
        # names: A lists itself and what it makes, nothing of B or main
        assert w.ok("os.listdir", str(a.path / ".cowfs/snapshots")) == []
        assert [x["name"] for x in _wctl(w, a.path, "list")["branches"]] == ["A"]
        assert w.call("os.stat", str(a.path / "secret-of-B")) == ("err", errno.ENOENT)
        # a plain branch would put a head of STORE/db over A's home: refused, saying how
        reply = _wctl(w, a.path, "branch A-plain")
        assert reply.get("errno") == "EINVAL" and "--own-daemon" in reply["error"], reply
        # what A may do: its own snapshots and branches with daemons of their own
        assert _wctl(w, a.path, "snapshot a1")["ok"]
        made = _wctl(w, a.path, "branch-home A2 a1")
        assert made.get("ok") and made.get("home"), made
        assert _wctl(w, a.path, "delete A2")["ok"]
        assert sorted(w.ok("os.listdir", str(a.path / ".cowfs/snapshots"))) == ["a1"]
    finally:
        w.close()
    # the cowfs CLI gives nobody nothing of the store (0700, root's)
    for args in (("gc", str(m.store)), ("delete", str(m.store), "B"), ("list", str(m.store)),
                 ("umount", str(b.path))):
        r = run_cowfs_as(UNPRIV_UID, UNPRIV_GID, *args, text=True, check=False)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
    assert read(b.path / "secret-of-B") == b"B only" and os.getxattr(b.path / "shared", "user.b") == b"B's"
    assert "B-snap" in os.listdir(b.path / ".cowfs/snapshots") and not (b.path / "planted").exists()
    assert {x["name"] for x in ok(m.path, "list")["branches"]} >= {"main", "A", "B"}
    assert read(m.path / "shared") == b"before the fork\n" and not (m.path / "stolen").exists()
    for d in (b, a, m):
        d.stop()
    mounting.fsck(m.store)
