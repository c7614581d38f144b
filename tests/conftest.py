"""Fixtures for tests that run against a real cowfs mount (see tests/mounting.py).

* ``cowfs_mount``: a fresh store mounted with ``cowfs mount --foreground`` (function scope);
  it has ``.path``, ``.store``, ``.remount()``, ``.log_text()``.
* ``mount_factory(options=(), store=None, ...)``: make more mounts (e.g. ``-o allow_other``).
* ``shared_tmp``: a world-traversable temporary directory (pytest's own tmp dirs are 0700 and
  unreachable for the unprivileged test user); mount points live there.
* Real storage engines (tests/engines.py): ``seaweedfs`` and ``etcd`` (one each for the
  session: tests keep to their own key prefix, ``engine_prefix``), ``seaweedfs_killable`` (one
  the tests that kill and restart it share) and ``etcd_private`` (a test's own, to kill and
  restart), ``etcd_cluster`` (three members);
  ``aws_env`` points boto3's usual environment variables at the session's SeaweedFS;
  ``ceph_rgw``, a Ceph RADOS Gateway for the session (the tests marked ``ceph``, run by
  scripts/test_ceph.sh; a skip when Ceph is not installed);
  ``fleet``: hosts (mounting.Host) with a remote on those engines.
* ``fs``: no mount: a fresh store's branch main as a cowfs.core.filesystem.Filesystem in
  the test's own process (unit tests that drive the daemon's commands and passes directly).

Every mount is unmounted at teardown, even when the test failed; the daemon log is attached to
failure reports.  A session-level safety net lazily unmounts any FUSE mount left below the
pytest temporary directories.

Under pytest-xdist (`-n 2`: the README's and CI's command) each test runs while holding its
run's machine lock (mounting.MachineTurns) shared; a test marked ``exclusive`` (it changes or measures
something machine-wide, e.g. drop_caches) holds it exclusive, so no other worker's test runs
meanwhile.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import engines  # noqa: E402
import mounting  # noqa: E402

UNPRIV_UID = int(os.environ.get("COWFS_TEST_UID", "65534"))
UNPRIV_GID = int(os.environ.get("COWFS_TEST_GID", "65534"))
_SHARED_PREFIX = "cowfs-tests-"
_SESSION_DIRS: list[str] = []   # roots whose leftover mounts the safety net may remove


def _test_timeout(item) -> float:
    m = item.get_closest_marker("timeout")
    if m is not None and m.args:
        return float(m.args[0])
    if m is not None and "timeout" in m.kwargs:
        return float(m.kwargs["timeout"])
    try:
        return float(item.config.getini("timeout") or 300)
    except (ValueError, TypeError):
        return 300.0


@pytest.fixture(scope="session")
def shared_tmp():
    d = Path(tempfile.mkdtemp(prefix=_SHARED_PREFIX, dir="/tmp"))
    os.chmod(d, 0o755)
    _SESSION_DIRS.append(str(d))
    yield d
    left = mounting.fuse_mounts_under(str(d))
    for e in left:
        mounting.lazy_unmount(e["mountpoint"])
    if not mounting.fuse_mounts_under(str(d)):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def test_dir(request, shared_tmp):
    """A world-traversable per-test directory (removed at teardown)."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    d = Path(tempfile.mkdtemp(prefix=name + "-", dir=shared_tmp))
    os.chmod(d, 0o755)
    yield d
    if not mounting.fuse_mounts_under(str(d)):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fs(tmp_path):
    """A fresh store's branch main, in this process (closed after the test)."""
    from cowfs.core.filesystem import Filesystem
    from cowfs.store import Store, init_store
    path = str(tmp_path / "store")
    init_store(path)
    store = Store(path, cache_l1=1 << 20, cache_l2=1 << 20)
    yield Filesystem(store, "main")
    store.close()


