"""Preloaded against cold spawning (issue 13): memory (PSS) and spawn-to-ready of N workers.

The app is `tests/apps/preload_app.py` (a standard-library HTTP server on a Unix socket,
run as `python -m preload_serve SOCKET`) copied into a temporary release directory; at
import it builds `--ballast-mb` MB of Python objects and sleeps `--import-delay` s. Each
mode starts `--workers` workers one after the other, each once the previous one answers
`GET /`: cold, each its own interpreter; preloaded, each forked by one
`flypool.preload.Preloader` that imported `preload_app` once. Spawn-to-ready is from the
spawn call to the first 200. Once all are up, each gets one more request, and the `Pss`
of their `/proc/PID/smaps_rollup` is summed (the preloader is reported apart). These
two drive flypool's preload package directly. Then, through a `flypool run` daemon with
`--workers` workers of the same app and `restart_batch = 1`: the wall time of one rolling
restart (from the request to the daemon's `restart end`, its `last_restart.duration_s`),
cold and with `preload = ["preload_app"]`; "boot" is the daemon's median spawn-to-ready
(`boot_s`) of a cold worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from typing import Any

import harness as h
import psutil

from flypool.preload import Preloader

S = h.Suite("preload_bench", "Preloaded spawning: memory and spawn-to-ready", __doc__)
S.arg("--workers", type=int, default=16, help="workers per mode (default 16)")
S.arg("--ballast-mb", type=int, default=100, help="MB of Python objects at import (100)")
S.arg("--import-delay", type=float, default=0.0, help="extra seconds of import (default 0)")
S.arg("--restart", type=int, default=1, help="time a rolling restart through the daemon (0: no)")

SERVE = [sys.executable, "-m", "preload_serve"]


def answers(sock: str) -> bool | None:
    """True once ``GET /`` on ``sock`` answers 200."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        return h.request(f"unix:{sock}")[0] == 200 or None
    return None


def exited(proc: Any) -> str | None:
    """``None`` while ``proc`` runs."""
    return None if proc.returncode is None else f"the worker exited ({proc.returncode})"


def pss_mib(pid: int) -> float:
    """Proportional set size (psutil reads ``/proc/PID/smaps_rollup``), MiB."""
    return float(psutil.Process(pid).memory_full_info().pss) / 2**20


async def mode(preload: bool, n: int, release: str, env: dict[str, str]) -> dict[str, Any]:
    """Start ``n`` workers one after the other; their spawn-to-ready times and PSS."""
    name, procs, ready = "preload" if preload else "cold", [], []
    out: dict[str, Any] = {}
    preloader = Preloader.for_command([*SERVE, "/x"], modules=["preload_app"], release=release,
                                      env=env) if preload else None  # fmt: skip
    try:
        if preloader is not None:
            t0 = time.monotonic()
            await preloader.start(120)
            out["preloader_start_s"] = time.monotonic() - t0
        for i in range(n):
            argv, t0 = [*SERVE, sock := f"{release}/{name}{i}.sock"], time.monotonic()
            if preloader is not None:
                proc: Any = await preloader.spawn(argv, env=env, cwd=release, stdout=2, stderr=2)
            else:  # its output to stderr too: stdout carries the suite's Markdown
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=release, env=env, stdin=subprocess.DEVNULL, stdout=2,
                    start_new_session=True)  # fmt: skip
            procs.append(proc)
            await asyncio.to_thread(h.poll, partial(answers, sock), 120, f"{name} worker {i}",
                                    partial(exited, proc), 0.002)  # fmt: skip
            ready.append(time.monotonic() - t0)
        for i in range(n):
            await asyncio.to_thread(h.request, f"unix:{release}/{name}{i}.sock")
        await asyncio.sleep(0.5)  # let the last writes settle before reading smaps
        out |= {"ready_s": ready, "pss_workers_mib": sum(pss_mib(p.pid) for p in procs)}
        if preloader is not None:
            out["pss_preloader_mib"] = pss_mib(preloader.pid)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            await asyncio.wait_for(p.wait(), 10)
        if preloader is not None:
            await preloader.stop()
    return out


