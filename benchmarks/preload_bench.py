"""Preloaded vs cold spawning: memory (PSS) and spawn-to-ready of N workers (issue 13).

Usage::

    .venv/bin/python benchmarks/preload_bench.py [--workers 16] [--ballast-mb 100]
                                                  [--import-delay 0] [--json]

The app is ``tests/apps/preload_app.py`` (a standard-library HTTP server)
copied into a temporary release directory; at import it builds
``--ballast-mb`` MB of Python objects and sleeps ``--import-delay`` seconds.
Each mode starts the workers one after the other, waits until each answers
``GET /``, sends each one request, then sums ``Pss`` over
``/proc/PID/smaps_rollup`` of the workers (the preloader is reported apart).

Self-contained on purpose: it uses flypool's preload package directly, not
the daemon or ``benchmarks/common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flypool.preload import Preloader

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"


def pss_kib(pid: int) -> int:
    """Proportional set size of one process, from /proc/PID/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line for {pid}")


async def answers(sock: str) -> bool:
    """One GET / on a fresh connection; True on 200."""
    try:
        reader, writer = await asyncio.open_unix_connection(sock)
    except OSError:
        return False
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        return line.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_ready(sock: str, proc: Any, timeout: float = 120.0) -> None:
    """Poll GET / until it answers (the worker's readiness)."""
    deadline = time.monotonic() + timeout
    while not await answers(sock):
        if proc.returncode is not None:
            raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sock} not ready within {timeout}s")
        await asyncio.sleep(0.005)


async def run_mode(mode: str, n: int, release: str, env: dict[str, str]) -> dict[str, Any]:
    """Start ``n`` workers cold or preloaded; return timings and memory."""
    argv_for = [sys.executable, "-m", "preload_serve"]
    procs: list[Any] = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    preloader: Preloader | None = None
    result: dict[str, Any] = {"mode": mode, "workers": n}
    try:
        if mode == "preload":
            t0 = time.monotonic()
            preloader = Preloader.for_command(
                [*argv_for, "/x"], modules=["preload_app"], release=release, env=env
            )
            await preloader.start(120)
            result["preloader_start_s"] = time.monotonic() - t0
        ready_s = []
        for i in range(n):
            sock = os.path.join(release, f"{mode}{i}.sock")
            argv = [*argv_for, sock]
            t0 = time.monotonic()
            if preloader is not None:
                proc: Any = await preloader.spawn(
                    argv, env=env, cwd=release, stdout=devnull, stderr=devnull
                )
            else:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=release,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=devnull,
                    stderr=devnull,
                    start_new_session=True,
                )
            procs.append(proc)
            await wait_ready(sock, proc)
            ready_s.append(time.monotonic() - t0)
        for i in range(n):
            await answers(os.path.join(release, f"{mode}{i}.sock"))
        await asyncio.sleep(0.5)  # let the last writes settle before reading smaps
        result["ready_first_s"] = ready_s[0]
        result["ready_rest_median_s"] = statistics.median(ready_s[1:]) if n > 1 else None
        result["ready_all_s"] = sum(ready_s)
        result["pss_workers_mib"] = sum(pss_kib(p.pid) for p in procs) / 1024
        if preloader is not None:
            result["pss_preloader_mib"] = pss_kib(preloader.pid) / 1024
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            await asyncio.wait_for(p.wait(), 10)
        if preloader is not None:
            await preloader.stop()
        os.close(devnull)
    return result


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    release = tempfile.mkdtemp(prefix="fpb.", dir="/tmp")
    try:
        for name in ("preload_app.py", "preload_serve.py"):
            shutil.copy(APPS / name, os.path.join(release, name))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PRELOAD_APP_BALLAST_MB"] = str(args.ballast_mb)
        env["PRELOAD_APP_IMPORT_DELAY"] = str(args.import_delay)
        return [await run_mode(m, args.workers, release, env) for m in ("cold", "preload")]
    finally:
        shutil.rmtree(release, ignore_errors=True)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """A Markdown table, cold and preload side by side."""
    cold, pre = rows
    out = [
        f"{args.workers} workers, app importing ~{args.ballast_mb} MB of Python objects"
        f" (import delay {args.import_delay:g}s)",
        "",
        "| measure | cold | preload | ratio |",
        "|---|---|---|---|",
    ]
    saved = 1 - pre["pss_workers_mib"] / cold["pss_workers_mib"]
    out.append(
        f"| total PSS of the workers (MiB) | {cold['pss_workers_mib']:.0f} | "
        f"{pre['pss_workers_mib']:.0f} (+ preloader {pre['pss_preloader_mib']:.0f}) | "
        f"{saved:.0%} less |"
    )
    out.append(
        f"| spawn-to-ready, 1st worker (s) | {cold['ready_first_s']:.3f} | "
        f"{pre['ready_first_s']:.3f} (+ preloader start {pre['preloader_start_s']:.3f}) | |"
    )
    if cold["ready_rest_median_s"] is not None:
        speed = cold["ready_rest_median_s"] / pre["ready_rest_median_s"]
        out.append(
            f"| spawn-to-ready, 2nd and later, median (s) | {cold['ready_rest_median_s']:.3f} | "
            f"{pre['ready_rest_median_s']:.3f} | {speed:.0f}x faster |"
        )
    out.append(
        f"| all {args.workers} one after the other (s) | {cold['ready_all_s']:.2f} | "
        f"{pre['ready_all_s'] + pre['preloader_start_s']:.2f} | |"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--ballast-mb", type=int, default=100)
    parser.add_argument("--import-delay", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print(json.dumps(rows, indent=2) if args.json else report(rows, args))


if __name__ == "__main__":
    main()
