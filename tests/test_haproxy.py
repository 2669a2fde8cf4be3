"""A two-host fleet behind a real HAProxy (Debian), deployed host by host with drain/undrain."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Daemon, LoadGen, eventually, free_port, running_daemon, short_dir

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
