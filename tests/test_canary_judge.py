"""The canary verdict (SPEC §7): every decision path, the reason formats, and the
issue's two simulation properties (A/A false rollbacks, detection of 2% vs 0.5%)."""

from __future__ import annotations

import json
import math
import random
import re
from statistics import NormalDist

import pytest

from flypool.pool.canary_judge import (
    CanaryPolicy,
    CanaryWindow,
    Cause,
    Decision,
    GenerationStats,
    Verdict,
    judge,
)

pytestmark = pytest.mark.timeout(30)

FAST = 0.020  # 20 ms


def feed(
    window: CanaryWindow,
    canary: int,
    canary_errors: int,
    old: int,
    old_errors: int,
    canary_latency: float = FAST,
    old_latency: float = FAST,
) -> None:
    """Interleave requests evenly, errors spread evenly within each side."""
    total = canary + old
    c_done = o_done = c_err = o_err = 0
    for i in range(total):
        if old == 0 or (canary and c_done * total < (i + 1) * canary and c_done < canary):
            c_done += 1
            err = c_err * canary < c_done * canary_errors
            c_err += err
            window.record(True, canary_latency, err)
        else:
            o_done += 1
            err = o_err * old < o_done * old_errors
            o_err += err
            window.record(False, old_latency, err)
    assert (c_done, c_err, o_done, o_err) == (canary, canary_errors, old, old_errors)


class TestGenerationStats:
    def test_counts_and_p99_within_bucket_resolution(self) -> None:
        """p99 of 1..1000 ms is about 990 ms, within the 2^(1/8) bucket width."""
        stats = GenerationStats()
        for ms in range(1, 1001):
            stats.record(ms / 1000.0, ms % 100 == 0)
        assert (stats.requests, stats.errors) == (1000, 10)
        p99 = stats.p99_s()
        assert p99 is not None and abs(p99 / 0.990 - 1) < 0.1
        median = stats.quantile_s(0.5)
        assert median is not None and abs(median / 0.5 - 1) < 0.1

    def test_empty_has_no_p99(self) -> None:
        """No request, no percentile."""
        assert GenerationStats().p99_s() is None

    def test_extreme_latencies_are_clamped_not_lost(self) -> None:
        """Zero, negative and absurd latencies land in the end buckets; nothing grows."""
        stats = GenerationStats()
        for latency in (0.0, -1.0, 1e-9, 1e9, math.inf):
            stats.record(latency, False)
        assert stats.requests == 5
        state = stats.to_state()
        assert sum(state["buckets"].values()) == 5
        assert set(state["buckets"]) == {"0", "255"}

    def test_state_round_trip(self) -> None:
        """to_state/from_state keeps counts and percentiles, through JSON."""
        stats = GenerationStats()
        for i in range(300):
            stats.record(0.001 * (1 + i % 37), i % 50 == 0)
        copy = GenerationStats.from_state(json.loads(json.dumps(stats.to_state())))
        assert (copy.requests, copy.errors, copy.p99_s()) == (
            stats.requests,
            stats.errors,
            stats.p99_s(),
        )


class TestPolicy:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"requests": 0},
            {"timeout_s": 0},
            {"max_error_rate": 1.0},
            {"max_error_rate": -0.1},
            {"max_latency_ratio": -1},
            {"alpha": 0.0},
        ],
    )
    def test_rejects_nonsense(self, kwargs: dict[str, float]) -> None:
        """Values no config should produce are refused."""
        with pytest.raises(ValueError):
            CanaryPolicy(**kwargs)  # type: ignore[arg-type]


