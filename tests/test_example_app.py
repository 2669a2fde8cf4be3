"""Tests for the bundled example worker (`python -m flypool.example`) and its WSGI twin.

Every test runs real processes on real sockets. Socket paths live in short
directories under /tmp (Unix socket paths are limited to about 107 bytes),
every wait has a deadline, and every process started here is killed, with
its process group, when its test ends.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.support import UnixHTTPConnection, eventually

SRC = Path(__file__).resolve().parents[1] / "src"
DEADLINE = 10.0
"""Seconds any single wait in these tests may take before it fails."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: flypool importable, no inherited knobs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXAMPLE_", "FLYPOOL_")) and k != "PORT"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@dataclass
class Proc:
    """A started process, its directory and where its output goes."""

    popen: subprocess.Popen[bytes]
    cwd: str
    socket_path: str
    stdout_path: str
    stderr_path: str

    @property
    def pid(self) -> int:
        """The PID of the process we started."""
        return self.popen.pid

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return Path(self.stdout_path).read_text(), Path(self.stderr_path).read_text()

    def connect(self) -> socket.socket:
        """A raw socket connected to the worker's Unix socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(DEADLINE)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def http(self) -> UnixHTTPConnection:
        """An HTTP connection to the worker's Unix socket."""
        return UnixHTTPConnection(self.socket_path)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        """Wait for the process to exit and return its status."""
        return self.popen.wait(timeout)

    def wait_listening(self) -> None:
        """Poll-connect until the socket accepts; fail early if the process dies."""

        def accepts() -> bool:
            if self.popen.poll() is not None:
                out, err = self.output()
                pytest.fail(f"exited with {self.popen.returncode}:\n{out}{err}")
            try:
                self.connect().close()
            except OSError:
                return False
            return True

        eventually(accepts, DEADLINE, what=f"{self.socket_path} to accept connections")


class Launcher:
    """Starts processes in their own session and kills each group at `close`."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.dirs: list[str] = []

    def short_dir(self) -> str:
        """A fresh directory with a short path (room for a socket name)."""
        path = tempfile.mkdtemp(prefix="fpx", dir="/tmp")
        self.dirs.append(path)
        return path

    def start(
        self,
        args: list[str] | None = None,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Proc:
        """Start the example (with `args`) or `command`, in `cwd` (a new short dir)."""
        cwd = cwd or self.short_dir()
        socket_path = os.path.join(cwd, "w.sock")
        if command is None:
            command = [sys.executable, "-m", "flypool.example", *(args or [])]
        command = [part.replace("{socket}", socket_path) for part in command]
        stdout_path = os.path.join(cwd, "stdout.log")
        stderr_path = os.path.join(cwd, "stderr.log")
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                env=env if env is not None else child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # so close() can kill its children too (gunicorn)
            )
        proc = Proc(popen, cwd, socket_path, stdout_path, stderr_path)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill every process group we started, reap them, remove the directories."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait(DEADLINE)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    """A `Launcher` whose processes die with the test."""
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def worker() -> Iterator[Proc]:
    """One example worker, shared by the tests that do not change its state."""
    launcher = Launcher()
    try:
        proc = launcher.start(["--socket", "{socket}"], env=child_env(FLYPOOL_WORKER="3"))
        proc.wait_listening()
        yield proc
    finally:
        launcher.close()


@dataclass
class RawResponse:
    """A response read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes


def read_response(f: BinaryIO) -> RawResponse:
    """Read one response (Content-Length framing, or none) from `f`."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return RawResponse(int(status_line.split()[1]), headers, body)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Receive exactly `n` bytes (the socket has a timeout)."""
    parts = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        assert data, "connection closed early"
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def expected_body(proc: Proc, worker: str) -> bytes:
    """What `GET /` answers for `proc`."""
    return f"pid={proc.pid} worker={worker} release={os.path.realpath(proc.cwd)}\n".encode()


# HTTP behaviour, on the shared worker


