"""A real nginx (Debian nginx-light) in front of flypool, using packaging/nginx/flypool.conf."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Daemon,
    LoadGen,
    eventually,
    free_port,
    http_get,
    running_daemon,
    short_dir,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SNIPPET = Path(__file__).parent.parent / "packaging" / "nginx" / "flypool.conf"

pytestmark = pytest.mark.skipif(
    not os.path.exists(NGINX), reason="nginx not installed (scripts/install installs nginx-light)"
)


def _nginx_conf(prefix: Path, front_sock: str, port: int) -> Path:
    """The shipped snippet, pointed at this test's socket and port, in a minimal nginx.conf."""
    snippet = SNIPPET.read_text()
    snippet = snippet.replace("unix:/run/flypool/blog.sock", f"unix:{front_sock}")
    snippet = snippet.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (prefix / "flypool.conf").write_text(snippet)
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\n"
        f"error_log {prefix}/logs/error.log warn;\n"
        f"pid {prefix}/nginx.pid;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "  access_log off;\n"
        f"  client_body_temp_path {prefix}/tmp/body;\n"
        f"  proxy_temp_path {prefix}/tmp/proxy;\n"
        f"  fastcgi_temp_path {prefix}/tmp/fastcgi;\n"
        f"  uwsgi_temp_path {prefix}/tmp/uwsgi;\n"
        f"  scgi_temp_path {prefix}/tmp/scgi;\n"
        f"  include {prefix}/flypool.conf;\n"
        "}\n"
    )
    return conf


@contextlib.contextmanager
def running_nginx(prefix: Path, conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """nginx in the foreground (daemon off), so the test owns its master PID."""
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        eventually(lambda: _listening(port) or proc.poll() is not None, 10, what="nginx up")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful nginx shutdown
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def _listening(port: int) -> bool:
    try:
        http_get(port, "/_nginx_probe", timeout=1)
    except OSError:
        return False
    return True


def _workers(d: Daemon) -> dict[int, float]:
    return {w["pid"]: w["uptime_s"] for w in d.app()["workers"]}


def test_nginx_restart_and_reload_leave_workers_alone() -> None:
    """The Flying property: nginx stop/start and reload never touch an app process."""
    with running_daemon({"workers": 2, "listen_mode": "0666"}) as d:
        prefix = Path(short_dir())
        port = free_port()
        conf = _nginx_conf(prefix, d.front, port)
        before = _workers(d)
        with running_nginx(prefix, conf, port) as nginx:
            assert http_get(port, "/")[0] == 200
            # nginx -s reload: new nginx workers, same app workers.
            subprocess.run(
                [NGINX, "-p", str(prefix), "-c", str(conf), "-s", "reload"], check=True, timeout=10
            )
            eventually(lambda: http_get(port, "/")[0] == 200, 10, what="after reload")
            assert nginx.poll() is None
        # nginx stopped entirely, then started again.
        with running_nginx(prefix, conf, port):
            for _ in range(20):
                assert http_get(port, "/")[0] == 200
        after = _workers(d)
        assert set(after) == set(before)
        for pid, up in before.items():
            assert after[pid] > up  # same processes, never restarted: uptime kept growing
        shutil.rmtree(prefix, ignore_errors=True)


def test_rolling_restart_through_nginx_loses_nothing() -> None:
    app = {"workers": 3, "listen_mode": "0666", "env": {"EXAMPLE_BOOT_DELAY": "0.5"}}
    with running_daemon(app) as d:
        prefix = Path(short_dir())
        port = free_port()
        conf = _nginx_conf(prefix, d.front, port)
        old = set(d.ready_pids())
        with (
            running_nginx(prefix, conf, port),
            LoadGen("", clients=8, target="/?delay=0.01", tcp=("127.0.0.1", port)) as load,
        ):
            eventually(lambda: load.total > 50, 10, what="load through nginx")
            res = d.cli("restart", "--wait")
            assert res.returncode == 0, res.stderr
            n = load.total
            eventually(lambda: load.total > n + 50, 10, what="load after restart")
        assert load.failures() == {}, load.statuses
        assert not old & set(d.ready_pids())
        shutil.rmtree(prefix, ignore_errors=True)


def test_websocket_upgrade_through_nginx() -> None:
    import socket

    with running_daemon({"workers": 1, "listen_mode": "0666"}) as d:
        prefix = Path(short_dir())
        port = free_port()
        conf = _nginx_conf(prefix, d.front, port)
        with (
            running_nginx(prefix, conf, port),
            socket.create_connection(("127.0.0.1", port), timeout=5) as s,
        ):
            s.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            rest = head.split(b"\r\n\r\n", 1)[1]
            s.sendall(b"ping through nginx")
            while len(rest) < 18:
                rest += s.recv(4096)
            assert rest == b"ping through nginx"
        shutil.rmtree(prefix, ignore_errors=True)
