"""The admin socket: HTTP/1.1 + JSON, so `curl --unix-socket` works (SPEC §4).

Not on the request path: a plain asyncio streams server is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
) -> None:
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


async def start_admin(path: str, mode: int, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path`` (a socket nobody else is using) with ``mode``."""
    from flypool.http.server import bind_unix

    sock = bind_unix(path, mode)
    os.chmod(path, mode)
    return await asyncio.start_unix_server(
        lambda r, w: _handle(r, w, handler), sock=sock, limit=MAX_HEAD
    )
