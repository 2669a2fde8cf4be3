"""Router tax: flypool against nginx and HAProxy in front of the same backend.

Run from the repository root::

    .venv/bin/python benchmarks/router_compare.py [--rounds 3] [--duration 8] [--profile]

For each backend (``--backends``, default ``example,gunicorn``) these targets
are loaded with ``wrk -t1 -c32 -d8s --latency`` (keep-alive), in interleaved
rounds (every target once per round, round after round; medians over rounds):

- ``direct``: the backend on TCP 127.0.0.1, no proxy;
- ``nginx/tcp`` and ``nginx/unix``: nginx (own prefix and config in a
  ``/tmp`` directory, ``worker_processes 1``, an upstream with ``keepalive
  64``, ``proxy_http_version 1.1``, ``proxy_set_header Connection ""``, no
  access log) in front of the backend on TCP, or on a Unix socket;
- ``haproxy/tcp`` and ``haproxy/unix``: HAProxy (``mode http``, ``nbthread
  1``, keep-alive to the server, ``http-reuse always``, run with ``-db``) in
  front of the backend on TCP, or on a Unix socket;
- ``flypool/unix``: ``flypool run --workers 1 --worker-concurrency 0`` on
  127.0.0.1, its one worker on a Unix socket (flypool's only way to reach a
  worker besides ``worker_bind = "tcp"``).

The ``tcp`` proxies share one backend process (as does ``direct``); the
``unix`` proxies share another; flypool runs its own worker. Backends:

- ``example``: ``python -m flypool.example`` (a small asyncio/uvloop server);
- ``gunicorn``: ``python -m gunicorn --workers 1 --no-control-socket
  flypool.example.wsgi:app`` (one sync worker, which closes the connection
  after every answer, so each proxy opens one upstream connection a request).

The proxy's CPU time is read from ``/proc/PID/stat`` (utime + stime) before
and after each run and divided by wrk's request count: nginx is its master
plus its workers, HAProxy its one process, flypool the daemon only (not its
worker). Targets, evaluated on the median of per-round ratios and printed as
PASS/FAIL lines, for each backend and each upstream transport of the other
proxies: flypool req/s >= HAProxy's, flypool req/s >= 0.95 x nginx's, flypool
CPU per request <= 1.2 x nginx's.

``--profile`` then runs one more keep-alive wrk run against the first
backend's flypool while ``py-spy record`` samples the daemon (installed into
the venv: ``.venv/bin/pip install py-spy``), and prints the top functions by
own time. When py-spy cannot attach, it falls back to a fresh daemon run under
``python -m cProfile`` (stopped with SIGTERM, so that the profile is written).

Prints a Markdown table and the PASS/FAIL lines on stdout (progress on
stderr) and writes everything (command line, versions, machine, every run) to
``benchmarks/out/router_compare.json``. Exits 0 even when a target fails;
exits 1 when a run had errors (socket errors or non-2xx answers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
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
    BenchmarkError,
    Managed,
    WrkResult,
    command_version,
    free_port,
    log_tail,
    machine_info,
    poll_until,
    proc_children,
    proc_cpu_seconds,
    run_wrk,
    short_tmpdir,
    start_backend,
    start_flypool,
    start_process,
    start_unix_backend,
    wait_http_ok,
    write_json,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
"""The ``nginx`` binary."""
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
"""The ``haproxy`` binary."""
PY_SPY = str(Path(PYTHON).parent / "py-spy")
"""``py-spy``, installed next to the interpreter (``.venv/bin/pip install py-spy``)."""


@dataclass(frozen=True)
class BackendSpec:
    """How to start one backend: on TCP (``{host}``/``{port}``) and on a Unix socket
    (``{socket}``), the latter also being flypool's worker command."""

    tcp: list[str]
    unix: list[str]


