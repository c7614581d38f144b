"""The warming helper: list each directory named on stdin (NUL-terminated paths in the mount).

Run by cowfs.warming as `python -I -S warm_child.py`, so it imports nothing but the standard
library.  A listing through the mount is a READDIRPLUS: the kernel caches the directory's
pages and every entry's dentry and attributes, so a client that lists the directory or stats
a name in it afterwards is answered without a request.  It runs in a process of its own
because in the daemon it would hold the GIL against the request loop that answers it.
Errors (a directory gone since it was learned, the mount going away) skip that path; a dead
parent (the daemon) ends it.  A sandbox may have swapped a learned directory for a symlink
that leads out of the mount: a path whose last component is a symlink is not opened, and a
directory on another device (argv[1] is the mount's root) is not listed.
"""
import os
import sys


def main() -> None:
    parent = os.getppid()
    dev = os.stat(sys.argv[1]).st_dev
    for path in sys.stdin.buffer.read().split(b"\0"):
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
