"""A two-host fleet behind a real HAProxy (Debian), deployed host by host with drain/undrain."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Daemon,
    LoadGen,
    UnixHTTPConnection,
    eventually,
    free_port,
    running_daemon,
    short_dir,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TEMPLATE = Path(__file__).parent.parent / "packaging" / "haproxy" / "flypool-fleet.cfg"

pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY), reason="haproxy not installed (scripts/install installs it)"
)


def _server_state(stats_sock: str) -> dict[str, str]:
    """Server name -> status (UP/DOWN/...) from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats_sock)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    states = {}
    for line in data.decode().splitlines():
        cols = line.split(",")
        if len(cols) > 17 and cols[0] == "flypool_fleet" and cols[1].startswith("host"):
            states[cols[1]] = cols[17]
    return states


@contextlib.contextmanager
def running_haproxy(cfg: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGUSR1)  # soft stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _deploy_host(d: Daemon, name: str, stats: str) -> None:
    assert d.cli("drain").returncode == 0
    eventually(
        lambda: _server_state(stats).get(name, "").startswith("DOWN"),
        10,
        what=f"{name} marked down",
    )
    # Even a blocking restart is safe now: the load balancer sends nothing here.
    res = d.cli("restart", "--blocking", "--wait")
    assert res.returncode == 0, res.stderr
    assert d.cli("undrain").returncode == 0
    eventually(lambda: _server_state(stats).get(name) == "UP", 10, what=f"{name} back up")


def test_fleet_deploy_host_by_host_behind_haproxy() -> None:
    app = {"workers": 2, "health_path": "/_flypool/health", "env": {"EXAMPLE_BOOT_DELAY": "0.3"}}
    p1, p2, front = free_port(), free_port(), free_port()
    tmp = Path(short_dir())
    stats = str(tmp / "haproxy.sock")
    with (
        running_daemon({**app, "listen": [f"127.0.0.1:{p1}"]}) as h1,
        running_daemon({**app, "listen": [f"127.0.0.1:{p2}"]}) as h2,
    ):
        cfg = TEMPLATE.read_text()
        cfg = cfg.replace("HOST1", f"127.0.0.1:{p1}").replace("HOST2", f"127.0.0.1:{p2}")
        cfg = cfg.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{front}")
        cfg = cfg.replace(
            "    maxconn 4096\n",
            f"    maxconn 4096\n    stats socket {stats} mode 600 level admin\n",
        )
        (tmp / "haproxy.cfg").write_text(cfg)
        with running_haproxy(tmp / "haproxy.cfg"):
            eventually(
                lambda: (
                    os.path.exists(stats) and _server_state(stats) == {"host1": "UP", "host2": "UP"}
                ),
                10,
                what="both hosts up",
            )
            old1, old2 = set(h1.ready_pids()), set(h2.ready_pids())
            with LoadGen("", clients=6, tcp=("127.0.0.1", front)) as load:
                eventually(lambda: load.total > 50, 10, what="load running")
                _deploy_host(h1, "host1", stats)
                _deploy_host(h2, "host2", stats)
                n = load.total
                eventually(lambda: load.total > n + 50, 10, what="load after deploy")
            assert load.failures() == {}, load.statuses
            assert not old1 & set(h1.ready_pids())
            assert not old2 & set(h2.ready_pids())
            # Both hosts served during the run.
            assert all(h.app()["workers"][0]["processed"] > 0 for h in (h1, h2))
    shutil.rmtree(tmp, ignore_errors=True)


# -- PROXY protocol and client addresses (SPEC §3 proxy_protocol, §9) ------------------------

WORKER = [sys.executable, str(Path(__file__).parent / "apps" / "proxy_worker.py"), "{socket}"]
# The client connects from another loopback address than HAProxy's, so that
# the address the worker sees tells which one flypool used.
CLIENT_ADDR = "127.0.0.2"


def _tcp_get_headers(port: int, extra: bytes = b"", source: str = CLIENT_ADDR) -> dict[str, str]:
    """GET /headers from ``source`` to 127.0.0.1:port; the headers the worker saw."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def _processed(d: Daemon) -> int:
    return sum(w["processed"] for w in d.app()["workers"])


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_proxy_protocol_through_haproxy_gives_the_client_address(send_proxy: str) -> None:
    """HAProxy (mode tcp) sends a PROXY v1/v2 header: the worker sees the client's address."""
    port, front = free_port(), free_port()
    tmp = Path(short_dir())
    app = {"workers": 1, "command": WORKER, "listen": [f"127.0.0.1:{port}"]}
    app["proxy_protocol"] = True
    with running_daemon(app):
        (tmp / "haproxy.cfg").write_text(
            "global\n    maxconn 256\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n"
            "    timeout client 10s\n    timeout server 10s\n"
            f"frontend f\n    bind 127.0.0.1:{front}\n    default_backend b\n"
            f"backend b\n    server s1 127.0.0.1:{port} {send_proxy}\n"
        )
        with running_haproxy(tmp / "haproxy.cfg"):
            headers = eventually(lambda: _tcp_get_headers(front), 10, what="haproxy up")
            assert headers["x-forwarded-for"] == CLIENT_ADDR, headers
            # An X-Forwarded-For the client sent gets the address appended.
            headers = _tcp_get_headers(front, b"X-Forwarded-For: 192.0.2.7\r\n")
            assert headers["x-forwarded-for"] == f"192.0.2.7, {CLIENT_ADDR}", headers
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 192.0.2.1 nonsense\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1000",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00",
    ],
    ids=["no-header", "malformed-v1", "truncated-v1", "truncated-v2"],
)
def test_proxy_protocol_refuses_connections_without_a_good_header(data: bytes) -> None:
    """Without a complete, valid PROXY header: closed unanswered, and no worker sees it."""
    port = free_port()
    app = {"workers": 1, "command": WORKER, "listen": [f"127.0.0.1:{port}"]}
    app["proxy_protocol"] = True
    daemon = {"header_timeout": "1s"}
    with running_daemon(app, daemon=daemon) as d:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    got += chunk
        assert got == b""
        assert _processed(d) == 0


def test_tcp_listener_appends_the_peer_to_x_forwarded_for() -> None:
    """Without proxy_protocol a TCP client's own address is appended to X-Forwarded-For."""
    port = free_port()
    app = {"workers": 1, "command": WORKER, "listen": [f"127.0.0.1:{port}"]}
    with running_daemon(app):
        assert _tcp_get_headers(port)["x-forwarded-for"] == CLIENT_ADDR
        headers = _tcp_get_headers(port, b"X-Forwarded-For: 192.0.2.7, 198.51.100.1\r\n")
        assert headers["x-forwarded-for"] == f"192.0.2.7, 198.51.100.1, {CLIENT_ADDR}"


def test_unix_listener_passes_forwarding_headers_unchanged() -> None:
    """On a Unix listener the web server's X-Forwarded-For reaches the worker as it was."""
    with running_daemon({"workers": 1, "command": WORKER, "proxy_protocol": True}) as d:
        conn = UnixHTTPConnection(d.front)
        conn.request("GET", "/headers", headers={"X-Forwarded-For": "192.0.2.7"})
        headers = {k.lower(): v for k, v in json.loads(conn.getresponse().read())["headers"]}
        conn.close()
        assert headers["x-forwarded-for"] == "192.0.2.7"
        conn = UnixHTTPConnection(d.front)
        conn.request("GET", "/headers")
        headers = {k.lower(): v for k, v in json.loads(conn.getresponse().read())["headers"]}
        conn.close()
        assert "x-forwarded-for" not in headers
