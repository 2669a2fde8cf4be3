"""Deploys compared: flypool's rolling restart against Passenger, gunicorn and uvicorn.

Suites 2 (a good release) and 3 (a broken release) of the benchmark issue. Run
from the repository root (as root, so that Passenger can be installed)::

    .venv/bin/python benchmarks/deploy_compare.py

First ``benchmarks/install-deps`` installs what is missing: Debian's
``passenger`` package and uvicorn + gunicorn into the virtualenv
(``--skip-install`` skips it).

**The app** (``benchmarks/apps/slowboot.py``, ``slowboot_asgi.py`` for
uvicorn) takes ``--boot-delay`` s (default 1) to import and
``--request-delay`` s (default 0.005) per request, and answers ``pid=<pid>
gen=<generation>``; the generation is read at import from ``generation.txt``
in its directory, which is the working directory of every system. A
``broken`` file there makes the import raise. Each run copies the app into a
fresh short ``/tmp`` directory with ``generation.txt`` = 1.

**The scenario**, per system: ``--workers`` (4) processes on
``127.0.0.1:PORT``; warm-up until every process has answered; then
``--connections`` (8) client threads in this process, each with one keep-alive
``http.client`` connection looping ``GET /`` for ``--duration`` s (20; 15 for
the broken release), recording every request's start, end, status or
exception, and the pid and generation in the body. A failed request is never
retried: the connection is replaced and the thread pauses 10 ms (so that a
dead server is not hammered in a busy loop). At ``--restart-at`` s (5) the
generation is bumped to 2 (and, for suite 3, ``broken`` is created) and the
restart is triggered:

======================  ===========================================================
system                  trigger
======================  ===========================================================
flypool-b1, flypool-b2  ``POST /apps/app/restart?mode=rolling`` on the admin socket;
                        ``flypool run --restart-batch 1|2 --ready-path / -- PY -m
                        gunicorn --bind unix:{socket} --workers 1
                        --no-control-socket slowboot:app`` (gunicorn binds its
                        socket before the worker imports the app, so readiness is
                        the probe ``GET /``)
flypool-b1-noprobe      the same without ``--ready-path``: "ready" = the socket
                        accepts (shows why the probe matters with gunicorn)
passenger-restart-app   ``passenger-config restart-app DIR`` (Passenger Standalone,
                        builtin engine; open source: blocking restart)
passenger-restart-txt   ``touch DIR/tmp/restart.txt`` (blocking restart)
gunicorn-hup            ``gunicorn --workers 4``, ``kill -HUP <master>``
uvicorn-hup             ``uvicorn --workers 4``, ``kill -HUP <master>``
======================  ===========================================================

A sampler process (this file with ``--sampler``) lists the live worker
processes of each system every ``--sample-interval`` s (20 ms) with psutil:
flypool's direct children (the gunicorn per worker), gunicorn's and uvicorn's
worker children, Passenger's ``wsgi-loader`` processes. For flypool
``GET /status`` is polled as well (every 50 ms).

Reported per run: failed requests (non-200 answers + connection errors, with
details), steady-state (requests started before the restart) p50/p99/max
latency against the restart window (requests overlapping [restart, every
process new]), the largest latency after the restart, time until every
process is new (flypool: ``/status`` lists no old PID and 4 ready workers;
others: the sampler sees no old process and 4 new ones, which may still be
booting), time to the first answer of the new generation, time until as many
distinct new-generation PIDs as workers have answered (every new process
serving; for flypool these are the gunicorn worker PIDs), and time of the last
answer of the old generation. For flypool, its JSON log gives the restart step
by step (boot, drain, stop of the old worker, gap to the next spawn). For the
broken release: failures in the ``--broken-window`` (10 s) after the restart,
the generations that answered, whether the old processes still serve, and
for flypool ``deployment_error`` from ``/status``.

flypool's targets: 0 failed requests; max latency after the restart at most
the steady-state max + 50 ms; every process new within 4 x boot + 0.4 s
(batch 1) and 2 x boot + 0.4 s (batch 2), checked with the nominal boot
(``--boot-delay``) and with the measured one (median ``boot_s`` of the new
workers in flypool's log: spawn to ready, interpreter and gunicorn start
included).

With ``--rounds`` > 1 the systems are interleaved round by round. Markdown
tables go to stdout (progress on stderr), the raw figures (exact command,
versions, machine, every run's summary and failures) to
``benchmarks/out/deploy_compare.json``. Every process started is stopped by
its PID in a ``finally``.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The line above makes ``common`` importable when this file runs as a script.
from common import (
    OUT_DIR,
    PYTHON,
    BenchmarkError,
    FlypoolDaemon,
    Managed,
    admin_request,
    free_port,
    http_get,
    log_tail,
    machine_info,
    poll_until,
    proc_start_ticks,
    read_json_log,
    short_tmpdir,
    start_flypool,
    start_process,
    write_json,
)

APPS_DIR = Path(__file__).resolve().parent / "apps"
"""Where ``slowboot.py`` and ``slowboot_asgi.py`` live."""
INSTALL_DEPS = Path(__file__).resolve().parent / "install-deps"
DEFAULT_OUT = OUT_DIR / "deploy_compare.json"
APP = "app"
"""The app name ``flypool run`` gives by default."""
BODY_RE = re.compile(rb"\bpid=(\d+) gen=(\S+)")
REQUEST_TIMEOUT_S = 35.0
"""Socket timeout of one load request: longer than every drain/graceful timeout used."""
PAUSE_AFTER_FAILURE_S = 0.01
"""A client thread waits this long after a failed request before the next one."""
NOTABLE_RE = re.compile(
    r"aborting the restart|failed to boot|Worker failed|Shutting down|Could not spawn"
)
"""Server log lines worth quoting in the broken-release table."""
OLD_GEN = "1"
NEW_GEN = "2"
ALL_SYSTEMS = (
    "flypool-b1",
    "flypool-b2",
    "flypool-b1-noprobe",
    "passenger-restart-app",
    "passenger-restart-txt",
    "gunicorn-hup",
    "uvicorn-hup",
)


def log(message: str) -> None:
    """Progress, on stderr (stdout carries only the tables)."""
    print(message, file=sys.stderr, flush=True)


def command_output(
    argv: Sequence[str], timeout: float = 20.0, env: dict[str, str] | None = None
) -> str:
    """What a short command prints (stdout + stderr), or ``unknown (...)`` when it cannot run."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return (done.stdout + done.stderr).strip()


def first_line(text: str) -> str:
    """The first line of ``text`` (or ``"unknown"``)."""
    return text.splitlines()[0] if text.strip() else "unknown"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The scenario's knobs, from the command line."""

    workers: int
    connections: int
    duration_s: float
    broken_duration_s: float
    restart_at_s: float
    broken_window_s: float
    boot_delay_s: float
    request_delay_s: float
    sample_interval_s: float
    status_interval_s: float

    def app_env(self) -> dict[str, str]:
        """The environment variables the app reads."""
        return {
            "SLOWBOOT_BOOT_S": f"{self.boot_delay_s:g}",
            "SLOWBOOT_REQUEST_S": f"{self.request_delay_s:g}",
        }


# --------------------------------------------------------------------------- the load


