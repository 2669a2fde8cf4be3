"""A minimal ASGI app for the preload tests under uvicorn: answers ``pid=..``."""

from __future__ import annotations

import os
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = f"pid={os.getpid()} server=uvicorn".encode()
    length = str(len(body)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", length),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
