"""The daemon process as an operator sees it: config errors, signals, pid file, sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import (
    EXAMPLE,
    PYTHON,
    Daemon,
    eventually,
    get,
    live_children,
    running_daemon,
    short_dir,
    write_config,
)

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


def test_rss_is_in_status_as_soon_as_a_worker_is_ready() -> None:
    """Issue 11 i: no "Memory: 0M" between ready and the first sample."""
    with running_daemon({"workers": 2}) as d:
        for w in d.app()["workers"]:
            assert w["rss_bytes"] > 1_000_000, w
        assert "Memory  : 0M" not in d.cli("status").stdout


def test_ttin_then_ttou_ms_apart_leave_children_equal_to_status() -> None:
    """Issue 11 e: the spawn retired before it had a process is not left running."""
    with running_daemon({"workers": 2}) as d:
        for _ in range(5):
            d.signal(signal.SIGTTIN)
            time.sleep(0.005)
            d.signal(signal.SIGTTOU)
            time.sleep(0.05)
        d.wait_ready(2)
        eventually(
            lambda: live_children(d.proc.pid) == set(d.ready_pids()),
            10,
            what="children to equal the workers in status",
        )


def _slow_request(d: Daemon, delay: float, out: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(get(d.front, f"/?delay={delay}", timeout=60)[0])
        except OSError as exc:
            out.append(type(exc).__name__)

    t = threading.Thread(target=run)
    t.start()
    eventually(lambda: d.app()["workers"][0]["sessions"] == 1, 10, what="request in flight")
    return t


def test_shutdown_takes_one_drain_timeout_not_two() -> None:
    """Issue 11 g: the queue wait and the worker drain share one deadline."""
    # drain_timeout + stop_timeout at most (the worker waits for its cut request).
    with running_daemon({"workers": 1, "drain_timeout": "2s", "stop_timeout": "500ms"}) as d:
        out: list[object] = []
        t = _slow_request(d, 30, out)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        elapsed = time.monotonic() - t0
        t.join(10)
        assert 1.8 <= elapsed < 3.5, elapsed
        assert out and out[0] != 200


def test_second_term_during_a_graceful_stop_stops_fast() -> None:
    """Issue 11 g: TERM, then TERM again: workers that ignore SIGTERM are killed within ~2 s."""
    app = {
        "workers": 1,
        "drain_timeout": "30s",
        "stop_timeout": "30s",
        "env": {"EXAMPLE_IGNORE_SIGTERM": "1"},
    }
    with running_daemon(app) as d:
        out: list[object] = []
        t = _slow_request(d, 30, out)
        d.signal(signal.SIGTERM)
        eventually(lambda: "stop requested" in d.log(), 10)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        assert time.monotonic() - t0 < 4.0
        t.join(10)
        d.assert_no_workers_left()


def test_scale_is_refused_beyond_max_pool_size() -> None:
    """Issue 11 g: scale?workers=100000 is a 400, not 100000 spawns."""
    with running_daemon({"workers": 1}, daemon={"max_pool_size": 4}) as d:
        code, body = d.admin_call("POST", "/apps/app/scale?workers=100000")
        assert code == 400 and "max_pool_size" in body["error"], body
        assert d.admin_call("POST", "/apps/app/scale?workers=0")[0] == 400
        res = d.cli("scale", "app", "5")
        assert res.returncode == 1 and "max_pool_size" in res.stderr, res.stderr
        assert d.admin_call("POST", "/apps/app/scale?workers=3")[0] == 200
        d.wait_ready(3)
        assert d.status()["max_pool_size"] == 4


def test_apps_added_by_hup_are_swept_and_logged() -> None:
    """Issue 11 g: an app added by a reload gets max_request_time, idle sweeps, access log."""
    d_dir = Path(short_dir())
    log = d_dir / "flypool.log"
    daemon_keys = {"log_file": str(log), "access_log": "-"}
    with running_daemon({"workers": 1}, daemon=daemon_keys, directory=d_dir) as d:
        two = {
            "name": "two",
            "root": str(d_dir),
            "command": EXAMPLE,
            "listen": [f"unix:{d_dir}/two.sock"],
            "workers": 1,
            "max_request_time": "1s",
            "start_timeout": "10s",
        }
        if os.geteuid() == 0:
            two["user"] = "root"
        write_config(d_dir, {"workers": 1}, daemon_keys, extra_apps=[two])
        d.signal(signal.SIGHUP)
        d.wait_ready(1, name="two")
        t0 = time.monotonic()
        status, _body, _ = get(str(d_dir / "two.sock"), "/?delay=10")
        assert status == 504
        assert time.monotonic() - t0 < 5
        assert get(str(d_dir / "two.sock"), "/")[0] == 200

        def access() -> list[dict[str, object]]:
            recs = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            return [r for r in recs if r.get("event") == "request" and r.get("app") == "two"]

        eventually(lambda: len(access()) >= 2, 10, what="access log of the new app")
