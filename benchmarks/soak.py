"""Soak: flypool under steady keep-alive load while workers are SIGKILLed and restarted.

Not run in CI. Run from the repository root::

    .venv/bin/python benchmarks/soak.py            # 2 minutes (--duration 120)

One daemon is started (through `common.start_flypool`)::

    flypool run --listen unix:DIR/app.sock --workers 4 --admin-socket DIR/admin.sock
        --runtime-dir DIR --root DIR --log-format json [--user root]
        --worker-concurrency 0 --listen 127.0.0.1:PORT
        -- PYTHON -m flypool.example --socket {socket}

``--worker-concurrency 0`` (unlimited): the example worker is an asyncio
server that serves any number of requests at once, so a per-worker cap would
only move the waiting from the worker into flypool's FIFO queue. With the
default cap of 1, 200 connections on 4 workers (3 right after a kill) leave
~196 requests waiting, more than ``max_queue = 100``: flypool would answer
503 by design, which says nothing about how it survives faults. A finite cap
of at least 200 / 3 (e.g. ``--worker-concurrency 64``) is also meaningful.

**Load.** This process runs an asyncio client (uvloop when importable) with
``--connections`` (200) keep-alive connections, half on the front Unix
socket and half on the TCP port, each looping as fast as answers come
(closed loop) over a seeded mix: ``GET /?delay=0.005`` (70 %),
``GET /?size=10000`` (27 %) and ``POST /upload`` of 16 KiB to 256 KiB
(3 %). The client is a small hand-written HTTP/1.1 client on asyncio
streams (Content-Length and chunked framing). Every request's start, end,
status or exception, and answering worker (``X-Worker-Pid``) is recorded;
answers are checked (``pid=`` body, exact size, the upload's sha256 and
length). A request is never retried; after a failure the connection is
replaced.

**Phases.** ``--warmup`` seconds (10) of the same load without faults; the
connections close; after ``--settle`` seconds (3; flypool closes idle
upstream connections after 1 s) the daemon's RSS and fd count are read: the
*start* sample. Then ``--duration`` seconds (120) of load with faults, and a
sample every ``--sample-interval`` seconds (10). Then the connections close,
the benchmark waits (bounded) until no restart runs and every worker is
ready, settles again and reads the *end* sample. Growth is end vs start,
both idle, so that neither counts client connections or in-flight buffers.

**Faults.** Every ``--kill-interval`` seconds (5) a random *ready* worker
from ``GET /status`` on the admin socket is SIGKILLed, by that PID only,
after checking it is still a child of the daemon started at the same time
as when the status listed it. Every ``--restart-interval`` seconds (20)
``POST /apps/app/restart?mode=rolling``. Outcomes (completed, aborted,
superseded) come from the daemon's JSON log.

**Classification.** A failed request (not 200, or an exception) is
*expected* when it was in flight at the moment of a kill: it started before
the kill and ended within ``--expected-window`` seconds (1) after it. All
other failures are *unexpected*, and so is any 200 whose body is wrong,
whatever its timing. The goal is 0 unexpected.

Prints a Markdown summary on stdout (progress on stderr), writes the summary,
samples, faults, every failure, the exact command and the machine to
``benchmarks/out/soak.json`` and every request to
``benchmarks/out/soak.requests.csv.gz``. Exits 1 when a goal is missed
(unexpected failures, RSS growth >= 10 %, fd count not back to start ± 5).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import csv
import gzip
import hashlib
import json
import os
import random
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The line above makes ``common`` importable when this file runs as a script.
from common import (
    OUT_DIR,
    PYTHON,
    BenchmarkError,
    FlypoolDaemon,
    admin_request,
    free_port,
    log_tail,
    machine_info,
    proc_start_ticks,
    read_json_log,
    ready_workers,
    start_flypool,
    wait_http_ok,
    write_json,
)

T = TypeVar("T")

APP = "app"
"""The app name ``flypool run`` gives by default."""
WORKER_COMMAND = [PYTHON, "-m", "flypool.example", "--socket", "{socket}"]
DEFAULT_OUT = OUT_DIR / "soak.json"

SIZE_BYTES = 10_000
"""``GET /?size=N`` answers N bytes of ``x``."""
DELAY_S = 0.005
"""``GET /?delay=S``: the worker waits S seconds before answering."""
UPLOAD_SIZES = (16 * 1024, 64 * 1024, 256 * 1024)
"""``POST /upload`` body sizes, picked uniformly."""
MIX: tuple[tuple[str, float], ...] = (("delay", 0.70), ("size", 0.27), ("upload", 0.03))
"""Request kinds and their weights."""
STREAM_LIMIT = 256 * 1024
"""asyncio stream buffer limit (a response head or chunk line longer than this fails)."""
FD_TOLERANCE = 5
"""The end fd count may differ from the start one by this much."""
RSS_GROWTH_LIMIT_PCT = 10.0
"""The goal: RSS growth (end vs start, both idle) below this."""
BODY_EXCERPT = 160
"""Bytes of a non-200 answer's body kept in the record (flypool says why it failed)."""


def log(message: str) -> None:
    """Progress, on stderr (stdout carries only the summary)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Request:
    """One load request; ``start``/``end`` are ``time.monotonic()`` values."""

    phase: str
    """``warmup`` or ``soak``."""
    conn: int
    seq: int
    front: str
    """``unix`` or ``tcp``."""
    kind: str
    """``delay``, ``size`` or ``upload``."""
    start: float
    end: float
    status: int | None
    error: str | None
    """``ExceptionName: message`` when no (valid) answer came; ``bad body: ...`` for a
    200 whose body is wrong."""
    pid: int | None
    """The worker that answered (``X-Worker-Pid``), if any."""
    reused: bool
    """The connection had already served a request (keep-alive reuse)."""
    body: str | None = None
    """The start of a non-200 answer's body."""
    corrupt: bool = False
    """A 200 with a wrong body: unexpected whatever its timing."""

    @property
    def failed(self) -> bool:
        """No answer, a status other than 200, or a wrong body."""
        return self.status != 200 or self.error is not None

    def outcome(self) -> str:
        """The status code, or the exception's name, for grouping."""
        if self.error is not None and (self.status is None or self.corrupt):
            return self.error.split(":", 1)[0]
        return str(self.status)


