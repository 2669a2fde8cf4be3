"""Canary judge simulation (issue 12): false rollbacks, detection, time to rollback.

Run from the repository root::

    .venv/bin/python benchmarks/canary_sim.py [--runs 1000] [--seed 1]

Pure simulation of ``flypool.pool.canary_judge`` (no daemon). Each request goes to
the canary with probability ``share`` (one canary beside four old workers: 0.2),
fails at its generation's rate, takes a lognormal latency (median 20 ms, sigma 1);
``judge`` runs after every request (brute force: this also cross-checks the tests'
event-driven shortcut). Time to rollback at R req/s = requests since the canary was
ready / R. Flagger's figures follow its documented rule; they are not run.
Writes ``benchmarks/out/canary_sim.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

from flypool.pool.canary_judge import CanaryPolicy, CanaryWindow, Decision, judge

OUT = Path(__file__).resolve().parent / "out" / "canary_sim.json"
DEFAULT = CanaryPolicy()  # canary_requests 200, 10m, 1%, p99 ratio 2
LONG = CanaryPolicy(requests=2000, max_latency_ratio=0)  # the 2,000-request horizon
ERRORS_ONLY = CanaryPolicy(max_latency_ratio=0)
# The error test assumes a steady canary share. Shifts (first n requests at share s):
# the canary alone while the app idles (ties go to the newest generation); starved at first.
SHIFTS = ((100, 1.0), (1000, 0.05))
# Flagger (fluxcd/flagger docs/gitbook/usage/deployment-strategies.md, canary.go):
# analysis every `interval` (default 60s, at least 10s); rollback after `threshold`
# failed checks (the docs' examples use 5 or 10; 1 if unset), i.e. interval x threshold;
# the canary holds its first traffic step (stepWeight, 5-10% in the docs) while checks fail.
FLAGGER = {"interval_s": 60, "threshold": 5, "step_weight": 0.10}
Shift = tuple[int, float]
Rates = tuple[float, float]


# Lognormal latencies (median 20 ms, sigma 1) at evenly spaced quantiles: cheap to draw.
_NORMAL = statistics.NormalDist(math.log(0.020), 1.0)
LAT = [math.exp(_NORMAL.inv_cdf((i + 0.5) / 4096)) for i in range(4096)]


def deploy(
    rng: random.Random, policy: CanaryPolicy, rates: Rates, share: float, shift: Shift = (0, 0.0)
) -> tuple[Decision, str, int, int, int]:
    """One canary, judged after every request; ``rates`` = (canary, old) error rates.
    Returns decision, cause, canary requests, canary errors, all requests so far."""
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


def pct(values: list[int], q: float) -> int | None:
    """The q-quantile (nearest rank) or None."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def aa(
    rng: random.Random, runs: int, policy: CanaryPolicy, shift: Shift = (0, 0.0)
) -> dict[str, Any]:
    """Old and new alike (0.5% errors, same latency): how many are rolled back, and why."""
    causes: dict[str, int] = {}
    for _ in range(runs):
        decision, cause, *_ = deploy(rng, policy, (0.005, 0.005), 0.2, shift)
        if decision is Decision.ROLLBACK:
            causes[cause] = causes.get(cause, 0) + 1
    return {"shift": shift, "false_rollback_rate": sum(causes.values()) / runs, "by_cause": causes}


def detect(rng: random.Random, runs: int, share: float) -> dict[str, Any]:
    """Canary at 2% against 0.5%, canary_requests 2,000: caught, and after how many requests."""
    used = [
        n
        for d, _, n, _, _ in (deploy(rng, LONG, (0.02, 0.005), share) for _ in range(runs))
        if d is Decision.ROLLBACK
    ]
    rate = sum(n <= 2000 for n in used) / runs
    return {"share": share, "within_2000": rate, "median": pct(used, 0.5), "p95": pct(used, 0.95)}


