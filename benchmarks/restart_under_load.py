"""A rolling restart under load (issue 11 §3): time to every worker new, the engine's overhead
per swap, failed requests and peak memory, with 4 and 16 workers, batch 1 and ``"auto"``.

For each ``--workers`` count and ``--batches`` value (interleaved rounds) a fresh daemon
runs the example worker with a ``--boot-delay`` s boot (``EXAMPLE_BOOT_DELAY``),
``restart_batch = B`` and ``drain_timeout = 30s`` behind a Unix listener; ``--connections``
keep-alive clients loop ``GET /?delay=D`` (D: 5, 10, 20 or 50 ms), and at ``--restart-at``
s the suite asks ``POST /apps/app/restart?mode=rolling``. Meanwhile the status is polled
every 20 ms and a sampler process reads the daemon's live children and RSS every 10 ms.
*Every worker new*: from the daemon's ``restart begin`` to its last ``draining worker`` of an
old worker (its log's clock: from then on only new workers serve); *old gone*: from the
request to the first status without an old PID. *Overhead per swap*: (the daemon's own
``last_restart.duration_s`` - the ideal, i.e. the slowest new worker's ``boot_s`` of each
batch, summed - the exit tail) / workers replaced, where the exit tail is from the engine's
last ``stopping worker`` of an old worker to the last old ``worker exited``: the restart ends
at that exit, but the time is the worker's own teardown after SIGTERM (35-60 ms for the
example worker), with nothing left for the engine to do. In parentheses the same with the
exit tail, and up to every worker new. *Peak
memory*: steady (the largest sum of the workers' RSS before the restart) + the largest
excess during it (the new workers' RSS minus the peak RSS of the old ones that exited: the
old workers' own growth is not the restart's), against steady + batch x the largest
worker's RSS, + 0.5 MB (a new worker may end a few KB larger than the old one it replaced).
The raw peak, the daemon's ``last_restart.peak_rss_bytes`` and its own RSS are shown beside.
*Peak serving*: the most workers spawning, ready or draining (or stopping with requests in
flight) in one status poll, against ``workers + batch`` (SPEC §1, for every batch); beside
it, the most live child processes the sampler saw (a drained worker already signalled may
exit beside them while memory has room: ``docs/architecture.md``, deviations).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any

import harness as h

S = h.Suite("restart_under_load", "Rolling restart under load: engine overhead, memory", __doc__)
S.arg("--workers", default="4,16", help="comma-separated worker counts (default 4,16)")
S.arg("--rounds", default="3,1", help="rounds per worker count (default 3,1)")
S.arg("--batches", default="1,auto", help="restart_batch values (default 1,auto)")
S.arg("--boot-delay", type=float, default=1.0, help="worker boot seconds (default 1)")
S.arg("--restart-at", type=float, default=5.0, help="second of the load (default 5)")
S.arg("--connections", type=int, default=8, help="keep-alive clients (default 8)")

REQS = [h.get(f"/?delay={ms / 1000:g}", f"{ms} ms") for ms in (5, 10, 20, 50)]


def ended(app: dict[str, Any], rid: int) -> bool:
    """The restart ``rid`` (or a later one) is over."""
    return app.get("restart") is None and (app.get("last_restart") or {}).get("id", -1) >= rid


def serving(app: dict[str, Any]) -> int:
    """Workers of one status that serve or may (SPEC §1 "live"): not exiting."""
    return sum(1 for w in app["workers"] if w["state"] != "stopping" or w.get("sessions"))


def one(a: Any, workers: int, batch: str, rnd: int) -> dict[str, Any]:
    """Start a pool, load it, restart it, and measure until the restart is over (+0.5 s)."""
    nb = int(batch) if batch.isdigit() else None
    cap = a.restart_at + math.ceil(workers / (nb or 1)) * (a.boot_delay + 2) + 20  # a bound
    example = [h.PY, "-m", "flypool.example", "--socket", "{socket}"]
    env = {"EXAMPLE_BOOT_DELAY": f"{a.boot_delay:g}"}
    keys = {"drain_timeout": "30s", "restart_batch": nb or batch, "env": env, "timeout": 120}
    with h.start_flypool(example, workers=workers, listen=["unix:{tmp}/app.sock"], **keys) as fp:
        old = {w["pid"] for w in fp.app()["workers"]}
        load = h.Load(fp.listen, a.connections, lambda i, rng: rng.choice(REQS), duration=cap)
        load.start()
        sampler = h.Sampler(fp, load.t0 + cap, 0.01)
        poller = h.Poller(fp, load.t0, 0.02).start()
        try:
            h.poll(lambda: load.now() >= a.restart_at or None, 60, "the restart", fp.proc.exited)
            tr, rid = load.now(), fp.restart()
            done, last = h.poll(lambda: next(((t, app["last_restart"]) for t, app in poller.polls
                                              if t >= tr and ended(app, rid)), None),
                                cap, "the restart to end", fp.proc.exited)  # fmt: skip
            h.poll(lambda: load.now() >= done + 0.5 or None, 5, "the tail")
        finally:
            load.stop()
            poller.stop()
            sampler.proc.stop()
        recs, samples, events = load.join(), sampler.result(load.t0), fp.events()
    all_new = poller.first(tr, lambda app: not old & {w["pid"] for w in app["workers"]})
    nb = nb or int(last.get("batch") or 1)
    at = {id(e): dt.datetime.fromisoformat(e["timestamp"]).timestamp() for e in events
          if "timestamp" in e}  # fmt: skip
    begin = next((at[id(e)] for e in events if e.get("event") == "restart begin"), None)
    drains = [at[id(e)] for e in events if e.get("event") == "draining worker" and e["pid"] in old]
    ready = [e for e in events if e.get("event") == "worker ready" and "boot_s" in e]
    boots = [e["boot_s"] for e in ready if e["pid"] not in old]
    ideal = sum(max(boots[i : i + nb]) for i in range(0, len(boots), nb)) if boots else None
    took, replaced = last.get("duration_s"), last.get("replaced")
    # The old workers' own exit after the engine's last signal: the restart ends at that exit,
    # but it is the worker's interpreter tearing down, with nothing left for the engine to do.
    stops = [at[id(e)] for e in events if e.get("event") == "stopping worker" and e["pid"] in old]
    exits = [at[id(e)] for e in events if e.get("event") == "worker exited" and e["pid"] in old]
    tail = max(0.0, max(exits) - max(stops)) if stops and exits else 0.0
    # Memory beyond the old pool's: the new workers' RSS minus the peak RSS of the old ones that
    # exited (not their last: an exiting process shrinks; their growth while serving is theirs).
    seen: dict[int, int] = {}
    steady = peak = excess = largest = 0
    for x in samples:
        seen.update({p: max(r, seen.get(p, 0)) for p, r in x.workers.items()})
        largest, now = max([largest, *x.workers.values()]), sum(x.workers.values())
        if x.t < tr:
            steady = max(steady, now)
        elif x.t <= done:
            peak = max(peak, now)
            gone = sum(seen[p] for p in old if p in seen and p not in x.workers)
            excess = max(excess, sum(r for p, r in x.workers.items() if p not in old) - gone)
    daemon = [max((x.root_rss for x in samples if (x.t < tr) == before), default=0) / 1e6
              for before in (True, False)]  # fmt: skip
    first_new = min((r.end for r in recs if r.status == 200 and r.pid not in old), default=None)
    new = max(drains) - begin if drains and begin else None

    def per_swap(total: float | None) -> float | None:  # ms
        return None if None in (total, ideal) or not replaced else (total - ideal) / replaced * 1e3

    return {
        "workers": workers, "batch": batch, "round": rnd, "nb": nb, "requests": len(recs),
        "failed": sum(r.failed for r in recs), "steady": h.stats(r for r in recs if r.start < tr),
        "window": h.stats(r for r in recs if r.start < done and r.end > tr),
        "done_s": done - tr, "daemon_s": took, "gone_s": h.minus(all_new, tr),
        "all_new_s": new, "first_new_s": h.minus(first_new, tr), "boots": boots,
        "median_boot": h.median(boots), "ideal_s": ideal, "replaced": replaced,
        "overhead_ms": per_swap(None if took is None else took - tail), "exit_tail_s": tail,
        "with_exit_ms": per_swap(took), "to_new_ms": per_swap(new),
        "peak_live": max((serving(app) for t, app in poller.polls if t >= tr), default=0),
        "peak_procs": max((len(x.workers) for x in samples), default=0), "live_limit": workers + nb,
        "steady_mb": steady / 1e6, "peak_mb": peak / 1e6, "mem_mb": (steady + excess) / 1e6,
        "largest_mb": largest / 1e6, "mem_limit_mb": (steady + nb * largest) / 1e6,
        "daemon_mb": daemon, "daemon_peak_mb": (last.get("peak_rss_bytes") or 0) / 1e6,
        "failures": [dataclasses.asdict(r) for r in recs if r.failed][:50],
    }  # fmt: skip


def run(s: h.Suite, a: Any) -> None:
    """Every worker count x batch x round; one row each, checks on the medians."""
    counts = [int(w) for w in a.workers.split(",")]
    rounds = [int(r) for r in a.rounds.split(",")]
    runs: list[dict[str, Any]] = s.data.setdefault("runs", [])
    for workers, n in zip(counts, rounds + rounds[-1:] * len(counts), strict=False):
        for rnd in range(1, n + 1):
            for batch in a.batches.split(","):
                h.log(f"{workers} workers, batch {batch}, round {rnd} ...")
                runs.append(r := one(a, workers, batch, rnd))
                h.log(f"  every worker new {h.num(r['all_new_s'])} s, overhead "
                      f"{h.num(r['overhead_ms'])} ms, {r['failed']} failed, peak "
                      f"{r['peak_live']} serving ({r['peak_procs']} processes), "
                      f"{r['mem_mb']:.1f} MB "
                      f"(limit {r['mem_limit_mb']:.1f})")  # fmt: skip

    def ms3(w: dict[str, Any]) -> str:
        return " / ".join(h.num(w[k]) for k in ("p50", "p99", "max"))

    s.md(h.table(
        "workers>|batch>|round>|requests>|failed>|steady p50 / p99 / max ms|restart-window p50 / "
        "p99 / max ms|restart s (daemon)>|every worker new s>|old gone s>|1st new answer s>|"
        "ideal Σboot s>|overhead / swap ms (with the last exit; to all new)>|"
        "peak serving (limit), processes>|"
        "workers MB: steady → peak (daemon's figure)>|steady + excess MB (limit)>|daemon MB: "
        "steady → restart>",
        [[r["workers"], f"{r['batch']}" + (f" ({r['nb']})" if r["batch"] == "auto" else ""),
          r["round"], r["requests"], r["failed"], ms3(r["steady"]), ms3(r["window"]),
          f"{h.num(r['done_s'])} ({h.num(r['daemon_s'])})", r["all_new_s"], r["gone_s"],
          r["first_new_s"], r["ideal_s"],
          f"{h.num(r['overhead_ms'], 0)} ({h.num(r['with_exit_ms'], 0)}; "
          f"{h.num(r['to_new_ms'], 0)})",
          f"{r['peak_live']} ({r['live_limit']}), {r['peak_procs']}",
          f"{r['steady_mb']:.1f} → {r['peak_mb']:.1f} "
          f"({r['daemon_peak_mb']:.1f})", f"{r['mem_mb']:.1f} ({r['mem_limit_mb']:.1f})",
          " → ".join(f"{m:.1f}" for m in r["daemon_mb"])]
         for r in runs]))  # fmt: skip
    for workers in counts:
        for batch in a.batches.split(","):
            rs = [r for r in runs if r["workers"] == workers and r["batch"] == batch]
            tag, over = f"{workers} workers, batch {batch}", [r["overhead_ms"] for r in rs]
            shown = f"{h.num(h.median(over), 1)} ms (rounds: {h.num(over, 0)})"
            s.check(f"{tag}: engine overhead per swap", h.median(over), "< 20 ms", shown, digits=1)
            steps, boot = math.ceil(workers / rs[0]["nb"]), h.median(r["median_boot"] for r in rs)
            limit = steps * (boot or a.boot_delay) + 0.4
            all_new = h.median(r["all_new_s"] for r in rs)
            s.check(f"{tag}: every worker new ≤ {steps} x boot + 0.4 s (measured boot "
                    f"{h.num(boot)} s)", all_new, f"<= {limit:.2f} s")  # fmt: skip
            s.check(f"{tag}: failed requests", sum(r["failed"] for r in rs), "== 0", hard=True)
            # Exiting workers (drained, signalled) count against memory instead, for any batch.
            worst_live = max(rs, key=lambda r: r["peak_live"] - r["live_limit"])
            s.check(f"{tag}: peak serving workers (spawning, ready, draining)",
                    worst_live["peak_live"], f"<= {worst_live['live_limit']}",
                    hard=True)  # fmt: skip
            worst = max(rs, key=lambda r: r["mem_mb"] - r["mem_limit_mb"])
            # + 0.5 MB: a new worker may end a few KB larger than the old one it replaced.
            s.check(f"{tag}: peak memory ≤ steady + {worst['nb']} x the largest worker "
                    f"({worst['steady_mb']:.1f} + {worst['nb']} x {worst['largest_mb']:.1f} MB, "
                    "+ 0.5 MB of RSS drift)", worst["mem_mb"],
                    f"<= {worst['mem_limit_mb'] + 0.5:.1f} MB")  # fmt: skip
    s.md(f"{a.connections} keep-alive clients over the Unix socket; workers boot in "
         f"{a.boot_delay:g} s; restart asked at t = {a.restart_at:g} s. Steady = requests "
         "started before the restart; restart window = requests overlapping [asked, seen "
         "finished in /status]. Restart s = asked → seen finished (the daemon's own "
         "`duration_s` in parentheses). Workers' RSS sampled every 10 ms; `auto (N)`: the "
         "batch the daemon chose.")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
