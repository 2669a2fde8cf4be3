"""The process side of the pool controller: start, probe, watch, drain and stop workers.

Theory of operation
-------------------
:class:`Processes` carries out the controller's decisions on real
processes and turns what the processes do back into events for it. It
decides nothing about *how many* workers there should be; it only knows how
to move one worker along the state table of :mod:`flypool.pool.worker`:

- ``spawn``: a SPAWNING worker is in the list at once (pid 0); the spawn
  step (``launcher.start``) creates the process; readiness is probed; on
  success the worker is READY. A worker retired while its process was being
  created (it is then STOPPING with pid 0) is signalled the moment it has a
  pid.
- ``drain``: out of routing, idle upstream connections closed; signalled
  as soon as its in-flight count is zero (the router reports every slot
  given back) or at its drain deadline, when its requests are cut.
- ``stop``: ``stop_signal`` to the process group, SIGKILL at
  ``stop_timeout`` (a timer, not a waiting task).
- an exit is watched with one task per worker awaiting the process (no
  SIGCHLD: uvloop owns it) and classified: a failed boot, a worker that
  died right after ready without serving (both crash-loop failures with
  exponential backoff), a worker that served and died (replaced at once),
  or a stop we asked for.

Every outcome ends in ``owner.poke()``: the controller looks again.
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
from flypool.exit_status import describe_exit
from flypool.pool import memory, spawner
from flypool.pool.plans import UNLIMITED
from flypool.pool.spawner import Launcher, ProcessHandle, SpawnError
from flypool.pool.stuck_stack import Stuck, log_stack
from flypool.pool.worker import Event, Worker, WorkerState

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# Dying sooner than this after getting ready, without having served, is a
# failed boot (crash loop).
CRASH_LOOP_S = 1.0
# Fast stop: SIGKILL at most this long after the stop signal.
FAST_STOP_S = 2.0

_S = WorkerState


def now_iso() -> str:
    """Wall-clock time for status and logs."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RouterPort(Protocol):
    """What the controller needs of the app's router (flypool.http.router.Router)."""

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

    def watch(self, *, every_slot: bool, outcomes: bool) -> None:
        """Which events of the request path to report to the pool's hooks."""


class Owner(Protocol):
    """What :class:`Processes` tells the controller."""

    def poke(self) -> None:
        """Something changed: look again."""

    def boot_failed(self, w: Worker, reason: str) -> None:
        """``w`` failed to become ready (or died right after, without serving)."""

    def died_young(self, w: Worker, served: float, reason: str) -> None:
        """``w`` served, then died ``served`` seconds after it was ready."""

    def worker_ready(self, w: Worker) -> None:
        """``w`` passed its readiness probe."""

    def fast(self) -> bool:
        """The daemon is stopping fast."""


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


