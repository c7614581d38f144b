"""The command line an operator expects (issue 25): clear errors and exit codes, the same
output style everywhere, help, completion and progress; as root and as the unprivileged uid.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import mounting
from conftest import UNPRIV_GID, UNPRIV_UID

COWFS = mounting.cowfs_command()
REPO = Path(__file__).resolve().parent.parent


def cowfs(*args, check=False, timeout=120, uid=None, groups=(), cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI (as uid, with only the supplementary groups given, when uid is given)."""
    if uid is not None:
        r = mounting.run_cowfs_as(uid, UNPRIV_GID if uid == UNPRIV_UID else uid, *args, groups=groups,
                                  cwd=cwd or "/", text=True, timeout=timeout, check=False)
    else:
        r = subprocess.run(COWFS + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, cwd=cwd or "/")
    if check and r.returncode != 0:
        raise AssertionError(f"cowfs {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def one_clear_line(r: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: a message, never a traceback."""
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr.split("\n", 1)[0], r.stderr
    assert r.stderr.startswith("cowfs: "), r.stderr
    return r.stderr


# -- 1, 2: errors say what was refused and who may do it, never with a traceback --------------------
@pytest.mark.timeout(240)
def test_unprivileged_user_gets_reasons_not_tracebacks(mount_factory):
    m = mount_factory(options=["allow_other"])
    mp = str(m.path)
    (m.path / "f").write_bytes(b"data")
    nobody = UNPRIV_UID

    for args in (("umount", "--force", mp), ("umount", mp)):
        r = cowfs(*args, uid=nobody)
        err = one_clear_line(r)
        assert r.returncode == 1 and "mounted by root (uid 0)" in err and "only that user or root" in err, err
        assert "mtab" not in err and "--force" not in err
    assert m.mounted()
    for args in (("gc", mp), ("dedup", "--wait", mp), ("dedup", mp)):
        r = cowfs(*args, uid=nobody)
        err = one_clear_line(r)
        assert r.returncode == 1 and "permission denied" in err and "answers only root" in err, err
        assert ".cowfs/stats" in err
    # stats: the admin channel is refused, the mount's world-readable .cowfs/stats is not
    r = cowfs("stats", mp, uid=nobody)
    assert r.returncode == 0 and "Errno" not in r.stderr, r.stderr
    assert re.search(r"^branch\s+main", r.stdout, re.M) and "{" not in r.stdout and "True" not in r.stdout
    assert json.loads(cowfs("stats", mp, "--json", uid=nobody).stdout)["branch"] == "main"
    # the control file: who may use it, once; not a doubled path, not a bare "Permission denied"
    for args in (("log", mp), ("snapshot", mp, "x"), ("list", mp), ("diff", mp, "x")):
        r = cowfs(*args, uid=nobody)
        err = one_clear_line(r)
        assert r.returncode == 1 and err.count(mp) == 1, err
        assert "the owner of the mount root" in err and "root" in err and "-o ctl_group=" in err, err
    r = cowfs("fsck", m.store, uid=nobody)
    assert r.returncode == 8 and "not checked" in one_clear_line(r)


@pytest.mark.timeout(120)
def test_ctl_refusal_names_the_ctl_group(mount_factory):
    m = mount_factory(options=["allow_other", "ctl_group=4242"])
    err = one_clear_line(cowfs("snapshot", m.path, "x", uid=UNPRIV_UID))
    assert "gid 4242" in err or "(gid 4242)" in err, err
    assert "-o ctl_group=" in err
    r = cowfs("snapshot", m.path, "by-member", uid=UNPRIV_UID, groups=[4242])      # a member may
    assert r.returncode == 0 and r.stdout == "snapshot by-member taken\n", r.stderr


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch):
    from cowfs import cli
    from cowfs.cli import maintenance

    def boom(target):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(maintenance, "store_stats", boom)
    r = CliRunner().invoke(cli.main, ["stats", "/nowhere"])
    assert r.exit_code == 1
    assert r.stderr == "cowfs: internal error: RuntimeError: disk on fire (cowfs --debug shows the traceback)\n"
    r = CliRunner().invoke(cli.main, ["--debug", "stats", "/nowhere"])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "disk on fire" in r.stderr
    r = CliRunner().invoke(cli.main, ["stats", "/nowhere"], env={"COWFS_DEBUG": "1"})
    assert "Traceback" in r.stderr


