"""USR2: the daemon replaces its own image; workers, sockets and clients carry on."""

from __future__ import annotations

import os
import signal

from tests.support import LoadGen, eventually, get, raw_request, running_daemon


def test_usr2_keeps_workers_and_loses_no_request() -> None:
    with running_daemon({"workers": 3}) as d:
        before = {w["pid"]: w["uptime_s"] for w in d.app()["workers"]}
        with LoadGen(d.front, clients=6, target="/?delay=0.005") as load:
            eventually(lambda: load.total > 100, 10, what="load running")
            d.signal(signal.SIGUSR2)
            eventually(lambda: "hand-over complete" in d.log(), 20, what="hand-over")
            n = load.total
            eventually(lambda: load.total > n + 100, 10, what="load after hand-over")
        assert load.failures() == {}, load.statuses
        status = d.status()
        assert status["pid"] == d.proc.pid  # same process: systemd/runit see no exit
        after = {w["pid"]: w["uptime_s"] for w in d.app()["workers"]}
        assert set(after) == set(before)  # no worker restarted
        assert all(after[p] > before[p] for p in before)
        # Worker output still reaches the (new) daemon's log.
        # POST: never retried (SPEC §6), so exactly one worker dies.
        crash = b"POST /crash HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        assert raw_request(d.front, crash).startswith(b"HTTP/1.1 502")
        eventually(lambda: "worker exited unexpectedly" in d.log(), 10, what="crash noticed")
        d.wait_ready(3)  # an adopted worker's death is seen (pidfd) and its slot refilled
        # Restarts and a second hand-over work on adopted workers too.
        assert d.cli("restart", "--wait").returncode == 0
        assert not set(before) & set(d.ready_pids())
        d.signal(signal.SIGUSR2)
        eventually(lambda: d.log().count("hand-over complete") == 2, 20, what="second hand-over")
        assert get(d.front, "/")[0] == 200
        assert os.path.exists(d.front)
