"""USR2 as a transaction (SPEC §5): every window held open on purpose.

Each test makes the hand-over happen while something is in progress: a
worker draining, spawning or stopping, a restart, a signal arriving while
the freeze waits, an exec that fails.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import psutil

from tests.support import (
    LoadGen,
    UnixHTTPConnection,
    eventually,
    get,
    live_children,
    log_events,
    running_daemon,
    short_dir,
)


def _handovers(d: object) -> int:
    return len(log_events(d, "hand-over complete"))  # type: ignore[arg-type]


def _status_pids(d: object) -> set[int]:
    return {w["pid"] for w in d.app()["workers"] if w["pid"]}  # type: ignore[attr-defined]


def test_a_draining_worker_is_passed_on_and_stopped_by_the_new_image() -> None:
    """A tunnel keeps the old worker draining through the hand-over; it is not orphaned."""
    with running_daemon({"workers": 1, "drain_timeout": "30s"}) as d:
        (x,) = d.ready_pids()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(d.front)
            s.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
            _code, body = d.admin_call("POST", "/apps/app/restart")
            eventually(
                lambda: any(w["pid"] == x and w["state"] == "draining" for w in d.app()["workers"]),
                15,
                what="old worker draining (held by the tunnel)",
            )
            d.signal(signal.SIGUSR2)
            eventually(lambda: _handovers(d) == 1, 20, what="hand-over")
        handed = log_events(d, "hand-over: executing the new image")[0]
        assert handed["workers"] == 2  # the draining one and its replacement
        # The new image owns the drained worker: it stops it, and the restart ends.
        eventually(lambda: not psutil.pid_exists(x) or x not in live_children(d.proc.pid), 15)
        last = eventually(
            lambda: d.app()["restart"] is None and d.app()["last_restart"], 15, what="restart end"
        )
        assert last["id"] == body["restart_id"] and last["outcome"] == "completed"
        assert x not in _status_pids(d)
        assert live_children(d.proc.pid) == _status_pids(d)


def test_spawning_and_stopping_workers_and_the_target_are_passed_on() -> None:
    """TTOU leaves a worker stopping (it ignores SIGTERM), TTIN one spawning; then USR2."""
    app = {
        "workers": 2,
        "stop_timeout": "4s",
        "env": {"EXAMPLE_IGNORE_SIGTERM": "1", "EXAMPLE_BOOT_DELAY": "1.5"},
    }
    with running_daemon(app) as d:
        d.signal(signal.SIGTTOU)
        stopping = eventually(
            lambda: [w["pid"] for w in d.app()["workers"] if w["state"] == "stopping"],
            10,
            what="a stopping worker",
        )[0]
        # TTIN twice in a row would merge in the kernel: scale instead.
        assert d.cli("scale", "app", "3").returncode == 0
        spawning = eventually(
            lambda: [w["pid"] for w in d.app()["workers"] if w["state"] == "spawning" and w["pid"]],
            10,
            what="a spawning worker with a process",
        )
        numbers = {w["number"] for w in d.app()["workers"]}
        d.signal(signal.SIGUSR2)
        eventually(lambda: _handovers(d) == 1, 20, what="hand-over")
        app_st = d.app()
        assert app_st["workers_target"] == 3
        # The spawning workers get ready in the new image: same pids, no respawn.
        ready = d.wait_ready(3, timeout=20)
        assert set(spawning) <= set(ready)
        assert {w["number"] for w in d.app()["workers"]} <= numbers
        # The stopping one is killed at its stop_timeout by the new image.
        eventually(lambda: stopping not in live_children(d.proc.pid), 15, what="SIGKILL")
        assert "worker ignored stop signal; killing" in d.log()
        assert live_children(d.proc.pid) == _status_pids(d)


def test_term_while_the_freeze_waits_is_carried_out_by_the_new_image() -> None:
    """A slow request holds the freeze; TERM is queued, the new image stops gracefully."""
    d_dir = Path(short_dir())
    with running_daemon({"workers": 1, "drain_timeout": "20s"}, directory=d_dir) as d:
        results: list[int] = []

        def slow() -> None:
            conn = UnixHTTPConnection(d.front, 30)
            conn.request("GET", "/?delay=2")
            results.append(conn.getresponse().status)
            conn.close()

        t = threading.Thread(target=slow)
        t.start()
        eventually(lambda: d.app()["workers"][0]["sessions"] == 1, 10, what="request in flight")
        worker = d.ready_pids()[0]
        d.signal(signal.SIGUSR2)
        eventually(lambda: "hand-over begins" in d.log(), 10, what="hand-over begins")
        d.signal(signal.SIGTERM)
        eventually(lambda: log_events(d, "signal queued until the hand-over ends"), 10)
        t.join(30)
        assert results == [200]
        assert d.proc.wait(30) == 0
        done = log_events(d, "hand-over complete")
        assert done and done[0]["pending"] == ["term"]
        assert "flypool stopped" in d.log()
        # The new image removed the sockets it was handed (not the old one, mid-switch).
        assert not os.path.exists(d.front) and not os.path.exists(d.admin)
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"


def test_failed_exec_leaves_the_old_image_serving() -> None:
    """FLYPOOL_TEST_EXEC_FAIL: listeners, admin socket and frozen connections come back."""
    env = {"FLYPOOL_TEST_EXEC_FAIL": "1"}
    with running_daemon({"workers": 2, "drain_timeout": "10s"}, env=env) as d:
        pids = set(d.ready_pids())
        idle = UnixHTTPConnection(d.front, 10)
        idle.request("GET", "/")
        assert idle.getresponse().read()
        # A slow request keeps the hand-over waiting; a HUP arrives meanwhile.
        slow: list[int] = []
        t = threading.Thread(target=lambda: slow.append(get(d.front, "/?delay=1")[0]))
        t.start()
        eventually(lambda: sum(w["sessions"] for w in d.app()["workers"]) == 1, 10)
        d.signal(signal.SIGUSR2)
        eventually(lambda: "hand-over begins" in d.log(), 10, what="hand-over begins")
        d.signal(signal.SIGHUP)
        eventually(lambda: "hand-over failed" in d.log(), 20, what="hand-over failure")
        t.join(20)
        assert slow == [200]
        # The frozen keep-alive connection reads again.
        idle.request("GET", "/")
        assert idle.getresponse().status == 200
        idle.close()
        assert get(d.front, "/")[0] == 200
        assert d.status()["pid"] == d.proc.pid
        # The queued HUP is carried out by the old image: every worker replaced.
        eventually(
            lambda: not pids & set(d.ready_pids()) and len(d.ready_pids()) == 2,
            30,
            what="HUP restart after the failed hand-over",
        )
        # The pool spawns again (it was frozen during the attempt).
        d.signal(signal.SIGTTIN)
        d.wait_ready(3)


def test_usr2_while_max_requests_recycles_workers_loses_nothing() -> None:
    """Three hand-overs under load with workers recycled every 25 requests."""
    with running_daemon({"workers": 3, "max_requests": 25}) as d:
        with LoadGen(d.front, clients=6, target="/?delay=0.005") as load:
            eventually(lambda: load.total > 100, 15, what="load running")
            for n in (1, 2, 3):
                d.signal(signal.SIGUSR2)
                eventually(lambda: _handovers(d) == n, 30, what=f"hand-over {n}")  # noqa: B023
                before = load.total
                eventually(lambda: load.total > before + 50, 15)  # noqa: B023
        assert load.failures() == {}, load.statuses
        eventually(
            lambda: live_children(d.proc.pid) == _status_pids(d),
            15,
            what="children to equal the workers in status",
        )
        # Nothing orphaned: every pid ever seen is in status or gone.
        for pid in d.seen_pids - _status_pids(d):
            eventually(lambda: pid not in live_children(d.proc.pid), 15)  # noqa: B023
            if psutil.pid_exists(pid):
                assert (
                    psutil.Process(pid).ppid() == d.proc.pid or not psutil.Process(pid).is_running()
                )


def test_a_restart_in_progress_is_finished_by_the_new_image() -> None:
    app = {"workers": 3, "env": {"EXAMPLE_BOOT_DELAY": "0.7"}}
    with running_daemon(app) as d:
        old = set(d.ready_pids())
        code, body = d.admin_call("POST", "/apps/app/restart")
        assert code == 202
        eventually(lambda: d.app()["restart"] is not None, 5)
        d.signal(signal.SIGUSR2)
        eventually(lambda: _handovers(d) == 1, 20, what="hand-over")
        last = eventually(
            lambda: d.app()["restart"] is None and d.app()["last_restart"], 30, what="restart end"
        )
        assert last["id"] == body["restart_id"] and last["outcome"] == "completed"
        pids = d.wait_ready(3)
        assert not old & set(pids)
        assert len({w["generation"] for w in d.app()["workers"]}) == 1
