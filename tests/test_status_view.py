"""Tests for `flypool.status_view`: passenger-status text from the status JSON (SPEC §8)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flypool.status_view import format_duration, format_size, render_status

NOW = datetime(2026, 11, 22, 10, 5, 0, tzinfo=timezone(timedelta(hours=1)))
MIB = 1024 * 1024


def _worker(pid: int, release: str, state: str = "ready", **extra: Any) -> dict[str, Any]:
    worker: dict[str, Any] = {
        "pid": pid,
        "state": state,
        "sessions": 0,
        "processed": 10,
        "uptime_s": 5.0,
        "cpu_percent": 0.0,
        "rss_bytes": 12 * MIB,
        "last_used_s": 0.5,
        "release": release,
        "restarts": 0,
    }
    worker.update(extra)
    return worker


def make_status() -> dict[str, Any]:
    """A status document as `GET /status` returns it, mid rolling restart, with a broken app."""
    return {
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 3723.9,
        "instance": "/run/flypool/admin.sock",
        "apps": [
            {
                "name": "blog",
                "root": "/srv/blog/current",
                "release": "/srv/blog/releases/B",
                "state": "restarting",
                "queue": 2,
                "workers_target": 2,
                "drained": False,
                "listen": ["unix:/run/flypool/blog.sock"],
                "restart": {"mode": "rolling", "done": 1, "total": 2, "replacing_pid": 1002},
                "deployment_error": None,
                "last_restart": None,
                "workers": [
                    _worker(1003, "/srv/blog/releases/B", sessions=1, processed=3),
                    _worker(
                        1002,
                        "/srv/blog/releases/A",
                        state="draining",
                        processed=4595,
                        uptime_s=21209.0,
                        cpu_percent=2.6,
                        rss_bytes=99 * MIB,
                        last_used_s=4.0,
                    ),
                ],
            },
            {
                "name": "shop",
                "root": "/srv/shop/current",
                "release": "/srv/shop/releases/A",
                "state": "deployment_error",
                "queue": 0,
                "workers_target": 1,
                "drained": True,
                "listen": ["127.0.0.1:8080"],
                "restart": None,
                "deployment_error": {
                    "release": "/srv/shop/releases/B",
                    "reason": "worker exited with status 1 before it was ready",
                    "output": ["Traceback (most recent call last):", "ImportError: no shop"],
                    "at": "2026-11-22T09:00:00Z",
                },
                "last_restart": {
                    "id": 3,
                    "mode": "rolling",
                    "outcome": "aborted",
                    "reason": "new worker failed to start",
                    "duration_s": 2.25,
                    "finished_at": "2026-11-22T09:00:01Z",
                },
                "workers": [_worker(2001, "/srv/shop/releases/A", uptime_s=3600.0)],
            },
        ],
    }


def test_full_layout_matches_passenger_status() -> None:
    """The whole text, pinned: header, general information, then one block per app."""
    expected = """\
Version : 0.1.0
Date    : 2026-11-22 10:05:00 +0100
Instance: /run/flypool/admin.sock (pid 4242, up 1h 2m 3s)

----------- General information -----------
Max pool size : 3
App groups    : 2
Processes     : 3
Requests in top-level queue : 0

----------- Application groups -----------
blog (restarting):
  App root: /srv/blog/current
  Release: /srv/blog/releases/B
  Listen: unix:/run/flypool/blog.sock
  Workers: 2 (target 2)
  Requests in queue: 2
  Restart: rolling 1/2
  * PID: 1003    Sessions: 1       Processed: 3       Uptime: 5s
    CPU: 0%      Memory  : 12M     Last used: 0s ago
    Release: /srv/blog/releases/B   State: ready
  * PID: 1002    Sessions: 0       Processed: 4595    Uptime: 5h 53m 29s
    CPU: 3%      Memory  : 99M     Last used: 4s ago
    Release: /srv/blog/releases/A   State: draining
    Rolling restarting...

shop (deployment_error):
  App root: /srv/shop/current
  Release: /srv/shop/releases/A
  Listen: 127.0.0.1:8080
  Workers: 1 (target 1)
  Drained: yes (health check answers 503)
  Requests in queue: 0
  Last restart: rolling aborted in 2.2s at 2026-11-22T09:00:01Z: new worker failed to start
  Deployment error: worker exited with status 1 before it was ready \
(release /srv/shop/releases/B) at 2026-11-22T09:00:00Z
    Traceback (most recent call last):
    ImportError: no shop
  * PID: 2001    Sessions: 0       Processed: 10      Uptime: 1h 0m 0s
    CPU: 0%      Memory  : 12M     Last used: 0s ago
    Release: /srv/shop/releases/A   State: ready
