"""The daemon process as an operator sees it: config errors, signals, pid file, sampling."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, eventually, get, running_daemon, short_dir

BAD_CONFIGS = {
    "unknown key": (
        '[[app]]\nname = "a"\nroot = "/tmp"\ncommand = ["x"]\n'
        'listen = ["unix:/tmp/a.sock"]\nwokers = 2\n',
        'unknown key "wokers"',
    ),
    "wrong type": (
        '[[app]]\nname = "a"\nroot = "/tmp"\ncommand = ["x"]\n'
        'listen = ["unix:/tmp/a.sock"]\nworkers = "two"\n',
        'key "workers"',
    ),
    "missing command": (
        '[[app]]\nname = "a"\nroot = "/tmp"\nlisten = ["unix:/tmp/a.sock"]\n',
        '"command"',
    ),
    "bad duration": (
        '[[app]]\nname = "a"\nroot = "/tmp"\ncommand = ["x"]\n'
        'listen = ["unix:/tmp/a.sock"]\nstart_timeout = "soon"\n',
        "start_timeout",
    ),
    "toml syntax": ("[[app]\n", "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_without_starting(case: str) -> None:
    text, needle = BAD_CONFIGS[case]
    d = Path(short_dir())
    cfg = d / "bad.toml"
    cfg.write_text(f'[daemon]\nadmin_socket = "{d}/admin.sock"\n\n{text}')
    for cmd in (["check", "-c", str(cfg)], ["run", "-c", str(cfg)]):
        res = subprocess.run(
            [PYTHON, "-m", "flypool", *cmd], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        assert str(cfg) in res.stderr and needle in res.stderr, res.stderr
    assert not (d / "admin.sock").exists()


def test_unreadable_config_exits_2() -> None:
    res = subprocess.run(
        [PYTHON, "-m", "flypool", "run", "-c", "/nonexistent/flypool.toml"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "/nonexistent/flypool.toml" in res.stderr


def test_quit_stops_fast_and_leaves_nothing() -> None:
    with running_daemon(
        {"workers": 2, "env": {"EXAMPLE_IGNORE_SIGTERM": "1"}, "stop_timeout": "30s"}
    ) as d:
        d.status()
        d.signal(signal.SIGQUIT)
        # Fast: workers that ignore SIGTERM are killed well before stop_timeout.
        assert d.proc.wait(10) == 0
        d.assert_no_workers_left()


def test_pid_file_written_and_removed() -> None:
    d_dir = Path(short_dir())
    pid_file = d_dir / "flypool.pid"
    with running_daemon({"workers": 1}, daemon={"pid_file": str(pid_file)}, directory=d_dir) as d:
        assert pid_file.read_text().strip() == str(d.proc.pid)
    assert not pid_file.exists()


def test_connect_failure_is_retried_on_another_worker() -> None:
    with running_daemon({"workers": 2, "worker_concurrency": 0}) as d:
        # A worker whose socket vanished (but whose process lives) refuses
        # connections: requests must go to the other one.
        runtime = next(p for p in d.dir.iterdir() if p.is_dir() and p.name.startswith("flypool."))
        victim = sorted((runtime / "app").glob("*.sock"))[0]
        os.unlink(victim)
        for _ in range(20):
            assert get(d.front, "/")[0] == 200


def test_cpu_and_memory_are_sampled() -> None:
    with running_daemon({"workers": 1}) as d:
        w = eventually(
            lambda: d.app()["workers"][0]["rss_bytes"] > 1_000_000 and d.app()["workers"][0],
            10,
            what="rss sampled",
        )
        assert w["cpu_percent"] >= 0.0


def test_worker_output_is_logged_with_app_and_pid() -> None:
    with running_daemon({"workers": 1}) as d:
        pid = d.ready_pids()[0]
        assert f'"pid": {pid}, "stream": "stdout", "line": "example: listening' in d.log()


def test_status_text_view_and_json() -> None:
    with running_daemon({"workers": 2}) as d:
        text = d.cli("status")
        assert text.returncode == 0
        assert "General information" in text.stdout
        for pid in d.ready_pids():
            assert f"PID: {pid}" in text.stdout
        js = d.cli("status", "--json")
        assert js.returncode == 0 and '"workers"' in js.stdout


def test_cli_exit_3_when_daemon_unreachable() -> None:
    res = subprocess.run(
        [PYTHON, "-m", "flypool", "status", "--admin-socket", "/tmp/nope.sock"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 3
