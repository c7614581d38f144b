"""What scripts/bench_fleet.py and scripts/fleet_model.py share: real engines on 127.0.0.1
(SeaweedFS `weed server -s3` and one etcd member, tests/engines.py), and "hosts": stores of
the `cowfs` CLI of this checkout, each with its own XDG_CONFIG_HOME / XDG_CACHE_HOME (its own
pack index cache and push state) and the remote `origin` added."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
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
