"""The pool controller driven directly (issue 11 defects a-e, h, i): real processes, no daemon."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from flypool.pool.worker import WorkerState
from tests.pool_harness import Harness, app_config, run
from tests.support import make_release, point_current, short_dir


def _releases(*names: str) -> tuple[Path, list[Path]]:
    base = Path(short_dir())
    rels = [make_release(base, n) for n in names]
    point_current(base, rels[0])
    return base, rels


def test_two_restart_requests_in_one_loop_turn_are_one_restart() -> None:
    """Defect a: one plan, the process bound kept, every worker on the newest release."""
    base, (_a, b) = _releases("A", "B")
    cfg = app_config(base / "current", workers=3, env={"BOOT_S": "0.3"})

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(3)
        h.peak_workers = h.peak_children = h.peak_serving = 0
        point_current(base, b)
        first = ctl.request_restart("rolling", "deploy tool")
        second = ctl.request_restart("rolling", "logrotate")  # same loop turn
        assert ctl.restart is not None and ctl.restart.ids == [first, second]
        await h.settled(3)
        # The bound is on serving workers (SPEC §1 "live"); an old worker
        # signalled and exiting may be one process more, within memory.
        assert h.peak_serving <= 3 + 1, h.peak_serving
        # Every child process is a tracked worker.
        assert h.peak_children <= h.peak_workers, (h.peak_children, h.peak_workers)
        assert ctl.last_restart is not None
        assert ctl.last_restart["id"] == second
        assert ctl.last_restart["outcome"] == "completed"
        assert ctl.deployment_error is None
        assert {w.generation for w in h.workers} == {ctl.generation}
        assert {w.release for w in h.workers} == {str(b)}
        assert len(h.log.named("restart begin")) == 1

    run(cfg, base, body)


def test_restart_during_a_blocking_restart_supersedes_it() -> None:
    """Defect b: rolling_restarts = false; the second request is not dropped."""
    base, (_a, b, c) = _releases("A", "B", "C")
    cfg = app_config(base / "current", rolling_restarts=False, env={"BOOT_S": "0.5"})

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        point_current(base, b)
        ctl.request_restart(None, "first")
        await h.until(
            lambda: any(w.generation == ctl.generation and w.pid for w in h.workers),
            what="new workers spawning",
        )
        point_current(base, c)
        rid = ctl.request_restart(None, "second")
        await h.settled(2)
        assert ctl.last_restart is not None
        assert ctl.last_restart["id"] == rid and ctl.last_restart["outcome"] == "completed"
        assert ctl.last_restart["mode"] == "blocking"
        assert {w.release for w in h.workers} == {str(c)}
        assert {w.generation for w in h.workers} == {ctl.generation}

    run(cfg, base, body)


def test_broken_release_without_resistance_backs_off_and_the_restart_ends() -> None:
    """Defect c: crash backoff bounds the spawn rate; status says why; the restart ends."""
    base, (_a, b) = _releases("A", "B")
    (b / "fail_at_boot").touch()
    cfg = app_config(base / "current", resist_deployment_errors=False)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        point_current(base, b)
        t0 = h.loop.time()
        ctl.request_restart("rolling", "deploy")
        await h.until(lambda: ctl.restart is None, 20, "restart to end")
        elapsed = h.loop.time() - t0
        # Two failed spawns (one per old worker skipped), 1 s of backoff between.
        assert ctl.procs.spawn_failures_total <= 3, ctl.procs.spawn_failures_total
        assert elapsed >= 1.0
        assert ctl.last_restart is not None and ctl.last_restart["outcome"] == "completed"
        assert ctl.deployment_error is not None
        assert "before it was ready" in ctl.deployment_error.reason
        assert any("boot failure requested" in line for line in ctl.deployment_error.output)
        err = ctl.procs.spawn_error
        assert err is not None and err.retry_in_s >= 2.0, err
        # The refill keeps trying, at a bounded rate.
        before = ctl.procs.spawn_failures_total
        await asyncio.sleep(2.5)
        assert ctl.procs.spawn_failures_total - before <= 1

    run(cfg, base, body)


def test_aborted_restart_keeps_every_old_worker_that_was_serving() -> None:
    """Defect d: a new worker dies right after ready; the old one drained for it serves again."""
    base, (_a, b) = _releases("A", "B")
    (b / "die_after_ready").write_text("0.5")
    cfg = app_config(base / "current", workers=2, drain_timeout="30s")

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        old = {w.pid for w in h.workers}
        for w in h.workers:
            w.inflight = 1  # a slow request each: a drain waits
        point_current(base, b)
        ctl.request_restart("rolling", "deploy")
        await h.until(
            lambda: any(w.state is WorkerState.DRAINING for w in h.workers), what="a drain"
        )
        await h.until(lambda: ctl.restart is None, 20, "the restart to abort")
        assert ctl.last_restart is not None and ctl.last_restart["outcome"] == "aborted"
        assert ctl.deployment_error is not None
        assert {w.pid for w in h.ready()} >= old
        assert h.log.named("drain called off")
        for w in h.workers:
            w.inflight = 0

    run(cfg, base, body)


def test_ttin_then_ttou_leaves_no_untracked_process() -> None:
    """Defect e: a spawn retired before its process exists is signalled once it has one."""
    base = Path(short_dir())
    cfg = app_config(base, workers=2)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        for _ in range(5):
            ctl.scale(3)
            await asyncio.sleep(0)  # the spawn starts: its process is being created
            await asyncio.sleep(0)
            ctl.scale(2)
            await h.settled(2)
            await h.until(
                lambda: sorted(h.children()) == sorted(w.pid for w in h.workers),
                10,
                "children to equal the workers",
            )
        # The window was hit, not missed: retired with no process, signalled later.
        assert len(h.log.named("worker retired while starting")) >= 3

    run(cfg, base, body)


def test_stop_while_a_spawn_is_starting_leaves_nothing() -> None:
    """Defect e, shutdown: the worker whose process is still being created is stopped too."""
    base = Path(short_dir())
    cfg = app_config(base, workers=1)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(1)
        ctl.scale(2)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert any(w.pid == 0 for w in h.workers)

    run(cfg, base, body)  # close() stops fast and asserts no child is left


def test_a_worker_that_served_is_replaced_at_once_a_crash_loop_backs_off() -> None:
    """Defect h: SIGKILL after service: replaced at once; death before ready: backoff."""
    base = Path(short_dir())
    cfg = app_config(base, workers=2)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(2)
        await asyncio.sleep(1.1)  # longer than the crash-loop window
        victim = h.workers[0]
        victim.processed = 10
        t0 = h.loop.time()
        os.kill(victim.pid, signal.SIGKILL)
        await h.until(lambda: victim not in h.workers and len(h.workers) == 2, 5, "the replacement")
        assert h.loop.time() - t0 < 0.5  # spawned at once, no backoff
        assert ctl.procs.failures == 0 and ctl.procs.spawn_failures_total == 0
        crash = h.log.named("worker exited unexpectedly")
        assert crash and crash[0]["pid"] == victim.pid and crash[0]["replaced"] == "at once"
        assert not h.log.named("worker failed to start")
        await h.settled(2)
        # Now a crash loop: the release fails at boot.
        (base / "fail_at_boot").touch()
        victim = h.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        await h.until(lambda: ctl.procs.spawn_failures_total >= 2, 10, "two failed boots")
        failed = h.log.named("worker failed to start")
        assert [f["retry_in_s"] for f in failed[:2]] == [1.0, 2.0]
        (base / "fail_at_boot").unlink()
        await h.settled(2, timeout=15)

    run(cfg, base, body)


def test_kill_every_half_second_keeps_the_pool_near_full() -> None:
    """Defect h: under a kill every 0.5 s, replacements start at once (no shrinking to one)."""
    base = Path(short_dir())
    cfg = app_config(base, workers=4)

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(4)
        for w in h.workers:
            w.processed = 1
        lowest = 4
        for i in range(8):
            serving = [w for w in h.ready() if w.processed]
            if serving:
                os.kill(serving[i % len(serving)].pid, signal.SIGKILL)
            end = h.loop.time() + 0.5
            while h.loop.time() < end:
                await asyncio.sleep(0.02)
                lowest = min(lowest, len([w for w in h.workers if w.live]))
                for w in h.ready():
                    w.processed = max(w.processed, 1)
        assert lowest >= 3, lowest  # live (ready or spawning) never below 3
        assert ctl.procs.spawn_failures_total == 0
        await h.settled(4)

    run(cfg, base, body)


def test_rss_is_known_the_moment_a_worker_is_ready() -> None:
    """Defect i: no "Memory: 0M" for up to 2 s after ready."""
    base = Path(short_dir())
    cfg = app_config(base, workers=2)

    async def body(h: Harness) -> None:
        seen: list[int] = []
        while len(seen) < 2:
            await h.ctl.changed()
            for w in h.ready():
                assert w.rss_bytes > 1_000_000, w
                if w.pid not in seen:
                    seen.append(w.pid)

    run(cfg, base, body)


def test_process_bound_holds_through_restarts_scale_and_crashes() -> None:
    """workers + restart_batch serving processes at most, whatever happens in between."""
    base, (_a, b) = _releases("A", "B")
    cfg = app_config(base / "current", workers=3, restart_batch=1, env={"BOOT_S": "0.2"})

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(3)
        h.peak_serving = 0
        point_current(base, b)
        ctl.request_restart(None, "one")
        await h.until(lambda: len(h.ready()) == 3 and h.workers[-1].state is WorkerState.SPAWNING)
        os.kill(h.ready()[0].pid, signal.SIGKILL)
        ctl.request_restart(None, "two")
        await h.settled(3, timeout=30)
        assert h.peak_serving <= 4, h.peak_serving
        assert {w.release for w in h.workers} == {str(b)}

    run(cfg, base, body)


def test_router_reports_only_what_the_controller_listens_to() -> None:
    """Router.watch follows the restart, the stop plan and the USR2 freeze."""
    base, (_a, b) = _releases("A", "B")
    cfg = app_config(base / "current", workers=1, env={"BOOT_S": "0.1"})

    async def body(h: Harness) -> None:
        ctl = h.ctl
        await h.settled(1)
        # Steady: a leaving worker's slots only, no request outcomes.
        assert h.router.watching == (False, False)
        point_current(base, b)
        ctl.request_restart("rolling", "deploy")
        assert h.router.watching == (False, True)  # a canary's judge may listen
        await h.settled(1)
        assert ctl.restart is None and h.router.watching == (False, False)
        ctl.freeze()
        assert h.router.watching == (True, False)  # the hand-over waits on every slot
        ctl.thaw()
        assert h.router.watching == (False, False)
        ctl.stop(graceful=True, deadline=h.loop.time() + 10)
        assert h.router.watching == (True, False)

    run(cfg, base, body)