@dataclass(slots=True)
class Request:
    """One load request; times in seconds since the run's t0 (monotonic clock)."""

    conn: int
    seq: int
    start: float
    end: float
    status: int | None
    error: str | None
    """``ExceptionName: message`` when no answer came."""
    pid: int | None
    """The process that answered (from the body), if any."""
    gen: str | None
    """The generation that answered (from the body), if any."""
    reused: bool
    """The connection had already served a request (keep-alive reuse)."""
    detail: str | None = None
    """The start of the body of a non-200 answer."""

    @property
    def latency_ms(self) -> float:
        """End minus start."""
        return (self.end - self.start) * 1e3

    @property
    def failed(self) -> bool:
        """No answer, or an answer other than 200."""
        return self.status != 200


def load_connection(
    index: int,
    host: str,
    port: int,
    t0: float,
    deadline: float,
    stop: threading.Event,
    out: list[Request],
) -> None:
    """One keep-alive client: loop ``GET /`` until ``deadline`` (monotonic).

    A failed request is recorded, the connection replaced and the thread
    pauses `PAUSE_AFTER_FAILURE_S`; requests are never retried.
    """
    conn: http.client.HTTPConnection | None = None
    served = 0
    seq = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
                served = 0
            reused = served > 0
            status: int | None = None
            error: str | None = None
            detail: str | None = None
            pid: int | None = None
            gen: str | None = None
            start = time.monotonic()
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                status = response.status
                match = BODY_RE.search(body)
                if match:
                    pid, gen = int(match[1]), match[2].decode(errors="replace")
                if status != 200:
                    detail = body[:200].decode(errors="replace")
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
                Request(index, seq, start - t0, end - t0, status, error, pid, gen, reused, detail)
            )
            seq += 1
            if status != 200:
                stop.wait(PAUSE_AFTER_FAILURE_S)
    finally:
        if conn is not None:
            conn.close()


