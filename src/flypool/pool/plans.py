"""Plans: what the pool controller does next, decided from what it sees.

Theory of operation
-------------------
The controller (:mod:`flypool.pool.controller`) is level-triggered: at every
wake-up it builds a :class:`View` of the workers as they are, asks the
current plan for a :class:`Decision` (spawn n, drain these, stop those, or
"finished") and carries it out. A plan holds only the little state a human
would keep on a notepad (the generation being rolled out, how many old
workers were replaced, why it was aborted); it never starts or signals a
process itself. Because a decision is a function of what *is*, an event seen
twice or a wake-up with nothing new costs nothing, and two triggers in one
loop turn cannot start two of anything.

Plans, one at a time per app:

- :class:`SteadyPlan` (no restart running): keep ``target`` workers; refill
  crashed ones (the controller's crash-loop backoff caps spawns); scale down
  the least useful worker first; replace a worker marked for
  ``max_requests``/``memory_limit`` with one extra worker, then drain it.
- :class:`RollingPlan`: spawn new-generation workers while the bound allows
  (at most ``workers + restart_batch`` serving processes: spawning, ready or
  draining), drain an old worker for every new one ready, fattest first when
  the batch is chosen by memory (``"auto"``). A drained worker already
  signalled (STOPPING, nothing in flight) serves nothing while its process
  exits: it counts against memory, not against the bound, so the next spawn
  starts while it exits, if ``View.memory_room`` holds one more worker of
  the largest old RSS; when memory is tight the spawn waits for the exit.
- :class:`BlockingPlan`: drain every old worker, spawn the new ones once the
  old are gone.
- :class:`StopPlan`: the daemon is stopping (graceful or fast).

A canary is one more :class:`RestartPlan` subclass: register it in
:data:`RESTART_PLANS` (see ``docs/architecture.md``).

This module does no IO and needs no event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flypool.pool.worker import Worker, WorkerState

_SPAWNING = WorkerState.SPAWNING
_READY = WorkerState.READY
_DRAINING = WorkerState.DRAINING
_STOPPING = WorkerState.STOPPING

# More spawns than any pool will ask for at once: "no crash-loop limit".
UNLIMITED = 1 << 30


@dataclass(slots=True)
class View:
    """The observed state of one app's pool at one instant."""

    now: float
    target: int
    generation: int
    workers: list[Worker]
    # How many spawns may start now (crash-loop backoff; UNLIMITED otherwise).
    spawn_limit: int = UNLIMITED
    # Requests waiting in the app's queue.
    queued: int = 0
    # Bytes new workers may still use (available memory minus memory_reserve);
    # None when not read (no restart, or nothing for it to decide).
    memory_room: int | None = None
    new_spawning: list[Worker] = field(default_factory=list)
    new_ready: list[Worker] = field(default_factory=list)
    old_spawning: list[Worker] = field(default_factory=list)
    old_ready: list[Worker] = field(default_factory=list)
    draining: list[Worker] = field(default_factory=list)
    stopping: list[Worker] = field(default_factory=list)
    # STOPPING workers with nothing in flight: signalled, serving nothing,
    # only their process is still exiting.
    exiting: list[Worker] = field(default_factory=list)
    old_any: int = 0

    def __post_init__(self) -> None:
        gen = self.generation
        for w in self.workers:
            st = w.state
            old = w.generation < gen
            if old:
                self.old_any += 1
            if st is _READY:
                (self.old_ready if old else self.new_ready).append(w)
            elif st is _SPAWNING:
                (self.old_spawning if old else self.new_spawning).append(w)
            elif st is _DRAINING:
                self.draining.append(w)
            elif st is _STOPPING:
                self.stopping.append(w)
                if not w.inflight:
                    self.exiting.append(w)

    @property
    def ready(self) -> list[Worker]:
        """Every READY worker, of any generation."""
        return self.old_ready + self.new_ready

    @property
    def spawning(self) -> list[Worker]:
        """Every SPAWNING worker, of any generation."""
        return self.old_spawning + self.new_spawning

    @property
    def live(self) -> int:
        """Workers counting towards the target (spawning or ready)."""
        return (
            len(self.new_ready)
            + len(self.old_ready)
            + len(self.new_spawning)
            + len(self.old_spawning)
        )


@dataclass(slots=True)
class Decision:
    """What the controller is to do now."""

    spawn: int = 0
    drain: list[Worker] = field(default_factory=list)
    # Stopped at once: spawning workers no longer wanted (their process is
    # signalled the moment it exists).
    stop: list[Worker] = field(default_factory=list)
    # Drains started now end (requests cut) no later than this; None = drain_timeout.
    drain_deadline: float | None = None
    finished: bool = False