@dataclass(slots=True)
class Kill:
    """One SIGKILL we sent (``t`` monotonic, just before ``os.kill``)."""

    t: float
    pid: int
    sessions: int | None
    """In-flight requests on it in the status read just before."""
    uptime_s: float | None
    ready_before: int
    restart_running: bool


@dataclass(slots=True)
class RestartAsk:
    """One ``POST /apps/app/restart`` we sent."""

    t: float
    answered: float
    code: int
    restart_id: int | None
    body: Any


@dataclass(slots=True)
class Sample:
    """The daemon's resources at one moment."""

    t: float
    phase: str
    """``start`` (idle, after warm-up), ``load`` (during the soak) or ``end`` (idle)."""
    rss_bytes: int
    fds: int
    threads: int
    children: int
    """Live (non-zombie) child processes."""
    ready_workers: int | None
    upstream_connections: int | None
    fd_kinds: dict[str, int] = field(default_factory=dict)
    """What the fds are (see `fd_inventory`), to tell a leak's kind."""


@dataclass
class Collected:
    """Everything one run gathered."""

    requests: list[Request] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    skipped_kills: list[tuple[float, str]] = field(default_factory=list)
    restarts: list[RestartAsk] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    polls: list[dict[str, Any]] = field(default_factory=list)
    """Condensed ``GET /status`` answers, every 0.5 s during the soak."""
    poll_errors: list[tuple[float, str]] = field(default_factory=list)
    loop_lag_s: list[float] = field(default_factory=list)
    """How late a 0.1 s sleep of the client's event loop woke up, every 0.1 s."""
    t_warmup: float = 0.0
    t0: float = 0.0
    """Start of the soak phase (monotonic); reported times are relative to it."""
    t_end_load: float = 0.0
    t_settled: float | None = None
    """When no restart ran any more and every worker was ready again (None: not seen)."""


# --------------------------------------------------------------------------- the client


class ProtocolError(Exception):
    """An answer the client cannot read as HTTP/1.1."""


@dataclass(frozen=True)
class Front:
    """One of flypool's front listeners."""

    name: str
    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection."""
        if self.unix_path is not None:
            return await asyncio.open_unix_connection(self.unix_path, limit=STREAM_LIMIT)
        return await asyncio.open_connection(self.host, self.port, limit=STREAM_LIMIT)


@dataclass(frozen=True)
class Upload:
    """A prepared ``POST /upload``: the bytes to send and the answer to expect."""

    size: int
    wire: bytes
    expect: dict[str, Any]


def make_uploads(seed: int) -> list[Upload]:
    """One request per `UPLOAD_SIZES` entry, with random (seeded) bodies."""
    data = random.Random(seed).randbytes(max(UPLOAD_SIZES))
    uploads = []
    for size in UPLOAD_SIZES:
        body = data[:size]
        head = (
            b"POST /upload HTTP/1.1\r\nHost: soak\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        expect = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": size}
        uploads.append(Upload(size, head + body, expect))
    return uploads


GET_DELAY = b"GET /?delay=%g HTTP/1.1\r\nHost: soak\r\n\r\n" % DELAY_S
GET_SIZE = b"GET /?size=%d HTTP/1.1\r\nHost: soak\r\n\r\n" % SIZE_BYTES
SIZE_BODY = b"x" * SIZE_BYTES


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body (trailers are read and dropped)."""
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        parts.append(data[:-2])


async def read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """Read one answer: ``(status, headers with lower-case names, body, keep-alive)``."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break  # 1xx interim answers are skipped
    keep = parts[0] == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"").lower()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = await read_chunked(reader)
    elif b"content-length" in headers:
        try:
            length = int(headers[b"content-length"])
        except ValueError:
            raise ProtocolError("bad Content-Length") from None
        body = await reader.readexactly(length)
    elif status in (204, 304):
        body = b""
    else:
        body = await reader.read(16 * 1024 * 1024)  # delimited by close
        keep = False
    return status, headers, body, keep


def check_body(kind: str, upload: Upload | None, headers: dict[bytes, bytes], body: bytes) -> str:
    """What is wrong with a 200 answer's body, or ``""``."""
    if kind == "delay":
        pid = headers.get(b"x-worker-pid", b"")
        if not body.startswith(b"pid=" + pid + b" "):
            return f"expected 'pid={pid.decode(errors='replace')} ...', got {body[:60]!r}"
    elif kind == "size":
        if body != SIZE_BODY:
            return f"expected {SIZE_BYTES} bytes of 'x', got {len(body)} bytes {body[:20]!r}"
    elif upload is not None:
        try:
            answer = json.loads(body)
        except ValueError:
            return f"not JSON: {body[:60]!r}"
        if not isinstance(answer, dict) or any(
            answer.get(k) != v for k, v in upload.expect.items()
        ):
            return f"expected {upload.expect}, got {body[:120]!r}"
    return ""


