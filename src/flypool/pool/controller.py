"""The pool controller: one per app, the only code that decides what its workers do.

Theory of operation
-------------------
The controller is a level-triggered reconcile loop (a Kubernetes
controller; an OTP supervisor for ownership and restart intensity)::

    events ──poke()──▶ reconcile():  view = what the workers are now
      spawned, ready,                 decision = plan.decide(view)
      exited, slot freed,             carry it out (spawn / drain / stop)
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
- **Actions** are carried out by :class:`~flypool.pool.processes.Processes`
  (spawn, drain, stop, SIGKILL timers, exit classification, crash-loop
  backoff), which pokes back whenever a worker changes state.

The spawn step is one call, ``launcher.start`` (:class:`spawner.Launcher`):
a preloader replaces the cold fork+exec by assigning ``controller.launcher``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flypool.config import AppConfig
from flypool.pool import memory, spawner
from flypool.pool.canary import CanaryPlan, policy_of
from flypool.pool.elastic import Elastic
from flypool.pool.plans import RESTART_PLANS, Plan, RestartPlan, SteadyPlan, StopPlan, View
from flypool.pool.processes import Failure, Processes, RouterPort, now_iso
from flypool.pool.spawner import Launcher
from flypool.pool.stuck_stack import HeldRequest, Stuck
from flypool.pool.worker import Event, Worker, WorkerState

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["Controller", "Failure", "RouterPort", "now_iso"]

# A new-release worker dying sooner than this after ready breaks a restart
# (gunicorn accepts before it imports the app).
PROBATION_S = 5.0
# How often the elastic pool looks at the queue and at idle workers.
ELASTIC_TICK_S = 0.25

_S = WorkerState


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
        self.log = log
        self.router = router
        # Shared with the router, which reads it to route; only we change it.
        self.workers = workers
        self.procs = Processes(
            cfg,
            loop,
            runtime_dir,
            log,
            router,
            workers,
            launcher or spawner.ColdLauncher(),
            self,
        )
        # -- desired state
        self.target = cfg.workers
        self.generation = 0
        self._restart: RestartPlan | None = None
        self._stop_plan: StopPlan | None = None
        self.steady = SteadyPlan()
        self.elastic = Elastic(cfg.workers, cfg.max_workers, cfg.worker_idle_time)
        # A USR2 hand-over is collecting state: no new spawns.
        self._frozen = False
        self._watch()
        # -- bookkeeping
        self.restart_seq = 0
        self.deployment_error: Failure | None = None
        self.last_restart: dict[str, Any] | None = None
        self.restarts_total = 0
        self.restart_durations: list[float] = []
        # -- loop plumbing
        self._scheduled = False
        # Nothing is decided before start(): a USR2 hand-over adopts first.
        self._started = False
        self._waiters: list[asyncio.Future[None]] = []
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._elastic_timer: asyncio.TimerHandle | None = None
        self._wake_timer: asyncio.TimerHandle | None = None
        self.canary_decisions = {"promote": 0, "rollback": 0}
        self._stopped: asyncio.Future[None] = loop.create_future()

    @property
    def launcher(self) -> Launcher:
        """The spawn step (cold fork+exec by default; a preloader may replace it)."""
        return self.procs.launcher

    @launcher.setter
    def launcher(self, launcher: Launcher) -> None:
        self.procs.launcher = launcher

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

    def request_restart(
        self, mode: str | None, reason: str, options: Mapping[str, Any] | None = None
    ) -> int:
        """Restart every worker, or fold the request into the running restart.

        Synchronous on purpose: the plan is in place before this returns, so
        a second request in the same loop turn supersedes it instead of
        starting another (PITFALLS: "two triggers in one loop turn").
        ``mode`` names a plan in ``RESTART_PLANS``; ``options`` are passed to
        its constructor as keywords (a canary plan's ``canary=N``).
        """
        self.restart_seq += 1
        rid = self.restart_seq
        if self.stop_plan is not None:
            return rid
        cfg = self.cfg
        if mode is None:
            mode = "rolling" if cfg.rolling_restarts else "blocking"
        opts = dict(options or {})
        canary = opts.pop("canary", None)
        if canary is None:
            canary = cfg.canary
        if mode in ("rolling", "canary") and canary > 0:
            mode = "canary"
            opts["canary"] = canary
            opts["policy"] = policy_of(
                cfg.canary_requests,
                cfg.canary_timeout,
                cfg.canary_max_error_rate,
                cfg.canary_max_latency_ratio,
            )
        elif mode == "canary":
            mode = "rolling"
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
            **opts,
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

    def stuck(self, w: Worker, reason: str, requests: Sequence[HeldRequest] = ()) -> None:
        """``w`` is stuck (max_request_time): out of routing, its stack logged, then signalled.

        ``requests`` are the ones it is stuck on (named in the stack event).
        """
        if w.state not in (_S.READY, _S.DRAINING):
            return
        self.log.warning("replacing worker", pid=w.pid, reason=reason)
        if w.state is _S.READY:
            w.transition(Event.DRAIN)
        self.procs.stop(w, Stuck(reason, tuple(requests)))
        self.poke()

    # The three settings below decide what the router reports on the request
    # path (Router.watch): setting them is the only way to change them, so
    # the router never calls into this interpreted code when nothing listens.

    @property
    def restart(self) -> RestartPlan | None:
        """The running restart (rolling, blocking or canary), if any."""
        return self._restart

    @restart.setter
    def restart(self, plan: RestartPlan | None) -> None:
        self._restart = plan
        self._watch()

    @property
    def stop_plan(self) -> StopPlan | None:
        """Set once the daemon stops this app."""
        return self._stop_plan

    @stop_plan.setter
    def stop_plan(self, plan: StopPlan | None) -> None:
        self._stop_plan = plan
        self._watch()

    @property
    def frozen(self) -> bool:
        """True while a USR2 hand-over collects the state (no new spawns)."""
        return self._frozen

    @frozen.setter
    def frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        self._watch()

    def _watch(self) -> None:
        # Every slot given back matters while stopping or handing over (the
        # last one ends the wait); otherwise only a leaving worker's (its
        # drain). Request outcomes matter only to a restart (a canary's judge).
        self.router.watch(
            every_slot=self._stop_plan is not None or self._frozen,
            outcomes=self._restart is not None,
        )

    def slot_freed(self, w: Worker) -> None:
        """A request gave ``w``'s slot back (the router calls it as :meth:`_watch` says)."""
        if (w.state is _S.DRAINING and not w.inflight) or self.stop_plan or self.frozen:
            self.poke()

    def request_done(self, w: Worker, status: int, seconds: float, failed: bool) -> None:
        """A request ``w`` took has finished or failed (the canary judges on these)."""
        plan = self.restart
        if plan is not None and plan.on_request_done(w, status, seconds, failed):
            self.poke()

    def end_canary(self, outcome: str) -> bool:
        """``flypool promote`` / ``rollback``: end a running canary now; False if none runs."""
        plan = self.restart
        if not isinstance(plan, CanaryPlan) or plan.outcome is not None:
            return False
        # Logged with its numbers when carried out (reconcile / _restart_finished).
        plan.end(outcome, "operator")
        self.poke()
        return True

    def apply_config(self, cfg: AppConfig) -> None:
        """Use ``cfg`` for the next spawns and decisions (after a reload)."""
        self.cfg = cfg
        self.procs.cfg = cfg
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
            self.procs.hurry()
            self.poke()
            return
        self.stop_plan = StopPlan(graceful=graceful, deadline=deadline)
        if self.restart is not None:
            self.restart.aborted = "daemon stopping"
            self._restart_finished(self.restart)
        for timer in (self._backoff_timer, self._elastic_timer, self._wake_timer):
            if timer is not None:
                timer.cancel()
        self._backoff_timer = self._elastic_timer = self._wake_timer = None
        if graceful:
            self.procs.cap_drains(deadline)
        else:
            self.procs.hurry()
        self.poke()

    async def wait_stopped(self) -> None:
        """Return when every worker process has exited after :meth:`stop`."""
        await asyncio.shield(self._stopped)
        await self.procs.wait_tasks(2.0)

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
        procs = self.procs
        procs.progress_drains(now)
        view = self._view(now)
        plan = self.plan
        d = plan.decide(view)
        nxt = plan.successor()
        if nxt is not None and isinstance(nxt, RestartPlan) and plan is self.restart:
            if isinstance(plan, CanaryPlan):
                self.canary_decisions["promote"] += 1
                self.log.info(
                    "canary promoted",
                    decided_by=plan.decided_by,
                    **plan.window.status(plan.verdict),
                )
            self.replace_plan(nxt)
            return
        wake = plan.wake_at(now)
        if wake is not None and self._wake_timer is None:
            self._wake_timer = self.loop.call_at(wake, self._wake)
        for w in d.stop:
            procs.stop(w)
        for w in d.drain:
            procs.drain(w, now, d.drain_deadline, plan.kind)
        if plan is self.restart and any(w.state is _S.STOPPING for w in d.drain):
            # An idle worker drained now was signalled at once: the next spawn
            # may overlap its exit (plans.RollingPlan), so look again.
            self.poke()
        if d.spawn and not self.frozen:
            for _ in range(d.spawn):
                if not procs.spawn(self.generation, now, extra=self._next_is_extra()):
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
            self._elastic(view)
            # Nothing can serve while spawns keep failing: queued requests get
            # 503 at once instead of 504 after queue_timeout.
            if procs.failures and not view.ready:
                self.router.set_failing(True)

    def _view(self, now: float) -> View:
        v = View(
            now=now,
            target=self.target,
            generation=self.generation,
            workers=list(self.workers),
            spawn_limit=self.procs.spawn_limit(now),
            queued=len(self.router.queue),
        )
        plan = self.restart
        # The memory budget decides an "auto" restart's spawns, and whether
        # any restart's next spawn may overlap an old worker's exit. A few
        # small file reads, only at a reconcile during a restart (never on
        # the request path), and with a fixed batch only while one exits.
        if plan is not None and (plan.by_memory or v.exiting):
            v.memory_room = memory.available_memory() - self.cfg.memory_reserve
        return v

    def _wake(self) -> None:
        self._wake_timer = None
        self.poke()

    def _arm_backoff(self, now: float, view: View) -> None:
        until = self.procs.backoff_until
        if self._backoff_timer is not None or now >= until:
            return
        if view.live >= self.target and self.restart is None:
            return

        def fire() -> None:
            self._backoff_timer = None
            self.poke()

        self._backoff_timer = self.loop.call_at(until, fire)

    # ------------------------------------------------------------------ reports from Processes

    def boot_failed(self, w: Worker, reason: str) -> None:
        """A worker failed to start: a restart of its generation hears of it."""
        plan = self.restart
        if plan is not None and w.generation == plan.generation:
            plan.spawn_failed(w, reason)

    def died_young(self, w: Worker, served: float, reason: str) -> None:
        """A worker that served died; a new-release one on probation breaks its restart."""
        plan = self.restart
        if plan is not None and w.generation == plan.generation and served < PROBATION_S:
            self.procs.last_failure = Failure(w.release, reason, w.output, now_iso())
            plan.died_on_probation(w, reason)

    def worker_ready(self, w: Worker) -> None:
        """A worker passed its probe: its RSS counts towards the restart's peak."""
        self.sampled()

    def fast(self) -> bool:
        """The daemon is stopping fast."""
        return self.stop_plan is not None and not self.stop_plan.graceful

    # ------------------------------------------------------------------ restarts

    def _restart_finished(self, plan: RestartPlan) -> None:
        if self.restart is not plan:
            return
        self.restart = None
        now = self.loop.time()
        duration = now - plan.started
        ok = plan.aborted is None
        outcome = "completed" if ok else "aborted"
        if plan.rolled_back is not None:
            outcome = "rolled_back"
        self.last_restart = {
            "id": plan.ids[-1],
            "mode": "rolling" if plan.kind == "canary" else plan.kind,
            "outcome": outcome,
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
        stopping = plan.aborted == "daemon stopping"
        if plan.aborted is not None and not stopping:
            # Old workers whose drain has not reached the stop signal serve again.
            for w in self.workers:
                if w.state is _S.DRAINING and w.generation < plan.generation:
                    self.procs.undrain(w)
        failure = self.procs.last_failure
        if plan.rolled_back is not None and not stopping:
            # The canary served but was judged worse than the old generation.
            self.deployment_error = Failure(
                plan.failed_release, plan.rolled_back, deque(), now_iso()
            )
            self.canary_decisions["rollback"] += 1
            fields = plan.window.status(plan.verdict) if isinstance(plan, CanaryPlan) else {}
            self.log.error(
                "canary rolled back",
                reason=plan.rolled_back,
                release=plan.failed_release,
                decided_by=plan.decided_by if isinstance(plan, CanaryPlan) else "",
                **fields,
            )
        elif plan.failures and failure is not None and not stopping:
            self.deployment_error = Failure(
                failure.release, plan.last_failure or failure.reason, failure.output, failure.at
            )
            if plan.resist:
                # The old workers are fine: the failed spawn is a deployment
                # error, not a crash loop, so no backoff applies to them.
                self.procs.forgive()
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

    def _next_is_extra(self) -> bool:
        el = self.elastic
        if not el.enabled:
            return False
        return sum(1 for x in self.workers if x.live and not x.extra) >= el.floor

    def _elastic(self, view: View) -> None:
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
        if self._elastic_timer is None:
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
            spawning + (1 if self.procs.failures else 0),
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
        return self.procs.unborn()
