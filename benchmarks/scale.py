"""Scale: many idle keep-alive clients, and a 64-worker pool's status.

Run from the repository root::

    .venv/bin/python benchmarks/scale.py [--idle 10000] [--rounds 3] [--duration 8]

(a) Idle connections. One daemon::

    flypool run --listen unix:DIR/front.sock --workers 1 --worker-concurrency 0
        --listen 127.0.0.1:PORT ... -- PYTHON -m flypool.example --socket {socket}

The benchmark raises its own ``RLIMIT_NOFILE`` (soft and hard; children, the
daemon included, inherit it) before starting the daemon. Then, in
interleaved rounds: ``wrk -t1 -c32 -d8s --latency`` on the TCP listener
without idle connections; ``--idle`` (10,000) client connections opened over
the front Unix socket, each sending one ``GET /`` (HTTP/1.1) and reading the
answer (in batches, with `selectors`), so that they are real keep-alive
connections the daemon holds; the daemon's RSS (psutil) and open fds; the same
wrk run with them open; a check that they are all still open (none readable:
no EOF) and that a sample of them still answers; then they are closed and the
daemon's fd count is awaited back near its baseline. Targets: throughput drop
(1 - median of per-round with/without req/s ratios) < 10%, daemon RSS with
the idle connections open (the largest sample) < 100 MB.

(b) A 64-worker pool (``--pool-workers``, example app): once all are ready,
``GET /status`` on the admin socket is timed 50 times (a new connection each,
as the CLI does; median, p95, max), then ``flypool status --json`` (the venv's
console script) 10 times (median wall time, which includes the interpreter's
start: ``python -c pass`` and ``python -c "import flypool.cli"`` are timed too
for reference). Target: ``GET /status`` p95 < 50 ms (the CLI line is
reported against the same 50 ms).

Prints a Markdown table and PASS/FAIL lines on stdout (progress on stderr);
writes ``benchmarks/out/scale.json``. Exits 1 when a wrk run had errors or an
idle connection was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The line above makes ``common`` importable when this file runs as a script.
from common import (
    OUT_DIR,
    PYTHON,
    BenchmarkError,
    FlypoolDaemon,
    WrkResult,
    admin_status,
    free_port,
    machine_info,
    poll_until,
    proc_cpu_seconds,
    ready_workers,
    run_wrk,
    start_flypool,
    wait_http_ok,
    write_json,
)

WORKER_COMMAND = [PYTHON, "-m", "flypool.example", "--socket", "{socket}"]
"""The app under flypool."""
FLYPOOL_ARGS = ["--worker-concurrency", "0"]
"""``flypool run`` flags of the idle-connection daemon besides listen/workers."""
FLYPOOL_CLI = str(Path(PYTHON).parent / "flypool")
"""The console script ``flypool`` next to the interpreter (what a user runs)."""
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: flypool-scale\r\n\r\n"
"""What each idle connection sends once (and the sample again after the load)."""
DEFAULT_OUT = OUT_DIR / "scale.json"
MB = 1024 * 1024

DROP_LIMIT = 0.10
RSS_LIMIT_MB = 100.0
STATUS_LIMIT_MS = 50.0


# --------------------------------------------------------------------------- fd limit


def raise_nofile(needed: int, wanted: int = 65536) -> tuple[int, int]:
    """Raise this process's ``RLIMIT_NOFILE`` (soft and hard) to ``max(needed, wanted)``
    when allowed (root), else the soft limit to the hard one; children started
    afterwards inherit it. Returns the new ``(soft, hard)``; raises when below ``needed``."""
    target = max(needed, wanted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        except (ValueError, OSError):  # not privileged: up to the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchmarkError(
            f"RLIMIT_NOFILE is {soft}, {needed} are needed (run as root, or lower --idle)"
        )
    return soft, hard


# --------------------------------------------------------------------------- idle clients


def response_complete(buf: bytes) -> bool | None:
    """``True`` when ``buf`` holds one whole ``200`` keep-alive response with a
    Content-Length, ``None`` when more bytes are needed; raises on anything else."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1")
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise BenchmarkError(f"unexpected answer on an idle connection: {lines[0]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and "close" in value.lower():
            raise BenchmarkError("the daemon answered Connection: close on an idle connection")
    if length is None:
        raise BenchmarkError(f"no Content-Length in an idle connection's answer: {head!r}")
    return True if len(buf) >= end + 4 + length else None


def exchange(socks: list[socket.socket], deadline: float) -> None:
    """Send `REQUEST` on every (non-blocking) socket and read one whole answer on each."""
    for sock in socks:
        _send_nonblocking(sock, deadline)
    buffers: dict[socket.socket, bytes] = dict.fromkeys(socks, b"")
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ, sock)
        pending = len(socks)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchmarkError(f"{pending} idle connections got no whole answer in time")
            for key, _ in sel.select(remaining):
                sock = key.data
                data = sock.recv(65536)
                if not data:
                    raise BenchmarkError("the daemon closed an idle connection before answering")
                buffers[sock] += data
                if response_complete(buffers[sock]):
                    sel.unregister(sock)
                    pending -= 1


