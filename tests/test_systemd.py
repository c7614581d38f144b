"""systemd/cowfs@.service: the unit verifies, keeps FUSE mounts visible, and its commands work
as systemd runs them - readiness (READY=1 only once the mount is usable, sent by the main
process), watchdog pings, STOPPING=1 and a clean exit on ExecStop and on SIGTERM, and a
restart after a crash.

This machine has no systemd as PID 1, so the service is run the way systemd would run it:
the test expands the unit's specifiers, Environment=/EnvironmentFile= and ${VAR}/$VAR words
by systemd's rules, applies the hardening that can be reproduced outside systemd
(NoNewPrivileges= and CapabilityBoundingSet= through setpriv(1), MemoryDenyWriteExecute=
through prctl(PR_SET_MDWE), UMask=, LimitNOFILE=, OOMScoreAdjust=), and plays the service
manager's side of the notify protocol on a datagram socket it owns (with SO_PASSCRED, so the
sender's pid is known, as NotifyAccess=main requires).
"""
from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import mounting

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "cowfs@.service"
INSTALLED_COWFS = "/usr/local/bin/cowfs"
SETUP_HINT = "run `bash scripts/setup.sh --system` (it installs systemd's tools and links /usr/local/bin/cowfs)"

# Settings that put the service in its own mount namespace, from which mounts do not
# propagate to the host (systemd.exec(5), PrivateMounts=; exec_needs_mount_namespace()):
# the FUSE mount would be invisible outside the service.
NAMESPACING = {
    "PrivateMounts", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateIPC", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths", "BindReadOnlyPaths",
    "TemporaryFileSystem", "RootDirectory", "RootImage", "MountImages", "ExtensionImages",
    "ExtensionDirectories", "LogNamespace", "MountFlags", "DynamicUser", "NetworkNamespacePath",
    "IPCNamespacePath",
}


# -- reading the unit as systemd does -----------------------------------------------------------
def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def settings(unit: dict[str, list[tuple[str, str]]], section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in unit[section]:
        out.setdefault(k, []).append(v)
    return out


def specifiers(text: str, instance: str) -> str:
    table = {"i": instance, "I": instance, "n": f"cowfs@{instance}.service", "p": "cowfs", "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def environment(svc: dict[str, list[str]], instance: str, conf_dir: Path) -> dict[str, str]:
    """Environment= assignments, then EnvironmentFile= files (which override them)."""
    env: dict[str, str] = {}
    for line in svc.get("Environment", []):
        for word in shlex.split(line):
            k, _, v = word.partition("=")
            env[k] = v
    for path in svc.get("EnvironmentFile", []):
        optional = path.startswith("-")
        path = specifiers(path.lstrip("-"), instance)
        assert path.startswith("/etc/cowfs/"), path
        local = conf_dir / path[len("/etc/cowfs/"):]
        if not local.exists() and optional:
            continue
        for line in local.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            k, _, v = line.partition("=")
            words = shlex.split(v) if v.strip() else [""]
            env[k.strip()] = " ".join(words)
    return env


def command(line: str, env: dict[str, str], instance: str) -> tuple[list[str], bool]:
    """(argv, failure ignored) of an Exec*= line: prefixes, specifiers, then $VAR / ${VAR}."""
    line = specifiers(line, instance)
    ignore = False
    while line and line[0] in "-@:+!":
        ignore |= line[0] == "-"
        line = line[1:]
    argv: list[str] = []
    for word in shlex.split(line):
        if word.startswith("$") and not word.startswith(("${", "$$")):
            argv += env.get(word[1:], "").split()          # $VAR alone: split into words
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))  # one word
    return argv, ignore


def capabilities(svc: dict[str, list[str]]) -> list[str]:
    caps: list[str] = []
    for line in svc.get("CapabilityBoundingSet", []):
        caps += line.split()
    return caps


