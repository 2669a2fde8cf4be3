"""A worker that writes each response in small pieces with pauses in between.

It makes the daemon see a response head split over several reads (and a
chunked body split mid-chunk): the proxy must reassemble nothing wrongly.
Usage: ``split_worker.py SOCKET``. Paths: ``/chunked`` answers chunked.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

PIECES_PLAIN = [
    b"HTTP/1.1 200 OK\r\nContent-",
    b"Length: 11\r\nX-Split: yes\r\n\r\nhel",  # the end of the head, in a later read
    b"lo world",
]
PIECES_CHUNKED = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"lo\r\n6\r\n world\r\n",
    b"0\r\n\r\n",
]


def serve(conn: socket.socket) -> None:
    with conn:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            pieces = PIECES_CHUNKED if b" /chunked " in head.split(b"\r\n")[0] else PIECES_PLAIN
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(0.02)


def main() -> None:
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
