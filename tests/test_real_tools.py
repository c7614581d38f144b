"""Real tools on a real cowfs mount: tar, git, venv + compileall, SQLite WAL with concurrent writers.

Each test gets a fresh mount. The mount comes from the shared `cowfs_mount` fixture (tests/conftest.py,
an object with .path, .store and .remount()) when it exists; otherwise from the small private fixture
below, which mounts with `cowfs mount` and always unmounts in teardown (`cowfs umount`, then
`fusermount3 -u`, then `-uz`).

The Django sdist is downloaded once with pip into /var/tmp/cowfs-test-cache ($COWFS_BENCH_CACHE; by
scripts/benchlib.py, under the cache's lock; tests that need it are skipped, with the reason, only if
that download fails).

Debug aid: COWFS_RT_BACKEND=passthrough runs the same tests on scripts/passthroughfs.py instead of
cowfs (to tell a broken test from a broken filesystem).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import benchlib  # noqa: E402

CACHE = Path(benchlib.DJANGO_CACHE)
DJANGO_VERSION = benchlib.DJANGO.split("==")[1]
_COWFS_BIN = Path(sys.executable).parent / "cowfs"
COWFS = [str(_COWFS_BIN)] if _COWFS_BIN.exists() else [
    sys.executable, "-c", "import sys; from cowfs.cli import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------------
# helpers

def is_mounted(path) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == path for line in f)


def sh(cmd, cwd=None, timeout=180, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, timeout=timeout, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} (cwd={cwd}) -> rc {p.returncode}\nstdout:\n{p.stdout[-3000:]}\n"
                             f"stderr:\n{p.stderr[-3000:]}")
    return p


def fstype(path) -> str | None:
    path = os.path.abspath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[1].replace("\\040", " ") == path:
                found = parts[2]
    return found


def force_unmount(path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], timeout=60, capture_output=True)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], timeout=60, capture_output=True)


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class _PrivateCowfsMount:
    """Used only while tests/conftest.py has no `cowfs_mount` fixture."""

    def __init__(self, base: Path):
        self.store = base / "store"
        self.path = base / "mnt"
        self.path.mkdir()
        sh(COWFS + ["init", str(self.store)], timeout=120)
        self._mount()

    def _mount(self):
        sh(COWFS + ["mount", str(self.store), str(self.path)], timeout=120)
        wait_until(lambda: is_mounted(self.path), 30, "cowfs mount")

    def remount(self):
        sh(COWFS + ["umount", str(self.path)], timeout=300)
        assert not is_mounted(self.path)
        self._mount()

    def close(self):
        try:
            if is_mounted(self.path):
                subprocess.run(COWFS + ["umount", str(self.path)], timeout=300, capture_output=True)
        except subprocess.TimeoutExpired:
            pass
        finally:
            force_unmount(self.path)


class _PassthroughMount:
    """COWFS_RT_BACKEND=passthrough: the same tests on the bare passthrough filesystem."""

    def __init__(self, base: Path):
        self.store = base / "src"
        self.path = base / "mnt"
        self.store.mkdir()
        self.path.mkdir()
        self.proc = None
        self._mount()

    def _mount(self):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "passthroughfs.py"),
                                      str(self.store), str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: is_mounted(self.path) or self.proc.poll() is not None, 30, "passthrough mount")
        assert is_mounted(self.path)

    def remount(self):
        sh(["fusermount3", "-u", str(self.path)], timeout=60)
        self.proc.wait(timeout=60)
        self._mount()

    def close(self):
        force_unmount(self.path)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _cowfs_cli_missing() -> str | None:
    try:
        import cowfs.cli  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"cowfs CLI not importable yet: {type(e).__name__}: {e}"
    return None


@pytest.fixture
def mnt(request, tmp_path):
    """A fresh mount: .path, .store, .remount()."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    if os.environ.get("COWFS_RT_BACKEND") == "passthrough":
        m = _PassthroughMount(tmp_path)
        try:
            yield m
        finally:
            m.close()
        return
    try:
        shared = request.getfixturevalue("cowfs_mount")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        assert (fstype(shared.path) or "").startswith("fuse"), f"{shared.path} is not a FUSE mount"
        yield shared
        return
    why = _cowfs_cli_missing()
    if why:
        pytest.skip(why)
    m = None
    try:
        m = _PrivateCowfsMount(tmp_path)
        yield m
    finally:
        if m is not None:
            m.close()
        else:
            force_unmount(tmp_path / "mnt")


