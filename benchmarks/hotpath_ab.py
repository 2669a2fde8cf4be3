"""Same-run A/B of flypool daemon variants on the proxy hot path.

Run from the repository root::

    .venv/bin/python benchmarks/hotpath_ab.py \\
        --variant pure:FLYPOOL_IMPL=pure --variant compiled:FLYPOOL_IMPL=compiled \\
        [--rounds 5] [--duration 8] [--syscalls]

Each variant is one ``flypool run`` daemon with one worker and
``worker_concurrency = 0`` (the setting of issue 10's table) in front of its
own worker, the fast keep-alive backend of router_compare.py
(``benchmarks/apps/fast_backend.py``: uvloop + httptools, one constant
answer) on a Unix socket. All daemons run at the same time; ``wrk -t1 -c32``
loads them in interleaved rounds (A, B, ..., A, B, ...), so that the noise of
a shared machine hits every variant alike. Per run it reads the daemon's CPU
time (``/proc/PID/stat``, user and system apart) and, with ``--syscalls``,
counts the daemon's system calls with ``perf stat`` syscall tracepoints (all
threads; costs a few per cent of throughput, alike for every variant).

The variant named ``nginx`` is nginx instead (1 worker, upstream keepalive
64, as in router_compare.py) in front of a fast backend of its own on a Unix
socket; its CPU and syscalls are the master's and the worker's.

A variant is ``NAME[:ENV=VALUE[,ENV=VALUE...]][@LAUNCHER]``: the environment
is set for that daemon only; ``LAUNCHER`` is a Python file run instead of
``-m flypool`` (it receives ``-m flypool run ...`` as arguments and may
patch something before it runs the module), for experiments that have no
switch.

Prints a Markdown table of medians and the median of per-round ratios
against the first variant; writes every run to
``benchmarks/out/hotpath_ab.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

PERF = shutil.which("perf")
"""``perf`` (Debian ``linux-perf``), for ``--syscalls``."""
SYSCALLS = [
    "read",
    "readv",
    "recvfrom",
    "write",
    "writev",
    "sendto",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "openat",
]
"""Syscalls counted one by one with ``--syscalls`` (the total counts every syscall)."""
WORKER = [h.PY, h.APPS / "fast_backend.py", "--socket", "{socket}"]
DEFAULT_OUT = h.OUT / "hotpath_ab.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Variant:
    """One daemon configuration under test."""

    name: str
    env: dict[str, str]
    launcher: str | None = None
    server: h.Server | None = None
    pids: list[int] = field(default_factory=list)
    """The processes whose CPU time and syscalls count."""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME[:ENV=VALUE,...][@LAUNCHER]``."""
        launcher = None
        if "@" in text:
            text, where = text.split("@", 1)
            launcher = str(Path(where).resolve())  # the daemon runs in its own directory
        name, _, env_text = text.partition(":")
        env: dict[str, str] = {}
        for item in filter(None, env_text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"variant {name}: {item!r} is not ENV=VALUE")
            env[key] = value
        return cls(name, env, launcher)


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of ``pids`` in clock ticks (all threads), summed."""
    user = system = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def start_variant(variant: Variant, stack: contextlib.ExitStack) -> None:
    """Start the server of ``variant``; ``nginx`` is nginx (1 worker, upstream keepalive 64)
    in front of a fast backend of its own, on a Unix socket; the others are flypool."""
    if variant.name == "nginx":
        tmp = h.tmpdir("fpab")
        stack.callback(shutil.rmtree, tmp, True)
        sock = f"unix:{tmp}/backend.sock"
        argv = [str(a).format(socket=sock[5:]) for a in WORKER]
        backend = stack.enter_context(h.start_server("backend", argv, sock))
        assert backend is not None
        variant.server = stack.enter_context(h.nginx(sock))
        variant.pids = [variant.server.proc.pid, *h.children(variant.server.proc.pid)]
        return
    variant.server = stack.enter_context(flypool_variant(variant))
    variant.pids = [variant.server.proc.pid]


def flypool_variant(variant: Variant) -> h.Flypool:
    """Start the daemon of ``variant`` with its environment (restored afterwards)."""
    saved = {key: os.environ.get(key) for key in variant.env}
    os.environ.update(variant.env)  # the daemon inherits it; its worker too
    try:
        args = [variant.launcher] if variant.launcher else []
        return h.start_flypool(WORKER, workers=1, worker_concurrency=0, python_args=args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def perf_argv(pids: list[int], seconds: float, out: Path) -> list[str]:
    """``perf stat`` counting the daemon's syscalls for ``seconds``."""
    assert PERF is not None
    events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS)]
    return [
        PERF,
        "stat",
        "-x,",
        "-e",
        ",".join(events),
        "-p",
        ",".join(map(str, pids)),
        "-o",
        str(out),
        "--",
        "sleep",
        f"{seconds:g}",
    ]


def read_perf(out: Path) -> dict[str, int]:
    """Syscall name → count from a ``perf stat -x,`` file."""
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        event = parts[2]
        name = "total" if event == "raw_syscalls:sys_enter" else event.split("sys_enter_")[-1]
        counts[name] = int(parts[0])
    return counts


