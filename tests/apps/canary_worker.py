"""A worker whose release decides how good it is (canary tests).

The file ``behaviour`` in the release directory (the working directory)
holds one word: ``ok`` (200 after ~20 ms), ``fail`` (500 on every request),
``fail5`` (500 on every 20th request, 5 %), or ``slow3`` (200, three times
slower). The body names the release and the pid. Usage: ``canary_worker.py SOCKET``.
"""

from __future__ import annotations

import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

BEHAVIOUR = Path("behaviour").read_text().strip() if Path("behaviour").exists() else "ok"
RELEASE = os.path.basename(os.getcwd())
BASE_DELAY = 0.02
_count = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        global _count
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        _count += 1
        status = 200
        delay = BASE_DELAY
        if BEHAVIOUR == "fail" or (BEHAVIOUR == "fail5" and _count % 20 == 0):
            status = 500
        elif BEHAVIOUR == "slow3":
            delay *= 3
        time.sleep(delay)
        body = f"release={RELEASE} pid={os.getpid()}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    path = sys.argv[1]
    with Server(path, Handler) as server:
        print(f"canary_worker {RELEASE} ({BEHAVIOUR}) listening", flush=True)
        server.serve_forever()
