"""A small stdlib worker for pool tests: memory ballast, slow boots, early deaths.

Usage: ``mem_worker.py SOCKET``. Behaviour by environment (``N`` is the
worker's ``FLYPOOL_WORKER`` number), or by files in the working directory
(the release) where noted:

- ``MEM_MB`` / ``MEM_MB_N``: allocate and touch this many MiB before
  listening (``MEM_MB_N`` wins for worker N);
- ``BOOT_S``: sleep this long before listening;
- a file ``fail_at_boot``: print a line and exit 3 before listening;
- a file ``die_after_ready``: exit 4 this many seconds (the file's content,
  default 0.3) after listening;
- ``IGNORE_TERM=1``: ignore SIGTERM.

It answers ``GET /`` with ``ok worker=N pid=P`` and ``GET /?delay=S`` after
S seconds, HTTP/1.1 keep-alive, one thread per connection.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

NUMBER = os.environ.get("FLYPOOL_WORKER", "0")


class Handler(BaseHTTPRequestHandler):
    """ok, optionally after a delay."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        delay = float(query.get("delay", ["0"])[0])
        if delay:
            time.sleep(delay)
        body = f"ok worker={NUMBER} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, _ = self.socket.accept()
        # BaseHTTPRequestHandler wants a (host, port) client address.
        return sock, ("unix", 0)


def main() -> None:
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    mb = int(os.environ.get(f"MEM_MB_{NUMBER}", os.environ.get("MEM_MB", "0")))
    # Kept referenced for the life of the process; touching every page makes it RSS.
    ballast = bytearray(mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    time.sleep(float(os.environ.get("BOOT_S", "0")))
    if os.path.exists("fail_at_boot"):
        print(f"mem_worker {NUMBER}: boot failure requested", flush=True)
        sys.exit(3)
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    server = Server(path, Handler)
    print(f"mem_worker {NUMBER}: listening pid={os.getpid()} mb={mb}", flush=True)
    if os.path.exists("die_after_ready"):
        with open("die_after_ready") as f:
            after = float(f.read().strip() or "0.3")
        threading.Timer(after, lambda: os._exit(4)).start()
    server.serve_forever()
    del ballast


if __name__ == "__main__":
    main()
