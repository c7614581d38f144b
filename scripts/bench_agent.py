#!/usr/bin/env python3
"""Agent workloads (issue 24): what an AI agent does in a sandbox, on a plain directory, fuse-overlayfs
and cowfs, in one run on one machine.

    sudo .venv/bin/python scripts/bench_agent.py                  # full run, 3 rounds
    sudo .venv/bin/python scripts/bench_agent.py --quick          # 1 round, smaller inputs (CI smoke)
    ... --only sqlite,git --targets plain,cowfs --json            # a subset; JSON on stdout

Needs root (mounts, drop_caches), /dev/fuse and fusermount3, fuse-overlayfs for the overlay target,
and per workload: git (git), gcc and make (make), node and npm (npm). A missing one is named and the
script exits 2 before doing anything.

Workloads, in the order each round runs them (each in a fresh directory per target and round; the
same inputs and the same commands on every target; "needs" run untimed first when not selected):
  venv         python -m venv (with pip, from ensurepip)
  pip          pip install requests pytest numpy django rich (pinned, see PACKAGES) from a local
               wheelhouse: --no-index --find-links, no cache, pip compiles the .pyc files   needs venv
  compileall   python -m compileall -q over that venv (read-mostly: the .pyc files are there) needs pip
  import       python -c "import django, numpy, requests, rich, pytest", warm                needs pip
  pytest       the test suite of Pygments (a dependency of rich, so installed; its sdist's tests/, 2,300
               files, ~5,300 tests; tests/contrast left out: it needs wcag-contrast-ratio), run with
               the venv's pytest in a copy of the sdist; --quick runs tests/snippets only    needs pip
               The summary line ("N passed, M skipped") must be the same on every target.
  sqlite       2,000 single-row commits (autocommit INSERTs) into a new database in WAL mode with
               synchronous=FULL, then a count(*) check (--quick: 300)
  git          git clone --no-local of a generated repository: 200 commits, ~350 files, fixed seed;
               the clone's HEAD is checked against the source's
  git_status   git status --porcelain in that clone, warm (its index rewritten 50 ms after the
               checkout, untimed, so no file is "racily clean" and read again); must print nothing
                                                                                    needs git
  make         make -j2 of generated C sources: 300 .c files in 10 modules (--quick: 2 x 15), 20
               shared headers and one API header per module; every module is an -I directory, so
               the preprocessor probes several directories per #include; -MMD dependency files, one
               static library per module, one program whose output is checked
  npm          npm install --offline from a primed cache (express, lodash, chalk, commander, yargs,
               semver, uuid at pinned versions, ~100 packages with a lockfile)
  cold_import  unmount, drop the page cache, mount again, then the import above           needs pip
  rm           rm -rf of the round's directory: everything the workloads above left      needs pip
  randread     4 KiB preads at seeded random offsets of a file of --micro-mib MiB, after a remount and
               dropped caches (bench_core's "rand read": same offsets, same seed)   -> IOPS too
  randwrite    4 KiB pwrite + fsync at seeded random offsets of that file (bench_core's "rand write")
The last two are bench_core's microbenchmarks on this run's targets; they are reported but are not in
the geometric mean, which is over the workloads above them.

Rounds interleave the targets (for each round, each workload runs on every target before the next
workload; the order of the targets rotates from round to round); each figure is the median over the
rounds. Before each timed workload, sync(2) (untimed) writes out what the previous ones left dirty in
the page cache, so its writeback does not land in the next one's time. Untimed preparation: copying
the Pygments sdist, the C sources or the npm project into the round's directory. For cowfs (and fuse-overlayfs's daemon CPU) each workload's FUSE requests come from the
daemon (`cowfs stats --json`, minus what the stats call itself costs), by op, from the median round.

Inputs are built once into --cache (default /var/tmp/cowfs-bench-agent-cache) and reused: the
wheelhouse (`pip download`, from PyPI), the Pygments sdist, the git repository, the C sources, the
npm project with its primed cache (from the npm registry). Nothing is fetched during the timed runs.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from bench_core import Bench, fmt_num, write_file  # noqa: E402

MiB = 1 << 20
PACKAGES = {"requests": "2.32.3", "pytest": "8.3.4", "numpy": "2.1.3", "django": "5.1.4", "rich": "13.9.4"}
IMPORT_STMT = "import django, numpy, requests, rich, pytest"
NPM_DEPS = {"express": "4.21.2", "lodash": "4.17.21", "chalk": "4.1.2", "commander": "12.1.0",
            "yargs": "17.7.2", "semver": "7.6.3", "uuid": "10.0.0"}
GIT_COMMITS = 200
GIT_SEED = 24
C_SEED = 7
TARGET_LABEL = {"plain": "plain", "overlay": "fuse-overlayfs", "cowfs": "cowfs"}

FULL = dict(sqlite_commits=2000, c_modules=10, c_files=30, pytest_args=["tests", "--ignore=tests/contrast"],
            micro_mib=1024, rand_reads=5000, rand_writes=2000, rounds=3)
QUICK = dict(sqlite_commits=300, c_modules=2, c_files=15, pytest_args=["tests/snippets"],
             micro_mib=32, rand_reads=500, rand_writes=200, rounds=1)

SQLITE_SCRIPT = r"""
import sqlite3, sys
path, n = sys.argv[1], int(sys.argv[2])
con = sqlite3.connect(path, isolation_level=None)     # autocommit: one transaction per INSERT
mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
if mode != "wal":
    sys.exit(f"journal_mode is {mode}, not wal")
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, body TEXT)")
for i in range(n):
    con.execute("INSERT INTO events (kind, body) VALUES (?, ?)", (f"k{i % 7}", f"event {i} " * 8))
got = con.execute("SELECT count(*) FROM events").fetchone()[0]
con.close()
if got != n:
    sys.exit(f"{got} rows, expected {n}")
