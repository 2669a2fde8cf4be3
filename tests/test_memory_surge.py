"""Memory-aware surge (SPEC §7, restart_batch = "auto"): workers of different RSS."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from flypool.pool import memory
from flypool.pool.worker import WorkerState
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
