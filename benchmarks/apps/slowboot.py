"""The app of ``benchmarks/deploy_compare.py``: slow to import, 5 ms a request.

- Importing it takes ``SLOWBOOT_BOOT_S`` seconds (default 1), like an app that loads
  a framework and warms caches; then a file ``broken`` in the working directory
  (or in this file's) makes the import raise: a broken release.
- Each request takes ``SLOWBOOT_REQUEST_S`` seconds (default 0.005) and is answered
  ``pid=<pid> gen=<generation>``, the generation being the first line of
  ``generation.txt`` in the working directory, read at import: a client can tell
  which process and which release answered.

``app`` and ``application`` are the WSGI callable (gunicorn, flypool, Passenger),
``asgi`` its ASGI twin (uvicorn), whose delay is an ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

time.sleep(float(os.environ.get("SLOWBOOT_BOOT_S", "1")))
REQUEST_S = float(os.environ.get("SLOWBOOT_REQUEST_S", "0.005"))
try:
    GENERATION = Path("generation.txt").read_text().split()[0]
except (OSError, IndexError):
    GENERATION = "0"
if Path("broken").exists() or Path(__file__).with_name("broken").exists():
    raise RuntimeError(f"slowboot: release gen={GENERATION} is broken (a 'broken' file exists)")
BODY = f"pid={os.getpid()} gen={GENERATION}\n".encode()
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
Call = Callable[..., Any]


def app(environ: dict[str, Any], start_response: Call) -> Iterable[bytes]:
    """WSGI: sleep, then ``pid=<pid> gen=<generation>``."""
    time.sleep(REQUEST_S)
    start_response("200 OK", HEADERS)
    return [BODY]


application = app


async def asgi(scope: dict[str, Any], receive: Call, send: Call) -> None:
    """ASGI: the same answer after an ``asyncio.sleep``; lifespan events are acknowledged."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await asyncio.sleep(REQUEST_S)
    headers = [(k.lower().encode(), v.encode()) for k, v in HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
