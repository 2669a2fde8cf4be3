"""Canary judge simulation (issue 12): false rollbacks, detection, time to rollback.

A pure simulation of `flypool.pool.canary_judge` (no daemon), `--runs` deploys per row.
Each request goes to the canary with probability `share` (one canary beside four old
workers: 0.2), fails at its generation's rate and takes a lognormal latency (median
20 ms, sigma 1); `judge` runs after every request (brute force: this also cross-checks
the tests' event-driven shortcut). A/A: both generations fail 0.5% of requests, under
the default policy (200 requests, 1%, p99 x 2), a 2,000-request canary (errors only) and
two shifts of the share (errors only; the error test assumes a steady share): the canary
alone for its first 100 requests (ties go to the newest generation while the app idles),
and starved (share 0.05) for its first 1,000. Detection: a canary failing 2% against
0.5%, `canary_requests` 2,000. Bad releases (old: 0% errors), default policy: time to
rollback at R req/s = requests since the canary was ready / R; failed = the canary's
errors (no canary retries). Flagger's figures are its documented rule, not a run: see
below the table.
"""

from __future__ import annotations

import math
import random
import statistics
import timeit
from collections import Counter
from typing import Any

import harness as h

from flypool.pool.canary_judge import CanaryPolicy, CanaryWindow, Decision, judge

S = h.Suite("canary_sim", "Canary judge: false rollbacks, detection, time to rollback", __doc__)
S.arg("--runs", type=int, default=1000, help="simulated deploys per row (default 1000)")
S.arg("--seed", type=int, default=1, help="random seed (default 1)")

DEFAULT = CanaryPolicy()  # canary_requests 200, 10m, 1%, p99 ratio 2
LONG = CanaryPolicy(requests=2000, max_latency_ratio=0)  # the 2,000-request horizon
ERRORS_ONLY = CanaryPolicy(max_latency_ratio=0)
# Flagger (fluxcd/flagger docs/gitbook/usage/deployment-strategies.md, canary.go): analysis
# every `interval` (default 1m), rollback after `threshold` failed checks (5 in the docs'
# examples) at the first traffic step (stepWeight, 10% in the docs).
FLAGGER_S, FLAGGER_STEP = 60 * 5, 0.10
# Lognormal latencies at evenly spaced quantiles: cheap to draw.
_NORMAL = statistics.NormalDist(math.log(0.020), 1.0)
LAT = [math.exp(_NORMAL.inv_cdf((i + 0.5) / 4096)) for i in range(4096)]


def deploy(
    rng: random.Random, policy: CanaryPolicy, rates: tuple[float, float], share: float,
    shift: tuple[int, float] = (0, 0.0),
) -> tuple[Decision, str, int, int, int]:  # fmt: skip
    """One canary judged after every request; ``rates`` = (canary, old) error rates, the
    share is ``shift[1]`` for the first ``shift[0]`` requests. Returns the decision, its
    cause, the canary's requests and errors, and all requests so far."""
    window, uniform, size, seen = CanaryWindow(), rng.random, len(LAT), 0
    while True:
        seen += 1
        on_canary = uniform() < (shift[1] if seen <= shift[0] else share)
        error = uniform() < rates[0 if on_canary else 1]
        window.record(on_canary, LAT[int(uniform() * size)], error)
        verdict = judge(policy, window, 0.0)
        if verdict.decision is not Decision.CONTINUE:
            can, cause = window.canary, verdict.cause.value if verdict.cause else ""
            return verdict.decision, cause, can.requests, can.errors, seen


def hot_path() -> dict[str, float]:
    """ns per record() (success, error) and per judge() while waiting, on this machine."""
    ok, bad, policy, n = CanaryWindow(), CanaryWindow(), CanaryPolicy(), 200_000
    calls = {
        "record_ns": lambda: ok.record(False, 0.0213, False),
        "record_error_ns": lambda: bad.record(True, 0.02, True),
        "judge_ns": lambda: judge(policy, ok, 1.0),
    }
    return {k: min(timeit.repeat(f, number=n, repeat=3)) / n * 1e9 for k, f in calls.items()}


