"""The example as a WSGI app, for a third-party worker::

    gunicorn --bind unix:{socket} --workers 1 flypool.example.wsgi:app

``/ready`` answers ``ok``; any other path ``pid=.. worker=.. release=..
server=gunicorn``, after ``?delay=S`` seconds (a blocking sleep: gunicorn's
sync worker). Importing it honours ``EXAMPLE_BOOT_DELAY`` and
``EXAMPLE_FAIL_AT_BOOT`` or a ``fail_at_boot`` file as `flypool.example.server`
does, raising ``RuntimeError`` so that gunicorn exits non-zero.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment

time.sleep(float(os.environ.get("EXAMPLE_BOOT_DELAY") or 0))
_FAIL = os.environ.get("EXAMPLE_FAIL_AT_BOOT", "").strip().lower() not in ("", "0", "false", "no")
if _FAIL or os.path.exists("fail_at_boot"):
    raise RuntimeError("boot failure requested")


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answer one request (see the module docstring)."""
    try:
        delay = float(parse_qs(environ.get("QUERY_STRING", "")).get("delay", ["0"])[0])
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 3600:  # also NaN
        start_response("400 Bad Request", [("Content-Length", "10")])
        return [b"bad delay\n"]
    time.sleep(delay)
    # Read per request: gunicorn may fork its worker after importing this (--preload).
    release, worker = os.getcwd(), os.environ.get("FLYPOOL_WORKER") or "-"
    if environ.get("PATH_INFO") == "/ready":
        body = b"ok"
    else:
        line = f"pid={os.getpid()} worker={worker} release={release} server=gunicorn\n"
        body = line.encode(errors="surrogateescape")
    name = os.path.basename(release.rstrip("/")) or "/"
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Worker-Pid", str(os.getpid())),
            ("X-Worker-Id", worker),
            # WSGI header values must be latin-1; a release name may not be.
            ("X-Release", name.encode("latin-1", "replace").decode("latin-1")),
        ],
    )
    return [body]