_GUNICORN = [PYTHON, "-m", "gunicorn", "--workers", "1", "--no-control-socket"]
BACKENDS: dict[str, BackendSpec] = {
    "example": BackendSpec(
        tcp=[PYTHON, "-m", "flypool.example", "--port", "{port}"],
        unix=[PYTHON, "-m", "flypool.example", "--socket", "{socket}"],
    ),
    "gunicorn": BackendSpec(
        tcp=[*_GUNICORN, "--bind", "{host}:{port}", "flypool.example.wsgi:app"],
        unix=[*_GUNICORN, "--bind", "unix:{socket}", "flypool.example.wsgi:app"],
    ),
}
"""Backend name → its commands."""

FLYPOOL_ARGS = ["--worker-concurrency", "0"]
"""``flypool run`` flags besides listen/workers/admin socket/runtime dir/log format."""

KINDS = ["direct", "nginx/tcp", "nginx/unix", "haproxy/tcp", "haproxy/unix", "flypool/unix"]
"""Targets per backend, in the order they run within a round."""

DEFAULT_OUT = OUT_DIR / "router_compare.json"
PROFILE_TOP = 25
"""Functions listed by ``--profile``."""


# --------------------------------------------------------------------------- proxies


@dataclass
class Proxy:
    """nginx or HAProxy, started by us from a config in its own ``/tmp`` directory."""

    name: str
    proc: Managed
    port: int
    tmpdir: Path
    config: str

    @property
    def url(self) -> str:
        """The URL to load."""
        return f"http://127.0.0.1:{self.port}/"

    def cpu_pids(self) -> list[int]:
        """The processes whose CPU time counts as the proxy's: the one we started and,
        for nginx, its workers (the master's children)."""
        return [self.proc.pid, *proc_children(self.proc.pid)]

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the proxy (by PID: SIGTERM, then SIGKILL) and remove its directory."""
        try:
            self.proc.stop(timeout)
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def nginx_config(tmpdir: Path, port: int, upstream: str) -> str:
    """nginx.conf for a keep-alive reverse proxy from 127.0.0.1:``port`` to ``upstream``
    (``127.0.0.1:PORT`` or ``unix:/path``)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {tmpdir}/nginx.pid;
