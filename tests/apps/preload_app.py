"""A small standard-library HTTP worker for the preload tests.

Run through ``preload_serve``: ``python -m preload_serve SOCKET`` (tests
copy both files into a release directory).

Import-time knobs (read by the preloader when preloaded):

- ``PRELOAD_APP_IMPORT_DELAY=S``: sleep S seconds at import (a slow import).
- ``PRELOAD_APP_FAIL=1``: raise RuntimeError at import (a broken release).
- ``PRELOAD_APP_THREAD=1``: start a background thread at import.
- ``PRELOAD_APP_BALLAST_MB=N``: build about N MB of Python objects at import.
- ``PRELOAD_APP_LOG_FILE=PATH``: open PATH for appending at import (kept open).

Routes: ``/`` → ``pid=..``; ``/random`` → eight ``random.random()`` values;
``/stuck`` → never answers (the request handler loops in
``stuck_in_known_function``); ``/exit?code=N`` → exits with status N.
SIGTERM: exit 0.
"""

from __future__ import annotations

import http.server
import os
import random
import signal
import socketserver
import sys
import threading
import time
from typing import Any

_delay = float(os.environ.get("PRELOAD_APP_IMPORT_DELAY") or 0)
if _delay:
    time.sleep(_delay)
if os.environ.get("PRELOAD_APP_FAIL"):
    raise RuntimeError("preload_app: import failure requested")
if os.environ.get("PRELOAD_APP_THREAD"):
    threading.Thread(target=time.sleep, args=(3600,), name="app-poller", daemon=True).start()
# ~215 bytes per entry (tuple, str, int, float, list slot): 4700 per MB (measured RSS).
_ballast_mb = int(os.environ.get("PRELOAD_APP_BALLAST_MB") or 0)
BALLAST = [(f"item-{i}", i, float(i)) for i in range(_ballast_mb * 4700)]
_log_path = os.environ.get("PRELOAD_APP_LOG_FILE")
# Kept open for the process's life on purpose (a log file opened at import).
LOG = open(_log_path, "a") if _log_path else None  # noqa: SIM115


def stuck_in_known_function() -> None:
    """Where a stuck request spends its time (the stack-dump tests look for this name)."""
    while True:
        time.sleep(0.05)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/stuck":
            stuck_in_known_function()
        if path == "/exit":
            os._exit(int(query.partition("=")[2] or 0))
        if path == "/random":
            body = " ".join(repr(random.random()) for _ in range(8)).encode()
        else:
            body = f"pid={os.getpid()} worker={os.environ.get('FLYPOOL_WORKER', '-')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(socketserver.UnixStreamServer):
    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def main() -> None:
    path = sys.argv[1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    with Server(path, Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
