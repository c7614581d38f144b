"""cowfs.daemon.zygote without mounts: who counts as like the zygote, a forked daemon's
command line, and a request where no zygote listens."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

from cowfs.daemon import zygote
from cowfs.daemon.config import MountConfig


def test_identity_is_what_a_child_inherits() -> None:
    assert zygote.identity("self") == zygote.identity(os.getpid())
    me = zygote.identity("self")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard)))
    try:
        assert zygote.identity(child.pid) != me  # other limits
    finally:
        child.communicate(b"")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             preexec_fn=lambda: os.nice(1))
    try:
        assert zygote.identity(child.pid) != me  # another nice value
    finally:
        child.communicate(b"")


def test_a_forked_daemon_names_itself() -> None:
    code = ("import sys; from cowfs.daemon import zygote; zygote._retitle(['cowfs', 'mount', '/s', '/m', '--branch', 'b']);"
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').split(b'\\0'))")
    r = subprocess.run([sys.executable, "-c", code, "x" * 200], capture_output=True, text=True, check=True, cwd="/")
    assert r.stdout.strip() == "[b'cowfs', b'mount', b'/s', b'/m', b'--branch', b'b']"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert r.stdout.strip().startswith("[b'cowfs', b'mount'")  # cut to the room there is


def test_no_zygote_means_the_caller_forks(tmp_path) -> None:
    r, w = os.pipe()
    try:
        assert zygote.request(MountConfig(str(tmp_path), str(tmp_path / "m"), "b"), w) is False
        (tmp_path / "zygote.sock").write_text("")  # a socket file no process listens on
        assert zygote.request(MountConfig(str(tmp_path), str(tmp_path / "m"), "b"), w) is False
    finally:
        os.close(r)
        os.close(w)
