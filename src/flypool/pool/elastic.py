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

from flypool.pool.wait_window import MIN_SAMPLES, QueueWaitWindow
from flypool.pool.worker import Worker

__all__ = ["MIN_SAMPLES", "Elastic", "QueueWaitWindow"]


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
