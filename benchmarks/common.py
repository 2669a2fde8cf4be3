"""Reusable pieces for flypool's benchmarks.

Everything here is synchronous and standard library only (plus the ``wrk``
binary for load): start and stop processes by the PIDs we started, wait for
them with deadlines, talk to the admin socket, run ``wrk`` and parse its
output, read a process's CPU time from ``/proc``, and describe the machine.

Rules the helpers keep so that a benchmark never leaves anything behind:

- every process is started by us, with ``start_new_session=True`` (a Ctrl-C
  at the terminal reaches only the benchmark, whose ``finally`` stops them),
  and stopped by its PID: ``terminate``, a bounded ``wait``, then ``kill``;
- every wait is a poll with a deadline, never a bare sleep;
- temporary directories live directly under ``/tmp`` with short names, since
  a Unix socket path is limited to about 107 bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this file belongs to."""
OUT_DIR = REPO_ROOT / "benchmarks" / "out"
"""Where benchmarks write their raw figures (gitignored)."""
PYTHON = sys.executable
"""The interpreter running the benchmark; flypool and gunicorn are started with it."""
WRK = shutil.which("wrk") or "/usr/bin/wrk"
"""The ``wrk`` binary."""

POLL_INTERVAL = 0.05
"""Seconds between two polls of a condition."""

T = TypeVar("T")


class BenchmarkError(RuntimeError):
    """A benchmark step failed: a process did not start, a tool printed nonsense."""


# --------------------------------------------------------------------------- polling


def poll_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Call ``check`` until it returns something other than ``None``; return that.

    ``alive`` is called before each attempt and returns an error message when
    waiting is pointless (the process we wait for has exited). Raises
    `BenchmarkError` naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            problem = alive()
            if problem is not None:
                raise BenchmarkError(f"while waiting for {what}: {problem}")
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise BenchmarkError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


# --------------------------------------------------------------------------- processes


