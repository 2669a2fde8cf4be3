"""Restarts of one app: rolling (one batch at a time) or blocking.

Theory of operation
-------------------
A restart bumps the app's generation. Every worker of an older generation
must be replaced by one of the new generation, spawned from the root as it
resolves *now* (so a moved ``current`` symlink takes effect).

Rolling, per step::

    spawn Y (restart_batch at a time)   # SPAWNING: gets no traffic
    wait until Y is ready               # READY: the balancer prefers it on ties
    drain X                             # DRAINING: no new requests, idle
                                        #   upstream connections closed
    wait for X's in-flight (drain_timeout)
    stop_signal X, SIGKILL after stop_timeout

So capacity never drops below the target and never more than
``workers + restart_batch`` processes live.

If Y fails to get ready and ``resist_deployment_errors`` is on, the restart
stops there: Y is removed, the old workers keep serving and the app shows
``deployment_error`` with Y's last output. With it off, the slot is skipped:
X is retired anyway and the pool refills the slot later (Passenger's
behaviour, which can leave the app without workers).

A restart asked for while one runs supersedes it in place: the generation
is bumped again, so workers spawned earlier in this run count as old too,
and the same loop carries on until every worker is of the newest generation.
Only one restart runs per app at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from flypool.pool.spawner import SpawnError
from flypool.pool.worker import Worker, WorkerState

if TYPE_CHECKING:
    from flypool.pool.app import AppPool

_LIVE = (WorkerState.SPAWNING, WorkerState.READY)


class Rollout:
    """One restart in progress (possibly superseded several times)."""

    def __init__(self, pool: AppPool, mode: str, restart_id: int, reason: str) -> None:
        self.pool = pool
        self.mode = mode
        self.ids = [restart_id]
        self.reason = reason
        pool.generation += 1
        self.generation = pool.generation
        self.done = 0
        self.total = len(self._old())
        self.replacing: list[Worker] = []
        self.aborted: str | None = None
        self.started = pool.loop.time()
        self._wake = asyncio.Event()

    # -- queries -----------------------------------------------------------------

    def _old(self) -> list[Worker]:
        return [
            w
            for w in self.pool.workers
            if w.generation < self.generation and w.state in _LIVE and not w.retiring
        ]

    def progress(self) -> dict[str, Any]:
        """The ``restart`` object of status."""
        return {
            "id": self.ids[-1],
            "mode": self.mode,
            "done": self.done,
            "total": self.total,
            "replacing_pid": self.replacing[0].pid if self.replacing else None,
            "generation": self.generation,
        }

    # -- control from outside --------------------------------------------------------

    def supersede(self, restart_id: int, reason: str) -> None:
        """A newer restart was asked for: carry on to a newer generation."""
        pool = self.pool
        pool.generation += 1
        self.generation = pool.generation
        self.ids.append(restart_id)
        self.reason = reason
        # Everything not yet of the newest generation is to be replaced again.
        self.total = self.done + len(self._old())
        pool.log.info("restart superseded", restart_id=restart_id, generation=self.generation)

    def target_changed(self) -> None:
        """The worker count changed mid-restart (scale, TTIN/TTOU)."""
        self._wake.set()

    def broken(self, reason: str) -> None:
        """A new worker of this rollout died right after getting ready."""
        if self.aborted is None:
            self._deployment_error(reason)

    def abort(self, why: str) -> None:
        """Stop after the current step (daemon shutdown)."""
        if self.aborted is None:
            self.aborted = why

    # -- the engine ------------------------------------------------------------------

    async def run(self) -> bool:
        """Carry the restart out; True when every worker ended on the new generation."""
        pool = self.pool
        pool.log.info(
            "restart begin",
            mode=self.mode,
            restart_id=self.ids[-1],
            generation=self.generation,
            total=self.total,
            reason=self.reason,
        )
        try:
            if self.mode == "blocking":
                await self._blocking()
            else:
                await self._rolling()
        finally:
            self.replacing = []
        return self.aborted is None

    async def _rolling(self) -> None:
        pool = self.pool
        cfg = pool.cfg
        while self.aborted is None:
            old = self._old()
            live = pool.live_workers()
            missing = pool.target - len(live)
            if not old and missing <= 0:
                return
            # "auto" (memory-aware surge) is the pool controller's; until then one at a time.
            surge = 1 if cfg.restart_batch == "auto" else cfg.restart_batch
            batch = max(1, min(surge, len(old) if old else missing))
            if missing > 0 and not old:
                batch = missing
            results = await asyncio.gather(
                *(pool.spawn_ready(self.generation) for _ in range(batch)),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            ready = [r for r in results if isinstance(r, Worker)]
            # Retire as many old workers as the new ones make superfluous.
            live_now = pool.live_workers()
            surplus = max(0, len(live_now) - pool.target)
            to_retire = self._pick_old(min(surplus, len(ready)))
            if failed:
                err = failed[0]
                if not isinstance(err, SpawnError):
                    raise err
                if cfg.resist_deployment_errors:
                    await self._retire(to_retire)
                    self._deployment_error(str(err))
                    return
                # Passenger's behaviour: skip the slot, the old worker goes anyway.
                extra = self._pick_old(len(failed), exclude=to_retire)
                await self._retire(to_retire + extra)
                continue
            await self._retire(to_retire)

    def _pick_old(self, n: int, exclude: list[Worker] | None = None) -> list[Worker]:
        if n <= 0:
            return []
        old = [w for w in self._old() if not exclude or w not in exclude]
        # Oldest generation first, then the least busy (drains fastest).
        old.sort(key=lambda w: (w.generation, w.inflight, w.started_at))
        return old[:n]

    async def _retire(self, workers: list[Worker]) -> None:
        if not workers:
            return
        self.replacing = list(workers)
        for w in workers:
            self.pool.mark_retiring(w)
        await asyncio.gather(*(self.pool.retire(w) for w in workers))
        self.done += len(workers)
        self.replacing = []

    async def _blocking(self) -> None:
        pool = self.pool
        old = self._old()
        self.replacing = list(old)
        for w in old:
            pool.mark_retiring(w)
        await asyncio.gather(*(pool.retire(w) for w in old))
        self.done = len(old)
        self.replacing = []
        results = await asyncio.gather(
            *(pool.spawn_ready(self.generation) for _ in range(pool.target)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, SpawnError)]
        if failed:
            self._deployment_error(str(failed[0]))

    def _deployment_error(self, reason: str) -> None:
        pool = self.pool
        err = pool.spawn_error or {}
        pool.deployment_error = {
            "release": err.get("release", ""),
            "reason": reason,
            "output": err.get("output", []),
            "at": err.get("at", ""),
        }
        # The failed spawn is reported as a deployment error, not a crash loop:
        # the old workers are fine, so no backoff applies to them.
        pool.failures = 0
        pool.backoff_until = 0.0
        pool.spawn_error = None
        self.aborted = f"deployment error: {reason}"
        pool.log.error(
            "restart aborted: new release failed to start",
            reason=reason,
            release=pool.deployment_error["release"],
            output=pool.deployment_error["output"],
        )


async def run_restarts(pool: AppPool, first: Rollout) -> None:
    """Run ``first`` to the end (superseding included) and record the outcome."""
    loop = pool.loop
    pool.rollout = first
    ok = False
    try:
        ok = await first.run()
    finally:
        pool.rollout = None
        duration = loop.time() - first.started
        from flypool.pool.app import now_iso

        pool.last_restart = {
            "id": first.ids[-1],
            "mode": first.mode,
            "outcome": "completed" if ok else "aborted",
            "reason": first.aborted or first.reason,
            "duration_s": round(duration, 3),
            "finished_at": now_iso(),
            "replaced": first.done,
        }
        pool.restarts_total += 1
        pool.restart_durations.append(duration)
        if ok:
            pool.deployment_error = None
        pool.log.info(
            "restart end",
            outcome=pool.last_restart["outcome"],
            duration_s=round(duration, 3),
            replaced=first.done,
        )
        with contextlib.suppress(Exception):
            pool.maintain()


def request_restart(pool: AppPool, mode: str | None, reason: str) -> int:
    """Start a restart of ``pool`` or fold the request into the running one."""
    pool.restart_seq += 1
    rid = pool.restart_seq
    if pool.stopping:
        return rid
    if mode is None:
        mode = "rolling" if pool.cfg.rolling_restarts else "blocking"
    if pool.rollout is not None:
        pool.rollout.supersede(rid, reason)
        return rid
    pool.task(run_restarts(pool, Rollout(pool, mode, rid, reason)))
    return rid