def _send_nonblocking(sock: socket.socket, deadline: float) -> None:
    view = memoryview(REQUEST)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BenchmarkError("could not send on an idle connection in time") from None
            time.sleep(0.001)
            continue
        view = view[sent:]


def open_idle(path: Path, count: int, batch: int, timeout: float) -> list[socket.socket]:
    """Open ``count`` keep-alive connections to the Unix socket ``path``, ``batch`` at a
    time, each after one request and its whole answer; returns them, non-blocking."""
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            chunk: list[socket.socket] = []
            for _ in range(min(batch, count - len(socks))):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(sock)
                sock.settimeout(max(0.5, deadline - time.monotonic()))
                sock.connect(str(path))
                sock.setblocking(False)
                chunk.append(sock)
            exchange(chunk, deadline)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket (errors ignored)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def lost_connections(socks: list[socket.socket]) -> int:
    """How many of the idle connections are readable now: EOF (the daemon closed them)
    or unexpected bytes. Either way, not idle keep-alive connections any more."""
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        return len(sel.select(0))


# --------------------------------------------------------------------------- part (a)


@dataclass
class IdleRound:
    """One round of part (a): wrk without, then with, the idle connections."""

    round: int
    without: WrkResult
    with_idle: WrkResult
    open_s: float
    """Seconds to open the idle connections (connect, request, answer)."""
    rss_before: int
    rss_idle_open: int
    rss_after_load: int
    fds_before: int
    fds_idle_open: int
    lost_after_load: int
    sample_ok: int
    """Idle connections of the sample that answered a second request after the load."""
    cpu_without_s: float
    """The daemon's CPU time (utime + stime) during the run without idle connections."""
    cpu_with_s: float
    """The same during the run with them."""

    @property
    def cpu_without_ms_per_1k(self) -> float:
        """Daemon CPU ms per 1,000 requests without the idle connections."""
        return self.cpu_without_s * 1e6 / max(1, self.without.requests)

    @property
    def cpu_with_ms_per_1k(self) -> float:
        """Daemon CPU ms per 1,000 requests with the idle connections open."""
        return self.cpu_with_s * 1e6 / max(1, self.with_idle.requests)

    @property
    def ratio(self) -> float:
        """with / without req/s."""
        return self.with_idle.requests_per_s / self.without.requests_per_s

    @property
    def rss_max(self) -> int:
        """The largest RSS seen with the idle connections open."""
        return max(self.rss_idle_open, self.rss_after_load)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "round": self.round,
            "without": self.without.as_dict(),
            "with_idle": self.with_idle.as_dict(),
            "ratio_with_over_without": self.ratio,
            "open_idle_s": self.open_s,
            "rss_bytes": {
                "before": self.rss_before,
                "idle_open": self.rss_idle_open,
                "after_load": self.rss_after_load,
            },
            "daemon_fds": {"before": self.fds_before, "idle_open": self.fds_idle_open},
            "idle_lost_after_load": self.lost_after_load,
            "idle_sample_answered_after_load": self.sample_ok,
            "daemon_cpu_s": {"without": self.cpu_without_s, "with_idle": self.cpu_with_s},
            "daemon_cpu_ms_per_1k_requests": {
                "without": self.cpu_without_ms_per_1k,
                "with_idle": self.cpu_with_ms_per_1k,
            },
        }


