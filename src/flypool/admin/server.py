"""The admin socket: HTTP/1.1 + JSON, so `curl --unix-socket` works (SPEC §4).

Not on the request path: a plain asyncio streams server is enough. Requests
are parsed with httptools (as the front side is): a malformed request, a
negative or conflicting Content-Length is answered 400; a request not
received within ``REQUEST_TIMEOUT`` gets 408.
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

import httptools

Reply = tuple[int, Any]
Handler = Callable[[str, str, dict[str, str]], Awaitable[Reply]]

MAX_HEAD = 16384
MAX_BODY = 65536
# The whole request (head and body) must arrive within this.
REQUEST_TIMEOUT = 10.0
REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
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


class _AdminRequest:
    """httptools callbacks collecting one admin request."""

    __slots__ = ("body", "complete", "head_bytes", "headers_done", "url")

    def __init__(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.head_bytes = 0
        self.headers_done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD:
            raise _Refused(431, "request head too large")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_BODY:
            raise _Refused(413, "body too large")
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader, timeout: float) -> tuple[str, str] | None:
    """(method, target) of one request; None when the client left; _Refused when bad."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    req = _AdminRequest()
    parser = httptools.HttpRequestParser(req)
    got = False
    while not req.complete:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(reader.read(65536), remaining)
        except TimeoutError:
            if not got:
                return None
            raise _Refused(408, "request not received in time") from None
        if not data:
            return None
        got = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                raise cause from None
            raise _Refused(400, "malformed request") from None
        except httptools.HttpParserUpgrade:
            raise _Refused(400, "upgrade not supported") from None
        except httptools.HttpParserError as exc:
            raise _Refused(400, f"malformed request: {exc}") from None
        if not req.headers_done and req.head_bytes > MAX_HEAD:
            raise _Refused(431, "request head too large")
    return parser.get_method().decode("ascii", "replace"), req.url.decode("latin-1")


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    group_gid: int | None = None,
) -> None:
    allowed = peer_allowed(writer.get_extra_info("socket"), group_gid)
    try:
        try:
            got = await _read_request(reader, REQUEST_TIMEOUT)
        except _Refused as exc:
            writer.write(_encode(exc.status, {"error": str(exc)}))
            await writer.drain()
            return
        if got is None:
            return
        method, target = got
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