def short_tmpdir(prefix: str = "fpb") -> Path:
    """Create a fresh directory directly under ``/tmp`` (short, for Unix socket paths)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or a note when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(cannot read {path}: {err})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Managed:
    """A process we started, its output going to ``log_path``.

    Use it as a context manager, or call `stop` in a ``finally``.
    """

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The PID of the process we started."""
        return self.proc.pid

    def exited(self) -> str | None:
        """``None`` while the process runs; a message with its log tail once it has exited."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"{self.name} (pid {self.pid}) exited with status {code}:\n{log_tail(self.log_path)}"

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the process: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

        Returns the exit status (``None`` only if even SIGKILL did not reap it
        within 5 s, which means something is badly wrong).
        """
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"warning: {self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g}s; "
                    "killing it",
                    file=sys.stderr,
                )
                self.proc.kill()
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    return None
        return self.proc.returncode

    def __enter__(self) -> Managed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_process(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Managed:
    """Start ``argv`` in its own session, stdout and stderr appended to ``log_path``."""
    argv = [str(a) for a in argv]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    return Managed(name=name, argv=argv, proc=proc, log_path=log_path)


def http_get(
    host: str, port: int, path: str = "/", timeout: float = 2.0
) -> tuple[int, bytes] | None:
    """``GET path`` over TCP; ``(status, body)``, or ``None`` when it cannot connect."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_http_ok(
    host: str,
    port: int,
    path: str = "/",
    timeout: float = 30.0,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Wait until ``GET path`` on ``host:port`` answers 2xx (a listening port is not enough:
    gunicorn's master accepts before its worker has booted)."""

    def check() -> bool | None:
        answer = http_get(host, port, path, timeout=min(2.0, timeout))
        return True if answer is not None and 200 <= answer[0] < 300 else None

    poll_until(check, timeout, f"GET http://{host}:{port}{path} to answer 2xx", alive)


@dataclass
class Backend:
    """An app server reached directly on ``host:port``, with its scratch directory."""

    proc: Managed
    host: str
    port: int
    tmpdir: Path

    @property
    def url(self) -> str:
        """The URL to load."""
        return f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and remove its scratch directory."""
        try:
            self.proc.stop(timeout)
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_backend(
    name: str,
    argv_template: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_path: str = "/",
    timeout: float = 30.0,
) -> Backend:
    """Start an app server directly on TCP and wait until it answers.

    ``argv_template`` items may contain ``{host}``, ``{port}`` and ``{tmpdir}``
    (e.g. ``[PYTHON, "-m", "flypool.example", "--port", "{port}"]``). ``port``
    defaults to a free one. The server runs with a fresh ``/tmp`` directory as
    its working directory, which also holds its log.
    """
    tmpdir = short_tmpdir()
    port = free_port(host) if port is None else port
    argv = [a.format(host=host, port=port, tmpdir=tmpdir) for a in argv_template]
    proc = start_process(name, argv, tmpdir / "backend.log", cwd=tmpdir)
    backend = Backend(proc=proc, host=host, port=port, tmpdir=tmpdir)
    try:
        wait_http_ok(host, port, ready_path, timeout, alive=proc.exited)
    except BaseException:
        backend.stop()
        raise
    return backend


# --------------------------------------------------------------------------- admin socket


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client.HTTPConnection` over a Unix stream socket (flypool's admin socket)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Connect to the Unix socket instead of a TCP address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def unix_http_get(
    socket_path: str | Path, path: str = "/", timeout: float = 2.0
) -> tuple[int, bytes] | None:
    """``GET path`` over a Unix socket; ``(status, body)``, or ``None`` when it cannot connect."""
    conn = UnixHTTPConnection(str(socket_path), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_unix_http_ok(
    socket_path: str | Path,
    path: str = "/",
    timeout: float = 30.0,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Wait until ``GET path`` over the Unix socket ``socket_path`` answers 2xx."""

    def check() -> bool | None:
        answer = unix_http_get(socket_path, path, timeout=min(2.0, timeout))
        return True if answer is not None and 200 <= answer[0] < 300 else None

    poll_until(check, timeout, f"GET {path} on unix:{socket_path} to answer 2xx", alive)


def admin_request(
    admin_socket: str | Path, method: str, path: str, timeout: float = 5.0
) -> tuple[int, Any]:
    """One request to the admin socket; ``(status, decoded JSON body or raw text)``.

    Raises `OSError` or `http.client.HTTPException` when the daemon is not reachable.
    """
    conn = UnixHTTPConnection(str(admin_socket), timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.decode(errors="replace")


def admin_status(admin_socket: str | Path, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /status`` on the admin socket, decoded (see SPEC §8)."""
    status, body = admin_request(admin_socket, "GET", "/status", timeout)
    if status != 200 or not isinstance(body, dict):
        raise BenchmarkError(f"GET /status answered {status}: {body!r}")
    return body


def ready_workers(status: dict[str, Any], app: str | None = None) -> list[dict[str, Any]]:
    """The workers in state ``ready`` in a `admin_status` answer (of one app, or all)."""
    return [
        worker
        for entry in status.get("apps", [])
        if app is None or entry.get("name") == app
        for worker in entry.get("workers", [])
        if worker.get("state") == "ready"
    ]


# --------------------------------------------------------------------------- flypool daemon


def proc_start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``),
    or ``None`` when it no longer exists. Tells a PID apart from a later re-use of it."""
    fields = _proc_stat_fields(pid)
    return None if fields is None else int(fields[22 - 3])


@dataclass
class FlypoolDaemon:
    """A ``flypool run`` daemon we started, and what we know of its workers.

    ``tmpdir`` holds the admin socket, the runtime directory (worker sockets)
    and the daemon's log.
    """

    proc: Managed
    host: str
    port: int
    tmpdir: Path
    admin_socket: Path
    worker_pids: dict[int, int] = field(default_factory=dict)
    """Worker PID → start ticks, as last seen in the status; checked on `stop`."""
    unix_socket: Path | None = None
    """The front listener's Unix socket, when it listens on one (``host``/``port`` unused)."""

    @property
    def pid(self) -> int:
        """The daemon's PID (the process we started: ``python -m flypool run``)."""
        return self.proc.pid

    @property
    def url(self) -> str:
        """The front listener's URL (``unix:PATH`` for a Unix socket listener)."""
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        return f"http://{self.host}:{self.port}/"

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's JSON status; remembers the worker PIDs it lists."""
        status = admin_status(self.admin_socket, timeout)
        for entry in status.get("apps", []):
            for worker in entry.get("workers", []):
                pid = worker.get("pid")
                if isinstance(pid, int) and pid not in self.worker_pids:
                    ticks = proc_start_ticks(pid)
                    if ticks is not None:
                        self.worker_pids[pid] = ticks
        return status

    def wait_ready(self, workers: int, timeout: float = 60.0, app: str | None = None) -> None:
        """Wait until the status shows at least ``workers`` ready workers (of ``app``, or all)."""

        def check() -> dict[str, Any] | None:
            try:
                status = self.status(timeout=2.0)
            except (OSError, http.client.HTTPException, BenchmarkError):
                return None
            return status if len(ready_workers(status, app)) >= workers else None

        status = poll_until(
            check, timeout, f"{workers} ready worker(s) in flypool's status", self.proc.exited
        )
        if status.get("pid") != self.pid:
            raise BenchmarkError(
                f"the admin socket belongs to pid {status.get('pid')}, not to the daemon "
                f"we started (pid {self.pid})"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemon (graceful SIGTERM, then SIGKILL), make sure its workers are gone,
        and remove the scratch directory.

        A daemon that dies without a hand-over stops its workers within 10 s
        (SPEC §2); workers still there after that, and still the same
        processes, are killed by PID with a warning.
        """
        try:
            self.proc.stop(timeout)
            leftover = self._wait_workers_gone(12.0)
            for pid in leftover:
                print(
                    f"warning: flypool worker pid {pid} outlived the daemon; killing it",
                    file=sys.stderr,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _wait_workers_gone(self, timeout: float) -> list[int]:
        def remaining() -> list[int]:
            return [
                pid for pid, ticks in self.worker_pids.items() if proc_start_ticks(pid) == ticks
            ]

        def check() -> bool | None:
            return True if not remaining() else None

        try:
            poll_until(check, timeout, "the workers to exit")
        except BenchmarkError:
            return remaining()
        return []


def start_flypool(
    worker_command: Sequence[str],
    *,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra_args: Sequence[str] = (),
    root: Path | None = None,
    ready_timeout: float = 60.0,
    listen: str | None = None,
    interpreter_args: Sequence[str] = (),
) -> FlypoolDaemon:
    """Start ``python -m flypool run`` for one app on ``host:port`` and wait for its workers.

    ``worker_command`` is the app's command (with ``{socket}`` or ``{port}``
    for flypool to fill). The daemon gets a fresh short ``/tmp`` directory for
    its admin socket, runtime directory and log, JSON logs, and ``--root``
    (default: that directory). ``extra_args`` go before the ``--``, e.g.
    ``["--worker-concurrency", "0"]``. ``listen`` replaces ``host:port`` as
    the front address; it may contain ``{tmpdir}`` (e.g.
    ``"unix:{tmpdir}/app.sock"``). Returns once ``workers`` workers are
    ready according to ``GET /status`` on the admin socket and ``GET /``
    on the front listener answers 2xx. ``interpreter_args`` go between the
    interpreter and ``-m flypool`` (e.g. ``["-m", "cProfile", "-o", PATH]``,
    which runs the daemon itself under cProfile: the PID stays the daemon's).
    """
    tmpdir = short_tmpdir()
    unix_socket: Path | None = None
    if listen is None:
        port = free_port(host) if port is None else port
        listen = f"{host}:{port}"
    else:
        listen = listen.format(tmpdir=tmpdir)
        host, port = "", 0
        if listen.startswith("unix:"):
            unix_socket = Path(listen.removeprefix("unix:"))
    admin_socket = tmpdir / "admin.sock"
    argv = [
        PYTHON,
        *interpreter_args,
        "-m",
        "flypool",
        "run",
        "--listen",
        listen,
        "--workers",
        str(workers),
        "--admin-socket",
        str(admin_socket),
        "--runtime-dir",
        str(tmpdir),
        "--root",
        str(root if root is not None else tmpdir),
        "--log-format",
        "json",
        # As root, flypool runs workers as root only when told so explicitly.
        *(["--user", "root"] if os.geteuid() == 0 else []),
        *extra_args,
        "--",
        *worker_command,
    ]
    proc = start_process("flypool", argv, tmpdir / "flypool.log", cwd=tmpdir)
    daemon = FlypoolDaemon(
        proc=proc,
        host=host,
        port=port,
        tmpdir=tmpdir,
        admin_socket=admin_socket,
        unix_socket=unix_socket,
    )
    try:
        daemon.wait_ready(workers, ready_timeout)
        if unix_socket is not None:
            wait_unix_http_ok(unix_socket, "/", timeout=ready_timeout, alive=proc.exited)
        elif port:
            wait_http_ok(host, port, "/", timeout=ready_timeout, alive=proc.exited)
    except BenchmarkError as err:
        tail = log_tail(proc.log_path)  # before `stop` removes the directory
        daemon.stop()
        if tail and tail in str(err):  # the exit message already shows it
            raise
        raise BenchmarkError(f"{err}\nflypool's log ends with:\n{tail}") from None
    except BaseException:
        daemon.stop()
        raise
    return daemon


def read_json_log(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``--log-format json`` log, one a line; other lines are skipped.

    Read it before `FlypoolDaemon.stop`, which removes the directory holding it.
    """
    events: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise BenchmarkError(f"cannot read the log {path}: {err}") from err
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


# --------------------------------------------------------------------------- /proc


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on, or ``None`` if it is gone.

    Field 2 (``comm``) is in parentheses and may itself contain spaces and
    parentheses, so the split happens after the last ``)``.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of the times in ``/proc/PID/stat``."""


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, in seconds (fields 14 and 15
    of ``/proc/PID/stat``; children not included). Resolution is one clock tick."""
    fields = _proc_stat_fields(pid)
    if fields is None:
        raise BenchmarkError(f"pid {pid} is gone: cannot read its CPU time")
    utime, stime = int(fields[14 - 3]), int(fields[15 - 3])
    return (utime + stime) / CLOCK_TICKS


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    """What one ``wrk --latency`` run reported (times in milliseconds)."""

    url: str
    threads: int
    connections: int
    duration_s: float
    """The duration asked for."""
    requests: int
    """From ``N requests in T``."""
    elapsed_s: float
    """The ``T`` of that line: the time wrk actually measured."""
    requests_per_s: float
    latency_ms: dict[str, float]
    """Percentile (``"50"``, ``"75"``, ``"90"``, ``"99"``) → latency."""
    socket_errors: dict[str, int]
    """``connect``, ``read``, ``write``, ``timeout`` (all 0 when wrk prints no such line)."""
    non_2xx_3xx: int
    output: str

    @property
    def p50_ms(self) -> float:
        """Median latency."""
        return self.latency_ms["50"]

    @property
    def p99_ms(self) -> float:
        """99th percentile latency."""
        return self.latency_ms["99"]

    @property
    def errors(self) -> int:
        """Socket errors plus non-2xx/3xx answers."""
        return sum(self.socket_errors.values()) + self.non_2xx_3xx

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-ready data (wrk's raw output included)."""
        return asdict(self)


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"


def time_to_ms(value: str, unit: str) -> float:
    """Convert one of wrk's times (``"812.00"``, ``"us"``) to milliseconds."""
    try:
        return float(value) * _TIME_UNITS_MS[unit]
    except (KeyError, ValueError):
        raise BenchmarkError(f"cannot read wrk time {value}{unit!r}") from None


def parse_wrk(
    output: str, *, url: str = "", threads: int = 0, connections: int = 0, duration_s: float = 0
) -> WrkResult:
    """Parse the text ``wrk --latency`` prints. Raises `BenchmarkError` when a figure is missing."""
    latency: dict[str, float] = {}
    for match in re.finditer(rf"^\s+(50|75|90|99)(?:\.0+)?%\s+{_TIME}\s*$", output, re.MULTILINE):
        latency[match[1]] = time_to_ms(match[2], match[3])
    done = re.search(rf"^\s*(\d+) requests in {_TIME}", output, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.MULTILINE)
    if done is None or rate is None or "50" not in latency or "99" not in latency:
        raise BenchmarkError(f"cannot parse wrk's output:\n{output}")
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors is not None:
        socket_errors = dict(zip(socket_errors, map(int, errors.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return WrkResult(
        url=url,
        threads=threads,
        connections=connections,
        duration_s=duration_s,
        requests=int(done[1]),
        elapsed_s=time_to_ms(done[2], done[3]) / 1e3,
        requests_per_s=float(rate[1]),
        latency_ms=latency,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non_2xx[1]) if non_2xx is not None else 0,
        output=output,
    )


def run_wrk(
    url: str,
    *,
    duration_s: int,
    threads: int = 1,
    connections: int = 32,
    extra_args: Sequence[str] = (),
) -> WrkResult:
    """Run ``wrk -tT -cC -dDs --latency [extra_args] URL`` and parse what it prints.

    ``duration_s`` is whole seconds (wrk reads no fractions). ``extra_args``
    go before the URL (e.g. ``["--timeout", "5s"]``; wrk's default request
    timeout is 2 s). The run is bounded by ``duration_s`` plus a margin.
    """
    argv = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        *extra_args,
        url,
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise BenchmarkError(f"wrk did not finish: {' '.join(argv)}") from err
    if done.returncode != 0:
        raise BenchmarkError(
            f"wrk exited with status {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
    return parse_wrk(
        done.stdout, url=url, threads=threads, connections=connections, duration_s=duration_s
    )


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for key in ("model name", "Hardware", "cpu model", "Processor"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match[1].strip()
    return platform.processor() or "unknown"


def _command_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info() -> dict[str, Any]:
    """Describe where the figures come from: CPUs, load, Python, flypool and wrk versions."""
    try:
        from flypool import __version__ as flypool_version
    except ImportError:
        flypool_version = "not importable"
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
        "python_executable": PYTHON,
        "flypool": flypool_version,
        "gunicorn": _command_version([PYTHON, "-m", "gunicorn", "--version"]),
        "wrk": _command_version([WRK, "--version"]),
        "clock_ticks_per_s": CLOCK_TICKS,
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def command_version(argv: Sequence[str]) -> str:
    """The first line a ``--version``-style command prints (stdout or stderr), or
    ``"unknown (...)"`` when it cannot run. ``nginx -v`` and ``haproxy -v`` work too."""
    return _command_version(argv)


# --------------------------------------------------------------------------- more servers


@dataclass
class UnixBackend:
    """An app server reached directly on the Unix socket ``socket_path``, with its
    scratch directory (which holds the socket and the log)."""

    proc: Managed
    socket_path: Path
    tmpdir: Path

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and remove its scratch directory."""
        try:
            self.proc.stop(timeout)
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_unix_backend(
    name: str,
    argv_template: Sequence[str],
    *,
    ready_path: str = "/",
    timeout: float = 30.0,
) -> UnixBackend:
    """Start an app server on a Unix socket and wait until it answers.

    ``argv_template`` items may contain ``{socket}`` (a path in a fresh short
    ``/tmp`` directory) and ``{tmpdir}`` (e.g. ``[PYTHON, "-m",
    "flypool.example", "--socket", "{socket}"]``). The server runs in that
    directory, which also holds its log.
    """
    tmpdir = short_tmpdir()
    socket_path = tmpdir / "app.sock"
    argv = [a.format(socket=socket_path, tmpdir=tmpdir) for a in argv_template]
    proc = start_process(name, argv, tmpdir / "backend.log", cwd=tmpdir)
    backend = UnixBackend(proc=proc, socket_path=socket_path, tmpdir=tmpdir)
    try:
        wait_unix_http_ok(socket_path, ready_path, timeout, alive=proc.exited)
    except BaseException:
        backend.stop()
        raise
    return backend


def proc_children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (a scan of ``/proc/*/stat``: the kernel's
    ``/proc/PID/task/TID/children`` is not always built in)."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat_fields(int(entry.name))
        if fields is not None and int(fields[4 - 3]) == pid:
            children.append(int(entry.name))
    return sorted(children)
