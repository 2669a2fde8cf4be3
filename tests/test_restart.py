"""Rolling and blocking restarts under load, deployment errors, releases (SPEC §7)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from tests.support import (
    RELEASE_WORKER,
    Daemon,
    LoadGen,
    eventually,
    get,
    make_release,
    point_current,
    running_daemon,
    short_dir,
)


def _capistrano(base: Path) -> tuple[Path, Path]:
    a = make_release(base, "A")
    b = make_release(base, "B")
    point_current(base, a)
    return a, b


def _app(base: Path, **extra: object) -> dict[str, object]:
    app: dict[str, object] = {
        "root": str(base / "current"),
        "command": RELEASE_WORKER,
        "workers": 4,
        "env": {"EXAMPLE_BOOT_DELAY": "1"},
        "start_timeout": "10s",
    }
    app.update(extra)
    return app


def _restart_done(d: Daemon, rid: int) -> dict[str, Any] | None:
    app = d.app()
    last = app["last_restart"]
    if app["restart"] is None and last and last["id"] >= rid:
        return last  # type: ignore[no-any-return]
    return None


class PeakServing:
    """The most serving workers a daemon had at once (SPEC §1: never more than
    ``workers + restart_batch`` live).

    A thread lists the daemon's child processes every 5 ms. Afterwards each
    listing counts the children not yet signalled to stop when the listing
    ended (the daemon's ``stopping worker`` event, same wall clock): a drained
    worker already signalled only exits, and may be one process more while
    memory has room (``docs/architecture.md``, deviations). A process the
    daemon spawns after a stop cannot be in a listing that ended before that
    stop, so an exiting worker is never counted twice over with its
    successor, and a spawn beyond the bound while every old worker still
    serves is always counted.
    """

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = [c.pid for c in self.proc.children()]
            self.samples.append((time.time(), kids))
            time.sleep(0.005)

    def __enter__(self) -> PeakServing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak(self, log: str) -> tuple[int, int]:
        """(most serving children at once, most children at once)."""
        stopped = _log_times(log, "stopping worker")
        serving = total = 0
        for t, kids in self.samples:
            total = max(total, len(kids))
            serving = max(serving, sum(1 for p in kids if stopped.get(p, t + 1) > t))
        return serving, total


def _log_times(log: str, event: str) -> dict[int, float]:
    """The first time (wall clock) of ``event`` for each pid in the daemon's JSON log."""
    out: dict[int, float] = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("event") == event and "pid" in rec and rec["pid"] not in out:
            stamp = rec["timestamp"].replace("Z", "+00:00")
            out[rec["pid"]] = dt.datetime.fromisoformat(stamp).timestamp()
    return out


def test_rolling_restart_under_load_loses_nothing() -> None:
    """4 workers with a 1 s boot, 8 keep-alive clients: 0 errors, all replaced, <= 5 serving."""
    base = Path(short_dir())
    _a, b = _capistrano(base)
    with running_daemon(_app(base), directory=base) as d:
        old = set(d.ready_pids())
        with (
            PeakServing(d.proc.pid) as sampler,
            LoadGen(d.front, clients=8, target="/?delay=0.02") as load,
        ):
            eventually(lambda: load.total > 50, 10, what="load running")
            point_current(base, b)
            code, body = d.admin_call("POST", "/apps/app/restart?mode=rolling")
            assert code == 202, body
            last = eventually(
                lambda: _restart_done(d, body["restart_id"]), 30, what="restart to finish"
            )
            after = load.total
            eventually(lambda: load.total > after + 50, 10, what="load after restart")
        peak, processes = sampler.peak(d.log())
        assert last["outcome"] == "completed"
        assert load.failures() == {}, load.statuses
        workers = d.app()["workers"]
        assert len(workers) == 4
        assert not old & {w["pid"] for w in workers}
        assert {w["release"] for w in workers} == {str(b)}
        assert peak <= 5, (peak, processes)
        assert d.app()["restart"] is None
        shutil.rmtree(base / "releases" / "A")


def test_inflight_request_finishes_before_its_worker_is_signalled() -> None:
    d_dir = Path(short_dir())
    with running_daemon({"workers": 1, "drain_timeout": "10s"}, directory=d_dir) as d:
        x = d.ready_pids()[0]
        done: list[tuple[int, float]] = []
        t = threading.Thread(
            target=lambda: done.append((get(d.front, "/?delay=3")[0], time.time()))
        )
        t.start()
        eventually(lambda: d.app()["workers"][0]["sessions"] == 1, 5, what="request in flight")
        assert d.cli("restart").returncode == 0
        t.join(20)
        assert done and done[0][0] == 200
        d.wait_ready(1)
        stop_at = eventually(
            lambda: _log_time(d.log(), "stopping worker", x), 10, what="old worker signalled"
        )
        assert done[0][1] <= stop_at + 0.05, (done[0][1], stop_at)


def _log_time(log: str, event: str, pid: int) -> float:
    at = _log_times(log, event).get(pid)
    if at is None:
        raise AssertionError(f"no {event!r} for pid {pid} in log")
    return at


def test_capistrano_release_switch_with_restart_txt() -> None:
    """current -> A, daemon started inside A; ln -sfn B; touch restart.txt; delete A."""
    base = Path(short_dir())
    a, b = _capistrano(base)
    app = _app(base, workers=2, env={})
    with running_daemon(app, directory=base, cwd=str(a)) as d:
        assert {w["release"] for w in d.app()["workers"]} == {str(a)}
        # The daemon never keeps a release busy.
        assert psutil.Process(d.proc.pid).cwd() == "/"
        point_current(base, b)
        (base / "current" / "tmp" / "restart.txt").touch()
        eventually(
            lambda: (
                {w["release"] for w in d.app()["workers"]} == {str(b)}
                and len(d.ready_pids()) == 2
                and d.app()["restart"] is None
            ),
            20,
            what="all workers on B",
        )
        shutil.rmtree(a)
        for _ in range(10):
            status, body, _ = get(d.front, "/")
            assert status == 200 and str(b).encode() in body
        assert d.app()["release"] == str(b)


def _broken_release_scenario(breaker: str, extra: dict[str, object]) -> None:
    base = Path(short_dir())
    _a, b = _capistrano(base)
    app = _app(base, workers=3, env={}, **extra)
    with running_daemon(app, directory=base) as d:
        old = set(d.ready_pids())
        (b / breaker).touch()
        point_current(base, b)
        with LoadGen(d.front, clients=6) as load:
            eventually(lambda: load.total > 20, 10, what="load running")
            res = d.cli("restart", "--wait", "--timeout", "60")
            assert res.returncode == 1, (res.stdout, res.stderr)
            before = load.total
            eventually(lambda: load.total > before + 20, 10, what="load after abort")
        assert load.failures() == {}, load.statuses
        app_st = d.app()
        assert app_st["state"] == "deployment_error"
        assert set(d.ready_pids()) == old
        err = app_st["deployment_error"]
        assert err["release"] == str(b)
        assert err["reason"]
        assert "aborted" in res.stderr or "deployment" in res.stderr.lower()
        text = d.cli("status").stdout
        assert "Deployment error" in text or "deployment_error" in text
        # Fix the release and restart: the error clears and everything moves to B.
        (b / breaker).unlink()
        assert d.cli("restart", "--wait", "--timeout", "60").returncode == 0
        app_st = d.app()
        assert app_st["deployment_error"] is None
        assert app_st["state"] == "serving"
        assert {w["release"] for w in app_st["workers"]} == {str(b)}
        assert not old & {w["pid"] for w in app_st["workers"]}


def test_release_that_raises_at_import_is_refused() -> None:
    _broken_release_scenario("fail_at_boot", {})


def test_release_that_never_gets_ready_is_refused() -> None:
    _broken_release_scenario("never_ready", {"start_timeout": "1500ms"})


def test_gunicorn_without_ready_path_still_refuses_a_broken_release() -> None:
    """gunicorn accepts before importing the app; a death right after "ready" counts."""
    base = Path(short_dir())
    _a, b = _capistrano(base)
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        "unix:{socket}",
        "--workers",
        "1",
        "--no-control-socket",
        "flypool.example.wsgi:app",
    ]
    app = _app(base, workers=3, env={}, command=gunicorn)
    with running_daemon(app, directory=base) as d:
        old = set(d.ready_pids())
        (b / "fail_at_boot").touch()
        point_current(base, b)
        with LoadGen(d.front, clients=3) as load:
            res = d.cli("restart", "--wait", "--timeout", "60")
        assert res.returncode == 1, (res.stdout, res.stderr)
        st = d.app()
        assert st["state"] == "deployment_error"
        assert "exited" in st["deployment_error"]["reason"]
        # At most the one worker swapped before the failure showed is gone.
        assert len(old & set(d.ready_pids())) >= 2
        assert load.failures() == {}, load.statuses


