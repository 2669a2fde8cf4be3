"""Router tax: what flypool's proxy costs per request, versus the same worker reached directly.

Run from the repository root::

    .venv/bin/python benchmarks/router_tax.py --rounds 3 --duration 5

For each backend (``--backends example,gunicorn``) two targets run side by
side for the whole benchmark:

- **direct**: the app server on a TCP port (``python -m flypool.example
  --port N``, or gunicorn's sync worker ``--bind 127.0.0.1:N --workers 1
  flypool.example.wsgi:app``);
- **flypool**: ``flypool run --workers 1 --worker-concurrency 0`` on a TCP
  port, proxying to one copy of the same app server on a Unix socket.

Each target gets a short unrecorded warm-up, then the rounds are interleaved
(``for round: for backend: direct, flypool``), each a ``wrk -t1 -c32
-dDs --latency`` run, so that drift on a shared, noisy machine hits both
sides alike. Only the ratios from one run mean anything; absolute figures
depend on the machine and on whatever else it was doing.

Around every flypool round the daemon's own CPU time (utime + stime from
``/proc/PID/stat``; the worker is not included) is read, and reported as
milliseconds of CPU per 1,000 proxied requests.

Prints a Markdown table on stdout (progress goes to stderr) and writes the
raw figures, the machine and the command line to
``benchmarks/out/router_tax.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The line above makes ``common`` importable when this file runs as a script.
from common import (
    OUT_DIR,
    PYTHON,
    WRK,
    Backend,
    BenchmarkError,
    FlypoolDaemon,
    WrkResult,
    machine_info,
    proc_cpu_seconds,
    run_wrk,
    start_backend,
    start_flypool,
    write_json,
)

BACKENDS: dict[str, tuple[list[str], list[str]]] = {
    "example": (
        [PYTHON, "-m", "flypool.example", "--port", "{port}"],
        [PYTHON, "-m", "flypool.example", "--socket", "{socket}"],
    ),
    "gunicorn": (
        [
            PYTHON,
            "-m",
            "gunicorn",
            "--bind",
            "{host}:{port}",
            "--workers",
            "1",
            "flypool.example.wsgi:app",
        ],
        [
            PYTHON,
            "-m",
            "gunicorn",
            "--bind",
            "unix:{socket}",
            "--workers",
            "1",
            "flypool.example.wsgi:app",
        ],
    ),
}
"""Backend name → (direct command, with ``{host}``/``{port}``; worker command under flypool)."""

FLYPOOL_ARGS = ["--worker-concurrency", "0"]
"""``flypool run`` flags besides listen/workers/admin socket/runtime dir/log format."""

DEFAULT_OUT = OUT_DIR / "router_tax.json"


@dataclass
class Round:
    """One wrk run against one target, plus the daemon's CPU time for flypool targets."""

    round: int
    wrk: WrkResult
    started_at: float
    proxy_cpu_s: float | None = None

    @property
    def proxy_cpu_ms_per_1k(self) -> float | None:
        """Daemon CPU milliseconds per 1,000 requests in this round."""
        if self.proxy_cpu_s is None or self.wrk.requests == 0:
            return None
        return self.proxy_cpu_s * 1e3 / self.wrk.requests * 1e3

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures of this round."""
        wrk = self.wrk
        data: dict[str, Any] = {
            "round": self.round,
            "started_at_unix": self.started_at,
            "requests": wrk.requests,
            "elapsed_s": wrk.elapsed_s,
            "requests_per_s": wrk.requests_per_s,
            "latency_ms": wrk.latency_ms,
            "socket_errors": wrk.socket_errors,
            "non_2xx_3xx": wrk.non_2xx_3xx,
            "wrk_output": wrk.output,
        }
        if self.proxy_cpu_s is not None:
            data["proxy_cpu_s"] = self.proxy_cpu_s
            data["proxy_cpu_ms_per_1k_requests"] = self.proxy_cpu_ms_per_1k
            data["proxy_cpu_percent"] = 100 * self.proxy_cpu_s / wrk.elapsed_s
        return data


FIGURES: dict[str, Callable[[Round], float | None]] = {
    "requests_per_s": lambda r: r.wrk.requests_per_s,
    "p50": lambda r: r.wrk.p50_ms,
    "p99": lambda r: r.wrk.p99_ms,
    "cpu": lambda r: r.proxy_cpu_ms_per_1k,
}
"""Figure name → how to read it from a `Round`."""


@dataclass
class Target:
    """One thing to load: a backend reached ``direct``-ly or through ``flypool``."""

    backend: str
    kind: str  # "direct" | "flypool"
    url: str
    argv: list[str]
    daemon_pid: int | None = None
    rounds: list[Round] = field(default_factory=list)

    def run_round(self, number: int, args: argparse.Namespace) -> Round:
        """Run wrk once against this target; read the daemon's CPU time around it."""
        cpu_before = proc_cpu_seconds(self.daemon_pid) if self.daemon_pid else None
        started = time.time()
        wrk = run_wrk(
            self.url, duration_s=args.duration, threads=args.threads, connections=args.connections
        )
        cpu_s = None
        if self.daemon_pid is not None and cpu_before is not None:
            cpu_s = proc_cpu_seconds(self.daemon_pid) - cpu_before
        result = Round(round=number, wrk=wrk, started_at=started, proxy_cpu_s=cpu_s)
        self.rounds.append(result)
        return result

    def median(self, value: str) -> float | None:
        """Median over the rounds of ``requests_per_s``, ``p50``, ``p99`` or ``cpu``."""
        values = [v for v in map(FIGURES[value], self.rounds) if v is not None]
        return statistics.median(values) if values else None


