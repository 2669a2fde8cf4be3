"""A rolling restart under load: time to every worker new, the engine's overhead per swap,
failed requests and peak memory, with 4 and with 16 workers.

For each ``--workers`` count and ``--batches`` value (interleaved rounds) a fresh daemon
runs the example worker with a ``--boot-delay`` s boot (``EXAMPLE_BOOT_DELAY``),
``restart_batch = B`` and ``drain_timeout = 30s`` behind a Unix listener; ``--connections``
keep-alive clients loop ``GET /?delay=D`` (D: 5, 10, 20 or 50 ms), and at ``--restart-at``
s the suite asks ``POST /apps/app/restart?mode=rolling``. Meanwhile the status is polled
every 20 ms and a sampler process reads the daemon's live children and RSS every 10 ms.
*Every worker new*: from the restart request to the first status without an old PID.
*Overhead per swap*: (the daemon's own ``last_restart.duration_s`` - the ideal, i.e. the
slowest new worker's ``boot_s`` of each batch, summed) / workers replaced. *Peak
memory*: the largest RSS of daemon + workers during the restart, against steady + batch
x the largest worker's RSS before it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import harness as h

S = h.Suite("restart_under_load", "Rolling restart under load: engine overhead, memory", __doc__)
S.arg("--workers", default="4,16", help="comma-separated worker counts (default 4,16)")
S.arg("--rounds", default="3,1", help="rounds per worker count (default 3,1)")
S.arg("--batches", default="1,2", help='restart_batch values, "auto" too (default 1,2)')
S.arg("--boot-delay", type=float, default=1.0, help="worker boot seconds (default 1)")
S.arg("--restart-at", type=float, default=5.0, help="second of the load (default 5)")
S.arg("--connections", type=int, default=8, help="keep-alive clients (default 8)")

REQS = [h.get(f"/?delay={ms / 1000:g}", f"{ms} ms") for ms in (5, 10, 20, 50)]


def one(a: Any, workers: int, batch: str, rnd: int) -> dict[str, Any]:
    """Start a pool, load it, restart it, and measure."""
    nb = int(batch) if batch.isdigit() else None
    duration = a.restart_at + math.ceil(workers / (nb or 1)) * (a.boot_delay + 0.5) + 3
    example = [h.PY, "-m", "flypool.example", "--socket", "{socket}"]
    env = {"EXAMPLE_BOOT_DELAY": f"{a.boot_delay:g}"}
    keys = {"drain_timeout": "30s", "restart_batch": nb or batch, "env": env, "timeout": 120}
    with h.start_flypool(example, workers=workers, listen=["unix:{tmp}/app.sock"], **keys) as fp:
        old = {w["pid"] for w in fp.app()["workers"]}
        load = h.Load(fp.listen, a.connections, lambda i, rng: rng.choice(REQS), duration=duration)
        load.start()
        sampler = h.Sampler(fp, load.t0 + duration, 0.01)
        poller = h.Poller(fp, load.t0, 0.02).start()
        try:
            h.poll(lambda: load.now() >= a.restart_at or None, 60, "the restart", fp.proc.exited)
            tr, rid = load.now(), fp.restart()
            recs = load.join()
        finally:
            load.stop()
            poller.stop()
        samples, events = sampler.result(load.t0), fp.events()
    last = next((app["last_restart"] for _, app in reversed(poller.polls)
                 if (app.get("last_restart") or {}).get("id", -1) >= rid), {})  # fmt: skip
    done = poller.first(
        tr, lambda app: app.get("restart") is None and app.get("last_restart") == last
    )
    all_new = poller.first(tr, lambda app: not old & {w["pid"] for w in app["workers"]})
    nb = nb or int(last.get("batch") or 1)
    ready = [e for e in events if e.get("event") == "worker ready" and "boot_s" in e]
    boots = [e["boot_s"] for e in ready if e["pid"] not in old]
    ideal = sum(max(boots[i : i + nb]) for i in range(0, len(boots), nb)) if boots else None
    took, replaced = last.get("duration_s"), last.get("replaced")
    total = [(x.t, x.root_rss + sum(x.workers.values()), x.workers) for x in samples]
    steady = max((m for t, m, _ in total if t < tr), default=0)
    largest = max((max(w.values(), default=0) for _, _, w in total), default=0)
    first_new = min((r.end for r in recs if r.status == 200 and r.pid not in old), default=None)
    return {
        "workers": workers, "batch": batch, "round": rnd, "nb": nb, "requests": len(recs),
        "failed": sum(r.failed for r in recs), "steady": h.stats(r for r in recs if r.start < tr),
        "window": h.stats(r for r in recs if r.start < (done or duration) and r.end > tr),
        "done_s": h.minus(done, tr), "daemon_s": took, "all_new_s": h.minus(all_new, tr),
        "first_new_s": h.minus(first_new, tr), "boots": boots, "median_boot": h.median(boots),
        "ideal_s": ideal, "replaced": replaced, "overhead_ms": None if None in (ideal, took)
        or not replaced else (took - ideal) / replaced * 1e3,
        "peak_live": max((len(x.workers) for x in samples), default=0), "live_limit": workers + nb,
        "peak_mb": max((m for t, m, _ in total if tr <= t <= (done or duration)), default=0) / 1e6,
        "steady_mb": steady / 1e6, "largest_mb": largest / 1e6,
        "mem_limit_mb": (steady + nb * largest) / 1e6,
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
                      f"{r['peak_live']} live, {r['peak_mb']:.0f} MB")  # fmt: skip

    def ms3(w: dict[str, Any]) -> str:
        return " / ".join(h.num(w[k]) for k in ("p50", "p99", "max"))

    s.md(h.table(
        "workers>|batch>|round>|requests>|failed>|steady p50 / p99 / max ms|restart-window p50 / "
        "p99 / max ms|restart s (daemon)>|every worker new s>|1st new answer s>|ideal Σboot s>|"
        "overhead / swap ms>|peak live (limit)>|peak MB (limit)>",
        [[r["workers"], r["batch"], r["round"], r["requests"], r["failed"], ms3(r["steady"]),
          ms3(r["window"]), f"{h.num(r['done_s'])} ({h.num(r['daemon_s'])})", r["all_new_s"],
          r["first_new_s"], r["ideal_s"], h.num(r["overhead_ms"], 0),
          f"{r['peak_live']} ({r['live_limit']})", f"{r['peak_mb']:.0f} ({r['mem_limit_mb']:.0f})"]
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
            peak = max(r["peak_live"] for r in rs)
            s.check(f"{tag}: peak live workers", peak, f"<= {rs[0]['live_limit']}", hard=True)
            worst = max(rs, key=lambda r: r["peak_mb"] - r["mem_limit_mb"])
            s.check(f"{tag}: peak memory ≤ steady + {worst['nb']} x the largest worker "
                    f"({worst['steady_mb']:.0f} + {worst['nb']} x {worst['largest_mb']:.0f} MB)",
                    worst["peak_mb"], f"<= {worst['mem_limit_mb']:.1f} MB")  # fmt: skip
    s.md(f"{a.connections} keep-alive clients over the Unix socket; workers boot in "
         f"{a.boot_delay:g} s; restart asked at t = {a.restart_at:g} s. Steady = requests "
         "started before the restart; restart window = requests overlapping [asked, seen "
         "finished in /status]. Restart s = asked → seen finished (the daemon's own "
         "`duration_s` in parentheses). Memory = RSS of the daemon + its workers.")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
