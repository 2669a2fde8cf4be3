"""The elastic pool (SPEC §10): grow on queue wait, shrink by draining idle extras."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flypool.pool.elastic import MIN_SAMPLES, Elastic, QueueWaitWindow
from flypool.pool.worker import Worker, WorkerState
from tests.support import Daemon, LoadGen, eventually, running_daemon


def _ready(n: int, last_used: float, inflight: int = 0) -> Worker:
    w = Worker(n, 0, "/r", f"/s/{n}", 0.0, WorkerState.READY)
    w.last_used = last_used
    w.inflight = inflight
    return w


def test_window_p95_is_the_share_of_waits_over_100ms() -> None:
    win = QueueWaitWindow()
    for _ in range(19):
        win.add(10.0, 0.0)
    win.add(10.0, 0.5)
    assert win.counts(10.0) == (20, 1)
    assert not win.p95_slow(10.0)  # exactly 5 %: the 95th percentile is 0
    win.add(10.1, 0.2)
    assert win.p95_slow(10.1)
    # Five seconds later it has aged out; evidence before a step up does not count.
    assert win.counts(15.5) == (0, 0)
    assert win.counts(10.2, since=10.0) == (0, 0)


def test_step_up_needs_evidence_one_spawn_at_a_time_and_the_ceiling() -> None:
    el = Elastic(floor=1, ceiling=2, idle_time=1.0)
    busy = [_ready(1, 0.0, inflight=1)]
    for _ in range(MIN_SAMPLES):
        el.window.add(5.0, 0.3)
    assert el.step(5.0, 1, 1, busy, queued=3, queue_full=False) == 0  # a spawn in flight
    assert el.step(5.0, 1, 0, busy, queued=3, queue_full=False) == 1
    assert el.step(5.1, 2, 0, busy, queued=3, queue_full=True) == 0  # at the ceiling
    el.ceiling = 3
    # The same evidence does not buy a second worker...
    assert el.step(5.6, 2, 0, busy, queued=3, queue_full=False) == 0
    # ... a full queue does.
    assert el.step(5.6, 2, 0, busy, queued=100, queue_full=True) == 1


def test_step_down_counts_idle_workers_above_the_floor() -> None:
    el = Elastic(floor=2, ceiling=6, idle_time=1.0)
    ready = [_ready(1, 9.5), _ready(2, 5.0), _ready(3, 4.0), _ready(4, 3.0, inflight=1)]
    assert el.step(10.0, 4, 0, ready, queued=0, queue_full=False) == -2
    assert el.step(10.0, 4, 0, ready, queued=1, queue_full=False) == 0  # queued: not idle
    assert el.step(10.0, 2, 0, ready, queued=0, queue_full=False) == 0  # at the floor


def test_slow_waits_before_a_step_down_do_not_buy_a_step_up() -> None:
    """A burst's backlog drained, the extras fell idle and were drained: the slow waits of
    that backlog, still in the window, must not grow the pool again at once."""
    el = Elastic(floor=1, ceiling=4, idle_time=0.3)
    for _ in range(20):
        el.window.add(10.0, 0.5)
    idle = [_ready(1, 9.0), _ready(2, 9.0), _ready(3, 9.0)]
    assert el.step(10.5, 3, 0, idle, queued=0, queue_full=False) == -2
    assert el.step(10.75, 1, 0, idle[:1], queued=0, queue_full=False) == 0  # stale evidence
    for _ in range(MIN_SAMPLES):
        el.window.add(11.0, 0.2)
    assert el.step(11.0, 1, 0, idle[:1], queued=2, queue_full=False) == 1  # fresh evidence


def _scale_events(d: Daemon) -> dict[str, float]:
    _code, text = d.admin_call("GET", "/metrics")
    return {
        s.labels["direction"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "flypool_scale_events_total"
    }


ELASTIC = {
    "workers": 1,
    "max_workers": 3,
    "worker_idle_time": "1s",
    "max_queue": 1000,
    "queue_timeout": "30s",
}


def test_the_pool_grows_on_queue_wait_and_shrinks_back_when_idle() -> None:
    with running_daemon(ELASTIC) as d:
        assert d.app()["workers_target"] == 1
        with LoadGen(d.front, clients=4, target="/?delay=0.2") as load:
            eventually(lambda: d.app()["workers_target"] == 3, 20, what="grow to 3")
            d.wait_ready(3)
        assert load.failures() == {}, load.statuses
        eventually(lambda: d.app()["workers_target"] == 1, 15, what="shrink to 1")
        d.wait_ready(1)
        events = _scale_events(d)
        assert events["up"] == 2 and events["down"] == 2, events
        assert "elastic scale up" in d.log() and "elastic scale down" in d.log()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fifty_scale_downs_fail_no_request() -> None:
    """Light load runs throughout; bursts grow the pool, idle extras are drained: 0 failures.
    About 25 s on 2 idle cores (about 10 cycles of 5 scale-downs)."""
    app = {**ELASTIC, "max_workers": 6, "worker_idle_time": "300ms"}
    with running_daemon(app) as d:
        deadline = time.monotonic() + 100
        with LoadGen(d.front, clients=1, target="/?delay=0.01") as light:
            while _scale_events(d).get("down", 0) < 50:
                assert time.monotonic() < deadline, _scale_events(d)
                with LoadGen(d.front, clients=10, target="/?delay=0.1") as burst:
                    eventually(
                        lambda: d.app()["workers_target"] >= 5, 20, what="growth under a burst"
                    )
                assert burst.failures() == {}, burst.statuses
                eventually(lambda: d.app()["workers_target"] == 1, 20, what="shrink to 1")
        assert light.failures() == {}, light.statuses
        assert light.total > 100
        events = _scale_events(d)
        assert events["down"] >= 50
        d.wait_ready(1)