def test_get_keeps_the_connection_alive(worker: Proc) -> None:
    """Several GETs go over one connection and carry the worker's identity."""
    conn = worker.http()
    try:
        first_sock = None
        for _ in range(5):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == expected_body(worker, "3")
            assert resp.getheader("X-Worker-Pid") == str(worker.pid)
            assert resp.getheader("X-Worker-Id") == "3"
            assert resp.getheader("X-Release") == os.path.basename(worker.cwd)
            assert resp.getheader("Date")
            assert not resp.will_close
            first_sock = first_sock or conn.sock
            assert conn.sock is first_sock  # http.client would have reconnected
    finally:
        conn.close()


def test_size_status_and_head(worker: Proc) -> None:
    """`size=` gives exactly N bytes (streamed when large), `status=` the code, HEAD no body."""
    conn = worker.http()
    try:
        for size in (0, 10, 65536, 65537, 3_000_000):
            conn.request("GET", f"/?size={size}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Content-Length") == str(size)
            assert resp.read() == b"x" * size
        conn.request("GET", "/?status=503&size=3")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (503, b"xxx")
        conn.request("GET", "/?status=404")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (404, expected_body(worker, "3"))
        conn.request("HEAD", "/?size=1000000")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == "1000000"
        assert resp.read() == b""
        conn.request("GET", "/?status=204")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (204, None, b"")
    finally:
        conn.close()


@pytest.mark.parametrize("target", ["/?size=-1", "/?size=x", "/?status=99", "/?delay=nan"])
def test_bad_parameters_are_400(worker: Proc, target: str) -> None:
    """A malformed or out-of-range query parameter is answered 400, then the connection closes."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(f"GET {target} HTTP/1.1\r\n\r\n".encode())
        resp = read_response(f)
        assert (resp.status, resp.headers["connection"]) == (400, "close")
        assert b"bad " in resp.body
        assert f.read() == b""


def test_upload_hashes_the_body_as_it_streams(worker: Proc) -> None:
    """`/upload` answers sha256 and length of a Content-Length or chunked body."""
    data = os.urandom(3 * 1024 * 1024 + 5)
    want = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    conn = worker.http()
    try:
        conn.request("POST", "/upload", body=data)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/json"
        assert json.loads(resp.read()) == want

        pieces = (data[i : i + 70_001] for i in range(0, len(data), 70_001))
        conn.request("PUT", "/upload", body=pieces, encode_chunked=True)
        resp = conn.getresponse()
        assert json.loads(resp.read()) == want
    finally:
        conn.close()


def test_headers_route_shows_what_was_received(worker: Proc) -> None:
    """`/headers` lists the request's header fields in order, with method, target and version."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"POST /headers?a=1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"X-Dup: 1\r\nX-Dup:  2 \r\nContent-Length: 3\r\n\r\nabc"
            b"GET http://example.com/headers HTTP/1.0\r\n\r\n"
        )
        got = json.loads(read_response(f).body)
        absolute = json.loads(read_response(f).body)
    assert got == {
        "method": "POST",
        "target": "/headers?a=1",
        "version": "HTTP/1.1",
        "headers": [
            ["Host", "x"],
            ["X-Forwarded-For", "10.0.0.1"],
            ["X-Dup", "1"],
            ["X-Dup", "2"],
            ["Content-Length", "3"],
        ],
        "body_bytes": 3,
    }
    assert (absolute["target"], absolute["version"]) == ("http://example.com/headers", "HTTP/1.0")


