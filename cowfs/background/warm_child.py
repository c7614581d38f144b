"""The warming helper: list each directory named on stdin (NUL-terminated paths in the mount).

Run by cowfs.background.warming as `python -I -S warm_child.py ROOT`, so it imports nothing but the
standard library.  A listing through the mount is a READDIRPLUS: the kernel caches the
directory's pages and every entry's dentry and attributes, so a client that lists the
directory or stats a name in it afterwards is answered without a request.  It runs in a
process of its own because in the daemon it would hold the GIL against the request loop that
answers it.

It first moves into a mount namespace of its own, with private propagation: its directory
fds and path walks then pin its private copy of the mount, never the mount users see, so a
plain `umount` of the sandbox is never busy because of it (the daemon then serves it until it
exits, a second or so).  Without that isolation (not root) it lists nothing.  Errors (a
directory gone since it was learned, the mount going away) skip that path; a dead parent (the
daemon) ends it.  A sandbox may have swapped a learned directory for a symlink that leads out
of the mount: a path whose last component is a symlink is not opened, and a directory on
another device than ROOT is not listed.
"""
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def isolate() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0


def main() -> None:
    parent = os.getppid()
    paths = sys.stdin.buffer.read().split(b"\0")
    if not isolate():
        sys.exit(3)
    dev = os.stat(sys.argv[1]).st_dev
    for path in paths:
        if not path:
            continue
        if os.getppid() != parent:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_dev == dev:
                with os.scandir(fd) as entries:
                    for _ in entries:
                        pass
        except OSError:
            pass
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