@dataclass
class IdleResult:
    """Part (a) over all rounds."""

    idle: int
    rounds: list[IdleRound] = field(default_factory=list)
    daemon_argv: list[str] = field(default_factory=list)
    rlimit_nofile: tuple[int, int] = (0, 0)

    def median(self, pick: str) -> float:
        """Median over rounds of ``without``/``with`` ``rps``, ``p50``, ``p99`` or ``cpu``
        (daemon CPU ms per 1,000 requests), e.g. ``"with:p99"``."""
        values = []
        side, _, name = pick.partition(":")
        for r in self.rounds:
            wrk = r.without if side == "without" else r.with_idle
            cpu = r.cpu_without_ms_per_1k if side == "without" else r.cpu_with_ms_per_1k
            values.append(
                {"rps": wrk.requests_per_s, "p50": wrk.p50_ms, "p99": wrk.p99_ms, "cpu": cpu}[name]
            )
        return statistics.median(values)

    @property
    def drop(self) -> float:
        """1 - median of per-round with/without ratios."""
        return 1 - statistics.median(r.ratio for r in self.rounds)

    @property
    def rss_max_mb(self) -> float:
        """Largest daemon RSS with the idle connections open, MiB."""
        return max(r.rss_max for r in self.rounds) / MB

    @property
    def rss_baseline_mb(self) -> float:
        """Daemon RSS before the first idle connections, MiB."""
        return self.rounds[0].rss_before / MB

    @property
    def errors(self) -> int:
        """wrk errors plus lost idle connections plus sample connections that did not answer."""
        return sum(
            r.without.errors + r.with_idle.errors + r.lost_after_load for r in self.rounds
        ) + sum(1 for r in self.rounds if r.sample_ok < min(self.idle, SAMPLE))


SAMPLE = 100
"""Idle connections asked a second request after the loaded run."""


def wait_fds_back(proc: psutil.Process, baseline: int, timeout: float) -> None:
    """Wait until the daemon has closed its ends of the client connections (its fd count
    back within 16 of ``baseline``, its count before any load), so that every
    round starts alike."""
    poll_until(
        lambda: True if proc.num_fds() <= baseline + 16 else None,
        timeout,
        "the daemon to close the idle connections",
    )


def run_idle(args: argparse.Namespace, log_line: Callable[[str], None]) -> IdleResult:
    """Part (a)."""
    rlimit = raise_nofile(args.idle + 4096)
    log_line(f"RLIMIT_NOFILE now {rlimit}")
    port = free_port()
    daemon: FlypoolDaemon = start_flypool(
        WORKER_COMMAND,
        workers=args.workers,
        listen="unix:{tmpdir}/front.sock",
        extra_args=[*FLYPOOL_ARGS, "--listen", f"127.0.0.1:{port}"],
    )
    result = IdleResult(idle=args.idle, daemon_argv=daemon.proc.argv, rlimit_nofile=rlimit)
    socks: list[socket.socket] = []
    try:
        wait_http_ok("127.0.0.1", port, "/", 30.0, alive=daemon.proc.exited)
        assert daemon.unix_socket is not None
        url = f"http://127.0.0.1:{port}/"
        proc = psutil.Process(daemon.pid)
        fds_idle_daemon = proc.num_fds()
        daemon_limit = proc.rlimit(psutil.RLIMIT_NOFILE)
        log_line(f"daemon pid {daemon.pid}, RLIMIT_NOFILE {daemon_limit}; wrk on {url}")
        if args.warmup:
            run_wrk(url, duration_s=args.warmup, connections=args.connections)

        def wrk() -> tuple[WrkResult, float]:
            """One wrk run and the daemon's CPU seconds during it."""
            before = proc_cpu_seconds(daemon.pid)
            result = run_wrk(url, duration_s=args.duration, connections=args.connections)
            return result, proc_cpu_seconds(daemon.pid) - before

        for number in range(1, args.rounds + 1):
            wait_fds_back(proc, fds_idle_daemon, 60.0)
            rss_before, fds_before = proc.memory_info().rss, proc.num_fds()
            without, cpu_without = wrk()
            log_line(
                f"round {number}/{args.rounds} without idle: {without.requests_per_s:,.0f} req/s"
                f"  p99 {without.p99_ms:.2f} ms; RSS {rss_before / MB:.1f} MiB, {fds_before} fds"
            )
            started = time.monotonic()
            socks = open_idle(daemon.unix_socket, args.idle, args.batch, args.open_timeout)
            open_s = time.monotonic() - started
            rss_open, fds_open = proc.memory_info().rss, proc.num_fds()
            log_line(
                f"round {number}/{args.rounds} opened {len(socks)} idle in {open_s:.1f}s; "
                f"RSS {rss_open / MB:.1f} MiB, {fds_open} fds"
            )
            with_idle, cpu_with = wrk()
            rss_after = proc.memory_info().rss
            lost = lost_connections(socks)
            sample = socks[:SAMPLE]
            exchange(sample, time.monotonic() + 30.0)
            log_line(
                f"round {number}/{args.rounds} with idle:    {with_idle.requests_per_s:,.0f} "
                f"req/s  p99 {with_idle.p99_ms:.2f} ms; RSS {rss_after / MB:.1f} MiB; "
                f"{lost} idle lost; {len(sample)} of them answered again"
            )
            result.rounds.append(
                IdleRound(
                    round=number,
                    without=without,
                    with_idle=with_idle,
                    open_s=open_s,
                    rss_before=rss_before,
                    rss_idle_open=rss_open,
                    rss_after_load=rss_after,
                    fds_before=fds_before,
                    fds_idle_open=fds_open,
                    lost_after_load=lost,
                    sample_ok=len(sample),
                    cpu_without_s=cpu_without,
                    cpu_with_s=cpu_with,
                )
            )
            close_all(socks)
            socks = []
    finally:
        close_all(socks)
        daemon.stop()
    return result