def test_pipelined_requests_are_answered_in_order(worker: Proc) -> None:
    """A slow first request does not let later pipelined ones overtake it."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"GET /?delay=0.05&size=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first, second, third = (read_response(f) for _ in range(3))
    assert first.body == b"x"
    assert json.loads(second.body)["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert (third.status, third.body) == (200, b"ok")


def test_many_pipelined_requests_are_all_answered(worker: Proc) -> None:
    """Far more pipelined requests than MAX_QUEUED, behind a slow one: all answered, in order."""
    count = 200
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /headers?n=0&delay=0.1 HTTP/1.1\r\n\r\n")
        for n in range(1, count):  # one write each: later ones wait while reading is paused
            sock.sendall(b"GET /headers?n=%d HTTP/1.1\r\n\r\n" % n)
        targets = [json.loads(read_response(f).body)["target"] for _ in range(count)]
    assert targets[0] == "/headers?n=0&delay=0.1"
    assert targets[1:] == [f"/headers?n={n}" for n in range(1, count)]


def test_upgrade_becomes_a_raw_echo(worker: Proc) -> None:
    """`/ws` with Upgrade answers 101 (with Sec-WebSocket-Accept) and then echoes bytes."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        resp = read_response(f)
        assert resp.status == 101
        assert resp.headers["upgrade"] == "websocket"
        assert resp.headers["connection"] == "Upgrade"
        # The example from RFC 6455 §1.3.
        assert resp.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert "x-worker-pid" in resp.headers
        payload = os.urandom(300_000) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
        sock.sendall(payload)
        assert f.read(len(payload)) == payload
    with worker.connect() as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, upgrade\r\n"
            b"Upgrade: echo\r\n\r\nearly bytes"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: echo\r\n" in head
        assert recv_exactly(sock, 11) == b"early bytes"


LENGTH_3 = b"Content-Length: 3\r\n"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /headers HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: foo\r\n" + LENGTH_3, 200),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n" + LENGTH_3, 400),
    ],
    ids=["upgrade-elsewhere", "connect"],
)
def test_upgrades_it_does_not_take_are_answered_then_closed(
    worker: Proc, head: bytes, status: int
) -> None:
    """An upgrade other than `GET /ws` gets an ordinary answer, CONNECT a 400; then a close."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(head + b"\r\nabc")
        resp = read_response(f)
        assert (resp.status, resp.headers["connection"]) == (status, "close")
        assert f.read() == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests_are_refused_and_closed(
    worker: Proc, request_bytes: bytes, status: int
) -> None:
    """Malformed heads and ambiguous framing get an error answer, then the connection closes."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(request_bytes)
        resp = read_response(f)
        assert resp.status == status
        assert resp.headers["connection"] == "close"
        assert f.read() == b""


