"""The daemon's admin channel: a Unix socket in the store directory (mode 0600).

CLI commands given a mounted store talk to the daemon here instead of opening RocksDB a
second time (which RocksDB's lock forbids).  Protocol: one JSON object per line each way.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Awaitable, Callable

import trio

SOCKET_NAME = "daemon.sock"
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(store: str) -> str:
    return os.path.join(store, SOCKET_NAME)


async def serve(path: str, handle: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            try:
                req = json.loads(buf.split(b"\n", 1)[0])
                resp = await handle(req)
            except Exception as exc:  # a bad request must never take the daemon down
                resp = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            await stream.send_all(json.dumps(resp).encode() + b"\n")

    await trio.serve_listeners(one, [listener])


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
