"""`mount.fuse.cowfs`: the helper mount(8) runs for `mount -t fuse.cowfs` and fstab lines.

    mount -t fuse.cowfs /var/lib/cowfs/agent1 /srv/sandbox/agent1 -o branch=main,allow_other
    # /etc/fstab:
    /var/lib/cowfs/agent1  /srv/sandbox/agent1  fuse.cowfs  branch=main,allow_other,nofail  0 0

mount(8) calls ``/sbin/mount.fuse.cowfs SOURCE MOUNTPOINT [-sfnvw] [-o OPTIONS] [-t TYPE]``
(util-linux's helper convention).  SOURCE is a store directory (``cowfs:`` in front, as
/proc/mounts shows it, is accepted).  The helper translates the options and mounts as
``cowfs mount`` does: it returns once the mount is usable, leaving the daemon running;
``umount MOUNTPOINT`` ends the daemon (it flushes and exits when its mount goes away).

Options:
  branch=NAME                  the branch to mount (default main)
  every ``cowfs mount -o`` option (cowfs/daemon/options.py; ``cowfs help mount-options``)
  debug                        as ``cowfs mount --debug``
  ro, noexec, exec, noatime, sync, async, dirsync
                               kernel mount flags, passed to the FUSE mount
  rw, defaults, auto, noauto, user, nouser, users, owner, group, _netdev, nofail, loop,
  atime, diratime, relatime, comment=*, x-*
                               meant for mount(8), fstab or systemd, or the defaults: ignored
Anything else is an error (with ``-s``, mount(8)'s "sloppy" flag: a warning).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from cowfs.daemon import options as mount_options

USAGE = ("usage: mount.fuse.cowfs STORE MOUNTPOINT [-o OPTION[,OPTION...]] [-s] [-f] [-n] [-v]\n"
         "       (normally run by mount(8): mount -t fuse.cowfs STORE MOUNTPOINT -o branch=NAME)")
PASS_OPTIONS = {"allow_other", "suid", "nosuid", "dev", "nodev"}
KERNEL_FLAGS = {"ro", "noexec", "exec", "noatime", "sync", "async", "dirsync"}
IGNORED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
           "nofail", "loop", "nonempty", "atime", "diratime", "relatime"}
IGNORED_PREFIXES = ("x-", "comment=", "helper=", "uhelper=", "user=", "fsname=", "subtype=")


class HelperError(Exception):
    """Bad arguments or options; the message says which."""


@dataclass
class Request:
    store: str
    mountpoint: str
    branch: str = "main"
    options: list[str] = field(default_factory=list)      # for the FUSE mount (MountConfig.options)
    cache: list[tuple[str, str]] = field(default_factory=list)  # cache/prefetch/dedup options, checked
    quota_bytes: int | None = None
    quota_inodes: int | None = None
    ctl_group: int | None = None
    debug: bool = False
    fake: bool = False
    verbose: bool = False
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def split_options(text: str) -> list[str]:
    """Split a mount option string at commas, keeping quoted values ("a,b") together."""
    out, cur, quote = [], "", False
    for ch in text:
        if ch == '"':
            quote = not quote
        elif ch == "," and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [o.strip() for o in out if o.strip()]


def parse_args(argv: list[str]) -> Request:
    """Parse mount(8)'s helper arguments (SOURCE MOUNTPOINT then flags, in any order)."""
    from cowfs.daemon.config import MountConfig

    positional: list[str] = []
    opts: list[str] = []
    sloppy = fake = verbose = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" or a == "-t":
            if i + 1 >= len(argv):
                raise HelperError(f"{a} needs a value\n{USAGE}")
            if a == "-o":
                opts += split_options(argv[i + 1])
            elif argv[i + 1] not in ("fuse.cowfs", "cowfs", "fuse"):
                raise HelperError(f"this helper mounts fuse.cowfs, not {argv[i + 1]}")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts += split_options(a[2:])
        elif a.startswith("-t") and len(a) > 2:
            pass
        elif a in ("-h", "--help"):
            raise HelperError(USAGE)
        elif a.startswith("-") and len(a) > 1 and a != "--":
            for flag in a[1:]:
                if flag == "s":
                    sloppy = True
                elif flag == "f":
                    fake = True
                elif flag == "v":
                    verbose = True
                elif flag in "nwrNi":   # no mtab, read-write, (r)ead-only handled via -o ro, namespaces
                    if flag == "r":
                        opts.append("ro")
                else:
                    raise HelperError(f"unknown flag -{flag}\n{USAGE}")
        elif a != "--":
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise HelperError(USAGE)
    source, mountpoint = positional
    if source.startswith("cowfs:"):
        source = source[len("cowfs:"):]
    req = Request(store=os.path.abspath(source), mountpoint=os.path.abspath(mountpoint),
                  fake=fake, verbose=verbose)
    scratch = MountConfig("", "")
    for o in opts:
        key, eq, value = o.partition("=")
        opt = mount_options.lookup(o)
        if key == "branch" and eq:
            if not value:
                raise HelperError(f"bad value in mount option {o!r}: branch=NAME")
            req.branch = value
        elif opt is not None and opt.value is not None and eq:
            try:
                mount_options.apply(scratch, o)
            except mount_options.OptionError as exc:
                raise HelperError(str(exc)) from None
            if opt.attr in ("quota_bytes", "quota_inodes", "ctl_group"):
                setattr(req, opt.attr, getattr(scratch, opt.attr))
            else:
                req.cache.append((key, value))
        elif o == "debug":
            req.debug = True
        elif o in PASS_OPTIONS or o in KERNEL_FLAGS:
            if o not in req.options:
                req.options.append(o)
        elif o in IGNORED or o.startswith(IGNORED_PREFIXES):
            req.ignored.append(o)
        elif sloppy:
            req.warnings.append(f"ignoring unknown option {o!r}")
        else:
            raise HelperError(f"unknown mount option {o!r} (known: branch=NAME, {mount_options.known()}, debug, "
                              "and kernel flags such as ro, noexec, noatime; see cowfs help mount-options)")
    return req


def mount(req: Request) -> int:
    """Mount as `cowfs mount` does (fork the daemon, return once the mount is usable)."""
    from cowfs.daemon import process as daemon

    cfg = daemon.MountConfig(req.store, req.mountpoint, req.branch, options=list(req.options), debug=req.debug)
    for key, value in req.cache:
        mount_options.apply(cfg, f"{key}={value}")
    cfg.quota_bytes = req.quota_bytes
    cfg.quota_inodes = req.quota_inodes
    cfg.ctl_group = req.ctl_group
    return daemon.mount(cfg, foreground=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prog = "mount.fuse.cowfs"
    try:
        req = parse_args(argv)
    except HelperError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    for w in req.warnings:
        print(f"{prog}: {w}", file=sys.stderr)
    if req.verbose:
        print(f"{prog}: store {req.store}, branch {req.branch}, mount point {req.mountpoint}, "
              f"options {','.join(req.options) or '-'}" + (f" (ignored: {','.join(req.ignored)})" if req.ignored else ""),
              file=sys.stderr)
    if req.fake:
        return 0
    from cowfs.errors import MountError

    try:
        code = mount(req)
    except MountError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 32  # mount(8)'s "mount failure"
    return 32 if code else 0


if __name__ == "__main__":
    sys.exit(main())