class Plan:
    """Base of every plan; the default reactions do nothing."""

    kind = "steady"

    def decide(self, v: View) -> Decision:
        """The next actions for the pool as seen in ``v``."""
        raise NotImplementedError

    def spawn_failed(self, w: Worker, reason: str) -> None:
        """A worker of this plan's generation failed to become ready."""

    def died_on_probation(self, w: Worker, reason: str) -> None:
        """A new-generation worker died right after it became ready."""

    def on_request_done(self, w: Worker, status: int, seconds: float, failed: bool) -> bool:
        """A request ``w`` served has finished (the canary judges on these).

        Returns True when the controller should look again (a decision was made).
        """
        return False

    def successor(self) -> Plan | None:
        """The plan that takes over from this one now (a promoted canary), or None."""
        return None

    def wake_at(self, now: float) -> float | None:
        """When to reconcile again even if nothing happens (a canary's timeout), or None."""
        return None

    def progress(self) -> dict[str, Any] | None:
        """The ``restart`` object of status, or None."""
        return None


def _scale_down_order(w: Worker) -> tuple[bool, bool, bool, bool, bool, float]:
    # Least useful first: spawning ones (nothing lost), canaries of a restart
    # that ended (rolled back), workers marked for replacement, then idle ones
    # (elastic extras first), idle longest first.
    return (
        w.state is not _SPAWNING,
        not w.canary,
        w.replace_reason is None,
        w.inflight > 0,
        not w.extra,
        w.last_used,
    )


class SteadyPlan(Plan):
    """No restart: keep the count, refill, scale, replace marked workers."""

    def decide(self, v: View) -> Decision:
        """Spawn the missing, retire the extra, swap marked workers one at a time."""
        d = Decision()
        ready = v.ready
        flagged = [w for w in ready if w.replace_reason is not None]
        # One extra worker at a time replaces a marked one (max_requests, memory_limit).
        desired = v.target + (1 if flagged else 0)
        live = v.live
        chosen: set[Worker] = set()
        if live > desired:
            candidates = sorted(v.spawning + ready, key=_scale_down_order)
            for w in candidates[: live - desired]:
                (d.stop if w.state is _SPAWNING else d.drain).append(w)
                chosen.add(w)
        elif live < desired:
            d.spawn = min(desired - live, v.spawn_limit)
        # A marked worker leaves once enough others serve without it.
        surplus = len(ready) - len([w for w in chosen if w.state is _READY]) - v.target
        for w in flagged:
            if surplus <= 0:
                break
            if w not in chosen:
                d.drain.append(w)
                surplus -= 1
        return d


class RestartPlan(Plan):
    """What rolling, blocking (and canary) restarts have in common."""

    kind = "restart"

    def __init__(
        self,
        *,
        generation: int,
        restart_id: int,
        reason: str,
        started: float,
        total: int,
        batch: int,
        by_memory: bool,
        resist: bool,
    ) -> None:
        self.generation = generation
        self.ids = [restart_id]
        self.reason = reason
        self.started = started
        self.total = total
        self.done = 0
        self.batch = max(1, batch)
        self.by_memory = by_memory
        self.resist = resist
        # Set when the restart gives up (resist_deployment_errors).
        self.aborted: str | None = None
        # New workers that failed (without resistance: slots skipped).
        self.failures = 0
        self.skips = 0
        self.last_failure = ""
        # Largest RSS among the old generation (for "auto"), and the peak of
        # the whole pool's RSS during the restart.
        self.est_rss = 0
        self.peak_rss = 0
        self.replacing: list[Worker] = []
        # A canary judged bad: the reason with its numbers, and the release it ran.
        self.rolled_back: str | None = None
        self.failed_release = ""

    def extra_state(self, now: float) -> dict[str, Any]:
        """State of a subclass that a USR2 hand-over must carry (JSON-able)."""
        return {}

    def restore_extra(self, st: dict[str, Any], now: float) -> None:
        """Take back what :meth:`extra_state` wrote in the previous image."""

    def take_over(self, prev: RestartPlan) -> None:
        """Carry the bookkeeping of a superseded restart over to this one."""
        self.ids = prev.ids + self.ids
        self.started = prev.started
        self.done = prev.done
        self.total = prev.done + self.total
        self.peak_rss = prev.peak_rss
        self.est_rss = max(self.est_rss, prev.est_rss)

    def spawn_failed(self, w: Worker, reason: str) -> None:
        """Resistance on: abort. Off: skip the slot (Passenger's behaviour)."""
        if w.generation != self.generation:
            return
        self.failures += 1
        self.last_failure = reason
        if self.resist:
            if self.aborted is None:
                self.aborted = f"deployment error: {reason}"
        else:
            self.skips += 1

    def died_on_probation(self, w: Worker, reason: str) -> None:
        """gunicorn accepts before importing the app: a quick death is a failed boot."""
        self.spawn_failed(w, reason)

    def _finished(self, v: View) -> bool:
        if self.aborted is not None:
            return True
        if v.old_any or v.new_spawning:
            return False
        return len(v.new_ready) >= v.target or self.failures > 0

    def _drain_old(self, d: Decision, v: View, n: int) -> None:
        if n <= 0:
            return
        old = [w for w in v.old_ready if w not in d.drain]
        if self.by_memory:
            # The fattest first: it frees the most memory for the next batch.
            old.sort(key=lambda w: (-w.rss_bytes, w.generation, w.inflight))
        else:
            # Oldest generation first, then the least busy (drains fastest).
            old.sort(key=lambda w: (w.generation, w.inflight, w.started_at))
        picked = old[:n]
        d.drain.extend(picked)
        self.done += len(picked)

    def progress(self) -> dict[str, Any] | None:
        """The ``restart`` object of status (SPEC §8)."""
        leaving = [w for w in self.replacing if w.state is not WorkerState.EXITED]
        self.replacing = leaving
        return {
            "id": self.ids[-1],
            "mode": self.kind,
            "phase": "rolling",
            "done": self.done,
            "total": self.total,
            "replacing_pid": leaving[0].pid if leaving else None,
            "generation": self.generation,
            "batch": self.batch,
            "peak_rss_bytes": self.peak_rss,
            "canary": None,
        }


