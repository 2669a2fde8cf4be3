"""The benchmark harness: what every suite in ``benchmarks/`` is built from.

Processes started and stopped by PID (`Proc`, `poll`); the anchors (`start_flypool`,
`start_server`, `gunicorn`, `uvicorn`, `nginx`, `haproxy`, `passenger`); the load
(`Load`, a keep-alive HTTP/1.1 client recording every request as a `Rec`; `wrk`);
samplers (`Sampler`, `Poller`, `cpu_times`, `snapshot`); figures (`stats`, `kinds`,
`table`); results (`Suite`, and `report`, which writes ``RESULTS.md``). See
``benchmarks/README.md``. ``python benchmarks/harness.py report`` writes the report;
``harness.py sample ...`` is the `Sampler` process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import operator
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
APPS = HERE / "apps"
PY = sys.executable
"""The interpreter running the suite (the venv's): flypool and the Python servers use it."""
APP = "app"
"""The app name of every daemon `start_flypool` starts."""
T = TypeVar("T")


class BenchError(RuntimeError):
    """A step failed: a process did not start, a tool printed nonsense, a wait timed out."""


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the suite's Markdown)."""
    print(message, file=sys.stderr, flush=True)


def poll(check: Callable[[], T | None], timeout: float, what: str,
         alive: Callable[[], str | None] | None = None, interval: float = 0.02) -> T:  # fmt: skip
    """Call ``check`` until it returns something other than ``None`` and return it;
    ``alive`` returns a message when waiting is pointless (the process exited)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and (problem := alive()) is not None:
            raise BenchError(f"while waiting for {what}: {problem}")
        if (result := check()) is not None:
            return result
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def tmpdir(prefix: str = "fpb") -> Path:
    """A fresh directory right under /tmp (Unix socket paths must stay short)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrub(text: str) -> str:
    """``text`` without this machine's paths: repo-relative, scratch dirs as ``/tmp/…``."""
    return re.sub(r"/tmp/fp\w+", "/tmp/…", text.replace(f"{REPO}/", ""))


def pct(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation); ``None`` when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def minus(a: float | None, b: float) -> float | None:
    """``a - b``, or ``None`` when ``a`` is."""
    return None if a is None else a - b


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not ``None``."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# --------------------------------------------------------------------------- processes


def start_ticks(pid: int) -> int | None:
    """A process's start time (tells a PID from a later reuse of it); ``None`` if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


class Proc:
    """A process we started in its own session, its output appended to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[Any], log_path: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name, self.argv, self.log_path = name, [str(a) for a in argv], log_path
        with open(log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches only the suite, which stops us
            )

    @property
    def pid(self) -> int:
        """The PID we started."""
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        """The end of the log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"

    def exited(self) -> str | None:
        """``None`` while it runs; once it exited, a message with its log's tail."""
        code = self.popen.poll()
        return None if code is None else f"{self.name} exited ({code}):\n{self.tail()}"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit status."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"warning: {self.name} (pid {self.pid}) ignored SIGTERM; killing it")
                self.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
        return self.popen.returncode


def kill_leftovers(pids: dict[int, int | None], timeout: float, what: str) -> list[int]:
    """Wait for the processes ``pids`` (PID → start ticks) to exit; SIGKILL, by PID, those
    still there and still the same process. Returns the PIDs killed."""

    def remaining() -> list[int]:
        return [p for p, ticks in pids.items() if ticks is not None and start_ticks(p) == ticks]

    with contextlib.suppress(BenchError):
        poll(lambda: True if not remaining() else None, timeout, f"{what} to exit", interval=0.1)
    left = remaining()
    for pid in left:
        log(f"warning: {what} pid {pid} outlived its server; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def cpu_times(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by ``pids`` (children not included)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            user, system = user + times.user, system + times.system
    return user, system


def children(pid: int) -> list[int]:
    """The PIDs of a process's direct children."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def snapshot(pid: int) -> dict[str, Any]:
    """RSS, fds (total and by kind), threads and live children of a process, now."""
    proc = psutil.Process(pid)
    with proc.oneshot():
        rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
    live = 0
    for child in proc.children():
        with contextlib.suppress(psutil.Error):
            live += child.status() != psutil.STATUS_ZOMBIE
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[target.split(":")[0] if ":[" in target else "file"] += 1
    return {"rss": rss, "fds": fds, "fd_kinds": dict(kinds), "threads": threads, "children": live}


# --------------------------------------------------------------------------- blocking HTTP


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(
    addr: str, method: str = "GET", path: str = "/", body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One request to ``HOST:PORT`` or ``unix:PATH``; ``(status, body)``. Raises `OSError` or
    `http.client.HTTPException` when it cannot."""
    if addr.startswith("unix:"):
        conn: http.client.HTTPConnection = _UnixConnection(addr[5:], timeout)
    else:
        host, port = addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def wait_http(
    addr: str, path: str = "/", timeout: float = 60.0, alive: Callable[[], str | None] | None = None
) -> None:
    """Wait until ``GET path`` answers 2xx (gunicorn accepts before its worker booted)."""

    def check() -> bool | None:
        try:
            return True if 200 <= request(addr, "GET", path, timeout=2.0)[0] < 300 else None
        except (OSError, http.client.HTTPException):
            return None

    poll(check, timeout, f"GET {path} on {addr} to answer 2xx", alive, interval=0.05)


# --------------------------------------------------------------------------- anchors


@dataclass
class Server:
    """A server under test: its main process, where clients connect, which processes are
    its workers (for `Sampler`), and everything to reap when it stops."""

    name: str
    proc: Proc
    addr: str
    """``HOST:PORT`` or ``unix:PATH``."""
    tmp: Path
    match: str = ""
    """Workers are the root's non-zombie children whose command line contains this."""
    recursive: bool = False
    root: int = 0
    """Whose children are the workers (default: the main process)."""
    owned: dict[int, int | None] = field(default_factory=dict)
    """More PIDs (→ start ticks) to reap on `stop`; `Sampler` adds the workers it saw."""
    env: dict[str, str] | None = None

    @property
    def root_pid(self) -> int:
        """The process whose children are the workers."""
        return self.root or self.proc.pid

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` (wrk needs TCP)."""
        return f"http://{self.addr}/"

    def stop(self, timeout: float = 35.0) -> None:
        """Stop the main process, reap what outlived it, remove the scratch directory."""
        try:
            self.proc.stop(timeout)
            kill_leftovers(self.owned, 10.0, f"{self.name} process")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(name: str, argv: Sequence[Any], addr: str, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, ready: str = "/", timeout: float = 60.0,
                 tmp: Path | None = None, match: str = "") -> Server:  # fmt: skip
    """Start a server (argv may use ``{tmp}``) and wait until ``GET ready`` answers 2xx;
    ``match`` tells its workers from its other children (see `Sampler`)."""
    tmp = tmp or tmpdir()
    argv = [str(a).format(tmp=tmp) for a in argv]
    proc = Proc(name, argv, tmp / f"{name}.log", cwd=cwd or tmp, env=env)
    server = Server(name, proc, addr, tmp, match=match, env=env)
    try:
        wait_http(addr, ready, timeout, alive=proc.exited)
    except BaseException as err:
        tail = proc.tail()
        server.stop()
        if not isinstance(err, BenchError):  # Ctrl-C, SIGTERM: stopped, and passed on
            raise
        raise BenchError(f"{name} did not come up: {err}; its log ends with:\n{tail}") from None
    return server


def gunicorn(bind: str, app: str, workers: int = 1, *extra: str) -> list[str]:
    """A gunicorn command line (sync workers)."""
    return [PY, *f"-m gunicorn --bind {bind} --workers {workers} --no-control-socket".split(),
            *extra, app]  # fmt: skip


def uvicorn(addr: str, app: str, workers: int = 1, *extra: str) -> list[str]:
    """A uvicorn command line on ``HOST:PORT``."""
    host, port = addr.rsplit(":", 1)
    flags = f"--host {host} --port {port} --workers {workers} --no-access-log"
    return [PY, "-m", "uvicorn", *flags.split(), *extra, app]


def _checked(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} rejects its config: {(done.stdout + done.stderr).strip()}")


def nginx(upstream: str) -> Server:
    """nginx (1 worker, upstream keepalive 64) from a free port to ``HOST:PORT`` or
    ``unix:PATH``; CPU is the master's plus its worker's (`Server.root_pid` + children)."""
    tmp, port = tmpdir("fpn"), free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {k}_temp_path {tmp}/{k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
        "events { worker_connections 4096; }\nhttp {\n    access_log off;\n"
        + temp
        + "    keepalive_requests 1000000;\n"
        f"    upstream backend {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n"
        f"    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://backend;\n"
        '        proxy_http_version 1.1; proxy_set_header Connection ""; } }\n}\n'
    )
    base = ["nginx", "-p", f"{tmp}/", "-e", f"{tmp}/error.log", "-c", str(conf)]
    _checked([*base, "-t", "-q"], "nginx")
    server = start_server("nginx", [*base, "-g", "daemon off;"], f"127.0.0.1:{port}", tmp=tmp)
    poll(lambda: children(server.proc.pid) or None, 10, "nginx's worker", server.proc.exited)
    return server


def haproxy(server: str) -> Server:
    """HAProxy (1 thread, keep-alive, ``http-reuse always``) from a free port to
    ``HOST:PORT`` or a Unix socket path."""
    tmp, port = tmpdir("fph"), free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    maxconn 4096\ndefaults\n    mode http\n"
        "    option http-keep-alive\n    http-reuse always\n    timeout connect 5s\n"
        "    timeout client 60s\n    timeout server 60s\n    timeout http-keep-alive 60s\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    server s1 {server}\n"
    )
    _checked(["haproxy", "-c", "-q", "-f", str(conf)], "HAProxy")
    return start_server("haproxy", ["haproxy", "-db", "-f", conf], f"127.0.0.1:{port}", tmp=tmp)


def passenger(app_dir: Path, workers: int, env: dict[str, str], startup: str) -> Server:
    """Passenger Standalone (builtin engine, open source) serving the WSGI file ``startup``
    of ``app_dir`` with ``workers`` processes; its workers are the watchdog's
    ``wsgi-loader`` descendants. Raises `BenchError` when Passenger is not installed."""
    if shutil.which("passenger") is None:
        raise BenchError("passenger is not installed (benchmarks/install-deps installs it)")
    tmp, port = tmpdir("fpp"), free_port()
    (tmp / "reg").mkdir()
    (app_dir / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, **env, "PASSENGER_INSTANCE_REGISTRY_DIR": f"{tmp}/reg", "TMPDIR": str(tmp)}
    argv = (
        f"passenger start {app_dir} --engine builtin --address 127.0.0.1 --port {port} "
        f"--app-type wsgi --startup-file {startup} --python {PY} --min-instances {workers} "
        f"--max-pool-size {workers} --spawn-method direct --environment production "
        f"--log-file {tmp}/passenger.log --pid-file {tmp}/passenger.pid --start-timeout 30 "
        f"--instance-registry-dir {tmp}/reg --no-install-runtime --no-compile-runtime "
        "--disable-security-update-check --disable-anonymous-telemetry"
        + (" --user root" if os.geteuid() == 0 else "")
    ).split()
    addr = f"127.0.0.1:{port}"
    server = start_server("passenger", argv, addr, cwd=app_dir, env=env, tmp=tmp, timeout=90)
    server.match, server.recursive = "wsgi-loader", True
    try:
        pid_file = tmp / "passenger.pid"
        server.root = poll(
            lambda: int(pid_file.read_text()) if pid_file.exists() else None,
            10,
            "Passenger's pid file",
            server.proc.exited,
        )
        for path in [pid_file, *tmp.glob("passenger-standalone.*/*.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.read_text())
                server.owned[pid] = start_ticks(pid)
    except BaseException:
        server.stop()
        raise
    return server


def _toml(value: Any) -> str:
    """A TOML value (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


class Flypool(Server):
    """A ``flypool run -c CONFIG`` daemon; `status` remembers its workers for `stop`."""

    listen: list[str]
    admin: str

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """``GET /status`` on the admin socket."""
        code, body = request(f"unix:{self.admin}", "GET", "/status", timeout=timeout)
        data = json.loads(body)
        if code != 200 or not isinstance(data, dict):
            raise BenchError(f"GET /status answered {code}: {body[:200]!r}")
        for entry in data.get("apps", []):
            for worker in entry.get("workers", []):
                if isinstance(pid := worker.get("pid"), int) and pid not in self.owned:
                    self.owned[pid] = start_ticks(pid)
        return data

    def app(self, timeout: float = 5.0) -> dict[str, Any]:
        """The app's part of the status."""
        return next(a for a in self.status(timeout)["apps"] if a.get("name") == APP)

    def admin_call(self, method: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """One admin request; ``(status, decoded JSON or text)``."""
        code, body = request(f"unix:{self.admin}", method, path, timeout=timeout)
        try:
            return code, json.loads(body)
        except ValueError:
            return code, body.decode(errors="replace")

    def restart(self, mode: str = "rolling", query: str = "") -> int:
        """``POST /apps/app/restart``; the restart id."""
        code, body = self.admin_call("POST", f"/apps/{APP}/restart?mode={mode}{query}")
        if code != 202 or not isinstance(body, dict) or not isinstance(body.get("restart_id"), int):
            raise BenchError(f"POST restart answered {code}: {body!r}")
        return int(body["restart_id"])

    def wait_ready(self, workers: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``workers`` workers are ready; the app's status then."""

        def check() -> dict[str, Any] | None:
            try:
                app = self.app(2.0)
            except (OSError, http.client.HTTPException, BenchError, StopIteration, ValueError):
                return None
            return app if len(ready(app)) >= workers else None

        return poll(check, timeout, f"{workers} ready workers", self.proc.exited, interval=0.05)

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log so far, one dict per event."""
        events = []
        for line in self.proc.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return [e for e in events if isinstance(e, dict)]


def ready(app: dict[str, Any]) -> list[dict[str, Any]]:
    """The ready workers of an app's status entry."""
    return [w for w in app.get("workers", []) if w.get("state") == "ready"]


def start_flypool(command: Sequence[Any], *, workers: int = 1, listen: Sequence[str] = (),
                  root: Path | None = None, env: dict[str, str] | None = None,
                  daemon: dict[str, Any] | None = None, timeout: float = 60.0,
                  python_args: Sequence[str] = (), **app: Any) -> Flypool:  # fmt: skip
    """Start ``flypool run -c CONFIG`` for one app named ``app`` and wait until ``workers``
    workers are ready and the first listener answers.

    ``command`` is the worker command (``{socket}``/``{port}`` for flypool to fill);
    ``listen`` defaults to one free TCP port, and may use ``{tmp}`` (the daemon's
    scratch directory, e.g. ``"unix:{tmp}/app.sock"``). ``app`` are more ``[[app]]``
    keys (``restart_batch=2``, ``worker_concurrency=0``...), ``daemon`` more
    ``[daemon]`` keys; ``python_args`` go before ``-m flypool`` (a launcher script, or
    ``-m cProfile -o FILE``). The config is ``TMP/flypool.toml``, the log ``TMP/flypool.log``.
    """
    tmp = tmpdir("fpf")
    (tmp / "run").mkdir()
    listen = [a.format(tmp=tmp) for a in listen] or [f"127.0.0.1:{free_port()}"]
    daemon = {"admin_socket": f"{tmp}/admin.sock", "runtime_dir": f"{tmp}/run",
              "log_format": "json", **(daemon or {})}  # fmt: skip
    app = {"name": APP, "root": str(root or tmp), "command": [str(c) for c in command],
           "listen": listen, "workers": workers, "env": env or {},
           **({"user": "root"} if os.geteuid() == 0 else {}), **app}  # fmt: skip
    toml = "[daemon]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in daemon.items())
    toml += "\n[[app]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in app.items())
    (tmp / "flypool.toml").write_text(toml)
    argv = [PY, *python_args, "-m", "flypool", "run", "-c", tmp / "flypool.toml"]
    fp = Flypool("flypool", Proc("flypool", argv, tmp / "flypool.log", cwd=tmp), listen[0], tmp)
    fp.listen, fp.admin = listen, f"{tmp}/admin.sock"
    try:
        fp.wait_ready(workers, timeout)
        wait_http(listen[0], "/", timeout, alive=fp.proc.exited)
    except BaseException as err:
        tail = fp.proc.tail()
        fp.stop()
        if not isinstance(err, BenchError):
            raise
        raise BenchError(f"flypool did not come up: {err}; its log ends with:\n{tail}") from None
    return fp


# --------------------------------------------------------------------------- load


def wrk(url: str, duration: int, connections: int = 32, threads: int = 1) -> dict[str, Any]:
    """``wrk -tT -cC -dDs --latency URL`` (keep-alive): requests, req/s, p50/p99 ms, errors."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from err
    out = done.stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    lat = {
        q: float(v) * unit[u]
        for q, v, u in re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m)\s*$", out, re.M)
    }
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    rate = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    if done.returncode != 0 or total is None or rate is None or len(lat) < 2:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    return {"requests": int(total[1]), "rps": float(rate[1]), "errors": errors} | {
        f"p{q}": v for q, v in lat.items()
    }


@dataclass(slots=True)
class Rec:
    """One request of a `Load`; times in seconds since the load's ``t0``."""

    conn: int
    seq: int
    kind: str
    front: str
    """``unix`` or ``tcp``."""
    start: float
    end: float = 0.0
    status: int | None = None
    error: str | None = None
    """``ExceptionName: message`` when no answer came, or what is wrong with a 200's body."""
    pid: int | None = None
    """The worker that answered (``X-Worker-Pid``, else ``pid=N`` in the body)."""
    gen: str | None = None
    """``gen=X`` in the body (benchmarks/apps/slowboot.py says which release answered)."""
    reused: bool = False
    """Sent on a connection that had already served a request."""
    detail: str | None = None
    """The start of a non-200 answer's body."""

    @property
    def failed(self) -> bool:
        """No answer, a status other than 200, or a wrong body."""
        return self.status != 200 or self.error is not None

    @property
    def ms(self) -> float:
        """Latency in milliseconds."""
        return (self.end - self.start) * 1e3

    def outcome(self) -> str:
        """``HTTP 502``, or the exception's name, for grouping failures."""
        if self.error is not None:
            return self.error.split(":", 1)[0]
        return f"HTTP {self.status}"


@dataclass(frozen=True)
class Req:
    """A request to send: its kind (for grouping), its bytes, and an optional check of a 200's
    body that returns what is wrong with it (``""``: fine)."""

    kind: str
    wire: bytes
    check: Callable[[bytes], str] | None = None


Check = Callable[[bytes], str]


def get(path: str, kind: str = "GET", check: Check | None = None) -> Req:
    """A keep-alive ``GET path``."""
    return Req(kind, f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode(), check)


def post(path: str, body: bytes, kind: str = "POST", check: Check | None = None) -> Req:
    """A keep-alive ``POST path`` with a Content-Length body."""
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n"
    return Req(kind, head.encode() + body, check)


_PID = re.compile(rb"\bpid=(\d+)")
_GEN = re.compile(rb"\bgen=(\S+)")
_LIMIT = 1 << 20
_FAILURES = (OSError, TimeoutError, EOFError, ValueError, asyncio.LimitOverrunError)


async def _read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """One answer (1xx skipped): status, headers (lower-case names), body, keep-alive."""
    while True:
        lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not rest[:3].isdigit():
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        status, headers = int(rest[:3]), {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break
    keep = version == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"").lower()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return status, headers, b"".join(parts), keep
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"])), keep
    if status in (204, 304):
        return status, headers, b"", keep
    return status, headers, await reader.read(), False


async def _connect(addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if addr.startswith("unix:"):
        return await asyncio.open_unix_connection(addr[5:], limit=_LIMIT)
    host, port = addr.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), limit=_LIMIT)


class Load:
    """``connections`` keep-alive HTTP/1.1 clients, spread round-robin over ``fronts``
    (``HOST:PORT`` or ``unix:PATH``), each sending ``pick(conn, rng)`` one request at a
    time until ``duration`` s have passed or ``max_requests`` were sent (0: no count).

    Runs on its own event loop (uvloop) in a thread, so the suite's main thread can
    trigger restarts and kills meanwhile. Nothing is retried: a failed request is
    recorded, its connection replaced, and the client pauses ``pause_after_failure`` s.
    Use as a context manager, or `run` it to the end.
    """

    def __init__(self, fronts: Sequence[str], connections: int,
                 pick: Callable[[int, random.Random], Req], *, duration: float,
                 max_requests: int = 0, timeout: float = 35.0, pause_after_failure: float = 0.0,
                 seed: int = 1) -> None:  # fmt: skip
        self.fronts, self.connections, self.pick = list(fronts), connections, pick
        self.duration, self.max_requests, self.timeout = duration, max_requests, timeout
        self.pause, self.seed = pause_after_failure, seed
        self.recs: list[Rec] = []
        self.t0 = 0.0
        self._stopping = False
        self._problem: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="load", daemon=True)

    def now(self) -> float:
        """Seconds since the load started (the time base of its records)."""
        return time.monotonic() - self.t0

    def start(self) -> Load:
        """Start the clients."""
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask every client to stop after its current request."""
        self._stopping = True

    def join(self) -> list[Rec]:
        """Wait for the clients (bounded) and return every record, by start time."""
        self._thread.join(max(0.0, self.duration - self.now()) + self.timeout + 15)
        if self._thread.is_alive():
            raise BenchError("the load did not finish in time")
        if self._problem is not None:
            raise BenchError(f"the load client failed: {self._problem!r}")
        return sorted(self.recs, key=lambda r: r.start)

    def run(self) -> list[Rec]:
        """Start, wait for the end, return the records."""
        return self.start().join()

    def _main(self) -> None:
        import uvloop

        async def all_clients() -> None:
            await asyncio.gather(*(self._client(i) for i in range(self.connections)))

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(all_clients())
        except BaseException as err:  # surfaced by join()
            self._problem = err

    async def _client(self, index: int) -> None:
        front = self.fronts[index % len(self.fronts)]
        rng = random.Random(f"{self.seed}/{index}")
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        served = seq = 0
        until = self.t0 + self.duration
        while not self._stopping and time.monotonic() < until:
            if self.max_requests and len(self.recs) >= self.max_requests:
                break
            req = self.pick(index, rng)
            kind = "unix" if front.startswith("unix:") else "tcp"
            rec = Rec(index, seq, req.kind, kind, time.monotonic() - self.t0)
            keep = False
            try:
                async with asyncio.timeout(self.timeout):
                    if writer is None or reader is None:
                        reader, writer = await _connect(front)
                        served = 0
                    rec.reused = served > 0
                    writer.write(req.wire)
                    await writer.drain()
                    rec.status, headers, body, keep = await _read_response(reader)
                served += 1
                head = body[:200]
                if (raw := headers.get(b"x-worker-pid")) is not None and raw.isdigit():
                    rec.pid = int(raw)
                elif match := _PID.search(head):
                    rec.pid = int(match[1])
                if match := _GEN.search(head):
                    rec.gen = match[1].decode(errors="replace")
                if rec.status != 200:
                    rec.detail = body[:160].decode(errors="replace")
                elif req.check is not None and (problem := req.check(body)):
                    rec.error, keep = f"bad body: {problem}", False
            except _FAILURES as err:
                rec.error = f"{type(err).__name__}: {err}"
                keep = False
            rec.end = time.monotonic() - self.t0
            self.recs.append(rec)
            seq += 1
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
            if rec.failed and self.pause:
                await asyncio.sleep(self.pause)
        if writer is not None:
            writer.close()


# --------------------------------------------------------------------------- samplers


class Sample(NamedTuple):
    """One `Sampler` reading: time (s since ``t0``), the root's RSS, each live worker's RSS."""

    t: float
    root_rss: int
    workers: dict[int, int]


class Sampler:
    """A separate process (so its /proc scans take no GIL from the load) that samples, every
    ``interval`` s until ``until`` (monotonic), the live workers of ``server`` and their RSS.
    `result` adds the workers it saw to ``server.owned``, so that `Server.stop` reaps them."""

    def __init__(self, server: Server, until: float, interval: float = 0.02) -> None:
        self.server, self.out = server, server.tmp / f"samples-{time.monotonic_ns()}.json"
        args = (
            f"{server.root_pid} {int(server.recursive)} {server.match or '-'} {interval} {until!r}"
        )
        argv = [PY, HERE / "harness.py", "sample", *args.split(), self.out]
        self.proc = Proc("sampler", argv, server.tmp / "sampler.log")

    def result(self, t0: float) -> list[Sample]:
        """Wait for the sampler to end (bounded); its samples, times relative to ``t0``."""
        try:
            poll(lambda: self.proc.popen.poll(), 15, "the sampler to finish", interval=0.05)
        finally:
            self.proc.stop(5)
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError) as err:
            raise BenchError(f"no sampler output: {err}; {self.proc.tail(5)}") from err
        self.server.owned.update({int(p): t for p, t in data["seen"].items()})
        return [
            Sample(t - t0, rss, {int(p): r for p, r in live.items()})
            for t, rss, live in data["samples"]
        ]


def _sample_main(root: int, recursive: bool, match: str, interval: float, until: float,
                 out: Path) -> int:  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    samples: list[Any] = []
    seen: dict[int, int | None] = {}
    matches: dict[int, bool] = {}
    try:
        parent = psutil.Process(root)
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < until:
            t = time.monotonic()
            try:
                kids, root_rss = parent.children(recursive=recursive), parent.memory_info().rss
            except psutil.Error:
                break
            live = {}
            for kid in kids:
                with contextlib.suppress(psutil.Error):
                    if kid.pid not in matches:
                        matches[kid.pid] = match == "-" or match in " ".join(kid.cmdline())
                    if matches[kid.pid] and kid.status() != psutil.STATUS_ZOMBIE:
                        live[kid.pid] = kid.memory_info().rss
                        seen.setdefault(kid.pid, start_ticks(kid.pid))
            samples.append([t, root_rss, live])
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))
    except psutil.Error:
        pass
    finally:
        out.write_text(json.dumps({"samples": samples, "seen": seen}))
    return 0


class Poller:
    """flypool's app status every ``interval`` s, in a thread: ``polls`` = (s since ``t0``,
    the app's status entry)."""

    def __init__(self, fp: Flypool, t0: float, interval: float = 0.05) -> None:
        self.fp, self.t0, self.interval = fp, t0, interval
        self.polls: list[tuple[float, dict[str, Any]]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def start(self) -> Poller:
        """Start polling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (bounded)."""
        self._stop.set()
        self._thread.join(10)

    def first(self, after: float, pred: Callable[[dict[str, Any]], bool]) -> float | None:
        """The time of the first poll at or after ``after`` for which ``pred`` holds."""
        return next((t for t, app in self.polls if t >= after and pred(app)), None)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                app = self.fp.app(2.0)
            except (OSError, http.client.HTTPException, BenchError, StopIteration, ValueError) as e:
                self.errors.append((time.monotonic() - self.t0, f"{type(e).__name__}: {e}"))
            else:
                self.polls.append((time.monotonic() - self.t0, app))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


# --------------------------------------------------------------------------- timeline


def stats(recs: Iterable[Rec]) -> dict[str, Any]:
    """Requests, failures, and p50/p99/max latency (ms) of the successful ones."""
    chosen = list(recs)
    ok = [r.ms for r in chosen if not r.failed]
    failed, top = len(chosen) - len(ok), max(ok, default=None)
    return {"requests": len(chosen), "failed": failed, "p50": pct(ok, 50), "p99": pct(ok, 99),
            "max": top}  # fmt: skip


def kinds(recs: Iterable[Rec]) -> str:
    """Failures grouped by outcome: ``HTTP 503 x12, ConnectionResetError x3`` (or ``""``)."""
    counts = Counter(r.outcome() for r in recs if r.failed)
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common())


# --------------------------------------------------------------------------- results


def num(value: Any, digits: int | None = None) -> str:
    """A figure for a table: ``—`` for None, thousands separators, sensible decimals."""
    if value is None:
        return "—"
    if isinstance(value, list):
        return ", ".join(num(v, digits) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) and digits is None:
        return f"{value:,}"
    if digits is None:
        digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def table(headers: str | Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table. ``headers`` may be one string, ``|``-separated; a header ending
    in ``>`` is right-aligned (the ``>`` is dropped)."""
    headers = headers.split("|") if isinstance(headers, str) else headers
    head = "| " + " | ".join(h.rstrip(">") for h in headers) + " |"
    rule = "|" + "|".join("---:" if h.endswith(">") else "---" for h in headers) + "|"
    body = ["| " + " | ".join(num(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


CHECK_KEYS = ("target", "measured", "limit", "passed", "margin", "hard")


class Suite:
    """One benchmark suite: its command line, checks, Markdown and JSON.

    A suite script builds one at import, adds its options with `arg`, and ends with
    ``suite.main(run)``; ``run(suite, args)`` measures, calls `check`/`expect` for each
    target and `md` for its tables, and may put raw figures in ``suite.data``. `main`
    writes ``benchmarks/out/NAME.json`` (read by `report`) and prints the Markdown.
    The exit status is 1 when the run raised `BenchError` or a ``hard`` check failed
    (a failed request, a broken bound); a missed performance target is only reported.
    """

    def __init__(self, name: str, title: str, doc: str | None) -> None:
        self.name, self.title = name, title
        # RESULTS.md shows the docstring's body: what the suite runs and compares.
        body = (doc or "").strip().split("\n\n")[1:]
        self.about = "\n\n".join(" ".join(p.split()).replace("``", "`") for p in body)
        self.parser = argparse.ArgumentParser(
            prog=f"benchmarks/{name}.py",
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.parser.add_argument("--out", type=Path, default=OUT / f"{name}.json")
        self.checks: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.data: dict[str, Any] = {}

    def arg(self, *names: str, **kwargs: Any) -> None:
        """An option of the suite (argparse)."""
        self.parser.add_argument(*names, **kwargs)

    def md(self, *lines: str) -> None:
        """Markdown for the suite's section (blocks separated by blank lines)."""
        self.parts.extend(lines)

    def _add(self, target: str, *row: Any) -> bool:
        measured, limit, passed, *_ = row
        self.checks.append(dict(zip(CHECK_KEYS, (target, *row), strict=True)))
        log(f"{'PASS' if passed else 'FAIL'} {target}: {measured} ({limit})")
        return bool(passed)

    def check(self, target: str, value: float | None, limit: str, shown: str = "",
              hard: bool = False, digits: int | None = None) -> bool:  # fmt: skip
        """A numeric target. ``limit`` is an operator, a number and a unit: ``"< 20 ms"``,
        ``">= 0.95x"``, ``"== 0"``; ``None`` fails. The margin is how far inside (+) or
        outside (-) the limit the value is."""
        match = re.fullmatch(r"(<=|>=|==|<|>) ?([-+.\d]+)(.*)", limit)
        if match is None:
            raise ValueError(f"bad limit {limit!r}")
        op, bound, unit = match[1], float(match[2]), match[3]
        passed = value is not None and _OPS[op](value, bound)
        margin = ""
        if value is not None and op != "==":
            gap = bound - value if op[0] == "<" else value - bound
            exact = digits is None and float(gap).is_integer()
            margin = f"{'+' if gap >= 0 else ''}{num(int(gap) if exact else gap, digits)}{unit}"
        return self._add(
            target, shown or f"{num(value, digits)}{unit}", limit, passed, margin, hard
        )

    def expect(
        self, target: str, passed: bool, measured: str, limit: str = "yes", hard: bool = False
    ) -> bool:
        """A yes/no target."""
        return self._add(target, measured, limit, passed, "", hard)

    def main(self, run: Callable[[Suite, argparse.Namespace], None]) -> None:
        """Parse the command line, run, write the JSON, print the Markdown, exit."""
        args = self.parser.parse_args()
        signal.signal(signal.SIGTERM, lambda n, f: sys.exit(128 + n))  # run the finally blocks
        started, load0, error = time.time(), os.getloadavg(), None
        try:
            run(self, args)
        except BenchError as err:
            error = str(err)
            log(f"{self.name}: {err}")
            self.md(f"**The suite stopped with an error:**\n\n```\n{scrub(error)[-2000:]}\n```")
        python = os.path.relpath(PY, REPO) if PY.startswith(str(REPO)) else PY
        doc = {"suite": self.name, "title": self.title, "about": self.about,
               "command": scrub(shlex.join([python, f"benchmarks/{self.name}.py", *sys.argv[1:]])),
               "started": started, "finished": time.time(), "load_start": list(load0),
               "load_end": list(os.getloadavg()), "error": error, "checks": self.checks,
               "markdown": scrub("\n\n".join(self.parts)), "data": self.data}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(doc["markdown"])
        log(f"raw figures: {scrub(str(args.out))}")
        sys.exit(1 if error or any(c["hard"] and not c["passed"] for c in self.checks) else 0)


# --------------------------------------------------------------------------- report


NOTES = "<!-- notes -->"


def _version(argv: Sequence[str], word: int) -> str:
    """Word ``word`` of the first line ``argv`` prints, or ``not installed``."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    words = (done.stdout + done.stderr).strip().split("\n")[0].split()
    if "No module named" in done.stderr or len(words) <= word:
        return "not installed"
    return words[word].split("/")[-1].strip("()")


def machine() -> dict[str, str]:
    """CPU, cores, RAM, kernel, and the versions of everything compared."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    versions = {
        "python": platform.python_version(),
        "flypool": _version([PY, "-c", "import flypool; print(flypool.__version__)"], 0),
        "nginx": _version(["nginx", "-v"], 2),
        "haproxy": _version(["haproxy", "-v"], 2),
        "wrk": _version(["wrk", "-v"], 1),
        "passenger": _version(["passenger", "--version"], 2),
        "gunicorn": _version([PY, "-m", "gunicorn", "--version"], 2),
        "uvicorn": _version([PY, "-m", "uvicorn", "--version"], 2),
    }
    return {
        "cpu": f"{cpu[1] if cpu else platform.processor()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), {psutil.virtual_memory().total / 2**30:.1f} GiB"
        f" RAM, Linux {platform.release()}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def report(out: Path = OUT, results: Path = HERE / "RESULTS.md") -> int:
    """Write ``RESULTS.md`` (and ``out/all.json``) from ``out/run.tsv`` and ``out/*.json``,
    keeping the hand-written notes after the ``<!-- notes -->`` line."""
    meta: dict[str, str] = {}
    steps: list[list[str]] = []
    if (out / "run.tsv").exists():
        for line in (out / "run.tsv").read_text().splitlines():
            kind, *rest = line.split("\t")
            if kind == "meta" and len(rest) >= 2:
                meta[rest[0]] = rest[1]
            elif kind == "step" and len(rest) >= 7:
                steps.append(rest)
    docs = {}
    for path in sorted(out.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            if path.name != "all.json" and "suite" in (doc := json.loads(path.read_text())):
                docs[path.stem] = doc
    order = [s[0] for s in steps if s[0] in docs] + [
        k for k in docs if k not in {s[0] for s in steps}
    ]
    started = float(meta.get("started_epoch") or 0)
    info = machine()
    lines = [
        "# flypool benchmark results",
        "",
        "Generated by `bash benchmarks/run` (its last step, `benchmarks/harness.py report`, "
        "reads `benchmarks/out/*.json`); only the notes after the `<!-- notes -->` line are "
        "hand-written. Every figure below comes from the command shown with it, run from the "
        "repository root.",
        "",
        f"- **Run:** `{meta.get('command', 'bash benchmarks/run')}`, started "
        f"{_when(started) if started else '?'}; benchmarks took "
        f"{float(meta.get('benchmarks_elapsed_s') or 0) / 60:.1f} min",
        f"- **Machine:** {info['cpu']}",
        f"- **Versions:** {info['versions']}",
        f"- **Load average (1, 5, 15 min):** {meta.get('load_before', '?')} before the "
        f"benchmarks, {meta.get('load_after', '?')} after",
        "",
    ]
    checks = [(name, c) for name in order for c in docs[name]["checks"]]
    passed = sum(c["passed"] for _, c in checks)
    verdict = {True: "PASS", False: "**FAIL**"}
    rows = [[f"`{n}`", *(c[k] for k in CHECK_KEYS[:3]), verdict[c["passed"]], c["margin"] or "—"]
            for n, c in checks]  # fmt: skip
    head = ["suite", "target", "measured", "limit", "result", "margin"]
    lines += [f"## Targets\n\n{passed} PASS, {len(checks) - passed} FAIL.\n", table(head, rows), ""]
    failed = [s for s in steps if s[1] != "0"]
    if failed:
        lines.append("## Failed steps\n")
        for name, code, took, *_, command in failed:
            why = ["no JSON: see its log, benchmarks/out/" + name + ".log"]
            if doc := docs.get(name):
                bad = [c for c in doc["checks"] if c["hard"] and not c["passed"]]
                why = [doc["error"] or ""] + [f"{c['target']}: {c['measured']}" for c in bad]
            lines.append(f"- **{name}** exited {code} after {took} s: `{command}`")
            lines += [f"  - {' '.join(w.split())[:300]}" for w in why if w]
    lines += [
        "## Steps\n",
        table(
            ["step", "command", "exit>", "time s>", "load before → after"],
            [[s[0], f"`{s[6]}`", s[1], s[2], f"{s[4]} → {s[5]}"] for s in steps],
        ),
        "",
    ]
    for name in order:
        doc = docs[name]
        stale = " (**stale**: from an earlier run)" if doc["finished"] < started else ""
        lines += [
            f"## {doc['title']}\n",
            doc["about"],
            "",
            f"Command: `{doc['command']}`; finished {_when(doc['finished'])}{stale}, "
            f"{doc['finished'] - doc['started']:.0f} s; load "
            f"{' '.join(f'{x:.2f}' for x in doc['load_start'])} → "
            f"{' '.join(f'{x:.2f}' for x in doc['load_end'])}.",
            "",
            doc["markdown"],
            "",
        ]
    notes = f"{NOTES}\n\n## Notes\n\nHand-written notes go here.\n"
    if results.exists() and f"\n{NOTES}\n" in (old := results.read_text()):  # the line alone
        notes = f"{NOTES}\n" + old.split(f"\n{NOTES}\n", 1)[1]
    results.write_text(scrub("\n".join(lines)) + "\n" + notes)
    (out / "all.json").write_text(
        json.dumps({"meta": meta, "machine": info, "results": docs}, indent=1) + "\n"
    )
    log(f"wrote {scrub(str(results))}: {passed} PASS, {len(checks) - passed} FAIL")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["sample"] and len(sys.argv) == 8:
        a = sys.argv[2:]
        sys.exit(_sample_main(int(a[0]), a[1] == "1", a[2], float(a[3]), float(a[4]), Path(a[5])))
    if sys.argv[1:] == ["report"]:
        sys.exit(report())
    sys.exit("usage: harness.py report | harness.py sample ROOT RECURSIVE MATCH INTERVAL UNTIL OUT")
