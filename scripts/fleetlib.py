"""What the fleet scripts (bench_fleet.py, bench_lazy.py, bench_lazy_ready.py, fleet_model.py)
share: real engines on 127.0.0.1 (SeaweedFS `weed server -s3` and one etcd member,
tests/engines.py); "hosts": stores of the `cowfs` CLI of this checkout, each with its own
XDG_CONFIG_HOME / XDG_CACHE_HOME (its own pack index cache and push state) and the remote
`origin` added; lazy mounts and their figures; and the request counter (`counting`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Generic, Iterator, TypeVar

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import engines  # noqa: E402

COWFS = os.path.join(os.path.dirname(HERE), ".venv", "bin", "cowfs")


class Host:
    def __init__(self, base: str, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.env = dict(env, XDG_CONFIG_HOME=os.path.join(self.dir, "config"),
                        XDG_CACHE_HOME=os.path.join(self.dir, "cache"))
        self.store = os.path.join(self.dir, "store")
        self.mounted: list[str] = []

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        """stdout of `cowfs ARGS` on this host; SystemExit with its stderr if it fails."""
        r = subprocess.run([COWFS, *args], env=env or self.env, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise SystemExit(f"cowfs {' '.join(args)} on {self.name}: {r.stderr.strip()}")
        return r.stdout

    def json(self, *args: str) -> dict:
        """The JSON of `cowfs ARGS --json` on this host (its last line)."""
        return json.loads(self.run(*args, "--json").strip().splitlines()[-1])

    def lazy_mount(self, source: str, name: str, *options: str, env: dict[str, str] | None = None) -> tuple[str, float]:
        """`cowfs mount SOURCE MNT --store STORE [OPTIONS]` (MNT and STORE: mnt-NAME and store-NAME
        in the host's directory): the mountpoint, and the seconds until the mount was ready."""
        mp = os.path.join(self.dir, f"mnt-{name}")
        os.makedirs(mp)
        t0 = time.monotonic()
        self.run("mount", source, mp, "--store", os.path.join(self.dir, f"store-{name}"), *options, env=env)
        self.mounted.append(mp)
        return mp, time.monotonic() - t0

    def mount(self, branch: str) -> str:
        mp = os.path.join(self.dir, f"mnt-{branch}")
        os.makedirs(mp, exist_ok=True)
        self.run("mount", self.store, mp, "--branch", branch)
        self.mounted.append(mp)
        return mp

    def umount_all(self) -> None:
        for mp in reversed(self.mounted):
            subprocess.run([COWFS, "umount", mp], env=self.env, capture_output=True, timeout=300)
        self.mounted.clear()


def lazy_stats(mp: str) -> dict | None:
    """A lazy mount's own figures (`.cowfs/stats`, key "lazy"); None if there are none."""
    try:
        with open(os.path.join(mp, ".cowfs", "stats")) as f:
            return json.load(f).get("lazy")
    except (OSError, ValueError):
        return None


def lazy_build(store: str) -> dict:
    """The figures a lazy mount's build keeps in its store's lazy.json (cowfs.fleet.lazy)."""
    with open(os.path.join(store, "lazy.json")) as f:
        return json.load(f)["build"]


# A `sitecustomize` put on PYTHONPATH for the measured commands only (`counting`): it wraps
# botocore's `Endpoint._send` (every S3 request sent, retries included) and requests'
# `Session.send` (every etcd gateway call: etcd3gw posts through requests), and after each
# request rewrites COWFS_COUNT_DIR/<pid>.json with its process's requests and bytes (PUT: sent,
# GET: received) by kind ("S3 GET data", "S3 LIST index", "etcd kv/range"): a daemon that never
# exits normally still tells; a forked child counts from zero.  It also wraps the FUSE READ
# handler of a mount's daemon (cowfs.fuse.ops `Operations.read`, patched as that module is
# imported): kind "fuse read", the bytes the kernel asked of the mount's files (its page cache
# misses, read-ahead included; control files not counted), what a workload read through the
# mount whatever else on the machine drops the page cache.  Those are many and on the hot path:
# written by a thread every 0.1 s rather than per request (`counts` is up to date 0.2 s after).
COUNTER = '''
import importlib.abc, importlib.machinery, json, os, sys, threading, time, urllib.parse
_DIR = os.environ.get("COWFS_COUNT_DIR")
if _DIR:
    _lock = threading.Lock()
    _counts = {}
    _later = {"pid": None, "dirty": False}
    os.register_at_fork(after_in_child=_counts.clear)

    def _write():
        tmp = os.path.join(_DIR, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(_counts, f)
        os.replace(tmp, os.path.join(_DIR, f"{os.getpid()}.json"))

    def _writer():
        while True:
            time.sleep(0.1)
            with _lock:
                if _later["dirty"]:
                    _later["dirty"] = False
                    _write()

    def _add(kind, nbytes, now=True):
        with _lock:
            c = _counts.setdefault(kind, [0, 0])
            c[0] += 1
            c[1] += nbytes
            if now:
                _write()
                return
            _later["dirty"] = True
            if _later["pid"] != os.getpid():
                _later["pid"] = os.getpid()
                threading.Thread(target=_writer, daemon=True).start()

    def _wrap_read(cls):
        read = cls.read

        async def counted(self, fh, off, size):
            data = await read(self, fh, off, size)
            if fh not in self.handles.sessions:
                _add("fuse read", len(data), now=False)
            return data
        cls.read = counted

    class _PatchOps(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "cowfs.fuse.ops":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _wrap_read(module.Operations)
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _PatchOps())

    import botocore.endpoint as _ep
    _send = _ep.Endpoint._send

    def _s3(self, request):
        r = _send(self, request)
        u = urllib.parse.urlsplit(request.url)
        q = urllib.parse.parse_qs(u.query)
        if request.method == "GET" and "list-type" in q:
            kind = "S3 LIST " + q.get("prefix", [""])[0].rstrip("/").rsplit("/", 1)[-1]
        else:
            key = u.path.lstrip("/").split("/", 1)[-1]
            kind = f"S3 {request.method} " + (key.rsplit("/", 2)[-2] if key.count("/") else key)
        sent = int(request.headers.get("Content-Length", 0) or 0) if request.method == "PUT" else 0
        got = int(r.headers.get("Content-Length", 0) or 0) if request.method == "GET" else 0
        _add(kind, sent + got)
        return r
    _ep.Endpoint._send = _s3

    import requests
    _rsend = requests.Session.send

    def _etcd(self, request, **kw):
        r = _rsend(self, request, **kw)
        path = urllib.parse.urlsplit(request.url).path
        if "/v3/" in path:
            body = request.body or b""
            _add("etcd " + path.split("/v3/", 1)[1], len(body) + len(r.content))
        return r
    requests.Session.send = _etcd
'''


def counting(env: dict[str, str], d: str) -> dict[str, str]:
    """env with the request counter on, counting into d (made, or emptied: `counts` sums it)."""
    site = os.path.join(d, "site")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(textwrap.dedent(COUNTER))
    return dict(env, PYTHONPATH=site, COWFS_COUNT_DIR=d)


def counts(d: str) -> dict[str, list[int]]:
    """[requests, bytes] by kind, summed over every process that counted into d (`counting`)."""
    out: dict[str, list[int]] = {}
    for f in os.listdir(d):
        if f.endswith(".json"):
            with open(os.path.join(d, f)) as fh:
                for kind, (n, b) in json.load(fh).items():
                    c = out.setdefault(kind, [0, 0])
                    c[0] += n
                    c[1] += b
    return out


H = TypeVar("H", bound=Host)


class Fleet(Generic[H]):
    """The engines, the environment that points boto3 at them, and the hosts made so far."""

    def __init__(self, base: str, prefix: str, host_class: type[H]) -> None:
        self.base = base
        self.prefix = prefix
        self.host_class = host_class
        self.sw = engines.SeaweedFS(os.path.join(base, "seaweedfs"))
        self.etcd = engines.Etcd(os.path.join(base, "etcd"))
        self.env = dict(os.environ)
        self.hosts: list[H] = []

    def host(self, name: str) -> H:
        """A new host: its store made and the remote `origin` added."""
        h = self.host_class(self.base, name, self.env)
        h.run("init", h.store)
        h.run("remote", "add", "origin", f"s3://{self.sw.BUCKET}/{self.prefix}", "--refs", self.etcd.endpoint)
        self.hosts.append(h)
        return h

    def remote_objects(self) -> Counter:
        """The remote's objects by kind (data, index, commit) and their total "bytes"."""
        c: Counter = Counter()
        pages = self.sw.client().get_paginator("list_objects_v2").paginate(Bucket=self.sw.BUCKET,
                                                                            Prefix=self.prefix + "/")
        for page in pages:
            for o in page.get("Contents", []):
                c[o["Key"].split("/")[1]] += 1
                c["bytes"] += o["Size"]
        return c


@contextlib.contextmanager
def fleet(base: str, prefix: str, host_class: type[H]) -> Iterator[Fleet[H]]:
    """The engines started under base; on the way out every host unmounted, the engines
    stopped and base removed."""
    f = Fleet(base, prefix, host_class)
    try:
        f.sw.start()
        f.etcd.start()
        for k, v in f.sw.environment(base).items():
            if v is None:
                f.env.pop(k, None)
            else:
                f.env[k] = v
        yield f
    finally:
        for h in f.hosts:
            h.umount_all()
        f.sw.stop()
        f.etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
