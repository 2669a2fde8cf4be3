"""The ASGI twin of ``slowboot.py`` (for uvicorn): same boot delay, per-request delay,
answer and broken-release switch; the request delay is an ``asyncio.sleep``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BOOT_S = float(os.environ.get("SLOWBOOT_BOOT_S", "1"))
"""Seconds the import takes."""
REQUEST_S = float(os.environ.get("SLOWBOOT_REQUEST_S", "0.005"))
"""Seconds each request takes."""


def read_generation() -> str:
    """``APP_GEN``, else the first line of ``./generation.txt``, else ``"0"``."""
    gen = os.environ.get("APP_GEN")
    if gen:
        return gen
    try:
        return Path("generation.txt").read_text().strip().splitlines()[0] or "0"
    except (OSError, IndexError):
        return "0"


def is_broken() -> bool:
    """Whether this release is to fail at import (``broken`` file or ``SLOWBOOT_BROKEN``)."""
    flag = os.environ.get("SLOWBOOT_BROKEN", "")
    if flag and flag != "0":
        return True
    return (Path(__file__).resolve().parent / "broken").exists() or Path("broken").exists()


time.sleep(BOOT_S)
GENERATION = read_generation()
"""The release this process loaded."""
if is_broken():
    raise RuntimeError(
        f"slowboot_asgi: release gen={GENERATION} is broken (a 'broken' file exists)"
    )

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Sleep ``REQUEST_S`` and answer ``pid=<pid> gen=<generation>`` (lifespan: no-op)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await asyncio.sleep(REQUEST_S)
    body = f"pid={os.getpid()} gen={GENERATION}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
