"""Canary verdicts: the canary against the old generation on the same traffic (SPEC §7).

Pure: no IO, no clock, no event loop. The controller owns a `CanaryWindow`
from the moment the canary is ready, records every finished request of a
canary or old-generation worker into it, and asks `judge` for a `Verdict`
(after each request, or on a timer: both are sound, see below).

Theory of operation
-------------------
Errors. SPEC §7 rolls back "when the canary's error rate is above
``canary_max_error_rate`` and, by a sequential test that may be checked after
every request, above the old generation's". The first half is a gate on the
canary's observed rate. The second half is an *anytime-valid* test: a mixture
likelihood ratio on the attribution of errors, compared with ``1 / alpha``.

Condition on the errors. If both generations fail with the same probability
p, an error lands on the canary with probability π, the canary's share of the
traffic; p cancels out, so the unknown base rate needs no estimate. If the
canary fails r times as often (rate ratio r), the error lands on it with
probability q(r) = π·r / (π·r + 1 - π). Each error multiplies the likelihood
ratio of "ratio r" against "same rate" by::

    canary error:  r / (1 + π·(r - 1))        old error:  1 / (1 + π·(r - 1))

π is the canary's share of the requests finished before the erroring one,
with one pseudo-request each side so that the first requests do not claim
certainty (an early error on a canary that has served nothing is judged at
π = 1/2, not at π = 0). The product over the errors is a non-negative
martingale when the rates are equal and a supermartingale when the canary is
better (r ≤ 1), for every fixed r > 1. An average of such martingales over a
fixed grid of r (1.5x to 256x, `_RATIOS`) is one too, so by Ville's inequality
the chance that the mixture *ever* reaches ``1 / alpha`` is at most alpha,
however often it is looked at. That is what lets the daemon check after every
request without the repeated-peeking inflation of a fixed-sample test, and it
is the same construction as Netflix's sequential canary tests on count data
(Lindon et al., KDD 2022) and the conditional test for two Poisson rates.
The grid covers both a release that fails every request (r huge: four or
five straight canary errors at a 20 % share are enough) and a modest
regression (2 % against 0.5 %, r = 4). The mixture changes only when an error
is recorded, and then costs a logarithm and an exponential per grid point.

Low traffic does not cause false aborts: one early 5xx multiplies the
mixture by less than 1/π (2 on the canary's first request with nothing
served before, about 7 after 20 old requests), far from ``1 / alpha`` (100),
where a gate on the observed rate alone would have fired. The guarantee
assumes a steady share, which least-busy routing gives under steady load;
``benchmarks/canary_sim.py`` measures A/A runs where the share shifts (the
canary alone for its first 100 requests; starved for the first 1,000).

Latency. The canary's p99 against ``canary_max_latency_ratio`` x the old
generation's p99, both over at least ``canary_requests`` requests, compared
once the canary has served them (a fixed-sample rule, as SPEC words it).
p99 comes from a log-bucket histogram with 8 buckets per octave (resolution
2^(1/8), about 9 %), so recording is O(1) and nothing grows.

No traffic is no evidence. Until the canary has served ``canary_requests``
the verdict waits for "traffic"; after that, if a comparison needs the old
generation (latency on, or the canary's rate above the gate) and the old
generation has served fewer than ``canary_requests``, it waits for
"evidence". At ``canary_timeout`` a waiting canary is rolled back with a
reason that says which was missing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

# -- latency histogram ------------------------------------------------------
_PER_OCTAVE = 8
_LOW_OCTAVE = -17  # bucket 0 holds everything below 2**-17 s (7.6 µs)
_BUCKETS = 256  # up to 2**15 s; indices stay small cached ints
_OFFSET = float(-_LOW_OCTAVE * _PER_OCTAVE)
_FLOOR_S = 2.0**_LOW_OCTAVE
_TOP = _BUCKETS - 1
_CEIL_S = 2.0 ** (_LOW_OCTAVE + _BUCKETS / _PER_OCTAVE)
_log2 = math.log2

# -- error test -------------------------------------------------------------
_RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 64.0, 256.0)
_LOG_RATIOS = tuple(math.log(r) for r in _RATIOS)
_RATIOS_LESS_1 = tuple(r - 1.0 for r in _RATIOS)
_GRID = len(_RATIOS)
_LOG_GRID = math.log(_GRID)


def _log_mean_exp(values: list[float]) -> float:
    """log(mean(exp(v))), without overflow: the log of the mixture e-value."""
    top = max(values)
    total = 0.0
    for v in values:
        total += math.exp(v - top)
    return top + math.log(total) - _LOG_GRID


class GenerationStats:
    """Outcome counters of one side (canary or old) over the comparison window.

    ``record`` is on the hot path: two integer additions and one bucket
    increment in a fixed list; nothing grows.
    """

    __slots__ = ("_buckets", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self._buckets = [0] * _BUCKETS

    def record(self, latency_s: float, error: bool) -> None:
        """Count one finished request: its latency and whether it failed."""
        self.requests += 1
        if error:
            self.errors += 1
        if _FLOOR_S < latency_s < _CEIL_S:
            i = int(_log2(latency_s) * _PER_OCTAVE + _OFFSET)
        elif latency_s >= _CEIL_S:
            i = _TOP
        else:  # zero, negative (a clock step) or NaN
            i = 0
        self._buckets[i] += 1

    def quantile_s(self, q: float) -> float | None:
        """The q-quantile of the recorded latencies (bucket midpoint), or None if empty."""
        total = sum(self._buckets)
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for i, count in enumerate(self._buckets):
            seen += count
            if seen >= rank:
                return float(2.0 ** ((i + 0.5 - _OFFSET) / _PER_OCTAVE))
        raise AssertionError("unreachable: rank <= total")

    def p99_s(self) -> float | None:
        """The 99th percentile latency in seconds, or None before any request."""
        return self.quantile_s(0.99)

    def to_state(self) -> dict[str, Any]:
        """A JSON-able copy (for the USR2 hand-over)."""
        nonzero = {str(i): c for i, c in enumerate(self._buckets) if c}
        return {"requests": self.requests, "errors": self.errors, "buckets": nonzero}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GenerationStats:
        """Rebuild from `to_state` output."""
        stats = cls()
        stats.requests = int(state["requests"])
        stats.errors = int(state["errors"])
        for key, count in state["buckets"].items():
            stats._buckets[int(key)] = int(count)
        return stats


class CanaryWindow:
    """Both sides of one canary plus the running error evidence.

    Feed it every request that a canary or old-generation worker finished,
    whatever the status: ``error`` is a 5xx from the worker, a reset, a crash
    or a timeout; a 4xx is not an error. A canary 5xx answered again by an old
    worker (SPEC §6) counts once on each side.
    """

    __slots__ = ("_log_e", "_log_mix", "canary", "old")

    def __init__(self) -> None:
        self.canary = GenerationStats()
        self.old = GenerationStats()
        self._log_e = [0.0] * len(_RATIOS)
        self._log_mix = 0.0

    def record(self, canary: bool, latency_s: float, error: bool) -> None:
        """Count one finished request on the canary (``canary=True``) or the old generation."""
        if error:
            self._observe_error(canary)
        (self.canary if canary else self.old).record(latency_s, error)

    def _observe_error(self, on_canary: bool) -> None:
        # The share is taken before this request is counted: it must not
        # depend on the outcome being judged (that keeps the martingale).
        pi = (self.canary.requests + 1) / (self.canary.requests + self.old.requests + 2)
        log_e = self._log_e
        for j in range(_GRID):
            step = -math.log1p(pi * _RATIOS_LESS_1[j])
            log_e[j] += step + _LOG_RATIOS[j] if on_canary else step
        self._log_mix = _log_mean_exp(log_e)

    @property
    def evidence(self) -> float:
        """The e-value that the canary fails more often than the old generation (1 = none)."""
        return math.exp(min(self._log_mix, 700.0))

    def status(self, verdict: Verdict) -> dict[str, Any]:
        """The numbers of status ``restart.canary`` (SPEC §8), without ``workers``."""
        return {
            "requests": self.canary.requests,
            "errors": self.canary.errors,
            "p99_ms": _ms_or_none(self.canary.p99_s()),
            "old_requests": self.old.requests,
            "old_errors": self.old.errors,
            "old_p99_ms": _ms_or_none(self.old.p99_s()),
            "waiting_for": verdict.waiting_for,
        }

    def to_state(self) -> dict[str, Any]:
        """A JSON-able copy, so that USR2 keeps the canary and its counts."""
        return {
            "canary": self.canary.to_state(),
            "old": self.old.to_state(),
            "log_e": list(self._log_e),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CanaryWindow:
        """Rebuild from `to_state` output."""
        window = cls()
        window.canary = GenerationStats.from_state(state["canary"])
        window.old = GenerationStats.from_state(state["old"])
        log_e = [float(x) for x in state["log_e"]]
        if len(log_e) == _GRID:
            window._log_e = log_e
            window._log_mix = _log_mean_exp(log_e)
        return window


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    """The §3 ``canary*`` keys, in plain units, plus the error test's false-rollback bound."""

    requests: int = 200  # canary_requests
    timeout_s: float = 600.0  # canary_timeout
    max_error_rate: float = 0.01  # canary_max_error_rate, as a fraction ("1%" -> 0.01)
    max_latency_ratio: float = 2.0  # canary_max_latency_ratio; 0 = ignore latency
    alpha: float = 0.01  # bound on the error test's false rollbacks, however often checked

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("canary_requests must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("canary_timeout must be positive")
        if not 0.0 <= self.max_error_rate < 1.0:
            raise ValueError("canary_max_error_rate must be in [0%, 100%)")
        if self.max_latency_ratio < 0:
            raise ValueError("canary_max_latency_ratio must be >= 0")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")


class Decision(enum.Enum):
    """What the controller does next."""

    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


class Cause(enum.Enum):
    """Why a canary was rolled back (a label for logs and /metrics)."""

    ERRORS = "errors"
    LATENCY = "latency"
    TRAFFIC = "traffic"  # canary_timeout reached without enough requests to decide


@dataclass(frozen=True, slots=True)
class Verdict:
    """One judgement: the decision, what a CONTINUE waits for, why a ROLLBACK."""

    decision: Decision
    waiting_for: str | None = None  # "traffic" | "evidence" while CONTINUE
    cause: Cause | None = None  # set on ROLLBACK
    reason: str = ""  # human, for deployment_error.reason and the log; "" on CONTINUE


_WAIT_TRAFFIC = Verdict(Decision.CONTINUE, waiting_for="traffic")
_WAIT_EVIDENCE = Verdict(Decision.CONTINUE, waiting_for="evidence")
_PROMOTE = Verdict(Decision.PROMOTE)


def judge(policy: CanaryPolicy, window: CanaryWindow, elapsed_s: float) -> Verdict:
    """Promote, roll back or keep waiting, given the window and the time since the canary was ready.

    Cheap when nothing is decided (a few comparisons; it returns a shared
    Verdict), so it may run after every request. A ROLLBACK or PROMOTE is
    final: the controller acts on it and stops judging this window.
    """
    can, old = window.canary, window.old
    over_gate = can.errors > policy.max_error_rate * can.requests
    if over_gate and window._log_mix >= -math.log(policy.alpha):
        return Verdict(Decision.ROLLBACK, cause=Cause.ERRORS, reason=_errors_reason(window))
    waiting = _WAIT_TRAFFIC
    if can.requests >= policy.requests:
        latency_on = policy.max_latency_ratio > 0
        if (latency_on or over_gate) and old.requests < policy.requests:
            waiting = _WAIT_EVIDENCE
        elif latency_on and _too_slow(policy, window):
            return Verdict(
                Decision.ROLLBACK, cause=Cause.LATENCY, reason=_latency_reason(policy, window)
            )
        else:
            return _PROMOTE
    if elapsed_s < policy.timeout_s:
        return waiting
    return Verdict(Decision.ROLLBACK, cause=Cause.TRAFFIC, reason=_timeout_reason(policy, window))


def _too_slow(policy: CanaryPolicy, window: CanaryWindow) -> bool:
    p99, old_p99 = window.canary.p99_s(), window.old.p99_s()
    if p99 is None or old_p99 is None:
        return False
    return p99 > policy.max_latency_ratio * old_p99


# -- reasons ----------------------------------------------------------------


def _errors_reason(window: CanaryWindow) -> str:
    can, old = window.canary, window.old
    return (
        f"canary: {can.errors} of {can.requests} requests failed"
        f" ({_percent(can.errors, can.requests)})"
        f" vs {old.errors} of {old.requests} ({_percent(old.errors, old.requests)})"
        " on the old generation"
    )


def _latency_reason(policy: CanaryPolicy, window: CanaryWindow) -> str:
    can, old = window.canary, window.old
    p99, old_p99 = can.p99_s() or 0.0, old.p99_s() or 0.0
    ratio = p99 / old_p99 if old_p99 else math.inf
    return (
        f"canary: p99 {_ms(p99)} ms over {can.requests} requests vs {_ms(old_p99)} ms"
        f" over {old.requests} on the old generation"
        f" ({ratio:.1f}x, limit {policy.max_latency_ratio:g}x)"
    )


def _timeout_reason(policy: CanaryPolicy, window: CanaryWindow) -> str:
    can, old = window.canary, window.old
    within = _duration(policy.timeout_s)
    if can.requests == 0:
        return (
            f"canary: no traffic in {within}: served 0 of the {policy.requests} requests needed"
            f" (the old generation served {old.requests})"
        )
    if can.requests < policy.requests:
        return (
            f"canary: too little traffic in {within}: served {can.requests} of the"
            f" {policy.requests} requests needed, {can.errors} failed"
            f" (the old generation served {old.requests})"
        )
    return (
        f"canary: too little traffic on the old generation in {within} to compare with:"
        f" it served {old.requests} of the {policy.requests} requests needed"
        f" (the canary served {can.requests}, {can.errors} failed)"
    )


def _percent(part: int, whole: int) -> str:
    # Whole percents from 10% up, one decimal below; never "0%" or "100%"
    # for a rate that is neither.
    if whole == 0 or part == 0:
        return "0%"
    if part == whole:
        return "100%"
    value = 100.0 * part / whole
    text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
    if text == "100":
        text = f"{min(value, 99.9):.1f}"
    elif text == "0":
        text = "<0.1"
    return text + "%"


def _ms(seconds: float) -> str:
    ms = seconds * 1000.0
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:g}s"
