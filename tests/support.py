"""Test helpers: run a real flypool daemon, talk HTTP to its sockets, poll with deadlines."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")
PYTHON = sys.executable
EXAMPLE = [PYTHON, "-m", "flypool.example", "--socket", "{socket}"]


def eventually(
    pred: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``pred`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: last={last!r}")
        time.sleep(interval)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (keep-alive works as usual)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get(path: str, target: str = "/", timeout: float = 30.0) -> tuple[int, bytes, dict[str, str]]:
    """One request on a fresh connection."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def raw_request(path: str, data: bytes, timeout: float = 10.0, shut_write: bool = False) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks)


def short_dir() -> str:
    """A short directory under /tmp: Unix socket paths are limited to ~107 bytes."""
    return tempfile.mkdtemp(prefix="fpt.", dir="/tmp")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


@dataclass
class Daemon:
    """A running `flypool run` subprocess and what it was started with."""

    dir: Path
    config: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    seen_pids: set[int] = field(default_factory=set)

    @property
    def admin(self) -> str:
        return str(self.dir / "admin.sock")

    @property
    def front(self) -> str:
        return str(self.dir / "app.sock")

    def admin_call(self, method: str, target: str) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.admin, 10.0)
        try:
            conn.request(method, target)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(body) if "json" in ctype else body.decode())

    def status(self) -> dict[str, Any]:
        code, body = self.admin_call("GET", "/status")
        assert code == 200, body
        for app in body["apps"]:
            for w in app["workers"]:
                self.seen_pids.add(w["pid"])
        return body  # type: ignore[no-any-return]

    def app(self, name: str = "app") -> dict[str, Any]:
        for a in self.status()["apps"]:
            if a["name"] == name:
                return a  # type: ignore[no-any-return]
        raise KeyError(name)

    def ready_pids(self, name: str = "app") -> list[int]:
        return [w["pid"] for w in self.app(name)["workers"] if w["state"] == "ready"]

    def wait_ready(self, n: int, name: str = "app", timeout: float = 20.0) -> list[int]:
        def check() -> list[int] | None:
            app = self.app(name)
            pids = [w["pid"] for w in app["workers"] if w["state"] == "ready"]
            live = [w for w in app["workers"] if w["state"] in ("ready", "spawning")]
            return pids if len(pids) == n and len(live) == n else None

        return eventually(check, timeout, what=f"{n} ready workers")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "flypool", *args, "--admin-socket", self.admin],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def assert_no_workers_left(self, timeout: float = 10.0) -> None:
        def gone() -> bool:
            return not any(psutil.pid_exists(p) and _not_zombie(p) for p in self.seen_pids)

        eventually(gone, timeout, what=f"worker pids {sorted(self.seen_pids)} to exit")


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def write_config(
    d: Path,
    app: dict[str, Any],
    daemon: dict[str, Any] | None = None,
    extra_apps: list[dict[str, Any]] | None = None,
) -> Path:
    """A config file in ``d`` with one app listening on d/app.sock."""
    daemon_keys = {
        "admin_socket": str(d / "admin.sock"),
        "log_format": "json",
        "runtime_dir": str(d),
    }
    daemon_keys.update(daemon or {})
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon_keys.items()]
    base = {
        "name": "app",
        "root": str(d),
        "command": EXAMPLE,
        "listen": [f"unix:{d}/app.sock"],
        "workers": 2,
        "start_timeout": "10s",
        "drain_timeout": "5s",
        "stop_timeout": "3s",
        "restart_check_interval": "100ms",
    }
    if os.geteuid() == 0:
        # Root workers must be asked for explicitly (tests run as root in CI).
        base["user"] = "root"
    for a in [{**base, **app}, *(extra_apps or [])]:
        lines.append("\n[[app]]")
        env = a.pop("env", None)
        lines += [f"{k} = {toml_value(v)}" for k, v in a.items()]
        if env:
            lines.append(f"env = {toml_value(env)}")
    path = d / "flypool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def running_daemon(
    app: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    wait_workers: int | None = None,
    directory: Path | None = None,
    extra_apps: list[dict[str, Any]] | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Daemon]:
    """Start a daemon on a fresh config; stop it and check no worker survives.

    ``env`` adds variables to the daemon's environment (test-only switches).
    """
    d = directory or Path(short_dir())
    cfg = write_config(d, app or {}, daemon, extra_apps)
    log_path = d / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "flypool", "run", "-c", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or str(d),
            env={**os.environ, **env} if env else None,
        )
    dm = Daemon(d, cfg, proc, log_path)
    try:
        eventually(
            lambda: os.path.exists(dm.admin) or proc.poll() is not None, 15, what="admin socket"
        )
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{dm.log()}")
        n = wait_workers if wait_workers is not None else (app or {}).get("workers", 2)
        if n:
            dm.wait_ready(n)
        yield dm
    finally:
        leaked: object = None
        if proc.poll() is None:
            try:
                # Every test also checks that no request is left holding a
                # worker slot once its clients are gone.
                eventually(
                    lambda: all(
                        w["sessions"] == 0 for a in dm.status()["apps"] for w in a["workers"]
                    ),
                    10,
                    what="all worker sessions released",
                )
            except AssertionError as exc:
                leaked = exc
        try:
            # Stop first: a failed check below must not leave the daemon running.
            code = dm.stop()
            # Every test also checks that a graceful stop leaves no worker behind.
            dm.assert_no_workers_left()
            assert leaked is None, leaked
            assert code == 0, f"daemon exit status {code}:\n{dm.log()[-3000:]}"
        finally:
            for pid in dm.seen_pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if _not_zombie(pid):
                        os.kill(pid, signal.SIGKILL)
        if directory is None:
            shutil.rmtree(d, ignore_errors=True)