def test_deployment_error_output_is_in_status() -> None:
    base = Path(short_dir())
    _a, b = _capistrano(base)
    with running_daemon(_app(base, workers=1, env={}), directory=base) as d:
        (b / "fail_at_boot").touch()
        point_current(base, b)
        assert d.cli("restart", "--wait").returncode == 1
        err = d.app()["deployment_error"]
        assert any("boot failure requested" in line for line in err["output"]), err


def test_without_resistance_the_failed_slot_is_skipped() -> None:
    """Passenger's behaviour: worker 6 fails, the others are replaced anyway."""
    base = Path(short_dir())
    _a, b = _capistrano(base)
    app = _app(base, workers=4, env={}, resist_deployment_errors=False)
    with running_daemon(app, directory=base) as d:
        old = set(d.ready_pids())
        (b / "fail_worker_6").touch()
        point_current(base, b)
        _code, body = d.admin_call("POST", "/apps/app/restart")
        last = eventually(lambda: _restart_done(d, body["restart_id"]), 30, what="restart end")
        assert last["outcome"] == "completed"
        # Every old worker is gone, and the skipped slot is refilled on B.
        pids = d.wait_ready(4, timeout=20)
        assert not old & set(pids)
        assert {w["release"] for w in d.app()["workers"]} == {str(b)}


