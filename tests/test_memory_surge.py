"""Memory-aware surge (SPEC §7): ``restart_batch = "auto"`` with workers of different
RSS, and, for any batch, the next spawn overlapping an old worker's exit when memory
has room for it (an exiting worker counts against memory, not the process bound)."""

from __future__ import annotations

import itertools
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from flypool.pool import memory
from flypool.pool.plans import RollingPlan, View
from flypool.pool.worker import Worker, WorkerState
from tests.pool_harness import Harness, app_config, run
from tests.support import MEM_WORKER, eventually, running_daemon, short_dir

MB = 1024 * 1024
# Worker 1 carries 200 MB of ballast, the others 10 MB.
FAT_ENV = {"MEM_MB": "10", "MEM_MB_1": "200"}


def _drained_pids(h: Harness) -> list[int]:
    return [e["pid"] for e in h.log.named("draining worker")]


def test_only_one_extra_fits_so_the_batch_is_1_and_the_fattest_goes_first() -> None:
    """memory_reserve leaves room for one 200 MB worker more: batch 1, worker 1 replaced first."""
    base = Path(short_dir())
    reserve = memory.available_memory() - 210 * MB
    cfg = app_config(
        base,
        workers=4,
        restart_batch="auto",
        memory_reserve=str(reserve),
        env=FAT_ENV,
    )

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(4)
        fat = next(w for w in h.workers if w.number == 1)
        assert fat.rss_bytes > 200 * MB, fat.rss_bytes
        assert all(w.rss_bytes < 100 * MB for w in h.workers if w is not fat)
        h.peak_workers = 0
        ctl.request_restart("rolling", "deploy")
        assert ctl.restart is not None and ctl.restart.batch == 1
        await h.settled(4, timeout=30)
        assert _drained_pids(h)[0] == fat.pid
        assert ctl.last_restart is not None
        assert ctl.last_restart["batch"] == 1 and ctl.last_restart["outcome"] == "completed"
        assert ctl.last_restart["peak_rss_bytes"] > 200 * MB
        # A drained, signalled worker counts against memory, not the bound: at
        # most one spawn beyond the target, plus old workers on their way out.
        assert all(w.number > 4 for w in h.workers)

    run(cfg, base, body)


def test_with_room_the_batch_is_more_than_one() -> None:
    base = Path(short_dir())
    cfg = app_config(base, workers=4, restart_batch="auto", memory_reserve="0", env=FAT_ENV)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(4)
        fat = next(w for w in h.workers if w.number == 1)
        ctl.request_restart("rolling", "deploy")
        assert ctl.restart is not None and ctl.restart.batch > 1
        await h.until(
            lambda: sum(1 for w in h.workers if w.state is WorkerState.SPAWNING) > 1,
            10,
            "more than one new worker starting at once",
        )
        await h.settled(4, timeout=30)
        assert _drained_pids(h)[0] == fat.pid
        assert ctl.last_restart is not None and ctl.last_restart["batch"] > 1

    run(cfg, base, body)


def test_status_and_metrics_show_the_batch_and_the_peak() -> None:
    app = {
        "command": MEM_WORKER,
        "workers": 3,
        "restart_batch": "auto",
        "memory_reserve": "0",
        "env": {**FAT_ENV, "BOOT_S": "0.5"},
    }
    with running_daemon(app) as d:
        steady = sum(w["rss_bytes"] for w in d.app()["workers"])
        code, body = d.admin_call("POST", "/apps/app/restart")
        assert code == 202
        running = eventually(lambda: d.app()["restart"], 10, what="restart running")
        assert running["batch"] == 3 and running["peak_rss_bytes"] >= steady * 0.9
        last = eventually(
            lambda: d.app()["restart"] is None and d.app()["last_restart"], 30, what="restart end"
        )
        assert last["id"] == body["restart_id"] and last["outcome"] == "completed"
        assert last["batch"] == 3
        largest = 220 * MB
        assert steady * 0.9 <= last["peak_rss_bytes"] <= steady + last["batch"] * largest
        _code, text = d.admin_call("GET", "/metrics")
        samples = {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.labels.get("app") == "app"
        }
        assert samples["flypool_restart_batch"] == 3
        assert samples["flypool_restart_peak_memory_bytes"] == last["peak_rss_bytes"]