def bad_release(rng: random.Random, runs: int, p_bad: float) -> dict[str, Any]:
    """A release failing p_bad of requests (old: none), default policy, canary = 1 of 5.
    Time and failed requests are over the runs rolled back for errors."""
    totals, failed = [], []
    for _ in range(runs):
        decision, cause, _, errors, total = deploy(rng, DEFAULT, (p_bad, 0.0), 0.2)
        if decision is Decision.ROLLBACK and cause == "errors":
            totals.append(total)
            failed.append(errors)
    flagger_s = FLAGGER["interval_s"] * FLAGGER["threshold"]
    row: dict[str, Any] = {
        "error_rate": p_bad,
        "runs": runs,
        "rolled_back": len(totals) / runs,
        "failed_median_p95": [pct(failed, 0.5), pct(failed, 0.95)],
    }
    for rate in (20, 200):
        row[f"seconds_median_p95_at_{rate}"] = [(pct(totals, q) or 0) / rate for q in (0.5, 0.95)]
        flagger_failed = round(rate * FLAGGER["step_weight"] * p_bad * flagger_s)
        row[f"flagger_seconds_failed_at_{rate}"] = [flagger_s, flagger_failed]
    return row


def hot_path() -> dict[str, float]:
    """ns per record() (success, error) and per judge() while waiting, on this machine."""
    window, err_window, policy, n = CanaryWindow(), CanaryWindow(), CanaryPolicy(), 200_000
    ok = min(timeit.repeat(lambda: window.record(False, 0.0213, False), number=n, repeat=3))
    err = min(timeit.repeat(lambda: err_window.record(True, 0.02, True), number=n, repeat=3))
    wait = min(timeit.repeat(lambda: judge(policy, window, 1.0), number=n, repeat=3))
    return {"record_ns": ok / n * 1e9, "record_error_ns": err / n * 1e9, "judge_ns": wait / n * 1e9}


def markdown(r: dict[str, Any]) -> str:
    """The summary as RESULTS.md tables."""
    rows = [
        ("A/A, default policy (200 req, 1%, p99 x2), sigma-1 latency", r["aa_default"]),
        ("A/A, 2,000-request canary (errors only)", r["aa_long"]),
        ("A/A, canary alone for its first 100 requests (errors only)", r["aa_shifted"][0]),
        ("A/A, canary share 0.05 for 1,000 requests, then 0.2", r["aa_shifted"][1]),
    ]
    out = ["| property | result | target |", "|---|---|---|"]
    out += [
        f"| {label}: false rollbacks | {a['false_rollback_rate']:.2%} {a['by_cause']} | < 1% |"
        for label, a in rows
    ]
    out += [
        f"| 2% vs 0.5% caught within 2,000 canary requests, share {d['share']} |"
        f" {d['within_2000']:.1%}; median {d['median']}, p95 {d['p95']} requests | >= 95% |"
        for d in (r["detect"], r["detect_share_half"])
    ]
    out += [
        "",
        "| bad release (old: 0%) | req/s | flypool: rolled back after, median (p95) |"
        " failed without canary retries, median (p95) | Flagger 1m x 5, step 10%: time, failed |",
        "|---|---|---|---|---|",
    ]
    for b in r["bad_releases"]:
        label = f"{b['error_rate']:.0%} of requests 5xx (rolled back: {b['rolled_back']:.1%})"
        for rate in (20, 200):
            (t50, t95), (f50, f95) = b[f"seconds_median_p95_at_{rate}"], b["failed_median_p95"]
            fs, ff = b[f"flagger_seconds_failed_at_{rate}"]
            out.append(
                f"| {label} | {rate} | {t50:.2f} s ({t95:.2f} s) | {f50} ({f95}) |"
                f" {fs / 60:.0f} min, {ff} |"
            )
    return "\n".join(out)


def main() -> None:
    """Run every scenario, write the JSON, print the tables."""
    parser = argparse.ArgumentParser(description="Canary judge simulation")
    parser.add_argument("--runs", type=int, default=1000, help="deploys per property")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng, started = random.Random(args.seed), time.perf_counter()
    result: dict[str, Any] = {
        "command": f"benchmarks/canary_sim.py --runs {args.runs} --seed {args.seed}",
        "runs": args.runs,
        "aa_default": aa(rng, args.runs, DEFAULT),
        "aa_long": aa(rng, args.runs, LONG),
        "aa_shifted": [aa(rng, args.runs, ERRORS_ONLY, shift) for shift in SHIFTS],
        "detect": detect(rng, args.runs, 0.2),
        "detect_share_half": detect(rng, args.runs, 0.5),
        "bad_releases": [bad_release(rng, args.runs, p) for p in (1.0, 0.05)],
        "flagger": FLAGGER,
        "hot_path": hot_path(),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
