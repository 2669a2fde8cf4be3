"""The pool controller: one per app, the only code that starts or stops its workers.

Theory of operation
-------------------
The controller is a level-triggered reconcile loop (a Kubernetes
controller; an OTP supervisor for ownership and restart intensity)::

    events ──poke()──▶ reconcile():  view = what the workers are now
      spawned, ready,                 decision = plan.decide(view)
      exited, request done,           carry it out (spawn / drain / stop)
      restart, scale, timers          finished? → the next plan

- **Desired state**: ``target`` (the worker count; scale, TTIN/TTOU and the
  elastic pool change it), ``generation`` (bumped by every restart request),
  the current plan (:mod:`flypool.pool.plans`: steady, rolling, blocking,
  stop; a canary plan plugs in the same way) and the router's drained flag.
- **Observed state**: ``workers``, each in a state of the table in
  :mod:`flypool.pool.worker`.
- **Events only say "look again"** (:meth:`Controller.poke` schedules one
  reconcile with ``call_soon``; many pokes in one turn are one reconcile).
  No event carries a decision, so an event seen twice, or two restart
  requests in one loop turn, cannot start two of anything: a restart request
  only bumps the generation and swaps the plan, synchronously.
- **Actions are idempotent and immediate**: a worker to drain goes
  ``ready → draining`` at once (the balancer skips it from then on); a
  draining worker whose in-flight count reaches zero (the router's
  request-done hook pokes) or whose ``drain_timeout`` passes (a timer
  pokes) is signalled; SIGKILL follows after ``stop_timeout`` (a timer). A
  worker retired before its process exists is ``stopping`` with pid 0, and
  the spawn step signals the process as soon as it has one.
- **Crashes**: a worker that dies before ready, or less than
  :data:`CRASH_LOOP_S` after it, is a failed boot: exponential backoff
  (1 s, 2 s, 4 s … 60 s) and one probe spawn at a time. A worker that served
  longer and dies is replaced at once.

The spawn step is one call, ``launcher.start`` (:class:`spawner.Launcher`):
a preloader replaces the cold fork+exec by assigning another launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from collections import deque
from collections.abc import Coroutine, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from flypool.config import AppConfig
from flypool.pool import memory, spawner
from flypool.pool.elastic import Elastic
from flypool.pool.plans import (
    RESTART_PLANS,
    UNLIMITED,
    Plan,
    RestartPlan,
    SteadyPlan,
    StopPlan,
    View,
)
from flypool.pool.spawner import Launcher, ProcessHandle, SpawnError
from flypool.pool.worker import Event, Worker, WorkerState

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# Dying sooner than this after getting ready is a failed boot (crash loop).
CRASH_LOOP_S = 1.0
# A new-release worker dying sooner than this after ready breaks a restart
# (gunicorn accepts before it imports the app).
PROBATION_S = 5.0
# Fast stop: SIGKILL at most this long after the stop signal.
FAST_STOP_S = 2.0
# How often the elastic pool looks at the queue and at idle workers.
ELASTIC_TICK_S = 0.25

_S = WorkerState


def now_iso() -> str:
    """Wall-clock time for status and logs."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RouterPort(Protocol):
    """What the controller needs of the app's router (flypool.pool.app.PoolRouter)."""

    @property
    def queue(self) -> Sized:
        """Requests waiting for a worker."""

    @property
    def max_queue(self) -> int:
        """The queue's capacity."""

    def retire_idle(self, w: Worker) -> None:
        """Close ``w``'s pooled idle upstream connections."""

    def serve_queue(self) -> None:
        """Hand queued requests to workers with free slots."""

    def set_failing(self, failing: bool) -> None:
        """Enter or leave "no worker can serve" (queued requests get 503)."""

    def fail_worker(self, w: Worker, status: int, detail: str) -> None:
        """Fail the requests in flight on ``w``."""

    def reroute_connecting(self, w: Worker) -> None:
        """Send requests still connecting to the dead ``w`` elsewhere."""


