"""Queue waits of the last seconds, for the elastic pool (SPEC §10): a fixed ring, no IO.

The router records every request's queue wait (0 for one that found a free
worker) with :meth:`QueueWaits.add`: an index computation and two integer
increments into preallocated lists, no allocation. The pool reads
:meth:`QueueWaits.p95` (or :meth:`QueueWaits.counts`) about once a second.

Waits are kept as a histogram per one-second slot: bucket 0 is "under
1 ms", bucket k ≥ 1 covers [2^(k-1), 2^k) ms, the last one everything from
about 33 s up. A percentile is reported as the upper edge of its bucket, so
it errs high by less than a factor of two — enough to compare with the
100 ms threshold of SPEC §10 (where the buckets have an edge at 128 ms, and
:meth:`counts` gives the exact share above any threshold).
"""

from __future__ import annotations

from typing import Final, Protocol

WINDOW: Final = 5  # seconds
BUCKETS: Final = 18  # < 1 ms, then powers of two up to ~33 s, then the rest
SLOW: Final = 0.1  # SPEC §10: queueing is when p95 exceeds 100 ms


class WaitRecorder(Protocol):
    """Anything the router can record queue waits into."""

    def add(self, now: float, wait: float) -> None:
        """Record one request's queue wait at loop time ``now``."""


def _bucket(wait: float) -> int:
    ms = int(wait * 1000.0)
    if ms <= 0:
        return 0
    b = ms.bit_length()
    return b if b < BUCKETS else BUCKETS - 1


class QueueWaits:
    """Histograms of queue waits in one-second slots over the last :data:`WINDOW` s."""

    __slots__ = ("_cur", "_hist", "_i", "_sec", "_slow", "_total")

    def __init__(self) -> None:
        self._sec = [-1] * WINDOW
        self._total = [0] * WINDOW
        self._slow = [0] * WINDOW
        # Bucket 0 ("under 1 ms") is not kept: it is the total minus the others.
        self._hist = [0] * (WINDOW * BUCKETS)
        self._cur = -1  # the second being recorded, and its slot
        self._i = 0

    def add(self, now: float, wait: float) -> None:
        """Record one request's queue wait (0 for one that never queued)."""
        sec = int(now)
        if sec != self._cur:
            self._roll(sec)
        i = self._i
        self._total[i] += 1
        if wait >= 0.001:
            self._hist[i * BUCKETS + _bucket(wait)] += 1
            if wait > SLOW:
                self._slow[i] += 1

    def _roll(self, sec: int) -> None:
        i = sec % WINDOW
        self._cur = sec
        self._i = i
        if self._sec[i] != sec:
            self._sec[i] = sec
            self._total[i] = 0
            self._slow[i] = 0
            base = i * BUCKETS
            for k in range(base, base + BUCKETS):
                self._hist[k] = 0

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, requests that waited over 100 ms) in the window ending at ``now``."""
        sec = int(now)
        total = slow = 0
        for i in range(WINDOW):
            if sec - WINDOW < self._sec[i] <= sec:
                total += self._total[i]
                slow += self._slow[i]
        return total, slow

    def p95(self, now: float, q: float = 0.95) -> float:
        """The ``q`` quantile of the window's waits in seconds (0.0 without requests)."""
        sec = int(now)
        merged = [0] * BUCKETS
        total = 0
        for i in range(WINDOW):
            if sec - WINDOW < self._sec[i] <= sec:
                base = i * BUCKETS
                for k in range(BUCKETS):
                    merged[k] += self._hist[base + k]
                total += self._total[i]
        if not total:
            return 0.0
        merged[0] = total - sum(merged[1:])
        rank = q * total
        seen = 0
        for k in range(BUCKETS):
            seen += merged[k]
            if seen >= rank:
                return 0.001 * (1 << k) if k else 0.0
        return 0.001 * (1 << (BUCKETS - 1))
