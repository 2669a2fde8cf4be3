"""Restart under load: what a rolling restart (a deploy) costs while traffic flows.

Run from the repository root::

    .venv/bin/python benchmarks/restart_under_load.py

For each ``--batches`` value (default ``1,2``; interleaved when ``--rounds``
is more than 1) a fresh daemon is started::

    flypool run --listen unix:DIR/app.sock --workers 4 --admin-socket DIR/admin.sock
        --runtime-dir DIR --root DIR --env EXAMPLE_BOOT_DELAY=1 --restart-batch B
        --drain-timeout 30s --log-format json -- PYTHON -m flypool.example --socket {socket}

and loaded for ``--duration`` seconds (default 20) by a timeline client in
this process: 8 threads, each holding one keep-alive connection to the front
Unix socket and looping ``GET /?delay=D`` with D cycling deterministically
through 5, 10, 20 and 50 ms. Every request's start, end, status (or exception)
and the PID of the worker that answered (the example app says ``pid=N``) are
recorded. At ``--restart-at`` seconds (default 5) the benchmark asks for
``POST /apps/app/restart?mode=rolling`` on the admin socket, and meanwhile:

- polls ``GET /status`` every 20 ms (for the whole run, so that its cost
  weighs on both windows alike): the restart is finished when the app's
  ``restart`` is null and ``last_restart.id`` is at least the id the POST
  returned; every worker PID is new when no PID of the initial workers is
  listed any more;
- samples, every 10 ms, the live (non-zombie) child processes of the daemon
  with psutil, in a separate helper process (so that its ``/proc`` scans do
  not compete with the load threads for this interpreter's GIL): the peak
  must stay at or below ``workers + restart_batch`` (SPEC §1, §7).

Afterwards the daemon's JSON log gives each worker's ``worker spawned``,
``worker ready`` (with its own ``boot_s``), ``stopping worker`` and
``worker exited`` times. The ideal restart is the boot time alone: the sum,
batch by batch in spawn order, of the slowest ``boot_s`` of the batch (for
batch 1: the sum of the new workers' ``boot_s``); the overhead per swap is
(the daemon's own restart ``duration_s`` - ideal) / workers replaced.

Latency windows: *steady* = requests that started before the restart was
asked for; *restart* = requests overlapping [restart asked, restart seen
finished]; *after* = requests started after that.

Prints a Markdown table on stdout (progress and details on stderr), writes
the summary, events and machine to ``benchmarks/out/restart_under_load.json``
and every request to ``benchmarks/out/restart_under_load.requests.csv``.
Exits 1 when a request failed or the live-worker limit was exceeded
(after writing both files), since either is a flypool bug.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import itertools
import json
import re
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The line above makes ``common`` importable when this file runs as a script.
from common import (
    OUT_DIR,
    PYTHON,
    BenchmarkError,
    FlypoolDaemon,
    Managed,
    UnixHTTPConnection,
    admin_request,
    log_tail,
    machine_info,
    poll_until,
    read_json_log,
    start_flypool,
    start_process,
    write_json,
)

APP = "app"
"""The app name ``flypool run`` gives by default."""
DELAYS_MS = (5, 10, 20, 50)
"""Per-request delays the load cycles through (connection i starts at index i)."""
DEFAULT_OUT = OUT_DIR / "restart_under_load.json"
PID_RE = re.compile(rb"\bpid=(\d+)")
REQUEST_TIMEOUT_S = 35.0
"""Socket timeout of one load request: longer than ``--drain-timeout 30s``."""


def log(message: str) -> None:
    """Progress, on stderr (stdout carries only the table)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Request:
    """One load request; times in seconds since the run's t0 (monotonic clock)."""

    conn: int
    seq: int
    delay_ms: int
    start: float
    end: float
    status: int | None
    error: str | None
    """``ExceptionName: message`` when no answer came."""
    pid: int | None
    """The worker that answered (from the body), if any."""
    reused: bool
    """The connection had already served a request (keep-alive reuse)."""

    @property
    def latency_ms(self) -> float:
        """End minus start."""
        return (self.end - self.start) * 1e3

    @property
    def failed(self) -> bool:
        """No answer, or an answer other than 200."""
        return self.status != 200