class Processes:
    """Moves workers along the state table; counts failures and crashes."""

    def __init__(
        self,
        cfg: AppConfig,
        loop: asyncio.AbstractEventLoop,
        runtime_dir: str,
        log: FilteringBoundLogger,
        router: RouterPort,
        workers: list[Worker],
        launcher: Launcher,
        owner: Owner,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.log = log
        self.router = router
        self.workers = workers
        self.launcher = launcher
        self.owner = owner
        self.next_number = 1
        # Crash-loop state: failures in a row, and no spawn before backoff_until.
        self.failures = 0
        self.backoff_until = 0.0
        self.spawn_error: Failure | None = None
        self.last_failure: Failure | None = None
        self.spawn_failures_total = 0
        self.crashes_total = 0
        # Restart counts of crashed workers, inherited by their replacements.
        self._crashed: list[int] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # Workers (by number) whose stack was logged already: one event per kill.
        self._stacked: set[int] = set()

    # ------------------------------------------------------------------ queries

    def spawn_limit(self, now: float) -> int:
        """How many spawns may start now: none in backoff, one at a time in a crash loop."""
        if not self.failures:
            return UNLIMITED
        if now < self.backoff_until:
            return 0
        return 0 if any(w.state is _S.SPAWNING for w in self.workers) else 1

    def unborn(self) -> int:
        """Workers whose process is still being created (no pid yet)."""
        return sum(1 for w in self.workers if not w.pid)

    def forgive(self) -> None:
        """Forget the crash loop (the failures were a deployment error, not a crash)."""
        self.failures = 0
        self.backoff_until = 0.0
        self.spawn_error = None

    # ------------------------------------------------------------------ spawn

    def spawn(self, generation: int, now: float, *, extra: bool = False) -> bool:
        """Start one worker of ``generation``; False if it failed at once."""
        cfg = self.cfg
        number = self.next_number
        self.next_number += 1
        w = Worker(number, generation, "", "", now)
        w.attempt = self.failures
        w.extra = extra
        try:
            w.release = spawner.resolve_release(cfg.root)
            spawner.app_runtime_dir(cfg, self.runtime_dir)
            w.address = spawner.worker_address(cfg, number, self.runtime_dir)
        except (SpawnError, OSError) as exc:
            w.transition(Event.EXIT)
            self._boot_failed(w, str(exc), now)
            return False
        if self._crashed:
            w.restarts = self._crashed.pop(0)
        self.workers.append(w)
        self._task(self._boot(w))
        return True

    async def _boot(self, w: Worker) -> None:
        """The spawn step: start the process, probe it, report ready or failure."""
        try:
            proc = await self.launcher.start(self.cfg, w, self.log)
        except Exception as exc:  # SpawnError, or anything else: never a stuck SPAWNING
            wanted = w.state is _S.SPAWNING
            reason = str(exc) if isinstance(exc, SpawnError) else f"cannot start: {exc!r}"
            self._drop(w)  # also kills a process that was created before the failure
            if wanted:
                self._boot_failed(w, reason, self.loop.time())
            self.owner.poke()
            return
        self._task(self._watch(w, proc))
        if w.state is not _S.SPAWNING:
            # Retired while its process was being created (TTIN then TTOU,
            # shutdown): it has a pid now, so it can be signalled.
            if w.state is _S.STOPPING and w.timer is None:
                self.log.info("worker retired while starting", pid=w.pid, worker=w.number)
                self._signal_stop(w)
            self.owner.poke()
            return
        w.rss_bytes = memory.own_rss(w.pid)
        self.log.info(
            "worker spawned",
            pid=w.pid,
            worker=w.number,
            release=w.release,
            generation=w.generation,
            spawn=w.spawn,
        )
        self.owner.poke()
        await self._probe(w, proc, None)

    async def _probe(self, w: Worker, proc: ProcessHandle, deadline: float | None) -> None:
        try:
            await spawner.wait_ready(self.cfg, w, proc, deadline)
        except SpawnError as exc:
            if w.state is not _S.SPAWNING or proc.returncode is not None:
                return  # stopped on purpose, or dead: _exited reports it
            self._boot_failed(w, str(exc), self.loop.time())
            self.stop(w)
            self.owner.poke()
            return
        if w.state is not _S.SPAWNING:
            return
        now = self.loop.time()
        w.transition(Event.BOOTED)
        w.ready_at = now
        w.last_used = now
        # Known from the moment it is ready (SPEC §8), not at the next sample.
        w.rss_bytes = memory.own_rss(w.pid) or w.rss_bytes
        self.failures = 0
        self.spawn_error = None
        self.router.set_failing(False)
        self.log.info(
            "worker ready", pid=w.pid, worker=w.number, boot_s=round(now - w.started_at, 3)
        )
        self.owner.worker_ready(w)
        self.router.serve_queue()
        self.owner.poke()

    def adopt(self, w: Worker, proc: ProcessHandle, start_deadline: float) -> None:
        """Take over a worker the previous image passed on, in whatever state it was."""
        w.proc = proc
        self.workers.append(w)
        self.next_number = max(self.next_number, w.number + 1)
        self._task(self._watch(w, proc))
        if w.state is _S.SPAWNING:
            self._task(self._probe(w, proc, start_deadline))
        elif w.state is _S.DRAINING:
            w.timer = self.loop.call_at(w.deadline, self.owner.poke)
        elif w.state is _S.STOPPING:
            w.timer = self.loop.call_at(w.deadline, self._kill, w)

    # ------------------------------------------------------------------ exit

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
        status = describe_exit(code)
        if was is _S.SPAWNING:
            self._boot_failed(w, f"exited with status {status} before it was ready", now)
        elif was in (_S.READY, _S.DRAINING):
            self.crashes_total += 1
            self.router.reroute_connecting(w)
            served = now - w.ready_at
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
                    hint="SIGKILL: out of memory?" if code == -signal.SIGKILL else None,
                )
                reason = f"new worker exited {served:.1f}s after it was ready (status {status})"
                self.owner.died_young(w, served, reason)
            self._crashed.append(w.restarts + 1)
        elif was is _S.STOPPING:
            self.log.info("worker exited", pid=w.pid, status=status)
        self.owner.poke()

    def _drop(self, w: Worker) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.state is not _S.EXITED:
            w.transition(Event.EXIT)
        with contextlib.suppress(ValueError):
            self.workers.remove(w)
        self._stacked.discard(w.number)
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
        self.owner.boot_failed(w, reason)

    # ------------------------------------------------------------------ drain and stop

    def drain(self, w: Worker, now: float, deadline: float | None, reason: str) -> None:
        """Take ``w`` out of routing; it is signalled once its requests are done."""
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
            reason=w.replace_reason or reason,
        )
        if not w.inflight:
            self.stop(w)
        else:
            w.timer = self.loop.call_at(w.deadline, self.owner.poke)

    def undrain(self, w: Worker) -> None:
        """Call off a drain that has not reached the stop signal."""
        if not w.can(Event.UNDRAIN):
            return
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.transition(Event.UNDRAIN)
        self.log.info("drain called off", pid=w.pid, generation=w.generation)
        self.router.serve_queue()

    def progress_drains(self, now: float) -> None:
        """Draining workers that emptied, or ran out of drain_timeout, are signalled."""
        for w in self.workers:
            if w.state is not _S.DRAINING:
                continue
            if not w.inflight:
                self.stop(w)
            elif now >= w.deadline:
                self.log.warning(
                    "drain timeout: cutting in-flight requests", pid=w.pid, inflight=w.inflight
                )
                self.router.fail_worker(w, 502, "worker stopped (drain_timeout)")
                self.stop(w)

    def stop(self, w: Worker, stuck: Stuck | None = None) -> None:
        """Stop ``w`` now (a SPAWNING one with no process yet: as soon as it has one).

        A ``stuck`` worker (max_request_time) has its stack logged first,
        then gets the stop signal.
        """
        if not w.can(Event.STOP):
            return
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        w.transition(Event.STOP)
        self.router.retire_idle(w)
        if w.pid and stuck is not None:
            self._stacked.add(w.number)
            self._task(self._stack_then_stop(w, stuck))
        elif w.pid:
            self._signal_stop(w)

    async def _stack_then_stop(self, w: Worker, stuck: Stuck) -> None:
        await log_stack(w, self.log, stuck.reason, stuck.requests)
        # Still ours to signal: not exited, and no fast stop took over (hurry).
        if w.state is _S.STOPPING and w.timer is None:
            self._signal_stop(w)

    def _signal_stop(self, w: Worker) -> None:
        sig = self.cfg.stop_signal
        timeout = self.cfg.stop_timeout
        if self.owner.fast():
            timeout = min(timeout, FAST_STOP_S)
        self.log.info("stopping worker", pid=w.pid, signal=signal.Signals(sig).name)
        spawner.signal_group(w.pid, sig)
        w.deadline = self.loop.time() + timeout
        w.timer = self.loop.call_at(w.deadline, self._kill, w)

    def _kill(self, w: Worker) -> None:
        w.timer = None
        if w.state is not _S.STOPPING or not w.pid:
            return
        if w.number in self._stacked:
            self._sigkill(w)
            return
        # Its stack says where it is stuck: logged (at most ~2 s) before the kill.
        self._stacked.add(w.number)
        self._task(self._stack_then_kill(w))

    async def _stack_then_kill(self, w: Worker) -> None:
        sig = signal.Signals(self.cfg.stop_signal).name
        await log_stack(w, self.log, f"ignored {sig} past stop_timeout; killing")
        if w.state is _S.STOPPING:
            self._sigkill(w)

    def _sigkill(self, w: Worker) -> None:
        self.log.warning("worker ignored stop signal; killing", pid=w.pid)
        spawner.signal_group(w.pid, signal.SIGKILL)

    def cap_drains(self, deadline: float) -> None:
        """Drains in progress end no later than ``deadline`` (a graceful stop's)."""
        for w in self.workers:
            if w.state is _S.DRAINING and w.deadline > deadline:
                w.deadline = deadline
                if w.timer is not None:
                    w.timer.cancel()
                w.timer = self.loop.call_at(deadline, self.owner.poke)

    def hurry(self) -> None:
        """Fast stop: every stop signal already sent is followed by SIGKILL soon."""
        now = self.loop.time()
        for w in self.workers:
            if w.state is _S.STOPPING and w.pid and w.deadline > now + FAST_STOP_S:
                if w.timer is not None:
                    w.timer.cancel()
                w.deadline = now + FAST_STOP_S
                w.timer = self.loop.call_at(w.deadline, self._kill, w)

    # ------------------------------------------------------------------ tasks

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def wait_tasks(self, timeout: float) -> None:
        """Let watchers and probes end (after every process exited), then cancel the rest."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for t in pending:
            t.cancel()
