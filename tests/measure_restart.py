"""Time to every worker new, and engine overhead per swap (issue 11 §3). Not a test.

Usage: ``.venv/bin/python -m tests.measure_restart [--workers 4 16] [--boot 1.0]
[--batch 1 auto] [--runs 3]``

A real daemon runs ``tests/apps/mem_worker.py`` with a fixed boot sleep and
serves light load (4 keep-alive clients) while ``POST /apps/app/restart``
replaces every worker. Figures come from the daemon's own log timestamps:

- ``all_new_s``: restart begin → the last old worker is drained (from then
  on every request goes to a new worker);
- ``duration_s``: restart begin → restart end (the last old worker exited);
- ``steps``: ⌈N / batch⌉; ``boot_s``: mean boot of the new workers (the
  slowest one when a single step starts them all);
- ``overhead_ms``: (all_new_s - steps * boot_s) / steps, the time per swap
  that is not the new worker booting;
- ``goal_s``: steps * boot_s + 0.4 (the issue's goal for all_new_s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
from typing import Any

from tests.support import MEM_WORKER, Daemon, LoadGen, eventually, log_events, running_daemon


def _ts(rec: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def one_run(d: Daemon, n: int) -> dict[str, float]:
    before = {len(log_events(d, e)) for e in ("restart begin",)}
    skip_begin = before.pop()
    skip_ready = len(log_events(d, "worker ready"))
    skip_drain = len(log_events(d, "draining worker"))
    code, body = d.admin_call("POST", "/apps/app/restart")
    assert code == 202, body
    rid = body["restart_id"]
    eventually(
        lambda: (d.app()["last_restart"] or {}).get("id") == rid and d.app()["restart"] is None,
        120,
        what="restart end",
    )
    last = d.app()["last_restart"]
    assert last["outcome"] == "completed", last
    begin = _ts(log_events(d, "restart begin")[skip_begin])
    end = _ts(log_events(d, "restart end")[-1])
    drains = log_events(d, "draining worker")[skip_drain:]
    readies = log_events(d, "worker ready")[skip_ready:]
    steps = math.ceil(n / last["batch"])
    # One step waits for its slowest boot; sequential steps add up their boots.
    boots = [r["boot_s"] for r in readies]
    boot = max(boots) if steps == 1 else statistics.mean(boots)
    all_new = _ts(drains[-1]) - begin
    return {
        "workers": n,
        "batch": last["batch"],
        "steps": steps,
        "boot_s": round(boot, 3),
        "all_new_s": round(all_new, 3),
        "duration_s": round(end - begin, 3),
        "goal_s": round(steps * boot + 0.4, 3),
        "overhead_ms": round((all_new - steps * boot) / steps * 1000, 1),
        "peak_rss_mb": round(last["peak_rss_bytes"] / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--boot", type=float, default=1.0)
    ap.add_argument("--batch", nargs="+", default=["1", "auto"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for n in args.workers:
        for batch in args.batch:
            app = {
                "command": MEM_WORKER,
                "workers": n,
                "restart_batch": batch if batch == "auto" else int(batch),
                "memory_reserve": "0",
                "start_timeout": "60s",
                "env": {"BOOT_S": str(args.boot)},
            }
            with running_daemon(app, daemon={"max_pool_size": 256}) as d:
                d.wait_ready(n, timeout=120)
                with LoadGen(d.front, clients=4, target="/?delay=0.005") as load:
                    rows = [one_run(d, n) for _ in range(args.runs)]
                assert load.failures() == {}, load.statuses
                for row in rows:
                    print(json.dumps({"restart_batch": batch, **row}))


if __name__ == "__main__":
    main()