class TestNoTraffic:
    def test_waits_for_traffic_then_rolls_back_at_timeout(self) -> None:
        """No traffic is no evidence: wait, then roll back saying there was no traffic."""
        policy = CanaryPolicy()
        window = CanaryWindow()
        verdict = judge(policy, window, 599.9)
        assert verdict == Verdict(Decision.CONTINUE, waiting_for="traffic")
        assert window.status(verdict)["waiting_for"] == "traffic"
        verdict = judge(policy, window, 600.0)
        assert verdict.decision is Decision.ROLLBACK and verdict.cause is Cause.TRAFFIC
        assert verdict.reason == (
            "canary: no traffic in 10m: served 0 of the 200 requests needed"
            " (the old generation served 0)"
        )

    def test_too_little_traffic_at_timeout(self) -> None:
        """Some traffic but fewer than canary_requests: rolled back at the timeout, saying so."""
        policy = CanaryPolicy(timeout_s=30)
        window = CanaryWindow()
        feed(window, 57, 0, 231, 0)
        assert judge(policy, window, 29).waiting_for == "traffic"
        verdict = judge(policy, window, 30)
        assert verdict.cause is Cause.TRAFFIC
        assert verdict.reason == (
            "canary: too little traffic in 30s: served 57 of the 200 requests needed, 0 failed"
            " (the old generation served 231)"
        )

    def test_old_generation_without_traffic_is_no_comparison(self) -> None:
        """With latency judged, the canary waits for the old generation's requests."""
        policy = CanaryPolicy(timeout_s=90)
        window = CanaryWindow()
        feed(window, 250, 0, 12, 0)
        verdict = judge(policy, window, 10)
        assert verdict == Verdict(Decision.CONTINUE, waiting_for="evidence")
        verdict = judge(policy, window, 90)
        assert verdict.cause is Cause.TRAFFIC
        assert verdict.reason == (
            "canary: too little traffic on the old generation in 90s to compare with:"
            " it served 12 of the 200 requests needed (the canary served 250, 0 failed)"
        )

    def test_old_generation_not_needed_when_nothing_to_compare(self) -> None:
        """Latency ignored and the canary below the error gate: promoted on its own requests."""
        window = CanaryWindow()
        feed(window, 200, 0, 0, 0)
        assert judge(CanaryPolicy(max_latency_ratio=0), window, 1).decision is Decision.PROMOTE


class TestErrors:
    def test_reason_in_spec_format(self) -> None:
        """SPEC §7's own example numbers give SPEC §7's own sentence."""
        window = CanaryWindow()
        feed(window, 57, 57, 231, 0)
        verdict = judge(CanaryPolicy(), window, 3.0)
        assert verdict.decision is Decision.ROLLBACK and verdict.cause is Cause.ERRORS
        assert verdict.reason == (
            "canary: 57 of 57 requests failed (100%) vs 0 of 231 (0%) on the old generation"
        )

    def test_fractional_percentages(self) -> None:
        """Small and near-total rates keep a decimal instead of rounding to 0% or 100%."""
        window = CanaryWindow()
        feed(window, 200, 199, 5000, 1)
        verdict = judge(CanaryPolicy(), window, 3.0)
        assert verdict.reason == (
            "canary: 199 of 200 requests failed (99.5%) vs 1 of 5000 (<0.1%) on the old generation"
        )
        window = CanaryWindow()
        feed(window, 200, 30, 231, 1)
        assert re.search(r"\(15%\) vs 1 of 231 \(0\.4%\)", judge(CanaryPolicy(), window, 1).reason)

    def test_release_that_fails_every_request_goes_within_a_few_requests(self) -> None:
        """A 100% failing canary at a fifth of the traffic is rolled back after a handful."""
        policy = CanaryPolicy()
        window = CanaryWindow()
        for i in range(200):
            window.record(False, FAST, False)
            if i % 4 == 3:
                window.record(True, FAST, True)
                if judge(policy, window, 1.0).decision is Decision.ROLLBACK:
                    break
        assert window.canary.requests <= 8, window.canary.requests

    def test_one_early_error_does_not_roll_back(self) -> None:
        """A single 5xx on the canary's first request is far from enough evidence."""
        policy = CanaryPolicy()
        window = CanaryWindow()
        window.record(True, FAST, True)
        assert judge(policy, window, 0.1) == Verdict(Decision.CONTINUE, waiting_for="traffic")
        feed(window, 10, 1, 40, 0)
        assert judge(policy, window, 0.5).decision is Decision.CONTINUE
        assert window.evidence < 1 / policy.alpha

    def test_five_percent_against_none_rolls_back(self) -> None:
        """The issue's 5%-failing release against a clean old generation is rolled back."""
        policy = CanaryPolicy()
        window = CanaryWindow()
        for n in range(1, 201):
            for _ in range(4):
                window.record(False, FAST, False)
            window.record(True, FAST, n % 20 == 0)
            if judge(policy, window, 1.0).decision is not Decision.CONTINUE:
                break
        verdict = judge(policy, window, 1.0)
        assert verdict.decision is Decision.ROLLBACK and verdict.cause is Cause.ERRORS

    def test_as_bad_as_the_old_generation_is_promoted(self) -> None:
        """Above the max rate but no worse than the old generation: not the canary's fault."""
        window = CanaryWindow()
        feed(window, 200, 6, 800, 24)
        assert judge(CanaryPolicy(), window, 1).decision is Decision.PROMOTE

    def test_worse_than_old_but_under_the_max_rate_is_promoted(self) -> None:
        """The gate: 0.5% on the canary against none on the old generation is within 1%."""
        window = CanaryWindow()
        feed(window, 400, 2, 1600, 0)
        assert judge(CanaryPolicy(requests=400), window, 1).decision is Decision.PROMOTE

    def test_over_the_gate_waits_for_old_generation_evidence(self) -> None:
        """Above the gate at canary_requests with no old traffic to compare: wait, don't promote."""
        window = CanaryWindow()
        feed(window, 200, 10, 0, 0)
        verdict = judge(CanaryPolicy(max_latency_ratio=0), window, 1)
        assert verdict == Verdict(Decision.CONTINUE, waiting_for="evidence")


