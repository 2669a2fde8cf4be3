"""Regression tests for the proxy defects of issue 9 (each failed on the main before it).

The worker is ``tests/apps/proxy_worker.py``: a threaded stdlib server with
paths that answer early, read late, never finish an answer, or report how
many connections and concurrent requests it saw.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from tests.support import (
    UnixHTTPConnection,
    eventually,
    free_port,
    get,
    http_get,
    running_daemon,
)
from tests.test_hostile_http import parse_responses, read

N8 = 8 << 20
N4 = 4 << 20
WORKER = [sys.executable, str(Path(__file__).parent / "apps" / "proxy_worker.py"), "{socket}"]


def _sessions(d: object) -> int:
    return sum(w["sessions"] for w in d.app()["workers"])  # type: ignore[attr-defined]


def _stats(path: str) -> dict[str, int]:
    status, body, _ = get(path, "/stats")
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def _unix(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def _send_in_thread(s: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        try:
            s.sendall(data)
        except OSError:
            pass

    t = threading.Thread(target=run)
    t.start()
    return t


# -- a. max_request_time ---------------------------------------------------------------------


def test_max_request_time_starts_when_a_worker_takes_the_request() -> None:
    """Two 1.5 s requests on one single-slot worker with a 2 s limit: both 200, no replacement."""
    app = {"workers": 1, "worker_concurrency": 1, "max_request_time": "2s", "command": WORKER}
    with running_daemon(app) as d:
        pid = d.ready_pids()[0]
        results: list[tuple[int, bytes]] = []

        def one() -> None:
            status, body, _ = get(d.front, "/?delay=1.5")
            results.append((status, body))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert [s for s, _ in results] == [200, 200], results
        assert {b for _, b in results} == {b"pid=%d\n" % pid}
        assert d.ready_pids() == [pid]
        assert "max_request_time exceeded" not in d.log()


# -- b. send_timeout -------------------------------------------------------------------------


def test_send_timeout_frees_the_worker_of_a_client_that_reads_nothing() -> None:
    """A client that reads none of a 32 MB answer is closed after send_timeout; slot freed."""
    app = {"workers": 1, "worker_concurrency": 1, "command": WORKER}
    with running_daemon(app, daemon={"send_timeout": "1s"}) as d, _unix(d.front) as s:
        s.sendall(b"GET /big?size=33554432 HTTP/1.1\r\nHost: x\r\n\r\n")
        eventually(lambda: _sessions(d) == 1, 5, what="answer in progress")
        t0 = time.monotonic()
        eventually(lambda: _sessions(d) == 0, 6, what="slot freed by send_timeout")
        assert time.monotonic() - t0 < 4.5
        assert get(d.front, "/")[0] == 200
        # The stalled client's connection was closed: reading it ends.
        s.settimeout(10)
        got = 0
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < 33554432


# -- c. an early answer while the upload is paused ----------------------------------------------


def test_early_answer_during_a_paused_upload_then_next_request_is_served() -> None:
    """413 right after the head, upload paused: the answer arrives, the rest of the body is
    read and dropped, and the next request on the same connection is answered at once."""
    app = {"workers": 1, "command": WORKER}
    body = b"b" * N8
    with running_daemon(app) as d, _unix(d.front) as s:
        s.sendall(b"POST /early?hold=5 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % N8)
        sender = _send_in_thread(s, body)
        raw, closed = read(s, 5.0, until=1)
        [r] = parse_responses(raw)
        assert r.status == 413 and not closed, raw
        sender.join(10)
        assert not sender.is_alive()
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw, _ = read(s, 5.0, until=1)
        [r] = parse_responses(raw)
        assert r.status == 200, raw
        assert time.monotonic() - t0 < 1.0


def test_early_answer_with_close_survives_over_tcp() -> None:
    """Over TCP an early 413 that ends the connection reaches the client intact (lingering)."""
    port = free_port()
    app = {"workers": 1, "command": WORKER, "listen": [f"127.0.0.1:{port}"]}
    body = b"b" * (8 << 20)
    with running_daemon(app) as d:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    b"POST /early?hold=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                sender = _send_in_thread(s, body)
                raw, closed = read(s, 10.0)
                sender.join(10)
            [r] = parse_responses(raw)
            assert r.status == 413 and r.body == b"too large\n", raw
            assert closed
        assert d.proc.poll() is None


# -- e. timeouts measure only the peer -------------------------------------------------------


def test_worker_backpressure_is_not_a_client_body_timeout() -> None:
    """A worker that reads the body 3 s late (body_timeout 1 s): no 408, the upload completes."""
    app = {"workers": 1, "command": WORKER}
    body = b"u" * N4
    with running_daemon(app, daemon={"body_timeout": "1s"}) as d, _unix(d.front, 15) as s:
        s.sendall(b"POST /slowread?wait=3 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % N4)
        sender = _send_in_thread(s, body)
        raw, _ = read(s, 15.0, until=1)
        sender.join(10)
        [r] = parse_responses(raw)
        assert r.status == 200, raw
        assert json.loads(r.body) == {"bytes": len(body)}


def test_timeout_during_an_answer_cuts_it_without_a_second_status_line() -> None:
    """The body stalls while the worker's answer is half sent: the connection is cut, no 408."""
    app = {"workers": 1, "command": WORKER}
    with running_daemon(app, daemon={"body_timeout": "1s"}) as d, _unix(d.front) as s:
        s.sendall(
            b"POST /partial?n=10 HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
            + b"a" * 70000
        )
        raw, closed = read(s, 6.0)
        assert closed, raw
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
        assert raw.count(b"HTTP/1.") == 1, raw[:400]
        eventually(lambda: _sessions(d) == 0, 5, what="slot freed")


# -- g. interim answers, HEAD, client aborts ------------------------------------------------


def test_http10_client_gets_no_interim_answer() -> None:
    """A 100 Continue from the worker is not relayed to an HTTP/1.0 client."""
    app = {"workers": 1, "command": WORKER}
    with running_daemon(app) as d, _unix(d.front) as s:
        s.sendall(b"POST /continue HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        early, _ = read(s, 0.5)
        s.sendall(b"abcde")
        raw, _ = read(s, 5.0)
        got = parse_responses(early + raw)
        assert [r.status for r in got] == [200], early + raw
        assert json.loads(got[0].body) == {"bytes": 5}


def test_head_answers_reuse_the_worker_connection() -> None:
    """Keep-alive HEAD requests don't cost a worker connection each."""
    app = {"workers": 1, "command": WORKER}
    with running_daemon(app) as d:
        conn = UnixHTTPConnection(d.front)
        for _ in range(5):
            conn.request("HEAD", "/")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == b""
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
        assert stats["connections"] <= 2, stats


def test_client_abort_keeps_the_slot_until_the_worker_is_done() -> None:
    """A client that resets mid-request doesn't free its slot while the worker still works."""
    port = free_port()
    app = {"workers": 1, "worker_concurrency": 1, "command": WORKER}
    app["listen"] = [f"127.0.0.1:{port}"]
    with running_daemon(app) as d:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /?delay=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            eventually(lambda: _sessions(d) == 1, 5, what="request with the worker")
            # SO_LINGER 0: the close is an RST, an abort the daemon sees at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t0 = time.monotonic()
        assert http_get(port, "/")[0] == 200
        assert time.monotonic() - t0 > 0.5
        assert json.loads(http_get(port, "/stats")[1])["max_inflight"] == 1