# --------------------------------------------------------------------------- part (b)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def time_command(argv: list[str], times: int, timeout: float = 30.0) -> list[float]:
    """Wall time in ms of ``times`` runs of ``argv`` (each must exit 0)."""
    walls = []
    for _ in range(times):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        walls.append((time.perf_counter() - started) * 1e3)
        if done.returncode != 0:
            raise BenchmarkError(
                f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}"
            )
    return walls


@dataclass
class PoolResult:
    """Part (b)."""

    workers: int
    ready_s: float
    status_ms: list[float]
    cli_ms: list[float]
    python_start_ms: list[float]
    import_cli_ms: list[float]
    status_bytes: int
    daemon_argv: list[str]
    daemon_rss_bytes: int
    cli_argv: list[str]

    def stats(self, values: list[float]) -> dict[str, float]:
        """median, p95, max."""
        return {
            "median": statistics.median(values),
            "p95": percentile(values, 0.95),
            "max": max(values),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "workers": self.workers,
            "ready_s": self.ready_s,
            "daemon_argv": self.daemon_argv,
            "daemon_rss_bytes": self.daemon_rss_bytes,
            "status_json_bytes": self.status_bytes,
            "get_status_ms": {**self.stats(self.status_ms), "all": self.status_ms},
            "cli_argv": self.cli_argv,
            "cli_status_json_ms": {**self.stats(self.cli_ms), "all": self.cli_ms},
            "python_c_pass_ms": {**self.stats(self.python_start_ms), "all": self.python_start_ms},
            "python_import_flypool_cli_ms": {
                **self.stats(self.import_cli_ms),
                "all": self.import_cli_ms,
            },
        }


def run_pool(args: argparse.Namespace, log_line: Callable[[str], None]) -> PoolResult:
    """Part (b)."""
    started = time.monotonic()
    daemon = start_flypool(
        WORKER_COMMAND, workers=args.pool_workers, ready_timeout=args.pool_timeout
    )
    try:
        ready_s = time.monotonic() - started
        log_line(f"{args.pool_workers} workers ready in {ready_s:.1f}s (daemon pid {daemon.pid})")
        status = admin_status(daemon.admin_socket)
        ready = len(ready_workers(status))
        if ready < args.pool_workers:
            raise BenchmarkError(f"only {ready} ready workers in the status")
        status_bytes = len(json.dumps(status))
        status_ms = []
        for _ in range(args.status_times):
            t0 = time.perf_counter()
            answer = admin_status(daemon.admin_socket, timeout=10.0)
            status_ms.append((time.perf_counter() - t0) * 1e3)
            if len(answer.get("apps", [{}])[0].get("workers", [])) < args.pool_workers:
                raise BenchmarkError("the status lost workers")
        cli = FLYPOOL_CLI if Path(FLYPOOL_CLI).exists() else None
        cli_argv = [
            *([cli] if cli else [PYTHON, "-m", "flypool"]),
            "status",
            "--json",
            "--admin-socket",
            str(daemon.admin_socket),
        ]
        cli_ms = time_command(cli_argv, args.cli_times)
        python_ms = time_command([PYTHON, "-c", "pass"], args.cli_times)
        import_ms = time_command([PYTHON, "-c", "import flypool.cli"], args.cli_times)
        rss = psutil.Process(daemon.pid).memory_info().rss
    finally:
        daemon.stop()
    return PoolResult(
        workers=args.pool_workers,
        ready_s=ready_s,
        status_ms=status_ms,
        cli_ms=cli_ms,
        python_start_ms=python_ms,
        import_cli_ms=import_ms,
        status_bytes=status_bytes,
        daemon_argv=daemon.proc.argv,
        daemon_rss_bytes=rss,
        cli_argv=cli_argv,
    )


