"""Logs (file, USR1 reopen, access log) and Prometheus metrics."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import eventually, get, raw_request, running_daemon, short_dir


def test_usr1_reopens_the_log_file_like_logrotate() -> None:
    d_dir = Path(short_dir())
    log = d_dir / "flypool.log"
    with running_daemon({"workers": 1}, daemon={"log_file": str(log)}, directory=d_dir) as d:
        assert "flypool started" in log.read_text()
        rotated = d_dir / "flypool.log.1"
        os.rename(log, rotated)
        d.signal(signal.SIGUSR1)
        eventually(
            lambda: log.exists() and "log file reopened" in log.read_text(), 10, what="new log file"
        )
        # POST: never retried (SPEC §6), so exactly one worker dies.
        crash = b"POST /crash HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        assert raw_request(d.front, crash).startswith(b"HTTP/1.1 502")
        eventually(
            lambda: "worker exited unexpectedly" in log.read_text(),
            10,
            what="new events in the new file",
        )
        assert "worker exited unexpectedly" not in rotated.read_text()
        d.wait_ready(1)
    # Every line is one JSON object (journald / log shippers).
    for line in log.read_text().splitlines():
        json.loads(line)


def test_access_log_has_one_event_per_request() -> None:
    d_dir = Path(short_dir())
    log = d_dir / "flypool.log"
    app = {"workers": 1, "worker_concurrency": 1}
    with running_daemon(
        app, daemon={"log_file": str(log), "access_log": "-"}, directory=d_dir
    ) as d:
        pid = d.ready_pids()[0]
        assert get(d.front, "/hello?x=1")[0] == 200
        assert get(d.front, "/?status=404")[0] == 404

        def events() -> list[dict[str, Any]]:
            recs = [json.loads(line) for line in log.read_text().splitlines()]
            return [r for r in recs if r.get("event") == "request"]

        eventually(lambda: len(events()) >= 2, 10, what="access events")
        recs = events()
        first = recs[0]
        assert first["method"] == "GET" and first["path"] == "/hello?x=1"
        assert first["status"] == 200 and first["worker_pid"] == pid
        assert isinstance(first["duration_ms"], float) and first["queue_ms"] == 0.0
        assert recs[1]["status"] == 404


def test_access_log_file_is_separate_and_reopened_on_usr1() -> None:
    """access_log = PATH writes JSON lines there, not into the daemon's log; USR1 reopens it."""
    d_dir = Path(short_dir())
    access = d_dir / "access.log"
    log = d_dir / "flypool.log"
    daemon = {"log_file": str(log), "access_log": str(access)}
    with running_daemon({"workers": 1}, daemon=daemon, directory=d_dir) as d:
        assert get(d.front, "/first")[0] == 200
        eventually(lambda: access.exists() and "/first" in access.read_text(), 10, what="line")
        os.rename(access, d_dir / "access.log.1")
        d.signal(signal.SIGUSR1)
        eventually(access.exists, 10, what="access log reopened")
        assert get(d.front, "/second")[0] == 200
        eventually(lambda: "/second" in access.read_text(), 10, what="line in the new file")
        record = json.loads(access.read_text().splitlines()[0])
        assert (record["event"], record["path"], record["status"]) == ("request", "/second", 200)
        assert '"request"' not in log.read_text()


def test_metrics_parse_with_prometheus_client() -> None:
    with running_daemon({"workers": 2, "max_queue": 0}) as d:
        for _ in range(5):
            assert get(d.front, "/")[0] == 200
        code, text = d.admin_call("GET", "/metrics")
        assert code == 200
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        assert samples[("flypool_requests_total", (("app", "app"), ("code", "2xx")))] == 5
        assert samples[("flypool_workers", (("app", "app"), ("state", "ready")))] == 2
        assert samples[("flypool_queue_length", (("app", "app"),))] == 0
        assert samples[("flypool_deployment_error", (("app", "app"),))] == 0
        names = {n for n, _ in samples}
        for needed in (
            "flypool_requests_in_flight",
            "flypool_restarts_total",
            "flypool_spawn_failures_total",
            "flypool_queue_wait_seconds_total",
            "flypool_restart_duration_seconds_total",
        ):
            assert needed in names, needed