def warm_up(host: str, port: int, workers: int, timeout: float = 60.0) -> set[int]:
    """Send rounds of parallel ``GET /`` until ``workers`` distinct PIDs have answered 200.

    Passenger spawns lazily and routes least-busy, gunicorn's and uvicorn's
    workers share one accept queue: concurrent requests reach every process.
    """
    seen: set[int] = set()
    lock = threading.Lock()

    def one() -> None:
        answer = http_get(host, port, "/", timeout=10.0)
        if answer is not None and answer[0] == 200:
            match = BODY_RE.search(answer[1])
            if match:
                with lock:
                    seen.add(int(match[1]))

    def check() -> set[int] | None:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(2 * workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(12.0)
        return set(seen) if len(seen) >= workers else None

    return poll_until(check, timeout, f"{workers} distinct processes to answer on port {port}")


# --------------------------------------------------------------------------- sampler


def sampler_main(
    root_pid: int, recursive: bool, match: str, interval: float, until: float, out: Path
) -> int:
    """The helper process: sample the live worker processes under ``root_pid``.

    A worker is a non-zombie child (or descendant, when ``recursive``) whose
    command line contains ``match`` (any, when empty). Sampled every
    ``interval`` s until ``until`` (monotonic) or SIGTERM; writes
    ``{"samples": [[t, [pid, ...]], ...], "seen": {pid: start_ticks}}`` to ``out``.
    """
    import psutil

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    samples: list[tuple[float, list[int]]] = []
    seen: dict[int, int] = {}
    try:
        root = psutil.Process(root_pid)
    except psutil.NoSuchProcess:
        out.write_text(json.dumps({"samples": [], "seen": {}}))
        return 1
    next_at = time.monotonic()
    try:
        while not stopping.is_set() and time.monotonic() < until:
            t = time.monotonic()
            live: list[int] = []
            try:
                children = root.children(recursive=recursive)
            except psutil.NoSuchProcess:
                break
            for child in children:
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        continue
                    if match and match not in " ".join(child.cmdline()):
                        continue
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                live.append(child.pid)
                if child.pid not in seen:
                    ticks = proc_start_ticks(child.pid)
                    if ticks is not None:
                        seen[child.pid] = ticks
            samples.append((t, sorted(live)))
            next_at += interval
            stopping.wait(max(0.0, next_at - time.monotonic()))
    finally:
        out.write_text(json.dumps({"samples": samples, "seen": seen}))
    return 0


@dataclass(frozen=True)
class SamplerSpec:
    """Which processes of a system are its workers (see `sampler_main`)."""

    root_pid: int
    recursive: bool
    match: str


def start_sampler(spec: SamplerSpec, interval: float, until: float, tmpdir: Path) -> Managed:
    """Start `sampler_main` as a separate process (so its ``/proc`` scans do not take
    this interpreter's GIL from the load threads)."""
    argv = [
        PYTHON,
        str(Path(__file__).resolve()),
        "--sampler",
        str(spec.root_pid),
        "1" if spec.recursive else "0",
        spec.match,
        f"{interval:g}",
        repr(until),
        str(tmpdir / "samples.json"),
    ]
    return start_process("sampler", argv, tmpdir / "sampler.log")


def read_samples(path: Path, t0: float) -> tuple[list[tuple[float, list[int]]], dict[int, int]]:
    """The sampler's output, times made relative to ``t0``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"cannot read the sampler's output {path}: {err}") from err
    samples = [(float(t) - t0, [int(p) for p in pids]) for t, pids in data["samples"]]
    seen = {int(pid): int(ticks) for pid, ticks in data["seen"].items()}
    return samples, seen


def kill_leftovers(pids: dict[int, int], timeout: float, what: str) -> list[int]:
    """Wait up to ``timeout`` s for the processes ``pids`` (PID → start ticks) to exit;
    SIGKILL those still there and still the same process. Returns the ones killed."""

    def remaining() -> list[int]:
        return [pid for pid, ticks in pids.items() if proc_start_ticks(pid) == ticks]

    with contextlib.suppress(BenchmarkError):
        poll_until(lambda: True if not remaining() else None, timeout, f"{what} to exit")
    killed = remaining()
    for pid in killed:
        log(f"warning: {what} pid {pid} outlived its server; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


# --------------------------------------------------------------------------- systems


class System(abc.ABC):
    """One server under test: start it on ``port`` serving ``app_dir``, restart it, stop it."""

    key: ClassVar[str]
    trigger_text: ClassVar[str]

    def __init__(self, settings: Settings, app_dir: Path, tmpdir: Path, port: int) -> None:
        self.settings = settings
        self.app_dir = app_dir
        self.tmpdir = tmpdir
        self.host = "127.0.0.1"
        self.port = port
        self.argv: list[str] = []
        self.known_pids: dict[int, int] = {}
        """Worker PID → start ticks, from the sampler; checked on `stop`."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers ``GET /``."""

    @abc.abstractmethod
    def sampler_spec(self) -> SamplerSpec:
        """Which processes are the workers."""

    @abc.abstractmethod
    def trigger_restart(self) -> dict[str, Any]:
        """Ask for the restart; return what the trigger said."""

    @abc.abstractmethod
    def alive_problem(self) -> str | None:
        """``None`` while the server runs; a message once its main process has exited."""

    def final_info(self) -> dict[str, Any]:
        """What the server says about itself at the end of the run (before `stop`)."""
        return {}

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every process of the server (by PID)."""

    def env(self) -> dict[str, str]:
        """The environment of the server's processes."""
        return {**os.environ, **self.settings.app_env()}


class FlypoolSystem(System):
    """flypool in front of one gunicorn (one sync worker) per flypool worker."""

    key = "flypool-b1"
    trigger_text = "POST /apps/app/restart?mode=rolling"
    batch = 1
    ready_path: str | None = "/"

    def __init__(self, settings: Settings, app_dir: Path, tmpdir: Path, port: int) -> None:
        super().__init__(settings, app_dir, tmpdir, port)
        self.daemon: FlypoolDaemon | None = None
        self.polls: list[dict[str, Any]] = []
        self.poll_errors: list[tuple[float, str]] = []
        self.events: list[dict[str, Any]] = []
        self.log_tail = ""

    def worker_command(self) -> list[str]:
        """gunicorn, bound to the socket flypool gives, one sync worker."""
        return [
            PYTHON,
            "-m",
            "gunicorn",
            "--bind",
            "unix:{socket}",
            "--workers",
            "1",
            "--no-control-socket",
            "slowboot:app",
        ]

    def start(self) -> None:
        """``flypool run`` via `common.start_flypool` (waits for ready workers)."""
        extra = ["--restart-batch", str(self.batch), "--drain-timeout", "30s"]
        if self.ready_path:
            extra += ["--ready-path", self.ready_path]
        for key, value in self.settings.app_env().items():
            extra += ["--env", f"{key}={value}"]
        self.daemon = start_flypool(
            self.worker_command(),
            workers=self.settings.workers,
            host=self.host,
            port=self.port,
            extra_args=extra,
            root=self.app_dir,
            ready_timeout=60.0,
        )
        self.argv = self.daemon.proc.argv

    def _daemon(self) -> FlypoolDaemon:
        if self.daemon is None:
            raise BenchmarkError("flypool is not running")
        return self.daemon

    def sampler_spec(self) -> SamplerSpec:
        """The daemon's direct children: one gunicorn master per worker."""
        return SamplerSpec(self._daemon().pid, False, "gunicorn")

    def trigger_restart(self) -> dict[str, Any]:
        """``POST /apps/app/restart?mode=rolling`` on the admin socket."""
        code, body = admin_request(
            self._daemon().admin_socket, "POST", f"/apps/{APP}/restart?mode=rolling"
        )
        if code != 202:
            raise BenchmarkError(f"POST restart answered {code}: {body!r}")
        return {"status": code, "body": body}

    def alive_problem(self) -> str | None:
        """The daemon's exit, if it exited."""
        return self._daemon().proc.exited()

    def poll_status(self, t0: float, deadline: float, stop: threading.Event) -> None:
        """``GET /status`` every ``status_interval_s`` until ``deadline``; keep the app's part."""
        daemon = self._daemon()
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status = daemon.status(timeout=2.0)
            except (OSError, http.client.HTTPException, BenchmarkError) as err:
                self.poll_errors.append((time.monotonic() - t0, f"{type(err).__name__}: {err}"))
            else:
                t = time.monotonic() - t0
                app: dict[str, Any] = next(
                    (a for a in status.get("apps", []) if a.get("name") == APP), {}
                )
                self.polls.append(
                    {
                        "t": t,
                        "state": app.get("state"),
                        "workers": [
                            (int(w["pid"]), str(w.get("state")))
                            for w in app.get("workers", [])
                            if isinstance(w.get("pid"), int)
                        ],
                        "restart": app.get("restart"),
                        "last_restart": app.get("last_restart"),
                        "deployment_error": app.get("deployment_error"),
                    }
                )
            next_at += self.settings.status_interval_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    def final_info(self) -> dict[str, Any]:
        """The app's final ``/status`` entry and the daemon's JSON log."""
        daemon = self._daemon()
        info: dict[str, Any] = {}
        try:
            status = daemon.status(timeout=5.0)
        except (OSError, http.client.HTTPException, BenchmarkError) as err:
            info["status_error"] = f"{type(err).__name__}: {err}"
        else:
            app: dict[str, Any] = next(
                (a for a in status.get("apps", []) if a.get("name") == APP), {}
            )
            info["status"] = app
        with contextlib.suppress(BenchmarkError):
            self.events = read_json_log(daemon.proc.log_path)
        self.log_tail = log_tail(daemon.proc.log_path, 40)
        return info

    def stop(self) -> None:
        """`FlypoolDaemon.stop`, then any gunicorn seen by the sampler that outlived it."""
        if self.daemon is not None:
            self.daemon.stop()
        kill_leftovers(self.known_pids, 5.0, "flypool's gunicorn")


class FlypoolBatch2(FlypoolSystem):
    """flypool with ``--restart-batch 2``."""

    key = "flypool-b2"
    batch = 2


class FlypoolNoProbe(FlypoolSystem):
    """flypool without ``--ready-path``: a worker is ready once its socket accepts."""

    key = "flypool-b1-noprobe"
    ready_path = None


class GunicornSystem(System):
    """``gunicorn --workers N`` on TCP, restarted with ``kill -HUP <master>``."""

    key = "gunicorn-hup"
    trigger_text = "kill -HUP <master>"

    def __init__(self, settings: Settings, app_dir: Path, tmpdir: Path, port: int) -> None:
        super().__init__(settings, app_dir, tmpdir, port)
        self.proc: Managed | None = None

    def command(self) -> list[str]:
        """The server's command line."""
        return [
            PYTHON,
            "-m",
            "gunicorn",
            "--bind",
            f"{self.host}:{self.port}",
            "--workers",
            str(self.settings.workers),
            "--no-control-socket",
            "--graceful-timeout",
            "30",
            "slowboot:app",
        ]

    def start(self) -> None:
        """Start the server in the app directory; wait for ``GET /``."""
        self.argv = self.command()
        self.proc = start_process(
            self.key, self.argv, self.tmpdir / "server.log", cwd=self.app_dir, env=self.env()
        )
        poll_until(
            lambda: True if http_get(self.host, self.port, "/", 2.0) else None,
            60.0,
            f"{self.key} to answer",
            self.alive_problem,
        )

    def _proc(self) -> Managed:
        if self.proc is None:
            raise BenchmarkError(f"{self.key} is not running")
        return self.proc

    def sampler_spec(self) -> SamplerSpec:
        """The master's children."""
        return SamplerSpec(self._proc().pid, False, "")

    def trigger_restart(self) -> dict[str, Any]:
        """SIGHUP to the master."""
        os.kill(self._proc().pid, signal.SIGHUP)
        return {"signal": "SIGHUP", "pid": self._proc().pid}

    def alive_problem(self) -> str | None:
        """The master's exit, if it exited."""
        return self._proc().exited()

    def final_info(self) -> dict[str, Any]:
        """Whether the master still runs, and its log's tail."""
        proc = self._proc()
        return {
            "master_exit_status": proc.proc.poll(),
            "log_tail": log_tail(proc.log_path, 30).splitlines(),
        }

    def stop(self) -> None:
        """SIGTERM the master (bounded), then kill any worker that outlived it."""
        if self.proc is not None:
            self.proc.stop(35.0)
        kill_leftovers(self.known_pids, 5.0, f"{self.key} worker")


class UvicornSystem(GunicornSystem):
    """``uvicorn --workers N`` (ASGI twin of the app), restarted with ``kill -HUP <master>``."""

    key = "uvicorn-hup"

    def command(self) -> list[str]:
        """The server's command line."""
        return [
            PYTHON,
            "-m",
            "uvicorn",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.settings.workers),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "30",
            "slowboot_asgi:app",
        ]

    def sampler_spec(self) -> SamplerSpec:
        """The master's ``multiprocessing`` spawn children (not its resource tracker)."""
        return SamplerSpec(self._proc().pid, False, "spawn_main")


