"""Canary rollback of a bad release through a real daemon (issue 12): time and failed requests.

A daemon with 4 workers of `tests/apps/canary_worker.py` (release A: 200 after 20 ms),
`canary = 1` and the default `canary_*` keys. Paced keep-alive clients (at most 20 req/s
each) send GETs at 20 or 200 req/s, or POSTs at 200 req/s; `current` is pointed at release B
(500 on every request, `fail`, or on every 20th, `fail5`) and `POST /apps/app/restart` starts
the canary. Time to rollback: from the first status poll (every 20 ms) with the canary judging
(`restart.canary.waiting_for` not `ready`) to the first with `last_restart.outcome`
`rolled_back`. Failed: requests the clients saw fail, until the canary has left; a GET the
canary answers 5xx is answered by an old worker (canary retries, SPEC §6), a POST is not.
`--runs` runs per case, each on a fresh daemon; medians. Flagger: its documented rule, not run.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import harness as h

S = h.Suite("canary_rollback", "Canary rollback of a bad release, through the daemon", __doc__)
S.arg("--runs", type=int, default=3, help="runs per case, each on a fresh daemon (default 3)")
S.arg("--max-wait", type=float, default=60, help="s to wait for the decision (default 60)")

WORKER = h.REPO / "tests" / "apps" / "canary_worker.py"
CASES = [("fail", 20, "GET"), ("fail", 200, "GET"), ("fail", 200, "POST"),
         ("fail5", 20, "GET"), ("fail5", 200, "GET")]  # fmt: skip
ERROR_RATE = {"fail": 1.0, "fail5": 0.05}
PER_CLIENT = 20.0  # req/s: a request takes ~20 ms, one re-asked of an old worker ~40 ms


def point(base: Path, release: str) -> None:
    """``ln -sfn releases/RELEASE current``, atomically, as a deploy script does."""
    (tmp := base / "current.tmp").unlink(missing_ok=True)
    tmp.symlink_to(base / "releases" / release)
    tmp.replace(base / "current")


def paced(slot: list[float], gap: float, req: h.Req, conn: int, rng: Any) -> h.Req:
    """A one-client `Load`'s `pick` (partial of the first three): ``req`` at ``slot[0]``, then
    every ``gap`` s. The sleep blocks only that Load's own thread and loop: only this client."""
    time.sleep(max(0.0, slot[0] - time.monotonic()))
    slot[0] = max(slot[0] + gap, time.monotonic())  # late: no burst to catch up
    return req


def judging(app: dict[str, Any]) -> bool:
    """The canary is ready and judged (waiting for traffic or evidence, or deciding)."""
    r = app.get("restart") or {}
    return r.get("phase") == "canary" and (r.get("canary") or {}).get("waiting_for") != "ready"


def ended(app: dict[str, Any]) -> bool:
    """The restart is over (a fresh daemon has no last_restart before it)."""
    return app.get("restart") is None and app.get("last_restart") is not None


def deploy(bad: str, rate: int, method: str, wait: float) -> dict[str, Any]:
    """One deploy of release B under load on a fresh daemon: its timings and failures."""
    base, out = h.tmpdir(), {}
    try:
        for release, behaviour in (("A", "ok"), ("B", bad)):
            (base / "releases" / release).mkdir(parents=True)
            (base / "releases" / release / "behaviour").write_text(behaviour)
        point(base, "A")
        argv = [h.PY, WORKER, "{socket}"]
        with h.start_flypool(argv, workers=4, root=base / "current", canary=1) as fp:
            old, n = {w["pid"] for w in h.ready(fp.app())}, math.ceil(rate / PER_CLIENT)
            gap, req = n / rate, h.get("/") if method == "GET" else h.post("/", b"x" * 10)
            t0 = time.monotonic()
            loads = [h.Load(fp.listen, 1, partial(paced, [t0 + i * gap / n], gap, req),
                            duration=wait + 30, seed=i).start() for i in range(n)]  # fmt: skip
            poller = h.Poller(fp, t0, 0.02).start()
            try:
                point(base, "B")
                fp.restart()
                h.poll(lambda: poller.first(0, ended), wait, "the decision", fp.proc.exited)
                # The load goes on until the canary has left: its retirement counts too.
                out["old_kept"] = h.poll(
                    lambda: {w["pid"] for w in fp.app()["workers"]} == old or None, 30,
                    "the old workers alone", fp.proc.exited)  # fmt: skip
            except h.BenchError as err:
                if fp.proc.exited():
                    raise
                out["error"] = str(err)  # no decision in time: recorded, not fatal
            finally:
                poller.stop()
                for load in loads:
                    load.stop()
                recs = [r for load in loads for r in load.join()]
            # The rate kept: requests over the time up to one slot after the last one's start.
            span = max((ld.t0 + r.start for ld in loads for r in ld.recs), default=t0) - t0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ready, end = poller.first(0, judging), poller.first(0, ended)
    app, st = next((a for _, a in poller.polls if ended(a)), {}), h.stats(recs)
    return out | {"ready_s": ready, "end_s": end, "took_s": None if ready is None else
                  h.minus(end, ready), "outcome": (app.get("last_restart") or {}).get("outcome"),
                  "reason": (app.get("deployment_error") or {}).get("reason"),
                  "requests": st["requests"], "failed": st["failed"], "kinds": h.kinds(recs),
                  "rate": st["requests"] / (span + 1 / rate)}  # fmt: skip


