"""The example app as a plain WSGI callable, for a third-party worker (gunicorn).

Run as::

    gunicorn --bind unix:{socket} --workers 1 flypool.example.wsgi:app

Routes: ``/ready`` answers ``200 ok``; every other path answers
``pid=.. worker=.. release=.. server=gunicorn`` with an ``X-Worker-Pid``
header, after ``?delay=S`` seconds if asked (a blocking sleep is fine in a
sync worker).

At import time, ``EXAMPLE_BOOT_DELAY=S`` sleeps S seconds (a slow boot), and
``EXAMPLE_FAIL_AT_BOOT=1`` or a file ``fail_at_boot`` in the working
directory raises ``RuntimeError`` so that gunicorn exits non-zero (a broken
release).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment


def _boot() -> None:
    delay = float(os.environ.get("EXAMPLE_BOOT_DELAY", "") or 0)
    if delay > 0:
        time.sleep(delay)
    flag = os.environ.get("EXAMPLE_FAIL_AT_BOOT", "").strip().lower()
    if flag not in ("", "0", "false", "no") or os.path.exists("fail_at_boot"):
        raise RuntimeError("boot failure requested")


_boot()


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answer one request (see the module docstring for the routes)."""
    path = environ.get("PATH_INFO") or "/"
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        delay = float(query.get("delay", ["0"])[0])
    except ValueError:
        delay = -1.0
    if not delay >= 0:  # also NaN
        body = b"bad delay\n"
        start_response("400 Bad Request", _headers(body))
        return [body]
    if delay:
        time.sleep(delay)
    if path == "/ready":
        body = b"ok"
    else:
        # Read at request time: gunicorn forks its worker after importing (with --preload).
        cwd = os.getcwd()
        worker = os.environ.get("FLYPOOL_WORKER") or "-"
        body = f"pid={os.getpid()} worker={worker} release={cwd} server=gunicorn\n".encode(
            "utf-8", "surrogateescape"
        )
    start_response("200 OK", _headers(body))
    return [body]


def _headers(body: bytes) -> list[tuple[str, str]]:
    release = os.path.basename(os.getcwd().rstrip("/")) or "/"
    # WSGI header values must be latin-1; a release name may not be.
    release = release.encode("latin-1", "replace").decode("latin-1")
    return [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("X-Worker-Pid", str(os.getpid())),
        ("X-Worker-Id", os.environ.get("FLYPOOL_WORKER") or "-"),
        ("X-Release", release),
    ]