def close_writer(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection without waiting for it."""
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()


async def client_loop(
    index: int,
    front: Front,
    phase: str,
    until: float,
    rng: random.Random,
    uploads: Sequence[Upload],
    timeout: float,
    out: list[Request],
) -> None:
    """One keep-alive client: send the mix, one request at a time, until ``until``.

    Each request is bounded by ``timeout`` seconds (connecting included). A
    failed request is recorded and the connection replaced; nothing is retried.
    """
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    served = 0
    seq = 0
    try:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            upload = rng.choice(uploads) if kind == "upload" else None
            wire = GET_DELAY if kind == "delay" else GET_SIZE if kind == "size" else None
            if upload is not None:
                wire = upload.wire
            assert wire is not None
            status: int | None = None
            error: str | None = None
            pid: int | None = None
            excerpt: str | None = None
            corrupt = False
            reused = False
            keep = False
            start = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    if writer is None or reader is None:
                        reader, writer = await front.connect()
                        served = 0
                    reused = served > 0
                    writer.write(wire)
                    await writer.drain()
                    status, headers, body, keep = await read_response(reader)
                served += 1
                raw_pid = headers.get(b"x-worker-pid")
                if raw_pid is not None and raw_pid.isdigit():
                    pid = int(raw_pid)
                if status == 200:
                    problem = check_body(kind, upload, headers, body)
                    if problem:
                        error = f"bad body: {problem}"
                        corrupt = True
                        keep = False
                else:
                    excerpt = body[:BODY_EXCERPT].decode(errors="replace")
            except (
                OSError,
                TimeoutError,
                EOFError,  # asyncio.IncompleteReadError
                asyncio.LimitOverrunError,
                ProtocolError,
            ) as err:
                error = f"{type(err).__name__}: {err}"
                keep = False
            out.append(
                Request(
                    phase=phase,
                    conn=index,
                    seq=seq,
                    front=front.name,
                    kind=kind if upload is None else f"upload{upload.size // 1024}k",
                    start=start,
                    end=time.monotonic(),
                    status=status,
                    error=error,
                    pid=pid,
                    reused=reused,
                    body=excerpt,
                    corrupt=corrupt,
                )
            )
            seq += 1
            if not keep:
                close_writer(writer)
                reader = writer = None
    finally:
        close_writer(writer)


async def run_load(
    args: argparse.Namespace,
    fronts: Sequence[Front],
    phase: str,
    until: float,
    uploads: Sequence[Upload],
    out: list[Request],
) -> None:
    """``args.connections`` client loops until ``until``; bounded by the request timeout."""
    tasks = [
        asyncio.create_task(
            client_loop(
                i,
                fronts[i % len(fronts)],
                phase,
                until,
                random.Random(f"{args.seed}/{phase}/{i}"),
                uploads,
                args.request_timeout,
                out,
            ),
            name=f"client-{i}",
        )
        for i in range(args.connections)
    ]
    try:
        wait_s = max(0.0, until - time.monotonic()) + args.request_timeout + 10.0
        done, pending = await asyncio.wait(tasks, timeout=wait_s)
        if pending:
            raise BenchmarkError(f"{len(pending)} client connection(s) did not finish in time")
        for task in done:
            task.result()  # a bug in the client surfaces here
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- faults, samples


async def in_thread(function: Any, *call_args: Any) -> Any:
    """Run a blocking admin-socket call off the event loop (the load keeps going)."""
    return await asyncio.to_thread(function, *call_args)


def pid_is_our_worker(daemon: FlypoolDaemon, pid: int) -> bool:
    """``pid`` is still the worker the status listed: a child of our daemon, same start time."""
    ticks = daemon.worker_pids.get(pid)
    if ticks is None or proc_start_ticks(pid) != ticks:
        return False
    try:
        return psutil.Process(pid).ppid() == daemon.pid
    except psutil.Error:
        return False


async def kill_one(daemon: FlypoolDaemon, rng: random.Random, got: Collected) -> None:
    """SIGKILL one random ready worker, by its PID; a few tries if none is ready or it is gone."""
    deadline = time.monotonic() + 2.0
    why = "no ready worker"
    while True:
        try:
            status: dict[str, Any] = await in_thread(daemon.status, 5.0)
        except Exception as err:
            why = f"status failed: {type(err).__name__}: {err}"
        else:
            ready = ready_workers(status, APP)
            app: dict[str, Any] = next(
                (a for a in status.get("apps", []) if a.get("name") == APP), {}
            )
            if ready:
                worker = rng.choice(ready)
                pid = int(worker["pid"])
                if pid_is_our_worker(daemon, pid):
                    t = time.monotonic()
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        why = f"pid {pid} vanished before the kill"
                    else:
                        got.kills.append(
                            Kill(
                                t=t,
                                pid=pid,
                                sessions=worker.get("sessions"),
                                uptime_s=worker.get("uptime_s"),
                                ready_before=len(ready),
                                restart_running=app.get("restart") is not None,
                            )
                        )
                        log(
                            f"  t={t - got.t0:6.2f}s SIGKILL worker {pid} "
                            f"({worker.get('sessions')} in flight, {len(ready)} ready)"
                        )
                        return
                else:
                    why = f"pid {pid} is no longer a worker of the daemon"
        if time.monotonic() >= deadline:
            got.skipped_kills.append((time.monotonic(), why))
            log(f"  kill skipped: {why}")
            return
        await asyncio.sleep(0.1)


async def ask_restart(daemon: FlypoolDaemon, got: Collected) -> None:
    """``POST /apps/app/restart?mode=rolling`` and record the answer."""
    t = time.monotonic()
    try:
        code, body = await in_thread(
            admin_request, daemon.admin_socket, "POST", f"/apps/{APP}/restart?mode=rolling", 5.0
        )
    except Exception as err:
        code, body = 0, f"{type(err).__name__}: {err}"
    rid = body.get("restart_id") if isinstance(body, dict) else None
    got.restarts.append(
        RestartAsk(
            t=t,
            answered=time.monotonic(),
            code=code,
            restart_id=rid if isinstance(rid, int) else None,
            body=body,
        )
    )
    log(f"  t={t - got.t0:6.2f}s restart asked: {code} {body}")


async def faults(args: argparse.Namespace, daemon: FlypoolDaemon, got: Collected) -> None:
    """Kill and restart on schedule until the soak ends (at the same second: kill first)."""
    schedule: list[tuple[float, int, str]] = []
    k = 1
    while k * args.kill_interval < args.duration:
        schedule.append((k * args.kill_interval, 0, "kill"))
        k += 1
    k = 1
    while k * args.restart_interval < args.duration:
        schedule.append((k * args.restart_interval, 1, "restart"))
        k += 1
    rng = random.Random(f"{args.seed}/kills")
    for at, _, action in sorted(schedule):
        await asyncio.sleep(max(0.0, got.t0 + at - time.monotonic()))
        if action == "kill":
            await kill_one(daemon, rng, got)
        else:
            await ask_restart(daemon, got)


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}
UNIX_STATES = {"01": "unconnected", "02": "connecting", "03": "connected", "04": "disconnecting"}


def _socket_table() -> dict[str, str]:
    """Socket inode → ``unix:PATH-or-unnamed:STATE`` or ``tcp:STATE`` (from ``/proc/net``)."""
    table: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 7:
                where = "unnamed" if len(cols) < 8 else Path(cols[7]).name
                table[cols[6]] = f"unix:{where}:{UNIX_STATES.get(cols[5], cols[5])}"
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) >= 10:
                    table[cols[9]] = f"tcp:{TCP_STATES.get(cols[3], cols[3])}"
    return table


def fd_inventory(pid: int) -> dict[str, int]:
    """Count a process's fds by kind: ``pipe``, ``unix:NAME:STATE``, ``tcp:STATE``,
    ``anon_inode:[...]`` or the file path. Worker socket names are shortened to
    ``N.sock`` → ``worker.sock``."""
    table = _socket_table()
    kinds: Counter[str] = Counter()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith("socket:["):
            kind = table.get(target[8:-1], "socket:?")
            head, _, rest = kind.partition(":")
            name, _, state = rest.partition(":")
            if head == "unix" and name.removesuffix(".sock").isdigit():
                kind = f"unix:worker.sock:{state}"
        elif target.startswith("pipe:"):
            kind = "pipe"
        else:
            kind = target
        kinds[kind] += 1
    return dict(sorted(kinds.items()))


def sample(daemon: FlypoolDaemon, phase: str, status: dict[str, Any] | None) -> Sample:
    """Read the daemon's RSS, fds, threads and live children (psutil)."""
    proc = psutil.Process(daemon.pid)
    with proc.oneshot():
        rss = proc.memory_info().rss
        fds = proc.num_fds()
        threads = proc.num_threads()
    children = 0
    for child in proc.children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                children += 1
    app = None
    if status is not None:
        app = next((a for a in status.get("apps", []) if a.get("name") == APP), None)
    return Sample(
        t=time.monotonic(),
        phase=phase,
        rss_bytes=rss,
        fds=fds,
        threads=threads,
        children=children,
        ready_workers=len(ready_workers(status, APP)) if status is not None else None,
        upstream_connections=app.get("upstream_connections") if app is not None else None,
        fd_kinds=fd_inventory(daemon.pid),
    )


async def sample_now(daemon: FlypoolDaemon, phase: str) -> Sample:
    """A `sample` with the status read alongside (``None`` fields if it fails)."""
    try:
        status: dict[str, Any] | None = await in_thread(daemon.status, 5.0)
    except Exception:
        status = None
    return sample(daemon, phase, status)


async def sampler(args: argparse.Namespace, daemon: FlypoolDaemon, got: Collected) -> None:
    """A `sample` every ``--sample-interval`` seconds of the soak (t = 0 included)."""
    k = 0
    while k * args.sample_interval <= args.duration:
        await asyncio.sleep(max(0.0, got.t0 + k * args.sample_interval - time.monotonic()))
        got.samples.append(await sample_now(daemon, "load"))
        k += 1


async def poller(daemon: FlypoolDaemon, until: float, got: Collected) -> None:
    """``GET /status`` every 0.5 s: watch that the daemon lives, keep a condensed timeline."""
    while time.monotonic() < until:
        problem = daemon.proc.exited()
        if problem is not None:
            raise BenchmarkError(problem)
        t = time.monotonic()
        try:
            status: dict[str, Any] = await in_thread(daemon.status, 5.0)
        except Exception as err:
            got.poll_errors.append((t, f"{type(err).__name__}: {err}"))
        else:
            app: dict[str, Any] = next(
                (a for a in status.get("apps", []) if a.get("name") == APP), {}
            )
            got.polls.append(
                {
                    "t": t,
                    "state": app.get("state"),
                    "restart": app.get("restart"),
                    "last_restart_id": (app.get("last_restart") or {}).get("id"),
                    "queue": app.get("queue"),
                    "spawn_error": (app.get("spawn_error") or {}).get("reason"),
                    "deployment_error": app.get("deployment_error"),
                    "workers": [(w.get("pid"), w.get("state")) for w in app.get("workers", [])],
                }
            )
        await asyncio.sleep(0.5)


async def lag_monitor(until: float, got: Collected) -> None:
    """How late the client's event loop wakes up (a busy loop delays failure timestamps)."""
    while time.monotonic() < until:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        got.loop_lag_s.append(time.monotonic() - before - 0.1)


async def wait_settled(daemon: FlypoolDaemon, workers: int, timeout: float) -> float | None:
    """Wait until no restart runs and ``workers`` workers are ready; when, or ``None``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status: dict[str, Any] = await in_thread(daemon.status, 5.0)
            app: dict[str, Any] = next(
                (a for a in status.get("apps", []) if a.get("name") == APP), {}
            )
            listed = app.get("workers", [])
            if (
                app.get("restart") is None
                and len(ready_workers(status, APP)) >= workers
                and len(listed) == workers
            ):
                return time.monotonic()
        await asyncio.sleep(0.25)
    return None


# --------------------------------------------------------------------------- the run


async def soak(args: argparse.Namespace, daemon: FlypoolDaemon, fronts: list[Front]) -> Collected:
    """Warm up, measure, soak with faults, settle, measure."""
    got = Collected()
    uploads = make_uploads(args.seed)

    got.t_warmup = time.monotonic()
    log(f"warm-up: {args.connections} connections for {args.warmup:g}s, no faults ...")
    await run_load(args, fronts, "warmup", got.t_warmup + args.warmup, uploads, got.requests)
    await asyncio.sleep(args.settle)
    got.samples.append(await sample_now(daemon, "start"))
    log(f"  start: {_sample_text(got.samples[-1])}")

    got.t0 = time.monotonic()
    until = got.t0 + args.duration
    log(
        f"soak: {args.connections} connections for {args.duration:g}s; SIGKILL every "
        f"{args.kill_interval:g}s, rolling restart every {args.restart_interval:g}s ..."
    )
    side = [
        asyncio.create_task(faults(args, daemon, got), name="faults"),
        asyncio.create_task(sampler(args, daemon, got), name="sampler"),
        asyncio.create_task(poller(daemon, until, got), name="poller"),
        asyncio.create_task(lag_monitor(until, got), name="lag"),
    ]
    load = asyncio.create_task(
        run_load(args, fronts, "soak", until, uploads, got.requests), name="load"
    )
    try:
        # The first to fail (the daemon died, a client bug) ends the run.
        done, _ = await asyncio.wait([load, *side], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        await load
        got.t_end_load = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*side), timeout=args.request_timeout + 30.0)
    finally:
        for task in [load, *side]:
            task.cancel()
        await asyncio.gather(load, *side, return_exceptions=True)

    log("load stopped; waiting for restarts to finish and every worker to be ready ...")
    got.t_settled = await wait_settled(daemon, args.workers, args.settle_timeout)
    if got.t_settled is None:
        log(f"  warning: not settled after {args.settle_timeout:g}s")
    await asyncio.sleep(args.settle)
    problem = daemon.proc.exited()
    if problem is not None:
        raise BenchmarkError(problem)
    got.samples.append(await sample_now(daemon, "end"))
    log(f"  end: {_sample_text(got.samples[-1])}")
    return got


def _sample_text(s: Sample) -> str:
    return (
        f"RSS {s.rss_bytes / 2**20:.1f} MiB, {s.fds} fds, {s.threads} threads, "
        f"{s.children} children, {s.ready_workers} ready, {s.upstream_connections} upstream"
    )


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is importable, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------- analysis


def event_time(event: dict[str, Any], wall_t0: float) -> float | None:
    """A log event's timestamp in seconds since the soak's t0 (``None`` if it has none)."""
    try:
        stamp = datetime.fromisoformat(str(event["timestamp"]))
    except (KeyError, ValueError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() - wall_t0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of sorted ``values``."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def classify(
    requests: list[Request], kills: list[Kill], window: float
) -> tuple[dict[int, int], list[Request], list[Request]]:
    """Split failures into expected (in flight at a kill) and unexpected.

    Returns ``(kill index → expected failures attributed to it, expected,
    unexpected)``. A failure is expected when some kill at time K has
    ``start < K <= end <= K + window``; it is attributed to the latest such kill.
    A corrupt 200 is always unexpected.
    """
    times = [k.t for k in kills]
    per_kill: dict[int, int] = dict.fromkeys(range(len(kills)), 0)
    expected: list[Request] = []
    unexpected: list[Request] = []
    for r in requests:
        if not r.failed:
            continue
        match = None
        if not r.corrupt:
            # Kills with end - window <= K <= end, latest first.
            i = bisect.bisect_right(times, r.end) - 1
            while i >= 0 and times[i] >= r.end - window:
                if times[i] > r.start:
                    match = i
                    break
                i -= 1
        if match is None:
            unexpected.append(r)
        else:
            per_kill[match] += 1
            expected.append(r)
    return per_kill, expected, unexpected


def nearest(t: float, times: Sequence[float]) -> float | None:
    """``t`` minus the closest of ``times`` (signed), or ``None``."""
    return min((t - x for x in times), key=abs, default=None)


def analyse(
    args: argparse.Namespace, got: Collected, events: list[dict[str, Any]], wall_t0: float
) -> dict[str, Any]:
    """Turn the raw records into the summary (times in seconds since the soak's t0)."""
    t0 = got.t0
    soak = [r for r in got.requests if r.phase == "soak"]
    warm = [r for r in got.requests if r.phase == "warmup"]
    per_kill, expected, unexpected = classify(got.requests, got.kills, args.expected_window)
    ok = sorted((r.end - r.start) * 1e3 for r in soak if not r.failed)
    elapsed = (max((r.end for r in soak), default=t0) - t0) or 1.0

    # Restarts, from the daemon's log.
    begins = [e for e in events if e.get("event") == "restart begin"]
    ends = [e for e in events if e.get("event") == "restart end"]
    superseded = [e for e in events if e.get("event") == "restart superseded"]
    outcomes = Counter(str(e.get("outcome")) for e in ends)
    restart_windows: list[tuple[float, float | None]] = []
    for b in begins:
        tb = event_time(b, wall_t0)
        if tb is None:
            continue
        te = next(
            (t for e in ends if (t := event_time(e, wall_t0)) is not None and t >= tb),
            None,
        )
        restart_windows.append((tb, te))
    crash_events = [e for e in events if e.get("event") == "worker exited unexpectedly"]
    killed = {k.pid for k in got.kills}
    foreign_exits = [e for e in crash_events if e.get("pid") not in killed]
    notable = Counter(
        f"{e.get('level')}: {e.get('event')}"
        for e in events
        if e.get("level") in ("warning", "error", "critical")
    )

    kill_times = [k.t - t0 for k in got.kills]
    # Unexpected failures of requests that started shortly after a kill and failed
    # within the window: routed to the dead worker before the daemon noticed.
    after_kill: list[float] = []
    for r in unexpected:
        since = [r.start - t0 - k for k in kill_times if k <= r.start - t0]
        if since and min(since) <= args.expected_window and not r.corrupt:
            after_kill.append(min(since))
    restart_times = [a.t - t0 for a in got.restarts]

    def failure_detail(r: Request) -> dict[str, Any]:
        start, end = r.start - t0, r.end - t0
        return {
            "phase": r.phase,
            "start_s": round(start, 4),
            "end_s": round(end, 4),
            "latency_ms": round((r.end - r.start) * 1e3, 2),
            "front": r.front,
            "kind": r.kind,
            "conn": r.conn,
            "seq": r.seq,
            "reused_connection": r.reused,
            "status": r.status,
            "error": r.error,
            "body": r.body,
            "pid": r.pid,
            "end_minus_nearest_kill_s": _round(nearest(end, kill_times)),
            "start_minus_nearest_kill_s": _round(nearest(start, kill_times)),
            "end_minus_nearest_restart_ask_s": _round(nearest(end, restart_times)),
            "during_restart": any(
                b <= end and (e is None or start <= e) for b, e in restart_windows
            ),
        }

    samples = {s.phase: s for s in got.samples if s.phase in ("start", "end")}
    start_s, end_s = samples.get("start"), samples.get("end")
    load_samples = [s for s in got.samples if s.phase == "load"]
    rss_growth = (end_s.rss_bytes / start_s.rss_bytes - 1) * 100 if start_s and end_s else None
    load_growth = (
        (load_samples[-1].rss_bytes / load_samples[0].rss_bytes - 1) * 100
        if len(load_samples) >= 2
        else None
    )
    fd_delta = end_s.fds - start_s.fds if start_s and end_s else None
    lags = sorted(got.loop_lag_s)

    buckets = []
    width = args.sample_interval
    n_buckets = int(args.duration // width) + 1
    for n in range(n_buckets):
        lo, hi = n * width, (n + 1) * width
        in_b = [r for r in soak if lo <= r.start - t0 < hi]
        if not in_b:
            continue
        buckets.append(
            {
                "from_s": lo,
                "requests": len(in_b),
                "requests_per_s": round(len(in_b) / width, 1),
                "failed": sum(r.failed for r in in_b),
            }
        )

    summary: dict[str, Any] = {
        "requests": len(soak),
        "warmup_requests": len(warm),
        "requests_per_s": round(len(soak) / elapsed, 1),
        "ok": len(ok),
        "latency_ms_ok": {
            "p50": _round(percentile(ok, 50), 2),
            "p99": _round(percentile(ok, 99), 2),
            "max": _round(ok[-1] if ok else None, 2),
        },
        "by_kind": dict(Counter(r.kind for r in soak)),
        "by_front": dict(Counter(r.front for r in soak)),
        "failed": len(expected) + len(unexpected),
        "expected_failures": len(expected),
        "expected_by_outcome": dict(Counter(r.outcome() for r in expected).most_common()),
        "unexpected_failures": len(unexpected),
        "unexpected_by_outcome": dict(Counter(r.outcome() for r in unexpected).most_common()),
        "unexpected_in_warmup": sum(r.phase == "warmup" for r in unexpected),
        "unexpected_by_reason": dict(Counter(_reason(r) for r in unexpected).most_common()),
        "unexpected_started_just_after_kill": len(after_kill),
        "unexpected_start_after_kill_ms_max": _round(max(after_kill) * 1e3, 2)
        if after_kill
        else None,
        "expected_by_reason": dict(Counter(_reason(r) for r in expected).most_common()),
        "kills": len(got.kills),
        "kills_skipped": [(round(t - t0, 3), why) for t, why in got.skipped_kills],
        "restarts_asked": len(got.restarts),
        "restarts_accepted": sum(a.code == 202 for a in got.restarts),
        "restart_begins": len(begins),
        "restarts_completed": outcomes.get("completed", 0),
        "restarts_aborted": outcomes.get("aborted", 0),
        "restarts_superseded": len(superseded),
        "restart_ends": [
            {
                "t_s": _round(event_time(e, wall_t0), 3),
                "outcome": e.get("outcome"),
                "duration_s": e.get("duration_s"),
                "replaced": e.get("replaced"),
            }
            for e in ends
        ],
        "worker_exits_unexpected_logged": len(crash_events),
        "worker_exits_not_killed_by_us": [
            {"pid": e.get("pid"), "status": e.get("status"), "t_s": _round(event_time(e, wall_t0))}
            for e in foreign_exits
        ],
        "daemon_warnings_errors": dict(notable.most_common()),
        "rss_start_bytes": start_s.rss_bytes if start_s else None,
        "rss_end_bytes": end_s.rss_bytes if end_s else None,
        "rss_growth_pct": _round(rss_growth, 2),
        "rss_growth_under_load_pct": _round(load_growth, 2),
        "rss_max_bytes": max((s.rss_bytes for s in got.samples), default=None),
        "fds_start": start_s.fds if start_s else None,
        "fds_end": end_s.fds if end_s else None,
        "fds_delta": fd_delta,
        "fds_max": max((s.fds for s in got.samples), default=None),
        "fd_kinds_change": {
            kind: (end_s.fd_kinds.get(kind, 0) - start_s.fd_kinds.get(kind, 0))
            for kind in sorted({*start_s.fd_kinds, *end_s.fd_kinds})
            if end_s.fd_kinds.get(kind, 0) != start_s.fd_kinds.get(kind, 0)
        }
        if start_s and end_s
        else None,
        "settled_after_load_s": _round(
            got.t_settled - got.t_end_load if got.t_settled is not None else None, 2
        ),
        "client_loop_lag_ms": {
            "p99": _round((percentile(lags, 99) or 0) * 1e3, 1) if lags else None,
            "max": _round(lags[-1] * 1e3, 1) if lags else None,
        },
        "status_poll_errors": len(got.poll_errors),
        "goals": {
            "no_unexpected_failures": not unexpected,
            "rss_growth_below_10pct": rss_growth is not None and rss_growth < RSS_GROWTH_LIMIT_PCT,
            "fds_back_to_start": fd_delta is not None and abs(fd_delta) <= FD_TOLERANCE,
        },
    }
    return {
        "summary": summary,
        "unexpected": [failure_detail(r) for r in unexpected],
        "expected": [failure_detail(r) for r in expected],
        "kills": [
            {
                "t_s": round(k.t - t0, 4),
                "pid": k.pid,
                "sessions_before": k.sessions,
                "uptime_s": k.uptime_s,
                "ready_before": k.ready_before,
                "restart_running": k.restart_running,
                "expected_failures_attributed": per_kill[i],
            }
            for i, k in enumerate(got.kills)
        ],
        "restart_asks": [
            {
                "t_s": round(a.t - t0, 4),
                "answered_ms": round((a.answered - a.t) * 1e3, 2),
                "code": a.code,
                "restart_id": a.restart_id,
            }
            for a in got.restarts
        ],
        "restart_windows_s": [(_round(b, 3), _round(e, 3)) for b, e in restart_windows],
        "samples": [
            {**asdict(s), "t": round(s.t - t0, 3), "rss_mib": round(s.rss_bytes / 2**20, 2)}
            for s in got.samples
        ],
        "buckets": buckets,
        "status_polls": [{**p, "t": round(p["t"] - t0, 3)} for p in got.polls],
        "status_poll_errors": [(round(t - t0, 3), e) for t, e in got.poll_errors],
    }


def _reason(r: Request) -> str:
    """A failure's status or exception plus the daemon's reason (its 502 body's last line)."""
    if r.status is not None and not r.corrupt and r.body:
        return f"{r.status} {r.body.strip().splitlines()[-1]}"
    return r.outcome()


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+}"


def _outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "—"


def markdown(args: argparse.Namespace, result: dict[str, Any], command: str) -> str:
    """The human summary."""
    s = result["summary"]
    g = s["goals"]

    def mark(ok: bool) -> str:
        return "✅" if ok else "❌"

    lat = s["latency_ms_ok"]
    rows = [
        ("requests (soak)", f"{s['requests']:,} ({s['warmup_requests']:,} more in warm-up)"),
        ("throughput", f"{s['requests_per_s']:,} req/s"),
        ("ok latency p50 / p99 / max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"),
        (
            "expected failures (in flight at a kill)",
            f"{s['expected_failures']:,}: {_outcomes(s['expected_by_reason'])}",
        ),
        (
            "unexpected failures",
            f"{mark(g['no_unexpected_failures'])} {s['unexpected_failures']}: "
            f"{_outcomes(s['unexpected_by_reason'])}"
            + (
                f"; {s['unexpected_started_just_after_kill']} of them started "
                f"<= {s['unexpected_start_after_kill_ms_max']} ms after a kill"
                if s["unexpected_started_just_after_kill"]
                else ""
            ),
        ),
        ("SIGKILLs", f"{s['kills']} (skipped: {len(s['kills_skipped'])})"),
        (
            "rolling restarts",
            f"{s['restarts_asked']} asked, {s['restarts_completed']} completed, "
            f"{s['restarts_aborted']} aborted, {s['restarts_superseded']} superseded",
        ),
        (
            "daemon RSS start → end (idle)",
            f"{mark(g['rss_growth_below_10pct'])} {_mib(s['rss_start_bytes'])} → "
            f"{_mib(s['rss_end_bytes'])} ({_signed(s['rss_growth_pct'])} %); "
            f"max {_mib(s['rss_max_bytes'])}, "
            f"under load {_signed(s['rss_growth_under_load_pct'])} %",
        ),
        (
            "daemon fds start → end (idle)",
            f"{mark(g['fds_back_to_start'])} {s['fds_start']} → {s['fds_end']} "
            f"(Δ {_signed(s['fds_delta'])}); max under load {s['fds_max']}",
        ),
        (
            "fd kinds that changed (end - start)",
            ", ".join(f"{k} {v:+}" for k, v in (s["fd_kinds_change"] or {}).items()) or "none",
        ),
        (
            "worker exits not caused by our kills",
            str(len(s["worker_exits_not_killed_by_us"])),
        ),
        (
            "client loop lag p99 / max",
            f"{s['client_loop_lag_ms']['p99']} / {s['client_loop_lag_ms']['max']} ms",
        ),
    ]
    lines = [
        f"## flypool soak: {args.duration:g} s, {args.connections} connections, "
        f"{args.workers} workers",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "Samples (daemon):",
        "",
        "| t s | phase | RSS MiB | fds | threads | children | ready | upstream conns |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {x['t']:.1f} | {x['phase']} | {x['rss_mib']:.1f} | {x['fds']} | {x['threads']} "
            f"| {x['children']} | {x['ready_workers']} | {x['upstream_connections']} |"
            for x in result["samples"]
        ),
        "",
        f"Mix: GET /?delay={DELAY_S:g} 70 %, GET /?size={SIZE_BYTES} 27 %, POST /upload "
        f"{'/'.join(str(n // 1024) for n in UPLOAD_SIZES)} KiB 3 %; connections split "
        f"{'/'.join(f'{k} {v:,}' for k, v in s['by_front'].items())} requests by front. "
        f"--worker-concurrency {args.worker_concurrency}. Expected = started before a "
        f"SIGKILL and ended within {args.expected_window:g} s after it. RSS/fds start = idle "
        f"{args.settle:g} s after a {args.warmup:g} s warm-up; end = idle {args.settle:g} s "
        "after the load stopped and the pool settled.",
        "",
        f"Command: `{command}`",
    ]
    if result["unexpected"]:
        lines += ["", "Unexpected failures (first 30):", ""]
        lines += [
            "| start s | end s | kind | front | reused | status / error | Δ kill s | Δ restart s |",
            "|---:|---:|---|---|---|---|---:|---:|",
        ]
        for u in result["unexpected"][:30]:
            what = f"{u['status']} {u['error'] or ''} {(u['body'] or '').strip()!r}"
            lines.append(
                f"| {u['start_s']:.3f} | {u['end_s']:.3f} | {u['kind']} | {u['front']} | "
                f"{u['reused_connection']} | {what} | {u['end_minus_nearest_kill_s']} | "
                f"{u['end_minus_nearest_restart_ask_s']} |"
            )
    return "\n".join(lines)


def write_requests_csv(path: Path, got: Collected, result: dict[str, Any]) -> None:
    """Every request, gzipped: times in seconds since the soak's t0."""
    unexpected = {(u["phase"], u["conn"], u["seq"]) for u in result["unexpected"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["phase", "conn", "seq", "front", "kind", "start_s", "end_s", "status", "error",
             "pid", "reused", "class"]
        )  # fmt: skip
        for r in sorted(got.requests, key=lambda r: r.start):
            klass = "ok"
            if r.failed:
                klass = "unexpected" if (r.phase, r.conn, r.seq) in unexpected else "expected"
            writer.writerow(
                [r.phase, r.conn, r.seq, r.front, r.kind, f"{r.start - got.t0:.5f}",
                 f"{r.end - got.t0:.5f}", r.status or "", r.error or "", r.pid or "",
                 int(r.reused), klass]
            )  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Soak flypool with keep-alive load, worker SIGKILLs and rolling restarts."
    )
    add = parser.add_argument
    add("--duration", type=float, default=120.0, help="seconds of soak (default 120)")
    add("--warmup", type=float, default=10.0, help="seconds of warm-up load (default 10)")
    add("--connections", type=int, default=200, help="keep-alive connections (default 200)")
    add("--workers", type=int, default=4, help="workers (default 4)")
    add(
        "--worker-concurrency",
        type=int,
        default=0,
        help="flypool's worker_concurrency (default 0 = unlimited)",
    )
    add(
        "--front",
        choices=("both", "unix", "tcp"),
        default="both",
        help="where the load connects: the Unix socket, the TCP port, or half each (default)",
    )
    add("--kill-interval", type=float, default=5.0, help="seconds between SIGKILLs (default 5)")
    add(
        "--restart-interval",
        type=float,
        default=20.0,
        help="seconds between rolling restarts (default 20)",
    )
    add(
        "--expected-window",
        type=float,
        default=1.0,
        help="a failure ending this long after a kill it overlaps is expected (default 1)",
    )
    add("--sample-interval", type=float, default=10.0, help="RSS/fd sampling period (default 10)")
    add("--settle", type=float, default=3.0, help="idle seconds before start/end samples")
    add(
        "--settle-timeout",
        type=float,
        default=90.0,
        help="max seconds to wait for the pool to settle after the load (default 90)",
    )
    add("--request-timeout", type=float, default=30.0, help="per-request timeout (default 30)")
    add("--seed", type=int, default=1, help="random seed (mix, uploads, kill choice)")
    add("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.settle < 0:
        parser.error("--duration must be > 0, --warmup and --settle >= 0")
    if args.connections < 1 or args.workers < 1 or args.worker_concurrency < 0:
        parser.error("--connections and --workers must be >= 1, --worker-concurrency >= 0")
    if min(args.kill_interval, args.restart_interval, args.sample_interval) <= 0:
        parser.error("intervals must be > 0")
    if args.expected_window <= 0 or args.request_timeout <= 0:
        parser.error("--expected-window and --request-timeout must be > 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; returns the exit status (1 when a goal is missed)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    command = shlex.join(command_line)
    info = machine_info()
    log(
        f"soak: {info['nproc']} CPUs ({info['cpu_model']}), load {info['loadavg_at_start']}, "
        f"uvloop {'yes' if _have_uvloop() else 'no'}"
    )
    port = free_port()
    daemon = start_flypool(
        WORKER_COMMAND,
        workers=args.workers,
        listen="unix:{tmpdir}/app.sock",
        extra_args=[
            "--worker-concurrency",
            str(args.worker_concurrency),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        ready_timeout=60.0,
    )
    try:
        assert daemon.unix_socket is not None
        wait_http_ok("127.0.0.1", port, "/", timeout=30.0, alive=daemon.proc.exited)
        unix = Front("unix", unix_path=str(daemon.unix_socket))
        tcp = Front("tcp", port=port)
        fronts = {"both": [unix, tcp], "unix": [unix], "tcp": [tcp]}[args.front]
        wall_at_mono = time.time() - time.monotonic()
        got = run_async(soak(args, daemon, fronts))
        events = read_json_log(daemon.proc.log_path)
    except BaseException:
        log(f"flypool's log ends with:\n{log_tail(daemon.proc.log_path)}")
        raise
    finally:
        daemon.stop()

    result = analyse(args, got, events, wall_at_mono + got.t0)
    table = markdown(args, result, command)
    print(table)
    csv_path = args.out.with_name(args.out.stem + ".requests.csv.gz")
    write_requests_csv(csv_path, got, result)
    report = {
        "benchmark": "soak",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "argv": command_line,
        "flypool_argv": daemon.proc.argv,
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "mix": dict(MIX),
            "delay_s": DELAY_S,
            "size_bytes": SIZE_BYTES,
            "upload_sizes": list(UPLOAD_SIZES),
            "worker_command": WORKER_COMMAND,
            "uvloop": _have_uvloop(),
        },
        "machine": info,
        "markdown": table,
        "requests_csv": str(csv_path),
        **result,
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out} and {csv_path}")
    return 0 if all(result["summary"]["goals"].values()) else 1


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"soak: {err}", file=sys.stderr)
        raise SystemExit(1) from None
