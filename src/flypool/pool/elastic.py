"""The elastic pool (SPEC §10): between ``workers`` and ``max_workers``.

Up: one more worker when requests waited in the queue more than 100 ms at the
95th percentile over the last 5 s (at most one spawn in flight; when the
queue is full it does not wait for fresh evidence after the previous step).
Down: one fewer when a worker has served nothing for ``worker_idle_time``;
the controller then drains the worker idle longest, like a restart drains,
so no request fails.

The window counts, per quarter second, the requests that left the queue and
those of them that waited over 100 ms: "p95 > 100 ms" is "more than 5 %
waited over 100 ms". Recording a wait is two integer updates, no
allocation. After a step up only newer evidence counts, so one burst does
not buy several workers, and after a step down neither: a step down means
the queue was empty and extras idle, so slow waits before it are stale (the
backlog of a burst that has ended must not grow the pool right after it
shrank).
"""

from __future__ import annotations

from collections.abc import Sequence

from flypool.pool.worker import Worker

SLOW_WAIT = 0.1
WINDOW_S = 5.0
# Slots of a quarter second: evidence "since the last step up" is fresh
# within 0.25 s, so the pool can grow once per new worker's boot.
SLOT_S = 0.25
SLOTS = int(WINDOW_S / SLOT_S)
# Fewer samples than this are no evidence of queueing.
MIN_SAMPLES = 5


class QueueWaitWindow:
    """Queue waits over the last ``WINDOW_S`` seconds, in quarter-second slots."""

    __slots__ = ("_slot", "_slow", "_total")

    def __init__(self) -> None:
        self._slot = [-1] * SLOTS
        self._total = [0] * SLOTS
        self._slow = [0] * SLOTS

    def add(self, now: float, wait: float) -> None:
        """Record one request's queue wait (0 for one that never queued)."""
        n = int(now * 4)  # the slot number: 1 / SLOT_S
        i = n % SLOTS
        if self._slot[i] != n:
            self._slot[i] = n
            self._total[i] = 0
            self._slow[i] = 0
        self._total[i] += 1
        if wait > SLOW_WAIT:
            self._slow[i] += 1

    def counts(self, now: float, since: float = 0.0) -> tuple[int, int]:
        """(requests, requests that waited > 100 ms) in the window, after ``since``."""
        n = int(now * 4)
        first = n - SLOTS + 1
        if since:
            first = max(first, int(since * 4) + 1)
        total = slow = 0
        for i in range(SLOTS):
            s = self._slot[i]
            if first <= s <= n:
                total += self._total[i]
                slow += self._slow[i]
        return total, slow

    def p95_slow(self, now: float, since: float = 0.0) -> bool:
        """True when the 95th percentile of queue wait is over 100 ms."""
        total, slow = self.counts(now, since)
        return total >= MIN_SAMPLES and slow * 20 > total


class Elastic:
    """Decides one step up or down for one app."""

    def __init__(self, floor: int, ceiling: int, idle_time: float) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.idle_time = idle_time
        self.window = QueueWaitWindow()
        # The last step, either way: only evidence after it buys a step up.
        self.last_step = 0.0
        self.ups = 0
        self.downs = 0

    @property
    def enabled(self) -> bool:
        """Whether the pool may grow beyond ``workers`` at all."""
        return self.ceiling > self.floor

    def configure(self, floor: int, ceiling: int, idle_time: float) -> None:
        """New limits (reload, scale)."""
        self.floor = floor
        self.ceiling = ceiling
        self.idle_time = idle_time

    def step(
        self,
        now: float,
        target: int,
        spawning: int,
        ready: Sequence[Worker],
        queued: int,
        queue_full: bool,
    ) -> int:
        """The change of target the evidence asks for: -k (k idle extras), +1 or 0.

        Down is looked at first: with nothing queued, an extra idle for
        ``idle_time`` shows spare capacity now, whatever the window says.
        """
        if target > self.floor and not queued:
            idle = sum(1 for w in ready if not w.inflight and now - w.last_used >= self.idle_time)
            down = min(idle, target - self.floor)
            if down:
                self.downs += down
                self.last_step = now
                return -down
        may_grow = target < self.ceiling and spawning == 0
        if may_grow and (queue_full or self.window.p95_slow(now, self.last_step)):
            self.last_step = now
            self.ups += 1
            return 1
        return 0
