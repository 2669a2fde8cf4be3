"""Worker limits: max_requests, memory_limit, max_request_time (nothing else is lost)."""

from __future__ import annotations

import threading

from tests.support import LoadGen, eventually, get, running_daemon


def test_max_requests_recycles_workers_without_failures() -> None:
    with running_daemon({"workers": 2, "max_requests": 25}) as d:
        first = set(d.ready_pids())
        with LoadGen(d.front, clients=4, target="/?delay=0.002") as load:
            eventually(lambda: load.total > 200, 30, what="200 requests")
        assert load.failures() == {}, load.statuses
        # Every original worker was recycled after its 25 requests.
        eventually(
            lambda: not first & set(d.ready_pids()) and len(d.ready_pids()) == 2,
            15,
            what="recycled workers",
        )
        # The replacement is ready before the old worker stops taking requests,
        # so a worker may serve a few more than 25 while its successor boots.
        assert d.log().count("max_requests reached") >= 2


def test_memory_limit_replaces_a_bloated_worker_gracefully() -> None:
    with running_daemon({"workers": 1, "memory_limit": "120MB"}) as d:
        pid = d.ready_pids()[0]
        assert get(d.front, "/grow?mb=150")[0] == 200
        # The sampler (every 2 s) sees it, a replacement is started first, the
        # fat worker drains; requests keep working throughout.
        with LoadGen(d.front, clients=2) as load:
            eventually(
                lambda: pid not in d.ready_pids() and len(d.ready_pids()) == 1,
                20,
                what="bloated worker replaced",
            )
        assert load.failures() == {}, load.statuses
        assert "memory limit" in d.log()


def test_max_request_time_gives_504_and_replaces_the_stuck_worker() -> None:
    app = {"workers": 2, "max_request_time": "1s", "worker_concurrency": 1}
    with running_daemon(app) as d:
        pids = d.ready_pids()
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(get(d.front, "/?delay=30")[0]))
        t.start()
        stuck = eventually(
            lambda: [w["pid"] for w in d.app()["workers"] if w["sessions"]], 5, what="stuck"
        )[0]
        # Everyone else is unaffected meanwhile.
        with LoadGen(d.front, clients=2) as load:
            t.join(10)
            assert result == [504]
            eventually(
                lambda: stuck not in d.ready_pids() and len(d.ready_pids()) == 2,
                15,
                what="stuck worker replaced",
            )
        assert load.failures() == {}, load.statuses
        assert len(set(pids) - {stuck}) == 1