error_log {tmpdir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {tmpdir}/client_body;
    proxy_temp_path {tmpdir}/proxy;
    fastcgi_temp_path {tmpdir}/fastcgi;
    uwsgi_temp_path {tmpdir}/uwsgi;
    scgi_temp_path {tmpdir}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxy_config(port: int, server: str) -> str:
    """haproxy.cfg for a keep-alive reverse proxy from 127.0.0.1:``port`` to ``server``
    (``127.0.0.1:PORT`` or ``/path`` of a Unix socket)."""
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 {server}
"""


def _check_config(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"{what} rejects its config: {(done.stdout + done.stderr).strip()}")


def start_nginx(upstream: str) -> Proxy:
    """Start nginx in the foreground in front of ``upstream`` and wait until it answers 2xx."""
    tmpdir = short_tmpdir("fpn")
    port = free_port()
    config = nginx_config(tmpdir, port, upstream)
    conf_path = tmpdir / "nginx.conf"
    conf_path.write_text(config)
    base = [NGINX, "-p", f"{tmpdir}/", "-e", str(tmpdir / "error.log"), "-c", str(conf_path)]
    proxy: Proxy | None = None
    try:
        _check_config([*base, "-t", "-q"], "nginx")
        proc = start_process("nginx", [*base, "-g", "daemon off;"], tmpdir / "nginx.out")
        proxy = Proxy("nginx", proc, port, tmpdir, config)
        wait_http_ok("127.0.0.1", port, "/", 30.0, alive=proc.exited)
        poll_until(
            lambda: True if proc_children(proc.pid) else None, 10.0, "nginx's worker", proc.exited
        )
    except BaseException:
        if proxy is not None:
            proxy.stop()
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return proxy


def start_haproxy(server: str) -> Proxy:
    """Start HAProxy in the foreground (``-db``) in front of ``server``; wait until it answers."""
    tmpdir = short_tmpdir("fph")
    port = free_port()
    config = haproxy_config(port, server)
    conf_path = tmpdir / "haproxy.cfg"
    conf_path.write_text(config)
    proxy: Proxy | None = None
    try:
        _check_config([HAPROXY, "-c", "-q", "-f", str(conf_path)], "HAProxy")
        proc = start_process("haproxy", [HAPROXY, "-db", "-f", str(conf_path)], tmpdir / "out")
        proxy = Proxy("haproxy", proc, port, tmpdir, config)
        wait_http_ok("127.0.0.1", port, "/", 30.0, alive=proc.exited)
    except BaseException:
        if proxy is not None:
            proxy.stop()
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return proxy


# --------------------------------------------------------------------------- rounds


@dataclass
class Round:
    """One wrk run against one target, plus the proxy's CPU time around it."""

    round: int
    wrk: WrkResult
    started_at: float
    proxy_cpu_s: float | None = None
    proxy_pids: list[int] = field(default_factory=list)

    @property
    def proxy_cpu_ms_per_1k(self) -> float | None:
        """Proxy CPU milliseconds per 1,000 requests in this round."""
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
            data["proxy_pids"] = self.proxy_pids
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
    """One thing to load: a backend reached ``direct``-ly or through a proxy."""

    backend: str
    kind: str
    url: str
    argv: list[str]
    cpu_pids: Callable[[], list[int]] | None = None
    """The proxy's processes (``None`` for ``direct``)."""
    config: str | None = None
    rounds: list[Round] = field(default_factory=list)

    def run_round(self, number: int, args: argparse.Namespace) -> Round:
        """Run wrk once against this target; read the proxy's CPU time around it."""
        pids = self.cpu_pids() if self.cpu_pids is not None else []
        cpu_before = sum(proc_cpu_seconds(pid) for pid in pids)
        started = time.time()
        wrk = run_wrk(
            self.url, duration_s=args.duration, threads=args.threads, connections=args.connections
        )
        cpu_s = sum(proc_cpu_seconds(pid) for pid in pids) - cpu_before if pids else None
        result = Round(number, wrk, started, proxy_cpu_s=cpu_s, proxy_pids=pids)
        self.rounds.append(result)
        return result

    def median(self, value: str) -> float | None:
        """Median over the rounds of ``requests_per_s``, ``p50``, ``p99`` or ``cpu``."""
        values = [v for v in map(FIGURES[value], self.rounds) if v is not None]
        return statistics.median(values) if values else None

    @property
    def errors(self) -> int:
        """Socket errors plus non-2xx/3xx answers over all rounds."""
        return sum(r.wrk.errors for r in self.rounds)


def paired_ratio(mine: Target, theirs: Target, value: str) -> float | None:
    """Median of the per-round ratios ``mine / theirs`` of a figure (rounds are interleaved,
    so round N of both ran a few seconds apart)."""
    pick = FIGURES[value]
    ratios = []
    for a, b in zip(mine.rounds, theirs.rounds, strict=True):
        x, y = pick(a), pick(b)
        if x is not None and y:
            ratios.append(x / y)
    return statistics.median(ratios) if ratios else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_table(targets: list[Target]) -> str:
    """The summary table: medians over the rounds; vs direct = median of per-round ratios."""
    lines = [
        "| backend | target (proxy/upstream) | median req/s | p50 ms | p99 ms "
        "| proxy CPU ms/1k req | req/s vs direct | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(t.backend, t.kind): t for t in targets}
    for target in targets:
        ratio = None
        if target.kind != "direct":
            ratio = paired_ratio(target, by_key[target.backend, "direct"], "requests_per_s")
        lines.append(
            f"| {target.backend} | {target.kind} | {_fmt(target.median('requests_per_s'), 0)} "
            f"| {_fmt(target.median('p50'))} | {_fmt(target.median('p99'))} "
            f"| {_fmt(target.median('cpu'), 1)} | {_fmt(ratio)} | {target.errors} |"
        )
    return "\n".join(lines)


@dataclass
class Check:
    """One target of the issue, evaluated."""

    name: str
    value: float | None
    limit: str
    passed: bool

    def line(self) -> str:
        """``PASS name: value (limit)``."""
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.name}: {_fmt(self.value, 3)} ({self.limit})"


def evaluate(targets: list[Target]) -> list[Check]:
    """The issue's targets, per backend and per upstream transport of nginx/HAProxy."""
    by_key = {(t.backend, t.kind): t for t in targets}
    checks: list[Check] = []
    for backend in dict.fromkeys(t.backend for t in targets):
        flypool = by_key[backend, "flypool/unix"]
        for transport in ("unix", "tcp"):
            haproxy = by_key[backend, f"haproxy/{transport}"]
            nginx = by_key[backend, f"nginx/{transport}"]
            specs = [
                (haproxy, "requests_per_s", f"req/s flypool / haproxy-{transport}", 1.0, ">="),
                (nginx, "requests_per_s", f"req/s flypool / nginx-{transport}", 0.95, ">="),
                (nginx, "cpu", f"CPU per request flypool / nginx-{transport}", 1.2, "<="),
            ]
            for other, value, what, bound, op in specs:
                ratio = paired_ratio(flypool, other, value)
                ok = ratio is not None and (ratio >= bound if op == ">=" else ratio <= bound)
                checks.append(Check(f"{backend}: {what}", ratio, f"target {op} {bound:g}", ok))
    return checks


def summary(targets: list[Target]) -> list[dict[str, Any]]:
    """Medians per target and the per-round ratios to direct."""
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
            "errors": target.errors,
        }
        if target.kind != "direct":
            direct = by_key[target.backend, "direct"]
            row["requests_per_s_ratio_to_direct"] = paired_ratio(target, direct, "requests_per_s")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- profile