# --------------------------------------------------------------------------- report


@dataclass
class Check:
    """One target of the issue, evaluated."""

    name: str
    value: str
    limit: str
    passed: bool

    def line(self) -> str:
        """``PASS name: value (limit)``."""
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.value} ({self.limit})"


def evaluate(idle: IdleResult | None, pool: PoolResult | None) -> list[Check]:
    """The issue's targets."""
    checks = []
    if idle is not None:
        checks.append(
            Check(
                f"throughput drop with {idle.idle:,} idle connections",
                f"{100 * idle.drop:.1f}%",
                f"target < {100 * DROP_LIMIT:g}%",
                idle.drop < DROP_LIMIT,
            )
        )
        checks.append(
            Check(
                f"daemon RSS with {idle.idle:,} idle connections",
                f"{idle.rss_max_mb:.1f} MiB",
                f"target < {RSS_LIMIT_MB:g} MB",
                idle.rss_max_mb * MB < RSS_LIMIT_MB * 1e6,
            )
        )
    if pool is not None:
        p95 = percentile(pool.status_ms, 0.95)
        checks.append(
            Check(
                f"GET /status p95 with {pool.workers} workers",
                f"{p95:.1f} ms",
                f"target < {STATUS_LIMIT_MS:g} ms",
                p95 < STATUS_LIMIT_MS,
            )
        )
        cli = statistics.median(pool.cli_ms)
        checks.append(
            Check(
                f"`flypool status --json` wall time (median) with {pool.workers} workers",
                f"{cli:.1f} ms (of which `python -c pass` "
                f"{statistics.median(pool.python_start_ms):.1f} ms)",
                f"target < {STATUS_LIMIT_MS:g} ms",
                cli < STATUS_LIMIT_MS,
            )
        )
    return checks