"""


def log(*a) -> None:
    bl.log("bench_agent:", *a)


class Prerequisite(Exception):
    """Something the run needs is missing; the message says what."""


# ---------------------------------------------------------------------------------------------
# inputs, built once into the cache directory

def _done(d: str) -> bool:
    return os.path.exists(os.path.join(d, ".complete"))


def _mark(d: str, info: dict) -> None:
    with open(os.path.join(d, ".complete"), "w") as f:
        json.dump(info, f)


def _read_mark(d: str) -> dict:
    with open(os.path.join(d, ".complete")) as f:
        return json.load(f)


def _fresh(d: str) -> str:
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class Inputs:
    """The cached inputs; each one is built on first use (said on stderr) and reused afterwards."""

    def __init__(self, cache: str, python: str, quick: dict):
        self.cache = os.path.abspath(cache)
        self.python = python
        self.p = quick
        self._wheelhouse = None
        os.makedirs(self.cache, exist_ok=True)

    def _python_version(self) -> str:
        return bl.run([self.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                      timeout=60).stdout.strip()

    def wheelhouse(self) -> str:
        """Wheels of PACKAGES and all their dependencies, for the venv's Python."""
        if self._wheelhouse:
            return self._wheelhouse
        pyver = self._python_version()
        d = os.path.join(self.cache, f"wheelhouse-py{pyver}-{_key(PACKAGES)}")
        if not _done(d):
            log(f"building the wheelhouse (pip download {' '.join(f'{k}=={v}' for k, v in PACKAGES.items())}, "
                f"Python {pyver}) into {d}")
            _fresh(d)
            bl.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                    "--python-version", pyver, "-d", d] + [f"{k}=={v}" for k, v in PACKAGES.items()],
                   timeout=1800)
            _mark(d, {"packages": PACKAGES, "python": pyver, "wheels": sorted(os.listdir(d))})
        else:
            log(f"using the wheelhouse {d}")
        self._wheelhouse = d
        return d

    def pygments_src(self) -> str:
        """The sdist of the Pygments version in the wheelhouse (its tests/ is the pytest workload)."""
        wh = self.wheelhouse()
        wheels = [w for w in os.listdir(wh) if w.lower().startswith("pygments-")]
        if len(wheels) != 1:
            raise RuntimeError(f"expected one Pygments wheel in {wh}, found {wheels}")
        ver = wheels[0].split("-")[1]
        d = os.path.join(self.cache, f"pygments-{ver}")
        if not _done(d):
            log(f"building the Pygments {ver} test suite (pip download of its sdist) into {d}")
            _fresh(d)
            dl = os.path.join(self.cache, "sdists")
            os.makedirs(dl, exist_ok=True)
            bl.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"pygments=={ver}", "-d", dl], timeout=900)
            (sdist,) = [f for f in glob.glob(os.path.join(dl, f"*ygments-{ver}.tar.gz"))]
            with tarfile.open(sdist) as tf:
                tf.extractall(d, filter="data")
            (top,) = os.listdir(d)
            src = os.path.join(d, top)
            if not os.path.isdir(os.path.join(src, "tests")):
                raise RuntimeError(f"{sdist} has no tests/")
            _mark(d, {"version": ver, "dir": top})
        else:
            log(f"using the Pygments test suite {d}")
        return os.path.join(d, _read_mark(d)["dir"])

    def git_repo(self) -> tuple[str, str]:
        """A bare repository of GIT_COMMITS commits, generated with a fixed seed -> (path, HEAD)."""
        d = os.path.join(self.cache, f"repo-{GIT_COMMITS}-s{GIT_SEED}.git")
        if not _done(d):
            log(f"building the git repository ({GIT_COMMITS} commits, seed {GIT_SEED}) into {d}")
            _fresh(d)
            bl.run(["git", "init", "-q", "--bare", "-b", "main", d], timeout=60, env=git_env(self.cache))
            stream = gen_git_stream(GIT_COMMITS, GIT_SEED)
            p = subprocess.run(["git", "fast-import", "--quiet"], input=stream, cwd=d, timeout=600,
                               capture_output=True, env=git_env(self.cache))
            if p.returncode != 0:
                raise RuntimeError(f"git fast-import failed: {p.stderr.decode(errors='replace')[-2000:]}")
            bl.run(["git", "repack", "-adq"], cwd=d, timeout=600, env=git_env(self.cache))
            head = bl.run(["git", "rev-parse", "main"], cwd=d, timeout=60, env=git_env(self.cache)).stdout.strip()
            files = bl.run(["git", "ls-tree", "-r", "--name-only", "main"], cwd=d, timeout=60,
                           env=git_env(self.cache)).stdout.count("\n")
            _mark(d, {"head": head, "commits": GIT_COMMITS, "files": files})
        else:
            log(f"using the git repository {d}")
        return d, _read_mark(d)["head"]

    def c_sources(self) -> tuple[str, str]:
        """Generated C sources with a Makefile -> (path, the program's expected output)."""
        m, f = self.p["c_modules"], self.p["c_files"]
        d = os.path.join(self.cache, f"csrc-{m}x{f}-s{C_SEED}")
        if not _done(d):
            log(f"building the C sources ({m} modules x {f} files, seed {C_SEED}) into {d}")
            _fresh(d)
            expected = gen_c_project(d, m, f, C_SEED)
            _mark(d, {"expected": expected, "c_files": m * f + 1})
        else:
            log(f"using the C sources {d}")
        return d, _read_mark(d)["expected"]

    def npm_project(self) -> tuple[str, str]:
        """package.json + package-lock.json and an npm cache primed from the registry -> (project, cache)."""
        d = os.path.join(self.cache, f"npm-{_key(NPM_DEPS)}")
        if not _done(d):
            log(f"building the npm project ({', '.join(f'{k}@{v}' for k, v in NPM_DEPS.items())}) and priming "
                f"its cache into {d} (from the npm registry)")
            _fresh(d)
            proj, cache = os.path.join(d, "project"), os.path.join(d, "cache")
            prime = os.path.join(d, "prime")
            os.makedirs(proj)
            os.makedirs(prime)
            pkg = {"name": "bench-agent-npm", "version": "1.0.0", "private": True, "dependencies": NPM_DEPS}
            for where in (proj, prime):
                with open(os.path.join(where, "package.json"), "w") as fh:
                    json.dump(pkg, fh, indent=2)
            # the lockfile keeps each package's URL and integrity (this machine's ~/.npmrc may say
            # omit-lockfile-registry-resolved), so an offline install needs only the cached tarballs
            bl.run(["npm", "install", "--cache", cache, "--no-audit", "--no-fund", "--loglevel=error",
                    "--omit-lockfile-registry-resolved=false"], cwd=prime, timeout=1800)
            shutil.copy(os.path.join(prime, "package-lock.json"), proj)
            shutil.rmtree(prime)
            # prove the cache is enough: one offline install, as the timed runs do it
            check = os.path.join(d, "check")
            shutil.copytree(proj, check)
            bl.run(npm_cmd(cache), cwd=check, timeout=900, env=bench_env(os.path.join(self.cache, "home")))
            n = count_npm_packages(check)
            shutil.rmtree(check)
            _mark(d, {"deps": NPM_DEPS, "packages": n})
        else:
            log(f"using the npm project and cache {d}")
        return os.path.join(d, "project"), os.path.join(d, "cache")