"""
    assert render_status(make_status(), now=NOW) == expected


def test_marker_follows_the_worker_being_replaced() -> None:
    """`Rolling restarting...` comes right after the lines of the worker with replacing_pid."""
    status = make_status()
    status["apps"][0]["restart"]["replacing_pid"] = 1003
    lines = render_status(status, now=NOW).splitlines()
    assert lines.count("    Rolling restarting...") == 1
    marker = lines.index("    Rolling restarting...")
    assert lines[marker - 3].startswith("  * PID: 1003 ")
    assert lines[marker + 1].startswith("  * PID: 1002 ")


def test_no_marker_and_no_restart_line_without_a_restart() -> None:
    """With `restart` null there is no progress line and no marker."""
    status = make_status()
    status["apps"][0]["restart"] = None
    text = render_status(status, now=NOW)
    assert "Rolling restarting..." not in text
    assert "  Restart:" not in text


def test_completed_last_restart_is_shown_without_reason() -> None:
    """A finished restart shows its mode, outcome and duration."""
    status = make_status()
    app = status["apps"][0]
    app["restart"] = None
    app["last_restart"] = {
        "id": 9,
        "mode": "blocking",
        "outcome": "completed",
        "reason": "admin",
        "duration_s": 4.21,
        "finished_at": "2026-11-22T10:04:00Z",
    }
    text = render_status(status, now=NOW)
    assert "  Last restart: blocking completed in 4.2s at 2026-11-22T10:04:00Z\n" in text


def test_renders_a_minimal_document_without_crashing() -> None:
    """Fields missing (another daemon version) degrade to placeholders, never to an error."""
    text = render_status({"apps": [{"name": "x", "workers": [{"pid": 7}]}]}, now=NOW)
    assert "x (unknown):" in text
    assert "  * PID: 7       Sessions: 0       Processed: 0       Uptime: -" in text
    assert "Last used: never" in text
    assert "Max pool size : 1" in text


def test_empty_pool() -> None:
    """No apps: zero counts and an empty application section."""
    text = render_status({"version": "0.1.0", "apps": []}, now=NOW)
    assert text.endswith("----------- Application groups -----------\n")
    assert "App groups    : 0" in text
    assert "Processes     : 0" in text


def test_render_status_does_not_modify_its_input() -> None:
    """A pure function: the caller's dict is left untouched."""
    status = make_status()
    before = copy.deepcopy(status)
    render_status(status, now=NOW)
    assert status == before


def test_date_defaults_to_now() -> None:
    """Without `now`, the Date line shows the current local time."""
    text = render_status({"apps": []})
    date_line = text.splitlines()[1]
    stamp = datetime.strptime(date_line.removeprefix("Date    : "), "%Y-%m-%d %H:%M:%S %z")
    assert abs((datetime.now().astimezone() - stamp).total_seconds()) < 60


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (5.9, "5s"),
        (60, "1m 0s"),
        (62, "1m 2s"),
        (3600, "1h 0m 0s"),
        (3723, "1h 2m 3s"),
        (90061, "1d 1h 1m 1s"),
        (-3, "0s"),
        (None, "-"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    """Durations read like passenger-status's: leading zero units dropped."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [
        (0, "0M"),
        (12 * MIB, "12M"),
        (12 * MIB + 600 * 1024, "13M"),
        (1536 * MIB, "1.5G"),
        (None, "-"),
    ],
)
def test_format_size(num_bytes: int | None, text: str) -> None:
    """Memory is printed in whole MiB, as passenger-status does, and in G above 1 GiB."""
    assert format_size(num_bytes) == text


def test_spawn_error_is_shown_with_its_backoff() -> None:
    """A crash loop outside a restart shows its reason, backoff and output."""
    status = make_status()
    status["apps"][0]["spawn_error"] = {
        "release": "/srv/blog/releases/B",
        "reason": "worker exited with status 3",
        "output": ["boom"],
        "at": "2026-11-22T10:00:00Z",
        "failures": 2,
        "retry_in_s": 4.0,
    }
    lines = render_status(status, now=NOW).splitlines()
    index = lines.index(
        "  Spawn error: worker exited with status 3 (release /srv/blog/releases/B) "
        "at 2026-11-22T10:00:00Z; 2 failure(s) in a row, next attempt in 4s"
    )
    assert lines[index + 1] == "    boom"


def test_date_comes_from_the_daemon_when_given() -> None:
    """The daemon's snapshot time is shown rather than the client's clock."""
    text = render_status({"date": "2026-11-22 09:59:59 +0000", "apps": []}, now=NOW)
    assert text.splitlines()[1] == "Date    : 2026-11-22 09:59:59 +0000"


def test_max_pool_size_and_restart_batch_from_the_daemon() -> None:
    """The daemon's max_pool_size, and a memory-aware restart's batch, are shown."""
    status = make_status()
    status["max_pool_size"] = 256
    status["apps"][0]["restart"] = {"mode": "rolling", "done": 1, "total": 4, "batch": 2}
    text = render_status(status, now=NOW)
    assert "Max pool size : 256\n" in text
    assert "  Restart: rolling 1/4 (batch 2)\n" in text


def test_canary_phase_shows_both_generations() -> None:
    """During a canary the app shows its pids, what it waits for and both generations."""
    status = make_status()
    status["apps"][0]["restart"] = {
        "mode": "rolling",
        "phase": "canary",
        "done": 0,
        "total": 2,
        "replacing_pid": None,
        "canary": {
            "workers": [1003],
            "requests": 57,
            "errors": 2,
            "p99_ms": 31.25,
            "old_requests": 231,
            "old_errors": 0,
            "old_p99_ms": None,
            "waiting_for": "evidence",
        },
    }
    text = render_status(status, now=NOW)
    assert (
        "  Canary: PID 1003, waiting for evidence; 2 of 57 failed, p99 31.2ms"
        " (old generation: 0 of 231, p99 -)"
    ) in text
