#!/usr/bin/env python3
"""Measure the costs that decide how several processes serve one cowfs store (issue 22's design,
docs/design-many-processes.md).  Self-contained: it uses the installed rocksdict, trio, sqlite3 and
(for `kvtrace` and `proxy`) the cowfs of this checkout; msgpack is measured when it is importable.

Every figure is repeated (--rounds, default 3) and reported as the median of the rounds with their
spread (min-max) and the 1-minute load average when it was taken: the machine is shared, so read
ratios rather than absolute values when the load is high.

Subcommands (several may be given; `all` runs every one):
  ipc        Unix-socket round trip between two Python processes: 100 B request / 200 B reply and
             100 B / 64 KiB, blocking server and trio server, pinned to one CPU, to two, unpinned;
             a one-way stream of 1 KiB messages (an asynchronous commit stream)
  marshal    encode + decode of a get request, a 12-op commit batch and a 64-entry scan page with
             pickle, marshal, msgpack (if installed) and struct
  secondary  rocksdict: a second process opens a database another process has open read-write, as
             read-only and as secondary; open cost, try_catch_up_with_primary after N writes,
             point reads and seeks through each
  sst        SstFileWriter for 1k / 100k / 1M metadata-sized entries; ingest_external_file into an
             empty and a full database; reads from an SST-only database opened read-only
  sqlite     SQLite (WAL) as a shared compare-and-set store: latency and throughput of a CAS
             transaction with synchronous=NORMAL / FULL, 1, 2 and 8 processes, one shared key and
             a key per process
  startup    a new daemon process (fresh interpreter; fork of a warm zygote): time until it has
             imported the stack and opened a small bounded RocksDB, its RSS and PSS; and today's
             `cowfs mount` of a fresh store and `cowfs branch` + `cowfs mount --branch` (real FUSE)
  dedup      "does chunk H exist" for 1M chunks: a shared RocksDB read through a secondary (with and
             without bloom filters), per-pack index files loaded into a dict or merged into one
             sorted mmap'ed file, one stat per chunk file
  disk       1, 2 and 4 processes each writing their own RocksDB plus O_DIRECT pack appends with
             fdatasync at once: throughput per process and in all
  layers     a key found in the oldest of K frozen layers: one database with layer-versioned keys
             (today: one seek) against one SST-only database per layer (K point reads), with and
             without bloom filters, and the memory each open database costs
  kvtrace    the KV operations a real cowfs daemon makes for an untar of Django 5.1.4 (counted by
             wrapping RocksKV in a foreground daemon): what a store server would be sent
  proxy      design A end to end: the same untar with every KV call of the daemon sent to one
             store-server process (Unix socket) that owns the databases, for 1, 2 and 8 daemons
             at once, against daemons that own their databases
  scaling    daemons that own their databases (B/C), 1, 2 and 8 untars at once: unpinned or each
             fork's tar and daemon on one CPU, with and without the request loop's spin
  overlay    design B's read path in a real daemon: a fork's head in a private RocksDB, the store's
             database read-only below it (cowfs.kv.overlay.OverlayKV), against one database:
             a full read of the fork's base tree (Django) and an untar into the fork

  roopen     step 6's fork opening its base: cowfs's RocksKV(read_only=True) of a store database
             (the store's families and options) while its writer runs in another process at a
             daemon's untar rate, by size and by the WAL the open replays; the writer's flush of
             every family; and how many opens a writer flushing every 2,000 keys makes fail
             (RocksKV opens again on a vanished file: the tries it took)
Usage: .venv/bin/python scripts/measure_multiprocess.py [--rounds N] [--quick] [--json] SUBCMD...
       .venv/bin/python scripts/measure_multiprocess.py render RESULTS.json...   (Markdown tables)
"""
from __future__ import annotations

import argparse
import bisect
import gc
import json
import marshal
import mmap
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
PY = sys.executable
COWFS = os.path.join(REPO, ".venv", "bin", "cowfs")
ROWS: list[dict[str, Any]] = []
QUICK = False


# ---------------------------------------------------------------------------------------------
# reporting

def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def record(section: str, measure: str, rounds: list[float], unit: str, note: str = "",
           loads: list[float] | None = None) -> None:
    """One row: the median of the rounds, their min and max, and the load while they ran."""
    rounds = [r for r in rounds if r is not None]
    if not rounds:
        ROWS.append({"section": section, "measure": measure, "median": None, "min": None, "max": None,
                     "unit": unit, "rounds": 0, "load": loads or [load1()], "note": note})
        return
    ROWS.append({"section": section, "measure": measure, "median": statistics.median(rounds),
                 "min": min(rounds), "max": max(rounds), "unit": unit, "rounds": len(rounds),
                 "values": rounds, "load": loads or [load1()], "note": note})
    r = ROWS[-1]
    log(f"  {section:9} {measure:62} {fmt(r['median']):>10} {unit:6} "
        f"[{fmt(r['min'])}-{fmt(r['max'])}] load {r['load'][0]}{' ' + note if note else ''}")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def repeat(n: int, fn: Callable[[], dict[str, float]]) -> tuple[dict[str, list[float]], list[float]]:
    """Run fn n times; gather each of its named figures across rounds, and the load per round."""
    out: dict[str, list[float]] = {}
    loads = []
    for _ in range(n):
        res = fn()
        loads.append(load1())
        for k, v in res.items():
            out.setdefault(k, []).append(v)
    return out, loads


def print_table() -> None:
    print(f"{'section':10} {'measure':64} {'median':>10} {'unit':6} {'spread (min-max)':>20} {'load':>6}")
    for r in ROWS:
        spread = f"{fmt(r['min'])}-{fmt(r['max'])}" if r["median"] is not None else "-"
        ld = statistics.median(r["load"]) if r["load"] else "-"
        print(f"{r['section']:10} {r['measure']:64} {fmt(r['median']):>10} {r['unit']:6} {spread:>20} {ld:>6}"
              + (f"  ({r['note']})" if r["note"] else ""))


# ---------------------------------------------------------------------------------------------
# process helpers

