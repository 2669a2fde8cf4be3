"""The shipped runit service (packaging/runit/flypool) under a real runsv."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import Daemon, eventually, get, short_dir, write_config

RUNIT = Path(__file__).parent.parent / "packaging" / "runit" / "flypool"
RUNSV = shutil.which("runsv")
SV = shutil.which("sv")

pytestmark = pytest.mark.skipif(
    RUNSV is None or SV is None or os.geteuid() != 0,
    reason="needs runit (scripts/install installs it) and root (the run script makes /run/flypool)",
)


def _service(d: Path, cfg: Path) -> Path:
    """The shipped run scripts, pointed at this checkout's flypool and a test config."""
    svc = d / "service"
    (svc / "log").mkdir(parents=True)
    flypool = str(Path(sys.executable).parent / "flypool")
    run = (RUNIT / "run").read_text()
    run = run.replace("/opt/flypool/bin/flypool", flypool)
    run = run.replace("/etc/flypool/flypool.toml", str(cfg))
    log_run = (RUNIT / "log" / "run").read_text().replace("/var/log/flypool", str(d / "logs"))
    (d / "logs").mkdir()
    for path, text in ((svc / "run", run), (svc / "log" / "run", log_run)):
        path.write_text(text)
        path.chmod(0o755)
    return svc


def _sv(*args: str) -> str:
    assert SV is not None
    res = subprocess.run([SV, *args], capture_output=True, text=True, timeout=30)
    return res.stdout + res.stderr


def test_runit_hup_restarts_and_down_stops_gracefully() -> None:
    d = Path(short_dir())
    cfg = write_config(d, {"workers": 2})
    svc = _service(d, cfg)
    assert RUNSV is not None
    runsv = subprocess.Popen(
        [RUNSV, str(svc)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: set[int] = set()
    try:
        eventually(lambda: "run: " in _sv("status", str(svc)), 15, what="service running")
        daemon_pid = int(_sv("status", str(svc)).split("(pid ")[1].split(")")[0])
        dm = Daemon(d, cfg, runsv, d / "logs" / "current")  # proc is runsv; not used to stop
        eventually(lambda: os.path.exists(dm.admin), 15, what="admin socket")
        old = set(dm.wait_ready(2))
        seen |= old
        assert get(dm.front, "/")[0] == 200
        # sv hup = SIGHUP = reload + rolling restart; the daemon itself stays.
        _sv("hup", str(svc))
        eventually(
            lambda: not old & set(dm.ready_pids()) and len(dm.ready_pids()) == 2,
            30,
            what="rolling restart after sv hup",
        )
        seen |= set(dm.ready_pids())
        assert f"(pid {daemon_pid})" in _sv("status", str(svc))
        # svlogd got the daemon's JSON log lines.
        eventually(
            lambda: '"event": "restart end"' in (d / "logs" / "current").read_text(),
            10,
            what="logs in svlogd's file",
        )
        # sv down = SIGTERM (+CONT): graceful stop, exit 0, no worker left.
        _sv("down", str(svc))
        eventually(lambda: "down: " in _sv("status", str(svc)), 30, what="service down")
        assert not psutil.pid_exists(daemon_pid)
        eventually(lambda: not any(psutil.pid_exists(p) for p in seen), 10, what="workers gone")
        assert not os.path.exists(dm.front)
    finally:
        with contextlib.suppress(Exception):
            _sv("down", str(svc))
            _sv("exit", str(svc))
        try:
            runsv.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(runsv.pid, signal.SIGKILL)
            runsv.wait(5)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