@dataclass(slots=True)
class StatusPoll:
    """What one ``GET /status`` said, and when (seconds since t0)."""

    t: float
    workers: list[tuple[int, str, int]]
    """``(pid, state, generation)`` of every listed worker."""
    restart: dict[str, Any] | None
    last_restart: dict[str, Any] | None


@dataclass
class Timeline:
    """Everything collected while one run's load was on."""

    requests: list[Request] = field(default_factory=list)
    polls: list[StatusPoll] = field(default_factory=list)
    poll_errors: list[tuple[float, str]] = field(default_factory=list)
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    """``(t, live child PIDs)`` from the sampler process."""


# --------------------------------------------------------------------------- load


def load_connection(
    index: int,
    socket_path: Path,
    t0: float,
    deadline: float,
    stop: threading.Event,
    out: list[Request],
) -> None:
    """One keep-alive client: loop ``GET /?delay=D`` until ``deadline`` (monotonic).

    A failed request is recorded and the connection replaced; requests are
    never retried.
    """
    conn: UnixHTTPConnection | None = None
    served = 0
    seq = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            delay_ms = DELAYS_MS[(index + seq) % len(DELAYS_MS)]
            if conn is None:
                conn = UnixHTTPConnection(str(socket_path), timeout=REQUEST_TIMEOUT_S)
                served = 0
            reused = served > 0
            status: int | None = None
            error: str | None = None
            pid: int | None = None
            start = time.monotonic()
            try:
                conn.request("GET", f"/?delay={delay_ms / 1e3:g}")
                response = conn.getresponse()
                body = response.read()
                status = response.status
                match = PID_RE.search(body)
                pid = int(match[1]) if match else None
                served += 1
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as err:
                error = f"{type(err).__name__}: {err}"
                if conn is not None:
                    conn.close()
                conn = None
            end = time.monotonic()
            out.append(
                Request(index, seq, delay_ms, start - t0, end - t0, status, error, pid, reused)
            )
            seq += 1
    finally:
        if conn is not None:
            conn.close()


def poll_status(
    daemon: FlypoolDaemon,
    t0: float,
    deadline: float,
    interval: float,
    stop: threading.Event,
    timeline: Timeline,
) -> None:
    """``GET /status`` every ``interval`` s until ``deadline``; record the app's part."""
    next_at = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            status = daemon.status(timeout=2.0)  # also remembers worker PIDs for `stop`
        except (OSError, http.client.HTTPException, BenchmarkError) as err:
            timeline.poll_errors.append((time.monotonic() - t0, f"{type(err).__name__}: {err}"))
        else:
            t = time.monotonic() - t0
            app: dict[str, Any] = next(
                (a for a in status.get("apps", []) if a.get("name") == APP), {}
            )
            workers = [
                (int(w["pid"]), str(w.get("state")), int(w.get("generation", -1)))
                for w in app.get("workers", [])
                if isinstance(w.get("pid"), int)
            ]
            timeline.polls.append(
                StatusPoll(t, workers, app.get("restart"), app.get("last_restart"))
            )
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


# --------------------------------------------------------------------------- sampler