class RollingPlan(RestartPlan):
    """Replace old workers a batch at a time; capacity never below the target."""

    kind = "rolling"

    def decide(self, v: View) -> Decision:
        """Drain old workers made superfluous, spawn new ones within the bound."""
        d = Decision()
        if self._finished(v):
            d.finished = True
            return d
        # A spawn that began before this restart must not survive it (Passenger #1100).
        d.stop.extend(v.old_spawning)
        t = v.target
        # Every new worker ready lets one old worker go.
        self._drain_old(d, v, len(v.new_ready) + len(v.old_ready) - t)
        # Without resistance a failed slot is skipped: one old worker goes anyway.
        while self.skips > 0 and len(d.drain) < len(v.old_ready):
            self._drain_old(d, v, 1)
            self.skips -= 1
        self.replacing = [w for w in self.replacing if w.state is not WorkerState.EXITED]
        self.replacing.extend(d.drain)
        new_live = len(v.new_ready) + len(v.new_spawning)
        if new_live > t:
            # The target went down mid-restart: the surplus new ones go first.
            extra = sorted(v.new_spawning + v.new_ready, key=_scale_down_order)[: new_live - t]
            for w in extra:
                (d.stop if w.state is _SPAWNING else d.drain).append(w)
            return d
        # SPEC §1: at most workers + restart_batch serving processes. An
        # exiting worker (drained, signalled) serves nothing: it is still
        # measured in the available memory, so it counts against memory, and
        # the spawn it lets through needs room there; otherwise that spawn
        # waits for its exit (then the bound counts every process).
        procs = len(v.workers)
        room = t + self.batch - (procs - len(v.exiting))
        fits = self._fits(v)
        if self.by_memory:
            # At least one extra worker may always run: progress is guaranteed.
            if procs - len(v.old_spawning) <= t:
                fits = max(fits, 1)
            room = min(room, fits)
        else:
            # A fixed batch: memory decides only about the overlap with exits.
            room = min(room, max(t + self.batch - procs, fits))
        d.spawn = max(0, min(t - new_live, room, v.spawn_limit))
        return d

    def _fits(self, v: View) -> int:
        """Spawns the memory budget holds now, beyond the new workers still spawning.

        One spawn is reckoned at the largest RSS seen (the old generation's
        when the restart began, or any worker's since). Memory not read, or
        no RSS known yet: unlimited with ``"auto"`` (its batch was sized at
        the start), none with a fixed batch (wait for exits, as without
        this rule).
        """
        est = max(self.est_rss, max((w.rss_bytes for w in v.workers), default=0))
        if v.memory_room is None or est <= 0:
            return UNLIMITED if self.by_memory else 0
        return v.memory_room // est - len(v.new_spawning)


class BlockingPlan(RestartPlan):
    """Stop every old worker, then spawn the new ones (a gap in service)."""

    kind = "blocking"

    def decide(self, v: View) -> Decision:
        """Drain all old workers; spawn once none is left."""
        d = Decision()
        if self._finished(v):
            d.finished = True
            return d
        d.stop.extend(v.old_spawning)
        self._drain_old(d, v, len(v.old_ready))
        self.replacing = [w for w in self.replacing if w.state is not WorkerState.EXITED]
        self.replacing.extend(d.drain)
        if v.old_any == 0:
            new_live = len(v.new_ready) + len(v.new_spawning)
            d.spawn = max(0, min(v.target - new_live, v.spawn_limit))
        return d


RestartFactory = Callable[..., RestartPlan]
# Restart modes the controller knows; the canary plan registers itself here.
RESTART_PLANS: dict[str, RestartFactory] = {"rolling": RollingPlan, "blocking": BlockingPlan}


class StopPlan(Plan):
    """The daemon is stopping: serve the queue, drain, stop; or stop at once."""

    kind = "stop"

    def __init__(self, *, graceful: bool, deadline: float) -> None:
        self.graceful = graceful
        self.deadline = deadline

    def decide(self, v: View) -> Decision:
        """Everything goes; gracefully only after the queue is served."""
        d = Decision(drain_deadline=self.deadline)
        d.stop.extend(v.spawning)
        if not self.graceful:
            d.stop.extend(v.ready)
            d.stop.extend(v.draining)
        elif not v.queued or v.now >= self.deadline:
            # Queued requests still need ready workers; after that, drain.
            d.drain.extend(v.ready)
        d.finished = not v.workers
        return d
