"""The elastic pool's evidence: queue waits of the last 5 s in quarter-second slots.

The router records every request's wait here (``Router.queue_waits``), so
this runs once per request and is
compiled with the hot path (mypyc); :mod:`flypool.pool.elastic` reads it when
it decides a step. Recording is two integer updates, no allocation.
"""

from __future__ import annotations

from typing import Final

SLOW_WAIT: Final = 0.1
WINDOW_S: Final = 5.0
# Slots of a quarter second: evidence "since the last step up" is fresh
# within 0.25 s, so the pool can grow once per new worker's boot.
SLOT_S: Final = 0.25
SLOTS: Final = int(WINDOW_S / SLOT_S)
# Fewer samples than this are no evidence of queueing.
MIN_SAMPLES: Final = 5


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
