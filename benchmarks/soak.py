"""Soak: steady keep-alive load while workers are SIGKILLed and the pool restarted.

One daemon: ``--workers`` (4) example workers, ``worker_concurrency = 0`` (the worker is
asyncio: a cap would only move the waiting into flypool's queue), a Unix and a TCP
listener. ``--connections`` (200) keep-alive clients, half on each, loop a seeded mix:
``GET /?delay=0.005`` 70 %, ``GET /?size=10000`` 27 %, ``POST /upload`` of 16, 64 or
256 KiB 3 %; every answer is checked (the ``pid=`` line, the exact size, the upload's
sha256). After ``--warmup`` s without faults and an idle *start* sample of the daemon,
``--duration`` s with faults: every ``--kill-interval`` s a random ready worker is
SIGKILLed (by PID, once checked to be the daemon's child started when the status listed
it), every ``--restart-interval`` s a rolling restart. Then the pool settles, idle, and
the *end* sample is read.

Failed GETs and POSTs are counted apart. A failure is *in flight at a kill* when its
request started before a SIGKILL and ended within ``--window`` s after it: the killed
worker had it. Goals: 0 failed GETs (idempotent requests are retried on another worker);
POSTs fail only in flight at a kill; no wrong answer; daemon RSS growth (idle, end vs
start) < 10 %; fds back to their start count ± 5.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
from collections import Counter
from typing import Any

import harness as h

S = h.Suite("soak", "Soak: load with SIGKILLs and rolling restarts", __doc__)
S.arg("--duration", type=float, default=120, help="seconds with faults (default 120)")
S.arg("--warmup", type=float, default=10, help="seconds of load first (default 10)")
S.arg("--connections", type=int, default=200, help="keep-alive clients (default 200)")
S.arg("--workers", type=int, default=4, help="workers (default 4)")
S.arg("--kill-interval", type=float, default=5, help="seconds between SIGKILLs (default 5)")
S.arg("--restart-interval", type=float, default=20, help="seconds between restarts (20)")
S.arg("--sample-interval", type=float, default=10, help="seconds between samples (10)")
S.arg("--window", type=float, default=1, help="in flight at a kill: ended this soon after")
S.arg("--seed", type=int, default=1, help="random seed (mix, bodies, kills)")


def mix(seed: int) -> list[tuple[float, h.Req]]:
    """The requests with their cumulative weights; each checks its answer."""

    def upload(body: bytes) -> h.Req:
        want = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}

        def check(answer: bytes) -> str:
            with contextlib.suppress(ValueError):
                if all(json.loads(answer).get(k) == v for k, v in want.items()):
                    return ""
            return f"expected {want}, got {answer[:100]!r}"

        return h.post("/upload", body, "POST", check)

    def delay(body: bytes) -> str:
        return "" if body.startswith(b"pid=") else f"got {body[:60]!r}"

    def size(body: bytes) -> str:
        return "" if body == b"x" * 10_000 else f"{len(body)} bytes {body[:20]!r}"

    data = random.Random(seed).randbytes(256 * 1024)
    uploads = [(0.98 + i / 100, upload(data[: k * 1024])) for i, k in enumerate((16, 64, 256))]
    return [(0.7, h.get("/?delay=0.005", "GET", delay)), (0.97, h.get("/?size=10000", "GET", size)),
            *uploads]  # fmt: skip


def app_or_empty(fp: h.Flypool) -> dict[str, Any]:
    """The app's status, or ``{}`` when the daemon does not answer."""
    with contextlib.suppress(OSError, h.BenchError, StopIteration, ValueError):
        return fp.app()
    return {}


def sample(fp: h.Flypool, phase: str, t: float) -> dict[str, Any]:
    """The daemon's resources now, with the status's ready workers and upstream connections."""
    app = app_or_empty(fp)
    return {"t": t, "phase": phase, **h.snapshot(fp.proc.pid), "ready": len(h.ready(app)),
            "upstream": app.get("upstream_connections")}  # fmt: skip


def settled(fp: h.Flypool, workers: int) -> bool | None:
    """True once no restart runs, every worker is ready and no upstream connection is open."""
    app = app_or_empty(fp)
    quiet = app and not app.get("upstream_connections") and app.get("restart") is None
    return True if quiet and len(h.ready(app)) == len(app["workers"]) == workers else None