class PassengerSystem(System):
    """Passenger Standalone (builtin engine), restarted with ``passenger-config restart-app``."""

    key = "passenger-restart-app"
    trigger_text = "passenger-config restart-app DIR"

    def __init__(self, settings: Settings, app_dir: Path, tmpdir: Path, port: int) -> None:
        super().__init__(settings, app_dir, tmpdir, port)
        self.proc: Managed | None = None
        self.registry = tmpdir / "reg"
        self.pid_file = tmpdir / "passenger.pid"
        self.log_file = tmpdir / "passenger.log"
        self.watchdog: tuple[int, int] | None = None
        self.extra_pids: dict[int, int] = {}

    def command(self) -> list[str]:
        """``passenger start`` with the builtin engine, N processes, our Python."""
        passenger = shutil.which("passenger") or "/usr/bin/passenger"
        argv = [
            passenger,
            "start",
            str(self.app_dir),
            "--engine",
            "builtin",
            "--address",
            self.host,
            "--port",
            str(self.port),
            "--app-type",
            "wsgi",
            "--startup-file",
            "slowboot.py",
            "--min-instances",
            str(self.settings.workers),
            "--max-pool-size",
            str(self.settings.workers),
            "--spawn-method",
            "direct",
            "--python",
            PYTHON,
            "--environment",
            "production",
            "--log-file",
            str(self.log_file),
            "--pid-file",
            str(self.pid_file),
            "--instance-registry-dir",
            str(self.registry),
            "--start-timeout",
            "30",
            "--no-install-runtime",
            "--no-compile-runtime",
            "--disable-security-update-check",
            "--disable-anonymous-telemetry",
        ]
        for key, value in self.settings.app_env().items():
            argv += ["--envvar", f"{key}={value}"]
        if os.geteuid() == 0:
            argv += ["--user", "root"]
        return argv

    def env(self) -> dict[str, str]:
        """Our environment plus the app's, the registry, and ``TMPDIR`` = the scratch dir
        (so Passenger's own temp dir, and its temp-dir toucher's pid file, are ours)."""
        return {
            **super().env(),
            "PASSENGER_INSTANCE_REGISTRY_DIR": str(self.registry),
            "TMPDIR": str(self.tmpdir),
        }

    def start(self) -> None:
        """Start Passenger Standalone in the foreground; wait for ``GET /`` and its PIDs."""
        if shutil.which("passenger") is None:
            raise BenchmarkError(
                "passenger is not installed (benchmarks/install-deps could not install it)"
            )
        self.registry.mkdir()
        (self.app_dir / "tmp").mkdir(exist_ok=True)
        self.argv = self.command()
        self.proc = start_process(
            self.key, self.argv, self.tmpdir / "server.log", cwd=self.app_dir, env=self.env()
        )
        poll_until(
            lambda: True if http_get(self.host, self.port, "/", 10.0) else None,
            90.0,
            f"{self.key} to answer",
            self.alive_problem,
        )
        pid = poll_until(self._read_pid_file, 10.0, "Passenger's pid file", self.alive_problem)
        ticks = proc_start_ticks(pid)
        if ticks is None:
            raise BenchmarkError(f"Passenger's watchdog (pid {pid}) is gone")
        self.watchdog = (pid, ticks)
        for pid_file in self.tmpdir.glob("passenger-standalone.*/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                other = int(pid_file.read_text().strip())
                other_ticks = proc_start_ticks(other)
                if other_ticks is not None:
                    self.extra_pids[other] = other_ticks

    def _read_pid_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _proc(self) -> Managed:
        if self.proc is None:
            raise BenchmarkError(f"{self.key} is not running")
        return self.proc

    def sampler_spec(self) -> SamplerSpec:
        """The watchdog's descendants running Passenger's WSGI loader."""
        if self.watchdog is None:
            raise BenchmarkError("Passenger's watchdog PID is unknown")
        return SamplerSpec(self.watchdog[0], True, "wsgi-loader")

    def trigger_restart(self) -> dict[str, Any]:
        """``passenger-config restart-app DIR`` (a blocking restart in the open-source edition)."""
        argv = ["passenger-config", "restart-app", str(self.app_dir)]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, env=self.env()
        )
        if done.returncode != 0:
            raise BenchmarkError(
                f"{shlex.join(argv)} exited with {done.returncode}: {done.stdout}{done.stderr}"
            )
        return {"argv": argv, "output": (done.stdout + done.stderr).strip()}

    def alive_problem(self) -> str | None:
        """The exit of ``passenger start``, if it exited."""
        return self._proc().exited()

    def final_info(self) -> dict[str, Any]:
        """``passenger-status`` and the log's tail."""
        status = command_output(["passenger-status"], timeout=10.0, env=self.env())
        return {
            "passenger_status": status.splitlines(),
            "log_tail": [
                line for line in log_tail(self.log_file, 60).splitlines() if "imp" not in line
            ][-30:],
        }

    def stop(self) -> None:
        """SIGTERM ``passenger start`` (it shuts its watchdog, core and apps down), then
        kill by PID whatever of those outlived it."""
        if self.proc is not None:
            self.proc.stop(35.0)
        pids = dict(self.known_pids)
        if self.watchdog is not None:
            pids[self.watchdog[0]] = self.watchdog[1]
        pids.update(self.extra_pids)
        kill_leftovers(pids, 10.0, "Passenger process")


class PassengerRestartTxt(PassengerSystem):
    """Passenger Standalone restarted by touching ``tmp/restart.txt``."""

    key = "passenger-restart-txt"
    trigger_text = "touch DIR/tmp/restart.txt"

    def trigger_restart(self) -> dict[str, Any]:
        """Create (or touch) ``tmp/restart.txt`` in the app directory."""
        path = self.app_dir / "tmp" / "restart.txt"
        path.touch()
        now = time.time()
        os.utime(path, (now, now))
        return {"touched": str(path)}


SYSTEM_CLASSES: dict[str, type[System]] = {
    cls.key: cls
    for cls in (
        FlypoolSystem,
        FlypoolBatch2,
        FlypoolNoProbe,
        PassengerSystem,
        PassengerRestartTxt,
        GunicornSystem,
        UvicornSystem,
    )
}


# --------------------------------------------------------------------------- one run


@dataclass
class RawRun:
    """Everything collected in one run."""

    system: str
    suite: str
    round: int
    argv: list[str]
    t_restart: float = 0.0
    t_trigger_done: float = 0.0
    trigger: dict[str, Any] = field(default_factory=dict)
    warm_pids: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    polls: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_t0: float = 0.0
    duration_s: float = 0.0
    server_exited: str | None = None
    error: str | None = None


def prepare_app_dir(tmpdir: Path) -> Path:
    """Copy the benchmark apps into ``tmpdir/app`` with ``generation.txt`` = 1."""
    app_dir = tmpdir / "app"
    app_dir.mkdir()
    for name in ("slowboot.py", "slowboot_asgi.py"):
        shutil.copy2(APPS_DIR / name, app_dir / name)
    (app_dir / "generation.txt").write_text(f"{OLD_GEN}\n")
    return app_dir