def gen_git_stream(commits: int, seed: int) -> bytes:
    """A `git fast-import` stream: a ~300-file project (Python modules, docs, tests) and `commits`
    commits that edit a few files each, add one now and then, and remove one rarely."""
    rng = random.Random(seed)
    words = ("alpha beta gamma delta value index result buffer cache token parse write read node "
             "tree branch state config error retry limit").split()

    def line() -> str:
        k = rng.randrange(4)
        a, b = rng.choice(words), rng.choice(words)
        if k == 0:
            return f"def {a}_{b}_{rng.randrange(1000)}(x):"
        if k == 1:
            return f"    {a} = {b}({rng.randrange(100)}, {a!r})"
        if k == 2:
            return f"    # {a} {b} {' '.join(rng.choice(words) for _ in range(6))}"
        return f"    return {a} + {rng.randrange(10**6)}"

    files: dict[str, list[str]] = {}
    for i in range(300):
        top = rng.choice(["src", "src", "src", "tests", "docs"])
        path = f"{top}/pkg{rng.randrange(12)}/{'mod' if top != 'docs' else 'page'}{i:03d}." + \
               ("md" if top == "docs" else "py")
        files[path] = [line() for _ in range(rng.randrange(20, 160))]
    out = []

    def data(b: bytes) -> None:
        out.append(b"data %d\n" % len(b) + b + b"\n")

    for c in range(commits):
        changed: dict[str, list[str] | None] = {}
        if c == 0:
            changed = dict(files)
        else:
            for _ in range(rng.randrange(1, 6)):
                p = rng.choice(sorted(files))
                lines = files[p]
                for _ in range(rng.randrange(1, 10)):
                    j = rng.randrange(len(lines) + 1)
                    if rng.random() < 0.5 and j < len(lines):
                        lines[j] = line()
                    else:
                        lines.insert(j, line())
                changed[p] = lines
            if c % 5 == 0:
                p = f"src/pkg{rng.randrange(12)}/new{c:03d}.py"
                files[p] = [line() for _ in range(rng.randrange(10, 80))]
                changed[p] = files[p]
            if c % 17 == 0 and len(files) > 50:
                p = rng.choice(sorted(files))
                del files[p]
                changed[p] = None
        when = 1_700_000_000 + c * 3600
        out.append(b"commit refs/heads/main\nmark :%d\n" % (c + 1))
        out.append(b"author Bench <bench@example.invalid> %d +0000\n" % when)
        out.append(b"committer Bench <bench@example.invalid> %d +0000\n" % when)
        data(f"change {c}: {rng.choice(words)} {rng.choice(words)}".encode())
        if c:
            out.append(b"from :%d\n" % c)
        for p, lines in sorted(changed.items(), key=lambda kv: kv[0]):
            if lines is None:
                out.append(f"D {p}\n".encode())
            else:
                out.append(f"M 100644 inline {p}\n".encode())
                data(("\n".join(lines) + "\n").encode())
    return b"".join(out)