def one_run(variant: Variant, number: int, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``variant``'s server once; its figures."""
    server = variant.server
    assert server is not None
    pids = variant.pids
    perf: subprocess.Popen[bytes] | None = None
    perf_out = server.tmp / f"perf-{number}.txt"
    if args.syscalls:
        # perf stat starts counting at once; it runs a little past wrk, which
        # adds idle-loop syscalls only (a timer or two).
        perf = subprocess.Popen(
            perf_argv(pids, args.duration + 0.5, perf_out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2)
    user0, sys0 = cpu_ticks(pids)
    wrk = h.wrk(server.url, args.duration, connections=args.connections)
    user1, sys1 = cpu_ticks(pids)
    requests = max(wrk["requests"], 1)
    run: dict[str, Any] = {
        "round": number,
        "requests": wrk["requests"],
        "requests_per_s": wrk["rps"],
        "p50_ms": wrk["p50"],
        "p99_ms": wrk["p99"],
        "errors": wrk["errors"],
        "user_us_per_req": (user1 - user0) / CLOCK_TICKS / requests * 1e6,
        "sys_us_per_req": (sys1 - sys0) / CLOCK_TICKS / requests * 1e6,
    }
    run["cpu_us_per_req"] = run["user_us_per_req"] + run["sys_us_per_req"]
    if perf is not None:
        try:
            perf.wait(args.duration + 30)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait()
        counts = read_perf(perf_out) if perf_out.exists() else {}
        run["syscalls_per_req"] = {k: v / requests for k, v in counts.items()}
    variant.runs.append(run)
    return run


def median(variant: Variant, key: str, sub: str | None = None) -> float | None:
    """Median of a figure over the variant's runs."""
    values = [r[key] if sub is None else r.get(key, {}).get(sub) for r in variant.runs]
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def paired(a: Variant, b: Variant, key: str) -> float | None:
    """Median over rounds of a's figure divided by b's (same round)."""
    ratios = [x[key] / y[key] for x, y in zip(a.runs, b.runs, strict=True) if y[key]]
    return statistics.median(ratios) if ratios else None


def best(variant: Variant, key: str) -> float | None:
    """The lowest value over the runs (a cost's least-disturbed reading on a busy machine)."""
    values = [r[key] for r in variant.runs if r.get(key) is not None]
    return min(values) if values else None


def table(variants: list[Variant], syscalls: bool) -> str:
    """Markdown summary: medians, and per-round ratios to the first variant."""
    head = (
        "| variant | req/s | x base | CPU µs/req | x base | user µs | x base | sys µs "
        "| best CPU µs | best user µs | p50 ms | p99 ms"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
    if syscalls:
        head += " | syscalls/req | " + " | ".join(SYSCALLS)
        sep += "|---:" * (1 + len(SYSCALLS))
    lines = [head + " |", sep + "|"]
    base = variants[0]

    def fmt(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    for v in variants:
        row = [
            v.name,
            fmt(median(v, "requests_per_s"), 0),
            fmt(paired(v, base, "requests_per_s"), 3),
            fmt(median(v, "cpu_us_per_req"), 1),
            fmt(paired(v, base, "cpu_us_per_req"), 3),
            fmt(median(v, "user_us_per_req"), 1),
            fmt(paired(v, base, "user_us_per_req"), 3),
            fmt(median(v, "sys_us_per_req"), 1),
            fmt(best(v, "cpu_us_per_req"), 1),
            fmt(best(v, "user_us_per_req"), 1),
            fmt(median(v, "p50_ms"), 2),
            fmt(median(v, "p99_ms"), 2),
        ]
        if syscalls:
            row.append(fmt(median(v, "syscalls_per_req", "total"), 2))
            row += [fmt(median(v, "syscalls_per_req", s), 3) for s in SYSCALLS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def log(message: str) -> None:
    """Progress, on stderr."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME[:ENV=VALUE,...][@LAUNCHER]; give it twice or more",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before round 1")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--syscalls", action="store_true", help="count syscalls with perf stat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.syscalls and PERF is None:
        parser.error("--syscalls needs perf (apt-get install linux-perf)")
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the A/B; returns the exit status (1 when a run had errors)."""
    args = parse_args(argv)
    variants = [Variant.parse(text) for text in args.variant]
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    info = h.machine()
    load_start = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as cleanup:
        for v in variants:
            log(f"starting {v.name} {v.env} {v.launcher or ''}")
            start_variant(v, cleanup)
        for v in variants:
            assert v.server is not None
            if args.warmup:
                h.wrk(v.server.url, args.warmup, connections=args.connections)
        for number in range(1, args.rounds + 1):
            for v in variants:
                run = one_run(v, number, args)
                log(
                    f"round {number}/{args.rounds} {v.name:<12} {run['requests_per_s']:>9,.0f} "
                    f"req/s  CPU {run['cpu_us_per_req']:5.1f} µs/req "
                    f"(user {run['user_us_per_req']:4.1f}, sys {run['sys_us_per_req']:4.1f})"
                    + (f"  ERRORS {run['errors']}" if run["errors"] else "")
                )
    text = table(variants, args.syscalls)
    print(text)
    print(
        f"\n{args.rounds} interleaved rounds x {args.duration}s of `wrk -t1 -c{args.connections}`"
        f" per variant; medians; x base = median of per-round ratios to {variants[0].name}. "
        f"{os.cpu_count()} CPUs, load {load_start} at start, "
        f"{[round(x, 2) for x in os.getloadavg()]} at end."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "hotpath_ab",
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
                "machine": info,
                "markdown": text,
                "variants": [
                    {"name": v.name, "env": v.env, "launcher": v.launcher, "runs": v.runs}
                    for v in variants
                ],
            },
            indent=1,
        )
    )
    log(f"raw figures: {args.out}")
    return 1 if any(r["errors"] for v in variants for r in v.runs) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except h.BenchError as err:
        print(f"hotpath_ab: {err}", file=sys.stderr)
        raise SystemExit(1) from None