def test_a_refusal_comes_after_the_answers_before_it(worker: Proc) -> None:
    """A good request, then garbage: the good one is answered first, then 400 and a close."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /ready?delay=0.05 HTTP/1.1\r\n\r\nGARBAGE\r\n\r\n")
        assert read_response(f).body == b"ok"
        assert read_response(f).status == 400
        assert f.read() == b""


def test_connection_close_rules(worker: Proc) -> None:
    """HTTP/1.0 closes unless asked to keep alive; `Connection: close` closes."""
    for request, closes in [
        (b"GET / HTTP/1.0\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /ready HTTP/1.1\r\n\r\n", True),
    ]:
        with worker.connect() as sock, sock.makefile("rb") as f:
            sock.sendall(request)
            resp = read_response(f)
            assert resp.status == 200
            if closes:
                assert resp.headers["connection"] == "close"
                assert f.read() == b""  # nothing answered after a close
            else:
                assert resp.headers["connection"] == "keep-alive"
                sock.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                assert read_response(f).body == b"ok"


def test_half_closed_client_still_gets_its_answer(worker: Proc) -> None:
    """A request followed by SHUT_WR is answered, then the connection closes."""
    with worker.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /ready?delay=0.05 HTTP/1.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_response(f).body == b"ok"
        assert f.read() == b""


# Process behaviour: each test starts its own worker


def test_port_mode_prints_its_address(launcher: Launcher) -> None:
    """`--port 0` listens on 127.0.0.1 and says where in its first stdout line."""
    proc = launcher.start(["--port", "0"], env=child_env(FLYPOOL_WORKER="9"))
    pattern = re.compile(r"example: listening on 127\.0\.0\.1:(\d+) pid=(\d+) worker=9 release=")
    eventually(
        lambda: pattern.match(proc.output()[0]) is not None, DEADLINE, what="the listening line"
    )
    match = pattern.match(proc.output()[0])
    assert match is not None and int(match[2]) == proc.pid
    conn = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=DEADLINE)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, expected_body(proc, "9"))
    finally:
        conn.close()


def test_flypool_socket_from_the_environment(launcher: Launcher) -> None:
    """Without a flag, the worker listens on $FLYPOOL_SOCKET."""
    cwd = launcher.short_dir()
    env = child_env(FLYPOOL_SOCKET=os.path.join(cwd, "w.sock"))
    proc = launcher.start([], env=env, cwd=cwd)
    proc.wait_listening()
    conn = proc.http()
    try:
        conn.request("GET", "/ready")
        assert conn.getresponse().read() == b"ok"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "give --socket PATH or --port N"),
        (["--socket", "{socket}"], {"EXAMPLE_BOOT_DELAY": "soon"}, "EXAMPLE_BOOT_DELAY='soon'"),
    ],
)
def test_usage_errors_exit_2(
    launcher: Launcher, args: list[str], env: dict[str, str], message: str
) -> None:
    """No address, or a bad knob: exit status 2 and a message on stderr."""
    proc = launcher.start(args, env=child_env(**env))
    assert proc.wait_exit() == 2
    assert message in proc.output()[1]


def test_sigterm_finishes_in_flight_requests_then_exits(launcher: Launcher) -> None:
    """SIGTERM closes idle connections, finishes the busy one, removes the socket, exits 0."""
    proc = launcher.start(["--socket", "{socket}"])
    proc.wait_listening()
    with (
        proc.connect() as idle,
        idle.makefile("rb") as idle_f,
        proc.connect() as busy,
        busy.makefile("rb") as busy_f,
    ):
        idle.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
        assert read_response(idle_f).body == b"ok"
        # 100 Continue proves the worker holds this request before we signal it.
        busy.sendall(b"POST /upload HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert busy_f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert busy_f.readline() == b"\r\n"

        os.kill(proc.pid, signal.SIGTERM)
        assert idle_f.read() == b""  # closed at once (not reset, not waited for)
        busy.sendall(b"hello")
        resp = read_response(busy_f)
        assert resp.status == 200
        assert resp.headers["connection"] == "close"
        assert json.loads(resp.body)["bytes"] == 5
        assert busy_f.read() == b""
    assert proc.wait_exit() == 0
    assert not os.path.exists(proc.socket_path)
    assert "stopped" in proc.output()[1]


def test_sigterm_closes_tunnels_and_a_second_signal_skips_the_wait(launcher: Launcher) -> None:
    """A tunnel is closed at SIGTERM; a slow answer is waited for, unless SIGQUIT follows."""
    proc = launcher.start(["--socket", "{socket}"])
    proc.wait_listening()
    with (
        proc.connect() as tunnel,
        tunnel.makefile("rb") as tunnel_f,
        proc.connect() as slow,
        slow.makefile("rb") as slow_f,
    ):
        tunnel.sendall(b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        assert read_response(tunnel_f).status == 101
        # 100 Continue proves the worker holds this request before we signal it.
        slow.sendall(
            b"PUT /?delay=30 HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
        )
        assert slow_f.readline() == b"HTTP/1.1 100 Continue\r\n"
        slow.sendall(b"x")
        os.kill(proc.pid, signal.SIGTERM)
        assert tunnel_f.read() == b""
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait_exit(0.3)  # still waiting for the slow answer
        os.kill(proc.pid, signal.SIGQUIT)
        assert proc.wait_exit() == 0
        assert slow_f.read() == b"\r\n"  # the rest of the 100; the answer was cut
    assert not os.path.exists(proc.socket_path)


def test_idle_keepalive_timeout(launcher: Launcher) -> None:
    """EXAMPLE_KEEPALIVE_TIMEOUT closes idle connections only, and counts from the last answer."""
    proc = launcher.start(["--socket", "{socket}"], env=child_env(EXAMPLE_KEEPALIVE_TIMEOUT="0.5"))
    proc.wait_listening()
    with proc.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /ready?delay=0.7 HTTP/1.1\r\n\r\n")  # busy longer than the timeout
        assert read_response(f).body == b"ok"
        started = time.monotonic()
        for _ in range(6):  # 0.6 s in all: longer than the timeout, but never idle that long
            sock.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
            assert read_response(f).body == b"ok"
            time.sleep(0.1)
        last = time.monotonic()
        assert last - started > 0.5
        assert f.read() == b""
        # Closed about 0.5 s after the last answer (0.1 s of it slept before
        # `last`), not at once; timer granularity gets a little slack.
        assert time.monotonic() - last >= 0.3


@pytest.mark.parametrize("how", ["env", "file"])
def test_fail_at_boot(launcher: Launcher, how: str) -> None:
    """EXAMPLE_FAIL_AT_BOOT or a `fail_at_boot` file: exit 3 after the boot delay, with a reason."""
    cwd = launcher.short_dir()
    env = child_env(EXAMPLE_BOOT_DELAY="0.2")
    if how == "env":
        env["EXAMPLE_FAIL_AT_BOOT"] = "1"
    else:
        Path(cwd, "fail_at_boot").touch()
    started = time.monotonic()
    proc = launcher.start(["--socket", "{socket}"], env=env, cwd=cwd)
    assert proc.wait_exit() == 3
    assert time.monotonic() - started >= 0.2
    stderr = proc.output()[1].splitlines()
    assert stderr == [
        "example: failing at boot as asked (EXAMPLE_FAIL_AT_BOOT)",
        "RuntimeError: boot failure requested",
    ]
    assert not os.path.exists(proc.socket_path)


def catches_sigterm(pid: int) -> bool:
    """Whether `pid` has installed a SIGTERM handler (its SigCgt mask in /proc)."""
    match = re.search(r"SigCgt:\s+([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())
    return match is not None and bool(int(match[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_during_the_boot_delay_exits_0(launcher: Launcher) -> None:
    """A worker stopped while it boots (EXAMPLE_BOOT_DELAY) exits 0 without listening."""
    proc = launcher.start(["--socket", "{socket}"], env=child_env(EXAMPLE_BOOT_DELAY="30"))
    eventually(lambda: catches_sigterm(proc.pid), DEADLINE, what="a SIGTERM handler")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert not os.path.exists(proc.socket_path)


def test_ignore_sigterm(launcher: Launcher) -> None:
    """With EXAMPLE_IGNORE_SIGTERM=1 the worker keeps serving after SIGTERM."""
    proc = launcher.start(["--socket", "{socket}"], env=child_env(EXAMPLE_IGNORE_SIGTERM="1"))
    proc.wait_listening()
    os.kill(proc.pid, signal.SIGTERM)
    conn = proc.http()
    try:
        conn.request("GET", "/ready")
        assert conn.getresponse().read() == b"ok"
    finally:
        conn.close()
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait_exit(0.3)


def test_crash_route_kills_the_worker(launcher: Launcher) -> None:
    """`/crash` exits with status 1 without answering."""
    proc = launcher.start(["--socket", "{socket}"])
    proc.wait_listening()
    with proc.connect() as sock:
        sock.sendall(b"GET /crash HTTP/1.1\r\n\r\n")
        assert sock.recv(1) == b""
    assert proc.wait_exit() == 1


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of `pid` so far."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match[1])


def test_grow_keeps_memory(launcher: Launcher) -> None:
    """`/grow?mb=N` makes the worker hold N more MiB (the memory_limit tests rely on it)."""
    proc = launcher.start(["--socket", "{socket}"])
    proc.wait_listening()
    before = peak_rss_kib(proc.pid)
    conn = proc.http()
    try:
        conn.request("GET", "/grow?mb=64")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"grew 64 MiB\n")
    finally:
        conn.close()
    assert peak_rss_kib(proc.pid) - before >= 60 * 1024


def test_large_bodies_stream_with_bounded_memory(launcher: Launcher) -> None:
    """A 200 MB answer and a 64 MB chunked upload leave the worker's peak RSS small."""
    proc = launcher.start(["--socket", "{socket}"])
    proc.wait_listening()
    size = 200_000_000
    with proc.connect() as sock:
        sock.sendall(f"GET /?size={size} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        received = len(head) - head.index(b"\r\n\r\n") - 4
        while received < size:
            data = sock.recv(1 << 20)
            assert data
            received += len(data)
        assert received == size

        chunk = b"%x\r\n" % (1 << 20) + b"y" * (1 << 20) + b"\r\n"
        sock.sendall(b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
        with sock.makefile("rb") as f:
            assert json.loads(read_response(f).body)["bytes"] == 64 << 20
    assert peak_rss_kib(proc.pid) < 100 * 1024


# The fast backend of the router benchmarks (benchmarks/apps/fast_backend.py)

FAST_BACKEND = Path(__file__).resolve().parents[1] / "benchmarks" / "apps" / "fast_backend.py"


def test_fast_backend_answers_keepalive_and_close(launcher: Launcher) -> None:
    """It answers every request on a kept-alive connection, and honours Connection: close."""
    proc = launcher.start(command=[sys.executable, str(FAST_BACKEND), "--socket", "{socket}"])
    proc.wait_listening()
    with proc.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        for _ in range(2):
            resp = read_response(f)
            assert (resp.status, resp.body) == (200, f"pid={proc.pid} worker=-\n".encode())
        sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_response(f).headers["connection"] == "close"
        assert f.read() == b""
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert not os.path.exists(proc.socket_path)


# The WSGI twin, under gunicorn


def gunicorn_command() -> list[str]:
    """The worker command of the brief, for the gunicorn installed here."""
    gunicorn_config = pytest.importorskip("gunicorn.config")
    command = [sys.executable, "-m", "gunicorn", "--bind", "unix:{socket}", "--workers", "1"]
    if any("--no-control-socket" in (s.cli or ()) for s in gunicorn_config.KNOWN_SETTINGS):
        # Recent gunicorn binds ~/.gunicorn/gunicorn.ctl by default, one path for all instances.
        command.append("--no-control-socket")
    return [*command, "flypool.example.wsgi:app"]


def test_gunicorn_serves_the_wsgi_app(launcher: Launcher) -> None:
    """gunicorn runs `flypool.example.wsgi:app` on a Unix socket and answers."""
    proc = launcher.start(command=gunicorn_command(), env=child_env(FLYPOOL_WORKER="5"))
    proc.wait_listening()
    conn = proc.http()
    try:
        conn.request("GET", "/?delay=0.01")
        resp = conn.getresponse()
        body = resp.read().decode()
        worker_pid = resp.getheader("X-Worker-Pid")
        assert resp.status == 200
        assert body == (
            f"pid={worker_pid} worker=5 release={os.path.realpath(proc.cwd)} server=gunicorn\n"
        )
        assert worker_pid != str(proc.pid)  # the arbiter forks a worker process
    finally:
        conn.close()
    conn = proc.http()
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
    finally:
        conn.close()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_gunicorn_fails_at_boot(launcher: Launcher) -> None:
    """A `fail_at_boot` file makes the WSGI app raise at import, so gunicorn exits non-zero."""
    cwd = launcher.short_dir()
    Path(cwd, "fail_at_boot").touch()
    proc = launcher.start(command=gunicorn_command(), cwd=cwd)
    assert proc.wait_exit() != 0
    assert "RuntimeError: boot failure requested" in proc.output()[1]
