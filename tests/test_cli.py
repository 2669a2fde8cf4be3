"""Tests for the `flypool` command line against a scripted fake admin server.

The fake daemon is a stdlib `UnixStreamServer` in a thread that answers the
admin API from a script, so the CLI is exercised end to end (argument parsing,
HTTP over the Unix socket, output, exit status) without starting a real pool.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import sys
import tempfile
import textwrap
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from flypool import __version__, _impl, cli
from flypool.admin.client import (
    DEFAULT_ADMIN_SOCKET,
    AdminClient,
    DaemonUnreachable,
    find_admin_socket,
)

Reply = tuple[int, Any]
"""An HTTP status and a JSON-serializable body (bytes are sent as they are)."""

Route = Callable[[dict[str, str]], Reply]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeDaemon


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _handle(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(split.query))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = self.server.fake.dispatch(self.command, split.path, query)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _handle
    do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        # The default logs to stderr through client_address, which is '' on Unix sockets.
        pass


class FakeDaemon:
    """A scripted admin API on a short Unix socket path.

    `routes` maps (method, path) to a function of the query. `statuses` is the
    script for `GET /status`: each request takes the next document, the last
    one repeats.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.routes: dict[tuple[str, str], Route] = {}
        self.statuses: list[dict[str, Any]] = []
        self.status_requests = 0
        self.on_status: Callable[[int], None] | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def route(self, method: str, path: str, reply: Reply | Route) -> None:
        """Answer `method path` with a fixed reply or a function of the query."""
        if callable(reply):
            self.routes[(method, path)] = reply
            return
        fixed: Reply = reply

        def answer(_query: dict[str, str]) -> Reply:
            return fixed

        self.routes[(method, path)] = answer

    def dispatch(self, method: str, path: str, query: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append((method, path, query))
            if method == "GET" and path == "/status" and self.statuses:
                index = min(self.status_requests, len(self.statuses) - 1)
                self.status_requests += 1
                if self.on_status is not None:
                    self.on_status(self.status_requests)
                return 200, self.statuses[index]
            route = self.routes.get((method, path))
        if route is None:
            return 404, {"error": f"no route {method} {path}"}
        return route(query)

    @property
    def posts(self) -> list[tuple[str, dict[str, str]]]:
        """The POSTs received so far, in order."""
        return [(path, query) for method, path, query in self.requests if method == "POST"]


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: Unix socket paths are limited to about 107 bytes."""
    path = tempfile.mkdtemp(prefix="fp-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_dir: str) -> Iterator[FakeDaemon]:
    """A running fake daemon; stopped and cleaned up after the test."""
    fake = FakeDaemon(os.path.join(short_dir, "admin.sock"))
    server = _Server(fake.socket_path, _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's FLYPOOL_ADMIN_SOCKET out of the tests."""
    monkeypatch.delenv("FLYPOOL_ADMIN_SOCKET", raising=False)


def run_cli(fake: FakeDaemon, *argv: str) -> int:
    """`flypool ARGV --admin-socket <fake>`."""
    return cli.main([*argv, "--admin-socket", fake.socket_path])


def app_status(
    name: str = "blog",
    restart: dict[str, Any] | None = None,
    last_restart: dict[str, Any] | None = None,
    deployment_error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One app entry of `GET /status`."""
    return {
        "name": name,
        "root": f"/srv/{name}/current",
        "release": f"/srv/{name}/releases/B",
        "state": "restarting" if restart else "serving",
        "queue": 0,
        "workers_target": 2,
        "drained": False,
        "listen": [f"unix:/run/flypool/{name}.sock"],
        "restart": restart,
        "last_restart": last_restart,
        "deployment_error": deployment_error,
        "workers": [
            {
                "pid": 100 + i,
                "state": "ready",
                "sessions": 0,
                "processed": 10,
                "uptime_s": 5.0,
                "cpu_percent": 0.0,
                "rss_bytes": 12 * 1024 * 1024,
                "last_used_s": 0.5,
                "release": f"/srv/{name}/releases/B",
                "restarts": 0,
            }
            for i in range(2)
        ],
    }


def status_doc(*apps: dict[str, Any]) -> dict[str, Any]:
    """A whole `GET /status` document."""
    return {
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 12.0,
        "instance": "/run/flypool/admin.sock",
        "apps": list(apps),
    }


def rolling(done: int, total: int = 2) -> dict[str, Any]:
    return {"mode": "rolling", "done": done, "total": total, "replacing_pid": 100 + done}


def finished(restart_id: int, outcome: str = "completed", **extra: Any) -> dict[str, Any]:
    last = {
        "id": restart_id,
        "mode": "rolling",
        "outcome": outcome,
        "reason": "admin",
        "duration_s": 4.2,
        "finished_at": "2026-11-22T10:00:00Z",
    }
    last.update(extra)
    return last


def write_config(directory: str, admin_socket: str, apps: tuple[str, ...] = ("blog",)) -> str:
    """A valid config file with the given admin socket and apps; returns its path."""
    text = f'[daemon]\nadmin_socket = "{admin_socket}"\n'
    for name in apps:
        text += textwrap.dedent(
            f"""
            [[app]]
            name = "{name}"
            root = "{directory}"
            command = ["python3", "-m", "http.server", "--bind", "{{socket}}"]
            listen = ["unix:{directory}/{name}.sock"]
            """
        )
    path = os.path.join(directory, "flypool.toml")
    Path(path).write_text(text)
    return path


def has_real_config() -> bool:
    try:
        import flypool.config  # noqa: F401
    except ImportError:
        return False
    return True


needs_config = pytest.mark.skipif(not has_real_config(), reason="flypool.config not available")


# ---------------------------------------------------------------------------
# Exit statuses and general behaviour


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`flypool --version` prints the package version and exits 0."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flypool {__version__} ({_impl.summary()})"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["status", "--bogus"],
        ["scale", "blog"],
        ["scale", "blog", "many"],
        ["scale", "blog", "-1"],
        ["restart", "--rolling", "--blocking"],
        ["restart", "--wait", "--timeout", "soon"],
        ["check"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Argument errors are reported on stderr with exit status 2, never a traceback."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err
    assert captured.out == ""


def test_missing_socket_exits_3(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No daemon behind the socket path: exit 3 with the path and the cause."""
    path = os.path.join(short_dir, "nope.sock")
    assert cli.main(["status", "--admin-socket", path]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"flypool: cannot reach the daemon at {path}: ")
    assert "no such socket" in err
    # A new user (the demo runs, no flag given) learns the three ways to point at it.
    for way in ("--admin-socket PATH", "FLYPOOL_ADMIN_SOCKET=PATH", "-c FILE"):
        assert way in err


def test_refused_socket_exits_3(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A stale socket file nobody listens on counts as unreachable too."""
    import socket

    path = os.path.join(short_dir, "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # bound but never listening: connect() is refused
    assert cli.main(["reload", "--admin-socket", path]) == 3
    assert "connection refused" in capsys.readouterr().err


def test_client_times_out(short_dir: str) -> None:
    """A daemon that accepts but never answers raises DaemonUnreachable after the timeout."""
    import socket

    path = os.path.join(short_dir, "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        started = time.monotonic()
        with pytest.raises(DaemonUnreachable, match="timed out") as info:
            AdminClient(path).request("GET", "/status", timeout=0.3)
        assert time.monotonic() - started < 5
    assert info.value.socket_path == path


# ---------------------------------------------------------------------------
# Admin socket discovery (SPEC §4)


def test_discovery_defaults_to_run_flypool() -> None:
    """Nothing given: the default path."""
    assert find_admin_socket(None, None) == DEFAULT_ADMIN_SOCKET == "/run/flypool/admin.sock"


def test_discovery_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--admin-socket wins over FLYPOOL_ADMIN_SOCKET."""
    monkeypatch.setenv("FLYPOOL_ADMIN_SOCKET", "/env.sock")
    assert find_admin_socket("/flag.sock", None) == "/flag.sock"
    assert find_admin_socket(None, None) == "/env.sock"


@needs_config
def test_discovery_environment_beats_config(
    monkeypatch: pytest.MonkeyPatch, short_dir: str
) -> None:
    """FLYPOOL_ADMIN_SOCKET wins over -c FILE, which wins over the default."""
    config = write_config(short_dir, "/from-config.sock")
    assert find_admin_socket(None, config) == "/from-config.sock"
    assert find_admin_socket("/flag.sock", config) == "/flag.sock"
    monkeypatch.setenv("FLYPOOL_ADMIN_SOCKET", "/env.sock")
    assert find_admin_socket(None, config) == "/env.sock"


def test_discovery_does_not_read_config_when_not_needed(short_dir: str) -> None:
    """A flag makes the config irrelevant: a broken file is never opened."""
    missing = os.path.join(short_dir, "missing.toml")
    assert find_admin_socket("/flag.sock", missing) == "/flag.sock"


def test_environment_is_used_by_the_cli(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI finds the daemon through FLYPOOL_ADMIN_SOCKET alone."""
    fake.statuses = [status_doc(app_status())]
    monkeypatch.setenv("FLYPOOL_ADMIN_SOCKET", fake.socket_path)
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["apps"][0]["name"] == "blog"


@needs_config
def test_cli_reads_socket_from_config(
    fake: FakeDaemon, short_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-c FILE` points the client at the config's daemon.admin_socket."""
    fake.route("POST", "/reload", (200, {"ok": True}))
    config = write_config(short_dir, fake.socket_path)
    assert cli.main(["reload", "-c", config]) == 0
    assert fake.posts == [("/reload", {})]


@needs_config
def test_cli_bad_config_for_discovery_exits_2(
    short_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken -c FILE is a config error (exit 2), not an unreachable daemon."""
    bad = os.path.join(short_dir, "bad.toml")
    Path(bad).write_text("[daemon\n")
    assert cli.main(["status", "-c", bad]) == 2
    assert capsys.readouterr().err.strip()


# ---------------------------------------------------------------------------
# status


def test_status_text(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """`flypool status` prints the passenger-status layout."""
    fake.statuses = [status_doc(app_status(restart=rolling(1)))]
    assert run_cli(fake, "status") == 0
    out = capsys.readouterr().out
    assert out.startswith("Version : 0.1.0\n")
    assert "----------- Application groups -----------\nblog (restarting):\n" in out
    assert "  Restart: rolling 1/2\n" in out
    assert "  * PID: 101     Sessions: 0" in out


def test_status_json_is_the_daemons_document(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json` prints exactly what the daemon answered, pretty-printed."""
    doc = status_doc(app_status())
    fake.statuses = [doc]
    assert run_cli(fake, "status", "--json") == 0
    out = capsys.readouterr().out
    assert json.loads(out) == doc
    assert out.startswith('{\n  "version"')


def test_status_server_error_exits_1(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-JSON error answer is reported with its HTTP status."""
    fake.route("GET", "/status", (500, b"boom"))
    assert run_cli(fake, "status") == 1
    assert capsys.readouterr().err == "flypool: HTTP 500: boom\n"


# ---------------------------------------------------------------------------
# restart (without --wait)


def test_restart_all(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """No app named: one `POST /restart`, one line per app."""
    fake.route(
        "POST",
        "/restart",
        (202, {"restarts": [{"app": "blog", "restart_id": 7}, {"app": "shop", "restart_id": 8}]}),
    )
    assert run_cli(fake, "restart") == 0
    assert fake.posts == [("/restart", {})]
    assert capsys.readouterr().out == (
        "blog: restart requested (id 7)\nshop: restart requested (id 8)\n"
    )


def test_restart_named_apps_with_mode(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """Each named app gets its own POST carrying the mode; duplicates are sent once."""
    for index, name in enumerate(("blog", "shop")):
        fake.route("POST", f"/apps/{name}/restart", (202, {"app": name, "restart_id": 10 + index}))
    assert run_cli(fake, "restart", "blog", "shop", "blog", "--blocking") == 0
    assert fake.posts == [
        ("/apps/blog/restart", {"mode": "blocking"}),
        ("/apps/shop/restart", {"mode": "blocking"}),
    ]
    assert "shop: restart requested (id 11)" in capsys.readouterr().out


def test_restart_unknown_app_exits_1(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon's 404 message goes to stderr; the known app is still restarted."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 3}))
    fake.route("POST", "/apps/nope/restart", (404, {"error": 'no app named "nope"'}))
    assert run_cli(fake, "restart", "nope", "blog", "--rolling") == 1
    captured = capsys.readouterr()
    assert captured.err == 'flypool: no app named "nope"\n'
    assert captured.out == "blog: restart requested (id 3)\n"


# ---------------------------------------------------------------------------
# restart --wait


def test_restart_wait_reports_progress_until_completed(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Progress lines appear once per change; a completed restart exits 0."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 7}))
    fake.statuses = [
        # An older restart's result is still shown until ours starts.
        status_doc(app_status(last_restart=finished(6))),
        status_doc(app_status(restart=rolling(1))),
        status_doc(app_status(restart=rolling(1))),
        status_doc(app_status(restart=rolling(2))),
        status_doc(app_status(last_restart=finished(7, duration_s=4.25))),
    ]
    started = time.monotonic()
    assert run_cli(fake, "restart", "blog", "--wait") == 0
    assert time.monotonic() - started < 10
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "blog: restart requested (id 7)",
        "blog: restart pending",
        "blog: rolling restart 1/2 replaced",
        "blog: rolling restart 2/2 replaced",
        "blog: restart completed in 4.2s",
    ]
    assert captured.err == ""
    assert fake.status_requests == 5


def test_restart_wait_prints_every_step_and_ends_with_n_of_n(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps a poll did not see (a batch, a slow poll) still get their line; N/N at the end."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 7}))
    fake.statuses = [
        status_doc(app_status(restart=rolling(1, 4))),
        status_doc(app_status(restart=rolling(3, 4))),
        status_doc(app_status(last_restart=finished(7, replaced=4, total=4))),
    ]
    assert run_cli(fake, "restart", "blog", "--wait") == 0
    assert capsys.readouterr().out.splitlines() == [
        "blog: restart requested (id 7)",
        "blog: rolling restart 1/4 replaced",
        "blog: rolling restart 2/4 replaced",
        "blog: rolling restart 3/4 replaced",
        "blog: rolling restart 4/4 replaced",
        "blog: restart completed in 4.2s",
    ]


def test_restart_wait_accepts_a_coalesced_later_restart(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished restart with a higher id covers ours (restarts are coalesced)."""
    fake.route("POST", "/restart", (202, {"restarts": [{"app": "blog", "restart_id": 7}]}))
    fake.statuses = [status_doc(app_status(last_restart=finished(9)))]
    assert run_cli(fake, "restart", "--wait") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "blog: restart completed in 4.2s"


def test_restart_wait_aborted_shows_the_deployment_error(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """An aborted restart exits 1 and prints the reason and the failed worker's output."""
    fake.route(
        "POST",
        "/restart",
        (202, {"restarts": [{"app": "blog", "restart_id": 4}, {"app": "shop", "restart_id": 5}]}),
    )
    error = {
        "release": "/srv/blog/releases/C",
        "reason": "worker exited with status 1 before it was ready",
        "output": ["Traceback (most recent call last):", "ImportError: no module named blog"],
        "at": "2026-11-22T10:00:00Z",
    }
    fake.statuses = [
        status_doc(app_status("blog", restart=rolling(0)), app_status("shop", restart=rolling(0))),
        status_doc(
            app_status(
                "blog",
                last_restart=finished(4, "aborted", reason="new worker failed to start"),
                deployment_error=error,
            ),
            app_status("shop", restart=rolling(1)),
        ),
        status_doc(
            app_status("blog", last_restart=finished(4, "aborted"), deployment_error=error),
            app_status("shop", last_restart=finished(5)),
        ),
    ]
    assert run_cli(fake, "restart", "--wait") == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "blog: restart requested (id 4)",
        "shop: restart requested (id 5)",
        "blog: rolling restart 0/2 replaced",
        "shop: rolling restart 0/2 replaced",
        "shop: rolling restart 1/2 replaced",
        "shop: restart completed in 4.2s",
    ]
    assert captured.err.splitlines() == [
        "blog: restart aborted: new worker failed to start",
        "  release: /srv/blog/releases/C",
        "  reason: worker exited with status 1 before it was ready",
        "  last output of the failed worker:",
        "    Traceback (most recent call last):",
        "    ImportError: no module named blog",
    ]


def test_restart_wait_completed_with_deployment_error_fails(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without deployment error resistance a skipped slot still means the restart failed."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 2}))
    error = {"release": "/r/C", "reason": "start timeout", "output": [], "at": "2026"}
    fake.statuses = [status_doc(app_status(last_restart=finished(2), deployment_error=error))]
    assert run_cli(fake, "restart", "blog", "--wait") == 1
    err = capsys.readouterr().err
    assert err.startswith("blog: restart completed in 4.2s, but a new worker failed\n")
    assert "  reason: start timeout\n" in err


def test_restart_wait_gives_up_after_timeout(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restart that never finishes: exit 1 once --timeout has passed."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 1}))
    fake.statuses = [status_doc(app_status(restart=rolling(1)))]
    started = time.monotonic()
    assert run_cli(fake, "restart", "blog", "--wait", "--timeout", "500ms") == 1
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "blog: rolling restart 1/2 replaced"
    assert "gave up waiting after 0.5s; still restarting: blog" in captured.err


def test_restart_wait_daemon_disappears_exits_3(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon going away mid-wait is exit 3, not a hang."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 1}))
    fake.statuses = [status_doc(app_status(restart=rolling(1)))]

    def vanish(count: int) -> None:
        if count == 2:
            # New connections now fail with ENOENT, as after the daemon exited.
            os.unlink(fake.socket_path)

    fake.on_status = vanish
    assert run_cli(fake, "restart", "blog", "--wait") == 3
    assert "flypool: cannot reach the daemon at" in capsys.readouterr().err
    assert fake.status_requests == 2


def test_restart_wait_app_removed_fails(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app dropped by a reload while we wait counts as a failed restart."""
    fake.route("POST", "/apps/blog/restart", (202, {"app": "blog", "restart_id": 1}))
    fake.statuses = [status_doc(app_status("shop"))]
    assert run_cli(fake, "restart", "blog", "--wait") == 1
    assert "blog: restart aborted: the app is no longer configured" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# scale, reload, stop, drain


def test_scale(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """`scale APP N` posts the count and echoes the daemon's answer."""
    fake.route(
        "POST", "/apps/blog/scale", lambda q: (200, {"app": "blog", "workers": int(q["workers"])})
    )
    assert run_cli(fake, "scale", "blog", "6") == 0
    assert fake.posts == [("/apps/blog/scale", {"workers": "6"})]
    assert capsys.readouterr().out == "blog: scaled to 6 worker(s)\n"


def test_scale_unknown_app(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """404 from the daemon: its message, exit 1."""
    fake.route("POST", "/apps/x/scale", (404, {"error": 'no app named "x"'}))
    assert run_cli(fake, "scale", "x", "2") == 1
    assert capsys.readouterr().err == 'flypool: no app named "x"\n'


def test_app_names_are_quoted_in_paths(fake: FakeDaemon) -> None:
    """An odd app name cannot escape its path segment."""
    fake.route("POST", "/apps/a%2Fb/scale", (200, {"app": "a/b", "workers": 1}))
    assert run_cli(fake, "scale", "a/b", "1") == 0
    assert fake.posts == [("/apps/a%2Fb/scale", {"workers": "1"})]


def test_reload(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """`reload` posts /reload and reports success."""
    fake.route("POST", "/reload", (200, {"ok": True}))
    assert run_cli(fake, "reload") == 0
    assert capsys.readouterr().out == "flypool: configuration reloaded\n"


def test_reload_bad_config_exits_2(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A config the daemon rejects is a config error: its message, exit 2."""
    fake.route("POST", "/reload", (400, {"error": "/etc/flypool.toml: app[0].workers: expected"}))
    assert run_cli(fake, "reload") == 2
    assert capsys.readouterr().err == "flypool: /etc/flypool.toml: app[0].workers: expected\n"


@pytest.mark.parametrize(("flags", "mode"), [((), "graceful"), (("--fast",), "fast")])
def test_stop(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], mode: str
) -> None:
    """`stop` asks for a graceful stop, `--fast` for a fast one."""
    fake.route("POST", "/stop", (202, {"ok": True}))
    assert run_cli(fake, "stop", *flags) == 0
    assert fake.posts == [("/stop", {"mode": mode})]
    assert capsys.readouterr().out == f"flypool: stopping ({mode})\n"


def test_drain_all_and_undrain_one(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """`drain` without apps posts /drain; `undrain APP` posts per app."""
    fake.route(
        "POST",
        "/drain",
        (200, {"apps": [{"app": "blog", "drained": True}, {"app": "shop", "drained": True}]}),
    )
    fake.route("POST", "/apps/blog/undrain", (200, {"app": "blog", "drained": False}))
    assert run_cli(fake, "drain") == 0
    assert run_cli(fake, "undrain", "blog") == 0
    assert fake.posts == [("/drain", {}), ("/apps/blog/undrain", {})]
    assert capsys.readouterr().out == "blog: drained\nshop: drained\nblog: undrained\n"


def test_drain_unknown_app(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown app on drain: exit 1 with the daemon's message."""
    fake.route("POST", "/apps/zz/drain", (404, {"error": 'no app named "zz"'}))
    assert run_cli(fake, "drain", "zz") == 1
    assert capsys.readouterr().err == 'flypool: no app named "zz"\n'


def test_unexpected_answer_is_an_operation_failure(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2xx answer that is not the expected JSON is reported, not a traceback."""
    fake.route("POST", "/restart", (202, b"not json"))
    assert run_cli(fake, "restart") == 1
    assert "unexpected answer from the daemon" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# check and run


@needs_config
def test_check_ok(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: `OK: <file>: N app(s): names`, exit 0."""
    config = write_config(short_dir, "/tmp/x.sock", apps=("blog", "shop"))
    assert cli.main(["check", "-c", config]) == 0
    assert capsys.readouterr().out == f"OK: {config}: 2 app(s): blog, shop\n"


@needs_config
def test_check_invalid_exits_2(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file: the config error on stderr, exit 2."""
    path = os.path.join(short_dir, "bad.toml")
    Path(path).write_text('[[app]]\nname = "blog"\nworkers = "four"\n')
    assert cli.main(["check", "-c", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert path in captured.err


@needs_config
def test_check_missing_file_exits_2(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that does not exist is a config error too."""
    assert cli.main(["check", "-c", os.path.join(short_dir, "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


@needs_config
def test_run_config_error_exits_2(capsys: pytest.CaptureFixture[str], short_dir: str) -> None:
    """`run` with a broken config never starts the daemon: message, exit 2."""
    path = os.path.join(short_dir, "bad.toml")
    Path(path).write_text("this is not toml\n")
    assert cli.main(["run", "-c", path]) == 2
    assert capsys.readouterr().err.strip()


@needs_config
def test_run_hands_the_config_to_the_daemon(
    monkeypatch: pytest.MonkeyPatch, short_dir: str
) -> None:
    """`run` builds the config and returns `daemon.run`'s exit status."""
    seen: list[Any] = []
    fake_daemon = types.ModuleType("flypool.daemon")

    def fake_run(config: Any, reload_config: Any = None) -> int:
        seen.append((config, reload_config))
        return 0

    fake_daemon.run = fake_run  # type: ignore[attr-defined]
    # Replaces the real daemon so no event loop or worker is started.
    monkeypatch.setitem(sys.modules, "flypool.daemon", fake_daemon)
    import flypool

    monkeypatch.setattr(flypool, "daemon", fake_daemon, raising=False)
    config = write_config(short_dir, os.path.join(short_dir, "a.sock"), apps=("blog",))
    assert cli.main(["run", "-c", config, "--workers", "3"]) == 0
    config_obj, reload_config = seen[0]
    assert [app.name for app in config_obj.apps] == ["blog"]
    assert config_obj.apps[0].workers == 3
    # A reload reads the file again and keeps the command-line override.
    Path(config).write_text(Path(config).read_text().replace('"blog"', '"news"'))
    reloaded = reload_config()
    assert [app.name for app in reloaded.apps] == ["news"]
    assert reloaded.apps[0].workers == 3


@needs_config
def test_run_flags_only_has_nothing_to_reload(
    monkeypatch: pytest.MonkeyPatch, short_dir: str
) -> None:
    """Without -c the daemon gets no reload function (there is no file to read again)."""
    seen: list[Any] = []
    fake_daemon = types.ModuleType("flypool.daemon")

    def fake_run(config: Any, reload_config: Any = None) -> int:
        seen.append((config, reload_config))
        return 5

    fake_daemon.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flypool.daemon", fake_daemon)
    import flypool

    monkeypatch.setattr(flypool, "daemon", fake_daemon, raising=False)
    listen = f"unix:{short_dir}/front.sock"
    assert cli.main(["run", "--listen", listen, "--", "python3", "app.py", "{socket}"]) == 5
    config, reload_config = seen[0]
    assert config.apps[0].command == ("python3", "app.py", "{socket}")
    assert reload_config is None


def test_client_commands_do_not_import_the_daemon() -> None:
    """`flypool status` and friends stay light: no daemon, no uvloop at import time."""
    import subprocess

    import flypool

    src = os.path.dirname(os.path.dirname(os.path.abspath(flypool.__file__)))
    code = (
        "import sys, flypool.cli; "
        "heavy = [m for m in ('flypool.daemon', 'uvloop', 'asyncio') if m in sys.modules]; "
        "sys.exit(f'imported: {heavy}' if heavy else 0)"
    )
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
