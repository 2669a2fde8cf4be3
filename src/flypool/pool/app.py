"""One app's pool of workers: keeps ``workers`` processes alive.

The pool spawns workers until the target count is live, replaces workers
that exit unexpectedly (with exponential backoff when they keep failing, so
a broken app never fork-bombs the host), scales up and down, and stops
everything on shutdown. Restarts are driven by :mod:`flypool.pool.rollout`,
which uses the same primitives (:meth:`AppPool.spawn_ready`,
:meth:`AppPool.retire`).

Every spawn uses the newest config and resolves ``root`` again, so a worker
that crashes after a deploy comes back on the new release.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import TYPE_CHECKING, Any

from flypool.config import AppConfig
from flypool.http.router import Router
from flypool.pool import spawner
from flypool.pool.worker import Worker, WorkerState

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# A worker that dies sooner than this after getting ready counts as a crash
# loop for backoff purposes.
STABLE_AFTER = 10.0


def now_iso() -> str:
    """Wall-clock time for status and logs."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class AppPool:
    """Workers, router and restart state of one app."""

    def __init__(
        self,
        cfg: AppConfig,
        loop: asyncio.AbstractEventLoop,
        runtime_dir: str,
        log: FilteringBoundLogger,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.log = log.bind(app=cfg.name)
        self.workers: list[Worker] = []
        self.router = Router(
            loop,
            cfg.name,
            self.workers,
            concurrency=cfg.worker_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout=cfg.queue_timeout,
            health_path=cfg.health_path,
            max_request_time=cfg.max_request_time,
        )
        self.router.max_requests = cfg.max_requests
        self.target = cfg.workers
        self.generation = 0
        self._next_number = 1
        self.failures = 0
        self.backoff_until = 0.0
        self.spawn_error: dict[str, Any] | None = None
        self.deployment_error: dict[str, Any] | None = None
        # Set by the restart engine while it runs; the pool then leaves the
        # worker count to it.
        self.rollout: Any = None
        self.last_restart: dict[str, Any] | None = None
        self.restarts_total = 0
        self.restart_seq = 0
        self.restart_durations: list[float] = []
        self.spawn_failures_total = 0
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._spawning = 0
        self._replacing: set[Worker] = set()
        # Restart counts of crashed workers, inherited by their replacements.
        self._crashed_slots: list[int] = []
        self.router.recycle = lambda w: self.replace_worker(w, "max_requests reached")
        self.router.stuck = lambda w: self.replace_worker(
            w, "max_request_time exceeded", drain=False
        )
        self.started_at = loop.time()

    @property
    def name(self) -> str:
        """The app's name."""
        return self.cfg.name

    def task(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, kept referenced until it ends."""
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- keeping the count ---------------------------------------------------------------

    def live_workers(self) -> list[Worker]:
        """Workers that count towards the target: spawning or ready, not on their way out."""
        return [
            w
            for w in self.workers
            if w.state in (WorkerState.SPAWNING, WorkerState.READY) and not w.retiring
        ]

    def mark_retiring(self, w: Worker) -> None:
        """Take ``w`` out of routing and of the live count now; it stops later."""
        w.retiring = True
        if w.state is WorkerState.READY:
            w.transition(WorkerState.DRAINING)
            self.router.retire_idle(w)

    def maintain(self) -> None:
        """Spawn or retire workers until the live count matches the target."""
        if self.stopping or self.rollout is not None:
            return
        live = self.live_workers()
        missing = self.target - len(live)
        if missing > 0:
            now = self.loop.time()
            if now < self.backoff_until:
                self._arm_backoff()
                return
            # During a crash loop, probe with one worker at a time.
            if self.failures and self._spawning:
                return
            for _ in range(1 if self.failures else missing):
                self.task(self._spawn_for_count())
        elif missing < 0:
            # Scale down: retire the least useful first (spawning, then oldest idle).
            extra = sorted(
                live, key=lambda w: (w.state is WorkerState.READY, -w.generation, w.inflight)
            )[:-missing]
            for w in extra:
                self.mark_retiring(w)
                self.task(self.retire(w))

    def _arm_backoff(self) -> None:
        if self._backoff_timer is None:
            delay = max(0.0, self.backoff_until - self.loop.time())
            self._backoff_timer = self.loop.call_later(delay, self._backoff_over)

    def _backoff_over(self) -> None:
        self._backoff_timer = None
        self.maintain()

    def scale(self, n: int) -> None:
        """Change the target worker count live."""
        self.target = max(1, n)
        self.log.info("scale", workers=self.target)
        if self.rollout is not None:
            self.rollout.target_changed()
        self.maintain()

    # -- spawning ----------------------------------------------------------------

    async def _spawn_for_count(self) -> None:
        # Failures are recorded (status, backoff) by spawn_ready itself.
        restarts = self._crashed_slots.pop(0) if self._crashed_slots else 0
        try:
            w = await self.spawn_ready(self.generation, for_maintain=True)
        except spawner.SpawnError:
            if restarts:
                self._crashed_slots.insert(0, restarts)
            return
        w.restarts = restarts

    async def spawn_ready(self, generation: int, *, for_maintain: bool = False) -> Worker:
        """Spawn one worker and wait until it is READY; raise SpawnError if it fails.

        The worker is in the pool list from the start (as SPAWNING, so it gets
        no traffic) and becomes routable the moment it is ready.
        """
        cfg = self.cfg
        number = self._next_number
        self._next_number += 1
        now = self.loop.time()
        w = Worker(number, generation, "", "", now)
        self._spawning += 1
        try:
            try:
                w.release = spawner.resolve_release(cfg.root)
                spawner.app_runtime_dir(cfg, self.runtime_dir)
                w.address = spawner.worker_address(cfg, number, self.runtime_dir)
            except spawner.SpawnError as exc:
                w.state = WorkerState.EXITED
                self._spawn_failed(w, str(exc), for_maintain)
                raise
            self.workers.append(w)
            try:
                proc = await spawner.start(cfg, w, self.log)
            except spawner.SpawnError as exc:
                w.transition(WorkerState.EXITED)
                self._drop(w)
                self._spawn_failed(w, str(exc), for_maintain)
                raise
            self.log.info(
                "worker spawned", pid=w.pid, worker=number, release=w.release, generation=generation
            )
            self.task(self.watch(w, proc))
            try:
                await spawner.wait_ready(cfg, w, proc)
            except spawner.SpawnError as exc:
                if w.retiring:
                    raise  # stopped on purpose (scale down, shutdown): not a failure
                if w.state is WorkerState.SPAWNING:
                    await spawner.stop(w, cfg.stop_signal, min(cfg.stop_timeout, 5.0), self.log)
                    await proc.wait()
                # Let the output readers catch the last lines before reporting.
                await asyncio.sleep(0)
                self._spawn_failed(w, str(exc), for_maintain)
                raise
            if w.state is not WorkerState.SPAWNING or w.retiring or self.stopping:
                raise spawner.SpawnError("stopped before it became ready")
            w.transition(WorkerState.READY)
            w.last_used = self.loop.time()
            self.failures = 0
            self.spawn_error = None
            self.router.failing = False
            self.log.info(
                "worker ready", pid=w.pid, worker=number, boot_s=round(self.loop.time() - now, 3)
            )
            self.router.serve_queue()
            return w
        finally:
            self._spawning -= 1

    def _spawn_failed(self, w: Worker, reason: str, for_maintain: bool) -> None:
        if for_maintain and not any(x.state is WorkerState.READY for x in self.workers):
            self.router.set_failing(True)
        self.spawn_failures_total += 1
        self.failures += 1
        delay = min(BACKOFF_START * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.backoff_until = self.loop.time() + delay
        self.spawn_error = {
            "release": w.release,
            "reason": reason,
            "output": list(w.output),
            "at": now_iso(),
            "failures": self.failures,
            "retry_in_s": round(delay, 3),
        }
        self.log.error(
            "worker failed to start",
            pid=w.pid or None,
            reason=reason,
            failures=self.failures,
            retry_in_s=delay,
            output=list(w.output)[-5:],
        )
        if for_maintain:
            self._arm_backoff()

    async def watch(self, w: Worker, proc: Any) -> None:
        """Wait for the process to exit (no SIGCHLD: uvloop owns it) and react."""
        code = await proc.wait()
        w.exit_status = code
        was = w.state
        if was is not WorkerState.EXITED:
            w.transition(WorkerState.EXITED)
        self._drop(w)
        spawner.cleanup_socket(w)
        if was in (WorkerState.READY, WorkerState.DRAINING):
            uptime = self.loop.time() - w.started_at
            level = self.log.warning if code != -9 else self.log.error
            level(
                "worker exited unexpectedly",
                pid=w.pid,
                status=spawner.describe_exit(code),
                uptime_s=round(uptime, 3),
                hint="SIGKILL: out of memory?" if code == -9 else None,
            )
            rollout = self.rollout
            if (
                rollout is not None
                and w.generation == rollout.generation
                and uptime < STABLE_AFTER
                and self.cfg.resist_deployment_errors
            ):
                # A new-release worker that passed the readiness check and died
                # at once (gunicorn accepts before importing the app) is a
                # broken release: stop the rollout before more old workers go.
                self._spawn_failed(
                    w,
                    f"new worker exited {uptime:.1f}s after it was ready "
                    f"(status {spawner.describe_exit(code)})",
                    False,
                )
                rollout.broken(str(self.spawn_error["reason"] if self.spawn_error else ""))
            elif uptime < STABLE_AFTER:
                self._spawn_failed(
                    w,
                    f"crashed after {uptime:.1f}s with status {spawner.describe_exit(code)}",
                    True,
                )
            self._fail_inflight(w)
            self._crashed_slots.append(w.restarts + 1)
            self.maintain()
        elif was is WorkerState.STOPPING:
            self.log.info("worker exited", pid=w.pid, status=spawner.describe_exit(code))

    def _drop(self, w: Worker) -> None:
        with contextlib.suppress(ValueError):
            self.workers.remove(w)
        self.router.retire_idle(w)

    def _fail_inflight(self, w: Worker) -> None:
        # Requests still connecting to the dead worker were never sent: they go
        # to another worker (SPEC section 6). Those on a connection fail when
        # that connection reports the loss.
        for req in [r for r in self.router.active if r.worker is w and r.upstream is None]:
            self.router.retry_elsewhere(req)

    # -- retiring ---------------------------------------------------------------------

    async def drain(self, w: Worker, timeout: float) -> bool:
        """Stop routing to ``w`` and wait for its in-flight requests; True if it emptied."""
        if w.state is WorkerState.READY:
            w.transition(WorkerState.DRAINING)
        self.router.retire_idle(w)
        deadline = self.loop.time() + timeout
        while w.inflight > 0 and w.state is WorkerState.DRAINING:
            if self.loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        # Connections returned during the drain were closed by park(); sweep again.
        self.router.retire_idle(w)
        return True

    async def retire(self, w: Worker, *, drain: bool = True) -> None:
        """Drain ``w`` (at most drain_timeout), then stop it (SPEC §2 "Stop")."""
        cfg = self.cfg
        if drain and w.state in (WorkerState.READY, WorkerState.DRAINING):
            emptied = await self.drain(w, cfg.drain_timeout)
            if not emptied:
                self.log.warning(
                    "drain timeout: cutting in-flight requests", pid=w.pid, inflight=w.inflight
                )
                for req in [r for r in self.router.active if r.worker is w]:
                    req.conn.fail_request(req, 502, "worker stopped (drain_timeout)")
        if w.state is WorkerState.EXITED:
            return
        await spawner.stop(w, cfg.stop_signal, cfg.stop_timeout, self.log)
        if w.proc is not None:
            await w.proc.wait()
        self._drop(w)

    def replace_worker(self, w: Worker, reason: str, *, drain: bool = True) -> None:
        """Replace one worker (max_requests, memory_limit, max_request_time).

        Graceful (``drain``): the replacement is ready before ``w`` stops
        taking requests. Otherwise ``w`` is stopped at once (it is stuck) and
        the count is refilled.
        """
        if w.state is not WorkerState.READY or w in self._replacing or self.stopping:
            return
        self._replacing.add(w)
        if not drain:
            # Stuck: out of routing now, before its slots come free.
            self.mark_retiring(w)
        self.log.warning("replacing worker", pid=w.pid, reason=reason)
        self.task(self._replace(w, drain))

    async def _replace(self, w: Worker, drain: bool) -> None:
        try:
            if drain:
                if self.rollout is None:
                    with contextlib.suppress(spawner.SpawnError):
                        await self.spawn_ready(self.generation)
                await self.retire(w)
            else:
                if w.state is WorkerState.READY:
                    w.transition(WorkerState.DRAINING)
                await self.retire(w, drain=False)
        finally:
            self._replacing.discard(w)
            self.maintain()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the initial workers."""
        self.log.info("app starting", workers=self.target, root=self.cfg.root)
        self.maintain()

    def apply_config(self, cfg: AppConfig) -> None:
        """Use ``cfg`` for the next spawns and for routing (after a reload)."""
        self.cfg = cfg
        self.target = cfg.workers
        self.router.configure(
            concurrency=cfg.worker_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout=cfg.queue_timeout,
            health_path=cfg.health_path,
            max_request_time=cfg.max_request_time,
        )
        self.router.max_requests = cfg.max_requests
        if self.rollout is not None:
            self.rollout.target_changed()
        self.maintain()

    async def wait_all_ready(self) -> None:
        """Return when the target count of workers is ready (for sd_notify READY)."""
        while sum(1 for w in self.workers if w.state is WorkerState.READY) < self.target:
            await asyncio.sleep(0.02)

    async def stop(self, *, graceful: bool) -> None:
        """Stop every worker: drain first when graceful."""
        self.stopping = True
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
        if self.rollout is not None:
            self.rollout.abort("daemon stopping")
        workers = list(self.workers)
        if graceful:
            await asyncio.gather(*(self.retire(w) for w in workers))
        else:
            sig = self.cfg.stop_signal
            timeout = min(self.cfg.stop_timeout, 2.0)
            await asyncio.gather(*(spawner.stop(w, sig, timeout, self.log) for w in workers))
        for w in workers:
            if w.proc is not None:
                await w.proc.wait()
            spawner.cleanup_socket(w)
        # Output readers and watchers end with the processes.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for t in pending:
            t.cancel()
