"""Canary restarts judged on live traffic (SPEC §7, §6 canary retries, §8 status).

Each test runs a real daemon whose workers are ``tests/apps/canary_worker.py``:
the release directory says how good the release is, so a deploy is
``ln -sfn releases/B current`` followed by a restart, as an operator does it.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    Daemon,
    UnixHTTPConnection,
    eventually,
    make_release,
    point_current,
    running_daemon,
    short_dir,
)

WORKER = str(Path(__file__).parent / "apps" / "canary_worker.py")
pytestmark = pytest.mark.timeout(120)


class PacedLoad:
    """``clients`` keep-alive clients, each sending one request every ``interval`` s."""

    def __init__(self, path: str, *, clients: int, interval: float, method: str = "GET") -> None:
        self.path = path
        self.interval = interval
        self.method = method
        self.statuses: Counter[object] = Counter()
        self.releases: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        conn = UnixHTTPConnection(self.path, 30)
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                body = b"x" * 10 if self.method == "POST" else None
                conn.request(self.method, "/", body=body)
                resp = conn.getresponse()
                text = resp.read().decode()
                key: object = resp.status
                release = text.split(" ")[0]
            except (OSError, http.client.HTTPException) as exc:
                key, release = type(exc).__name__, ""
                conn.close()
            with self._lock:
                self.statuses[key] += 1
                if release:
                    self.releases[release] += 1
            next_at += self.interval
            # Pacing, not synchronisation: the load is a rate.
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        conn.close()

    def __enter__(self) -> PacedLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def failed(self) -> int:
        with self._lock:
            return sum(n for k, n in self.statuses.items() if k != 200)


@contextmanager
def deploy_setup(
    new: str, *, old: str = "ok", workers: int = 4, **app: Any
) -> Iterator[tuple[Daemon, Path, Path]]:
    """A daemon serving release A (``old``) with release B (``new``) ready to be linked."""
    base = Path(short_dir())
    rel_a, rel_b = make_release(base, "A"), make_release(base, "B")
    (rel_a / "behaviour").write_text(old)
    (rel_b / "behaviour").write_text(new)
    point_current(base, rel_a)
    keys = {
        "root": str(base / "current"),
        "command": [sys.executable, WORKER, "{socket}"],
        "workers": workers,
        "canary": 1,
        "canary_requests": 100,
        "canary_timeout": "60s",
        **app,
    }
    with running_daemon(keys, directory=base) as d:
        d.wait_ready(workers)
        yield d, base, rel_b


def canary_ready_at(d: Daemon, timeout: float = 30.0) -> float:
    """The moment status shows the canary judging (every canary ready)."""

    def judging() -> bool:
        r = d.app()["restart"]
        return bool(r and r["phase"] == "canary" and r["canary"]["waiting_for"] != "ready")

    eventually(judging, timeout, interval=0.02, what="canary judging")
    return time.monotonic()


def restart_ended(d: Daemon, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until no restart runs; return the app's status."""

    def ended() -> dict[str, Any] | None:
        app = d.app()
        return app if app["restart"] is None and app["last_restart"] else None

    result: dict[str, Any] = eventually(ended, timeout, interval=0.02, what="restart end")
    return result