def gen_c_project(d: str, modules: int, files_per: int, seed: int) -> str:
    """Write a C project into `d` -> the line its program prints (a checksum the build must match)."""
    rng = random.Random(seed)
    ncommon = 20
    os.makedirs(os.path.join(d, "include", "common"))
    with open(os.path.join(d, "include", "project.h"), "w") as f:
        f.write("#ifndef PROJECT_H\n#define PROJECT_H\n#include <stddef.h>\n#include <stdint.h>\n"
                "typedef uint32_t u32;\n#define ROTL(x, k) (((x) << (k)) | ((x) >> (32 - (k))))\n#endif\n")
    for i in range(ncommon):
        with open(os.path.join(d, "include", "common", f"c{i}.h"), "w") as f:
            f.write(f"#ifndef C{i}_H\n#define C{i}_H\n#include \"project.h\"\n"
                    f"typedef struct {{ u32 a; u32 b; char name[16]; }} c{i}_rec;\n"
                    f"#define C{i}_SCALE {rng.randrange(3, 97)}u\n"
                    f"static inline u32 c{i}_mix(u32 x) {{ return ROTL(x * {rng.randrange(3, 2**31) | 1}u, "
                    f"{rng.randrange(1, 31)}) ^ (x >> {rng.randrange(1, 15)}); }}\n#endif\n")
    mods = [f"mod{m}" for m in range(modules)]
    objs_by_mod = {}
    calls = []
    for m, mod in enumerate(mods):
        sd = os.path.join(d, "src", mod)
        os.makedirs(sd)
        with open(os.path.join(sd, f"{mod}_api.h"), "w") as f:
            f.write(f"#ifndef {mod.upper()}_API_H\n#define {mod.upper()}_API_H\n#include \"project.h\"\n")
            for j in range(files_per):
                f.write(f"u32 {mod}_f{j}(u32 seed);\n")
            f.write("#endif\n")
        objs_by_mod[mod] = []
        for j in range(files_per):
            hdrs = rng.sample(range(ncommon), 3)
            other = mods[rng.randrange(modules)]
            body = ["#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include \"project.h\"\n"]
            body += [f"#include \"c{h}.h\"\n" for h in hdrs]
            body.append(f"#include \"{mod}_api.h\"\n#include \"{other}_api.h\"\n\n")
            nfun = 6
            for k in range(nfun):
                h = rng.choice(hdrs)
                body.append(
                    f"static u32 step{k}(u32 x, const c{h}_rec *r)\n{{\n"
                    f"    u32 acc = x ^ r->a;\n"
                    f"    for (u32 i = 0; i < {rng.randrange(8, 40)}u; i++) {{\n"
                    f"        switch ((acc + i) % 4u) {{\n"
                    f"        case 0: acc = c{h}_mix(acc + i); break;\n"
                    f"        case 1: acc += r->b * C{h}_SCALE; break;\n"
                    f"        case 2: acc ^= ROTL(acc, {rng.randrange(1, 31)}); break;\n"
                    f"        default: acc = acc * {rng.randrange(3, 1000) | 1}u + (u32)r->name[i % 16u];\n"
                    f"        }}\n    }}\n    return acc;\n}}\n\n")
            h0 = hdrs[0]
            body.append(f"u32 {mod}_f{j}(u32 seed)\n{{\n    c{h0}_rec r;\n    memset(&r, 0, sizeof r);\n"
                        f"    r.a = seed; r.b = {rng.randrange(1, 10**6)}u;\n"
                        f"    snprintf(r.name, sizeof r.name, \"{mod}f{j}\");\n    u32 x = seed;\n")
            for k in range(nfun):
                body.append(f"    x = step{k}(x, (const void *)&r);\n")
            body.append("    return x;\n}\n")
            with open(os.path.join(sd, f"f{j:03d}.c"), "w") as f:
                f.write("".join(body))
            objs_by_mod[mod].append(f"build/{mod}/f{j:03d}.o")
            calls.append(f"{mod}_f{j}")
    with open(os.path.join(d, "src", "main.c"), "w") as f:
        f.write("#include <stdio.h>\n#include \"project.h\"\n")
        for mod in mods:
            f.write(f"#include \"{mod}_api.h\"\n")
        f.write("int main(void)\n{\n    u32 x = 1;\n")
        for c in calls:
            f.write(f"    x = {c}(x) + 1u;\n")
        f.write("    printf(\"checksum %08x\\n\", (unsigned)x);\n    return 0;\n}\n")
    mk = ["# generated by scripts/bench_agent.py\nCC ?= cc\nAR ?= ar\n",
          "CFLAGS := -O1 -Wall -Iinclude -Iinclude/common " + " ".join(f"-Isrc/{m}" for m in mods) +
          " -MMD -MP\n",
          "LIBS := " + " ".join(f"build/lib{m}.a" for m in mods) + "\n",
          "OBJS := build/main.o " + " ".join(o for m in mods for o in objs_by_mod[m]) + "\n\n",
          "all: build/app\n\n",
          "build/app: build/main.o $(LIBS)\n\t$(CC) -o $@ build/main.o -Wl,--start-group $(LIBS) -Wl,--end-group\n\n",
          "build/main.o: src/main.c\n\t@mkdir -p $(@D)\n\t$(CC) $(CFLAGS) -c $< -o $@\n\n",
          "build/%.o: src/%.c\n\t@mkdir -p $(@D)\n\t$(CC) $(CFLAGS) -c $< -o $@\n\n"]
    for m in mods:
        mk.append(f"build/lib{m}.a: {' '.join(objs_by_mod[m])}\n\t$(AR) rcs $@ $^\n\n")
    mk.append("-include $(OBJS:.o=.d)\n")
    with open(os.path.join(d, "Makefile"), "w") as f:
        f.write("".join(mk))
    # the expected output, computed the way the C code does (checked against a build at run time)
    return c_checksum_by_build(d)


def c_checksum_by_build(d: str) -> str:
    """Build the project once in a scratch copy, on the cache's disk, and return what it prints."""
    tmp = d.rstrip("/") + ".check"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    shutil.copytree(d, tmp)
    try:
        bl.run(["make", "-s", "-j2"], cwd=tmp, timeout=1800)
        return bl.run([os.path.join(tmp, "build", "app")], timeout=60).stdout.strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_npm_packages(project: str) -> int:
    with open(os.path.join(project, "node_modules", ".package-lock.json")) as f:
        return sum(1 for k in json.load(f)["packages"] if k.startswith("node_modules/"))


# ---------------------------------------------------------------------------------------------
# commands and their environment

def bench_env(home: str) -> dict:
    """The environment of every workload command: the caller's, less what would make the runs depend
    on it (a virtualenv, PYTHON*/PIP_* settings: PYTHONDONTWRITEBYTECODE would skip every .pyc), a
    HOME of our own, no pip cache, git without system config or background gc."""
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "GIT_", "npm_config_", "NPM_CONFIG_"))}
    env.update(HOME=home, PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", NPM_CONFIG_UPDATE_NOTIFIER="false", NPM_CONFIG_FUND="false",
               NPM_CONFIG_AUDIT="false", PYTHONUNBUFFERED="1")
    env.update(git_env(home, base={}))
    return env