def paired_ratios(flypool: Target, direct: Target, value: str) -> list[float]:
    """Per-round flypool/direct ratios of ``requests_per_s``, ``p50`` or ``p99``."""
    pick = FIGURES[value]
    ratios = []
    for f, d in zip(flypool.rounds, direct.rounds, strict=True):
        mine, theirs = pick(f), pick(d)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return ratios


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_table(targets: list[Target]) -> str:
    """The summary table: medians over the rounds, ratio = median of per-round ratios."""
    lines = [
        "| backend | target | median req/s | p50 ms | p99 ms | proxy CPU ms/1k req "
        "| req/s flypool/direct |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {(t.backend, t.kind): t for t in targets}
    for target in targets:
        ratio = "—"
        if target.kind == "flypool":
            ratios = paired_ratios(target, by_key[target.backend, "direct"], "requests_per_s")
            ratio = f"{statistics.median(ratios):.2f}" if ratios else "—"
        errors = sum(r.wrk.errors for r in target.rounds)
        name = target.kind + (f" ({errors} errors)" if errors else "")
        lines.append(
            f"| {target.backend} | {name} | {_fmt(target.median('requests_per_s'), 0)} "
            f"| {_fmt(target.median('p50'))} | {_fmt(target.median('p99'))} "
            f"| {_fmt(target.median('cpu'), 1)} | {ratio} |"
        )
    return "\n".join(lines)


def summary(targets: list[Target]) -> list[dict[str, Any]]:
    """Medians per target and, for flypool targets, per-round and median ratios."""
    by_key = {(t.backend, t.kind): t for t in targets}
    rows = []
    for target in targets:
        row: dict[str, Any] = {
            "backend": target.backend,
            "target": target.kind,
            "median_requests_per_s": target.median("requests_per_s"),
            "median_p50_ms": target.median("p50"),
            "median_p99_ms": target.median("p99"),
            "median_proxy_cpu_ms_per_1k_requests": target.median("cpu"),
            "errors": sum(r.wrk.errors for r in target.rounds),
        }
        if target.kind == "flypool":
            direct = by_key[target.backend, "direct"]
            for value in ("requests_per_s", "p50", "p99"):
                ratios = paired_ratios(target, direct, value)
                row[f"{value}_ratio_per_round"] = ratios
                row[f"{value}_ratio_median"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Measure flypool's per-request cost against the same worker reached "
        "directly (interleaved rounds of wrk)."
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per wrk run, whole (default 5)"
    )
    parser.add_argument(
        "--backends",
        default="example,gunicorn",
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unrecorded wrk per target before round 1 (0: none; default 1)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"raw figures (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--rounds, --duration, --connections and --threads must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def log(message: str) -> None:
    """Progress, on stderr (stdout carries only the table)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    info = machine_info()
    log(
        f"router_tax: {args.rounds} rounds x {args.duration}s, wrk -t{args.threads} "
        f"-c{args.connections}, backends {','.join(args.backends)}; "
        f"{info['nproc']} CPUs ({info['cpu_model']}), load {info['loadavg_at_start']}"
    )

    targets: list[Target] = []
    with contextlib.ExitStack() as cleanup:
        for name in args.backends:
            direct_argv, worker_argv = BACKENDS[name]
            log(f"starting {name} direct ...")
            backend: Backend = start_backend(f"{name}-direct", direct_argv)
            cleanup.callback(backend.stop)
            targets.append(Target(name, "direct", backend.url, backend.proc.argv))
            log(f"starting {name} under flypool ...")
            daemon: FlypoolDaemon = start_flypool(worker_argv, workers=1, extra_args=FLYPOOL_ARGS)
            cleanup.callback(daemon.stop)
            targets.append(
                Target(name, "flypool", daemon.url, daemon.proc.argv, daemon_pid=daemon.pid)
            )

        if args.warmup:
            for target in targets:
                log(f"warm-up {target.backend} {target.kind} ({args.warmup}s)")
                run_wrk(
                    target.url,
                    duration_s=args.warmup,
                    threads=args.threads,
                    connections=args.connections,
                )

        for number in range(1, args.rounds + 1):
            for target in targets:
                result = target.run_round(number, args)
                cpu = result.proxy_cpu_ms_per_1k
                log(
                    f"round {number}/{args.rounds} {target.backend:>8} {target.kind:<7} "
                    f"{result.wrk.requests_per_s:>9,.0f} req/s  p50 {result.wrk.p50_ms:7.2f} ms"
                    f"  p99 {result.wrk.p99_ms:7.2f} ms"
                    + (f"  proxy CPU {cpu:6.1f} ms/1k" if cpu is not None else "")
                    + (f"  ERRORS {result.wrk.errors}" if result.wrk.errors else "")
                )
        log("stopping ...")

    table = markdown_table(targets)
    print(table)
    print()
    print(
        f"{args.rounds} interleaved rounds x {args.duration}s of `wrk -t{args.threads} "
        f"-c{args.connections} --latency` per target; medians over rounds; the ratio is the "
        f"median of per-round flypool/direct ratios. {info['nproc']} CPUs, {info['cpu_model']}."
    )

    report = {
        "benchmark": "router_tax",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command_line),
        "argv": command_line,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "threads": args.threads,
            "connections": args.connections,
            "warmup_s": args.warmup,
            "backends": args.backends,
            "wrk": WRK,
            "flypool_args": FLYPOOL_ARGS,
        },
        "machine": info,
        "summary": summary(targets),
        "markdown": table,
        "targets": [
            {
                "backend": t.backend,
                "target": t.kind,
                "url": t.url,
                "argv": t.argv,
                "rounds": [r.as_dict() for r in t.rounds],
            }
            for t in targets
        ],
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"router_tax: {err}", file=sys.stderr)
        raise SystemExit(1) from None