def run(s: h.Suite, a: Any) -> None:
    """Every case `--runs` times; one table, the Flagger rule, three checks."""
    rows, worst = [], {}
    for bad, rate, method in CASES:
        h.log(f"canary_rollback: {(key := f'{bad} {rate} req/s {method}')}")
        runs = s.data[key] = [deploy(bad, rate, method, a.max_wait) for _ in range(a.runs)]
        back = [r for r in runs if r["outcome"] == "rolled_back"]
        took = [r["took_s"] for r in back if r["took_s"] is not None]
        failed = [r["failed"] for r in runs]
        counts = [re.match(r"canary: (\d+) of (\d+) ", r["reason"] or "") for r in back]
        errs, served = ([int(m[i]) for m in counts if m] for i in (1, 2))
        worst[key] = (max(took) if len(took) == len(runs) else None, max(failed))
        # Flagger (as canary_sim.py): 1 min x threshold 5 (docs' examples) or 1, stepWeight 10%.
        lost = [round(rate * 0.10 * ERROR_RATE[bad] * t) for t in (300, 60)]
        kept = sum(bool(r.get("old_kept")) for r in runs)
        rows.append([f"`{bad}` ({ERROR_RATE[bad]:.0%} 500)", f"{rate} {method}",
            f"{h.median(r['rate'] for r in runs):.0f}", f"{len(back)}/{len(runs)} ({kept})",
            f"{h.num(h.median(took), 2)} ({h.num(max(took, default=None), 2)})",
            f"{h.median(failed):.0f} ({max(failed)})",
            f"{h.num(h.median(errs), 0)} of {h.num(h.median(served), 0)}",
            f"5 min, {lost[0]:,} (1 min, {lost[1]:,})"])  # fmt: skip
    s.md(h.table("release B|load, req/s|measured req/s>|rolled back (old workers kept)|ready to "
                 "rollback s, median (max)>|failed, median (max)>|canary: failed of served>|"
                 "Flagger 1 min x 5 (x 1), step 10%: time, failed>", rows))  # fmt: skip
    s.md("Flagger column: its documented rule, not run. Flagger analyses every `interval` (default"
         " 1 min, at least 10 s) and rolls back after `threshold` failed checks (the docs' examples"
         " use 5 or 10; 1 if unset), i.e. after interval x threshold = 5 min (1 min unset), while "
         "the canary holds its first traffic step (stepWeight, 5-10% in the docs; 10% here): failed"
         " = req/s x 10% x error rate x time, GETs and POSTs alike (it re-asks nothing). flypool "
         "judges after every request, so its time falls as traffic grows and its failed requests "
         "do not.")  # fmt: skip
    s.check("500 on every request, 20 req/s of GETs: canary ready to rollback (slowest run)",
            worst["fail 20 req/s GET"][0], "< 5 s", digits=2)  # fmt: skip
    gets = sum(r["failed"] for k, runs in s.data.items() if k.endswith("GET") for r in runs)
    s.check("failed GETs, every bad-release run (canary retries)", gets, "== 0", hard=True)
    s.check("failed POSTs, release answering 500 on every request, 200 req/s (worst run)",
            worst["fail 200 req/s POST"][1], "< 50", hard=True)  # fmt: skip


if __name__ == "__main__":
    S.main(run)