def git_env(home: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_COUNT="2",
               GIT_CONFIG_KEY_0="gc.auto", GIT_CONFIG_VALUE_0="0",
               GIT_CONFIG_KEY_1="maintenance.auto", GIT_CONFIG_VALUE_1="false",
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    return env


def npm_cmd(cache: str) -> list[str]:
    return ["npm", "install", "--offline", "--cache", cache, "--no-audit", "--no-fund", "--loglevel=error"]


# ---------------------------------------------------------------------------------------------
# workloads

@dataclass
class Workload:
    name: str
    title: str
    needs: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    micro: bool = False


WORKLOADS = [
    Workload("venv", "python -m venv"),
    Workload("pip", "pip install requests pytest numpy django rich (local wheelhouse)", ("venv",)),
    Workload("compileall", "python -m compileall over the venv", ("pip",)),
    Workload("import", "import django, numpy, requests, rich, pytest (warm)", ("pip",)),
    Workload("pytest", "Pygments' test suite", ("pip",)),
    Workload("sqlite", "SQLite WAL, synchronous=FULL, single-row commits"),
    Workload("git", f"git clone --no-local ({GIT_COMMITS} commits)", tools=("git",)),
    Workload("git_status", "git status in the clone (warm)", ("git",), tools=("git",)),
    Workload("make", "make -j2 of generated C sources", tools=("make", "gcc", "ar")),
    Workload("npm", "npm install --offline from a primed cache", tools=("node", "npm")),
    Workload("cold_import", "import after remount + drop_caches", ("pip",)),
    Workload("rm", "rm -rf of all of the above", ("pip",)),
    Workload("randread", "4 KiB random read, cold", micro=True),
    Workload("randwrite", "4 KiB random write + fsync", micro=True),
]
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass
class RoundState:
    """One target's directory of one round, and what has been done in it."""
    dir: str
    done: set = field(default_factory=set)
    failed: set = field(default_factory=set)


class AgentBench:
    def __init__(self, a, targets: list[bl.Target], bench: Bench, inputs: Inputs, env: dict):
        self.a = a
        self.targets = targets
        self.bench = bench
        self.inputs = inputs
        self.env = env
        self.data = None          # the micro file's bytes (the same for every target)
        self.checks: dict[str, dict[str, str]] = {}   # workload -> target -> outcome that must match

    # inputs, resolved once before the first round
    def prepare(self, names: set[str]) -> None:
        a = self.a
        if names & {"pip", "compileall", "import", "pytest", "cold_import", "rm"}:
            self.wheelhouse = self.inputs.wheelhouse()
        if "pytest" in names:
            self.pygments = self.inputs.pygments_src()
        if names & {"git", "git_status"}:
            self.repo, self.repo_head = self.inputs.git_repo()
        if "make" in names:
            self.csrc, self.c_expected = self.inputs.c_sources()
        if "npm" in names:
            self.npm_project, self.npm_cache = self.inputs.npm_project()
        if names & {"randread", "randwrite"}:
            log(f"generating {a.micro_mib} MiB of random data for randread/randwrite")
            self.data = os.urandom(a.micro_mib * MiB)

    def run(self, cmd, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return bl.run(cmd, timeout=self.a.cmd_timeout, **kw)

    def timed(self, t: bl.Target, w: Workload, fn, ops=None) -> dict:
        """Run `fn` inside a measured phase; record seconds, requests, daemon CPU. The page cache's
        dirty data goes to the disk (or the daemon) first, so that the previous workload's writeback
        does not land in this one's time."""
        os.sync()
        with self.bench.phase(t, w.name, ops) as ph:
            fn()
        return self.bench.record(w.name, t, ph.elapsed, seconds=ph.elapsed, round=self.rnd, **ph.info)

    def check_same(self, w: Workload, t: bl.Target, outcome: str) -> None:
        """Outcomes that must not depend on the target (test summaries, checksums, package counts)."""
        self.checks.setdefault(w.name, {})[t.name] = outcome
        seen = set(self.checks[w.name].values())
        if len(seen) > 1:
            raise RuntimeError(f"{w.name} on {t.name}: outcome {outcome!r} differs from another target's: "
                               f"{self.checks[w.name]}")

    # --- each workload: fn(t, st, timed?) -------------------------------------------------------
    def w_venv(self, t, st, timed):
        venv = os.path.join(st.dir, "venv")
        cmd = [self.a.python, "-m", "venv", venv]
        return self._maybe_timed(t, "venv", timed, lambda: self.run(cmd))

    def w_pip(self, t, st, timed):
        py = os.path.join(st.dir, "venv", "bin", "python")
        cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", self.wheelhouse] + \
              [f"{k}=={v}" for k, v in PACKAGES.items()]
        return self._maybe_timed(t, "pip", timed, lambda: self.run(cmd))

    def w_compileall(self, t, st, timed):
        py = os.path.join(st.dir, "venv", "bin", "python")
        return self._maybe_timed(t, "compileall", timed,
                                 lambda: self.run([py, "-m", "compileall", "-q", os.path.join(st.dir, "venv")]))

    def _import(self, t, st, name, timed):
        py = os.path.join(st.dir, "venv", "bin", "python")
        return self._maybe_timed(t, name, timed, lambda: self.run([py, "-c", IMPORT_STMT], cwd=st.dir))

    def w_import(self, t, st, timed):
        return self._import(t, st, "import", timed)

    def w_cold_import(self, t, st, timed):
        t.cold()
        return self._import(t, st, "cold_import", timed)

    def w_pytest(self, t, st, timed):
        src = os.path.join(st.dir, "pygments")
        shutil.copytree(self.pygments, src, symlinks=True)
        py = os.path.join(st.dir, "venv", "bin", "python")
        cmd = [py, "-m", "pytest", "-q"] + self.a.pytest_args
        res = {}

        def go():
            p = self.run(cmd, cwd=src, ok_codes=(0, 1))
            last = [ln for ln in p.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
            summary = re.sub(r" in [0-9.]+s.*$", "", last[0]).strip("= ")
            res["summary"] = summary
            if p.returncode != 0:
                raise RuntimeError(f"pytest failed: {summary}\n{p.stdout[-3000:]}")
        self._maybe_timed(t, "pytest", timed, go)
        self.check_same(BY_NAME["pytest"], t, res["summary"])
        if timed:
            self._last_rec["summary"] = res["summary"]

    def w_sqlite(self, t, st, timed):
        db = os.path.join(st.dir, "agent.db")
        cmd = [sys.executable, "-c", SQLITE_SCRIPT, db, str(self.a.sqlite_commits)]
        return self._maybe_timed(t, "sqlite", timed, lambda: self.run(cmd), ops=self.a.sqlite_commits)

    def w_git(self, t, st, timed):
        dst = os.path.join(st.dir, "clone")
        self._maybe_timed(t, "git", timed,
                          lambda: self.run(["git", "clone", "-q", "--no-local", self.repo, dst]))
        head = self.run(["git", "rev-parse", "HEAD"], cwd=dst).stdout.strip()
        if head != self.repo_head:
            raise RuntimeError(f"clone's HEAD {head} is not the source's {self.repo_head}")

    def w_git_status(self, t, st, timed):
        clone = os.path.join(st.dir, "clone")
        cmd = ["git", "status", "--porcelain"]
        # The clone's index is as old as its last files (same clock tick): they are "racily clean",
        # and every status would read them again. An index written a little later has none, so the
        # measured status is what an agent's repeated `git status` costs: lstat and readdir.
        time.sleep(0.05)
        self.run(["git", "update-index", "-q", "--refresh", "--force-write-index"], cwd=clone)
        out = []
        self._maybe_timed(t, "git_status", timed, lambda: out.append(self.run(cmd, cwd=clone).stdout))
        if out[0].strip():
            raise RuntimeError(f"git status of a fresh clone is not clean: {out[0][:500]}")

    def w_make(self, t, st, timed):
        dst = os.path.join(st.dir, "csrc")
        shutil.copytree(self.csrc, dst, symlinks=True)
        self._maybe_timed(t, "make", timed, lambda: self.run(["make", "-s", "-j2"], cwd=dst))
        out = self.run([os.path.join(dst, "build", "app")]).stdout.strip()
        if out != self.c_expected:
            raise RuntimeError(f"the program printed {out!r}, expected {self.c_expected!r}")

    def w_npm(self, t, st, timed):
        dst = os.path.join(st.dir, "npm")
        shutil.copytree(self.npm_project, dst)
        self._maybe_timed(t, "npm", timed, lambda: self.run(npm_cmd(self.npm_cache), cwd=dst))
        n = count_npm_packages(dst)
        self.check_same(BY_NAME["npm"], t, f"{n} packages")
        if timed:
            self._last_rec["packages"] = n

    def w_rm(self, t, st, timed):
        self._maybe_timed(t, "rm", timed, lambda: self.run(["rm", "-rf", st.dir]))
        if os.path.exists(st.dir):
            raise RuntimeError(f"{st.dir} still exists after rm -rf")

    def _micro_file(self, t, st) -> str:
        fn = os.path.join(st.dir + "-micro", "data.bin")
        if os.path.exists(fn):
            return fn
        os.makedirs(os.path.dirname(fn), exist_ok=True)
        write_file(fn, memoryview(self.data))
        return fn

    def w_randread(self, t, st, timed):
        fn = self._micro_file(t, st)
        t.cold()
        offs = bl.random_offsets(len(self.data), self.a.rand_reads, seed=42)   # bench_core's seed
        fd = os.open(fn, os.O_RDONLY)
        try:
            lat = []
            self._maybe_timed(t, "randread", timed, lambda: lat.extend(bl.timed_preads(fd, offs)), ops=len(offs))
        finally:
            os.close(fd)
        if timed:
            self._micro_figures(lat)

    def w_randwrite(self, t, st, timed):
        fn = self._micro_file(t, st)
        offs = bl.random_offsets(len(self.data), self.a.rand_writes, seed=43)  # bench_core's seed
        fd = os.open(fn, os.O_RDWR)
        try:
            lat = []
            self._maybe_timed(t, "randwrite", timed,
                              lambda: lat.extend(bl.timed_pwrites_fsync(fd, offs, memoryview(self.data))),
                              ops=len(offs))
        finally:
            os.close(fd)
        if timed:
            self._micro_figures(lat)

    def _micro_figures(self, lat: list[int]) -> None:
        """IOPS and latency percentiles of the measured run, in its record."""
        r = self._last_rec
        r["iops"] = len(lat) / r["seconds"]
        r["p50_us"] = bl.percentile_us(lat, 0.5)
        r["p99_us"] = bl.percentile_us(lat, 0.99)

    def _maybe_timed(self, t, name, timed, fn, ops=None):
        if timed:
            self._last_rec = self.timed(t, BY_NAME[name], fn, ops=ops)
        else:
            fn()

    # --- the run ---------------------------------------------------------------------------------
    def order(self, rnd: int) -> list[bl.Target]:
        k = rnd % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    def one_round(self, rnd: int, selected: list[str], plan: list[str]) -> None:
        self.rnd = rnd
        states = {t.name: RoundState(os.path.join(t.path, f"r{rnd}")) for t in self.targets}
        for t in self.targets:
            os.makedirs(states[t.name].dir)
        for name in plan:
            w = BY_NAME[name]
            timed = name in selected
            for t in self.order(rnd):
                st = states[t.name]
                missing = [n for n in w.needs if n in st.failed]
                if missing:
                    st.failed.add(name)
                    if timed:
                        self.bench.errors[(name, t.name)] = f"skipped in round {rnd}: {', '.join(missing)} failed"
                    continue
                what = name if timed else f"{name} (setup)"
                bl.log(f"[{t.name}] round {rnd}: {what}")
                ok = self.bench.guarded(t, what if not timed else name,
                                        lambda tt, n=name, s=st, tm=timed: getattr(self, f"w_{n}")(tt, s, tm))
                (st.done if ok else st.failed).add(name)
                t.record_rss()
        for t in self.order(rnd):   # whatever rm did not remove (untimed)
            for d in (states[t.name].dir, states[t.name].dir + "-micro"):
                if os.path.exists(d):
                    bl.run(["rm", "-rf", d], timeout=self.a.cmd_timeout, check=False)


def plan_for(selected: list[str]) -> list[str]:
    """The selected workloads plus what they need, in WORKLOADS order."""
    want = set(selected)
    grew = True
    while grew:
        grew = False
        for n in list(want):
            for d in BY_NAME[n].needs:
                if d not in want:
                    want.add(d)
                    grew = True
    return [w.name for w in WORKLOADS if w.name in want]


# ---------------------------------------------------------------------------------------------
# prerequisites, summary, output

def check_prerequisites(a, names: list[str], plan: list[str]) -> None:
    problems = []
    fuse = [n for n in names if n != "plain"]
    if os.geteuid() != 0 and (fuse or {"cold_import", "randread"} & set(plan)):
        problems.append("root (mounts, /proc/sys/vm/drop_caches): run with sudo")
    if fuse:
        if not os.path.exists("/dev/fuse"):
            problems.append("/dev/fuse")
        if not shutil.which("fusermount3"):
            problems.append("fusermount3 (Debian package fuse3)")
    if "overlay" in names and not shutil.which("fuse-overlayfs"):
        problems.append("fuse-overlayfs (Debian package fuse-overlayfs)")
    if "cowfs" in names:
        ok, why = bl.CowfsTarget.available(a.cowfs)
        if not ok:
            problems.append(f"cowfs: {why} (run scripts/setup.sh or pass --cowfs)")
    for n in plan:
        for tool in BY_NAME[n].tools:
            if not shutil.which(tool):
                pkg = {"node": "nodejs", "npm": "npm", "gcc": "gcc", "make": "make", "ar": "binutils",
                       "git": "git"}[tool]
                msg = f"{tool} for the {n} workload (Debian package {pkg})"
                if msg not in problems:
                    problems.append(msg)
    if set(plan) & {"venv", "pip"}:
        p = subprocess.run([a.python, "-c", "import venv, ensurepip"], capture_output=True, timeout=60)
        if p.returncode != 0:
            problems.append(f"{a.python} with the venv and ensurepip modules (Debian package python3-venv)")
    if problems:
        raise Prerequisite("missing prerequisites:\n  " + "\n  ".join(problems))


def summarize(ab: AgentBench, names: list[str], selected: list[str]) -> dict:
    res = ab.bench.results
    out = {}
    for wn in selected:
        w = BY_NAME[wn]
        per_t = {}
        for tn in names:
            recs = res.get(wn, {}).get(tn, [])
            err = ab.bench.errors.get((wn, tn))
            if not recs:
                per_t[tn] = {"median_s": None, "rounds_s": [], "rounds": [], "error": err}
                continue
            secs = [r["seconds"] for r in recs]
            med = statistics.median(secs)
            rep = min(recs, key=lambda r: abs(r["seconds"] - med))
            req = rep.get("daemon_req")
            s = {"median_s": med, "rounds_s": secs,
                 "rounds": [{k: v for k, v in r.items() if k != "value"} for r in recs],
                 "requests": req, "requests_total": sum(req.values()) if req else None,
                 "daemon_cpu_s": rep.get("daemon_cpu_s"), "error": err}
            if rep.get("kernel_req") is not None:
                s["kernel_requests"] = rep["kernel_req"]
            if w.micro:
                s["iops"] = statistics.median(r["iops"] for r in recs)
                s["p50_us"], s["p99_us"] = rep["p50_us"], rep["p99_us"]
            per_t[tn] = s
        c = per_t.get("cowfs", {}).get("median_s")
        o = per_t.get("overlay", {}).get("median_s")
        p = per_t.get("plain", {}).get("median_s")
        out[wn] = {"title": w.title, "kind": "micro" if w.micro else "workload", "targets": per_t,
                   "ratio_cowfs_overlay": c / o if c and o else None,
                   "ratio_cowfs_plain": c / p if c and p else None,
                   "ratio_overlay_plain": o / p if o and p else None}
    return out


def geomean(vals: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def top_requests(req: dict | None, n: int = 4) -> str:
    if not req:
        return ""
    return " ".join(f"{k} {v}" for k, v in sorted(req.items(), key=lambda kv: -kv[1])[:n])


def render(out: dict, names: list[str]) -> str:
    res = out["workloads"]
    L = []
    cols = [TARGET_LABEL[n] + " s" for n in names]
    hdr = ["workload"] + cols + ["cowfs / overlay", "cowfs / plain", "cowfs requests", "top cowfs requests",
                                 "cowfs CPU s", "overlay CPU s"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "|".join(["---"] * len(hdr)) + "|")
    for wn, r in res.items():
        row = [f"{wn}: {r['title']}"]
        for tn in names:
            s = r["targets"][tn]
            if s["median_s"] is None:
                row.append("ERROR" if s["error"] else "n/a")
                continue
            rs = s["rounds_s"]
            row.append(fmt_num(s["median_s"]) + (f" ({fmt_num(min(rs))}–{fmt_num(max(rs))})" if len(rs) > 1 else ""))
        c = r["targets"].get("cowfs", {})
        o = r["targets"].get("overlay", {})
        row += [f"{r['ratio_cowfs_overlay']:.2f}" if r["ratio_cowfs_overlay"] else "",
                f"{r['ratio_cowfs_plain']:.2f}" if r["ratio_cowfs_plain"] else "",
                f"{c['requests_total']:,}" if c.get("requests_total") else "",
                top_requests(c.get("requests")),
                fmt_num(c["daemon_cpu_s"]) if c.get("daemon_cpu_s") is not None else "",
                fmt_num(o["daemon_cpu_s"]) if o.get("daemon_cpu_s") is not None else ""]
        L.append("| " + " | ".join(row) + " |")
    micro = [(wn, r) for wn, r in res.items() if r["kind"] == "micro"]
    if micro:
        L.append("")
        L.append("Microbenchmarks (IOPS, higher is better; p50 / p99 latency in µs):")
        for wn, r in micro:
            parts = []
            for tn in names:
                s = r["targets"][tn]
                if s.get("iops") is not None:
                    parts.append(f"{TARGET_LABEL[tn]} {s['iops']:,.0f} ({s['p50_us']:.0f} / {s['p99_us']:.0f})")
            c, o = r["targets"].get("cowfs", {}), r["targets"].get("overlay", {})
            ratio = f"; cowfs / overlay {c['iops'] / o['iops']:.2f}x the rate" if c.get("iops") and o.get("iops") else ""
            L.append(f"  {wn}: " + ", ".join(parts) + ratio)
    L.append("")
    g = out["geomean"]
    parts = [f"{TARGET_LABEL[k.split('_')[0]]} / {TARGET_LABEL[k.split('_')[1]]} {v:.2f}x ({g['n_' + k]} workloads)"
             for k, v in g.items() if not k.startswith("n_") and v is not None]
    L.append("Geometric mean over the workloads (not the microbenchmarks): " + (", ".join(parts) or "n/a"))
    L.append("")
    L.append("cowfs requests by op (median round), worst ratio first (to fuse-overlayfs, else to plain):")
    order = sorted(res.items(), key=lambda kv: -(kv[1]["ratio_cowfs_overlay"] or kv[1]["ratio_cowfs_plain"] or 0))
    for wn, r in order:
        c = r["targets"].get("cowfs", {})
        if c.get("requests"):
            ops = ", ".join(f"{k} {v:,}" for k, v in sorted(c["requests"].items(), key=lambda kv: -kv[1]))
            ratio = r["ratio_cowfs_overlay"]
            L.append(f"  {wn} ({f'{ratio:.2f}x overlay' if ratio else 'no overlay figure'}): {ops}")
    for e in out["errors"]:
        L.append(f"ERROR {e}: {out['errors'][e]}")
    for n in out["notes"]:
        L.append(f"note: {n}")
    return "\n".join(L)


def repo_commit() -> str:
    p = subprocess.run(["git", "-C", bl.REPO, "describe", "--always", "--dirty", "--abbrev=12"],
                       capture_output=True, text=True, timeout=30)
    return p.stdout.strip() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="agent workloads on plain / fuse-overlayfs / cowfs (see the "
                                             "module docstring)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (the table goes to stderr)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round and smaller inputs (sqlite 300 commits, 2x15 C files, pytest "
                         "tests/snippets, a 32 MiB micro file, 500 reads, 200 writes); explicit flags win")
    ap.add_argument("--rounds", type=int, help="rounds; each figure is the median (3; --quick 1)")
    ap.add_argument("--only", help="comma-separated workloads (default: all): " + ",".join(BY_NAME))
    ap.add_argument("--targets", default="plain,overlay,cowfs", help="comma-separated: plain,overlay,cowfs")
    ap.add_argument("--cache", default="/var/tmp/cowfs-bench-agent-cache",
                    help="where the inputs are built once and kept")
    ap.add_argument("--workdir", default="/var/tmp/cowfs-bench-agent",
                    help="scratch directory for the targets (removed and recreated)")
    ap.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable),
                    help="the interpreter the venv workload uses (default: the one under this script's venv)")
    ap.add_argument("--sqlite-commits", type=int)
    ap.add_argument("--micro-mib", type=int, help="size of the randread/randwrite file, MiB (1024)")
    ap.add_argument("--rand-reads", type=int)
    ap.add_argument("--rand-writes", type=int)
    ap.add_argument("--cowfs", default=None, help="cowfs executable (.venv/bin/cowfs)")
    ap.add_argument("-o", "--cowfs-option", action="append", default=[], help="passed to cowfs mount -o")
    ap.add_argument("--trace", action="store_true",
                    help="also count requests in the kernel (fuse:fuse_request_send), for fuse-overlayfs too")
    ap.add_argument("--cmd-timeout", type=int, default=1800, help="timeout of each command, s")
    ap.add_argument("--hang-timeout", type=int, default=1800,
                    help="abort a FUSE target's connection when one workload on it takes longer, s")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)

    sizes = QUICK if a.quick else FULL
    for k in ("sqlite_commits", "micro_mib", "rand_reads", "rand_writes", "rounds"):
        if getattr(a, k) is None:
            setattr(a, k, sizes[k])
    a.pytest_args = sizes["pytest_args"]
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    bad = [n for n in names if n not in TARGET_LABEL]
    if bad or not names or len(set(names)) != len(names):
        ap.error(f"--targets: {a.targets!r}: a comma-separated subset of plain,overlay,cowfs")
    selected = [w.name for w in WORKLOADS] if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in selected if n not in BY_NAME]
    if bad or not selected:
        ap.error(f"--only: unknown workload(s) {', '.join(bad) or '(none given)'}; known: {', '.join(BY_NAME)}")
    selected = [w.name for w in WORKLOADS if w.name in selected]
    plan = plan_for(selected)
    try:
        check_prerequisites(a, names, plan)
    except Prerequisite as e:
        print(f"bench_agent: {e}", file=sys.stderr)
        return 2

    info = bl.machine_info()
    info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    cmdline = "scripts/bench_agent.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = repo_commit()
    tell = sys.stderr if a.json else sys.stdout
    print(f"# bench_agent: {info['date']}; {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, "
          f"kernel {info['kernel']}, Python {info['python']}; cowfs {commit}", file=tell)
    print(f"# command: {cmdline.strip()}", file=tell)
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; rounds {a.rounds}; "
          f"targets {','.join(names)}; workloads {','.join(selected)}", file=tell, flush=True)

    workdir = os.path.abspath(a.workdir)
    if os.path.exists(workdir):
        for n in TARGET_LABEL:  # leftovers of an interrupted run
            mp = os.path.join(workdir, n, "mnt")
            if bl.is_mounted(mp):
                bl.run(["fusermount3", "-uz", mp], timeout=30, check=False)
        bl.run(["rm", "-rf", workdir], timeout=1800)
    os.makedirs(workdir)
    env = bench_env(os.path.join(workdir, "home"))
    inputs = Inputs(a.cache, a.python, sizes)
    notes = []
    tracer = None
    if a.trace:
        tracer = bl.FuseTracer()
        if not tracer.available:
            notes.append(f"kernel request counts n/a: {tracer.error}")
            tracer = None
    targets = [bl.make_target(n, workdir, **({"cowfs_bin": a.cowfs, "mount_opts": a.cowfs_option}
                                                 if n == "cowfs" else {})) for n in names]
    bench = Bench(a, targets, tracer, None)
    ab = AgentBench(a, targets, bench, inputs, env)
    t_start = time.monotonic()
    started = []
    try:
        ab.prepare(set(plan))
        for t in targets:
            started.append(t)
            t.setup()
            t.mount()
            bench.calibrate(t)
        for rnd in range(a.rounds):
            ab.one_round(rnd, selected, plan)
        for t in targets:
            if t.name == "cowfs" and t.stats_missing:
                notes.append(t.stats_missing)
    finally:
        for t in started:
            t.teardown()
        if tracer:
            tracer.close()
        left = [ln for ln in open("/proc/self/mounts") if workdir + "/" in ln]
        if left:
            bl.log(f"!! still mounted: {left}")
        else:
            bl.run(["rm", "-rf", workdir], timeout=1800, check=False)

    elapsed = time.monotonic() - t_start
    wl = summarize(ab, names, selected)
    g = {}
    for key in ("cowfs_overlay", "cowfs_plain", "overlay_plain"):
        vals = [r[f"ratio_{key}"] for r in wl.values() if r["kind"] == "workload" and r[f"ratio_{key}"]]
        g[key] = geomean(vals)
        g["n_" + key] = len(vals)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = {"machine": info, "command": cmdline.strip(), "commit": commit,
           "config": {"rounds": a.rounds, "quick": a.quick, "targets": names, "workloads": selected,
                      "sqlite_commits": a.sqlite_commits, "micro_mib": a.micro_mib, "rand_reads": a.rand_reads,
                      "rand_writes": a.rand_writes, "pytest_args": a.pytest_args, "cowfs_options": a.cowfs_option,
                      "cache": inputs.cache, "packages": PACKAGES, "npm": NPM_DEPS},
           "workloads": wl, "geomean": g,
           "peak_rss_mib": {t.name: round(t.peak_rss_kb / 1024, 1) for t in targets if t.peak_rss_kb},
           "errors": {f"{w}/{tn}": e for (w, tn), e in bench.errors.items()},
           "notes": notes, "elapsed_s": round(elapsed, 1)}
    print("", file=tell)
    print(render(out, names), file=tell)
    print(f"# total time {elapsed:.0f} s; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in info['loadavg_end'])}", file=tell, flush=True)
    if a.json:
        print(json.dumps(out))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