# ---------------------------------------------------------------- the plan alone

_S = WorkerState
_numbers = itertools.count(1)


def _w(gen: int, state: WorkerState, rss: int = 50 * MB, inflight: int = 0) -> Worker:
    w = Worker(next(_numbers), gen, "/r", "/s", 0.0, state)
    w.pid, w.rss_bytes, w.inflight = w.number + 1000, rss, inflight
    return w


def _plan(batch: int | str, target: int) -> RollingPlan:
    plan = RollingPlan(
        generation=2,
        restart_id=1,
        reason="test",
        started=0.0,
        total=target,
        batch=1 if batch == "auto" else int(batch),
        by_memory=batch == "auto",
        resist=True,
    )
    plan.est_rss = 50 * MB
    return plan


def _spawns(plan: RollingPlan, target: int, workers: list[Worker], room: int | None) -> int:
    v = View(now=0.0, target=target, generation=2, workers=workers, memory_room=room)
    return plan.decide(v).spawn


def _serving(workers: list[Worker]) -> int:
    return sum(1 for w in workers if w.state in (_S.SPAWNING, _S.READY, _S.DRAINING) or w.inflight)


def test_fixed_batch_spawns_beside_an_exiting_worker_only_when_memory_has_room() -> None:
    """Batch 1, 3 workers: one new ready, its old one signalled and exiting."""
    pool = [_w(2, _S.READY), _w(1, _S.STOPPING), _w(1, _S.READY), _w(1, _S.READY)]
    assert _spawns(_plan(1, 3), 3, pool, 1024 * MB) == 1
    # Room for less than one worker of the largest RSS: wait for the exit.
    assert _spawns(_plan(1, 3), 3, pool, 49 * MB) == 0
    assert _spawns(_plan(1, 3), 3, pool, -MB) == 0
    # Memory not read, or no RSS known: wait for the exit, as before.
    assert _spawns(_plan(1, 3), 3, pool, None) == 0
    unknown = _plan(1, 3)
    unknown.est_rss = 0
    assert (
        _spawns(
            unknown,
            3,
            [
                _w(g, st, rss=0)
                for g, st in ((2, _S.READY), (1, _S.STOPPING), (1, _S.READY), (1, _S.READY))
            ],
            1024 * MB,
        )
        == 0
    )
    # The largest RSS seen counts, not only the old generation's at the start.
    fat_new = [_w(2, _S.READY, rss=600 * MB), *pool[1:]]
    assert _spawns(_plan(1, 3), 3, fat_new, 500 * MB) == 0
    # A stopping worker with a request still in flight is serving.
    busy = [pool[0], _w(1, _S.STOPPING, inflight=1), pool[2], pool[3]]
    assert _spawns(_plan(1, 3), 3, busy, 1024 * MB) == 0
    # Once it has exited (gone from the list), the bound allows one spawn anyway.
    assert _spawns(_plan(1, 3), 3, [pool[0], pool[2], pool[3]], -MB) == 1


def test_fixed_batch_memory_decides_only_the_overlap() -> None:
    """Batch 2, 4 workers: two new ready, two old exiting, two old ready."""
    pool = [_w(2, _S.READY), _w(2, _S.READY), _w(1, _S.STOPPING), _w(1, _S.STOPPING)]
    pool += [_w(1, _S.READY), _w(1, _S.READY)]
    assert _spawns(_plan(2, 4), 4, pool, 1024 * MB) == 2
    assert _spawns(_plan(2, 4), 4, pool, 60 * MB) == 1
    assert _spawns(_plan(2, 4), 4, pool, 0) == 0
    # A new worker already spawning takes its share of the room.
    pool = [_w(2, _S.READY), _w(2, _S.READY), _w(2, _S.SPAWNING, rss=0)]
    pool += [_w(1, _S.STOPPING), _w(1, _S.STOPPING), _w(1, _S.READY)]
    assert _spawns(_plan(2, 4), 4, pool, 110 * MB) == 1
    assert _spawns(_plan(2, 4), 4, pool, 60 * MB) == 0


