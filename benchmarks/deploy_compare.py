"""Deploys under load: flypool's rolling restart against gunicorn HUP, uvicorn HUP and
Passenger, with a good release and with a broken one.

The app, ``benchmarks/apps/slowboot.py``, imports in ``--boot-delay`` s and takes 5 ms a
request; it answers ``pid=P gen=G``, G being read at import from ``generation.txt``, and
its import raises when a ``broken`` file exists. Each run copies it to a fresh directory
(generation 1), starts ``--workers`` processes on a TCP port, waits until each one
answered, then runs ``--connections`` keep-alive clients looping ``GET /`` (nothing
retried; 10 ms pause after a failure). At ``--restart-at`` s the generation becomes 2
(for the broken release, ``broken`` appears too) and the deploy is triggered (see the
trigger column). flypool runs one gunicorn (one sync worker) per worker with
``ready_path = "/"`` (``-noprobe``: without, so a worker is ready once its socket
accepts) and ``restart_batch`` 1 or 2; Passenger is Standalone with its builtin engine.

A sampler process lists each system's worker processes every 20 ms, and flypool's status
is polled every 50 ms. *Every process new*: flypool's status lists no old PID and all
workers ready; others: the sampler sees no old process and as many new ones. Steady =
requests started before the deploy; restart window = requests overlapping [deploy, every
process new]. For the broken release, the ``--broken-window`` s after it are counted.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h

S = h.Suite("deploy_compare", "Deploys under load: good and broken releases", __doc__)
S.arg(
    "--systems",
    default="flypool-b1,flypool-b2,flypool-b1-noprobe,passenger-restart-app,"
    "passenger-restart-txt,gunicorn-hup,uvicorn-hup",
    help="comma-separated (default all)",
)
S.arg("--suites", default="deploy,broken", help="deploy, broken or both (default both)")
S.arg("--rounds", type=int, default=1, help="rounds (default 1)")
S.arg("--duration", type=float, default=20, help="seconds of load (default 20)")
S.arg("--restart-at", type=float, default=5, help="second of the deploy (default 5)")
S.arg("--broken-window", type=float, default=10, help="seconds counted after a broken one")
S.arg("--workers", type=int, default=4, help="processes (default 4)")
S.arg("--connections", type=int, default=8, help="keep-alive clients (default 8)")
S.arg("--boot-delay", type=float, default=1.0, help="app import seconds (default 1)")

Start = Callable[[Any, Path], tuple[h.Server, Callable[[], None]]]
NOTABLE = re.compile(r"aborting the restart|failed to boot|Worker failed|Could not spawn")
GET = h.get("/")


def app_env(a: Any) -> dict[str, str]:
    """What the app reads."""
    return {"SLOWBOOT_BOOT_S": f"{a.boot_delay:g}", "SLOWBOOT_REQUEST_S": "0.005"}


def flypool(batch: int, probe: bool) -> Start:
    """flypool in front of one gunicorn per worker, restarted through the admin socket."""

    def start(a: Any, app_dir: Path) -> tuple[h.Server, Callable[[], None]]:
        keys = {"restart_batch": batch, "drain_timeout": "30s", "env": app_env(a)}
        command = h.gunicorn("unix:{socket}", "slowboot:app")
        fp = h.start_flypool(command, workers=a.workers, root=app_dir, **keys,
                             **({"ready_path": "/"} if probe else {}))  # fmt: skip
        fp.match = "gunicorn"

        def trigger() -> None:
            fp.restart()

        return fp, trigger

    return start


def master(command: Callable[[Any, str], list[str]], match: str = "") -> Start:
    """A pre-fork server on TCP, restarted with SIGHUP to its master."""

    def start(a: Any, app_dir: Path) -> tuple[h.Server, Callable[[], None]]:
        addr, env = f"127.0.0.1:{h.free_port()}", {**os.environ, **app_env(a)}
        server = h.start_server("server", command(a, addr), addr, cwd=app_dir, env=env)
        server.match = match
        return server, lambda: os.kill(server.proc.pid, signal.SIGHUP)

    return start


def passenger(touch: bool) -> Start:
    """Passenger Standalone, restarted with ``restart-app`` or by touching restart.txt."""

    def start(a: Any, app_dir: Path) -> tuple[h.Server, Callable[[], None]]:
        server = h.passenger(app_dir, a.workers, app_env(a), "slowboot.py")
        argv = ["passenger-config", "restart-app", str(app_dir)]

        def trigger() -> None:
            subprocess.run(argv, env=server.env, timeout=30, check=True, capture_output=True)

        return server, (app_dir / "tmp" / "restart.txt").touch if touch else trigger

    return start


SYSTEMS: dict[str, tuple[str, Start]] = {
    "flypool-b1": ("POST /apps/app/restart?mode=rolling", flypool(1, True)),
    "flypool-b2": ("POST /apps/app/restart?mode=rolling", flypool(2, True)),
    "flypool-b1-noprobe": ("POST /apps/app/restart?mode=rolling", flypool(1, False)),
    "passenger-restart-app": ("passenger-config restart-app DIR", passenger(False)),
    "passenger-restart-txt": ("touch DIR/tmp/restart.txt", passenger(True)),
    "gunicorn-hup": ("kill -HUP <master>", master(lambda a, addr: h.gunicorn(
        addr, "slowboot:app", a.workers, "--graceful-timeout", "30"))),
    "uvicorn-hup": ("kill -HUP <master>", master(lambda a, addr: h.uvicorn(
        addr, "slowboot:asgi", a.workers, "--timeout-graceful-shutdown", "30"), "spawn_main")),
}  # fmt: skip


def warm_up(addr: str, workers: int) -> None:
    """Parallel GETs until every process answered (Passenger spawns lazily)."""
    seen: set[int] = set()

    def check() -> bool | None:
        recs = h.Load([addr], 2 * workers, lambda i, rng: GET, duration=0.5).run()
        seen.update(r.pid for r in recs if r.status == 200 and r.pid)
        return True if len(seen) >= workers else None

    h.poll(check, 60, f"{workers} processes to answer on {addr}")


def one(a: Any, key: str, suite: str, rnd: int) -> dict[str, Any]:
    """Start ``key``, load it, deploy generation 2 (broken for ``broken``), measure."""
    tmp = h.tmpdir("fpd")
    (app_dir := tmp / "app").mkdir()
    shutil.copy(h.APPS / "slowboot.py", app_dir)
    (app_dir / "generation.txt").write_text("1\n")
    duration = a.duration if suite == "deploy" else a.restart_at + a.broken_window
    row: dict[str, Any] = {"system": key, "suite": suite, "round": rnd, "trigger": SYSTEMS[key][0]}
    try:
        server, trigger = SYSTEMS[key][1](a, app_dir)
        with server:
            fp = server if isinstance(server, h.Flypool) else None
            warm_up(server.addr, a.workers)
            load = h.Load([server.addr], a.connections, lambda i, rng: GET, duration=duration,
                          pause_after_failure=0.01).start()  # fmt: skip
            sampler = h.Sampler(server, load.t0 + duration)
            poller = h.Poller(fp, load.t0).start() if fp else None
            try:
                h.poll(lambda: load.now() >= a.restart_at or None, 60, "the deploy",
                       server.proc.exited)  # fmt: skip
                (app_dir / "generation.txt").write_text("2\n")
                if suite == "broken":
                    (app_dir / "broken").touch()
                tr = load.now()
                trigger()
                recs = load.join()
            finally:
                load.stop()
                if poller:
                    poller.stop()
            samples = sampler.result(load.t0)
            row["exited"] = server.proc.exited()
            tail = server.proc.tail(60).splitlines()
            if (extra := server.tmp / "passenger.log").exists():
                tail += extra.read_text(errors="replace").splitlines()[-60:]
            if not fp:
                row["notable"] = next((ln for ln in reversed(tail) if NOTABLE.search(ln)), "")
            final = fp.app() if fp and not row["exited"] else {}
            events = fp.events() if fp else []
    except (h.BenchError, OSError, subprocess.SubprocessError) as err:
        h.log(f"  {key}: {err}")
        return {**row, "error": str(err)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    old = set(([x.workers for x in samples if x.t < tr] or [{}])[-1])
    end = set(samples[-1].workers) if samples else set()
    if poller:  # flypool: its own status says which workers are old, new and ready
        old = {w["pid"] for w in ([app for t, app in poller.polls if t < tr] or [{}])[-1].get(
            "workers", [])}  # fmt: skip
        end = {w["pid"] for w in final.get("workers", [])}
        done = poller.first(tr, lambda app: not old & {w["pid"] for w in app["workers"]}
                            and len(h.ready(app)) >= a.workers)  # fmt: skip
        error_at = poller.first(tr, lambda app: bool(app.get("deployment_error")))
        seen = {w["pid"] for t, app in poller.polls if t < tr for w in app["workers"]}
        ready = [e for e in events if e.get("event") == "worker ready" and "boot_s" in e]
        boots = [e["boot_s"] for e in ready if e["pid"] not in seen]
        row |= {"median_boot": h.median(boots), "state": final.get("state"),
                "deployment_error": final.get("deployment_error"),
                "error_seen_s": h.minus(error_at, tr)}  # fmt: skip
    else:
        done = next((x.t for x in samples if x.t >= tr and not old & set(x.workers)
                     and len(x.workers) >= a.workers), None)  # fmt: skip
    ok_after = [r for r in recs if r.status == 200 and r.end >= tr]
    first_by_pid: dict[int, float] = {}
    for r in ok_after:
        if r.gen == "2" and r.pid:
            first_by_pid.setdefault(r.pid, r.end - tr)
    answered = sorted(first_by_pid.values())
    until = (done or duration) if suite == "deploy" else tr + a.broken_window
    window = [r for r in recs if tr <= r.start < tr + a.broken_window]
    first_failure = min((r.start - tr for r in window if r.failed), default=None)
    return row | {
        "requests": len(recs), "failed": sum(r.failed for r in recs), "kinds": h.kinds(recs),
        "steady": h.stats(r for r in recs if r.start < tr),
        "window": h.stats(r for r in recs if r.start < until and r.end > tr),
        "max_after": max((r.ms for r in ok_after), default=None),
        "all_new_s": h.minus(done, tr), "first_new_s": answered[0] if answered else None,
        "all_answered_s": answered[a.workers - 1] if len(answered) >= a.workers else None,
        "last_old_s": max((r.end - tr for r in ok_after if r.gen == "1"), default=None),
        "broken": {"requests": len(window), "failed": sum(r.failed for r in window),
                   "kinds": h.kinds(window), "old_kept": bool(old) and old <= end,
                   "gens": sorted({r.gen or "?" for r in window if not r.failed}),
                   "first_failure_s": first_failure},
        "failures": [dataclasses.asdict(r) for r in recs if r.failed][:30],
    }  # fmt: skip


TIMES = ("max_after", "all_new_s", "first_new_s", "all_answered_s", "last_old_s")


def outcome(r: dict[str, Any]) -> str:
    """What the system did with the broken release, in a few words."""
    parts = []
    if "state" in r:
        reason = (r.get("deployment_error") or {}).get("reason")
        parts.append(f"state {r['state']}; deployment_error.reason: {reason!r}")
    if r.get("notable"):
        parts.append("log: " + r["notable"].split("]: ", 1)[-1][:110])
    if r.get("exited"):
        parts.append("server exited: " + r["exited"].splitlines()[0])
    return "; ".join(parts) or "—"


def run(s: h.Suite, a: Any) -> None:
    """Every suite x round x system, then the tables and flypool's targets."""
    rows: list[dict[str, Any]] = s.data.setdefault("runs", [])
    for suite in a.suites.split(","):
        for rnd in range(1, a.rounds + 1):
            for key in a.systems.split(","):
                h.log(f"{suite} round {rnd}: {key} ...")
                rows.append(r := one(a, key, suite, rnd))
                if "error" not in r:
                    h.log(
                        f"  {r['requests']} requests, {r['failed']} failed, every process new "
                        f"{h.num(r['all_new_s'])} s, max after {h.num(r['max_after'])} ms"
                    )

    def cells(r: dict[str, Any], *more: Any) -> list[Any]:
        if "error" in r:
            why = "could not run: " + " ".join(r["error"].split())[:150]
            return [r["system"], r["trigger"], r["round"], why, *[""] * (len(more) - 1)]
        return [r["system"], r["trigger"], r["round"], *more]

    def pair(w: dict[str, Any]) -> str:
        return f"{h.num(w['p99'])} / {h.num(w['max'])}"

    if deploys := [r for r in rows if r["suite"] == "deploy"]:
        s.md("### A good release", h.table(
            "system|trigger|round>|requests>|failed|steady p99 / max ms|restart-window p99 / max "
            "ms|max after restart ms>|every process new s>|1st new-gen answer s>|every new "
            "process answered s>|last old-gen answer s>",
            [cells(r, r.get("requests"), f"{r.get('failed')} {r.get('kinds', '')}".strip(),
                   *([pair(r["steady"]), pair(r["window"])] if "steady" in r else ["", ""]),
                   *(r.get(k) for k in TIMES)) for r in deploys]))  # fmt: skip
    if brokens := [r for r in rows if r["suite"] == "broken"]:
        s.md("### A broken release", h.table(
            f"system|trigger|round>|requests in {a.broken_window:g} s after>|failed|1st failure "
            "s>|gens answering|old pool kept|what happened",
            [cells(r, b.get("requests"), f"{b.get('failed')} {b.get('kinds', '')}".strip(),
                   b.get("first_failure_s"), ", ".join(b.get("gens", [])) or "none",
                   "yes" if b.get("old_kept") else "**no**", outcome(r))
             for r in brokens if (b := r.get("broken", {})) is not None]))  # fmt: skip
    for r in rows:
        if r["system"] not in ("flypool-b1", "flypool-b2"):
            continue
        tag = f"{r['suite']}: {r['system']}"
        if "error" in r:
            s.expect(f"{tag}: ran", False, " ".join(r["error"].split())[:150], hard=True)
        elif r["suite"] == "broken":
            b, reason = r["broken"], (r.get("deployment_error") or {}).get("reason")
            s.check(f"{tag}: failed requests", b["failed"], "== 0", hard=True)
            s.expect(
                f"{tag}: old pool kept (old workers still serve)",
                b["old_kept"],
                f"{'yes' if b['old_kept'] else 'no'} (state at end: {r['state']})",
            )
            s.expect(f"{tag}: reason visible in `flypool status`", bool(reason), f"{reason!r}, "
                     f"seen {h.num(r['error_seen_s'])} s after the deploy", "a reason")  # fmt: skip
        else:
            steps = -(-a.workers // int(r["system"][-1]))
            s.check(f"{tag}: failed requests", r["failed"], "== 0", hard=True)
            limit = (r["steady"]["max"] or 0) + 50
            s.check(f"{tag}: max latency after the restart ≤ steady max + 50 ms", r["max_after"],
                    f"<= {limit:.1f} ms")  # fmt: skip
            for boot, what in ((a.boot_delay, "nominal"), (r["median_boot"], "measured")):
                if boot is not None:
                    limit = steps * boot + 0.4
                    s.check(f"{tag}: every worker new ≤ {steps} x boot + 0.4 s ({what} boot "
                            f"{boot:.2f} s)", r["all_new_s"], f"<= {limit:.2f} s")  # fmt: skip
    s.md(f"{a.workers} processes, {a.connections} keep-alive clients; deploy at t = "
         f"{a.restart_at:g} s of {a.duration:g} s ({a.restart_at + a.broken_window:g} s for the "
         "broken release); times in s after the deploy was triggered.")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
