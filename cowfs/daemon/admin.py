"""The daemon's admin channel: a Unix socket in the store directory (mode 0600).

CLI commands given a mounted store talk to the daemon here instead of opening RocksDB a
second time (which RocksDB's lock forbids).  Protocol: one JSON object per line each way.
The daemon learns who is asking from the kernel (SO_PEERCRED), not from the socket's mode:
only root, the daemon's own user and the owner of the store directory are served
(docs/architecture.md, "Authorization").
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from cowfs.storedir import SOCKET_NAME

if TYPE_CHECKING:  # the CLI's client side must not pay for importing trio
    import trio

# (request, uid of the peer process as the kernel tells it) -> reply
Handler = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


def socket_path(store: str, name: str = SOCKET_NAME) -> str:
    """STORE/daemon.sock (or STORE/name), or, when that path is too long for AF_UNIX (107
    bytes), a name derived from the store's path in /run/cowfs (both ends compute the same one)."""
    path = os.path.join(store, name)
    if len(os.fsencode(path)) < 100:
        return path
    import hashlib  # only for long paths: every CLI command imports this module
    import tempfile

    key = os.path.abspath(store) if name == SOCKET_NAME else os.path.join(os.path.abspath(store), name)
    digest = hashlib.sha256(os.fsencode(key)).hexdigest()[:24]
    base = "/run/cowfs" if os.access("/run", os.W_OK) else os.path.join(tempfile.gettempdir(), "cowfs")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return os.path.join(base, f"{digest}.sock")


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    fmt = "3i"  # struct ucred: pid, uid, gid
    _pid, uid, _gid = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
    return int(uid)


async def serve(path: str, handle: Handler, *, owner: int | None = None,
                task_status: "trio.TaskStatus[None] | None" = None) -> None:
    """Answer requests on a Unix socket at path until cancelled (start it with nursery.start).

    owner: a uid that may reach the socket besides ours (the store's owner when the daemon
    runs as root); handle still decides, from the peer's uid, what each request may do."""
    import trio

    from cowfs.commands.reply import pieces

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    if owner is not None and owner != os.geteuid() and os.geteuid() == 0:
        os.chown(path, owner, -1)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    if task_status is not None:
        task_status.started()

    async def one(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                buf = b""
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                try:
                    req = json.loads(buf.split(b"\n", 1)[0])
                    resp = await handle(req, peer_uid(stream.socket))
                except Exception as exc:  # a bad request must never take the daemon down
                    resp = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                # A long reply (a store-wide list or diff) goes out piece by piece as the
                # client takes it: never whole in memory (cowfs.commands.reply).
                for piece in pieces(resp):
                    await stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (a `cowfs stats` interrupted): nor must that

    await trio.serve_listeners(one, [listener])


def request_streamed(store: str, req: dict[str, Any], item: Callable[[str, Any], None],
                     raw: Callable[[bytes], None] | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Blocking client for a reply that may be long: item(key, value) for each item of its
    lists as it arrives, raw(bytes) with its text; returns the other keys (lists as lengths).
    timeout bounds each wait for more of the reply, not the whole."""
    from cowfs.commands.reply import read_streamed

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path(store))
        s.sendall(json.dumps(req).encode() + b"\n")

        def read(n: int) -> bytes:
            data = s.recv(max(n, 1 << 16))
            if raw is not None and data:
                raw(data)
            return data

        return read_streamed(read, item)


def request(store: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Blocking client for the CLI."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path(store))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            buf += data
    return json.loads(buf)