def test_with_resistance_a_partial_failure_keeps_old_workers() -> None:
    base = Path(short_dir())
    _a, b = _capistrano(base)
    with running_daemon(_app(base, workers=4, env={}), directory=base) as d:
        old = set(d.ready_pids())
        (b / "fail_worker_6").touch()
        point_current(base, b)
        assert d.cli("restart", "--wait").returncode == 1
        workers = d.app()["workers"]
        assert len([w for w in workers if w["state"] == "ready"]) == 4
        # Worker 5 replaced one old worker before worker 6 failed; three old ones serve.
        assert len(old & {w["pid"] for w in workers}) == 3


def test_worker_ignoring_sigterm_is_killed_and_restart_completes() -> None:
    app = {"workers": 2, "stop_timeout": "500ms", "env": {"EXAMPLE_IGNORE_SIGTERM": "1"}}
    with running_daemon(app) as d:
        old = set(d.ready_pids())
        res = d.cli("restart", "--wait")
        assert res.returncode == 0, res.stderr
        assert not old & set(d.wait_ready(2))
        assert "worker ignored stop signal; killing" in d.log()
        eventually(lambda: not any(psutil.pid_exists(p) for p in old), 5, what="old pids gone")


def test_open_tunnel_cannot_hold_a_drain_forever() -> None:
    """A WebSocket on the old worker is closed at drain_timeout (PITFALLS: uvicorn #2943)."""
    import socket

    with running_daemon({"workers": 1, "drain_timeout": "1s"}) as d:
        old = d.ready_pids()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(d.front)
            s.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
            t0 = time.monotonic()
            res = d.cli("restart", "--wait", "--timeout", "30")
            assert res.returncode == 0, res.stderr
            assert time.monotonic() - t0 < 10  # bounded by drain_timeout, not by the tunnel
            assert s.recv(4096) == b""  # the tunnel was closed by the drain
        assert not set(old) & set(d.ready_pids())


