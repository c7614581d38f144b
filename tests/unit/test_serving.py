"""cowfs.meta.serving on a real reference store: a branch is served by one live process; a
record whose process is gone (or a reused pid, another boot) is free and taken over by
compare-and-set; a process gives back only what it still holds."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cowfs.chunks import codec
from cowfs.kv.base import Batch
from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.serving import CF_SERVE, REF_FAMILIES, BranchServed, ServeRecord, Serving

HOLD = """
import sys
from cowfs.kv.sqlite import SQLiteKV
from cowfs.meta.serving import REF_FAMILIES, Serving
s = Serving(SQLiteKV(sys.argv[1], REF_FAMILIES), "w")
s.take(sys.argv[2], sys.argv[3])
print("held", flush=True)
sys.stdin.read()
"""


def _open(path) -> Serving:
    return Serving(SQLiteKV(str(path), REF_FAMILIES), "me")


def test_a_branch_is_served_once_and_given_back(tmp_path):
    s = _open(tmp_path / "refs.sqlite")
    s.take("main", "/mnt/a")
    rec = s.all()["main"]
    assert isinstance(rec, ServeRecord) and (rec.pid, rec.mountpoint, rec.writer) == (os.getpid(), "/mnt/a", "me")
    with pytest.raises(BranchServed, match=rf"branch 'main' is already served by pid {os.getpid()} at /mnt/a"):
        s.take("main", "/mnt/b")
    s.check("main")  # this process's own record is not another's
    s.take("main", "/mnt/b", own_is_free=True)  # the caller knows it no longer serves it at /mnt/a
    assert s.all()["main"].mountpoint == "/mnt/b"
    old = s.held["main"]
    s.take("feat", "/mnt/c")
    s.release("main", mine=b"another record")  # not what it holds: left alone
    assert set(s.all()) == {"main", "feat"}
    s.release("main", mine=old)
    s.release_all()
    assert s.all() == {} and s.held == {}


def test_a_record_of_a_process_gone_is_free_and_a_live_one_in_another_process_is_not(tmp_path):
    path = tmp_path / "refs.sqlite"
    s = _open(path)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "main", "/elsewhere"], cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(BranchServed, match=rf"served by pid {proc.pid} at /elsewhere"):
            s.check("main")
        with pytest.raises(BranchServed):
            s.take("main", "/mnt/a", own_is_free=True)  # another process's record is never ours
        proc.kill()
        proc.wait(timeout=30)
        assert s.all()["main"].pid == proc.pid, "killed -9: its record stays, stale"
        s.check("main")
        s.take("main", "/mnt/a")
        assert s.all()["main"].pid == os.getpid()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    mine = s.all()["main"]
    b = Batch()  # this very pid started at another time (a reused pid), and another boot: stale
    b.put(CF_SERVE, b"reused", ServeRecord("x", os.getpid(), mine.start + 1, mine.boot, "/r", 0.0).pack())
    b.put(CF_SERVE, b"rebooted", ServeRecord("x", os.getpid(), mine.start, "another-boot", "/b", 0.0).pack())
    b.put(CF_SERVE, b"damaged", b"{not json")
    s.refs.write(b)
    found = s.all()
    assert isinstance(found["damaged"], codec.CorruptObject) and "serve/damaged is damaged" in str(found["damaged"])
    assert not found["reused"].alive(s.boot) and not found["rebooted"].alive(s.boot)
    s.take("reused", "/mnt/r")  # a stale record is taken over
    s.take("damaged", "/mnt/d")  # so is a damaged one
    b = Batch()
    b.put(CF_SERVE, b"dangling", ServeRecord("x", os.getpid(), mine.start, mine.boot, "/d", 0.0).pack())
    s.refs.write(b)
    assert s.prune(known={"main", "reused", "damaged"}) == ["dangling", "rebooted"]
    assert set(s.all()) == {"main", "reused", "damaged"}


def test_a_branch_daemons_record_names_its_home_and_its_files_are_found_through_it(tmp_path):
    """A branch's own daemon records its home (docs/design-many-processes.md, "Step 6"): the
    CLI finds that daemon's files (STORE/homes/<id>/) from the mount point, and a record of
    an older cowfs, without the field, reads as the store's daemon's."""
    from cowfs.daemon.locate import branch_home, daemon_dir, record_at
    from cowfs.meta.layers import CF_CATALOG
    from cowfs.storedir import REFS_FILE, home_dir

    store = str(tmp_path)
    refs = SQLiteKV(os.path.join(store, REFS_FILE), REF_FAMILIES + (CF_CATALOG,))
    fork = Serving(refs, "w", home="00000000000000ab")
    fork.take("feat", "/mnt/feat")
    assert fork.all()["feat"].home == "00000000000000ab"
    b = Batch()
    b.put(CF_CATALOG, b"branch/feat", b'{"name": "feat", "home": "00000000000000ab"}')
    b.put(CF_CATALOG, b"branch/main", b'{"name": "main"}')
    b.put(CF_SERVE, b"old", b'{"writer": "", "pid": 1, "start": 0, "boot": "x", "mountpoint": "/mnt/old", '
                            b'"since": 0}')
    refs.write(b)
    assert branch_home(store, "feat") == "00000000000000ab"
    assert branch_home(store, "main") is None and branch_home(store, "gone") is None
    assert daemon_dir(store, "/mnt/feat") == home_dir(store, "00000000000000ab")
    assert daemon_dir(store, "/mnt/old") == store == daemon_dir(store, "/mnt/none") == daemon_dir(store)
    found = record_at(store, "/mnt/feat")
    assert found is not None and found[0] == "feat" and fork.at("/mnt/feat") == found
    assert fork.all()["old"].home == ""  # an older cowfs's record: the store's daemon's
    fork.release_all()
    assert daemon_dir(store, "/mnt/feat") == store
    refs.close()
