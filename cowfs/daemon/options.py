"""The `-o` options of `cowfs mount` and mount.fuse.cowfs: one table that both parse and
that `cowfs mount --help` lists, so the help can never miss an option the daemon takes.

Light on purpose (no pyfuse3, no trio): the CLI's help reads it.
"""
from __future__ import annotations

import grp
from dataclasses import dataclass
from typing import Any, Callable


class OptionError(ValueError):
    """An unknown option or a bad value; the message says which and what is allowed."""


def parse_size(text: str) -> int:
    """"10G", "256M", "4k", "1GiB", "512" (bytes) -> bytes; negative sizes are refused."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    elif t.endswith("b"):
        t = t[:-1]
    value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    if value < 0:
        raise ValueError(text)
    return value


def _bool01(v: str) -> bool:
    if v not in ("0", "1"):
        raise ValueError(v)
    return v == "1"


def _onoff(v: str) -> bool:
    if v not in ("on", "off"):
        raise ValueError(v)
    return v == "on"


def _share(v: str) -> float:
    f = float(v)
    if not 0 < f <= 1:
        raise ValueError(v)
    return f


def _spin(v: str) -> int:
    n = int(v)
    if not 0 <= n <= 1000:
        raise ValueError(v)
    return n


def _slots(v: str) -> int:
    n = int(v)
    if not 1 <= n <= 65535:
        raise ValueError(v)
    return n


def _hold_ttl(v: str) -> int:
    n = int(v)
    if n != 0 and not 2 <= n <= 3600:
        raise ValueError(v)
    return n


def _keep_every(v: str) -> float:
    f = float(v)
    if not 0 <= f <= 3600:
        raise ValueError(v)
    return f


def _window(v: str) -> float:
    f = float(v)
    if not 0 < f <= 3600:
        raise ValueError(v)
    return f


def _cache_bytes(v: str) -> int | None:
    """-o remote_cache_bytes: "auto" (None), 0 (no bound) or a size."""
    return None if v.strip().lower() == "auto" else parse_size(v)


def _count(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError(v)
    return n


def parse_cpus(v: str) -> str:
    """"0", "0-1", "0+2-3" (CPU numbers and ranges joined by "+": commas separate -o
    options) -> the same set, normalized ("0-1+3"); the set itself is cpu_set()'s."""
    cpus: set[int] = set()
    for part in v.split("+"):
        lo, dash, hi = part.partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if first < 0 or last < first or last >= 4096:
            raise ValueError(v)
        cpus.update(range(first, last + 1))
    runs: list[str] = []
    for c in sorted(cpus):
        if runs and "-" not in runs[-1] and int(runs[-1]) == c - 1:
            runs[-1] = f"{c - 1}-{c}"
        elif runs and "-" in runs[-1] and int(runs[-1].split("-")[1]) == c - 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{c}"
        else:
            runs.append(str(c))
    return "+".join(runs)


def cpu_set(text: str) -> set[int]:
    """The CPUs of a normalized `cpus=` value."""
    out: set[int] = set()
    for part in text.split("+"):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _group(v: str) -> int:
    if v.isdigit():
        return int(v)
    try:
        return grp.getgrnam(v).gr_gid
    except KeyError:
        raise ValueError(f"no group named {v!r}") from None


@dataclass(frozen=True)
class Option:
    name: str
    value: str | None          # what follows "=" ("SIZE", "0|1"); None for a flag
    default: str | None        # as shown by --help
    help: str
    attr: str = ""             # the MountConfig field it sets ("" for a flag: appended to cfg.options)
    parse: Callable[[str], Any] = str
    aliases: tuple[str, ...] = ()

    @property
    def syntax(self) -> str:
        return self.name if self.value is None else f"{self.name}={self.value}"