def test_sighup_with_broken_config_keeps_the_old_one() -> None:
    with running_daemon({"workers": 2}) as d:
        old = set(d.ready_pids())
        good = d.config.read_text()
        d.config.write_text(good.replace("workers = 2", 'workers = "two"'))
        d.signal(signal.SIGHUP)
        eventually(lambda: "reload failed" in d.log(), 10, what="reload error logged")
        assert "expected an integer >= 1" in d.log()
        assert set(d.ready_pids()) == old
        assert get(d.front, "/")[0] == 200
        # A good config on the next HUP restarts every worker.
        d.config.write_text(good)
        d.signal(signal.SIGHUP)
        eventually(
            lambda: not old & set(d.ready_pids()) and len(d.ready_pids()) == 2,
            20,
            what="rolling restart after HUP",
        )


def test_restart_requests_coalesce() -> None:
    """Three restarts in quick succession: one final generation, live bound kept."""
    base = Path(short_dir())
    a, b = _capistrano(base)
    app = _app(base, workers=3, env={"EXAMPLE_BOOT_DELAY": "0.3"})
    with running_daemon(app, directory=base) as d:
        ids = []
        with PeakServing(d.proc.pid) as sampler, LoadGen(d.front, clients=4) as load:
            for release in (b, a, b):
                point_current(base, release)
                ids.append(d.admin_call("POST", "/apps/app/restart")[1]["restart_id"])
                time.sleep(0.1)  # spread the requests over the first rollout step
            last = eventually(lambda: _restart_done(d, ids[-1]), 30, what="restart end")
        peak, processes = sampler.peak(d.log())
        assert last["outcome"] == "completed"
        assert load.failures() == {}, load.statuses
        workers = d.app()["workers"]
        assert len({w["generation"] for w in workers}) == 1
        assert {w["release"] for w in workers} == {str(b)}
        assert peak <= 3 + 1, (peak, processes)


def test_blocking_restart_records_its_gap() -> None:
    app = {"workers": 2, "env": {"EXAMPLE_BOOT_DELAY": "0.5"}, "queue_timeout": "10s"}
    with running_daemon(app) as d:
        old = set(d.ready_pids())
        with LoadGen(d.front, clients=4) as load:
            eventually(lambda: load.total > 20, 10, what="load running")
            res = d.cli("restart", "--blocking", "--wait")
            assert res.returncode == 0, res.stderr
        assert not old & set(d.ready_pids())
        gap = max(load.latencies)
        print(f"blocking restart: longest request {gap * 1000:.0f} ms, failures {load.failures()}")
        # Requests wait in the queue while no worker is up: slow, but not lost.
        assert load.failures() == {}, load.statuses


def test_ttin_ttou_and_scale() -> None:
    with running_daemon({"workers": 2}) as d:
        d.signal(signal.SIGTTIN)
        d.wait_ready(3)
        # Identical signals sent back to back merge in the kernel: one at a time.
        d.signal(signal.SIGTTOU)
        eventually(lambda: d.app()["workers_target"] == 2, 5, what="first TTOU")
        d.signal(signal.SIGTTOU)
        d.wait_ready(1)
        res = d.cli("scale", "app", "3")
        assert res.returncode == 0, res.stderr
        d.wait_ready(3)
        assert d.cli("scale", "nosuch", "3").returncode == 1


def test_crash_respawn_uses_the_newest_release() -> None:
    """A worker that crashes after a deploy comes back on the new release (Puma #468)."""
    base = Path(short_dir())
    _a, b = _capistrano(base)
    with running_daemon(_app(base, workers=2, env={}), directory=base) as d:
        point_current(base, b)
        victim = d.ready_pids()[0]
        os.kill(victim, signal.SIGKILL)
        eventually(
            lambda: victim not in d.ready_pids() and len(d.ready_pids()) == 2, 15, what="respawn"
        )
        releases = {w["pid"]: w["release"] for w in d.app()["workers"]}
        new = [p for p in releases if p not in (victim,)]
        assert str(b) in {releases[p] for p in new}