def kill(fp: h.Flypool, rng: random.Random, load: h.Load) -> dict[str, Any]:
    """SIGKILL a random ready worker, by its PID, if it is still the worker the status listed."""
    if not (workers := h.ready(app_or_empty(fp))):
        return {"t": load.now(), "skipped": "no ready worker (or no status)"}
    worker = rng.choice(workers)
    pid = worker["pid"]
    if fp.owned.get(pid) != h.start_ticks(pid) or pid not in h.children(fp.proc.pid):
        return {"t": load.now(), "skipped": f"pid {pid} is no longer a worker"}
    t = load.now()
    os.kill(pid, signal.SIGKILL)
    h.log(f"  t={t:6.2f} s SIGKILL {pid} ({worker.get('sessions')} in flight)")
    return {"t": t, "pid": pid, "sessions": worker.get("sessions")}


def run(s: h.Suite, a: Any) -> None:
    """Warm up, sample, soak with faults, settle, sample, classify."""
    weighted = mix(a.seed)

    def pick(i: int, rng: random.Random) -> h.Req:
        x = rng.random()
        return next(req for weight, req in weighted if x < weight)

    kills: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    plan = sorted(  # at the same second: kill, then restart, then sample
        (k * step, what)
        for step, what, first in ((a.kill_interval, "kill", 1), (a.restart_interval, "restart", 1),
                                  (a.sample_interval, "sample", 0))
        for k in range(first, math.ceil(a.duration / step))
    )  # fmt: skip
    example = [h.PY, "-m", "flypool.example", "--socket", "{socket}"]
    listen = ["unix:{tmp}/app.sock", f"127.0.0.1:{h.free_port()}"]
    with h.start_flypool(example, workers=a.workers, listen=listen, worker_concurrency=0) as fp:
        h.log(f"warm-up: {a.connections} connections, {a.warmup:g} s ...")
        warm = h.Load(fp.listen, a.connections, pick, duration=a.warmup, seed=a.seed).run()
        h.poll(lambda: settled(fp, a.workers), 60, "the pool to settle", fp.proc.exited, 0.25)
        samples.append(sample(fp, "start", 0.0))
        h.log(f"soak: {a.duration:g} s with faults ...")
        load = h.Load(fp.listen, a.connections, pick, duration=a.duration, timeout=30,
                      seed=a.seed + 1).start()  # fmt: skip
        rng = random.Random(f"{a.seed}/kills")
        try:
            for at, what in plan:
                h.poll(lambda at=at: load.now() >= at or None, at + 5, what, fp.proc.exited)
                if what == "sample":
                    samples.append(sample(fp, "load", load.now()))
                elif what == "kill":
                    kills.append(kill(fp, rng, load))
                else:
                    try:
                        restarts.append({"t": load.now(), "id": fp.restart()})
                    except (OSError, h.BenchError) as err:
                        restarts.append({"t": load.now(), "error": str(err)})
            recs = load.join()
        finally:
            load.stop()
        end = load.now()
        try:
            h.poll(lambda: settled(fp, a.workers), 90, "the pool to settle", fp.proc.exited, 0.25)
        except h.BenchError as err:
            h.log(f"warning: {err}")
        samples.append(sample(fp, "end", load.now()))
        events = fp.events()
    s.data = {"kills": kills, "restarts": restarts, "samples": samples}
    analyse(s, a, recs, len(warm), kills, samples, events, end)


Rows = list[dict[str, Any]]


