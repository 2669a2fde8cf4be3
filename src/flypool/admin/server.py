"""The admin socket: HTTP/1.1 + JSON, so `curl --unix-socket` works (SPEC §4).

Not on the request path: a plain asyncio streams server is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Reply = tuple[int, Any]
Handler = Callable[[str, str, dict[str, str]], Awaitable[Reply]]

MAX_HEAD = 16384
MAX_BODY = 65536
REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    500: "Internal Server Error",
}


def _encode(status: int, payload: Any) -> bytes:
    if isinstance(payload, str):
        body = payload.encode()
        ctype = "text/plain; version=0.0.4; charset=utf-8"
    else:
        body = (json.dumps(payload, indent=None) + "\n").encode()
        ctype = "application/json"
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def admin_gid(group: str) -> int | None:
    """The gid of ``admin_group`` (None when unset or unknown)."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _peer_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def peer_allowed(sock: socket.socket | None, group_gid: int | None) -> bool:
    """Root, the daemon's own user, or a member of admin_group (SO_PEERCRED)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    if uid in (0, os.geteuid()):
        return True
    return group_gid is not None and (gid == group_gid or group_gid in _peer_groups(pid))


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    group_gid: int | None = None,
) -> None:
    allowed = peer_allowed(writer.get_extra_info("socket"), group_gid)
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            writer.write(_encode(400, {"error": "malformed request line"}))
            return
        method, target = parts[0], parts[1]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        if length > MAX_BODY:
            writer.write(_encode(400, {"error": "body too large"}))
            return
        if length:
            await reader.readexactly(length)
        if not allowed:
            # Answered after reading the request, so the client sees the
            # refusal rather than a broken pipe.
            writer.write(
                _encode(
                    403,
                    {
                        "error": "not allowed: only root, the daemon's user and "
                        "members of admin_group may use this socket"
                    },
                )
            )
            await writer.drain()
            return
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            status, payload = await handler(method, unquote(url.path), query)
        except Exception as exc:  # an admin bug must not take the daemon down
            status, payload = 500, {"error": f"internal error: {exc!r}"}
        writer.write(_encode(status, payload))
        await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def start_admin(
    path: str,
    mode: int,
    handler: Handler,
    group_gid: int | None = None,
    sock: socket.socket | None = None,
) -> asyncio.AbstractServer:
    """Listen on ``path`` (a socket nobody else is using) with ``mode``.

    ``sock`` is an already listening socket handed over by USR2.
    """
    from flypool.http.server import bind_unix

    if sock is None:
        sock = bind_unix(path, mode)
        os.chmod(path, mode)
        if group_gid is not None:
            # Members of admin_group need the socket file's group, and the group
            # the same access as the owner, to reach it.
            if os.geteuid() == 0:
                os.chown(path, -1, group_gid)
            os.chmod(path, mode | ((mode & 0o700) >> 3))
    return await asyncio.start_unix_server(
        lambda r, w: _handle(r, w, handler, group_gid), sock=sock, limit=MAX_HEAD
    )