def test_auto_batch_waits_for_the_exit_when_memory_is_tight() -> None:
    """The "at least one extra" guarantee counts exiting processes too."""
    pool = [_w(2, _S.READY), _w(1, _S.STOPPING), _w(1, _S.READY), _w(1, _S.READY)]
    assert _spawns(_plan("auto", 3), 3, pool, 10 * MB) == 0
    assert _spawns(_plan("auto", 3), 3, pool, 1024 * MB) == 1
    assert _spawns(_plan("auto", 3), 3, [pool[0], *pool[2:]], 10 * MB) == 1


def test_serving_workers_never_exceed_workers_plus_batch() -> None:
    """Every mix of states and memory: the spawns decided keep the bound."""
    states = (_S.SPAWNING, _S.READY, _S.DRAINING, _S.STOPPING)
    batches: tuple[int | str, ...] = (1, 2, "auto")
    cases = itertools.product(
        batches, (1, 2, 3), (0, 60, 10**6), itertools.product(states, repeat=2), (0, 1), (0, 1, 2)
    )
    for batch, target, room, old, n_spawning, n_exiting in cases:
        for n_new in range(target + 1):
            pool = [_w(1, st) for st in old]
            pool += [_w(2, _S.READY) for _ in range(n_new)]
            pool += [_w(2, _S.SPAWNING) for _ in range(n_spawning)]
            pool += [_w(1, _S.STOPPING) for _ in range(n_exiting)]
            plan = _plan(batch, target)
            limit = target + plan.batch
            if _serving(pool) > limit:
                continue
            v = View(now=0.0, target=target, generation=2, workers=pool, memory_room=room * MB)
            d = plan.decide(v)
            stopped = sum(1 for w in d.stop if w.state is _S.SPAWNING)
            assert _serving(pool) + d.spawn - stopped <= limit, (batch, target, room, pool, d)


# ---------------------------------------------------------------- real processes

# Old workers ignore SIGTERM, so each stays STOPPING until SIGKILL at stop_timeout.
SLOW_EXIT = {"IGNORE_TERM": "1", "BOOT_S": "0.2", "MEM_MB": "10"}


def test_fixed_batch_next_spawn_overlaps_the_old_workers_exit() -> None:
    """Batch 1 with room: a new worker spawns while the previous old one exits."""
    base = Path(short_dir())
    cfg = app_config(
        base, workers=3, restart_batch=1, memory_reserve="0", stop_timeout="3s", env=SLOW_EXIT
    )

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(3)
        h.peak_workers = h.peak_serving = 0
        ctl.request_restart("rolling", "deploy")
        gen = ctl.generation
        await h.until(
            lambda: (
                any(w.state is _S.STOPPING and w.generation < gen for w in h.workers)
                and any(w.state is _S.SPAWNING and w.generation == gen for w in h.workers)
            ),
            10,
            "a new worker spawning while an old one exits",
        )
        await h.settled(3, timeout=30)
        assert h.peak_serving <= 3 + 1, h.peak_serving
        assert h.peak_workers > 3 + 1, h.peak_workers
        assert ctl.last_restart is not None and ctl.last_restart["outcome"] == "completed"
        assert {w.generation for w in h.workers} == {gen}

    run(cfg, base, body)


def test_fixed_batch_waits_for_the_exit_when_memory_is_tight() -> None:
    """memory_reserve above what is available: every spawn waits for the old one's exit."""
    base = Path(short_dir())
    reserve = memory.available_memory() + 1024 * MB
    cfg = app_config(
        base,
        workers=2,
        restart_batch=1,
        memory_reserve=str(reserve),
        stop_timeout="1s",
        env=SLOW_EXIT,
    )

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        h.peak_workers = 0
        ctl.request_restart("rolling", "deploy")
        gen = ctl.generation
        overlaps: list[list[Worker]] = []
        stops = 0

        def done() -> bool:
            nonlocal stops
            states = {w.state for w in h.workers}
            stops = max(stops, sum(1 for w in h.workers if w.state is _S.STOPPING))
            if _S.STOPPING in states and _S.SPAWNING in states:
                overlaps.append(list(h.workers))
            return ctl.restart is None and len(h.workers) == 2

        await h.until(done, 30, "the restart to end")
        assert stops >= 1  # an old worker did linger, signalled
        assert not overlaps, overlaps[0]
        assert h.peak_workers <= 2 + 1, h.peak_workers
        assert {w.generation for w in h.workers} == {gen}

    run(cfg, base, body)