def analyse(s: h.Suite, a: Any, recs: list[h.Rec], warm: int, kills: Rows, samples: Rows,
            events: Rows, end: float) -> None:  # fmt: skip
    """Classify the failures, compare start and end, write the tables and checks."""
    done = [k for k in kills if "pid" in k]
    times = [k["t"] for k in done]

    def at_kill(r: h.Rec) -> bool:
        """Started before a kill and ended within the window after it."""
        i = bisect.bisect_right(times, r.end) - 1
        while i >= 0 and times[i] >= r.end - a.window:
            if times[i] > r.start:
                return True
            i -= 1
        return False

    failed = [r for r in recs if r.failed]
    wrong = [r for r in failed if (r.error or "").startswith("bad body")]
    by = {m: [r for r in failed if r.kind == m and r not in wrong] for m in ("GET", "POST")}
    in_flight = {m: sum(map(at_kill, rs)) for m, rs in by.items()}
    other = [r for r in failed if r in wrong or not at_kill(r)]
    ok = [r.ms for r in recs if not r.failed]
    ends = Counter(str(e.get("outcome")) for e in events if e.get("event") == "restart end")
    killed = {k["pid"] for k in done}
    crashed = [e for e in events if e.get("event") == "worker exited unexpectedly"]
    foreign = [e for e in crashed if e.get("pid") not in killed]
    first, last = samples[0], samples[-1]
    growth = (last["rss"] / first["rss"] - 1) * 100
    kinds = {k: n for k in {*first["fd_kinds"], *last["fd_kinds"]}
             if (n := last["fd_kinds"].get(k, 0) - first["fd_kinds"].get(k, 0))}  # fmt: skip
    latency = [h.pct(ok, 50), h.pct(ok, 99), max(ok, default=None)]
    s.md(h.table("|", [
        ("requests (with faults)", f"{len(recs):,} ({warm:,} more in the warm-up), "
         f"{len(recs) / end:,.0f} req/s"),
        ("latency of the successful ones p50, p99, max", f"{h.num(latency)} ms"),
        *((f"failed {m}s", f"{len(rs)}: {in_flight[m]} in flight at a kill, "
           f"{len(rs) - in_flight[m]} not; {h.kinds(rs) or 'none'}") for m, rs in by.items()),
        ("wrong answers (a 200 with a wrong body)", len(wrong)),
        ("SIGKILLs", f"{len(done)} (skipped {len(kills) - len(done)}); requests in flight on "
         f"the killed workers per status: {sum(k.get('sessions') or 0 for k in done)}"),
        ("rolling restarts", f"{len(s.data['restarts'])} asked; outcomes in the log: "
         f"{', '.join(f'{k} {n}' for k, n in ends.items()) or 'none'}"),
        ("daemon RSS start → end (idle)", f"{first['rss'] / 2**20:.1f} → "
         f"{last['rss'] / 2**20:.1f} MiB ({growth:+.1f} %); max "
         f"{max(x['rss'] for x in samples) / 2**20:.1f} MiB"),
        ("daemon fds start → end (idle)", f"{first['fds']} → {last['fds']}; max "
         f"{max(x['fds'] for x in samples)}; kinds changed: {kinds or 'none'}"),
        ("worker exits not caused by our kills", len(foreign)),
    ]), h.table("t s>|phase|RSS MiB>|fds>|threads>|children>|ready>|upstream conns>", [
        [x["t"], x["phase"], x["rss"] / 2**20, x["fds"], x["threads"], x["children"],
         x["ready"], x["upstream"]] for x in samples]))  # fmt: skip
    if other:
        s.md(f"Failures not in flight at a kill (first 20 of {len(other)}):", h.table(
            "start s>|end s>|kind|front|reused|outcome|since the last kill s>",
            [[r.start, r.end, r.kind, r.front, r.reused,
              (r.error or f"{r.status} {(r.detail or '').strip()[-60:]}")[:100],
              min((r.start - t for t in times if t <= r.end), default=None)]
             for r in other[:20]]))  # fmt: skip
    s.md(
        f"{a.connections} connections (half Unix, half TCP), {a.workers} workers, "
        f"`worker_concurrency = 0`; in flight at a kill = started before a SIGKILL and ended "
        f"within {a.window:g} s after it. Start and end samples: daemon idle, pool settled."
    )
    s.data["failures"] = [dataclasses.asdict(r) for r in failed[:500]]
    s.check("failed GETs", len(by["GET"]), "== 0", hard=True)
    s.check("failed POSTs not in flight at a kill", len(by["POST"]) - in_flight["POST"], "== 0",
            hard=True)  # fmt: skip
    s.check("wrong answers", len(wrong), "== 0", hard=True)
    s.check("daemon RSS growth (idle, end vs start)", growth, "< 10 %")
    fds = abs(last["fds"] - first["fds"])
    s.check("daemon fds back to their start count ± 5 (idle)", fds, "<= 5",
            f"{first['fds']} → {last['fds']}")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