def run(s: h.Suite, a: Any) -> None:
    """A/A, detection and bad releases, in this order from one seeded stream."""
    rng, runs = random.Random(a.seed), a.runs
    aa = [("default policy", DEFAULT, (0, 0.0)), ("2,000-request canary", LONG, (0, 0.0)),
          ("canary alone for 100 requests", ERRORS_ONLY, (100, 1.0)),
          ("canary share 0.05 for 1,000 requests", ERRORS_ONLY, (1000, 0.05))]  # fmt: skip
    for label, policy, shift in aa:
        results = (deploy(rng, policy, (0.005, 0.005), 0.2, shift) for _ in range(runs))
        causes = Counter(cause for d, cause, *_ in results if d is Decision.ROLLBACK)
        rate = causes.total() / runs
        s.data[f"aa {label}"] = {"false_rollback_rate": rate, "by_cause": causes}
        why = ", ".join(f"{k} {n}" for k, n in causes.items()) or "none"
        s.check(f"A/A (0.5% errors both), {label}: false rollbacks over {runs:,} deploys",
                rate * 100, "< 1%", f"{rate:.1%} ({why})", digits=1)  # fmt: skip
    caught = []
    for share in (0.2, 0.5):
        results = (deploy(rng, LONG, (0.02, 0.005), share) for _ in range(runs))
        used = [n for d, _, n, _, _ in results if d is Decision.ROLLBACK]
        pc = sum(n <= 2000 for n in used) / runs * 100
        caught.append([f"{share}", f"{pc:.1f}%", round(h.pct(used, 50) or 0),
                       round(h.pct(used, 95) or 0)])  # fmt: skip
        s.data[f"detect share {share}"] = {"within_2000": pc / 100, "rollback_after": used}
        if share == 0.2:
            s.check(f"2% vs 0.5% errors rolled back within 2,000 canary requests, canary "
                    f"share 0.2 ({runs:,} runs)", pc, ">= 95%", f"{pc:.1f}%", digits=1)  # fmt: skip
    s.md(h.table("2% vs 0.5% errors: canary share|rolled back within 2,000 canary requests>|"
                 "canary requests to rollback, median>|p95>", caught))  # fmt: skip
    s.md("The target is for share 0.2 (one canary beside four old workers). At 0.5 an error "
         "on the canary is less surprising and the old generation serves 2,000 requests, not "
         "8,000, while the canary serves 2,000: the evidence grows more slowly.")  # fmt: skip
    rows = []
    for p_bad in (1.0, 0.05):
        results = (deploy(rng, DEFAULT, (p_bad, 0.0), 0.2) for _ in range(runs))
        done = [(n, e) for d, c, _, e, n in results if d is Decision.ROLLBACK and c == "errors"]
        s.data[f"bad {p_bad}"] = {"runs": runs, "rolled_back_after_failed": done}
        totals, failed = [n for n, _ in done], [e for _, e in done]
        label = f"{p_bad:.0%} of requests 5xx (rolled back: {len(done) / runs:.1%})"
        for rate in (20, 200):
            t50, t95 = ((h.pct(totals, q) or 0) / rate for q in (50, 95))
            flagger = round(rate * FLAGGER_STEP * p_bad * FLAGGER_S)
            rows.append([label, rate, f"{t50:.2f} s ({t95:.2f} s)",
                         f"{h.pct(failed, 50) or 0:.0f} ({h.pct(failed, 95) or 0:.0f})",
                         f"{FLAGGER_S // 60} min, {flagger:,}"])  # fmt: skip
    s.md(h.table("bad release (old: 0%)|req/s>|flypool: rolled back after, median (p95)>|"
                 "failed, median (p95)>|Flagger 1 min x 5, step 10%: time, failed>",
                 rows))  # fmt: skip
    s.md("Flagger column: its documented rule, not run. Flagger analyses every `interval` "
         "(default 1 min, at least 10 s) and rolls back after `threshold` failed checks (the "
         "docs' examples use 5 or 10; 1 if unset), i.e. after interval x threshold = 5 min here, "
         "while the canary holds its first traffic step (stepWeight, 5-10% in the docs; 10% "
         "here): failed = req/s x 10% x error rate x 300 s. flypool judges after every request, "
         "so its time falls as traffic grows and its failed requests do not.")  # fmt: skip
    s.data["hot_path"] = ns = hot_path()
    s.md(f"Cost on this machine: `record()` {ns['record_ns']:.0f} ns (an error: "
         f"{ns['record_error_ns']:.0f} ns), `judge()` while waiting {ns['judge_ns']:.0f} "
         "ns.")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
