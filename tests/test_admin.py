"""The admin socket's request parsing (httptools), in process on a real Unix socket."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from flypool.admin import server
from tests.support import short_dir


async def _exchange(path: str, data: bytes, *, wait_eof: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait_eof)
    finally:
        writer.close()


def _run(requests: list[bytes], monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], list[Any]]:
    """Send each raw request on its own connection; return the answers and handled calls."""
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.5)
    path = str(Path(short_dir()) / "admin.sock")
    calls: list[Any] = []

    async def handler(method: str, target: str, query: dict[str, str]) -> tuple[int, Any]:
        calls.append((method, target, query))
        return 200, {"ok": True}

    async def main() -> list[bytes]:
        srv = await server.start_admin(path, 0o600, handler)
        try:
            return [await _exchange(path, r) for r in requests]
        finally:
            srv.close()
            os.unlink(path)

    return asyncio.run(main()), calls


def test_a_good_request_reaches_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    (answer,), calls = _run(
        [b"POST /apps/a%20b/scale?workers=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"],
        monkeypatch,
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert calls == [("POST", "/apps/a b/scale", {"workers": "3"})]


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /reload HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GARBAGE\r\n\r\n",
        b"POST /reload HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["negative-length", "conflicting-lengths", "garbage", "length-and-chunked"],
)
def test_malformed_requests_are_answered_400(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a silently closed connection (the old hand-written parser's answer)."""
    (answer,), calls = _run([raw], monkeypatch)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert calls == []


def test_a_body_that_never_arrives_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    (answer,), calls = _run(
        [b"POST /reload HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"], monkeypatch
    )
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert calls == []


def test_oversized_body_and_head(monkeypatch: pytest.MonkeyPatch) -> None:
    big_body = b"POST /reload HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000
    big_head = b"GET /status HTTP/1.1\r\nX-Pad: " + b"y" * 20000 + b"\r\n\r\n"
    (a, b), calls = _run([big_body, big_head], monkeypatch)
    assert a.startswith(b"HTTP/1.1 413 "), a
    assert b.startswith(b"HTTP/1.1 431 "), b
    assert calls == []