@dataclass
class ProfileRow:
    """One function of a profile: own (self) and total (inclusive) time."""

    function: str
    own: float
    total: float
    calls: int | None = None


@dataclass
class Profile:
    """What ``--profile`` found."""

    tool: str
    unit: str
    """``samples`` (py-spy) or ``s`` (cProfile)."""
    own_total: float
    """Sum of own time over all functions (samples or seconds)."""
    rows: list[ProfileRow]
    wrk: WrkResult
    detail: str
    raw_path: Path

    def text(self, top: int = PROFILE_TOP) -> str:
        """The top ``top`` functions by own time, as a Markdown table."""
        head = (
            f"Profile of the flypool daemon ({self.tool}, {self.detail}) during "
            f"`wrk -t{self.wrk.threads} -c{self.wrk.connections} -d{self.wrk.duration_s:g}s` "
            f"({self.wrk.requests_per_s:,.0f} req/s under the profiler); top {top} by own time:"
        )
        calls = self.tool == "cProfile"
        lines = [
            head,
            "",
            "| # | own % | own | total % | " + ("calls | " if calls else "") + "function |",
            "|---:|---:|---:|---:|" + ("---:|" if calls else "") + "---|",
        ]
        for i, row in enumerate(self.rows[:top], 1):
            own = f"{row.own:.3f}s" if self.unit == "s" else f"{row.own:.0f}"
            pct_own = 100 * row.own / self.own_total if self.own_total else 0.0
            pct_total = 100 * row.total / self.own_total if self.own_total else 0.0
            extra = f"{row.calls:,} | " if calls else ""
            fn = row.function.replace("|", "\\|")
            lines.append(f"| {i} | {pct_own:.1f} | {own} | {pct_total:.1f} | {extra}`{fn}` |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "tool": self.tool,
            "detail": self.detail,
            "unit": self.unit,
            "own_total": self.own_total,
            "raw_output": str(self.raw_path),
            "wrk": self.wrk.as_dict(),
            "top": [
                {"function": r.function, "own": r.own, "total": r.total, "calls": r.calls}
                for r in self.rows[:100]
            ],
        }