class TestPromote:
    def test_identical_release_promoted_at_canary_requests(self) -> None:
        """Same errors, same latency: waits for traffic until canary_requests, then promotes."""
        policy = CanaryPolicy()
        window = CanaryWindow()
        feed(window, 199, 0, 796, 0)
        assert judge(policy, window, 5).waiting_for == "traffic"
        window.record(True, FAST, False)
        for _ in range(4):
            window.record(False, FAST, False)
        assert judge(policy, window, 5).decision is Decision.PROMOTE

    def test_decision_beats_timeout(self) -> None:
        """Enough evidence at the deadline is judged, not timed out."""
        window = CanaryWindow()
        feed(window, 200, 0, 800, 0)
        assert judge(CanaryPolicy(timeout_s=1), window, 99).decision is Decision.PROMOTE


class TestLatency:
    def test_three_times_slower_p99_rolls_back(self) -> None:
        """p99 3x the old one with ratio 2: rolled back, the reason gives both p99s."""
        window = CanaryWindow()
        feed(window, 200, 0, 800, 0, canary_latency=0.300, old_latency=0.100)
        verdict = judge(CanaryPolicy(max_latency_ratio=2), window, 5)
        assert verdict.decision is Decision.ROLLBACK and verdict.cause is Cause.LATENCY
        assert re.fullmatch(
            r"canary: p99 (\d+) ms over 200 requests vs (\d+) ms over 800 on the old generation"
            r" \((\d\.\d)x, limit 2x\)",
            verdict.reason,
        ), verdict.reason

    def test_only_the_tail_slower(self) -> None:
        """2% of canary requests 10x slower moves p99 only: still rolled back."""
        rng = random.Random(7)
        window = CanaryWindow()
        for i in range(1000):
            base = rng.uniform(0.010, 0.030)
            if i % 5 == 0:
                window.record(True, base * (10 if i % 250 < 25 else 1), False)
            else:
                window.record(False, base, False)
        verdict = judge(CanaryPolicy(max_latency_ratio=2), window, 5)
        assert verdict.cause is Cause.LATENCY

    def test_identical_latency_promoted_and_ratio_zero_ignores(self) -> None:
        """Same latencies promote; ratio 0 ignores a 3x slowdown."""
        window = CanaryWindow()
        feed(window, 200, 0, 800, 0)
        assert judge(CanaryPolicy(max_latency_ratio=2), window, 5).decision is Decision.PROMOTE
        window = CanaryWindow()
        feed(window, 200, 0, 800, 0, canary_latency=0.3, old_latency=0.1)
        assert judge(CanaryPolicy(max_latency_ratio=0), window, 5).decision is Decision.PROMOTE

    def test_latency_not_judged_before_canary_requests(self) -> None:
        """A slow start alone is not a verdict: latency waits for canary_requests."""
        window = CanaryWindow()
        feed(window, 150, 0, 800, 0, canary_latency=1.0, old_latency=0.1)
        assert judge(CanaryPolicy(), window, 5).decision is Decision.CONTINUE


class TestStatusAndState:
    def test_status_fields(self) -> None:
        """The numbers SPEC §8 shows under restart.canary."""
        window = CanaryWindow()
        feed(window, 10, 1, 40, 0, canary_latency=0.05, old_latency=0.01)
        status = window.status(judge(CanaryPolicy(), window, 1))
        assert set(status) == {
            "requests",
            "errors",
            "p99_ms",
            "old_requests",
            "old_errors",
            "old_p99_ms",
            "waiting_for",
        }
        assert (status["requests"], status["errors"]) == (10, 1)
        assert (status["old_requests"], status["old_errors"]) == (40, 0)
        assert 45 < status["p99_ms"] < 55 and 9 < status["old_p99_ms"] < 11
        assert status["waiting_for"] == "traffic"
        assert CanaryWindow().status(judge(CanaryPolicy(), CanaryWindow(), 0))["p99_ms"] is None

    def test_state_survives_handover(self) -> None:
        """A window rebuilt from its JSON state carries the same evidence and verdict (USR2)."""
        window = CanaryWindow()
        feed(window, 30, 6, 120, 0)
        copy = CanaryWindow.from_state(json.loads(json.dumps(window.to_state())))
        assert copy.evidence == pytest.approx(window.evidence)
        assert judge(CanaryPolicy(), copy, 1) == judge(CanaryPolicy(), window, 1)
        copy.record(True, FAST, True)
        window.record(True, FAST, True)
        assert copy.evidence == pytest.approx(window.evidence)


