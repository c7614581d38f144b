"""The kernel caches directory listings (cowfs.fuse.dircache: FOPEN_CACHE_DIR) and absent names
(negative entries), and never shows a stale one: not after changes through the mount, nor
after changes the daemon makes behind the kernel's back (a clone into a listed directory or
onto a name looked up before, a rollback), nor in `.cowfs/snapshots`; `-o dir_cache=0`
turns both off."""
from __future__ import annotations

import os

import mounting
from mounting import ok, stats


def readdirs(mp) -> int:
    return stats(mp)["requests"].get("readdir", 0)


def lookups(mp) -> int:
    return stats(mp)["requests"].get("lookup", 0)


def exists(path) -> bool:
    return mounting.call_with_timeout(os.path.lexists, path, timeout=20)


def names(path) -> list[str]:
    return mounting.call_with_timeout(lambda: sorted(os.listdir(path)), timeout=20)


def test_listings_are_cached_and_never_stale(cowfs_mount):
    mp = cowfs_mount.path
    d = mp / "d"
    d.mkdir()
    (d / "sub").mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"x")
        (d / "sub" / f"g{i}").write_bytes(b"y")
    assert stats(mp)["kernel_dir_cache"] is True
    want = sorted([f"f{i}" for i in range(40)] + ["sub"])
    assert names(d) == want
    before = readdirs(mp)
    for _ in range(3):
        assert names(d) == want
    assert readdirs(mp) == before, "a listing that did not change was read from the daemon again"

    # Changes through the mount: the kernel drops its own cache.
    (d / "new").write_bytes(b"n")
    os.unlink(d / "f0")
    os.rename(d / "f1", d / "sub" / "f1")
    want = sorted(set(want) - {"f0", "f1"} | {"new"})
    assert names(d) == want
    assert "f1" in names(d / "sub")

    # Behind the kernel's back: a snapshot shows up in .cowfs/snapshots ...
    assert "s1" not in names(mp / ".cowfs" / "snapshots")
    ok(mp, b"snapshot s1\n")
    assert "s1" in names(mp / ".cowfs" / "snapshots")
    assert names(mp / ".cowfs" / "snapshots" / "s1" / "d") == want
    # ... a clone into a listed directory shows up in it ...
    ok(mp, b"clone d/f2 d/cloned\n")
    assert "cloned" in names(d)
    # ... and a rollback shows the snapshot's listings, at the root and below it.
    names(mp)
    (mp / "later").mkdir()
    os.unlink(d / "f3")
    assert "later" in names(mp) and "f3" not in names(d)
    ok(mp, b"rollback s1\n")
    assert "later" not in names(mp)
    assert names(mp / "d") == want
    assert "f1" in names(mp / "d" / "sub")


def test_absent_names_are_cached_and_never_stale(cowfs_mount):
    mp = cowfs_mount.path
    (mp / "d").mkdir()
    (mp / "d" / "src").write_bytes(b"source")
    assert not exists(mp / "d" / "absent")
    before = lookups(mp)
    for _ in range(3):
        assert not exists(mp / "d" / "absent")
    assert lookups(mp) == before, "an absent name was looked up in the daemon again"

    # Created through the mount: the kernel replaces its own negative entry.
    (mp / "d" / "absent").write_bytes(b"now here")
    assert (mp / "d" / "absent").read_bytes() == b"now here"

    # Created behind the kernel's back: a clone onto a name looked up as absent ...
    assert not exists(mp / "d" / "copy")
    ok(mp, b"clone d/src d/copy\n")
    assert mounting.call_with_timeout((mp / "d" / "copy").read_bytes, timeout=20) == b"source"

    # ... and a rollback that brings back names looked up as absent, at the root and below.
    ok(mp, b"snapshot with\n")
    os.rename(mp / "d", mp / "gone")
    (mp / "gone" / "src").unlink()
    assert not exists(mp / "d") and not exists(mp / "gone" / "src")
    ok(mp, b"snapshot without\n")
    ok(mp, b"rollback with\n")
    assert exists(mp / "d") and not exists(mp / "gone")
    assert (mp / "d" / "src").read_bytes() == b"source"
    ok(mp, b"rollback without\n")
    assert not exists(mp / "d") and exists(mp / "gone") and not exists(mp / "gone" / "src")
    ok(mp, b"rollback with\n")
    assert exists(mp / "d" / "src") and not exists(mp / "gone")


def test_dir_cache_off(mount_factory):
    m = mount_factory(options=("dir_cache=0",))
    mp = m.path
    (mp / "d").mkdir()
    (mp / "d" / "f").write_bytes(b"x")
    assert stats(mp)["kernel_dir_cache"] is False
    names(mp / "d")
    assert not exists(mp / "d" / "absent")
    r, lk = readdirs(mp), lookups(mp)
    names(mp / "d")
    assert not exists(mp / "d" / "absent")
    assert readdirs(mp) > r and lookups(mp) > lk


def test_listings_come_without_opendir_and_stay_stable(cowfs_mount):
    """OPENDIR is declined (cowfs.fuse.ops): the kernel sends no OPENDIR nor RELEASEDIR, every
    READDIR names its directory by inode, and a listing of many pages keeps its offsets while
    entries come and go (each name present throughout is listed exactly once); a directory
    removed while open lists nothing; the warming's and snapshots' listings stay right
    (test_warming, test_listings_are_cached_and_never_stale)."""
    mp = cowfs_mount.path
    d = mp / "big"
    d.mkdir()
    want = [f"{'n' * 120}{i:04d}" for i in range(1200)]  # ~200 KiB of READDIRPLUS: many pages
    for n in want:
        os.mknod(d / n)
    st = stats(mp)
    assert st["fuse_ext"]["readdir_by_inode"] is True
    before = st["requests"]
    assert names(d) == sorted(want)
    after = stats(mp)["requests"]
    assert after.get("opendir", 0) <= 1, (before, after)  # the mount's first, declined once for all
    assert "releasedir" not in after, after
    assert after["readdir"] - before.get("readdir", 0) >= 4, (before, after)  # several pages, by inode

    # A listing read part way while names are removed and added: the kernel's cache of it
    # is dropped by the changes, and the next READDIR continues the daemon's listing at its
    # offset.
    def partial() -> tuple[list[str], set[str]]:
        seen: list[str] = []
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                if len(seen) == 100:
                    unseen = [n for n in want if n not in set(seen)]
                    gone = set(unseen[::7])
                    for n in gone:
                        os.unlink(d / n)
                    for i in range(50):
                        os.mknod(d / f"added{i}")
            return seen, gone

    seen, gone = mounting.call_with_timeout(partial, timeout=60)
    kept = set(want) - gone
    assert len(seen) == len(set(seen)), "a name was listed twice"
    assert kept <= set(seen), f"{len(kept - set(seen))} names present throughout were not listed"
    assert set(seen) <= set(want) | {f"added{i}" for i in range(50)}
    assert names(d) == sorted(kept | {f"added{i}" for i in range(50)})

    assert stats(mp)["requests"].get("opendir", 0) <= 1 and "releasedir" not in stats(mp)["requests"]

    # A directory removed while a listing of it is open lists nothing more.
    e = mp / "empty"
    e.mkdir()
    fd = os.open(e, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(e)
        assert mounting.call_with_timeout(lambda: os.listdir(fd), timeout=20) == []
    finally:
        os.close(fd)