def parse_collapsed(text: str) -> tuple[list[ProfileRow], int]:
    """Own and total samples per frame from py-spy's ``raw`` (collapsed stacks) output:
    ``frame;frame;...;leaf COUNT`` a line. Returns the rows by own samples, and the total."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    rows = [ProfileRow(fn, own[fn], total[fn]) for fn in total]
    rows.sort(key=lambda r: (-r.own, -r.total, r.function))
    return rows, samples


def profile_py_spy(
    pid: int, url: str, args: argparse.Namespace, out_path: Path
) -> tuple[Profile | None, str]:
    """Sample the running daemon ``pid`` with ``py-spy record`` during one wrk run.
    Returns the profile, or ``None`` and why py-spy could not do it."""
    if not Path(PY_SPY).exists():
        return None, f"{PY_SPY} not found (.venv/bin/pip install py-spy)"
    argv = [
        PY_SPY,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(args.duration),
        "--rate",
        str(args.profile_rate),
        "--function",
        "--format",
        "raw",
        "--output",
        str(out_path),
        *(["--native"] if args.profile_native else []),
        *(["--gil"] if args.profile_gil else []),
    ]
    out_path.unlink(missing_ok=True)
    log_path = out_path.with_suffix(".log")
    log_path.unlink(missing_ok=True)  # `start_process` appends; the attach check reads it
    spy = start_process("py-spy", argv, log_path)
    try:
        # py-spy prints its banner once it has attached; give it a moment before loading.
        with contextlib.suppress(BenchmarkError):
            poll_until(
                lambda: True if "Sampling" in log_tail(log_path) else None,
                10.0,
                "py-spy to attach",
                spy.exited,
            )
        if spy.proc.poll() is not None:
            return None, f"py-spy exited at once: {log_tail(log_path)}"
        wrk = run_wrk(
            url, duration_s=args.duration, threads=args.threads, connections=args.connections
        )
        try:
            spy.proc.wait(args.duration + 60)
        except subprocess.TimeoutExpired:
            return None, "py-spy did not finish"
    finally:
        spy.stop()
    if spy.proc.returncode != 0 or not out_path.exists():
        return None, f"py-spy failed ({spy.proc.returncode}): {log_tail(log_path)}"
    rows, samples = parse_collapsed(out_path.read_text(errors="replace"))
    if samples == 0:
        return None, f"py-spy recorded no samples: {log_tail(log_path)}"
    expected = args.profile_rate * args.duration
    kind = "GIL-holding" if args.profile_gil else "non-idle"
    detail = (
        f"{samples} {kind} samples at {args.profile_rate} Hz, i.e. ~{100 * samples / expected:.0f}%"
        f" of {args.duration}s" + (", native frames" if args.profile_native else "")
    )
    profile = Profile("py-spy", "samples", samples, rows, wrk, detail, out_path)
    return profile, ""


def profile_cprofile(backend: BackendSpec, args: argparse.Namespace, out_path: Path) -> Profile:
    """Run a fresh flypool daemon under ``python -m cProfile``, load it once, stop it with
    SIGTERM (a clean exit writes the profile) and read it."""
    out_path.unlink(missing_ok=True)
    daemon = start_flypool(
        backend.unix,
        workers=1,
        extra_args=FLYPOOL_ARGS,
        interpreter_args=["-m", "cProfile", "-o", str(out_path)],
    )
    try:
        run_wrk(daemon.url, duration_s=1, threads=args.threads, connections=args.connections)
        wrk = run_wrk(
            daemon.url, duration_s=args.duration, threads=args.threads, connections=args.connections
        )
    finally:
        daemon.stop()
    if not out_path.exists():
        raise BenchmarkError(f"cProfile wrote no {out_path} (did the daemon exit cleanly?)")
    stats = pstats.Stats(str(out_path))
    rows = []
    own_total = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        own_total += tottime
        where = f"{name} ({filename}:{line})" if line else name
        rows.append(ProfileRow(where, tottime, cumtime, ncalls))
    rows.sort(key=lambda r: (-r.own, r.function))
    detail = "deterministic; includes start-up, warm-up and shutdown"
    return Profile("cProfile", "s", own_total, rows, wrk, detail, out_path)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Compare flypool's router tax with nginx and HAProxy in front of the "
        "same backend (interleaved rounds of wrk)."
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument(
        "--duration", type=int, default=8, help="seconds per wrk run, whole (default 8)"
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
        "--profile",
        action="store_true",
        help="after the rounds, profile flypool (first backend) during one more wrk run",
    )
    parser.add_argument(
        "--profiler",
        choices=["auto", "py-spy", "cprofile"],
        default="auto",
        help="auto: py-spy, else cProfile when py-spy cannot attach (default auto)",
    )
    parser.add_argument(
        "--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)"
    )
    parser.add_argument(
        "--profile-native", action="store_true", help="py-spy --native (C frames too)"
    )
    parser.add_argument(
        "--profile-gil",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="py-spy --gil: only samples holding the GIL, i.e. Python running on the event "
        "loop (a thread blocked on a queue can look busy otherwise; default on)",
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
    if args.warmup < 0 or args.profile_rate < 1:
        parser.error("--warmup must be >= 0 and --profile-rate >= 1")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def setup_targets(name: str, cleanup: contextlib.ExitStack) -> list[Target]:
    """Start one backend's servers and proxies (stopped by ``cleanup``); its targets in
    `KINDS` order."""
    spec = BACKENDS[name]
    log(f"starting {name}: backend on TCP, backend on a Unix socket, proxies, flypool ...")
    tcp = start_backend(f"{name}-tcp", spec.tcp)
    cleanup.callback(tcp.stop)
    unix = start_unix_backend(f"{name}-unix", spec.unix)
    cleanup.callback(unix.stop)
    targets = [Target(name, "direct", tcp.url, tcp.proc.argv)]
    for kind, start, upstream in (
        ("nginx/tcp", start_nginx, f"{tcp.host}:{tcp.port}"),
        ("nginx/unix", start_nginx, f"unix:{unix.socket_path}"),
        ("haproxy/tcp", start_haproxy, f"{tcp.host}:{tcp.port}"),
        ("haproxy/unix", start_haproxy, str(unix.socket_path)),
    ):
        proxy = start(upstream)
        cleanup.callback(proxy.stop)
        targets.append(Target(name, kind, proxy.url, proxy.proc.argv, proxy.cpu_pids, proxy.config))
    daemon = start_flypool(spec.unix, workers=1, extra_args=FLYPOOL_ARGS)
    cleanup.callback(daemon.stop)
    daemon_pid = daemon.pid
    targets.append(Target(name, "flypool/unix", daemon.url, daemon.proc.argv, lambda: [daemon_pid]))
    return targets


def run_profile(
    targets: list[Target], args: argparse.Namespace, out_base: Path
) -> tuple[Profile, list[str]]:
    """``--profile``: py-spy on the first flypool target, else cProfile on a fresh daemon."""
    flypool = next(t for t in targets if t.kind == "flypool/unix")
    assert flypool.cpu_pids is not None
    notes: list[str] = []
    if args.profiler in ("auto", "py-spy"):
        log(f"profiling {flypool.backend} flypool with py-spy ({args.duration}s) ...")
        profile, why = profile_py_spy(
            flypool.cpu_pids()[0], flypool.url, args, out_base.with_suffix(".pyspy.txt")
        )
        if profile is not None:
            return profile, notes
        notes.append(f"py-spy could not profile the daemon: {why}")
        log(notes[-1])
        if args.profiler == "py-spy":
            raise BenchmarkError(notes[-1])
    log(f"profiling {flypool.backend} flypool under cProfile ({args.duration}s) ...")
    spec = BACKENDS[flypool.backend]
    return profile_cprofile(spec, args, out_base.with_suffix(".prof")), notes


def versions() -> dict[str, str]:
    """Versions of the proxies and tools (Python, flypool, gunicorn, wrk are in `machine_info`)."""
    return {
        "nginx": command_version([NGINX, "-v"]),
        "haproxy": command_version([HAPROXY, "-v"]),
        "wrk": command_version([WRK, "--version"]),
        "py-spy": command_version([PY_SPY, "--version"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    info = machine_info()
    tools = versions()
    log(
        f"router_compare: {args.rounds} rounds x {args.duration}s, wrk -t{args.threads} "
        f"-c{args.connections}, backends {','.join(args.backends)}; "
        f"{info['nproc']} CPUs ({info['cpu_model']}), load {info['loadavg_at_start']}; "
        f"{tools['nginx']}; {tools['haproxy']}"
    )

    targets: list[Target] = []
    profile: Profile | None = None
    profile_notes: list[str] = []
    with contextlib.ExitStack() as cleanup:
        for name in args.backends:
            targets.extend(setup_targets(name, cleanup))

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
                    f"round {number}/{args.rounds} {target.backend:>8} {target.kind:<12} "
                    f"{result.wrk.requests_per_s:>9,.0f} req/s  p50 {result.wrk.p50_ms:7.2f} ms"
                    f"  p99 {result.wrk.p99_ms:7.2f} ms"
                    + (f"  proxy CPU {cpu:6.1f} ms/1k" if cpu is not None else "")
                    + (f"  ERRORS {result.wrk.errors}" if result.wrk.errors else "")
                )

        if args.profile:
            profile, profile_notes = run_profile(targets, args, args.out)
        log("stopping ...")
    loadavg_end = list(os.getloadavg())

    table = markdown_table(targets)
    checks = evaluate(targets)
    print(table)
    print()
    print(
        f"{args.rounds} interleaved rounds x {args.duration}s of `wrk -t{args.threads} "
        f"-c{args.connections} --latency` per target; medians over rounds; ratios are medians "
        f"of per-round ratios. Proxy CPU: nginx master+worker, HAProxy, flypool daemon only. "
        f"{info['nproc']} CPUs, {info['cpu_model']}; load average "
        f"{info['loadavg_at_start']} before, {[round(x, 2) for x in loadavg_end]} after."
    )
    print()
    for check in checks:
        print(check.line())
    if profile is not None:
        print()
        for note in profile_notes:
            print(note)
        print(profile.text())
        print(f"\nraw profile: {profile.raw_path}")

    report = {
        "benchmark": "router_compare",
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
            "flypool_args": FLYPOOL_ARGS,
        },
        "versions": {
            **tools,
            "python": info["python"],
            "flypool": info["flypool"],
            "gunicorn": info["gunicorn"],
        },
        "machine": {**info, "loadavg_at_end": loadavg_end},
        "summary": summary(targets),
        "checks": [
            {"name": c.name, "value": c.value, "limit": c.limit, "passed": c.passed} for c in checks
        ],
        "markdown": table,
        "profile": None
        if profile is None
        else {**profile.as_dict(), "notes": profile_notes, "text": profile.text()},
        "targets": [
            {
                "backend": t.backend,
                "target": t.kind,
                "url": t.url,
                "argv": t.argv,
                "config": t.config,
                "rounds": [r.as_dict() for r in t.rounds],
            }
            for t in targets
        ],
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out}")
    errors = sum(t.errors for t in targets)
    if errors:
        log(f"router_compare: {errors} errors (socket errors or non-2xx answers); see the JSON")
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"router_compare: {err}", file=sys.stderr)
        raise SystemExit(1) from None