# -- the service manager's side of sd_notify ----------------------------------------------------
class NotifySocket:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[float, int, dict[str, str]]] = []   # (time, sender pid, fields)

    def receive(self, timeout: float) -> tuple[float, int, dict[str, str]] | None:
        self.sock.settimeout(timeout)
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, socket.timeout):
            return None
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        msg = (time.monotonic(), pid, fields)
        self.messages.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float, on_each=None) -> tuple[float, int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.receive(min(0.05, max(0.001, deadline - time.monotonic())))
            if on_each is not None:
                on_each(msg)
            if msg is not None and key in msg[2]:
                return msg
        raise AssertionError(f"no {key} notification within {timeout} s; got {[m[2] for m in self.messages]}")

    def close(self) -> None:
        self.sock.close()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _fuse_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) and " fuse.cowfs " in line for line in f)


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


_MDWE_EXEC = ("import ctypes, os, sys\n"
              "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
              "    sys.exit('PR_SET_MDWE failed: %d' % ctypes.get_errno())\n"
              "os.execv(sys.argv[1], sys.argv[1:])\n")
_CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_SYS_ADMIN": 21}


class Service:
    """cowfs@INSTANCE run as systemd would run it (see the module docstring)."""

    def __init__(self, instance: str, conf_dir: Path, notify: NotifySocket, watchdog_usec: int,
                 cowfs: list[str] | None = None) -> None:
        """cowfs: the CLI that replaces the unit's /usr/local/bin/cowfs (this checkout's, so a
        change to it is what runs), else the unit's own."""
        self.instance = instance
        self.cowfs = cowfs
        unit = parse_unit(UNIT.read_text())
        self.svc = settings(unit, "Service")
        self.env = environment(self.svc, instance, conf_dir)
        self.notify = notify
        self.watchdog_usec = watchdog_usec
        self.proc: subprocess.Popen | None = None
        self.stderr_path = conf_dir / f"{instance}.journal"

    def _base_env(self) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "INVOCATION_ID": "0" * 32, "NOTIFY_SOCKET": self.notify.path}
        env.update(self.env)
        return env

    def _preexec(self) -> None:
        umask = self.svc.get("UMask", ["0022"])[-1]
        os.umask(int(umask, 8))
        # Best effort: a container may lack CAP_SYS_RESOURCE (systemd has it).
        n = int(self.svc.get("LimitNOFILE", ["1024"])[-1])
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            n = min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        adj = self.svc.get("OOMScoreAdjust")
        if adj:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(adj[-1])
            except OSError:
                pass
        os.setsid()

    def hardening_prefix(self) -> list[str]:
        prefix: list[str] = []
        setpriv: list[str] = []
        if self.svc.get("NoNewPrivileges", ["no"])[-1] == "yes":
            setpriv.append("--no-new-privs")
        caps = capabilities(self.svc)
        if caps:
            setpriv += ["--inh-caps=-all",
                        "--bounding-set=-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)]
        if setpriv:
            prefix += [shutil.which("setpriv") or "setpriv"] + setpriv + ["--"]
        if self.svc.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
            prefix += [sys.executable, "-c", _MDWE_EXEC]
        return prefix

    def argv(self, line: str) -> tuple[list[str], bool]:
        argv, ignore = command(line, self.env, self.instance)
        if self.cowfs is not None and argv[0] == INSTALLED_COWFS:
            argv = self.cowfs + argv[1:]
        return argv, ignore

    def run_control(self, key: str, extra_env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
        results = []
        for line in self.svc.get(key, []):
            argv, ignore = self.argv(line)
            env = dict(self._base_env(), **(extra_env or {}))
            r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=120, preexec_fn=self._preexec)
            assert r.returncode == 0 or ignore, f"{key}={line} -> {argv} failed ({r.returncode}): {r.stderr}"
            results.append(r)
        return results

    def start_main(self) -> subprocess.Popen:
        (line,) = self.svc["ExecStart"]
        argv, _ = self.argv(line)
        env = self._base_env()
        env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        # WATCHDOG_PID is the main pid: the exec chain keeps the pid of this shell.
        wrapped = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"] + self.hardening_prefix() + argv
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(wrapped, env=env, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT, preexec_fn=self._preexec)
        return self.proc

    def journal(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self, mountpoint: Path) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if _mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


@pytest.fixture
def service_env():
    if shutil.which("systemd-analyze") is None:
        pytest.fail(f"systemd-analyze is missing: {SETUP_HINT}")
    if not os.access(INSTALLED_COWFS, os.X_OK):
        pytest.fail(f"{INSTALLED_COWFS} is missing: {SETUP_HINT}")
    root = Path(tempfile.mkdtemp(prefix="cowfs-unit-", dir="/tmp"))
    conf_dir = root / "etc"
    conf_dir.mkdir()
    store, mnt = root / "store", root / "srv" / "sandbox"   # the mount point does not exist yet
    subprocess.run([INSTALLED_COWFS, "init", str(store)], check=True, capture_output=True)
    notify = NotifySocket(str(root / "notify.sock"))
    services: list[Service] = []
    yield root, conf_dir, store, mnt, notify, services
    for svc in services:
        svc.cleanup(Path(svc.env["COWFS_MOUNT"]))
    notify.close()
    if not _mounted(mnt):
        shutil.rmtree(root, ignore_errors=True)


# -- the unit file itself -------------------------------------------------------------------------
def test_unit_verifies_with_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail(f"systemd-analyze is missing: {SETUP_HINT}")
    if not os.access(INSTALLED_COWFS, os.X_OK):
        pytest.fail(f"{INSTALLED_COWFS} is missing (the unit runs it): {SETUP_HINT}")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    # An instance of the template, as `systemctl enable --now cowfs@agent1` would load it.
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "cowfs@agent1.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    # The security report must parse the unit too (offline: no bus needed).
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        str(tmp_path / "cowfs@agent1.service")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Overall exposure level" in r.stdout


def test_unit_settings_keep_fuse_working():
    unit = parse_unit(UNIT.read_text())
    svc = settings(unit, "Service")
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["EnvironmentFile"] == ["/etc/cowfs/%i.conf"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["WatchdogSec"] == ["30"]
    (start,) = svc["ExecStart"]
    assert start.startswith(INSTALLED_COWFS + " mount --foreground ")
    # "-": mkdir fails on the dead mount a crash leaves; ExecStart clears it (see the restart test)
    assert "-/bin/mkdir -p ${COWFS_MOUNT}" in svc["ExecStartPre"]
    assert svc["ExecStop"][0].startswith("-" + INSTALLED_COWFS + " umount ")   # "-": see the unit
    # No mount namespace: the FUSE mount must appear on the host.
    bad = sorted(k for k in svc if k in NAMESPACING)
    assert not bad, f"these settings give the service a private mount namespace, hiding the mount: {bad}"
    # /dev/fuse stays reachable, and mounting stays allowed.
    if svc.get("DevicePolicy", ["auto"])[-1] != "auto" or "DeviceAllow" in svc or "ProtectClock" in svc:
        assert any(line.split()[0] == "/dev/fuse" and "rw" in line for line in svc.get("DeviceAllow", [])), \
            "a device policy without /dev/fuse breaks mounting"
    assert "CAP_SYS_ADMIN" in capabilities(svc)
    for line in svc.get("SystemCallFilter", []):
        assert not line.startswith("~") or "@mount" not in line, "umount2/mount must stay allowed"
    assert int(settings(unit, "Service")["TimeoutStopSec"][0]) > 80   # > ExecStop's own timeout
    assert settings(unit, "Install")["WantedBy"] == ["multi-user.target"]


# -- the service's life cycle ---------------------------------------------------------------------
def _write_conf(conf_dir: Path, instance: str, store: Path, mnt: Path, options: str = "",
                branch: str | None = None) -> None:
    (conf_dir / f"{instance}.conf").write_text(
        f"# cowfs@{instance}\nCOWFS_STORE={store}\nCOWFS_MOUNT={mnt}\n"
        + (f"COWFS_OPTIONS={options}\n" if options else "") + (f"COWFS_BRANCH={branch}\n" if branch else ""))


def _start(service: Service, notify: NotifySocket, mnt: Path) -> subprocess.Popen:
    service.run_control("ExecStartPre")
    assert _mounted(mnt) or mnt.is_dir(), "ExecStartPre did not create the mount point"
    proc = service.start_main()
    seen_unmounted_ready = []

    def check(msg):
        if msg is not None and msg[2].get("READY") == "1" and not _fuse_mounted(mnt):
            seen_unmounted_ready.append(msg)
    t, pid, fields = notify.wait_for("READY", timeout=30, on_each=check)
    assert not seen_unmounted_ready, "READY=1 before the kernel mount existed"
    # Usable right now: the mount answers, and so does its control file.
    assert _fuse_mounted(mnt)
    assert os.stat(mnt).st_ino == 1
    reply = subprocess.run([INSTALLED_COWFS, "list", str(mnt), "--json"], capture_output=True, text=True, timeout=30)
    assert reply.returncode == 0, reply.stderr
    # NotifyAccess=main: the message comes from the main process, and says so.
    assert pid == proc.pid, f"READY=1 sent by pid {pid}, main pid is {proc.pid}"
    assert fields.get("MAINPID") == str(proc.pid)
    return proc


def test_service_lifecycle_ready_watchdog_stop(service_env):
    root, conf_dir, store, mnt, notify, services = service_env
    _write_conf(conf_dir, "agent1", store, mnt, options="quota_inodes=1000")
    service = Service("agent1", conf_dir, notify, watchdog_usec=200_000)   # pings every 0.1 s
    services.append(service)
    proc = _start(service, notify, mnt)

    st = _status(proc.pid)
    assert st["NoNewPrivs"] == "1"
    want = sum(1 << _CAP_BITS[c] for c in capabilities(service.svc))
    assert int(st["CapEff"], 16) == want, f"CapEff {st['CapEff']}, expected {want:x}"
    assert (mnt / ".cowfs" / "stats").read_text().count('"quota_inodes": 1000') == 1  # COWFS_OPTIONS applied

    # Watchdog: WATCHDOG=1 every WATCHDOG_USEC/2, from the main process.
    n0 = len(notify.messages)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        notify.receive(0.05)
    pings = [m for m in notify.messages[n0:] if m[2].get("WATCHDOG") == "1"]
    assert len(pings) >= 6, f"only {len(pings)} watchdog pings in 1.2 s"
    assert {m[1] for m in pings} == {proc.pid}
    gaps = [b[0] - a[0] for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.5, gaps

    (mnt / "work.txt").write_text("kept across restarts\n")
    # ExecStop: flush, unmount, wait; the daemon says STOPPING=1 and exits 0 (no restart).
    service.run_control("ExecStop", {"MAINPID": str(proc.pid)})
    assert proc.wait(timeout=10) == 0
    assert any(m[2].get("STOPPING") == "1" for m in notify.messages) or notify.wait_for("STOPPING", 2)
    assert not _mounted(mnt)
    # Logs go to stderr, i.e. to the journal under systemd.
    assert "serving " in service.journal() and "daemon exiting" in service.journal()

    # Start again: the data is there.  Unmounted by hand this time: the daemon exits 0 (no
    # restart), and systemd's ExecStop, which runs anyway, must not fail the unit.
    proc = _start(service, notify, mnt)
    assert (mnt / "work.txt").read_text() == "kept across restarts\n"
    subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=10) == 0
    (r,) = service.run_control("ExecStop")
    assert r.returncode != 0 and "not a cowfs mount" in r.stderr   # ignored thanks to "-"


def test_service_restart_after_crash_and_sigterm(service_env):
    root, conf_dir, store, mnt, notify, services = service_env
    _write_conf(conf_dir, "agent2", store, mnt)
    service = Service("agent2", conf_dir, notify, watchdog_usec=1_000_000)
    services.append(service)
    proc = _start(service, notify, mnt)
    fd = os.open(mnt / "durable", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"fsynced before the crash")
    os.fsync(fd)
    os.close(fd)

    # A crash (or the watchdog's SIGABRT): no STOPPING=1, a failed exit, a dead mount left.
    n0 = len(notify.messages)
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL       # Restart=on-failure restarts it
    assert not any("STOPPING" in m[2] for m in notify.messages[n0:])
    assert _mounted(mnt)                                   # ENOTCONN until cleared

    # The restart: ExecStartPre copes with the dead mount, ExecStart clears it and mounts.
    proc = _start(service, notify, mnt)
    assert (mnt / "durable").read_bytes() == b"fsynced before the crash"

    # systemd's stop when ExecStop did not end the process: SIGTERM to the main process.
    n0 = len(notify.messages)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 2
    while not any(m[2].get("STOPPING") == "1" for m in notify.messages[n0:]) and time.monotonic() < deadline:
        notify.receive(0.05)
    assert any(m[2].get("STOPPING") == "1" for m in notify.messages[n0:])
    assert not _mounted(mnt)


# -- one instance per branch of one store ----------------------------------------------------------
def _restarts(service: Service, returncode: int) -> bool:
    """Whether systemd restarts the service after its main process ended so (Restart=, as
    systemd.service(5) defines on-failure: an exit status not 0, or an unclean signal)."""
    (restart,) = service.svc["Restart"]
    clean_signals = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
    failed = returncode > 0 or (returncode < 0 and -returncode not in clean_signals)
    return restart == "always" or (restart == "on-failure" and failed)


def test_unit_verifies_for_a_branch_instance(tmp_path):
    """An instance named STORE:BRANCH (`cowfs@agent1:feat`: ':' is allowed in unit names,
    systemd-escape leaves it as it is) loads as any other."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail(f"systemd-analyze is missing: {SETUP_HINT}")
    if not os.access(INSTALLED_COWFS, os.X_OK):
        pytest.fail(f"{INSTALLED_COWFS} is missing (the unit runs it): {SETUP_HINT}")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    # FILE:NAME, since a ':' on the command line separates a unit file from the name it is loaded as
    r = subprocess.run(["systemd-analyze", "verify", f"{tmp_path / UNIT.name}:cowfs@agent1:feat.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    r = subprocess.run(["systemd-escape", "agent1:feat"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "agent1:feat", r


def test_one_instance_per_branch_each_restarted_alone(service_env):
    """cowfs@s1:main serves the store's main branch, cowfs@s1:feat the branch feat made with
    `--own-daemon`, by a daemon of its own.  kill -9 of either instance's daemon: the service
    manager restarts that one alone (Restart=on-failure), the other's daemon (same pid) serves
    on, reads and writes, meanwhile; fsync'd data of both is there after each restart, and both
    stop cleanly (ExecStop, exit 0), leaving the store fsck-clean.  Run with this checkout's CLI
    in place of /usr/local/bin/cowfs (docs/design-many-processes.md, "Step 6", systemd)."""
    root, conf_dir, store, _mnt, notify, services = service_env
    mnts = {b: root / "srv" / f"s1-{b}" for b in ("main", "feat")}
    for b, mp in mnts.items():
        _write_conf(conf_dir, f"s1:{b}", store, mp, branch=b)
    svcs = {b: Service(f"s1:{b}", conf_dir, notify, watchdog_usec=1_000_000, cowfs=mounting.cowfs_command())
            for b in mnts}
    services.extend(svcs.values())
    procs = {"main": _start(svcs["main"], notify, mnts["main"])}
    mounting.write(mnts["main"] / "base", b"main's, before feat", sync=True)
    made = subprocess.run(mounting.cowfs_command() + ["branch", str(mnts["main"]), "feat", "--own-daemon", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    procs["feat"] = _start(svcs["feat"], notify, mnts["feat"])
    assert procs["feat"].pid != procs["main"].pid
    assert (mnts["feat"] / "base").read_bytes() == b"main's, before feat"

    for victim, other in (("feat", "main"), ("main", "feat")):
        mounting.write(mnts[victim] / f"{victim}-durable", f"{victim} before its crash".encode(), sync=True)
        procs[victim].kill()
        code = procs[victim].wait(timeout=10)
        assert code == -signal.SIGKILL and _restarts(svcs[victim], code)
        # the other instance: not restarted (its main process is the same) and serving
        assert procs[other].poll() is None
        mounting.write(mnts[other] / f"{other}-while-{victim}-down", b"written meanwhile", sync=True)
        assert (mnts[other] / f"{other}-while-{victim}-down").read_bytes() == b"written meanwhile"
        time.sleep(float(svcs[victim].svc["RestartSec"][0]))
        procs[victim] = _start(svcs[victim], notify, mnts[victim])
        assert (mnts[victim] / f"{victim}-durable").read_bytes() == f"{victim} before its crash".encode()
        assert procs[other].poll() is None

    assert not (mnts["feat"] / "main-durable").exists() and not (mnts["main"] / "feat-durable").exists()
    for b in ("feat", "main"):
        (r,) = svcs[b].run_control("ExecStop", {"MAINPID": str(procs[b].pid)})
        assert r.returncode == 0, f"ExecStop of {b}: {r.stderr}\n{svcs[b].journal()[-3000:]}"
        assert procs[b].wait(timeout=30) == 0
        assert not _mounted(mnts[b])
    mounting.fsck(store)


def test_one_instance_per_branch_under_the_running_systemd(tmp_path):
    """The same with the machine's own systemd as PID 1 (skipped elsewhere, e.g. in CI's
    container): the unit installed under a name of the test's own in /run/systemd/system,
    cowfs@...:main and cowfs@...:feat started, feat's daemon killed -9; systemd restarts it
    (a new MainPID) while main's MainPID stays, and both stop cleanly."""
    if not os.path.isdir("/run/systemd/system") or os.geteuid() != 0 or shutil.which("systemctl") is None:
        pytest.skip("systemd is not PID 1 here (or not root): the service manager is played by the test above")
    tag = f"t{os.getpid()}x{time.monotonic_ns()}"  # names of this run's own: other runs may go on beside it
    unit = Path("/run/systemd/system") / f"cowfs-{tag}@.service"
    conf_dir = Path("/etc/cowfs")
    conf_dir.mkdir(exist_ok=True)
    store, srv = tmp_path / "store", tmp_path / "srv"
    mounting.run_cowfs("init", store)
    cli = mounting.cowfs_command()
    text = UNIT.read_text().replace("RestartSec=2", "RestartSec=1")
    unit.write_text(text.replace(INSTALLED_COWFS, cli[0]) if len(cli) == 1 else text)
    instances = {b: f"cowfs-{tag}@{tag}:{b}.service" for b in ("main", "feat")}

    def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 or not check, f"systemctl {' '.join(args)}: {r.stderr}"
        return r

    def main_pid(inst: str) -> int:
        return int(systemctl("show", "-p", "MainPID", "--value", inst).stdout.strip())

    try:
        for b in instances:  # %i is TAG:<branch>: the conf file is named after it
            _write_conf(conf_dir, f"{tag}:{b}", store, srv / b, branch=b)
        systemctl("daemon-reload")
        systemctl("start", instances["main"])
        mounting.run_cowfs("branch", srv / "main", "feat", "--own-daemon")
        systemctl("start", instances["feat"])
        pids = {b: main_pid(i) for b, i in instances.items()}
        assert pids["main"] != pids["feat"] and 0 not in pids.values()
        mounting.write(srv / "feat" / "durable", b"before the crash", sync=True)
        os.kill(pids["feat"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while main_pid(instances["feat"]) in (0, pids["feat"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert main_pid(instances["feat"]) not in (0, pids["feat"]), systemctl("status", instances["feat"], check=False).stdout
        assert systemctl("is-active", instances["feat"], check=False).stdout.strip() == "active"
        assert main_pid(instances["main"]) == pids["main"]
        assert (srv / "feat" / "durable").read_bytes() == b"before the crash"
        mounting.write(srv / "main" / "after", b"main served throughout", sync=True)
    finally:
        for inst in reversed(list(instances.values())):
            systemctl("stop", inst, check=False)
        unit.unlink(missing_ok=True)
        for b in instances:
            (conf_dir / f"{tag}:{b}.conf").unlink(missing_ok=True)
        systemctl("daemon-reload", check=False)
    for b in instances:
        assert not _mounted(srv / b)
    mounting.fsck(store)
