"""Elastic pool under a 4x step in load (issue 11 §4). Not a test.

Usage: ``.venv/bin/python -m tests.measure_elastic [--steady 60] [--boot 0.3]``

One app, ``workers = 1``, ``max_workers = 8``, ``worker_concurrency = 1``,
workers of ``tests/apps/mem_worker.py`` that boot in ``--boot`` seconds and
answer after 50 ms. Load is closed-loop keep-alive clients: 2 for 10 s, then
8 (a 4x step) for ``--steady`` seconds. Queue waits come from the access log
(``queue_ms`` per request). Printed as JSON:

- ``recovered_s``: from the step until the first 1 s window whose p99 queue
  wait is under 100 ms and stays so for the rest of the run;
- ``scale_events_steady``: elastic scale events after the pool settled
  (from 15 s after the step), and the same per hour.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from tests.support import MEM_WORKER, LoadGen, running_daemon, short_dir


def _records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _ts(rec: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steady", type=float, default=60.0)
    ap.add_argument("--boot", type=float, default=0.3)
    args = ap.parse_args()
    d_dir = Path(short_dir())
    log = d_dir / "flypool.log"
    app = {
        "command": MEM_WORKER,
        "workers": 1,
        "max_workers": 8,
        "worker_concurrency": 1,
        "max_queue": 1000,
        "env": {"BOOT_S": str(args.boot)},
    }
    with running_daemon(
        app, daemon={"log_file": str(log), "access_log": "-"}, directory=d_dir
    ) as d:
        with LoadGen(d.front, clients=2, target="/?delay=0.05") as base:
            time.sleep(10)
            step_at = time.time()
            with LoadGen(d.front, clients=6, target="/?delay=0.05") as extra:
                time.sleep(args.steady)
            end = time.time()
        failures = {**base.failures(), **extra.failures()}
        recs = _records(log)
        waits: dict[int, list[float]] = {}
        for r in recs:
            if r.get("event") == "request" and _ts(r) >= step_at:
                waits.setdefault(int(_ts(r) - step_at), []).append(r["queue_ms"])
        p99 = {sec: _p99(v) for sec, v in sorted(waits.items())}
        bad = [sec for sec, v in p99.items() if v >= 100.0]
        recovered = (max(bad) + 1) if bad else 0
        settled = step_at + 15
        steady_events = [
            r
            for r in recs
            if r.get("event", "").startswith("elastic scale") and settled <= _ts(r) <= end
        ]
        span = max(1.0, end - settled)
        print(
            json.dumps(
                {
                    "boot": args.boot,
                    "recovered_s": recovered,
                    "p99_queue_ms_by_second": {k: round(v, 1) for k, v in p99.items()},
                    "workers_target": d.app()["workers_target"],
                    "scale_events_steady": len(steady_events),
                    "scale_events_per_hour": round(len(steady_events) * 3600 / span, 1),
                    "failures": {str(k): v for k, v in failures.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
