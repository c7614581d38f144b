"""How a daemon is configured: MountConfig (what `cowfs mount` and mount.fuse.cowfs parse,
through the -o table of cowfs.daemon.options), the FUSE mount options it asks for, and which
options hold for every branch one daemon serves (a mount of another branch is refused with
each option that differs from the one in force)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cowfs.daemon import options as mount_options
from cowfs.storedir import home_dir


@dataclass
class MountConfig:
    store: str
    mountpoint: str
    branch: str = "main"
    options: list[str] = field(default_factory=list)
    debug: bool = False
    cache_l1: int = 256 << 20
    cache_l2: int = 256 << 20
    prefetch: bool = True
    prefetch_learn: bool = True
    dir_cache: bool = True  # the kernel caches directory listings (cowfs.fuse.dircache) and absent names
    warm: bool = True  # list a branch's learned cold-start directories at its first touch (cowfs.background.warming)
    warm_window: float = 30.0  # cowfs.cache.learned: the seconds after a mount's first touch that make its cold start
    ctl_group: int | None = None
    quota_bytes: int | None = None
    quota_inodes: int | None = None
    dedup: bool = True
    dedup_cpu: float = 0.25
    share: bool = True  # the sharer (cowfs.background.sharing) runs; with dedup off it does not either
    spin_us: int = 50  # cowfs.fuse.loop: poll the FUSE fd this long before parking (0: pyfuse3's own wait)
    fuse_ext: bool = True  # cowfs.fuse.ext: SEEK_DATA/SEEK_HOLE, fallocate, statfs per branch
    cpus: str | None = None  # -o cpus=: the CPUs the daemon's threads are pinned to (options.parse_cpus)
    lazy_near: int = 256 << 10  # cowfs.core.lazy: a lazy mount's reads fetch the unfetched chunks this near in the pack
    # cowfs.background.lazy_cache: a lazy mount's fetched chunks kept at most (None: auto, 0: no bound)
    remote_cache_bytes: int | None = None
    view_slots: int = 65535  # cowfs.fuse.inodes: slots of the inode numbers for views in use at once
    keep_every: float = 60.0  # cowfs.background.gc.keep_on_schedule: seconds between its looks (0: no schedule)
    hold_ttl: int = 30  # cowfs.fleet.holds: the lease of the remote branches the branch follows (0: none taken)
    given: set[str] = field(default_factory=set)  # the daemon-wide options above set explicitly (options.apply)
    # the branch's home database (its id), set by cowfs.daemon.process.mount from the branch's
    # record: its own daemon, whose files live in STORE/homes/<id>/; None: the store's daemon
    home: str | None = None

    @property
    def daemon_dir(self) -> str:
        """Where this daemon's pid file, admin socket and log live."""
        return home_dir(self.store, self.home) if self.home else self.store


CACHE_KEYS = mount_options.DAEMON_WIDE
# Mount flags (MountConfig.options) by word: the flag each sets, and to what.  Like the cache
# options, ctl_group and debug, they hold for every branch one daemon serves.
FLAG_WORDS = {"allow_other": ("allow_other", True), "suid": ("suid", True), "nosuid": ("suid", False),
              "dev": ("dev", True), "nodev": ("dev", False), "ro": ("ro", True), "noexec": ("noexec", True),
              "exec": ("noexec", False), "noatime": ("noatime", True), "sync": ("sync", True),
              "async": ("sync", False), "dirsync": ("dirsync", True), "rw": ("ro", False), "atime": ("noatime", False)}


def options_in_force(cfg: MountConfig) -> dict[str, Any]:
    """The daemon-wide options of a daemon started with cfg, by name."""
    out: dict[str, Any] = {name: False for name, _value in FLAG_WORDS.values()}
    for word in cfg.options:
        if word in FLAG_WORDS:
            name, value = FLAG_WORDS[word]
            out[name] = value
    out.update(ctl_group=cfg.ctl_group, debug=cfg.debug)
    out.update((key, getattr(cfg, key)) for key in CACHE_KEYS)
    return out


def options_asked(cfg: MountConfig) -> dict[str, Any]:
    """The daemon-wide options cfg sets explicitly (a mount of another branch asks for these)."""
    out: dict[str, Any] = {}
    for word in cfg.options:
        if word in FLAG_WORDS:
            name, value = FLAG_WORDS[word]
            out[name] = value
    if cfg.ctl_group is not None:
        out["ctl_group"] = cfg.ctl_group
    if cfg.debug:
        out["debug"] = True
    out.update((key, getattr(cfg, key)) for key in sorted(cfg.given))
    return out


def _option_word(name: str, value: Any) -> str:
    """How -o spells the option name set to value."""
    if name == "debug":
        return "debug" if value else "no debug"
    if name in CACHE_KEYS or name == "ctl_group":
        if isinstance(value, bool):
            zero_one = ("prefetch", "prefetch_learn", "dir_cache", "warm", "fuse_ext")
            value = int(value) if name in zero_one else "on" if value else "off"
        return f"{name}={'none' if value is None else value}"
    return next((w for w, nv in FLAG_WORDS.items() if nv == (name, value)), name if value else f"no {name}")


def option_conflicts(asked: dict[str, Any], in_force: dict[str, Any]) -> list[str]:
    """'asked (in force: value)' for each asked option that differs from the one in force."""
    return [f"-o {_option_word(k, v)} (in force: {_option_word(k, in_force.get(k))})"
            for k, v in asked.items() if in_force.get(k) != v]


def fuse_options(cfg: MountConfig) -> set[str]:
    # Imported here, in the daemon: pyfuse3 imports trio, which cost `cowfs mount` (whose
    # process only checks and forks) ~0.15 s to import and ~0.1 s at its exit, before and
    # after a lazy mount's build (docs/benchmarks.md, h49)
    import pyfuse3

    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {f"fsname=cowfs:{cfg.store}", "subtype=cowfs"}
    user = set(cfg.options)
    # Sandboxes run untrusted code: no set-user-ID binaries or device nodes unless asked.
    if "suid" not in user:
        opts.add("nosuid")
    if "dev" not in user:
        opts.add("nodev")
    return opts | user
