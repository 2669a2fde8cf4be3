"""The elastic pool (SPEC §10) through a real daemon: a 4x step in load, scale events under
steady load, failed requests across many scale-downs.

Each daemon runs the example worker, ``workers = 2``, ``max_workers = 8``,
``worker_concurrency = 1``, ``max_queue = 10000``, on a Unix listener; requests are
``GET /?delay=0.005``. Open-loop load: Poisson arrivals at a set rate, each on an idle
keep-alive connection or a new one (queueing does not slow the arrivals), nothing retried,
every request counted. *Step*: workers boot in ``--boot-delay`` s (``EXAMPLE_BOOT_DELAY``);
``--base`` req/s for ``--before`` s, then 4x for ``--settle`` + ``--steady`` s; queue waits
from the access log (``queue_ms``, at completion). *Recovered*: the step → the end of the
last 1 s window (0.1 s apart) with p99 queue wait ≥ 100 ms. *Steady*: ``elastic scale`` log
events in the last ``--steady`` s. *Scale-downs*: ``--pools`` other daemons side by side
(``worker_idle_time = --churn-idle``, ``max_workers = --churn-max-workers``, workers forked
from a ``--churn-preload`` preloader, SPEC §11, so a spawn costs milliseconds, not a
CPU-bound interpreter start), each with its own load: ``--light`` req/s, bursts of
``--burst`` req/s of ``GET /?delay=--burst-delay`` until ``workers_target`` is the maximum or
has not grown for ``--stall`` s, then light load until it is 2 again; until the daemons' logs
hold ``--scale-downs`` scale-downs (``elastic scale down`` events) or ``--churn-time`` s.
The pools run side by side because one pool grows by at most one worker per 0.25 s (one
spawn in flight, a step per fresh quarter second of evidence): 1,000 scale-downs need
1,000 step ups, over 250 s in a single pool before any shrinking.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import harness as h
import uvloop

S = h.Suite("elastic", "Elastic pool: a 4x step, steady load, scale-downs", __doc__)
for flag, default, what in (
    ("--boot-delay", 0.3, "worker boot s"), ("--base", 120.0, "req/s before the step"),
    ("--before", 10.0, "s at the base rate"), ("--settle", 15.0, "s after the step, not steady"),
    ("--steady", 120.0, "s of steady 4x load"), ("--idle-time", "10s", "worker_idle_time, step"),
    ("--light", 20.0, "req/s between bursts"), ("--burst", 720.0, "req/s of a burst"),
    ("--burst-delay", 0.005, "s each request of a burst takes"),
    ("--churn-idle", "300ms", "worker_idle_time, scale-downs"),
    ("--scale-downs", 1000, "scale-downs to reach"), ("--churn-time", 300.0, "at most s of it"),
    ("--churn-boot-delay", 0.0, "worker boot s, scale-downs"),
    ("--churn-max-workers", 8, "max_workers, scale-downs"),
    ("--churn-preload", "flypool.example.server", "preload, scale-downs ('': cold spawns)"),
    ("--pools", 3, "daemons side by side, scale-downs"),
    ("--stall", 1.2, "s without growth that end a burst"),
):  # fmt: skip
    S.arg(flag, type=type(default), default=default, help=f"{what} (default {default})")
S.arg("--phases", default="step,churn", help="which phases: step, churn (default step,churn)")

REQ = h.get("/?delay=0.005")
EXAMPLE = [h.PY, "-m", "flypool.example", "--socket", "{socket}"]
KEYS = {"max_workers": 8, "worker_concurrency": 1, "max_queue": 10000}


class OpenLoop:
    """Poisson arrivals at ``rate`` req/s (changed while it runs) of `REQ` to ``addr``, each on
    an idle keep-alive connection or a new one, on its own event loop in a thread."""

    def __init__(self, addr: str, rate: float) -> None:
        self.addr, self.rate, self.recs, self.t0 = addr, rate, list[h.Rec](), time.monotonic()
        self.req = REQ  # what the next arrivals send (changed while it runs)
        self._stop = self._done = False
        self._thread = threading.Thread(target=uvloop.run, args=(self._arrivals(),), daemon=True)
        self._thread.start()

    def now(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.t0

    def stop(self) -> list[h.Rec]:
        """No more arrivals; wait (bounded) for those in flight; every record, by start."""
        self._stop = True
        self._thread.join(60)
        if not self._done:
            raise h.BenchError("the open-loop client failed (its traceback is on stderr)")
        return sorted(self.recs, key=lambda r: r.start)

    async def _arrivals(self) -> None:
        idle: list[Any] = []  # (reader, writer, when it was last used)
        tasks: set[asyncio.Task[None]] = set()
        rng, due = random.Random(1), time.monotonic()
        while not self._stop:
            due += rng.expovariate(self.rate)
            await asyncio.sleep(due - time.monotonic())
            tasks.add(task := asyncio.create_task(self._one(idle)))
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=40)
        for conn in idle:
            conn[1].close()
        self._done = True

    async def _one(self, idle: list[Any]) -> None:
        rec, conn, keep = h.Rec(0, len(self.recs), "GET", "unix", self.now()), None, False
        req = self.req
        # Never reuse a connection idle for 30 s: the daemon closes them after 75 s.
        while idle and (conn := idle.pop())[2] < time.monotonic() - 30:
            conn[1].close()
            conn = None
        try:
            async with asyncio.timeout(35):
                conn = conn or (*await h._connect(self.addr), 0.0)
                conn[1].write(req.wire)
                await conn[1].drain()
                rec.status, _, _, keep = await h._read_response(conn[0])
        except h._FAILURES as err:
            rec.error = f"{type(err).__name__}: {err}"
        rec.end = self.now()
        self.recs.append(rec)
        if keep:
            idle.append((conn[0], conn[1], time.monotonic()))
        elif conn is not None:
            conn[1].close()


def start(boot_delay: float, idle_time: str, daemon: dict[str, Any] | None = None,
          max_workers: int = 8, **app: Any) -> h.Flypool:  # fmt: skip
    """A daemon of 2 (up to ``max_workers``) example workers that boot in ``boot_delay`` s."""
    env = {"EXAMPLE_BOOT_DELAY": f"{boot_delay:g}"}
    return h.start_flypool(EXAMPLE, workers=2, listen=["unix:{tmp}/app.sock"], env=env,
                           worker_idle_time=idle_time, daemon=daemon,
                           **{**KEYS, "max_workers": max_workers, **app})  # fmt: skip


def step(s: h.Suite, a: Any) -> None:
    """(a) and (b): the base rate, then 4x; queue waits and scale events."""
    with start(a.boot_delay, a.idle_time, {"access_log": "-"}) as fp:
        load, end = OpenLoop(fp.listen[0], a.base), a.settle + a.steady
        try:
            h.poll(lambda: load.now() >= a.before or None, a.before + 30, "the step")
            load.rate, wall, t_step = 4 * a.base, time.time(), load.now()
            h.poll(lambda: load.now() >= t_step + end or None, end + 30, "the end", fp.proc.exited)
        finally:
            recs = load.stop()
        target, evs = fp.app()["workers_target"], [e for e in fp.events() if "timestamp" in e]
    at = {id(e): dt.datetime.fromisoformat(e["timestamp"]).timestamp() - wall for e in evs}
    waits = [(at[id(e)], e["queue_ms"]) for e in evs if e.get("event") == "request"]
    windows = [(t / 10, h.pct([q for x, q in waits if t / 10 - 1 < x <= t / 10], 99))
               for t in range(int((1 - a.before) * 10), int(end * 10) + 1)]  # fmt: skip
    recovered = max((t for t, p99 in windows if t > 0 and (p99 or 0) >= 100), default=0.0)
    scales = [(at[id(e)], e) for e in evs if str(e.get("event")).startswith("elastic scale")]
    steady = sum(1 for t, _ in scales if a.settle <= t <= end)
    boots = [e["boot_s"] for e in evs if e.get("event") == "worker ready"]

    def row(name: str, lo: float, hi: float) -> list[Any]:
        st = h.stats(r for r in recs if lo <= r.start - t_step < hi)
        return [name, hi - lo, st["requests"], st["failed"], st["p50"], st["p99"],
                h.pct((q for x, q in waits if lo <= x < hi), 99),
                max((p or 0 for t, p in windows if lo < t <= hi), default=None),
                sum(1 for t, _ in scales if lo <= t < hi)]  # fmt: skip

    shown = [(round(t, 2), e["event"][14:], e["workers"]) for t, e in scales]
    s.data["step"] = {"recovered_s": recovered, "windows": windows, "scale_events": shown}
    s.md(f"**A 4x step in load**: {a.base:g} → {4 * a.base:g} req/s, `worker_idle_time = "
         f"{a.idle_time}`; workers boot in {h.num(h.median(boots))} s (median, as logged).",
         h.table("phase|s>|requests>|failed>|client p50 ms>|client p99 ms>|p99 queue wait ms>|"
                 "peak 1 s window p99 ms>|scale events>", [row("base", -a.before, 0),
                 row("settle", 0, a.settle), row("steady", a.settle, end)]),
         f"p99 queue wait < 100 ms in every 1 s window from {recovered:.1f} s after the step on; "
         f"{target} workers at the end. Scale events (s after the step, workers): "
         + ", ".join(f"{t:.1f} {d} → {n}" for t, d, n in shown))  # fmt: skip
    s.check("4x step: p99 queue wait (1 s window) < 100 ms for good, within", recovered,
            "<= 10 s", digits=1)  # fmt: skip
    s.check(f"steady 4x load: scale events per hour ({steady} in {a.steady:g} s)",
            steady * 3600 / a.steady, "<= 6", digits=0)  # fmt: skip
    s.check("4x step: failed requests", sum(r.failed for r in recs), "== 0", hard=True)


def scale_downs(fp: h.Flypool) -> int:
    """Workers scaled down so far, from the daemon's log (``elastic scale down`` events)."""
    return -sum(e["step"] for e in fp.events() if e.get("event") == "elastic scale down")