# -- simulation ---------------------------------------------------------------
#
# Routing is random: each request goes to the canary with probability `share`
# (one canary beside four old workers: 0.2). The verdict can only turn into an
# error rollback right after a canary error (the gate and the evidence rise
# only then), and into a promotion once the canary has served canary_requests,
# so judging at those moments is the same as judging after every request.


def _geometric(rng: random.Random, p: float) -> int:
    """Trials up to and including the first success."""
    if p <= 0:
        return 1 << 62
    return int(math.log(1.0 - rng.random()) / math.log1p(-p)) + 1


def lognormal_table(sigma: float, size: int = 4096) -> list[float]:
    """Latencies at evenly spaced quantiles of a lognormal with median 20 ms: drawing an
    index uniformly is drawing from the lognormal, at a fraction of the cost."""
    normal = NormalDist(math.log(0.020), sigma)
    return [math.exp(normal.inv_cdf((i + 0.5) / size)) for i in range(size)]


def simulate(
    rng: random.Random,
    policy: CanaryPolicy,
    p_canary: float,
    p_old: float,
    share: float,
    latencies: list[float] | None = None,
) -> tuple[Decision, int]:
    """One deploy: the decision and the canary requests it took.

    With ``latencies`` (a table to draw from), every request is recorded with
    its latency; without, successes are only counted (latency is not judged).
    """
    window = CanaryWindow()
    can, old = window.canary, window.old
    uniform, log = rng.random, math.log
    per_old = 1.0 / math.log1p(-share)
    next_c, next_o = _geometric(rng, p_canary), _geometric(rng, p_old)
    while True:
        # The old requests before the next canary request.
        olds = int(log(1.0 - uniform()) * per_old)
        if latencies is None:
            target = old.requests + olds
            while next_o <= target:
                old.requests = next_o - 1
                window.record(False, FAST, True)
                next_o += _geometric(rng, p_old)
            old.requests = target
        elif olds:
            for latency in rng.choices(latencies, k=olds):
                error = old.requests + 1 == next_o
                if error:
                    next_o += _geometric(rng, p_old)
                window.record(False, latency, error)
        error = can.requests + 1 == next_c
        if error:
            next_c += _geometric(rng, p_canary)
        if latencies is not None:
            window.record(True, latencies[int(uniform() * len(latencies))], error)
        elif error:
            window.record(True, FAST, True)
        else:
            can.requests += 1
        if error or can.requests >= policy.requests:
            verdict = judge(policy, window, 0.0)
            if verdict.decision is not Decision.CONTINUE:
                return verdict.decision, can.requests


class TestSimulation:
    def test_aa_default_policy_with_latency(self) -> None:
        """A/A, 1,000 deploys, 0.5% errors and lognormal latency (sigma 1) on both, default
        policy (200 requests, 1%, p99 ratio 2): fewer than 1% rolled back."""
        rng = random.Random(20261122)
        policy = CanaryPolicy()
        table = lognormal_table(1.0)
        rollbacks = sum(
            simulate(rng, policy, 0.005, 0.005, 0.2, table)[0] is Decision.ROLLBACK
            for _ in range(1000)
        )
        assert rollbacks < 10, rollbacks

    def test_aa_long_canary(self) -> None:
        """A/A, 1,000 deploys of 2,000 canary requests each (errors judged after every one):
        fewer than 1% rolled back."""
        rng = random.Random(12)
        policy = CanaryPolicy(requests=2000, max_latency_ratio=0)
        rollbacks = sum(
            simulate(rng, policy, 0.005, 0.005, 0.2)[0] is Decision.ROLLBACK for _ in range(1000)
        )
        assert rollbacks < 10, rollbacks

    def test_detects_two_percent_against_half_a_percent(self) -> None:
        """2% against 0.5%: rolled back within 2,000 canary requests in at least 95% of runs."""
        rng = random.Random(5)
        policy = CanaryPolicy(requests=2000, max_latency_ratio=0)
        caught = 0
        for _ in range(1000):
            decision, used = simulate(rng, policy, 0.02, 0.005, 0.2)
            caught += decision is Decision.ROLLBACK and used <= 2000
        assert caught >= 950, caught