# -- 3: fsck's exit codes ---------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_fsck_could_not_check_has_its_own_exit_code(mount_factory, tmp_path):
    m = mount_factory()
    r = cowfs("fsck", m.store)
    assert r.returncode == 8 and "not checked" in one_clear_line(r) and "cowfs umount" in r.stderr
    r = cowfs("fsck", m.store, "--json")
    assert r.returncode == 8 and json.loads(r.stdout)["exit_code"] == 8
    r = cowfs("fsck", tmp_path / "nowhere")
    assert r.returncode == 8 and "no such store" in r.stderr
    m.stop()
    r = cowfs("fsck", m.store, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout
    text = cowfs("fsck", "--help").stdout
    for code in ("0", "1", "2", "4", "8"):
        assert re.search(rf"^\s+{code}\s+\S", text, re.M), (code, text)
    assert "could not check" in text


# -- 4: a busy mount names its users; --force only for a daemon that does not answer ----------------
@pytest.mark.timeout(180)
def test_umount_of_a_busy_mount_names_the_processes(mount_factory):
    m = mount_factory(options=["allow_other"])
    (m.path / "held").write_bytes(b"x")
    sleeper = subprocess.Popen(["sleep", "120"], cwd=m.path)
    opener = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print('open', flush=True);"
                               " time.sleep(120)", str(m.path / "held")], stdout=subprocess.PIPE, cwd="/")
    daemon = int((m.store / "daemon.pid").read_text())
    try:
        assert opener.stdout.readline() == b"open\n"
        r = cowfs("umount", m.path, "--timeout", "20")
        err = one_clear_line(r)
        assert r.returncode == 1 and "is busy" in err, err
        assert f"pid {sleeper.pid} (sleep, uid 0): current directory" in err, err
        assert f"pid {opener.pid} (python" in err and f"open file {m.path / 'held'}" in err, err
        assert "--force" not in err, "the daemon answers: --force is not the way out"
        assert m.mounted()
        os.kill(daemon, signal.SIGSTOP)
        try:
            r = cowfs("umount", m.path, "--timeout", "20")
        finally:
            os.kill(daemon, signal.SIGCONT)
        err = one_clear_line(r)
        assert r.returncode == 1 and f"pid {sleeper.pid}" in err, err
        assert "does not answer" in err and f"cowfs umount --force {m.path}" in err, err
    finally:
        for p in (sleeper, opener):
            p.kill()
            p.wait()
    assert m.mounted()


@pytest.mark.timeout(120)
def test_umount_of_a_mount_whose_store_was_deleted_ends_it_and_its_daemon(mount_factory):
    """A store's directory removed while mounted: `cowfs umount` ends the mount, and with it
    the daemon, saying why, where it said the store was private to its owner."""
    m = mount_factory()
    (m.path / "f").write_bytes(b"x")
    assert int((m.store / "daemon.pid").read_text()) == m.proc.pid
    shutil.rmtree(m.store)
    r = cowfs("umount", m.path, "--timeout", "30")
    assert r.returncode == 0 and "no longer exists (deleted while mounted)" in r.stdout, (r.stdout, r.stderr)
    assert not m.mounted()
    # it exits (with the error of its last flush: its database's files are gone)
    m.exit_codes.append(m.proc.wait(timeout=30))


# -- 9: one output style; --json on every command that prints data -----------------------------------
DATA_COMMANDS = ("stats", "list", "log", "diff", "status", "gc", "dedup", "fsck", "snapshot", "branch", "rollback",
                 "clone", "delete", "import", "export", "push", "pull")


def test_every_data_command_has_json():
    from cowfs import cli
    from cowfs.cli.help import commands

    for name in DATA_COMMANDS:
        opts = {o for p in commands(cli.main)[name].params for o in getattr(p, "opts", [])}
        assert "--json" in opts, name


