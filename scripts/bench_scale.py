#!/usr/bin/env python3
"""Scale benchmark (issue 20): what a store with a long history costs.  Prints the issue's
table, one row per measure with its goal and PASS / MISS; `--json` prints one JSON object on
stdout (the table then goes to stderr).

    .venv/bin/python scripts/bench_scale.py --json           # full sizes (see ROWS below)
    .venv/bin/python scripts/bench_scale.py --quick --json   # small sizes (~1 min)
    .venv/bin/python scripts/bench_scale.py --smoke --json   # tiny sizes, figures meaningless: the CI test
    .venv/bin/python scripts/bench_scale.py --only gc,layers # some rows

Large stores are built through the store's own API (scripts/bulkstore.py: the base tree by
the filesystem core in process, snapshots and branches as the catalog writes them, thousands
per batch), never by FUSE creates; each row says how long its stores took to build
(`build_s`).  Everything else goes through a real mount: the control file for snapshots and
deletes, `cowfs gc` (CLI, through the daemon's admin socket) for collection, reads through
`.cowfs/snapshots/NAME/`.

Rows are functions registered with `@row(name)`, each building its own stores under the
work directory and returning a list of `Row`s: add a row by adding a function.

Needs root and /dev/fuse; every mount is unmounted at the end, even after an error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import bulkstore  # noqa: E402

COWFS = os.path.join(REPO, ".venv", "bin", "cowfs")
if not os.path.exists(COWFS):
    COWFS = shutil.which("cowfs") or COWFS


@dataclass
class Config:
    quick: bool
    workdir: str
    # snapshot p50 after `snap_big` snapshots / after `snap_small`
    snap_small: int = 1000
    snap_big: int = 1_000_000
    snap_takes: int = 100  # snapshots taken (and timed) on each store
    # gc after deleting `gc_deleted` snapshots of `gc_big` (and of `gc_small`)
    gc_big: int = 100_000
    gc_small: int = 10_000
    gc_deleted: int = 1000
    # layers a read visits after `layers_total` snapshots of which all but `layers_live` deleted
    layers_total: int = 100_000
    layers_live: int = 1000
    # a store past 65,536 snapshots + branches (2 * ids_forks + 1 of them) mounts and reads:
    # 132,001 of them, view ids past 2^17, and 66,001 snapshots read, more than the 65,535
    # inode-number slots of a mount (cowfs.fuse.inodes), so their recycling is measured too
    ids_forks: int = 66_000
    # clone of a directory tree of `clone_entries` entries
    clone_entries: int = 1_000_000
    # mount of a store with `mount_entries` files and `mount_snapshots` snapshots
    mount_entries: int = 1_000_000
    mount_snapshots: int = 100_000
    # stat+open in another branch while a tree of `busy_entries` entries is diffed
    busy_entries: int = 1_000_000
    # clone and diff of a tree `deep_depth` directories deep
    deep_depth: int = 10_000

    @classmethod
    def make(cls, quick: bool, workdir: str, smoke: bool = False) -> "Config":
        """smoke: sizes that only prove each row runs and prints (the CI test's form)."""
        if smoke:
            return cls(True, workdir, snap_small=20, snap_big=100, snap_takes=3, gc_big=100, gc_small=50,
                       gc_deleted=10, layers_total=100, layers_live=5, ids_forks=50,
                       clone_entries=1000, mount_entries=1000, mount_snapshots=100, busy_entries=2000,
                       deep_depth=1000)
        if not quick:
            return cls(False, workdir)
        return cls(True, workdir, snap_small=200, snap_big=2000, snap_takes=15, gc_big=2000, gc_small=400,
                   gc_deleted=100, layers_total=1000, layers_live=20, ids_forks=150,
                   clone_entries=20_000, mount_entries=20_000, mount_snapshots=2000, busy_entries=20_000)


@dataclass
class Row:
    row: str  # the registered row function's name
    measure: str
    value: float | None
    unit: str
    goal: str
    ok: bool | None  # None: no goal for this line (a figure shown for context)
    build_s: float | None = None  # seconds the stores of this line took to build
    details: dict[str, Any] = field(default_factory=dict)


ROWS: dict[str, Callable[[Config], list[Row]]] = {}


def row(name: str) -> Callable[[Callable[[Config], list[Row]]], Callable[[Config], list[Row]]]:
    def register(fn: Callable[[Config], list[Row]]) -> Callable[[Config], list[Row]]:
        ROWS[name] = fn
        return fn
    return register


# -- mounts ------------------------------------------------------------------------------------
MOUNTED: list[str] = []


def cowfs(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return benchlib.run([COWFS, *args], timeout=timeout)


def mount(store: str, mp: str) -> str:
    os.makedirs(mp, exist_ok=True)
    cowfs("mount", store, mp, timeout=300)
    MOUNTED.append(mp)
    return mp


def umount(mp: str) -> None:
    if mp in MOUNTED:
        MOUNTED.remove(mp)
    cowfs("umount", mp, timeout=300)


def umount_all() -> None:
    for mp in list(MOUNTED):
        try:
            umount(mp)
        except Exception as exc:  # keep going: every mount must go
            benchlib.log(f"umount {mp}: {exc}")
            subprocess.run(["umount", "-l", mp], capture_output=True)


def ctl(mp: str, *words: str) -> dict[str, Any]:
    """One control-file command; its JSON reply (an error reply raises)."""
    from cowfs import api
    return api.control(mp, *words, timeout=600)


def p50(values: list[float]) -> float:
    return statistics.median(values)


def store_dir(cfg: Config, name: str) -> str:
    path = os.path.join(cfg.workdir, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def mp_dir(cfg: Config, name: str) -> str:
    return os.path.join(cfg.workdir, "mnt-" + name)


def spread(names: list[str], n: int) -> list[str]:
    """n names taken evenly from the interior of names (never the first or the last)."""
    inner = names[1:-1]
    if n >= len(inner):
        return list(inner)
    step = len(inner) / n
    return [inner[int(i * step)] for i in range(n)]


# -- the history rows (H18) --------------------------------------------------------------------
@row("snapshot")
def snapshot_rows(cfg: Config) -> list[Row]:
    """Snapshot cost in the daemon (`daemon_ms` of the reply) on a store whose branch already
    has snap_big snapshots, against one with snap_small: the two mounted side by side and
    the snapshots taken alternately, so that the machine's load hits both alike."""
    built = {}
    for n in (cfg.snap_small, cfg.snap_big):
        benchlib.log(f"building a store with {n:,} snapshots")
        built[n] = bulkstore.chain(store_dir(cfg, f"snap{n}"), n)
        benchlib.log(f"  built in {built[n].seconds:.1f} s")
    mps = {n: mount(built[n].path, mp_dir(cfg, f"snap{n}")) for n in built}
    times: dict[int, list[float]] = {n: [] for n in built}
    try:
        for i in range(cfg.snap_takes):
            for n in built:
                with open(os.path.join(mps[n], "d", f"t{i}"), "w") as f:  # each freezes a non-empty layer
                    f.write("x")
                times[n].append(ctl(mps[n], "snapshot", f"bench{i}")["daemon_ms"])
    finally:
        for n in built:
            umount(mps[n])
    small, big = p50(times[cfg.snap_small]), p50(times[cfg.snap_big])
    return [Row("snapshot", f"snapshot p50 in-daemon after {cfg.snap_big:,} snapshots / after {cfg.snap_small:,}",
                round(big / small, 3), "ratio", "<= 1.2", big / small <= 1.2,
                build_s=round(sum(b.seconds for b in built.values()), 1),
                details={"p50_ms_small": small, "p50_ms_big": big, "taken": cfg.snap_takes})]


def _gc_after_deletes(cfg: Config, total: int) -> tuple[float, float, float, dict[str, Any]]:
    """(seconds of `cowfs gc` right after deleting cfg.gc_deleted interior snapshots of a
    store with `total`, through the mount; seconds of the deletes; build seconds; gc's reply)."""
    built = bulkstore.chain(store_dir(cfg, f"gc{total}"), total)
    benchlib.log(f"  {total:,} snapshots built in {built.seconds:.1f} s")
    mp = mount(built.path, mp_dir(cfg, f"gc{total}"))
    try:
        victims = spread(built.snapshots, cfg.gc_deleted)
        t0 = time.perf_counter()
        for name in victims:
            ctl(mp, "delete", name)
        deletes = time.perf_counter() - t0
        t0 = time.perf_counter()
        reply = json.loads(cowfs("gc", built.path, "--json").stdout)
        gc_s = time.perf_counter() - t0
        # every surviving snapshot around a deleted one still reads what it froze
        gone = set(victims)
        for i, name in enumerate(built.snapshots):
            if name in gone and i + 1 < len(built.snapshots):
                after = built.snapshots[i + 1]
                if after not in gone:
                    got = os.readlink(os.path.join(mp, ".cowfs", "snapshots", after, "d", "link"))
                    assert got == after, f"snapshot {after} reads link -> {got!r}"
    finally:
        umount(mp)
    return gc_s, deletes, built.seconds, reply


@row("gc")
def gc_rows(cfg: Config) -> list[Row]:
    """`cowfs gc` (end to end: the CLI, the daemon's pass, pack sweep and compaction) right
    after deleting gc_deleted snapshots of gc_big, and of gc_small, through the mount."""
    out = {}
    for total in (cfg.gc_small, cfg.gc_big):
        benchlib.log(f"gc after deleting {cfg.gc_deleted:,} of {total:,} snapshots")
        out[total] = _gc_after_deletes(cfg, total)
    big, small = out[cfg.gc_big][0], out[cfg.gc_small][0]
    build = round(out[cfg.gc_big][2] + out[cfg.gc_small][2], 1)
    return [
        Row("gc", f"cowfs gc after deleting {cfg.gc_deleted:,} of {cfg.gc_big:,} snapshots", round(big, 3), "s",
            "<= 2 s", big <= 2.0, build_s=build,
            details={"deletes_s": round(out[cfg.gc_big][1], 3), "reply": out[cfg.gc_big][3]}),
        Row("gc", f"  the same / with {cfg.gc_small:,} snapshots ({small:.3f} s)", round(big / small, 3), "ratio",
            "<= 1.2", big / small <= 1.2, details={"deletes_s": round(out[cfg.gc_small][1], 3),
                                                   "reply": out[cfg.gc_small][3]}),
    ]


@row("layers")
def layer_rows(cfg: Config) -> list[Row]:
    """Layers a read of the branch head can visit (its ancestry) after layers_total snapshots
    of which all but layers_live were deleted and `cowfs gc` ran, against the live snapshots
    in that ancestry; every live snapshot is read back through the mount."""
    from cowfs.meta.versioned import CF_INODES, ino_key
    from cowfs.store import Store

    path = store_dir(cfg, "layers")
    built = bulkstore.chain(path, cfg.layers_total)
    keep = set(spread(built.snapshots, cfg.layers_live - 2)) | {built.snapshots[0], built.snapshots[-1]}
    dead = [n for n in built.snapshots if n not in keep]
    build_s = built.seconds + bulkstore.delete(path, dead)
    benchlib.log(f"  {cfg.layers_total:,} snapshots built and {len(dead):,} deleted in {build_s:.1f} s")
    mp = mount(path, mp_dir(cfg, "layers"))
    try:
        t0 = time.perf_counter()
        cowfs("gc", path, "--json")
        gc_s = time.perf_counter() - t0
        for name in sorted(keep):
            got = os.readlink(os.path.join(mp, ".cowfs", "snapshots", name, "d", "link"))
            assert got == name, f"snapshot {name} reads link -> {got!r}"
    finally:
        umount(mp)
    store = Store(path)
    try:
        head = store.catalog.branches["main"].head
        ancestry = store.catalog.ancestry(head)
        live = sum(1 for s in store.catalog.snapshots.values() if s.layer in set(ancestry))
        versions = len(store.meta.versions(CF_INODES, ino_key(built.link_ino)))
    finally:
        store.close()
    return [Row("layers", f"layers a read visits after {cfg.layers_total:,} snapshots, {len(dead):,} deleted "
                          f"(live snapshots in its ancestry: {live:,})",
                len(ancestry), "layers", f"<= {2 * live:,} (2x live)", len(ancestry) <= 2 * live, build_s=round(build_s, 1),
                details={"live_snapshots": live, "versions_of_the_changed_key": versions, "gc_s": round(gc_s, 3)})]


@row("ids")
def id_rows(cfg: Config) -> list[Row]:
    """A store with 2*ids_forks+1 snapshots and branches besides main (full form: 132,001, past
    what 16-bit view ids could number) mounts, every snapshot reads right through
    .cowfs/snapshots/NAME/ (the full form takes more views than the mount has inode-number
    slots: the kernel is made to drop idle snapshot views as it goes), and the newest
    branches, mounted beside main, read right too."""
    path = store_dir(cfg, "ids")
    built = bulkstore.fan(path, cfg.ids_forks)
    made = len(built.snapshots) + len(built.branches)
    benchlib.log(f"  {made:,} snapshots and branches built in {built.seconds:.1f} s")
    from cowfs.store import Store
    st = Store(path)
    try:
        top_view = max([s.view for s in st.catalog.snapshots.values()] + [b.view for b in st.catalog.branches.values()])
    finally:
        st.close()
    t0 = time.perf_counter()
    mp = mount(path, mp_dir(cfg, "ids"))
    mount_s = time.perf_counter() - t0
    wrong = []
    try:
        t0 = time.perf_counter()
        for name in built.snapshots:
            got = os.readlink(os.path.join(mp, ".cowfs", "snapshots", name, "d", "link"))
            if got != name:
                wrong.append(name)
        read_s = time.perf_counter() - t0
        with open(os.path.join(mp, ".cowfs", "stats")) as f:
            slots = json.load(f).get("inode_slots", {})
        for br in built.branches[-3:]:
            bmp = mp_dir(cfg, "ids-" + br)
            os.makedirs(bmp, exist_ok=True)
            cowfs("mount", path, bmp, "--branch", br, timeout=300)
            MOUNTED.append(bmp)
            if os.readlink(os.path.join(bmp, "d", "link")) != "s" + br[1:]:
                wrong.append(br)
            umount(bmp)
    finally:
        umount(mp)
    return [Row("ids", f"store with {made:,} snapshots + branches (view ids to {top_view:,}): mounts, every "
                       "snapshot and the newest branches read right",
                len(built.snapshots) + 3 - len(wrong), "snapshots + branches read right",
                f"= {len(built.snapshots) + 3:,}", not wrong, build_s=round(built.seconds, 1),
                details={"mount_s": round(mount_s, 3), "read_all_s": round(read_s, 3), "wrong": wrong[:10],
                         "top_view_id": top_view, "inode_slots": slots})]


# -- the tree rows (H23) -----------------------------------------------------------------------
@row("clone")
def clone_tree_rows(cfg: Config) -> list[Row]:
    """`clone t t<k>` through the control file of a tree of clone_entries entries (built by
    the bulk loader), CLONE_TAKES times: the wall time of each whole exchange (value: the
    median; the first and the daemon's own share in details), and what the store's directory
    grew by over the first clone (measured mounted, right after it, and after unmounting)."""
    path = store_dir(cfg, "clone")
    built = bulkstore.chain(path, 0, entries=cfg.clone_entries)
    benchlib.log(f"  a tree of {cfg.clone_entries:,} entries built in {built.seconds:.1f} s")
    mp = mount(path, mp_dir(cfg, "clone"))
    walls: list[float] = []
    daemon: list[float] = []
    try:
        ctl(mp, "snapshot", "warm")  # the control exchange's imports and first open, not timed
        before = bulkstore.store_bytes(path)
        for k in range(2, 2 + CLONE_TAKES):
            t0 = time.perf_counter()
            reply = ctl(mp, "clone", "t", f"t{k}")
            walls.append(time.perf_counter() - t0)
            daemon.append(reply["daemon_ms"])
            if k == 2:
                grown = bulkstore.store_bytes(path) - before
        # the floor under any command that syncs the kernel's writes first: snapshots, timed alike
        snaps = []
        for k in range(CLONE_TAKES):
            t0 = time.perf_counter()
            ctl(mp, "snapshot", f"floor{k}")
            snaps.append(time.perf_counter() - t0)
        # the copies are there and read like their original
        sub = sorted(os.listdir(os.path.join(mp, "t")))
        assert sorted(os.listdir(os.path.join(mp, "t2"))) == sub
        assert sorted(os.listdir(os.path.join(mp, "t2", sub[-1]))) == sorted(os.listdir(os.path.join(mp, "t", sub[-1])))
    finally:
        umount(mp)
    grown_after = bulkstore.store_bytes(path) - before
    took = p50(walls)
    return [
        Row("clone", f"clone of a {cfg.clone_entries:,}-entry directory tree, end to end (control file; "
                     f"p50 of {CLONE_TAKES})", round(took * 1000, 3), "ms", "<= 10 ms", took <= 0.010,
            build_s=round(built.seconds, 1),
            details={"wall_ms": [round(w * 1000, 3) for w in walls], "daemon_ms": daemon,
                     "snapshot_wall_ms_p50": round(p50(snaps) * 1000, 3)}),
        Row("clone", "  store growth of the first clone (mounted, right after it)", grown, "bytes", "< 1 MiB",
            grown < 1 << 20, details={"after_all_clones_and_umount_bytes": grown_after}),
    ]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _timed_mount(cfg: Config, path: str, name: str) -> tuple[str, float, int]:
    """(mount point, seconds `cowfs mount` took until the mount served a listing of its root,
    the daemon's RSS in KiB right then)."""
    from cowfs.storedir import daemon_pid
    mp = mp_dir(cfg, name)
    os.makedirs(mp, exist_ok=True)
    t0 = time.perf_counter()
    mount(path, mp)
    os.listdir(mp)
    took = time.perf_counter() - t0
    pid = daemon_pid(path)
    assert pid is not None, f"no daemon pid for {path}"
    return mp, took, _rss_kib(pid)


CLONE_TAKES = 5  # clones of the same tree timed by the clone row
CACHE_LIMITS = (256 + 256) << 20  # cache_l1 + cache_l2 at their defaults (`cowfs mount --help`)


@row("mount")
def mount_rows(cfg: Config) -> list[Row]:
    """`cowfs mount` (the CLI, until the mount lists its root) of a store with mount_entries
    files and mount_snapshots snapshots, and the daemon's RSS (/proc/PID/status) right then,
    against the same for an empty store."""
    empty = store_dir(cfg, "mount-empty")
    t0 = time.perf_counter()
    from cowfs.store import init_store
    init_store(empty)
    empty_build = time.perf_counter() - t0
    path = store_dir(cfg, "mount-big")
    built = bulkstore.chain(path, cfg.mount_snapshots, entries=cfg.mount_entries)
    benchlib.log(f"  {cfg.mount_entries:,} files and {cfg.mount_snapshots:,} snapshots built in {built.seconds:.1f} s")
    mp, empty_s, empty_rss = _timed_mount(cfg, empty, "mount-empty")
    umount(mp)
    mp, big_s, big_rss = _timed_mount(cfg, path, "mount-big")
    # figures, not the measure: a failure here is reported with the mount's figures
    checks: dict[str, Any] = {}
    try:
        for name in (built.snapshots[0], built.snapshots[-1]):
            try:
                got = os.readlink(os.path.join(mp, ".cowfs", "snapshots", name, "d", "link"))
                checks[f"reads_{name}"] = "right" if got == name else f"wrong: {got!r}"
            except OSError as exc:
                checks[f"reads_{name}"] = f"{type(exc).__name__}: {exc}"
        t0 = time.perf_counter()
        try:
            checks["snapshots_listed"] = len(os.listdir(os.path.join(mp, ".cowfs", "snapshots")))
        except OSError as exc:
            from cowfs.storedir import daemon_pid
            checks["snapshots_listing_error"] = f"{type(exc).__name__}: {exc}"
            checks["daemon_alive_after"] = daemon_pid(path) is not None
        checks["snapshots_listing_s"] = round(time.perf_counter() - t0, 3)
    finally:
        umount(mp)
    limit_kib = 1.3 * empty_rss + CACHE_LIMITS / 1024
    what = f"{cfg.mount_entries:,} files and {cfg.mount_snapshots:,} snapshots"
    note = ""
    if big_s > 1.0:
        note = (f"an empty store mounts in {empty_s:.2f} s here (the daemon's start under this load); "
                f"{big_s - empty_s:+.2f} s comes with the files and snapshots")
        if big_s - empty_s > 0.2:
            note += (": the catalog reads every layer's parent when the store opens (Catalog.__init__: "
                     "a key scan, O(snapshots)), and the mounted branch's ancestry is made from them")
    if any(v != "right" for k, v in checks.items() if k.startswith("reads_")) or "snapshots_listing_error" in checks:
        note += ("; " if note else "") + "a snapshot of the mounted store did not read (reads_*, snapshots_listing_*)"
    return [
        Row("mount", f"cowfs mount of a store with {what} (empty store: {empty_s:.3f} s)", round(big_s, 3), "s",
            "<= 1 s", big_s <= 1.0, build_s=round(built.seconds + empty_build, 1),
            details={"empty_s": round(empty_s, 3), "note": note, **checks}),
        Row("mount", f"  daemon RSS there (empty store: {empty_rss / 1024:.0f} MiB)", round(big_rss / 1024, 1), "MiB",
            f"<= {limit_kib / 1024:.0f} MiB (1.3x empty + cache limits)", big_rss <= limit_kib,
            details={"empty_rss_mib": round(empty_rss / 1024, 1), "ratio_to_empty": round(big_rss / empty_rss, 2),
                     "cache_limits_mib": CACHE_LIMITS >> 20}),
    ]


def _probe(path: str, stop: threading.Event, out: list[float]) -> None:
    """stat+open+read of the files of path in turn until stop, each timed (tests/test_walks.py)."""
    names = sorted(os.listdir(path))
    i = 0
    while not stop.is_set():
        p = os.path.join(path, names[i % len(names)])
        t0 = time.perf_counter()
        os.stat(p)
        with open(p, "rb") as f:
            f.read(1)
        out.append(time.perf_counter() - t0)
        i += 1
        time.sleep(0.002)


@row("busy")
def busy_rows(cfg: Config) -> list[Row]:
    """p99 of stat+open in another branch of the same daemon (a second mount, `--branch`)
    while `cowfs diff` of a tree of busy_entries entries runs: the tree is cloned after
    snapshot `before` (O(1)), so the diff expands the whole copy into added paths."""
    path = store_dir(cfg, "busy")
    built = bulkstore.chain(path, 0, entries=cfg.busy_entries)
    benchlib.log(f"  a tree of {cfg.busy_entries:,} entries built in {built.seconds:.1f} s")
    mp = mount(path, mp_dir(cfg, "busy"))
    ctl(mp, "snapshot", "before")
    ctl(mp, "clone", "t", "t2")
    ctl(mp, "branch", "other", "before")
    fork = mp_dir(cfg, "busy-other")
    os.makedirs(fork, exist_ok=True)
    cowfs("mount", path, fork, "--branch", "other", timeout=300)
    MOUNTED.append(fork)
    probe = os.path.join(fork, "w")
    os.mkdir(probe)
    for n in range(200):
        with open(os.path.join(probe, f"f{n}"), "wb") as f:
            f.write(b"x")
    stop = threading.Event()
    lat: list[float] = []
    t = threading.Thread(target=_probe, args=(probe, stop, lat))
    t.start()
    try:
        time.sleep(0.3)
        start = len(lat)
        t0 = time.perf_counter()
        r = cowfs("diff", mp, "before", "--json", timeout=3600)
        took = time.perf_counter() - t0
        during = sorted(lat[start:])
    finally:
        stop.set()
        t.join(60)
        umount(fork)
        umount(mp)
    changes = len(json.loads(r.stdout)["changes"])
    assert changes == cfg.busy_entries + 1, changes  # t2 and every entry below it
    assert during, "no stat+open finished during the diff"
    p99 = during[min(len(during) - 1, int(len(during) * 0.99))]
    return [Row("busy", f"p99 stat+open in another branch while {changes:,} added paths are diffed "
                        f"(diff: {took:.1f} s)", round(p99 * 1000, 2), "ms", "<= 50 ms", p99 <= 0.050,
                build_s=round(built.seconds, 1),
                details={"samples": len(during), "median_ms": round(statistics.median(during) * 1000, 2),
                         "max_ms": round(during[-1] * 1000, 2), "diff_s": round(took, 2)})]


@row("deep")
def deep_rows(cfg: Config) -> list[Row]:
    """`clone deep deep2` and `diff before after` of a tree deep_depth directories deep (built
    by the bulk loader), through the control file; the copy read to its bottom through the
    mount with relative chdir steps (its paths are far longer than PATH_MAX)."""
    path = store_dir(cfg, "deep")
    depth = cfg.deep_depth
    built = bulkstore.deep(path, depth)
    benchlib.log(f"  a tree {depth:,} levels deep built in {built.seconds:.1f} s")
    mp = mount(path, mp_dir(cfg, "deep"))
    try:
        ctl(mp, "snapshot", "before")
        t0 = time.perf_counter()
        cloned = ctl(mp, "clone", "deep", "deep2")["cloned"] == "deep"
        clone_s = time.perf_counter() - t0
        code = ("import os, sys\nos.chdir(os.path.join(sys.argv[1], 'deep2'))\n"
                f"for i in range({depth - 1}):\n    os.chdir('d')\n"
                "print(open('leaf').read())\n")
        bottom = subprocess.run([sys.executable, "-c", code, mp], timeout=600, capture_output=True,
                                text=True).stdout.strip()
        ctl(mp, "snapshot", "after")
        t0 = time.perf_counter()
        d = ctl(mp, "diff", "before", "after")
        diff_s = time.perf_counter() - t0
    finally:
        umount(mp)
    added = [c["path"] for c in d["changes"] if c["change"] == "added"]
    deepest = "deep2/" + "/".join(["d"] * (depth - 1)) + "/leaf"
    good = cloned and bottom == "bottom" and len(added) == depth + 1 and deepest in added
    return [Row("deep", f"clone and diff of a {depth:,}-level-deep tree (clone {clone_s * 1000:.0f} ms, "
                        f"diff {diff_s:.2f} s)", len(added), "paths added", f"succeed: = {depth + 1:,}, copy reads "
                        "to its bottom", good, build_s=round(built.seconds, 1),
                details={"clone_s": round(clone_s, 3), "diff_s": round(diff_s, 3), "bottom": bottom})]


# -- running -----------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| measure | value | goal | result | build |", "|---|---|---|---|---|"]
    for r in rows:
        res = "-" if r.ok is None else ("PASS" if r.ok else "MISS")
        build = "" if r.build_s is None else f"{r.build_s} s"
        lines.append(f"| {r.measure} | {r.value} {r.unit} | {r.goal} | {res} | {build} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute, not hours)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes that only prove every row runs "
                                                         "and prints (the CI test); implies --quick")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout; the table goes to stderr")
    ap.add_argument("--only", default="", help=f"comma-separated rows (of {', '.join(ROWS)})")
    ap.add_argument("--workdir", default="", help="where stores and mount points go (default: a new "
                                                  "directory under /var/tmp, removed at the end)")
    args = ap.parse_args()
    only = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = [r for r in only if r not in ROWS]
    if unknown:
        print(f"bench_scale: unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_scale: mounts FUSE filesystems: run it as root", file=sys.stderr)
        return 2
    own = not args.workdir
    workdir = args.workdir or tempfile.mkdtemp(prefix="cowfs-bench-scale-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    cfg = Config.make(args.quick, workdir, smoke=args.smoke)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        for name in only:
            benchlib.log(f"== {name}")
            try:
                rows += ROWS[name](cfg)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                benchlib.log(f"{name} failed: {errors[name]}")
            finally:
                umount_all()
    finally:
        umount_all()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    text = table(rows)
    out = sys.stderr if args.json else sys.stdout
    print(text, file=out)
    for name, err in errors.items():
        print(f"{name}: ERROR {err}", file=out)
    if args.json:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(json.dumps({"config": asdict(cfg), "commit": commit, "machine": benchlib.machine_info(),
                          "seconds": round(time.perf_counter() - t0, 1), "rows": [asdict(r) for r in rows],
                          "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