def markdown(idle: IdleResult | None, pool: PoolResult | None) -> str:
    """The results as Markdown tables."""
    out = []
    if idle is not None:
        out += [
            f"**(a) {idle.idle:,} idle keep-alive connections + wrk -c32** "
            f"({len(idle.rounds)} interleaved rounds, medians)",
            "",
            "| | req/s | p50 ms | p99 ms | daemon CPU ms/1k req | daemon RSS MiB | daemon fds |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| without idle | {idle.median('without:rps'):,.0f} "
            f"| {idle.median('without:p50'):.2f} | {idle.median('without:p99'):.2f} "
            f"| {idle.median('without:cpu'):.1f} "
            f"| {idle.rss_baseline_mb:.1f} | {idle.rounds[0].fds_before} |",
            f"| with {idle.idle:,} idle | {idle.median('with:rps'):,.0f} "
            f"| {idle.median('with:p50'):.2f} | {idle.median('with:p99'):.2f} "
            f"| {idle.median('with:cpu'):.1f} "
            f"| {idle.rss_max_mb:.1f} (max) | {max(r.fds_idle_open for r in idle.rounds)} |",
            "",
            f"Throughput with/without per round: "
            f"{', '.join(f'{r.ratio:.3f}' for r in idle.rounds)}; opening the idle "
            f"connections took {', '.join(f'{r.open_s:.1f}' for r in idle.rounds)} s; "
            f"idle connections lost during the load: "
            f"{', '.join(str(r.lost_after_load) for r in idle.rounds)}.",
        ]
    if pool is not None:
        s, c = pool.stats(pool.status_ms), pool.stats(pool.cli_ms)
        py, imp = pool.stats(pool.python_start_ms), pool.stats(pool.import_cli_ms)
        out += [
            *([""] if out else []),
            f"**(b) {pool.workers}-worker pool** (ready in {pool.ready_s:.1f} s; "
            f"status JSON {pool.status_bytes:,} bytes; daemon RSS "
            f"{pool.daemon_rss_bytes / MB:.1f} MiB)",
            "",
            "| measurement | n | median ms | p95 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            f"| `GET /status` on the admin socket | {len(pool.status_ms)} "
            f"| {s['median']:.2f} | {s['p95']:.2f} | {s['max']:.2f} |",
            f"| `flypool status --json` (wall) | {len(pool.cli_ms)} "
            f"| {c['median']:.1f} | {c['p95']:.1f} | {c['max']:.1f} |",
            f"| `python -c pass` (reference) | {len(pool.python_start_ms)} "
            f"| {py['median']:.1f} | {py['p95']:.1f} | {py['max']:.1f} |",
            f"| `python -c 'import flypool.cli'` (reference) | {len(pool.import_cli_ms)} "
            f"| {imp['median']:.1f} | {imp['p95']:.1f} | {imp['max']:.1f} |",
        ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="flypool at scale: idle keep-alive connections, and a 64-worker status."
    )
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections (10000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of part (a) (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="wrk warm-up seconds (1)")
    parser.add_argument("--workers", type=int, default=1, help="workers in part (a) (1)")
    parser.add_argument("--batch", type=int, default=500, help="idle connections per batch")
    parser.add_argument(
        "--open-timeout", type=float, default=120.0, help="seconds to open all idle (120)"
    )
    parser.add_argument("--pool-workers", type=int, default=64, help="part (b) workers (64)")
    parser.add_argument(
        "--pool-timeout", type=float, default=300.0, help="seconds for them to be ready (300)"
    )
    parser.add_argument("--status-times", type=int, default=50, help="GET /status runs (50)")
    parser.add_argument("--cli-times", type=int, default=10, help="CLI runs (10)")
    parser.add_argument(
        "--parts", default="idle,pool", help="comma-separated: idle, pool (default both)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"raw figures (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"idle", "pool"}:
        parser.error("--parts: choose from idle, pool")
    if min(args.idle, args.rounds, args.duration, args.connections, args.batch) < 1:
        parser.error("--idle, --rounds, --duration, --connections, --batch must be >= 1")
    if min(args.pool_workers, args.status_times, args.cli_times, args.workers) < 1:
        parser.error("--pool-workers, --status-times, --cli-times, --workers must be >= 1")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    info = machine_info()
    log(
        f"scale: parts {','.join(sorted(args.parts))}; {info['nproc']} CPUs "
        f"({info['cpu_model']}), load {info['loadavg_at_start']}"
    )
    idle = run_idle(args, log) if "idle" in args.parts else None
    pool = run_pool(args, log) if "pool" in args.parts else None
    loadavg_end = list(os.getloadavg())

    table = markdown(idle, pool)
    checks = evaluate(idle, pool)
    print(table)
    print()
    print(
        f"{info['nproc']} CPUs, {info['cpu_model']}; load average {info['loadavg_at_start']} "
        f"before, {[round(x, 2) for x in loadavg_end]} after."
    )
    print()
    for check in checks:
        print(check.line())

    settings: dict[str, Any] = {
        k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
    }
    report = {
        "benchmark": "scale",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command_line),
        "argv": command_line,
        "settings": settings,
        "machine": {**info, "loadavg_at_end": loadavg_end},
        "checks": [
            {"name": c.name, "value": c.value, "limit": c.limit, "passed": c.passed} for c in checks
        ],
        "markdown": table,
        "idle": None
        if idle is None
        else {
            "idle_connections": idle.idle,
            "daemon_argv": idle.daemon_argv,
            "rlimit_nofile": list(idle.rlimit_nofile),
            "throughput_drop": idle.drop,
            "rss_max_bytes": max(r.rss_max for r in idle.rounds),
            "rounds": [r.as_dict() for r in idle.rounds],
        },
        "pool": None if pool is None else pool.as_dict(),
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out}")
    if idle is not None and idle.errors:
        log(f"scale: {idle.errors} errors (wrk errors or lost idle connections); see the JSON")
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"scale: {err}", file=sys.stderr)
        raise SystemExit(1) from None