def run_once(settings: Settings, key: str, suite: str, number: int) -> RawRun:
    """Start ``key``, load it, deploy generation 2 (broken for suite ``broken``), stop it."""
    tmpdir = short_tmpdir("fpd")
    app_dir = prepare_app_dir(tmpdir)
    system = SYSTEM_CLASSES[key](settings, app_dir, tmpdir, free_port())
    duration = settings.duration_s if suite == "deploy" else settings.broken_duration_s
    raw = RawRun(system=key, suite=suite, round=number, argv=[], duration_s=duration)
    sampler: Managed | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        system.start()
        raw.argv = system.argv
        raw.warm_pids = sorted(warm_up(system.host, system.port, settings.workers))
        spec = system.sampler_spec()

        t0 = time.monotonic()
        raw.wall_t0 = time.time()
        deadline = t0 + duration
        sampler = start_sampler(spec, settings.sample_interval_s, deadline, tmpdir)
        per_conn: list[list[Request]] = [[] for _ in range(settings.connections)]
        threads = [
            threading.Thread(
                target=load_connection,
                args=(i, system.host, system.port, t0, deadline, stop, per_conn[i]),
                name=f"load-{i}",
                daemon=True,
            )
            for i in range(settings.connections)
        ]
        if isinstance(system, FlypoolSystem):
            threads.append(
                threading.Thread(
                    target=system.poll_status, args=(t0, deadline, stop), name="status", daemon=True
                )
            )
        for thread in threads:
            thread.start()

        stop.wait(max(0.0, t0 + settings.restart_at_s - time.monotonic()))
        if problem := system.alive_problem():
            raise BenchmarkError(problem)
        (app_dir / "generation.txt").write_text(f"{NEW_GEN}\n")
        if suite == "broken":
            (app_dir / "broken").write_text("this release raises at import\n")
        raw.t_restart = time.monotonic() - t0
        raw.trigger = system.trigger_restart()
        raw.t_trigger_done = time.monotonic() - t0
        log(f"  restart triggered at t={raw.t_restart:.3f}s ({system.trigger_text})")

        while time.monotonic() < deadline + 1.0:
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
        raw.samples, seen = read_samples(tmpdir / "samples.json", t0)
        system.known_pids.update(seen)
        raw.requests = sorted((r for rs in per_conn for r in rs), key=lambda r: r.start)
        raw.server_exited = system.alive_problem()
        raw.final = system.final_info()
        if isinstance(system, FlypoolSystem):
            raw.polls = system.polls
            raw.events = system.events
            raw.final["poll_errors"] = system.poll_errors
    except BenchmarkError as err:
        raw.error = str(err)
        log(f"  {key}: {err}")
        if isinstance(system, PassengerSystem):
            log(f"  Passenger's log ends with:\n{log_tail(system.log_file)}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        if sampler is not None:
            sampler.stop(5.0)
            if not system.known_pids and (tmpdir / "samples.json").exists():
                with contextlib.suppress(BenchmarkError):
                    system.known_pids.update(read_samples(tmpdir / "samples.json", 0.0)[1])
        try:
            system.stop()
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return raw


# --------------------------------------------------------------------------- analysis


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
    """Count, failures and latency p50/p99/max (ms) of successful requests."""
    chosen = list(requests)
    latency = [r.latency_ms for r in chosen if not r.failed]
    return {
        "requests": len(chosen),
        "failed": sum(r.failed for r in chosen),
        "p50_ms": percentile(latency, 50),
        "p99_ms": percentile(latency, 99),
        "max_ms": max(latency, default=None),
    }


def failure_kinds(requests: Iterable[Request]) -> dict[str, int]:
    """Failed requests grouped by status code or exception type."""
    kinds: dict[str, int] = {}
    for r in requests:
        if not r.failed:
            continue
        kind = f"HTTP {r.status}" if r.status is not None else (r.error or "?").split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def event_time(event: dict[str, Any], wall_t0: float) -> float | None:
    """A flypool log event's timestamp in seconds since the run's t0."""
    try:
        stamp = datetime.fromisoformat(str(event["timestamp"]))
    except (KeyError, ValueError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() - wall_t0


def flypool_boots(raw: RawRun) -> list[float]:
    """``boot_s`` of the workers that became ready after the restart, from flypool's log."""
    boots: list[float] = []
    for event in raw.events:
        if event.get("event") != "worker ready" or not isinstance(event.get("boot_s"), int | float):
            continue
        t = event_time(event, raw.wall_t0)
        if t is not None and t >= raw.t_restart:
            boots.append(float(event["boot_s"]))
    return boots


def flypool_steps(raw: RawRun, old_pids: set[int], batch: int) -> dict[str, Any]:
    """The rolling restart step by step, from flypool's log (times in s after the restart):
    each new worker's spawn and ready, and the old ones retired with it (``stopping
    worker`` and ``worker exited``), with the drain (new ready → old stopping), stop
    (stopping → exited) and gap (old exited → next spawn) durations."""
    names = {
        "worker spawned": "spawned",
        "worker ready": "ready",
        "stopping worker": "stopping",
        "worker exited": "exited",
        "worker exited unexpectedly": "exited",
    }
    workers: dict[int, dict[str, Any]] = {}
    for event in raw.events:
        key = names.get(str(event.get("event")))
        pid = event.get("pid")
        t = event_time(event, raw.wall_t0)
        if key is None or not isinstance(pid, int) or t is None or t > raw.duration_s:
            continue
        worker = workers.setdefault(pid, {"pid": pid})
        worker.setdefault(key, round(t - raw.t_restart, 4))
        if key == "spawned":
            worker["generation"] = event.get("generation")
        elif key == "ready":
            worker["boot_s"] = event.get("boot_s")
        elif key == "exited":
            worker["exit"] = event.get("status")
    new = sorted(
        (w for w in workers.values() if w.get("spawned", -1.0) >= 0 and w["pid"] not in old_pids),
        key=lambda w: w["spawned"],
    )
    old = sorted(
        (w for pid, w in workers.items() if pid in old_pids and "stopping" in w),
        key=lambda w: w["stopping"],
    )
    steps: list[dict[str, Any]] = []
    for i in range(0, len(new), batch):
        spawned, retired = new[i : i + batch], old[i : i + batch]
        step: dict[str, Any] = {
            "new_pids": [w["pid"] for w in spawned],
            "old_pids": [w["pid"] for w in retired],
            "spawned_at": min(w["spawned"] for w in spawned),
            "boot_s": [w.get("boot_s") for w in spawned],
        }
        ready = [w["ready"] for w in spawned if "ready" in w]
        if ready and len(ready) == len(spawned):
            step["ready_at"] = max(ready)
        if retired and "ready_at" in step:
            step["old_stopping_at"] = min(w["stopping"] for w in retired)
            step["drain_s"] = round(step["old_stopping_at"] - step["ready_at"], 4)
            exited = [w["exited"] for w in retired if "exited" in w]
            if len(exited) == len(retired):
                step["old_exited_at"] = max(exited)
                step["stop_s"] = round(step["old_exited_at"] - step["old_stopping_at"], 4)
        if steps and "old_exited_at" in steps[-1]:
            steps[-1]["gap_to_next_spawn_s"] = round(
                step["spawned_at"] - steps[-1]["old_exited_at"], 4
            )
        steps.append(step)
    markers = [
        {"event": e.get("event"), "t": round(t - raw.t_restart, 4)}
        for e in raw.events
        if str(e.get("event")).startswith("restart")
        and (t := event_time(e, raw.wall_t0)) is not None
    ]
    return {"steps": steps, "workers": list(workers.values()), "restart_events": markers}


def analyse(raw: RawRun, settings: Settings) -> dict[str, Any]:
    """Turn one run's timeline into figures (times in s relative to the restart)."""
    s: dict[str, Any] = {
        "system": raw.system,
        "suite": raw.suite,
        "round": raw.round,
        "argv": raw.argv,
        "error": raw.error,
    }
    if raw.error is not None:
        return s
    tr = raw.t_restart
    requests = raw.requests
    before = [(t, pids) for t, pids in raw.samples if t < tr]
    initial = set(before[-1][1]) if before else set()
    after_samples = [(t, set(pids)) for t, pids in raw.samples if t >= tr]
    t_all_new_sampled = next(
        (t for t, pids in after_samples if not initial & pids and len(pids) >= settings.workers),
        None,
    )
    t_all_new_status: float | None = None
    status_initial: set[int] = set()
    if raw.polls:
        polls_before = [p for p in raw.polls if p["t"] < tr]
        if polls_before:
            status_initial = {pid for pid, _ in polls_before[-1]["workers"]}
        t_all_new_status = next(
            (
                p["t"]
                for p in raw.polls
                if p["t"] >= tr
                and not status_initial & {pid for pid, _ in p["workers"]}
                and sum(state == "ready" for _, state in p["workers"]) >= settings.workers
            ),
            None,
        )
    t_all_new = t_all_new_status if raw.polls else t_all_new_sampled

    ok_after = [r for r in requests if r.status == 200 and r.end >= tr]
    first_new = min((r.end for r in ok_after if r.gen == NEW_GEN), default=None)
    first_by_pid: dict[int, float] = {}
    for r in ok_after:
        if r.gen == NEW_GEN and r.pid is not None:
            first_by_pid[r.pid] = min(r.end, first_by_pid.get(r.pid, r.end))
    t_all_new_answered = (
        sorted(first_by_pid.values())[settings.workers - 1]
        if len(first_by_pid) >= settings.workers
        else None
    )
    last_old = max((r.end for r in ok_after if r.gen == OLD_GEN), default=None)

    steady = [r for r in requests if r.start < tr]
    if raw.suite == "deploy":
        window_end = t_all_new if t_all_new is not None else raw.duration_s
    else:
        window_end = tr + settings.broken_window_s
    during = [r for r in requests if r.start < window_end and r.end > tr]
    after_restart = [r for r in requests if r.end > tr]
    failures = [r for r in requests if r.failed]
    steady_stats = window_stats(steady)
    restart_stats = window_stats(during)
    max_after = max((r.latency_ms for r in after_restart if not r.failed), default=None)

    def rel(t: float | None) -> float | None:
        return None if t is None else t - tr

    s.update(
        {
            "t_restart_s": tr,
            "trigger_s": raw.t_trigger_done - tr,
            "trigger": raw.trigger,
            "initial_pids_sampled": sorted(initial),
            "initial_pids_status": sorted(status_initial),
            "all_new_after_s": rel(t_all_new),
            "all_new_sampled_after_s": rel(t_all_new_sampled),
            "all_new_status_after_s": rel(t_all_new_status),
            "first_new_gen_answer_after_s": rel(first_new),
            "all_new_answered_after_s": rel(t_all_new_answered),
            "new_gen_pids_answering": sorted(first_by_pid),
            "last_old_gen_answer_after_s": rel(last_old),
            "requests": len(requests),
            "failed": len(failures),
            "failure_kinds": failure_kinds(requests),
            "steady": steady_stats,
            "restart_window": restart_stats,
            "restart_window_end_after_s": rel(window_end),
            "max_after_restart_ms": max_after,
            "spike_over_steady_max_ms": (
                None
                if max_after is None or steady_stats["max_ms"] is None
                else max_after - steady_stats["max_ms"]
            ),
            "failures": [
                {
                    "conn": r.conn,
                    "seq": r.seq,
                    "start_rel_restart_s": round(r.start - tr, 4),
                    "end_rel_restart_s": round(r.end - tr, 4),
                    "status": r.status,
                    "error": r.error,
                    "detail": r.detail,
                    "pid": r.pid,
                    "gen": r.gen,
                    "reused_connection": r.reused,
                }
                for r in failures[:200]
            ],
            "slowest_after_restart": [
                {
                    "start_rel_restart_s": round(r.start - tr, 4),
                    "latency_ms": round(r.latency_ms, 2),
                    "pid": r.pid,
                    "gen": r.gen,
                    "conn": r.conn,
                    "reused_connection": r.reused,
                }
                for r in sorted(
                    (r for r in after_restart if not r.failed), key=lambda r: -r.latency_ms
                )[:10]
            ],
            "per_250ms": buckets(requests, raw.duration_s, tr),
            "server_exited": raw.server_exited,
            "final": raw.final,
        }
    )
    if raw.suite == "broken":
        in_window = [r for r in requests if tr <= r.start < tr + settings.broken_window_s]
        last_pids = set(raw.samples[-1][1]) if raw.samples else set()
        gens = sorted({r.gen for r in in_window if r.status == 200 and r.gen is not None})
        s["broken"] = {
            "window_s": settings.broken_window_s,
            "requests": len(in_window),
            "failed": sum(r.failed for r in in_window),
            "failure_kinds": failure_kinds(in_window),
            "first_failure_after_s": rel(
                min((r.start for r in in_window if r.failed), default=None)
            ),
            "ok_requests": sum(not r.failed for r in in_window),
            "generations_answering": gens,
            "old_processes_still_running": sorted(initial & last_pids),
            "old_pool_kept": bool(initial) and initial <= last_pids,
            "processes_at_end": sorted(last_pids),
        }
        if raw.polls:
            errors = [p for p in raw.polls if p["t"] >= tr and p.get("deployment_error")]
            final_app = raw.final.get("status", {})
            s["broken"]["deployment_error_seen_after_s"] = rel(errors[0]["t"]) if errors else None
            s["broken"]["deployment_error"] = final_app.get("deployment_error")
            s["broken"]["app_state_at_end"] = final_app.get("state")
            s["broken"]["status_pids_at_end"] = sorted(
                int(w["pid"]) for w in final_app.get("workers", []) if isinstance(w.get("pid"), int)
            )
            s["broken"]["old_pool_kept_status"] = bool(status_initial) and status_initial == set(
                s["broken"]["status_pids_at_end"]
            )
    if raw.polls:
        s["status_polls"] = len(raw.polls)
        last = next(
            (p["last_restart"] for p in reversed(raw.polls) if p["last_restart"] is not None), None
        )
        s["last_restart"] = last
        boots = flypool_boots(raw)
        s["new_worker_boot_s"] = boots
        s["median_boot_s"] = statistics.median(boots) if boots else None
        batch = 2 if raw.system == "flypool-b2" else 1
        s["flypool_log"] = flypool_steps(raw, status_initial, batch)
        if raw.suite == "deploy":
            s["targets"] = flypool_targets(s, raw.system, settings)
    return s


def flypool_targets(s: dict[str, Any], key: str, settings: Settings) -> dict[str, Any]:
    """Check the issue's targets for flypool (see the module docstring)."""
    batch = 2 if key == "flypool-b2" else 1
    steps = -(-settings.workers // batch)
    steady_max = s["steady"]["max_ms"]
    max_after = s["max_after_restart_ms"]
    all_new = s["all_new_after_s"]
    nominal = steps * settings.boot_delay_s + 0.4
    measured = None if s["median_boot_s"] is None else steps * s["median_boot_s"] + 0.4
    return {
        "zero_failed": s["failed"] == 0,
        "max_latency_limit_ms": None if steady_max is None else steady_max + 50.0,
        "max_latency_ok": (
            None if steady_max is None or max_after is None else max_after <= steady_max + 50.0
        ),
        "all_new_limit_nominal_s": nominal,
        "all_new_ok_nominal": None if all_new is None else all_new <= nominal,
        "all_new_limit_measured_boot_s": measured,
        "all_new_ok_measured_boot": (
            None if all_new is None or measured is None else all_new <= measured
        ),
    }


def buckets(requests: list[Request], duration: float, t_restart: float) -> list[dict[str, Any]]:
    """Requests per 250 ms of start time: count, failures, max latency, generations."""
    out = []
    for i in range(int(duration * 4) + 1):
        lo, hi = i / 4, (i + 1) / 4
        chosen = [r for r in requests if lo <= r.start < hi]
        if not chosen:
            continue
        out.append(
            {
                "t_rel_restart_s": round(lo - t_restart, 3),
                "requests": len(chosen),
                "failed": sum(r.failed for r in chosen),
                "max_ms": round(max(r.latency_ms for r in chosen), 2),
                "gens": sorted({r.gen for r in chosen if r.gen is not None}),
            }
        )
    return out


# --------------------------------------------------------------------------- report


def _f(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{value * scale:,.{digits}f}"


def _yn(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**NO**")


def deploy_table(summaries: list[dict[str, Any]]) -> str:
    """Suite 2: one row per run."""
    lines = [
        "| system | trigger | round | requests | failed (kinds) | steady p99 / max ms "
        "| restart-window p99 / max ms | max after restart ms | every process new s "
        "| 1st new-gen answer s | every new process answered s | last old-gen answer s |",
        "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        trigger = SYSTEM_CLASSES[s["system"]].trigger_text
        if s.get("error"):
            lines.append(
                f"| {s['system']} | {trigger} | {s['round']} | — | could not run: "
                f"{_one_line(s['error'])} | | | | | | | |"
            )
            continue
        st, rw = s["steady"], s["restart_window"]
        kinds = ", ".join(f"{k} {v}" for k, v in s["failure_kinds"].items())
        lines.append(
            f"| {s['system']} | {trigger} | {s['round']} | {s['requests']:,} "
            f"| {s['failed']}{f' ({kinds})' if kinds else ''} "
            f"| {_f(st['p99_ms'])} / {_f(st['max_ms'])} "
            f"| {_f(rw['p99_ms'])} / {_f(rw['max_ms'])} "
            f"| {_f(s['max_after_restart_ms'])} "
            f"| {_f(s['all_new_after_s'], digits=2)} "
            f"| {_f(s['first_new_gen_answer_after_s'], digits=2)} "
            f"| {_f(s['all_new_answered_after_s'], digits=2)} "
            f"| {_f(s['last_old_gen_answer_after_s'], digits=2)} |"
        )
    return "\n".join(lines)


def targets_table(summaries: list[dict[str, Any]]) -> str:
    """flypool's targets, one row per flypool run of suite 2."""
    lines = [
        "| system | round | 0 failed | max after restart ≤ steady max + 50 ms "
        "| every process new ≤ steps x boot + 0.4 s (nominal boot) "
        "| same with measured median boot_s |",
        "|---|---:|---|---|---|---|",
    ]
    for s in summaries:
        t = s.get("targets")
        if not t:
            continue
        lines.append(
            f"| {s['system']} | {s['round']} | {_yn(t['zero_failed'])} ({s['failed']}) "
            f"| {_yn(t['max_latency_ok'])} ({_f(s['max_after_restart_ms'])} ≤ "
            f"{_f(t['max_latency_limit_ms'])}) "
            f"| {_yn(t['all_new_ok_nominal'])} ({_f(s['all_new_after_s'], digits=2)} ≤ "
            f"{_f(t['all_new_limit_nominal_s'], digits=2)}) "
            f"| {_yn(t['all_new_ok_measured_boot'])} (≤ "
            f"{_f(t['all_new_limit_measured_boot_s'], digits=2)}; boot "
            f"{_f(s['median_boot_s'], digits=2)} s) |"
        )
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split()).replace("|", "/")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def broken_outcome(s: dict[str, Any]) -> str:
    """A short description of what the server did with the broken release."""
    b = s["broken"]
    parts = []
    if "deployment_error" in b:
        error = b.get("deployment_error") or {}
        parts.append(
            f"state {b.get('app_state_at_end')}; deployment_error.reason: "
            f"{_one_line(str(error.get('reason')), 120)!r}"
        )
    notable = [
        line
        for line in s.get("final", {}).get("log_tail", [])
        if NOTABLE_RE.search(line) and "Traceback" not in line
    ]
    if notable:
        parts.append("log: " + _one_line(notable[-1].split("]: ", 1)[-1], 110))
    if s.get("server_exited"):
        parts.append("server exited: " + _one_line(s["server_exited"].splitlines()[0], 80))
    elif not b["old_pool_kept"]:
        parts.append(f"processes at end: {len(b['processes_at_end'])}")
    return "; ".join(parts) or "—"


def broken_table(summaries: list[dict[str, Any]]) -> str:
    """Suite 3: one row per run."""
    window = next((s["broken"]["window_s"] for s in summaries if "broken" in s), 0)
    lines = [
        f"| system | trigger | round | requests in {window:g} s after | failed (kinds) "
        "| 1st failure s | gens answering | old pool kept | what happened |",
        "|---|---|---:|---:|---|---:|---|---|---|",
    ]
    for s in summaries:
        trigger = SYSTEM_CLASSES[s["system"]].trigger_text
        if s.get("error"):
            lines.append(
                f"| {s['system']} | {trigger} | {s['round']} | — | could not run: "
                f"{_one_line(s['error'])} | | | | |"
            )
            continue
        b = s["broken"]
        kinds = ", ".join(f"{k} {v}" for k, v in b["failure_kinds"].items())
        lines.append(
            f"| {s['system']} | {trigger} | {s['round']} | {b['requests']:,} "
            f"| {b['failed']}{f' ({kinds})' if kinds else ''} "
            f"| {_f(b['first_failure_after_s'], digits=2)} "
            f"| {', '.join(b['generations_answering']) or 'none'} "
            f"| {_yn(b['old_pool_kept'])} | {broken_outcome(s)} |"
        )
    return "\n".join(lines)


def report_details(s: dict[str, Any]) -> None:
    """Failures and the slowest requests of a run, on stderr."""
    tag = f"{s['suite']} {s['system']} round {s['round']}"
    if s.get("error"):
        return
    for failure in s["failures"][:20]:
        log(
            f"{tag}: FAILED conn {failure['conn']} seq {failure['seq']} "
            f"start {failure['start_rel_restart_s']:+.3f}s "
            f"end {failure['end_rel_restart_s']:+.3f}s "
            f"status={failure['status']} error={failure['error']} "
            f"reused_connection={failure['reused_connection']} "
            f"detail={_one_line(failure['detail'] or '', 80)!r}"
        )
    if len(s["failures"]) > 20:
        log(f"{tag}: ... {s['failed'] - 20} more failures")
    for step in s.get("flypool_log", {}).get("steps", []):
        log(
            f"{tag}: step spawned {step['spawned_at']:+.3f}s new {step['new_pids']} "
            f"boot {step['boot_s']} ready {_f(step.get('ready_at'), digits=3)}s "
            f"drain {_f(step.get('drain_s'), 1e3, 0)} ms stop {_f(step.get('stop_s'), 1e3, 0)} ms "
            f"gap {_f(step.get('gap_to_next_spawn_s'), 1e3, 0)} ms (old {step['old_pids']})"
        )
    for slow in s["slowest_after_restart"][:3]:
        log(
            f"{tag}: slow {slow['latency_ms']:.1f} ms started {slow['start_rel_restart_s']:+.3f}s "
            f"from the restart, pid {slow['pid']} gen {slow['gen']}"
        )


# --------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    """Versions of everything compared."""
    try:
        from flypool import __version__ as flypool_version
    except ImportError:
        flypool_version = "not importable"
    return {
        "flypool": flypool_version,
        "python": sys.version.split()[0],
        "gunicorn": first_line(command_output([PYTHON, "-m", "gunicorn", "--version"])),
        "uvicorn": first_line(command_output([PYTHON, "-m", "uvicorn", "--version"])),
        "passenger": (
            first_line(command_output(["passenger", "--version"]))
            if shutil.which("passenger")
            else "not installed"
        ),
    }


def install_deps() -> str:
    """Run ``benchmarks/install-deps`` (bounded); return what it printed."""
    argv = [str(INSTALL_DEPS), str(Path(PYTHON).parent.parent)]  # the venv running us
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as err:
        raise BenchmarkError("benchmarks/install-deps did not finish within 300 s") from err
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise BenchmarkError(f"benchmarks/install-deps failed ({done.returncode}):\n{output}")
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Compare deploys (rolling restarts) of flypool, Passenger, gunicorn, uvicorn."
    )
    parser.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated systems (default: all of {', '.join(ALL_SYSTEMS)})",
    )
    parser.add_argument(
        "--suites", default="deploy,broken", help="deploy, broken or both (default both)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (default 1)")
    parser.add_argument("--duration", type=float, default=20.0, help="s of load (default 20)")
    parser.add_argument(
        "--restart-at", type=float, default=5.0, help="second of the run to deploy at (default 5)"
    )
    parser.add_argument(
        "--broken-window",
        type=float,
        default=10.0,
        help="s after a broken deploy that are counted; that run lasts restart-at + this "
        "(default 10)",
    )
    parser.add_argument("--workers", type=int, default=4, help="processes (default 4)")
    parser.add_argument(
        "--connections", type=int, default=8, help="keep-alive client threads (default 8)"
    )
    parser.add_argument(
        "--boot-delay", type=float, default=1.0, help="s the app takes to import (default 1)"
    )
    parser.add_argument(
        "--request-delay", type=float, default=0.005, help="s per request (default 0.005)"
    )
    parser.add_argument(
        "--sample-interval", type=float, default=0.02, help="process sampling period (0.02)"
    )
    parser.add_argument(
        "--status-interval", type=float, default=0.05, help="flypool GET /status period (0.05)"
    )
    parser.add_argument(
        "--skip-install", action="store_true", help="do not run benchmarks/install-deps"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"raw figures (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEM_CLASSES]
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {unknown}; known: {', '.join(ALL_SYSTEMS)}")
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    if not args.suites or any(s not in ("deploy", "broken") for s in args.suites):
        parser.error("--suites: expected deploy, broken or deploy,broken")
    if args.rounds < 1 or args.workers < 1 or args.connections < 1:
        parser.error("--rounds, --workers and --connections must be >= 1")
    if not 0 < args.restart_at < args.duration:
        parser.error("--restart-at must be within (0, --duration)")
    if args.broken_window <= 0 or args.sample_interval <= 0 or args.status_interval <= 0:
        parser.error("--broken-window and the intervals must be > 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when a flypool run failed a request)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` stops our processes
    command_line = [sys.executable, *sys.argv] if argv is None else [sys.executable, *argv]
    started = time.monotonic()
    install_output = "" if args.skip_install else install_deps()
    settings = Settings(
        workers=args.workers,
        connections=args.connections,
        duration_s=args.duration,
        broken_duration_s=args.restart_at + args.broken_window,
        restart_at_s=args.restart_at,
        broken_window_s=args.broken_window,
        boot_delay_s=args.boot_delay,
        request_delay_s=args.request_delay,
        sample_interval_s=args.sample_interval,
        status_interval_s=args.status_interval,
    )
    info = machine_info()
    found = versions()
    log(
        f"deploy_compare: {args.systems} x {args.suites} x {args.rounds} round(s); "
        f"{info['nproc']} CPUs ({info['cpu_model']}), load {info['loadavg_at_start']}; {found}"
    )
    summaries: list[dict[str, Any]] = []
    for suite in args.suites:
        for number in range(1, args.rounds + 1):
            for key in args.systems:
                log(f"{suite} round {number}/{args.rounds}: {key} ...")
                raw = run_once(settings, key, suite, number)
                summary = analyse(raw, settings)
                summaries.append(summary)
                if not summary.get("error"):
                    log(
                        f"  {summary['requests']} requests, {summary['failed']} failed, "
                        f"every process new after {_f(summary['all_new_after_s'], digits=2)} s, "
                        f"max after restart {_f(summary['max_after_restart_ms'])} ms "
                        f"(steady max {_f(summary['steady']['max_ms'])} ms)"
                    )
                report_details(summary)

    deploys = [s for s in summaries if s["suite"] == "deploy"]
    brokens = [s for s in summaries if s["suite"] == "broken"]
    text: list[str] = []
    if deploys:
        text += [
            "### Suite 2: deploy under load",
            "",
            deploy_table(deploys),
            "",
            "flypool targets:",
            "",
            targets_table(deploys),
            "",
        ]
    if brokens:
        text += ["### Suite 3: broken deploy under load", "", broken_table(brokens), ""]
    text.append(
        f"{args.workers} processes, {args.connections} keep-alive client threads (GET /, "
        f"app: {args.boot_delay:g} s import, {args.request_delay * 1e3:g} ms per request), "
        f"deploy at t={args.restart_at:g} s of {args.duration:g} s "
        f"({args.restart_at + args.broken_window:g} s for the broken release). Steady = "
        "requests started before the deploy; restart window = requests overlapping "
        "[deploy, every process new]. Times in s after the deploy was triggered. "
        f"{info['nproc']} CPUs, {info['cpu_model']}; {found}."
    )
    table = "\n".join(text)
    print(table)

    report = {
        "benchmark": "deploy_compare",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": time.monotonic() - started,
        "command": shlex.join(command_line),
        "argv": command_line,
        "settings": {**vars(args), "out": str(args.out)},
        "versions": found,
        "machine": info,
        "install_deps_output": install_output.splitlines()[-20:],
        "markdown": table,
        "runs": summaries,
    }
    write_json(args.out, report)
    log(f"raw figures: {args.out} ({time.monotonic() - started:.0f} s in all)")
    bad = [
        s
        for s in summaries
        if s["system"].startswith("flypool")
        and s["system"] != "flypool-b1-noprobe"
        and (s.get("error") or s.get("failed"))
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--sampler":
        raise SystemExit(
            sampler_main(
                int(sys.argv[2]),
                sys.argv[3] == "1",
                sys.argv[4],
                float(sys.argv[5]),
                float(sys.argv[6]),
                Path(sys.argv[7]),
            )
        )
    try:
        raise SystemExit(main())
    except BenchmarkError as err:
        print(f"deploy_compare: {err}", file=sys.stderr)
        raise SystemExit(1) from None
