"""cowfs.daemon.imports: the daemon imports trio and pyfuse3 without importlib.metadata and
without `ldconfig -p`, and leaves both look-ups as they were for everyone else."""
from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import ctypes.util, json, subprocess, sys
spawned = []
real_popen = subprocess.Popen.__init__
def popen(self, args, *a, **k):
    spawned.append(str(args))
    real_popen(self, args, *a, **k)
subprocess.Popen.__init__ = popen
find_library = ctypes.util.find_library
from cowfs.daemon.imports import import_fuse_stack
import_fuse_stack()
import pyfuse3
from trio._core._thread_cache import set_os_thread_name
out = {"metadata_loaded": "importlib.metadata" in sys.modules, "email_loaded": "email" in sys.modules,
       "spawned": spawned, "find_library_restored": ctypes.util.find_library is find_library,
       "thread_names": set_os_thread_name is not None, "version": pyfuse3.__version__}
import importlib.metadata
out["real_version"] = importlib.metadata.version("pyfuse3")
out["real_module"] = hasattr(importlib.metadata, "entry_points")
print(json.dumps(out))
"""


def test_the_fuse_stack_is_imported_without_the_look_ups() -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, cwd="/", check=True)
    out = json.loads(r.stdout)
    assert out["spawned"] == []  # no `ldconfig -p`
    assert not out["metadata_loaded"] and not out["email_loaded"]
    assert out["find_library_restored"]
    assert out["thread_names"]  # trio still names its worker threads (pthread_setname_np in libc.so.6)
    assert out["version"] == out["real_version"]  # the same version string, from the .dist-info name
    assert out["real_module"]  # importlib.metadata is the real module afterwards


_OTHER = r"""
import sys, types
from cowfs.daemon import imports
shim = types.ModuleType(imports._METADATA)
shim.version = imports._version
shim.__getattr__ = imports._real
sys.modules[imports._METADATA] = shim
from importlib.metadata import entry_points  # a package asking for anything else
print(entry_points.__module__, sys.modules[imports._METADATA] is not shim)
"""


def test_any_other_name_comes_from_the_real_module() -> None:
    r = subprocess.run([sys.executable, "-c", _OTHER], capture_output=True, text=True, cwd="/", check=True)
    assert r.stdout.split() == ["importlib.metadata", "True"]


def test_a_version_not_installed_is_package_not_found() -> None:
    from cowfs.daemon import imports

    try:
        imports._version("no-such-distribution-cowfs")
    except ModuleNotFoundError:  # what importlib.metadata.PackageNotFoundError is too
        return
    raise AssertionError("found a version of a distribution that is not installed")


def test_a_branchs_home_is_looked_up_without_the_serve_records_module() -> None:
    """`cowfs mount` asks refs.sqlite for the branch's home before anything else: that lookup
    does not load the serve records' module (liveness, the codec, hmac: ~10 ms of CPU)."""
    code = ("import sys; import cowfs.daemon.locate; "
            "print(sorted(m for m in ('cowfs.meta.serving', 'cowfs.chunks.codec', 'hmac') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert r.stdout.strip() == "[]"