def start_restart(d: Daemon, *args: str) -> subprocess.Popen[str]:
    """``flypool restart --wait`` in the background, as a deploy script runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "flypool", "restart", "--wait", *args, "--admin-socket", d.admin],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class TestBadRelease:
    def test_release_answering_500_is_rolled_back_and_no_client_sees_it(self) -> None:
        """500 on every request: rolled back within 5 s of ready, old workers kept, exit 1."""
        with deploy_setup("fail") as (d, base, rel_b):
            old = sorted(d.ready_pids())
            with PacedLoad(d.front, clients=4, interval=0.2) as load:  # ~20 req/s
                point_current(base, rel_b)
                waiter = start_restart(d)
                ready = canary_ready_at(d)
                app = restart_ended(d)
                took = time.monotonic() - ready
                out, err = waiter.communicate(timeout=30)
            assert took < 5.0, took
            assert app["last_restart"]["outcome"] == "rolled_back"
            reason = app["deployment_error"]["reason"]
            assert reason.startswith("canary: ") and "requests failed" in reason, reason
            assert "on the old generation" in reason
            assert waiter.returncode == 1, (out, err)
            assert "rolled back" in err
            # Every old worker kept; the canary retired.
            eventually(lambda: sorted(d.ready_pids()) == old, 15, what="only old workers left")
            # Canary retries: its 500s were answered by the old generation.
            assert load.failed() == 0, load.statuses
            assert load.releases["release=B"] == 0
            assert "canary rolled back" in d.log()

    def test_post_load_loses_few_requests(self) -> None:
        """POSTs are not re-asked: fewer than 50 fail before the rollback."""
        with deploy_setup("fail") as (d, base, rel_b):
            with PacedLoad(d.front, clients=4, interval=0.05, method="POST") as load:
                point_current(base, rel_b)
                d.admin_call("POST", "/apps/app/restart")
                app = restart_ended(d)
            assert app["last_restart"]["outcome"] == "rolled_back"
            assert 0 < load.statuses[500] < 50, load.statuses

    def test_release_failing_5_percent_is_rolled_back(self) -> None:
        """500 on 5 % of requests, none on the old one: rolled back."""
        with deploy_setup("fail5", canary_requests=200) as (d, base, rel_b):
            with PacedLoad(d.front, clients=8, interval=0.01):
                point_current(base, rel_b)
                d.admin_call("POST", "/apps/app/restart")
                app = restart_ended(d, timeout=90)
            assert app["last_restart"]["outcome"] == "rolled_back", app["last_restart"]
            assert "failed" in app["deployment_error"]["reason"]

    def test_three_times_slower_release_is_rolled_back_on_latency(self) -> None:
        """p99 three times the old one with canary_max_latency_ratio = 2: rolled back."""
        with deploy_setup("slow3", canary_max_latency_ratio=2.0) as (d, base, rel_b):
            with PacedLoad(d.front, clients=4, interval=0.02):
                point_current(base, rel_b)
                d.admin_call("POST", "/apps/app/restart")
                app = restart_ended(d, timeout=90)
            assert app["last_restart"]["outcome"] == "rolled_back", app["last_restart"]
            assert "p99" in app["deployment_error"]["reason"]


class TestGoodRelease:
    def test_identical_release_is_promoted_and_rolled_out(self) -> None:
        """Same behaviour: promoted after canary_requests, every worker new, exit 0."""
        with deploy_setup("ok", canary_requests=60) as (d, base, rel_b):
            old = set(d.ready_pids())
            with PacedLoad(d.front, clients=4, interval=0.02) as load:
                point_current(base, rel_b)
                waiter = start_restart(d)
                out, err = waiter.communicate(timeout=90)
            assert waiter.returncode == 0, (out, err)
            app = d.app()
            assert app["last_restart"]["outcome"] == "completed"
            assert app["deployment_error"] is None
            pids = d.wait_ready(4)
            assert not old & set(pids)
            assert {w["release"] for w in app["workers"]} == {str(rel_b)}
            assert load.failed() == 0, load.statuses
            assert "canary promoted" in d.log()


class TestWaiting:
    def test_no_traffic_waits_then_rolls_back_at_the_timeout(self) -> None:
        """No requests: status says it waits for traffic; canary_timeout rolls back."""
        with deploy_setup("ok", canary_timeout="3s") as (d, base, rel_b):
            point_current(base, rel_b)
            d.admin_call("POST", "/apps/app/restart")
            canary_ready_at(d)
            canary = d.app()["restart"]["canary"]
            assert canary["waiting_for"] == "traffic"
            assert canary["requests"] == 0 and len(canary["workers"]) == 1
            app = restart_ended(d, timeout=30)
            assert app["last_restart"]["outcome"] == "rolled_back"
            assert "no traffic" in app["deployment_error"]["reason"]


class TestOperator:
    def test_promote_mid_canary(self) -> None:
        """`flypool promote` ends the judging: the release rolls out."""
        with deploy_setup("ok", canary_requests=100000) as (d, base, rel_b):
            point_current(base, rel_b)
            d.admin_call("POST", "/apps/app/restart")
            canary_ready_at(d)
            result = d.cli("promote")
            assert result.returncode == 0, result.stderr
            assert "app: canary promoted" in result.stdout
            app = restart_ended(d)
            assert app["last_restart"]["outcome"] == "completed"
            d.wait_ready(4)
            assert {w["release"] for w in d.app()["workers"]} == {str(rel_b)}

    def test_rollback_mid_canary(self) -> None:
        """`flypool rollback` retires the canary and keeps every old worker."""
        with deploy_setup("ok", canary_requests=100000) as (d, base, rel_b):
            old = sorted(d.ready_pids())
            point_current(base, rel_b)
            d.admin_call("POST", "/apps/app/restart")
            canary_ready_at(d)
            assert d.cli("rollback").returncode == 0
            app = restart_ended(d)
            assert app["last_restart"]["outcome"] == "rolled_back"
            assert "operator" in app["deployment_error"]["reason"]
            eventually(lambda: sorted(d.ready_pids()) == old, 15, what="old workers only")
            # Nothing to end now: exit 1 with a reason.
            again = d.cli("promote")
            assert again.returncode == 1 and "no canary" in again.stderr

    def test_restart_during_a_canary_starts_over_with_the_newest_release(self) -> None:
        """A new deploy supersedes the canary: the newest release gets its own canary."""
        with deploy_setup("ok", canary_requests=100000) as (d, base, rel_b):
            point_current(base, rel_b)
            d.admin_call("POST", "/apps/app/restart")
            canary_ready_at(d)
            first = d.app()["restart"]["canary"]["workers"]
            rel_c = make_release(base, "C")
            (rel_c / "behaviour").write_text("ok")
            point_current(base, rel_c)
            d.admin_call("POST", "/apps/app/restart")

            def new_canary() -> list[int] | None:
                r = d.app()["restart"]
                pids = r["canary"]["workers"] if r and r["canary"] else []
                ok = pids and not set(pids) & set(first) and r["canary"]["waiting_for"] != "ready"
                return pids if ok else None

            pids = eventually(new_canary, 30, what="a canary of release C")
            workers = {w["pid"]: w for w in d.app()["workers"]}
            assert workers[pids[0]]["release"] == str(rel_c)
            assert d.cli("promote").returncode == 0
            restart_ended(d)
            d.wait_ready(4)
            assert {w["release"] for w in d.app()["workers"]} == {str(rel_c)}

    def test_usr2_keeps_the_canary_and_its_counts(self) -> None:
        """A hand-over mid-canary: same canary pid, counts carried, still judging."""
        with deploy_setup("ok", canary_requests=100000) as (d, base, rel_b):
            point_current(base, rel_b)
            d.admin_call("POST", "/apps/app/restart")
            canary_ready_at(d)
            with PacedLoad(d.front, clients=2, interval=0.02):
                eventually(
                    lambda: d.app()["restart"]["canary"]["requests"] >= 20, 20, what="traffic"
                )
            before = d.app()["restart"]["canary"]
            d.signal(signal.SIGUSR2)
            eventually(lambda: "hand-over complete" in d.log(), 30, what="hand-over")

            def carried() -> dict[str, Any] | None:
                r = d.app()["restart"]
                return r["canary"] if r and r["phase"] == "canary" else None

            after = eventually(carried, 20, what="canary after USR2")
            assert after["workers"] == before["workers"]
            assert after["requests"] >= before["requests"]
            assert after["old_requests"] >= before["old_requests"]


def test_admin_rejects_a_canary_with_a_blocking_restart() -> None:
    """canary=N with mode=blocking is a usage error (400), as is a negative N."""
    with running_daemon({"workers": 1}) as d:
        d.wait_ready(1)
        code, body = d.admin_call("POST", "/apps/app/restart?mode=blocking&canary=1")
        assert code == 400 and "rolling" in body["error"]
        code, _ = d.admin_call("POST", "/apps/app/restart?canary=-2")
        assert code == 400