def sampler_main(daemon_pid: int, interval: float, until: float, out: Path) -> int:
    """The helper process: sample the daemon's live children until ``until`` (monotonic).

    Writes one JSON line per sample, ``[monotonic_t, [pid, ...]]``, to ``out``
    when done or on SIGTERM. Zombies (exited, not yet reaped) do not count.
    """
    import psutil

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    samples: list[tuple[float, list[int]]] = []
    try:
        daemon = psutil.Process(daemon_pid)
    except psutil.NoSuchProcess:
        return 1
    next_at = time.monotonic()
    try:
        while not stopping.is_set() and time.monotonic() < until:
            t = time.monotonic()
            live: list[int] = []
            try:
                children = daemon.children()
            except psutil.NoSuchProcess:
                break
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if child.status() != psutil.STATUS_ZOMBIE:
                        live.append(child.pid)
            samples.append((t, sorted(live)))
            next_at += interval
            stopping.wait(max(0.0, next_at - time.monotonic()))
    finally:
        with open(out, "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
    return 0


def start_sampler(daemon_pid: int, interval: float, until: float, tmpdir: Path) -> Managed:
    """Start `sampler_main` as a separate process (this file with ``--sampler``)."""
    argv = [
        PYTHON,
        str(Path(__file__).resolve()),
        "--sampler",
        str(daemon_pid),
        f"{interval:g}",
        repr(until),
        str(tmpdir / "samples.jsonl"),
    ]
    return start_process("sampler", argv, tmpdir / "sampler.log")


def read_samples(path: Path, t0: float) -> list[tuple[float, list[int]]]:
    """The sampler's output, times made relative to ``t0``."""
    samples = []
    for line in path.read_text().splitlines():
        t, pids = json.loads(line)
        samples.append((float(t) - t0, [int(p) for p in pids]))
    return samples


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def window_stats(requests: Iterable[Request]) -> dict[str, Any]:
    """Count, errors and latency p50/p99/max (also in excess of the asked delay), in ms."""
    chosen = list(requests)
    ok = [r for r in chosen if not r.failed]
    latency = [r.latency_ms for r in ok]
    excess = [r.latency_ms - r.delay_ms for r in ok]
    return {
        "requests": len(chosen),
        "errors": len(chosen) - len(ok),
        "p50_ms": percentile(latency, 50),
        "p99_ms": percentile(latency, 99),
        "max_ms": max(latency, default=None),
        "excess_p50_ms": percentile(excess, 50),
        "excess_p99_ms": percentile(excess, 99),
        "excess_max_ms": max(excess, default=None),
    }


def event_time(event: dict[str, Any], wall_t0: float) -> float:
    """A log event's timestamp in seconds since the run's t0."""
    stamp = datetime.fromisoformat(str(event["timestamp"]))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() - wall_t0


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One restart under load, analysed."""

    batch: int
    round: int
    summary: dict[str, Any]
    timeline: Timeline
    events: list[dict[str, Any]]
    argv: list[str]


def flypool_args(args: argparse.Namespace, batch: int) -> list[str]:
    """``flypool run`` flags besides listen/workers/admin socket/runtime dir/root/log format."""
    return [
        "--env",
        f"EXAMPLE_BOOT_DELAY={args.boot_delay:g}",
        "--restart-batch",
        str(batch),
        "--drain-timeout",
        "30s",
    ]


WORKER_COMMAND = [PYTHON, "-m", "flypool.example", "--socket", "{socket}"]


def run_once(args: argparse.Namespace, batch: int, number: int) -> RunResult:
    """Start a daemon, load it, restart it at ``--restart-at``, stop it; analyse."""
    daemon = start_flypool(
        WORKER_COMMAND,
        workers=args.workers,
        listen="unix:{tmpdir}/app.sock",
        extra_args=flypool_args(args, batch),
        ready_timeout=60.0,
    )
    sampler: Managed | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    timeline = Timeline()
    try:
        assert daemon.unix_socket is not None
        initial = daemon.status()
        initial_app = next(a for a in initial["apps"] if a.get("name") == APP)
        initial_pids = {int(w["pid"]) for w in initial_app["workers"]}
        if len(initial_pids) != args.workers:
            raise BenchmarkError(f"expected {args.workers} workers, status lists {initial_pids}")

        t0 = time.monotonic()
        wall_t0 = time.time()
        deadline = t0 + args.duration
        sampler = start_sampler(daemon.pid, args.sample_interval, deadline, daemon.tmpdir)
        per_conn: list[list[Request]] = [[] for _ in range(args.connections)]
        threads = [
            threading.Thread(
                target=load_connection,
                args=(i, daemon.unix_socket, t0, deadline, stop, per_conn[i]),
                name=f"load-{i}",
                daemon=True,
            )
            for i in range(args.connections)
        ]
        threads.append(
            threading.Thread(
                target=poll_status,
                args=(daemon, t0, deadline, args.status_interval, stop, timeline),
                name="status",
                daemon=True,
            )
        )
        for thread in threads:
            thread.start()

        stop.wait(max(0.0, t0 + args.restart_at - time.monotonic()))
        if problem := daemon.proc.exited():
            raise BenchmarkError(problem)
        t_restart = time.monotonic() - t0
        code, body = admin_request(
            daemon.admin_socket, "POST", f"/apps/{APP}/restart?mode=rolling", timeout=5.0
        )
        t_restart_answered = time.monotonic() - t0
        if code != 202 or not isinstance(body, dict) or not isinstance(body.get("restart_id"), int):
            raise BenchmarkError(f"POST restart answered {code}: {body!r}")
        restart_id: int = body["restart_id"]
        log(f"  restart {restart_id} asked for at t={t_restart:.3f}s")

        while time.monotonic() < deadline + 1.0:
            if problem := daemon.proc.exited():
                raise BenchmarkError(problem)
            stop.wait(min(0.25, max(0.0, deadline - time.monotonic())))
            if all(not t.is_alive() for t in threads):
                break
        stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        if any(t.is_alive() for t in threads):
            raise BenchmarkError("load threads did not finish in time")
        sampler_proc = sampler.proc
        poll_until(
            lambda: True if sampler_proc.poll() is not None else None,
            10.0,
            "the sampler to finish",
        )
        timeline.requests = sorted((r for rs in per_conn for r in rs), key=lambda r: r.start)
        timeline.samples = read_samples(daemon.tmpdir / "samples.jsonl", t0)
        events = read_json_log(daemon.proc.log_path)
    except BaseException:
        stop.set()
        if sampler is not None:
            log(f"sampler log: {log_tail(sampler.log_path, 5)}")
        log(f"flypool's log ends with:\n{log_tail(daemon.proc.log_path)}")
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        if sampler is not None:
            sampler.stop(5.0)
        daemon.stop()

    summary = analyse(
        timeline,
        events,
        batch=batch,
        workers=args.workers,
        initial_pids=initial_pids,
        restart_id=restart_id,
        t_restart=t_restart,
        t_restart_answered=t_restart_answered,
        wall_t0=wall_t0,
        duration=args.duration,
    )
    summary["round"] = number
    return RunResult(batch, number, summary, timeline, events, daemon.proc.argv)


def worker_events(events: list[dict[str, Any]], wall_t0: float) -> dict[int, dict[str, Any]]:
    """Per worker PID: generation, and the times (s since t0) of its lifecycle events."""
    names = {
        "worker spawned": "spawned",
        "worker ready": "ready",
        "stopping worker": "stopping",
        "worker exited": "exited",
    }
    workers: dict[int, dict[str, Any]] = {}
    for event in events:
        key = names.get(str(event.get("event")))
        pid = event.get("pid")
        if key is None or not isinstance(pid, int) or event.get("app", APP) != APP:
            continue
        worker = workers.setdefault(pid, {"pid": pid})
        worker.setdefault(key, event_time(event, wall_t0))
        if key == "spawned":
            worker["generation"] = event.get("generation")
            worker["number"] = event.get("worker")
        elif key == "ready":
            worker["boot_s"] = event.get("boot_s")
    return workers


def analyse(
    timeline: Timeline,
    events: list[dict[str, Any]],
    *,
    batch: int,
    workers: int,
    initial_pids: set[int],
    restart_id: int,
    t_restart: float,
    t_restart_answered: float,
    wall_t0: float,
    duration: float,
) -> dict[str, Any]:
    """Turn one run's raw timeline and log into figures (times in s since t0 unless noted)."""
    polls = [p for p in timeline.polls if p.t >= t_restart]
    t_done = next(
        (
            p.t
            for p in polls
            if p.restart is None
            and p.last_restart is not None
            and int(p.last_restart.get("id", -1)) >= restart_id
        ),
        None,
    )
    last_restart = next(
        (p.last_restart for p in reversed(timeline.polls) if p.last_restart is not None), None
    )
    t_all_new = next(
        (p.t for p in polls if not initial_pids & {pid for pid, _, _ in p.workers}), None
    )
    samples = timeline.samples
    t_old_gone = next(
        (t for t, pids in samples if t >= t_restart and not initial_pids & set(pids)), None
    )
    peak = max((len(pids) for _, pids in samples), default=0)
    peak_at = next((t for t, pids in samples if len(pids) == peak), None)
    limit = workers + batch

    requests = timeline.requests
    first_new = min(
        (r.end for r in requests if r.status == 200 and r.pid not in initial_pids),
        default=None,
    )
    window_end = t_done if t_done is not None else duration
    steady = [r for r in requests if r.start < t_restart]
    during = [r for r in requests if r.start < window_end and r.end > t_restart]
    after = [r for r in requests if r.start >= window_end]

    # Ideal: batch after batch (in spawn order), the slowest boot of the batch.
    by_pid = worker_events(events, wall_t0)
    new = sorted(
        (w for w in by_pid.values() if (w.get("generation") or 0) >= 1 and "spawned" in w),
        key=lambda w: w["spawned"],
    )
    old_stopped = sorted(
        (w for pid, w in by_pid.items() if pid in initial_pids and "stopping" in w),
        key=lambda w: w["stopping"],
    )
    steps = []
    for i in range(0, len(new), batch):
        spawned = new[i : i + batch]
        retired = old_stopped[i : i + batch]
        step: dict[str, Any] = {
            "new_pids": [w["pid"] for w in spawned],
            "old_pids": [w["pid"] for w in retired],
            "boot_s": [w.get("boot_s") for w in spawned],
            "spawned_at": min(w["spawned"] for w in spawned),
        }
        ready = [w["ready"] for w in spawned if "ready" in w]
        if len(ready) == len(spawned):
            step["ready_at"] = max(ready)
        if retired and "ready_at" in step:
            step["drain_s"] = min(w["stopping"] for w in retired) - step["ready_at"]
            exited = [w["exited"] for w in retired if "exited" in w]
            if len(exited) == len(retired):
                step["exited_at"] = max(exited)
                step["stop_s"] = step["exited_at"] - min(w["stopping"] for w in retired)
        steps.append(step)
    for step, following in itertools.pairwise(steps):
        if "exited_at" in step:
            step["gap_to_next_spawn_s"] = following["spawned_at"] - step["exited_at"]
    boots = [b for step in steps for b in step["boot_s"] if isinstance(b, int | float)]
    ideal = sum(max(b for b in step["boot_s"]) for step in steps) if boots else None
    begin = next((e for e in events if e.get("event") == "restart begin"), None)
    end = next((e for e in events if e.get("event") == "restart end"), None)
    daemon_duration = (
        float(last_restart["duration_s"])
        if last_restart is not None and last_restart.get("id", -1) >= restart_id
        else None
    )
    replaced = int(last_restart.get("replaced", 0)) if last_restart is not None else 0

    failures = [
        {
            "conn": r.conn,
            "seq": r.seq,
            "delay_ms": r.delay_ms,
            "start_rel_restart_s": r.start - t_restart,
            "end_rel_restart_s": r.end - t_restart,
            "latency_ms": r.latency_ms,
            "status": r.status,
            "error": r.error,
            "pid": r.pid,
            "pid_was": (None if r.pid is None else "old" if r.pid in initial_pids else "new"),
            "reused_connection": r.reused,
        }
        for r in requests
        if r.failed
    ]
    slowest = sorted((r for r in requests if not r.failed), key=lambda r: -r.latency_ms)[:10]
    return {
        "batch": batch,
        "workers": workers,
        "restart_id": restart_id,
        "initial_pids": sorted(initial_pids),
        "t_restart_asked_s": t_restart,
        "t_restart_answered_s": t_restart_answered,
        "t_restart_begin_logged_s": event_time(begin, wall_t0) if begin else None,
        "t_restart_end_logged_s": event_time(end, wall_t0) if end else None,
        "t_restart_seen_done_s": t_done,
        "restart_observed_s": None if t_done is None else t_done - t_restart,
        "restart_daemon_duration_s": daemon_duration,
        "last_restart": last_restart,
        "all_pids_new_after_s": None if t_all_new is None else t_all_new - t_restart,
        "old_processes_gone_after_s": None if t_old_gone is None else t_old_gone - t_restart,
        "first_new_worker_response_after_s": (None if first_new is None else first_new - t_restart),
        "new_worker_boot_s": boots,
        "median_boot_s": statistics.median(boots) if boots else None,
        "ideal_s": ideal,
        "overhead_per_swap_s": (
            None
            if ideal is None or daemon_duration is None or not replaced
            else (daemon_duration - ideal) / replaced
        ),
        "overhead_per_step_s": (
            None
            if ideal is None or daemon_duration is None or not steps
            else (daemon_duration - ideal) / len(steps)
        ),
        "replaced": replaced,
        "steps": steps,
        "peak_live_workers": peak,
        "peak_live_at_s": peak_at,
        "live_worker_limit": limit,
        "peak_within_limit": peak <= limit,
        "samples": len(samples),
        "status_polls": len(timeline.polls),
        "status_poll_errors": timeline.poll_errors,
        "windows": {
            "steady": window_stats(steady),
            "restart": window_stats(during),
            "after": window_stats(after),
            "all": window_stats(requests),
        },
        "requests": len(requests),
        "errors": len(failures),
        "failures": failures,
        "slowest": [
            {
                "start_rel_restart_s": r.start - t_restart,
                "latency_ms": r.latency_ms,
                "delay_ms": r.delay_ms,
                "pid": r.pid,
                "pid_was": "old" if r.pid in initial_pids else "new",
                "conn": r.conn,
            }
            for r in slowest
        ],
        "per_100ms": buckets(requests, duration, t_restart),
        "workers_log": sorted(by_pid.values(), key=lambda w: w.get("spawned", 0.0)),
    }


def buckets(requests: list[Request], duration: float, t_restart: float) -> list[dict[str, Any]]:
    """Requests per 100 ms of start time: count, errors, max latency, PIDs that answered."""
    out = []
    for i in range(int(duration * 10) + 1):
        lo, hi = i / 10, (i + 1) / 10
        chosen = [r for r in requests if lo <= r.start < hi]
        if not chosen:
            continue
        out.append(
            {
                "t_rel_restart_s": round(lo - t_restart, 3),
                "requests": len(chosen),
                "errors": sum(r.failed for r in chosen),
                "max_ms": round(max(r.latency_ms for r in chosen), 3),
                "pids": sorted({r.pid for r in chosen if r.pid is not None}),
            }
        )
    return out


# --------------------------------------------------------------------------- report


def _f(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{value * scale:,.{digits}f}"


def markdown_table(results: list[RunResult]) -> str:
    """One row per run."""
    lines = [
        "| batch | round | requests | errors | steady p50 / p99 / max ms "
        "| restart-window p50 / p99 / max ms | restart s (daemon) | all PIDs new s "
        "| 1st new-worker answer s | ideal Σboot s | overhead / swap ms | peak live (limit) |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = result.summary
        st, rw = s["windows"]["steady"], s["windows"]["restart"]
        peak = f"{s['peak_live_workers']} ({s['live_worker_limit']})"
        if not s["peak_within_limit"]:
            peak += " **EXCEEDED**"
        lines.append(
            f"| {s['batch']} | {s['round']} | {s['requests']:,} | {s['errors']} "
            f"| {_f(st['p50_ms'])} / {_f(st['p99_ms'])} / {_f(st['max_ms'])} "
            f"| {_f(rw['p50_ms'])} / {_f(rw['p99_ms'])} / {_f(rw['max_ms'])} "
            f"| {_f(s['restart_observed_s'], digits=2)} "
            f"({_f(s['restart_daemon_duration_s'], digits=2)}) "
            f"| {_f(s['all_pids_new_after_s'], digits=2)} "
            f"| {_f(s['first_new_worker_response_after_s'], digits=2)} "
            f"| {_f(s['ideal_s'], digits=2)} | {_f(s['overhead_per_swap_s'], 1e3, 0)} "
            f"| {peak} |"
        )
    return "\n".join(lines)


def write_requests_csv(path: Path, results: list[RunResult]) -> None:
    """Every request of every run, one CSV row each (times in s since the run's t0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "batch",
                "round",
                "t_restart_s",
                "conn",
                "seq",
                "delay_ms",
                "start_s",
                "end_s",
                "latency_ms",
                "status",
                "error",
                "pid",
                "reused_connection",
            ]
        )
        for result in results:
            t_restart = result.summary["t_restart_asked_s"]
            for r in result.timeline.requests:
                writer.writerow(
                    [
                        result.batch,
                        result.round,
                        f"{t_restart:.6f}",
                        r.conn,
                        r.seq,
                        r.delay_ms,
                        f"{r.start:.6f}",
                        f"{r.end:.6f}",
                        f"{r.latency_ms:.3f}",
                        r.status if r.status is not None else "",
                        r.error or "",
                        r.pid if r.pid is not None else "",
                        int(r.reused),
                    ]
                )


def report_details(result: RunResult) -> None:
    """Failures, live-worker violations and the slowest requests, on stderr."""
    s = result.summary
    tag = f"batch {s['batch']} round {s['round']}"
    if not s["peak_within_limit"]:
        log(
            f"{tag}: PEAK LIVE WORKERS {s['peak_live_workers']} > limit "
            f"{s['live_worker_limit']} at t={_f(s['peak_live_at_s'], digits=3)}s"
        )
    for failure in s["failures"]:
        log(
            f"{tag}: FAILED conn {failure['conn']} seq {failure['seq']} "
            f"start {failure['start_rel_restart_s']:+.3f}s "
            f"end {failure['end_rel_restart_s']:+.3f}s "
            f"(relative to the restart request) status={failure['status']} "
            f"error={failure['error']} pid={failure['pid']} ({failure['pid_was']}) "
            f"reused_connection={failure['reused_connection']}"
        )
    for slow in s["slowest"][:3]:
        log(
            f"{tag}: slow {slow['latency_ms']:.1f} ms (delay {slow['delay_ms']} ms) "
            f"started {slow['start_rel_restart_s']:+.3f}s from the restart, "
            f"pid {slow['pid']} ({slow['pid_was']})"
        )
    for step in s["steps"]:
        log(
            f"{tag}: step new {step['new_pids']} boot {step['boot_s']} "
            f"drain {_f(step.get('drain_s'), 1e3)} ms stop {_f(step.get('stop_s'), 1e3)} ms "
            f"gap {_f(step.get('gap_to_next_spawn_s'), 1e3)} ms"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Measure a rolling restart of flypool under steady keep-alive load."
    )
    parser.add_argument(
        "--batches", default="1,2", help="comma-separated --restart-batch values (default 1,2)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per batch value (default 1)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of load per run (default 20)"
    )
    parser.add_argument(
        "--restart-at", type=float, default=5.0, help="second of the run to restart at (default 5)"
    )
    parser.add_argument("--workers", type=int, default=4, help="workers (default 4)")
    parser.add_argument(
        "--connections", type=int, default=8, help="keep-alive load connections (default 8)"
    )
    parser.add_argument(
        "--boot-delay", type=float, default=1.0, help="EXAMPLE_BOOT_DELAY seconds (default 1)"
    )
    parser.add_argument(
        "--status-interval", type=float, default=0.02, help="GET /status period (default 0.02)"
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.01,
        help="live-worker sampling period (default 0.01)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"raw figures (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error("--batches: expected comma-separated integers")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches: expected integers >= 1")
    if args.rounds < 1 or args.workers < 1 or args.connections < 1:
        parser.error("--rounds, --workers and --connections must be >= 1")
    if not 0 < args.restart_at < args.duration:
        parser.error("--restart-at must be within (0, --duration)")
    if args.status_interval <= 0 or args.sample_interval <= 0 or args.boot_delay < 0:
        parser.error("intervals must be > 0 and --boot-delay >= 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    info = machine_info()
    log(
        f"restart_under_load: batches {args.batches} x {args.rounds} round(s), "
        f"{args.duration:g}s each, restart at {args.restart_at:g}s, {args.workers} workers, "
        f"{args.connections} connections; {info['nproc']} CPUs ({info['cpu_model']}), "
        f"load {info['loadavg_at_start']}"
    )
    results: list[RunResult] = []
    for number in range(1, args.rounds + 1):
        for batch in args.batches:
            log(f"round {number}/{args.rounds}, restart batch {batch} ...")
            result = run_once(args, batch, number)
            results.append(result)
            s = result.summary
            log(
                f"  {s['requests']} requests, {s['errors']} errors, restart "
                f"{_f(s['restart_observed_s'], digits=3)} s, peak live {s['peak_live_workers']}"
            )
            report_details(result)

    table = markdown_table(results)
    print(table)
    print()
    print(
        f"{args.connections} keep-alive connections over the Unix socket, GET /?delay= cycling "
        f"{'/'.join(map(str, DELAYS_MS))} ms; {args.workers} example workers booting in "
        f"{args.boot_delay:g} s; rolling restart asked at t={args.restart_at:g} s of "
        f"{args.duration:g} s. Steady = requests started before the restart; restart window "
        "= requests overlapping [asked, seen finished in /status]. restart s = asked → seen "
        "finished (the daemon's own duration_s in parentheses); ideal = Σ per batch of the "
        "slowest new worker's boot_s from the daemon log; overhead/swap = (duration_s - ideal) "
        f"/ workers replaced. {info['nproc']} CPUs, {info['cpu_model']}."
    )

    csv_path = args.out.with_suffix(".requests.csv")
    write_requests_csv(csv_path, results)
    report = {
        "benchmark": "restart_under_load",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command_line),
        "argv": command_line,
        "settings": {
            "batches": args.batches,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "restart_at_s": args.restart_at,
            "workers": args.workers,
            "connections": args.connections,
            "delays_ms": list(DELAYS_MS),
            "boot_delay_s": args.boot_delay,
            "status_interval_s": args.status_interval,
            "sample_interval_s": args.sample_interval,
            "worker_command": WORKER_COMMAND,
        },
        "machine": info,
        "markdown": table,
        "requests_csv": str(csv_path),
        "runs": [
            {
                "batch": r.batch,
                "round": r.round,
                "flypool_argv": r.argv,
                **r.summary,
                "status_polls_raw": [asdict(p) for p in r.timeline.polls if p.restart],
            }
            for r in results
        ],
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out} and {csv_path}")
    bad = [r for r in results if r.summary["errors"] or not r.summary["peak_within_limit"]]
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--sampler":
        raise SystemExit(
            sampler_main(
                int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
            )
        )
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"restart_under_load: {err}", file=sys.stderr)
        raise SystemExit(1) from None