def test_human_output_formats():
    from cowfs.cli import report

    listing = {"snapshots": [{"name": "s", "kind": "snapshot", "parent": "main", "created": 1.7e9,
                              "logical_bytes": 3 << 30, "inodes": 12345}],
               "branches": [{"name": "main", "kind": "branch", "parent": None, "created": 1.7e9,
                             "logical_bytes": 1536, "inodes": 2, "mounted_here": True}]}
    lines = report.list_lines(listing)
    assert lines[0].split() == ["NAME", "KIND", "PARENT", "CREATED", "LOGICAL", "ALLOCATED", "INODES"]
    assert "3.0 GiB" in lines[1] and "12,345" in lines[1] and "1.5 KiB" in lines[2] and "mounted here" in lines[2]
    assert "3221225472" not in "\n".join(lines)
    text = "\n".join(report.stats_lines({"store": "/s", "daemon_pid": 5, "uptime_s": 61, "rss_bytes": 1 << 20,
                                         "peak_rss_bytes": 2 << 20, "branch": "main", "usage_bytes": 10,
                                         "usage_inodes": 1, "logical_bytes": 2048, "stored_bytes": 4096,
                                         "wal_bytes": 0, "unflushed_bytes": 0, "background_queue": 0,
                                         "cache": {"l1": {"bytes": 1, "max_bytes": 2, "hit_rate": 0.5}}}))
    assert "{" not in text and "True" not in text and "1m01s" in text and "2.0 KiB" in text and "50.0%" in text


@pytest.mark.timeout(240)
def test_stats_tells_the_wal_apart_and_peak_memory_is_a_peak(mount_factory):
    m = mount_factory()
    for i in range(2000):                                   # small files: their data goes through the WAL
        (m.path / f"f{i}").write_bytes(os.urandom(8000))
    live = []
    for _ in range(5):
        s = json.loads(cowfs("stats", m.path, "--json", check=True).stdout)
        assert s["peak_rss_bytes"] >= s["rss_bytes"], s
        live.append(s)
        (m.path / f"more{len(live)}").write_bytes(os.urandom(1 << 20))
    s = live[0]
    assert s["wal_bytes"] > 4 << 20, s                      # the data is in the log ...
    assert abs(s["stored_bytes"] + s["wal_bytes"] - s["disk_bytes"]) < 2 << 20, s   # ... and not counted twice
    m.stop()
    offline = json.loads(cowfs("stats", m.store, "--json", check=True).stdout)
    # The figure a user watches never shows the log's transient bytes: it is at most what the
    # store keeps once unmounted (with the WAL in it, it was about twice that).
    assert all(x["stored_bytes"] <= offline["stored_bytes"] + (1 << 20) for x in live), (live, offline)


# -- 10: version, help, man page, completion, the control file's help, mount options -----------------
def test_version_matches_the_package():
    r = cowfs("--version", check=True)
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert r.stdout.strip() == f"cowfs {version}"


