"""Replies the kernel refuses: what a failed `fuse_reply_*` means, and how it is logged.

The kernel answers a reply with ENOENT when the request it names is not in its list of
requests being processed (fs/fuse/dev.c, `fuse_dev_do_write`: `request_find` on the
connection's processing queue, or a queue already marked disconnected).  For a daemon that
replies once to each request this has one cause: the kernel has ended the connection.  An
unmount does that (`fuse_kill_sb_anon` -> `fuse_conn_destroy` -> `fuse_abort_conn`, which
ends every outstanding request and disconnects the queues) without waiting for requests it
sent us, so a request we are still serving when the mount goes, typically the RELEASE that
follows a close (the kernel sends RELEASE in the background: close(2) has returned long
before), is served to the end and then its reply is refused.  Any FUSE daemon sees this
(`docs/reliability.md`, 'Unmount and the requests still outstanding').  With the connection
still up, ENOENT means a real bug: a request answered twice, or a reply with a stray id.

pyfuse3 logs every failed reply as an ERROR (`<handler>(): fuse_reply_* failed with
<strerror>`) and carries on.  `install` puts a filter on its logger that tells the two
ENOENT cases apart by asking the kernel whether the connection has ended: poll(2) on the
session's /dev/fuse descriptor reports POLLERR exactly when the connection's input queue is
disconnected (`fuse_dev_poll`), which `fuse_abort_conn` does in the same locked section as the
processing queues.  An ended connection is logged at INFO with the reason; a live one at
ERROR, saying what it means.  Other errors (EINVAL: a malformed reply) pass unchanged.
cowfs.fuse.ext, which replies itself, reports its failed replies through `failed`.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import time

log = logging.getLogger(__name__)

# fuse_abort_conn disconnects the processing queues (our reply's ENOENT) and then, a few
# instructions later under the same spinlock, the input queue (poll's POLLERR); a vCPU
# preempted in between would show the first without the second for a moment.
ABORT_SETTLE_S = 0.02

_fd = -1  # the session's /dev/fuse descriptor (one session per daemon process)


def fuse_fds() -> set[int]:
    """This process's descriptors open on /dev/fuse."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.add(int(name))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor among them)
    return out


def install(before: set[int]) -> None:
    """Watch the session pyfuse3.init has just opened (the /dev/fuse descriptor that is not
    in `before`) and filter pyfuse3's failed-reply messages (see the module doc)."""
    global _fd
    new = fuse_fds() - before
    _fd = new.pop() if len(new) == 1 else -1
    if _fd < 0:
        log.warning("the FUSE session's descriptor was not found (%d new /dev/fuse descriptors): a reply "
                    "refused with ENOENT will be logged as an error even at unmount", len(new))
    pyfuse3_log = logging.getLogger("pyfuse3")
    if not any(isinstance(f, _FailedReplies) for f in pyfuse3_log.filters):
        pyfuse3_log.addFilter(_FailedReplies())


def uninstall() -> None:
    """The session is closed: its descriptor number may be reused."""
    global _fd
    _fd = -1


def connection_ended(fd: int | None = None) -> bool | None:
    """Whether the kernel has ended the FUSE connection (None: the descriptor is unknown)."""
    fd = _fd if fd is None else fd
    if fd < 0:
        return None
    p = select.poll()
    p.register(fd, select.POLLIN)
    deadline = time.monotonic() + ABORT_SETTLE_S
    while True:
        revents = sum(ev for _, ev in p.poll(0))
        if revents & select.POLLNVAL:
            return None
        if revents & select.POLLERR:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def failed(what: str, err: int) -> None:
    """Log a reply the kernel refused with errno err (what: the request or handler)."""
    if err != errno.ENOENT:
        log.error("%s: fuse_reply_* failed with %s", what, os.strerror(err))
        return
    ended = connection_ended()
    if ended:
        log.info("%s: reply not delivered: the kernel had ended the FUSE connection (unmount or abort) and "
                 "dropped the request, which was served all the same (docs/reliability.md)", what)
    elif ended is None:
        log.error("%s: fuse_reply_* failed with ENOENT (the kernel does not know the request) and whether "
                  "the connection has ended is unknown", what)
    else:
        log.error("%s: fuse_reply_* failed with ENOENT while the FUSE connection is up: the kernel does not "
                  "know the request, so it was answered twice or the reply named another one (a bug)", what)


class _FailedReplies(logging.Filter):
    """On the 'pyfuse3' logger: its ENOENT failed-reply records are replaced by `failed`'s."""

    SUFFIX = "(): fuse_reply_* failed with %s"

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if (isinstance(msg, str) and msg.endswith(self.SUFFIX)
                and record.args == (os.strerror(errno.ENOENT),)):
            failed(msg[: -len(self.SUFFIX)] + "()", errno.ENOENT)
            return False
        return True