@pytest.fixture(scope="session")
def django_sdist() -> Path:
    """The sdist in CACHE (scripts/benchlib.py downloads it there once, under the cache's lock:
    the suite's pytest-xdist workers and benchmarks share it)."""
    try:
        return Path(benchlib.django_sdist(str(CACHE)))
    except subprocess.TimeoutExpired:
        pytest.skip("pip download of the Django sdist timed out after 600 s")
    except RuntimeError as e:
        pytest.skip(f"pip download of the Django sdist failed: {str(e)[-500:]}")


def untar(tgz: Path, dest: Path, only: str | None = None) -> Path:
    """The sdist unpacked under dest (only: one top-level directory of it, e.g. "django", the
    package's 6,104 of the 10,042 entries, for the tests whose workload needs no more)."""
    dest.mkdir(parents=True, exist_ok=True)
    members = [f"Django-{DJANGO_VERSION}/{only}"] if only else []
    sh(["tar", "xzf", str(tgz), "-C", str(dest), *members], timeout=300)
    return dest / f"Django-{DJANGO_VERSION}"


def tree_manifest(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, permission bits, uid, gid, size, mtime s, sha256 or link target)"""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, st.st_uid, st.st_gid, None, None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None, int(st.st_mtime),
                            None)
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                            int(st.st_mtime), h.hexdigest())
    return out


def git_env(home: Path) -> dict:
    # safe.directory: tar (as root) keeps the archive's owner, which git would call dubious.
    # gc.auto=0: no detached `git gc --auto` still writing when the mount is torn down.
    return dict(os.environ, HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_COUNT="3",
                GIT_CONFIG_KEY_0="safe.directory", GIT_CONFIG_VALUE_0="*",
                GIT_CONFIG_KEY_1="gc.auto", GIT_CONFIG_VALUE_1="0",
                GIT_CONFIG_KEY_2="maintenance.auto", GIT_CONFIG_VALUE_2="false", GIT_AUTHOR_NAME="t",
                GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@example.invalid")


def diff_manifests(a: dict, b: dict) -> list[str]:
    problems = []
    for k in sorted(set(a) | set(b)):
        if k not in b:
            problems.append(f"missing on mount: {k}")
        elif k not in a:
            problems.append(f"extra on mount: {k}")
        elif a[k] != b[k]:
            problems.append(f"differs: {k}: plain {a[k]} vs mount {b[k]}")
    return problems


# ---------------------------------------------------------------------------------------------
# tests

def test_untar_django_matches_plain_dir(mnt, django_sdist, tmp_path):
    ref = untar(django_sdist, tmp_path / "ref")
    got = untar(django_sdist, Path(mnt.path) / "u")
    a, b = tree_manifest(ref), tree_manifest(got)
    assert len(a) > 9000
    problems = diff_manifests(a, b)
    assert not problems, f"{len(problems)} differences, first ones:\n" + "\n".join(problems[:20])
    # a .cowfs control directory must not show up in listings
    assert ".cowfs" not in os.listdir(mnt.path)


def test_git_init_add_commit_status_diff(mnt, django_sdist, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = git_env(home)
    tree = untar(django_sdist, Path(mnt.path) / "g", only="django")  # the whole sdist: 40% more, no more kinds
    sh(["git", "init", "-q"], cwd=tree, env=env)
    sh(["git", "add", "-A"], cwd=tree, env=env, timeout=300)
    sh(["git", "commit", "-q", "-m", "import"], cwd=tree, env=env, timeout=300)
    st = sh(["git", "status", "--porcelain"], cwd=tree, env=env)
    assert st.stdout == "", f"status not clean right after commit:\n{st.stdout[:2000]}"
    n = sh(["git", "ls-files"], cwd=tree, env=env).stdout.count("\n")
    assert n > 3500
    fsck = sh(["git", "fsck", "--no-dangling"], cwd=tree, env=env, timeout=300, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    target = tree / "django" / "__init__.py"
    with open(target, "a") as f:
        f.write("# cowfs-edit-marker\n")
    st = sh(["git", "status", "--porcelain"], cwd=tree, env=env)
    assert st.stdout.strip() == "M django/__init__.py", st.stdout
    diff = sh(["git", "diff"], cwd=tree, env=env).stdout
    assert "+# cowfs-edit-marker" in diff, diff[:2000]
    sh(["git", "commit", "-q", "-am", "edit"], cwd=tree, env=env)
    assert sh(["git", "status", "--porcelain"], cwd=tree, env=env).stdout == ""
    log = sh(["git", "log", "--oneline"], cwd=tree, env=env).stdout.splitlines()
    assert len(log) == 2


def test_venv_and_compileall(mnt, django_sdist):
    root = Path(mnt.path)
    venv = root / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py = venv / "bin" / "python"
    out = sh([str(py), "-c", "import sys; print(sys.prefix)"]).stdout.strip()
    assert out == str(venv)
    pipv = sh([str(py), "-m", "pip", "--version"], timeout=120)
    assert str(venv) in pipv.stdout

    tree = untar(django_sdist, root / "c", only="django")  # what compileall and the imports read
    sh([str(py), "-m", "compileall", "-q", "django"], cwd=tree, timeout=300)
    pycs = list((tree / "django").rglob("*.pyc"))
    assert len(pycs) > 800
    # every .pyc must match its source as the mount reports it now (mtime and size in the header),
    # else Python would silently recompile: a check that the mount keeps mtimes and sizes stable
    stale = []
    for pyc in pycs:
        src = pyc.parent.parent / (pyc.name.split(".")[0] + ".py")
        with open(pyc, "rb") as f:
            head = f.read(16)
        st = os.stat(src)
        if (int.from_bytes(head[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(head[12:16], "little") != st.st_size & 0xFFFFFFFF):
            stale.append(str(src))
    assert not stale, f"{len(stale)} .pyc files do not match their source: {stale[:5]}"
    # import from the mount (modules that need no third-party packages), without writing bytecode
    code = ("import sys; sys.dont_write_bytecode = True; import django, django.utils.functional, "
            "django.utils.datastructures, django.utils.tree, django.utils.http; "
            "print(django.get_version(), django.utils.http.__cached__)")
    out = sh([str(py), "-c", code], cwd=tree).stdout.split()
    assert out[0] == DJANGO_VERSION
    assert out[1].endswith(".pyc") and os.path.exists(out[1])


SQLITE_WRITER = r"""
import sqlite3, sys, time, os
db, seconds, wid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA busy_timeout=60000")
deadline = time.monotonic() + seconds
n = 0
while time.monotonic() < deadline:
    con.execute("BEGIN IMMEDIATE")
    for _ in range(10):
        con.execute("INSERT INTO t(writer, seq, payload) VALUES (?, ?, ?)", (wid, n, os.urandom(64)))
        n += 1
    con.execute("COMMIT")
con.close()
print(n)
"""


def _check_db(db: Path, expected: dict[int, int]) -> None:
    import sqlite3
    con = sqlite3.connect(db, timeout=60)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        total = con.execute("SELECT count(*) FROM t").fetchone()[0]
        assert total == sum(expected.values())
        per = dict(con.execute("SELECT writer, count(*) FROM t GROUP BY writer").fetchall())
        assert per == expected
        for w, n in expected.items():  # every writer's rows are exactly seq 0..n-1
            row = con.execute("SELECT min(seq), max(seq), count(DISTINCT seq) FROM t WHERE writer=?",
                              (w,)).fetchone()
            assert row == (0, n - 1, n), (w, row)
    finally:
        con.close()


def test_sqlite_wal_concurrent_writers(mnt):
    import sqlite3
    db = Path(mnt.path) / "data" / "test.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, writer INT, seq INT, payload BLOB)")
    con.commit()
    con.close()

    procs = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), "4", str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    expected = {}
    try:
        for w, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"writer {w} failed: {err[-2000:]}"
            expected[w] = int(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(n > 0 for n in expected.values()), expected
    _check_db(db, expected)

    mnt.remount()
    _check_db(db, expected)