def test_commands_load_lazily_from_the_modules_the_table_names():
    """`cowfs.cli.main.LAZY_COMMANDS` names each command's module: every command a module
    defines is in the table under that module, and a command imports only its own."""
    import importlib

    from cowfs.cli.main import LAZY_COMMANDS, main

    for module in set(LAZY_COMMANDS.values()):
        names = {c.name for c in importlib.import_module(f"cowfs.cli.{module}").COMMANDS}
        assert names == {n for n, m in LAZY_COMMANDS.items() if m == module}, module
    probe = ("import json, sys; from cowfs.cli.main import main; own = sorted(main.commands); "
             "main.get_command(None, 'snapshot'); "
             "print(json.dumps([own, sorted(m for m in sys.modules if m.startswith('cowfs.cli.'))]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    own, loaded = json.loads(r.stdout)
    assert own == ["init", "mount", "umount"] and not set(own) & set(LAZY_COMMANDS)
    assert "cowfs.cli.control" in loaded
    assert not {"cowfs.cli.fleet", "cowfs.cli.maintenance", "cowfs.cli.history"} & set(loaded), loaded


def test_help_topics_and_man_page_come_from_the_same_text():
    from cowfs import cli
    from cowfs.cli.help import commands

    own = {}
    for name in commands(cli.main):
        own[name] = cowfs(name, "--help", check=True).stdout
        assert cowfs("help", name, check=True).stdout == own[name], name
    man = cowfs("help", "--man", check=True).stdout
    for name in commands(cli.main):
        assert f".SS {name}\n" in man
        first = own[name].splitlines()[2].strip()     # the first line of its text
        assert first.replace("\\", "\\e") in man, (name, first)
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=man, capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0 and not rendered.stderr, rendered.stderr
    listing = cowfs("help", check=True).stdout
    for topic in ("mount-options", "control-file", "exit-codes", "completion"):
        assert topic in listing and cowfs("help", topic, check=True).stdout.strip()
    r = cowfs("help", "nonsense")
    assert r.returncode == 2 and "no help topic" in r.stderr


def test_mount_help_lists_every_option_the_daemon_parses():
    from cowfs import mount_helper
    from cowfs.daemon import config as daemon, options as mount_options

    text = cowfs("mount", "--help", check=True).stdout
    for o in mount_options.OPTIONS:
        assert re.search(rf"^\s+{re.escape(o.syntax)}\s", text, re.M), o.syntax
    for name in ("warm", "spin_us", "share", "dedup_cpu", "cache_l2"):
        assert f"{name}=" in text
    # each option is taken by cowfs mount and by mount.fuse.cowfs alike
    samples = {"SIZE": "1M", "0|1": "0", "on|off": "off", "N": "5", "SHARE": "0.5", "GROUP": "0", "LIST": "0-1",
               "SECONDS": "2.5", "SIZE|auto": "auto"}
    for o in mount_options.OPTIONS:
        word = o.syntax if o.value is None else f"{o.name}={samples[o.value]}"
        mount_options.apply(daemon.MountConfig("", ""), word)
        mount_helper.parse_args(["store", "mp", "-o", word])
    with pytest.raises(mount_options.OptionError, match="unknown mount option 'nope'"):
        mount_options.apply(daemon.MountConfig("", ""), "nope")


@pytest.mark.timeout(120)
def test_control_file_help_lists_its_commands(cowfs_mount):
    from cowfs.commands import protocol

    err, out = mounting.ctl_exchange(cowfs_mount.path, b"help\n")
    reply = json.loads(out)
    assert err == 0 and reply["ok"]
    assert [c["name"] for c in reply["commands"]] == list(protocol.COMMANDS)
    text = cowfs("help", "control-file", check=True).stdout
    for c in reply["commands"]:
        assert c["usage"] in text and c["help"].split()[0] in text
    err, out = mounting.ctl_exchange(cowfs_mount.path, b"frobnicate\n")
    assert "`help`" in json.loads(out)["error"]


def _complete(words: str, env_extra: dict | None = None) -> list[str]:
    """What bash completion offers after `words` (the last word is being completed)."""
    parts = words.split(" ")
    env = dict(os.environ, _COWFS_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1))
    r = subprocess.run(COWFS, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [ln.split(",", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("plain,")]


@pytest.mark.timeout(120)
def test_shell_completion(cowfs_mount):
    mp = str(cowfs_mount.path)
    assert "snapshot" in _complete("cowfs sn") and "status" not in _complete("cowfs sn")
    assert _complete("cowfs mount --fo") == ["--foreground"]
    assert mp in _complete("cowfs rollback ")
    assert mp in _complete(f"cowfs snapshot {mp[:len(mp) // 2 + 1]}")
    for name in ("before-tests", "before-upgrade"):
        assert mounting.ctl_exchange(cowfs_mount.path, f"snapshot {name}\n".encode())[0] == 0
    assert _complete(f"cowfs rollback {mp} before-") == ["before-tests", "before-upgrade"]
    assert _complete(f"cowfs diff {cowfs_mount.store} before-") == ["before-tests", "before-upgrade"]
    assert "main" in _complete(f"cowfs diff {mp} ")
    assert "mount-options" in _complete("cowfs help mo")
    r = subprocess.run(COWFS, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, _COWFS_COMPLETE="bash_source"))
    assert "complete " in r.stdout and "_COWFS_COMPLETE" in r.stdout


# -- 12: progress on a terminal, quiet otherwise ----------------------------------------------------
@pytest.mark.timeout(240)
def test_long_commands_show_progress_on_a_terminal_only(mount_factory, tmp_path):
    m = mount_factory()
    for i in range(300):
        (m.path / f"f{i}").write_bytes(os.urandom(4000) * 2)
    assert mounting.ctl_exchange(m.path, b"snapshot s\n")[0] == 0
    # export to a tar stream: stdout is a pipe, stderr the terminal
    code, out = mounting.run_on_tty(["sh", "-c", f"{' '.join(COWFS)} export {m.path} s - | wc -c"])
    assert code == 0 and "exporting" in out and "100%" in out, out
    r = subprocess.run(COWFS + ["export", str(m.path), "s", "-"], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stderr == b"" and len(r.stdout) > 2_400_000
    code, out = mounting.run_on_tty(COWFS + ["gc", str(m.path)])
    assert code == 0 and "removed" in out, out
    m.stop()
    code, out = mounting.run_on_tty(COWFS + ["fsck", str(m.store)])
    assert code == 0 and "fsck: " in out and "clean" in out, out
    code, out = mounting.run_on_tty(COWFS + ["fsck", str(m.store), "--json"])
    assert code == 0 and "fsck: " not in out and json.loads(out)["clean"]
    code, out = mounting.run_on_tty(COWFS + ["gc", str(m.store)])
    assert code == 0 and "offline" in out, out
    r = cowfs("fsck", m.store)
    assert r.returncode == 0 and r.stderr == ""


# -- 13: setup.sh leaves the machine-wide links alone unless --system --------------------------------
# Exclusive: setup.sh runs on this checkout's .venv, which every test's daemon runs from (it
# reinstalls cowfs there when pyproject.toml is newer than the last install, and compiles).
@pytest.mark.exclusive
@pytest.mark.timeout(600)
def test_setup_links_only_with_system(tmp_path):
    root = tmp_path / "root"
    other = "/elsewhere/.venv/bin/cowfs"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    os.symlink(other, root / "usr/local/bin/cowfs")
    env = dict(os.environ, COWFS_SYSTEM_ROOT=str(root))
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr
    assert os.readlink(root / "usr/local/bin/cowfs") == other
    assert f"{root}/usr/local/bin/cowfs points at {other} (left as it is; --system points it here)" in r.stdout
    assert not os.path.lexists(root / "sbin/mount.fuse.cowfs") and "is not installed" in r.stdout
    r = subprocess.run(["bash", "scripts/setup.sh", "--system"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=580)
    assert r.returncode == 0, r.stderr
    for link, target in (("usr/local/bin/cowfs", "cowfs"), ("sbin/mount.fuse.cowfs", "mount.fuse.cowfs"),
                         ("sbin/mount.cowfs", "mount.fuse.cowfs")):
        assert os.readlink(root / link) == str(REPO / ".venv/bin" / target)


# -- 14: benchmarks fetch their own inputs -----------------------------------------------------------
@pytest.mark.timeout(600)
def test_bench_cache_fetches_its_own_inputs(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    have = Path("/var/tmp/cowfs-test-cache/Django-5.1.4.tar.gz")
    if have.exists():          # spare the download; the .tar the benchmark reads is still missing
        shutil.copy(have, cache)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "scripts/bench_cache.py", "--quick", "--parts", "micro", "--json",
                        "--base", str(tmp_path / "base")], cwd=REPO, capture_output=True, text=True, timeout=580,
                       env=dict(os.environ, COWFS_BENCH_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cache / "Django-5.1.4.tar").exists()
    assert json.loads(r.stdout.splitlines()[-1])["l1_hit_median_ns"] > 0
    print(f"bench_cache --quick --parts micro from an empty cache: {time.monotonic() - t0:.0f} s")


# -- 7: paths as a user means them -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_paths_are_taken_from_the_current_directory(cowfs_mount, tmp_path):
    mp = cowfs_mount.path
    (mp / "repo" / "sub").mkdir(parents=True)
    (mp / "repo" / "README.md").write_text("hello\n")
    assert mounting.ctl_exchange(mp, b"snapshot s\n")[0] == 0
    cowfs("clone", ".", "README.md", "R2", cwd=mp / "repo", check=True)
    assert (mp / "repo" / "R2").read_text() == "hello\n"
    cowfs("clone", ".", "../README.md", "R3", cwd=mp / "repo" / "sub", check=True)
    assert (mp / "repo" / "sub" / "R3").read_text() == "hello\n"
    cowfs("clone", mp / "repo", "../.cowfs/snapshots/s/repo/README.md", "from-snapshot", cwd=mp / "repo", check=True)
    assert (mp / "repo" / "from-snapshot").read_text() == "hello\n"
    cowfs("clone", mp / "repo" / "sub", mp / "repo" / "README.md", mp / "absolute", check=True)
    assert (mp / "absolute").read_text() == "hello\n"
    cowfs("clone", mp, "repo/README.md", "from-root", check=True)        # from outside: the mount root
    assert (mp / "from-root").read_text() == "hello\n"
    # every command about a mount takes any path inside it
    cowfs("snapshot", mp / "repo" / "sub", "s2", check=True)
    assert "s2" in cowfs("list", ".", cwd=mp / "repo", check=True).stdout
    assert "s2" in cowfs("log", "sub", cwd=mp / "repo", check=True).stdout
    assert "+\trepo/R2" in cowfs("diff", ".", "s", cwd=mp / "repo" / "sub", check=True).stdout
    assert json.loads(cowfs("stats", "sub", "--json", cwd=mp / "repo", check=True).stdout)["branch"] == "main"
    assert "removed" in cowfs("gc", mp / "repo", check=True).stdout
    (rec,) = json.loads(cowfs("status", "sub", "--json", cwd=mp / "repo", check=True).stdout)["stores"]
    assert rec["store"] == str(cowfs_mount.store)
    r = cowfs("clone", ".", "../../x", "y", cwd=mp / "repo")
    assert r.returncode == 1 and "../../x is outside the mount" in one_clear_line(r)
    r = cowfs("snapshot", tmp_path, "x")
    assert r.returncode == 1 and "is not inside a cowfs mount" in one_clear_line(r)
    r = cowfs("snapshot", cowfs_mount.store, "x")
    assert r.returncode == 1 and "is a store, not a mount" in one_clear_line(r)


# -- 8: any name travels; names print as git prints them ---------------------------------------------
ODD = 'new\nline "q" \\ é\t'
NOT_UTF8 = os.fsdecode(b"bad\xff")


def test_names_are_quoted_as_git_quotes_them(tmp_path):
    from cowfs.cli.textfmt import quote_path

    names = [ODD, NOT_UTF8, "plain.txt", "sp ace", "tab\there", "ü"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    out = subprocess.run(["git", "-C", str(tmp_path), "-c", "core.quotePath=true", "diff", "--cached", "--name-only"],
                         capture_output=True, check=True).stdout
    theirs = sorted(os.fsdecode(ln) for ln in out.splitlines())
    assert sorted(quote_path(n) for n in names) == theirs


def test_control_lines_carry_every_name():
    from hypothesis import given, settings, strategies as st

    from cowfs.commands import protocol

    byte_names = st.binary(min_size=0, max_size=20).filter(lambda b: b"\0" not in b)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(byte_names.map(os.fsdecode), min_size=1, max_size=4))
    def round_trip(words):
        line = protocol.join(words)
        assert "\n" not in line and line.isascii()
        assert protocol.split(line) == words

    round_trip()


@pytest.mark.timeout(180)
def test_odd_names_clone_and_diff(cowfs_mount):
    mp = cowfs_mount.path
    for n in (ODD, NOT_UTF8):
        (mp / n).write_bytes(b"content")
    assert mounting.ctl_exchange(mp, b"snapshot s\n")[0] == 0
    for n in (ODD, NOT_UTF8):
        cowfs("clone", mp, n, n + "2", check=True)
        assert (mp / (n + "2")).read_bytes() == b"content"
    out = cowfs("diff", mp, "s", check=True).stdout
    assert out.splitlines() == ['+\t"bad\\3772"', '+\t"new\\nline \\"q\\" \\\\ \\303\\251\\t2"'], out
    raw = subprocess.run(COWFS + ["diff", str(mp), "s", "-z"], capture_output=True, check=True, timeout=60).stdout
    assert raw == b"+\0bad\xff2\0+\0" + os.fsencode(ODD) + b"2\0"
    changes = json.loads(cowfs("diff", mp, "s", "--json", check=True).stdout)["changes"]
    assert sorted(c["path"] for c in changes) == sorted([NOT_UTF8 + "2", ODD + "2"])


# -- 5: messages about mounted branches ---------------------------------------------------------------
@pytest.mark.timeout(120)
def test_mounting_a_mounted_branch_says_where(mount_factory, test_dir):
    m = mount_factory()
    second = test_dir / "second"
    second.mkdir()
    r = cowfs("mount", m.store, second)
    assert r.returncode == 1 and f"branch 'main' is already served by pid {m.pid} at {m.path}" in one_clear_line(r), r.stderr


@pytest.mark.timeout(120)
def test_rm_rf_of_the_control_directory_is_one_refusal(mount_factory):
    m = mount_factory(options=["allow_other"])
    mp = m.path
    for i in range(3):
        (mp / f"d{i}").mkdir()
        for j in range(20):
            (mp / f"d{i}" / f"f{j}").write_bytes(b"x")
        assert mounting.ctl_exchange(mp, f"snapshot s{i}\n".encode())[0] == 0
    for kw, err in (({}, "Operation not permitted"),
                    ({"user": UNPRIV_UID, "group": UNPRIV_GID, "extra_groups": []}, "Permission denied")):
        r = subprocess.run(["rm", "-rf", ".cowfs"], cwd=mp, capture_output=True, text=True, timeout=60, **kw)
        assert r.returncode == 1 and r.stderr.splitlines() == [f"rm: cannot remove '.cowfs': {err}"], r.stderr
    assert sorted(os.listdir(mp / ".cowfs" / "snapshots")) == ["s0", "s1", "s2"]
    assert len(os.listdir(mp / ".cowfs" / "snapshots" / "s2" / "d2")) == 20
    assert json.loads((mp / ".cowfs" / "stats").read_text())["branch"] == "main"


# -- 6: read commands take a store too (its daemon when mounted, else the store itself) ---------------
def _check_store_commands(store: Path, out: Path, fork_at: Path | None) -> None:
    text = cowfs("log", store, check=True).stdout
    for name in ("main", "fork", "s1", "s2", "fs1"):
        assert re.search(rf"\s{name}\s", text), text
    assert (f"mounted at {fork_at}" in text) == (fork_at is not None), text
    nodes = {n["name"]: n for n in json.loads(cowfs("log", store, "--json", check=True).stdout)["nodes"]}
    assert nodes["fs1"]["branch"] == "fork" and nodes["s2"]["branch"] == "main"
    assert cowfs("diff", store, "s1", "s2", check=True).stdout == "M\tf\n"
    assert cowfs("diff", store, "s1", "fork", check=True).stdout == "+\tg\n"
    r = cowfs("diff", store, "s1")
    assert r.returncode == 2 and "name both sides" in one_clear_line(r)
    r = cowfs("diff", store, "s1", "nope")
    assert r.returncode == 1 and "no snapshot or branch named 'nope'" in one_clear_line(r)
    cowfs("export", store, "fs1", out, check=True)
    assert (out / "f").read_text() == "one\n" and (out / "g").read_text() == "forked\n"
    assert {r["name"] for r in json.loads(cowfs("list", store, "--json", check=True).stdout)["snapshots"]} == \
        {"s1", "s2", "fs1"}
    assert json.loads(cowfs("stats", store, "--json", check=True).stdout)["logical_bytes"] > 0
    assert "removed" in cowfs("gc", store, check=True).stdout
    assert "queue" in cowfs("dedup", store, "--wait", check=True).stdout


@pytest.mark.timeout(300)
def test_read_commands_take_a_store_mounted_or_not(mount_factory, test_dir, tmp_path):
    m = mount_factory(store=mounting.init_store(test_dir / "store"))   # where other users can reach it
    a = m.path
    (a / "f").write_text("one\n")
    cowfs("snapshot", a, "s1", check=True)
    (a / "f").write_text("two\n")
    cowfs("snapshot", a, "s2", check=True)
    cowfs("branch", a, "fork", "--from", "s1", check=True)
    b = test_dir / "fork"
    b.mkdir()
    cowfs("mount", m.store, b, "--branch", "fork", check=True)
    try:
        (b / "g").write_text("forked\n")
        cowfs("snapshot", b, "fs1", check=True)
        _check_store_commands(m.store, tmp_path / "online", fork_at=b)
    finally:
        cowfs("umount", b, check=True)
    m.stop()
    _check_store_commands(m.store, tmp_path / "offline", fork_at=None)
    assert not mounting.fuse_mounts_under(str(test_dir))
    # a store is its owner's: another user is told so, without a traceback
    for args in (("log", m.store), ("diff", m.store, "s1", "s2"), ("export", m.store, "s1", "/tmp/x")):
        r = cowfs(*args, uid=UNPRIV_UID)
        err = one_clear_line(r)
        assert r.returncode == 1 and "only root or the owner of the store may administer it" in err, (args, err)


# -- 5: another lineage's snapshot: named to the store's administrator, absent to a sandbox ---------
@pytest.mark.timeout(240)
def test_another_lineages_snapshot_is_named_only_to_the_administrator(mount_factory, test_dir):
    m = mount_factory(options=["allow_other"])
    (m.path / "f").write_text("x\n")
    cowfs("snapshot", m.path, "main-snap", check=True)
    cowfs("branch", m.path, "agent", check=True)
    b = test_dir / "agent"
    b.mkdir()
    cowfs("mount", m.store, b, "--branch", "agent", check=True)
    try:
        os.chown(b, UNPRIV_UID, UNPRIV_GID)                # the sandbox user owns its mount root
        for args in (("rollback", b, "main-snap"), ("branch", b, "x", "--from", "main-snap"),
                     ("diff", b, "main-snap"), ("export", b, "main-snap", test_dir / "out")):
            r = cowfs(*args)                                   # root: the store's administrator
            err = one_clear_line(r)
            assert r.returncode == 1 and "'main-snap' exists in this store (a snapshot of branch main) but " \
                "belongs to another lineage" in err, (args, err)
            # the sandbox user: exactly what a name that does not exist gets
            mine = one_clear_line(cowfs(*args, uid=UNPRIV_UID))
            unknown = one_clear_line(cowfs(*[a if a != "main-snap" else "no-such" for a in args], uid=UNPRIV_UID))
            assert mine == unknown.replace("no-such", "main-snap"), (args, mine, unknown)
            assert "another lineage" not in mine and "main" not in mine.replace("main-snap", ""), mine
    finally:
        cowfs("umount", b, check=True)


@pytest.mark.timeout(120)
def test_daemon_refusal_names_who_may(mount_factory):
    """A handle opened while the caller owned the mount root, used after it changed hands:
    the daemon refuses and says who may."""
    m = mount_factory(options=["allow_other"])
    os.chown(m.path, UNPRIV_UID, UNPRIV_GID)
    w = mounting.Worker(uid=UNPRIV_UID, gid=UNPRIV_GID)
    try:
        fd = w.ok("os.open", str(m.path / ".cowfs" / "ctl"), os.O_RDWR)
        os.chown(m.path, 0, 0)
        assert w.call("os.write", fd, b"snapshot late\n") == ("err", errno.EPERM)
        reply = json.loads(w.ok("os.read", fd, 1 << 20))
        assert reply["errno"] == "EPERM" and "owner of the mount root (uid 0)" in reply["error"], reply
        assert "-o ctl_group=" in reply["error"], reply
        w.call("os.close", fd)
    finally:
        w.close()
