"""Synchronous client for the daemon's admin socket (HTTP/1.1 + JSON over a Unix socket).

The CLI is short-lived and sequential, so this uses the standard library's
plain blocking socket code instead of an event loop: client
commands start fast and never import the daemon's runtime dependencies.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_ADMIN_SOCKET = "/run/flypool/admin.sock"
"""Where the daemon listens when neither the command line, the environment nor a config says."""

ADMIN_SOCKET_ENV = "FLYPOOL_ADMIN_SOCKET"
"""Environment variable naming the admin socket (SPEC §4)."""


class DaemonUnreachable(Exception):
    """The daemon could not be reached: the socket is missing, refused the connection,
    timed out, or the connection broke before a full response arrived.

    `str()` names the socket path and the cause, ready to show to the user.
    """

    def __init__(self, socket_path: str, cause: str) -> None:
        super().__init__(f"{socket_path}: {cause}")
        self.socket_path = socket_path
        self.cause = cause


@dataclass(frozen=True)
class AdminResponse:
    """One admin API answer: the HTTP status and the raw body."""

    status: int
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON; raises `ValueError` when it is not JSON."""
        return json.loads(self.body)

    def error_message(self) -> str:
        """The daemon's `{"error": "..."}` message, or a description of the raw answer."""
        try:
            data = self.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
        text = self.body.decode("utf-8", "replace").strip()
        return f"HTTP {self.status}" + (f": {text}" if text else "")


class _BadAnswer(Exception):
    """The peer's bytes are not an HTTP/1.1 answer."""


def _exchange(socket_path: str, request: bytes, timeout: float) -> AdminResponse:
    """One request, one answer, connection closed by the daemon.

    The admin server always answers with Content-Length and closes, so a few
    lines of socket code do; http.client would cost the CLI ~15 ms of imports.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise _BadAnswer("not an HTTP answer" if data else "connection closed without an answer")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and len(body) < int(value):
            raise _BadAnswer("answer cut short")
    return AdminResponse(status=int(parts[1]), body=body)


def _describe_os_error(exc: OSError) -> str:
    """A short, lower-case cause for an OSError ("no such file or directory", "timed out")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno == errno.ENOENT:
        return "no such socket (is the daemon running?)"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused (is the daemon running?)"
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class AdminClient:
    """Talks to one daemon through its admin socket; one connection per request."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str | int | float] | None = None,
        timeout: float = 10.0,
    ) -> AdminResponse:
        """Send one request and read the whole answer.

        Raises `DaemonUnreachable` when the socket cannot be connected to or the
        exchange fails at the transport level; any HTTP status is returned as is.
        """
        target = path
        if query:
            target += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()})
        request = (
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            return _exchange(self.socket_path, request, timeout)
        except OSError as exc:
            raise DaemonUnreachable(self.socket_path, _describe_os_error(exc)) from exc
        except (_BadAnswer, ValueError) as exc:
            # The daemon went away mid-answer (stopping, crashing) or something
            # else owns the socket.
            raise DaemonUnreachable(self.socket_path, f"bad answer: {exc}") from exc

    def get(self, path: str, query: Mapping[str, str | int | float] | None = None) -> AdminResponse:
        """`GET path`."""
        return self.request("GET", path, query)

    def post(
        self, path: str, query: Mapping[str, str | int | float] | None = None
    ) -> AdminResponse:
        """`POST path` with an empty body."""
        return self.request("POST", path, query)


def app_path(name: str, action: str) -> str:
    """The admin path for an action on one app, e.g. `/apps/blog/restart`."""
    return f"/apps/{urllib.parse.quote(name, safe='')}/{action}"


def find_admin_socket(args_admin_socket: str | None, config_path: str | None) -> str:
    """Find the daemon's admin socket in SPEC §4's order.

    `--admin-socket`, else `$FLYPOOL_ADMIN_SOCKET`, else `daemon.admin_socket` of
    the `-c FILE` config, else the default `/run/flypool/admin.sock`. Raises
    `flypool.config.ConfigError` when the config file is needed but invalid.
    """
    if args_admin_socket:
        return args_admin_socket
    from_env = os.environ.get(ADMIN_SOCKET_ENV)
    if from_env:
        return from_env
    if config_path:
        from flypool.config import load_config  # only when -c is given

        return load_config(config_path).daemon.admin_socket
    return DEFAULT_ADMIN_SOCKET