@pytest.fixture
def lazy(tmp_path, test_dir):
    """A lazyfs (tests/lazyfs.py) for a store that a power cut can hit (mounting.Lazy)."""
    lz = mounting.Lazy(tmp_path / "disk", test_dir / "lazy", tmp_path / "lazyfs.log")
    lz.start()
    yield lz
    lz.stop()
    assert not mounting.is_mounted(lz.mp)


@pytest.fixture
def mount_factory(request, tmp_path, test_dir):
    """``make(options=(), store=None, init=True, name=None, branch=None, start=True, env=None)``
    (env: extra environment of the daemon, e.g. COWFS_FAULTS)."""
    mounts: list[mounting.Mount] = []
    request.node._cowfs_mounts = mounts
    watchdog = max(10.0, _test_timeout(request.node) - 20.0)
    counter = iter(range(1, 1000))

    def make(options=(), store=None, init=True, name=None, branch=None, start=True,
             extra_args=(), env=None):
        i = next(counter)
        name = name or f"m{i}"
        if store is None:
            store = tmp_path / f"store-{name}"
            if init:
                mounting.init_store(store)
        mp = test_dir / f"mnt-{name}"
        m = mounting.Mount(store, mp, tmp_path / f"daemon-{name}.log", options=options,
                           branch=branch, extra_args=extra_args, env=env)
        mounts.append(m)
        if start:
            m.start()
        m.arm_watchdog(watchdog)
        return m

    yield make
    problems = []
    for m in mounts:
        for p in m.close():
            problems.append(f"[{m.path}] {p}\n{m.describe()}")
    if problems:
        pytest.fail("cowfs mount teardown problems:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def cowfs_mount(mount_factory):
    """A fresh cowfs store mounted at ``.path`` (``.store``, ``.remount()``, ``.log_text()``)."""
    return mount_factory()


@pytest.fixture
def forks(mount_factory, test_dir):
    """Fork mounts of the test's stores (mounting.Forks); torn down before the mounts of
    ``mount_factory``."""
    f = mounting.Forks(test_dir)
    yield f
    f.close()


@pytest.fixture
def unpriv_ids():
    return UNPRIV_UID, UNPRIV_GID


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS (S3 at ``.endpoint``, bucket ``.BUCKET``) shared by the session: never kill it."""
    sw = engines.SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        sw.start()
        yield sw
    finally:
        sw.stop()


@pytest.fixture(scope="session")
def _seaweedfs_killable_engine(tmp_path_factory):
    sw = engines.SeaweedFS(tmp_path_factory.mktemp("seaweedfs-killable"))
    try:
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def seaweedfs_killable(_seaweedfs_killable_engine, tmp_path, monkeypatch):
    """A SeaweedFS the test may kill (``.kill()``) and restart (``.start()``: same ports and
    data), shared by the tests that do (one start of 2.2-2.5 s instead of one each), started
    again here if an earlier test left it down; keep to your own key prefix
    (``engine_prefix``).  The AWS environment variables point at it."""
    sw = _seaweedfs_killable_engine
    if sw.process is None or not sw.process.alive():
        sw.start()
    set_aws_env(monkeypatch, sw, tmp_path)
    return sw


def set_aws_env(monkeypatch, sw: engines.SeaweedFS, scratch: Path) -> None:
    for name, value in sw.environment(scratch).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def aws_env(monkeypatch, tmp_path, seaweedfs):
    """boto3's usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL_S3 ...) pointing at the session's SeaweedFS; returns it."""
    set_aws_env(monkeypatch, seaweedfs, tmp_path)
    return seaweedfs


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory):
    """A one-host Ceph cluster's S3 gateway shared by the session (``.endpoint``, bucket
    ``.BUCKET``: the interface of ``seaweedfs``); a skip when Ceph is not installed."""
    missing = engines.CephRGW.missing()
    if missing:
        pytest.skip(f"Ceph not installed ({', '.join(missing)}): scripts/test_ceph.sh installs it")
    rgw = engines.CephRGW(tmp_path_factory.mktemp("ceph"))
    try:
        rgw.start()
        yield rgw
    finally:
        rgw.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """One etcd member shared by the session (``.endpoint``): never kill it."""
    e = engines.Etcd(tmp_path_factory.mktemp("etcd"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
def etcd_private(tmp_path):
    """An etcd member of the test's own, to kill (``.kill()``) and restart (``.restart()``)."""
    e = engines.Etcd(tmp_path / "etcd")
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
def etcd_cluster(tmp_path):
    """Three etcd members on loopback ports (``.endpoints``, ``.kill(i)``, ``.restart(i)``)."""
    c = engines.EtcdCluster(tmp_path / "etcd-cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def fleet(request, tmp_path, engine_prefix):
    """make(name, s3=None, etcd=None, refs=None) -> Host with the remote 'origin' configured (the
    session's SeaweedFS and etcd unless other engines, e.g. ``s3=ceph_rgw``, or etcd endpoints
    `refs`, are given)."""
    def make(name: str, s3=None, etcd=None, refs: str | None = None, remote: str = "origin") -> mounting.Host:
        s3 = s3 or request.getfixturevalue("seaweedfs")
        refs = refs or (etcd or request.getfixturevalue("etcd")).endpoint
        h = mounting.Host(name, tmp_path / f"host-{name}", s3.environment(tmp_path))
        h.cowfs("remote", "add", remote, f"s3://{s3.BUCKET}/{engine_prefix}", "--refs", refs)
        return h
    return make


@pytest.fixture
def engine_prefix(request) -> str:
    """A key prefix no other test uses (the session's engines are shared)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


_TURNS: list[mounting.MachineTurns] = []   # this worker's, made at its first test


def _machine_turns(config) -> mounting.MachineTurns | None:
    """The run's lock, None outside pytest-xdist's workers.  Its files live in the run's base
    temporary directory (a worker's own is <it>/gwN), which one run's workers share and no
    other pytest session does."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not config.option.basetemp:
        return None
    if not _TURNS:
        _TURNS.append(mounting.MachineTurns(Path(config.option.basetemp).parent))
    return _TURNS[0]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of a test run within its turn (tryfirst: outside
    pytest-timeout's, so waiting for the turn does not count against the test's timeout)."""
    turns = _machine_turns(item.config)
    if turns is None:
        yield
        return
    with turns.turn(exclusive=item.get_closest_marker("exclusive") is not None):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for m in getattr(item, "_cowfs_mounts", ()):
            text = m.log_text()
            lines = text.splitlines()
            if len(lines) > 200:
                text = "\n".join(["[... %d earlier lines ...]" % (len(lines) - 200)]
                                 + lines[-200:])
            rep.sections.append((f"cowfs daemon log {m.log_path}", text))


def pytest_sessionfinish(session, exitstatus):
    """Safety net: never leave a FUSE mount or an engine process behind."""
    msgs = mounting.cleanup_all_mounts()
    msgs += [f"stopped leftover engine {e}" for e in engines.stop_all()]
    # Only this session's directories: other pytest sessions may run concurrently.
    roots = [r.rstrip("/") + "/" for r in _SESSION_DIRS]
    try:
        roots.append(str(session.config._tmp_path_factory.getbasetemp()).rstrip("/") + "/")
    except Exception:
        pass
    for e in mounting.mount_entries():
        if not e["fstype"].startswith("fuse"):
            continue
        if any((e["mountpoint"] + "/").startswith(r) for r in roots):
            msgs.append(f"lazily unmounting leftover FUSE mount {e['mountpoint']}")
            mounting.lazy_unmount(e["mountpoint"])
    if msgs:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line("cowfs safety net: " + "; ".join(msgs), yellow=True)


def pytest_terminal_summary(terminalreporter):
    """How long the real engines took to start (seconds until they served)."""
    if engines.STARTUPS:
        terminalreporter.write_line("engine start-up: " + ", ".join(
            f"{name} {took:.1f} s" for name, took in engines.STARTUPS))
