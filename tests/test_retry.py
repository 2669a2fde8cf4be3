"""Idempotent retry (SPEC §6): worker deaths cost no GET, a query of death kills two at most.

The end-to-end tests run the daemon with real workers and real SIGKILLs.
The canary test and the hook test run the router in this process, on real
sockets and real worker processes, with hand-made Worker records (one of
them marked canary, as the pool controller marks a restart's canaries).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import UnixHTTPConnection, eventually, get, running_daemon, short_dir

APPS = Path(__file__).parent / "apps"
WORKER = [sys.executable, str(APPS / "proxy_worker.py"), "{socket}"]


class _Clients:
    """Keep-alive clients (GETs of 5-50 ms, and POSTs) counting outcomes by method."""

    def __init__(self, path: str, gets: int, posts: int) -> None:
        self.path = path
        self.results: dict[str, Counter[object]] = {"GET": Counter(), "POST": Counter()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=("GET", i)) for i in range(gets)
        ] + [threading.Thread(target=self._run, args=("POST", i)) for i in range(posts)]

    def _run(self, method: str, seed: int) -> None:
        rnd = random.Random(seed)
        conn = UnixHTTPConnection(self.path, 30)
        while not self._stop.is_set():
            delay = rnd.uniform(0.005, 0.05)
            try:
                if method == "GET":
                    conn.request("GET", f"/?delay={delay:.3f}")
                else:
                    conn.request("POST", f"/?delay={delay:.3f}", body=b"x" * 100)
                resp = conn.getresponse()
                resp.read()
                key: object = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
            except OSError as exc:
                key = type(exc).__name__
                conn.close()
            with self._lock:
                self.results[method][key] += 1
        conn.close()

    def __enter__(self) -> _Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_sigkill_storm_loses_no_get() -> None:
    """4 workers, 16 GET clients: a random worker SIGKILLed every 0.5 s for 10 s, 0 failed GETs.

    POSTs are never replayed: each failed POST was in flight on a killed
    worker, so there are at most as many as kills (worker_concurrency 1).
    """
    app = {"workers": 4, "worker_concurrency": 1, "command": WORKER}
    with running_daemon(app) as d, _Clients(d.front, gets=16, posts=4) as clients:
        eventually(lambda: sum(clients.results["GET"].values()) > 100, 10, what="load")
        kills = 0
        rnd = random.Random(9)
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            pids = d.ready_pids()
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rnd.choice(pids), signal.SIGKILL)
                    kills += 1
            time.sleep(0.5)
        n = sum(clients.results["GET"].values())
        eventually(lambda: sum(clients.results["GET"].values()) > n + 100, 15, what="recovery")
        log = d.log()
    gets, posts = clients.results["GET"], clients.results["POST"]
    assert kills >= 15
    assert set(gets) == {200}, gets
    # Enough GETs that kills hit requests in flight (~1,400 on a quiet machine;
    # a floor, not a speed test: a busy CI machine must not fail it).
    assert sum(gets.values()) > 20 * kills, gets
    failed_posts = sum(v for k, v in posts.items() if k != 200)
    assert set(posts) <= {200, 502}, posts
    assert failed_posts <= kills, (posts, kills)
    assert "request killed two workers" not in log
    print(f"kills={kills} GET={dict(gets)} POST={dict(posts)}")


def test_query_of_death_under_gunicorn_kills_two_children_then_502() -> None:
    """gunicorn --workers 2 (masters survive their children): the killing GET is sent twice."""
    tmp = Path(short_dir())
    qod_log = tmp / "qod.log"
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        "unix:{socket}",
        "--workers",
        "2",
        "--no-control-socket",
        "--chdir",
        str(APPS),
        "qod_wsgi:app",
    ]
    app = {"workers": 3, "command": gunicorn, "env": {"QOD_LOG": str(qod_log)}}
    with running_daemon(app, directory=tmp) as d:
        masters = set(d.ready_pids())
        status, _, _ = get(d.front, "/kill")
        assert status == 502
        assert d.log().count("request killed two workers") == 1
        # Give a third send every chance to happen (it must not).
        for _ in range(10):
            assert get(d.front, "/")[0] == 200
        killed = qod_log.read_text().split()
        assert len(killed) == 2, killed
        assert len(set(killed)) == 2
        # The masters live on: the pool lost no worker.
        assert set(d.ready_pids()) == masters


# -- in-process: the router with hand-made workers -------------------------------------------


@contextlib.contextmanager
def _worker_process(path: str, status: int = 200) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PROXY_WORKER_STATUS": str(status)}
    proc = subprocess.Popen([sys.executable, str(APPS / "proxy_worker.py"), path], env=env)
    try:
        eventually(lambda: os.path.exists(path), 10, what=f"worker socket {path}")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


async def _request(path: str, data: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return int(head.split(b" ")[1]), body


@contextlib.asynccontextmanager
async def _front(
    workers: list[object], front: str
) -> AsyncIterator[tuple[object, list[tuple[int, int, bool]]]]:
    from flypool.http.request import ServerState
    from flypool.http.router import Router
    from flypool.http.server import bind_unix, serve

    loop = asyncio.get_running_loop()
    router = Router(
        loop,
        "app",
        workers,  # type: ignore[arg-type]
        concurrency=0,
        max_queue=10,
        queue_timeout=5.0,
        health_path="",
        max_request_time=0.0,
    )
    done: list[tuple[int, int, bool]] = []
    router.on_request_done = lambda w, status, seconds, failed: done.append((w.pid, status, failed))
    state = ServerState(
        header_timeout=5.0, keepalive_timeout=5.0, body_timeout=5.0, max_header_size=65536
    )
    server = await serve(loop, bind_unix(front, 0o600), router, state)
    try:
        yield router, done
    finally:
        server.close()
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.close()
        for w in workers:
            router.retire_idle(w)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)


def _worker(number: int, generation: int, path: str, pid: int) -> object:
    from flypool.pool.worker import Worker, WorkerState

    w = Worker(number, generation, "/", path, 0.0, WorkerState.READY)
    w.pid = pid
    return w


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_canary_5xx_is_answered_by_an_old_worker(method: str) -> None:
    """A canary's 503 to a GET is asked again of an old worker; a POST's 503 goes through."""
    tmp = Path(short_dir())
    bad_sock, good_sock, front = str(tmp / "bad.sock"), str(tmp / "good.sock"), str(tmp / "f.sock")
    with _worker_process(bad_sock, 503) as bad, _worker_process(good_sock) as good:

        async def main() -> None:
            canary = _worker(2, 2, bad_sock, bad.pid)
            canary.canary = True  # type: ignore[attr-defined]
            old = _worker(1, 1, good_sock, good.pid)
            async with _front([canary, old], front) as (_, done):
                body = b"" if method == "GET" else b"Content-Length: 0\r\n"
                status, text = await _request(
                    front, f"{method} / HTTP/1.1\r\nHost: x\r\n".encode() + body + b"\r\n"
                )
                if method == "GET":
                    # The canary (newest generation) was asked first, then the old worker.
                    assert (status, text) == (200, b"pid=%d\n" % good.pid)
                    assert done == [(bad.pid, 503, False), (good.pid, 200, False)]
                else:
                    assert (status, text) == (503, b"pid=%d\n" % bad.pid)
                    assert done == [(bad.pid, 503, False)]

        asyncio.run(main())


def test_request_done_hook_and_queue_waits() -> None:
    """The hook reports each finished attempt with its worker and status; waits are recorded."""
    tmp = Path(short_dir())
    sock, front = str(tmp / "w.sock"), str(tmp / "f.sock")
    with _worker_process(sock) as proc:

        async def main() -> None:
            w = _worker(1, 1, sock, proc.pid)
            async with _front([w], front) as (router, done):
                router.concurrency = 1  # type: ignore[attr-defined]
                results = await asyncio.gather(
                    *(
                        _request(front, b"GET /?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
                        for _ in range(3)
                    )
                )
                assert [s for s, _ in results] == [200, 200, 200]
                assert done == [(proc.pid, 200, False)] * 3
                waits = router.queue_waits  # type: ignore[attr-defined]
                now = asyncio.get_running_loop().time()
                # Three requests; the third waited two answers (~0.4 s) in the queue.
                assert waits.counts(now) == (3, 2)
                assert 0.2 <= waits.p95(now) <= 1.1

        asyncio.run(main())