OPTIONS: tuple[Option, ...] = (
    Option("allow_other", None, None, "let other users (such as an unprivileged sandbox user) use the mount"),
    Option("suid", None, None, "honour set-user-ID bits (mounts are nosuid by default: sandboxes run untrusted code)"),
    Option("dev", None, None, "honour device nodes (mounts are nodev by default)"),
    Option("nosuid", None, None, "the default"),
    Option("nodev", None, None, "the default"),
    Option("ro", None, None, "read-only: writes fail with EROFS (and no hold of a remote branch is taken: hold_ttl)"),
    Option("cache_l1", "SIZE", "256M", "decoded chunks kept in memory (cache_size is its older name)",
           "cache_l1", parse_size, aliases=("cache_size",)),
    Option("cache_l2", "SIZE", "256M", "reused chunks kept as 4 KiB lz4 pages; 0 turns it off", "cache_l2", parse_size),
    Option("prefetch", "0|1", "1", "readahead and learned prefetch; 0 turns both off", "prefetch", _bool01),
    Option("prefetch_learn", "0|1", "1", "0: keep using the branch's learned model but stop updating it",
           "prefetch_learn", _bool01),
    Option("dir_cache", "0|1", "1", "the kernel caches directory listings and absent names; 0 turns both off",
           "dir_cache", _bool01),
    Option("warm", "0|1", "1", "at a mount's first touch of a branch, a helper lists the directories its last cold "
           "starts touched, so the kernel answers them (root only)", "warm", _bool01),
    Option("warm_window", "SECONDS", "30", "the seconds after a mount's first touch of a branch whose directory "
           "touches make its cold start, the list -o warm lists at the next mount (0 < SECONDS <= 3600)",
           "warm_window", _window),
    Option("quota_bytes", "SIZE", "none", "per-branch byte quota; beyond it writes fail with EDQUOT",
           "quota_bytes", parse_size),
    Option("quota_inodes", "N", "none", "per-branch inode quota; beyond it creates fail with EDQUOT",
           "quota_inodes", _count),
    Option("ctl_group", "GROUP", "none", "members of GROUP (a name or a gid) may snapshot, branch, roll back and "
           "delete, besides the mount root's owner and root", "ctl_group", _group),
    Option("dedup", "on|off", "on", "background delta encoding (and sharing of copied trees); off: its queue waits "
           "for a later mount", "dedup", _onoff),
    Option("dedup_cpu", "SHARE", "0.25", "the background worker's share of wall time (0 < SHARE <= 1)",
           "dedup_cpu", _share),
    Option("share", "on|off", "on", "copied directory trees come to share their originals' records", "share", _onoff),
    Option("spin_us", "N", "50", "microseconds the daemon polls for the next FUSE request before it sleeps "
           "(0-1000; 0 leaves pyfuse3's own wait)", "spin_us", _spin),
    Option("cpus", "LIST", "none", "pin the daemon's threads to these CPUs (\"0\", \"0-1\", \"0+2\"): with the "
           "sandbox's processes on the same CPUs, a request and its reply need no wake-up on another CPU "
           "(docs/benchmarks.md, CPU placement)", "cpus", parse_cpus),
    Option("view_slots", "N", "65535", "views whose inodes (besides roots) the kernel may hold at once, each "
           "with a slot of the inode numbers (1-65535; fewer only to test slot recycling)", "view_slots", _slots),
    Option("lazy_near", "SIZE", "256K", "a lazy mount's read of a chunk not fetched yet also fetches, in the same "
           "GET, the unfetched chunks stored within SIZE bytes of it in its remote pack (a push packs a directory's "
           "files together: they are fetched with the first one read); 0: only the file's own", "lazy_near",
           parse_size),
    Option("remote_cache_bytes", "SIZE|auto", "auto", "a lazy mount keeps at most SIZE bytes of the chunks it "
           "fetched, evicting the least recently read that the remote holds (a later read fetches "
           "them again; what is written locally is never evicted); auto: min(2G, a quarter of the disk space free "
           "at mount); 0: no bound", "remote_cache_bytes", _cache_bytes),
    Option("hold_ttl", "N", "30", "a writable mount of a branch that follows a remote branch (pulled or pushed with "
           "--branch) holds it, one host at a time: the seconds its etcd lease outlives a daemon that dies (2-3600; "
           "0: take no hold; -o ro takes none); not renewed for N less max(0.5, N/10) seconds, the mount turns "
           "read-only (EROFS) until it holds it again", "hold_ttl", _hold_ttl),
    Option("keep_every", "SECONDS", "60", "how often the daemon looks whether the store keeper's dedup across the "
           "store's daemons has work (a pack appeared, a dup record or a condemned pack waits) and, if so, runs it "
           "and a pack sweep, one process of the store at a time (0-3600; 0: only `cowfs gc` runs it)",
           "keep_every", _keep_every),
    Option("fuse_ext", "0|1", "1", "SEEK_DATA/SEEK_HOLE, fallocate and each branch's own df, served through "
           "libfuse's session (cowfs/fuse/ext.py); 0 turns them off", "fuse_ext", _bool01),
)
BY_NAME: dict[str, Option] = {n: o for o in OPTIONS for n in (o.name, *o.aliases)}
# The options that hold for the whole daemon (every branch it serves); set explicitly, they
# are recorded in MountConfig.given, so that a mount of another branch may repeat them.
DAEMON_WIDE = ("cache_l1", "cache_l2", "prefetch", "prefetch_learn", "dir_cache", "warm", "warm_window", "dedup",
               "dedup_cpu", "share", "spin_us", "fuse_ext", "cpus", "view_slots", "lazy_near",
               "remote_cache_bytes", "keep_every")


def lookup(text: str) -> Option | None:
    """The option an "-o" word names (with or without its value), or None."""
    return BY_NAME.get(text.partition("=")[0])


def split(values: tuple[str, ...] | list[str]) -> list[str]:
    """The words of repeated and comma-separated -o values."""
    return [o.strip() for opt in values for o in opt.split(",") if o.strip()]


def known() -> str:
    return ", ".join(o.syntax for o in OPTIONS)


def apply(cfg: Any, text: str) -> Option:
    """Set one "-o" word on a MountConfig; OptionError names the option and what it takes."""
    key, eq, value = text.partition("=")
    opt = BY_NAME.get(key)
    if opt is None:
        raise OptionError(f"unknown mount option {text!r} (known: {known()}; see cowfs help mount-options)")
    if opt.value is None:
        if eq:
            raise OptionError(f"mount option {key} takes no value (got {text!r})")
        if text not in cfg.options:
            cfg.options.append(text)
        return opt
    if not eq:
        raise OptionError(f"mount option {key} needs a value: {opt.syntax}")
    try:
        setattr(cfg, opt.attr, opt.parse(value))
    except (ValueError, OverflowError) as exc:
        why = f": {exc}" if "no group" in str(exc) else ""
        raise OptionError(f"bad value in mount option {text!r}{why} (expected {opt.syntax})") from None
    if opt.attr in DAEMON_WIDE and hasattr(cfg, "given"):
        cfg.given.add(opt.attr)
    return opt


def help_lines(width: int = 78) -> list[str]:
    """The table as `cowfs mount --help` and `cowfs help mount-options` show it."""
    import textwrap

    col = max(len(o.syntax) for o in OPTIONS) + 2
    out = []
    for o in OPTIONS:
        text = o.help + (f" (default {o.default})" if o.default is not None else "")
        if o.aliases:
            text += f"; also {', '.join(o.aliases)}"
        wrapped = textwrap.wrap(text, max(30, width - col - 2))
        out.append(f"  {o.syntax:<{col}}{wrapped[0]}")
        out += [" " * (col + 2) + w for w in wrapped[1:]]
    return out