@dataclass
class Failure:
    """A worker that did not start (or died at once): status and deployment errors."""

    release: str
    reason: str
    # The worker's own deque: lines that arrive after the exit still show.
    output: deque[str]
    at: str
    failures: int = 0
    retry_in_s: float = 0.0

    def as_dict(self, *, backoff: bool) -> dict[str, Any]:
        """The JSON form used in status (SPEC §8)."""
        out: dict[str, Any] = {
            "release": self.release,
            "reason": self.reason,
            "output": list(self.output),
            "at": self.at,
        }
        if backoff:
            out["failures"] = self.failures
            out["retry_in_s"] = self.retry_in_s
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Failure:
        """Back from status/hand-over JSON."""
        return cls(
            d.get("release", ""),
            d.get("reason", ""),
            deque(d.get("output", [])),
            d.get("at", ""),
            int(d.get("failures", 0)),
            float(d.get("retry_in_s", 0.0)),
        )


class Controller:
    """Owns the workers of one app and reconciles them with the desired state."""

    def __init__(
        self,
        cfg: AppConfig,
        loop: asyncio.AbstractEventLoop,
        runtime_dir: str,
        log: FilteringBoundLogger,
        router: RouterPort,
        workers: list[Worker],
        launcher: Launcher | None = None,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.log = log
        self.router = router
        # Shared with the router, which reads it to route; only we change it.
        self.workers = workers
        self.launcher: Launcher = launcher or spawner.ColdLauncher()
        # -- desired state
        self.target = cfg.workers
        self.generation = 0
        self.restart: RestartPlan | None = None
        self.stop_plan: StopPlan | None = None
        self.steady = SteadyPlan()
        self.elastic = Elastic(cfg.workers, cfg.max_workers, cfg.worker_idle_time)
        # A USR2 hand-over is collecting state: no new spawns.
        self.frozen = False
        # -- bookkeeping
        self.next_number = 1
        self.restart_seq = 0
        self.failures = 0
        self.backoff_until = 0.0
        self.spawn_error: Failure | None = None
        self.last_failure: Failure | None = None
        self.deployment_error: Failure | None = None
        self.last_restart: dict[str, Any] | None = None
        self.restarts_total = 0
        self.restart_durations: list[float] = []
        self.spawn_failures_total = 0
        self.crashes_total = 0
        # Restart counts of crashed workers, inherited by their replacements.
        self._crashed: list[int] = []
        # -- loop plumbing
        self._scheduled = False
        # Nothing is decided before start(): a USR2 hand-over adopts first.
        self._started = False
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._elastic_timer: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Future[None] = loop.create_future()

    # ------------------------------------------------------------------ events

    def poke(self) -> None:
        """Something changed: reconcile once, soon (coalesced within a loop turn)."""
        if not self._scheduled and self._started:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        try:
            self.reconcile()
        except Exception:
            # A bug here must not leave the pool unsupervised: log, look again later.
            self.log.exception("pool controller error")
            self.loop.call_later(0.5, self.poke)
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def changed(self) -> None:
        """Return after the next reconcile."""
        # Every change of state pokes, so a waiter is never left hanging.
        f: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(f)
        await f

    def start(self) -> None:
        """Spawn the initial workers."""
        self.log.info("app starting", workers=self.target, root=self.cfg.root)
        self._started = True
        self.poke()

    def request_restart(self, mode: str | None, reason: str) -> int:
        """Restart every worker, or fold the request into the running restart.

        Synchronous on purpose: the plan is in place before this returns, so
        a second request in the same loop turn supersedes it instead of
        starting another (PITFALLS: "two triggers in one loop turn").
        """
        self.restart_seq += 1
        rid = self.restart_seq
        if self.stop_plan is not None:
            return rid
        cfg = self.cfg
        if mode is None:
            mode = "rolling" if cfg.rolling_restarts else "blocking"
        now = self.loop.time()
        self.generation += 1
        old = [w for w in self.workers if w.live and w.generation < self.generation]
        largest = max((w.rss_bytes for w in old), default=0)
        by_memory = cfg.restart_batch == "auto"
        if by_memory:
            batch = memory.auto_batch(
                memory.available_memory(), cfg.memory_reserve, largest, max(1, self.target)
            )
        else:
            batch = int(cfg.restart_batch)
        plan = RESTART_PLANS[mode](
            generation=self.generation,
            restart_id=rid,
            reason=reason,
            started=now,
            total=len(old),
            batch=batch,
            by_memory=by_memory,
            resist=cfg.resist_deployment_errors,
        )
        plan.est_rss = largest
        plan.peak_rss = self._total_rss()
        prev = self.restart
        if prev is not None:
            plan.take_over(prev)
            self.log.info(
                "restart superseded",
                restart_id=rid,
                mode=mode,
                generation=self.generation,
                reason=reason,
            )
        else:
            self.log.info(
                "restart begin",
                restart_id=rid,
                mode=mode,
                generation=self.generation,
                total=len(old),
                batch=batch,
                reason=reason,
            )
        self.restart = plan
        self.poke()
        return rid

    def replace_plan(self, plan: RestartPlan) -> None:
        """Swap the running restart for ``plan`` (a canary promoted to rolling)."""
        if self.restart is not None:
            plan.take_over(self.restart)
        self.restart = plan
        self.poke()

    def scale(self, n: int) -> None:
        """Change the worker count live (scale, TTIN/TTOU); the floor of an elastic pool."""
        n = max(1, n)
        self.target = n
        el = self.elastic
        if el.enabled:
            el.configure(n, max(el.ceiling, n), el.idle_time)
        self.log.info("scale", workers=n)
        self.poke()

    def replace(self, w: Worker, reason: str) -> None:
        """Replace ``w`` gracefully (max_requests, memory_limit): spawn first, then drain it."""
        if w.state is not _S.READY or w.replace_reason is not None or self.stop_plan is not None:
            return
        w.replace_reason = reason
        self.log.warning("replacing worker", pid=w.pid, reason=reason)
        self.poke()

    def stuck(self, w: Worker, reason: str) -> None:
        """``w`` is stuck (max_request_time): out of routing and signalled now."""
        if w.state not in (_S.READY, _S.DRAINING):
            return
        self.log.warning("replacing worker", pid=w.pid, reason=reason)
        if w.state is _S.READY:
            w.transition(Event.DRAIN)
        self._stop(w)
        self.poke()

    def slot_freed(self, w: Worker) -> None:
        """A request gave ``w``'s slot back; called for every request (keep cheap)."""
        if (w.state is _S.DRAINING and not w.inflight) or self.stop_plan or self.frozen:
            self.poke()

    def request_done(self, w: Worker, status: int, seconds: float, failed: bool) -> None:
        """A request ``w`` took has finished or failed (the canary judges on these)."""
        plan = self.restart
        if plan is not None:
            plan.on_request_done(w, status, seconds, failed)

    def apply_config(self, cfg: AppConfig) -> None:
        """Use ``cfg`` for the next spawns and decisions (after a reload)."""
        self.cfg = cfg
        self.target = cfg.workers
        self.elastic.configure(cfg.workers, cfg.max_workers, cfg.worker_idle_time)
        self.poke()

    def sampled(self) -> None:
        """The resource sampler updated every worker's RSS."""
        if self.restart is not None:
            self.restart.peak_rss = max(self.restart.peak_rss, self._total_rss())

    def stop(self, *, graceful: bool, deadline: float) -> None:
        """Stop every worker: graceful drains until ``deadline``; fast stops now."""
        plan = self.stop_plan
        if plan is not None:
            if graceful or not plan.graceful:
                return
            plan.graceful = False
            self._hurry()
            self.poke()
            return
        self.stop_plan = StopPlan(graceful=graceful, deadline=deadline)
        if self.restart is not None:
            self.restart.aborted = "daemon stopping"
            self._restart_finished(self.restart)
        for timer in (self._backoff_timer, self._elastic_timer):
            if timer is not None:
                timer.cancel()
        self._backoff_timer = self._elastic_timer = None
        if not graceful:
            self._hurry()
        self.poke()

    async def wait_stopped(self) -> None:
        """Return when every worker process has exited after :meth:`stop`."""
        await asyncio.shield(self._stopped)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for t in pending:
            t.cancel()

    async def settled(self) -> None:
        """Return once no restart runs and ``target`` workers are ready (sd_notify)."""
        while not (
            self.stop_plan is not None
            or (
                self.restart is None
                and sum(1 for w in self.workers if w.state is _S.READY) >= self.target
                and not any(w.state is _S.SPAWNING for w in self.workers)
            )
        ):
            await self.changed()

    async def restart_done(self, restart_id: int) -> None:
        """Return once a restart with an id of at least ``restart_id`` has ended."""
        while (
            self.stop_plan is None
            and (self.restart is not None or (self.last_restart or {}).get("id", 0) < restart_id)
            and self.restart_seq >= restart_id
        ):
            await self.changed()

    # ------------------------------------------------------------------ reconcile

    @property
    def plan(self) -> Plan:
        """The plan in charge now."""
        return self.stop_plan or self.restart or self.steady

    def reconcile(self) -> None:
        """Compare what is with what should be, and act on the difference."""
        now = self.loop.time()
        self._progress_leaving(now)
        view = self._view(now)
        plan = self.plan
        d = plan.decide(view)
        for w in d.stop:
            self._stop(w)
        for w in d.drain:
            self._drain(w, now, d.drain_deadline)
        if d.spawn and not self.frozen:
            for _ in range(d.spawn):
                if not self._spawn(now):
                    break
        if d.finished:
            if isinstance(plan, StopPlan):
                if not self._stopped.done():
                    self._stopped.set_result(None)
                return
            if isinstance(plan, RestartPlan):
                self._restart_finished(plan)
                self.poke()
        if self.stop_plan is None:
            self._arm_backoff(now, view)
            self._elastic(now, view)
            self._set_failing()

    def _view(self, now: float) -> View:
        limit = UNLIMITED
        if self.failures:
            if now < self.backoff_until:
                limit = 0
            else:
                # In a crash loop, probe with one worker at a time.
                limit = 0 if any(w.state is _S.SPAWNING for w in self.workers) else 1
        room = None
        if self.restart is not None and self.restart.by_memory:
            room = memory.available_memory() - self.cfg.memory_reserve
        return View(
            now=now,
            target=self.target,
            generation=self.generation,
            workers=list(self.workers),
            spawn_limit=limit,
            queued=len(self.router.queue),
            memory_room=room,
        )

    def _progress_leaving(self, now: float) -> None:
        """Draining workers that emptied, or ran out of drain_timeout, are signalled."""
        for w in self.workers:
            if w.state is not _S.DRAINING:
                continue
            if not w.inflight:
                self._stop(w)
            elif now >= w.deadline:
                self.log.warning(
                    "drain timeout: cutting in-flight requests", pid=w.pid, inflight=w.inflight
                )
                self.router.fail_worker(w, 502, "worker stopped (drain_timeout)")
                self._stop(w)

    def _arm_backoff(self, now: float, view: View) -> None:
        if self._backoff_timer is not None or now >= self.backoff_until:
            return
        if view.live >= self.target and self.restart is None:
            return

        def fire() -> None:
            self._backoff_timer = None
            self.poke()

        self._backoff_timer = self.loop.call_at(self.backoff_until, fire)

    def _set_failing(self) -> None:
        # Nothing can serve while spawns keep failing: queued requests get 503 at
        # once instead of 504 after queue_timeout.
        if self.failures and not any(w.state is _S.READY for w in self.workers):
            self.router.set_failing(True)

    # ------------------------------------------------------------------ actions

    def _spawn(self, now: float) -> bool:
        """Start one worker of the newest generation; False if it failed at once."""
        cfg = self.cfg
        number = self.next_number
        self.next_number += 1
        w = Worker(number, self.generation, "", "", now)
        w.attempt = self.failures
        try:
            w.release = spawner.resolve_release(cfg.root)
            spawner.app_runtime_dir(cfg, self.runtime_dir)
            w.address = spawner.worker_address(cfg, number, self.runtime_dir)
        except (SpawnError, OSError) as exc:
            w.transition(Event.EXIT)
            self._boot_failed(w, str(exc), now)
            return False
        if self.elastic.enabled:
            core = sum(1 for x in self.workers if x.live and not x.extra)
            w.extra = core >= self.elastic.floor
        if self._crashed:
            w.restarts = self._crashed.pop(0)
        self.workers.append(w)
        self._task(self._boot(w))
        return True

    async def _boot(self, w: Worker) -> None:
        """The spawn step: start the process, probe it, report ready or failure."""
        cfg = self.cfg
        try:
            proc = await self.launcher.start(cfg, w, self.log)
        except SpawnError as exc:
            wanted = w.state is _S.SPAWNING
            self._drop(w)
            if wanted:
                self._boot_failed(w, str(exc), self.loop.time())
            self.poke()
            return
        self._task(self._watch(w, proc))
        if w.state is not _S.SPAWNING:
            # Retired while its process was being created (TTIN then TTOU,
            # shutdown): it has a pid now, so it can be signalled.
            if w.state is _S.STOPPING and w.timer is None:
                self.log.info("worker retired while starting", pid=w.pid, worker=w.number)
                self._signal_stop(w)
            self.poke()
            return
        w.rss_bytes = memory.rss_of(w.pid)
        self.log.info(
            "worker spawned",
            pid=w.pid,
            worker=w.number,
            release=w.release,
            generation=w.generation,
            spawn=w.spawn,
        )
        self.poke()
        await self._probe(w, proc, None)

    async def _probe(self, w: Worker, proc: ProcessHandle, deadline: float | None) -> None:
        try:
            await spawner.wait_ready(self.cfg, w, proc, deadline)
        except SpawnError as exc:
            if w.state is not _S.SPAWNING or proc.returncode is not None:
                return  # stopped on purpose, or dead: _exited reports it
            self._boot_failed(w, str(exc), self.loop.time())
            self._stop(w)
            self.poke()
            return
        if w.state is not _S.SPAWNING:
            return
        now = self.loop.time()
        w.transition(Event.BOOTED)
        w.ready_at = now
        w.last_used = now
        # Known from the moment it is ready (SPEC §8), not at the next sample.
        w.rss_bytes = memory.rss_of(w.pid) or w.rss_bytes
        self.failures = 0
        self.spawn_error = None
        self.router.set_failing(False)
        self.log.info(
            "worker ready", pid=w.pid, worker=w.number, boot_s=round(now - w.started_at, 3)
        )
        self.sampled()
        self.router.serve_queue()
        self.poke()

    async def _watch(self, w: Worker, proc: ProcessHandle) -> None:
        """Wait for the exit (no SIGCHLD: uvloop owns it) and react."""
        code = await proc.wait()
        if w.state is _S.SPAWNING and w.pumps:
            # Its last output lines belong in the failure report.
            with contextlib.suppress(Exception):
                await asyncio.wait(w.pumps, timeout=0.5)
        self._exited(w, code)

    def _exited(self, w: Worker, code: int) -> None:
        now = self.loop.time()
        w.exit_status = code
        was = w.state
        self._drop(w)
        status = spawner.describe_exit(code)
        if was is _S.SPAWNING:
            self._boot_failed(w, f"exited with status {status} before it was ready", now)
        elif was in (_S.READY, _S.DRAINING):
            self.crashes_total += 1
            self.router.reroute_connecting(w)
            served = now - w.ready_at
            hint = "SIGKILL: out of memory?" if code == -signal.SIGKILL else None
            # Took traffic: a request finished there (last_used moved) or was in flight.
            took = w.processed or w.inflight or w.last_used > w.ready_at
            if served < CRASH_LOOP_S and not took:
                # Never served anything: a boot that failed late (crash loop).
                self._boot_failed(
                    w,
                    f"exited {served:.1f}s after it was ready (status {status})",
                    now,
                    event="worker failed right after ready",
                )
            else:
                level = self.log.error if code == -signal.SIGKILL else self.log.warning
                level(
                    "worker exited unexpectedly",
                    pid=w.pid,
                    status=status,
                    served_s=round(served, 3),
                    replaced="at once",
                    hint=hint,
                )
                plan = self.restart
                if plan is not None and w.generation == plan.generation and served < PROBATION_S:
                    reason = f"new worker exited {served:.1f}s after it was ready (status {status})"
                    self.last_failure = Failure(w.release, reason, w.output, now_iso())
                    plan.died_on_probation(w, reason)
            self._crashed.append(w.restarts + 1)
        elif was is _S.STOPPING:
            self.log.info("worker exited", pid=w.pid, status=status)
        self.poke()

    def _drop(self, w: Worker) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.state is not _S.EXITED:
            w.transition(Event.EXIT)
        with contextlib.suppress(ValueError):
            self.workers.remove(w)
        self.router.retire_idle(w)
        spawner.cleanup_socket(w)
        # Children of the worker that outlived it (same process group).
        if w.pid:
            spawner.signal_group(w.pid, signal.SIGKILL)

    def _boot_failed(
        self, w: Worker, reason: str, now: float, event: str = "worker failed to start"
    ) -> None:
        self.spawn_failures_total += 1
        self.failures = max(self.failures, w.attempt) + 1
        delay = min(BACKOFF_START * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.backoff_until = now + delay
        failure = Failure(w.release, reason, w.output, now_iso(), self.failures, delay)
        self.spawn_error = self.last_failure = failure
        self.log.error(
            event,
            pid=w.pid or None,
            reason=reason,
            failures=self.failures,
            retry_in_s=delay,
            output=list(w.output)[-5:],
        )
        plan = self.restart
        if plan is not None and w.generation == plan.generation:
            plan.spawn_failed(w, reason)

    def _drain(self, w: Worker, now: float, deadline: float | None) -> None:
        if not w.can(Event.DRAIN):
            return
        w.transition(Event.DRAIN)
        self.router.retire_idle(w)
        w.deadline = now + self.cfg.drain_timeout
        if deadline is not None:
            w.deadline = min(w.deadline, deadline)
        self.log.info(
            "draining worker",
            pid=w.pid,
            generation=w.generation,
            inflight=w.inflight,
            reason=w.replace_reason or self.plan.kind,
        )
        if not w.inflight:
            self._stop(w)
        else:
            w.timer = self.loop.call_at(w.deadline, self.poke)

    def _undrain(self, w: Worker) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.transition(Event.UNDRAIN)
        self.log.info("drain called off", pid=w.pid, generation=w.generation)
        self.router.serve_queue()

    def _stop(self, w: Worker) -> None:
        if not w.can(Event.STOP):
            return
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.transition(Event.STOP)
        self.router.retire_idle(w)
        if w.pid:
            self._signal_stop(w)

    def _signal_stop(self, w: Worker) -> None:
        sig = self.cfg.stop_signal
        timeout = self.cfg.stop_timeout
        if self.stop_plan is not None and not self.stop_plan.graceful:
            timeout = min(timeout, FAST_STOP_S)
        self.log.info("stopping worker", pid=w.pid, signal=signal.Signals(sig).name)
        spawner.signal_group(w.pid, sig)
        w.deadline = self.loop.time() + timeout
        w.timer = self.loop.call_at(w.deadline, self._kill, w)

    def _kill(self, w: Worker) -> None:
        w.timer = None
        if w.state is _S.STOPPING and w.pid:
            self.log.warning("worker ignored stop signal; killing", pid=w.pid)
            spawner.signal_group(w.pid, signal.SIGKILL)

    def _hurry(self) -> None:
        """Fast stop: every stop signal already sent is followed by SIGKILL soon."""
        now = self.loop.time()
        for w in self.workers:
            if w.state is _S.STOPPING and w.pid and w.deadline > now + FAST_STOP_S:
                if w.timer is not None:
                    w.timer.cancel()
                w.deadline = now + FAST_STOP_S
                w.timer = self.loop.call_at(w.deadline, self._kill, w)

    def _restart_finished(self, plan: RestartPlan) -> None:
        if self.restart is not plan:
            return
        self.restart = None
        now = self.loop.time()
        duration = now - plan.started
        ok = plan.aborted is None
        self.last_restart = {
            "id": plan.ids[-1],
            "mode": plan.kind,
            "outcome": "completed" if ok else "aborted",
            "reason": plan.aborted or plan.reason,
            "duration_s": round(duration, 3),
            "finished_at": now_iso(),
            "replaced": plan.done,
            "total": plan.total,
            "batch": plan.batch,
            "peak_rss_bytes": plan.peak_rss,
        }
        self.restarts_total += 1
        self.restart_durations.append(duration)
        if plan.aborted is not None and plan.aborted != "daemon stopping":
            # Old workers whose drain has not reached the stop signal serve again.
            for w in self.workers:
                if w.state is _S.DRAINING and w.generation < plan.generation:
                    self._undrain(w)
        failure = self.last_failure
        if plan.failures and failure is not None and plan.aborted != "daemon stopping":
            self.deployment_error = Failure(
                failure.release, plan.last_failure or failure.reason, failure.output, failure.at
            )
            if plan.resist:
                # The old workers are fine: the failed spawn is a deployment
                # error, not a crash loop, so no backoff applies to them.
                self.failures = 0
                self.backoff_until = 0.0
                self.spawn_error = None
            self.log.error(
                "restart aborted: new release failed to start"
                if plan.aborted
                else "restart completed, but new workers failed to start",
                reason=self.deployment_error.reason,
                release=self.deployment_error.release,
                output=list(self.deployment_error.output),
            )
        elif ok:
            self.deployment_error = None
        self.log.info(
            "restart end",
            outcome=self.last_restart["outcome"],
            duration_s=round(duration, 3),
            replaced=plan.done,
            batch=plan.batch,
            peak_rss_bytes=plan.peak_rss,
        )

    # ------------------------------------------------------------------ elastic pool

    def _elastic(self, now: float, view: View) -> None:
        el = self.elastic
        if not el.enabled:
            return
        if self.restart is None:
            # The first ``floor`` workers by spawn order are the core; the
            # rest are extras, last choice of the balancer on ties, so they
            # fall idle first when the load drops.
            live = sorted((w for w in self.workers if w.live), key=lambda w: w.number)
            for i, w in enumerate(live):
                w.extra = i >= el.floor
        if self._elastic_timer is None and (self.target > el.floor or self.target < el.ceiling):
            self._elastic_timer = self.loop.call_later(ELASTIC_TICK_S, self._elastic_tick)

    def _elastic_tick(self) -> None:
        self._elastic_timer = None
        if self.stop_plan is not None or self.frozen:
            return
        el = self.elastic
        now = self.loop.time()
        ready = [w for w in self.workers if w.state is _S.READY]
        spawning = sum(1 for w in self.workers if w.state is _S.SPAWNING)
        queued = len(self.router.queue)
        step = el.step(
            now,
            self.target,
            spawning + (1 if self.failures else 0),
            ready,
            queued,
            queued >= self.router.max_queue,
        )
        if step:
            total, slow = el.window.counts(now)
            self.target += step
            self.log.info(
                "elastic scale up" if step > 0 else "elastic scale down",
                step=step,
                workers=self.target,
                requests_5s=total,
                waited_over_100ms=slow,
                queued=queued,
            )
        self.poke()

    # ------------------------------------------------------------------ helpers

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _total_rss(self) -> int:
        return sum(w.rss_bytes for w in self.workers)

    def state_name(self) -> str:
        """One of starting, serving, restarting, deployment_error, stopping (SPEC §8)."""
        if self.stop_plan is not None:
            return "stopping"
        if self.restart is not None:
            return "restarting"
        if self.deployment_error is not None:
            return "deployment_error"
        if any(w.state is _S.READY for w in self.workers):
            return "serving"
        return "starting"

    # ------------------------------------------------------------------ USR2 hand-over

    def freeze(self) -> None:
        """Start no new process (a hand-over is collecting the state)."""
        self.frozen = True

    def thaw(self) -> None:
        """The hand-over failed: carry on."""
        self.frozen = False
        self.poke()

    def unborn(self) -> int:
        """Workers whose process is still being created (no pid yet)."""
        return sum(1 for w in self.workers if not w.pid)

    def adopt_worker(self, w: Worker, proc: ProcessHandle, start_deadline: float) -> None:
        """Take over a worker the previous image passed on, in whatever state it was."""
        w.proc = proc
        self.workers.append(w)
        self._task(self._watch(w, proc))
        if w.state is _S.SPAWNING:
            self._task(self._probe(w, proc, start_deadline))
        elif w.state is _S.DRAINING:
            w.timer = self.loop.call_at(w.deadline, self.poke)
        elif w.state is _S.STOPPING:
            w.timer = self.loop.call_at(w.deadline, self._kill, w)
        self.poke()

    def snapshot(self, now: float) -> dict[str, Any]:
        """Desired state and bookkeeping for the next image (workers go separately)."""
        plan = self.restart
        return {
            "target": self.target,
            "generation": self.generation,
            "next_number": self.next_number,
            "restart_seq": self.restart_seq,
            "last_restart": self.last_restart,
            "deployment_error": (
                self.deployment_error.as_dict(backoff=False) if self.deployment_error else None
            ),
            "restarts_total": self.restarts_total,
            "restart_durations": self.restart_durations[-100:],
            "spawn_failures_total": self.spawn_failures_total,
            "crashes_total": self.crashes_total,
            "failures": self.failures,
            "backoff_s": max(0.0, self.backoff_until - now),
            "elastic": {
                "floor": self.elastic.floor,
                "ceiling": self.elastic.ceiling,
                "ups": self.elastic.ups,
                "downs": self.elastic.downs,
            },
            "restart": plan_state(plan, now) if plan is not None else None,
        }

    def restore(self, st: dict[str, Any], now: float) -> None:
        """Take over the state :meth:`snapshot` wrote in the previous image."""
        self.target = st["target"]
        self.generation = st["generation"]
        self.next_number = st["next_number"]
        self.restart_seq = st["restart_seq"]
        self.last_restart = st["last_restart"]
        err = st.get("deployment_error")
        self.deployment_error = Failure.from_dict(err) if err else None
        self.restarts_total = st.get("restarts_total", 0)
        self.restart_durations = list(st.get("restart_durations", []))
        self.spawn_failures_total = st.get("spawn_failures_total", 0)
        self.crashes_total = st.get("crashes_total", 0)
        self.failures = st.get("failures", 0)
        self.backoff_until = now + st.get("backoff_s", 0.0)
        el = st.get("elastic") or {}
        if self.elastic.enabled and el:
            self.elastic.configure(el["floor"], el["ceiling"], self.elastic.idle_time)
            self.elastic.ups = el.get("ups", 0)
            self.elastic.downs = el.get("downs", 0)
        if st.get("restart"):
            self.restart = plan_from_state(st["restart"], now)


def plan_state(plan: RestartPlan, now: float) -> dict[str, Any]:
    """A running restart as JSON (USR2 passes it on)."""
    return {
        "kind": plan.kind,
        "generation": plan.generation,
        "ids": plan.ids,
        "reason": plan.reason,
        "age_s": now - plan.started,
        "total": plan.total,
        "done": plan.done,
        "batch": plan.batch,
        "by_memory": plan.by_memory,
        "resist": plan.resist,
        "aborted": plan.aborted,
        "failures": plan.failures,
        "skips": plan.skips,
        "last_failure": plan.last_failure,
        "est_rss": plan.est_rss,
        "peak_rss": plan.peak_rss,
    }


def plan_from_state(st: dict[str, Any], now: float) -> RestartPlan:
    """The restart :func:`plan_state` described, carrying on where it was."""
    plan = RESTART_PLANS[st["kind"]](
        generation=st["generation"],
        restart_id=st["ids"][-1],
        reason=st["reason"],
        started=now - st["age_s"],
        total=st["total"],
        batch=st["batch"],
        by_memory=st["by_memory"],
        resist=st["resist"],
    )
    plan.ids = list(st["ids"])
    plan.done = st["done"]
    plan.aborted = st["aborted"]
    plan.failures = st["failures"]
    plan.skips = st["skips"]
    plan.last_failure = st["last_failure"]
    plan.est_rss = st["est_rss"]
    plan.peak_rss = st["peak_rss"]
    return plan