def child(role: str, args: dict[str, Any], **kw: Any) -> subprocess.Popen:
    """This script again, as a helper process playing `role` (see CHILDREN)."""
    return subprocess.Popen([PY, HERE, "_child", role, json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1, **kw)


def ask(p: subprocess.Popen, line: str) -> dict[str, Any]:
    p.stdin.write(line + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def expect_line(p: subprocess.Popen) -> dict[str, Any]:
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"helper process exited (rc {p.wait()})")
    return json.loads(line)


def run_together(ps: list[subprocess.Popen]) -> tuple[list[dict[str, Any]], float]:
    """Wait until every helper is ready, start them at once ("go"), collect each one's reply:
    (replies, seconds from the start to the last reply).  The helpers are killed after."""
    try:
        for p in ps:
            expect_line(p)
        t0 = time.perf_counter()
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        res = [expect_line(p) for p in ps]
        return res, time.perf_counter() - t0
    finally:
        for p in ps:
            p.kill()
            p.wait()


def reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and Pss (proportional: shared pages divided among their users), KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def tmpdir(tag: str) -> str:
    """A scratch directory on the disk stores live on (not tmpfs)."""
    base = os.environ.get("MEASURE_TMP", "/var/tmp")
    return tempfile.mkdtemp(prefix=f"h15-{tag}-", dir=base)


# ---------------------------------------------------------------------------------------------
# 1. IPC round trips

def _recv_msg(c: socket.socket, buf: bytearray, view: memoryview) -> int:
    """Read one length-prefixed message into buf (one recv for a small one); its length, 0 at EOF."""
    got = c.recv_into(view, len(buf))
    if got == 0:
        return 0
    while got < 4:
        got += c.recv_into(view[got:])
    n = struct.unpack_from("<I", buf)[0] + 4
    while got < n:
        got += c.recv_into(view[got:])
    return n


def child_call(a: dict[str, Any]) -> None:
    """Run one of this module's functions in a fresh process (clean RSS figures) and reply its result."""
    reply(globals()[a["fn"]](**a["args"]))


def in_child(fn: str, **args: Any) -> dict[str, Any]:
    p = child("call", {"fn": fn, "args": args})
    try:
        return expect_line(p)
    finally:
        p.wait(600)


def child_ipc_server(a: dict[str, Any]) -> None:
    pin(a.get("cpu"))
    out = struct.pack("<I", a["reply"]) + b"r" * a["reply"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(a["path"])
    s.listen(1)
    reply({"ready": True})
    c, _ = s.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    n = 0
    t0 = None
    stream = a.get("stream", False)
    while True:
        got = _recv_msg(c, buf, view) if not stream else c.recv_into(view, len(buf))
        if got == 0:
            break
        if t0 is None:
            t0 = cpu_s()
        n += 1 if not stream else got
        if not stream:
            c.sendall(out)
    reply({"cpu": cpu_s() - (t0 or 0), "n": n})


def child_ipc_trio_server(a: dict[str, Any]) -> None:
    import trio
    pin(a.get("cpu"))
    out = struct.pack("<I", a["reply"]) + b"r" * a["reply"]
    state = {"t0": None, "n": 0}

    async def main() -> None:
        ls = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await ls.bind(a["path"])
        ls.listen(1)
        reply({"ready": True})
        c, _ = await ls.accept()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            got = await c.recv_into(view, len(buf))
            if got == 0:
                break
            while got < 4:
                got += await c.recv_into(view[got:])
            n = struct.unpack_from("<I", buf)[0] + 4
            while got < n:
                got += await c.recv_into(view[got:])
            if state["t0"] is None:
                state["t0"] = cpu_s()
            state["n"] += 1
            sent = 0
            while sent < len(out):
                sent += await c.send(out[sent:] if sent else out)

    trio.run(main)
    reply({"cpu": cpu_s() - (state["t0"] or 0), "n": state["n"]})


def _ipc_round(server: str, req: int, rep: int, n: int, cpus: tuple[int | None, int | None],
               stream: bool = False) -> dict[str, float]:
    d = tempfile.mkdtemp(prefix="h15-ipc-")
    path = os.path.join(d, "s")
    p = child(server, {"path": path, "reply": rep, "cpu": cpus[1], "stream": stream})
    expect_line(p)
    old = os.sched_getaffinity(0)
    pin(cpus[0])
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    msg = struct.pack("<I", req) + b"q" * req
    buf = bytearray(rep + 4 + 16)
    view = memoryview(buf)
    try:
        for _ in range(200):  # warm-up
            c.sendall(msg)
            if not stream:
                got = 0
                while got < rep + 4:
                    got += c.recv_into(view[got:])
        c0, t0 = cpu_s(), time.perf_counter()
        for _ in range(n):
            c.sendall(msg)
            if not stream:
                got = 0
                while got < rep + 4:
                    got += c.recv_into(view[got:])
        wall = time.perf_counter() - t0
        ccpu = cpu_s() - c0
    finally:
        c.close()
        os.sched_setaffinity(0, old)
    res = expect_line(p)
    p.wait()
    shutil.rmtree(d)
    msgs = res["n"] / len(msg) if stream else res["n"]  # a stream server counts bytes
    return {"wall_us": wall / n * 1e6, "client_cpu_us": ccpu / n * 1e6,
            "server_cpu_us": res["cpu"] / msgs * 1e6}


def measure_ipc(rounds: int) -> None:
    n = 3000 if QUICK else 20000
    placements = {"one CPU": (0, 0), "two CPUs": (0, 1), "unpinned": (None, None)}
    for server, sname in (("ipc_server", "blocking"), ("ipc_trio_server", "trio")):
        for req, rep, size in ((100, 200, "100 B/200 B"), (100, 65536, "100 B/64 KiB")):
            for pname, cpus in placements.items():
                if size.endswith("KiB") and pname != "unpinned" and server == "ipc_trio_server":
                    continue
                res, loads = repeat(rounds, lambda: _ipc_round(server, req, rep, n if rep < 4096 else n // 4, cpus))
                tag = f"{sname} server, {size}, {pname}"
                record("ipc", f"round trip wall: {tag}", res["wall_us"], "us", loads=loads)
                record("ipc", f"  client CPU per round trip: {tag}", res["client_cpu_us"], "us", loads=loads)
                record("ipc", f"  server CPU per round trip: {tag}", res["server_cpu_us"], "us", loads=loads)
    res, loads = repeat(rounds, lambda: _ipc_round("ipc_server", 1024, 0, n * 2, (None, None), stream=True))
    record("ipc", "one-way stream of 1 KiB messages: wall per message", res["wall_us"], "us", loads=loads)
    record("ipc", "  client CPU per message (sendall)", res["client_cpu_us"], "us", loads=loads)
    record("ipc", "  server CPU per message (recv_into of what has arrived)", res["server_cpu_us"], "us", loads=loads)


# ---------------------------------------------------------------------------------------------
# marshalling

def _messages() -> dict[str, Any]:
    rnd = random.Random(1)
    key = lambda n: bytes(rnd.getrandbits(8) for _ in range(n))  # noqa: E731
    return {
        "get request (cf, 16 B key)": ("get", "inodes", key(16)),
        "get reply (88 B value)": (True, key(88)),
        "commit batch, 12 ops (~1.1 KiB)": ("write", [("inodes" if i % 3 else "dirents", key(24), key(64))
                                                      for i in range(12)], []),
        "scan page, 64 entries (29 B keys, 9 B values)": [(key(29), key(9)) for _ in range(64)],
    }


def _struct_codec(name: str) -> tuple[Callable, Callable] | None:
    """Hand-written struct framing for the same messages (what a fixed wire format costs in Python)."""
    if name.startswith("get request"):
        def enc(m):
            return struct.pack("<BB16s", 1, 2, m[2])

        def dec(b):
            _, cf, k = struct.unpack("<BB16s", b)
            return ("get", cf, k)
        return enc, dec
    if name.startswith("get reply"):
        return (lambda m: b"\x01" + m[1]), (lambda b: (b[0] == 1, b[1:]))
    if name.startswith("commit"):
        def enc(m):
            parts = []
            for cf, k, v in m[1]:
                parts.append(struct.pack("<BHH", 1 if cf == "inodes" else 2, len(k), len(v)))
                parts.append(k)
                parts.append(v)
            return b"".join(parts)

        def dec(b):
            ops, i, mv = [], 0, memoryview(b)
            while i < len(b):
                cf, kl, vl = struct.unpack_from("<BHH", b, i)
                i += 5
                ops.append((cf, bytes(mv[i:i + kl]), bytes(mv[i + kl:i + kl + vl])))
                i += kl + vl
            return ops
        return enc, dec
    if name.startswith("scan"):
        def enc(m):
            return b"".join(struct.pack("<BB", len(k), len(v)) + k + v for k, v in m)

        def dec(b):
            out, i = [], 0
            while i < len(b):
                kl, vl = b[i], b[i + 1]
                out.append((b[i + 2:i + 2 + kl], b[i + 2 + kl:i + 2 + kl + vl]))
                i += 2 + kl + vl
            return out
        return enc, dec
    return None


def measure_marshal(rounds: int) -> None:
    codecs: dict[str, Callable[[str], tuple[Callable, Callable] | None]] = {
        "pickle": lambda _n: (lambda m: pickle.dumps(m, 5), pickle.loads),
        "marshal": lambda _n: (marshal.dumps, marshal.loads),
        "struct": _struct_codec,
    }
    try:
        import msgpack  # noqa: F401
        codecs["msgpack"] = lambda _n: (lambda m: msgpack.packb(m, use_bin_type=True),
                                        lambda b: msgpack.unpackb(b, raw=False))
        mp = f"msgpack {msgpack.version}"
    except ImportError:
        mp = "msgpack not installed"
    n = 5000 if QUICK else 50000
    for mname, msg in _messages().items():
        for cname, make in codecs.items():
            pair = make(mname)
            if pair is None:
                continue
            enc, dec = pair

            def one() -> dict[str, float]:
                t0 = time.perf_counter()
                for _ in range(n):
                    dec(enc(msg))
                return {"us": (time.perf_counter() - t0) / n * 1e6, "bytes": len(enc(msg))}
            res, loads = repeat(rounds, one)
            record("marshal", f"{mname}: {cname} encode+decode ({int(res['bytes'][0])} B)", res["us"], "us",
                   loads=loads, note=mp if cname == "msgpack" else "")


# ---------------------------------------------------------------------------------------------
# 2. rocksdict in several processes: read-only and secondary instances

def _rd_options(cache_mb: int = 8, bloom: bool = False):
    import rocksdict as rd
    opt = rd.Options(raw_mode=True)
    opt.create_if_missing(True)
    table = rd.BlockBasedOptions()
    table.set_block_cache(rd.Cache(cache_mb << 20))
    if bloom:
        table.set_bloom_filter(10, False)
    opt.set_block_based_table_factory(table)
    opt.set_write_buffer_size(4 << 20)
    opt.set_max_background_jobs(2)
    return opt


def _meta_key(i: int) -> bytes:
    """An inode-record key: ino(8) + ~layer(8), layer 7."""
    return i.to_bytes(8, "big") + ((1 << 64) - 1 - 7).to_bytes(8, "big")


def _meta_value(i: int) -> bytes:
    return struct.pack("<IIIIQQQQ", 0o100644, 1000, 1000, 1, i * 37, i, i, i) + (i * 2654435761 % (1 << 64)).to_bytes(8, "big") * 4


def child_rocks_primary(a: dict[str, Any]) -> None:
    """A process that owns a database read-write and does what stdin tells it."""
    import rocksdict as rd
    db = rd.Rdict(a["path"], _rd_options(bloom=a.get("bloom", False)))
    nxt = a.get("start", 0)
    if a.get("fill"):
        wb = rd.WriteBatch(raw_mode=True)
        for i in range(a["fill"]):
            wb.put(_meta_key(i), _meta_value(i))
            if i % 1000 == 999:
                db.write(wb)
                wb = rd.WriteBatch(raw_mode=True)
        db.write(wb)
        db.flush()
        nxt = a["fill"]
    reply({"ready": True, "next": nxt})
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "write":  # N keys in batches of 100, unsynced (WAL)
            n = int(rest[0])
            t0 = time.perf_counter()
            wb = rd.WriteBatch(raw_mode=True)
            for i in range(nxt, nxt + n):
                wb.put(_meta_key(i), _meta_value(i))
                if (i - nxt) % 100 == 99:
                    db.write(wb)
                    wb = rd.WriteBatch(raw_mode=True)
            db.write(wb)
            nxt += n
            reply({"s": time.perf_counter() - t0, "next": nxt})
        elif cmd == "flush":
            db.flush()
            reply({"ok": True})
        elif cmd == "read":
            get_us, seek_us = _reads(db, int(rest[0]), int(rest[1]))
            reply({"get_us": get_us, "seek_us": seek_us})
        elif cmd == "quit":
            break
    db.close()
    reply({"closed": True})


def _reads(db, n: int, top: int) -> tuple[float, float]:
    """Microseconds per get and per seek of n random keys below top (all there), the same
    reads through the primary, a read-only and a secondary instance."""
    keys = [_meta_key(random.randrange(top)) for _ in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        assert db.get(k) is not None
    get_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for k in keys:
        it = db.iter()
        it.seek(k)
        it.key()
        it.value()
    return get_us, (time.perf_counter() - t0) / n * 1e6


def _secondary_round() -> dict[str, float]:
    import rocksdict as rd
    d = tmpdir("sec")
    path = os.path.join(d, "db")
    fill = 20000 if QUICK else 200000
    p = child("rocks_primary", {"path": path, "fill": fill})
    out: dict[str, float] = {}
    try:
        nxt = expect_line(p)["next"]
        rss0 = rss_kib()["rss"]
        t0 = time.perf_counter()
        ro = rd.Rdict(path, _rd_options(), access_type=rd.AccessType.read_only())
        out["open_ro_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        sec = rd.Rdict(path, _rd_options(), access_type=rd.AccessType.secondary(os.path.join(d, "sec")))
        out["open_sec_ms"] = (time.perf_counter() - t0) * 1e3
        n = 5000 if QUICK else 50000
        out["ro_get_us"], out["ro_seek_us"] = _reads(ro, n, nxt)
        out["sec_get_us"], out["sec_seek_us"] = _reads(sec, n, nxt)
        prim = ask(p, f"read {n} {nxt}")
        out["prim_get_us"], out["prim_seek_us"] = prim["get_us"], prim["seek_us"]
        out["rss_two_instances_mib"] = (rss_kib()["rss"] - rss0) / 1024
        t0 = time.perf_counter()
        for _ in range(200):
            sec.try_catch_up_with_primary()
        out["catchup_noop_us"] = (time.perf_counter() - t0) / 200 * 1e6
        for w in (1, 100, 10000) + (() if QUICK else (100000,)):
            nxt = ask(p, f"write {w}")["next"]
            t0 = time.perf_counter()
            sec.try_catch_up_with_primary()
            out[f"catchup_{w}_ms"] = (time.perf_counter() - t0) * 1e3
            assert sec.get(_meta_key(nxt - 1)) is not None, "secondary did not see the last write"
            assert ro.get(_meta_key(nxt - 1)) is None  # a read-only instance never sees later writes
        ask(p, "flush")
        t0 = time.perf_counter()
        sec.try_catch_up_with_primary()
        out["catchup_after_flush_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        ro.close()
        ro = rd.Rdict(path, _rd_options(), access_type=rd.AccessType.read_only())
        out["reopen_ro_ms"] = (time.perf_counter() - t0) * 1e3
        assert ro.get(_meta_key(nxt - 1)) is not None
        ro.close()
        sec.close()
        ask(p, "quit")
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d)
    return out


def measure_secondary(rounds: int) -> None:
    res, loads = repeat(rounds, _secondary_round)
    fill = 20000 if QUICK else 200000
    lbl = {"open_ro_ms": ("open read-only while another process writes it", "ms"),
           "open_sec_ms": ("open as secondary while another process writes it", "ms"),
           "prim_get_us": ("point read (get) in the primary (random key)", "us"),
           "ro_get_us": ("point read through the read-only instance", "us"),
           "sec_get_us": ("point read through the secondary", "us"),
           "prim_seek_us": ("iterator seek + key + value in the primary", "us"),
           "ro_seek_us": ("iterator seek + key + value, read-only instance", "us"),
           "sec_seek_us": ("iterator seek + key + value, secondary", "us"),
           "rss_two_instances_mib": ("RSS of the reader after opening both and reading", "MiB"),
           "catchup_noop_us": ("try_catch_up_with_primary, nothing new", "us"),
           "catchup_1_ms": ("try_catch_up_with_primary after 1 write", "ms"),
           "catchup_100_ms": ("try_catch_up_with_primary after 100 writes (1 batch)", "ms"),
           "catchup_10000_ms": ("try_catch_up_with_primary after 10,000 writes", "ms"),
           "catchup_100000_ms": ("try_catch_up_with_primary after 100,000 writes", "ms"),
           "catchup_after_flush_ms": ("try_catch_up_with_primary after the primary flushed", "ms"),
           "reopen_ro_ms": ("close + reopen read-only to see new writes", "ms")}
    for k, (name, unit) in lbl.items():
        if k in res:
            record("secondary", name, res[k], unit, loads=loads,
                   note=f"{fill:,} keys of 16 B + 72 B" if k == "open_ro_ms" else "")


# ---------------------------------------------------------------------------------------------
# 3. SST files

def _sst_keys(n: int, layer: int = 7) -> list[tuple[bytes, bytes]]:
    """n dirent-like entries: parent(8) + name + NUL + ~layer(8) -> child(8) + type(1), sorted."""
    suffix = ((1 << 64) - 1 - layer).to_bytes(8, "big")
    out = [((i // 64).to_bytes(8, "big") + b"file_%06d.py\0" % i + suffix, i.to_bytes(8, "big") + b"\x08")
           for i in range(n)]
    out.sort()
    return out


def _sst_round(n: int) -> dict[str, float]:
    import rocksdict as rd
    d = tmpdir("sst")
    out: dict[str, float] = {}
    try:
        kv = _sst_keys(n)
        opt = _rd_options(bloom=True)
        t0 = time.perf_counter()
        w = rd.SstFileWriter(opt)
        w.open(os.path.join(d, "a.sst"))
        for k, v in kv:
            w[k] = v
        w.finish()
        out["write_ms"] = (time.perf_counter() - t0) * 1e3
        out["size_kib"] = os.path.getsize(os.path.join(d, "a.sst")) / 1024
        # into an empty database (moved: a hard link, no copy)
        db = rd.Rdict(os.path.join(d, "empty"), _rd_options(bloom=True))
        io = rd.IngestExternalFileOptions()
        io.set_move_files(True)
        t0 = time.perf_counter()
        db.ingest_external_file([os.path.join(d, "a.sst")], io)
        out["ingest_empty_ms"] = (time.perf_counter() - t0) * 1e3
        db.close()
        # into a database that already holds other layers' keys (same key ranges: not the bottom level)
        w = rd.SstFileWriter(opt)
        w.open(os.path.join(d, "b.sst"))
        for k, v in _sst_keys(n, layer=9):
            w[k] = v
        w.finish()
        full = rd.Rdict(os.path.join(d, "full"), _rd_options(bloom=True))
        for k, v in _sst_keys(min(n, 100000), layer=3):
            full.put(k, v)
        full.flush()
        t0 = time.perf_counter()
        full.ingest_external_file([os.path.join(d, "b.sst")], io)
        out["ingest_full_ms"] = (time.perf_counter() - t0) * 1e3
        full.close()
        t0 = time.perf_counter()
        ro = rd.Rdict(os.path.join(d, "empty"), _rd_options(bloom=True), access_type=rd.AccessType.read_only())
        out["open_ro_ms"] = (time.perf_counter() - t0) * 1e3
        m = min(20000, n * 4)
        keys = [kv[random.randrange(n)][0] for _ in range(m)]
        t0 = time.perf_counter()
        for k in keys:
            ro.get(k)
        out["get_us"] = (time.perf_counter() - t0) / m * 1e6
        miss = [k[:-1] + b"\x00" for k in keys]
        t0 = time.perf_counter()
        for k in miss:
            ro.get(k)
        out["miss_us"] = (time.perf_counter() - t0) / m * 1e6
        ro.close()
    finally:
        shutil.rmtree(d)
    return out


def measure_sst(rounds: int) -> None:
    for n in (1000, 100000) + (() if QUICK else (1000000,)):
        res, loads = repeat(rounds if n < 1000000 else max(1, rounds - 1), lambda: _sst_round(n))
        tag = f"{n:,} entries"
        record("sst", f"SstFileWriter: write {tag} (35 B keys, 9 B values)", res["write_ms"], "ms", loads=loads)
        record("sst", f"  file size, {tag}", res["size_kib"], "KiB", loads=loads)
        record("sst", f"  ingest_external_file into an empty database, {tag}", res["ingest_empty_ms"], "ms", loads=loads)
        record("sst", f"  ingest into a database holding other layers, {tag}", res["ingest_full_ms"], "ms", loads=loads)
        record("sst", f"  open the SST-only database read-only, {tag}", res["open_ro_ms"], "ms", loads=loads)
        record("sst", f"  point read (hit), {tag}", res["get_us"], "us", loads=loads)
        record("sst", f"  point read (miss, bloom filter), {tag}", res["miss_us"], "us", loads=loads)


# ---------------------------------------------------------------------------------------------
# 4. SQLite as a shared compare-and-set store

def child_sqlite_worker(a: dict[str, Any]) -> None:
    con = sqlite3.connect(a["path"], timeout=30, isolation_level=None)
    con.execute(f"PRAGMA synchronous={a['sync']}")
    con.execute("PRAGMA busy_timeout=30000")
    key = a["key"]
    reply({"ready": True})
    sys.stdin.readline()  # start together
    lat = []
    conflicts = 0
    t_start = time.perf_counter()
    done = 0
    while done < a["n"]:
        t0 = time.perf_counter()
        while True:
            (seen,) = con.execute("SELECT v FROM refs WHERE k=?", (key,)).fetchone()
            con.execute("BEGIN IMMEDIATE")
            (now,) = con.execute("SELECT v FROM refs WHERE k=?", (key,)).fetchone()
            if now == seen:
                con.execute("UPDATE refs SET v=? WHERE k=?", (seen + 1, key))
                con.execute("COMMIT")
                break
            con.execute("ROLLBACK")
            conflicts += 1
        lat.append(time.perf_counter() - t0)
        done += 1
    reply({"lat": lat, "conflicts": conflicts, "wall": time.perf_counter() - t_start})


def _sqlite_round(procs: int, sync: str, shared_key: bool) -> dict[str, float]:
    d = tmpdir("sql")
    path = os.path.join(d, "refs.db")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE refs (k TEXT PRIMARY KEY, v INTEGER)")
    for i in range(procs):
        con.execute("INSERT INTO refs VALUES (?, 0)", (f"k{i}",))
    con.execute("INSERT INTO refs VALUES ('shared', 0)")
    con.close()
    n = {"NORMAL": 2000, "FULL": 300}[sync] // (4 if QUICK else 1)
    ps = [child("sqlite_worker", {"path": path, "sync": sync, "n": n,
                                   "key": "shared" if shared_key else f"k{i}"}) for i in range(procs)]
    res, wall = run_together(ps)
    con = sqlite3.connect(path)
    total = con.execute("SELECT sum(v) FROM refs").fetchone()[0]
    con.close()
    shutil.rmtree(d)
    assert total == n * procs, f"lost updates: {total} != {n * procs}"
    lat = sorted(x for r in res for x in r["lat"])
    return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "ops_s": n * procs / wall, "conflicts": sum(r["conflicts"] for r in res) / (n * procs)}


def measure_sqlite(rounds: int) -> None:
    for sync in ("NORMAL", "FULL"):
        for procs in (1, 2, 8):
            for shared in ((True, False) if procs > 1 else (False,)):
                res, loads = repeat(rounds, lambda: _sqlite_round(procs, sync, shared))
                tag = f"synchronous={sync}, {procs} process{'es' if procs > 1 else ''}" + \
                      ((", one shared key" if shared else ", a key each") if procs > 1 else "")
                record("sqlite", f"CAS p50 latency: {tag}", res["p50_ms"], "ms", loads=loads)
                record("sqlite", f"  CAS p99 latency: {tag}", res["p99_ms"], "ms", loads=loads)
                record("sqlite", f"  CAS throughput, all processes: {tag}", res["ops_s"], "op/s", loads=loads,
                       note=f"retries per CAS {statistics.median(res['conflicts']):.2f}" if shared and procs > 1 else "")


# ---------------------------------------------------------------------------------------------
# 5. start-up of a daemon process

STACK = "import pyfuse3, trio, rocksdict, zstandard, blake3, lz4.frame"
COWFS_STACK = ("import cowfs.daemon, cowfs.fuse_ops, cowfs.core.filesystem, cowfs.commands.branching, "
               "cowfs.store, cowfs.commands.control, cowfs.admin")


# The start-up programs run as `python -c`, not as this script, so that they import nothing else.
OPEN_DB = """
import rocksdict as rd
opt = rd.Options(raw_mode=True)
opt.create_if_missing(True)
table = rd.BlockBasedOptions()
table.set_block_cache(rd.Cache(8 << 20))
opt.set_block_based_table_factory(table)
opt.set_write_buffer_size(4 << 20)
opt.set_max_background_jobs(2)
db = rd.Rdict(DB, opt)
db.get(b"x")
"""
STARTUP_PROG = """
import sys, time
{imports}
DB = sys.argv[1]
if DB != "-":
{open_db}
print(time.time(), flush=True)
sys.stdin.readline()
"""
ZYGOTE_PROG = """
import gc, os, signal, sys, time
{imports}
gc.collect()
gc.freeze()  # objects made so far never move: their pages stay shared with the children
print(os.getpid(), flush=True)
for line in sys.stdin:
    DB = line.strip()
    if not DB:
        break
    t0 = time.time()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
{open_db}
        os.write(wfd, b"r")
        signal.pause()
        os._exit(0)
    os.close(wfd)
    os.read(rfd, 1)
    os.close(rfd)
    print(pid, t0, time.time(), flush=True)
"""


def _indent(code: str, n: int) -> str:
    return "\n".join(" " * n + line for line in code.strip().splitlines())


def _fresh_round(imports: str, db: bool) -> dict[str, float]:
    d = tmpdir("start")
    prog = STARTUP_PROG.format(imports=imports, open_db=_indent(OPEN_DB, 4))
    t0 = time.time()
    p = subprocess.Popen([PY, "-c", prog, os.path.join(d, "db") if db else "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        ready = float(p.stdout.readline()) - t0
        time.sleep(0.5)
        mem = rss_kib(p.pid)
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(30)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d)
    return {"ready_ms": ready * 1e3, "rss_mib": mem["rss"] / 1024, "pss_mib": mem.get("pss", 0) / 1024}


def _zygote_round(imports: str) -> dict[str, float]:
    d = tmpdir("zyg")
    prog = ZYGOTE_PROG.format(imports=imports, open_db=_indent(OPEN_DB, 8))
    p = subprocess.Popen([PY, "-c", prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kids = []
    try:
        p.stdout.readline()
        out: dict[str, list[float]] = {"fork_ms": [], "rss": [], "pss": []}
        for i in range(4):
            p.stdin.write(os.path.join(d, f"db{i}") + "\n")
            p.stdin.flush()
            pid, t0, ready = p.stdout.readline().split()
            kids.append(int(pid))
            out["fork_ms"].append((float(ready) - float(t0)) * 1e3)
        time.sleep(0.5)
        for k in kids:
            m = rss_kib(k)
            out["rss"].append(m["rss"] / 1024)
            out["pss"].append(m.get("pss", 0) / 1024)
        zm = rss_kib(p.pid)
    finally:
        for k in kids:  # the zygote's children, started by this run
            os.kill(k, signal.SIGKILL)
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(30)
        shutil.rmtree(d, ignore_errors=True)
    return {"fork_ms": statistics.median(out["fork_ms"]), "rss_mib": statistics.median(out["rss"]),
            "pss_mib": statistics.median(out["pss"]), "zygote_rss_mib": zm["rss"] / 1024}


def _mounted(path: str) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _cowfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run([COWFS, *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"cowfs {' '.join(args)}: rc {p.returncode}: {p.stderr.strip()}")
    return p


def _cowfs_mount_round() -> dict[str, float]:
    d = tmpdir("mnt")
    store, m1, m2 = (os.path.join(d, x) for x in ("store", "m1", "m2"))
    os.mkdir(m1)
    os.mkdir(m2)
    out: dict[str, float] = {}
    try:
        _cowfs("init", store)
        t0 = time.perf_counter()
        _cowfs("mount", store, m1)
        out["mount_s"] = time.perf_counter() - t0
        time.sleep(1.5)
        pid = int(open(os.path.join(store, "daemon.pid")).read().split()[0])
        mem = rss_kib(pid)
        out["rss_mib"], out["pss_mib"] = mem["rss"] / 1024, mem.get("pss", 0) / 1024
        t0 = time.perf_counter()
        _cowfs("branch", m1, "b1")
        out["branch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _cowfs("mount", store, m2, "--branch", "b1")
        out["attach_s"] = time.perf_counter() - t0
        out["branch_mount_s"] = out["branch_s"] + out["attach_s"]
    finally:
        for m in (m2, m1):
            if _mounted(m):
                subprocess.run([COWFS, "umount", m], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)
    return out


def measure_startup(rounds: int) -> None:
    for imports, tag in ((STACK, "pyfuse3+trio+rocksdict+zstandard+blake3+lz4"),
                         (STACK + "; " + COWFS_STACK, "the stack + cowfs's daemon modules")):
        res, loads = repeat(rounds + 2, lambda: _fresh_round(imports, db=True))
        record("startup", f"fresh interpreter, imports {tag}, opens a DB: until ready", res["ready_ms"], "ms", loads=loads)
        record("startup", f"  idle RSS of it", res["rss_mib"], "MiB", loads=loads, note="8 MiB block cache, 4 MiB memtable")
        record("startup", f"  idle PSS of it", res["pss_mib"], "MiB", loads=loads)
        res, loads = repeat(rounds, lambda: _zygote_round(imports))
        record("startup", f"fork() of a warm zygote ({tag}), opens a DB: until ready", res["fork_ms"], "ms", loads=loads)
        record("startup", f"  idle RSS of a forked daemon", res["rss_mib"], "MiB", loads=loads)
        record("startup", f"  idle PSS of a forked daemon (4 forked)", res["pss_mib"], "MiB", loads=loads)
        record("startup", f"  RSS of the zygote", res["zygote_rss_mib"], "MiB", loads=loads)
    res, loads = repeat(rounds + 2, lambda: _fresh_round("pass", db=False))
    record("startup", "fresh interpreter, no imports: until ready", res["ready_ms"], "ms", loads=loads)
    record("startup", "  idle RSS of it", res["rss_mib"], "MiB", loads=loads)
    if os.geteuid() != 0 or not os.path.exists(COWFS):
        log("startup: skipping today's cowfs mount (needs root for the fork's bind mount and .venv/bin/cowfs)")
        return
    def cli() -> dict[str, float]:
        t0 = time.perf_counter()
        _cowfs("--help")
        return {"s": time.perf_counter() - t0}
    res, loads = repeat(rounds + 2, cli)
    record("startup", "today: `cowfs --help` (the CLI's own start-up)", res["s"], "s", loads=loads)
    res, loads = repeat(rounds, _cowfs_mount_round)
    record("startup", "today: `cowfs mount` of a fresh store, until it returns", res["mount_s"] , "s", loads=loads)
    record("startup", "  idle RSS of today's daemon (default caches 256+256 MiB, empty)", res["rss_mib"], "MiB", loads=loads)
    record("startup", "  idle PSS of today's daemon", res["pss_mib"], "MiB", loads=loads)
    record("startup", "today: `cowfs branch MNT b1`", res["branch_s"], "s", loads=loads)
    record("startup", "today: `cowfs mount STORE MNT2 --branch b1` (attach, bind mount)", res["attach_s"], "s", loads=loads)
    record("startup", "today: branch + mount end to end", res["branch_mount_s"], "s", loads=loads)


# ---------------------------------------------------------------------------------------------
# 6. "does chunk H exist" for 1M chunks

def _hashes(n: int, seed: int = 5) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.getrandbits(256).to_bytes(32, "big") for _ in range(n)]


def child_index_primary(a: dict[str, Any]) -> None:
    import rocksdict as rd
    db = rd.Rdict(a["path"], _rd_options(bloom=a["bloom"]))
    wb = rd.WriteBatch(raw_mode=True)
    for i, h in enumerate(_hashes(a["n"])):
        wb.put(h, struct.pack("<IQI", i // 4096, (i % 4096) * 65536, 65536))
        if i % 2000 == 1999:
            db.write(wb)
            wb = rd.WriteBatch(raw_mode=True)
    db.write(wb)
    db.flush()
    db.compact_range(None, None)
    reply({"ready": True})
    sys.stdin.readline()
    db.close()


class SortedIndex:
    """A sorted file of fixed 48-byte entries (hash 32 + pack 4 + offset 8 + length 4), mmap'ed,
    searched with bisect: the merged index a keeper could publish."""
    ENTRY = 48

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.m = mmap.mmap(self.f.fileno(), 0, prot=mmap.PROT_READ)
        self.n = len(self.m) // self.ENTRY

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> bytes:
        o = i * self.ENTRY
        return self.m[o:o + 32]

    def find(self, h: bytes) -> bool:
        i = bisect.bisect_left(self, h)
        return i < self.n and self[i] == h

    def close(self) -> None:
        self.m.close()
        self.f.close()


def _index_reader(path: str, bloom: bool, n: int, m: int) -> dict[str, float]:
    """In a fresh process: open the index database as a secondary, look up m hits and m misses."""
    import rocksdict as rd
    allh = _hashes(n)
    rnd = random.Random(9)
    hs = [allh[rnd.randrange(n)] for _ in range(m)]
    miss = _hashes(m, seed=77)
    del allh
    gc.collect()
    rss0 = rss_kib()["rss"]
    t0 = time.perf_counter()
    sec = rd.Rdict(path, _rd_options(bloom=bloom), access_type=rd.AccessType.secondary(path + ".sec"))
    out = {"open_ms": (time.perf_counter() - t0) * 1e3}
    t0 = time.perf_counter()
    for h in hs:
        assert sec.get(h) is not None
    out["hit_us"] = (time.perf_counter() - t0) / m * 1e6
    t0 = time.perf_counter()
    for h in miss:
        sec.get(h)
    out["miss_us"] = (time.perf_counter() - t0) / m * 1e6
    t0 = time.perf_counter()
    for h in miss:
        sec.key_may_exist(h)
    out["may_exist_us"] = (time.perf_counter() - t0) / m * 1e6
    out["rss_mib"] = (rss_kib()["rss"] - rss0) / 1024
    sec.close()
    return out


def _dedup_rocks(n: int, bloom: bool, m: int) -> dict[str, float]:
    d = tmpdir("idx")
    p = child("index_primary", {"path": os.path.join(d, "db"), "n": n, "bloom": bloom})
    try:
        expect_line(p)
        out = in_child("_index_reader", path=os.path.join(d, "db"), bloom=bloom, n=n, m=m)
        out["disk_mib"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(d, "db"))
                              for f in fs if f.endswith(".sst")) / 2**20
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait(60)
    finally:
        p.kill()
        shutil.rmtree(d)
    return out


def _dedup_files(n: int, hs: list[bytes], miss: list[bytes], allh: list[bytes]) -> dict[str, float]:
    d = tmpdir("packidx")
    out: dict[str, float] = {}
    try:
        per = 4096
        packs = (n + per - 1) // per
        for pk in range(packs):  # one index file per pack, entries sorted
            ents = sorted(allh[pk * per:(pk + 1) * per])
            with open(os.path.join(d, f"{pk:08d}.idx"), "wb") as f:
                f.write(b"".join(h + struct.pack("<IQI", pk, j * 65536, 65536) for j, h in enumerate(ents)))
        gc.collect()
        rss0 = rss_kib()["rss"]
        t0 = time.perf_counter()
        index: dict[bytes, int] = {}
        for name in sorted(os.listdir(d)):
            data = open(os.path.join(d, name), "rb").read()
            mv = memoryview(data)
            for o in range(0, len(data), 48):
                pk, off, ln = struct.unpack_from("<IQI", data, o + 32)
                index[bytes(mv[o:o + 32])] = (pk << 40) | off
        out["dict_load_s"] = time.perf_counter() - t0
        out["dict_rss_mib"] = (rss_kib()["rss"] - rss0) / 1024
        t0 = time.perf_counter()
        for h in hs:
            _ = h in index
        out["dict_hit_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
        t0 = time.perf_counter()
        for h in miss:
            _ = h in index
        out["dict_miss_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
        # refresh: one new pack appears (watch the directory, read its index)
        t0 = time.perf_counter()
        data = open(os.path.join(d, f"{packs - 1:08d}.idx"), "rb").read()
        for o in range(0, len(data), 48):
            index[data[o:o + 32]] = o
        out["refresh_one_pack_ms"] = (time.perf_counter() - t0) * 1e3
        del index
        gc.collect()
        # merged: one sorted file for all packs, mmap'ed, bisect
        t0 = time.perf_counter()
        ents = []
        for name in sorted(os.listdir(d)):
            data = open(os.path.join(d, name), "rb").read()
            ents.extend(data[o:o + 48] for o in range(0, len(data), 48))
        ents.sort()
        with open(os.path.join(d, "merged"), "wb") as f:
            f.write(b"".join(ents))
        out["merge_s"] = time.perf_counter() - t0
        del ents
        gc.collect()
        rss0 = rss_kib()["rss"]
        t0 = time.perf_counter()
        si = SortedIndex(os.path.join(d, "merged"))
        out["mmap_open_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for h in hs:
            assert si.find(h)
        out["mmap_hit_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
        t0 = time.perf_counter()
        for h in miss:
            si.find(h)
        out["mmap_miss_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
        out["mmap_rss_mib"] = (rss_kib()["rss"] - rss0) / 1024
        si.close()
    finally:
        shutil.rmtree(d)
    return out


def _dedup_stat(n: int, hs: list[bytes], miss: list[bytes], allh: list[bytes]) -> dict[str, float]:
    d = tmpdir("chunkfiles")
    out: dict[str, float] = {}
    try:
        for i in range(256):
            os.mkdir(os.path.join(d, f"{i:02x}"))
        t0 = time.perf_counter()
        for h in allh:
            x = h.hex()
            os.close(os.open(os.path.join(d, x[:2], x[2:]), os.O_CREAT | os.O_WRONLY, 0o600))
        out["create_s"] = time.perf_counter() - t0

        def look(h: bytes) -> bool:
            x = h.hex()
            try:
                os.stat(os.path.join(d, x[:2], x[2:]))
                return True
            except FileNotFoundError:
                return False
        t0 = time.perf_counter()
        for h in hs:
            assert look(h)
        out["hit_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
        t0 = time.perf_counter()
        for h in miss:
            look(h)
        out["miss_us"] = (time.perf_counter() - t0) / len(hs) * 1e6
    finally:
        t0 = time.perf_counter()
        shutil.rmtree(d)
        out["remove_s"] = time.perf_counter() - t0
    return out


def measure_dedup(rounds: int) -> None:
    n = 100000 if QUICK else 1000000
    allh = _hashes(n)
    rnd = random.Random(9)
    hs = [allh[rnd.randrange(n)] for _ in range(50000)]
    miss = _hashes(50000, seed=77)
    tag = f"{n:,} chunks"
    for bloom in (False, True):
        res, loads = repeat(rounds, lambda: _dedup_rocks(n, bloom, len(hs)))
        b = "bloom filter" if bloom else "no bloom filter (cowfs today)"
        record("dedup", f"(a) shared RocksDB via secondary, {b}: open", res["open_ms"], "ms", loads=loads, note=tag)
        record("dedup", f"  lookup hit, {b}", res["hit_us"], "us", loads=loads)
        record("dedup", f"  lookup miss, {b}", res["miss_us"], "us", loads=loads)
        record("dedup", f"  key_may_exist on a miss, {b}", res["may_exist_us"], "us", loads=loads)
        record("dedup", f"  RSS the secondary adds to a fresh reader after 100k lookups, {b}", res["rss_mib"], "MiB", loads=loads)
        record("dedup", f"  SST bytes, {b}", res["disk_mib"], "MiB", loads=loads)
    res, loads = repeat(rounds, lambda: _dedup_files(n, hs, miss, allh))
    record("dedup", "(b1) per-pack index files (4096 chunks each) loaded into a dict", res["dict_load_s"], "s", loads=loads, note=tag)
    record("dedup", "  RSS of that dict", res["dict_rss_mib"], "MiB", loads=loads)
    record("dedup", "  lookup hit in the dict", res["dict_hit_us"], "us", loads=loads)
    record("dedup", "  lookup miss in the dict", res["dict_miss_us"], "us", loads=loads)
    record("dedup", "  refresh: read one new pack's index", res["refresh_one_pack_ms"], "ms", loads=loads)
    record("dedup", "(b2) merge every pack index into one sorted file", res["merge_s"], "s", loads=loads)
    record("dedup", "  open it (mmap)", res["mmap_open_ms"], "ms", loads=loads)
    record("dedup", "  lookup hit (bisect over the mmap)", res["mmap_hit_us"], "us", loads=loads)
    record("dedup", "  lookup miss (bisect over the mmap)", res["mmap_miss_us"], "us", loads=loads)
    record("dedup", "  RSS after 100k lookups (page cache, shared)", res["mmap_rss_mib"], "MiB", loads=loads)
    res, loads = repeat(1, lambda: _dedup_stat(n, hs, miss, allh))
    record("dedup", "(c) one file per chunk: create them (setup)", res["create_s"], "s", loads=loads, note=tag + ", 256 dirs")
    record("dedup", "  stat hit (warm dentry cache)", res["hit_us"], "us", loads=loads)
    record("dedup", "  stat miss (warm)", res["miss_us"], "us", loads=loads)
    record("dedup", "  remove them", res["remove_s"], "s", loads=loads)


# ---------------------------------------------------------------------------------------------
# 7. concurrent writers on one disk

def child_writer(a: dict[str, Any]) -> None:
    """Its own RocksDB and its own pack file: per 8 MiB of data, one O_DIRECT append + fdatasync and
    one metadata batch of 140 puts (chunk pointers, records); then the same in small-file commits."""
    import rocksdict as rd
    os.makedirs(a["dir"], exist_ok=True)
    db = rd.Rdict(os.path.join(a["dir"], "db"), _rd_options())
    buf = mmap.mmap(-1, 8 << 20)
    buf.write(os.urandom(8 << 20))
    fd = os.open(os.path.join(a["dir"], "pack"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    reply({"ready": True})
    sys.stdin.readline()
    t0 = time.perf_counter()
    off = 0
    for i in range(a["mib"] // 8):
        buf[:8] = struct.pack("<Q", i * 1000003 + a["seed"])  # distinct content per process
        os.pwrite(fd, buf, off)
        os.fdatasync(fd)
        off += 8 << 20
        wb = rd.WriteBatch(raw_mode=True)
        for j in range(140):
            wb.put(os.urandom(32), struct.pack("<BIQII", 80, 0, off + j * 65536, 65536, 65536))
        db.write(wb)
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a["commits"]):  # small-file creates: 6 puts a commit, a WAL sync every 50
        wb = rd.WriteBatch(raw_mode=True)
        for j in range(6):
            wb.put(os.urandom(24), os.urandom(60))
        db.write(wb)
        if i % 50 == 49:
            db.flush_wal(True)
    meta_s = time.perf_counter() - t0
    os.close(fd)
    db.close()
    reply({"data_s": data_s, "meta_s": meta_s})


def _disk_round(procs: int, mib: int, commits: int) -> dict[str, float]:
    d = tmpdir("disk")
    ps = [child("writer", {"dir": os.path.join(d, str(i)), "mib": mib, "commits": commits, "seed": i})
          for i in range(procs)]
    try:
        res, wall = run_together(ps)
    finally:
        shutil.rmtree(d)
    data = max(r["data_s"] for r in res)
    meta = max(r["meta_s"] for r in res)
    return {"mbs_each": mib / statistics.median(r["data_s"] for r in res), "mbs_all": mib * procs / data,
            "commits_each": commits / statistics.median(r["meta_s"] for r in res),
            "commits_all": commits * procs / meta, "wall_s": wall}


def measure_disk(rounds: int) -> None:
    mib = 64 if QUICK else 256
    commits = 2000 if QUICK else 10000
    for procs in (1, 2, 4):
        res, loads = repeat(rounds, lambda: _disk_round(procs, mib, commits))
        tag = f"{procs} process{'es' if procs > 1 else ''}"
        record("disk", f"pack appends (8 MiB O_DIRECT + fdatasync) + pointer batches: per process, {tag}",
               res["mbs_each"], "MB/s", loads=loads, note=f"{mib} MiB each")
        record("disk", f"  all processes together, {tag}", res["mbs_all"], "MB/s", loads=loads)
        record("disk", f"small commits (6 puts, WAL sync every 50): per process, {tag}", res["commits_each"],
               "op/s", loads=loads, note=f"{commits:,} each")
        record("disk", f"  all processes together, {tag}", res["commits_all"], "op/s", loads=loads)


# ---------------------------------------------------------------------------------------------
# 8. reads through K frozen layers

def _layer_keys(layer: int, n: int) -> list[tuple[bytes, bytes]]:
    suffix = ((1 << 64) - 1 - layer).to_bytes(8, "big")
    # each layer changes n inodes spread over the whole inode space: keys interleave across layers
    rnd = random.Random(layer)
    inos = sorted(rnd.sample(range(10_000_000), n))
    return [(i.to_bytes(8, "big") + suffix, _meta_value(i)) for i in inos]


def _layers_reader(d: str, k: int, n: int, bloom: bool) -> dict[str, float]:
    """In a fresh process: open the one database and the K layer databases, look up keys that exist
    only in the oldest layer from a view whose ancestry is layers K..1 (newest first)."""
    import rocksdict as rd
    out: dict[str, float] = {}
    one = rd.Rdict(os.path.join(d, "one"), _rd_options(bloom=bloom), access_type=rd.AccessType.read_only())
    gc.collect()
    rss0 = rss_kib()["rss"]
    dbs = [rd.Rdict(os.path.join(d, f"db{i}"), _rd_options(cache_mb=1, bloom=bloom),
                    access_type=rd.AccessType.read_only()) for i in range(k)]
    for db in dbs:  # touch each once: index and filter blocks loaded
        db.get(b"\0" * 16)
    out["rss_per_db_kib"] = (rss_kib()["rss"] - rss0) / k
    oldest = [key for key, _ in _layer_keys(1, n)]
    m = 2000 if n < 10000 else 10000
    probe = [oldest[random.randrange(n)] for _ in range(m)]
    ancestors = set(range(1, k + 1))
    suffix = {L: ((1 << 64) - 1 - L).to_bytes(8, "big") for L in range(1, k + 1)}
    t0 = time.perf_counter()
    for key in probe:
        base = key[:8]
        it = one.iter()
        it.seek(base + suffix[k])
        while it.valid():
            kk = it.key()
            if kk[:8] != base:
                break
            if (1 << 64) - 1 - int.from_bytes(kk[8:], "big") in ancestors:
                break
            it.next()
    out["one_db_us"] = (time.perf_counter() - t0) / m * 1e6
    t0 = time.perf_counter()
    for key in probe:
        base = key[:8]
        for depth, db in enumerate(reversed(dbs)):
            if db.get(base + suffix[k - depth]) is not None:
                break
    out["k_dbs_us"] = (time.perf_counter() - t0) / m * 1e6
    t0 = time.perf_counter()
    for key in probe:
        base = key[:8]
        for depth, db in enumerate(reversed(dbs)):
            kk = base + suffix[k - depth]
            if db.key_may_exist(kk) and db.get(kk) is not None:
                break
    out["k_dbs_mayexist_us"] = (time.perf_counter() - t0) / m * 1e6
    for db in dbs:
        db.close()
    one.close()
    return out


def _layers_round(k: int, bloom: bool) -> dict[str, float]:
    import rocksdict as rd
    d = tmpdir("layers")
    n = 2000 if QUICK else 20000
    try:
        layers = [_layer_keys(L, n) for L in range(1, k + 1)]
        one = rd.Rdict(os.path.join(d, "one"), _rd_options(bloom=bloom))  # today's layout
        for L in layers:
            wb = rd.WriteBatch(raw_mode=True)
            for key, v in L:
                wb.put(key, v)
            one.write(wb)
        one.flush()
        one.compact_range(None, None)
        one.close()
        io = rd.IngestExternalFileOptions()
        io.set_move_files(True)
        for i, L in enumerate(layers):  # one SST-only database per layer
            w = rd.SstFileWriter(_rd_options(bloom=bloom))
            p = os.path.join(d, f"l{i}.sst")
            w.open(p)
            for key, v in L:
                w[key] = v
            w.finish()
            db = rd.Rdict(os.path.join(d, f"db{i}"), _rd_options(cache_mb=1, bloom=bloom))
            db.ingest_external_file([p], io)
            db.close()
        return in_child("_layers_reader", d=d, k=k, n=n, bloom=bloom)
    finally:
        shutil.rmtree(d)


def measure_layers(rounds: int) -> None:
    for bloom in (True, False):
        for k in (1, 4, 16, 64):
            res, loads = repeat(rounds, lambda: _layers_round(k, bloom))
            b = "bloom" if bloom else "no bloom"
            record("layers", f"K={k}, {b}: one DB, layer-versioned keys, seek (today)", res["one_db_us"], "us", loads=loads)
            record("layers", f"  K={k}, {b}: one SST-only DB per layer, K point reads", res["k_dbs_us"], "us", loads=loads)
            record("layers", f"  K={k}, {b}: the same, key_may_exist first", res["k_dbs_mayexist_us"], "us", loads=loads)
            record("layers", f"  K={k}, {b}: RSS per open layer DB (1 MiB block cache each)", res["rss_per_db_kib"],
                   "KiB", loads=loads)


# ---------------------------------------------------------------------------------------------
# kvtrace and proxy: a real daemon, its KV calls counted or sent to a store server

def _django_tar() -> str:
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchlib
    return benchlib.django_tar()[0]


WRAPPER = r'''
import json, os, sys, time, atexit
sys.argv = ["cowfs"] + json.loads(os.environ["H15_ARGS"])
mode = os.environ["H15_MODE"]
import cowfs.kv.rocks as rocks, cowfs.store as store
if mode == "count":
    counts = {}
    def wrap(name, orig):
        def f(self, *a, **k):
            c = counts.setdefault(name, [0, 0.0])
            c[0] += 1
            if name in ("get", "scan"):
                counts.setdefault(f"{name}:{a[0]}", [0, 0.0])[0] += 1
            t0 = time.perf_counter()
            r = orig(self, *a, **k)
            if name == "scan":
                def gen(r=r, c=c, t0=t0):
                    n = 0
                    for x in r:
                        n += 1
                        yield x
                    counts.setdefault("scan_items", [0, 0.0])[0] += n
                c[1] += time.perf_counter() - t0
                return gen()
            c[1] += time.perf_counter() - t0
            if name == "write":
                b = a[0]
                counts.setdefault("write_ops", [0, 0.0])[0] += len(b.ops)
                counts.setdefault("write_bytes", [0, 0.0])[0] += sum(len(k) + len(v or b"") for _, k, v in b.ops)
            return r
        return f
    for name in ("get", "scan", "write", "sync"):
        setattr(rocks.RocksKV, name, wrap(name, getattr(rocks.RocksKV, name)))
    def dump():
        with open(os.environ["H15_OUT"], "w") as f:
            json.dump(counts, f)
    atexit.register(dump)
elif mode == "overlay":
    # Design B's read path in a real daemon: the branch head in a private database
    # (STORE/db-head), the store's database opened read-only below it, read as one through
    # cowfs.kv.overlay.OverlayKV (every family read through; writes go to the head).  Only
    # for measuring: a delete in the head of a key that lives below lets the old value show.
    import threading
    from cowfs.kv.base import KV
    from cowfs.kv.overlay import OverlayKV
    Base = rocks.RocksKV

    class _Own(KV):
        def __init__(self, db):
            self.db = db
        def get(self, cf, key):
            return Base.get(self.db, cf, key)
        def scan(self, cf, start, prefix=b""):
            return Base.scan(self.db, cf, start, prefix)
        def write(self, batch, expect=()):
            Base.write(self.db, batch, expect)
        def sync(self):
            Base.sync(self.db)
        def close(self):
            Base.close(self.db)

    class OverlayRocks(Base):
        def __init__(self, path, families, blob_families=(), small=False):
            super().__init__(path + "-head", families, blob_families, small)
            self.below = Base(path, families, blob_families, small, read_only=True)
            self.ov = OverlayKV(_Own(self), [self.below], through=families)
        def get(self, cf, key):
            return self.ov.get(cf, key)
        def scan(self, cf, start, prefix=b""):
            return self.ov.scan(cf, start, prefix)
        def close(self):
            Base.close(self)
            self.below.close()
    store.RocksKV = OverlayRocks
elif mode == "remote":
    sys.path.insert(0, os.environ["H15_SCRIPTS"])
    import measure_multiprocess as mm
    store.RocksKV = mm.make_remote_kv(os.environ["H15_SERVER"])
from cowfs.cli import main
main()
'''


def make_remote_kv(sock_path: str):
    """A class with RocksKV's interface whose every call is a round trip to the store server."""
    from cowfs.kv.base import KV, Conflict

    class RemoteKV(KV):
        def __init__(self, path: str, families: tuple[str, ...], blob_families: tuple[str, ...] = (),
                     small: bool = False) -> None:
            self.path = path
            self.read_only = False
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(sock_path)
            self.buf = bytearray(1 << 16)
            # The daemon calls its KV from several threads (flush encodes, WAL syncs, prefetch):
            # one call on the connection at a time.
            self.lock = threading.Lock()
            self._call("open", path, families, blob_families, small)

        def _call(self, *msg: Any) -> Any:
            with self.lock:
                return self._call_locked(msg)

        def _call_locked(self, msg: tuple) -> Any:
            data = pickle.dumps(msg, 5)
            self.sock.sendall(struct.pack("<I", len(data)) + data)
            got = self.sock.recv_into(self.buf)
            while got < 4:
                got += self.sock.recv_into(memoryview(self.buf)[got:])
            n = struct.unpack_from("<I", self.buf)[0] + 4
            if n > len(self.buf):
                self.buf.extend(bytes(n - len(self.buf)))
            while got < n:
                got += self.sock.recv_into(memoryview(self.buf)[got:])
            ok, val = pickle.loads(memoryview(self.buf)[4:n])
            if not ok:
                raise val
            return val

        def get(self, cf, key):
            return self._call("get", cf, key)

        def scan(self, cf, start, prefix=b""):
            page = 8
            while True:
                items, more = self._call("scan", cf, start, prefix, page)
                yield from items
                if not more:
                    return
                start = items[-1][0] + b"\0"
                page = 256

        def write(self, batch, expect=()):
            self._call("write", batch.ops, list(expect))

        def sync(self):
            self._call("sync")

        def close(self):
            try:
                self._call("close")
            finally:
                self.sock.close()

        def unflushed_bytes(self):
            return self._call("unflushed_bytes")

        def memory(self):
            return self._call("memory")

        def recover(self):
            self._call("recover")

        def compact(self):
            self._call("compact")

        def disk_usage(self):
            return self._call("disk_usage")

    RemoteKV.Conflict = Conflict
    return RemoteKV


def child_store_server(a: dict[str, Any]) -> None:
    """One process, one thread, owning every database its clients open: design A's store server."""
    import selectors
    from cowfs.kv.base import Batch
    from cowfs.kv.rocks import RocksKV
    pin(a.get("cpu"))
    sel = selectors.DefaultSelector()
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(a["path"])
    ls.listen(16)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    conns: dict[socket.socket, list] = {}
    reply({"ready": True})
    calls = 0
    t0 = cpu_s()
    while True:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            if s is ls:
                c, _ = ls.accept()
                c.setblocking(True)
                sel.register(c, selectors.EVENT_READ)
                conns[c] = [None]
                continue
            hdr = s.recv(4, socket.MSG_WAITALL)
            if len(hdr) < 4:
                sel.unregister(s)
                s.close()
                conns.pop(s, None)
                continue
            n = struct.unpack("<I", hdr)[0]
            msg = pickle.loads(s.recv(n, socket.MSG_WAITALL))
            calls += 1
            op, *args = msg
            kv = conns[s][0]
            try:
                if op == "open":
                    kv = conns[s][0] = RocksKV(*args)
                    res = None
                elif op == "get":
                    res = kv.get(*args)
                elif op == "scan":
                    cf, start, prefix, page = args
                    items = []
                    for item in kv.scan(cf, start, prefix):
                        items.append(item)
                        if len(items) > page:
                            break
                    res = (items[:page], len(items) > page)
                elif op == "write":
                    b = Batch()
                    b.ops = args[0]
                    res = kv.write(b, args[1])
                elif op == "close":
                    res = kv.close()
                else:
                    res = getattr(kv, op)(*args)
                out = pickle.dumps((True, res), 5)
            except Exception as exc:  # handed back to the client, which raises it
                out = pickle.dumps((False, exc), 5)
            s.sendall(struct.pack("<I", len(out)) + out)
        if os.path.exists(a["path"] + ".stop") and not conns:
            break
    reply({"cpu": cpu_s() - t0, "calls": calls})


_BRANCH: str | None = None  # the branch _daemon mounts (None: the store's default)


def _daemon(mode: str, store: str, mnt: str, out: str, server: str | None, cpu: int | None,
            opts: str = "") -> subprocess.Popen:
    args = ["mount", store, mnt, "--foreground"] + (["-o", opts] if opts else []) + \
        (["--branch", _BRANCH] if _BRANCH else [])
    env = dict(os.environ, H15_ARGS=json.dumps(args), H15_MODE=mode,
               H15_OUT=out, H15_SCRIPTS=os.path.join(REPO, "scripts"), H15_SERVER=server or "")
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    p = subprocess.Popen([PY, "-c", WRAPPER], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=pre)
    t0 = time.time()
    while not _mounted(mnt):
        if p.poll() is not None:
            raise RuntimeError(f"daemon exited rc {p.returncode}: {p.stderr.read()[-2000:]}")
        if time.time() - t0 > 60:
            p.kill()
            raise RuntimeError("daemon did not mount in 60 s")
        time.sleep(0.02)
    return p


def _untar(mnt: str, tar: str, cpu: int | None) -> subprocess.Popen:
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(["tar", "-xf", tar, "-C", mnt], preexec_fn=pre)


def _unmount(mnt: str, p: subprocess.Popen) -> float:
    """Unmount, wait for the daemon; its CPU seconds (children's rusage is not ours: read /proc first)."""
    cpu = _proc_cpu(p.pid)
    subprocess.run(["fusermount3", "-u", mnt], capture_output=True, timeout=120)
    try:
        p.wait(120)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if _mounted(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    return cpu


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _untar_round(mode: str, forks: int, tar: str, placement: str, opts: str = "") -> dict[str, float]:
    """forks untars at once, each into its own store and daemon; mode 'local' (each daemon owns its
    database) or 'remote' (every daemon's KV calls go to one store server); opts: mount options."""
    d = tmpdir("untar")
    server = None
    srv_path = os.path.join(d, "srv.sock")
    daemons, mnts = [], []
    out: dict[str, float] = {}
    cpus = {"unpinned": lambda i: (None, None),
            "fork-per-cpu": lambda i: (i % os.cpu_count(), i % os.cpu_count())}[placement]
    try:
        if mode == "remote":
            server = child("store_server", {"path": srv_path})
            expect_line(server)
        for i in range(forks):
            store, mnt = os.path.join(d, f"s{i}"), os.path.join(d, f"m{i}")
            os.mkdir(mnt)
            _cowfs("init", store)
            daemons.append(_daemon("count" if mode == "count" else mode, store, mnt,
                                   os.path.join(d, f"count{i}.json"), srv_path if server else None, cpus(i)[0],
                                   opts))
            mnts.append(mnt)
        t0 = time.perf_counter()
        tars = [_untar(m, tar, cpus(i)[1]) for i, m in enumerate(mnts)]
        try:
            while any(t.poll() is None for t in tars):
                dead = [p for p in daemons if p.poll() is not None]
                if dead or time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"a daemon died or the untar took over 600 s: "
                                       f"{dead[0].stderr.read()[-2000:] if dead else ''}")
                time.sleep(0.05)
        finally:
            for t in tars:
                if t.poll() is None:
                    t.kill()
                t.wait()
        if any(t.returncode for t in tars):
            raise RuntimeError("tar failed")
        out["wall_s"] = time.perf_counter() - t0
        # the data is committed at release; sync the WAL as the unmount does
        cpu = [_unmount(m, p) for m, p in zip(mnts, daemons)]
        daemons = []
        out["daemon_cpu_s"] = statistics.mean(cpu)
        if mode == "count":
            c = json.load(open(os.path.join(d, "count0.json")))
            for k, (n, s) in c.items():
                out[f"n_{k}"] = n
                out[f"s_{k}"] = s
        if server:
            open(srv_path + ".stop", "w").close()
            r = expect_line(server)
            out["server_cpu_s"] = r["cpu"]
            out["server_calls"] = r["calls"]
            server.wait(60)
    finally:
        for m, p in zip(mnts, daemons):
            _unmount(m, p)
        if server and server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(d, ignore_errors=True)
    return out


def measure_kvtrace(rounds: int) -> None:
    tar = _django_tar()
    res, loads = repeat(max(1, rounds - 1), lambda: _untar_round("count", 1, tar, "unpinned"))
    record("kvtrace", "untar Django 5.1.4 into a fresh store (counted daemon): wall", res["wall_s"], "s", loads=loads)
    record("kvtrace", "  daemon CPU", res["daemon_cpu_s"], "s", loads=loads)
    for k in sorted(k[2:] for k in res if k.startswith("n_get:") or k.startswith("n_scan:")):
        record("kvtrace", f"  KV {k.replace(':', ' calls on family ')}", res[f"n_{k}"], "count", loads=loads)
    for k in ("get", "scan", "scan_items", "write", "write_ops", "write_bytes", "sync"):
        if f"n_{k}" in res:
            record("kvtrace", f"  KV {k} calls" if not k.startswith(("scan_", "write_")) else f"  KV {k}",
                   res[f"n_{k}"], "count", loads=loads)
            if k in ("get", "scan", "write", "sync"):
                record("kvtrace", f"  time inside KV {k}", res[f"s_{k}"], "s", loads=loads)


def measure_proxy(rounds: int) -> None:
    tar = _django_tar()
    for forks in (1, 2, 8):
        for mode in ("local", "remote"):
            for placement in ("unpinned", "fork-per-cpu") if forks == 2 else ("unpinned",):
                res, loads = repeat(rounds if forks < 8 else 1, lambda: _untar_round(mode, forks, tar, placement))
                who = "daemons own their DBs (B/C-like)" if mode == "local" else "KV over IPC to one store server (A)"
                tag = f"{forks} untar{'s' if forks > 1 else ''} at once, {who}, {placement}"
                record("proxy", f"{tag}: wall", res["wall_s"], "s", loads=loads)
                record("proxy", f"  daemon CPU each", res["daemon_cpu_s"], "s", loads=loads)
                if mode == "remote":
                    record("proxy", f"  store server CPU", res["server_cpu_s"], "s", loads=loads)
                    record("proxy", f"  store server calls", res["server_calls"], "count", loads=loads)


def _overlay_round(base: str, mode: str, tar: str) -> dict[str, float]:
    """A copy of the base store (Django in main, branch f1 of it); a daemon serving f1 in mode
    'local' (today: one database) or 'overlay' (f1's head in its own database, the store's
    read-only below): a full read of the base tree (tar to a pipe), then an untar of Django."""
    d = tmpdir("overlay")
    st, mnt = os.path.join(d, "store"), os.path.join(d, "mnt")
    os.mkdir(mnt)
    p = None
    out: dict[str, float] = {}
    try:
        subprocess.run(["cp", "-a", base, st], check=True, timeout=300)
        p = _daemon("overlay" if mode == "overlay" else "local", st, mnt, "", None, None, "")
        cpu0 = _proc_cpu(p.pid)
        t0 = time.perf_counter()
        r = subprocess.run(f"tar -cf - -C {mnt} Django-5.1.4 | wc -c", shell=True, capture_output=True, text=True,
                           timeout=1200, check=True)
        out["read_s"] = time.perf_counter() - t0
        out["read_bytes"] = float(r.stdout.split()[0])
        cpu1 = _proc_cpu(p.pid)
        out["read_cpu_s"] = cpu1 - cpu0
        os.mkdir(os.path.join(mnt, "new"))
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", tar, "-C", os.path.join(mnt, "new")], check=True, timeout=1200)
        out["untar_s"] = time.perf_counter() - t0
        out["untar_cpu_s"] = _proc_cpu(p.pid) - cpu1
        if mode == "overlay":
            head = sum(os.path.getsize(os.path.join(dp, f)) for dp, _dn, fs in os.walk(os.path.join(st, "db-head"))
                       for f in fs)
            out["head_db_mib"] = head / (1 << 20)
    finally:
        if p is not None:
            _unmount(mnt, p)
        shutil.rmtree(d, ignore_errors=True)
    return out


def measure_overlay(rounds: int) -> None:
    """Design B's read path in a real daemon (see WRAPPER's 'overlay' mode): what reading a
    branch's lineage from the store's database below a private head database costs, against
    today's one database, on a fork of a Django tree."""
    tar = _django_tar()
    d = tmpdir("overlay-base")
    base, mnt = os.path.join(d, "store"), os.path.join(d, "mnt")
    os.mkdir(mnt)
    try:
        _cowfs("init", base)
        _cowfs("mount", base, mnt)
        try:
            subprocess.run(["tar", "-xf", tar, "-C", mnt], check=True, timeout=1200)
            _cowfs("branch", mnt, "f1")
        finally:
            _cowfs("umount", mnt, timeout=300)
        global _BRANCH
        _BRANCH = "f1"
        res: dict[str, dict[str, list[float]]] = {"local": {}, "overlay": {}}
        loads: list[float] = []
        for _ in range(rounds):
            for mode in ("local", "overlay"):
                loads.append(load1())
                for k, v in _overlay_round(base, mode, tar).items():
                    res[mode].setdefault(k, []).append(v)
        _BRANCH = None
        for mode, who in (("local", "one database (today)"), ("overlay", "head database + store's read-only below")):
            r = res[mode]
            record("overlay", f"read the fork's base tree (tar -cf - to a pipe), {who}: wall", r["read_s"], "s", loads=loads)
            record("overlay", "  daemon CPU", r["read_cpu_s"], "s", loads=loads)
            record("overlay", f"untar Django into the fork, {who}: wall", r["untar_s"], "s", loads=loads)
            record("overlay", "  daemon CPU", r["untar_cpu_s"], "s", loads=loads)
            if "head_db_mib" in r:
                record("overlay", "  head database size after both", r["head_db_mib"], "MiB", loads=loads)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure_scaling(rounds: int) -> None:
    """Daemons that own their databases (what B and C give each fork), 2 and 8 at once: where the
    per-fork CPU goes when forks outnumber cores (the request loop's spin, CPU placement)."""
    tar = _django_tar()
    for forks in (1, 2, 8):
        for placement in ("unpinned", "fork-per-cpu"):
            for opts in ("", "spin_us=0"):
                if forks == 1 and placement != "unpinned":
                    continue
                res, loads = repeat(rounds if forks < 8 else max(1, rounds - 1),
                                    lambda: _untar_round("local", forks, tar, placement, opts))
                tag = f"{forks} untar{'s' if forks > 1 else ''} at once, own DBs, {placement}, {opts or 'default options'}"
                record("scaling", f"{tag}: wall", res["wall_s"], "s", loads=loads)
                record("scaling", f"  daemon CPU each", res["daemon_cpu_s"], "s", loads=loads)


# ---------------------------------------------------------------------------------------------
# roopen: a read-only open of a store database beside its writer (step 6)

def _store_key(i: int, layer: int = 7) -> bytes:
    return i.to_bytes(8, "big") + b"~" + layer.to_bytes(8, "big")


def child_store_writer(a: dict[str, Any]) -> None:
    """Owns a RocksKV with the store's families: fills it, then writes at a daemon's untar rate
    (~5,000 batches/s of 5 keys: kvtrace's 27,788 batches and 148,503 operations in ~6 s) while
    `busy`, or flushes every 2,000 keys while `churn`, until stdin closes."""
    sys.path.insert(0, REPO)
    from cowfs.chunks.families import CF_OBJECTS
    from cowfs.kv.base import Batch
    from cowfs.kv.rocks import RocksKV
    from cowfs.store import FAMILIES
    kv = RocksKV(a["path"], FAMILIES, blob_families=(CF_OBJECTS,))
    n = 0
    while n < a["fill"]:
        b = Batch()
        for _ in range(1000):
            b.put("inodes", _store_key(n), os.urandom(60) + b"x" * 60)
            b.put("dirents", _store_key(n) + b"name", os.urandom(40))
            n += 1
        kv.write(b)
    if a["flushed"]:
        for cf in kv._cf.values():
            cf.flush()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    reply({"ready": True})
    while not stop.is_set():
        if a["mode"] == "idle":
            time.sleep(0.05)
            continue
        if a["mode"] == "busy":
            time.sleep(0.0002)
        b = Batch()
        for _ in range(5 if a["mode"] == "busy" else 50):
            b.put("inodes", _store_key(n, 9), os.urandom(60) + b"x" * 60)
            n += 1
        kv.write(b)
        if a["mode"] == "churn" and n % 2000 == 0:
            kv._cf["inodes"].flush()
    kv.close()


def _wal_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".log")) / 2**20


def _roopen_round(fill: int, flushed: bool, mode: str) -> dict[str, float]:
    sys.path.insert(0, REPO)
    import cowfs.kv.rocks as rocks
    from cowfs.chunks.families import CF_OBJECTS
    from cowfs.store import FAMILIES
    d = tmpdir("roopen")
    path = os.path.join(d, "db")
    p = child("store_writer", {"path": path, "fill": fill, "flushed": flushed, "mode": mode})
    out: dict[str, float] = {}
    try:
        expect_line(p)
        time.sleep(0.3)
        out["wal_mib"] = _wal_mib(path)
        rss0 = rss_kib()["rss"]
        t0 = time.perf_counter()
        kv = rocks.RocksKV(path, FAMILIES, blob_families=(CF_OBJECTS,), read_only=True)
        out["open_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for i in range(1000):
            kv.get("inodes", _store_key(i * 97 % max(fill, 1)))
        out["get_us"] = (time.perf_counter() - t0) * 1e3
        out["rss_mib"] = (rss_kib()["rss"] - rss0) / 1024
        t0 = time.perf_counter()
        kv.close()
        out["close_ms"] = (time.perf_counter() - t0) * 1e3
    finally:
        p.stdin.close()
        p.wait(timeout=60)
        shutil.rmtree(d)
    return out


def _roopen_churn(seconds: float, tries: int) -> dict[str, float]:
    """Opens of a database whose writer flushes every 2,000 keys, for `seconds`, with up to
    `tries` opens each (1: RocksKV without its retries): opens made, opens failed."""
    sys.path.insert(0, REPO)
    import cowfs.kv.rocks as rocks
    from cowfs.chunks.families import CF_OBJECTS
    from cowfs.store import FAMILIES
    d = tmpdir("rochurn")
    path = os.path.join(d, "db")
    p = child("store_writer", {"path": path, "fill": 0, "flushed": True, "mode": "churn"})
    saved = rocks.READ_ONLY_TRIES
    rocks.READ_ONLY_TRIES = tries
    opens = failed = 0
    try:
        expect_line(p)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            opens += 1
            try:
                rocks.RocksKV(path, FAMILIES, blob_families=(CF_OBJECTS,), read_only=True).close()
            except Exception:
                failed += 1
    finally:
        rocks.READ_ONLY_TRIES = saved
        p.stdin.close()
        p.wait(timeout=60)
        shutil.rmtree(d)
    return {"opens": opens, "failed": failed}


def measure_roopen(rounds: int) -> None:
    big = 100_000 if QUICK else 1_000_000
    for fill, flushed, mode in [(0, True, "idle"), (100_000, True, "idle"), (big, True, "idle"),
                                (100_000, True, "busy"), (big, True, "busy"),
                                (100_000, False, "busy"), (big, False, "busy")]:
        res, loads = repeat(rounds, lambda: _roopen_round(fill, flushed, mode))
        what = f"{fill:,} keys {'flushed' if flushed else 'unflushed'}, writer {mode}"
        note = f"live WAL {min(res['wal_mib']):.1f}-{max(res['wal_mib']):.1f} MiB"
        record("roopen", f"read-only open, {what}", res["open_ms"], "ms", note=note, loads=loads)
        record("roopen", "  1,000 point gets through it", res["get_us"], "ms", loads=loads)
        record("roopen", "  its RSS once open and read", res["rss_mib"], "MiB", loads=loads)
        record("roopen", "  its close", res["close_ms"], "ms", loads=loads)
    seconds = 3 if QUICK else 8
    for tries, name in ((1, "without retries"), (20, "with RocksKV's retries")):
        res, loads = repeat(1, lambda: _roopen_churn(seconds, tries))
        record("roopen", f"opens failed beside a writer flushing every 2,000 keys, {name}", res["failed"],
               "opens", note=f"of {res['opens'][0]} in {seconds} s", loads=loads)


# ---------------------------------------------------------------------------------------------

SECTIONS = {"ipc": measure_ipc, "marshal": measure_marshal, "secondary": measure_secondary, "sst": measure_sst,
            "sqlite": measure_sqlite, "startup": measure_startup, "dedup": measure_dedup, "disk": measure_disk,
            "layers": measure_layers, "kvtrace": measure_kvtrace, "proxy": measure_proxy,
            "scaling": measure_scaling, "overlay": measure_overlay, "roopen": measure_roopen}
CHILDREN = {"call": child_call, "ipc_server": child_ipc_server, "ipc_trio_server": child_ipc_trio_server,
            "rocks_primary": child_rocks_primary, "sqlite_worker": child_sqlite_worker,
            "index_primary": child_index_primary,
            "writer": child_writer, "store_server": child_store_server, "store_writer": child_store_writer}


def render(paths: list[str]) -> None:
    """Saved --json outputs as Markdown tables, one per section (for docs/design-many-processes.md)."""
    section = None
    for path in paths:
        data = json.load(open(path))
        print(f"<!-- {os.path.basename(path)}: started {data['meta']['started']}, 1/5/15-min load at start "
              f"{', '.join(f'{x:.1f}' for x in data['meta']['uptime_load'])} -->")
        for r in data["rows"]:
            if r["section"] != section:
                section = r["section"]
                print(f"\n| {section}: measure | median | min-max | unit | load |\n|---|---:|---:|---|---:|")
            spread = f"{fmt(r['min'])}-{fmt(r['max'])}" if r["median"] is not None and r["rounds"] > 1 else ""
            ld = "-".join(f"{x:.1f}" for x in (min(r["load"]), max(r["load"]))) if r["load"] else ""
            name = r["measure"].strip() + (f" ({r['note']})" if r["note"] else "")
            indent = "&nbsp;&nbsp;" if r["measure"].startswith("  ") else ""
            print(f"| {indent}{name} | {fmt(r['median'])} | {spread} | {r['unit']} | {ld} |")


def main() -> None:
    global QUICK
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "render":
        render(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="+", choices=list(SECTIONS) + ["all"])
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of every figure (default 3)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    QUICK = args.quick
    names = list(SECTIONS) if "all" in args.sections else args.sections
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "uptime_load": os.getloadavg(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}
    for name in names:
        log(f"== {name} (load {load1()})")
        SECTIONS[name](args.rounds)
    meta["finished_load"] = os.getloadavg()
    if args.json:
        print(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    else:
        print(f"# {meta['started']}, load at start {meta['uptime_load']}, at end {meta['finished_load']}")
        print_table()


if __name__ == "__main__":
    main()