RELEASE_WORKER = [PYTHON, str(Path(__file__).parent / "apps" / "release_worker.py"), "{socket}"]
MEM_WORKER = [PYTHON, str(Path(__file__).parent / "apps" / "mem_worker.py"), "{socket}"]


def log_events(d: Daemon, event: str) -> list[dict[str, Any]]:
    """Every JSON log record of the daemon with this ``event``."""
    out = []
    for line in d.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("event") == event:
                    out.append(rec)
    return out


def live_children(pid: int) -> set[int]:
    """Child pids of ``pid`` that are not zombies."""
    out = set()
    for c in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if c.status() != psutil.STATUS_ZOMBIE:
                out.add(c.pid)
    return out


class LoadGen:
    """Keep-alive clients hammering the front socket until stopped; counts everything."""

    def __init__(
        self,
        path: str,
        clients: int = 8,
        target: str = "/?delay=0.01",
        tcp: tuple[str, int] | None = None,
    ) -> None:
        self.path = path
        self.tcp = tcp
        self.clients = clients
        self.target = target
        self.statuses: dict[object, int] = {}
        self.latencies: list[float] = []
        self.bodies: set[bytes] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _count(self, key: object, latency: float, body: bytes) -> None:
        with self._lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1
            self.latencies.append(latency)
            self.bodies.add(body.split(b" release=")[-1])

    def _run(self) -> None:
        conn: http.client.HTTPConnection
        if self.tcp is not None:
            conn = http.client.HTTPConnection(self.tcp[0], self.tcp[1], timeout=30)
        else:
            conn = UnixHTTPConnection(self.path, 30)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                conn.request("GET", self.target)
                resp = conn.getresponse()
                body = resp.read()
                self._count(resp.status, time.monotonic() - t0, body)
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
            except OSError as exc:
                self._count(type(exc).__name__, time.monotonic() - t0, b"")
                conn.close()
        conn.close()

    def __enter__(self) -> LoadGen:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def failures(self) -> dict[object, int]:
        return {k: v for k, v in self.statuses.items() if k != 200}


def make_release(base: Path, name: str) -> Path:
    """releases/NAME with a tmp/ directory, like a Capistrano release."""
    rel = base / "releases" / name
    (rel / "tmp").mkdir(parents=True, exist_ok=True)
    return rel


def point_current(base: Path, release: Path) -> None:
    """`ln -sfn releases/X current`, atomically."""
    tmp = base / "current.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(release)
    os.replace(tmp, base / "current")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, target: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET over TCP to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class PeakChildren:
    """Samples a process's child count every 5 ms in a thread; ``peak`` is the maximum."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(self.proc.children()))
            time.sleep(0.005)

    def __enter__(self) -> PeakChildren:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
