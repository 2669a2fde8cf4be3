"""A small threaded HTTP/1.1 worker with the misbehaviours the proxy must survive.

Usage: ``proxy_worker.py SOCKET``. Standard library only; one thread per
connection, keep-alive, Content-Length and chunked request bodies.

Paths (``?delay=S`` delays any answer):

- ``/``: ``pid=N`` (header ``X-Worker-Pid``).
- ``/headers``: JSON ``{"pid", "method", "target", "headers": [[name, value], ...]}``.
- ``/stats``: JSON ``{"pid", "connections", "max_inflight", "requests"}``.
- ``/early?hold=S``: answers 413 right after the head, without reading the
  body, then waits S seconds (default 2) without reading and closes.
- ``/slowread?wait=S``: waits S seconds before reading the body, then
  answers ``{"bytes": N}``.
- ``/partial?n=N``: sends a 200 head announcing 100000 bytes and N of them,
  then waits until the connection closes (an answer that never ends).
- ``/big?size=N``: N bytes of ``x``.
- ``/continue``: a 100 Continue, then the final answer once the body is read.
- ``/crash``: the process exits at once, without answering.

``PROXY_WORKER_STATUS=N`` in the environment makes ``/`` answer status N
(a broken release, for canary tests).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
STATUS = os.environ.get("PROXY_WORKER_STATUS", "200")
STATS = {"connections": 0, "inflight": 0, "max_inflight": 0, "requests": 0}


def _read_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _read_exact(conn: socket.socket, buf: bytes, n: int) -> tuple[bytes, bytes]:
    while len(buf) < n:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("eof in body")
        buf += data
    return buf[:n], buf[n:]


def _read_line(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    while b"\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("eof in chunked body")
        buf += data
    line, _, rest = buf.partition(b"\r\n")
    return line, rest


def _read_chunked(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        line, buf = _read_line(conn, buf)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while True:
                line, buf = _read_line(conn, buf)
                if not line:
                    return body, buf
        data, buf = _read_exact(conn, buf, size + 2)
        body += data[:-2]


def _answer(
    conn: socket.socket,
    status: str,
    body: bytes,
    close: bool,
    ctype: str = "text/plain",
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"X-Worker-Pid: {os.getpid()}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    conn.sendall(head.encode() + b"\r\n" + (b"" if head_only else body))


def serve(conn: socket.socket) -> None:
    with LOCK:
        STATS["connections"] += 1
    buf = b""
    with conn:
        while True:
            got = _read_head(conn, buf)
            if got is None:
                return
            head, buf = got
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
            low = {k.lower(): v for k, v in headers}
            url = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            close = version == "HTTP/1.0" or low.get("connection", "").lower() == "close"
            if version == "HTTP/1.0" and low.get("connection", "").lower() == "keep-alive":
                close = False
            if path == "/crash":
                os._exit(1)
            if path == "/early":
                _answer(conn, "413 Content Too Large", b"too large\n", close=True)
                time.sleep(float(query.get("hold", "2")))
                return
            if path == "/partial":
                n = int(query.get("n", "10"))
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nX-Worker-Pid: %d\r\n\r\n"
                    % os.getpid()
                    + b"p" * n
                )
                while conn.recv(65536):
                    pass
                return
            if path == "/slowread":
                time.sleep(float(query.get("wait", "1")))
            if path == "/continue" and low.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "chunked" in low.get("transfer-encoding", "").lower():
                body, buf = _read_chunked(conn, buf)
            else:
                body, buf = _read_exact(conn, buf, int(low.get("content-length", "0")))
            with LOCK:
                STATS["requests"] += 1
                STATS["inflight"] += 1
                STATS["max_inflight"] = max(STATS["max_inflight"], STATS["inflight"])
            try:
                delay = float(query.get("delay", "0"))
                if delay:
                    time.sleep(delay)
                if path == "/headers":
                    data = {
                        "pid": os.getpid(),
                        "method": method,
                        "target": target,
                        "headers": [list(h) for h in headers],
                        "body_bytes": len(body),
                    }
                    out = json.dumps(data).encode()
                    _answer(conn, "200 OK", out, close, "application/json")
                elif path == "/stats":
                    with LOCK:
                        data = {"pid": os.getpid(), **STATS}
                    _answer(conn, "200 OK", json.dumps(data).encode(), close, "application/json")
                elif path == "/slowread" or path == "/continue":
                    out = json.dumps({"bytes": len(body)}).encode()
                    _answer(conn, "200 OK", out, close, "application/json")
                elif path == "/big":
                    _answer(conn, "200 OK", b"x" * int(query.get("size", "0")), close)
                else:
                    pid = b"pid=%d\n" % os.getpid()
                    status = "200 OK" if STATUS == "200" else f"{STATUS} Status"
                    _answer(conn, status, pid, close, head_only=method == "HEAD")
            finally:
                with LOCK:
                    STATS["inflight"] -= 1
            if close:
                return


def _serve_safely(conn: socket.socket) -> None:
    try:
        serve(conn)
    except (ConnectionError, OSError, ValueError):
        pass


def main() -> None:
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_safely, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