def cycles(a: Any, fp: h.Flypool, load: OpenLoop, done: Any) -> int:
    """Burst until the pool grew to ``--churn-max-workers`` (or stopped growing for
    ``--stall`` s), then light load until it is 2 again; until ``done()``. The cycles."""
    burst, n, last = h.get(f"/?delay={a.burst_delay:g}"), 0, [2, 0.0]

    def grown() -> bool | None:  # last: [target, when it changed]
        if (target := fp.app()["workers_target"]) != last[0]:
            last[:] = [target, time.monotonic()]
        stalled = time.monotonic() - last[1] > a.stall
        return True if target >= a.churn_max_workers or stalled else None

    while not done():
        load.req, load.rate = burst, a.burst
        n, last[:] = n + 1, [2, time.monotonic()]
        h.poll(grown, 30, "growth", fp.proc.exited)
        load.req, load.rate = REQ, a.light
        h.poll(lambda: fp.app()["workers_target"] <= 2 or None, 60, "shrinking to 2",
               fp.proc.exited)  # fmt: skip
    return n


def churn(s: h.Suite, a: Any) -> None:
    """(c): in ``--pools`` daemons side by side, bursts grow the pool, light load lets it
    shrink; until ``--scale-downs`` in all (their logs) or ``--churn-time`` s; failed requests."""
    preload = {"preload": a.churn_preload.split(",")} if a.churn_preload else {}
    with contextlib.ExitStack() as stack:
        fps = [stack.enter_context(start(a.churn_boot_delay, a.churn_idle, None,
                                         a.churn_max_workers, **preload))
               for _ in range(a.pools)]  # fmt: skip
        loads, t0, failed = [OpenLoop(fp.listen[0], a.light) for fp in fps], time.monotonic(), []

        def done() -> bool:
            return bool(failed) or time.monotonic() - t0 >= a.churn_time or sum(
                map(scale_downs, fps)) >= a.scale_downs  # fmt: skip

        def one(fp: h.Flypool, load: OpenLoop) -> int:
            try:
                return cycles(a, fp, load, done)
            except BaseException as err:  # the other pools stop too, then it is raised
                failed.append(err)
                raise

        try:
            with ThreadPoolExecutor(len(fps)) as pool:
                runs = [pool.submit(one, fp, load) for fp, load in zip(fps, loads, strict=True)]
                n = [run.result() for run in runs]
            per_pool, took = [scale_downs(fp) for fp in fps], time.monotonic() - t0
            boots = [e["boot_s"] for fp in fps for e in fp.events()
                     if e.get("event") == "worker ready"]  # fmt: skip
        finally:
            recs = [r for load in loads for r in load.stop()]
    reached, st = sum(per_pool), h.stats(recs)
    failures = [(r.start, r.outcome()) for r in recs if r.failed][:50]
    s.data["churn"] = {"scale_downs": reached, "per_pool": per_pool, "cycles": n, "s": took,
                       "boot_s_median": h.median(boots), "failures": failures}  # fmt: skip
    spawn = f"preloaded (`preload = {a.churn_preload}`)" if a.churn_preload else "cold"
    s.md(f"**Scale-downs**: {a.pools} daemons side by side, each 2..{a.churn_max_workers} "
         f"workers, `worker_idle_time = {a.churn_idle}`, {a.light:g} req/s between bursts of "
         f"{a.burst:g} req/s (`GET /?delay={a.burst_delay:g}`); {spawn} workers boot in "
         f"{h.num(h.median(boots))} s (median, as logged).", h.table(
        "pools>|cycles>|scale-downs>|s>|scale-downs / min>|requests>|failed>|failures",
        [[a.pools, sum(n), reached, took, reached * 60 / took, st["requests"], st["failed"],
          h.kinds(recs) or "—"]]))  # fmt: skip
    s.check(f"failed requests across {reached} scale-downs (goal: 1,000)", st["failed"], "== 0",
            hard=True)  # fmt: skip
    s.check("scale-downs reached (issue: 1,000)", reached, f">= {a.scale_downs}")


def run(s: h.Suite, a: Any) -> None:
    """The step (a, b), then the scale-downs (c)."""
    phases = set(a.phases.split(","))
    if "step" in phases:
        step(s, a)
    if "churn" in phases:
        churn(s, a)


if __name__ == "__main__":
    S.main(run)