def restart_wall(preload: bool, n: int, release: str, knobs: dict[str, str]) -> dict[str, Any]:
    """One rolling restart of ``n`` workers through the daemon (batch 1): its wall time."""
    app: dict[str, Any] = {"restart_batch": 1, "start_timeout": "300s", "drain_timeout": "10s"}
    if preload:
        app["preload"] = ["preload_app"]
    with h.start_flypool([*SERVE, "{socket}"], workers=n, root=release, env=knobs,
                         timeout=600, **app) as fp:  # fmt: skip
        before = {w["pid"] for w in h.ready(fp.app())}
        t0 = time.monotonic()
        rid = fp.restart("rolling")

        def finished() -> dict[str, Any] | None:
            st = fp.app()
            last = st.get("last_restart") or {}
            return st if st.get("restart") is None and last.get("id", 0) >= rid else None

        st = h.poll(finished, 600, "the rolling restart", fp.proc.exited, interval=0.05)
        client_s = time.monotonic() - t0
        after = h.ready(st)
        events = fp.events()
        begin = next(i for i, e in enumerate(events) if e.get("event") == "restart begin")
        during = events[begin:]
        boots = [e["boot_s"] for e in during if e.get("event") == "worker ready"]
        imports = [e["import_s"] for e in during if e.get("event") == "preloader ready"]
    last = st["last_restart"]
    if last.get("outcome") != "completed" or len(after) != n or before & {w["pid"] for w in after}:
        raise h.BenchError(f"the restart did not replace every worker: {last}")
    return {"wall_s": last["duration_s"], "client_s": client_s, "boot_s": boots,
            "import_s": imports, "spawn": sorted({w.get("spawn") for w in after})}  # fmt: skip


def run(s: h.Suite, a: Any) -> None:
    """Cold, then preloaded; one table and two checks (three with the restart)."""
    release = str(h.tmpdir())
    restarts: dict[str, Any] = {}
    try:
        for app in ("preload_app.py", "preload_serve.py"):
            shutil.copy(h.REPO / "tests" / "apps" / app, release)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        knobs = {"PRELOAD_APP_BALLAST_MB": f"{a.ballast_mb}",
                 "PRELOAD_APP_IMPORT_DELAY": f"{a.import_delay:g}"}  # fmt: skip
        env |= knobs
        cold, pre = (asyncio.run(mode(p, a.workers, release, env)) for p in (False, True))
        if a.restart:
            for name, preload in (("cold", False), ("preload", True)):
                restarts[name] = restart_wall(preload, a.workers, release, knobs)
    finally:
        shutil.rmtree(release, ignore_errors=True)
    s.data = {"cold": cold, "preload": pre, "restart": restarts}
    saved = 100 * (1 - pre["pss_workers_mib"] / cold["pss_workers_mib"])
    rest = [h.median(m["ready_s"][1:]) for m in (cold, pre)]
    speed = rest[0] / rest[1] if None not in rest and rest[1] else None
    total = [sum(cold["ready_s"]), sum(pre["ready_s"]) + pre["preloader_start_s"]]
    s.md(f"{a.workers} workers; the app imports ~{a.ballast_mb} MB of Python objects "
         f"(import delay {a.import_delay:g} s).")  # fmt: skip
    s.md(h.table("measure|cold>|preload>|preload against cold>", [
        ["total PSS of the workers, MiB", f"{cold['pss_workers_mib']:.0f}",
         f"{pre['pss_workers_mib']:.0f} (+ preloader {pre['pss_preloader_mib']:.0f})",
         f"{saved:.0f}% less"],
        ["spawn-to-ready, 1st worker, s", f"{cold['ready_s'][0]:.3f}",
         f"{pre['ready_s'][0]:.3f} (+ preloader start {pre['preloader_start_s']:.3f})", ""],
        ["spawn-to-ready, 2nd and later, median s", h.num(rest[0], 3), h.num(rest[1], 3),
         f"{h.num(speed, 0)}x faster"],
        [f"all {a.workers} one after the other, s", f"{total[0]:.2f}", f"{total[1]:.2f}", ""],
    ]))  # fmt: skip
    if restarts:
        rc, rp = restarts["cold"], restarts["preload"]
        boot = h.median(rc["boot_s"])
        s.md(h.table("rolling restart through the daemon, batch 1|cold>|preload>", [
            [f"wall time, all {a.workers} workers replaced, s", f"{rc['wall_s']:.2f}",
             f"{rp['wall_s']:.2f}"],
            ["new worker spawn-to-ready (daemon's boot_s), median s", h.num(boot, 3),
             h.num(h.median(rp["boot_s"]), 3)],
            ["preloader import, s", "", h.num(h.median(rp["import_s"]), 3)],
            ["spawn of the new workers", ", ".join(rc["spawn"]), ", ".join(rp["spawn"])],
        ]))  # fmt: skip
        limit = None if boot is None else boot + 2.0
        s.check(f"rolling restart of {a.workers} preloaded workers (batch 1), wall time, "
                "against boot + 2 s", rp["wall_s"], f"<= {limit:.2f} s" if limit else "<= 0 s",
                digits=2)  # fmt: skip
        s.expect("restarted workers are preloaded", rp["spawn"] == ["preload"],
                 ", ".join(rp["spawn"]))  # fmt: skip
    s.check(f"{a.workers} workers of an app importing ~{a.ballast_mb} MB: total PSS saved by "
            "preloading", saved, ">= 30%", f"{saved:.0f}% less", digits=0)  # fmt: skip
    s.check("spawn-to-ready of the 2nd and later workers, cold / preload (medians)", speed,
            ">= 10x", digits=0)  # fmt: skip


if __name__ == "__main__":
    S.main(run)
